"""Configuration: one frozen `Config`, built once from a mapping of environment variables.

Owns: every setting, defined once (variable, field, type, default, unit, help: one `setting(...)`
entry per field of `Config`), the variables that are not one field each (`OTHER_VARIABLES`),
their validation, and `.env` reading. `SETTINGS` is derived from `Config`, and
`tests/unit/test_config.py` checks the README's table and `.env.example` against it.
Leaves to others: acting on the settings (`zeroconf` turns "nothing configured" into a
resolved `Config`: embedded database, keys, simulated upstream).

The original service's variable names keep their meaning (POSTGRES_*, SERVER_URL/SERVER_PORT,
*_EXPIRE_MINUTES, JWT_*_SECRET_KEY, ALGORITHM); every new setting is `DATAPROC_*`. A bad value
fails here, at start, with a message that names the variable.

To add a setting: one `setting(...)` line in `Config` (the variable, the typed default, its
parser, the help text, the unit), then the row the README's table and the line `.env.example`
need (the test prints both when they are missing).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from . import rules

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


# --- value parsers: each takes the raw string and returns the typed value or raises ValueError


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]{1,12}", text.strip()):
            raise ValueError(f"expected an integer, got {text!r}")
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:  # also refuses NaN, which compares false
            raise ValueError(f"must be between {low:g} and {high:g}, got {text.strip()}")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value.lower() not in {a.lower() for a in allowed}:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {text!r}")
        return next(a for a in allowed if a.lower() == value.lower())

    return parse


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _tag_list(text: str) -> tuple[str, ...]:
    return tuple(tag.strip() for tag in text.split(",") if tag.strip())


def _minutes_to_seconds(text: str) -> int:
    return _int_in(1, 10 * 365 * 24 * 60)(text) * 60


def _signing_key(text: str) -> str:
    # RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits).
    if len(text.encode()) < 32:
        raise ValueError(
            "must be at least 32 bytes long (RFC 7518 §3.2); generate one with "
            'python -c "import secrets; print(secrets.token_urlsafe(48))"'
        )
    return text


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> float:
    """`90d`, `12h`, `30m`, `45s`, `2w` (or plain seconds): at least a minute, at most 100 years."""
    match = re.fullmatch(r"(\d{1,9})\s*([smhdw]?)", text.strip().lower())
    if not match:
        raise ValueError(f"expected a duration such as 90d, 12h or 30m, got {text!r}")
    seconds = int(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if not 60 <= seconds <= 100 * 365 * 86400:
        raise ValueError(f"must be between 1 minute and 100 years, got {text.strip()}")
    return float(seconds)


def _conninfo(text: str) -> str:
    value = text.strip()
    if "://" not in value and "=" not in value:
        raise ValueError(f"expected a libpq URI or key=value conninfo string, got {text!r}")
    return value


def _host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text.strip()):
        raise ValueError(f"expected a host name or address, got {text!r}")
    return text.strip()


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


# --- the schema ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One variable of the environment: what it sets, how it is read, and what it means.

    `field` and `default` are filled in from `Config` (where each setting is declared).
    `text` is the default as the variable would be written (None: `default` shown plainly;
    "" with `computed`: worked out at start, so `.env.example` leaves it empty)."""

    variable: str
    parse: Callable[[str], Any] | None
    help: str
    unit: str = ""
    text: str | None = None
    computed: str = ""
    field: str = ""
    default: Any = None

    @property
    def default_text(self) -> str:
        """The default as `.env.example` writes it ("" when there is none or it is computed)."""
        if self.text is not None:
            return self.text
        return _written(self.default)

    @property
    def readme_default(self) -> str:
        """The default as the README's table shows it."""
        return self.computed or self.default_text or "—"


