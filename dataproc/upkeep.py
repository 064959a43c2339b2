"""Upkeep of the points table, one replica at a time: the next partitions made ahead
(`DATAPROC_PARTITION`) and retention applied (`DATAPROC_RETENTION`).

Owns: the background thread, its schedule and its advisory lock. Leaves the SQL to
`store.partitions`. Each run takes a session-level PostgreSQL advisory lock on a connection of
its own (never a pooled one), does its work, unlocks and closes: a replica that finds the lock
held skips the run, so any number of replicas (or `serve --workers N`) run it once between
them. A run that dies with its connection releases the lock with the session.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping

import psycopg

from .jobs import Job
from .store import partitions

log = logging.getLogger("dataproc.upkeep")

INTERVAL_S = 600.0  # partitions are made four periods ahead; retention is at most this late


class Upkeep(Job):
    """Every `interval_s` (and once at start): partitions ahead, then retention."""

    def __init__(
        self,
        conninfo: str,
        *,
        partition: str,
        retention_s: float | None,
        connect_timeout_s: float = 5.0,
        interval_s: float = INTERVAL_S,
        on_pruned: Callable[[Mapping[str, int]], None] | None = None,
    ):
        self.conninfo, self.partition, self.retention_s = conninfo, partition, retention_s
        self.connect_timeout_s, self.interval_s, self.on_pruned = (
            connect_timeout_s,
            interval_s,
            on_pruned,
        )
        self.runs = 0  # runs this process did (it held the lock)
        super().__init__("dataproc-upkeep")

    @property
    def needed(self) -> bool:
        """False when there is nothing to keep up (no partitioning, no retention)."""
        return self.partition != "none" or self.retention_s is not None

    def _run(self) -> None:
        # At once, then every interval; `stop()` waits for the run in progress (a prune ends
        # after its current batch's statement).
        while True:
            try:
                self.run_once()
            except Exception as error:  # the database went away, a bug: try again next time
                log.warning(
                    "upkeep failed: %s; retrying in %g s", _first_line(error), self.interval_s
                )
            if self._stop.wait(self.interval_s):
                return

    def run_once(self) -> bool:
        """One run if this replica gets the lock; True when it ran."""
        with psycopg.connect(
            self.conninfo, autocommit=True, connect_timeout=max(2, int(self.connect_timeout_s))
        ) as conn:
            lock = (partitions.UPKEEP_LOCK_KEY,)
            if not partitions.one_row(conn, partitions.TRY_UPKEEP_LOCK, lock)[0]:
                return False
            try:
                self._work(conn)
            finally:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(partitions.UPKEEP_UNLOCK, (partitions.UPKEEP_LOCK_KEY,))
        self.runs += 1
        return True

    def _work(self, conn: psycopg.Connection) -> None:
        shape = partitions.layout(conn)
        if self.partition != "none" and shape == "partitioned":
            made = partitions.make_ahead(conn, self.partition)
            if made:
                log.info("made partitions %s", ", ".join(made))
        elif self.partition != "none" and shape == "plain":
            log.warning(
                "DATAPROC_PARTITION=%s but data_points is a plain table: "
                "convert it with 'dataproc migrate-partitions'",
                self.partition,
            )
        if self.retention_s is not None and not self._stop.is_set():
            pruned = partitions.prune(conn, self.retention_s)
            log.info(
                "retention: removed %d points, %d rejects and %d partitions older than %s",
                pruned.points,
                pruned.rejects,
                len(pruned.partitions),
                pruned.cut.isoformat() if pruned.cut else "?",
            )
            if self.on_pruned is not None:
                self.on_pruned(pruned.counts())


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
