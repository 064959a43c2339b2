"""Wiring: from a `Config` to a running service, and back down in order.

Owns: the pool's life (`connect`), the request handler (`create_app`), the default-admin
warning, and `Service` (start, stop) that `__main__`, `workers`, the tests and embedding
programs use. Leaves "nothing configured" to `zeroconf` (the embedded database, the keys, the
simulated upstream: `Service.start` resolves the `Config` and `stop` tears down what that
started), every request to `api` and every socket to `server`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from psycopg_pool import ConnectionPool

from . import __version__, api, auth, ingest, notify, passwords, store, zeroconf
from .config import Config
from .metrics import Metrics
from .poller import Poller
from .server import HttpServer
from .store import replica
from .sweeper import SessionSweeper
from .upkeep import Upkeep
from .web import make_app
from .zeroconf import StartupError

__all__ = [
    "Service",
    "StartupError",
    "connect",
    "create_app",
    "database_url",
    "resolve_to_serve",
    "warn_if_default_admin",
]

log = logging.getLogger("dataproc.runtime")

DEFAULT_ADMIN = ("admin", "admin")
DEFAULT_ADMIN_HASH = "$2b$12$a/pMatsPyWuHa5KdqatsFOLZgPYjPZU4If4//jeretXqZ.ujoYFJG"  # schema.sql


def database_url(config: Config) -> str:
    """The database of a resolved `Config` (`zeroconf.resolve` fills it in when none is set)."""
    if config.database_url is None:
        raise StartupError("no database: resolve the configuration first (zeroconf.resolve)")
    return config.database_url


def resolve_to_serve(config: Config) -> zeroconf.ZeroConf:
    """`zeroconf.resolve` for serving; a configured database (one zeroconf did not start) is
    then waited for, up to `db_start_wait_s`: compose may start the service before it, and
    podman-compose ignores `depends_on: condition: service_healthy`."""
    resolved = zeroconf.resolve(config)
    if resolved.postgres is None:  # DatabaseUnavailable after the wait: a one-line error
        store.wait_for_database(database_url(resolved.config), config.db_start_wait_s)
    return resolved


def connect(config: Config, *, max_size: int | None = None) -> ConnectionPool:
    """An open pool on the (resolved) configuration's database, with the schema applied."""
    pool = store.make_pool(
        database_url(config), max_size=max_size or config.db_pool_size, wait_s=config.db_wait_s
    )
    store.open_pool(pool, config.db_wait_s)
    store.apply_schema(pool, config.partition)
    return pool


def create_app(
    config: Config,
    pool: ConnectionPool,
    *,
    metrics: Metrics | None = None,
    reads: replica.Reads | None = None,
    listener: notify.Listener | None = None,
):
    """The request handler of the service (`Request -> Response`), for `server` or embedding;
    the upstream is `config.upstream_url`. `listener` (one per process) tells the handlers of
    every session that ends; without one, each token's session is looked up (fail closed).

    With `metrics`, populate outcomes are counted and served at /metrics; hand
    `metrics.observe` to the server as its observer so requests are counted too."""
    on_outcome = metrics.outcome if metrics is not None else None
    return make_app(
        api.build_router(
            api.Context(
                config,
                pool,
                on_outcome=on_outcome,
                metrics=metrics,
                reads=reads,
                listener=listener,
            )
        )
    )


def open_reads(config: Config, pool: ConnectionPool) -> replica.Reads:
    """Where reads of points go: `DATAPROC_READ_DATABASE_URL`'s standby first, when set. Its
    wait for a connection is a third of the database wait (at most 1 s), so that a standby
    that does not answer leaves the rest of the wait to the primary."""
    if not config.read_database_url:
        return replica.Reads(pool)
    standby = replica.make_standby_pool(
        config.read_database_url,
        max_size=config.db_pool_size,
        wait_s=min(1.0, config.db_wait_s / 3),
    )
    log.info("reads of points go to the standby of DATAPROC_READ_DATABASE_URL first")
    return replica.Reads(pool, standby)


def warn_if_default_admin(pool: ConnectionPool) -> None:
    """Log a warning while the admin still has the original's default password."""
    try:
        user = store.get_user(pool, DEFAULT_ADMIN[0])
    except store.DatabaseUnavailable:
        return
    if not user or user.role != "admin":
        return
    # The seeded hash (schema.sql) is the default password without a cost-12 bcrypt check;
    # any other hash is checked, in case someone set the password back to 'admin'.
    if user.hashed_password == DEFAULT_ADMIN_HASH or passwords.verify_password(
        DEFAULT_ADMIN[1], user.hashed_password, 4
    ):
        log.warning(
            "the admin account still has the default password 'admin': change it with "
            "'python -m dataproc create-user admin --admin'"
        )


