"""Populate end to end: the real service against the real simulated upstream in each fault mode.

For every fault: the status API.md names (502, 503, 504), a detail that says why, no data point
stored, the rejects table holding whatever was received verbatim, and a normal fetch that
still works afterwards. Then the known answers of the processing rules.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from dataproc import store
from dataproc.upstream import simulated
from support import Client

TEN_YEARS_S = 10 * 365 * 86400
README_VALUE = -0.19938130676746368


def doc_url(upstream, document: str | bytes) -> str:
    """The simulated upstream's /fixed URL answering exactly `document`."""
    text = document.decode() if isinstance(document, bytes) else document
    return f"{upstream[1]}fixed?doc={quote(text, safe='')}"


def rows(pool, sql: str, params=()) -> list[tuple]:
    with store.connection(pool) as conn:
        return conn.execute(sql, params).fetchall()


def point_count(pool) -> int:
    return rows(pool, "SELECT count(*) FROM data_points")[0][0]


def rejects(pool) -> list[tuple[str, bytes]]:
    return [
        (reason, bytes(body))
        for reason, body in rows(pool, "SELECT reason, body FROM rejects ORDER BY id")
    ]


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connecting to it is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    sock.close()


@pytest.fixture
def populate_from(service_factory, admin_token):
    """Populate through a service whose upstream is `url` (with config overrides)."""

    def call(url: str | None, path: str = "/api/populate", **overrides):
        service = service_factory(upstream_url=url, **overrides)
        client = Client(service.url)
        try:
            return client.get(path, token=admin_token)
        finally:
            client.close()

    return call


def assert_normal_fetch_works(client, admin_token) -> None:
    """The service with the normal upstream still stores a point."""
    reply = client.get("/api/populate", token=admin_token)
    assert reply.status == 200, reply.body
    assert set(reply.json()) == {"id", "time", "value", "valid", "tags"}


# --- failures: status, detail, nothing stored, what was received kept ------------------------

BAD_DOCUMENTS = {
    "NaN literal": ('{"time": 1713798477, "value": NaN, "tags": []}', "NaN"),
    "value as a string": ('{"time": 1713798477, "value": "7", "tags": []}', "value"),
    "value byte 256": ('{"time": 1713798477, "value": [256, 42, 76, 190], "tags": []}', "value"),
    "value of 3 items": ('{"time": 1713798477, "value": [157, 42, 76], "tags": []}', "value"),
    "value of 5 items": (
        '{"time": 1713798477, "value": [157, 42, 76, 190, 1], "tags": []}',
        "value",
    ),
    "value byte -1": ('{"time": 1713798477, "value": [-1, 42, 76, 190], "tags": []}', "value"),
    "value byte 1.5": ('{"time": 1713798477, "value": [1.5, 42, 76, 190], "tags": []}', "value"),
    "value byte true": ('{"time": 1713798477, "value": [true, 42, 76, 190], "tags": []}', "value"),
    "time bool": ('{"time": true, "value": [157, 42, 76, 190], "tags": []}', "time"),
    "time negative": ('{"time": -5, "value": [157, 42, 76, 190], "tags": []}', "time"),
    "time missing": ('{"value": [157, 42, 76, 190], "tags": []}', "time"),
    "time out of range": ('{"time": 1e20, "value": [157, 42, 76, 190], "tags": []}', "time"),
    "time without offset": (
        '{"time": "2024-04-22T15:07:57", "value": [157, 42, 76, 190], "tags": []}',
        "time",
    ),
    "33 tags": (
        '{"time": 1713798477, "value": [157, 42, 76, 190], "tags": ' + json.dumps(["t"] * 33) + "}",
        "tags",
    ),
    "tags not a list": (
        '{"time": 1713798477, "value": [157, 42, 76, 190], "tags": "system"}',
        "tags",
    ),
    "tag over 64 chars": (
        '{"time": 1713798477, "value": [157, 42, 76, 190], "tags": ["%s"]}' % ("t" * 65),
        "tags",
    ),
    "a JSON array": ("[1713798477, [157, 42, 76, 190]]", "object"),
}


@pytest.mark.parametrize("document, word", BAD_DOCUMENTS.values(), ids=BAD_DOCUMENTS.keys())
def test_an_invalid_document_is_502_kept_verbatim_and_not_stored(
    populate_from, upstream, clean_db, client, admin_token, document, word
):
    reply = populate_from(doc_url(upstream, document))
    assert reply.status == 502
    detail = reply.json()["detail"]
    assert "invalid document" in detail and word in detail, detail
    assert point_count(clean_db) == 0
    [(reason, body)] = rejects(clean_db)
    assert body == document.encode() and word in reason
    assert_normal_fetch_works(client, admin_token)


