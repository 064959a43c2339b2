"""The only `http.server` code: bytes on a socket in, a `Request` to the app, its `Response` out.

Owns: connections, HTTP/1.1 framing and keep-alive, every limit on what a client may send,
the JSON answers to protocol errors, the access log, request ids and a graceful drain.
Leaves to `web` the routing and error shapes, and to the `app` it is handed everything else
(it never imports `api`, `store` or `jwt`).

`BaseHTTPRequestHandler` is kept for its connection set-up and its buffered socket files, but
`handle_one_request` is ours: the stdlib's parser has fixed limits (65,536-byte lines, 100
headers), answers errors in HTML and dispatches to `do_<VERB>`. The sharp edges of DESIGN.md,
by number, and where each is handled:
  1 keep-alive: `protocol_version`, `Content-Length` on every response, bodies read in full.
  2 HTML errors: `send_error` answers the contract's JSON.   3 unknown verbs: any method
  token reaches the router (404/405), never `do_<VERB>`.   4 HEAD: GET's headers, no body.
  5 bodies: `Content-Length` once and digits only, capped (413), `Transfer-Encoding` refused.
  6 `Expect: 100-continue` answered only after the checks.   7 per-socket `timeout`.
  8 a cap on connections (fast 503) and a large listen backlog.   9 `drain()`.
  10 `Server: dataproc`.   11 `log_message` goes to `logging`.   12 a failing app answers 500.
  13 a client gone mid-write is ignored.   14 `urlsplit`, `unquote`, strict `parse_qs`.
  15 duplicated headers kept (`Request.header` refuses them).   16 no reverse DNS on bind.
  17 one `sendall` per response and `TCP_NODELAY`.
"""

from __future__ import annotations

import email.utils
import logging
import re
import secrets
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from .config import Config
from .errors import ApiError
from .web import Request, Response, error_response

log = logging.getLogger("dataproc.server")
access_log = logging.getLogger("dataproc.access")

