"""`migrate-partitions`: a plain data_points (the original's, or ours) becomes the partitioned
layout, in batches, with nothing lost or twice, while the service keeps reading and writing.

How: a row trigger on the old table logs the id of every row written from now on; the rows
are copied by id ranges into `data_points_new` (partitioned), each batch in one transaction
that also checks the two tables hold the same number of rows in its range and records how far
the copy got (`dataproc_migration`); the logged ids are then copied again (deleted and
re-inserted from the old table, so an update or a delete during the copy is caught up). Last,
one short transaction under a lock catches up the rest of the log, compares the totals, drops
the old table and gives the new one its name (and the triggers schema.sql puts on
data_points). Killed at any point and run again, it resumes where the last committed batch
left off: every step is idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from . import SET_PARTITION, partitions, schema_sql
from .partitions import one_row

log = logging.getLogger("dataproc.migration")

COLUMNS = "id, time, value, valid, tags, source_document, document_sha256, ingested_at"

SETUP = [
    """CREATE TABLE IF NOT EXISTS dataproc_migration (
         name text PRIMARY KEY,
         step text NOT NULL,
         low_id bigint NOT NULL,
         high_id bigint NOT NULL,
         copied_to bigint NOT NULL,
         copied bigint NOT NULL DEFAULT 0,
         updated_at timestamptz NOT NULL DEFAULT now())""",
    "CREATE TABLE IF NOT EXISTS dataproc_migration_log (seq bigserial PRIMARY KEY, id bigint)",
    """CREATE OR REPLACE FUNCTION dataproc_migration_logged() RETURNS trigger
       LANGUAGE plpgsql AS $fn$
       BEGIN
         IF TG_OP <> 'INSERT' THEN
           INSERT INTO dataproc_migration_log (id) VALUES (OLD.id);
         END IF;
         IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.id <> OLD.id) THEN
           INSERT INTO dataproc_migration_log (id) VALUES (NEW.id);
         END IF;
         RETURN NULL;
       END $fn$""",
    """DO $$
       BEGIN
         IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'data_points_migration_log'
                        AND tgrelid = 'data_points'::regclass) THEN
           CREATE TRIGGER data_points_migration_log AFTER INSERT OR UPDATE OR DELETE
             ON data_points FOR EACH ROW EXECUTE FUNCTION dataproc_migration_logged();
         END IF;
         IF to_regclass('data_points_new') IS NULL THEN
           PERFORM dataproc_create_partitioned('data_points_new');
         END IF;
       END $$""",
]
# Read after the trigger exists: creating it waited for every writer that began before, so
# every row above high_id is in the log.
START = """
INSERT INTO dataproc_migration (name, step, low_id, high_id, copied_to)
SELECT 'partitions', %(step)s, coalesce(min(id), 0) - 1, coalesce(max(id), 0),
       coalesce(min(id), 0) - 1
