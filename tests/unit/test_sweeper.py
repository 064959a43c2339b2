"""The session sweep against real PostgreSQL: what it removes, what it keeps, one replica at a
time, and the NOTIFYs of the sessions table (an end is announced; a sweep is silent)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from dataproc import store
from dataproc.store import sessions as session_store
from dataproc.sweeper import SessionSweeper
from support import create_user

NOW = datetime.now(UTC)


@pytest.fixture
def user_id(clean_db) -> int:
    create_user(clean_db, "sweepy", "password-1")
    return store.get_user(clean_db, "sweepy").id


def add(pool, user_id: int, sid: str, expires: datetime, ended: datetime | None = None) -> None:
    session_store.start_session(pool, user_id, sid, "jti-" + sid, expires)
    if ended is not None:
        with store.connection(pool) as conn:
            conn.execute("UPDATE sessions SET ended_at = %s WHERE id = %s", (ended, sid))


def sids(pool) -> set[str]:
    with store.connection(pool) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM sessions")}


def test_a_sweep_removes_expired_and_day_old_ended_sessions_only(clean_db, user_id):
    add(clean_db, user_id, "live", NOW + timedelta(days=7))
    add(clean_db, user_id, "expired", NOW - timedelta(seconds=1))
    add(clean_db, user_id, "ended-now", NOW + timedelta(days=7), NOW)
    add(clean_db, user_id, "ended-long-ago", NOW + timedelta(days=7), NOW - timedelta(days=2))
    assert SessionSweeper(clean_db).sweep() == 2
    assert sids(clean_db) == {"live", "ended-now"}
    assert SessionSweeper(clean_db).sweep() == 0


def test_expiry_is_decided_on_the_sweepers_clock(clean_db, user_id):
    # Expired by the real clock, not yet by one a day behind it (a test's Context clock).
    add(clean_db, user_id, "expired-today", NOW - timedelta(hours=1))
    day_ago = (NOW - timedelta(days=1)).timestamp()
    assert SessionSweeper(clean_db, clock=lambda: day_ago).sweep() == 0
    assert sids(clean_db) == {"expired-today"}
    assert SessionSweeper(clean_db).sweep() == 1


def test_sweeps_run_in_batches(clean_db, user_id):
    for i in range(25):
        add(clean_db, user_id, f"old-{i}", NOW - timedelta(minutes=1))
    assert session_store.sweep_sessions(clean_db, 86_400, datetime.now(UTC), batch=10) == 25
    assert sids(clean_db) == set()


def test_one_replica_at_a_time_sweeps(clean_db, user_id, database_url):
    add(clean_db, user_id, "expired", NOW - timedelta(seconds=1))
    with psycopg.connect(database_url) as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(%s)", (session_store.SWEEP_LOCK_KEY,))
        assert SessionSweeper(clean_db).sweep() is None  # another replica is sweeping
    assert SessionSweeper(clean_db).sweep() == 1


def notifications(database_url, action) -> list[str]:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN dataproc_sessions")
        action()
        return [n.payload for n in listener.notifies(timeout=0.5, stop_after=10)]


def test_an_end_is_announced_and_a_sweep_is_silent(clean_db, user_id, database_url):
    add(clean_db, user_id, "a", NOW + timedelta(days=1))
    add(clean_db, user_id, "b", NOW - timedelta(seconds=1))
    assert notifications(database_url, lambda: session_store.end_session(clean_db, "a", "x")) == [
        "a"
    ]
    heard = notifications(database_url, lambda: SessionSweeper(clean_db, keep_ended_s=0).sweep())
    assert heard == []


def test_deleting_a_user_announces_its_live_sessions(clean_db, user_id, database_url):
    add(clean_db, user_id, "live", NOW + timedelta(days=1))
    add(clean_db, user_id, "gone", NOW + timedelta(days=1), NOW)

    def delete() -> None:
        with store.connection(clean_db) as conn:
            conn.execute("DELETE FROM users WHERE id = %s", (user_id,))

    assert notifications(database_url, delete) == ["live"]


def test_a_sweep_removes_abandoned_signup_claims_only(clean_db):
    fresh = session_store.claim_username(clean_db, "claimed-now", 600)
    old = session_store.claim_username(clean_db, "claimed-long-ago", 600)
    with store.connection(clean_db) as conn:
        conn.execute(
            "UPDATE users SET created_at = now() - interval '1 hour' WHERE id = %s", (old,)
        )
    create_user(clean_db, "real-user", "password-1")
    SessionSweeper(clean_db, stale_claim_s=600).sweep()
    assert store.get_user(clean_db, "claimed-long-ago") is None
    assert store.get_user(clean_db, "claimed-now").id == fresh
    assert store.get_user(clean_db, "real-user") is not None
