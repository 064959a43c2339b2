"""Sockets: accept, connection slots, parked keep-alive, a bounded pool of worker threads, drain.

Owns: the listening socket, the cap on connections (a fast 503 past it), the selector loop
that owns every connection while it waits for a request, the worker threads, every wait for
a request head, lingering close and a graceful drain. Leaves one request/response exchange
on a channel (body, app, write, streams, access log) to `exchange`, the bytes to `protocol`,
the error shapes to `web`, and everything else to the `app` it is handed (it never imports
`api`, `store` or `jwt`).

The shape is waitress's: the main loop owns the channels (accepts, reads request heads
without blocking, parks idle keep-alive connections, closes the silent ones), and a task
queue hands a channel with a complete head to one of `config.threads` workers, which runs
the `Exchange` on it and gives the channel back. An idle connection costs a selector entry,
not a thread; a slow sender costs nothing until its whole head has arrived within
`socket_timeout_s`.

No `http.server` class is used, so no stdlib path can answer in HTML or log to stderr. The
sharp edges of DESIGN.md, by number, and where each is handled (`exchange` names its own):
  2 HTML errors: no stdlib handler runs; every protocol error is the contract's JSON.
  3 unknown verbs: any method token reaches the router (404/405).   5 bodies: `protocol`
  (one `Content-Length`, digits, capped 413; `Transfer-Encoding` refused 411).   7 a
  deadline on the head.   8 a cap on connections (fast 503), a large listen backlog, a
  bounded thread pool.   9 `drain()`.   10 `Server: dataproc`.   11 logging only.
  14 `protocol.split_target`.   15 duplicated headers kept.   16 no reverse DNS on bind.
  17 `TCP_NODELAY`.   1, 4, 6, 12, 13, 17, 18: `exchange`.
"""

from __future__ import annotations

import logging
import queue
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable

from . import protocol
from .config import Config
from .errors import ApiError
from .exchange import Channel, Exchange, Next, Observer
from .web import Request, Response, error_response

log = logging.getLogger("dataproc.server")

LINGER_S = 1.0  # at most this long (and LINGER_MAX_BYTES) reading a refused request's rest
LINGER_MAX_BYTES = 1 << 20
RECV_BYTES = 65536  # per read of a parked socket
ACCEPT_BATCH = 64  # connections accepted per wake, so a flood cannot starve parked ones
SWEEP_S = 0.05  # how often parked connections are checked against their deadlines
BUSY_DETAIL = "server busy, retry in one second"


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
        # A worker reads a next request itself only while no other channel queues for one.
        self._exchange = Exchange(
            config, app, observe, lambda: self.draining, lambda: not self._tasks.empty()
        )
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

    def _park(self, channel: Channel, *, finished: bool = False) -> None:
        """Wait in the selector for the rest of a request head, or for the next request
        (from the loop or a worker). Entered in `_parked` under the lock that `drain` and
        `server_close` take, so they see every parked channel; armed after it, because the
        epoll call releases the GIL and a lock held across it made every other worker wait.
        If `server_close` won meanwhile, arming fails (or finds the channel gone) and the
        channel is closed here; none is left open with no loop to watch it. `finished`: a
        worker hands the channel back (one lock for both)."""
        if not channel.lingering:
            channel.deadline = time.monotonic() + self.config.socket_timeout_s
        fd = channel.sock.fileno()
        with self._lock:
            parked = fd >= 0 and not (self._closed or (self.draining and not channel.lingering))
            if parked:
                self._parked[fd] = channel
                if finished:
                    self._release_worker()
                    finished = False
        if parked:
            try:
                self._poller.arm(fd)
                return
            except (ValueError, OSError):  # the client's socket, or the poller, is gone
                with self._lock:
                    if self._parked.get(fd) is channel:
                        del self._parked[fd]
        self._close(channel)
        if finished:  # after the close: once `drain` sees no busy worker, this one is closed
            with self._lock:
                self._release_worker()

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
        fd = channel.sock.fileno()
        with self._lock:
            self._parked[fd] = channel
        self._poller.arm(fd)  # outside the lock, as in `_park`; the poller outlives this loop

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
                after = self._exchange.serve(channel)
            except Exception:  # a bug here must not kill the worker; the client is closed
                log.exception("connection failed")
                after = Next.CLOSE
            self._finish(channel, after)

    def _finish(self, channel: Channel, after: Next) -> None:
        """Give the channel back to the loop, or close it (always when draining)."""
        if after is Next.LINGER and not self._start_linger(channel):
            after = Next.CLOSE
        if after is not Next.CLOSE:
            self._park(channel, finished=True)
            return
        self._close(channel)
        with self._lock:
            self._release_worker()

    def _release_worker(self) -> None:
        """One worker fewer is busy (called under `_lock`); `drain` waits for none."""
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
        """Close the socket and free its slot, once (a worker and `server_close` may race)."""
        _close_socket(channel.sock)
        with self._lock:
            counted, channel.counted = channel.counted, False
            if counted:
                self._open -= 1
        if counted:
            self.shutdown_request(channel.sock)

    def shutdown_request(self, sock: socket.socket) -> None:
        """A hook: an accepted connection has ended and its slot is free again."""

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
