"""Sessions end to end (API.md `/auth/refresh` Sessions, `/auth/logout`, `/auth/password`):
rotation, reuse detection (with the race of two simultaneous refreshes), logout and its
propagation to another replica, password change, and tokens from before sessions.

Two `Service`s on one database are two replicas: each has its own listener and its own record
of live sessions, as separate processes would.
"""

from __future__ import annotations

import threading
import time

import pytest

from dataproc import store
from support import ACCESS_KEY, REFRESH_KEY, Client, create_user, login

pyjwt = pytest.importorskip("jwt", reason="pip install PyJWT (a test-only tool)")


def claims_of(token: str, key: str) -> dict:
    """The claims, verified by PyJWT (a standard library), HS256 only."""
    return pyjwt.decode(token, key, algorithms=["HS256"])


def refresh(client: Client, token: str):
    return client.post("/auth/refresh", body={"refresh_token": token})


def data_status(client: Client, token: str) -> int:
    return client.get("/api/data", token=token).status


def wait_healthy(service, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not service.listener.healthy:
        assert time.monotonic() < deadline, "the listener never became healthy"
        time.sleep(0.02)


def poll_until_status(client: Client, token: str, status: int, timeout_s: float) -> float:
    """Seconds until `/api/data` with `token` answers `status` (fails past the timeout)."""
    started = time.monotonic()
    while data_status(client, token) != status:
        assert time.monotonic() - started < timeout_s, f"still not {status} after {timeout_s} s"
        time.sleep(0.005)
    return time.monotonic() - started


@pytest.fixture
def carol(clean_db):
    create_user(clean_db, "carol", "carol-password")
    return "carol"


# --- tokens ---------------------------------------------------------------------------------


def test_login_starts_a_session_and_both_tokens_carry_its_sid(client, carol, clean_db):
    pair = login(client, carol, "carol-password")
    access, refresh_claims = (
        claims_of(pair["access_token"], ACCESS_KEY),
        claims_of(pair["refresh_token"], REFRESH_KEY),
    )
    assert access["sid"] == refresh_claims["sid"] and len(access["sid"]) >= 22
    assert {"sub", "role", "type", "iat", "exp", "jti", "sid"} <= set(access)
    assert (access["type"], refresh_claims["type"]) == ("access", "refresh")
    with store.connection(clean_db) as conn:
        row = conn.execute(
            "SELECT refresh_jti, ended_at FROM sessions WHERE id = %s", (access["sid"],)
        ).fetchone()
    assert row == (refresh_claims["jti"], None)


def test_two_logins_are_two_sessions(client, carol):
    first, second = (login(client, carol, "carol-password") for _ in range(2))
    assert (
        claims_of(first["access_token"], ACCESS_KEY)["sid"]
        != claims_of(second["access_token"], ACCESS_KEY)["sid"]
    )


def test_tokens_without_sid_from_before_the_upgrade_are_refused(client, carol):
    now = int(time.time())
    old = {"sub": carol, "role": "user", "iat": now, "exp": now + 600, "jti": "x"}
    access = pyjwt.encode({**old, "type": "access"}, ACCESS_KEY, algorithm="HS256")
    refresh_token = pyjwt.encode({**old, "type": "refresh"}, REFRESH_KEY, algorithm="HS256")
    reply = client.get("/api/data", token=access)
    assert reply.status == 401 and "session" in reply.json()["detail"]
    assert 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert refresh(client, refresh_token).status == 401


def test_a_standard_librarys_token_naming_a_live_session_is_accepted(client, carol):
    sid = claims_of(login(client, carol, "carol-password")["access_token"], ACCESS_KEY)["sid"]
    now = int(time.time())
    claims = {"sub": carol, "role": "user", "type": "access", "iat": now, "exp": now + 60}
    token = pyjwt.encode({**claims, "jti": "hand", "sid": sid}, ACCESS_KEY, algorithm="HS256")
    assert data_status(client, token) == 200
    unknown = pyjwt.encode({**claims, "jti": "h", "sid": "no-such"}, ACCESS_KEY, algorithm="HS256")
    assert data_status(client, unknown) == 401


# --- rotation and reuse ---------------------------------------------------------------------


def test_refresh_rotates_within_the_session(client, carol):
    pair = login(client, carol, "carol-password")
    reply = refresh(client, pair["refresh_token"])
    assert reply.status == 200 and reply.headers["Cache-Control"] == "no-store"
    new = reply.json()
    assert set(new) == {"access_token", "refresh_token", "token_type", "expires_in"}
    old_claims = claims_of(pair["refresh_token"], REFRESH_KEY)
    new_claims = claims_of(new["refresh_token"], REFRESH_KEY)
    assert new_claims["sid"] == old_claims["sid"] and new_claims["jti"] != old_claims["jti"]
    assert data_status(client, new["access_token"]) == 200
    assert data_status(client, pair["access_token"]) == 200  # same session: still live
    assert refresh(client, new["refresh_token"]).status == 200  # the new one works once too


def test_reusing_a_spent_refresh_token_ends_the_whole_session(client, carol, clean_db):
    pair = login(client, carol, "carol-password")
    data_status(client, pair["access_token"])  # this replica now knows the session as live
    new = refresh(client, pair["refresh_token"]).json()
    reply = refresh(client, pair["refresh_token"])  # the spent one: reuse
    assert reply.status == 401 and 'error="invalid_token"' in reply.headers["WWW-Authenticate"]
    assert refresh(client, new["refresh_token"]).status == 401  # the current one died with it
    assert data_status(client, new["access_token"]) == 401  # at once, on this replica
    assert data_status(client, pair["access_token"]) == 401
    sid = claims_of(pair["access_token"], ACCESS_KEY)["sid"]
    with store.connection(clean_db) as conn:
        reason = conn.execute("SELECT end_reason FROM sessions WHERE id = %s", (sid,)).fetchone()
    assert reason == ("refresh token reuse",)
    assert login(client, carol, "carol-password")["token_type"] == "bearer"  # the user is not


def race_refreshes(url: str, token: str, racers: int = 2) -> list[int]:
    """`racers` clients refresh with one token at the same moment; their statuses."""
    clients = [Client(url) for _ in range(racers)]
    barrier, statuses = threading.Barrier(racers), []

    def spend(client: Client) -> None:
        barrier.wait()
        statuses.append(refresh(client, token).status)

    threads = [threading.Thread(target=spend, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    for client in clients:
        client.close()
    return sorted(statuses)


def test_two_simultaneous_refreshes_of_one_token_give_exactly_one_200(service, carol):
    client = Client(service.url)
    for _ in range(10):
        pair = login(client, carol, "carol-password")
        assert race_refreshes(service.url, pair["refresh_token"]) == [200, 401]
    pair = login(client, carol, "carol-password")
    assert race_refreshes(service.url, pair["refresh_token"], racers=8) == [200] + [401] * 7


def test_a_refresh_token_of_a_deleted_user_is_refused(client, carol, clean_db):
    pair = login(client, carol, "carol-password")
    with store.connection(clean_db) as conn:
        conn.execute("DELETE FROM users WHERE username = %s", (carol,))
    assert refresh(client, pair["refresh_token"]).status == 401
    assert data_status(client, pair["access_token"]) == 401


def test_an_access_token_is_not_a_refresh_token(client, carol):
    pair = login(client, carol, "carol-password")
    assert refresh(client, pair["access_token"]).status == 401


# --- logout ---------------------------------------------------------------------------------


def test_logout_with_the_access_token_ends_the_session_at_once(client, carol):
    pair = login(client, carol, "carol-password")
    assert data_status(client, pair["access_token"]) == 200
    reply = client.post("/auth/logout", token=pair["access_token"])
    assert reply.status == 204 and reply.body == b""
    assert data_status(client, pair["access_token"]) == 401
    assert refresh(client, pair["refresh_token"]).status == 401
    again = client.post("/auth/logout", token=pair["access_token"])
    assert again.status == 401 and "WWW-Authenticate" in again.headers


def test_logout_with_the_refresh_token_in_the_body(client, carol):
    pair = login(client, carol, "carol-password")
    assert data_status(client, pair["access_token"]) == 200
    body = {"refresh_token": pair["refresh_token"]}
    assert client.post("/auth/logout", body=body).status == 204
    assert data_status(client, pair["access_token"]) == 401
    assert client.post("/auth/logout", body=body).status == 401
    assert client.post("/auth/logout", form=body).status == 401


def test_logout_with_a_spent_refresh_token_is_reuse(client, carol):
    pair = login(client, carol, "carol-password")
    new = refresh(client, pair["refresh_token"]).json()
    assert client.post("/auth/logout", body={"refresh_token": pair["refresh_token"]}).status == 401
    assert data_status(client, new["access_token"]) == 401  # ended: it was reuse


def test_logout_without_any_token_is_401(client):
    reply = client.post("/auth/logout")
    assert reply.status == 401 and reply.headers["WWW-Authenticate"] == "Bearer"


def test_logout_on_one_replica_reaches_another_well_within_a_second(service_factory, carol):
    one, two = service_factory(), service_factory()
    wait_healthy(two)
    a, b = Client(one.url), Client(two.url)
    took = []
    for _ in range(5):
        pair = login(a, carol, "carol-password")
        assert data_status(b, pair["access_token"]) == 200  # `two` now trusts the session
        assert a.post("/auth/logout", token=pair["access_token"]).status == 204
        took.append(poll_until_status(b, pair["access_token"], 401, timeout_s=5))
    print(f"\nlogout -> 401 on the other replica: max {max(took) * 1000:.1f} ms")


def test_a_session_ended_by_plain_sql_is_heard_by_every_replica(service_factory, carol, clean_db):
    one = service_factory()
    wait_healthy(one)
    client = Client(one.url)
    pair = login(client, carol, "carol-password")
    assert data_status(client, pair["access_token"]) == 200
    with store.connection(clean_db) as conn:
        conn.execute("UPDATE sessions SET ended_at = now(), end_reason = 'operator'")
    poll_until_status(client, pair["access_token"], 401, timeout_s=5)


def test_while_the_listener_is_deaf_every_request_asks_the_database(
    service_factory, carol, clean_db
):
    one = service_factory()
    wait_healthy(one)
    client = Client(one.url)
    pair = login(client, carol, "carol-password")
    assert data_status(client, pair["access_token"]) == 200  # remembered as live
    one.listener.stop()  # deaf: the NOTIFY below is never heard
    assert not one.listener.healthy
    with store.connection(clean_db) as conn:
        conn.execute("UPDATE sessions SET ended_at = now(), end_reason = 'operator'")
    assert data_status(client, pair["access_token"]) == 401  # at once: the database was asked


# --- password change ------------------------------------------------------------------------


def test_changing_the_password_ends_every_other_session(client, carol):
    mine, other = (login(client, carol, "carol-password") for _ in range(2))
    assert data_status(client, other["access_token"]) == 200
    reply = client.post(
        "/auth/password",
        token=mine["access_token"],
        body={"current_password": "carol-password", "new_password": "carol-new-password"},
    )
    assert reply.status == 204 and reply.body == b""
    assert data_status(client, other["access_token"]) == 401
    assert refresh(client, other["refresh_token"]).status == 401
    assert data_status(client, mine["access_token"]) == 200  # this session stays
    assert refresh(client, mine["refresh_token"]).status == 200
    assert login(client, carol, "carol-new-password")["token_type"] == "bearer"
    old = client.post("/auth/login", form={"username": carol, "password": "carol-password"})
    assert old.status == 400


def test_a_wrong_current_password_is_400_and_counted_by_the_throttle(service_factory, carol):
    service = service_factory(login_max_failures=3)
    client = Client(service.url)
    token = login(client, carol, "carol-password")["access_token"]
    body = {"current_password": "not-my-password", "new_password": "carol-new-password"}
    for _ in range(3):
        reply = client.post("/auth/password", token=token, body=body)
        assert reply.status == 400 and reply.json() == {"detail": "Incorrect password"}
    reply = client.post("/auth/password", token=token, body=body)
    assert reply.status == 429 and int(reply.headers["Retry-After"]) >= 1
    login_reply = client.post("/auth/login", form={"username": carol, "password": "carol-password"})
    assert login_reply.status == 429  # the same throttle as logins


def test_the_new_password_follows_the_signup_rules(client, carol):
    token = login(client, carol, "carol-password")["access_token"]
    for new in ("short", "x" * 73):
        reply = client.post(
            "/auth/password",
            token=token,
            body={"current_password": "carol-password", "new_password": new},
        )
        assert reply.status == 422 and reply.json()["detail"][0]["loc"] == ["body", "new_password"]
    missing = client.post("/auth/password", token=token, body={"new_password": "long-enough"})
    assert missing.status == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "current_password"]


def test_changing_the_password_needs_a_live_session(client, carol):
    body = {"current_password": "carol-password", "new_password": "carol-new-password"}
    assert client.post("/auth/password", body=body).status == 401
    pair = login(client, carol, "carol-password")
    client.post("/auth/logout", token=pair["access_token"])
    assert client.post("/auth/password", token=pair["access_token"], body=body).status == 401
