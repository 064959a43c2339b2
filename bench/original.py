"""The original service (FastAPI + SQLAlchemy, `../shared/original/`) as a benchmark peer.

Only what running it needs: its own venv from its pinned requirements (cached by their hash),
its database made by its own `init.sql`, the benchmark's rows copied in, and the command line
its README uses (uvicorn, one worker) with its `.env` settings pointed at that database. None
of its code is copied: it runs from its own folder, as shipped.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg

# shared/ lies beside the repository (a worktree's, a CI clone's); the variable overrides it.
DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "original"
SOURCE = Path(os.environ.get("DATAPROC_BENCH_ORIGINAL", DEFAULT_SOURCE))
CACHE = Path("/var/tmp/dataproc-bench/original-venv")
DATABASE = "data_points_db"  # the name its init.sql creates and its .env names
ADMIN = (
    "admin",
    "admin",
)  # the admin its init.sql inserts (README: username admin, password admin)

# The columns both schemas share, numbered in dataproc's (time, id) order. It reads without
# ORDER BY, so its pages follow the heap: the rows must lie there oldest first, as its own
# populate leaves them. COPY straight into the table would not do that (a bulk load extends
# the table many pages at a time and fills them out of order), so the rows land in a
# temporary table and are inserted from it in order.
COPY_OUT = """COPY (SELECT row_number() OVER (ORDER BY time, id), time, value, valid, tags
               FROM data_points) TO STDOUT"""
STAGE = "CREATE TEMP TABLE incoming (n bigint, time timestamptz, value float8, valid bool, tags varchar[])"
COPY_IN = "COPY incoming FROM STDIN"
INSERT_IN_ORDER = """INSERT INTO data_points (time, value, valid, tags)
SELECT time, value, valid, tags FROM incoming ORDER BY n"""
# What must match between the two databases for "the same rows".
FINGERPRINT = """SELECT count(*), count(*) FILTER (WHERE valid), min(time), max(time),
  md5(string_agg(time::text || value::text || valid::text || coalesce(tags::text, ''), ','
                 ORDER BY time, value))
FROM data_points"""


class Unavailable(Exception):
    """The original cannot run here; the message says why (the benchmark skips it)."""


def venv(log) -> Path:
    """Its venv's python, built from its requirements.txt once per distinct file."""
    requirements = SOURCE / "requirements.txt"
    if not requirements.is_file():
        raise Unavailable(f"no {requirements}")
    key = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    home = CACHE / key
    python = home / "bin" / "python"
    if (home / ".complete").exists() and _runs(python):
        return python
    shutil.rmtree(home, ignore_errors=True)
    home.parent.mkdir(parents=True, exist_ok=True)
    log(f"original: building its venv in {home} (once per requirements.txt)")
    steps = (
        [sys.executable, "-m", "venv", str(home)],
        [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
    )
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            shutil.rmtree(home, ignore_errors=True)
            lines = (done.stderr or done.stdout).strip().splitlines()
            errors = [line for line in lines if line.startswith("ERROR")] or lines[-2:]
            raise Unavailable(f"`{' '.join(step[-3:])}` failed: {' | '.join(errors)[:400]}")
    (home / ".complete").write_text(key + "\n")
    return python


def _runs(python: Path) -> bool:
    """Whether a cached venv still works (its base interpreter may have moved since)."""
    try:
        check = [str(python), "-c", "import uvicorn, fastapi, asyncpg"]
        return subprocess.run(check, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def run_init_sql(admin_uri: str, database_uri) -> None:
    """Run its init.sql (CREATE DATABASE, then `\\connect NAME` and tables) statement by
    statement: the file uses one psql meta-command, interpreted here."""
    conn = psycopg.connect(admin_uri, autocommit=True)  # CREATE DATABASE runs outside a transaction
    try:
        pending: list[str] = []
        for line in (SOURCE / "init.sql").read_text().splitlines():
            if line.strip().startswith("\\connect"):
                conn.close()
                conn = psycopg.connect(database_uri(line.split()[1].rstrip(";")), autocommit=True)
                continue
            pending.append(line)
            if line.rstrip().endswith(";"):
                conn.execute("\n".join(pending))
                pending = []
    finally:
        conn.close()


def copy_rows(source_uri: str, target_uri: str) -> tuple:
    """Copy dataproc's rows into its database; returns the fingerprint both now share."""
    # Autocommit: each statement commits on its own, and VACUUM cannot run in a transaction.
    with (
        psycopg.connect(source_uri) as source,
        psycopg.connect(target_uri, autocommit=True) as target,
    ):
        target.execute(STAGE)
        with source.cursor().copy(COPY_OUT) as out, target.cursor().copy(COPY_IN) as into:
            for block in out:
                into.write(block)
        target.execute(INSERT_IN_ORDER)
        target.execute("VACUUM (ANALYZE) data_points")
        ours, theirs = (c.execute(FINGERPRINT).fetchone() for c in (source, target))
    if ours != theirs:
        raise RuntimeError(f"the two databases differ after the copy: {ours} != {theirs}")
    return ours


def environment(socket_dir: str, upstream_port: int) -> dict:
    """Its `.env` settings pointed at the benchmark's PostgreSQL (real variables win over
    its .env, as python-dotenv does). The server reaches PostgreSQL over the same Unix
    socket as dataproc: POSTGRES_SERVER empty makes the URL hostless and asyncpg then takes
    the host from PGHOST."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DATAPROC_"))}
    env.update(
        POSTGRES_SERVER="",
        PGHOST=socket_dir,
        POSTGRES_USER="postgres",
        POSTGRES_PASSWORD="unused",  # the benchmark's PostgreSQL trusts local connections
        POSTGRES_DB_NAME=DATABASE,
        SERVER_URL="127.0.0.1",
        SERVER_PORT=str(upstream_port),
        PYTHONDONTWRITEBYTECODE="1",  # its folder is read-only (the Dockerfile sets it too)
        PYTHONUNBUFFERED="1",
    )
    return env


def command(python: Path, port: int) -> list[str]:
    """Its README's command (the Dockerfile's CMD): uvicorn, one worker, uvloop + httptools."""
    uvicorn = str(python.parent / "uvicorn")
    return [uvicorn, "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