SERVER_NAME = "dataproc"
LINGER_S = 1.0  # at most this long (and LINGER_MAX_BYTES) reading a refused request's rest
LINGER_MAX_BYTES = 1 << 20
Observer = Callable[[Request, Response, float], None]

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 tchar
# The target is visible ASCII only (RFC 9112 §3.2): a raw byte >= 0x80 would otherwise be
# read as Latin-1 and reach the app as a different character than the client meant.
_REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/(\d)\.(\d)")
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class ProtocolError(Exception):
    """A request that cannot be parsed; answered with `status` and the connection closed."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class _ClientGone(Exception):
    """The client closed or went silent between requests: close without an answer."""


class Handler(BaseHTTPRequestHandler):
    """One connection: requests in a loop until close, error, timeout or drain."""

    protocol_version = "HTTP/1.1"  # sharp edge 1
    server_version = SERVER_NAME  # sharp edge 10
    sys_version = ""
    server: HttpServer

    def setup(self) -> None:
        self.timeout = self.server.config.socket_timeout_s  # sharp edge 7
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # sharp edge 17
        self._linger = False

    def finish(self) -> None:
        super().finish()
        if self._linger:
            _linger(self.connection, min(LINGER_S, self.server.config.socket_timeout_s))

    def handle(self) -> None:
        self.close_connection = True
        self.server.track(self.connection, busy=False)
        try:
            self.close_connection = False
            while not self.close_connection:
                self.handle_one_request()
        except (ConnectionError, TimeoutError, _ClientGone):
            pass  # sharp edge 13: the client went away; nothing to answer
        finally:
            self.server.untrack(self.connection)

    def handle_one_request(self) -> None:
        """Read one request, run the app, write the response in one piece."""
        config = self.server.config
        first = self._read_request_line(config)
        started = time.perf_counter()
        self.server.mark_busy(self.connection, True)
        try:
            request, response = self._serve_one(first, config)
            self._write(request, response)
            duration_s = time.perf_counter() - started
            self.server.observe(request, response, duration_s)
            _log_access(request, response, duration_s)
        finally:
            self.server.mark_busy(self.connection, False)
        if self.server.draining:
            self.close_connection = True

    def _serve_one(self, first: bytes, config: Config) -> tuple[Request, Response]:
        request = Request("-", "-", {}, {}, client=self.client_address[0])
        try:
            try:
                request = self._read_request(first, config, request)
            except TimeoutError:
                raise ProtocolError(408, "request not received in time") from None
        except ProtocolError as error:
            request.request_id = request.request_id or secrets.token_hex(8)
            response = error_response(ApiError(error.status, error.detail))
            response.close = True
            return request, response
        try:
            response = self.server.app(request)
        except Exception:  # sharp edge 12: the app is meant to catch; this is the last net
            log.exception("app raised [%s]", request.request_id)
            response = error_response(ApiError(500, "Internal Server Error"))
        return request, response

    # --- reading ---------------------------------------------------------------------------

    def _read_request_line(self, config: Config) -> bytes:
        self.connection.settimeout(config.socket_timeout_s)  # idle keep-alive wait
        line = self.rfile.readline(config.max_request_line_bytes + 1)
        if not line:
            raise _ClientGone()
        return line

    def _read_request(self, first: bytes, config: Config, request: Request) -> Request:
        deadline = time.monotonic() + config.socket_timeout_s
        method, target, version = self._parse_request_line(first, config)
        request.method = method
        headers = self._read_headers(config, deadline)
        request.headers = headers
        request.request_id = _request_id(headers)
        self._decide_keep_alive(version, headers)
        request.path, request.query = _split_target(target, config.max_query_params)
        if version == (1, 1) and len(headers.get("host", ())) != 1:
            raise ProtocolError(400, "exactly one Host header is required (RFC 9112 §3.2)")
        request.body = self._read_body(headers, config, deadline, version)
        return request

    def _parse_request_line(self, line: bytes, config: Config) -> tuple[str, str, tuple[int, int]]:
        if len(line) > config.max_request_line_bytes:
            raise ProtocolError(414, "request line too long")
        match = _REQUEST_LINE.fullmatch(line.rstrip(b"\r\n").decode("latin-1"))
        if not match:
            raise ProtocolError(400, "malformed request line")
        method, target, major, minor = match.groups()
        if (int(major), int(minor)) not in {(1, 0), (1, 1)}:
            raise ProtocolError(505, "HTTP version not supported")
        self.command, self.path, self.request_version = method, target, f"HTTP/{major}.{minor}"
        return method, target, (int(major), int(minor))

    def _read_headers(self, config: Config, deadline: float) -> dict[str, list[str]]:
        headers: dict[str, list[str]] = {}
        count = total = 0
        while True:
            self._set_deadline(deadline)
            line = self.rfile.readline(config.max_header_bytes + 1)
            total += len(line)
            if total > config.max_header_bytes:
                raise ProtocolError(431, "request headers too large")
            if line in (b"\r\n", b"\n"):
                return headers
            if not line.endswith(b"\n"):
                raise _ClientGone()  # the client closed mid-headers
            count += 1
            if count > config.max_header_count:
                raise ProtocolError(431, "too many request headers")
            name, value = _parse_header_line(line)
            headers.setdefault(name, []).append(value)

    def _decide_keep_alive(self, version: tuple[int, int], headers: dict[str, list[str]]) -> None:
        tokens = {t.strip().lower() for v in headers.get("connection", ()) for t in v.split(",")}
        if version == (1, 0):
            self.close_connection = "keep-alive" not in tokens
        else:
            self.close_connection = "close" in tokens

    def _read_body(
        self,
        headers: dict[str, list[str]],
        config: Config,
        deadline: float,
        version: tuple[int, int],
    ) -> bytes:
        if "transfer-encoding" in headers:  # sharp edge 5: refuse, never guess the framing
            raise ProtocolError(411, "Transfer-Encoding is not supported; send Content-Length")
        lengths = headers.get("content-length", [])
        if len(lengths) > 1:
            raise ProtocolError(400, "more than one Content-Length header")
        if lengths and not re.fullmatch(r"\d{1,18}", lengths[0]):
            raise ProtocolError(400, "Content-Length must be a decimal number")
        length = int(lengths[0]) if lengths else 0
        if length > config.max_body_bytes:
            raise ProtocolError(413, f"request body over {config.max_body_bytes} bytes")
        self._answer_expect(headers, version)
        if not length:
            return b""
        self._set_deadline(deadline)
        body = self.rfile.read(length)
        if len(body) != length:
            raise _ClientGone()
        return body

    def _answer_expect(self, headers: dict[str, list[str]], version: tuple[int, int]) -> None:
        # Sharp edge 6: the stdlib says "100 Continue" before any check; we say it after them.
        expect = headers.get("expect")
        if not expect:
            return
        if [v.lower() for v in expect] != ["100-continue"]:
            raise ProtocolError(417, "only Expect: 100-continue is supported")
        if version == (1, 1):
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _set_deadline(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError(408, "request not received in time")
        self.connection.settimeout(remaining)

    # --- writing ---------------------------------------------------------------------------

    def _write(self, request: Request, response: Response) -> None:
        if response.close or self.server.draining:  # say so when the server will close
            self.close_connection = True
        if response.close:  # refused mid-request: the client may still be sending
            self._linger = True
        head_only = request.method == "HEAD"  # sharp edge 4: GET's headers, no body
        data = self._render(response, request.request_id) + (b"" if head_only else response.body)
        self.wfile.write(data)  # sharp edge 17: one write (wfile is unbuffered: one sendall)

    def _render(self, response: Response, request_id: str) -> bytes:
        status = response.status
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
            f"Server: {SERVER_NAME}",
            f"Date: {_http_date()}",
            f"Content-Length: {len(response.body)}",
            "X-Content-Type-Options: nosniff",
            f"X-Request-ID: {request_id}",
        ]
        for name, value in response.headers.items():
            lines.append(f"{name}: {_BAD_VALUE_CHARS.sub(' ', value)}")
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Sharp edge 2: any stdlib path that still calls this gets JSON, not HTML."""
        self.close_connection = True
        request = Request(self.command or "-", "-", {}, {}, request_id=secrets.token_hex(8))
        self._write(request, error_response(ApiError(code, message or _REASONS.get(code, "Error"))))

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        """Sharp edge 11: the stdlib's own messages go to `logging`, not stderr."""
        log.debug("%s " + format, self.client_address[0], *args)


