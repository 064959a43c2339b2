"""schema.sql and store.py against real PostgreSQL: fresh, re-applied, and over the original's init.sql.

Each schema test makes its own database on the test server (the admin connection comes from
`database_url` with the database name switched), so it starts from exactly the state it names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from dataproc import store

T0 = datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)
DEFAULT_ADMIN_HASH = "$2b$12$a/pMatsPyWuHa5KdqatsFOLZgPYjPZU4If4//jeretXqZ.ujoYFJG"

# The original service's init.sql (from ORIGINAL.md), for one database, verbatim.
ORIGINAL_INIT_SQL = """
CREATE TABLE "users" (
  "id" serial PRIMARY KEY,
  "username" varchar NOT NULL UNIQUE,
  "hashed_password" varchar NOT NULL,
  "role" varchar NOT NULL DEFAULT 'user'
);

CREATE TABLE "data_points" (
  "id" serial PRIMARY KEY,
  "time" timestamptz NOT NULL,
  "value" DOUBLE PRECISION NOT NULL,
  "valid" boolean NOT NULL,
  "tags" varchar[]
);

INSERT INTO USERS(id, username, hashed_password, role) VALUES(0, 'admin', '$2b$12$a/pMatsPyWuHa5KdqatsFOLZgPYjPZU4If4//jeretXqZ.ujoYFJG','admin');
"""

# What the original service (SQLAlchemy) sends to store a point: only the original columns.
ORIGINAL_INSERT_POINT = (
    "INSERT INTO data_points (time, value, valid, tags) "
    "VALUES (%s, %s, %s, %s) RETURNING data_points.id"
)


@pytest.fixture
def fresh_pool(fresh_database) -> Iterator[store.ConnectionPool]:
    """An open pool on the fresh database (no schema yet)."""
    pool = store.make_pool(fresh_database, max_size=2, wait_s=5)
    store.open_pool(pool, 10)
    yield pool
    pool.close()


def scalar(pool, sql: str, params=()):
    with store.connection(pool) as conn:
        return conn.execute(sql, params).fetchone()[0]


def page(pool, viewer: str = "admin", **overrides) -> list[dict]:
    """The points `viewer` may see (the schema's default admin sees every point)."""
    return json.loads(store.list_points(pool, viewer=viewer, **overrides).json)


def reader(pool) -> str:
    """An ordinary user, who sees valid points only."""
    store.upsert_user(pool, "reader", "not-a-hash", "user")
    return "reader"


def new_point(when: datetime, *, value: float = 1.5, valid: bool = True, tags=()) -> store.NewPoint:
    return store.NewPoint(when, value, valid, list(tags), "{}", os.urandom(32))


# --- schema.sql -----------------------------------------------------------------------------


def test_schema_applies_to_an_empty_database(fresh_pool):
    store.apply_schema(fresh_pool)
    tables = {
        row
        for row in scalar(
            fresh_pool,
            "SELECT array_agg(tablename::text) FROM pg_tables WHERE schemaname = 'public'",
        )
    }
    assert {"users", "data_points", "rejects"} <= tables
    assert store.get_user(fresh_pool, "admin").role == "admin"


def test_schema_applies_twice_without_change(fresh_pool):
    store.apply_schema(fresh_pool)
    store.insert_point(fresh_pool, new_point(T0))
    store.apply_schema(fresh_pool)
    assert scalar(fresh_pool, "SELECT count(*) FROM users") == 1
    assert scalar(fresh_pool, "SELECT count(*) FROM data_points") == 1


def test_schema_applies_over_the_original_init_sql_and_keeps_its_rows_readable(fresh_database):
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(ORIGINAL_INIT_SQL)
        old_id = conn.execute(
            ORIGINAL_INSERT_POINT, (T0, -0.19938130676746368, True, None)
        ).fetchone()[0]
    pool = store.make_pool(fresh_database, max_size=2, wait_s=5)
    store.open_pool(pool, 10)
    try:
        store.apply_schema(pool)
        store.apply_schema(pool)
        assert page(pool) == [
            {
                "id": old_id,
                "time": "2024-04-22T15:07:57Z",
                "value": -0.19938130676746368,
                "valid": True,
                "tags": [],
            }
        ]
        admin = store.get_user(pool, "admin")
        assert (admin.id, admin.role, admin.hashed_password) == (0, "admin", DEFAULT_ADMIN_HASH)
        assert scalar(pool, "SELECT count(*) FROM users") == 1
    finally:
        pool.close()


def test_sessions_work_over_the_original_init_sql_and_its_users_get_a_created_at(fresh_database):
    from datetime import UTC, datetime, timedelta

    from dataproc.store import sessions as session_store

    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(ORIGINAL_INIT_SQL)
    pool = store.make_pool(fresh_database, max_size=2, wait_s=5)
    store.open_pool(pool, 10)
    try:
        store.apply_schema(pool)
        store.apply_schema(pool)
        accounts = session_store.list_users(pool, 0, 10)
        assert [(a.username, a.role) for a in accounts] == [("admin", "admin")]
        assert accounts[0].created_at is not None  # backfilled when the column was added
        expires = datetime.now(UTC) + timedelta(days=1)
        session_store.start_session(pool, 0, "sid-of-admin", "jti", expires)  # the original's id 0
        assert session_store.live_session_expiry(pool, "sid-of-admin") is not None
        with pytest.raises(session_store.LastAdmin):
            session_store.delete_user(pool, "admin")
    finally:
        pool.close()


def test_the_original_service_can_still_write_to_a_migrated_database(fresh_database):
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(ORIGINAL_INIT_SQL)
    pool = store.make_pool(fresh_database, max_size=2, wait_s=5)
    store.open_pool(pool, 10)
    try:
        store.apply_schema(pool)
    finally:
        pool.close()
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        point_id = conn.execute(ORIGINAL_INSERT_POINT, (T0, 2.5, False, ["system"])).fetchone()[0]
        second = conn.execute(ORIGINAL_INSERT_POINT, (T0, 2.5, False, ["system"])).fetchone()[0]
        conn.execute("INSERT INTO users (username, hashed_password) VALUES ('old-style', 'x')")
        assert (
            conn.execute("SELECT role FROM users WHERE username = 'old-style'").fetchone()[0]
            == "user"
        )
    assert second != point_id  # rows without a document never collide as duplicates


def test_a_deleted_default_admin_does_not_come_back_on_reapply(fresh_pool):
    store.apply_schema(fresh_pool)
    with store.connection(fresh_pool) as conn:
        conn.execute("DELETE FROM users WHERE username = 'admin'")
    store.apply_schema(fresh_pool)
    assert store.get_user(fresh_pool, "admin") is None


def test_a_deleted_original_admin_does_not_come_back_on_reapply(fresh_database):
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute(ORIGINAL_INIT_SQL)
    pool = store.make_pool(fresh_database, max_size=2, wait_s=5)
    store.open_pool(pool, 10)
    try:
        store.apply_schema(pool)
        with store.connection(pool) as conn:
            conn.execute("DELETE FROM users WHERE username = 'admin'")
        store.apply_schema(pool)
        assert store.get_user(pool, "admin") is None
    finally:
        pool.close()


def test_roles_other_than_user_and_admin_are_refused(fresh_pool):
    store.apply_schema(fresh_pool)
    with pytest.raises(psycopg.errors.CheckViolation), store.connection(fresh_pool) as conn:
        conn.execute(
            "INSERT INTO users (username, hashed_password, role) VALUES ('x', 'y', 'root')"
        )


# --- users ----------------------------------------------------------------------------------


def test_create_user_refuses_a_taken_name(clean_db):
    assert store.create_user(clean_db, "alice", "hash-1") is True
    assert store.create_user(clean_db, "alice", "hash-2") is False
    assert store.get_user(clean_db, "alice").hashed_password == "hash-1"


def test_upsert_user_creates_then_resets_password_and_role(clean_db):
    assert store.upsert_user(clean_db, "alice", "hash-1", "user") is True
    assert store.upsert_user(clean_db, "alice", "hash-2", "admin") is False
    user = store.get_user(clean_db, "alice")
    assert (user.hashed_password, user.role) == ("hash-2", "admin")


def test_user_role_is_none_for_an_unknown_user(clean_db):
    assert store.user_role(clean_db, "nobody") is None


# --- points ---------------------------------------------------------------------------------


def test_list_points_matches_the_contracts_example(clean_db):
    with store.connection(clean_db) as conn:
        conn.execute(
            "INSERT INTO data_points (id, time, value, valid, tags) VALUES (17, %s, %s, true, '{}')",
            (T0, -0.19938130676746368),
        )
    body = store.list_points(clean_db, viewer=reader(clean_db)).json
    assert json.loads(body) == [
        {
            "id": 17,
            "time": "2024-04-22T15:07:57Z",
            "value": -0.19938130676746368,
            "valid": True,
            "tags": [],
        }
    ]


def test_list_points_shows_fractions_only_when_not_zero(clean_db):
    store.insert_point(clean_db, new_point(T0 + timedelta(microseconds=500000)))
    store.insert_point(clean_db, new_point(T0 + timedelta(seconds=1, microseconds=120)))
    assert [row["time"] for row in page(clean_db)] == [
        "2024-04-22T15:07:57.5Z",
        "2024-04-22T15:07:58.00012Z",
    ]


def test_a_non_finite_value_is_null_in_json_and_nan_in_the_table(clean_db):
    body, new = store.insert_point(
        clean_db, new_point(T0, value=math.nan, valid=False, tags=["non-finite"])
    )
    point = json.loads(body)
    assert new and point["value"] is None
    assert math.isnan(
        scalar(clean_db, "SELECT value FROM data_points WHERE id = %s", (point["id"],))
    )


def test_insert_point_stores_a_document_once(clean_db):
    point = new_point(T0)
    first, new_first = store.insert_point(clean_db, point)
    second, new_second = store.insert_point(clean_db, point)
    assert (new_first, new_second) == (True, False) and first == second
    assert scalar(clean_db, "SELECT count(*) FROM data_points") == 1


def test_insert_reject_keeps_the_bytes_verbatim(clean_db):
    store.insert_reject(clean_db, "not JSON", b"\x00\xffnot json{")
    assert bytes(scalar(clean_db, "SELECT body FROM rejects")) == b"\x00\xffnot json{"


def test_list_points_pages_by_time_then_id_after_a_cursor(clean_db):
    ids = [json.loads(store.insert_point(clean_db, new_point(T0))[0])["id"] for _ in range(4)]
    first = store.list_points(clean_db, viewer="admin", limit=2)
    assert first.count == 2 and first.last == (T0, ids[1])
    rest = page(clean_db, after=first.last)
    assert [row["id"] for row in rest] == ids[2:]


def test_list_points_hides_invalid_points_from_users_not_admins(clean_db):
    store.insert_point(clean_db, new_point(T0, valid=False))
    assert page(clean_db, reader(clean_db)) == [] and len(page(clean_db, "admin")) == 1


def test_list_points_for_a_viewer_who_does_not_exist_is_none(clean_db):
    store.insert_point(clean_db, new_point(T0))
    assert store.list_points(clean_db, viewer="ghost") is None


def test_ping_is_true_with_the_database_up(clean_db):
    assert store.ping(clean_db) is True


def test_opening_a_pool_on_a_closed_port_is_database_unavailable():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        pool = store.make_pool(
            f"host=127.0.0.1 port={port} dbname=x user=x", max_size=1, wait_s=0.5
        )
        with pytest.raises(store.DatabaseUnavailable):
            store.open_pool(pool, 0.5)


# --- the page queries use the indexes -------------------------------------------------------


@pytest.fixture
def many_points(clean_db):
    """5000 points over a day, every other one valid, analysed."""
    with store.connection(clean_db) as conn:
        conn.execute(
            "INSERT INTO data_points (time, value, valid, tags) "
            "SELECT %s + i * interval '17 seconds', i, i %% 2 = 0, '{}' "
            "FROM generate_series(1, 5000) AS i",
            (T0,),
        )
        conn.execute("ANALYZE data_points")
    return clean_db


def executed_scans(pool, viewer: str, **overrides) -> list[str]:
    """The scan lines of the page query's plan that actually ran (EXPLAIN ANALYZE)."""
    query = {"viewer": viewer, "start": T0 + timedelta(hours=1), "end": T0 + timedelta(hours=2)}
    params = store.page_params(**{**query, **overrides})
    with store.connection(pool) as conn:
        plan = [
            row[0]
            for row in conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + store.SELECT_PAGE, params
            )
        ]
    return [line for line in plan if " on data_points" in line and "never executed" not in line]


