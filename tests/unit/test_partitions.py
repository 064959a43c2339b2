"""The partitioned layout against real PostgreSQL: what init-db makes, the dedupe key on both
layouts (also over the original's init.sql and our previous schema), rest partitions covering
every time (a backfill never fails) and giving their points up to a period made later, the
DEFAULT partition of an earlier layout replaced, partitions made ahead by the upkeep job under
its advisory lock, pages scanned in partition order, and pages that read the same on either
layout.

Each test that needs a layout makes its own database on the test server.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from dataproc import store
from dataproc.store import partitions
from dataproc.upkeep import Upkeep
from support import TEST_PARTITION

T0 = datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)

# The original's tables (its init.sql, for one database) and our previous unique key.
ORIGINAL_TABLES = """
CREATE TABLE "users" ("id" serial PRIMARY KEY, "username" varchar NOT NULL UNIQUE,
  "hashed_password" varchar NOT NULL, "role" varchar NOT NULL DEFAULT 'user');
CREATE TABLE "data_points" ("id" serial PRIMARY KEY, "time" timestamptz NOT NULL,
  "value" DOUBLE PRECISION NOT NULL, "valid" boolean NOT NULL, "tags" varchar[]);
INSERT INTO USERS(id, username, hashed_password, role) VALUES(0, 'admin', 'x', 'admin');
"""
PREVIOUS_KEY = """
ALTER TABLE data_points ADD COLUMN source_document text;
ALTER TABLE data_points ADD COLUMN document_sha256 bytea;
ALTER TABLE data_points ADD COLUMN ingested_at timestamptz NOT NULL DEFAULT now();
CREATE UNIQUE INDEX data_points_document_sha256_key ON data_points (document_sha256);
"""


@pytest.fixture
def fresh_pool(fresh_database) -> Iterator[store.ConnectionPool]:
    pool = store.make_pool(fresh_database, max_size=3, wait_s=5)
    store.open_pool(pool, 10)
    yield pool
    pool.close()


def rows(pool, sql: str, params=()) -> list[tuple]:
    with store.connection(pool) as conn:
        return conn.execute(sql, params).fetchall()


def point(when: datetime, *, sha: bytes | None = None, valid: bool = True) -> store.NewPoint:
    return store.NewPoint(when, 1.5, valid, [], "{}", sha or os.urandom(32))


# The last of the daily partitions made ahead dropped (as if upkeep had not made it yet).
DROP_LAST_AHEAD = """
DO $$ BEGIN
  EXECUTE 'DROP TABLE data_points_d'
    || to_char((now() AT TIME ZONE 'UTC') + interval '3 days', 'YYYYMMDD');
