"""Unit tests of `dataproc.auth`. Without a server: the bcrypt queue's expected wait and its
refusal at once, the claims a token must carry, the per-process record of live sessions, and
session expiry decided on the caller's clock, against real PostgreSQL. Through the handlers,
on one clock (the `Context`'s): a test moves that clock (no sleeping) and every time decision
follows it: access and refresh token expiry on every route that checks a token, and the login
throttle's window."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from dataproc import api, auth, jwt, store
from dataproc.errors import ApiError
from dataproc.server import HttpServer
from dataproc.store import sessions as session_store
from dataproc.web import make_app
from support import ACCESS_KEY, Client, create_user, login, make_config


def test_the_expected_wait_follows_the_queue_and_the_measured_hash_time():
    checker = auth.PasswordChecker(make_config(None, login_concurrency=2))
    assert checker.expected_wait_s(10) == 0.0  # nothing measured yet: no refusal by estimate
    checker.hash("password-1")  # measures one operation
    assert checker.expected_wait_s(0) == checker.expected_wait_s(1) == 0.0  # a slot is free
    one = checker.expected_wait_s(2)
    assert one > 0
    assert checker.expected_wait_s(5) == pytest.approx(4 * one)


def test_a_request_whose_wait_would_be_too_long_is_refused_at_once():
    config = make_config(None, login_concurrency=1, login_wait_s=0.05, bcrypt_cost=12)
    checker = auth.PasswordChecker(config)
    checker.hash("password-1")  # ~0.2 s or more: longer than the wait
    holder = threading.Thread(target=checker.hash, args=("password-2",))
    holder.start()
    time.sleep(0.02)  # the holder has the slot
    with pytest.raises(ApiError) as refused:
        checker.verify("password-3", None)
    holder.join()
    assert refused.value.status == 503 and int(refused.value.headers["Retry-After"]) >= 1


def test_tokens_without_a_session_are_refused():
    config = make_config(None)
    now = time.time()
    claims = {"sub": "a", "role": "user", "type": "access", "iat": int(now), "exp": int(now) + 60}
    with pytest.raises(ApiError) as refused:
        auth.token_claims(config, jwt.encode({**claims, "jti": "j"}, ACCESS_KEY), auth.ACCESS, now)
    assert refused.value.status == 401 and "session" in refused.value.detail
    token = jwt.encode({**claims, "jti": "j", "sid": "s"}, ACCESS_KEY)
    assert auth.token_claims(config, token, auth.ACCESS, now)["sid"] == "s"


class DeafListener:
    """The listener's interface, never healthy: the registry must ask the database each time."""

    healthy = False

    def subscribe(self, channel, callback) -> None:
        self.callback = callback

    def on_reset(self, callback) -> None:
        self.reset = callback


def test_the_registry_fails_closed_and_trusts_only_while_it_can_hear(clean_db):
    create_user(clean_db, "reg", "password-1")
    user = store.get_user(clean_db, "reg")
    expires = datetime.now(UTC) + timedelta(hours=1)
    session_store.start_session(clean_db, user.id, "sid-1", "jti", expires)
    listener = DeafListener()
    registry = auth.SessionRegistry(clean_db, listener)
    now = time.time()
    assert registry.is_live("sid-1", now) and not registry.is_live("nope", now)
    session_store.end_session(clean_db, "sid-1", "test")  # unheard
    assert not registry.is_live("sid-1", now)  # deaf: asked the database
    session_store.start_session(clean_db, user.id, "sid-2", "jti", expires)
    listener.healthy = True
    assert registry.is_live("sid-2", now)  # looked up once, then remembered
    with store.connection(clean_db) as conn:
        conn.execute("UPDATE sessions SET ended_at = now() WHERE id = 'sid-2'")
    assert registry.is_live("sid-2", now)  # trusted until heard...
    listener.callback("sid-2")
    assert not registry.is_live("sid-2", now)  # ...and refused once heard
    assert not registry.is_live("sid-2", expires.timestamp() + 1)


def test_a_session_expires_on_the_callers_clock_not_the_databases(clean_db):
    create_user(clean_db, "old", "password-1")
    user = store.get_user(clean_db, "old")
    then = 1_700_000_000.0  # November 2023: long expired by PostgreSQL's now()
    expires = datetime.fromtimestamp(then + 3600, UTC)
    session_store.start_session(clean_db, user.id, "sid-then", "jti-1", expires)
    registry = auth.SessionRegistry(clean_db, DeafListener())
    assert registry.is_live("sid-then", then)
    assert not registry.is_live("sid-then", then + 3601)
    later = datetime.fromtimestamp(then + 3601, UTC)
    assert session_store.rotate_refresh(clean_db, "sid-then", "jti-1", "j2", expires, later) is None
    spent = session_store.rotate_refresh(
        clean_db, "sid-then", "jti-1", "jti-2", expires, datetime.fromtimestamp(then, UTC)
    )
    assert spent == ("old", "user")


# --- through the handlers, on the Context's clock -------------------------------------------


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


# --- verified access tokens, remembered ----------------------------------------------------


def test_a_remembered_access_token_is_still_refused_once_it_expires():
    from dataproc import auth
    from dataproc.config import Config

    config = Config(jwt_secret_key="k" * 40, jwt_refresh_secret_key="r" * 40, access_ttl_s=60)
    pair = auth.issue_tokens(config, "alice", "user", 1_000_000.0, "sid-1", "jti-1")
    token = pair["access_token"]
    assert auth.token_claims(config, token, auth.ACCESS, 1_000_010.0)["sub"] == "alice"
    assert auth.VERIFIED.get("k" * 40, token) is not None  # remembered
    with pytest.raises(auth.Unauthorized, match="expired"):
        auth.token_claims(config, token, auth.ACCESS, 1_000_000.0 + 60 + auth.LEEWAY_S)


def test_a_remembered_token_is_not_accepted_under_another_key_or_as_another_type():
    from dataproc import auth
    from dataproc.config import Config

    config = Config(jwt_secret_key="k" * 40, jwt_refresh_secret_key="r" * 40)
    other = Config(jwt_secret_key="o" * 40, jwt_refresh_secret_key="p" * 40)
    token = auth.issue_tokens(config, "alice", "user", 1_000_000.0, "sid-2", "jti-2")[
        "access_token"
    ]
    auth.token_claims(config, token, auth.ACCESS, 1_000_001.0)
    with pytest.raises(auth.Unauthorized, match="signature"):
        auth.token_claims(other, token, auth.ACCESS, 1_000_001.0)
    with pytest.raises(auth.Unauthorized):
        auth.token_claims(config, token, auth.REFRESH, 1_000_001.0)


def test_the_remembered_tokens_are_bounded():
    from dataproc.auth import VerifiedTokens

    tokens = VerifiedTokens(max_entries=3)
    for i in range(5):
        tokens.put("key", f"token-{i}", {"i": i})
    assert tokens.get("key", "token-0") is None and tokens.get("key", "token-1") is None
    assert tokens.get("key", "token-4") == {"i": 4}