class Service:
    """The whole service in this process: database, upstream, HTTP server. `start`, `stop`."""

    def __init__(self, config: Config, *, sock: Any = None):
        # A pre-forked worker passes the listening socket and its parent's resolved `Config`
        # (which resolves to itself), so nothing is opened or started twice.
        self.config = config
        self._sock = sock
        self.pool: ConnectionPool | None = None
        self.http: HttpServer | None = None
        self.poller: Poller | None = None
        self.upkeep: Upkeep | None = None
        self.reads: replica.Reads | None = None
        self.sweeper: SessionSweeper | None = None
        self.metrics: Metrics | None = None
        self.listener: notify.Listener | None = None
        self._zeroconf: zeroconf.ZeroConf | None = None
        self._thread: threading.Thread | None = None
        self._admin_check: threading.Thread | None = None

    def start(self) -> Service:
        """Open everything and serve in a background thread; returns at once."""
        self._zeroconf = resolve_to_serve(self.config)
        self.config = self._zeroconf.config
        self.pool = connect(self.config)
        self.metrics = Metrics(__version__) if self.config.metrics_enabled else None
        # One listener per process, before serving; not waited for: until it is healthy the
        # caches that use it fail closed (every read goes to the database).
        self.listener = notify.Listener(database_url(self.config), notify.CHANNELS)
        self.listener.start()
        self.reads = open_reads(self.config, self.pool)
        app = create_app(
            self.config, self.pool, metrics=self.metrics, reads=self.reads, listener=self.listener
        )
        self.http = HttpServer(
            self.config,
            app,
            sock=self._sock,
            observe=self.metrics.observe if self.metrics else None,
        )
        self._thread = threading.Thread(
            target=self.http.serve_forever,
            name="dataproc-http",
            kwargs={"poll_interval": 0.2},
            daemon=True,
        )
        self._thread.start()
        log.info("dataproc listening on http://%s:%d/", *self.http.server_address[:2])
        if self.config.poll_interval_s > 0:
            ingestor = ingest.Ingestor(
                self.config,
                self.pool,
                self.config.upstream_url,
                on_outcome=self.metrics.outcome if self.metrics else None,
            )
            self.poller = Poller(
                self.config.poll_interval_s,
                database_url(self.config),
                ingestor,
                connect_timeout_s=self.config.db_wait_s,
            ).start()
        self.upkeep = Upkeep(
            database_url(self.config),
            partition=self.config.partition,
            retention_s=self.config.retention_s,
            connect_timeout_s=self.config.db_wait_s,
            on_pruned=self.metrics.retention if self.metrics else None,
        )
        if self.upkeep.needed:  # partitions made ahead, retention: one replica at a time
            self.upkeep.start()
        self.sweeper = SessionSweeper(  # one replica at a time, by a lock
            self.pool, stale_claim_s=auth.claim_stale_s(self.config)
        ).start()
        self._admin_check = threading.Thread(
            target=warn_if_default_admin,
            args=(self.pool,),
            name="dataproc-admin-check",
            daemon=True,
        )
        self._admin_check.start()
        return self

    @property
    def url(self) -> str:
        """The base URL of the running service."""
        if self.http is None:
            raise RuntimeError("the service is not started")
        return f"http://{self.http.server_name}:{self.http.port}/"

    def stop(self, grace_s: float | None = None) -> bool:
        """Stop accepting, let in-flight requests finish (bounded), close the pool."""
        finished = True
        if self.http is not None:
            finished = self.http.drain(self.config.shutdown_grace_s if grace_s is None else grace_s)
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.poller is not None:
            self.poller.stop()
        if self.upkeep is not None:
            self.upkeep.stop()
        if self.sweeper is not None:
            self.sweeper.stop()
        if self.listener is not None:
            self.listener.stop()
        if self._admin_check is not None:
            # A daemon thread still inside bcrypt (Rust) when the interpreter exits aborts the
            # process ("FATAL: exception not rethrown", SIGABRT): let the check finish first.
            self._admin_check.join(timeout=10)
        if self.reads is not None:
            self.reads.close()
        if self.pool is not None:
            self.pool.close(timeout=5)
        if self._zeroconf is not None:
            self._zeroconf.close()  # the simulated upstream, the embedded PostgreSQL
        return finished
