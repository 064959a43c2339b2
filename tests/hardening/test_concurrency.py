"""Hardening: concurrent readers and writers, and one service living through every upstream
fault in a row. (Fifty concurrent signups and twenty concurrent populates of one document are
in test_api.py and test_populate.py; each upstream fault's own status is in test_populate.py.)
"""

from __future__ import annotations

import math
import re
import socket
import threading
import time
from urllib.parse import quote

from dataproc import api
from dataproc.server import HttpServer
from dataproc.web import make_app
from support import Client, create_user, login, make_config

RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


def assert_whole_point(point: dict) -> None:
    """Every field of a data point present, typed and consistent."""
    assert set(point) == {"id", "time", "value", "valid", "tags"}, point
    assert isinstance(point["id"], int) and RFC3339_Z.fullmatch(point["time"]), point
    assert isinstance(point["valid"], bool) and isinstance(point["tags"], list), point
    assert all(isinstance(tag, str) for tag in point["tags"]), point
    if point["value"] is None:
        assert "non-finite" in point["tags"] and point["valid"] is False, point
    else:
        # A JSON number (PostgreSQL writes a whole float without ".0"), never a bool or string.
        assert type(point["value"]) in (int, float) and math.isfinite(point["value"]), point
    if {"system", "suspect"} & set(point["tags"]):
        assert point["valid"] is False, point


def test_readers_concurrent_with_writers_never_see_a_half_written_point(service, client, clean_db):
    create_user(clean_db, "root", "root-password", "admin")
    create_user(clean_db, "reader", "reader-password")
    admin = login(client, "root", "root-password")["access_token"]
    user = login(client, "reader", "reader-password")["access_token"]
    writing, seen, errors = threading.Event(), {}, []
    writing.set()

    def write() -> None:
        writer = Client(service.url, timeout=30)
        for _ in range(5):
            reply = writer.get("/api/populate?count=8", token=admin)
            if reply.status != 200:
                errors.append(reply.body)

    def read(token: str, admin_view: bool) -> None:
        reader = Client(service.url)
        while writing.is_set():
            reply = reader.get("/api/data?limit=1000", token=token)
            if reply.status != 200:
                errors.append(reply.body)
                continue
            try:
                for point in reply.json():
                    assert_whole_point(point)
                    assert admin_view or point["valid"] is True
                    assert seen.setdefault(point["id"], point) == point  # never changes once seen
            except AssertionError as error:  # report it from the test thread, not this one
                errors.append(str(error))
                return

    readers = [
        threading.Thread(target=read, args=(token, token is admin))
        for token in (admin, user, admin)
    ]
    writers = [threading.Thread(target=write) for _ in range(3)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join(60)
    writing.clear()
    for thread in readers:
        thread.join(10)
    assert errors == []
    final = client.get("/api/data?limit=1000", token=admin).json()
    print(
        f"\nreaders vs writers: {len(final)} points written, {len(seen)} seen while being written"
    )
    assert len(final) >= 100 and len(seen) >= 50
    assert all(seen[p["id"]] == p for p in final if p["id"] in seen)


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there now


def test_one_service_survives_every_upstream_fault_in_a_row_and_fetches_normally_after_each(
    database_url, clean_db, upstream
):
    base = upstream[1]
    faults = {
        "refused": (_refused_url(), 502),
        "slow": (base + "slow?delay=1", 504),
        "garbage": (base + "garbage", 502),
        "html": (base + "html", 502),
        "oversized": (base + "huge?bytes=70000", 502),
        "status 500": (base + "status/500", 502),
        "status 503": (base + "status/503", 502),
        "dropped": (base + "drop", 502),
        "reset": (base + "reset", 502),
        "NaN literal": (
            base + "fixed?doc=" + quote('{"time": 1713798477, "value": NaN, "tags": []}'),
            502,
        ),
        "wrong types": (base + "fixed?doc=" + quote('{"time": "x", "value": "7", "tags": 3}'), 502),
        "five bytes": (
            base + "fixed?doc=" + quote('{"time": 1713798477, "value": [1,2,3,4,5]}'),
            502,
        ),
        "NUL in a tag": (
            base
            + "fixed?doc="
            + quote('{"time": 1713798477, "value": [1,2,3,4], "tags": ["a\\u0000b"]}'),
            502,
        ),
    }
    config = make_config(database_url, upstream_timeout_s=0.3)
    ctx = api.Context(config.replace(upstream_url=base), clean_db)
    server = HttpServer(config, make_app(api.build_router(ctx)))
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    ).start()
    try:
        client = Client(f"http://127.0.0.1:{server.port}/", timeout=10)
        create_user(clean_db, "root", "root-password", "admin")
        token = login(client, "root", "root-password")["access_token"]
        outcomes = {}
        for name, (url, status) in faults.items():
            ctx.config = config.replace(upstream_url=url)
            started = time.monotonic()
            reply = client.get("/api/populate", token=token)
            outcomes[name] = reply.status
            assert reply.status == status, (name, reply.body)
            assert isinstance(reply.json()["detail"], str) and time.monotonic() - started < 2
            ctx.config = config.replace(upstream_url=base)
            normal = client.get("/api/populate", token=token)
            assert normal.status == 200, (name, normal.body)
            assert_whole_point(normal.json())
        print(f"\nupstream faults in a row on one service: {outcomes}, a normal fetch after each")
        points = client.get("/api/data?limit=1000", token=token).json()
        assert len(points) == len(faults)  # one per normal fetch, none from a fault
    finally:
        server.drain(1)
