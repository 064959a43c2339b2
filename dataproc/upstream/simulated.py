"""The simulated upstream: what ``python -m dataproc source`` runs.

It owns a small HTTP server that answers every GET with one document shaped like the
original service's upstream::

    {"time": 1713798477, "value": [157, 42, 76, 190], "tags": []}

(current Unix seconds, four random bytes that never decode to NaN/Infinity as a
little-endian float32, tags drawn mostly from ``[]``), and that misbehaves on purpose when
asked to by the request PATH, so a test can point the service's upstream URL at a fault:

==============================  =============================================================
``/`` (and any unknown path)    a normal random document
``/slow?delay=S``               sleeps S seconds (default 2, capped at 60), then a document
``/garbage``                    200 with bytes that are not JSON
``/html``                       200 ``text/html`` "502 Bad Gateway" page, as a proxy would send
``/huge?bytes=N``               200 with a JSON document of exactly N bytes (default 70000)
``/status/CODE``                status CODE (400..599) with ``{"detail": "simulated failure"}``
``/drop``                       promises 1000 body bytes, sends 10, closes the connection
``/reset``                      resets the connection (TCP RST) without any answer
``/fixed?doc=TEXT``             exactly TEXT as the body (no ``doc``: the README's document)
``/nonfinite?kind=K``           a document whose value decodes to NaN, +Inf or -Inf
``/old?age=S``                  a document whose time is now - S seconds (default 7200)
``/sequence?start=T``           the k-th request served here gets time T + k (default now - 60)
==============================  =============================================================

Any other method (POST, HEAD, ...) gets 405 with a JSON body. A bad query parameter gets 400
with a JSON body, so a typo in a test's URL fails loudly instead of serving a normal document.

It leaves to others: parsing and judging documents (``upstream/document.py``, ``ingest.py``)
and the command line as a whole (``__main__.py`` configures logging and calls :func:`main`).
It imports nothing from ``dataproc`` so it can run, or be lifted out, on its own; nothing on
a request path imports it (only the command line and zero configuration start it).
"""

import argparse
import contextlib
import json
import logging
import math
import random
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_PORT = 28462

# The example document from the original service's README; /fixed answers it by default.
FIXED_DOCUMENT = b'{"time": 1713798477, "value": [157, 42, 76, 190], "tags": []}'

# Tag sets the original upstream sends, with weights: most readings carry no tags.
TAG_CHOICES: tuple[tuple[str, ...], ...] = (
    (),
    ("system",),
    ("suspect",),
    ("calibrated",),
    ("maintenance",),
    ("system", "suspect"),
)
TAG_WEIGHTS: tuple[int, ...] = (6, 1, 1, 1, 1, 1)

# Little-endian float32 byte patterns: exponent all ones (0xFF) is NaN or an infinity.
NONFINITE_VALUES: dict[str, tuple[int, int, int, int]] = {
    "nan": (0, 0, 192, 127),
    "inf": (0, 0, 128, 127),
    "-inf": (0, 0, 128, 255),
}

GARBAGE_BODY = b"\x00\xffnot json{"
HTML_BODY = b"<html><body>502 Bad Gateway</body></html>"
DROP_PROMISED_BYTES = 1000
DROP_SENT_BODY = b'{"time": 1'  # 10 bytes: looks like the start of a document

DEFAULT_DELAY_S = 2.0
MAX_DELAY_S = 60.0
DEFAULT_HUGE_BYTES = 70_000
MIN_HUGE_BYTES = 100  # room for the document around the padding
MAX_HUGE_BYTES = 16 * 1024 * 1024  # the body is built in memory; keep one request affordable
DEFAULT_AGE_S = 7200
SEQUENCE_LEAD_S = 60
MAX_ABS_SECONDS = 10**11  # far beyond any real timestamp, small enough to stay an ordinary int

JSON_TYPE = "application/json"
_INT_RE = re.compile(r"-?[0-9]{1,15}")  # int() alone would accept "+5", " 5", "5_0", "٥"
_MAX_QUERY_FIELDS = 20
_MAX_DRAIN_BYTES = 1024 * 1024

logger = logging.getLogger("dataproc.upstream.simulated")


# --- documents (pure: no sockets, no clock) -------------------------------------------------


def random_value(rng: random.Random) -> list[int]:
    """Four random bytes that decode (little-endian float32) to a finite number."""
    while True:
        value = [rng.randrange(256) for _ in range(4)]
        # Exponent bits all ones means NaN/Inf: high 7 bits in byte 3, low bit in byte 2.
        if not (value[3] & 0x7F == 0x7F and value[2] & 0x80):
            return value


