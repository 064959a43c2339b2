"""Raw-bytes tests of `dataproc.server`: one or more per `http.server` sharp edge of DESIGN.md.

Each test speaks HTTP/1.1 byte by byte to a real `HttpServer` on an ephemeral loopback port,
running a tiny app built from `web.Router` + `web.make_app` (no database), with small limits
set by the test so that every limit is reached quickly.
"""

from __future__ import annotations

import ast
import gzip
import inspect
import json
import logging
import re
import socket
import struct
import threading
import time

import pytest

from dataproc import exchange as exchange_module
from dataproc import server as server_module
from dataproc.config import Config
from dataproc.errors import ApiError
from dataproc.server import HttpServer
from dataproc.web import Request, Response, Router, make_app

LIMITS = dict(
    host="127.0.0.1",
    port=0,
    socket_timeout_s=2.0,
    max_body_bytes=1024,
    max_request_line_bytes=256,
    max_header_count=8,
    max_header_bytes=1024,
    max_query_params=4,
    max_connections=16,
    listen_backlog=64,
    shutdown_grace_s=2.0,
)
GENERATED_ID = re.compile(r"[0-9a-f]{16}")


# --- the app under the server -------------------------------------------------------------


class Gates:
    """Events the tests use to hold a handler in flight or to release it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()  # set by a stream's `finally`
        self.stream_factory = lambda req: self.rows(3)

    def rows(self, count: int, *, fail_after: int | None = None, pause_s: float = 0.0):
        """A CSV stream of `count` rows that records being closed; may raise or pause."""
        try:
            yield b"id,value\r\n"
            for i in range(count):
                if fail_after is not None and i == fail_after:
                    raise RuntimeError("database went away")
                if pause_s:
                    time.sleep(pause_s)
                yield b"%d,0.5\r\n" % i
        finally:
            self.closed.set()


def build_app(gates: Gates):
    """A router with the few routes the tests need; no database, no auth."""
    router = Router()

    def hello(req: Request) -> Response:
        return Response.json({"hello": "world"})

    def echo_length(req: Request) -> Response:
        return Response.json({"length": len(req.body)})

    def boom(req: Request) -> Response:
        raise RuntimeError("unexpected")

    def slow(req: Request) -> Response:
        gates.entered.set()
        time.sleep(float(req.query.get("s", ["0.5"])[0]))
        return Response.json({"slept": True})

    def held(req: Request) -> Response:
        gates.entered.set()
        gates.release.wait(5)
        return Response(200, b"x" * (8 * 1024 * 1024), {"Content-Type": "application/octet-stream"})

    def big(req: Request) -> Response:
        return Response(200, b"b" * 10_000, {"Content-Type": "application/octet-stream"})

    def path_echo(req: Request) -> Response:
        return Response.json({"path": req.path, "query": req.query})

    def authorization(req: Request) -> Response:
        return Response.json({"single": req.header("authorization")})

    def authorization_values(req: Request) -> Response:
        return Response.json({"values": req.headers.get("authorization", [])})

    def big_json(req: Request) -> Response:
        return Response.json([{"id": i, "value": 0.5} for i in range(200)])

    def stream(req: Request) -> Response:
        return Response.streamed(gates.stream_factory(req), "text/csv", {"X-Kind": "export"})

    def not_modified(req: Request) -> Response:
        return Response.not_modified('"v1"', {"Cache-Control": "private, no-cache"})

    router.add("GET", "/hello", hello)
    router.add("GET", "/big-json", big_json)
    router.add("GET", "/stream", stream)
    router.add("GET", "/not-modified", not_modified)
    router.add("POST", "/echo", echo_length)
    router.add("GET", "/boom", boom)
    router.add("GET", "/slow", slow)
    router.add("GET", "/held", held)
    router.add("GET", "/big", big)
    router.add("GET", "/caf\u00e9 au lait", path_echo)
    router.add("GET", "/query", path_echo)
    router.add("GET", "/authorization", authorization)
    router.add("GET", "/authorization-values", authorization_values)
    return make_app(router)


class RecordingServer(HttpServer):
    """The real server, remembering accepted sockets and counting finished connections."""

    def __init__(self, *args, **kwargs):
        self.accepted: list[socket.socket] = []
        self.finished = threading.Semaphore(0)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        self.accepted.append(request)
        super().process_request(request, client_address)

    def shutdown_request(self, sock):
        super().shutdown_request(sock)
        self.finished.release()


@pytest.fixture
def gates() -> Gates:
    return Gates()


@pytest.fixture
def start(gates):
    """Start a server in a thread: `start(app=None, serve=True, **config_overrides)`."""
    servers: list[HttpServer] = []

    def start_server(app=None, *, serve: bool = True, **overrides) -> RecordingServer:
        config = Config(**{**LIMITS, **overrides})
        server = RecordingServer(config, app or build_app(gates))
        servers.append(server)
        if serve:
            run(server)
        return server

    yield start_server
    gates.release.set()
    for server in servers:
        if getattr(server, "serving", False):  # shutdown() waits forever on a loop never run
            server.shutdown()
        server.server_close()


def run(server: HttpServer) -> threading.Thread:
    server.serving = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    return thread


@pytest.fixture
def server(start) -> RecordingServer:
    return start()


# --- a raw client -------------------------------------------------------------------------


class Answer:
    def __init__(self, status_line: str, headers: list[tuple[str, str]], body: bytes):
        assert re.fullmatch(r"HTTP/1\.1 \d{3} [^\r\n]+", status_line), status_line
        self.status_line, self.headers, self.body = status_line, headers, body
        self.status = int(status_line.split(" ")[1])

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        assert len(values) <= 1, f"{name} given {len(values)} times"
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self):
        assert self.get("Content-Type") == "application/json"
        return json.loads(self.body)


class Raw:
    """One TCP connection; requests are exact bytes, answers are parsed by hand."""

    def __init__(self, server: HttpServer, timeout: float = 3.0):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> Raw:
        self.sock.sendall(data)
        return self

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self._fill():
                raise AssertionError(f"closed before {marker!r}; got {self.buffer!r}")
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def answer(self, *, head: bool = False) -> Answer:
        """One response; every response must carry exactly one Content-Length."""
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")[:-2]
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        answer = Answer(lines[0], headers, b"")
        length = answer.get("Content-Length")
        assert length is not None and length.isdigit(), f"no Content-Length in {lines}"
        if not head:
            while len(self.buffer) < int(length):
                if not self._fill():
                    raise AssertionError("closed mid-body")
            answer.body, self.buffer = self.buffer[: int(length)], self.buffer[int(length) :]
        return answer

    def request(self, data: bytes, **kwargs) -> Answer:
        return self.send(data).answer(**kwargs)

    def head(self) -> tuple[str, dict[str, str]]:
        """A response head only (a stream, a 304): its status line and headers."""
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")[:-2]
        headers = dict(tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:])
        return lines[0], {name.lower(): value for name, value in headers.items()}

    def chunks(self) -> tuple[list[bytes], bool]:
        """The chunks of a chunked body, and whether the last chunk came (else: truncated)."""
        chunks = []
        while True:
            try:
                size_line = self.read_until(b"\r\n")
            except AssertionError:
                return chunks, False
            size = int(size_line.strip(), 16)
            while len(self.buffer) < size + 2:
                if not self._fill():
                    return chunks, False
            data, self.buffer = self.buffer[: size + 2], self.buffer[size + 2 :]
            assert data.endswith(b"\r\n"), data
            if size == 0:
                return chunks, True
            chunks.append(data[:-2])

    def until_closed(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def closed_by_server(self, timeout: float = 2.0) -> bool:
        """True when the server has closed: EOF (or a reset) with no further bytes."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b"" and self.buffer == b""
        except ConnectionResetError:
            return self.buffer == b""
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def get(path: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post(path: str, body: bytes, *extra: str) -> bytes:
    return get(path, f"Content-Length: {len(body)}", *extra, method="POST") + body


def assert_json_error(answer: Answer, status: int, *, closes: bool) -> dict:
    assert answer.status == status, (answer.status_line, answer.body)
    payload = answer.json()
    assert isinstance(payload["detail"], str) and payload["detail"]
    assert (answer.get("Connection") == "close") is closes
    return payload


# --- 1: keep-alive ------------------------------------------------------------------------


def test_two_requests_on_one_socket_get_two_answers_each_with_content_length(server):
    conn = Raw(server)
    first = conn.request(get("/hello"))
    second = conn.request(post("/echo", b"12345", "Content-Type: text/plain"))
    assert (first.status, first.json()) == (200, {"hello": "world"})
    assert (second.status, second.json()) == (200, {"length": 5})
    assert first.get("Content-Length") == str(len(first.body))
    assert first.get("Connection") is None and second.get("Connection") is None


def test_an_error_answer_keeps_the_connection_and_carries_content_length(server):
    conn = Raw(server)
    missing = conn.request(get("/nowhere"))
    after = conn.request(get("/hello"))
    assert missing.status == 404 and missing.get("Content-Length") == str(len(missing.body))
    assert after.status == 200


def test_a_body_sent_to_a_route_that_ignores_it_does_not_desync_the_next_request(server):
    smuggled = get("/nowhere")  # a body that looks like a request must stay a body
    conn = Raw(server)
    refused = conn.request(post("/hello", smuggled))
    unknown = conn.request(post("/unknown", smuggled))
    after = conn.request(get("/hello"))
    assert [refused.status, unknown.status, after.status] == [405, 404, 200]
    assert not conn.closed_by_server(timeout=0.2)  # no third, smuggled answer is waiting


def test_http_1_0_without_keep_alive_gets_connection_close_and_is_closed(server):
    conn = Raw(server)
    answer = conn.request(b"GET /hello HTTP/1.0\r\n\r\n")
    assert answer.status == 200 and answer.get("Connection") == "close"
    assert conn.closed_by_server()


def test_http_1_0_with_keep_alive_stays_open(server):
    conn = Raw(server)
    first = conn.request(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    second = conn.request(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert first.get("Connection") == "keep-alive" and second.status == 200


def test_connection_close_from_the_client_is_honoured(server):
    conn = Raw(server)
    answer = conn.request(get("/hello", "Connection: close"))
    assert answer.status == 200 and answer.get("Connection") == "close"
    assert conn.closed_by_server()


# --- 2: protocol errors are the contract's JSON, never HTML --------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"GARBAGE\r\n",
        b"GET /hello\r\n",
        b"GET  /hello HTTP/1.1\r\n",
        b"GET /hello HTTP/1.1 extra\r\n",
        b"GET /hello HTTP/x.y\r\n",
        b"\r\n",
    ],
    ids=["garbage", "http-0.9", "two-spaces", "extra-token", "bad-version", "empty"],
)
def test_a_malformed_request_line_gets_a_json_400_and_close(server, line):
    conn = Raw(server)
    answer = conn.request(line + b"Host: test\r\n\r\n")
    assert_json_error(answer, 400, closes=True)
    assert conn.closed_by_server()


def test_a_request_line_over_the_limit_gets_a_json_414(server):
    answer = Raw(server).request(get("/" + "a" * 300))
    assert_json_error(answer, 414, closes=True)


def test_too_many_headers_get_a_json_431(server):
    headers = [f"X-H{i}: v" for i in range(9)]  # Host + 9 > max_header_count 8
    answer = Raw(server).request(get("/hello", *headers))
    assert_json_error(answer, 431, closes=True)


def test_headers_over_the_byte_limit_get_a_json_431(server):
    answer = Raw(server).request(get("/hello", "X-Big: " + "v" * 1100))
    assert_json_error(answer, 431, closes=True)


def test_http_2_0_gets_a_json_505(server):
    answer = Raw(server).request(b"GET /hello HTTP/2.0\r\nHost: test\r\n\r\n")
    assert_json_error(answer, 505, closes=True)


def test_no_stdlib_http_server_handler_runs_so_none_can_answer_in_html():
    # `BaseHTTPRequestHandler.send_error` writes HTML and the stdlib calls it itself; the
    # server uses no `http.server` class at all, so that path cannot be reached.
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for module in (server_module, exchange_module)
        for node in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert "http.server" not in imported and "socketserver" not in imported


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"BAD\r\n\r\n", 400),
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"v" * 1100 + b"\r\n\r\n", 431),
        (b"GET / HTTP/3.0\r\nHost: t\r\n\r\n", 505),
    ],
    ids=["400", "414", "431", "505"],
)
def test_every_error_the_stdlib_would_answer_in_html_is_json(server, data, status):
    answer = Raw(server).request(data)
    assert_json_error(answer, status, closes=True)
    assert b"<" not in answer.body


