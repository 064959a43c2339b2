"""cache.ReadCache: the LRU bound, the race rule, failing closed, the roles, the ETag and the
If-None-Match rules.

Most tests drive the bookkeeping through `Switchboard`, which calls the cache's callbacks the
way `notify.Listener` does, so that a notification can land exactly between a read's start
and its store; the last ones use a real Listener on the real database.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from dataproc import notify
from dataproc.cache import Answer, ReadCache, if_none_match_matches, make_etag


class Switchboard:
    """The listener's side of the interface, driven by the test."""

    def __init__(self, healthy: bool = True):
        self.healthy = healthy
        self.subscribers: dict[str, list] = {}
        self.resets: list = []

    def subscribe(self, channel, callback) -> None:
        self.subscribers.setdefault(channel, []).append(callback)

    def on_reset(self, callback) -> None:
        self.resets.append(callback)

    def notify(self, channel: str, payload: str) -> None:
        for callback in self.subscribers.get(channel, ()):
            callback(payload)

    def reconnect(self) -> None:
        for callback in self.resets:
            callback()
        self.healthy = True


KEY = ("/api/data", None, None, None, 0, 100)


def answer(version: int, body: bytes = b"[]", role: str = "user") -> Answer:
    return Answer(role, version, body, {"Link": "<x>"})


def fill(cache: ReadCache, key=KEY, version: int = 5, body: bytes = b"[]", role="user") -> bool:
    ticket = cache.begin()
    got = answer(version, body, role)
    return cache.store(ticket, (key, role), got, make_etag(version, role, key))


@pytest.fixture
def board() -> Switchboard:
    return Switchboard()


@pytest.fixture
def cache(board) -> ReadCache:
    return ReadCache(board, max_bytes=1 << 20)


def test_a_stored_answer_is_served_until_a_new_version_is_heard(cache, board):
    assert fill(cache)
    hit = cache.lookup((KEY, "user"))
    assert hit is not None and hit.body == b"[]" and hit.headers == {"Link": "<x>"}
    assert hit.etag == make_etag(5, "user", KEY)
    board.notify(notify.POINTS, "6")
    assert cache.lookup((KEY, "user")) is None
    assert fill(cache, version=6)
    assert cache.lookup((KEY, "user")).version == 6


def test_the_answer_of_one_role_is_never_served_to_the_other(cache):
    assert fill(cache, role="admin", body=b"[all]")
    assert cache.lookup((KEY, "user")) is None
    assert cache.lookup((KEY, "admin")).body == b"[all]"


def test_a_read_that_raced_a_write_is_not_stored(cache, board):
    fill(cache, version=5)
    ticket = cache.begin()
    board.notify(notify.POINTS, "6")  # committed while the read ran: its snapshot may be older
    assert not cache.store(ticket, (KEY, "user"), answer(5), make_etag(5, "user", KEY))
    assert not cache.store(ticket, (KEY, "user"), answer(6), make_etag(6, "user", KEY))
    assert cache.lookup((KEY, "user")) is None


def test_a_read_whose_snapshot_holds_a_write_not_yet_heard_is_not_stored(cache, board):
    fill(cache, version=5)
    ticket = cache.begin()
    # version 6 committed before the read's snapshot; its NOTIFY is still on its way
    assert not cache.store(ticket, (KEY, "user"), answer(6), make_etag(6, "user", KEY))
    assert cache.lookup((KEY, "user")).version == 5  # the old answer until the NOTIFY lands
    board.notify(notify.POINTS, "6")
    assert cache.lookup((KEY, "user")) is None


def test_the_version_is_learnt_from_a_read_nothing_overtook(cache):
    assert cache.current_etag(KEY, "user") is None  # unknown at first
    assert fill(cache, version=41)
    assert cache.current_etag(KEY, "user") == make_etag(41, "user", KEY)


def test_a_notification_of_the_version_we_hold_changes_nothing(cache, board):
    fill(cache, version=7)
    board.notify(notify.POINTS, "7")  # our own write, already read by a later snapshot
    assert cache.lookup((KEY, "user")) is not None


def test_a_write_through_this_process_clears_at_once_and_races_are_not_stored(cache):
    fill(cache, version=5)
    ticket = cache.begin()
    cache.wrote()
    assert cache.lookup((KEY, "user")) is None
    assert cache.current_etag(KEY, "user") is None  # the new version is not known yet
    assert not cache.store(ticket, (KEY, "user"), answer(5), make_etag(5, "user", KEY))
    assert fill(cache, version=6)


def test_nothing_is_served_or_stored_while_the_listener_is_down(cache, board):
    fill(cache)
    cache.remember_role(cache.begin(), "carol", "user")
    board.healthy = False
    assert cache.lookup((KEY, "user")) is None
    assert cache.role("carol") is None
    assert cache.current_etag(KEY, "user") is None
    assert not fill(cache, version=5)
    cache.remember_role(cache.begin(), "dave", "admin")
    board.healthy = True
    assert cache.role("dave") is None


