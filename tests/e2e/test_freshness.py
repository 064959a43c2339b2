"""Freshness across replicas (API.md, `GET /api/data`): with the read cache on, a point stored
by plain SQL or through another replica is in the next read on every replica within 100 ms
of its commit, and at once on the replica that stored it; a deleted user's or demoted admin's
tokens lose their access within the same 100 ms; killing the listening connections leaves
every read correct.

Two `dataproc serve` processes on the test database, each warmed first so that its answers
(and its callers' roles) are cached when the change lands.
"""

from __future__ import annotations

import json
import os
import time

import psycopg
import pytest

from support import FRESHNESS_S, Client, create_user, login, within_freshness
from support.replicas import Replica, replica_env

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX processes")


@pytest.fixture
def replicas(tmp_path, database_url, clean_db, upstream):
    """Two replicas reading distinct documents from the simulated upstream: their clients."""
    url = f"{upstream[1]}sequence?start={int(time.time()) - 30}"
    processes = [Replica([], replica_env(database_url, url), tmp_path) for _ in range(2)]
    clients = [Client(process.url()) for process in processes]
    try:
        yield clients
    finally:
        for client in clients:
            client.close()
        codes = [process.stop() for process in processes]
        assert codes == [0, 0], "\n".join(process.log() for process in processes)


def sql(database_url: str, statement: str, params=()) -> None:
    """One statement in its own transaction on its own connection (plain SQL, another writer);
    returns once it has committed."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(statement, params)


INSERT_POINT = "INSERT INTO data_points (time, value, valid) VALUES (now(), %s, %s)"
KILL_LISTENERS = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
    " WHERE application_name = 'dataproc-listener' AND datname = current_database()"
)


def insert_point(database_url: str, value: float, valid: bool = True) -> None:
    sql(database_url, INSERT_POINT, (value, valid))


def read(client: Client, token: str):
    return client.get("/api/data?limit=1000", token=token)


def values(reply) -> list[float]:
    assert reply.status == 200, (reply.status, reply.body)
    return [point["value"] for point in json.loads(reply.body)]


def warm(clients, token: str) -> None:
    """Each replica answers twice: the answer and the caller's role are in its cache."""
    for client in clients:
        first, second = read(client, token), read(client, token)
        assert first.status == second.status == 200
        assert first.headers["ETag"] == second.headers["ETag"]


def test_same_state_same_etag_on_every_replica(replicas, clean_db, database_url):
    create_user(clean_db, "root", "root-password", "admin")
    token = login(replicas[0], "root", "root-password")["access_token"]
    insert_point(database_url, 1.0)
    time.sleep(FRESHNESS_S)
    tags = {read(client, token).headers["ETag"] for client in replicas}
    assert len(tags) == 1


def test_a_point_stored_by_plain_sql_is_read_on_both_replicas_within_100_ms(
    replicas, clean_db, database_url
):
    create_user(clean_db, "root", "root-password", "admin")
    token = login(replicas[0], "root", "root-password")["access_token"]
    warm(replicas, token)
    insert_point(database_url, 42.5)  # returns once committed: the clock starts
    for client in replicas:
        reply = within_freshness(lambda c=client: read(c, token), lambda r: 42.5 in values(r))
        assert 42.5 in values(reply)


def test_a_point_stored_through_one_replica_is_read_there_at_once_and_on_the_other_soon(
    replicas, clean_db
):
    create_user(clean_db, "root", "root-password", "admin")
    token = login(replicas[0], "root", "root-password")["access_token"]
    warm(replicas, token)
    stored = replicas[0].get("/api/populate", token=token)
    assert stored.status == 200, stored.body
    point_id = stored.json()["id"]
    ids_now = [p["id"] for p in read(replicas[0], token).json()]
    assert point_id in ids_now, "not in the storing replica's very next read"
    reply = within_freshness(
        lambda: read(replicas[1], token), lambda r: point_id in [p["id"] for p in r.json()]
    )
    assert point_id in [p["id"] for p in reply.json()]


def test_a_deleted_users_token_is_refused_on_both_replicas_within_100_ms(
    replicas, clean_db, database_url
):
    create_user(clean_db, "carol", "carol-password")
    token = login(replicas[0], "carol", "carol-password")["access_token"]
    warm(replicas, token)
    sql(database_url, "DELETE FROM users WHERE username = 'carol'")
    for client in replicas:
        reply = within_freshness(lambda c=client: read(c, token), lambda r: r.status == 401)
        assert reply.status == 401


def test_a_demoted_admin_loses_invalid_points_on_both_replicas_within_100_ms(
    replicas, clean_db, database_url
):
    create_user(clean_db, "root", "root-password", "admin")
    create_user(clean_db, "boss", "boss-password", "admin")  # someone stays admin
    token = login(replicas[0], "root", "root-password")["access_token"]
    insert_point(database_url, 7.0, valid=False)
    time.sleep(FRESHNESS_S)
    warm(replicas, token)
    assert all(7.0 in values(read(client, token)) for client in replicas)
    sql(database_url, "UPDATE users SET role = 'user' WHERE username = 'root'")
    for client in replicas:
        reply = within_freshness(lambda c=client: read(c, token), lambda r: 7.0 not in values(r))
        assert 7.0 not in values(reply)


def test_killing_the_listening_connections_leaves_every_read_correct(
    replicas, clean_db, database_url
):
    create_user(clean_db, "root", "root-password", "admin")
    token = login(replicas[0], "root", "root-password")["access_token"]
    warm(replicas, token)
    expected: list[float] = []
    for round_ in range(10):
        # Kill both replicas' listeners and write at once, on one connection: the write
        # commits before they can be listening again (they are deaf to it).
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(KILL_LISTENERS)
            conn.execute(INSERT_POINT, (100.0 + round_, True))
        expected.append(100.0 + round_)
        committed = time.monotonic()
        deadline = committed + 0.5
        while time.monotonic() < deadline:
            for client in replicas:
                got = values(read(client, token))
                if time.monotonic() > committed + FRESHNESS_S:
                    assert set(expected) <= set(got), f"stale in round {round_}"
        time.sleep(0.05)