FAULTS = {
    # name: (path, overrides, status, words in the detail, the body kept in rejects or None)
    "garbage": ("garbage", {}, 502, ("invalid document", "not JSON"), simulated.GARBAGE_BODY),
    "html": ("html", {}, 502, ("invalid document", "not JSON"), simulated.HTML_BODY),
    "status 500": ("status/500", {}, 502, ("HTTP 500",), b'{"detail": "simulated failure"}'),
    "status 404": ("status/404", {}, 502, ("HTTP 404",), b'{"detail": "simulated failure"}'),
    "dropped mid-answer": ("drop", {}, 502, ("closed the connection",), None),
    "connection reset": ("reset", {}, 502, ("upstream",), None),
    "too slow": ("slow?delay=2", {"upstream_timeout_s": 0.3}, 504, ("0.3 s",), None),
}


@pytest.mark.parametrize("path, overrides, status, words, kept", FAULTS.values(), ids=FAULTS.keys())
def test_an_upstream_fault_gets_its_status_and_stores_no_point(
    populate_from, upstream, clean_db, client, admin_token, path, overrides, status, words, kept
):
    started = time.monotonic()
    reply = populate_from(upstream[1] + path, **overrides)
    elapsed = time.monotonic() - started
    assert reply.status == status, reply.body
    detail = reply.json()["detail"]
    assert all(word in detail for word in words), detail
    assert point_count(clean_db) == 0
    if kept is None:
        assert rejects(clean_db) == []
    else:
        assert [body for _, body in rejects(clean_db)] == [kept]
    if status == 504:
        assert elapsed < 1.5  # the timeout is the service's, not the upstream's 2 s
    assert_normal_fetch_works(client, admin_token)


def test_an_oversized_answer_is_502_with_its_first_bytes_kept(
    populate_from, upstream, clean_db, client, admin_token
):
    reply = populate_from(upstream[1] + "huge?bytes=70000")
    assert reply.status == 502
    assert "over 65536 bytes" in reply.json()["detail"]
    assert point_count(clean_db) == 0
    [(reason, body)] = rejects(clean_db)
    assert "65536" in reason
    # What was read is kept as received: the document's head, then its padding.
    assert len(body) == 65537 and body.startswith(b'{"time": ')
    assert body.endswith(b"x" * 1000) and body.count(b"x") > 65000
    assert_normal_fetch_works(client, admin_token)


def test_a_refused_upstream_is_502(populate_from, refused_url, clean_db, client, admin_token):
    reply = populate_from(refused_url)
    assert reply.status == 502
    assert "unreachable" in reply.json()["detail"]
    assert point_count(clean_db) == 0 and rejects(clean_db) == []
    assert_normal_fetch_works(client, admin_token)


def test_no_upstream_configured_is_503(populate_from, clean_db):
    reply = populate_from(None)
    assert reply.status == 503
    assert "no upstream configured" in reply.json()["detail"]
    assert point_count(clean_db) == 0 and rejects(clean_db) == []


def test_a_batch_that_fails_before_storing_anything_is_the_single_failure(
    populate_from, refused_url, clean_db
):
    reply = populate_from(refused_url, "/api/populate?count=3")
    assert reply.status == 502 and point_count(clean_db) == 0


def test_a_batch_of_invalid_documents_lists_each_rejection(populate_from, upstream, clean_db):
    reply = populate_from(upstream[1] + "garbage", "/api/populate?count=2")
    assert reply.status == 200, reply.body
    batch = reply.json()
    assert batch["stored"] == [] and batch["duplicates"] == 0
    assert len(batch["rejected"]) == 2 and all("not JSON" in r["reason"] for r in batch["rejected"])
    assert point_count(clean_db) == 0 and len(rejects(clean_db)) == 2


# --- known answers --------------------------------------------------------------------------


def test_the_readme_document_decodes_to_the_known_answer_and_is_too_old(populate_from, upstream):
    reply = populate_from(upstream[1] + "fixed")
    assert reply.status == 200, reply.body
    point = reply.json()
    assert point["value"] == README_VALUE and point["time"] == "2024-04-22T15:07:57Z"
    assert point["valid"] is False and point["tags"] == ["too old"]


def test_the_readme_document_is_valid_when_the_maximum_age_allows_it(
    populate_from, upstream, clean_db
):
    reply = populate_from(upstream[1] + "fixed", max_age_s=TEN_YEARS_S)
    point = reply.json()
    assert (point["value"], point["valid"], point["tags"]) == (README_VALUE, True, [])
    [(value, valid, tags, document)] = rows(
        clean_db, "SELECT value, valid, tags, source_document FROM data_points"
    )
    assert (value, valid, tags) == (README_VALUE, True, [])
    assert document.encode() == simulated.FIXED_DOCUMENT  # the upstream's answer, verbatim


