"""Retention (`DATAPROC_RETENTION`, `dataproc prune`) against a window of known points on both
layouts: whole partitions older than the cut dropped, the rest deleted in batches, not one point
inside the window touched, rejects following by their received time, the counts in /metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psycopg
import pytest

from dataproc import store
from dataproc.metrics import Metrics
from dataproc.runtime import Service
from dataproc.store import partitions
from dataproc.upkeep import Upkeep
from support import Client, make_config

KEEP_S = 3 * 86400.0
# Ten days of points, one every 10 minutes, back from now; a few far in the past (the lowest
# rest partition's, on the partitioned layout); rejects received over the same ten days.
POINTS = """
INSERT INTO data_points (time, value, valid, tags)
SELECT now() - i * interval '10 minutes', i, i % 3 > 0, '{}'::varchar[] FROM generate_series(0, 1439) i
UNION ALL
SELECT timestamptz '2001-01-01' + i * interval '1 hour', i, true, '{}'::varchar[]
FROM generate_series(1, 5) i"""
REJECTS = """
INSERT INTO rejects (received_at, reason, body)
SELECT now() - i * interval '1 hour', 'test', '\\x00' FROM generate_series(0, 239) i"""
# Partitions for the last ten days, so that some lie wholly before the cut.
OLD_PARTITIONS = """
SELECT dataproc_ensure_partition('data_points', 'day', now() - i * interval '1 day')
FROM generate_series(0, 10) i"""
# Points and rejects well clear of the cut (which is taken a moment after these rows).
INSIDE = "SELECT id FROM data_points WHERE time >= now() - %s * interval '1 second' + interval '1 minute'"
OUTSIDE = "SELECT id FROM data_points WHERE time < now() - %s * interval '1 second'"


def filled(conninfo: str, step: str) -> tuple[set[int], set[int], int]:
    """The schema in `step` layout with the known points: (kept ids, removed ids, old rejects)."""
    pool = store.make_pool(conninfo, max_size=1, wait_s=5)
    store.open_pool(pool, 10)
    store.apply_schema(pool, step)
    pool.close()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if step != "none":
            conn.execute(OLD_PARTITIONS)
        conn.execute(POINTS)
        conn.execute(REJECTS)
        inside = {i for (i,) in conn.execute(INSIDE, (KEEP_S,))}
        outside = {i for (i,) in conn.execute(OUTSIDE, (KEEP_S,))}
        (old_rejects,) = conn.execute(
            "SELECT count(*) FROM rejects WHERE received_at < now() - %s * interval '1 second'",
            (KEEP_S,),
        ).fetchone()
    return inside, outside, old_rejects


@pytest.mark.parametrize("step", ["none", "day"])
def test_prune_removes_exactly_what_is_older_than_the_window(fresh_database, step):
    inside, outside, old_rejects = filled(fresh_database, step)
    batches = []
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        pruned = partitions.prune(
            conn, KEEP_S, batch=50, on_batch=lambda kind, done, total: batches.append(kind)
        )
        left = {i for (i,) in conn.execute("SELECT id FROM data_points")}
        rejects_left = conn.execute(
            "SELECT count(*), min(received_at) >= %s FROM rejects", (pruned.cut,)
        ).fetchone()
        names = (
            {name for name, _, _ in conn.execute(partitions.LIST_PARTITIONS)}
            if step != "none"
            else set()
        )
    assert inside <= left, "a point inside the window was removed"
    assert not (left & outside), "a point older than the window was kept"
    assert rejects_left == (240 - old_rejects, True) and pruned.rejects == old_rejects
    if step == "none":
        assert pruned.partitions == [] and pruned.points == len(outside)
        assert batches.count("points") == -(-len(outside) // 50)  # in batches of 50
    else:
        # Days 4..10 back are wholly older than the cut: dropped whole, their rows uncounted
        # as deletes; the straddling day and the lowest rest partition's old rows are deleted.
        assert len(pruned.partitions) >= 6 and all(
            n.startswith("data_points_d") for n in pruned.partitions
        )
        assert not names & set(pruned.partitions)
        assert "data_points_rest_min" in names
        assert 5 <= pruned.points < len(outside)


def test_after_a_prune_every_time_still_has_a_partition(fresh_database):
    """The dropped days' range joins the lowest rest partition: a backfill older than the
    window is stored (the next prune removes it), and pages read in partition order."""
    filled(fresh_database, "day")
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        partitions.prune(conn, KEEP_S)
        parts = conn.execute(partitions.LIST_PARTITIONS).fetchall()
        assert parts[0][:2] == ("data_points_rest_min", None) and parts[-1][2] is None
        for (_, _, upper), (_, lower, _) in zip(parts, parts[1:], strict=False):
            assert upper == lower, parts
        conn.execute(
            "INSERT INTO data_points (time, value, valid, tags) "
            "VALUES (now() - interval '6 days', 1, true, '{}')"
        )
        assert partitions.prune(conn, KEEP_S).points == 1


def test_prune_again_removes_nothing(fresh_database):
    filled(fresh_database, "day")
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        partitions.prune(conn, KEEP_S)
        again = partitions.prune(conn, KEEP_S)
    assert (again.points, again.rejects, again.partitions) == (0, 0, [])


def test_the_prune_command_prints_what_it_removed(fresh_database, tmp_path):
    inside, outside, old_rejects = filled(fresh_database, "none")
    env = {**os.environ, "DATABASE_URL": fresh_database, "DATAPROC_RETENTION": "3d"}
    done = subprocess.run(
        [sys.executable, "-m", "dataproc", "prune", "--batch", "100"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["points"] == len(outside) and report["rejects"] == old_rejects
    assert "prune: batch 1:" in done.stderr  # one line per batch off a terminal
    missing = subprocess.run(
        [sys.executable, "-m", "dataproc", "prune"],
        env={**os.environ, "DATABASE_URL": fresh_database},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "DATAPROC_RETENTION" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_upkeep_counts_retention_in_the_metrics(fresh_database):
    inside, outside, old_rejects = filled(fresh_database, "day")
    metrics = Metrics("test")
    upkeep = Upkeep(
        fresh_database, partition="day", retention_s=KEEP_S, on_pruned=metrics.retention
    )
    assert upkeep.run_once()
    text = metrics.render().decode()
    assert "dataproc_retention_runs_total 1" in text
    assert f'dataproc_retention_removed_total{{kind="rejects"}} {old_rejects}' in text
    assert 'dataproc_retention_removed_total{kind="partitions"} 0' not in text


def test_the_service_applies_retention_at_start_and_shows_it_in_metrics(fresh_database):
    inside, outside, _ = filled(fresh_database, "none")
    service = Service(make_config(fresh_database, partition="none", retention_s=KEEP_S)).start()
    try:
        client = Client(service.url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = client.get("/metrics").body.decode()
            if "dataproc_retention_runs_total 1" in text:
                break
            time.sleep(0.05)
        assert f'dataproc_retention_removed_total{{kind="points"}} {len(outside)}' in text
        client.close()
    finally:
        service.stop(grace_s=1)
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        left = {i for (i,) in conn.execute("SELECT id FROM data_points")}
    assert left == inside | (left - outside) and not left & outside
