"""auth without a server: the bcrypt queue's expected wait and its refusal at once, the claims a
token must carry, and the per-process record of live sessions against real PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from dataproc import auth, jwt, store
from dataproc.errors import ApiError
from dataproc.store import sessions as session_store
from support import ACCESS_KEY, create_user, make_config


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