def test_an_invalid_tag_makes_the_point_invalid(populate_from, upstream):
    document = json.dumps(
        {"time": int(time.time()), "value": [157, 42, 76, 190], "tags": ["system"]}
    )
    point = populate_from(doc_url(upstream, document)).json()
    assert point["valid"] is False and point["tags"] == ["system"]


def test_a_recent_point_without_invalid_tags_is_valid(populate_from, upstream):
    document = json.dumps(
        {"time": int(time.time()), "value": [157, 42, 76, 190], "tags": ["calibrated"]}
    )
    point = populate_from(doc_url(upstream, document)).json()
    assert point["valid"] is True and point["tags"] == ["calibrated"]


def test_the_invalid_tag_set_is_configurable(populate_from, upstream):
    document = json.dumps(
        {"time": int(time.time()), "value": [157, 42, 76, 190], "tags": ["system"]}
    )
    point = populate_from(doc_url(upstream, document), invalid_tags=("broken",)).json()
    assert point["valid"] is True


def test_an_old_point_is_invalid_and_tagged_too_old(populate_from, upstream):
    point = populate_from(upstream[1] + "old?age=7200").json()
    assert point["valid"] is False and point["tags"][-1] == "too old"


@pytest.mark.parametrize(
    "kind, stored", [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf)]
)
def test_a_non_finite_value_is_invalid_null_in_json_and_kept_in_the_database(
    populate_from, upstream, clean_db, kind, stored
):
    reply = populate_from(f"{upstream[1]}nonfinite?kind={kind}")
    assert reply.status == 200, reply.body
    point = reply.json()
    assert point["value"] is None and point["valid"] is False and point["tags"] == ["non-finite"]
    [(value,)] = rows(clean_db, "SELECT value FROM data_points WHERE id = %s", (point["id"],))
    assert math.isnan(value) if math.isnan(stored) else value == stored


def test_null_or_missing_tags_mean_no_tags(populate_from, upstream, clean_db):
    now = int(time.time())
    for document in (
        {"time": now, "value": [157, 42, 76, 190], "tags": None},
        {"time": now + 1, "value": [157, 42, 76, 190]},
    ):
        point = populate_from(doc_url(upstream, json.dumps(document))).json()
        assert point["tags"] == [] and point["valid"] is True


def test_a_float_time_keeps_its_fraction(populate_from, upstream):
    document = '{"time": 1713798477.5, "value": [157, 42, 76, 190], "tags": []}'
    assert populate_from(doc_url(upstream, document)).json()["time"] == "2024-04-22T15:07:57.5Z"


def test_an_iso_time_with_an_offset_is_read_as_utc(populate_from, upstream):
    document = '{"time": "2024-04-22T17:07:57+02:00", "value": [157, 42, 76, 190], "tags": []}'
    assert populate_from(doc_url(upstream, document)).json()["time"] == "2024-04-22T15:07:57Z"


def test_the_same_document_twice_is_stored_once(service_factory, upstream, admin_token, clean_db):
    client = Client(service_factory(upstream_url=upstream[1] + "fixed").url)
    first = client.get("/api/populate", token=admin_token)
    second = client.get("/api/populate", token=admin_token)
    assert first.status == second.status == 200
    assert first.json() == second.json()
    assert point_count(clean_db) == 1


def test_the_same_document_in_a_batch_counts_as_duplicates(
    service_factory, upstream, admin_token, clean_db
):
    client = Client(service_factory(upstream_url=upstream[1] + "fixed").url)
    batch = client.get("/api/populate?count=3", token=admin_token).json()
    assert len(batch["stored"]) == 1 and batch["duplicates"] == 2 and batch["rejected"] == []
    assert point_count(clean_db) == 1


def test_twenty_concurrent_populates_of_one_document_store_one_row(
    service_factory, upstream, admin_token, clean_db
):
    service = service_factory(upstream_url=upstream[1] + "fixed")
    replies = []
    barrier = threading.Barrier(20)

    def populate() -> None:
        client = Client(service.url, timeout=30)
        barrier.wait()
        replies.append(client.get("/api/populate", token=admin_token))
        client.close()

    threads = [threading.Thread(target=populate) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [reply.status for reply in replies] == [200] * 20, [
        r.body for r in replies if r.status != 200
    ]
    assert len({reply.json()["id"] for reply in replies}) == 1
    assert point_count(clean_db) == 1


def test_count_five_against_a_sequence_stores_five_points(populate_from, upstream, clean_db):
    reply = populate_from(upstream[1] + "sequence", "/api/populate?count=5")
    batch = reply.json()
    assert len(batch["stored"]) == 5 and batch["duplicates"] == 0 and batch["rejected"] == []
    assert len({point["time"] for point in batch["stored"]}) == 5
    assert point_count(clean_db) == 5
