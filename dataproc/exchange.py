"""One exchange on a connection: read a request's body, run the app, write the answer.

Owns: what a worker thread does with a `Channel` whose request head has arrived — parse the
head (`protocol`), read the body within the head's deadline (answering `Expect:
100-continue` after the checks), call the app (a failing app answers 500), gzip, and write
the answer whole in one `send` or streamed (chunked on HTTP/1.1, close-delimited on HTTP/1.0,
truncated on failure, the iterator closed on disconnect), then the access-log line and the
observer; pipelined requests already buffered are served in the same turn. Leaves every
wait for readiness, the connection slots, parking, lingering and drain to `server`, the
bytes to `protocol`, the error shapes to `web`.

Sharp edges of DESIGN.md handled here: 1 `Content-Length` on every response (computed by
`protocol.render`), bodies read in full; 4 HEAD; 6 `Expect: 100-continue`; 7 a deadline on
the body and every write; 12 a failing app answers 500; 13 a client gone mid-write is
ignored; 17 one `send` per whole response; 18 streams.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from enum import Enum

from . import protocol
from .config import Config
from .errors import ApiError
from .protocol import Incomplete, ProtocolError, RequestHead
from .web import Request, Response, error_response

log = logging.getLogger("dataproc.server")
access_log = logging.getLogger("dataproc.access")

RECV_BYTES = 65536
TURN_READS = 32  # next requests a worker reads itself before the channel goes back to the loop
Observer = Callable[[Request, Response, float], None]


class _ClientGone(Exception):
    """The client closed or vanished mid-request or mid-stream: close without an answer."""


class Next(Enum):
    """What a channel does after an answer."""

    KEEP = 1  # wait for the next request
    CLOSE = 2
    LINGER = 3  # refused mid-request: read what the client still sends, then close


class Channel:
    """One connection: its socket and the bytes received but not yet parsed."""

    __slots__ = ("sock", "client", "buffer", "deadline", "lingering", "drained", "counted")

    def __init__(self, sock: socket.socket, client: str, *, counted: bool):
        self.sock, self.client = sock, client
        self.buffer = bytearray()
        self.deadline = 0.0  # monotonic: idle close, head deadline, or end of lingering
        self.lingering = False
        self.drained = 0
        self.counted = counted  # holds one of the `max_connections` slots


class Exchange:
    """Serves the requests of one channel at a time; shared by every worker thread."""

    def __init__(
        self,
        config: Config,
        app: Callable[[Request], Response],
        observe: Observer | None,
        draining: Callable[[], bool],
        others_waiting: Callable[[], bool],
    ):
        self.config, self.app, self._observe, self._draining = config, app, observe, draining
        self._others_waiting = others_waiting

    def serve(self, channel: Channel) -> Next:
        """Serve the requests whose heads are buffered (pipelining), and the next ones that
        are already waiting on the socket, then hand back. A next request is read here only
        while no other channel waits for a worker, and at most `TURN_READS` times, so a busy
        connection cannot hold a worker while others queue (their p99 would pay), and not
        while draining; a head already in the buffer is always served (the loop only hears
        of bytes in the socket)."""
        reads = TURN_READS
        try:
            while True:
                after = self._serve_one(channel)
                if after is not Next.KEEP:
                    return after
                if protocol.head_end(channel.buffer) >= 0:
                    continue
                if not reads or self._others_waiting() or self._draining():
                    return after  # parked: the loop (or the drain) takes it from here
                if not self._read_waiting(channel):
                    return after
                reads -= 1
        except (ConnectionError, TimeoutError, _ClientGone):
            return Next.CLOSE  # sharp edge 13: the client went away; nothing to answer

    def _read_waiting(self, channel: Channel) -> bool:
        """True when a next request head has already arrived (read without waiting): the
        worker serves it at once instead of parking the channel and handing it through the
        loop and the queue, which costs two thread switches and an epoll re-arm."""
        try:
            data = channel.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return False  # nothing yet: park it
        if not data:
            raise _ClientGone()
        channel.deadline = time.monotonic() + self.config.socket_timeout_s  # a new request
        channel.buffer += data
        return protocol.head_end(channel.buffer) >= 0 or protocol.head_too_long(
            channel.buffer, self.config
        )

    def _serve_one(self, channel: Channel) -> Next:
        """Read one request, run the app, write the response."""
        started = time.perf_counter()
        request, response, head = self._receive(channel)
        after, sent = self._respond(channel, request, response, head)
        duration_s = time.perf_counter() - started
        if self._observe is not None:
            self._observe(request, response, duration_s)
        _log_access(request, response.status, sent, duration_s)
        return after

    def _receive(self, channel: Channel) -> tuple[Request, Response, RequestHead | None]:
        request = Request("-", "-", {}, {}, client=channel.client)
        try:
            head = self._read_head(channel)
            request.method, request.path, request.query = head.method, head.path, head.query
            request.headers, request.request_id = head.headers, head.request_id
            request.body = self._read_body(channel, head)
        except (ProtocolError, TimeoutError) as error:
            if isinstance(error, TimeoutError):
                error = ProtocolError(408, "request not received in time")
            request.request_id = error.request_id or protocol.new_request_id()
            response = error_response(ApiError(error.status, error.detail))
            response.close = True
            return request, response, None
        try:
            response = self.app(request)
        except Exception:  # sharp edge 12: the app is meant to catch; this is the last net
            log.exception("app raised [%s]", request.request_id)
            response = error_response(ApiError(500, "Internal Server Error"))
        return request, response, head

    def _read_head(self, channel: Channel) -> RequestHead:
        end = protocol.head_end(channel.buffer)
        if end < 0:  # timed out, or over a limit: the parser names which
            try:
                protocol.parse_head(channel.buffer, self.config)
            except Incomplete:
                raise ProtocolError(408, "request not received in time") from None
            raise ProtocolError(400, "malformed request head")  # pragma: no cover
        head = protocol.parse_head(channel.buffer[:end], self.config)
        del channel.buffer[:end]
        return head

    def _read_body(self, channel: Channel, head: RequestHead) -> bytes:
        if head.expect_continue:  # sharp edge 6: only now, after every check
            _send_all(channel.sock, protocol.CONTINUE, self._write_deadline())
        length = head.content_length
        deadline = channel.deadline  # the head's deadline bounds the whole request
        while len(channel.buffer) < length:
            data = _receive_some(channel.sock, deadline)
            if not data:
                raise _ClientGone()
            channel.buffer += data
        body = bytes(channel.buffer[:length])
        del channel.buffer[:length]
        return body

    # --- writing -----------------------------------------------------------------------

    def _respond(
        self, channel: Channel, request: Request, response: Response, head: RequestHead | None
    ) -> tuple[Next, int]:
        version = head.version if head else (1, 1)
        close = response.close or self._draining() or head is None or not head.keep_alive
        head_only = request.method == "HEAD"  # sharp edge 4: GET's headers, no body
        response = _encode(request, response)
        if response.stream is not None:
            return self._send_stream(channel, request, response, version, close, head_only)
        return self._send_whole(channel, request, response, version, close, head_only)

    def _send_whole(
        self,
        channel: Channel,
        request: Request,
        response: Response,
        version: tuple[int, int],
        close: bool,
        head_only: bool,
    ) -> tuple[Next, int]:
        data = protocol.render(
            response.status,
            response.headers,
            response.body,
            request.request_id,
            close=close,
            version=version,
            head_only=head_only,
        )
        _send_all(channel.sock, data, self._write_deadline())  # sharp edge 17: one write
        if response.close:  # refused mid-request: the client may still be sending
            return Next.LINGER, len(response.body)
        return (Next.CLOSE if close else Next.KEEP), len(response.body)

    def _send_stream(
        self,
        channel: Channel,
        request: Request,
        response: Response,
        version: tuple[int, int],
        close: bool,
        head_only: bool,
    ) -> tuple[Next, int]:
        """Sharp edge 18: chunked on HTTP/1.1, close-delimited on HTTP/1.0; a failure after
        the first byte ends the transfer without its last chunk; the iterator is closed in
        every case, at once when the client goes away."""
        stream = response.stream
        assert stream is not None  # the caller checked
        chunked = version >= (1, 1)
        close = close or not chunked
        after = Next.CLOSE if close else Next.KEEP
        try:
            if head_only:
                head = self._stream_head(response, request, version, close)
                _send_all(channel.sock, head, self._write_deadline())
                return after, 0
            try:
                first = _first_chunk(stream)
            except Exception as error:  # before any byte: an ordinary error answer
                failed = _encode(request, _failure(request, error))
                return self._send_whole(channel, request, failed, version, close, head_only)
            head = self._stream_head(response, request, version, close)
            opening = head + (protocol.chunk(first) if chunked and first else first)
            _send_all(channel.sock, opening, self._write_deadline())
            sent = len(first)
            try:
                while (data := _next_chunk(stream)) is not None:
                    if _peer_closed(channel.sock):
                        raise _ClientGone()
                    framed = protocol.chunk(data) if chunked else data
                    _send_all(channel.sock, framed, self._write_deadline())
                    sent += len(data)
            except _StreamFailed:
                log.exception("stream failed after the first byte [%s]", request.request_id)
                return Next.CLOSE, sent  # no last chunk: the client sees a truncated body
            if chunked:
                _send_all(channel.sock, protocol.LAST_CHUNK, self._write_deadline())
            return after, sent
        finally:
            _close_iterator(stream)

    def _write_deadline(self) -> float:
        """Sharp edge 7: each write (a whole response, or one chunk) within the timeout."""
        return time.monotonic() + self.config.socket_timeout_s

    def _stream_head(
        self, response: Response, request: Request, version: tuple[int, int], close: bool
    ) -> bytes:
        return protocol.render_head(
            response.status,
            response.headers,
            request.request_id,
            length=None,
            close=close,
            version=version,
        )


class _StreamFailed(Exception):
    """The response's iterator raised after the first byte was sent."""


