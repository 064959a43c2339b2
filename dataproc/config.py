"""Configuration: one frozen `Config`, built once from a mapping of environment variables.

Owns: the names of every setting, their defaults, their validation, and `.env` reading.
Leaves to others: acting on the settings (`__main__` decides embedded vs configured database,
generates keys for a zero-configuration run, and so on).

The original service's variable names keep their meaning (POSTGRES_*, SERVER_URL/SERVER_PORT,
*_EXPIRE_MINUTES, JWT_*_SECRET_KEY, ALGORITHM); every new setting is `DATAPROC_*`. A bad value
fails here, at start, with a message that names the variable.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class Config:
    """Every setting of the service, validated; see `SETTINGS` for variables and defaults."""

    database_url: str | None = None
    test_database_name: str | None = None
    upstream_url: str | None = None
    jwt_secret_key: str | None = None
    jwt_refresh_secret_key: str | None = None
    access_ttl_s: int = 30 * 60
    refresh_ttl_s: int = 10080 * 60
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    data_dir: str = ".dataproc"
    bcrypt_cost: int = 12
    password_min_bytes: int = 8
    invalid_tags: tuple[str, ...] = ("system", "suspect")
    max_age_s: float = 3600.0
    upstream_timeout_s: float = 10.0
    upstream_max_bytes: int = 65536
    poll_interval_s: float = 0.0
    log_format: str = "text"
    log_level: str = "INFO"
    metrics_enabled: bool = True
    max_connections: int = 512
    # Threads that run requests; idle keep-alive connections wait in a selector, not here.
    # A thread that waits (for a pool connection, a bcrypt slot, a slow client's write)
    # holds its place, so keep well above db_pool_size + login_concurrency + exports; a
    # waiting thread costs no CPU, a runnable one shares the GIL. Eight per core.
    threads: int = 8 * (os.cpu_count() or 2)
    listen_backlog: int = 1024
    socket_timeout_s: float = 15.0
    max_request_line_bytes: int = 8192
    max_header_count: int = 64
    max_header_bytes: int = 16384
    max_body_bytes: int = 65536
    max_query_params: int = 32
    # Twice the cores (PostgreSQL's classic sizing): more connections than that only queue
    # inside PostgreSQL, where they share the cores and stretch every query's tail; waiting
    # in the pool is cheaper (p99 at 16 clients: 16 ms with 4 connections, 84 ms with 16).
    db_pool_size: int = 2 * (os.cpu_count() or 1)
    db_wait_s: float = 5.0
    # At start only: how long `serve` waits for its database to come up (compose starts the
    # service beside it, and podman-compose ignores `depends_on: condition: service_healthy`).
    db_start_wait_s: float = 60.0
    login_concurrency: int = max(1, (os.cpu_count() or 2) // 2)
    login_wait_s: float = 5.0
    login_max_failures: int = 5
    login_window_s: float = 60.0
    shutdown_grace_s: float = 10.0
    # Scale (README "Partitions, retention and a read replica"): the layout init-db gives a new
    # data_points, how long points are kept (None: for ever), and a streaming standby for reads.
    partition: str = "none"
    retention_s: float | None = None
    read_database_url: str | None = None

    @property
    def embedded_database(self) -> bool:
        """True when no database is configured, so a zero-configuration run embeds one."""
        return self.database_url is None

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed (tests and the zero-configuration wiring use it)."""
        return dataclasses.replace(self, **changes)


# --- value parsers: each takes the raw string and returns the typed value or raises ValueError


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[+-]?\d{1,12}", text.strip()):
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


