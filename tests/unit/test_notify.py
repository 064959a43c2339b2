"""notify.Listener on a real PostgreSQL: notifications from plain SQL in another connection
arrive, the schema's triggers send them, a killed listening backend makes the listener unhealthy
until it has reconnected and run its resets, and stop() is prompt."""

from __future__ import annotations

import queue
import threading
import time

import psycopg
import pytest

from dataproc import notify, store

CHANNELS = (notify.POINTS, notify.USERS, "dataproc_test_channel")


@pytest.fixture
def listener(database_url, pool):
    """A started Listener on the test database (the schema applied), stopped afterwards."""
    listener = notify.Listener(database_url, CHANNELS, retry_s=0.05)
    heard: queue.Queue = queue.Queue()
    resets: list[float] = []
    for channel in CHANNELS:
        listener.subscribe(channel, lambda payload, channel=channel: heard.put((channel, payload)))
    listener.on_reset(lambda: resets.append(time.monotonic()))
    listener.start()
    assert listener.wait_healthy(10)
    yield listener, heard, resets
    listener.stop()


def sql(database_url: str, *statements: str, params=()) -> None:
    """Statements in one transaction of a connection of their own (plain SQL, another writer)."""
    with psycopg.connect(database_url) as conn:
        for statement in statements:
            conn.execute(statement, params)