# --- 3: every verb reaches the router -----------------------------------------------------


@pytest.mark.parametrize("method", ["PATCH", "DELETE", "PUT", "OPTIONS", "BREW", "get"])
def test_other_verbs_on_a_known_path_get_405_with_allow(server, method):
    conn = Raw(server)
    answer = conn.request(get("/hello", method=method))
    assert answer.status == 405 and answer.json() == {"detail": "Method Not Allowed"}
    assert answer.get("Allow") == "GET, HEAD"
    assert conn.request(get("/hello")).status == 200  # and the connection stays usable


def test_get_on_a_post_only_path_gets_405_allowing_post(server):
    answer = Raw(server).request(get("/echo"))
    assert answer.status == 405 and answer.get("Allow") == "POST"


@pytest.mark.parametrize("method", ["GET", "PATCH", "BREW"])
def test_any_verb_on_an_unknown_path_gets_a_json_404(server, method):
    answer = Raw(server).request(get("/nowhere", method=method))
    assert answer.status == 404 and answer.json() == {"detail": "Not Found"}


# --- 4: HEAD ------------------------------------------------------------------------------


def test_head_gives_the_headers_of_get_and_no_body(server):
    conn = Raw(server)
    head = conn.request(get("/hello", method="HEAD"), head=True)
    full = conn.request(get("/hello"))  # parses cleanly only if HEAD sent no body bytes
    assert head.status == full.status == 200
    assert head.get("Content-Length") == full.get("Content-Length") == str(len(full.body))
    assert head.get("Content-Type") == full.get("Content-Type")