# (field, variable, parser). Order matters only for readability; the README table mirrors it.
SETTINGS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("test_database_name", "POSTGRES_TEST_DB_NAME", _text),
    ("jwt_secret_key", "JWT_SECRET_KEY", _signing_key),
    ("jwt_refresh_secret_key", "JWT_REFRESH_SECRET_KEY", _signing_key),
    ("access_ttl_s", "ACCESS_TOKEN_EXPIRE_MINUTES", _minutes_to_seconds),
    ("refresh_ttl_s", "REFRESH_TOKEN_EXPIRE_MINUTES", _minutes_to_seconds),
    ("host", "DATAPROC_HOST", _host),
    ("port", "DATAPROC_PORT", _int_in(0, 65535)),
    ("workers", "DATAPROC_WORKERS", _int_in(1, 64)),
    ("data_dir", "DATAPROC_DATA_DIR", _text),
    ("bcrypt_cost", "DATAPROC_BCRYPT_COST", _int_in(4, 16)),
    ("password_min_bytes", "DATAPROC_PASSWORD_MIN_BYTES", _int_in(1, 72)),
    ("invalid_tags", "DATAPROC_INVALID_TAGS", _tag_list),
    ("max_age_s", "DATAPROC_MAX_AGE_S", _float_in(0, 10 * 365 * 86400)),
    ("upstream_timeout_s", "DATAPROC_UPSTREAM_TIMEOUT_S", _float_in(0.01, 600)),
    ("upstream_max_bytes", "DATAPROC_UPSTREAM_MAX_BYTES", _int_in(64, 16 * 1024 * 1024)),
    ("poll_interval_s", "DATAPROC_POLL_INTERVAL_S", _float_in(0, 86400)),
    ("log_format", "DATAPROC_LOG_FORMAT", _choice("text", "json")),
    ("log_level", "DATAPROC_LOG_LEVEL", _choice("DEBUG", "INFO", "WARNING", "ERROR")),
    ("metrics_enabled", "DATAPROC_METRICS", _boolean),
    ("max_connections", "DATAPROC_MAX_CONNECTIONS", _int_in(1, 10000)),
    ("threads", "DATAPROC_THREADS", _int_in(1, 1024)),
    ("listen_backlog", "DATAPROC_LISTEN_BACKLOG", _int_in(1, 65535)),
    ("socket_timeout_s", "DATAPROC_SOCKET_TIMEOUT_S", _float_in(0.05, 3600)),
    ("max_request_line_bytes", "DATAPROC_MAX_REQUEST_LINE_BYTES", _int_in(256, 1024 * 1024)),
    ("max_header_count", "DATAPROC_MAX_HEADER_COUNT", _int_in(4, 1000)),
    ("max_header_bytes", "DATAPROC_MAX_HEADER_BYTES", _int_in(256, 1024 * 1024)),
    ("max_body_bytes", "DATAPROC_MAX_BODY_BYTES", _int_in(256, 64 * 1024 * 1024)),
    ("max_query_params", "DATAPROC_MAX_QUERY_PARAMS", _int_in(1, 1000)),
    ("db_pool_size", "DATAPROC_DB_POOL_SIZE", _int_in(1, 1000)),
    ("db_wait_s", "DATAPROC_DB_WAIT_S", _float_in(0.01, 600)),
    ("db_start_wait_s", "DATAPROC_DB_START_WAIT_S", _float_in(0, 3600)),
    ("login_concurrency", "DATAPROC_LOGIN_CONCURRENCY", _int_in(1, 256)),
    ("login_wait_s", "DATAPROC_LOGIN_WAIT_S", _float_in(0.01, 600)),
    ("login_max_failures", "DATAPROC_LOGIN_MAX_FAILURES", _int_in(1, 1000)),
    ("login_window_s", "DATAPROC_LOGIN_WINDOW_S", _float_in(1, 86400)),
    ("shutdown_grace_s", "DATAPROC_SHUTDOWN_GRACE_S", _float_in(0, 3600)),
    ("partition", "DATAPROC_PARTITION", _choice("none", "day", "week", "month")),
    ("retention_s", "DATAPROC_RETENTION", _duration),
    ("read_database_url", "DATAPROC_READ_DATABASE_URL", _conninfo),
)


def from_env(environ: Mapping[str, str], *, dotenv_path: str | None = ".env") -> Config:
    """Build the `Config` from `environ` over the `.env` file (the environment wins)."""
    values = dict(read_dotenv(dotenv_path)) if dotenv_path else {}
    values.update(environ)
    values = {name: value for name, value in values.items() if value.strip() != ""}
    fields: dict[str, Any] = {}
    for field, variable, parse in SETTINGS:
        if variable in values:
            fields[field] = _parse(variable, values[variable], parse)
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
