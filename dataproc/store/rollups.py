"""Time-bucket summaries of data points, read from the rollups where they cover a bucket.

Owns: the summary query, how a window is cut into pieces (day, hour and minute rollups, raw
rows at the edges), the first/last visible point of a window, and the rebuild of rollups for
rows written before the triggers of schema.sql existed. The triggers themselves (which keep
`data_rollups` exact in the same transaction as every write) live in schema.sql.
Leaves to callers what a bucket size or window may be.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from psycopg_pool import ConnectionPool

from . import DATA_VERSION, NO_LOWER_BOUND, NO_UPPER_BOUND, connection, read_one

if TYPE_CHECKING:  # a type only: replica imports nothing of rollups
    from .replica import Reads

log = logging.getLogger("dataproc.store.rollups")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MINUTE_US = 60_000_000
HOUR_US = 3_600_000_000
DAY_US = 86_400_000_000
ONE_US = timedelta(microseconds=1)


def to_micros(moment: datetime) -> int:
    return (moment - EPOCH) // ONE_US


def _at(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def _ceil(micros: int, width: int) -> int:
    return -((-micros) // width) * width


def _floor(micros: int, width: int) -> int:
    return (micros // width) * width


# The pieces a window is cut into, each a half-open range read from one source.
PIECES = ("raw1", "raw2", "min1", "min2", "hours1", "hours2", "days")


def plan_pieces(start: datetime, end: datetime, bucket_s: int) -> dict[str, datetime]:
    """The half-open ranges each source covers, for a window `start..end` (inclusive).

    Day rollups serve the whole days of the window when buckets are whole days, hour rollups
    the whole hours left when buckets are whole hours, minute rollups the whole minutes left
    when buckets are whole minutes, and the raw rows the rest: the partial minutes at the two
    edges, or everything when buckets are smaller than a minute. An empty range has equal
    ends. Pure: tested with literals."""
    low, high = (
        to_micros(start),
        to_micros(end) + 1,
    )  # [low, high): `end` is inclusive, times are in µs
    width = bucket_s * 1_000_000
    # From the finest source out: each level takes the whole units of the range the level
    # before it holds in the middle, and leaves that level the two edges.
    empty = (high, high)
    ranges = {name: empty for name in PIECES}
    ranges["raw1"] = (low, high)
    held, held_right = "raw1", "raw2"
    for left, right, unit in (
        ("min1", "min2", MINUTE_US),
        ("hours1", "hours2", HOUR_US),
        ("days", "", DAY_US),
    ):
        a, b = ranges[held]
        if width % unit or _ceil(a, unit) >= _floor(b, unit):
            break
        ranges[held], ranges[held_right] = (a, _ceil(a, unit)), (_floor(b, unit), b)
        ranges[left] = (_ceil(a, unit), _floor(b, unit))
        held, held_right = left, right
    pieces = {f"{name}_from": _at(lo) for name, (lo, _) in ranges.items()}
    pieces.update({f"{name}_to": _at(hi) for name, (_, hi) in ranges.items()})
    return pieces


# Aggregates of raw rows as the viewer sees them (admin: every row; others: valid rows only).
_RAW_PIECE = """
  SELECT date_bin(%(stride)s, time, %(epoch)s) AS b, count(*) AS n,
         count(*) FILTER (WHERE valid) AS v, count(*) FILTER (WHERE fin) AS f,
         sum(value) FILTER (WHERE fin) AS s, min(value) FILTER (WHERE fin) AS lo,
         max(value) FILTER (WHERE fin) AS hi
  FROM (SELECT time, value, valid, value NOT IN ('NaN', 'Infinity', '-Infinity') AS fin
        FROM data_points
        WHERE time >= %({name}_from)s AND time < {upper}
          AND (valid OR (SELECT admin FROM viewer))) p
  GROUP BY 1"""

# Rollup rows of one width as the viewer sees them; only while the rollups are complete.
_ROLLUP_PIECE = """
  SELECT date_bin(%(stride)s, bucket_start, %(epoch)s) AS b,
         CASE WHEN a.admin THEN count ELSE valid END AS n, valid AS v,
         CASE WHEN a.admin THEN finite_count ELSE valid_finite_count END AS f,
         CASE WHEN a.admin THEN sum ELSE valid_sum END AS s,
         CASE WHEN a.admin THEN min ELSE valid_min END AS lo,
         CASE WHEN a.admin THEN max ELSE valid_max END AS hi
  FROM data_rollups, (SELECT admin FROM viewer) a
  WHERE width_s = {width} AND bucket_start >= %({name}_from)s AND bucket_start < %({name}_to)s
    AND (SELECT ok FROM ready) AND (a.admin OR valid > 0)"""

# One bucket as JSON, built by PostgreSQL as the points of /api/data are (the same float text).
# A bucket starts on a whole second, so its time has no fraction (to_json: half the time of
# to_char). The mean of values near 1e308 can overflow to infinity, which JSON cannot hold:
# null then.
_BUCKET_JSON = """('{"time":' || rtrim(to_json(b AT TIME ZONE 'UTC')::text, '"')
    || 'Z","count":' || n || ',"valid":' || v
    || ',"min":' || coalesce(lo::text, 'null') || ',"max":' || coalesce(hi::text, 'null')
    || ',"mean":' || CASE WHEN f > 0 AND s / f NOT IN ('Infinity', '-Infinity', 'NaN')
                          THEN (s / f)::text ELSE 'null' END || '}')"""

# One round trip: the viewer's role, whether the rollups are complete (else the first raw
# piece stretches over the whole window and the rollup pieces stay empty), then every piece
# aggregated into the buckets. A viewer who no longer exists gets a NULL role and no rows.
SELECT_SUMMARY = f"""
WITH viewer AS (SELECT role = 'admin' AS admin, role FROM users WHERE username = %(viewer)s),
ready AS (SELECT EXISTS (SELECT 1 FROM dataproc_state WHERE key = 'rollups_complete') AS ok),
pieces AS (
  {_RAW_PIECE.format(name="raw1", upper="CASE WHEN (SELECT ok FROM ready) THEN %(raw1_to)s ELSE %(raw2_to)s END")}
  UNION ALL
  {_RAW_PIECE.format(name="raw2", upper="%(raw2_to)s")} HAVING (SELECT ok FROM ready)
  UNION ALL
  {_ROLLUP_PIECE.format(name="min1", width=60)}
  UNION ALL
  {_ROLLUP_PIECE.format(name="min2", width=60)}
  UNION ALL
  {_ROLLUP_PIECE.format(name="hours1", width=3600)}
  UNION ALL
  {_ROLLUP_PIECE.format(name="hours2", width=3600)}
  UNION ALL
  {_ROLLUP_PIECE.format(name="days", width=86400)})
