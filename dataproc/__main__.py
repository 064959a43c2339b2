"""The command line: `python -m dataproc [serve|source|init-db|create-user|populate|
migrate-partitions|prune]`.

Owns: parsing arguments, building the `Config` from the environment and `.env`, running one
command, shutting down on SIGTERM/SIGINT, and turning expected failures into one line on
stderr with a non-zero exit (never a traceback). Leaves "nothing configured" to `zeroconf`
(every command resolves its `Config` there, and closes what that started) and the wiring to
`runtime`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import threading

from . import __version__, logs, rules
from .config import SETTINGS, Config, ConfigError, from_env, read_setting
from .upstream import simulated  # stdlib only: its default port is the `source` command's

log = logging.getLogger("dataproc.main")


# `serve --host/--port/--workers` override these settings.
OVERRIDES = ("host", "port", "workers")
_SETTING = {entry.field: entry for entry in SETTINGS}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = argparse.ArgumentParser(prog="dataproc", description="Data-point ingestion service.")
    parser.add_argument("--version", action="version", version=f"dataproc {__version__}")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the service (the default command)")
    for name in OVERRIDES:  # each one a setting: its help, variable and default from the schema
        entry = _SETTING[name]
        serve.add_argument(
            f"--{name}", help=f"{entry.help} ({entry.variable}, default {entry.readme_default})"
        )
    source = commands.add_parser("source", help="run the simulated upstream")
    source.add_argument("--host", default="127.0.0.1")
    source.add_argument("--port", type=int, default=simulated.DEFAULT_PORT)
    source.add_argument("--seed", type=int)
    commands.add_parser("init-db", help="apply schema.sql to the database (idempotent)")
    user = commands.add_parser("create-user", help="create a user or reset its password")
    user.add_argument("name")
    user.add_argument("--admin", action="store_true", help="give the user the admin role")
    populate = commands.add_parser("populate", help="one ingestion run")
    populate.add_argument(
        "--count",
        type=int,
        default=1,
        help=f"points to fetch ({rules.COUNT.low}..{rules.COUNT.high})",
    )
    migrate = commands.add_parser(
        "migrate-partitions", help="convert a plain data_points to DATAPROC_PARTITION partitions"
    )
    migrate.add_argument("--batch", type=int, default=50_000, help="rows per batch (50,000)")
    prune = commands.add_parser("prune", help="apply DATAPROC_RETENTION once")
    prune.add_argument("--batch", type=int, default=10_000, help="rows per delete (10,000)")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The configuration from the environment and `.env`, with command-line overrides (each
    read by its setting's own parser, so `--port` and DATAPROC_PORT accept the same values)."""
    config = from_env(os.environ)
    overrides = {}
    for name in OVERRIDES:
        text = getattr(args, name, None)
        if text is not None:
            try:
                overrides[name] = read_setting(name, text)
            except ValueError as error:
                raise ConfigError(f"--{name}: {error}") from None
    return config.replace(**overrides)


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    """Run the service until SIGTERM or SIGINT, then drain and exit 0."""
    from .runtime import Service

    if config.workers > 1:
        from .workers import serve_workers

        return serve_workers(config)
    service = Service(config).start()
    wait_for_signal()
    log.info("shutting down: draining requests (up to %g s)", config.shutdown_grace_s)
    finished = service.stop()
    log.info("stopped%s", "" if finished else " (some requests were cut off at the grace limit)")
    return 0


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(3600):
        pass


def cmd_source(args: argparse.Namespace, config: Config | None) -> int:
    """Run the simulated upstream."""
    argv = ["--host", args.host, "--port", str(args.port)]
    return simulated.main(argv + (["--seed", str(args.seed)] if args.seed is not None else []))


def cmd_init_db(args: argparse.Namespace, config: Config) -> int:
    """Apply schema.sql, then build the rollups of existing points when they are missing."""
    from . import runtime, zeroconf
    from .store import rollups

    with zeroconf.resolve(config, serving=False, upstream=False) as resolved:
        pool = runtime.connect(resolved.config, max_size=1)
        try:
            rollups.rebuild_if_missing(pool)  # a database made by the original has none yet
        finally:
            pool.close()
    print("schema applied")
    return 0


