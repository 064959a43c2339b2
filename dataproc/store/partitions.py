"""The partitioned layout and retention: which layout data_points has, partitions made ahead,
and old points and rejects removed (whole partitions dropped, the rest in small batches).

Owns: the SQL of these jobs and their order. Leaves the schedule and the advisory lock's session
to `upkeep`, the command line's progress to `progress`. The partition DDL itself lives in
schema.sql (`dataproc_ensure_partition`, `dataproc_partitions_ahead`, `dataproc_cover_gaps`),
so the service, the migration and an operator with psql make partitions the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger("dataproc.partitions")

UPKEEP_LOCK_KEY = 7261657273  # one replica at a time runs upkeep; not the schema's or poller's
TRY_UPKEEP_LOCK = "SELECT pg_try_advisory_lock(%s)"
UPKEEP_UNLOCK = "SELECT pg_advisory_unlock(%s)"

# 'p': partitioned, 'r': a plain table, None: no data_points yet.
LAYOUT = "SELECT relkind::text FROM pg_class WHERE oid = to_regclass('data_points')"
PARTITIONS_AHEAD = "SELECT dataproc_partitions_ahead('data_points', %s, now())"

# Every partition with its bounds as timestamps (NULL for MINVALUE and MAXVALUE), oldest first:
# the periods and the rest partitions around them (schema.sql's dataproc_partition_bounds).
LIST_PARTITIONS = """
SELECT name, lower, upper FROM dataproc_partition_bounds('data_points')
ORDER BY lower NULLS FIRST"""

RETENTION_CUT = "SELECT now() - make_interval(secs => %s)"
DROP_PARTITION = "DROP TABLE {}"  # an identifier read from the catalog, composed by psycopg.sql
POINTS_DROPPED = "SELECT dataproc_points_dropped(%s, %s)"
COVER_GAPS = "SELECT dataproc_cover_gaps('data_points')"  # no time left without a partition
# A short wait for the partition lock (making or dropping a partition locks data_points against
# readers too): while it waits, every new reader queues behind it, and an export can hold the
# table for minutes. Upkeep tries again at its next run; three periods are made ahead.
SHORT_LOCK_WAIT = "SET LOCAL lock_timeout = '250ms'"
COUNT_OLD_POINTS = "SELECT count(*) FROM data_points WHERE time < %s"
COUNT_OLD_REJECTS = "SELECT count(*) FROM rejects WHERE received_at < %s"
# Batches by the (time, id) index; each DELETE is its own transaction, so the summary triggers
# and a replica's replay see small steps, and an interrupted prune loses nothing done.
DELETE_OLD_POINTS = """
DELETE FROM data_points WHERE time < %(cut)s AND (id, time) IN (
  SELECT id, time FROM data_points WHERE time < %(cut)s ORDER BY time, id LIMIT %(batch)s)"""
DELETE_OLD_REJECTS = """
DELETE FROM rejects WHERE id IN (
  SELECT id FROM rejects WHERE received_at < %(cut)s ORDER BY received_at LIMIT %(batch)s)"""

DEFAULT_BATCH = 10_000


def one_row(
    conn: psycopg.Connection, query: str, params: Any = (), *, prepare: bool | None = None
) -> tuple:
    """The one row a statement always returns (an aggregate, a function call). `prepare=False`
    for a statement over a range of values (see store.GENERIC_PLANS)."""
    row = conn.execute(query, params, prepare=prepare).fetchone()
    if row is None:
        raise psycopg.DataError(f"no row from: {query.split(chr(10))[0][:60]}")
    return row


def layout(conn: psycopg.Connection) -> str:
    """'partitioned', 'plain' or 'missing' (no data_points yet)."""
    row = conn.execute(LAYOUT).fetchone()
    return {"p": "partitioned", "r": "plain"}.get(row[0], str(row[0])) if row else "missing"


def make_ahead(conn: psycopg.Connection, step: str) -> list[str]:
    """Make this period's partition and the next three when missing; the names made."""
    with conn.transaction():
        conn.execute(SHORT_LOCK_WAIT)
        return [row[0] for row in conn.execute(PARTITIONS_AHEAD, (step,))]


@dataclass
class Pruned:
    """What one retention run removed, and before which time."""

    cut: datetime | None = None
    points: int = 0
    rejects: int = 0
    partitions: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """By `metrics.RETENTION_KINDS`."""
        return {"points": self.points, "rejects": self.rejects, "partitions": len(self.partitions)}


def prune(
    conn: psycopg.Connection,
    keep_s: float,
    *,
    batch: int = DEFAULT_BATCH,
    on_batch: Callable[[str, int, int], None] | None = None,
) -> Pruned:
    """Remove points older than `keep_s` seconds (by the database's clock) and rejects received
    before then: whole partitions entirely older than the cut are dropped (the rest partition
    below them then reaches up to the oldest one kept); the partition that straddles the cut,
    that lowest rest partition and a plain table lose their old rows `batch` at a time.
    A point inside the window is never touched. `on_batch(kind, removed, total)` reports."""
    cut = one_row(conn, RETENTION_CUT, (keep_s,))[0]
    done = Pruned(cut)
    if layout(conn) == "partitioned":
        done.partitions = _drop_old_partitions(conn, cut)
    done.points = _delete_batches(conn, COUNT_OLD_POINTS, DELETE_OLD_POINTS, cut, batch, on_batch)
    done.rejects = _delete_batches(
        conn, COUNT_OLD_REJECTS, DELETE_OLD_REJECTS, cut, batch, on_batch, kind="rejects"
    )
    return done


def _drop_old_partitions(conn: psycopg.Connection, cut: datetime) -> list[str]:
    """Drop, in one transaction, every partition wholly older than `cut` but the lowest rest
    partition (from MINVALUE: dropping it would leave old times without a partition, and a
    backfill must never fail), and cover the range they held."""
    old = [
        (name, lower, upper)
        for name, lower, upper in conn.execute(LIST_PARTITIONS).fetchall()
        if lower is not None and upper is not None and upper <= cut
    ]
    if not old:
        return []
    with conn.transaction():
        conn.execute(SHORT_LOCK_WAIT)
        for name, lower, upper in old:
            conn.execute(sql.SQL(DROP_PARTITION).format(sql.Identifier(name)))
            conn.execute(POINTS_DROPPED, (lower, upper))
        conn.execute(COVER_GAPS)
    for name, _, upper in old:
        log.info("retention: dropped partition %s (points before %s)", name, upper.isoformat())
    return [name for name, _, _ in old]


def _delete_batches(
    conn: psycopg.Connection,
    count_sql: str,
    delete_sql: str,
    cut: datetime,
    batch: int,
    on_batch: Callable[[str, int, int], None] | None,
    *,
    kind: str = "points",
) -> int:
    total = one_row(conn, count_sql, (cut,))[0]
    removed = 0
    while True:  # until a batch finds nothing: old-dated rows may arrive meanwhile (a backfill)
        # Never prepared: psycopg prepares a statement on its sixth run, and PostgreSQL's generic
        # plan of it (the cut and the batch size unknown) hashes every point of the table: a
        # batch at 100M points took minutes instead of milliseconds (measured).
        params = {"cut": cut, "batch": batch}
        deleted = conn.execute(delete_sql, params, prepare=False).rowcount
        if deleted <= 0:
            break
        removed += deleted
        total = max(total, removed)  # rows may have arrived with old times meanwhile
        if on_batch is not None:
            on_batch(kind, removed, total)
    return removed