def test_head_of_an_unknown_path_is_a_bodiless_404(server):
    conn = Raw(server)
    head = conn.request(get("/nowhere", method="HEAD"), head=True)
    assert head.status == 404 and int(head.get("Content-Length")) > 0
    assert conn.request(get("/hello")).status == 200


# --- 5: request bodies --------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines",
    [
        ("Content-Length: 3", "Content-Length: 3"),
        ("Content-Length: 3", "Content-Length: 4"),
        ("Content-Length: 3, 3",),
        ("Content-Length: abc",),
        ("Content-Length: -3",),
        ("Content-Length: +3",),
        ("Content-Length: 0x3",),
        ("Content-Length: ",),
    ],
    ids=["duplicated", "conflicting", "list", "non-digit", "negative", "plus-sign", "hex", "empty"],
)
def test_a_bad_content_length_gets_400_and_close(server, lines):
    conn = Raw(server)
    answer = conn.request(get("/echo", *lines, method="POST") + b"abc")
    assert_json_error(answer, 400, closes=True)
    assert conn.closed_by_server()


def test_a_body_over_the_cap_gets_413_and_close_without_being_read(server):
    conn = Raw(server)
    started = time.monotonic()
    answer = conn.request(get("/echo", "Content-Length: 1000000", method="POST"))  # no body sent
    assert time.monotonic() - started < 1.0  # answered at once, not after waiting for the body
    payload = assert_json_error(answer, 413, closes=True)
    assert "1024" in payload["detail"]
    assert conn.closed_by_server()