END $$"""


def covering(pool) -> list[tuple]:
    """The partitions, oldest first, after checking they cover every time exactly once."""
    parts = rows(pool, partitions.LIST_PARTITIONS)
    assert parts[0][1] is None and parts[-1][2] is None, parts  # MINVALUE .. MAXVALUE
    for (_, _, upper), (_, lower, _) in zip(parts, parts[1:], strict=False):
        assert upper == lower, parts  # no gap, no overlap
    return parts


def periods(parts: list[tuple]) -> list[tuple]:
    return [part for part in parts if not part[0].startswith("data_points_rest_")]


def test_the_test_database_has_the_layout_the_run_asked_for(pool):
    """DATAPROC_TEST_PARTITION=day runs the suites on the partitioned layout: really."""
    with store.connection(pool) as conn:
        shape = partitions.layout(conn)
    assert shape == ("plain" if TEST_PARTITION == "none" else "partitioned")


@pytest.mark.parametrize("step", ["day", "week", "month"])
def test_init_db_makes_a_partitioned_table_with_the_unique_keys(fresh_pool, step):
    store.apply_schema(fresh_pool, step)
    store.apply_schema(fresh_pool, step)  # idempotent
    assert rows(fresh_pool, partitions.LAYOUT) == [("p",)]
    keys = dict(
        rows(
            fresh_pool,
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'data_points'::regclass AND contype IN ('p', 'u')",
        )
    )
    assert keys == {
        "data_points_pkey": 'PRIMARY KEY (id, "time")',
        "data_points_document_sha256_time_key": 'UNIQUE (document_sha256, "time")',
    }
    parts = covering(fresh_pool)
    assert parts[0][0] == "data_points_rest_min" and parts[-1][0].startswith("data_points_rest_")
    ranged = periods(parts)
    assert ranged == parts[1:-1] and len(ranged) == 4  # this period and the next three
    now = rows(fresh_pool, "SELECT now()")[0][0]
    assert ranged[0][1] <= now < ranged[0][2]
    assert all(lower.astimezone(UTC).hour == 0 for _, lower, _ in ranged)
    assert rows(fresh_pool, "SELECT count(*) FROM pg_partition_tree('data_points')") == [(7,)]


def test_a_plain_database_keeps_its_layout_when_partitioning_is_asked_later(fresh_pool):
    store.apply_schema(fresh_pool)
    store.apply_schema(fresh_pool, "day")
    assert rows(fresh_pool, partitions.LAYOUT) == [("r",)]


@pytest.mark.parametrize("start", ["original", "previous"])
def test_the_unique_key_moves_to_the_pair_on_older_plain_databases(fresh_pool, start):
    with store.connection(fresh_pool) as conn:
        conn.execute(ORIGINAL_TABLES)
        if start == "previous":
            conn.execute(PREVIOUS_KEY)
    store.apply_schema(fresh_pool)
    store.apply_schema(fresh_pool)
    indexes = {
        name: definition
        for name, definition in rows(
            fresh_pool,
            "SELECT indexname::text, indexdef FROM pg_indexes WHERE tablename = 'data_points'",
        )
    }
    assert "data_points_document_sha256_key" not in indexes
    assert '(document_sha256, "time")' in indexes["data_points_document_sha256_time_key"]
    first, new = store.insert_point(fresh_pool, point(T0, sha=b"s" * 32))
    again, new_again = store.insert_point(fresh_pool, point(T0, sha=b"s" * 32))
    assert (new, new_again) == (True, False) and first == again


@pytest.mark.parametrize("step", ["none", "day"])
def test_the_same_document_is_stored_once_on_either_layout(fresh_pool, step):
    store.apply_schema(fresh_pool, step)
    sha = os.urandom(32)
    results = [store.insert_point(fresh_pool, point(T0, sha=sha)) for _ in range(3)]
    assert [new for _, new in results] == [True, False, False]
    assert len({body for body, _ in results}) == 1
    assert rows(fresh_pool, "SELECT count(*) FROM data_points") == [(1,)]


def test_a_backfill_lands_in_a_rest_partition_and_moves_when_its_partition_is_made(
    fresh_pool,
):
    store.apply_schema(fresh_pool, "day")
    old = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)
    later = [old + timedelta(days=1), old + timedelta(days=400)]  # in what stays a rest
    body, _ = store.insert_point(fresh_pool, point(old))
    for when in later:
        store.insert_point(fresh_pool, point(when))
    where = "SELECT tableoid::regclass::text, time FROM data_points ORDER BY time"
    assert [name for name, _ in rows(fresh_pool, where)] == ["data_points_rest_min"] * 3
    made = rows(fresh_pool, "SELECT dataproc_ensure_partition('data_points', 'day', %s)", (old,))
    assert made == [("data_points_d20010203",)]
    # Carved out of the middle of the lowest rest partition: below it the rest keeps its name,
    # above it a new one starts at the period's end, and the later points moved there.
    assert [name for name, _ in rows(fresh_pool, where)] == [
        "data_points_d20010203",
        "data_points_rest_20010204",
        "data_points_rest_20010204",
    ]
    parts = covering(fresh_pool)
    assert [name for name, _, _ in parts[:3]] == [
        "data_points_rest_min",
        "data_points_d20010203",
        "data_points_rest_20010204",
    ]
    page = json.loads(store.list_points(fresh_pool, viewer="admin").json)
    assert page[0] == json.loads(body) and len(page) == 3
    again = rows(fresh_pool, "SELECT dataproc_ensure_partition('data_points', 'day', %s)", (old,))
    assert again == [(None,)]
    # The next day starts exactly where that rest partition does: the rest moves up, renamed.
    store.insert_point(fresh_pool, point(old + timedelta(days=1, hours=1)))
    rows(fresh_pool, "SELECT dataproc_ensure_partition('data_points', 'day', %s)", (later[0],))
    assert [name for name, _, _ in covering(fresh_pool)[:4]] == [
        "data_points_rest_min",
        "data_points_d20010203",
        "data_points_d20010204",
        "data_points_rest_20010205",
    ]
    assert rows(fresh_pool, "SELECT count(*) FROM data_points") == [(4,)]


def test_points_after_the_partitions_made_ahead_wait_in_the_rest_and_move_when_made(fresh_pool):
    """The service was down for weeks (no upkeep): points of those days are stored, and move
    into their partitions when upkeep makes them."""
    store.apply_schema(fresh_pool, "day")
    (now,) = rows(fresh_pool, "SELECT now()")[0]
    when = now + timedelta(days=20)
    store.insert_point(fresh_pool, point(when))
    (holder,) = rows(fresh_pool, "SELECT tableoid::regclass::text FROM data_points")[0]
    assert holder.startswith("data_points_rest_")
    rows(fresh_pool, "SELECT dataproc_partitions_ahead('data_points', 'day', %s)", (when,))
    (holder,) = rows(fresh_pool, "SELECT tableoid::regclass::text FROM data_points")[0]
    assert holder == "data_points_d" + when.astimezone(UTC).strftime("%Y%m%d")
    assert len(periods(covering(fresh_pool))) == 8


def test_a_period_of_another_step_is_refused_with_its_reason(fresh_pool):
    store.apply_schema(fresh_pool, "day")
    with pytest.raises(psycopg.errors.RaiseException, match="DATAPROC_PARTITION"):
        rows(fresh_pool, "SELECT dataproc_ensure_partition('data_points', 'month', now())")
    covering(fresh_pool)  # nothing changed half-way


def test_the_default_partition_of_the_earlier_layout_becomes_rest_partitions(fresh_pool):
    """A database partitioned by the previous dataproc (a DEFAULT partition) is converted when
    the schema is applied: the same points with the same ids, the summary unchanged."""
    store.apply_schema(fresh_pool, "day")
    with store.connection(fresh_pool) as conn:
        conn.execute(
            "SELECT dataproc_ensure_partition('data_points', 'day', %s)",
            (T0,),
        )
        for name, *_ in covering(fresh_pool):
            if name.startswith("data_points_rest_"):
                conn.execute(f"DROP TABLE {name}")
        conn.execute("CREATE TABLE data_points_default PARTITION OF data_points DEFAULT")
    for when in (T0 - timedelta(days=300), T0, T0 + timedelta(days=1), T0 + timedelta(days=900)):
        store.insert_point(fresh_pool, point(when))
    before = rows(fresh_pool, "SELECT id, time FROM data_points ORDER BY id")
    counts = "SELECT sum(count) FROM data_rollups WHERE width_s = 60"
    (rolled,) = rows(fresh_pool, counts)[0]
    store.apply_schema(fresh_pool, "day")
    parts = covering(fresh_pool)
    assert "data_points_default" not in {name for name, _, _ in parts}
    assert rows(fresh_pool, "SELECT id, time FROM data_points ORDER BY id") == before
    assert rows(fresh_pool, counts) == [(rolled,)] and rolled == 4
    assert rows(
        fresh_pool, "SELECT tableoid::regclass::text FROM data_points WHERE time = %s", (T0,)
    ) == [("data_points_d20240422",)]


@pytest.mark.parametrize("step", ["day", "month"])
def test_pages_scan_the_partitions_in_order(fresh_pool, step):
    """No MergeAppend: an ordered Append reads the first partitions and stops at the limit,
    however many partitions there are (the DEFAULT partition of the earlier layout stopped
    this)."""
    store.apply_schema(fresh_pool, step)
    with store.connection(fresh_pool) as conn:
        conn.execute(
            "SELECT dataproc_ensure_partition('data_points', %s, now() - n * interval '1 day')"
            " FROM generate_series(0, 40) n",
            (step,),
        )
        conn.execute(
            "INSERT INTO data_points (time, value, valid, tags) "
            "SELECT now() - i * interval '1 hour', i, i % 3 > 0, '{}' FROM generate_series(0, 999) i"
        )
        conn.execute("ANALYZE data_points")
        plan = "\n".join(
            line
            for (line,) in conn.execute(
                "EXPLAIN SELECT id FROM data_points ORDER BY time DESC, id DESC LIMIT 100"
            )
        )
    assert "Merge Append" not in plan and "Append" in plan, plan


def test_partition_bounds_are_utc_days_whatever_the_session_time_zone(fresh_pool):
    store.apply_schema(fresh_pool, "day")
    with store.connection(fresh_pool) as conn, conn.transaction():
        conn.execute("SET LOCAL TimeZone = 'Europe/Berlin'")
        conn.execute(  # the day of the spring DST change in Berlin
            "SELECT dataproc_ensure_partition('data_points', 'day', '2026-03-29 12:00Z')"
        )
    bounds = {
        name: (lower, upper) for name, lower, upper in rows(fresh_pool, partitions.LIST_PARTITIONS)
    }
    lower, upper = bounds["data_points_d20260329"]
    assert lower == datetime(2026, 3, 29, tzinfo=UTC) and upper - lower == timedelta(days=1)


def test_upkeep_makes_partitions_ahead_one_replica_at_a_time(fresh_pool, fresh_database):
    store.apply_schema(fresh_pool, "day")
    with store.connection(fresh_pool) as conn:
        conn.execute(DROP_LAST_AHEAD)
    before = len(rows(fresh_pool, partitions.LIST_PARTITIONS))
    upkeep = Upkeep(fresh_database, partition="day", retention_s=None)
    with psycopg.connect(fresh_database, autocommit=True) as other:
        other.execute(partitions.TRY_UPKEEP_LOCK, (partitions.UPKEEP_LOCK_KEY,))
        assert upkeep.run_once() is False  # another replica holds the lock
        assert len(rows(fresh_pool, partitions.LIST_PARTITIONS)) == before
    assert upkeep.run_once() is True
    assert len(rows(fresh_pool, partitions.LIST_PARTITIONS)) == before + 1


@pytest.mark.parametrize("step", ["none", "day"])
def test_pages_and_the_keyset_cursor_read_the_same_on_either_layout(fresh_pool, step):
    store.apply_schema(fresh_pool, step)
    with store.connection(fresh_pool) as conn:
        # 3 days of points, with equal times across partitions' edges; some in a rest partition.
        conn.execute(
            "INSERT INTO data_points (time, value, valid, tags) "
            "SELECT date_trunc('day', now()) - interval '1 day' + (i / 2) * interval '10 minutes', "
            "i, i % 3 > 0, '{}' FROM generate_series(0, 863) i"
        )
    seen, after = [], None
    while True:
        page = store.list_points(fresh_pool, viewer="admin", after=after, limit=100)
        seen += json.loads(page.json)
        if page.count < 100:
            break
        after = page.last
    expected = rows(fresh_pool, "SELECT id FROM data_points ORDER BY time, id")
    assert [p["id"] for p in seen] == [i for (i,) in expected]


def test_pages_run_on_generic_plans_that_are_not_planned_again(fresh_pool):
    """Planning a page over ~100 partitions costs more than reading it: the pool's connections
    force generic plans, so psycopg's prepared page statement is planned once per connection."""
    store.apply_schema(fresh_pool, "day")
    with store.connection(fresh_pool) as conn:
        conn.execute(
            "SELECT dataproc_ensure_partition('data_points', 'day', now() - n * interval '1 day')"
            " FROM generate_series(0, 40) n"
        )
        assert conn.execute("SHOW plan_cache_mode").fetchone() == ("force_generic_plan",)
    for _ in range(12):
        store.list_points(fresh_pool, viewer="admin", limit=100)
    with store.connection(fresh_pool) as conn:
        plans = conn.execute(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE statement LIKE '%%FROM data_points%%'"
        ).fetchall()
    assert plans and all(custom == 0 for _, custom in plans), plans
    assert sum(generic for generic, _ in plans) >= 1, plans


def test_making_a_partition_behind_a_long_reader_gives_up_at_once(fresh_pool, fresh_database):
    """Carving a period out of a rest partition locks data_points: behind an open reader (an
    export) it waits 250 ms, not minutes with every new reader queued behind it."""
    import time

    store.apply_schema(fresh_pool, "day")
    with store.connection(fresh_pool) as conn:
        conn.execute(DROP_LAST_AHEAD)
        conn.execute("SELECT dataproc_cover_gaps('data_points')")
    before = covering(fresh_pool)
    with psycopg.connect(fresh_database) as reader:
        reader.execute("SELECT count(*) FROM data_points").fetchone()  # its transaction stays open
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            started = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                partitions.make_ahead(conn, "day")
            assert time.monotonic() - started < 2
        assert covering(fresh_pool) == before
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        assert len(partitions.make_ahead(conn, "day")) == 1
    assert len(periods(covering(fresh_pool))) == len(periods(before)) + 1
