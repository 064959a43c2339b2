"""Bursts of logins and signups (API.md Bursts): one name claimed before any hash, the bcrypt
queue's wait bounded and refused at once when it would be too long, and thirty signups of
distinct names to three replicas all served."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from dataproc import passwords, store
from support import Client, create_user
from support.replicas import Replica, replica_env


def burst(requests: list[tuple[str, dict]]) -> list[tuple[int, float, dict]]:
    """POST each (url, body) at the same moment; (status, seconds taken, headers) of each."""
    barrier, results = threading.Barrier(len(requests)), []

    def send(url: str, body: dict) -> None:
        base, _, path = url.partition("/auth/")
        client = Client(base + "/", timeout=60)
        barrier.wait()
        started = time.monotonic()
        reply = client.post("/auth/" + path, body=body)
        results.append((reply.status, time.monotonic() - started, dict(reply.headers)))
        client.close()

    threads = [threading.Thread(target=send, args=r) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert len(results) == len(requests), "a request never came back"
    return results


@pytest.fixture
def counted_hashes(monkeypatch) -> list[int]:
    """Counts every bcrypt hash made in this process (the real one still runs)."""
    made: list[int] = []
    real = passwords.hash_password

    def counting(password: str, cost: int) -> str:
        made.append(cost)
        return real(password, cost)

    monkeypatch.setattr(passwords, "hash_password", counting)
    return made


def test_a_burst_of_signups_of_one_name_costs_one_hash(service_factory, clean_db, counted_hashes):
    one, two = service_factory(), service_factory()  # two replicas: the claim is in the database
    body = {"username": "popular", "password": "password-1"}
    results = burst([(f"{s.url}auth/signup", body) for s in (one, two) for _ in range(10)])
    statuses = sorted(status for status, _, _ in results)
    print(f"\none-name burst of 20: { {s: statuses.count(s) for s in set(statuses)} }")
    assert statuses == [201] + [409] * 19
    assert len(counted_hashes) == 1
    assert store.get_user(clean_db, "popular").hashed_password.startswith("$2")


def test_a_signup_refused_by_the_queue_gives_its_name_back(service_factory, clean_db):
    # A slow hash and a short wait: the second in the queue is refused at once.
    service = service_factory(bcrypt_cost=12, login_concurrency=1, login_wait_s=0.2)
    client = Client(service.url, timeout=60)
    assert (
        client.post("/auth/signup", body={"username": "seed", "password": "password-1"}).status
        == 201
    )
    names = [f"name-{i}" for i in range(6)]
    results = burst(
        [(f"{service.url}auth/signup", {"username": n, "password": "password-1"}) for n in names]
    )
    refused = [r for r in results if r[0] == 503]
    assert refused and {r[0] for r in results} <= {201, 503}
    for name in names:  # every name is either taken by its 201 or free again after its 503
        reply = client.post("/auth/signup", body={"username": name, "password": "password-1"})
        assert reply.status in (201, 409)
    created = {u.username for u in map(lambda n: store.get_user(clean_db, n), names) if u}
    assert created == set(names)


def test_past_the_wait_a_login_gets_503_with_retry_after_at_once(service_factory, clean_db):
    store.upsert_user(clean_db, "slow", passwords.hash_password("password-1", 13), "user")
    service = service_factory(bcrypt_cost=13, login_concurrency=1, login_wait_s=0.3)
    client = Client(service.url, timeout=60)
    form = {"username": "slow", "password": "password-1"}
    assert client.post("/auth/login", form=form).status == 200  # measures one hash
    results = burst([(f"{service.url}auth/login", form) for _ in range(6)])
    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert served and refused and len(served) + len(refused) == 6
    # At once: each refusal came back before the first login that was served had finished
    # its one hash (the one that holds the slot the others would have waited for).
    assert max(took for _, took, _ in refused) < min(took for _, took, _ in served)
    for _, _, headers in refused:
        assert int(headers["Retry-After"]) >= 1


def test_thirty_signups_of_distinct_names_to_three_replicas_all_succeed(
    database_url, clean_db, upstream, tmp_path
):
    create_user(clean_db, "admin", "not-the-default")  # spare each start-up a cost-12 check
    env = replica_env(database_url, upstream[1])
    replicas = [Replica([], env, tmp_path) for _ in range(3)]
    try:
        urls = [replica.url() for replica in replicas]
        run = uuid.uuid4().hex[:6]
        requests = [
            (
                f"{urls[i % 3]}auth/signup",
                {"username": f"burst-{run}-{i}", "password": "password-1"},
            )
            for i in range(30)
        ]
        results = burst(requests)
    finally:
        for replica in replicas:
            replica.stop()
    statuses = [status for status, _, _ in results]
    print(
        f"\n30 distinct signups on 3 replicas: { {s: statuses.count(s) for s in set(statuses)} },"
        f" slowest {max(took for _, took, _ in results):.2f} s"
    )
    assert statuses == [201] * 30
