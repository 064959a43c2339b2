"""LISTEN/NOTIFY: one dedicated PostgreSQL connection per process that hears every write.

Owns: the listening connection (autocommit, its own, never a pooled one), the thread that waits
on it and dispatches each notification to the callbacks subscribed to its channel, reconnecting
after a loss, and `healthy`, which callers read as "every write is being heard". The NOTIFYs
themselves are sent by triggers in schema.sql, so no writer (a replica, the CLI, plain SQL, a
COPY) can forget one; PostgreSQL delivers them at commit, so a listener hears of a change only
once it is visible to every new snapshot.

Fail closed: while the connection is down nothing is heard, so `healthy` is False from the
moment the loss is seen until the connection is back, LISTEN is established again and every
`on_reset` callback has run (anything may have changed while we were deaf). A callback that
raises is treated as a lost notification: the connection is dropped and made again, so the
resets run. Callbacks run on the listener's thread and must be quick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .store.freshness import LISTEN, STILL_LISTENING

log = logging.getLogger("dataproc.notify")

POINTS, USERS, SESSIONS = "dataproc_points", "dataproc_users", "dataproc_sessions"
CHANNELS = (POINTS, USERS, SESSIONS)  # what runtime.Service's listener listens on
_TICK_S = 0.1  # how often the thread looks at the stop flag: bounds stop()'s wait
_PING_S = 1.0  # an idle connection is checked this often (a silent network loss)
# A silently dead peer is noticed within seconds, not at the kernel's ~15 min retransmission
# timeout: TCP keepalives and a bound on unacknowledged data (ignored on Unix sockets).
_CONNECT_TIMEOUT_S = 2
# libpq parameters, passed through as text.
_CONNECT_PARAMS: dict[str, str | int] = {
    "connect_timeout": _CONNECT_TIMEOUT_S,
    "application_name": "dataproc-listener",
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 2,
    "tcp_user_timeout": 2000,
}


class _CallbackFailed(Exception):
    """A callback raised: what it should have recorded may be lost, so start again deaf."""


class Listener:
    """One dedicated PostgreSQL connection (autocommit) LISTENing on channels; one daemon thread
    waits on it (psycopg `conn.notifies(timeout=...)`) and dispatches."""

    def __init__(self, conninfo: str, channels: Iterable[str], *, retry_s: float = 0.25) -> None:
        self._conninfo = conninfo
        self._channels = tuple(dict.fromkeys(channels))
        self._retry_s = retry_s
        self._subscribers: dict[str, list[Callable[[str], None]]] = {}
        self._resets: list[Callable[[], None]] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = False
        self._backend_pid: int | None = None

    def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call `callback(payload)` for every notification on `channel` (one it listens on)."""
        if channel not in self._channels:
            raise ValueError(f"not listening on {channel!r}; pass it to Listener()")
        self._subscribers.setdefault(channel, []).append(callback)

    def on_reset(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after every (re)connect, before `healthy` turns True."""
        self._resets.append(callback)

    @property
    def healthy(self) -> bool:
        """True only while LISTEN is established and the thread runs."""
        thread = self._thread
        return self._healthy and thread is not None and thread.is_alive()

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend of the listening connection while connected (for tests and
        the operator: `pg_terminate_backend` on it must make `healthy` False)."""
        return self._backend_pid

    def start(self) -> None:
        """Start the thread; it connects, LISTENs, runs the resets, then dispatches."""
        if self._thread is not None:
            raise RuntimeError("Listener already started")
        self._thread = threading.Thread(target=self._run, name="dataproc-listener", daemon=True)
        self._thread.start()

    def wait_healthy(self, timeout_s: float) -> bool:
        """Wait until `healthy` (True) or the timeout (False): start-up and tests use it."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy:
            if time.monotonic() >= deadline or self._stopping.is_set():
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        """Stop the thread (within about a tick, or a connect attempt) and close the connection."""
        self._stopping.set()
        self._healthy = False
        if self._thread is not None:
            self._thread.join(timeout=_CONNECT_TIMEOUT_S + 1)

    # --- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                with self._connect() as conn:
                    failures = 0
                    self._serve(conn)
            except (psycopg.Error, OSError, _CallbackFailed) as error:
                self._lost(error, failures)
                failures += 1
            finally:
                self._healthy = False
                self._backend_pid = None
            if failures > 1:  # the first retry at once: a single lost connection costs no wait
                self._stopping.wait(self._retry_s)

    def _connect(self) -> psycopg.Connection:
        conninfo = make_conninfo(self._conninfo, **_CONNECT_PARAMS)
        conn = psycopg.connect(conninfo, autocommit=True)
        try:
            for channel in self._channels:
                conn.execute(sql.SQL(LISTEN).format(sql.Identifier(channel)))
        except BaseException:
            conn.close()
            raise
        return conn

    def _serve(self, conn: psycopg.Connection) -> None:
        """Resets, then healthy, then notifications until the connection fails or we stop."""
        self._backend_pid = conn.info.backend_pid
        for reset in self._resets:
            self._call(reset)
        self._healthy = True
        log.info("listening for changes on %s", ", ".join(self._channels))
        last_seen = time.monotonic()
        while not self._stopping.is_set():
            for note in conn.notifies(timeout=_TICK_S):
                last_seen = time.monotonic()
                for callback in self._subscribers.get(note.channel, ()):
                    self._call(callback, note.payload)
            if time.monotonic() - last_seen > _PING_S:
                conn.execute(STILL_LISTENING)  # raises on a connection that died silently
                last_seen = time.monotonic()

    def _call(self, callback: Callable[..., None], *args: str) -> None:
        try:
            callback(*args)
        except Exception as error:
            log.exception("listener callback failed; reconnecting so that every cache resets")
            raise _CallbackFailed() from error

    def _lost(self, error: BaseException, failures: int) -> None:
        if self._stopping.is_set():
            return
        if failures == 0:  # one line per outage, not one per retry
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning(
                "change listener lost (%s); reads bypass the cache until it is back", reason
            )
