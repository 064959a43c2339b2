"""The Postman collection (`tests/dataproc.postman_collection.json`, the original service's,
updated) runs under newman against the real service and every one of its tests passes.

newman is a Node.js tool: `npm install --global newman` (or set DATAPROC_NEWMAN to its
executable). Without it this test is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

COLLECTION = Path(__file__).with_name("dataproc.postman_collection.json")


def find_newman() -> str | None:
    configured = os.environ.get("DATAPROC_NEWMAN")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("newman")


def test_collection_is_the_originals_requests_with_a_chained_token():
    collection = json.loads(COLLECTION.read_text())
    names = [item["name"] for item in collection["item"]]
    assert {"POST LOGIN", "POST SIGNUP", "GET DATA", "GET POPULATE"} <= set(names)
    assert names.index("POST LOGIN") == 0
    assert collection["auth"]["bearer"][0]["value"] == "{{token}}"
    login = collection["item"][0]
    assert any(
        "collectionVariables.set('token'" in line
        for event in login["event"]
        for line in event["script"]["exec"]
    )
    defaults = {v["key"]: v["value"] for v in collection["variable"]}
    assert defaults["baseUrl"] == "http://localhost:8080"


def test_postman_collection_passes_under_newman(service, tmp_path):
    newman = find_newman()
    if newman is None:
        pytest.skip("newman not installed (npm install --global newman, or set DATAPROC_NEWMAN)")
    report = tmp_path / "report.json"
    # The collection logs in as the default admin (admin/admin), which a clean database has.
    result = subprocess.run(
        [
            newman,
            "run",
            str(COLLECTION),
            "--env-var",
            f"baseUrl={service.url.rstrip('/')}",
            "--reporters",
            "cli,json",
            "--reporter-json-export",
            str(report),
            "--color",
            "off",
            "--timeout-request",
            "15000",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    run = json.loads(report.read_text())["run"]
    assert run["stats"]["requests"]["total"] == 15
    assert run["stats"]["assertions"]["failed"] == 0
    assert run["stats"]["assertions"]["total"] == 15