FROM data_points
ON CONFLICT (name) DO NOTHING"""
STATE = "SELECT step, low_id, high_id, copied_to, copied FROM dataproc_migration WHERE name = 'partitions'"
# The partitions the old rows need, oldest first: at most the last 5,000 periods (older
# points go to the rest partition below them), then the next ones ahead.
PARTITIONS_FOR_ROWS = """
SELECT dataproc_ensure_partition('data_points_new', %(step)s, t)
FROM generate_series(
  greatest(date_trunc(%(step)s, coalesce((SELECT min(time) FROM data_points), now()), 'UTC'),
           now() - 5000 * ('1 ' || %(step)s)::interval),
  now(), ('1 ' || %(step)s)::interval) t"""
PARTITIONS_AHEAD = "SELECT dataproc_partitions_ahead('data_points_new', %s, now())"
REPEATABLE = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"
COPY_RANGE = f"""
INSERT INTO data_points_new ({COLUMNS})
SELECT {COLUMNS} FROM data_points WHERE id > %(low)s AND id <= %(high)s
ON CONFLICT DO NOTHING"""
COUNT_OLD = "SELECT count(*) FROM data_points WHERE id > %(low)s AND id <= %(high)s"
COUNT_NEW = "SELECT count(*) FROM data_points_new WHERE id > %(low)s AND id <= %(high)s"
ADVANCE = """
UPDATE dataproc_migration SET copied_to = %(high)s, copied = copied + %(copied)s,
  updated_at = now() WHERE name = 'partitions'"""
LOG_SIZE = "SELECT count(*) FROM dataproc_migration_log"
LOG_BATCH = "SELECT max(seq), array_agg(DISTINCT id) FROM (SELECT seq, id FROM dataproc_migration_log ORDER BY seq LIMIT %s) b"
REPLAY_DELETE = "DELETE FROM data_points_new WHERE id = ANY(%s)"
REPLAY_INSERT = f"""
INSERT INTO data_points_new ({COLUMNS}) SELECT {COLUMNS} FROM data_points WHERE id = ANY(%s)"""
LOG_DONE = "DELETE FROM dataproc_migration_log WHERE seq <= %s"
LOCK_WAIT = "SET LOCAL lock_timeout = '5s'"
LOCK_WRITES = "LOCK TABLE data_points IN SHARE MODE"  # readers go on; writers wait
LOCK_ALL = "LOCK TABLE data_points IN ACCESS EXCLUSIVE MODE"
COUNT_ALL_OLD = "SELECT count(*) FROM data_points"
COUNT_ALL_NEW = "SELECT count(*) FROM data_points_new"
SWAP = [
    # The sequence must belong to the new table before the old one (its owner) is dropped.
    "ALTER SEQUENCE data_points_id_seq OWNED BY data_points_new.id",
    "DROP TABLE data_points",
    "ALTER TABLE data_points_new RENAME TO data_points",
    "ALTER INDEX data_points_new_pkey RENAME TO data_points_pkey",
    "ALTER INDEX data_points_new_document_sha256_time_key "
    "RENAME TO data_points_document_sha256_time_key",
    "ALTER INDEX data_points_new_time_id_idx RENAME TO data_points_time_id_idx",
    "ALTER INDEX data_points_new_valid_time_id_idx RENAME TO data_points_valid_time_id_idx",
    "DROP TABLE dataproc_migration_log",
    "DROP FUNCTION dataproc_migration_logged()",
    "DROP TABLE dataproc_migration",
]

DEFAULT_BATCH = 50_000


class MigrationError(Exception):
    """The migration cannot go on (the message says why); what it did so far is kept."""


@dataclass
class Migrated:
    """The outcome: rows in the partitioned table, and whether this run did the swap."""

    rows: int
    swapped: bool


def migrate(
    conn: psycopg.Connection,
    step: str,
    *,
    batch: int = DEFAULT_BATCH,
    on_batch: Callable[[int, int], None] | None = None,
) -> Migrated:
    """Convert a plain data_points to `step` partitions (resuming a run that was stopped)."""
    shape = partitions.layout(conn)
    if shape == "partitioned":
        return Migrated(one_row(conn, COUNT_ALL_OLD)[0], False)
    if shape != "plain":
        raise MigrationError("no data_points table: run 'dataproc init-db'")
    with conn.transaction():
        for statement in SETUP:
            conn.execute(statement)
    with conn.transaction():
        conn.execute(START, {"step": step})
    recorded, low, high, copied_to, copied = one_row(conn, STATE)
    if recorded != step:
        raise MigrationError(
            f"a migration to {recorded} partitions is under way: finish it with "
            f"DATAPROC_PARTITION={recorded}"
        )
    with conn.transaction():
        conn.execute(PARTITIONS_FOR_ROWS, {"step": step})
        conn.execute(PARTITIONS_AHEAD, (step,))
    total = max(high - low, 0)
    while copied_to < high:
        upper = min(copied_to + batch, high)
        copied += _copy_batch(conn, copied_to, upper)
        copied_to = upper
        if on_batch is not None:
            on_batch(copied_to - low, total)
    while one_row(conn, LOG_SIZE)[0] > batch:
        _replay(conn, batch)
    rows = _swap(conn, step, batch)
    return Migrated(rows, True)


def _copy_batch(conn: psycopg.Connection, low: int, high: int) -> int:
    """Copy ids in (low, high] and check both tables hold the same rows there, in one snapshot."""
    bounds = {"low": low, "high": high}
    with conn.transaction():
        conn.execute(REPEATABLE)
        # Unprepared, as every batch statement over a range (see store.GENERIC_PLANS).
        copied = conn.execute(COPY_RANGE, bounds, prepare=False).rowcount
        old, new = (one_row(conn, q, bounds, prepare=False)[0] for q in (COUNT_OLD, COUNT_NEW))
        if old != new:
            raise MigrationError(
                f"ids {low + 1}..{high}: {old} rows in the old table, {new} copied"
            )
        conn.execute(ADVANCE, {**bounds, "copied": copied})
    return copied


def _replay(conn: psycopg.Connection, batch: int) -> bool:
    """Copy again the rows whose ids the trigger logged (the oldest `batch` log entries), in
    one transaction; False when the log was empty."""
    with conn.transaction():
        return _replay_in_place(conn, batch)


def _swap(conn: psycopg.Connection, step: str, batch: int) -> int:
    """The last catch-up and the swap, in one transaction; retried while the lock is busy."""
    for attempt in range(1, 11):
        try:
            with conn.transaction():
                conn.execute(LOCK_WAIT)
                conn.execute(LOCK_WRITES)
                while _replay_in_place(conn, batch):
                    pass
                old, new = (one_row(conn, q)[0] for q in (COUNT_ALL_OLD, COUNT_ALL_NEW))
                if old != new:
                    raise MigrationError(f"{old} rows in the old table, {new} in the new one")
                conn.execute(LOCK_ALL)
                for statement in SWAP:
                    conn.execute(statement)
                conn.execute(SET_PARTITION, (step,))
                conn.execute(schema_sql())  # the triggers and checks of data_points, on the new one
            return new
        except psycopg.errors.LockNotAvailable:
            log.info("migrate-partitions: data_points is busy, retrying the swap (%d)", attempt)
    raise MigrationError("data_points stayed locked by others: run the migration again")


def _replay_in_place(conn: psycopg.Connection, batch: int) -> bool:
    last, ids = one_row(conn, LOG_BATCH, (batch,))
    if last is None:
        return False
    # Deleted and inserted again from the old table: an update is caught up, and a row deleted
    # there meanwhile is gone here too.
    conn.execute(REPLAY_DELETE, (ids,))
    conn.execute(REPLAY_INSERT, (ids,))
    conn.execute(LOG_DONE, (last,))
    return True