def _written(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting(
    variable: str,
    default: T,
    parse: Callable[[str], Any],
    help: str,
    *,
    unit: str = "",
    text: str | None = None,
    computed: str = "",
) -> T:
    """A field of `Config` read from `variable`: its typed default and how to read it."""
    entry = Setting(variable, parse, help, unit, text, computed)
    # A dataclass field carrying the setting in its metadata (`field` is typed as its default).
    return dataclasses.field(default=default, metadata={"setting": entry})


# Read from several variables at once (into `database_url`, `upstream_url`), checked only
# (ALGORITHM), or accepted and unused, kept for compatibility with the original service.
OTHER_VARIABLES: tuple[Setting, ...] = (
    Setting("DATABASE_URL", None, "libpq URI or conninfo; wins over the POSTGRES_* set"),
    Setting(
        "POSTGRES_SERVER", None, "the database's `host` or `host:port`, as the original named it"
    ),
    Setting("POSTGRES_USER", None, "the database user"),
    Setting("POSTGRES_PASSWORD", None, "the database password"),
    Setting("POSTGRES_DB_NAME", None, "the database name"),
    Setting(
        "POSTGRES_TEST_DB_NAME",
        None,
        "kept for compatibility, unused (the tests use DATAPROC_TEST_DATABASE_URL or an "
        "embedded server)",
    ),
    Setting("SERVER_URL", None, "the upstream: a full URL, or a bare host with SERVER_PORT"),
    Setting("SERVER_PORT", None, "the upstream's port, when SERVER_URL is a bare host"),
    Setting("ALGORITHM", None, "must be HS256; anything else refuses to start", text="HS256"),
    Setting("PGUSER", None, "kept for the container health check (pg_isready)"),
)

_CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    """Every setting of the service, validated. Each field that one variable sets is declared
    with `setting(...)`; `SETTINGS` lists them. A resolved `Config` (see `zeroconf`) has the
    database, the keys and the upstream filled in."""

    # From DATABASE_URL or the POSTGRES_* set; from SERVER_URL (+ SERVER_PORT). None: not
    # configured (zero configuration fills both in).
    database_url: str | None = None
    upstream_url: str | None = None
    jwt_secret_key: str | None = setting(
        "JWT_SECRET_KEY",
        None,
        _signing_key,
        "access token signing key, at least 32 bytes",
        computed="generated (zero configuration only)",
    )
    jwt_refresh_secret_key: str | None = setting(
        "JWT_REFRESH_SECRET_KEY",
        None,
        _signing_key,
        "refresh token signing key, at least 32 bytes, not the access key's",
        computed="generated (zero configuration only)",
    )
    access_ttl_s: int = setting(
        "ACCESS_TOKEN_EXPIRE_MINUTES",
        30 * 60,
        _minutes_to_seconds,
        "access token lifetime",
        unit="min",
        text="30",
    )
    refresh_ttl_s: int = setting(
        "REFRESH_TOKEN_EXPIRE_MINUTES",
        10080 * 60,
        _minutes_to_seconds,
        "refresh token lifetime (7 days)",
        unit="min",
        text="10080",
    )
    host: str = setting("DATAPROC_HOST", "127.0.0.1", _host, "listen address")
    port: int = setting("DATAPROC_PORT", 8080, _int_in(0, 65535), "listen port")
    workers: int = setting(
        "DATAPROC_WORKERS", 1, _int_in(1, 64), "pre-forked processes sharing the socket"
    )
    data_dir: str = setting(
        "DATAPROC_DATA_DIR",
        ".dataproc",
        _text,
        "embedded PostgreSQL and generated keys (zero configuration)",
    )
    bcrypt_cost: int = setting(
        "DATAPROC_BCRYPT_COST", 12, _int_in(4, 16), "bcrypt cost of new password hashes"
    )
    password_min_bytes: int = setting(
        "DATAPROC_PASSWORD_MIN_BYTES",
        rules.DEFAULT_PASSWORD_MIN_BYTES,
        _int_in(1, rules.MAX_PASSWORD_BYTES),
        "shortest password accepted at signup",
        unit="bytes",
    )
    invalid_tags: tuple[str, ...] = setting(
        "DATAPROC_INVALID_TAGS",
        ("system", "suspect"),
        _tag_list,
        "comma-separated tags that make a point invalid",
    )
    max_age_s: float = setting(
        "DATAPROC_MAX_AGE_S",
        3600.0,
        _float_in(0, 10 * 365 * 86400),
        "older points are invalid and tagged `too old` (0: no age rule)",
        unit="s",
    )
    upstream_timeout_s: float = setting(
        "DATAPROC_UPSTREAM_TIMEOUT_S",
        10.0,
        _float_in(0.01, 600),
        "total time for one upstream answer (then 504)",
        unit="s",
    )
    upstream_max_bytes: int = setting(
        "DATAPROC_UPSTREAM_MAX_BYTES",
        65536,
        _int_in(64, 16 * 1024 * 1024),
        "larger upstream answers are refused (502)",
        unit="bytes",
    )
    poll_interval_s: float = setting(
        "DATAPROC_POLL_INTERVAL_S",
        0.0,
        _float_in(0, 86400),
        "ingest in the background every N seconds, one replica at a time (0: off)",
        unit="s",
    )
    log_format: str = setting(
        "DATAPROC_LOG_FORMAT", "text", _choice("text", "json"), "`text`, or `json` lines"
    )
    log_level: str = setting(
        "DATAPROC_LOG_LEVEL",
        "INFO",
        _choice("DEBUG", "INFO", "WARNING", "ERROR"),
        "DEBUG, INFO, WARNING or ERROR",
    )
    metrics_enabled: bool = setting(
        "DATAPROC_METRICS", True, _boolean, "serve Prometheus metrics at `/metrics`"
    )
    max_connections: int = setting(
        "DATAPROC_MAX_CONNECTIONS",
        512,
        _int_in(1, 10000),
        "open connections (an idle one costs no thread); past it a fast 503",
    )
    # Threads that run requests; idle keep-alive connections wait in a selector, not here.
    # A thread that waits (for a pool connection, a bcrypt slot, a slow client's write)
    # holds its place, so keep well above db_pool_size + login_concurrency + exports; a
    # waiting thread costs no CPU, a runnable one shares the GIL. Eight per core.
    threads: int = setting(
        "DATAPROC_THREADS",
        8 * (os.cpu_count() or 2),
        _int_in(1, 1024),
        "threads that run requests (idle keep-alive connections need none)",
        text="",
        computed="eight per core",
    )
    listen_backlog: int = setting(
        "DATAPROC_LISTEN_BACKLOG", 1024, _int_in(1, 65535), "connections waiting to be accepted"
    )
    socket_timeout_s: float = setting(
        "DATAPROC_SOCKET_TIMEOUT_S",
        15.0,
        _float_in(0.05, 3600),
        "idle keep-alive, and total time to send a request",
        unit="s",
    )
    max_request_line_bytes: int = setting(
        "DATAPROC_MAX_REQUEST_LINE_BYTES",
        8192,
        _int_in(256, 1024 * 1024),
        "longest request line (then 414)",
        unit="bytes",
    )
    max_header_count: int = setting(
        "DATAPROC_MAX_HEADER_COUNT", 64, _int_in(4, 1000), "most request headers (then 431)"
    )
    max_header_bytes: int = setting(
        "DATAPROC_MAX_HEADER_BYTES",
        16384,
        _int_in(256, 1024 * 1024),
        "largest header block (then 431)",
        unit="bytes",
    )
    max_body_bytes: int = setting(
        "DATAPROC_MAX_BODY_BYTES",
        65536,
        _int_in(256, 64 * 1024 * 1024),
        "largest request body (then 413)",
        unit="bytes",
    )
    max_query_params: int = setting(
        "DATAPROC_MAX_QUERY_PARAMS",
        32,
        _int_in(1, 1000),
        "most query or form parameters in one request (then 400)",
    )
    # Twice the cores (PostgreSQL's classic sizing): more connections than that only queue
    # inside PostgreSQL, where they share the cores and stretch every query's tail; waiting
    # in the pool is cheaper (p99 at 16 clients: 16 ms with 4 connections, 84 ms with 16).
    db_pool_size: int = setting(
        "DATAPROC_DB_POOL_SIZE",
        2 * _CORES,
        _int_in(1, 1000),
        "database connections per process",
        text="",
        computed="twice the cores",
    )
    db_wait_s: float = setting(
        "DATAPROC_DB_WAIT_S",
        5.0,
        _float_in(0.01, 600),
        "wait for a database connection before a 503",
        unit="s",
    )
    max_exports: int | None = setting(
        "DATAPROC_MAX_EXPORTS",
        None,
        _int_in(1, 1000),
        "exports streamed at once per process (then 503); each holds a connection of its own",
        text="",
        computed="half the pool, at least 1",
    )
    # At start only: how long `serve` waits for its database to come up (compose starts the
    # service beside it, and podman-compose ignores `depends_on: condition: service_healthy`).
    db_start_wait_s: float = setting(
        "DATAPROC_DB_START_WAIT_S",
        60.0,
        _float_in(0, 3600),
        "at start, `serve` waits this long for its database (retrying, one log line per "
        "wait), then exits with a one-line error",
        unit="s",
    )
    login_concurrency: int = setting(
        "DATAPROC_LOGIN_CONCURRENCY",
        max(1, _CORES // 2),
        _int_in(1, 256),
        "password checks (bcrypt) at once",
        text="",
        computed="half the cores",
    )
    login_wait_s: float = setting(
        "DATAPROC_LOGIN_WAIT_S",
        30.0,
        _float_in(0.01, 600),
        "the longest wait for a password-check slot; a longer expected wait: 503 at once",
        unit="s",
    )
    login_max_failures: int = setting(
        "DATAPROC_LOGIN_MAX_FAILURES",
        5,
        _int_in(1, 1000),
        "failed logins per username or address before a 429",
    )
    login_window_s: float = setting(
        "DATAPROC_LOGIN_WINDOW_S",
        60.0,
        _float_in(1, 86400),
        "the window those failures are counted in",
        unit="s",
    )
    shutdown_grace_s: float = setting(
        "DATAPROC_SHUTDOWN_GRACE_S",
        10.0,
        _float_in(0, 3600),
        "on SIGTERM, how long in-flight requests may take to finish",
        unit="s",
    )
    # Scale (README "Partitions, retention and a read replica").
    partition: str = setting(
        "DATAPROC_PARTITION",
        "none",
        _choice("none", "day", "week", "month"),
        "none, day, week or month: the layout `init-db` gives a new data_points (range "
        "partitions on time, made ahead by the service, rest partitions around them)",
    )
    retention_s: float | None = setting(
        "DATAPROC_RETENTION",
        None,
        _duration,
        "e.g. 90d, 12h: points and rejects older than that are removed (`prune`, and the "
        "service every 10 minutes)",
        text="",
        computed="unset: kept for ever",
    )
    read_database_url: str | None = setting(
        "DATAPROC_READ_DATABASE_URL",
        None,
        _conninfo,
        "a streaming standby (libpq URI or conninfo) that serves `/api/data`, the summary and "
        "the export; writes, logins, sessions and role checks stay on the primary",
        text="",
        computed="unset: reads on the primary",
    )
    cache_enabled: bool = setting(
        "DATAPROC_CACHE",
        True,
        _boolean,
        "the per-process read cache of /api/data, kept fresh by LISTEN/NOTIFY and bypassed "
        "while it cannot hear writes; false: every read goes to the database",
    )
    cache_mb: int = setting(
        "DATAPROC_CACHE_MB",
        32,
        _int_in(1, 1024 * 1024),
        "the read cache's bound per process (least recently used answers go first)",
        unit="MiB",
    )

    @property
    def export_slots(self) -> int:
        """Concurrent exports per process: as set, else half the pool (at least one)."""
        return self.max_exports or max(1, self.db_pool_size // 2)

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (tests and the zero-configuration resolver use it)."""
        return dataclasses.replace(self, **changes)


# Every field one variable sets, in declaration order (the README's table follows it).
SETTINGS: tuple[Setting, ...] = tuple(
    dataclasses.replace(f.metadata["setting"], field=f.name, default=f.default)
    for f in dataclasses.fields(Config)
    if "setting" in f.metadata
)
# Every variable the service reads or accepts: what the README and `.env.example` list.
VARIABLES: tuple[Setting, ...] = OTHER_VARIABLES + SETTINGS
_BY_FIELD = {entry.field: entry for entry in SETTINGS}


def read_setting(field: str, text: str) -> Any:
    """`text` read the way the setting of `field` reads its variable (ValueError when bad), so
    a command-line override accepts exactly what the variable does."""
    parse = _BY_FIELD[field].parse
    if parse is None:  # never for a field's setting (tests/unit/test_config.py checks)
        raise ValueError(f"{field} is not read from one variable")
    return parse(text)


def from_env(environ: Mapping[str, str], *, dotenv_path: str | None = ".env") -> Config:
    """Build the `Config` from `environ` over the `.env` file (the environment wins)."""
    values = dict(read_dotenv(dotenv_path)) if dotenv_path else {}
    values.update(environ)
    values = {name: value for name, value in values.items() if value.strip() != ""}
    fields: dict[str, Any] = {}
    for entry in SETTINGS:
        if entry.variable in values and entry.parse is not None:
            fields[entry.field] = _parse(entry.variable, values[entry.variable], entry.parse)
    fields["database_url"] = _database_url(values)
    fields["upstream_url"] = _upstream_url(values)
    _check_algorithm(values)
    config = Config(**fields)
    if config.jwt_secret_key and config.jwt_secret_key == config.jwt_refresh_secret_key:
        raise ConfigError(
            "JWT_REFRESH_SECRET_KEY: must differ from JWT_SECRET_KEY, "
            "so a refresh token can never pass as an access token"
        )
    return config


def _parse(variable: str, raw: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(raw)
    except ValueError as error:
        raise ConfigError(f"{variable}: {error}") from None


def _check_algorithm(values: Mapping[str, str]) -> None:
    algorithm = values.get("ALGORITHM", "HS256").strip()
    if algorithm != "HS256":
        raise ConfigError(
            f"ALGORITHM: only HS256 is supported (RFC 8725 §3.1: one algorithm, "
            f"pinned), got {algorithm!r}"
        )


def _database_url(values: Mapping[str, str]) -> str | None:
    """DATABASE_URL wins; else a conninfo string from the original's POSTGRES_* names."""
    if "DATABASE_URL" in values:
        return values["DATABASE_URL"].strip()
    parts = {
        name: values.get(name)
        for name in ("POSTGRES_SERVER", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB_NAME")
    }
    if not any(parts.values()):
        return None
    if not parts["POSTGRES_SERVER"]:
        given = ", ".join(name for name, value in parts.items() if value)
        raise ConfigError(f"POSTGRES_SERVER: required when {given} is set (or set DATABASE_URL)")
    host, port = _split_host_port(parts["POSTGRES_SERVER"].strip())
    conninfo = {
        "host": host,
        "port": port,
        "user": parts["POSTGRES_USER"],
        "password": parts["POSTGRES_PASSWORD"],
        "dbname": parts["POSTGRES_DB_NAME"],
    }
    return " ".join(f"{key}={_conninfo_quote(value)}" for key, value in conninfo.items() if value)


def _split_host_port(server: str) -> tuple[str, str]:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address (whose colons are no port)."""
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if not host or rest not in ("", f":{port}") or (port and not port.isdigit()):
            raise ConfigError(
                f"POSTGRES_SERVER: expected host, host:port or [v6]:port, got {server!r}"
            )
        return host, port
    host, sep, port = server.rpartition(":")
    if not sep or ":" in host or not port.isdigit():
        return server, ""
    return host, port


def _conninfo_quote(value: str) -> str:
    # libpq conninfo: single-quote the value, escaping backslashes and quotes.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _upstream_url(values: Mapping[str, str]) -> str | None:
    """SERVER_URL as a full URL, or SERVER_URL (host) + SERVER_PORT as the original service did."""
    url, port = values.get("SERVER_URL"), values.get("SERVER_PORT")
    if not url:
        if port:
            raise ConfigError("SERVER_URL: required when SERVER_PORT is set")
        return None
    url = url.strip()
    if "://" not in url:
        if port:
            _parse("SERVER_PORT", port, _int_in(1, 65535))
        url = f"http://{url.rstrip('/')}" + (f":{port.strip()}" if port else "") + "/"
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError(f"SERVER_URL: expected http://HOST[:PORT]/..., got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"SERVER_URL: bad port in {url!r}") from None
    return url


_DOTENV_LINE = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*")


def read_dotenv(path: str) -> dict[str, str]:
    """Read KEY=VALUE lines from a `.env` file (missing file: empty); quotes are stripped."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    values = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _DOTENV_LINE.fullmatch(line)
        if not match:
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        key, value = match.groups()
        if value[:1] in ("'", '"'):  # a quoted value, then nothing or a comment
            closing = value.find(value[0], 1)
            rest = value[closing + 1 :].strip() if closing > 0 else "unterminated"
            if rest and not rest.startswith("#"):
                raise ConfigError(f"{path}:{number}: {key}: unterminated quote or text after it")
            value = value[1:closing]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values
