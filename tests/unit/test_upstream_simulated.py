"""Tests for dataproc.upstream.simulated: the simulated upstream, over real sockets on port 0."""

import http.client
import json
import math
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from dataproc.upstream import simulated

ALLOWED_TAGS = {tuple(t) for t in simulated.TAG_CHOICES}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def upstream():
    server, url = simulated.start_in_thread(port=0)
    yield server, url
    server.shutdown()
    server.server_close()


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def _get(url: str, path: str, method: str = "GET", body: bytes | None = None):
    """One request on a fresh connection: (status, headers, body)."""
    conn = _connect(url)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def _decode(value: list[int]) -> float:
    return struct.unpack("<f", bytes(value))[0]


def _assert_document(doc: dict, near: float) -> None:
    assert set(doc) == {"time", "value", "tags"}
    assert type(doc["time"]) is int and abs(doc["time"] - near) <= 5
    assert len(doc["value"]) == 4
    assert all(type(b) is int and 0 <= b <= 255 for b in doc["value"])
    assert math.isfinite(_decode(doc["value"]))
    assert tuple(doc["tags"]) in ALLOWED_TAGS
    assert all(isinstance(t, str) for t in doc["tags"])


# --- pure parts -------------------------------------------------------------------------------


def test_random_value_never_decodes_to_nan_or_infinity():
    rng = random.Random(1)
    # 1 in 256 raw draws would be non-finite, so 20000 draws would hit ~78 without the guard.
    assert all(math.isfinite(_decode(simulated.random_value(rng))) for _ in range(20000))


def test_random_tags_come_from_the_upstream_set_and_are_mostly_empty():
    rng = random.Random(2)
    counts = Counter(tuple(simulated.random_tags(rng)) for _ in range(3000))
    assert set(counts) == ALLOWED_TAGS
    assert counts.most_common(1)[0][0] == ()


def test_huge_document_is_valid_json_of_exactly_the_size():
    body = simulated.huge_document(1713798477, 5000)
    assert len(body) == 5000
    assert json.loads(body)["value"] == [1, 2, 3, 4]


# --- the normal document ----------------------------------------------------------------------


def test_root_answers_a_document_shaped_like_the_upstream(upstream):
    _, url = upstream
    status, headers, body = _get(url, "/")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    _assert_document(json.loads(body), time.time())


def test_unknown_paths_answer_a_normal_document(upstream):
    _, url = upstream
    status, _, body = _get(url, "/some/where?x=1")
    assert status == 200
    _assert_document(json.loads(body), time.time())


def test_server_header_names_the_service_only(upstream):
    _, url = upstream
    _, headers, _ = _get(url, "/")
    assert headers["Server"] == "dataproc-source"


def test_two_requests_share_one_kept_alive_connection(upstream):
    server, url = upstream
    conn = _connect(url)
    sockets = []
    try:
        for _ in range(2):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Connection") is None
            _assert_document(json.loads(resp.read()), time.time())
            sockets.append(conn.sock)
    finally:
        conn.close()
    # http.client reconnects silently when the server closes: check it did not.
    assert sockets[0] is sockets[1] is not None
    assert server.requests_served == 2


def test_many_documents_over_http_are_all_finite(upstream):
    _, url = upstream
    conn = _connect(url)
    try:
        for _ in range(30):
            conn.request("GET", "/")
            _assert_document(json.loads(conn.getresponse().read()), time.time())
    finally:
        conn.close()


# --- fault modes ------------------------------------------------------------------------------


def test_slow_waits_at_least_the_delay(upstream):
    _, url = upstream
    started = time.monotonic()
    status, _, body = _get(url, "/slow?delay=0.3")
    assert time.monotonic() - started >= 0.3
    assert status == 200
    _assert_document(json.loads(body), time.time())


@pytest.mark.parametrize(
    "path",
    [
        "/slow?delay=abc",
        "/slow?delay=-1",
        "/slow?delay=nan",
        "/old?age=1.5",
        "/huge?bytes=10",
        "/nonfinite?kind=zero",
        "/sequence?start=-5",
        "/huge?bytes=%2B5",
    ],
)
def test_a_bad_query_parameter_is_refused_with_400(upstream, path):
    _, url = upstream
    status, headers, body = _get(url, path)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    assert isinstance(json.loads(body)["detail"], str)


def test_garbage_is_not_json(upstream):
    _, url = upstream
    status, _, body = _get(url, "/garbage")
    assert status == 200
    assert body == b"\x00\xffnot json{"
    with pytest.raises(ValueError):
        json.loads(body)


