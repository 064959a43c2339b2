"""`GET /api/data/export` end to end: the real server on port 0, a real PostgreSQL, raw sockets
where the framing matters (chunks, truncation, a client that goes away).

The CSV is read back with Python's `csv` and the NDJSON line by line, and both are compared
with what paging through `/api/data` returns for the same caller and window.
"""

from __future__ import annotations

import csv
import gzip
import http.client
import io
import json
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode, urlsplit

import pytest

from dataproc import store
from dataproc.store.export import APPLICATION_NAME
from support import Client, create_user, login

T0 = datetime(2024, 4, 22, 15, 0, tzinfo=UTC)


def add_points(pool, count: int, *, every: int = 1) -> None:
    """`count` points one second apart; every `every`-th is invalid, with awkward tags."""
    with store.connection(pool) as conn:
        conn.execute(
            "INSERT INTO data_points (time, value, valid, tags) "
            "SELECT %s + i * interval '1 second', i / 7.0, i %% %s <> 0, "
            "  CASE WHEN i %% %s = 0 THEN ARRAY['system', 'a,b', 'say \"hi\"'] ELSE '{}' END "
            "FROM generate_series(0, %s - 1) AS i",
            (T0, every, every, count),
        )


def export(client, token, **params):
    return client.get("/api/data/export?" + urlencode(params), token=token)


def paged(client, token, **params) -> list[dict]:
    """Every point `/api/data` shows this caller in the window, following the Link headers."""
    points, path = [], "/api/data?" + urlencode({**params, "limit": 1000})
    while path:
        reply = client.get(path, token=token)
        assert reply.status == 200, reply.body
        points += reply.json()
        link = reply.headers.get("Link")
        path = link[1 : link.index(">")] if link else None
    return points


def csv_value(point: dict) -> str:
    return "" if point["value"] is None else json.dumps(point["value"])


def compact(value) -> str:
    """JSON text as PostgreSQL's array_to_json writes it: no spaces."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def as_csv_rows(points: list[dict]) -> list[list[str]]:
    return [
        [str(p["id"]), p["time"], csv_value(p), json.dumps(p["valid"]), compact(p["tags"])]
        for p in points
    ]


@pytest.fixture
def user_pair(client, clean_db) -> tuple[str, str]:
    create_user(clean_db, "root", "root-password", "admin")
    create_user(clean_db, "alice", "alice-password")
    return (
        login(client, "root", "root-password")["access_token"],
        login(client, "alice", "alice-password")["access_token"],
    )


# --- what is exported ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ["admin", "user"])
def test_csv_holds_exactly_what_the_pages_of_api_data_hold(client, clean_db, user_pair, role):
    add_points(clean_db, 2500, every=3)
    token = user_pair[0] if role == "admin" else user_pair[1]
    window = {"start": "2024-04-22T15:05:00Z", "end": "2024-04-22T15:30:00Z"}
    reply = export(client, token, format="csv", **window)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert reply.headers["Content-Disposition"] == 'attachment; filename="data_points.csv"'
    text = reply.body.decode()
    assert text.count("\r\n") == text.count("\n")  # RFC 4180: every line ends in CRLF
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == ["id", "time", "value", "valid", "tags"]
    expected = paged(client, token, **window)
    assert rows[1:] == as_csv_rows(expected)
    assert len(expected) == (1501 if role == "admin" else 1000)


@pytest.mark.parametrize("role", ["admin", "user"])
def test_ndjson_lines_are_the_points_of_api_data(client, clean_db, user_pair, role):
    add_points(clean_db, 1200, every=4)
    token = user_pair[0] if role == "admin" else user_pair[1]
    reply = export(client, token, format="ndjson")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/x-ndjson"
    assert reply.headers["Content-Disposition"] == 'attachment; filename="data_points.ndjson"'
    assert reply.body.endswith(b"\n")
    lines = [json.loads(line) for line in reply.body.decode().splitlines()]
    assert lines == paged(client, token)


def test_an_empty_window_is_a_header_alone_in_csv_and_nothing_in_ndjson(client, user_pair):
    assert export(client, user_pair[0], format="csv").body == b"id,time,value,valid,tags\r\n"
    assert export(client, user_pair[0], format="ndjson").body == b""


def test_a_non_finite_value_is_empty_in_csv_and_null_in_ndjson(client, clean_db, user_pair):
    with store.connection(clean_db) as conn:
        conn.execute(
            "INSERT INTO data_points (time, value, valid, tags) VALUES "
            "(%s, 'NaN', false, '{non-finite}'), (%s, '-Infinity', false, '{non-finite}')",
            (T0, T0 + timedelta(seconds=1)),
        )
    rows = list(csv.reader(io.StringIO(export(client, user_pair[0], format="csv").body.decode())))
    assert [row[2] for row in rows[1:]] == ["", ""]
    lines = export(client, user_pair[0], format="ndjson").body.decode().splitlines()
    assert [json.loads(line)["value"] for line in lines] == [None, None]


def test_tags_with_commas_and_quotes_are_quoted_as_rfc_4180_says(client, clean_db, user_pair):
    add_points(clean_db, 1, every=1)
    body = export(client, user_pair[0], format="csv").body.decode()
    line = body.split("\r\n")[1]
    assert line.endswith(',"[""system"",""a,b"",""say \\""hi\\""""]"')
    row = next(csv.reader(io.StringIO(line)))
    assert json.loads(row[4]) == ["system", "a,b", 'say "hi"']


