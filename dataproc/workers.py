"""`serve --workers N`: N pre-forked service processes sharing one listening socket.

Owns: the parent process (resolve the configuration once with `runtime.resolve_to_serve`,
apply the schema, bind once, fork, forward signals, restart a worker that dies, exit 0 after
a clean stop, then tear down what resolving started) and the start of each worker. Leaves everything a worker
does to `runtime.Service`. POSIX only (`os.fork`).

Why pre-fork: one CPython process serves on about one core; N processes use N. The kernel
hands each new connection to one of the workers waiting on the shared socket. Workers keep
no state of their own (JWTs carry identity, PostgreSQL holds the rest), so any of them can
answer any request, as any replica on another machine can.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from . import runtime
from .config import Config

log = logging.getLogger("dataproc.workers")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0  # more crashes than this in the window: give up
KILL_AFTER_S = 10.0  # past the drain grace, a worker that has not left is killed


def serve_workers(config: Config) -> int:
    """Run `config.workers` worker processes until SIGTERM/SIGINT; 0 after a clean stop."""
    # Resolved here, once: an embedded server and the simulated upstream start in the parent,
    # and every worker is handed the resolved `Config` (which resolves to itself).
    with runtime.resolve_to_serve(config) as resolved:
        config = resolved.config
        runtime.connect(config, max_size=1).close()  # the schema, before any worker
        sock = listen(config)
        log.info(
            "dataproc parent %d: %d workers on http://%s:%d/",
            os.getpid(),
            config.workers,
            *sock.getsockname()[:2],
        )
        try:
            return Supervisor(config, sock).run()
        finally:
            sock.close()


def listen(config: Config) -> socket.socket:
    """The one listening socket, non-blocking so an idle worker never hangs in `accept`."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.create_server(
            address, family=family, backlog=config.listen_backlog
        )  # SO_REUSEADDR
    except OSError as error:
        raise runtime.StartupError(
            f"cannot listen on {config.host}:{config.port}: {error.strerror or error}"
        ) from None
    # Every worker wakes on a new connection and one wins; the others get EAGAIN, which
    # socketserver ignores, instead of blocking until the next connection.
    sock.setblocking(False)
    return sock


class Supervisor:
    """The parent: forks workers, restarts crashed ones (bounded), stops them on a signal."""

    def __init__(self, config: Config, sock: socket.socket):
        self.config, self.sock = config, sock
        self.children: dict[int, float] = {}  # pid -> started at (monotonic)
        self.crashes: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> int:
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda *_: self.stopping.set())
        for _ in range(self.config.workers):
            self.spawn()
        failed = False
        while self.children and not self.stopping.is_set():
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                self.stopping.wait(0.2)
                continue
            if self.children.pop(pid, None) is None:
                continue  # not a worker of ours (a helper process the parent started)
            log.warning("worker %d died (%s)", pid, _describe(status))
            if not self.restart_allowed():
                log.error(
                    "workers keep dying (%d in %g s): stopping", len(self.crashes), RESTART_WINDOW_S
                )
                failed = True
                break
            self.stopping.wait(min(30.0, 0.5 * 2 ** (len(self.crashes) - 1)))  # backoff
            if not self.stopping.is_set():
                self.spawn()
        clean = self.stop_all()
        return 1 if failed or not clean else 0

    def restart_allowed(self) -> bool:
        now = time.monotonic()
        self.crashes = [t for t in self.crashes if now - t < RESTART_WINDOW_S] + [now]
        return len(self.crashes) <= MAX_RESTARTS

    def spawn(self) -> None:
        # Signals stay blocked across fork, so a worker never runs the parent's handlers.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            _worker(self.config, self.sock, old)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.children[pid] = time.monotonic()

    def stop_all(self) -> bool:
        """SIGTERM every worker, wait for them to drain, kill stragglers; True when all left 0."""
        log.info("stopping %d workers", len(self.children))
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace_s + KILL_AFTER_S
        clean = True
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if time.monotonic() > deadline:
                    for straggler in self.children:
                        _signal(straggler, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.05)
                continue
            if self.children.pop(pid, None) is not None and os.waitstatus_to_exitcode(status) != 0:
                log.warning("worker %d left with %s", pid, _describe(status))
                clean = False
        return clean


def _worker(config: Config, sock: socket.socket, mask) -> None:
    """A worker's whole life. It leaves through `os._exit`: the atexit handlers inherited from
    the parent (the embedded PostgreSQL's stop among them) belong to the parent alone."""
    code = 1
    try:
        stop = threading.Event()
        for signum in STOP_SIGNALS:
            signal.signal(signum, lambda *_: stop.set())
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        service = runtime.Service(config, sock=sock).start()
        while not stop.wait(3600):
            pass
        service.stop()
        code = 0
    except BaseException:
        log.exception("worker %d failed", os.getpid())
    finally:
        logging.shutdown()
        os._exit(code)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