SELECT (SELECT role FROM viewer), count(*),
       '[' || coalesce(string_agg({_BUCKET_JSON}, ',' ORDER BY b), '') || ']', {DATA_VERSION}
FROM (SELECT b, sum(n) AS n, sum(v) AS v, sum(f) AS f, sum(s) AS s, min(lo) AS lo,
             max(hi) AS hi
      FROM pieces GROUP BY b) g"""

# The first and last point the viewer can see inside the given bounds (for a missing
# `start` or `end`), with the viewer's role and the data version they were read at.
SELECT_SPAN = f"""
WITH viewer AS (SELECT role FROM users WHERE username = %(viewer)s)
SELECT (SELECT role FROM viewer), {DATA_VERSION},
       (SELECT min(time) FROM data_points WHERE time >= %(start)s AND time <= %(end)s
          AND (valid OR (SELECT role FROM viewer) = 'admin')),
       (SELECT max(time) FROM data_points WHERE time >= %(start)s AND time <= %(end)s
          AND (valid OR (SELECT role FROM viewer) = 'admin'))"""


def visible_span(
    pool: ConnectionPool,
    viewer: str,
    start: datetime | None,
    end: datetime | None,
    *,
    reads: Reads | None = None,
) -> tuple[str | None, int, datetime | None, datetime | None]:
    """(role, version, first, last): the viewer's role (None: no such user), the data version
    read, and the first and last visible point's time within the given bounds (None when
    there is none)."""
    params = {"viewer": viewer, "start": start or NO_LOWER_BOUND, "end": end or NO_UPPER_BOUND}
    # With `reads`: through its read standby, the role from the primary.
    row = (
        reads.read_as_viewer(SELECT_SPAN, params) if reads else read_one(pool, SELECT_SPAN, params)
    )
    return (row[0], row[1], row[2], row[3]) if row else (None, 0, None, None)


def summarize(
    pool: ConnectionPool,
    viewer: str,
    start: datetime,
    end: datetime,
    bucket_s: int,
    *,
    reads: Reads | None = None,
) -> tuple[str | None, bytes, int, int]:
    """(role, buckets, how many, version): the non-empty epoch-aligned buckets of
    `start..end` (inclusive) as `viewer` may see them, in time order, as a JSON array
    (bytes), and the data version they were read at. Role None: no such viewer."""
    params = {
        "viewer": viewer,
        "stride": timedelta(seconds=bucket_s),
        "epoch": EPOCH,
        **plan_pieces(start, end, bucket_s),
    }
    row = (
        reads.read_as_viewer(SELECT_SUMMARY, params)
        if reads
        else read_one(pool, SELECT_SUMMARY, params)
    )
    if row is None:  # an aggregate always answers one row; this is for the type checker
        return None, b"[]", 0, 0
    role, count, body, version = row
    return role, body.encode(), int(count), version


# --- the rebuild (init-db) ------------------------------------------------------------------

ROLLUPS_COMPLETE = "SELECT EXISTS (SELECT 1 FROM dataproc_state WHERE key = 'rollups_complete')"
MARK_COMPLETE = (
    "INSERT INTO dataproc_state (key) VALUES ('rollups_complete') ON CONFLICT DO NOTHING"
)
# The batches rebuild minutes and hours; a day spans batches, so the days come last, from the
# hours (schema.sql), in the transaction that marks the rollups complete.
DAYS_FROM_HOURS = "SELECT dataproc_rollups_days_from_hours()"
# The time `batch_rows` points after `low` (NULL: from the first point); a batch ends at the
# next whole hour past it. Only times Python can hold are looked at: the first and the last
# batch are unbounded and take whatever lies beyond.
BATCH_END = """
SELECT time FROM data_points
WHERE time >= coalesce(%(low)s::timestamptz, '-infinity') AND time >= %(past)s AND time < %(future)s
ORDER BY time OFFSET %(rows)s LIMIT 1"""
# Writers wait while one batch is rebuilt; after the lock every statement sees every writer
# that held the table before (a fresh snapshot per statement), and a later one adds its delta.
LOCK_ROLLUPS = "LOCK TABLE data_rollups IN EXCLUSIVE MODE"
CLEAR_RANGE = """
DELETE FROM data_rollups
WHERE bucket_start >= coalesce(%(low)s::timestamptz, '-infinity') AND bucket_start < coalesce(%(high)s::timestamptz, 'infinity')"""
BUILD_RANGE = """
INSERT INTO data_rollups
SELECT %(width)s, date_bin(%(stride)s, time, %(epoch)s), 0, count(*), count(*) FILTER (WHERE valid),
       count(*) FILTER (WHERE fin), sum(value) FILTER (WHERE fin),
       min(value) FILTER (WHERE fin), max(value) FILTER (WHERE fin),
       count(*) FILTER (WHERE fin AND valid), sum(value) FILTER (WHERE fin AND valid),
       min(value) FILTER (WHERE fin AND valid), max(value) FILTER (WHERE fin AND valid)
