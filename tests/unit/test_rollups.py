"""The rollups of schema.sql and store/rollups.py against real PostgreSQL.

Every test writes with plain SQL (the writer the triggers must not depend on) and then
compares `data_rollups` with the same aggregates computed from the raw rows: counts exactly,
sums to rounding. The window planner is a pure function, tested with literals.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dataproc import store
from dataproc.store import rollups
from support import REPO

T0 = datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)

ORIGINAL_INIT_SQL = """
CREATE TABLE "users" ("id" serial PRIMARY KEY, "username" varchar NOT NULL UNIQUE,
  "hashed_password" varchar NOT NULL, "role" varchar NOT NULL DEFAULT 'user');
CREATE TABLE "data_points" ("id" serial PRIMARY KEY, "time" timestamptz NOT NULL,
  "value" DOUBLE PRECISION NOT NULL, "valid" boolean NOT NULL, "tags" varchar[]);
INSERT INTO USERS(id, username, hashed_password, role) VALUES(0, 'admin', '$2b$12$a/pMatsPyWuHa5KdqatsFOLZgPYjPZU4If4//jeretXqZ.ujoYFJG','admin');
"""

# The rollups as they must be: the same aggregates straight from the raw rows.
FROM_RAW = """
SELECT w, date_bin(make_interval(secs => w), time, timestamptz 'epoch') AS b,
       count(*), count(*) FILTER (WHERE valid), count(*) FILTER (WHERE fin),
       sum(value) FILTER (WHERE fin), min(value) FILTER (WHERE fin), max(value) FILTER (WHERE fin),
       count(*) FILTER (WHERE fin AND valid), sum(value) FILTER (WHERE fin AND valid),
       min(value) FILTER (WHERE fin AND valid), max(value) FILTER (WHERE fin AND valid)
FROM (SELECT *, value NOT IN ('NaN', 'Infinity', '-Infinity') AS fin FROM data_points) p,
     (VALUES (60), (3600), (86400)) AS widths(w)
GROUP BY 1, 2 ORDER BY 1, 2"""
# The stored rollups, each interval's shards added up (as the summary reads them).
STORED = """
SELECT width_s, bucket_start, sum(count)::bigint, sum(valid)::bigint, sum(finite_count)::bigint,
       sum(sum), min(min), max(max), sum(valid_finite_count)::bigint, sum(valid_sum),
       min(valid_min), max(valid_max)
