"""Scale-out: independent service processes on one PostgreSQL behave as one service.

Three `dataproc serve` processes (separate ports, nothing shared but the database) take
concurrent signups (the same names on different replicas too), logins, populates (two of
them fetch the very same upstream document) and reads; afterwards the database is counted.
Then `serve --workers 2`: pre-forked workers on one socket, restarted when one dies, and all
gone after SIGTERM.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from support import Client, create_user, login
from support.replicas import Replica, alive, child_pids, replica_env

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX processes")

CONTESTED = [f"shared-{i}" for i in range(5)]  # each signed up on all three replicas at once
OWN_PER_REPLICA = 4
POPULATES_PER_REPLICA = 8


def _document(now: int) -> str:
    return json.dumps({"time": now, "value": [157, 42, 76, 190], "tags": []})


@pytest.fixture
def three_replicas(tmp_path, database_url, clean_db, upstream):
    """Replica 0 reads a sequence of distinct documents; 1 and 2 both read one fixed document."""
    base = upstream[1]
    fixed = f"{base}fixed?doc={quote(_document(int(time.time())))}"
    urls = [f"{base}sequence?start={int(time.time()) - 30}", fixed, fixed]
    replicas = [Replica([], replica_env(database_url, url), tmp_path) for url in urls]
    try:
        yield [replica.url() for replica in replicas]
    finally:
        codes = [replica.stop() for replica in replicas]
        assert codes == [0, 0, 0], "\n".join(r.log() for r in replicas)


def _call(base_url: str, method: str, path: str, **kwargs):
    client = Client(base_url)
    try:
        return client.request(method, path, **kwargs)
    finally:
        client.close()


def test_three_replicas_share_one_database_without_duplicates_or_losses(three_replicas, clean_db):
    create_user(clean_db, "root", "root-password", "admin")
    admin = login(Client(three_replicas[0]), "root", "root-password")["access_token"]
    barrier = threading.Barrier(len(CONTESTED) * 3 + 3 * OWN_PER_REPLICA)

    def signup(base_url: str, name: str) -> tuple[str, int]:
        barrier.wait(10)  # everyone at once: the race is the point
        reply = _call(
            base_url, "POST", "/auth/signup", body={"username": name, "password": "pass-" + name}
        )
        return name, reply.status

    jobs = [(url, name) for name in CONTESTED for url in three_replicas]
    jobs += [
        (url, f"own-{i}-{j}")
        for i, url in enumerate(three_replicas)
        for j in range(OWN_PER_REPLICA)
    ]

    def populate(base_url: str):
        reply = _call(base_url, "GET", "/api/populate", token=admin)
        return base_url, reply.status, reply.json()

    def read(base_url: str) -> int:
        reply = _call(base_url, "GET", "/api/data?limit=1000", token=admin)
        rows = reply.json()
        assert rows == sorted(rows, key=lambda row: (row["time"], row["id"]))
        return reply.status

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        signups = list(pool.map(lambda job: signup(*job), jobs))
        populates = [
            pool.submit(populate, url)
            for url in three_replicas
            for _ in range(POPULATES_PER_REPLICA)
        ]
        reads = [pool.submit(read, url) for url in three_replicas for _ in range(4)]
        populated = [future.result() for future in populates]
        assert [future.result() for future in reads] == [200] * len(reads)

    statuses = {}
    for name, status in signups:
        statuses.setdefault(name, []).append(status)
    assert all(sorted(statuses[name]) == [201, 409, 409] for name in CONTESTED), statuses
    assert all(statuses[name] == [201] for name in statuses if name not in CONTESTED), statuses
    assert all(status == 200 for _, status, _ in populated), populated
    fixed_ids = {point["id"] for url, _, point in populated if url != three_replicas[0]}
    assert len(fixed_ids) == 1  # two replicas, 16 fetches of one document: one row

    with clean_db.connection() as conn:
        users = [row[0] for row in conn.execute("SELECT username FROM users ORDER BY username")]
        points, distinct_docs = conn.execute(
            "SELECT count(*), count(DISTINCT document_sha256) FROM data_points"
        ).fetchone()
        rejects = conn.execute("SELECT count(*) FROM rejects").fetchone()[0]
    assert users == sorted(["admin", "root", *statuses])
    assert points == distinct_docs == POPULATES_PER_REPLICA + 1
    assert rejects == 0
    for url in three_replicas:  # every replica reads the same rows back
        ids = [row["id"] for row in _call(url, "GET", "/api/data?limit=1000", token=admin).json()]
        assert len(ids) == points


def test_a_token_from_any_replica_is_valid_on_every_replica(three_replicas, clean_db):
    names = [f"member-{i}" for i in range(6)]
    for name, url in zip(names, itertools.cycle(three_replicas)):
        assert (
            _call(
                url, "POST", "/auth/signup", body={"username": name, "password": "pw-" + name + "!"}
            ).status
            == 201
        )

    def tokens_of(pair):
        name, url = pair
        return login(Client(url), name, "pw-" + name + "!")

    with ThreadPoolExecutor(max_workers=6) as pool:  # each logs in on a different replica
        pairs = list(pool.map(tokens_of, zip(names, itertools.cycle(reversed(three_replicas)))))
        checks = [
            pool.submit(_call, url, "GET", "/api/data", token=pair["access_token"])
            for pair in pairs
            for url in three_replicas
        ]
        refreshes = [
            pool.submit(
                _call, url, "POST", "/auth/refresh", body={"refresh_token": pair["refresh_token"]}
            )
            for pair, url in zip(pairs, itertools.cycle(three_replicas))
        ]
        assert [future.result().status for future in checks] == [200] * len(checks)
        assert [future.result().status for future in refreshes] == [200] * len(refreshes)


@pytest.fixture
def two_workers(tmp_path, database_url, clean_db, upstream):
    replica = Replica(["--workers", "2"], replica_env(database_url, upstream[1]), tmp_path)
    yield replica
    if replica.proc.poll() is None:
        replica.stop()


def _wait_for_children(pid: int, count: int, timeout_s: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        children = child_pids(pid)
        if len(children) == count:
            return children
        time.sleep(0.05)
    raise AssertionError(f"expected {count} workers of {pid}, found {child_pids(pid)}")


def test_serve_with_two_workers_answers_and_sigterm_stops_both_workers(two_workers):
    url = two_workers.url()
    assert two_workers.wait_for_line(r"listening on .*", 20)
    workers = _wait_for_children(two_workers.proc.pid, 2)
    replies = [_call(url, "GET", "/readyz") for _ in range(10)]
    assert [reply.status for reply in replies] == [200] * 10
    assert two_workers.stop() == 0, two_workers.log()
    assert not any(alive(pid) for pid in workers)


def test_a_worker_that_dies_is_replaced_and_the_service_keeps_answering(two_workers):
    url = two_workers.url()
    first = _wait_for_children(two_workers.proc.pid, 2)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    assert two_workers.wait_for_line(rf"worker {victim} died \(signal SIGKILL\)", 10), (
        two_workers.log()
    )
    after = _wait_for_children(two_workers.proc.pid, 2)
    assert victim not in after and len(after & first) == 1
    assert [_call(url, "GET", "/healthz").status for _ in range(5)] == [200] * 5
    assert two_workers.stop() == 0, two_workers.log()
