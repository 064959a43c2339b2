"""What every handler is handed: the configuration (the upstream among it), the pool, the one
clock every time decision reads, the login guards and the live sessions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg_pool import ConnectionPool

from .. import auth, ingest, notify
from ..cache import ReadCache
from ..config import Config
from ..metrics import Metrics
from ..store.replica import Reads


@dataclass
class Context:
    """What handlers need: the resolved configuration (its `upstream_url` is the upstream), the
    pool, the clock (tokens, sessions, throttling and ingestion all read this one, so a test
    can move time), the login guards, the record of live sessions and the export slots."""

    config: Config
    pool: ConnectionPool
    clock: Callable[[], float] = time.time
    on_outcome: Callable[[str], None] | None = None
    metrics: Metrics | None = None  # served at /metrics; None (or DATAPROC_METRICS=false): 404
    # Reads of points: a streaming standby first when one is configured, else `pool`.
    reads: Reads | None = None
    # Hears every write (LISTEN/NOTIFY); None without one: what relies on it fails closed.
    listener: notify.Listener | None = None
    throttle: auth.LoginThrottle = field(init=False)
    checker: auth.PasswordChecker = field(init=False)
    sessions: auth.SessionRegistry = field(init=False)
    exports: threading.BoundedSemaphore = field(init=False)  # slots of concurrent exports
    # Answers of reads and the roles of callers (DATAPROC_CACHE); serves nothing while
    # `listener` is unhealthy or absent.
    cache: ReadCache = field(init=False)

    def __post_init__(self) -> None:
        if self.reads is None:
            self.reads = Reads(self.pool)
        self.throttle = auth.LoginThrottle(
            self.config.login_max_failures, self.config.login_window_s
        )
        self.checker = auth.PasswordChecker(self.config)
        self.sessions = auth.SessionRegistry(self.pool, self.listener)
        self.exports = threading.BoundedSemaphore(self.config.export_slots)
        self.cache = ReadCache(
            self.listener,
            max_bytes=self.config.cache_mb * 1024 * 1024,
            enabled=self.config.cache_enabled,
        )

    def ingestor(self) -> ingest.Ingestor:
        """An ingestor for the configured upstream."""
        return ingest.Ingestor(
            self.config,
            self.pool,
            self.config.upstream_url,
            clock=self.clock,
            on_outcome=self.on_outcome,
        )
