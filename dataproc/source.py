"""The upstream: fetch one answer's bytes, parse it into a Reading, decode the value.

Owns: the HTTP GET to the upstream (bounded in total time and in size, http/https only,
no proxies from the environment), the strict reading of one upstream document (the
rules in API.md, "Data points"), the little-endian float32 decoding, the document's
identity for de-duplication, and RFC 3339 time parsing and formatting.

Leaves to others: the validity rules (invalid tags, maximum age, non-finite values) and
storing readings or rejects (``ingest``, ``store``); the HTTP status codes our own API
answers with (``api``); which URL and limits to use (``config``).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import json
import re
import socket
import ssl
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urljoin, urlsplit

__all__ = [
    "MAX_TAGS",
    "MAX_TAG_CHARS",
    "InvalidDocument",
    "Reading",
    "UpstreamError",
    "UpstreamTimeout",
    "decode_value",
    "fetch",
    "format_time",
    "parse_document",
    "parse_time",
]

MAX_TAGS = 32
MAX_TAG_CHARS = 64
DEFAULT_MAX_BYTES = 65536

_FLOAT32_LE = struct.Struct("<f")  # the upstream sends IEEE-754 float32, little-endian
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_END_OF_TIME = 253402300800  # 10000-01-01T00:00:00Z in Unix seconds: datetime stops at 9999
_ALLOWED_SCHEMES = frozenset({"http", "https"})
_REQUEST_HEADERS = {"User-Agent": "dataproc", "Accept": "application/json"}
_CHUNK_BYTES = 16384


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Reading:
    """One upstream document, checked and decoded."""

    time: datetime  # timezone-aware, UTC
    value: float  # the decoded float32; may be nan or +-inf (validity is ingest's call)
    tags: tuple[str, ...]
    document: dict  # the parsed document as received, unknown keys included
    identity: bytes  # sha256 of the canonical JSON of time, value and tags as received


class InvalidDocument(Exception):
    """The upstream's answer is not a valid document; .reason says why, naming the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamError(Exception):
    """The upstream could not be used; .reason says why, .body holds what was received."""

    def __init__(self, reason: str, body: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.body = body


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer completely within the time allowed."""


# --------------------------------------------------------------------------- value


def decode_value(raw: Sequence[int] | bytes) -> float:
    """Decode exactly 4 bytes as an IEEE-754 float32, little-endian."""
    if isinstance(raw, int):  # bytes(4) would quietly mean four zero bytes
        raise TypeError("decode_value needs 4 bytes, not an int")
    data = bytes(raw)
    if len(data) != 4:
        raise ValueError(f"decode_value needs exactly 4 bytes, got {len(data)}")
    return _FLOAT32_LE.unpack(data)[0]


# --------------------------------------------------------------------------- time

# RFC 3339 (and the ISO 8601 extended forms people type): a date, optionally a time with
# optional seconds and fraction, and an offset only where there is a time. re.ASCII keeps
# \d to 0-9; other Unicode digits are not dates.
_ISO_DATETIME = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d\d)-(?P<day>\d\d)"
    r"(?:[Tt ](?P<hour>\d\d):(?P<minute>\d\d)"
    r"(?::(?P<second>\d\d)(?:[.,](?P<fraction>\d+))?)?"
    r"(?P<offset>[Zz]|(?P<sign>[+-])(?P<off_h>\d\d)(?::?(?P<off_m>\d\d))?)?)?",
    re.ASCII,
)


def format_time(dt: datetime) -> str:
    """RFC 3339 in UTC with "Z"; fractional seconds only when not zero (naive means UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    utc = dt.astimezone(UTC)
    text = utc.replace(tzinfo=None, microsecond=0).isoformat()
    if utc.microsecond:
        text += "." + f"{utc.microsecond:06d}".rstrip("0")
    return text + "Z"


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 / ISO 8601 date-time into aware UTC; no offset means UTC."""
    moment = _parse_iso(text)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return _to_utc(moment, text)


def _parse_iso(text: str) -> datetime:
    """The date-time in text, naive when it has no offset; ValueError when it is not one."""
    match = _ISO_DATETIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time (like 2024-04-22T15:07:57Z): {_clip(text)}")
    parts = match.groupdict()
    try:
        return datetime(
            int(parts["year"]),
            int(parts["month"]),
            int(parts["day"]),
            int(parts["hour"] or 0),
            int(parts["minute"] or 0),
            int(parts["second"] or 0),
            _microseconds(parts["fraction"]),
            tzinfo=_offset(parts),
        )
    except ValueError as exc:  # month 13, day 31 in April, year 0, hour 24, offset 24:00 ...
        raise ValueError(f"not a valid date-time: {_clip(text)} ({exc})") from None


def _microseconds(fraction: str | None) -> int:
    """Fractional seconds as microseconds, truncated (rounding could carry into the next second)."""
    return int(fraction[:6].ljust(6, "0")) if fraction else 0


def _offset(parts: dict[str, str | None]) -> timezone | None:
    """The tzinfo for the offset group: None when absent, UTC for Z."""
    if parts["offset"] is None:
        return None
    if parts["sign"] is None:
        return UTC
    hours, minutes = int(parts["off_h"]), int(parts["off_m"] or 0)
    if hours > 23 or minutes > 59:
        raise ValueError(f"offset {parts['offset']} is out of range")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if parts["sign"] == "-" else delta)


def _to_utc(moment: datetime, text: str) -> datetime:
    """Convert an aware datetime to UTC; the offset can push it past year 1 or 9999."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"date-time out of range (years 1..9999 in UTC): {_clip(text)}") from None


def _clip(text: object, limit: int = 64) -> str:
    """A short repr for messages, so a huge input does not become a huge message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# --------------------------------------------------------------------------- document

_JSON_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def _kind(value: object) -> str:
    """The JSON type of a parsed value, for messages."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def parse_document(raw: bytes) -> Reading:
    """Parse and check one upstream document; raises InvalidDocument naming the field."""
    document = _load_object(raw)
    for field in ("time", "value"):
        if field not in document:
            raise InvalidDocument(f"{field}: missing")
    reading = Reading(
        time=_time_field(document["time"]),
        value=_value_field(document["value"]),
        tags=_tags_field(document.get("tags")),
        document=document,
        identity=_identity(document),
    )
    _check_storable(document)
    return reading


def _load_object(raw: bytes) -> dict:
    """Strict UTF-8 JSON whose top level is an object."""
    try:
        # Decode ourselves: json.loads(bytes) would also accept UTF-16 and UTF-32.
        text = str(raw, "utf-8")
        document = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise InvalidDocument(f"not JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise InvalidDocument("not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, our hooks, over-long integers
        raise InvalidDocument(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidDocument("not a JSON object")
    return document


def _refuse_constant(name: str) -> Any:
    """json.loads hook: NaN and Infinity are Python extensions, not JSON (RFC 8259 section 6)."""
    raise ValueError(f"{name} is not a JSON value")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads hook: refuse duplicate keys, whose meaning RFC 8259 leaves undefined."""
    document: dict = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"duplicate key {_clip(key)}")
        document[key] = value
    return document


def _time_field(value: object) -> datetime:
    """time: Unix seconds (int, or float keeping its fraction) or ISO 8601 with an offset."""
    parse = _TIME_PARSERS.get(type(value))  # by exact type: bool is not a number here
    if parse is None:
        raise InvalidDocument(
            f"time: expected Unix seconds or an ISO 8601 string, got {_kind(value)}"
        )
    return parse(value)


def _time_from_unix(seconds: int | float) -> datetime:
    """Unix seconds to aware UTC; microsecond precision for floats."""
    # NaN fails every comparison, so it lands here too (json gives inf for 1e400).
    if not 0 <= seconds < _END_OF_TIME:
        raise InvalidDocument(
            f"time: Unix seconds must be from 0 to {_END_OF_TIME - 1}, got {_clip(seconds)}"
        )
    try:
        return _EPOCH + timedelta(seconds=seconds)
    except OverflowError:  # a float a hair under the limit that rounds up to year 10000
        raise InvalidDocument(f"time: out of range: {_clip(seconds)}") from None


def _time_from_text(text: str) -> datetime:
    """An ISO 8601 string; here it must say its offset, as a bare local time is ambiguous."""
    try:
        moment = _parse_iso(text)
    except ValueError as exc:
        raise InvalidDocument(f"time: {exc}") from None
    if moment.tzinfo is None:
        raise InvalidDocument(f"time: an ISO 8601 string needs an offset or Z: {_clip(text)}")
    try:
        return _to_utc(moment, text)
    except ValueError as exc:
        raise InvalidDocument(f"time: {exc}") from None


_TIME_PARSERS: dict[type, Callable[[Any], datetime]] = {
    int: _time_from_unix,
    float: _time_from_unix,
    str: _time_from_text,
}


def _value_field(value: object) -> float:
    """value: exactly 4 integers 0..255, decoded as float32 little-endian."""
    problem = _byte_list_problem(value)
    if problem:
        raise InvalidDocument(f"value: expected 4 integers 0..255, {problem}")
    return decode_value(value)  # type: ignore[arg-type]


def _byte_list_problem(value: object) -> str | None:
    """Why value is not a list of 4 integers 0..255, or None when it is."""
    if type(value) is not list:
        return f"got {_kind(value)}"
    if len(value) != 4:
        return f"got {len(value)} items"
    for index, item in enumerate(value):
        # type() is int, not isinstance: true is not 1, and 7.0 is not 7.
        if type(item) is not int or not 0 <= item <= 255:
            return f"item {index} is {_clip(item)}"
    return None


def _tags_field(value: object) -> tuple[str, ...]:
    """tags: missing or null means none; else at most 32 strings of at most 64 characters."""
    if value is None:
        return ()
    if type(value) is not list:
        raise InvalidDocument(f"tags: expected a list of strings, got {_kind(value)}")
    if len(value) > MAX_TAGS:
        raise InvalidDocument(f"tags: at most {MAX_TAGS} tags, got {len(value)}")
    for index, tag in enumerate(value):
        if type(tag) is not str:
            raise InvalidDocument(f"tags: item {index} is {_kind(tag)}, not a string")
        if len(tag) > MAX_TAG_CHARS:
            raise InvalidDocument(f"tags: item {index} is over {MAX_TAG_CHARS} characters")
    return tuple(value)


def _identity(document: dict) -> bytes:
    """sha256 of the canonical JSON of time, value and tags as received (missing tags: null)."""
    core = {"time": document["time"], "value": document["value"], "tags": document.get("tags")}
    canonical = json.dumps(core, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).digest()


def _check_storable(document: dict) -> None:
    """Refuse text PostgreSQL cannot store (U+0000, unpaired surrogates) before anyone tries."""
    for key, value in document.items():
        if not _all_text_storable(value):
            raise InvalidDocument(
                f"{_field_name(key)}: text contains U+0000 or an unpaired surrogate"
            )
    if not _all_text_storable(list(document)):
        raise InvalidDocument("document: a key contains U+0000 or an unpaired surrogate")


def _field_name(key: str) -> str:
    """A key as it reads in a message: bare when plain, repr when odd or long."""
    return key if key.isprintable() and 0 < len(key) <= MAX_TAG_CHARS else _clip(key)


def _all_text_storable(value: object) -> bool:
    """True when every string in value (keys included) is storable; iterative, any depth."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item or not _encodes(item):
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def _encodes(text: str) -> bool:
    """True when text is valid Unicode (JSON's \\ud800 escapes can make lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- fetch


def fetch(url: str, *, timeout_s: float, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """GET url; the body within timeout_s in total and at most max_bytes, or UpstreamError."""
    _check_url(url)
    deadline = _Deadline(timeout_s)
    try:
        with _build_opener(deadline).open(_request(url), timeout=timeout_s) as answer:
            body = _read_capped(answer, max_bytes + 1, deadline)
    except UpstreamError:
        raise
    except urllib.error.HTTPError as exc:
        raise _http_error(exc, max_bytes, deadline) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _translate(exc, timeout_s) from None
    if len(body) > max_bytes:
        raise UpstreamError(f"upstream answer over {max_bytes} bytes", body=body)
    return body


def _check_url(url: str) -> None:
    """Only http and https: urllib would otherwise read local files or speak FTP."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number 0..65535
    except (TypeError, ValueError) as exc:
        raise UpstreamError(f"invalid upstream URL: {exc}") from None
    if parts.scheme.lower() not in _ALLOWED_SCHEMES:
        raise UpstreamError(f"upstream URL must be http or https, not {_clip(parts.scheme)}")
    if not parts.hostname:
        raise UpstreamError("invalid upstream URL: no host")


def _request(url: str) -> urllib.request.Request:
    """The GET request, with our headers; ValueError from urllib becomes UpstreamError."""
    try:
        return urllib.request.Request(url, headers=_REQUEST_HEADERS, method="GET")
    except ValueError as exc:
        raise UpstreamError(f"invalid upstream URL: {exc}") from None


def _read_capped(answer: http.client.HTTPResponse, limit: int, deadline: _Deadline) -> bytes:
    """Read up to limit bytes one system call at a time, checking the deadline between."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        deadline.remaining()  # raises TimeoutError once the whole budget is spent
        chunk = answer.read1(min(_CHUNK_BYTES, limit - size))
        if not chunk:
            _check_complete(answer, b"".join(chunks))
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _check_complete(answer: http.client.HTTPResponse, received: bytes) -> None:
    """read1() returns b"" at EOF even when Content-Length promised more: raise instead."""
    missing = getattr(answer, "length", None)
    if missing:
        raise http.client.IncompleteRead(received, missing)


def _http_error(exc: urllib.error.HTTPError, max_bytes: int, deadline: _Deadline) -> UpstreamError:
    """A non-2xx answer, with as much of its body as fits (None when it cannot be read)."""
    body: bytes | None = None
    try:
        if exc.fp is not None:
            body = _read_capped(exc.fp, max_bytes, deadline)
    except (OSError, http.client.HTTPException, ValueError):
        body = None  # the status is the news; a broken error body adds nothing
    finally:
        exc.close()
    return UpstreamError(f"upstream answered HTTP {exc.code}", body=body)


def _timed_out(exc: BaseException, timeout_s: float) -> UpstreamError:
    return UpstreamTimeout(f"upstream did not answer within {timeout_s:g} s")


def _closed(exc: BaseException, timeout_s: float) -> UpstreamError:
    return UpstreamError("upstream closed the connection mid-answer")


def _malformed(exc: BaseException, timeout_s: float) -> UpstreamError:
    return UpstreamError(f"upstream sent a malformed HTTP answer: {_clip(str(exc), 200)}")


def _unreachable(exc: BaseException, timeout_s: float) -> UpstreamError:
    return UpstreamError(f"upstream unreachable: {exc}")


def _bad_url(exc: BaseException, timeout_s: float) -> UpstreamError:
    return UpstreamError(f"invalid upstream URL: {exc}")


# First match wins, so the specific kinds come before their base classes
# (RemoteDisconnected is both a ConnectionResetError and an HTTPException; all are OSError).
_FAILURES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Callable], ...] = (
    (TimeoutError, _timed_out),  # socket.timeout is TimeoutError since 3.10
    (http.client.InvalidURL, _bad_url),  # also an HTTPException, but the URL is at fault
    (
        (http.client.IncompleteRead, ConnectionResetError, ConnectionAbortedError, BrokenPipeError),
        _closed,
    ),
    (http.client.HTTPException, _malformed),
    (OSError, _unreachable),  # refused, DNS, TLS, no route ...
    (ValueError, _bad_url),  # http.client.InvalidURL, IDNA errors
)


def _translate(exc: BaseException, timeout_s: float) -> UpstreamError:
    """Map a network-level exception to UpstreamError or UpstreamTimeout."""
    if isinstance(exc, urllib.error.URLError):
        if not isinstance(exc.reason, BaseException):
            return UpstreamError(f"upstream unreachable: {exc.reason}")
        exc = exc.reason  # urllib wraps connect-time errors; the cause decides the kind
    for kinds, make in _FAILURES:
        if isinstance(exc, kinds):
            return make(exc, timeout_s)
    return _unreachable(exc, timeout_s)


# --------------------------------------------------------------------------- the opener


class _Deadline:
    """A total time budget; the socket timeout alone is per operation, not per answer."""

    __slots__ = ("_end",)

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self._end = time.monotonic() + timeout_s

    def remaining(self) -> float:
        """Seconds left; raises TimeoutError once none are."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("total deadline passed")
        return left


class _DeadlineReader(io.RawIOBase):
    """A socket reader that gives each recv only the time left, so a trickling server
    (a byte a second, headers or body) cannot stretch one answer past the deadline."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        self._sock.settimeout(self._deadline.remaining())
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An HTTPResponse that reads its status line, headers and body through _DeadlineReader."""

    def __init__(self, sock: socket.socket, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        reader = io.BufferedReader(_DeadlineReader(sock, deadline))
        self.fp.close()  # the plain makefile() the base class opened; ours replaces it
        self.fp = reader


class _DeadlineConnectionMixin:
    """Connect within the time left and answer with _DeadlineResponse."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)

    def connect(self) -> None:
        self.timeout = self._deadline.remaining()
        super().connect()


class _DeadlineHTTPConnection(_DeadlineConnectionMixin, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnectionMixin, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_DeadlineHTTPConnection, deadline=self._deadline)
        return self.do_open(factory, req)


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """Verifies certificates and host names; built once (loading the CA store takes ~20 ms)."""
    return ssl.create_default_context()


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__(context=_tls_context())
        self._deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_DeadlineHTTPSConnection, deadline=self._deadline)
        return self.do_open(factory, req, context=_tls_context())


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow a few redirects, to http or https only (the stdlib also allows ftp)."""

    max_redirections = 5

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001 - stdlib signature
        target = headers.get("location") or headers.get("uri") or ""
        scheme = urlsplit(urljoin(req.full_url, target)).scheme.lower()
        # Close first: the base class would read() the redirect's body with no size limit.
        fp.close()
        if scheme not in _ALLOWED_SCHEMES:
            raise UpstreamError(f"upstream redirected to a {_clip(scheme)} URL, which is refused")
        return super().http_error_302(req, fp, code, msg, headers)

    # The base class aliases these to its own http_error_302, so ours must be re-aliased.
    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _build_opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """An opener with only the handlers we want: no proxies, no file:, ftp: or data:."""
    opener = urllib.request.OpenerDirector()
    opener.addheaders = []  # no "Python-urllib/3.x" User-Agent
    for handler in (
        _HTTPHandler(deadline),
        _HTTPSHandler(deadline),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _RedirectHandler(),
    ):
        opener.add_handler(handler)
    return opener