def test_a_body_at_the_cap_is_accepted(server):
    answer = Raw(server).request(post("/echo", b"x" * 1024, "Content-Type: text/plain"))
    assert answer.status == 200 and answer.json() == {"length": 1024}


@pytest.mark.parametrize("encoding", ["chunked", "gzip, chunked", "identity"])
def test_transfer_encoding_gets_411_and_close(server, encoding):
    conn = Raw(server)
    answer = conn.request(
        get("/echo", f"Transfer-Encoding: {encoding}", method="POST") + b"3\r\nabc\r\n0\r\n\r\n"
    )
    assert_json_error(answer, 411, closes=True)
    assert conn.closed_by_server()


# --- 6: Expect: 100-continue --------------------------------------------------------------


def test_expect_100_with_an_oversized_body_gets_413_and_no_100_continue(server):
    conn = Raw(server)
    conn.send(get("/echo", "Content-Length: 5000", "Expect: 100-continue", method="POST"))
    answer = conn.answer()
    assert_json_error(answer, 413, closes=True)
    assert b"100 Continue" not in answer.status_line.encode()
    assert conn.closed_by_server()


def test_expect_100_with_a_fine_body_gets_100_continue_then_the_answer(server):
    conn = Raw(server)
    conn.send(
        get(
            "/echo",
            "Content-Length: 5",
            "Expect: 100-continue",
            "Content-Type: text/plain",
            method="POST",
        )
    )
    assert conn.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    answer = conn.request(b"hello")
    assert answer.status == 200 and answer.json() == {"length": 5}


def test_an_unknown_expectation_gets_417(server):
    answer = Raw(server).request(get("/echo", "Content-Length: 0", "Expect: coffee", method="POST"))
    assert_json_error(answer, 417, closes=True)


# --- 7: timeouts --------------------------------------------------------------------------


def test_a_silent_connection_is_closed_after_the_socket_timeout(start):
    server = start(socket_timeout_s=0.3)
    conn = Raw(server)
    started = time.monotonic()
    assert conn.closed_by_server(timeout=2.0)
    assert 0.2 < time.monotonic() - started < 1.5


def test_an_idle_keep_alive_connection_is_closed_after_the_socket_timeout(start):
    server = start(socket_timeout_s=0.3)
    conn = Raw(server)
    assert conn.request(get("/hello")).status == 200
    assert conn.closed_by_server(timeout=2.0)


def test_half_sent_headers_get_408(start):
    server = start(socket_timeout_s=0.3)
    conn = Raw(server)
    conn.send(b"GET /hello HTTP/1.1\r\nHost: test\r\n")  # the blank line never comes
    answer = conn.answer()
    assert_json_error(answer, 408, closes=True)


def test_a_half_sent_body_gets_408(start):
    server = start(socket_timeout_s=0.3)
    conn = Raw(server)
    conn.send(get("/echo", "Content-Length: 10", method="POST") + b"abc")
    assert_json_error(conn.answer(), 408, closes=True)


def test_a_header_trickle_cannot_outlast_the_request_deadline(start):
    server = start(socket_timeout_s=0.3, max_header_count=64, max_header_bytes=4096)
    conn = Raw(server)
    conn.send(b"GET /hello HTTP/1.1\r\nHost: test\r\n")

    def trickle():  # each line well inside the timeout; all of them far outside it
        for i in range(20):
            try:
                conn.send(f"X-Trickle-{i}: v\r\n".encode())
            except OSError:
                return
            time.sleep(0.1)

    started = time.monotonic()
    threading.Thread(target=trickle, daemon=True).start()
    assert_json_error(conn.answer(), 408, closes=True)
    assert time.monotonic() - started < 1.0


# --- 8: bounded connections and the listen backlog ---------------------------------------


def test_a_connection_over_the_cap_gets_a_fast_json_503_with_retry_after(start):
    server = start(max_connections=2)
    first, second = Raw(server), Raw(server)
    assert first.request(get("/hello")).status == 200
    assert second.request(get("/hello")).status == 200
    third = Raw(server)
    started = time.monotonic()
    answer = third.request(get("/hello"))
    assert time.monotonic() - started < 0.5
    assert answer.status == 503 and answer.get("Retry-After") == "1"
    assert answer.get("Connection") == "close" and "detail" in answer.json()
    assert third.closed_by_server()


def test_a_slot_is_free_again_once_a_connection_closes(start):
    server = start(max_connections=1)
    first = Raw(server)
    assert first.request(get("/hello")).status == 200
    first.close()
    assert server.finished.acquire(timeout=2)
    assert Raw(server).request(get("/hello")).status == 200


def test_the_listen_backlog_is_the_configured_value(start):
    server = start(listen_backlog=300)
    assert server.request_queue_size == 300


