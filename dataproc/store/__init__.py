"""PostgreSQL: the connection pool, the schema, and one function per query.

Owns: every SQL statement (module constants with `%s`/`%(name)s` placeholders only, never
built from values), the pool's life, and turning "the database is not answering" into a 503.
Leaves to callers what the rows mean. Data points are turned into JSON by PostgreSQL itself
(as PostgREST does): reads hand the API ready bytes, and every endpoint shows a point the
same way (RFC 3339 UTC time, `null` for a non-finite value).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import ApiError
from .freshness import SELECT_DATA_VERSION

log = logging.getLogger("dataproc.store")


class DatabaseUnavailable(ApiError):
    """The database did not answer in time: a 503 the client may retry."""

    def __init__(self, detail: str = "database unavailable, retry shortly"):
        super().__init__(503, detail, {"Retry-After": "1"})


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    hashed_password: str
    role: str


@dataclass(frozen=True, slots=True)
class NewPoint:
    """A processed reading, ready to store."""

    time: datetime
    value: float
    valid: bool
    tags: list[str]
    source_document: str
    document_sha256: bytes


@dataclass(frozen=True, slots=True)
class Page:
    """A page of points as a JSON array (bytes), its length, its last `(time, id)`, the
    role of the viewer it was read for, and the data version of the snapshot it was read in."""

    json: bytes
    count: int
    last: tuple[datetime, int] | None
    role: str
    version: int


# --- the pool -------------------------------------------------------------------------------


class Pool(ConnectionPool):
    """psycopg_pool's pool, knowing whether its connection attempts are failing (the database
    is down), so that a request waiting for a connection keeps asking for one (`connection`)."""

    connect_failing = False


def _connect_failed(pool: ConnectionPool) -> None:
    if isinstance(pool, Pool):
        pool.connect_failing = True


class _OneLinePerOutage(logging.Filter):
    """psycopg_pool logs each failed connection attempt, and while the database is down a
    waiting request asks for one every `RECONNECT_SLICE_S`: the first is logged, the rest
    are held back until a connection is made again."""

    def __init__(self) -> None:
        super().__init__()
        self.in_outage = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not isinstance(record.msg, str):
            return True
        if not record.msg.startswith(("error connecting", "reconnection attempt")):
            return True
        seen, self.in_outage = self.in_outage, True
        return not seen


_POOL_WARNINGS = _OneLinePerOutage()
logging.getLogger("psycopg.pool").addFilter(_POOL_WARNINGS)


# Generic plans for the statements psycopg prepares (each one after its fifth run on a
# connection): PostgreSQL's own choice kept re-planning them, and planning a page over ~100
# partitions costs ~15 ms where the page costs ~1 ms; the generic plan prunes partitions as it
# runs. Measured on both layouts (1M points): no read got slower, and a page on 117 daily
# partitions went from 17 ms to 1.3 ms. A statement whose best plan depends on its values
# (the batches of a rebuild, a migration or a prune: `time < %s` with no LIMIT to steer it)
# runs unprepared (`prepare=False`): its generic plan scans the whole table.
GENERIC_PLANS = "SET plan_cache_mode = force_generic_plan"


def _configure(conn: psycopg.Connection) -> None:
    conn.execute(GENERIC_PLANS)


def make_pool(
    conninfo: str, *, max_size: int, wait_s: float, name: str = "dataproc"
) -> ConnectionPool:
    """A closed pool: open it with `open_pool`, close it on shutdown."""
    # No `check=` on checkout: it costs a round trip per request (a quarter of a read's
    # throughput, measured). A dead connection shows itself when used; `read_one` then sweeps
    # the pool and tries again. reconnect_timeout=0: a failed background connect gives up at
    # once instead of backing off for minutes; a waiting request asks for a new one instead.
    return Pool(
        conninfo,
        min_size=min(2, max_size),
        max_size=max_size,
        open=False,
        timeout=wait_s,
        name=name,
        reconnect_timeout=0,
        reconnect_failed=_connect_failed,
        configure=_configure,
        kwargs={"autocommit": True, "connect_timeout": max(2, int(wait_s))},
    )


def conninfo_of(pool: ConnectionPool) -> str:
    """The connection string `pool` was made with (for a connection of its own, as an export's)."""
    conninfo = pool.conninfo
    return conninfo if isinstance(conninfo, str) else conninfo()


class _HeldConnectWarnings(logging.Filter):
    """Holds back psycopg_pool's warnings while a pool opens: a failed start is then one line
    (the command line's contract), with the last connection error as its reason."""

    def __init__(self) -> None:
        super().__init__()
        self.last_error = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True
        message = record.getMessage().splitlines()[0] if record.getMessage() else ""
        if message.startswith("error connecting"):
            self.last_error = message.split("': ", 1)[-1]
        return False


def open_pool(pool: ConnectionPool, wait_s: float) -> None:
    """Open the pool and wait for a first connection, or raise `DatabaseUnavailable`."""
    held, pool_log = _HeldConnectWarnings(), logging.getLogger("psycopg.pool")
    pool_log.addFilter(held)
    try:
        pool.open(wait=True, timeout=wait_s)
    except PoolTimeout:
        pool.close()
        reason = f" ({held.last_error})" if held.last_error else ""
        raise DatabaseUnavailable(
            f"cannot connect to the database within {wait_s:g} s{reason}"
        ) from None
    finally:
        pool_log.removeFilter(held)


def wait_for_database(
    conninfo: str, wait_s: float, *, first_pause_s: float = 0.25, max_pause_s: float = 2.0
) -> None:
    """Return once the database accepts a connection, trying for up to `wait_s` seconds with a
    doubling pause (one log line per pause); then raise `DatabaseUnavailable` with the reason.

    A service started beside its database (compose) must not rely on the engine ordering the
    two: podman-compose ignores `depends_on: condition: service_healthy`."""
    deadline, pause = time.monotonic() + wait_s, first_pause_s
    while True:
        # libpq's connect_timeout is whole seconds, at least 2: an attempt overruns by < 2 s.
        timeout = max(2, min(10, int(deadline - time.monotonic())))
        try:
            psycopg.connect(conninfo, connect_timeout=timeout, autocommit=True).close()
            return
        except psycopg.OperationalError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        left = deadline - time.monotonic()
        if left <= 0:
            raise DatabaseUnavailable(
                f"cannot connect to the database within {wait_s:g} s ({reason})"
            )
        pause = min(pause, left)
        log.info("database not ready (%s): next try in %.2g s, %.1f s left", reason, pause, left)
        time.sleep(pause)
        pause = min(2 * pause, max_pause_s)


class ConnectionLost(DatabaseUnavailable):
    """The database closed a connection under a statement (a restart, a network cut)."""


# While the database is down, the pool gives up each connection attempt at once and tries
# again only when a new request starts waiting: a request parked for the whole wait (5 s)
# would sleep through the database's return (an independent probe saw its first 200 4 s
# after PostgreSQL was back). So a request waits in slices this long, each one asking the
# pool to connect again: the first 200 comes within a slice of the database answering.
RECONNECT_SLICE_S = 0.1


def _getconn(pool: ConnectionPool) -> psycopg.Connection:
    """A connection within the pool's timeout; PoolTimeout when none came."""
    deadline = time.monotonic() + pool.timeout
    while True:
        remaining = deadline - time.monotonic()
        failing = getattr(pool, "connect_failing", False)
        try:
            conn = pool.getconn(timeout=min(remaining, RECONNECT_SLICE_S) if failing else remaining)
        except PoolTimeout:
            if time.monotonic() >= deadline - 0.001:
                raise
            continue
        if failing and isinstance(pool, Pool):
            pool.connect_failing = False  # a connection came: the database answers again
            _POOL_WARNINGS.in_outage = False
        return conn


@contextmanager
def connection(pool: ConnectionPool, *, quiet: bool = False) -> Iterator[psycopg.Connection]:
    """A pooled connection; an unreachable database becomes `DatabaseUnavailable`."""
    try:
        conn = _getconn(pool)
    except PoolTimeout:
        raise DatabaseUnavailable() from None
    try:
        with conn:  # as pool.connection(): commit or roll back, then back to the pool
            yield conn
    except psycopg.OperationalError as error:
        if not quiet:
            log.warning("database error: %s", str(error).splitlines()[0] if str(error) else error)
        raise ConnectionLost() from None
    finally:
        pool.putconn(conn)


def read_one(pool: ConnectionPool, sql: str, params: Mapping | Sequence = ()) -> tuple | None:
    """The first row of a read-only statement, tried twice when its connection was dead.

    After a database restart every pooled connection is dead: the first one that fails makes
    the pool test all the others at once (`pool.check`), and the read runs again on a fresh
    connection, so a restart costs no request an error.
    """
    try:
        with connection(pool, quiet=True) as conn:
            return conn.execute(sql, params).fetchone()
    except ConnectionLost:
        pool.check()
    with connection(pool) as conn:
        return conn.execute(sql, params).fetchone()


def one_row(row: tuple | None) -> tuple:
    """The row of a statement that always returns one (an aggregate, a function call)."""
    if row is None:
        raise RuntimeError("a statement that always returns one row returned none")
    return row


def schema_sql() -> str:
    """The text of schema.sql, shipped inside the package."""
    return resources.files("dataproc").joinpath("schema.sql").read_text(encoding="utf-8")


# The layout a new data_points gets (DATAPROC_PARTITION), handed to schema.sql as a setting of
# its transaction (`current_setting('dataproc.partition', true)`), so the file stays one script.
SET_PARTITION = "SELECT set_config('dataproc.partition', %s, true)"


def apply_schema(pool: ConnectionPool, partition: str = "none") -> None:
    """Apply schema.sql in one transaction (idempotent; replicas take turns on a lock).
    `partition` ('none', 'day', 'week', 'month') is the layout of a data_points made now."""
    with connection(pool) as conn, conn.transaction():
        conn.execute(SET_PARTITION, (partition,))
        conn.execute(schema_sql())


def ping(pool: ConnectionPool) -> bool:
    """True when the database answers a trivial query."""
    try:
        read_one(pool, "SELECT 1")
        return True
    except DatabaseUnavailable:
        return False


def pool_stats(pool: ConnectionPool) -> dict[str, int]:
    """Size, in use and waiting, for the metrics."""
    stats = pool.get_stats()
    size = stats.get("pool_size", 0)
    return {
        "size": size,
        "in_use": size - stats.get("pool_available", 0),
        "waiting": stats.get("requests_waiting", 0),
    }


# --- the poller's lock (taken on a session of the poller's own, never a pooled one) ---------

POLLER_LOCK_KEY = 7261657272  # any constant shared by every replica; not the schema's lock
TRY_POLLER_LOCK = "SELECT pg_try_advisory_lock(%s)"
STILL_HERE = "SELECT 1"
POLLER_UNLOCK = "SELECT pg_advisory_unlock(%s)"


# --- users ----------------------------------------------------------------------------------

SELECT_USER = "SELECT id, username, hashed_password, role FROM users WHERE username = %s"
INSERT_USER = """
INSERT INTO users (username, hashed_password, role) VALUES (%s, %s, %s)
ON CONFLICT (username) DO NOTHING RETURNING id"""
UPSERT_USER = """
INSERT INTO users (username, hashed_password, role) VALUES (%s, %s, %s)
ON CONFLICT (username) DO UPDATE SET hashed_password = EXCLUDED.hashed_password, role = EXCLUDED.role
RETURNING (xmax = 0) AS created"""
SELECT_ROLE = "SELECT role FROM users WHERE username = %s"


def get_user(pool: ConnectionPool, username: str) -> User | None:
    """The user of that name, or None."""
    if "\x00" in username:  # PostgreSQL text cannot hold NUL: no such user (not a DataError)
        return None
    row = read_one(pool, SELECT_USER, (username,))
    return User(*row) if row else None


def user_role(pool: ConnectionPool, username: str) -> str | None:
    """The role of an existing user, or None when the user does not exist (any more)."""
    if "\x00" in username:  # PostgreSQL text cannot hold NUL: no such user
        return None
    row = read_one(pool, SELECT_ROLE, (username,))
    return row[0] if row else None


def create_user(
    pool: ConnectionPool, username: str, hashed_password: str, role: str = "user"
) -> bool:
    """Insert a user; False when the name is taken (also under concurrent inserts)."""
    with connection(pool) as conn:
        return conn.execute(INSERT_USER, (username, hashed_password, role)).fetchone() is not None


def upsert_user(pool: ConnectionPool, username: str, hashed_password: str, role: str) -> bool:
    """Create a user or reset its password and role; True when it was created."""
    with connection(pool) as conn:
        return bool(
            one_row(conn.execute(UPSERT_USER, (username, hashed_password, role)).fetchone())[0]
        )


# --- data points ----------------------------------------------------------------------------

# One point as compact JSON, the same everywhere: RFC 3339 UTC time with a fraction only when
# it is not zero (PostgreSQL's JSON timestamps trim it so), non-finite values as null (JSON
# has no NaN), missing tags as []. Concatenated rather than row_to_json over a sub-select:
# a fifth less database time per page (measured); only the tags are strings, and
# array_to_json escapes them.
_POINT_JSON = """('{"id":' || p.id
    || ',"time":' || rtrim(to_json(p.time AT TIME ZONE 'UTC')::text, '"') || 'Z"'
    || ',"value":' || CASE WHEN p.value IN ('NaN'::float8, 'Infinity', '-Infinity') THEN 'null'
                           ELSE p.value::text END
    || ',"valid":' || p.valid
    || ',"tags":' || coalesce(array_to_json(p.tags)::text, '[]') || '}')"""

INSERT_POINT = f"""
WITH inserted AS (
  INSERT INTO data_points AS p (time, value, valid, tags, source_document, document_sha256)
  VALUES (%s, %s, %s, %s, %s, %s)
  ON CONFLICT (document_sha256, time) DO NOTHING
  RETURNING p.*)
SELECT {_POINT_JSON} FROM inserted p"""
# By the whole dedupe key: on the partitioned layout the time picks the one partition to look in.
SELECT_POINT_BY_DOCUMENT = (
    f"SELECT {_POINT_JSON} FROM data_points p WHERE document_sha256 = %s AND time = %s"
)
INSERT_REJECT = "INSERT INTO rejects (reason, body) VALUES (%s, %s)"

# The data version in the same statement (the same snapshot) as the rows: the read cache's
# bookkeeping (`freshness`).
DATA_VERSION = f"({SELECT_DATA_VERSION})"

# One round trip per read: the viewer's role is looked up in the same statement and gates
# which of two scans runs (a one-time filter, so the other never starts): users read through
# the partial index on valid rows, admins through the full one. A viewer who no longer
# exists gets no rows and a NULL role.
SELECT_PAGE = f"""
WITH viewer AS (SELECT role FROM users WHERE username = %(viewer)s),
page AS (
  (SELECT id, time, value, valid, tags FROM data_points
   WHERE (time, id) >= (%(from_time)s, %(from_id)s) AND time <= %(end)s
     AND valid AND (SELECT role FROM viewer) <> 'admin'
   ORDER BY time, id OFFSET %(skip)s LIMIT %(limit)s)
  UNION ALL
  (SELECT id, time, value, valid, tags FROM data_points
   WHERE (time, id) >= (%(from_time)s, %(from_id)s) AND time <= %(end)s
     AND (SELECT role FROM viewer) = 'admin'
   ORDER BY time, id OFFSET %(skip)s LIMIT %(limit)s))
SELECT (SELECT role FROM viewer),
       '[' || coalesce(string_agg({_POINT_JSON}, ',' ORDER BY p.time, p.id), '') || ']',
       count(*), max(p.time), (array_agg(p.id ORDER BY p.time DESC, p.id DESC))[1],
       {DATA_VERSION}
FROM page p"""


def insert_point(pool: ConnectionPool, point: NewPoint) -> tuple[bytes, bool]:
    """Store a point once per document; returns its JSON and whether it is new."""
    params = (
        point.time,
        point.value,
        point.valid,
        point.tags,
        point.source_document,
        point.document_sha256,
    )
    with connection(pool) as conn:
        row = conn.execute(INSERT_POINT, params).fetchone()
        if row is not None:
            return row[0].encode(), True
        row = conn.execute(SELECT_POINT_BY_DOCUMENT, (point.document_sha256, point.time)).fetchone()
    # Neither inserted nor found: a concurrent insert of the same document has not committed
    # yet. Whether it will is unknown here, so this is a 503 to retry, not a duplicate.
    if row is None:
        raise DatabaseUnavailable("a concurrent insert of this document is in progress")
    return row[0].encode(), False


def insert_reject(pool: ConnectionPool, reason: str, body: bytes) -> None:
    """Keep an upstream answer that was not a valid document, verbatim, with the reason."""
    with connection(pool) as conn:
        conn.execute(INSERT_REJECT, (reason, body))


NO_LOWER_BOUND = datetime.fromisoformat("0001-01-01T00:00:00+00:00")
NO_UPPER_BOUND = datetime.fromisoformat("9999-12-31T23:59:59.999999+00:00")
MIN_ID = -(2**31)  # data_points.id is an integer (serial)


def page_params(
    *,
    viewer: str,
    start: datetime | None = None,
    end: datetime | None = None,
    after: tuple[datetime, int] | None = None,
    skip: int = 0,
    limit: int = 100,
) -> dict:
    """The parameters of `SELECT_PAGE`: inclusive bounds, after a keyset cursor, then skip."""
    # `start` and the cursor become ONE lower bound on (time, id): given two (`time >= start`
    # and a row comparison), the b-tree may start its scan at the looser one and walk past
    # every row before `start` (20 ms at a million rows instead of 0.05 ms).
    lower = (start or NO_LOWER_BOUND, MIN_ID)
    if after is not None:
        lower = max(lower, (after[0], after[1] + 1))  # (time, id) > (t, i)  <=>  >= (t, i + 1)
    return {
        "viewer": viewer,
        "from_time": lower[0],
        "from_id": lower[1],
        "end": end or NO_UPPER_BOUND,
        "skip": skip,
        "limit": limit,
    }


def list_points(pool: ConnectionPool, **query) -> Page | None:
    """One page ordered by (time, id) as `query["viewer"]` may see it (admins: every point;
    others: valid ones), with `page_params`' filters. None: no such viewer."""
    role, body, count, last_time, last_id, version = one_row(
        read_one(pool, SELECT_PAGE, page_params(**query))
    )
    if role is None:
        return None
    return Page(body.encode(), count, (last_time, last_id) if count else None, role, version)