# --- choosing the format ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("text/csv", "text/csv; charset=utf-8"),
        ("application/x-ndjson", "application/x-ndjson"),
        ("text/csv;q=0.5, application/x-ndjson", "application/x-ndjson"),
        ("application/x-ndjson;q=0.1, text/csv;q=0.9", "text/csv; charset=utf-8"),
        ("text/html, */*", "application/x-ndjson"),
        ("text/csv;q=0", "application/x-ndjson"),
        ("", "application/x-ndjson"),
    ],
)
def test_without_format_the_accept_header_chooses(client, user_pair, accept, content_type):
    headers = {"Accept": accept} if accept else {}
    reply = client.get("/api/data/export", token=user_pair[0], headers=headers)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == content_type


def test_format_wins_over_accept(client, user_pair):
    reply = client.get(
        "/api/data/export?format=csv",
        token=user_pair[0],
        headers={"Accept": "application/x-ndjson"},
    )
    assert reply.headers["Content-Type"] == "text/csv; charset=utf-8"


# --- refusals, all before the first byte --------------------------------------------------


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"format": "xml"}, ["query", "format"]),
        ({"format": "csv", "start": "yesterday"}, ["query", "start"]),
        ({"start": "2024-04-23T00:00:00Z", "end": "2024-04-22T00:00:00Z"}, ["query", "start"]),
    ],
)
def test_a_bad_parameter_is_a_422_naming_it(client, user_pair, params, loc):
    reply = export(client, user_pair[0], **params)
    assert reply.status == 422
    assert reply.headers.get("Transfer-Encoding") is None
    assert [problem["loc"] for problem in reply.json()["detail"]] == [loc]


def test_without_a_token_the_export_is_401(client):
    reply = client.get("/api/data/export")
    assert reply.status == 401
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_deleted_user_cannot_export(client, clean_db, user_pair):
    with store.connection(clean_db) as conn:
        conn.execute("DELETE FROM users WHERE username = 'alice'")
    assert export(client, user_pair[1]).status == 401


# --- the stream on the wire ---------------------------------------------------------------