def test_two_hundred_connections_made_while_the_accept_loop_is_busy_are_all_served(start):
    server = start(serve=False, listen_backlog=256, max_connections=256)
    # Nothing accepts yet: every connection must fit in the kernel's accept queue. With the
    # stdlib's backlog of 5, the connects past the queue would wait for SYN retries and time out.
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=0.5) for _ in range(200)]
    try:
        for sock in socks:
            sock.sendall(get("/hello", "Connection: close"))
        run(server)
        statuses = []
        for sock in socks:
            sock.settimeout(5)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            statuses.append(int(data.split(b" ", 2)[1]))
        assert statuses == [200] * 200
    finally:
        for sock in socks:
            sock.close()


# --- 9: drain -----------------------------------------------------------------------------


def test_drain_finishes_in_flight_requests_closes_idle_ones_and_refuses_new(start, gates):
    server = start()
    idle = Raw(server)
    assert idle.request(get("/hello")).status == 200
    busy = Raw(server)
    busy.send(get("/slow?s=0.5"))
    assert gates.entered.wait(2)
    result = {}
    drainer = threading.Thread(
        target=lambda: result.update(finished=server.drain(2.0), took=time.monotonic() - started)
    )
    started = time.monotonic()
    drainer.start()
    assert idle.closed_by_server(timeout=1.0)  # the idle connection goes at once
    answer = busy.answer()
    assert answer.status == 200 and answer.json() == {"slept": True}
    assert answer.get("Connection") == "close"
    drainer.join(3)
    assert result["finished"] is True and result["took"] < 2.0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1)


def test_drain_gives_up_after_the_grace_period(start, gates):
    server = start()
    busy = Raw(server)
    busy.send(get("/slow?s=1.5"))
    assert gates.entered.wait(2)
    started = time.monotonic()
    assert server.drain(0.3) is False
    assert time.monotonic() - started < 1.0


# --- 10: Server header --------------------------------------------------------------------


def test_the_server_header_names_the_service_only(server):
    answer = Raw(server).request(get("/hello"))
    assert answer.get("Server") == "dataproc"
    assert b"Python" not in answer.status_line.encode() + repr(answer.headers).encode()


def test_every_answer_carries_nosniff_and_a_date(server):
    answer = Raw(server).request(get("/nowhere"))
    assert answer.get("X-Content-Type-Options") == "nosniff"
    assert answer.get("Date").endswith(" GMT")


# --- 11: logging --------------------------------------------------------------------------


def test_protocol_errors_and_failures_go_to_logging_not_stderr(server, caplog, capfd):
    caplog.set_level(logging.DEBUG, logger="dataproc")
    Raw(server).request(b"GET /x HTTP/1.1\r\nBad Name: v\r\n\r\n")
    Raw(server).request(get("/boom"))
    assert any(r.name == "dataproc.access" and r.status == 400 for r in caplog.records)
    assert any(r.exc_info and "unexpected" in str(r.exc_info[1]) for r in caplog.records)
    assert capfd.readouterr().err == ""


def test_each_request_is_logged_once_with_its_request_id_and_nothing_reaches_stderr(
    server, caplog, capfd
):
    caplog.set_level(logging.INFO, logger="dataproc.access")
    conn = Raw(server)
    conn.request(get("/hello", "X-Request-ID: trace-123"))
    conn.request(b"BAD\r\n\r\n")
    deadline = time.monotonic() + 2  # the access line is written just after the answer
    while len(records := [r for r in caplog.records if r.name == "dataproc.access"]) < 2:
        assert time.monotonic() < deadline, records
        time.sleep(0.01)
    assert [r.status for r in records] == [200, 400]
    assert records[0].request_id == "trace-123" and records[0].route == "/hello"
    assert capfd.readouterr().err == ""


# --- 12: a failing app --------------------------------------------------------------------


def test_an_exception_in_a_handler_gets_a_fixed_500_and_the_connection_stays_usable(server, caplog):
    conn = Raw(server)
    answer = conn.request(get("/boom"))
    assert answer.status == 500 and answer.body == b'{"detail":"Internal Server Error"}'
    assert answer.get("Connection") is None
    assert conn.request(get("/hello")).status == 200
    assert any(r.exc_info and "unexpected" in str(r.exc_info[1]) for r in caplog.records)


def test_an_app_that_raises_itself_gets_a_500_from_the_server(start):
    def app(request: Request) -> Response:
        if request.path == "/raise":
            raise KeyError("not caught by the app")
        return Response.json({"ok": True})

    conn = Raw(start(app))
    answer = conn.request(get("/raise"))
    assert answer.status == 500 and answer.json() == {"detail": "Internal Server Error"}
    assert conn.request(get("/fine")).json() == {"ok": True}


def test_an_api_error_from_a_handler_is_its_json_answer(start):
    def app(request: Request) -> Response:
        router = Router()

        def teapot(req: Request) -> Response:
            raise ApiError(418, "short and stout", {"X-Why": "because"})

        router.add("GET", "/tea", teapot)
        return make_app(router)(request)

    answer = Raw(start(app)).request(get("/tea"))
    assert answer.status == 418 and answer.json() == {"detail": "short and stout"}
    assert answer.get("X-Why") == "because"


# --- 13: a client gone mid-write ----------------------------------------------------------


