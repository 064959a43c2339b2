"""Request ids and access logs: every response carries `X-Request-ID`, every request gets one
access-log line (text, or JSON lines with `DATAPROC_LOG_FORMAT=json`), and no password, token or
secret query string ever reaches the log.

The log tests run the service as the operator does, `python -m dataproc serve`, in a
subprocess on a free port, with its stderr captured to a file and read after a clean stop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from dataproc import logs
from support import ACCESS_KEY, REFRESH_KEY, Client, create_user, login

ROOT = Path(__file__).resolve().parents[2]
TEXT_ACCESS = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) INFO dataproc\.access (?P<id>\S+) "
    r"(?P<method>\S+) (?P<route>\S+) (?P<status>\d{3}) (?P<duration>\d+\.\d)ms (?P<bytes>\d+)B"
)


# --- request ids (the service in-process) ---------------------------------------------------


def test_every_response_carries_a_generated_request_id(client, user_token):
    ids = set()
    for method, path, token in [
        ("GET", "/healthz", None),
        ("GET", "/nowhere", None),
        ("POST", "/healthz", None),
        ("GET", "/api/data", None),
        ("GET", "/api/data?limit=0", user_token),
        ("GET", "/api/data", user_token),
    ]:
        reply = client.request(method, path, token=token)
        assert re.fullmatch(r"[0-9a-f]{16}", reply.headers["X-Request-ID"]), (method, path)
        ids.add(reply.headers["X-Request-ID"])
    assert len(ids) == 6


def test_a_sane_client_request_id_is_echoed(client):
    reply = client.get("/healthz", headers={"X-Request-ID": "trace-42.a:b_c"})
    assert reply.headers["X-Request-ID"] == "trace-42.a:b_c"


@pytest.mark.parametrize("given", ["has space", "x" * 129, "<script>", "semi;colon", ""])
def test_an_insane_client_request_id_is_replaced(client, given):
    reply = client.get("/healthz", headers={"X-Request-ID": given})
    assert re.fullmatch(r"[0-9a-f]{16}", reply.headers["X-Request-ID"])


def test_two_client_request_ids_are_replaced_by_one_generated(service):
    with socket.create_connection(
        (service.http.server_address[0], service.http.port), timeout=5
    ) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: one\r\nX-Request-ID: two\r\n"
            b"Connection: close\r\n\r\n"
        )
        answer = _read_all(sock)
    ids = re.findall(rb"(?im)^X-Request-ID: (.*?)\r$", answer)
    assert len(ids) == 1 and re.fullmatch(rb"[0-9a-f]{16}", ids[0])


def test_a_request_that_cannot_be_parsed_still_gets_a_request_id(service):
    with socket.create_connection(
        (service.http.server_address[0], service.http.port), timeout=5
    ) as sock:
        sock.sendall(b"NOT A REQUEST LINE\r\n\r\n")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert re.search(rb"(?im)^X-Request-ID: [0-9a-f]{16}\r$", answer)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# --- access logs (the service as a subprocess) ----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Running:
    """`python -m dataproc serve` with its stderr in a file."""

    def __init__(self, tmp_path: Path, database_url: str, upstream_url: str, log_format: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = tmp_path / f"service-{log_format}.log"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": database_url,
            "JWT_SECRET_KEY": ACCESS_KEY,
            "JWT_REFRESH_SECRET_KEY": REFRESH_KEY,
            "SERVER_URL": upstream_url,
            "DATAPROC_BCRYPT_COST": "4",
            "DATAPROC_LOG_FORMAT": log_format,
            "DATAPROC_LOG_LEVEL": "DEBUG",
            "DATAPROC_DB_WAIT_S": "5",
            "DATAPROC_SHUTDOWN_GRACE_S": "2",
        }
        self._log = open(self.log_path, "wb")
        # cwd is an empty directory: no .env of the work tree is read.
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dataproc",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"service exited: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("service did not start listening in 30 s")

    def stop(self) -> str:
        """Stop with SIGTERM (a clean drain) and return everything it logged."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.log_path.read_text("utf-8")


@pytest.fixture
def run_service(tmp_path, database_url, clean_db, upstream):
    """Start `python -m dataproc serve` with a log format; stopped after the test."""
    started: list[Running] = []

    def start(log_format: str) -> Running:
        started.append(Running(tmp_path, database_url, upstream[1], log_format))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def _traffic(running: Running) -> list[tuple[str, str, str, int]]:
    """A few requests with known ids: (id, method, route, status) of each."""
    client = Client(running.url)
    plan = [
        ("GET", "/healthz", "/healthz", 200),
        ("GET", "/api/data?limit=5", "/api/data", 401),
        ("GET", "/no/such/place", "-", 404),
        ("POST", "/healthz", "-", 405),
    ]
    done = []
    for method, target, route, status in plan:
        request_id = "t-" + uuid.uuid4().hex[:12]
        reply = client.request(method, target, headers={"X-Request-ID": request_id})
        assert reply.status == status and reply.headers["X-Request-ID"] == request_id
        done.append((request_id, method, route, status, len(reply.body)))
    client.close()
    return done