def read_new_password() -> str:
    """A password from stdin (piped) or typed twice at a prompt."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Repeat it: ") != first:
        raise ConfigError("password: the two entries differ")
    return first


def cmd_create_user(args: argparse.Namespace, config: Config) -> int:
    """Create a user or reset its password (and role)."""
    from . import passwords, runtime, store, zeroconf

    if not rules.USERNAME.fullmatch(args.name):
        raise ConfigError(f"NAME: {rules.USERNAME_RULE}")
    password = read_new_password()
    if not rules.password_fits(password, config.password_min_bytes):
        raise ConfigError(f"password: {rules.password_rule(config.password_min_bytes)}")
    role = "admin" if args.admin else "user"
    with zeroconf.resolve(config, serving=False, upstream=False) as resolved:
        pool = runtime.connect(resolved.config, max_size=1)
        try:
            created = store.upsert_user(
                pool, args.name, passwords.hash_password(password, config.bcrypt_cost), role
            )
        finally:
            pool.close()
    print(f"{'created' if created else 'updated'} {role} {args.name}")
    return 0


def cmd_populate(args: argparse.Namespace, config: Config) -> int:
    """One ingestion run; prints what was stored as JSON."""
    from . import ingest, runtime, zeroconf

    if args.count not in rules.COUNT:
        raise ConfigError(
            f"--count: must be between {rules.COUNT.low} and {rules.COUNT.high}, got {args.count}"
        )
    with zeroconf.resolve(config, serving=False) as resolved:
        config = resolved.config
        pool = runtime.connect(config, max_size=1)
        try:
            batch = ingest.Ingestor(config, pool, config.upstream_url).batch(args.count)
        except ingest.IngestFailure as failure:
            raise ConfigError(f"populate: {failure.reason}") from None
        finally:
            pool.close()
    print(
        json.dumps(
            {
                "stored": [json.loads(p) for p in batch.stored],
                "duplicates": batch.duplicates,
                "rejected": [{"reason": r} for r in batch.rejected],
            }
        )
    )
    return 0


def cmd_migrate_partitions(args: argparse.Namespace, config: Config) -> int:
    """Convert a plain data_points to the partitioned layout (resumable); prints the outcome."""
    from . import runtime, store, zeroconf
    from .progress import Progress
    from .store import migration

    if config.partition == "none":
        raise ConfigError("DATAPROC_PARTITION: set day, week or month for migrate-partitions")
    if not 1 <= args.batch <= 10_000_000:
        raise ConfigError(f"--batch: must be between 1 and 10000000, got {args.batch}")
    progress = Progress("migrate-partitions")
    with zeroconf.resolve(config, serving=False) as resolved:
        pool = runtime.connect(resolved.config, max_size=1)
        try:
            with store.connection(pool) as conn:
                done = migration.migrate(
                    conn, config.partition, batch=args.batch, on_batch=progress.update
                )
        except migration.MigrationError as error:
            raise ConfigError(f"migrate-partitions: {error}") from None
        finally:
            progress.finish()
            pool.close()
    state = "converted to" if done.swapped else "already"
    print(f"data_points {state} {config.partition} partitions: {done.rows} rows")
    return 0


def cmd_prune(args: argparse.Namespace, config: Config) -> int:
    """Apply DATAPROC_RETENTION once; prints what was removed."""
    from . import runtime, store, zeroconf
    from .progress import Progress
    from .store import partitions

    keep_s = config.retention_s
    if keep_s is None:
        raise ConfigError("DATAPROC_RETENTION: not set (e.g. 90d), so there is nothing to prune")
    if not 1 <= args.batch <= 1_000_000:
        raise ConfigError(f"--batch: must be between 1 and 1000000, got {args.batch}")
    progress = Progress("prune")
    with zeroconf.resolve(config, serving=False) as resolved:
        pool = runtime.connect(resolved.config, max_size=1)
        try:
            with store.connection(pool) as conn:
                pruned = partitions.prune(
                    conn,
                    keep_s,
                    batch=args.batch,
                    on_batch=lambda _k, d, t: progress.update(d, t),
                )
        finally:
            progress.finish()
            pool.close()
    print(
        json.dumps(
            {
                "before": pruned.cut.isoformat() if pruned.cut else None,
                "points": pruned.points,
                "rejects": pruned.rejects,
                "partitions": pruned.partitions,
            }
        )
    )
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "source": cmd_source,
    "init-db": cmd_init_db,
    "create-user": cmd_create_user,
    "populate": cmd_populate,
    "migrate-partitions": cmd_migrate_partitions,
    "prune": cmd_prune,
}


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures print one line and return a non-zero status."""
    args = build_parser().parse_args(argv)
    args.command = args.command or "serve"
    for name in OVERRIDES:
        setattr(args, name, getattr(args, name, None))
    from .store import DatabaseUnavailable
    from .zeroconf import StartupError

    try:
        if args.command == "source":
            logs.configure()
            return cmd_source(args, None)
        config = load_config(args)
        logs.configure(config.log_level, config.log_format)
        return COMMANDS[args.command](args, config)
    except (ConfigError, StartupError, DatabaseUnavailable) as error:
        message = error.detail if isinstance(error, DatabaseUnavailable) else str(error)
        print(f"dataproc {args.command}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