def next_note(heard: queue.Queue, channel: str, timeout_s: float = 5.0) -> str:
    """The payload of the next notification on `channel` (others are skipped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got_channel, payload = heard.get(timeout=max(0.01, deadline - time.monotonic()))
        if got_channel == channel:
            return payload


def drain(heard: queue.Queue) -> None:
    time.sleep(0.2)
    while not heard.empty():
        heard.get_nowait()


def test_a_notify_from_another_connection_arrives(listener, database_url):
    _, heard, _ = listener
    sql(database_url, "SELECT pg_notify('dataproc_test_channel', 'hello')")
    assert next_note(heard, "dataproc_test_channel") == "hello"


def test_a_notify_arrives_only_at_commit(listener, database_url):
    _, heard, _ = listener
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT pg_notify('dataproc_test_channel', 'later')")
        time.sleep(0.3)
        assert heard.empty()
    assert next_note(heard, "dataproc_test_channel") == "later"


def test_inserting_points_bumps_the_version_and_notifies_it(listener, database_url, clean_db):
    _, heard, _ = listener
    drain(heard)
    before = store.read_one(clean_db, store.freshness.SELECT_DATA_VERSION)[0]
    sql(database_url, "INSERT INTO data_points (time, value, valid) VALUES (now(), 1, true)")
    payload = next_note(heard, notify.POINTS)
    after = store.read_one(clean_db, store.freshness.SELECT_DATA_VERSION)[0]
    assert int(payload) == after > before


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE data_points SET valid = NOT valid",
        "DELETE FROM data_points",
        "TRUNCATE data_points",
        "INSERT INTO data_points (time, value, valid) SELECT now(), g, true FROM generate_series(1, 3) g",
    ],
)
def test_every_kind_of_change_notifies_once(listener, database_url, clean_db, statement):
    _, heard, _ = listener
    sql(database_url, "INSERT INTO data_points (time, value, valid) VALUES (now(), 1, true)")
    drain(heard)
    sql(database_url, statement)
    first = int(next_note(heard, notify.POINTS))
    assert first == store.read_one(clean_db, store.freshness.SELECT_DATA_VERSION)[0]
    time.sleep(0.2)
    assert heard.empty(), "one statement, one notification"


def test_a_statement_that_changes_nothing_does_not_notify(listener, database_url, clean_db):
    _, heard, _ = listener
    drain(heard)
    sql(
        database_url,
        "DELETE FROM data_points WHERE id < 0",
        "UPDATE data_points SET value = 1 WHERE false",
    )
    time.sleep(0.3)
    assert heard.empty()


def test_a_rolled_back_insert_does_not_notify(listener, database_url, clean_db):
    _, heard, _ = listener
    drain(heard)
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO data_points (time, value, valid) VALUES (now(), 1, true)")
        conn.rollback()
    time.sleep(0.3)
    assert heard.empty()


def test_user_changes_notify_the_username(listener, database_url, clean_db):
    _, heard, _ = listener
    sql(
        database_url,
        "INSERT INTO users (username, hashed_password, role) VALUES ('carol', 'x', 'admin')",
    )
    drain(heard)  # an insert is no change to anything cached: nothing is sent for it
    sql(database_url, "UPDATE users SET role = 'user' WHERE username = 'carol'")
    assert next_note(heard, notify.USERS) == "carol"
    sql(database_url, "UPDATE users SET username = 'dave' WHERE username = 'carol'")
    assert {next_note(heard, notify.USERS), next_note(heard, notify.USERS)} == {"carol", "dave"}
    sql(database_url, "DELETE FROM users WHERE username = 'dave'")
    assert next_note(heard, notify.USERS) == "dave"
    sql(database_url, "TRUNCATE users CASCADE")
    assert next_note(heard, notify.USERS) == ""


def test_killing_the_backend_makes_it_unhealthy_then_it_reconnects_and_resets(
    listener, database_url
):
    listener, heard, resets = listener
    old_pid, resets_before = listener.backend_pid, len(resets)
    seen_unhealthy = threading.Event()

    def watch() -> None:
        while not seen_unhealthy.is_set():
            if not listener.healthy:
                seen_unhealthy.set()
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sql(database_url, "SELECT pg_terminate_backend(%s)", params=(old_pid,))
    assert seen_unhealthy.wait(5), "the loss was never seen"
    assert listener.wait_healthy(5)
    assert listener.backend_pid not in (None, old_pid)
    assert len(resets) == resets_before + 1
    sql(database_url, "SELECT pg_notify('dataproc_test_channel', 'after')")
    assert next_note(heard, "dataproc_test_channel") == "after"


def test_a_failing_callback_makes_it_reconnect_and_reset(database_url, pool):
    listener = notify.Listener(database_url, ["dataproc_test_channel"], retry_s=0.05)
    resets = []
    listener.on_reset(lambda: resets.append(1))
    listener.subscribe("dataproc_test_channel", lambda payload: 1 / int(payload))
    listener.start()
    try:
        assert listener.wait_healthy(10)
        sql(database_url, "SELECT pg_notify('dataproc_test_channel', '0')")
        deadline = time.monotonic() + 5
        while len(resets) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(resets) == 2
        assert listener.wait_healthy(5)
    finally:
        listener.stop()


def test_unhealthy_before_start_and_after_stop_and_stop_is_prompt(database_url):
    listener = notify.Listener(database_url, [notify.POINTS])
    assert not listener.healthy
    listener.start()
    assert listener.wait_healthy(10)
    started = time.monotonic()
    listener.stop()
    assert time.monotonic() - started < 1.0
    assert not listener.healthy
    with psycopg.connect(database_url, autocommit=True) as conn:
        count = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dataproc-listener'"
            " AND pid = %s",
            (listener.backend_pid or 0,),
        ).fetchone()[0]
    assert count == 0


def test_an_unreachable_database_is_unhealthy_and_stop_is_still_prompt():
    listener = notify.Listener(
        "postgresql://nobody@127.0.0.1:1/none", [notify.POINTS], retry_s=0.05
    )
    listener.start()
    try:
        assert not listener.wait_healthy(0.5)
    finally:
        started = time.monotonic()
        listener.stop()
        assert time.monotonic() - started < 1.0


def test_subscribing_to_a_channel_it_does_not_listen_on_is_refused(database_url):
    listener = notify.Listener(database_url, [notify.POINTS])
    with pytest.raises(ValueError):
        listener.subscribe(notify.USERS, print)
