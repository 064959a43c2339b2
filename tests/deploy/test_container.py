"""The image and the compose stack, for real: podman builds the Containerfile and
podman-compose runs compose.yaml, driven over HTTP on 127.0.0.1 as the README says.

No registry is reachable, so `tests/deploy/standins.sh` first makes local stand-ins for the two
base images (Debian packages and PyPI only; cached under /var/tmp/dataproc-standins). Podman
runs with a configuration of this test's own (runc, explicit ulimits, cgroupfs, file events),
its own storage and its own network configuration directory, all in one temporary directory
that is removed at the end with every container, volume and network the test made, and with
the iptables chains netavark added. Ports are published on 127.0.0.1 only.

Skips (with the reason) where podman cannot run: not root, or podman, runc, debootstrap or
podman-compose missing (`.ci/container.sh` installs them; under CI=true a skip is a failure).
Two figures are printed: seconds from `up` to the first 200 on /readyz (never asserted: no
timed tests) and the MB the image adds over its base (asserted against the 25 MB budget).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

REPO = Path(__file__).resolve().parents[2]
STANDINS = REPO / "tests" / "deploy" / "standins.sh"
IMAGE = "localhost/dataproc:latest"
BASE = "docker.io/library/python:3.11-slim-bookworm"
STOP_GRACE_S = 20  # compose.yaml's stop_grace_period for the service
pytestmark = pytest.mark.container


def _podman_compose() -> str | None:
    beside = Path(sys.executable).parent / "podman-compose"  # the venv's bin/, not resolved
    return shutil.which("podman-compose") or (str(beside) if beside.exists() else None)


def _why_not() -> str | None:
    """Why podman cannot run this test here, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, rootful podman)"
    missing = [tool for tool in ("podman", "runc", "debootstrap") if not shutil.which(tool)]
    if not _podman_compose():
        missing.append("podman-compose")
    if missing:
        how = "bash .ci/container.sh" if shutil.which("apt-get") else "no apt-get to install them"
        return f"{', '.join(missing)} not installed ({how})"
    return None


@dataclass
class Engine:
    """podman and podman-compose with this test's own configuration and storage."""

    root: Path
    env: dict[str, str]
    compose: str

    def run(self, *args: str, timeout: float = 120, check: bool = True, cwd=None):
        result = subprocess.run(
            args, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> {result.returncode}\n{result.stderr}")
        return result

    def podman(self, *args: str, **kwargs):
        return self.run("podman", *args, **kwargs)

    def inspect(self, *names: str) -> list[dict]:
        return json.loads(self.podman("inspect", *names).stdout)


def _write_podman_config(root: Path) -> dict[str, str]:
    """containers.conf and storage.conf of the test's own; the environment that selects them."""
    (root / "containers.conf").write_text(
        "[containers]\n"
        # Without explicit limits runc fails: "error setting rlimit type 7".
        'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'tmp_dir = "{root}/tmp"\n'
        "[network]\n"
        f'network_config_dir = "{root}/networks"\n'
    )
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/graph"\nrunroot = "{root}/run"\n'
    )
    # Nothing from the caller's shell may reach compose.yaml's interpolation or podman's
    # defaults: the test's .env alone says what the stack is.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("POSTGRES_", "DATAPROC_", "CONTAINERS_", "BUILDAH_", "COMPOSE_"))
        or name == "DATAPROC_STANDINS_CACHE"  # standins.sh's own
    }
    env.update(
        CONTAINERS_CONF=str(root / "containers.conf"),
        CONTAINERS_STORAGE_CONF=str(root / "storage.conf"),
    )
    return env


def _iptables_chains() -> set[str]:
    """Every (table, chain) name in iptables now, as 'table/chain'."""
    chains = set()
    for table in ("filter", "nat"):
        result = subprocess.run(
            ["iptables", "-t", table, "-S"], capture_output=True, text=True, timeout=30
        )
        for line in result.stdout.splitlines():
            if line.startswith("-N "):
                chains.add(f"{table}/{line.split()[1]}")
    return chains