FROM data_rollups GROUP BY 1, 2 ORDER BY 1, 2"""


def close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def assert_rollups_exact(conninfo_or_pool) -> int:
    """The stored rollups equal the raw aggregates; returns how many rows there are."""
    if isinstance(conninfo_or_pool, str):
        with psycopg.connect(conninfo_or_pool) as conn:
            expected, stored = conn.execute(FROM_RAW).fetchall(), conn.execute(STORED).fetchall()
    else:
        with store.connection(conninfo_or_pool) as conn:
            expected, stored = conn.execute(FROM_RAW).fetchall(), conn.execute(STORED).fetchall()
    assert [row[:5] for row in stored] == [row[:5] for row in expected]
    for got, want in zip(stored, expected, strict=True):
        assert all(close(g, w) for g, w in zip(got, want, strict=True)), (got, want)
    return len(stored)


def execute(pool, sql: str, params=()) -> None:
    with store.connection(pool) as conn:
        conn.execute(sql, params)


INSERT = "INSERT INTO data_points (time, value, valid, tags) VALUES (%s, %s, %s, '{}')"


@pytest.fixture
def points(clean_db):
    """Points over three hours with invalid and non-finite ones, by plain SQL."""
    execute(
        clean_db,
        "INSERT INTO data_points (time, value, valid, tags) "
        "SELECT %s + i * interval '7.3 seconds', "
        "  CASE WHEN i %% 97 = 0 THEN 'NaN' WHEN i %% 89 = 0 THEN '-Infinity' ELSE sin(i) END, "
        "  i %% 5 <> 0, '{}' FROM generate_series(1, 1500) AS i",
        (T0,),
    )
    return clean_db


# --- the triggers ---------------------------------------------------------------------------


def test_a_plain_sql_insert_is_rolled_up_in_its_own_statement(points):
    assert assert_rollups_exact(points) > 150  # minutes and hours


def test_single_row_inserts_add_up(clean_db):
    for i, value in enumerate([1.5, -2.0, math.nan, math.inf, 0.25]):
        execute(clean_db, INSERT, (T0 + timedelta(seconds=i * 20), value, i % 2 == 0))
    assert assert_rollups_exact(clean_db) == 5  # three minutes, one hour, one day
    with store.connection(clean_db) as conn:
        row = conn.execute(
            "SELECT sum(count), sum(valid), sum(finite_count), min(min), max(max) "
            "FROM data_rollups WHERE width_s = 3600"
        ).fetchone()
    assert row == (5, 3, 3, -2.0, 1.5)


def test_a_copy_is_rolled_up(clean_db):
    lines = "".join(
        f"{(T0 + timedelta(seconds=i * 0.9)).isoformat()}\t{math.cos(i)}\t{'t' if i % 3 else 'f'}\t{{}}\n"
        for i in range(20_000)
    )
    with store.connection(clean_db) as conn, conn.transaction():
        with conn.cursor().copy("COPY data_points (time, value, valid, tags) FROM STDIN") as copy:
            copy.write(lines)
        # Same transaction: the rollups are there before the commit.
        assert (
            conn.execute("SELECT sum(count) FROM data_rollups WHERE width_s = 60").fetchone()[0]
            == 20_000
        )
    assert assert_rollups_exact(clean_db) > 300


def test_a_rolled_back_insert_leaves_no_rollup(clean_db):
    with pytest.raises(RuntimeError), store.connection(clean_db) as conn, conn.transaction():
        conn.execute(INSERT, (T0, 1.0, True))
        raise RuntimeError("roll back")
    assert assert_rollups_exact(clean_db) == 0


def test_deletes_recompute_counts_and_min_max(points):
    execute(points, "DELETE FROM data_points WHERE id %% 3 = 0")
    assert_rollups_exact(points)
    with store.connection(points) as conn:  # the extreme of one minute goes: its min moves
        minute = conn.execute("SELECT min(time) FROM data_points").fetchone()[0]
        conn.execute(
            "DELETE FROM data_points WHERE id = (SELECT id FROM data_points "
            "WHERE time < %s + interval '1 minute' ORDER BY value LIMIT 1)",
            (minute,),
        )
    assert_rollups_exact(points)


def test_deleting_every_point_of_an_interval_removes_its_rows(points):
    execute(points, "DELETE FROM data_points WHERE time < %s", (T0 + timedelta(hours=1),))
    assert_rollups_exact(points)
    execute(points, "DELETE FROM data_points")
    assert assert_rollups_exact(points) == 0


def test_updates_of_time_value_and_validity_move_the_counts(points):
    execute(points, "UPDATE data_points SET time = time + interval '2 hours' WHERE id %% 7 = 0")
    assert_rollups_exact(points)
    execute(points, "UPDATE data_points SET valid = NOT valid WHERE id %% 11 = 0")
    assert_rollups_exact(points)
    execute(points, "UPDATE data_points SET value = 'NaN' WHERE id %% 13 = 0")
    assert_rollups_exact(points)
    execute(points, "UPDATE data_points SET value = 1e6 WHERE id = 400")
    assert_rollups_exact(points)


def test_a_tags_only_update_touches_no_rollup(points):
    versions = "SELECT width_s, bucket_start, shard, xmin::text FROM data_rollups ORDER BY 1, 2, 3"
    with store.connection(points) as conn:
        before = conn.execute(versions).fetchall()
        conn.execute("UPDATE data_points SET tags = '{x}'")
        after = conn.execute(versions).fetchall()
    assert before == after  # no row version was written


def test_truncate_empties_the_rollups(points):
    execute(points, "TRUNCATE data_points")
    assert assert_rollups_exact(points) == 0


def test_parallel_inserts_into_one_minute_lose_no_count_and_never_deadlock(clean_db, database_url):
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                for i in range(60):
                    with conn.transaction():
                        conn.execute(
                            INSERT, (T0 + timedelta(milliseconds=seed * 7 + i), i, i % 2 == 0)
                        )
                        conn.execute(INSERT, (T0 + timedelta(minutes=2), -i, True))  # other minute
        except BaseException as error:  # reported below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert_rollups_exact(clean_db)
    with store.connection(clean_db) as conn:
        assert conn.execute(
            "SELECT sum(count) FROM data_rollups WHERE width_s = 3600"
        ).fetchone() == (720,)


def test_parallel_deletes_and_inserts_in_one_minute_stay_exact(points, database_url):
    errors: list[BaseException] = []
    with store.connection(points) as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM data_points ORDER BY id LIMIT 400")]

    def deleter(chunk: list[int]) -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                for point_id in chunk:
                    # Statements that span two minutes (and hours) take locks on both.
                    conn.execute(
                        "DELETE FROM data_points WHERE id = %s OR id = %s",
                        (point_id, point_id + 700),
                    )
                    conn.execute(
                        "INSERT INTO data_points (time, value, valid, tags) "
                        "VALUES (%s, %s, true, '{}'), (%s, %s, false, '{}')",
                        (
                            T0 + timedelta(seconds=point_id % 50),
                            point_id,
                            T0 + timedelta(minutes=59, seconds=point_id % 7),
                            -point_id,
                        ),
                    )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=deleter, args=(ids[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert_rollups_exact(points)


# --- the rebuild ----------------------------------------------------------------------------


@pytest.fixture
def original_database(database_url) -> Iterator[str]:
    """A database made by the original service's init.sql, with 3000 of its points."""
    name = "dataproc_" + uuid.uuid4().hex[:12]
    admin = make_conninfo(database_url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    conninfo = make_conninfo(database_url, dbname=name)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(ORIGINAL_INIT_SQL)
        conn.execute(
            "INSERT INTO data_points (time, value, valid, tags) "
            "SELECT %s + i * interval '13 seconds', i, i %% 4 <> 0, NULL "
            "FROM generate_series(1, 3000) AS i",
            (T0,),
        )
    yield conninfo
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_schema_over_the_original_marks_the_rollups_missing_and_a_rebuild_fills_them(
    original_database,
):
    pool = store.make_pool(original_database, max_size=2, wait_s=5)
    store.open_pool(pool, 10)
    try:
        store.apply_schema(pool)
        assert rollups.rollups_complete(pool) is False
        execute(pool, INSERT, (T0 - timedelta(days=1), 5.0, True))  # a write meanwhile
        assert rollups.rebuild_if_missing(pool, batch_rows=700) == 3001
        assert rollups.rollups_complete(pool) is True
        assert_rollups_exact(pool)
        store.apply_schema(pool)  # re-applied: still complete, nothing rebuilt
        assert rollups.rebuild_if_missing(pool) == 0
    finally:
        pool.close()


def test_init_db_on_an_original_database_rebuilds_the_rollups_with_progress(
    original_database, tmp_path
):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATAPROC_", "POSTGRES_"))}
    env.update(DATABASE_URL=original_database, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "dataproc", "init-db"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "rollups: complete (3000 points)" in result.stderr
    assert_rollups_exact(original_database)


# What schema.sql adds for the rollups; without it, a database is as an earlier dataproc made it.
WITHOUT_ROLLUPS = """
DROP TABLE data_rollups;
DROP TRIGGER data_points_rollups_insert ON data_points;
DROP TRIGGER data_points_rollups_delete ON data_points;
DROP TRIGGER data_points_rollups_update ON data_points;
DROP TRIGGER data_points_rollups_truncate ON data_points;
DELETE FROM dataproc_state WHERE key = 'rollups_complete';
"""


def test_a_database_of_an_earlier_dataproc_gets_rollups_on_reapply_and_rebuild(fresh_database):
    pool = store.make_pool(fresh_database, max_size=2, wait_s=5)
    store.open_pool(pool, 10)
    try:
        store.apply_schema(pool)
        execute(pool, WITHOUT_ROLLUPS)
        execute(
            pool,
            "INSERT INTO data_points (time, value, valid, tags) "
            "SELECT %s + i * interval '1 minute', i, true, '{}' FROM generate_series(1, 200) i",
            (T0,),
        )
        store.apply_schema(pool)
        assert rollups.rollups_complete(pool) is False
        assert rollups.rebuild_if_missing(pool) == 200
        assert_rollups_exact(pool)
    finally:
        pool.close()


# The rollups as a dataproc before day rows left them: minutes and hours only.
BEFORE_DAY_ROWS = """
DELETE FROM data_rollups WHERE width_s = 86400;
DELETE FROM dataproc_state WHERE key = 'rollups_days';
ALTER TABLE data_rollups DROP CONSTRAINT data_rollups_width_s_check;
ALTER TABLE data_rollups ADD CONSTRAINT data_rollups_width_s_check CHECK (width_s IN (60, 3600));
"""


def test_rollups_made_before_day_rows_get_them_on_reapply(fresh_database):
    pool = store.make_pool(fresh_database, max_size=2, wait_s=5)
    store.open_pool(pool, 10)
    try:
        store.apply_schema(pool)
        execute(
            pool,
            "INSERT INTO data_points (time, value, valid, tags) "
            "SELECT %s + i * interval '17 minutes', sin(i), i %% 3 > 0, '{}' "
            "FROM generate_series(1, 600) i",
            (T0,),
        )
        execute(pool, BEFORE_DAY_ROWS)
        store.apply_schema(pool)
        assert assert_rollups_exact(pool) > 600
        with store.connection(pool) as conn:
            days = conn.execute("SELECT count(*) FROM data_rollups WHERE width_s = 86400")
            assert days.fetchone() == (8,)  # 600 x 17 minutes from T0: 8 UTC days
    finally:
        pool.close()


def test_points_over_days_deleted_and_moved_keep_the_day_rows_exact(clean_db):
    execute(
        clean_db,
        "INSERT INTO data_points (time, value, valid, tags) "
        "SELECT %s + i * interval '53 minutes', i, i %% 4 > 0, '{}' FROM generate_series(1, 400) i",
        (T0,),
    )
    execute(clean_db, "DELETE FROM data_points WHERE id %% 7 = 0")
    execute(
        clean_db,
        "UPDATE data_points SET time = time + interval '2 days', valid = NOT valid "
        "WHERE id %% 5 = 0",
    )
    assert assert_rollups_exact(clean_db) > 400


def test_a_fresh_schema_needs_no_rebuild(clean_db):
    assert rollups.rollups_complete(clean_db) is True


# --- the window planner ---------------------------------------------------------------------


def pieces(start: str, end: str, bucket_s: int) -> dict[str, tuple[str, str]]:
    planned = rollups.plan_pieces(
        datetime.fromisoformat(start), datetime.fromisoformat(end), bucket_s
    )
    names = rollups.PIECES

    def text(moment: datetime) -> str:
        return moment.strftime("%H:%M:%S.%f").rstrip("0").rstrip(".")

    return {
        n: (text(planned[f"{n}_from"]), text(planned[f"{n}_to"]))
        for n in names
        if planned[f"{n}_from"] != planned[f"{n}_to"]
    }


def test_hour_buckets_read_hours_then_minutes_then_raw_edges():
    assert pieces("2024-04-22T10:00:30+00:00", "2024-04-22T13:30:10+00:00", 3600) == {
        "raw1": ("10:00:30", "10:01:00"),
        "min1": ("10:01:00", "11:00:00"),
        "hours1": ("11:00:00", "13:00:00"),
        "min2": ("13:00:00", "13:30:00"),
        "raw2": ("13:30:00", "13:30:10.000001"),
    }


def test_day_buckets_read_days_then_hours_then_minutes_then_raw_edges():
    planned = rollups.plan_pieces(
        datetime.fromisoformat("2024-04-20T22:30:15+00:00"),
        datetime.fromisoformat("2024-04-23T01:10:00+00:00"),
        86400,
    )
    got = {
        name: (planned[f"{name}_from"].isoformat()[5:19], planned[f"{name}_to"].isoformat()[5:19])
        for name in rollups.PIECES
        if planned[f"{name}_from"] != planned[f"{name}_to"]
    }
    assert got == {
        "raw1": ("04-20T22:30:15", "04-20T22:31:00"),
        "min1": ("04-20T22:31:00", "04-20T23:00:00"),
        "hours1": ("04-20T23:00:00", "04-21T00:00:00"),
        "days": ("04-21T00:00:00", "04-23T00:00:00"),
        "hours2": ("04-23T00:00:00", "04-23T01:00:00"),
        "min2": ("04-23T01:00:00", "04-23T01:10:00"),
        "raw2": ("04-23T01:10:00", "04-23T01:10:00"),
    }


def test_minute_buckets_read_minutes_and_raw_edges_only():
    assert pieces("2024-04-22T10:00:00+00:00", "2024-04-22T13:00:00+00:00", 300) == {
        "min1": ("10:00:00", "13:00:00"),
        "raw2": ("13:00:00", "13:00:00.000001"),
    }


def test_buckets_smaller_than_a_minute_read_raw_rows_only():
    assert pieces("2024-04-22T10:00:00+00:00", "2024-04-22T13:00:00+00:00", 30) == {
        "raw1": ("10:00:00", "13:00:00.000001"),
    }


def test_a_window_inside_one_minute_reads_raw_rows_only():
    assert pieces("2024-04-22T10:00:10+00:00", "2024-04-22T10:00:50+00:00", 3600) == {
        "raw1": ("10:00:10", "10:00:50.000001"),
    }


def test_an_end_just_before_a_whole_minute_covers_that_minute_from_the_rollups():
    assert pieces("2024-04-22T10:00:00+00:00", "2024-04-22T10:01:59.999999+00:00", 60) == {
        "min1": ("10:00:00", "10:02:00"),
    }