def _log_access(request: Request, response: Response, duration_s: float) -> None:
    """One line per request; the route template, never the query string (it may hold secrets)."""
    route = request.route or "-"
    access_log.info(
        "%s %s %s %d %.1fms %dB",
        request.request_id,
        request.method,
        route,
        response.status,
        duration_s * 1000,
        len(response.body),
        extra={
            "request_id": request.request_id,
            "method": request.method,
            "route": route,
            "status": response.status,
            "duration_ms": round(duration_s * 1000, 3),
            "bytes": len(response.body),
            "client": request.client,
        },
    )


def _parse_header_line(line: bytes) -> tuple[str, str]:
    text = line.rstrip(b"\r\n").decode("latin-1")
    if text[:1] in (" ", "\t"):
        raise ProtocolError(400, "obsolete header line folding is not accepted")
    name, sep, value = text.partition(":")
    if not sep or not _TOKEN.fullmatch(name):
        raise ProtocolError(400, "malformed header line")
    value = value.strip(" \t")
    if _BAD_VALUE_CHARS.search(value):
        raise ProtocolError(400, f"control character in header {name}")
    return name.lower(), value


def _split_target(target: str, max_params: int) -> tuple[str, dict[str, list[str]]]:
    """Sharp edge 14: the raw target split into an unquoted path and strictly parsed query."""
    if not target.startswith("/"):
        raise ProtocolError(400, "request target must be an absolute path")
    parts = urlsplit(target)
    try:
        path = unquote(parts.path, errors="strict")
        query = (
            parse_qs(
                parts.query,
                keep_blank_values=True,
                strict_parsing=bool(parts.query),
                max_num_fields=max_params,
                errors="strict",
            )
            if parts.query
            else {}
        )
    except UnicodeDecodeError:
        raise ProtocolError(400, "request target is not valid UTF-8") from None
    except ValueError as error:
        detail = (
            "too many query parameters" if "Max number" in str(error) else "malformed query string"
        )
        raise ProtocolError(400, detail) from None
    return path, query


