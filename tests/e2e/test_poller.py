"""Scheduled ingestion (`DATAPROC_POLL_INTERVAL_S`): one poller across replicas, at the rate.

Two replicas poll `/sequence` of the simulated upstream, whose every answer is a new document,
so the number of rows over a window is the number of polls: one poller gives about
window / interval, two would give twice that. The lock itself, a failing upstream and
shutdown are checked on in-process services.
"""

from __future__ import annotations

import logging
import socket
import time

import psycopg
import pytest

from dataproc import ingest
from dataproc.poller import POLLER_LOCK_KEY, Poller
from dataproc.upstream import simulated
from support import make_config
from support.replicas import Replica, replica_env

INTERVAL_S = 0.2


def _count(pool) -> tuple[int, int]:
    with pool.connection() as conn:
        return conn.execute("SELECT count(*), count(DISTINCT time) FROM data_points").fetchone()


def _wait_for_rows(pool, at_least: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = _count(pool)[0]
        if rows >= at_least:
            return rows
        time.sleep(0.05)
    return _count(pool)[0]


@pytest.fixture
def two_polling_replicas(tmp_path, database_url, clean_db, upstream):
    url = f"{upstream[1]}sequence?start={int(time.time()) - 600}"
    env = replica_env(database_url, url, DATAPROC_POLL_INTERVAL_S=str(INTERVAL_S))
    replicas = [Replica([], env, tmp_path) for _ in range(2)]
    for replica in replicas:
        replica.url()
    yield replicas
    for replica in replicas:
        if replica.proc.poll() is None:
            assert replica.stop() == 0, replica.log()


def test_two_replicas_poll_at_the_configured_rate_and_never_twice(
    two_polling_replicas, clean_db, upstream
):
    server = upstream[0]
    assert _wait_for_rows(clean_db, 2, 10) >= 2  # polling has begun
    rows_before, fetches_before = _count(clean_db)[0], server.requests_served
    time.sleep(2.0)
    rows_after, fetches_after = _count(clean_db)[0], server.requests_served
    rows, fetches = rows_after - rows_before, fetches_after - fetches_before
    assert 6 <= rows <= 14, rows  # 2 s / 0.2 s = 10 by one poller; two would make about 20
    assert fetches <= rows + 2  # only the lock holder fetches at all
    total, distinct_times = _count(clean_db)
    assert total == distinct_times  # no document stored twice
    leaders = [
        r for r in two_polling_replicas if any("took the poller lock" in line for line in r.lines)
    ]
    assert len(leaders) == 1, [r.log() for r in two_polling_replicas]


def test_when_the_polling_replica_stops_the_other_takes_over(two_polling_replicas, clean_db):
    assert _wait_for_rows(clean_db, 1, 10) >= 1
    leader = next(r for r in two_polling_replicas if r.wait_for_line("took the poller lock", 0.1))
    other = next(r for r in two_polling_replicas if r is not leader)
    assert leader.stop() == 0, leader.log()
    rows = _count(clean_db)[0]
    assert other.wait_for_line("took the poller lock", 5), other.log()
    assert _wait_for_rows(clean_db, rows + 3, 5) >= rows + 3


def _poller(config, pool, upstream_url: str) -> Poller:
    return Poller(INTERVAL_S, config.database_url, ingest.Ingestor(config, pool, upstream_url))


def test_only_one_poller_holds_the_lock_until_it_lets_go(database_url, clean_db, upstream):
    config = make_config(database_url)
    first, second = (_poller(config, clean_db, f"{upstream[1]}sequence") for _ in range(2))
    try:
        assert first.tick() is True and second.tick() is False
        assert first.tick() is True and second.tick() is False  # the holder keeps it
        assert (first.polls, second.polls) == (2, 0)
    finally:
        first._release()
    assert second.tick() is True
    second._release()
    assert _count(clean_db)[0] == 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_failing_upstream_is_logged_and_counted_and_the_next_tick_retries(
    service_factory, clean_db, caplog
):
    port = _free_port()  # nothing listens here yet: every fetch is refused
    caplog.set_level(logging.WARNING, logger="dataproc.poller")
    service = service_factory(
        poll_interval_s=INTERVAL_S, upstream_url=f"http://127.0.0.1:{port}/sequence"
    )
    deadline = time.monotonic() + 5
    while service.poller.failures < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.poller.failures >= 2 and _count(clean_db)[0] == 0
    assert any("scheduled ingestion failed" in r.getMessage() for r in caplog.records)
    upstream, _ = simulated.start_in_thread("127.0.0.1", port)  # the upstream comes back
    try:
        assert _wait_for_rows(clean_db, 2, 5) >= 2
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_shutdown_stops_the_poller_and_releases_its_lock(service_factory, clean_db, database_url):
    service = service_factory(poll_interval_s=INTERVAL_S)
    assert _wait_for_rows(clean_db, 1, 5) >= 1
    assert service.poller.leader
    service.stop(grace_s=1)
    rows = _count(clean_db)[0]
    assert not service.poller._thread.is_alive()
    time.sleep(3 * INTERVAL_S)
    assert _count(clean_db)[0] == rows
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_try_advisory_lock(%s)", (POLLER_LOCK_KEY,)).fetchone()[0]
