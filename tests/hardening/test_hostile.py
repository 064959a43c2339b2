"""Hardening: hostile input over real sockets. Tokens (of deleted users, huge, in the query
string, duplicated), SQL metacharacters, bad encodings, framing tricks, header injection, and
what the service gives away (secrets in logs or bodies, versions in headers, cacheable auth).

The token checks of DESIGN.md's decode order are unit-tested in test_jwt.py; here they are
tried over HTTP, where headers, limits and the database meet.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from dataproc import jwt, store
from support import ACCESS_KEY, create_user, login, within_freshness


def raw(service, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes, read one response: (status, headers lower-cased, body). Asserts an answer."""
    host, port = service.http.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer to {data[:60]!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def detail_of(body: bytes):
    return json.loads(body)["detail"]


@pytest.fixture
def alice(client, clean_db) -> dict:
    """A user and its token pair."""
    create_user(clean_db, "alice", "alice-password")
    return login(client, "alice", "alice-password")


# --- JWT over HTTP ---------------------------------------------------------------------------


def test_a_token_of_a_deleted_user_is_refused_for_data_and_refresh(client, clean_db, alice):
    assert client.get("/api/data", token=alice["access_token"]).status == 200
    with store.connection(clean_db) as conn:
        conn.execute("DELETE FROM users WHERE username = 'alice'")
    reply = within_freshness(  # API.md: within 100 ms of the commit (the cache hears it)
        lambda: client.get("/api/data", token=alice["access_token"]), lambda r: r.status == 401
    )
    assert reply.status == 401 and "invalid_token" in reply.headers["WWW-Authenticate"]
    again = client.post("/auth/refresh", body={"refresh_token": alice["refresh_token"]})
    assert again.status == 401


def test_a_token_over_8_kib_is_401_and_one_over_the_header_cap_is_431(service, client, alice):
    claims = {
        "sub": "alice",
        "role": "user",
        "type": "access",
        "iat": 1,
        "exp": 2**40,
        "jti": "j",
        "pad": "x" * 9000,
    }
    signed = jwt.encode(claims, ACCESS_KEY)  # correctly signed: only its size is wrong
    assert 8192 < len(signed) < 16000
    reply = client.get("/api/data", token=signed)
    assert reply.status == 401 and "invalid_token" in reply.headers["WWW-Authenticate"]
    status, _, body = raw(
        service,
        b"GET /api/data HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"A" * 20000 + b"\r\n\r\n",
    )
    assert status == 431 and detail_of(body)


def test_a_token_in_the_query_string_is_refused_even_with_a_good_header(client, alice):
    token = alice["access_token"]
    assert client.get(f"/api/data?access_token={token}").status == 401
    assert client.get(f"/api/data?access_token={token}", token=token).status == 401


def test_duplicated_authorization_headers_are_refused(service, alice):
    token = alice["access_token"].encode()
    status, headers, _ = raw(
        service,
        b"GET /api/data HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token
        + b"\r\nAuthorization: Bearer "
        + token
        + b"\r\n\r\n",
    )
    assert status in (400, 401)


def test_an_authorization_scheme_other_than_bearer_is_refused(client, alice):
    reply = client.get("/api/data", headers={"Authorization": "Basic YWxpY2U6YWxpY2UtcGFzc3dvcmQ="})
    assert reply.status == 401


# --- SQL metacharacters ----------------------------------------------------------------------

SQL_NASTIES = [
    "a'; DROP TABLE users; --",
    "x' OR '1'='1",
    'a"; DELETE FROM data_points; --',
    "\\'; SELECT pg_sleep(10); --",
    "$$; DROP TABLE rejects; $$",
    "1; --",
]


@pytest.mark.parametrize("username", SQL_NASTIES)
def test_sql_metacharacters_in_a_username_are_422_by_pattern(client, clean_db, username):
    reply = client.post("/auth/signup", body={"username": username, "password": "password-1"})
    assert reply.status == 422 and reply.json()["detail"][0]["loc"] == ["body", "username"]
    login_reply = client.post("/auth/login", form={"username": username, "password": "password-1"})
    assert login_reply.status == 400  # looked up as data: no such user


def test_a_password_full_of_quotes_works(client, clean_db):
    password = "p'a\"s;s -- \\' OR 1=1; $$"
    assert (
        client.post("/auth/signup", body={"username": "quoter", "password": password}).status == 201
    )
    assert (
        client.post("/auth/login", form={"username": "quoter", "password": password}).status == 200
    )
    assert client.post("/auth/login", form={"username": "quoter", "password": "p'a"}).status == 400


@pytest.mark.parametrize(
    "query",
    [
        "start=2024-01-01'--",
        "end=2024-01-01%27%20OR%201%3D1--",
        "skip=0;DROP%20TABLE%20users",
        "limit=1'",
        "after=abc'--",
        "after=%27%3B--",
        "start=2024-01-01T00:00:00Z';--",
    ],
)
def test_sql_metacharacters_in_data_parameters_are_422(client, clean_db, alice, query):
    reply = client.get(f"/api/data?{query}", token=alice["access_token"])
    assert reply.status == 422, reply.body
    assert reply.json()["detail"][0]["loc"][0] == "query"


def test_the_tables_survive_every_injection_attempt(client, clean_db, alice):
    for nasty in SQL_NASTIES:
        client.post("/auth/signup", body={"username": nasty, "password": nasty + "-padding"})
        client.post("/auth/login", form={"username": nasty, "password": nasty})
        client.post("/auth/refresh", body={"refresh_token": nasty})
    with store.connection(clean_db) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] >= 2  # admin + alice
        conn.execute("SELECT count(*) FROM data_points, rejects")