def _request_id(headers: dict[str, list[str]]) -> str:
    """The client's X-Request-ID when it sent exactly one sane value, else a fresh one."""
    given = headers.get("x-request-id")
    if given and len(given) == 1 and _SANE_REQUEST_ID.fullmatch(given[0]):
        return given[0]
    return secrets.token_hex(8)


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The `Date` header, formatted once per second (RFC 9110 §6.6.1)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: dataproc\r\n"
    b"Content-Type: application/json\r\nContent-Length: 45\r\nRetry-After: 1\r\n"
    b"X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
    b'{"detail":"server busy, retry in one second"}'
)


class HttpServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once, drained gracefully."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        config: Config,
        app: Callable[[Request], Response],
        *,
        observe: Observer | None = None,
        sock: socket.socket | None = None,
    ):
        self.config, self.app = config, app
        self.request_queue_size = config.listen_backlog  # sharp edge 8: the stdlib says 5
        self._observe = observe
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, bool] = {}  # socket -> busy
        self._idle_event = threading.Event()
        self.draining = False
        super().__init__((config.host, config.port), Handler, bind_and_activate=sock is None)
        if sock is not None:  # a pre-forked worker inherits the parent's listening socket
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()

    def server_bind(self) -> None:
        """Sharp edge 16: bind without the stdlib's reverse DNS lookup (`getfqdn`)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self.server_address[1]

    def process_request(self, request, client_address) -> None:  # type: ignore[override]
        """Start a connection thread, or answer a fast 503 when every slot is taken."""
        if self.draining or not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[override]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(0.5)
            sock.sendall(_OVERLOADED)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            self.shutdown_request(sock)

    # --- connection tracking, for a drain that lets in-flight requests finish --------------

    def track(self, sock: socket.socket, *, busy: bool) -> None:
        with self._lock:
            self._connections[sock] = busy

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.pop(sock, None)
            if not any(self._connections.values()):
                self._idle_event.set()

    def mark_busy(self, sock: socket.socket, busy: bool) -> None:
        with self._lock:
            self._connections[sock] = busy
            if busy:
                self._idle_event.clear()
            elif not any(self._connections.values()):
                self._idle_event.set()
            if self.draining and not busy:
                _shut(sock)

    def observe(self, request: Request, response: Response, duration_s: float) -> None:
        if self._observe is not None:
            self._observe(request, response, duration_s)

    def drain(self, grace_s: float) -> bool:
        """Stop accepting, close idle connections, wait up to `grace_s` for busy ones."""
        self.draining = True
        self.shutdown()  # returns once serve_forever has left its loop (call from another thread)
        # Close the listening socket now, not after the wait: a new connection is refused at
        # once (a load balancer moves on) instead of sitting unanswered in the backlog.
        self.server_close()
        with self._lock:
            idle = [sock for sock, busy in self._connections.items() if not busy]
        for sock in idle:
            _shut(sock)
        return self._idle_event.wait(grace_s) if self._busy_count() else True

    def _busy_count(self) -> int:
        with self._lock:
            return sum(self._connections.values())


def _linger(sock: socket.socket, limit_s: float) -> None:
    """Lingering close (RFC 9112 §9.6): after an early answer (413, 414, 431, 400...), stop
    writing and read what the client is still sending, within bounds, before closing. Closing
    with unread input makes the kernel send a reset, which can destroy the answer before the
    client reads it: the client would see a dropped connection instead of the 413."""
    deadline, drained = time.monotonic() + limit_s, 0
    try:
        sock.shutdown(socket.SHUT_WR)
        while drained < LINGER_MAX_BYTES and (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                return
            drained += len(chunk)
    except OSError:
        pass


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
