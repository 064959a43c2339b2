"""Service processes for the scale-out tests: `python -m dataproc serve` as a real subprocess.

Each replica is configured only through its environment, exactly as a deployment is (the
tests' keys, the test database, fast bcrypt), listens on a port the kernel picks, and says
where in its log; the helper reads the log in a thread and keeps every line for assertions.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from support import ACCESS_KEY, REFRESH_KEY, TEST_COST

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"(?:listening|workers) on (http://[^\s/]+/)")
# Settings a developer's shell may carry that must not leak into a replica under test.
_FOREIGN = (
    "DATAPROC_",
    "POSTGRES_",
    "JWT_",
    "SERVER_",
    "DATABASE_URL",
    "ACCESS_TOKEN_",
    "REFRESH_TOKEN_",
    "ALGORITHM",
)


def replica_env(database_url: str, upstream_url: str | None, **settings: str) -> dict[str, str]:
    """A clean environment for one replica: the test database, keys and fast bcrypt."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(_FOREIGN)}
    env.update(
        DATABASE_URL=database_url,
        JWT_SECRET_KEY=ACCESS_KEY,
        JWT_REFRESH_SECRET_KEY=REFRESH_KEY,
        DATAPROC_BCRYPT_COST=str(TEST_COST),
        DATAPROC_SHUTDOWN_GRACE_S="2",
        DATAPROC_DB_WAIT_S="5",
        DATAPROC_UPSTREAM_TIMEOUT_S="3",
        DATAPROC_LOGIN_CONCURRENCY="4",
        PYTHONUNBUFFERED="1",
    )
    if upstream_url:
        env["SERVER_URL"] = upstream_url
    env.update(settings)
    return env


class Replica:
    """One `dataproc serve` process: its URL once it listens, its log lines, its exit."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        cwd: Path,
        *,
        python: str = sys.executable,
        pythonpath: bool = True,
    ):
        env = {name: value for name, value in env.items() if name != "PYTHONPATH"}
        if pythonpath:  # run this tree's dataproc, from any working directory
            env["PYTHONPATH"] = str(REPO)
        self.lines: list[str] = []
        self._url: str | None = None
        self._seen = threading.Condition()
        self.proc = subprocess.Popen(
            [python, "-m", "dataproc", "serve", "--port", "0", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                match = _LISTENING.search(line)
                if match and self._url is None:
                    self._url = match.group(1)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def url(self, timeout_s: float = 30.0) -> str:
        """The base URL, once the process says it listens (fails with its log otherwise)."""
        deadline = time.monotonic() + timeout_s
        with self._seen:
            while self._url is None and self.proc.poll() is None and time.monotonic() < deadline:
                self._seen.wait(0.1)
            if self._url is None:
                raise AssertionError("replica did not start:\n" + self.log())
            return self._url

    def wait_for_line(self, pattern: str, timeout_s: float) -> bool:
        """True once a log line matches `pattern` (a regex), False at the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._seen:
            while time.monotonic() < deadline:
                if any(re.search(pattern, line) for line in self.lines):
                    return True
                self._seen.wait(0.1)
        return False

    def log(self) -> str:
        with self._seen:
            return "\n".join(self.lines)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then the exit status (killed, and the test failed, past the timeout)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"replica ignored SIGTERM for {timeout_s} s:\n{self.log()}"
            ) from None


def child_pids(pid: int) -> set[int]:
    """The live children of process `pid`, read from /proc (Linux)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry.name))
    return children


def alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
