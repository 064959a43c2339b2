"""`dataproc migrate-partitions` against real PostgreSQL and the real service: a plain table
(the original's init.sql, or ours) filled, converted while the service reads it and plain SQL
writes and deletes, the command SIGKILLed halfway and run again; every row is then there
exactly once, and the service goes on reading and storing on the partitioned table.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from dataproc.runtime import Service
from dataproc.store import partitions
from support import Client, create_user, login, make_config

ORIGINAL_TABLES = """
CREATE TABLE "users" ("id" serial PRIMARY KEY, "username" varchar NOT NULL UNIQUE,
  "hashed_password" varchar NOT NULL, "role" varchar NOT NULL DEFAULT 'user');
CREATE TABLE "data_points" ("id" serial PRIMARY KEY, "time" timestamptz NOT NULL,
  "value" DOUBLE PRECISION NOT NULL, "valid" boolean NOT NULL, "tags" varchar[]);
INSERT INTO USERS(id, username, hashed_password, role) VALUES(0, 'admin', 'x', 'admin');
"""
ROWS = 30_000
# Five weeks of points back from now, every 100 s: some older than any partition made ahead.
FILL = """
INSERT INTO data_points (time, value, valid, tags)
SELECT now() - i * interval '100 seconds', i, i %% 4 > 0, ARRAY['t' || (i %% 7)]
FROM generate_series(1, %s) i"""


def run_migration(conninfo: str, cwd, *, batch: int, kill_after: int | None = None) -> str:
    """The command in a subprocess; with `kill_after`, SIGKILLed once that many ids are copied."""
    env = {**os.environ, "DATABASE_URL": conninfo, "DATAPROC_PARTITION": "day"}
    command = [sys.executable, "-m", "dataproc", "migrate-partitions", "--batch", str(batch)]
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if kill_after is not None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process.poll() is None:
                done = 0
                if conn.execute("SELECT to_regclass('dataproc_migration')").fetchone()[0]:
                    row = conn.execute(
                        "SELECT copied_to - low_id FROM dataproc_migration"
                    ).fetchone()
                    done = row[0] if row else 0
                if done and done >= kill_after:
                    break
                time.sleep(0.01)
        assert process.poll() is None, "finished before it could be killed: raise ROWS"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        return ""
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return out + err


class Traffic:
    """Plain-SQL writes and deletes, and service reads, in threads until `stop`."""

    def __init__(self, conninfo: str, service_url: str, token: str):
        self.conninfo, self.url, self.token = conninfo, service_url, token
        self.written: list[int] = []
        self.deleted: list[int] = []
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._write), threading.Thread(target=self._read)]

    def start(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(30)

    def _write(self) -> None:
        with psycopg.connect(self.conninfo, autocommit=True) as conn:
            while not self._stop.wait(0.005):
                (new,) = conn.execute(
                    "INSERT INTO data_points (time, value, valid, tags) "
                    "VALUES (now(), 1, true, '{}') RETURNING id"
                ).fetchone()
                self.written.append(new)
                if len(self.written) % 5 == 0:  # and now and then an old row goes
                    gone = conn.execute(
                        "DELETE FROM data_points WHERE id = (SELECT min(id) + %s FROM "
                        "data_points) RETURNING id",
                        (len(self.written),),
                    ).fetchone()
                    if gone:
                        self.deleted.append(gone[0])

    def _read(self) -> None:
        client = Client(self.url)
        while not self._stop.is_set():
            self.statuses.append(client.get("/api/data?limit=50", token=self.token).status)
        client.close()


@pytest.mark.parametrize("start", ["original", "ours"])
def test_a_killed_migration_resumes_and_loses_nothing_while_the_service_reads(
    fresh_database, tmp_path, start, upstream
):
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        if start == "original":
            conn.execute(ORIGINAL_TABLES)
            conn.execute(FILL, (ROWS,))  # written before dataproc ever ran, as the original did
    service = Service(
        make_config(fresh_database, partition="none", upstream_url=upstream[1])
    ).start()
    try:
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            if start == "ours":
                conn.execute(FILL, (ROWS,))
            before = {i for (i,) in conn.execute("SELECT id FROM data_points")}
        create_user(service.pool, "root", "root-password", "admin")
        client = Client(service.url)
        token = login(client, "root", "root-password")["access_token"]
        traffic = Traffic(fresh_database, service.url, token).start()
        try:
            run_migration(fresh_database, tmp_path, batch=500, kill_after=ROWS // 3)
            with psycopg.connect(fresh_database, autocommit=True) as conn:
                assert partitions.layout(conn) == "plain"  # killed before the swap
            output = run_migration(fresh_database, tmp_path, batch=500)
            time.sleep(0.2)  # reads and writes go on after the swap too
        finally:
            traffic.stop()
        assert "converted to day partitions" in output
        assert "batch" in output  # one line per batch (not a terminal)
        expected = (before | set(traffic.written)) - set(traffic.deleted)
        with psycopg.connect(fresh_database, autocommit=True) as conn:
            assert partitions.layout(conn) == "partitioned"
            ids = [i for (i,) in conn.execute("SELECT id FROM data_points")]
            leftovers = conn.execute(
                "SELECT to_regclass('data_points_new'), to_regclass('dataproc_migration_log')"
            ).fetchone()
        assert len(ids) == len(set(ids)), "a row copied twice"
        assert set(ids) == expected, "rows lost or resurrected"
        assert leftovers == (None, None)
        assert traffic.written and traffic.deleted  # the traffic really ran during the copy
        assert traffic.statuses and set(traffic.statuses) == {200}, set(traffic.statuses)
        # The service goes on: a populate stores on the partitioned table, deduped.
        client.close()
        client = Client(service.url)  # the first one sat idle through the migration
        stored = client.post("/api/populate", token=token)
        assert stored.status == 200, stored.body
        again = run_migration(fresh_database, tmp_path, batch=500)
        assert "already day partitions" in again
        client.close()
    finally:
        service.stop(grace_s=1)
