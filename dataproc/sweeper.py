"""Expired sessions removed in the background, one replica at a time.

Owns: the thread that, every `interval_s`, deletes the sessions whose refresh lifetime ran
out and the ended ones older than a day (`store.sessions.sweep_sessions`), and the claims on
usernames that signups left when their process died between claim and hash. Which replica
sweeps is decided per sweep by a transaction-scoped PostgreSQL advisory lock: one that finds
it taken skips that sweep, and nothing is held between sweeps (no connection, no leader), so
a replica that dies mid-sweep leaves nothing behind but a rolled-back batch.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

from psycopg_pool import ConnectionPool

from .jobs import Job
from .store import DatabaseUnavailable
from .store import sessions as session_store

log = logging.getLogger("dataproc.sweeper")

SWEEP_INTERVAL_S = 600.0  # sessions only need to stay small, not be gone to the second
KEEP_ENDED_S = 86_400.0  # an ended session's row is kept a day (why it ended, for the logs)


class SessionSweeper(Job):
    """Every `interval_s` (the first after a random part of it, so replicas started together
    do not all try at once), one sweep of expired and long-ended sessions."""

    def __init__(
        self,
        pool: ConnectionPool,
        interval_s: float = SWEEP_INTERVAL_S,
        keep_ended_s: float = KEEP_ENDED_S,
        stale_claim_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.pool, self.interval_s, self.keep_ended_s = pool, interval_s, keep_ended_s
        self.clock = clock  # expiry is decided on the clock the tokens were issued on
        self.stale_claim_s = stale_claim_s  # None: leave claims alone
        self.removed = 0  # sessions this process has deleted
        super().__init__("dataproc-sweeper")

    def sweep(self) -> int | None:
        """One sweep now: the sessions removed, or None when another replica was sweeping."""
        now = datetime.fromtimestamp(self.clock(), UTC)
        removed = session_store.sweep_sessions(self.pool, self.keep_ended_s, now)
        if removed is not None and self.stale_claim_s is not None:
            claims = session_store.delete_stale_claims(self.pool, self.stale_claim_s)
            if claims:
                log.info("removed %d abandoned signup claims", claims)
        if removed:
            self.removed += removed
            log.info("removed %d expired or ended sessions", removed)
        return removed

    def _run(self) -> None:
        wait_s = self.interval_s * random.uniform(0.1, 1.0)
        while not self._stop.wait(wait_s):
            try:
                self.sweep()
            except DatabaseUnavailable:
                log.warning("session sweep skipped: database unavailable; retrying next time")
            except Exception as error:  # a bug must not end the thread: the next sweep retries
                log.warning("session sweep failed: %s", str(error).splitlines()[0] or error)
            wait_s = self.interval_s
