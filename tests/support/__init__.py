"""Helpers the tests share (fixtures live in `conftest.py`): the fixed test keys, a test
`Config`, a small keep-alive HTTP/1.1 client, and the shortcuts that make a user and log in.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from dataproc import passwords, store
from dataproc.config import Config

REPO = Path(__file__).resolve().parents[2]  # the project's top folder
ACCESS_KEY = "test-access-key-" + "a" * 32
REFRESH_KEY = "test-refresh-key-" + "b" * 32
TEST_COST = 4  # bcrypt cost for users the tests create: fast, same code path
# The data_points layout of the test database: `DATAPROC_TEST_PARTITION=day` runs the suite on
# the partitioned layout (the `pool` fixture makes it so; services started by tests use it).
TEST_PARTITION = os.environ.get("DATAPROC_TEST_PARTITION", "none") or "none"


def make_config(database_url: str | None, **overrides) -> Config:
    """A test configuration: fast bcrypt, port 0, fixed keys, short waits."""
    values = dict(
        database_url=database_url,
        jwt_secret_key=ACCESS_KEY,
        jwt_refresh_secret_key=REFRESH_KEY,
        bcrypt_cost=TEST_COST,
        port=0,
        db_wait_s=3.0,
        db_start_wait_s=0.0,  # one try: a test of the start wait sets its own
        upstream_timeout_s=2.0,
        socket_timeout_s=5.0,
        shutdown_grace_s=2.0,
        login_concurrency=2,
        partition=TEST_PARTITION,
    )
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

    def request(
        self,
        method: str,
        path: str,
        *,
        body=None,
        headers=None,
        token: str | None = None,
        form: dict | None = None,
    ) -> Reply:
        headers = dict(headers or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if form is not None:
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


def create_user(pool, username: str, password: str, role: str = "user") -> None:
    """A user straight in the database (cost 4), bypassing the API."""
    store.upsert_user(pool, username, passwords.hash_password(password, TEST_COST), role)


def login(client: Client, username: str, password: str) -> dict:
    """The token pair of a successful login."""
    reply = client.post("/auth/login", form={"username": username, "password": password})
    assert reply.status == 200, reply.body
    return reply.json()


FRESHNESS_S = 0.1  # API.md: a change is in every replica's next read within 100 ms of commit


def within_freshness(read, done, within_s: float = FRESHNESS_S):
    """Repeat `read()` until `done(result)` or `within_s` after now (a commit just returned);
    the last result. The contract's bound on freshness, not a benchmark: a cached answer may
    lag a write on another connection by the notification's trip, never by more."""
    deadline = time.monotonic() + within_s
    while True:
        result = read()
        if done(result) or time.monotonic() >= deadline:
            return result
        time.sleep(0.002)