# --- encodings and numbers -------------------------------------------------------------------


def test_invalid_utf8_in_a_json_body_is_422(service):
    body = b'{"username": "bob\xff\xfe", "password": "password-1"}'
    status, _, answer = raw(
        service,
        b"POST /auth/signup HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert status == 422 and detail_of(answer)[0]["loc"][0] == "body"


def test_invalid_utf8_in_a_form_body_is_422(service):
    body = b"username=bob%ff&password=password-1"
    status, _, _ = raw(
        service,
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert status == 422


@pytest.mark.parametrize(
    "target",
    [
        b"/api/data?start=%ff%fe",
        b"/api/data?start=2024\xff",
        b"/api%ff/data",
        b"/api/data?%c0%af=1",
    ],
)
def test_invalid_utf8_or_raw_bytes_in_the_target_are_400(service, target):
    status, _, body = raw(service, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and detail_of(body)


@pytest.mark.parametrize(
    "fields",
    [
        {"username": "nul\x00user", "password": "password-1"},
        {"username": "nulpass", "password": "pass\x00word-1"},
    ],
)
def test_nul_bytes_in_signup_fields_never_reach_a_500(client, clean_db, fields):
    reply = client.post("/auth/signup", body=fields)
    assert reply.status in (201, 422), reply.body


def test_nul_bytes_in_login_fields_and_parameters_are_answered_without_a_500(client, alice):
    assert (
        client.post("/auth/login", form={"username": "ali\x00ce", "password": "x" * 8}).status
        == 400
    )
    assert (
        client.post("/auth/login", body={"username": "alice", "password": "alice-\x00"}).status
        == 400
    )
    assert client.get("/api/data?start=%00", token=alice["access_token"]).status == 422
    assert client.post("/auth/refresh", body={"refresh_token": "a\x00b"}).status == 401


def test_a_nul_byte_in_a_header_is_400(service):
    status, _, _ = raw(service, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Thing: a\x00b\r\n\r\n")
    assert status == 400


@pytest.mark.parametrize(
    "query",
    [
        "limit=99999999999999999999999",
        "skip=99999999999999999999999",
        "limit=1e3",
        "limit=0x10",
        "skip=-1",
        "limit=%EF%BC%91",
        "limit=1_0",
        "skip=9999999999999999999",
    ],
)
def test_overlong_or_odd_numbers_are_422(client, alice, query):
    reply = client.get(f"/api/data?{query}", token=alice["access_token"])
    assert reply.status == 422, reply.body


@pytest.mark.parametrize(
    "body",
    [
        b'{"username": "bobby", "username": "admin", "password": "password-1"}',
        b'{"username": "bobby", "password": NaN}',
        b'{"username": "bobby", "password": Infinity}',
        b'{"username": "bobby", "password": "password-1", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"username": "bobby", "password": "password-1", "x": '
        + b'{"a":' * 100
        + b"1"
        + b"}" * 100
        + b"}",
        b"[" * 60000,
        b'"just a string"',
        b"",
        b"{",
        b"1e99999",
        b'{"username": "bobby", "password": "\\ud800-lone-surrogate"}',
        b'{"username": "bobby\\udfff", "password": "password-1"}',
    ],
)
def test_malformed_json_bodies_are_422(service, clean_db, body):
    status, _, answer = raw(
        service,
        b"POST /auth/signup HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert status == 422, answer
    assert detail_of(answer)[0]["loc"][0] == "body"


def test_signup_with_a_role_in_the_body_never_makes_an_admin(client, clean_db):
    reply = client.post(
        "/auth/signup", body={"username": "mallory", "password": "password-1", "role": "admin"}
    )
    assert reply.status == 201 and reply.json()["role"] == "user"


# --- framing ---------------------------------------------------------------------------------


def test_expect_100_continue_with_an_oversized_body_is_413_without_a_100(service):
    host, port = service.http.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            b"POST /auth/signup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer
    assert b"Connection: close" in answer.split(b"\r\n\r\n")[0]


def test_a_client_still_sending_after_an_early_refusal_is_not_reset(service):
    # The server answers 414 after reading 8 KiB of the request line; a client like
    # http.client is still sending (the rest of its headers, then its body). Closing with its
    # bytes unread would make the kernel reset the connection under it (a broken pipe instead
    # of the answer); a lingering close reads them, within bounds, first (RFC 9112 §9.6).
    host, port = service.http.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            b"POST /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        )
        time.sleep(0.2)  # the server has answered by now
        sock.sendall(b"x" * 100000)  # BrokenPipeError/ConnectionResetError without the linger
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 414 ")


def test_expect_100_continue_with_a_fitting_body_gets_100_then_the_answer(service, clean_db):
    body = b'{"username": "patient", "password": "password-1"}'
    host, port = service.http.server_address[:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            b"POST /auth/signup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 201 ")


def test_transfer_encoding_chunked_is_411_and_closes(service):
    status, headers, body = raw(
        service,
        b"POST /auth/signup HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
        b"chunked\r\nContent-Type: application/json\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    assert status == 411 and headers["connection"] == "close" and detail_of(body)


@pytest.mark.parametrize(
    "lengths",
    [
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 5\r\nContent-Length: 5\r\n",
        b"Content-Length: 5, 6\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: +5\r\n",
        b"Content-Length: 0x5\r\n",
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    ],
)
def test_conflicting_or_odd_content_lengths_are_refused_and_close(service, lengths):
    status, headers, _ = raw(
        service, b"POST /auth/login HTTP/1.1\r\nHost: x\r\n" + lengths + b"\r\nhello"
    )
    assert status in (400, 411) and headers["connection"] == "close"


def test_a_request_smuggled_after_a_refused_body_is_never_answered(service):
    host, port = service.http.server_address[:2]
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 411 ")


@pytest.mark.parametrize(
    "value",
    [
        b"abc\rSet-Cookie: x=1",
        b"abc\nSet-Cookie: x=1",
        b"a" * 200,
        b"abc%0d%0aSet-Cookie:%20x=1",
        b"<script>",
        b"abc def",
    ],
)
def test_a_hostile_x_request_id_is_never_reflected(service, value):
    status, headers, _ = raw(
        service, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + value + b"\r\n\r\n"
    )
    assert "set-cookie" not in headers
    assert headers["x-request-id"] != value.decode("latin-1")
    assert headers["x-request-id"].isalnum()  # a fresh id of our own
    assert status in (200, 400)


def test_a_sane_x_request_id_is_echoed(client):
    reply = client.get("/healthz", headers={"X-Request-ID": "trace-42.a:b"})
    assert reply.headers["X-Request-ID"] == "trace-42.a:b"


# --- what the service gives away -------------------------------------------------------------


def test_no_password_or_token_appears_in_logs_or_error_bodies(service, client, clean_db, caplog):
    caplog.set_level(logging.DEBUG)
    password, wrong = "s3cret-Passw0rd!", "wr0ng-Passw0rd!"
    bodies = [client.post("/auth/signup", body={"username": "carol", "password": password}).body]
    pair = login(client, "carol", password)
    secrets_used = [password, wrong, pair["access_token"], pair["refresh_token"]]
    bodies += [
        client.post("/auth/login", form={"username": "carol", "password": wrong}).body,
        client.post("/auth/signup", body={"username": "carol", "password": password}).body,
        client.post("/auth/signup", body={"username": "c", "password": password}).body,
        client.post("/auth/refresh", body={"refresh_token": pair["access_token"]}).body,
        client.post("/auth/refresh", body={"refresh_token": pair["refresh_token"] + "x"}).body,
        client.get(f"/api/data?access_token={pair['access_token']}").body,
        client.get("/api/data", token=pair["refresh_token"]).body,
        client.get("/api/populate", token=pair["access_token"]).body,
    ]
    tampered = pair["access_token"][:-3] + "abc"
    bodies.append(client.get("/api/data", token=tampered).body)
    secrets_used.append(tampered)
    text = caplog.text + "".join(b.decode("utf-8", "replace") for b in bodies)
    assert "carol" in caplog.text or caplog.records  # the logs were captured at all
    for secret in secrets_used:
        assert secret not in text
        assert secret.split(".")[-1] not in text  # not even a token's signature


def test_no_version_strings_in_any_response_header(service, client):
    replies = [
        client.get("/healthz"),
        client.get("/nowhere"),
        client.request("DELETE", "/healthz"),
        client.request("HEAD", "/healthz"),
        client.get("/api/data"),
    ]
    headers = [dict(r.headers) for r in replies]
    headers.append(raw(service, b"BREW /x HTTP/1.1\r\nHost: x\r\n\r\n")[1])
    headers.append(raw(service, b"garbage\r\n\r\n")[1])
    headers.append(raw(service, b"GET / HTTP/9.9\r\n\r\n")[1])
    for header_set in headers:
        lower = {k.lower(): v for k, v in header_set.items()}
        assert lower["server"] == "dataproc"
        assert "x-powered-by" not in lower
        assert not any(
            word in " ".join(lower.values()) for word in ("Python", "BaseHTTP", "psycopg")
        )


def test_every_auth_answer_says_cache_control_no_store(client, clean_db, alice):
    replies = [
        client.post("/auth/signup", body={"username": "dave", "password": "password-1"}),  # 201
        client.post("/auth/signup", body={"username": "dave", "password": "password-1"}),  # 409
        client.post("/auth/signup", body={"username": "d", "password": "p"}),  # 422
        client.post("/auth/signup", body=b"x", headers={"Content-Type": "text/plain"}),  # 415
        client.post("/auth/login", form={"username": "dave", "password": "password-1"}),  # 200
        client.post("/auth/login", form={"username": "dave", "password": "wrong-pass"}),  # 400
        client.post("/auth/refresh", body={"refresh_token": alice["refresh_token"]}),  # 200
        client.post("/auth/refresh", body={"refresh_token": "nope"}),  # 401
    ]
    assert [r.status for r in replies] == [201, 409, 422, 415, 200, 400, 200, 401]
    for reply in replies:
        assert reply.headers["Cache-Control"] == "no-store", reply.status