def test_text_access_log_has_one_line_per_request_with_its_fields(run_service):
    running = run_service("text")
    done = _traffic(running)
    log = running.stop()
    for request_id, method, route, status, size in done:
        lines = [line for line in log.splitlines() if request_id in line]
        assert len(lines) == 1, (request_id, lines)
        match = TEXT_ACCESS.fullmatch(lines[0])
        assert match, lines[0]
        assert (
            match["id"],
            match["method"],
            match["route"],
            int(match["status"]),
            int(match["bytes"]),
        ) == (request_id, method, route, status, size)


def test_json_log_format_gives_json_lines_with_the_request_fields(run_service):
    running = run_service("json")
    done = _traffic(running)
    log = running.stop()
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is JSON
    assert entries, "nothing was logged"
    for request_id, method, route, status, size in done:
        access = [e for e in entries if e.get("request_id") == request_id]
        assert len(access) == 1, (request_id, access)
        entry = access[0]
        assert entry["logger"] == "dataproc.access"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
        assert (entry["method"], entry["route"], entry["status"], entry["bytes"]) == (
            method,
            route,
            status,
            size,
        )
        assert isinstance(entry["duration_ms"], (int, float)) and entry["duration_ms"] >= 0


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_passwords_tokens_and_secret_query_strings_never_reach_the_log(
    run_service, clean_db, log_format
):
    running = run_service(log_format)
    client = Client(running.url)
    admin_password = "Adm1n-" + uuid.uuid4().hex
    user_password = "Us3r-" + uuid.uuid4().hex
    wrong_password = "Wr0ng-" + uuid.uuid4().hex
    query_secret = "Q" + uuid.uuid4().hex
    create_user(clean_db, "boss", admin_password, "admin")

    assert (
        client.post("/auth/signup", body={"username": "carol", "password": user_password}).status
        == 201
    )
    assert (
        client.post("/auth/signup", form={"username": "carol", "password": user_password}).status
        == 409
    )
    assert (
        client.post("/auth/login", form={"username": "carol", "password": wrong_password}).status
        == 400
    )
    assert (
        client.post("/auth/signup", body={"username": "x", "password": wrong_password}).status
        == 422
    )
    user = login(client, "carol", user_password)
    admin = login(client, "boss", admin_password)
    refreshed = client.post("/auth/refresh", body={"refresh_token": user["refresh_token"]}).json()
    assert client.post("/auth/refresh", form={"refresh_token": admin["access_token"]}).status == 401
    assert client.get("/api/populate", token=admin["access_token"]).status == 200
    assert client.get("/api/data", token=refreshed["access_token"]).status == 200
    assert client.get("/api/data", token=admin["access_token"][:-3] + "abc").status == 401
    assert (
        client.get(f"/api/data?access_token={query_secret}&password={query_secret}").status == 401
    )
    assert client.get(f"/no/where?token={query_secret}").status == 404
    client.close()
    log = running.stop()

    assert log.count("dataproc.access") >= 13 or log.count('"dataproc.access"') >= 13, log
    tokens = [
        user["access_token"],
        user["refresh_token"],
        admin["access_token"],
        admin["refresh_token"],
        refreshed["access_token"],
        refreshed["refresh_token"],
    ]
    secrets = [admin_password, user_password, wrong_password, query_secret]
    secrets += tokens + [token.rsplit(".", 1)[1] for token in tokens]  # each signature alone too
    leaked = [secret for secret in secrets if secret in log]
    assert leaked == [], "secrets found in the log"


# --- the background writer ----------------------------------------------------------------


class _Collect(logging.Handler):
    """A handler that keeps what it is handed, and in which thread."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []
        self.threads: set[str] = set()

    def emit(self, record):
        self.lines.append(record.getMessage())
        self.threads.add(threading.current_thread().name)


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"dataproc.test.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def test_the_background_handler_writes_in_order_from_its_own_thread_once_flushed():
    target = _Collect()
    handler = logs.BackgroundHandler(target)
    logger = _logger(handler)
    values = ["first"]
    logger.info("line %s", values)
    values.append("changed later")  # the line was formatted when it was logged
    for number in range(100):
        logger.info("n=%d", number)
    handler.flush()
    assert target.lines == ["line ['first']"] + [f"n={n}" for n in range(100)]
    assert target.threads == {"dataproc-log"}
    handler.close()


def test_closing_the_background_handler_writes_what_is_queued_then_writes_at_once():
    target = _Collect()
    handler = logs.BackgroundHandler(target)
    logger = _logger(handler)
    for number in range(50):
        logger.info("n=%d", number)
    handler.close()
    assert target.lines == [f"n={n}" for n in range(50)]
    logger.info("after close")
    assert target.lines[-1] == "after close"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only (os.fork)")
def test_a_forked_child_writes_its_own_lines_and_none_of_the_parents(tmp_path):
    out = tmp_path / "child.log"
    stream = out.open("w", encoding="utf-8")  # closed by the handler
    handler = logs.BackgroundHandler(logging.StreamHandler(stream))
    logger = _logger(handler)
    logger.info("parent before fork")
    handler.flush()
    pid = os.fork()
    if pid == 0:  # the child: log, close (as a worker's logging.shutdown does), leave
        logger.info("child line")
        handler.close()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    handler.close()
    assert out.read_text(encoding="utf-8").splitlines() == ["parent before fork", "child line"]