def test_html_is_served_as_text_html(upstream):
    _, url = upstream
    status, headers, body = _get(url, "/html")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"502 Bad Gateway" in body


@pytest.mark.parametrize(("path", "size"), [("/huge", 70000), ("/huge?bytes=250000", 250000)])
def test_huge_answers_the_requested_number_of_bytes(upstream, path, size):
    _, url = upstream
    status, headers, body = _get(url, path)
    assert status == 200
    assert len(body) == size == int(headers["Content-Length"])
    assert body.startswith(b'{"time": ')


@pytest.mark.parametrize("code", [400, 404, 429, 500, 502, 503, 599])
def test_status_answers_the_requested_code_with_json(upstream, code):
    _, url = upstream
    status, headers, body = _get(url, f"/status/{code}")
    assert status == code
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"detail": "simulated failure"}


@pytest.mark.parametrize("path", ["/status/200", "/status/600", "/status/abc", "/status"])
def test_status_outside_400_599_is_refused(upstream, path):
    _, url = upstream
    assert _get(url, path)[0] == 400


def test_drop_cuts_the_body_short(upstream):
    _, url = upstream
    conn = _connect(url)
    try:
        conn.request("GET", "/drop")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == "1000"
        with pytest.raises(http.client.IncompleteRead) as caught:
            resp.read()
        assert len(caught.value.partial) == 10
    finally:
        conn.close()


def test_reset_closes_without_an_answer(upstream):
    _, url = upstream
    conn = _connect(url)
    try:
        conn.request("GET", "/reset")
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            conn.getresponse()
    finally:
        conn.close()


def test_fixed_echoes_the_given_text_exactly(upstream):
    _, url = upstream
    doc = '{"time": 1713798477, "value": [NaN, 1.5, "7", true], "tags": ["a b+c"]}'
    status, headers, body = _get(url, "/fixed?doc=" + quote(doc))
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert body == doc.encode()


def test_fixed_echoes_bytes_that_are_not_utf8(upstream):
    _, url = upstream
    assert _get(url, "/fixed?doc=%FF%00x")[2] == b"\xff\x00x"


def test_fixed_without_doc_answers_the_readme_document(upstream):
    _, url = upstream
    status, _, body = _get(url, "/fixed")
    assert status == 200
    assert json.loads(body) == {"time": 1713798477, "value": [157, 42, 76, 190], "tags": []}
    assert _decode(json.loads(body)["value"]) == pytest.approx(-0.19938130676746368)


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("nan", math.isnan),
        ("inf", lambda x: x == math.inf),
        ("-inf", lambda x: x == -math.inf),
    ],
)
def test_nonfinite_values_decode_as_asked(upstream, kind, check):
    _, url = upstream
    status, _, body = _get(url, f"/nonfinite?kind={quote(kind)}")
    doc = json.loads(body)
    assert status == 200
    assert abs(doc["time"] - time.time()) <= 5
    assert check(_decode(doc["value"]))


@pytest.mark.parametrize(
    ("path", "age"), [("/old", 7200), ("/old?age=100", 100), ("/old?age=-30", -30)]
)
def test_old_documents_are_aged_by_the_given_seconds(upstream, path, age):
    _, url = upstream
    doc = json.loads(_get(url, path)[2])
    assert abs(doc["time"] - (time.time() - age)) <= 5
    assert math.isfinite(_decode(doc["value"]))


def test_sequence_times_count_up_from_start(upstream):
    _, url = upstream
    times = [json.loads(_get(url, "/sequence?start=1000")[2])["time"] for _ in range(3)]
    assert times == [1000, 1001, 1002]


def test_sequence_without_start_begins_a_minute_ago_and_strictly_increases(upstream):
    _, url = upstream
    conn = _connect(url)
    try:
        docs = []
        for _ in range(5):
            conn.request("GET", "/sequence")
            docs.append(json.loads(conn.getresponse().read()))
    finally:
        conn.close()
    times = [d["time"] for d in docs]
    assert abs(times[0] - (time.time() - 60)) <= 5
    assert all(a < b for a, b in zip(times, times[1:], strict=False))


# --- methods, errors, counting ----------------------------------------------------------------


def test_post_is_refused_with_405_json_and_allow(upstream):
    _, url = upstream
    status, headers, body = _get(url, "/", method="POST", body=b'{"x": 1}')
    assert status == 405
    assert headers["Allow"] == "GET"
    assert json.loads(body) == {"detail": "method not allowed"}


