"""The fetch from the upstream: one HTTP GET, bounded in total time and in size.

Owns: the GET of one upstream answer's bytes: http and https only (urllib would otherwise
read file: URLs and speak FTP), no proxies from the environment, a few redirects to http or
https only, certificates verified, at most `max_bytes` read, and one deadline for the whole
answer (connect, status line, headers and body; a socket timeout alone is per operation, so a
server sending a byte a second would never trip it). Every failure is an `UpstreamError`
(`UpstreamTimeout` when the deadline passed) with a reason and whatever body was received.

Leaves to others: what the bytes mean (`upstream.document`), which URL and limits to use
(`config`), and what a failure answers (`ingest`, `api`). A leaf: it imports nothing from
`dataproc`.
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import urljoin, urlsplit

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["UpstreamError", "UpstreamTimeout", "get"]

_ALLOWED_SCHEMES = frozenset({"http", "https"})
_REQUEST_HEADERS = {"User-Agent": "dataproc", "Accept": "application/json"}
_CHUNK_BYTES = 16384


class UpstreamError(Exception):
    """The upstream could not be used; .reason says why, .body holds what was received."""

    def __init__(self, reason: str, body: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.body = body


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer completely within the time allowed."""


def get(url: str, *, timeout_s: float, max_bytes: int) -> bytes:
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
            # urllib hands the HTTPResponse itself to HTTPError as its fp (typed as any IO).
            body = _read_capped(cast(http.client.HTTPResponse, exc.fp), max_bytes, deadline)
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

    def readinto(self, buffer: WriteableBuffer) -> int | None:
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
        reader: io.BufferedReader = io.BufferedReader(_DeadlineReader(sock, deadline))
        self.fp.close()  # the plain makefile() the base class opened; ours replaces it
        self.fp = reader


class _DeadlineHTTPConnection(http.client.HTTPConnection):
    """Connect within the time left and answer with _DeadlineResponse."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        # http.client calls response_class(sock, method=...): a factory with the deadline
        # bound serves, though typeshed declares a class.
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)  # type: ignore[assignment]

    def connect(self) -> None:
        self.timeout = self._deadline.remaining()
        super().connect()


class _DeadlineHTTPSConnection(_DeadlineHTTPConnection, http.client.HTTPSConnection):
    """The same for https: HTTPSConnection.connect wraps the socket after ours connects it."""


@functools.lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """Verifies certificates and host names; built once (loading the CA store takes ~20 ms)."""
    return ssl.create_default_context()


class _DeadlineHandler(urllib.request.HTTPSHandler):
    """Opens http and https connections that keep the deadline (one handler for both)."""

    def __init__(self, deadline: _Deadline) -> None:
        super().__init__(context=_tls_context())
        self._deadline = deadline

    http_request = urllib.request.AbstractHTTPHandler.do_request_  # as HTTPHandler has it

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_DeadlineHTTPConnection, deadline=self._deadline)
        return self.do_open(factory, req)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        factory = functools.partial(_DeadlineHTTPSConnection, deadline=self._deadline)
        return self.do_open(factory, req, context=_tls_context())


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow a few redirects, to http or https only (the stdlib also allows ftp)."""

    max_redirections = 5

    def http_error_302(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
    ) -> Any:
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
        _DeadlineHandler(deadline),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        _RedirectHandler(),
    ):
        opener.add_handler(handler)
    return opener


def _clip(text: object, limit: int = 64) -> str:
    """A short repr for messages, so a huge input does not become a huge message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