def _first_chunk(stream: Iterator[bytes]) -> bytes:
    """The first non-empty chunk (b"" for an empty stream); exceptions propagate."""
    for data in stream:
        if data:
            return data
    return b""


def _next_chunk(stream: Iterator[bytes]) -> bytes | None:
    """The next non-empty chunk (an empty one would read as the last chunk), None at the
    end; `_StreamFailed` when the iterator raises."""
    while True:
        try:
            data = next(stream)
        except StopIteration:
            return None
        except Exception as error:
            raise _StreamFailed() from error
        if data:
            return data


def _close_iterator(stream: Iterator[bytes]) -> None:
    """Close a generator (its `finally` runs: a query is cancelled); a failure is logged."""
    close = getattr(stream, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("closing a stream failed")


def _peer_closed(sock: socket.socket) -> bool:
    """True when the client has closed its end (EOF or reset) while we stream to it."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    """`sendall` on a non-blocking socket, bounded by `deadline` (TimeoutError past it). A
    response that fits the socket buffer is one `send`: no mode switch, no extra call."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, InterruptedError):
            _wait_for(sock, select.POLLOUT, deadline)
            continue
        view = view[sent:]


def _receive_some(sock: socket.socket, deadline: float) -> bytes:
    """Some bytes from a non-blocking socket (b"" at EOF); `ProtocolError(408)` past it."""
    while True:
        try:
            return sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            try:
                _wait_for(sock, select.POLLIN, deadline)
            except TimeoutError:
                raise ProtocolError(408, "request not received in time") from None


def _wait_for(sock: socket.socket, events: int, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    poller = select.poll()
    poller.register(sock, events)
    if remaining <= 0 or not poller.poll(remaining * 1000):
        raise TimeoutError()


def _failure(request: Request, error: Exception) -> Response:
    if isinstance(error, ApiError):
        return error_response(error)
    log.error("stream failed before its first byte [%s]", request.request_id, exc_info=error)
    return error_response(ApiError(500, "Internal Server Error"))


def _encode(request: Request, response: Response) -> Response:
    """gzip, once for every endpoint, when the client allows it and the body is worth it."""
    length = None if response.stream is not None else len(response.body)
    headers, use_gzip = protocol.negotiate_gzip(
        request.headers.get("accept-encoding", []), response.status, response.headers, length
    )
    if headers is response.headers:
        return response
    if not use_gzip:
        return Response(response.status, response.body, headers, response.close, response.stream)
    if response.stream is not None:
        stream = protocol.GzipStream(response.stream)
        return Response(response.status, b"", headers, response.close, stream)
    return Response(response.status, protocol.gzip_body(response.body), headers, response.close)


def _log_access(request: Request, status: int, sent: int, duration_s: float) -> None:
    """One line per request; the route template, never the query string (it may hold secrets).

    On by default, so it must be cheap: the record is made and handed to the handlers
    directly (`Logger.info` would also look up the caller's file and line in the stack,
    which no format prints), and nothing is built when INFO is off for the access log."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    route = request.route or "-"
    duration_ms = duration_s * 1000
    record = access_log.makeRecord(
        access_log.name,
        logging.INFO,
        __file__,
        0,
        "%s %s %s %d %.1fms %dB",
        (request.request_id, request.method, route, status, duration_ms, sent),
        None,
        extra={
            "request_id": request.request_id,
            "method": request.method,
            "route": route,
            "status": status,
            "duration_ms": round(duration_ms, 3),
            "bytes": sent,
            "client": request.client,
        },
    )
    access_log.handle(record)