def raw_get(
    service, path: str, token: str, *, version: str = "1.1", extra: str = ""
) -> socket.socket:
    parts = urlsplit(service.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(
        f"GET {path} HTTP/{version}\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}\r\n".encode()
    )
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_http_1_1_gets_chunks_ending_in_the_last_chunk(service, clean_db, user_pair):
    add_points(clean_db, 12_000)
    sock = raw_get(
        service, "/api/data/export?format=ndjson", user_pair[0], extra="Connection: close\r\n"
    )
    with sock:
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert b"Content-Length" not in head
    assert body.endswith(b"\r\n0\r\n\r\n")
    response = http.client.HTTPResponse(FakeSocket(data))
    response.begin()
    assert response.read().count(b"\n") == 12_000


def test_http_1_0_gets_a_body_that_ends_with_the_connection(service, clean_db, user_pair):
    add_points(clean_db, 3000)
    with raw_get(service, "/api/data/export?format=csv", user_pair[0], version="1.0") as sock:
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Connection: close" in head
    assert body.count(b"\r\n") == 3001


def test_a_gzip_export_decodes_to_the_plain_one(client, clean_db, user_pair):
    add_points(clean_db, 5000)
    plain = export(client, user_pair[0], format="csv").body
    reply = client.get(
        "/api/data/export?format=csv", token=user_pair[0], headers={"Accept-Encoding": "gzip"}
    )
    assert reply.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(reply.body) == plain


class FakeSocket:
    """Bytes already received, for `http.client.HTTPResponse` to parse."""

    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode):
        return io.BytesIO(self.data)


def export_backends(pool) -> int:
    with store.connection(pool) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (APPLICATION_NAME,),
        ).fetchone()[0]


def wait_for(condition, timeout_s: float) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_client_that_goes_away_frees_the_export_connection_within_a_second(
    service, clean_db, user_pair
):
    add_points(clean_db, 300_000)
    sock = raw_get(service, "/api/data/export?format=csv", user_pair[0])
    sock.recv(65536)  # the stream has begun
    wait_for(lambda: export_backends(clean_db) == 1, 5)
    sock.close()
    assert wait_for(lambda: export_backends(clean_db) == 0, 3) < 1.0


def test_a_database_failure_mid_stream_truncates_the_transfer(service, clean_db, user_pair):
    add_points(clean_db, 300_000)
    sock = raw_get(service, "/api/data/export?format=ndjson", user_pair[0])
    with sock:
        received = sock.recv(65536)
        wait_for(lambda: export_backends(clean_db) == 1, 5)
        with store.connection(clean_db) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                (APPLICATION_NAME,),
            )
        received += read_all(sock)
    assert not received.endswith(b"\r\n0\r\n\r\n")  # never a transfer that looks complete
    response = http.client.HTTPResponse(FakeSocket(received))
    response.begin()
    with pytest.raises(http.client.IncompleteRead):
        response.read()


def test_past_max_exports_a_503_with_retry_after_and_reads_still_work(service_factory, clean_db):
    service = service_factory(max_exports=1)

    client = Client(service.url)
    create_user(clean_db, "root", "root-password", "admin")
    token = login(client, "root", "root-password")["access_token"]
    add_points(clean_db, 300_000)
    slow = raw_get(service, "/api/data/export?format=csv", token)  # a reader that stops reading
    with slow:
        slow.recv(1024)
        wait_for(lambda: export_backends(clean_db) == 1, 5)
        client = Client(service.url)  # loading the rows may outlast the idle keep-alive timeout
        second = export(client, token, format="csv")
        assert second.status == 503
        assert int(second.headers["Retry-After"]) > 0
        assert client.get("/api/data?limit=5", token=token).status == 200
    wait_for(lambda: export_backends(clean_db) == 0, 3)
    assert (
        export(
            client, token, format="ndjson", start="2024-04-22T15:00:00Z", end="2024-04-22T15:00:09Z"
        ).body.count(b"\n")
        == 10
    )


def test_parallel_exports_each_get_every_point(service_factory, clean_db):
    service = service_factory(max_exports=3)

    create_user(clean_db, "root", "root-password", "admin")
    token = login(Client(service.url), "root", "root-password")["access_token"]
    add_points(clean_db, 20_000)
    bodies, errors = [], []

    def run() -> None:
        try:
            bodies.append(export(Client(service.url), token, format="ndjson").body)
        except Exception as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert [body.count(b"\n") for body in bodies] == [20_000] * 3
