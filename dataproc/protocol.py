"""Pure HTTP/1.1: a request head parsed from bytes, a response rendered to bytes. No sockets.

Owns: the request-line and header grammar and every limit on them (RFC 9112 §2-§6), the body
framing rules we accept (`Content-Length` only), `Expect`, keep-alive, the response head
(`Content-Length` always computed here, never written by hand), chunked framing for streams
(RFC 9112 §7.1), gzip negotiation and encoding (RFC 9110 §12.5.3, §8.4), and `If-None-Match`
matching (RFC 9110 §13.1.2). Leaves every socket, thread and timeout to `server.py`.
"""

from __future__ import annotations

import email.utils
import random
import re
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

from .config import Config

SERVER_NAME = "dataproc"
GZIP_MIN_BYTES = 1024  # API.md: bodies over 1 KiB
GZIP_LEVEL = 1  # JSON pages still shrink ~4.7x; level 6 gains ~7 % size for ~2x the CPU
LAST_CHUNK = b"0\r\n\r\n"
_COMPRESSIBLE = {"application/json", "text/csv", "application/x-ndjson", "text/html"}
_NO_BODY_STATUSES = {204, 304}  # RFC 9110 §6.4.1: never a body, never a Content-Length

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 tchar
# The target is visible ASCII only (RFC 9112 §3.2): a raw byte >= 0x80 would otherwise be
# read as Latin-1 and reach the app as a different character than the client meant.
_REQUEST_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP/(\d)\.(\d)")
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HEAD_END = re.compile(rb"\n\r?\n")
_ENTITY_TAG = re.compile(r'\s*(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
_REASONS = {status.value: status.phrase for status in HTTPStatus}


class ProtocolError(Exception):
    """A request that cannot be parsed; answered with `status` and the connection closed."""

    def __init__(self, status: int, detail: str, request_id: str = ""):
        super().__init__(detail)
        self.status, self.detail, self.request_id = status, detail, request_id


class Incomplete(Exception):
    """The bytes end before the request head does (the server waits, times out or gives up)."""


@dataclass(slots=True)
class RequestHead:
    """A parsed request line and header block; header names lower-case, every value kept."""

    method: str
    target: str
    version: tuple[int, int]
    headers: dict[str, list[str]]
    path: str
    query: dict[str, list[str]]
    request_id: str
    keep_alive: bool
    content_length: int
    expect_continue: bool


# --- requests ---------------------------------------------------------------------------


def head_end(buffer: bytes | bytearray) -> int:
    """The index just past the blank line that ends the head in `buffer`, or -1."""
    match = _HEAD_END.search(buffer)
    return match.end() if match else -1


def head_too_long(buffer: bytes | bytearray, config: Config) -> bool:
    """True when `buffer`, with no end of head yet, already breaks a size limit (414/431)."""
    line_end = buffer.find(b"\n")
    if line_end < 0:
        return len(buffer) > config.max_request_line_bytes
    return len(buffer) - line_end - 1 > config.max_header_bytes


def parse_head(data: bytes | bytearray, config: Config) -> RequestHead:
    """Parse a request head (the bytes up to and including its blank line) or raise
    `ProtocolError`; bytes that stop before the blank line raise `Incomplete` unless they
    already break a limit (then the limit's `ProtocolError`)."""
    lines = bytes(data).split(b"\n")
    method, target, version = _request_line(lines[0] + b"\n", config, len(lines) > 1)
    headers = _headers(lines[1:], config)
    request_id = request_id_from(headers)
    try:
        path, query = split_target(target, config.max_query_params)
        if version == (1, 1) and len(headers.get("host", ())) != 1:
            raise ProtocolError(400, "exactly one Host header is required (RFC 9112 §3.2)")
        length = _content_length(headers, config)
        expect = _expect_continue(headers, version)
    except ProtocolError as error:
        error.request_id = request_id  # the answer carries the client's id
        raise
    return RequestHead(
        method,
        target,
        version,
        headers,
        path,
        query,
        request_id,
        _keep_alive(version, headers),
        length,
        expect,
    )


def _request_line(line: bytes, config: Config, complete: bool) -> tuple[str, str, tuple[int, int]]:
    if len(line) - (0 if complete else 1) > config.max_request_line_bytes:
        raise ProtocolError(414, "request line too long")
    if not complete:
        raise Incomplete()
    match = _REQUEST_LINE.fullmatch(line.rstrip(b"\r\n").decode("latin-1"))
    if not match:
        raise ProtocolError(400, "malformed request line")
    method, target, major, minor = match.groups()
    if (int(major), int(minor)) not in {(1, 0), (1, 1)}:
        raise ProtocolError(505, "HTTP version not supported")
    return method, target, (int(major), int(minor))


def _headers(lines: list[bytes], config: Config) -> dict[str, list[str]]:
    """The header lines in order; each limit is checked line by line, as they arrive."""
    headers: dict[str, list[str]] = {}
    total = count = 0
    for index, line in enumerate(lines):
        last = index == len(lines) - 1  # no "\n" after it: an unfinished line
        total += len(line) + (0 if last else 1)
        if total > config.max_header_bytes:
            raise ProtocolError(431, "request headers too large")
        if last:
            raise Incomplete()
        if line in (b"", b"\r"):
            return headers
        count += 1
        if count > config.max_header_count:
            raise ProtocolError(431, "too many request headers")
        name, value = _header_line(line)
        headers.setdefault(name, []).append(value)
    raise Incomplete()  # pragma: no cover - split() always leaves a last element


def _header_line(line: bytes) -> tuple[str, str]:
    text = line.rstrip(b"\r").decode("latin-1")
    if text[:1] in (" ", "\t"):
        raise ProtocolError(400, "obsolete header line folding is not accepted")
    name, sep, value = text.partition(":")
    if not sep or not _TOKEN.fullmatch(name):
        raise ProtocolError(400, "malformed header line")
    value = value.strip(" \t")
    if _BAD_VALUE_CHARS.search(value):
        raise ProtocolError(400, f"control character in header {name}")
    return name.lower(), value


def _keep_alive(version: tuple[int, int], headers: dict[str, list[str]]) -> bool:
    tokens = {t.strip().lower() for v in headers.get("connection", ()) for t in v.split(",")}
    if version == (1, 0):
        return "keep-alive" in tokens
    return "close" not in tokens


def _content_length(headers: dict[str, list[str]], config: Config) -> int:
    """Sharp edge 5: one `Content-Length` of digits, capped; `Transfer-Encoding` refused."""
    if "transfer-encoding" in headers:  # refuse, never guess the framing (smuggling)
        raise ProtocolError(411, "Transfer-Encoding is not supported; send Content-Length")
    lengths = headers.get("content-length", [])
    if len(lengths) > 1:
        raise ProtocolError(400, "more than one Content-Length header")
    if lengths and not re.fullmatch(r"\d{1,18}", lengths[0]):
        raise ProtocolError(400, "Content-Length must be a decimal number")
    length = int(lengths[0]) if lengths else 0
    if length > config.max_body_bytes:
        raise ProtocolError(413, f"request body over {config.max_body_bytes} bytes")
    return length


def _expect_continue(headers: dict[str, list[str]], version: tuple[int, int]) -> bool:
    """Sharp edge 6: True when a `100 Continue` is owed, decided after every other check."""
    expect = headers.get("expect")
    if not expect:
        return False
    if [v.lower() for v in expect] != ["100-continue"]:
        raise ProtocolError(417, "only Expect: 100-continue is supported")
    return version == (1, 1)


def split_target(target: str, max_params: int) -> tuple[str, dict[str, list[str]]]:
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
                strict_parsing=True,
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


def request_id_from(headers: dict[str, list[str]]) -> str:
    """The client's X-Request-ID when it sent exactly one sane value, else a fresh one."""
    given = headers.get("x-request-id")
    if given and len(given) == 1 and _SANE_REQUEST_ID.fullmatch(given[0]):
        return given[0]
    return new_request_id()


def new_request_id() -> str:
    """A fresh request id: 16 hex digits. An id names a request in the logs, it guards
    nothing, so it comes from the process's PRNG (seeded from os.urandom, and reseeded in
    each forked child by the `random` module itself), not from a system call per request."""
    return f"{random.getrandbits(64):016x}"


# --- responses --------------------------------------------------------------------------

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def render_head(
    status: int,
    headers: dict[str, str],
    request_id: str,
    *,
    length: int | None,
    close: bool,
    version: tuple[int, int] = (1, 1),
) -> bytes:
    """Status line and headers. `length` None means a streamed body: chunked on HTTP/1.1,
    ended by the close on HTTP/1.0 (the caller passes `close=True` then)."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Server: {SERVER_NAME}",
        f"Date: {http_date()}",
    ]
    if status in _NO_BODY_STATUSES:
        pass
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    elif version >= (1, 1):
        lines.append("Transfer-Encoding: chunked")
    lines += ["X-Content-Type-Options: nosniff", f"X-Request-ID: {request_id}"]
    for name, value in headers.items():
        lines.append(f"{name}: {_BAD_VALUE_CHARS.sub(' ', value)}")
    if close:
        lines.append("Connection: close")
    elif version == (1, 0):
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def render(
    status: int,
    headers: dict[str, str],
    body: bytes,
    request_id: str,
    *,
    close: bool,
    version: tuple[int, int] = (1, 1),
    head_only: bool = False,
) -> bytes:
    """A whole response in one buffer (sharp edge 17: one write); HEAD gets the head only."""
    if status in _NO_BODY_STATUSES:
        body = b""
    head = render_head(status, headers, request_id, length=len(body), close=close, version=version)
    return head if head_only else head + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1); never empty (that is the last chunk)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def reason(status: int) -> str:
    """The standard reason phrase of a status code."""
    return _REASONS.get(status, "Error")


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The `Date` header, formatted once per second (RFC 9110 §6.6.1)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


# --- gzip -------------------------------------------------------------------------------


def accepts_gzip(values: list[str]) -> bool:
    """True when `Accept-Encoding` allows gzip (RFC 9110 §12.5.3): `gzip` (or `x-gzip`) with
    q > 0, or else `*` with q > 0; `gzip;q=0` refuses even where `*` would allow it."""
    gzip_q: float | None = None
    star_q: float | None = None
    for item in ",".join(values).split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        q = _qvalue(params)
        if coding in ("gzip", "x-gzip"):
            gzip_q = q if gzip_q is None else max(gzip_q, q)
        elif coding == "*":
            star_q = q
    if gzip_q is not None:
        return gzip_q > 0
    return star_q is not None and star_q > 0


def _qvalue(params: str) -> float:
    """The `q` weight of one list member: 1 when absent, 0 when malformed (refuse, not guess)."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            value = value.strip()
            if not re.fullmatch(r"0(\.\d{0,3})?|1(\.0{0,3})?", value):
                return 0.0
            return float(value)
    return 1.0


def compressible(headers: dict[str, str]) -> bool:
    """True for the media types API.md compresses, when no encoding is set already."""
    if any(name.lower() == "content-encoding" for name in headers):
        return False
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    return content_type.split(";")[0].strip().lower() in _COMPRESSIBLE


def add_vary(headers: dict[str, str], token: str) -> dict[str, str]:
    """`headers` with `token` in `Vary`, merged into an existing `Vary` (any spelling)."""
    result = dict(headers)
    name = next((k for k in result if k.lower() == "vary"), "Vary")
    present = [t.strip() for t in result.get(name, "").split(",") if t.strip()]
    if token.lower() not in {t.lower() for t in present} and "*" not in present:
        present.append(token)
    result[name] = ", ".join(present)
    return result


def negotiate_gzip(
    accept_encoding: list[str], status: int, headers: dict[str, str], length: int | None
) -> tuple[dict[str, str], bool]:
    """The headers to send and whether to gzip, for a response of `length` body bytes (None:
    a stream). Only API.md's media types over `GZIP_MIN_BYTES`, never a 1xx, 204 or 304; a
    response that could be compressed says `Vary: Accept-Encoding` either way (RFC 9110
    §12.5.5), so a cache keeps the variants apart. `headers` itself when nothing changes."""
    if status < 200 or status in _NO_BODY_STATUSES or not compressible(headers):
        return headers, False
    if length is not None and length <= GZIP_MIN_BYTES:
        return headers, False
    if accepts_gzip(accept_encoding):
        return gzip_headers(headers), True
    return add_vary(headers, "Accept-Encoding"), False


def gzip_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers of a gzip-encoded variant."""
    return {**add_vary(headers, "Accept-Encoding"), "Content-Encoding": "gzip"}


class CompressedBodies:
    """The gzip encodings of bodies compressed lately, keyed by the body's bytes: an answer
    served again from the read cache is the same `bytes` object (its hash is kept by Python),
    so it is not compressed again, which cost more than the rest of such a request. Bounded
    in bytes (bodies and encodings counted), least recently used out first."""

    def __init__(self, max_bytes: int = 4 << 20, max_body_bytes: int = 256 << 10) -> None:
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes, self._max, self._max_body = 0, max_bytes, max_body_bytes
        self._lock = threading.Lock()

    def gzip(self, body: bytes) -> bytes:
        """`body` gzip-encoded, from memory when it was lately."""
        with self._lock:
            encoded = self._entries.get(body)
            if encoded is not None:
                self._entries.move_to_end(body)
                return encoded
        encoder = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        encoded = encoder.compress(body) + encoder.flush()
        if len(body) <= self._max_body:
            self._keep(body, encoded)
        return encoded

    def _keep(self, body: bytes, encoded: bytes) -> None:
        with self._lock:
            if body in self._entries:
                return
            self._entries[body] = encoded
            self._bytes += len(body) + len(encoded)
            while self._bytes > self._max:
                old, old_encoded = self._entries.popitem(last=False)
                self._bytes -= len(old) + len(old_encoded)


COMPRESSED = CompressedBodies()


def gzip_body(body: bytes) -> bytes:
    """A whole body gzip-encoded (RFC 1952)."""
    return COMPRESSED.gzip(body)


class GzipStream:
    """`chunks` gzip-encoded one by one, each flushed so the data flows as it is produced.
    An iterator, not a generator, so that `close()` reaches the producer even before the
    first chunk (HEAD) or mid-way (a disconnect): its `finally` can cancel a query."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._encoder = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        self._done = False

    def __iter__(self) -> GzipStream:
        return self

    def __next__(self) -> bytes:
        while not self._done:
            try:
                data = next(self._chunks)
            except StopIteration:
                self._done = True
                return self._encoder.flush()
            if data:
                return self._encoder.compress(data) + self._encoder.flush(zlib.Z_SYNC_FLUSH)
        raise StopIteration

    def close(self) -> None:
        """Close the producer."""
        self._done = True
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


# --- conditional requests ---------------------------------------------------------------


def if_none_match_matches(header_value: str | None, etag: str) -> bool:
    """True when `If-None-Match` names `etag` (RFC 9110 §13.1.2): `*`, or a list of entity
    tags compared weakly (`W/"x"` matches `"x"`). A malformed header matches nothing, so the
    full answer is sent: never a wrong 304."""
    if header_value is None:
        return False
    if header_value.strip() == "*":
        return True
    wanted = _opaque(etag)
    if wanted is None:
        return False
    position, text = 0, header_value
    while position < len(text):
        match = _ENTITY_TAG.match(text, position)
        if not match:
            return False
        if match.group(1) == wanted:
            return True
        position = match.end()
    return False


def _opaque(etag: str) -> str | None:
    match = _ENTITY_TAG.fullmatch(etag.strip())
    return match.group(1) if match else None