def random_tags(rng: random.Random) -> list[str]:
    """A tag list drawn like the original upstream's (mostly empty)."""
    return list(rng.choices(TAG_CHOICES, weights=TAG_WEIGHTS)[0])


def random_document(rng: random.Random, now: int) -> dict:
    """A normal upstream document with time ``now`` and random value and tags."""
    return {"time": now, "value": random_value(rng), "tags": random_tags(rng)}


def huge_document(now: int, size: int) -> bytes:
    """A valid JSON document padded to exactly ``size`` bytes (size >= MIN_HUGE_BYTES)."""
    head = b'{"time": %d, "value": [1, 2, 3, 4], "tags": [], "pad": "' % now
    tail = b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj).encode("utf-8")


def _detail(message: str) -> bytes:
    return _json_bytes({"detail": message})


def _now() -> int:
    return int(time.time())


# --- query parameters -----------------------------------------------------------------------

Query = dict[str, list[str]]  # parse_qs's shape: name -> values in order


class _BadRequest(Exception):
    """A query parameter the simulated upstream cannot honour; answered with 400."""


def _parse_query(query: str) -> Query:
    # surrogateescape keeps undecodable %XX bytes, so /fixed can echo invalid UTF-8 exactly.
    try:
        return parse_qs(
            query,
            keep_blank_values=True,
            encoding="utf-8",
            errors="surrogateescape",
            max_num_fields=_MAX_QUERY_FIELDS,
        )
    except ValueError as exc:
        raise _BadRequest(f"bad query string: {exc}") from None


