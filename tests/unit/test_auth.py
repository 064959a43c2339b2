"""Unit tests of `dataproc.auth` through the handlers, on one clock: the `Context`'s. A test
moves that clock (no sleeping) and every time decision follows it: access and refresh token
expiry on every route that checks a token, and the login throttle's window."""

from __future__ import annotations

import threading

import pytest

from dataproc import api
from dataproc.server import HttpServer
from dataproc.web import make_app
from support import Client, create_user, login, make_config


class Clock:
    """A clock a test sets by hand."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def moved(database_url, clean_db, upstream):
    """(client, clock, config) of a service whose handlers read `clock`."""
    config = make_config(database_url, upstream_url=upstream[1], login_max_failures=2)
    clock = Clock(1_700_000_000.0)  # November 2023: long before any run of this test
    server = HttpServer(config, make_app(api.build_router(api.Context(config, clean_db, clock))))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    client = Client(f"http://127.0.0.1:{server.port}/")
    create_user(clean_db, "root", "root-password", "admin")
    yield client, clock, config
    client.close()
    server.drain(1)
    thread.join(timeout=5)


def test_tokens_are_issued_and_checked_on_the_context_clock(moved):
    client, clock, config = moved
    pair = login(client, "root", "root-password")  # issued at the clock's time, not the system's
    token = pair["access_token"]
    assert client.get("/api/data", token=token).status == 200
    assert client.get("/api/populate", token=token).status == 200
    clock.now += config.access_ttl_s + 60  # past the access token's life (and its leeway)
    for path in ("/api/data", "/api/populate"):
        reply = client.get(path, token=token)
        assert reply.status == 401 and "expired" in reply.json()["detail"], (path, reply.body)
    fresh = client.post("/auth/refresh", body={"refresh_token": pair["refresh_token"]})
    assert fresh.status == 200
    clock.now += config.refresh_ttl_s
    again = client.post("/auth/refresh", body={"refresh_token": pair["refresh_token"]})
    assert again.status == 401


def test_a_token_from_the_clock_future_is_not_yet_valid_now(moved):
    client, clock, _ = moved
    clock.now += 3600
    token = login(client, "root", "root-password")["access_token"]
    clock.now -= 3600
    reply = client.get("/api/data", token=token)
    assert reply.status == 401 and "issued in the future" in reply.json()["detail"], reply.body


def test_the_login_throttle_window_runs_on_the_context_clock(moved):
    client, clock, config = moved
    for _ in range(config.login_max_failures):
        wrong = {"username": "root", "password": "wrong-password"}
        assert client.post("/auth/login", form=wrong).status == 400
    right = {"username": "root", "password": "root-password"}
    assert client.post("/auth/login", form=right).status == 429
    clock.now += config.login_window_s + 1
    assert client.post("/auth/login", form=right).status == 200
