"""The wheel: built from pyproject.toml, installed the way the Containerfile installs it, run
with no source tree on the path.

`pip wheel --wheel-dir W .` builds dataproc and collects the wheels of its run-time
dependencies; a fresh venv installs `dataproc` from W alone (`--no-index`), as the image's
final stage does. The installed package must carry schema.sql and the docs page, and
`python -m dataproc serve`, started from an empty directory, must answer /healthz and /readyz
on the test database. Needs the package index (the build backend and the dependencies are
downloaded); without it the test is skipped, not failed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

import pytest

from support.replicas import REPO, Replica, replica_env

BUILD_CONTEXT = ("pyproject.toml", "README.md", "schema.sql", "dataproc")
# What pip prints when it cannot reach an index: the environment's fault, not the package's.
_OFFLINE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ProxyError",
    "ConnectTimeoutError",
    "No matching distribution found for setuptools",
)


def _pip(python: Path | str, *args: str, timeout_s: float = 240) -> None:
    result = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if any(marker in output for marker in _OFFLINE):
            pytest.skip("no package index reachable: " + output.strip().splitlines()[-1])
        raise AssertionError(f"pip {' '.join(args)} failed:\n{output}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with dataproc installed from its wheel; returns the venv's python."""
    root = tmp_path_factory.mktemp("wheel")
    source, wheels = root / "src", root / "wheels"
    # What the Containerfile copies into its build stage, and nothing else; building from a
    # copy also keeps build/ and *.egg-info out of the working tree.
    for name in BUILD_CONTEXT:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name,
                source / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(REPO / name, source / name)
    _pip(sys.executable, "wheel", "--wheel-dir", str(wheels), str(source))
    assert len(list(wheels.glob("dataproc-*.whl"))) == 1
    venv.create(root / "venv", with_pip=True, symlinks=True)
    python = root / "venv" / "bin" / "python"
    _pip(python, "install", "--no-index", "--find-links", str(wheels), "dataproc")
    return python


def _package_files(python: Path, tmp_path: Path) -> dict:
    probe = (
        "import json, dataproc; from importlib import resources; root = resources.files('dataproc'); "
        "print(json.dumps({'file': dataproc.__file__, "
        "'schema': root.joinpath('schema.sql').read_text(), "
        "'docs': root.joinpath('static', 'docs.html').read_text()}))"
    )
    result = subprocess.run(
        [str(python), "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_installed_package_carries_schema_sql_and_the_docs_page(installed, tmp_path):
    files = _package_files(installed, tmp_path)
    assert Path(files["file"]).is_relative_to(installed.parent.parent)  # not this source tree
    assert files["schema"] == (REPO / "schema.sql").read_text()
    assert files["docs"] == (REPO / "dataproc" / "static" / "docs.html").read_text()


def test_the_installed_service_starts_outside_the_source_tree_and_is_ready(
    installed, tmp_path, database_url, clean_db
):
    replica = Replica(
        [], replica_env(database_url, None), tmp_path, python=str(installed), pythonpath=False
    )
    try:
        url = replica.url()
        for path in ("healthz", "readyz"):
            with urllib.request.urlopen(url + path, timeout=5) as reply:
                assert reply.status == 200
    finally:
        assert replica.stop() == 0, replica.log()


def test_the_wheel_is_built_from_exactly_what_the_containerfile_copies():
    copied = []
    for line in (REPO / "Containerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied += line.split()[1:-1]
    assert sorted(copied) == sorted(BUILD_CONTEXT)