FROM (SELECT time, value, valid, value NOT IN ('NaN', 'Infinity', '-Infinity') AS fin
      FROM data_points
      WHERE time >= coalesce(%(low)s::timestamptz, '-infinity') AND time < coalesce(%(high)s::timestamptz, 'infinity')
        AND isfinite(time)) p
GROUP BY 2 ORDER BY 2
RETURNING count"""
REBUILD_BATCH_ROWS = 500_000
FAR_PAST = datetime(1, 1, 2, tzinfo=UTC)
FAR_FUTURE = datetime(9999, 12, 30, tzinfo=UTC)


def rollups_complete(pool: ConnectionPool) -> bool:
    """True when the rollups cover every point (schema.sql or a finished rebuild said so)."""
    row = read_one(pool, ROLLUPS_COMPLETE)
    return bool(row and row[0])


def rebuild_if_missing(pool: ConnectionPool, batch_rows: int = REBUILD_BATCH_ROWS) -> int:
    """Build the rollups of rows written before the triggers existed, in batches of about
    `batch_rows` points (whole hours), logging progress; returns the points covered. Does
    nothing when they are complete. Safe to stop and run again: each batch replaces its range."""
    if rollups_complete(pool):
        return 0
    log.info("rollups: building them for the existing points")
    done, low = 0, None
    while True:
        high = _batch_end(pool, low, batch_rows)
        done += _build_range(pool, low, high)
        if high is None:
            break
        log.info("rollups: %d points done, up to %s", done, high.isoformat())
        low = high
    with connection(pool) as conn, conn.transaction():
        conn.execute(DAYS_FROM_HOURS)
        conn.execute(MARK_COMPLETE)
    log.info("rollups: complete (%d points)", done)
    return done


def _batch_end(pool: ConnectionPool, low: datetime | None, batch_rows: int) -> datetime | None:
    """Where the batch from `low` ends (a whole hour), or None: it takes every later point."""
    params = {"low": low, "rows": batch_rows, "past": FAR_PAST, "future": FAR_FUTURE}
    row = read_one(pool, BATCH_END, params)
    return None if row is None else _at(_floor(to_micros(row[0]), HOUR_US) + HOUR_US)


def _build_range(pool: ConnectionPool, low: datetime | None, high: datetime | None) -> int:
    """Replace the rollups of `[low, high)` (whole hours; None: unbounded) by aggregates of
    its raw rows, in one transaction; returns the points it covered."""
    bounds = {"low": low, "high": high}
    with connection(pool) as conn, conn.transaction():
        conn.execute(LOCK_ROLLUPS)
        # Unprepared, as every batch statement over a range (see store.GENERIC_PLANS).
        conn.execute(CLEAR_RANGE, bounds, prepare=False)
        minutes = conn.execute(
            BUILD_RANGE,
            {**bounds, "width": 60, "stride": timedelta(seconds=60), "epoch": EPOCH},
            prepare=False,
        ).fetchall()
        conn.execute(
            BUILD_RANGE,
            {**bounds, "width": 3600, "stride": timedelta(seconds=3600), "epoch": EPOCH},
            prepare=False,
        )
    return sum(row[0] for row in minutes)