def index_kind(pool, scan: str) -> str:
    """'time_id', 'valid_time_id' or 'other': the index a plan line scans, by its definition
    (on the partitioned layout each partition's indexes have names of their own)."""
    if " using " not in scan:
        return "other"
    name = scan.split(" using ", 1)[1].split()[0]
    with store.connection(pool) as conn:
        (definition,) = conn.execute("SELECT pg_get_indexdef(to_regclass(%s))", (name,)).fetchone()
    columns = definition.split(" USING btree ", 1)[1]
    if columns == '("time", id) WHERE valid':
        return "valid_time_id"
    return "time_id" if columns == '("time", id)' else "other"


def test_the_admin_page_query_uses_the_time_id_index(many_points):
    scans = executed_scans(many_points, "admin")
    assert len(scans) == 1 and index_kind(many_points, scans[0]) == "time_id", scans


def test_the_user_page_query_uses_the_partial_index_of_valid_rows(many_points):
    scans = executed_scans(many_points, reader(many_points))
    assert scans and all("Index" in line or "Bitmap Heap" in line for line in scans), scans
    assert any(index_kind(many_points, line) == "valid_time_id" for line in scans), scans


def test_a_deep_keyset_page_uses_an_index(many_points):
    scans = executed_scans(
        many_points, "admin", start=None, end=None, after=(T0 + timedelta(hours=20), 4000)
    )
    assert len(scans) == 1 and "Index Scan" in scans[0], scans


def test_a_time_window_starts_its_index_scan_at_the_window(many_points):
    """One lower bound on (time, id): the scan reads the page's rows, not every earlier row."""
    with store.connection(many_points) as conn:
        plan = [
            row[0]
            for row in conn.execute(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF, BUFFERS ON) "
                + store.SELECT_PAGE,
                store.page_params(viewer="admin", start=T0 + timedelta(hours=20), limit=10),
            )
        ]
    scan = next(
        i
        for i, line in enumerate(plan)
        if "Index Scan using" in line and index_kind(many_points, line) == "time_id"
    )
    buffers = next(line for line in plan[scan:] if "Buffers:" in line)
    assert int(buffers.split("hit=")[1].split()[0]) < 10, plan