def _param(query: Query, name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _int_param(query: Query, name: str, default: int, lo: int, hi: int) -> int:
    text = _param(query, name)
    if text is None:
        return default
    if not _INT_RE.fullmatch(text) or not lo <= int(text) <= hi:
        raise _BadRequest(f"{name} must be an integer in {lo}..{hi}")
    return int(text)


def _delay_param(query: Query) -> float:
    text = _param(query, "delay")
    if text is None:
        return DEFAULT_DELAY_S
    try:
        delay = float(text)
    except ValueError:
        delay = math.nan
    if not math.isfinite(delay) or delay < 0:
        raise _BadRequest("delay must be a number of seconds >= 0")
    return min(delay, MAX_DELAY_S)


# --- the fault modes: one function per path, each answers through the handler ---------------


def _answer_document(h: "_Handler", query: Query, rest: str) -> None:
    h.respond(200, _json_bytes(h.server.random_document(_now())))


def _answer_slow(h: "_Handler", query: Query, rest: str) -> None:
    time.sleep(_delay_param(query))
    _answer_document(h, query, rest)


def _answer_garbage(h: "_Handler", query: Query, rest: str) -> None:
    h.respond(200, GARBAGE_BODY)


def _answer_html(h: "_Handler", query: Query, rest: str) -> None:
    h.respond(200, HTML_BODY, content_type="text/html; charset=utf-8")


def _answer_huge(h: "_Handler", query: Query, rest: str) -> None:
    size = _int_param(query, "bytes", DEFAULT_HUGE_BYTES, MIN_HUGE_BYTES, MAX_HUGE_BYTES)
    h.respond(200, huge_document(_now(), size))


def _answer_status(h: "_Handler", query: Query, rest: str) -> None:
    if not (_INT_RE.fullmatch(rest) and 400 <= int(rest) <= 599):
        raise _BadRequest("use /status/CODE with CODE in 400..599")
    h.respond(int(rest), _detail("simulated failure"))


def _answer_drop(h: "_Handler", query: Query, rest: str) -> None:
    # Headers promise more than we send; closing (with FIN, not RST, so the client surely
    # sees the 10 bytes first) leaves the client with a short body: IncompleteRead.
    h.close_connection = True
    head = h.head_bytes(200, JSON_TYPE, DROP_PROMISED_BYTES)
    h.wfile.write(head + DROP_SENT_BODY)
    h.log_request(200)


def _answer_reset(h: "_Handler", query: Query, rest: str) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN: a real reset.
    # The descriptor closes once the handler drops its file objects, before any shutdown().
    h.close_connection = True
    h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    h.connection.close()
    h.log_message('"%s" reset without an answer', h.requestline)


def _answer_fixed(h: "_Handler", query: Query, rest: str) -> None:
    doc = _param(query, "doc")
    body = FIXED_DOCUMENT if doc is None else doc.encode("utf-8", "surrogateescape")
    h.respond(200, body)


def _answer_nonfinite(h: "_Handler", query: Query, rest: str) -> None:
    kind = _param(query, "kind") or "nan"
    if kind not in NONFINITE_VALUES:
        raise _BadRequest("kind must be one of: " + ", ".join(NONFINITE_VALUES))
    doc = {"time": _now(), "value": list(NONFINITE_VALUES[kind]), "tags": []}
    h.respond(200, _json_bytes(doc))


def _answer_old(h: "_Handler", query: Query, rest: str) -> None:
    # A negative age gives a time in the future, which is a fault worth simulating too.
    age = _int_param(query, "age", DEFAULT_AGE_S, -MAX_ABS_SECONDS, MAX_ABS_SECONDS)
    h.respond(200, _json_bytes(h.server.random_document(_now() - age)))


def _answer_sequence(h: "_Handler", query: Query, rest: str) -> None:
    start = _int_param(query, "start", _now() - SEQUENCE_LEAD_S, 0, MAX_ABS_SECONDS)
    when = start + h.server.next_sequence()
    h.respond(200, _json_bytes(h.server.random_document(when)))


# First path segment → answer; the rest of the path is passed along (only /status uses it).
_ROUTES: dict[str, Callable[["_Handler", Query, str], None]] = {
    "slow": _answer_slow,
    "garbage": _answer_garbage,
    "html": _answer_html,
    "huge": _answer_huge,
    "status": _answer_status,
    "drop": _answer_drop,
    "reset": _answer_reset,
    "fixed": _answer_fixed,
    "nonfinite": _answer_nonfinite,
    "old": _answer_old,
    "sequence": _answer_sequence,
}


# --- HTTP plumbing ----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Turns one request into one of the answers above, written in a single send."""

    protocol_version = "HTTP/1.1"  # keep-alive; so every answer carries Content-Length
    server_version = "dataproc-source"
    sys_version = ""  # the Server header names the service, not the Python version
    timeout = 30  # a silent client cannot hold a thread forever
    server: "SimulatedUpstream"

    def setup(self) -> None:
        super().setup()
        # Nagle + the client's delayed ACK would add ~40 ms to every kept-alive answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # The client left (or stalled) mid-exchange; there is nobody to tell.
            self.close_connection = True

    def version_string(self) -> str:
        return self.server_version  # the stdlib would append " " + sys_version

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch(self._route)

    def _not_allowed(self) -> None:
        self._dispatch(
            lambda: self.respond(405, _detail("method not allowed"), headers=[("Allow", "GET")])
        )

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_allowed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer the stdlib's own errors (bad request line, 414, 431, 501) as JSON."""
        self.close_connection = True  # after a malformed request the stream is untrustworthy
        self.respond(code, _detail(message or self._phrase(code)))

    def respond(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = JSON_TYPE,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        """Write status line, headers and body in one send (no body for HEAD)."""
        head = self.head_bytes(status, content_type, len(body), headers or [])
        self.wfile.write(head if self.command == "HEAD" else head + body)
        self.log_request(status)

    def head_bytes(
        self,
        status: int,
        content_type: str,
        length: int,
        headers: list[tuple[str, str]] | None = None,
    ) -> bytes:
        """The status line and headers, ending with the blank line."""
        lines = [
            f"HTTP/1.1 {status} {self._phrase(status)}",
            f"Server: {self.version_string()}",
            f"Date: {self.date_time_string()}",
            f"Content-Type: {content_type}",
            f"Content-Length: {length}",
            *(f"{name}: {value}" for name, value in headers or []),
        ]
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _phrase(self, status: int) -> str:
        return self.responses.get(status, ("Simulated",))[0]

    def _dispatch(self, action: Callable[[], None]) -> None:
        self.server.count_request()
        self._drain_body()
        try:
            action()
        except _BadRequest as exc:
            self.respond(400, _detail(str(exc)))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            raise  # handled quietly in handle()
        except Exception:
            # Without this the stdlib drops the connection and prints to stderr.
            logger.exception("simulated upstream failed on %r", self.path)
            self.close_connection = True
            self.respond(500, _detail("internal error"))

    def _drain_body(self) -> None:
        # Keep-alive needs the request body consumed; if it cannot be, close after answering.
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
        elif length is not None:
            if re.fullmatch(r"[0-9]{1,9}", length) and int(length) <= _MAX_DRAIN_BYTES:
                self.rfile.read(int(length))
            else:
                self.close_connection = True

    def _route(self) -> None:
        target = urlsplit(self.path)
        first, _, rest = unquote(target.path).lstrip("/").partition("/")
        answer = _ROUTES.get(first, _answer_document)
        answer(self, _parse_query(target.query), rest)


class SimulatedUpstream(ThreadingHTTPServer):
    """The simulated upstream server: a seeded random source and request counters."""

    daemon_threads = True  # a /slow answer in flight must not keep the process alive
    allow_reuse_address = True  # restart at once on the same port (TIME_WAIT)
    request_queue_size = 128  # the stdlib's 5 refuses connections under a benchmark's burst

    def __init__(self, address: tuple[str, int], *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()  # Random is not safe to share between threads
        self._count_lock = threading.Lock()
        self._served = 0
        self._sequence = 0
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(): a reverse DNS lookup that can stall
        # for seconds in containers. The bare bind is all we need.
        socketserver.TCPServer.server_bind(self)
        host, port = _host_port(self)
        self.server_name = host
        self.server_port = port

    def handle_error(self, request: object, client_address: object) -> None:
        logger.exception("simulated upstream: error serving %s", client_address)

    @property
    def requests_served(self) -> int:
        """How many requests this server has dispatched (including faults and 405s)."""
        with self._count_lock:
            return self._served

    def count_request(self) -> None:
        """Count one dispatched request."""
        with self._count_lock:
            self._served += 1

    def next_sequence(self) -> int:
        """0 for the first /sequence request served, then 1, 2, ..."""
        with self._count_lock:
            k = self._sequence
            self._sequence += 1
            return k

    def random_document(self, now: int) -> dict:
        """A random document from this server's (seeded) generator."""
        with self._rng_lock:
            return random_document(self._rng, now)


class _SimulatedUpstream6(SimulatedUpstream):
    address_family = socket.AF_INET6


# --- starting and running ---------------------------------------------------------------------


def make_server(
    host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, seed: int | None = None
) -> SimulatedUpstream:
    """A bound, listening simulated upstream (port 0: ephemeral), not yet serving."""
    cls = _SimulatedUpstream6 if ":" in host else SimulatedUpstream
    return cls((host, port), seed=seed)


def _host_port(server: socketserver.BaseServer) -> tuple[str, int]:
    """The bound host and port: an AF_INET address is (host, port), AF_INET6 adds two more."""
    address = cast(tuple[str, int], server.server_address)  # typeshed allows any address type
    return address[0], address[1]


def base_url(server: SimulatedUpstream, host: str | None = None) -> str:
    """The http://HOST:PORT/ URL a client uses to reach ``server``."""
    bound_host, port = _host_port(server)
    host = host or bound_host
    # A wildcard address is not a place to connect to; loopback reaches it.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def start_in_thread(
    host: str = "127.0.0.1", port: int = 0, *, seed: int | None = None
) -> tuple[SimulatedUpstream, str]:
    """Serve in a daemon thread; returns (server, base URL). Stop: shutdown(), server_close()."""
    server = make_server(host, port, seed=seed)
    # A short poll interval keeps shutdown() (and so every test fixture) quick.
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="dataproc-upstream-simulated",
        daemon=True,
    )
    thread.start()
    return server, base_url(server)


class _Terminate(Exception):
    """Raised in the main thread by the SIGTERM handler to leave serve_forever()."""


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    # Signal handlers can only be installed from the main thread; elsewhere Ctrl-C is moot.
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise _Terminate()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _port(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or int(text) > 65535:
        raise argparse.ArgumentTypeError("must be a port number 0..65535")
    return int(text)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dataproc source",
        description="Run the simulated upstream: one JSON document per GET, faults by path.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help=f"listen port ({DEFAULT_PORT}; 0 picks a free one)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible documents")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the simulated upstream until SIGINT/SIGTERM; 0 when stopped, 2 if it cannot listen."""
    args = _parse_args(argv)
    try:
        server = make_server(args.host, args.port, seed=args.seed)
    except OSError as exc:  # address in use, not ours, unknown host: expected, no traceback
        reason = exc.strerror or str(exc)
        print(
            f"dataproc source: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr
        )
        return 2
    shown = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("simulated upstream listening on http://%s:%d/", shown, _host_port(server)[1])
    with _sigterm_stops():
        try:
            server.serve_forever()
        except (KeyboardInterrupt, _Terminate):
            logger.info("simulated upstream stopping")
        finally:
            server.server_close()
    return 0


if __name__ == "__main__":
    # Run directly (python -m dataproc.upstream.simulated) there is no CLI to configure logging.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(main())
