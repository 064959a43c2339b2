"""End to end: every line of API.md's endpoint sections against the real service.

Each test runs the real server on port 0 (conftest's `service`/`service_factory`) on the
session's real PostgreSQL, and talks to it over real sockets with a keep-alive client.
Points are put in the database directly (`store.insert_point` or SQL) when a test needs
known rows; populate fetches from the real simulated upstream.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlencode

import pytest

from dataproc import jwt, passwords, store
from support import ACCESS_KEY, REFRESH_KEY, Client, create_user, login, within_freshness

RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?Z")
POINT_KEYS = {"id", "time", "value", "valid", "tags"}
T0 = datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)


# --- helpers --------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def hand_token(claims: dict, key: str, *, header: dict | None = None, digest=hashlib.sha256) -> str:
    """A JWS compact token made the way any standard JWT library makes one (stdlib only)."""
    header = header or {"alg": "HS256", "typ": "JWT"}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = hmac.new(key.encode(), signing_input.encode(), digest).digest()
    return signing_input + "." + b64url(signature)


def claims_for(
    username: str,
    role: str = "user",
    kind: str = "access",
    *,
    ttl_s: int = 600,
    now: float | None = None,
) -> dict:
    issued = int(time.time() if now is None else now)
    return {
        "sub": username,
        "role": role,
        "type": kind,
        "iat": issued,
        "exp": issued + ttl_s,
        "jti": os.urandom(8).hex(),
    }


def tamper(token: str) -> str:
    """The token with one character of its payload changed (the signature no longer matches)."""
    head, payload, signature = token.split(".")
    middle = len(payload) // 2
    swapped = "A" if payload[middle] != "A" else "B"
    return ".".join((head, payload[:middle] + swapped + payload[middle + 1 :], signature))


def add_point(pool, when: datetime, value: float = 1.5, valid: bool = True, tags=()) -> dict:
    """A point stored directly; returns it as the API shows it."""
    point = store.NewPoint(when, value, valid, list(tags), "{}", os.urandom(32))
    body, new = store.insert_point(pool, point)
    assert new
    return json.loads(body)


def add_points_sql(pool, count: int, *, per_second: int = 3) -> None:
    """`count` valid points, `per_second` of them sharing each timestamp."""
    with store.connection(pool) as conn:
        conn.execute(
            "INSERT INTO data_points (time, value, valid, tags) "
            "SELECT %s + (i / %s) * interval '1 second', i, true, '{}' "
            "FROM generate_series(0, %s - 1) AS i",
            (T0, per_second, count),
        )


def delete_user(pool, username: str) -> None:
    with store.connection(pool) as conn:
        conn.execute("DELETE FROM users WHERE username = %s", (username,))


def from_address(service, address: str) -> Client:
    """A client whose connections come from another loopback address (127.0.0.0/8)."""
    client = Client(service.url)
    client.conn = http.client.HTTPConnection(
        client.host, client.port, timeout=10, source_address=(address, 0)
    )
    return client


def next_link(reply) -> str | None:
    link = reply.headers.get("Link")
    if link is None:
        return None
    match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
    assert match, link
    return match[1]


def data(client, token, **params):
    return client.get("/api/data" + ("?" + urlencode(params) if params else ""), token=token)


def locs(reply) -> list[list[str]]:
    assert reply.status == 422, (reply.status, reply.body)
    return [entry["loc"] for entry in reply.json()["detail"]]


# --- POST /auth/signup ----------------------------------------------------------------------


def test_signup_creates_a_user_and_answers_201_with_name_and_role(client):
    reply = client.post("/auth/signup", body={"username": "alice", "password": "wonderland"})
    assert reply.status == 201
    assert reply.json() == {"username": "alice", "role": "user"}
    assert login(client, "alice", "wonderland")["token_type"] == "bearer"


def test_signup_never_creates_an_admin_even_when_the_body_asks(client, clean_db):
    reply = client.post(
        "/auth/signup", body={"username": "mallory", "password": "password1", "role": "admin"}
    )
    assert reply.status == 201 and reply.json()["role"] == "user"
    assert store.user_role(clean_db, "mallory") == "user"


def test_signup_of_a_taken_name_is_409(client):
    body = {"username": "bob", "password": "password1"}
    assert client.post("/auth/signup", body=body).status == 201
    reply = client.post("/auth/signup", body={"username": "bob", "password": "other-password"})
    assert reply.status == 409
    assert reply.json() == {"detail": "username already taken"}


def test_fifty_concurrent_signups_of_one_name_give_one_201_and_the_rest_409(service):
    statuses: list[int] = []
    barrier = threading.Barrier(50)

    def sign_up() -> None:
        client = Client(service.url, timeout=30)
        try:
            barrier.wait()
            statuses.append(
                client.post(
                    "/auth/signup", body={"username": "race", "password": "password1"}
                ).status
            )
        finally:
            client.close()

    threads = [threading.Thread(target=sign_up) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(statuses) == 50
    assert statuses.count(201) == 1 and statuses.count(409) == 49, sorted(statuses)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"password": "password1"}, "username"),
        ({"username": "ab", "password": "password1"}, "username"),
        ({"username": "a" * 65, "password": "password1"}, "username"),
        ({"username": "al ice", "password": "password1"}, "username"),
        ({"username": "alice!", "password": "password1"}, "username"),
        ({"username": "alice"}, "password"),
        ({"username": "alice", "password": "1234567"}, "password"),
        ({"username": "alice", "password": "a" * 73}, "password"),
        ({"username": "alice", "password": "é" * 37}, "password"),  # 37 characters, 74 bytes
        ({"username": "alice", "password": 12345678}, "password"),
        ({"username": 12345, "password": "password1"}, "username"),
    ],
    ids=[
        "missing-username",
        "short-username",
        "long-username",
        "space-in-username",
        "bang-in-username",
        "missing-password",
        "7-byte-password",
        "73-byte-password",
        "74-byte-multibyte-password",
        "number-password",
        "number-username",
    ],
)
def test_signup_with_a_bad_field_is_422_naming_it(client, body, field):
    reply = client.post("/auth/signup", body=body)
    assert locs(reply) == [["body", field]]
    entry = reply.json()["detail"][0]
    assert isinstance(entry["msg"], str) and entry["msg"] and isinstance(entry["type"], str)


def test_signup_with_both_fields_bad_lists_both(client):
    reply = client.post("/auth/signup", body={"username": "x", "password": "short"})
    assert sorted(locs(reply)) == [["body", "password"], ["body", "username"]]


def test_signup_accepts_a_multibyte_password_of_exactly_72_bytes(client):
    password = "é" * 36
    assert len(password.encode()) == 72
    reply = client.post("/auth/signup", body={"username": "emile", "password": password})
    assert reply.status == 201, reply.body
    assert login(client, "emile", password)["access_token"]


def test_signup_accepts_a_form_urlencoded_body(client):
    reply = client.post("/auth/signup", form={"username": "formy", "password": "password1"})
    assert reply.status == 201 and reply.json() == {"username": "formy", "role": "user"}


def test_signup_with_a_body_that_is_not_json_is_422(client):
    reply = client.post(
        "/auth/signup",
        body=b'{"username": "alice", "password": NaN}',
        headers={"Content-Type": "application/json"},
    )
    assert locs(reply) == [["body", "body"]]


def test_signup_with_a_text_plain_body_is_415(client):
    reply = client.post(
        "/auth/signup",
        body=b"username=alice&password=password1",
        headers={"Content-Type": "text/plain"},
    )
    assert reply.status == 415
    assert isinstance(reply.json()["detail"], str)


# --- POST /auth/login -----------------------------------------------------------------------


def test_login_with_a_form_body_gives_a_bearer_token_pair(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    reply = client.post("/auth/login", form={"username": "carol", "password": "carol-password"})
    assert reply.status == 200
    pair = reply.json()
    assert set(pair) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert pair["token_type"] == "bearer" and pair["expires_in"] == 1800


def test_login_with_a_json_body_works_too(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    reply = client.post("/auth/login", body={"username": "carol", "password": "carol-password"})
    assert reply.status == 200 and reply.json()["token_type"] == "bearer"


def test_expires_in_follows_the_configured_access_lifetime(service_factory, clean_db):
    service = service_factory(access_ttl_s=120)
    create_user(clean_db, "carol", "carol-password")
    pair = login(Client(service.url), "carol", "carol-password")
    claims = json.loads(unb64url(pair["access_token"].split(".")[1]))
    assert pair["expires_in"] == 120 and claims["exp"] - claims["iat"] == 120


def test_tokens_are_hs256_jws_with_the_contract_claims(client, clean_db):
    create_user(clean_db, "carol", "carol-password", "admin")
    pair = login(client, "carol", "carol-password")
    for kind, key in (("access", ACCESS_KEY), ("refresh", REFRESH_KEY)):
        head, payload, signature = pair[f"{kind}_token"].split(".")
        assert json.loads(unb64url(head)) == {"alg": "HS256", "typ": "JWT"}
        claims = json.loads(unb64url(payload))
        assert set(claims) == {"sub", "role", "type", "iat", "exp", "jti", "sid"}
        assert (claims["sub"], claims["role"], claims["type"]) == ("carol", "admin", kind)
        assert abs(claims["iat"] - time.time()) < 60 and claims["exp"] > claims["iat"]
        # Any standard library verifies it: HMAC-SHA256 over "header.payload" with the key.
        expected = hmac.new(key.encode(), f"{head}.{payload}".encode(), hashlib.sha256).digest()
        assert hmac.compare_digest(unb64url(signature), expected)
    access = json.loads(unb64url(pair["access_token"].split(".")[1]))
    refresh = json.loads(unb64url(pair["refresh_token"].split(".")[1]))
    assert access["jti"] != refresh["jti"]


def test_login_without_a_password_is_422_naming_it(client):
    assert locs(client.post("/auth/login", form={"username": "carol"})) == [["body", "password"]]


def test_wrong_password_and_unknown_user_get_the_same_400(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    wrong = client.post("/auth/login", form={"username": "carol", "password": "not-hers-1"})
    unknown = client.post("/auth/login", form={"username": "nobody", "password": "not-hers-1"})
    assert wrong.status == unknown.status == 400
    assert wrong.json() == unknown.json() == {"detail": "Incorrect username or password"}


def test_wrong_password_and_unknown_user_take_comparable_time(service_factory, clean_db):
    # Cost 8 (about 15 ms) rather than the suite's 4, so bcrypt outweighs the noise of a shared
    # machine: without the dummy check an unknown user would answer several times faster.
    service = service_factory(login_max_failures=1000, bcrypt_cost=8)
    store.upsert_user(clean_db, "carol", passwords.hash_password("carol-password", 8), "user")
    client = Client(service.url)
    attempt = {
        "wrong": {"username": "carol", "password": "not-hers-1"},
        "unknown": {"username": "nobody", "password": "not-hers-1"},
    }
    for form in attempt.values():  # warm up: the dummy hash is made on first use
        client.post("/auth/login", form=form)
    samples: dict[str, list[float]] = {"wrong": [], "unknown": []}
    for _ in range(5):
        for name, form in attempt.items():
            started = time.perf_counter()
            assert client.post("/auth/login", form=form).status == 400
            samples[name].append(time.perf_counter() - started)
    # The fastest of each: the least disturbed by whatever else the machine is doing.
    ratio = min(samples["unknown"]) / min(samples["wrong"])
    assert 0.5 <= ratio <= 2, samples


def test_repeated_failures_for_one_username_give_429_with_retry_after(service_factory, clean_db):
    service = service_factory(login_max_failures=3)
    create_user(clean_db, "carol", "carol-password")
    first = from_address(service, "127.0.0.2")
    for _ in range(3):
        assert (
            first.post("/auth/login", form={"username": "carol", "password": "wrong-pass"}).status
            == 400
        )
    # Another address, the right password: the username itself is throttled.
    reply = from_address(service, "127.0.0.3").post(
        "/auth/login", form={"username": "carol", "password": "carol-password"}
    )
    assert reply.status == 429
    assert int(reply.headers["Retry-After"]) >= 1
    assert isinstance(reply.json()["detail"], str)
    assert reply.headers["Cache-Control"] == "no-store"


def test_repeated_failures_from_one_address_give_429(service_factory, clean_db):
    service = service_factory(login_max_failures=3)
    create_user(clean_db, "carol", "carol-password")
    noisy = from_address(service, "127.0.0.4")
    for name in ("ann", "ben", "cat"):
        assert (
            noisy.post("/auth/login", form={"username": name, "password": "wrong-pass"}).status
            == 400
        )
    reply = noisy.post("/auth/login", form={"username": "carol", "password": "carol-password"})
    assert reply.status == 429 and int(reply.headers["Retry-After"]) >= 1
    quiet = from_address(service, "127.0.0.5")
    assert (
        quiet.post("/auth/login", form={"username": "carol", "password": "carol-password"}).status
        == 200
    )


def test_a_correct_login_clears_the_usernames_failures(service_factory, clean_db):
    service = service_factory(login_max_failures=3)
    create_user(clean_db, "carol", "carol-password")
    wrong = {"username": "carol", "password": "wrong-pass"}
    right = {"username": "carol", "password": "carol-password"}
    for address in ("127.0.0.6", "127.0.0.7"):
        client = from_address(service, address)
        assert [client.post("/auth/login", form=wrong).status for _ in range(2)] == [400, 400]
        assert from_address(service, "127.0.0.8").post("/auth/login", form=right).status == 200


# --- POST /auth/refresh ---------------------------------------------------------------------


def test_refresh_gives_a_new_token_pair(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    pair = login(client, "carol", "carol-password")
    reply = client.post("/auth/refresh", body={"refresh_token": pair["refresh_token"]})
    assert reply.status == 200
    fresh = reply.json()
    assert set(fresh) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert fresh["token_type"] == "bearer" and fresh["refresh_token"] != pair["refresh_token"]
    assert data(client, fresh["access_token"]).status == 200


def test_refresh_accepts_a_form_body(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    pair = login(client, "carol", "carol-password")
    reply = client.post("/auth/refresh", form={"refresh_token": pair["refresh_token"]})
    assert reply.status == 200 and reply.json()["access_token"]


def _bad_refresh_tokens(pair: dict) -> dict[str, str]:
    expired = claims_for("carol", kind="refresh", now=time.time() - 7200, ttl_s=60)
    return {
        "access token": pair["access_token"],
        "tampered": tamper(pair["refresh_token"]),
        "expired": jwt.encode(expired, REFRESH_KEY),
        "garbage": "not-a-token",
        "signed with the access key": jwt.encode(claims_for("carol", kind="refresh"), ACCESS_KEY),
    }


def test_refresh_refuses_every_bad_token_with_401(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    pair = login(client, "carol", "carol-password")
    for name, token in _bad_refresh_tokens(pair).items():
        reply = client.post("/auth/refresh", body={"refresh_token": token})
        assert reply.status == 401, name
        assert reply.headers["WWW-Authenticate"].startswith("Bearer"), name
        assert isinstance(reply.json()["detail"], str)


def test_refresh_for_a_deleted_user_is_401(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    pair = login(client, "carol", "carol-password")
    delete_user(clean_db, "carol")
    assert client.post("/auth/refresh", body={"refresh_token": pair["refresh_token"]}).status == 401


def test_refresh_without_a_token_is_422(client):
    assert locs(client.post("/auth/refresh", body={})) == [["body", "refresh_token"]]


# --- GET /api/data: authentication ----------------------------------------------------------


def test_data_without_a_token_is_401_with_a_bare_bearer_challenge(client):
    reply = client.get("/api/data")
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert isinstance(reply.json()["detail"], str)


def _rejected_access_tokens(pair: dict) -> dict[str, str]:
    now = time.time()
    claims = claims_for("carol")
    return {
        "refresh token": pair["refresh_token"],
        "tampered": tamper(pair["access_token"]),
        "expired": jwt.encode(claims_for("carol", now=now - 7200, ttl_s=60), ACCESS_KEY),
        "alg none": (
            b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            + "."
            + b64url(json.dumps(claims).encode())
            + "."
        ),
        "alg HS512": hand_token(
            claims, ACCESS_KEY, header={"alg": "HS512", "typ": "JWT"}, digest=hashlib.sha512
        ),
        "wrong key": hand_token(claims, "another-key-" + "c" * 40),
        "garbage": "garbage",
    }


def test_data_refuses_every_bad_token_with_invalid_token(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    pair = login(client, "carol", "carol-password")
    for name, token in _rejected_access_tokens(pair).items():
        reply = client.get("/api/data", token=token)
        assert reply.status == 401, name
        assert reply.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"', name
        assert isinstance(reply.json()["detail"], str), name


def test_data_with_a_deleted_users_token_is_401(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    token = login(client, "carol", "carol-password")["access_token"]
    assert data(client, token).status == 200
    delete_user(clean_db, "carol")
    reply = within_freshness(lambda: data(client, token), lambda reply: reply.status == 401)
    assert reply.status == 401 and 'error="invalid_token"' in reply.headers["WWW-Authenticate"]


def test_a_token_in_the_query_string_is_refused(client, user_token):
    reply = client.get("/api/data?" + urlencode({"access_token": user_token}))
    assert reply.status == 401


def test_a_standard_libraries_hs256_token_with_the_right_key_is_accepted(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    pair = login(client, "carol", "carol-password")  # a live session for the token to name
    sid = json.loads(unb64url(pair["access_token"].split(".")[1]))["sid"]
    token = hand_token({**claims_for("carol"), "sid": sid}, ACCESS_KEY)
    reply = client.get("/api/data", token=token)
    assert reply.status == 200 and reply.json() == []


# --- GET /api/data: rows --------------------------------------------------------------------


def test_admin_sees_invalid_points_and_a_user_only_valid_ones(
    client, clean_db, admin_token, user_token
):
    good = add_point(clean_db, T0, valid=True)
    bad = add_point(clean_db, T0 + timedelta(seconds=1), valid=False, tags=["system"])
    assert data(client, admin_token).json() == [good, bad]
    assert data(client, user_token).json() == [good]


def test_a_point_reads_back_in_the_contract_shape(client, clean_db, admin_token):
    point = add_point(clean_db, T0, value=-0.19938130676746368, tags=[])
    row = data(client, admin_token).json()[0]
    assert row == {
        "id": point["id"],
        "time": "2024-04-22T15:07:57Z",
        "value": -0.19938130676746368,
        "valid": True,
        "tags": [],
    }


def test_data_is_ordered_by_time_then_id_with_equal_times(client, clean_db, admin_token):
    late = add_point(clean_db, T0 + timedelta(seconds=5))
    same = [add_point(clean_db, T0) for _ in range(3)]
    early = add_point(clean_db, T0 - timedelta(seconds=5))
    ids = [row["id"] for row in data(client, admin_token).json()]
    assert ids == [early["id"]] + [p["id"] for p in same] + [late["id"]]


def test_start_and_end_are_inclusive(client, clean_db, admin_token):
    points = [add_point(clean_db, T0 + timedelta(seconds=i)) for i in range(5)]
    reply = data(client, admin_token, start="2024-04-22T15:07:58Z", end="2024-04-22T15:08:00Z")
    assert [row["id"] for row in reply.json()] == [p["id"] for p in points[1:4]]


def test_start_after_end_is_422_naming_start(client, admin_token):
    reply = data(client, admin_token, start="2024-04-23T00:00:00Z", end="2024-04-22T00:00:00Z")
    assert locs(reply) == [["query", "start"]]


def test_skip_skips_rows(client, clean_db, admin_token):
    points = [add_point(clean_db, T0 + timedelta(seconds=i)) for i in range(4)]
    assert data(client, admin_token, skip=2).json() == points[2:]


def test_limit_defaults_to_100(client, clean_db, admin_token):
    add_points_sql(clean_db, 150)
    assert len(data(client, admin_token).json()) == 100


def test_limit_bounds_1_and_1000_are_accepted(client, clean_db, admin_token):
    add_points_sql(clean_db, 1001)
    assert len(data(client, admin_token, limit=1).json()) == 1
    assert len(data(client, admin_token, limit=1000).json()) == 1000


@pytest.mark.parametrize(
    "params, name",
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"skip": "-1"}, "skip"),
        ({"skip": "x"}, "skip"),
        ({"start": "yesterday"}, "start"),
        ({"end": "2024-13-01T00:00:00Z"}, "end"),
        ({"after": "not a cursor"}, "after"),
        ({"after": "Zm9v"}, "after"),
    ],
    ids=[
        "limit-0",
        "limit-1001",
        "limit-word",
        "limit-float",
        "skip-negative",
        "skip-word",
        "start-word",
        "end-month-13",
        "after-spaces",
        "after-not-ours",
    ],
)
def test_a_bad_data_parameter_is_422_naming_it(client, admin_token, params, name):
    assert locs(data(client, admin_token, **params)) == [["query", name]]


def test_a_repeated_data_parameter_is_422(client, admin_token):
    reply = client.get("/api/data?limit=1&limit=2", token=admin_token)
    assert locs(reply) == [["query", "limit"]]


def test_several_bad_parameters_are_all_named(client, admin_token):
    reply = data(client, admin_token, limit="0", skip="x", start="nope")
    assert sorted(locs(reply)) == [["query", "limit"], ["query", "skip"], ["query", "start"]]


def test_date_only_and_offset_datetimes_are_accepted(client, clean_db, admin_token):
    point = add_point(clean_db, T0)
    assert data(client, admin_token, start="2024-04-22").json() == [point]
    assert data(client, admin_token, start="2024-04-23").json() == []
    same_instant = "2024-04-22T17:07:57+02:00"
    assert data(client, admin_token, start=same_instant, end=same_instant).json() == [point]
    # Without an offset the time is UTC.
    assert data(
        client, admin_token, start="2024-04-22T15:07:57", end="2024-04-22T15:07:57"
    ).json() == [point]


def test_a_full_page_has_a_next_link_and_a_short_one_does_not(client, clean_db, admin_token):
    add_points_sql(clean_db, 3)
    full = data(client, admin_token, limit=2)
    assert next_link(full) is not None and next_link(full).startswith("/api/data?")
    rest = client.get(next_link(full), token=admin_token)
    assert len(rest.json()) == 1 and next_link(rest) is None
    assert next_link(data(client, admin_token, limit=5)) is None


def test_following_next_links_gives_every_row_once_in_order(client, clean_db, admin_token):
    add_points_sql(clean_db, 250)
    with store.connection(clean_db) as conn:
        expected = [row[0] for row in conn.execute("SELECT id FROM data_points ORDER BY time, id")]
    seen, path, pages = [], "/api/data?limit=100", 0
    while path:
        reply = client.get(path, token=admin_token)
        assert reply.status == 200
        seen += [row["id"] for row in reply.json()]
        path, pages = next_link(reply), pages + 1
    assert seen == expected and pages == 3


def test_a_next_link_continues_by_cursor_not_by_offset(client, clean_db, admin_token):
    points = [add_point(clean_db, T0 + timedelta(seconds=i)) for i in range(5)]
    first = data(client, admin_token, skip=1, limit=2)
    assert first.json() == points[1:3]
    link = next_link(first)
    assert "after=" in link and "skip=" not in link
    assert client.get(link, token=admin_token).json() == points[3:5]


def test_next_links_keep_the_time_range(client, clean_db, admin_token):
    add_points_sql(clean_db, 30, per_second=1)
    reply = data(
        client, admin_token, start="2024-04-22T15:08:00Z", end="2024-04-22T15:08:09Z", limit=4
    )
    seen = [row["time"] for row in reply.json()]
    path = next_link(reply)
    while path:
        reply = client.get(path, token=admin_token)
        seen += [row["time"] for row in reply.json()]
        path = next_link(reply)
    assert seen == [f"2024-04-22T15:08:{s:02d}Z" for s in range(10)]


# --- /api/populate --------------------------------------------------------------------------


def test_populate_without_a_token_is_401(client):
    reply = client.get("/api/populate")
    assert reply.status == 401 and reply.headers["WWW-Authenticate"] == "Bearer"


def test_populate_by_a_user_is_403(client, user_token):
    reply = client.get("/api/populate", token=user_token)
    assert reply.status == 403 and reply.json() == {"detail": "admin role required"}


def test_populate_stores_one_point_and_returns_it(client, clean_db, admin_token):
    reply = client.get("/api/populate", token=admin_token)
    assert reply.status == 200, reply.body
    point = reply.json()
    assert set(point) == POINT_KEYS and RFC3339_Z.fullmatch(point["time"])
    assert isinstance(point["valid"], bool) and isinstance(point["tags"], list)
    assert data(client, admin_token).json() == [point]


def test_populate_also_answers_post(client, admin_token):
    reply = client.post("/api/populate", token=admin_token)
    assert reply.status == 200 and set(reply.json()) == POINT_KEYS


def test_populate_with_a_count_returns_the_batch_shape(client, admin_token):
    reply = client.get("/api/populate?count=3", token=admin_token)
    assert reply.status == 200, reply.body
    batch = reply.json()
    assert set(batch) == {"stored", "duplicates", "rejected"}
    assert len(batch["stored"]) == 3 and batch["duplicates"] == 0 and batch["rejected"] == []
    assert all(set(point) == POINT_KEYS for point in batch["stored"])
    assert len(data(client, admin_token).json()) == 3


@pytest.mark.parametrize("count", ["0", "101", "x"])
def test_populate_with_a_bad_count_is_422(client, admin_token, count):
    assert locs(client.get(f"/api/populate?count={count}", token=admin_token)) == [
        ["query", "count"]
    ]


# --- conventions ----------------------------------------------------------------------------


def _every_kind_of_reply(client, admin_token) -> dict[str, object]:
    return {
        "200": client.get("/healthz"),
        "201": client.post("/auth/signup", body={"username": "hdr", "password": "password1"}),
        "401": client.get("/api/data"),
        "404": client.get("/nowhere"),
        "405": client.request("DELETE", "/api/data"),
        "422": client.get("/api/data?limit=0", token=admin_token),
        "HEAD": client.request("HEAD", "/healthz"),
        "data": client.get("/api/data", token=admin_token),
    }


def test_every_response_has_length_nosniff_and_a_request_id(client, admin_token):
    for name, reply in _every_kind_of_reply(client, admin_token).items():
        assert reply.headers["Content-Length"].isdigit(), name
        assert reply.headers["X-Content-Type-Options"] == "nosniff", name
        assert reply.headers["X-Request-ID"], name
        if name != "HEAD":
            assert int(reply.headers["Content-Length"]) == len(reply.body), name
            assert reply.headers["Content-Type"].startswith("application/json"), name


def test_a_sane_request_id_is_echoed(client):
    assert (
        client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"]
        == "abc-123"
    )


def test_the_server_header_names_no_versions(client):
    server = client.get("/healthz").headers["Server"]
    assert "Python" not in server and "/" not in server


def test_auth_responses_are_not_cacheable(client, clean_db):
    create_user(clean_db, "carol", "carol-password")
    pair = login(client, "carol", "carol-password")
    replies = {
        "signup 201": client.post(
            "/auth/signup", body={"username": "dan", "password": "password1"}
        ),
        "signup 409": client.post(
            "/auth/signup", body={"username": "dan", "password": "password1"}
        ),
        "signup 422": client.post("/auth/signup", body={"username": "d"}),
        "login 200": client.post(
            "/auth/login", form={"username": "carol", "password": "carol-password"}
        ),
        "login 400": client.post(
            "/auth/login", form={"username": "carol", "password": "wrong-pass"}
        ),
        "refresh 200": client.post("/auth/refresh", body={"refresh_token": pair["refresh_token"]}),
        "refresh 401": client.post("/auth/refresh", body={"refresh_token": "garbage"}),
    }
    for name, reply in replies.items():
        assert reply.status == int(name.split()[1]), name
        assert reply.headers.get("Cache-Control") == "no-store", name


def test_head_healthz_sends_gets_headers_without_a_body(client):
    get = client.get("/healthz")
    head = client.request("HEAD", "/healthz")
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    assert get.json() == {"status": "ok"}
    assert client.get("/healthz").status == 200  # the connection is still in step


def test_readyz_is_200_with_the_database_up(client):
    assert client.get("/readyz").status == 200


def test_an_unknown_path_is_404_json(client):
    reply = client.get("/no/such/path")
    assert reply.status == 404 and reply.json() == {"detail": "Not Found"}


def test_a_known_path_with_the_wrong_method_is_405_with_allow(client):
    reply = client.get("/auth/login")
    assert reply.status == 405 and reply.headers["Allow"] == "POST"
    assert isinstance(reply.json()["detail"], str)
    reply = client.request("DELETE", "/api/data")
    assert reply.status == 405 and set(reply.headers["Allow"].split(", ")) == {"GET", "HEAD"}


def test_head_works_wherever_get_does(client, admin_token):
    reply = client.request("HEAD", "/api/data", token=admin_token)
    assert reply.status == 200 and reply.body == b""


def test_quoted_paths_are_unquoted_before_routing(client):
    assert client.get("/" + quote("healthz")).status == 200
