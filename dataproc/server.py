"""Sockets: accept, connection slots, parked keep-alive, a bounded pool of worker threads, drain.

Owns: the listening socket, the cap on connections (a fast 503 past it), the selector loop
that owns every connection while it waits for a request, the worker threads that run the app
on a complete request head, every timeout, lingering close, the access log and a graceful
drain. Leaves the bytes to `protocol` (parsing, rendering, chunked framing, gzip), the routing
and error shapes to `web`, and everything else to the `app` it is handed (it never imports
`api`, `store` or `jwt`).

The shape is waitress's: the main loop owns the channels (accepts, reads request heads
without blocking, parks idle keep-alive connections, closes the silent ones), and a task
queue hands a channel with a complete head to one of `config.threads` workers, which reads
the body, runs the app, writes the answer in one `sendall` and gives the channel back. An idle
connection costs a selector entry, not a thread; a slow sender costs nothing until its whole
head has arrived within `socket_timeout_s`.

No `http.server` class is used, so no stdlib path can answer in HTML or log to stderr. The
sharp edges of DESIGN.md, by number, and where each is handled:
  1 keep-alive: `protocol.render` computes `Content-Length` on every response; bodies are
  read in full.   2 HTML errors: no stdlib handler runs; every protocol error is the
  contract's JSON.   3 unknown verbs: any method token reaches the router (404/405).
  4 HEAD: GET's headers, no body.   5 bodies: `protocol` (one `Content-Length`, digits,
  capped 413; `Transfer-Encoding` refused 411).   6 `Expect: 100-continue` answered after the
  checks.   7 a deadline on the head, the body and every write.   8 a cap on connections
  (fast 503), a large listen backlog, a bounded thread pool.   9 `drain()`.   10 `Server:
  dataproc`.   11 logging only.   12 a failing app answers 500.   13 a client gone
  mid-write is ignored.   14 `protocol.split_target`.   15 duplicated headers kept.
  16 no reverse DNS on bind.   17 one `sendall` per response and `TCP_NODELAY`.
  18 streams: chunked (HTTP/1.1) or close-delimited (HTTP/1.0), truncated on failure, the
  iterator closed on disconnect.
"""

from __future__ import annotations

import logging
import queue
import select
import selectors
import socket
import threading
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

LINGER_S = 1.0  # at most this long (and LINGER_MAX_BYTES) reading a refused request's rest
LINGER_MAX_BYTES = 1 << 20
RECV_BYTES = 65536
ACCEPT_BATCH = 64  # connections accepted per wake, so a flood cannot starve parked ones
SWEEP_S = 0.05  # how often parked connections are checked against their deadlines
Observer = Callable[[Request, Response, float], None]
BUSY_DETAIL = "server busy, retry in one second"


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


class _Poller:
    """Readiness of sockets for the loop. Parked sockets are one-shot: a socket that turns
    readable is disarmed (by the kernel with epoll's EPOLLONESHOT, else here) and re-armed
    by one call when its channel is parked again, from any thread (epoll and kqueue take a
    registration during a wait; on other platforms it is seen within `SWEEP_S`)."""

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._selector = None if self._epoll else selectors.DefaultSelector()
        self._persistent: set[int] = set()

    def watch(self, fd: int) -> None:
        """Report `fd` every time it is readable (the listening socket, the wake pipe)."""
        self._persistent.add(fd)
        if self._epoll is not None:
            self._epoll.register(fd, select.EPOLLIN)
        else:
            assert self._selector is not None
            self._selector.register(fd, selectors.EVENT_READ)

    def unwatch(self, fd: int) -> None:
        self._persistent.discard(fd)
        self.disarm(fd)

    def arm(self, fd: int) -> None:
        """Report `fd` once, the next time it is readable."""
        if self._epoll is not None:
            try:
                self._epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
            except FileNotFoundError:  # not registered yet (or closed and reused)
                self._epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
        else:
            assert self._selector is not None
            self._selector.register(fd, selectors.EVENT_READ)

    def disarm(self, fd: int) -> None:
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:
                assert self._selector is not None
                self._selector.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass  # not armed, or already closed

    def ready(self, timeout: float) -> list[int]:
        """The readable file descriptors, waiting at most `timeout` seconds."""
        if self._epoll is not None:
            return [fd for fd, _ in self._epoll.poll(timeout)]
        assert self._selector is not None
        fds = [int(key.fd) for key, _ in self._selector.select(timeout)]
        for fd in fds:
            if fd not in self._persistent:
                self.disarm(fd)
        return fds

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
        elif self._selector is not None:
            self._selector.close()


