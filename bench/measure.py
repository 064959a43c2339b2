"""Measuring tools for the benchmark: wrk and its Lua scripts, CPU and memory from /proc,
and the two ceilings (a trivial http.server, the same SQL through psycopg alone)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_200(url: str, token: str | None = None, timeout_s: float = 60) -> float:
    """Seconds until `url` answers 200 (polling every 5 ms)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - started
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s} s")


# --- /proc ------------------------------------------------------------------------------------


def _stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) for every process on the machine."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return stats


def tree(root: int, stats: dict[int, tuple[int, float]]) -> set[int]:
    """`root` and all its descendants."""
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in stats.items() if ppid == parent]
        found.update(children)
        frontier.extend(children)
    return found


def cores_used(run, roots: dict[str, int]):
    """Run `run()`; returns its result and the cores each process tree in `roots` (name ->
    pid) used meanwhile."""
    before, started = _stats(), time.perf_counter()
    result = run()
    after, elapsed = _stats(), time.perf_counter() - started
    used = {}
    for name, root in roots.items():
        # A process that ended during the run is lost (its pid is gone from `after`); one
        # that started during it counts whole.
        pids = tree(root, after)
        seconds = sum(after[p][1] - before.get(p, (0, 0.0))[1] for p in pids)
        used[name] = round(seconds / elapsed, 2)
    return result, used


def rss_mb(root: int) -> float:
    """Resident set size of a process and its children, summed (shared pages count twice)."""
    total = 0
    for pid in tree(root, _stats()):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


# --- wrk --------------------------------------------------------------------------------------

LUA_POST = """
wrk.method = "POST"
wrk.body = "{body}"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
"""

# Cold reads: each request takes the next window start from a file of distinct starts; the
# threads take interleaved entries from an offset the benchmark advances after each run, so
# no start repeats within a run or across runs until the whole list has been used.
LUA_COLD = """
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end
local starts, position, step, prefix = {}, 0, 1, ""
function init(args)
  for line in io.lines(args[1]) do starts[#starts + 1] = line end
  position, step, prefix = tonumber(args[2]) + tid, tonumber(args[3]), args[4]
end
function request()
  local start = starts[(position % #starts) + 1]
  position = position + step
  return wrk.format("GET", prefix .. start)
end
"""


def wrk_threads(connections: int) -> int:
    return min(2, connections)


def wrk(
    url: str,
    connections: int,
    seconds: float,
    *,
    token: str | None = None,
    lua: str | None = None,
    lua_args: tuple[str, ...] = (),
) -> dict:
    """Run wrk; requests/s, p50/p99 (ms), errors (socket errors and non-2xx) and requests."""
    command = ["wrk", "-t", str(wrk_threads(connections)), "-c", str(connections)]
    command += ["-d", f"{max(1, round(seconds))}s", "--latency", "--timeout", "30s"]
    if token:
        command += ["-H", f"Authorization: Bearer {token}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        if lua:
            script.write(lua)
            script.flush()
            command += ["-s", script.name]
        command.append(url)
        if lua_args:
            command += ["--", *lua_args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)


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


# --- ceilings ---------------------------------------------------------------------------------

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


def start_trivial_server(body_bytes: int) -> tuple[subprocess.Popen, str]:
    """A bare ThreadingHTTPServer (keep-alive, TCP_NODELAY, one write per response, a large
    backlog) answering every GET with `body_bytes` bytes."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", TRIVIAL_SERVER, str(port), str(body_bytes)])
    base = f"http://127.0.0.1:{port}"
    wait_for_200(base + "/")
    return process, base


def psycopg_ceiling(
    database_url: str,
    sql: str,
    params_list: list[dict],
    connections: int,
    seconds: float,
    postgres_pid: int,
) -> dict:
    """`sql` straight through psycopg: `connections` threads in this process, each on its own
    connection, taking `params_list` entries in turn (one entry: the same query each time)."""
    conns = [psycopg.connect(database_url, autocommit=True) for _ in range(connections)]
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(index: int, conn: psycopg.Connection, deadline: float) -> None:
        mine, position = [], index
        while (now := time.perf_counter()) < deadline:
            conn.execute(sql, params_list[position % len(params_list)]).fetchone()
            position += connections
            mine.append(time.perf_counter() - now)
        with lock:
            latencies.extend(mine)

    def run() -> None:
        deadline = time.perf_counter() + seconds
        threads = [
            threading.Thread(target=worker, args=(i, c, deadline)) for i, c in enumerate(conns)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        _, cores = cores_used(run, {"service": os.getpid(), "postgres": postgres_pid})
    finally:
        for conn in conns:
            conn.close()
    latencies.sort()
    return {
        "rps": len(latencies) / seconds,
        "requests": len(latencies),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
        "errors": 0,
        "cores": cores,
    }