def test_a_reset_drops_everything_and_a_read_begun_before_it_is_not_stored(cache, board):
    fill(cache)
    cache.remember_role(cache.begin(), "carol", "user")
    ticket = cache.begin()
    board.healthy = False
    board.reconnect()  # we were deaf: anything may have changed
    assert cache.lookup((KEY, "user")) is None
    assert cache.role("carol") is None
    assert cache.current_etag(KEY, "user") is None
    assert not cache.store(ticket, (KEY, "user"), answer(5), make_etag(5, "user", KEY))
    cache.remember_role(ticket, "carol", "user")
    assert cache.role("carol") is None


def test_the_lru_keeps_within_its_bytes_and_drops_the_least_recently_used(board):
    cache = ReadCache(board, max_bytes=12_000)  # five of these entries
    body = b"x" * 2_000
    for n in range(4):
        assert fill(cache, key=("k", n), body=body)
    cache.lookup((("k", 0), "user"))  # used: it stays
    for n in range(4, 8):
        fill(cache, key=("k", n), body=body)
    stats = cache.stats()
    assert stats["bytes"] <= 12_000 and stats["entries"] == 5
    assert cache.lookup((("k", 0), "user")) is not None
    assert cache.lookup((("k", 1), "user")) is None
    assert cache.lookup((("k", 7), "user")) is not None
    assert not fill(cache, key=("huge",), body=b"x" * 20_000)  # larger than the bound
    assert cache.stats()["bytes"] <= 12_000


def test_roles_are_forgotten_at_their_users_notification(cache, board):
    cache.remember_role(cache.begin(), "carol", "admin")
    cache.remember_role(cache.begin(), "dave", "user")
    assert cache.role("carol") == "admin"
    board.notify(notify.USERS, "carol")
    assert cache.role("carol") is None and cache.role("dave") == "user"
    board.notify(notify.USERS, "")  # the users table truncated
    assert cache.role("dave") is None


def test_a_role_read_that_raced_a_user_change_is_not_kept(cache, board):
    ticket = cache.begin()
    board.notify(notify.USERS, "carol")  # demoted while the read ran
    cache.remember_role(ticket, "carol", "admin")
    assert cache.role("carol") is None
    cache.remember_role(cache.begin(), "ghost", None)  # "no such user" is never kept
    assert cache.role("ghost") is None


def test_off_or_without_a_listener_it_never_serves(board):
    for cache in (ReadCache(board, max_bytes=1 << 20, enabled=False), ReadCache(None, max_bytes=1)):
        assert not fill(cache)
        assert cache.lookup((KEY, "user")) is None
        cache.remember_role(cache.begin(), "carol", "user")
        assert cache.role("carol") is None
    assert board.subscribers == {}  # a disabled cache subscribes to nothing


def test_the_etag_is_strong_stable_and_differs_by_version_role_and_query():
    tag = make_etag(5, "user", KEY)
    assert tag.startswith('"') and tag.endswith('"') and not tag.startswith("W/")
    assert tag == make_etag(5, "user", KEY)  # every replica makes the same one
    others = {make_etag(6, "user", KEY), make_etag(5, "admin", KEY), make_etag(5, "user", ("x",))}
    assert tag not in others and len(others) == 3


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ('"abc"', True),
        ('W/"abc"', True),
        ('"x", "abc"', True),
        ('"x",W/"abc" ', True),
        ("*", True),
        ('"abcd"', False),
        ('"x", "y"', False),
        ("", False),
        (None, False),
        ("abc", False),
    ],
)
def test_if_none_match(header, matches):
    assert if_none_match_matches(header, '"abc"') is matches


# --- with a real Listener on the real database ----------------------------------------------


def test_killing_the_listening_backend_fails_closed_until_it_is_back(database_url, pool):
    listener = notify.Listener(database_url, [notify.POINTS, notify.USERS], retry_s=0.05)
    cache = ReadCache(listener, max_bytes=1 << 20)
    listener.start()
    try:
        assert listener.wait_healthy(10)
        assert fill(cache, version=5)
        cache.remember_role(cache.begin(), "carol", "user")
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
        deadline = time.monotonic() + 5
        while listener.healthy and time.monotonic() < deadline:
            time.sleep(0.001)
        assert listener.wait_healthy(5)
        assert cache.lookup((KEY, "user")) is None, "kept across a deaf spell"
        assert cache.role("carol") is None
    finally:
        listener.stop()
    assert cache.lookup((KEY, "user")) is None


def test_a_real_notification_invalidates(database_url, pool, clean_db):
    listener = notify.Listener(database_url, [notify.POINTS, notify.USERS], retry_s=0.05)
    cache = ReadCache(listener, max_bytes=1 << 20)
    listener.start()
    try:
        assert listener.wait_healthy(10)
        assert fill(cache, version=5)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO data_points (time, value, valid) VALUES (now(), 1, true)")
        deadline = time.monotonic() + 5
        while cache.lookup((KEY, "user")) is not None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert cache.lookup((KEY, "user")) is None
    finally:
        listener.stop()