class HttpServer:
    """At most `max_connections` connections, parked by one loop, served by a thread pool."""

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
        # A pre-forked worker inherits the parent's listening socket.
        self.socket = sock if sock is not None else _bind(config)
        self.socket.setblocking(False)  # workers sharing it get EAGAIN, never block in accept
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        # The loop waits in the poller; workers put a channel back into it directly, under
        # `_lock` (which also guards `_parked`: file descriptor -> the channel waiting on it).
        self._poller = _Poller()
        self._parked: dict[int, Channel] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._tasks: queue.SimpleQueue[Channel | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._open = 0  # accepted connections not yet closed (the cap counts these)
        self._busy = 0  # channels with a worker
        self._stop = False
        self._stopped = threading.Event()
        self._stopped.set()
        self._closed = False
        self.draining = False
        self._start_workers()  # now, so a thread count taken after start-up includes them

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self.server_address[1]

    # --- the main loop ---------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and park connections until `shutdown()`; workers serve complete requests."""
        self._stopped.clear()
        listening, wake = self.socket.fileno(), self._wake_r.fileno()
        self._poller.watch(listening)
        self._poller.watch(wake)
        next_sweep = time.monotonic() + SWEEP_S
        try:
            while not self._stop:
                timeout = min(poll_interval, SWEEP_S) if self._parked else poll_interval
                for fd in self._poller.ready(timeout):
                    if fd == listening:
                        self._accept()
                    elif fd == wake:
                        self._drain_wakeups()
                    else:
                        with self._lock:
                            channel = self._parked.pop(fd, None)
                        if channel is not None:  # else: expired or closed meanwhile
                            self._readable(channel)
                if (now := time.monotonic()) >= next_sweep:
                    self._expire(now)
                    next_sweep = now + SWEEP_S
        finally:
            self._poller.unwatch(listening)
            self._poller.unwatch(wake)
            self._stop = False
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop the loop of `serve_forever` and wait until it has left (another thread)."""
        self._stop = True
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket and every parked connection; stop idle workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            parked = list(self._parked.values())
        self.socket.close()
        for channel in parked:
            self._unpark(channel)
            self._close(channel)
        self._poller.close()
        for _ in self._threads:
            self._tasks.put(None)  # each worker leaves after the request it is serving

    def _start_workers(self) -> None:
        while len(self._threads) < self.config.threads:
            thread = threading.Thread(
                target=self._work, name=f"dataproc-http-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return  # none left, or another pre-forked worker took it
            except OSError as error:  # EMFILE and friends: keep serving what is open
                log.warning("accept failed: %s", error)
                return
            self.process_request(sock, address)

    def process_request(self, sock: socket.socket, client_address: tuple) -> None:
        """Park a new connection, or answer a fast 503 when every slot is taken."""
        with self._lock:
            refuse = self.draining or self._open >= self.config.max_connections
            if not refuse:
                self._open += 1
        channel = Channel(
            sock, str(client_address[0]) if client_address else "", counted=not refuse
        )
        sock.setblocking(False)
        if refuse:
            self._refuse(channel)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # sharp edge 17
        self._park(channel)

    def _refuse(self, channel: Channel) -> None:
        """The fast 503, written without blocking the loop (it fits any socket buffer)."""
        response = error_response(ApiError(503, BUSY_DETAIL, {"Retry-After": "1"}))
        data = protocol.render(
            503, response.headers, response.body, protocol.new_request_id(), close=True
        )
        try:
            channel.sock.send(data)
        except OSError:
            self._close(channel)
            return
        if self._start_linger(channel):
            self._park(channel)
        else:
            self._close(channel)

    def _park(self, channel: Channel) -> None:
        """Wait in the selector for the rest of a request head, or for the next request
        (from the loop or a worker). Under the lock that `drain` and `server_close` take: a
        channel is either parked before they look, or closed here; none is left open with
        no loop to watch it."""
        if not channel.lingering:
            channel.deadline = time.monotonic() + self.config.socket_timeout_s
        with self._lock:
            parked = not (self._closed or (self.draining and not channel.lingering))
            if parked:
                fd = channel.sock.fileno()
                try:
                    self._parked[fd] = channel
                    self._poller.arm(fd)
                except (ValueError, OSError):  # the client's socket is already gone
                    self._parked.pop(fd, None)
                    parked = False
        if not parked:
            self._close(channel)

    def _unpark(self, channel: Channel) -> None:
        """Take a parked channel out of the poller (expiry, close); a no-op if not parked."""
        with self._lock:
            fd = channel.sock.fileno()
            if fd >= 0 and self._parked.get(fd) is channel:
                del self._parked[fd]
                self._poller.disarm(fd)

    def _readable(self, channel: Channel) -> None:
        """A parked channel turned readable (and is no longer parked): read what came."""
        try:
            data = channel.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            self._rearm(channel)
            return
        except OSError:
            data = b""
        if channel.lingering:
            channel.drained += len(data)
            if not data or channel.drained >= LINGER_MAX_BYTES:
                self._close(channel)
            else:
                self._rearm(channel)
            return
        if not data:  # the client closed: between requests, or mid-head (nothing to answer)
            self._close(channel)
            return
        channel.buffer += data
        if protocol.head_end(channel.buffer) >= 0 or protocol.head_too_long(
            channel.buffer, self.config
        ):
            self._dispatch(channel)
        else:
            self._rearm(channel)

    def _rearm(self, channel: Channel) -> None:
        """Park again, keeping the deadline already running (a head still arriving)."""
        with self._lock:
            fd = channel.sock.fileno()
            self._parked[fd] = channel
            self._poller.arm(fd)

    def _expire(self, now: float) -> None:
        """Close silent connections; a half-sent head goes to a worker for its 408."""
        with self._lock:
            expired = [c for c in self._parked.values() if c.deadline <= now]
        for channel in expired:
            self._unpark(channel)
            if channel.buffer and not channel.lingering:  # the worker answers 408 (or 4xx)
                self._dispatch(channel)
            else:
                self._close(channel)

    def _dispatch(self, channel: Channel) -> None:
        with self._lock:
            self._busy += 1
        self._tasks.put(channel)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # full (a wake is pending anyway) or closed

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    # --- the workers -------------------------------------------------------------------

    def _work(self) -> None:
        while (channel := self._tasks.get()) is not None:
            try:
                after = self._serve(channel)
            except Exception:  # a bug here must not kill the worker; the client is closed
                log.exception("connection failed")
                after = Next.CLOSE
            self._finish(channel, after)

    def _serve(self, channel: Channel) -> Next:
        """Serve the requests whose heads are buffered (pipelining), then hand back."""
        try:
            while True:
                after = self._serve_one(channel)
                if after is not Next.KEEP or protocol.head_end(channel.buffer) < 0:
                    return after
        except (ConnectionError, TimeoutError, _ClientGone):
            return Next.CLOSE  # sharp edge 13: the client went away; nothing to answer

    def _finish(self, channel: Channel, after: Next) -> None:
        """Give the channel back to the loop, or close it (always when draining)."""
        if after is Next.LINGER and not self._start_linger(channel):
            after = Next.CLOSE
        if after is Next.CLOSE:
            self._close(channel)
        else:
            self._park(channel)
        with self._lock:
            self._busy -= 1
            if not self._busy:
                self._idle.notify_all()

    def _start_linger(self, channel: Channel) -> bool:
        """Lingering close (RFC 9112 §9.6): after an early answer (413, 414, 431, 503...),
        stop writing and read what the client is still sending, within bounds, before
        closing. Closing with unread input makes the kernel send a reset, which can destroy
        the answer before the client reads it. The loop does the reading: no thread waits."""
        try:
            channel.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        channel.lingering = True
        channel.deadline = time.monotonic() + min(LINGER_S, self.config.socket_timeout_s)
        channel.buffer.clear()
        return True

    def _close(self, channel: Channel) -> None:
        _close_socket(channel.sock)
        if channel.counted:
            channel.counted = False
            with self._lock:
                self._open -= 1
            self.shutdown_request(channel.sock)

    def shutdown_request(self, sock: socket.socket) -> None:
        """A hook: an accepted connection has ended and its slot is free again."""

    def _serve_one(self, channel: Channel) -> Next:
        """Read one request, run the app, write the response."""
        started = time.perf_counter()
        request, response, head = self._receive(channel)
        after, sent = self._respond(channel, request, response, head)
        duration_s = time.perf_counter() - started
        self.observe(request, response, duration_s)
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
        close = response.close or self.draining or head is None or not head.keep_alive
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

    # --- tracking and drain --------------------------------------------------------------

    def observe(self, request: Request, response: Response, duration_s: float) -> None:
        """Hand one finished request to the observer (the metrics), if any."""
        if self._observe is not None:
            self._observe(request, response, duration_s)

    def drain(self, grace_s: float) -> bool:
        """Stop accepting, close idle connections, wait up to `grace_s` for busy ones."""
        with self._lock:
            self.draining = True
        self.shutdown()  # returns once serve_forever has left its loop (call from another thread)
        # Close the listening socket now, not after the wait: a new connection is refused at
        # once (a load balancer moves on) instead of sitting unanswered in the backlog.
        self.server_close()
        with self._lock:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=grace_s)


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
    """One line per request; the route template, never the query string (it may hold secrets)."""
    route = request.route or "-"
    access_log.info(
        "%s %s %s %d %.1fms %dB",
        request.request_id,
        request.method,
        route,
        status,
        duration_s * 1000,
        sent,
        extra={
            "request_id": request.request_id,
            "method": request.method,
            "route": route,
            "status": status,
            "duration_ms": round(duration_s * 1000, 3),
            "bytes": sent,
            "client": request.client,
        },
    )


def _bind(config: Config) -> socket.socket:
    """Sharp edge 16: bind without the stdlib's reverse DNS lookup (`getfqdn`)."""
    family, _, _, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM
    )[0]
    return socket.create_server(address, family=family, backlog=config.listen_backlog)


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