def _remove_chains(chains: set[str]) -> None:
    """Delete the chains netavark made during this test, and the jumps into them."""
    for table in sorted({entry.split("/", 1)[0] for entry in chains}):
        names = {entry.split("/", 1)[1] for entry in chains if entry.startswith(f"{table}/")}
        rules = subprocess.run(
            ["iptables", "-t", table, "-S"], capture_output=True, text=True, timeout=30
        ).stdout.splitlines()
        for rule in rules:  # a jump from a chain that was there before (FORWARD, PREROUTING)
            tokens = shlex.split(rule)
            jumps_to = tokens[tokens.index("-j") + 1] if "-j" in tokens[:-1] else None
            if tokens[0] == "-A" and tokens[1] not in names and jumps_to in names:
                subprocess.run(["iptables", "-t", table, "-D", *tokens[1:]], timeout=30)
        for verb in ("-F", "-X"):  # empty them all, then delete them all
            for name in sorted(names):
                subprocess.run(["iptables", "-t", table, verb, name], timeout=30)


@pytest.fixture(scope="module")
def engine():
    """Stand-in bases imported and the image built, in podman storage of the test's own."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="dataproc-podman-", dir="/var/tmp"))
    chains_before = _iptables_chains() if shutil.which("iptables") else set()
    engine = Engine(root, _write_podman_config(root), _podman_compose() or "")
    try:
        started = time.monotonic()
        engine.run("bash", str(STANDINS), timeout=900)
        stood_in = time.monotonic() - started
        engine.podman(
            *("build", "--format", "docker", "--network", "host", "--pull=never"),
            *("-t", IMAGE, "-f", str(REPO / "Containerfile"), str(REPO)),
            timeout=900,
        )
        print(
            f"\ncontainer: stand-ins {stood_in:.0f} s, image built in "
            f"{time.monotonic() - started - stood_in:.0f} s"
        )
        yield engine
    finally:
        engine.podman("system", "reset", "--force", check=False, timeout=300)
        subprocess.run(["umount", "-R", str(root / "graph")], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
        if shutil.which("iptables"):
            made = {c for c in _iptables_chains() - chains_before if "NETAVARK" in c.upper()}
            _remove_chains(made)


# --- the image ------------------------------------------------------------------------------


def test_the_image_keeps_its_healthcheck_runs_as_10001_and_has_no_build_leftovers(engine):
    image = engine.inspect(IMAGE)[0]
    assert "/healthz" in " ".join(image["Healthcheck"]["Test"])  # the docker format kept it
    assert image["Config"]["User"] == "10001:10001"
    listing = engine.podman(
        *("run", "--rm", "--network", "none", IMAGE, "python", "-c"),
        "import dataproc, os, shutil, sys; print(sys.prefix, dataproc.__file__, "
        "[p for p in ('/src', '/wheels', '/opt/dataproc/bin/pip') if os.path.exists(p)], "
        "shutil.which('gcc'), os.getuid())",
    ).stdout.split(" ", 2)
    assert listing[0] == "/opt/dataproc"
    assert listing[1].startswith("/opt/dataproc/lib/")  # installed, not a source tree
    assert listing[2].strip() == "[] None 10001"  # no sources, wheels, venv pip or compiler


def test_the_oci_format_would_drop_the_healthcheck(engine):
    # Why the README says `--format docker`: the same build (from the cache) in podman's
    # default format has no health check.
    engine.podman(
        *("build", "--format", "oci", "--network", "host", "--pull=never"),
        *("-t", "localhost/dataproc:oci", "-f", str(REPO / "Containerfile"), str(REPO)),
        timeout=900,
    )
    assert not engine.inspect("localhost/dataproc:oci")[0].get("Healthcheck")
    engine.podman("rmi", "localhost/dataproc:oci")


def test_the_image_adds_at_most_25_mb_over_its_base(engine):
    added = engine.inspect(IMAGE)[0]["Size"] - engine.inspect(BASE)[0]["Size"]
    print(f"\ncontainer: the image adds {added / 1e6:.1f} MB over its base")
    assert 0 < added <= 25e6


# --- the compose stack ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    """compose.yaml run by podman-compose under a project name of the test's own."""

    engine: Engine
    directory: Path
    project: str
    port: int

    def compose(self, *args: str, timeout: float = 180, check: bool = True):
        return self.engine.run(
            self.engine.compose,
            "-p",
            self.project,
            *args,
            cwd=self.directory,
            timeout=timeout,
            check=check,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def container(self, service: str) -> str:
        """The name of the service's container (podman-compose labels it as docker does)."""
        names = self.containers(service)
        assert len(names) == 1, (service, names)
        return names[0]

    def containers(self, service: str | None = None) -> list[str]:
        labels = [f"label=com.docker.compose.project={self.project}"]
        labels += [f"label=com.docker.compose.service={service}"] if service else []
        filters = [arg for label in labels for arg in ("--filter", label)]
        return self.engine.podman("ps", "-a", *filters, "--format", "{{.Names}}").stdout.split()

    def request(self, method: str, path: str, *, token=None, form=None, body=None):
        """(status, decoded JSON or text) of one request to the published port."""
        data, headers = None, {}
        if form is not None:
            data = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                status, text = reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def wait_ready(self, timeout_s: float = 120) -> float:
        """Seconds until /readyz first answers 200."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as reply:
                    if reply.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        logs = self.compose("logs", check=False).stdout[-4000:]
        raise AssertionError(f"/readyz did not answer 200 in {timeout_s} s\n{logs}")

    def up(self) -> float:
        """`compose up -d`; seconds from its start to the first 200 on /readyz."""
        started = time.monotonic()
        self.compose("up", "-d")
        self.wait_ready()
        return time.monotonic() - started


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory):
    """The stack up, as a new user starts it: compose.yaml beside a .env from .env.example."""
    directory = tmp_path_factory.mktemp("compose")
    shutil.copy(REPO / "compose.yaml", directory / "compose.yaml")
    keys = {"JWT_SECRET_KEY": uuid.uuid4().hex * 2, "JWT_REFRESH_SECRET_KEY": uuid.uuid4().hex * 2}
    lines = []
    for line in (REPO / ".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        if name in keys:
            line = f"{name}={keys[name]}"
        elif name == "POSTGRES_PASSWORD":
            line = f"POSTGRES_PASSWORD={uuid.uuid4().hex}"
        lines.append(line)
    (directory / ".env").write_text("\n".join(lines) + "\n")
    port = _free_port()
    engine.env["DATAPROC_PUBLISHED_PORT"] = str(port)
    stack = Stack(engine, directory, f"dataproc-test-{uuid.uuid4().hex[:8]}", port)
    try:
        seconds = stack.up()
        print(f"\ncontainer: `compose up` to the first 200 on /readyz: {seconds:.1f} s")
        yield stack
    finally:
        stack.compose("down", "-v", check=False, timeout=300)
        names = stack.containers()  # what `down` left behind, if anything, by name
        if names:
            engine.podman("rm", "--force", "--ignore", *names, check=False)


def _token(stack: Stack, username: str, password: str) -> str:
    status, body = stack.request(
        "POST", "/auth/login", form={"username": username, "password": password}
    )
    assert status == 200, body
    return body["access_token"]


@pytest.fixture(scope="module")
def walkthrough(stack) -> dict:
    """The README walkthrough, step by step, against the stack; every answer is kept."""
    steps = {}
    steps["signup"] = stack.request(
        "POST", "/auth/signup", body={"username": "alice", "password": "correct horse"}
    )
    admin = _token(stack, "admin", "admin")
    steps["populate"] = stack.request("GET", "/api/populate", token=admin)
    steps["populate5"] = stack.request("GET", "/api/populate?count=5", token=admin)
    steps["admin_read"] = stack.request("GET", "/api/data?limit=10", token=admin)
    alice = _token(stack, "alice", "correct horse")
    steps["alice_read"] = stack.request("GET", "/api/data?limit=10", token=alice)
    steps["alice_populate"] = stack.request("GET", "/api/populate", token=alice)
    steps["admin"] = admin
    return steps


def test_the_readme_walkthrough_works_against_the_stack(walkthrough):
    assert walkthrough["signup"] == (201, {"username": "alice", "role": "user"})
    status, one = walkthrough["populate"]
    assert status == 200 and isinstance(one["id"], int), one  # from the `source` service
    status, five = walkthrough["populate5"]
    assert status == 200, five
    assert len(five["stored"]) + five["duplicates"] + len(five["rejected"]) == 5, five
    status, admin_page = walkthrough["admin_read"]
    assert status == 200, admin_page
    stored = [one["id"]] + [point["id"] for point in five["stored"]]
    assert sorted(point["id"] for point in admin_page) == sorted(stored)  # valid and invalid
    status, alice_page = walkthrough["alice_read"]
    assert status == 200 and all(point["valid"] for point in alice_page), alice_page
    assert [p["id"] for p in alice_page] == [p["id"] for p in admin_page if p["valid"]]
    assert walkthrough["alice_populate"][0] == 403


def test_the_health_checks_run_and_turn_healthy(stack, walkthrough):
    # No systemd here to schedule podman's checks: run each configured check now, as the timer
    # would, and read the state podman records from it.
    for service in ("dataproc", "postgres", "source"):
        result = stack.engine.podman("healthcheck", "run", stack.container(service), check=False)
        assert result.returncode == 0, (service, result.stdout, result.stderr)
        health = stack.engine.inspect(stack.container(service))[0]["State"]["Health"]
        assert health["Status"] == "healthy", (service, health)


def test_the_service_started_once_without_waiting_for_compose(stack, walkthrough):
    # podman-compose on podman 4 ignores `condition: service_healthy`: the service waited for
    # its database itself, and was never restarted on the way.
    state = stack.engine.inspect(stack.container("dataproc"))[0]
    assert state["RestartCount"] == 0 and state["State"]["Running"], state["State"]
    assert "cannot connect" not in stack.compose("logs", "dataproc").stdout


def _point_ids(stack: Stack) -> list[int]:
    stack.wait_ready()
    token = _token(stack, "admin", "admin")
    status, page = stack.request("GET", "/api/data?limit=100", token=token)
    assert status == 200, page
    return [point["id"] for point in page]


def test_compose_stop_ends_the_service_with_status_0_within_its_grace(stack, walkthrough):
    started = time.monotonic()
    result = stack.compose("stop", timeout=STOP_GRACE_S + 60)
    print(f"\ncontainer: `compose stop` took {time.monotonic() - started:.1f} s")
    assert result.returncode == 0, result.stderr
    for service in ("dataproc", "source", "postgres"):  # 137 would be a SIGKILL at the grace
        state = stack.engine.inspect(stack.container(service))[0]["State"]
        assert not state["Running"] and state["ExitCode"] == 0, (service, state)
    assert "stopped" in stack.compose("logs", "dataproc").stdout  # it drained, then said so
    stack.compose("start")
    assert walkthrough["populate"][1]["id"] in _point_ids(stack)


def test_the_data_survives_compose_restart(stack, walkthrough):
    stack.compose("restart")
    assert walkthrough["populate"][1]["id"] in _point_ids(stack)


def test_the_data_survives_down_and_up(stack, walkthrough):
    stack.compose("down")
    assert stack.containers() == []
    stack.up()
    assert walkthrough["populate"][1]["id"] in _point_ids(stack)


def test_down_v_removes_the_data(stack, walkthrough):
    stack.compose("down", "-v")
    volumes = stack.engine.podman("volume", "ls", "-q").stdout.split()
    assert not [v for v in volumes if v.startswith(stack.project)], volumes
    stack.up()
    assert _point_ids(stack) == []  # a new database: the schema, the admin, no points
