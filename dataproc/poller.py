"""Scheduled ingestion: one point from the upstream every `DATAPROC_POLL_INTERVAL_S` seconds.

Owns: the background thread, its schedule, and the choice of which replica polls. Leaves the
ingestion itself (fetch, parse, rules, store) to `ingest`.

Any number of replicas (separate machines, or `serve --workers N`) may run a poller; exactly
one of them polls at a time. The one that polls holds a session-level PostgreSQL advisory
lock on a connection of its own (not a pooled one, which would carry the lock to whoever uses
it next). It keeps the lock, and so the job, until it stops or its connection dies; then
PostgreSQL releases the lock and another replica takes it on its next tick. No clock or
membership list is shared: the database decides.
"""

from __future__ import annotations

import contextlib
import logging
import time

import psycopg

from .ingest import IngestFailure, Ingestor
from .jobs import Job
from .store import POLLER_LOCK_KEY, POLLER_UNLOCK, STILL_HERE, TRY_POLLER_LOCK

log = logging.getLogger("dataproc.poller")


class Poller(Job):
    """Ingest one point per interval while this process holds the poller lock."""

    def __init__(
        self,
        interval_s: float,
        conninfo: str,
        ingestor: Ingestor,
        *,
        connect_timeout_s: float = 5.0,
    ):
        self.interval_s, self.conninfo, self.ingestor = interval_s, conninfo, ingestor
        self.connect_timeout_s = connect_timeout_s
        self.polls = 0  # ingestions attempted by this process
        self.failures = 0  # of those, how many failed (the next tick retries)
        self._conn: psycopg.Connection | None = None  # dedicated: never a pooled one
        self._leader = False
        super().__init__("dataproc-poller")

    @property
    def leader(self) -> bool:
        """True while this process holds the lock (and so is the one that polls)."""
        return self._leader

    def start(self) -> Poller:
        """Start ticking in a background thread; returns at once. `stop()` waits for a tick
        in progress, and the lock is released as the thread ends."""
        log.info("polling the upstream every %g s (one replica at a time)", self.interval_s)
        return super().start()

    def _run(self) -> None:
        # A fixed schedule: a slow ingestion does not push the next tick back; a tick missed
        # while one ran long is skipped, not caught up in a burst.
        next_at = time.monotonic()
        try:
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                self.tick()
                next_at = max(next_at + self.interval_s, time.monotonic())
        finally:
            self._release()

    def tick(self) -> bool:
        """One tick: poll when we hold (or can take) the lock; True when we polled."""
        if not self._hold_lock():
            return False
        self.polls += 1
        try:
            self.ingestor.one()
        except IngestFailure as failure:
            self.failures += 1
            log.warning(
                "scheduled ingestion failed (%s): %s; retrying next tick",
                failure.kind,
                failure.reason,
            )
        except Exception as error:  # the database went away, a bug: keep ticking regardless
            self.failures += 1
            log.warning("scheduled ingestion failed: %s; retrying next tick", _first_line(error))
        return True

    def _hold_lock(self) -> bool:
        """Keep the lock we hold (checking its session is alive), or try to take it."""
        conn = self._connection()
        if conn is None:
            return False
        try:
            if self._leader:
                conn.execute(STILL_HERE)  # the lock lives exactly as long as this session
                return True
            row = conn.execute(TRY_POLLER_LOCK, (POLLER_LOCK_KEY,)).fetchone()
            self._leader = bool(row and row[0])  # a SELECT of one function: always one row
        except psycopg.Error as error:
            log.warning(
                "poller lock connection failed (%s)%s",
                _first_line(error),
                "; another replica may take over" if self._leader else "",
            )
            self._release()
            return False
        if self._leader:
            log.info("took the poller lock: this replica polls the upstream")
        return self._leader

    def _connection(self) -> psycopg.Connection | None:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(
                    self.conninfo,
                    autocommit=True,
                    connect_timeout=max(2, int(self.connect_timeout_s)),
                )
            except psycopg.Error as error:
                log.warning("poller cannot reach the database: %s", _first_line(error))
                return None
        return self._conn

    def _release(self) -> None:
        # Unlock first: closing the session releases the lock too, but only once its backend
        # has gone, which takes a moment after close() returns; another replica waiting to
        # take over should not see the lock still held. Closing alone works on a broken one.
        conn, leader, self._conn, self._leader = self._conn, self._leader, None, False
        if conn is None:
            return
        if leader and not conn.closed:
            with contextlib.suppress(psycopg.Error):
                conn.execute(POLLER_UNLOCK, (POLLER_LOCK_KEY,))
        conn.close()


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