def test_head_gets_405_without_a_body_and_the_connection_stays_usable(upstream):
    _, url = upstream
    conn = _connect(url)
    try:
        conn.request("HEAD", "/")
        resp = conn.getresponse()
        assert resp.status == 405 and resp.read() == b""
        conn.request("POST", "/", body=b"some body bytes")
        assert conn.getresponse().read() == b'{"detail": "method not allowed"}'
        conn.request("GET", "/fixed")
        assert conn.getresponse().read() == simulated.FIXED_DOCUMENT
    finally:
        conn.close()


def test_a_malformed_request_gets_a_json_error_not_html(upstream):
    server, _ = upstream
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"Content-Type: application/json" in head
    assert b"Connection: close" in head
    assert "detail" in json.loads(body)


def test_requests_served_counts_every_request(upstream):
    server, url = upstream
    for path in ["/", "/garbage", "/status/500", "/fixed"]:
        _get(url, path)
    _get(url, "/", method="POST")
    assert server.requests_served == 5


def test_same_seed_gives_the_same_documents():
    firsts = []
    for seed in (7, 7, 8):
        server, url = simulated.start_in_thread(seed=seed)
        try:
            docs = [json.loads(_get(url, "/")[2]) for _ in range(3)]
        finally:
            server.shutdown()
            server.server_close()
        firsts.append([(d["value"], d["tags"]) for d in docs])
    assert firsts[0] == firsts[1]
    assert firsts[0] != firsts[2]


# --- the http.server sharp edges --------------------------------------------------------------


def test_each_answer_is_one_write_on_a_no_delay_socket(upstream, monkeypatch):
    _, url = upstream
    writes = []
    real_sendall = socket.socket.sendall

    def recording_sendall(self, data, *args):
        if bytes(data[:9]) == b"HTTP/1.1 ":  # only the server writes a status line
            nodelay = self.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            writes.append((bytes(data), nodelay))
        return real_sendall(self, data, *args)

    monkeypatch.setattr(socket.socket, "sendall", recording_sendall)
    _, _, body = _get(url, "/")
    assert len(writes) == 1
    data, nodelay = writes[0]
    assert data.endswith(b"\r\n\r\n" + body)
    assert nodelay


def test_server_bind_does_no_reverse_dns(monkeypatch):
    def no_dns(*args):
        raise AssertionError("getfqdn called")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    server = simulated.make_server(port=0)
    try:
        assert server.server_name == "127.0.0.1"
        assert server.server_port == server.server_address[1] != 0
    finally:
        server.server_close()


def test_make_server_is_tuned_for_threads_and_bursts():
    server = simulated.make_server(port=0)
    try:
        assert server.daemon_threads and server.allow_reuse_address
        assert server.request_queue_size == 128
    finally:
        server.server_close()


def test_start_in_thread_returns_a_loopback_base_url(upstream):
    server, url = upstream
    assert url == f"http://127.0.0.1:{server.server_address[1]}/"


def test_access_log_goes_to_the_logger_not_stderr(upstream, caplog, capsys):
    _, url = upstream
    caplog.set_level("DEBUG", logger="dataproc.upstream.simulated")
    _get(url, "/garbage")
    deadline = time.monotonic() + 2
    # The log line is written after the answer, on the server's thread: wait for it.
    while not any("/garbage" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "no access log record"
        time.sleep(0.01)
    record = next(r for r in caplog.records if "/garbage" in r.getMessage())
    assert record.name == "dataproc.upstream.simulated" and record.levelname == "DEBUG"
    assert capsys.readouterr().err == ""


def test_a_client_that_leaves_during_slow_is_ignored_quietly(upstream, caplog, capsys):
    server, url = upstream
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(b"GET /slow?delay=0.2 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.4)
    assert _get(url, "/fixed")[0] == 200  # still serving
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert capsys.readouterr().err == ""


# --- main -------------------------------------------------------------------------------------


def test_main_reports_a_port_in_use_in_one_line(upstream, capsys):
    server, _ = upstream
    port = server.server_address[1]
    assert simulated.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"dataproc source: cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in err


def _read_line(stream, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no complete line within {timeout}s: {line!r}"
        if select.select([stream], [], [], remaining)[0]:
            byte = os.read(stream.fileno(), 1)
            assert byte, f"stream closed: {line!r}"
            line += byte
    return line.decode()


def test_main_serves_until_sigterm_then_returns_0():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dataproc.upstream.simulated", "--port", "0", "--seed", "3"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        line = _read_line(proc.stderr, timeout=10)
        assert "simulated upstream listening on http://127.0.0.1:" in line
        url = line[line.index("http://") :].strip()
        assert _get(url, "/fixed")[2] == simulated.FIXED_DOCUMENT
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "Traceback" not in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