def test_a_client_that_closes_mid_write_leaves_no_traceback(server, gates, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    conn = Raw(server)
    conn.send(get("/held"))
    assert gates.entered.wait(2)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # a reset: the server's 8 MiB write must fail
    gates.release.set()
    assert server.finished.acquire(timeout=3)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert "Traceback" not in capfd.readouterr().err
    assert Raw(server).request(get("/hello")).status == 200


def test_a_client_that_closes_mid_request_leaves_no_traceback(server, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    conn = Raw(server)
    conn.send(b"GET /hello HTTP/1.1\r\nHost: te")
    conn.close()
    assert server.finished.acquire(timeout=3)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert "Traceback" not in capfd.readouterr().err


# --- 14: the request target ---------------------------------------------------------------


def test_a_percent_encoded_path_is_unquoted_before_routing(server):
    answer = Raw(server).request(get("/caf%C3%A9%20au%20lait"))
    assert answer.status == 200 and answer.json()["path"] == "/caf\u00e9 au lait"


def test_the_query_string_is_parsed_with_repeats_and_blanks(server):
    answer = Raw(server).request(get("/query?a=1&a=2&b=&c=%20x"))
    assert answer.json()["query"] == {"a": ["1", "2"], "b": [""], "c": [" x"]}


@pytest.mark.parametrize("target", ["/caf%E9", "/query?a=%FF"], ids=["path", "query"])
def test_invalid_utf8_in_the_target_gets_400(server, target):
    assert_json_error(Raw(server).request(get(target)), 400, closes=True)


@pytest.mark.parametrize("query", ["a=1&&b", "a=1&b", "&"])
def test_a_malformed_query_gets_400(server, query):
    answer = Raw(server).request(get(f"/query?{query}"))
    assert assert_json_error(answer, 400, closes=True)["detail"] == "malformed query string"


def test_too_many_query_parameters_get_400(server):
    answer = Raw(server).request(get("/query?a=1&b=2&c=3&d=4&e=5"))
    assert assert_json_error(answer, 400, closes=True)["detail"] == "too many query parameters"


@pytest.mark.parametrize("target", ["http://test/hello", "*", "hello"])
def test_a_target_that_is_not_an_absolute_path_gets_400(server, target):
    assert_json_error(Raw(server).request(get(target)), 400, closes=True)


# --- 15: duplicated headers ---------------------------------------------------------------


def test_a_duplicated_authorization_header_is_kept_as_two_values(server):
    answer = Raw(server).request(
        get("/authorization-values", "Authorization: Bearer a", "Authorization: Bearer b")
    )
    assert answer.json() == {"values": ["Bearer a", "Bearer b"]}


def test_reading_a_duplicated_authorization_header_is_a_400(server):
    answer = Raw(server).request(
        get("/authorization", "Authorization: Bearer a", "authorization: Bearer b")
    )
    assert answer.status == 400 and answer.json() == {"detail": "duplicate authorization header"}


def test_a_single_authorization_header_is_read(server):
    answer = Raw(server).request(get("/authorization", "Authorization: Bearer a"))
    assert answer.json() == {"single": "Bearer a"}


@pytest.mark.parametrize("hosts", [(), ("Host: a", "Host: b")], ids=["missing", "twice"])
def test_http_1_1_without_exactly_one_host_gets_400(server, hosts):
    data = ("\r\n".join(["GET /hello HTTP/1.1", *hosts]) + "\r\n\r\n").encode()
    assert_json_error(Raw(server).request(data), 400, closes=True)


def test_http_1_0_without_host_is_served(server):
    assert Raw(server).request(b"GET /hello HTTP/1.0\r\n\r\n").status == 200


# --- 16: no reverse DNS on bind -----------------------------------------------------------


def test_binding_does_not_look_up_the_host_name(start, monkeypatch):
    def refuse(*args):
        raise AssertionError("getfqdn called")

    monkeypatch.setattr(socket, "getfqdn", refuse)
    server = start()
    assert server.port > 0 and server.server_name == "127.0.0.1"
    assert Raw(server).request(get("/hello")).status == 200


# --- 17: one write per response, TCP_NODELAY ----------------------------------------------


def test_accepted_sockets_have_tcp_nodelay(server):
    conn = Raw(server)  # kept open: the server's end of it is what is checked
    assert conn.request(get("/hello")).status == 200
    assert server.accepted[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_a_10_kb_answer_arrives_in_one_segment(server):
    conn = Raw(server)
    conn.send(get("/big"))
    first = conn.sock.recv(1 << 20)  # headers and body written together arrive together
    head, _, body = first.partition(b"\r\n\r\n")
    assert b"Content-Length: 10000" in head and body == b"b" * 10_000


def test_fifty_kept_alive_requests_do_not_stall_on_delayed_acks(server):
    conn = Raw(server)
    conn.request(get("/hello"))  # warm up
    started = time.monotonic()
    for _ in range(50):
        assert conn.request(get("/hello")).status == 200
    assert time.monotonic() - started < 0.5  # Nagle + delayed ACK would take 50 x 40 ms


# --- header hygiene -----------------------------------------------------------------------


def test_a_sane_request_id_is_echoed(server):
    answer = Raw(server).request(get("/hello", "X-Request-ID: abc-123.x_Y:9"))
    assert answer.get("X-Request-ID") == "abc-123.x_Y:9"


@pytest.mark.parametrize(
    "value", ["r" * 200, "<script>", "a b", ""], ids=["too-long", "markup", "space", "empty"]
)
def test_an_unsafe_request_id_is_replaced_by_a_generated_one(server, value):
    answer = Raw(server).request(get("/hello", f"X-Request-ID: {value}"))
    assert answer.status == 200 and GENERATED_ID.fullmatch(answer.get("X-Request-ID"))


def test_a_request_id_given_twice_is_replaced(server):
    answer = Raw(server).request(get("/hello", "X-Request-ID: one", "X-Request-ID: two"))
    assert GENERATED_ID.fullmatch(answer.get("X-Request-ID"))


def test_a_carriage_return_in_the_request_id_cannot_inject_a_header(server):
    conn = Raw(server)
    answer = conn.request(
        b"GET /hello HTTP/1.1\r\nHost: test\r\nX-Request-ID: abc\rSet-Cookie: evil=1\r\n\r\n"
    )
    assert_json_error(answer, 400, closes=True)
    assert answer.get("Set-Cookie") is None and GENERATED_ID.fullmatch(answer.get("X-Request-ID"))


def test_a_folded_header_line_gets_400(server):
    answer = Raw(server).request(b"GET /hello HTTP/1.1\r\nHost: test\r\nX-A: one\r\n two\r\n\r\n")
    assert "folding" in assert_json_error(answer, 400, closes=True)["detail"]


@pytest.mark.parametrize(
    "line",
    [b"X-A: a\x00b", b"X-A: a\x1bb", b"Bad Name: x", b"NoColon", b": empty-name"],
    ids=["nul", "escape", "space-in-name", "no-colon", "empty-name"],
)
def test_a_malformed_header_line_gets_400(server, line):
    answer = Raw(server).request(b"GET /hello HTTP/1.1\r\nHost: test\r\n" + line + b"\r\n\r\n")
    assert_json_error(answer, 400, closes=True)


def test_a_response_header_value_cannot_carry_a_line_break(start):
    def app(request: Request) -> Response:
        return Response(200, b"", {"X-Echo": "a\r\nSet-Cookie: evil=1"})

    answer = Raw(start(app)).request(get("/"))
    assert answer.get("Set-Cookie") is None and answer.get("X-Echo") == "a  Set-Cookie: evil=1"


# --- idle connections cost no thread --------------------------------------------------------


def test_idle_keep_alive_connections_hold_no_worker_thread(start):
    def threads() -> int:
        return threading.active_count()

    server = start(threads=2, max_connections=64)
    assert Raw(server).request(get("/hello")).status == 200  # the workers have started
    before = threads()
    idle = [Raw(server) for _ in range(40)]
    for conn in idle:
        assert conn.request(get("/hello")).status == 200  # each now idle, kept alive
    assert threads() <= before  # 40 more connections, not one more thread
    for conn in idle:  # every parked connection is still served
        assert conn.request(get("/hello")).status == 200


def test_a_slow_sender_holds_no_worker_while_its_head_arrives(start):
    server = start(threads=1, socket_timeout_s=2.0)
    slow = Raw(server).send(b"GET /hello HTTP/1.1\r\nHost: te")  # and nothing more for now
    fast = Raw(server)
    assert fast.request(get("/hello")).status == 200  # the one worker was free
    slow.send(b"st\r\n\r\n")
    assert slow.answer().status == 200


def test_pipelined_requests_are_answered_in_order(server):
    conn = Raw(server)
    conn.send(get("/hello") + post("/echo", b"abc", "Content-Type: text/plain") + get("/nowhere"))
    assert [conn.answer().status for _ in range(3)] == [200, 200, 404]


# --- 18: streams ----------------------------------------------------------------------------


def test_a_stream_is_sent_chunked_and_the_connection_is_kept(server, gates):
    conn = Raw(server)
    status, headers = conn.send(get("/stream")).head()
    assert status == "HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers and headers["content-type"] == "text/csv"
    assert headers["x-kind"] == "export" and GENERATED_ID.fullmatch(headers["x-request-id"])
    chunks, complete = conn.chunks()
    assert complete and b"".join(chunks) == b"id,value\r\n0,0.5\r\n1,0.5\r\n2,0.5\r\n"
    assert gates.closed.wait(1)
    assert conn.request(get("/hello")).status == 200


def test_a_stream_to_http_1_0_ends_with_the_connection(server):
    conn = Raw(server)
    status, headers = conn.send(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").head()
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert headers["connection"] == "close"
    assert conn.until_closed() == b"id,value\r\n0,0.5\r\n1,0.5\r\n2,0.5\r\n"


def test_a_stream_that_fails_after_the_first_byte_ends_without_its_last_chunk(
    server, gates, caplog
):
    gates.stream_factory = lambda req: gates.rows(5, fail_after=2)
    conn = Raw(server)
    status, _ = conn.send(get("/stream")).head()
    chunks, complete = conn.chunks()
    assert status.startswith("HTTP/1.1 200") and not complete
    assert b"".join(chunks) == b"id,value\r\n0,0.5\r\n1,0.5\r\n"
    assert conn.closed_by_server()
    assert any(r.exc_info and "database went away" in repr(r.exc_info[1].__cause__)
               for r in caplog.records)  # fmt: skip


def test_a_stream_that_fails_before_its_first_byte_is_an_ordinary_json_error(server, gates):
    def refused(req):
        raise ApiError(503, "too many exports", {"Retry-After": "1"})
        yield b""  # a generator: the error comes on the first next()

    gates.stream_factory = refused
    conn = Raw(server)
    answer = conn.request(get("/stream"))
    assert answer.status == 503 and answer.json() == {"detail": "too many exports"}
    assert answer.get("Retry-After") == "1" and gates.closed.is_set() is False
    assert conn.request(get("/hello")).status == 200


def test_a_client_gone_mid_stream_closes_the_iterator_within_a_second(server, gates):
    gates.stream_factory = lambda req: gates.rows(10_000, pause_s=0.01)
    conn = Raw(server)
    conn.send(get("/stream")).head()
    conn.read_until(b"0,0.5\r\n")
    conn.close()
    assert gates.closed.wait(1.0)


def test_a_reader_that_stops_reading_is_bounded_by_the_socket_timeout(start, gates):
    server = start(socket_timeout_s=0.3)
    gates.stream_factory = lambda req: (b"x" * 65536 for _ in range(100_000))
    conn = Raw(server)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.send(get("/stream"))  # and never read: the server's writes block, then time out
    assert server.finished.acquire(timeout=5)


class ClosingIterator:
    """An iterator that records `close()` (a generator never started runs no `finally`)."""

    def __init__(self, closed: threading.Event):
        self.closed = closed

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        return b"row\r\n"

    def close(self) -> None:
        self.closed.set()


@pytest.mark.parametrize("accept", ["identity", "gzip"])
def test_head_of_a_stream_sends_the_headers_only_and_closes_the_iterator(server, gates, accept):
    gates.stream_factory = lambda req: ClosingIterator(gates.closed)
    conn = Raw(server)
    status, headers = conn.send(get("/stream", f"Accept-Encoding: {accept}", method="HEAD")).head()
    assert status.startswith("HTTP/1.1 200") and headers["transfer-encoding"] == "chunked"
    assert (headers.get("content-encoding") == "gzip") is (accept == "gzip")
    assert gates.closed.wait(1)
    assert conn.request(get("/hello")).status == 200  # no body bytes came before it


# --- gzip, once for every endpoint ----------------------------------------------------------


def test_a_json_body_over_1_kib_is_gzipped_when_the_client_allows(server):
    conn = Raw(server)
    plain = conn.request(get("/big-json"))
    zipped = conn.request(get("/big-json", "Accept-Encoding: br, gzip;q=0.8"))
    assert zipped.get("Content-Encoding") == "gzip" and zipped.get("Vary") == "Accept-Encoding"
    assert gzip.decompress(zipped.body) == plain.body and len(zipped.body) < len(plain.body) / 4
    assert plain.get("Content-Encoding") is None and plain.get("Vary") == "Accept-Encoding"


def test_head_shows_the_headers_of_the_gzipped_get(server):
    conn = Raw(server)
    full = conn.request(get("/big-json", "Accept-Encoding: gzip"))
    head = conn.request(get("/big-json", "Accept-Encoding: gzip", method="HEAD"), head=True)
    for name in ("Content-Encoding", "Content-Length", "Vary", "Content-Type"):
        assert head.get(name) == full.get(name), name


@pytest.mark.parametrize("accept", ["gzip;q=0", "identity", "*;q=0", "*, gzip;q=0"])
def test_gzip_refused_by_the_client_is_not_used(server, accept):
    answer = Raw(server).request(get("/big-json", f"Accept-Encoding: {accept}"))
    assert answer.get("Content-Encoding") is None and answer.json()[0] == {"id": 0, "value": 0.5}


def test_a_small_body_is_never_gzipped(server):
    answer = Raw(server).request(get("/hello", "Accept-Encoding: gzip"))
    assert answer.get("Content-Encoding") is None and answer.get("Vary") is None


def test_a_stream_is_gzipped_chunk_by_chunk(server, gates):
    conn = Raw(server)
    _, headers = conn.send(get("/stream", "Accept-Encoding: *")).head()
    assert headers["content-encoding"] == "gzip" and headers["vary"] == "Accept-Encoding"
    chunks, complete = conn.chunks()
    assert complete and len(chunks) >= 4  # flushed per chunk, not gathered
    assert gzip.decompress(b"".join(chunks)) == b"id,value\r\n0,0.5\r\n1,0.5\r\n2,0.5\r\n"
    assert gates.closed.wait(1)


# --- 19: 304 ------------------------------------------------------------------------------


def test_a_304_has_no_body_and_no_length_and_keeps_the_connection(server):
    conn = Raw(server)
    status, headers = conn.send(get("/not-modified", "Accept-Encoding: gzip")).head()
    assert status == "HTTP/1.1 304 Not Modified" and headers["etag"] == '"v1"'
    assert headers["cache-control"] == "private, no-cache" and "x-request-id" in headers
    assert "content-length" not in headers and "content-encoding" not in headers
    assert conn.request(get("/hello")).status == 200  # no body bytes came before it
