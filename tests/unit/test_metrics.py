"""`/metrics`: Prometheus text format 0.0.4, scraped before and after real traffic.

A tiny parser below reads the exposition (comments, samples, escaped label values); the tests
check that counters move by exactly the requests made, that client paths never become labels,
that populate outcomes are counted for each kind of result against the simulated upstream's
fault modes, and that the endpoint can be switched off.
"""

from __future__ import annotations

import re
import time

import pytest

import dataproc
from dataproc.metrics import BUCKETS, Metrics
from support import Client, create_user, login

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples keyed by (name, labels) and each family's TYPE; any malformed line fails."""
    samples: Samples = {}
    types: dict[str, str] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            types[family] = kind
            continue
        if line.startswith("#") or not line:
            continue
        match = SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = {}
        if labels:
            body = labels[1:-1]
            position = 0
            for label in LABEL.finditer(body):
                assert label.start() == position, f"bad labels in {line!r}"
                pairs[label[1]] = re.sub(
                    r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], label[2]
                )
                position = label.end()
            assert position == len(body), f"bad labels in {line!r}"
        key = (name, frozenset(pairs.items()))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    return samples, types


def scrape(client: Client) -> Samples:
    reply = client.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == CONTENT_TYPE
    return parse(reply.body.decode("utf-8"))[0]


def value(samples: Samples, name: str, **labels) -> float:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def requests_total(samples: Samples, route: str, method: str, status: int) -> float:
    return value(samples, "dataproc_http_requests_total", route=route, method=method, status=status)


def test_metrics_is_text_format_0_0_4_with_a_type_for_every_family(client):
    client.get("/healthz")
    reply = client.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == CONTENT_TYPE
    samples, types = parse(reply.body.decode("utf-8"))
    assert types["dataproc_http_requests_total"] == "counter"
    assert types["dataproc_http_request_duration_seconds"] == "histogram"
    assert types["dataproc_populate_outcomes_total"] == "counter"
    assert types["dataproc_db_pool_connections"] == "gauge"
    assert types["process_start_time_seconds"] == "gauge"
    for name, _ in samples:
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"{name} has no TYPE line"


def test_request_counter_moves_by_route_template_and_status(client):
    before = scrape(client)
    for _ in range(3):
        assert client.get("/healthz").status == 200
    for _ in range(2):
        assert client.get("/api/data?limit=5").status == 401
    assert client.post("/healthz").status == 405
    after = scrape(client)
    assert (
        requests_total(after, "/healthz", "GET", 200)
        - requests_total(before, "/healthz", "GET", 200)
        == 3
    )
    assert (
        requests_total(after, "/api/data", "GET", 401)
        - requests_total(before, "/api/data", "GET", 401)
        == 2
    )
    # A 405 matched no route (method and path): it counts as unmatched, like a 404.
    assert (
        requests_total(after, "(unmatched)", "POST", 405)
        - requests_total(before, "(unmatched)", "POST", 405)
    ) == 1
    # The first scrape itself was counted before the second one rendered.
    assert requests_total(after, "/metrics", "GET", 200) >= 1


def test_paths_and_methods_from_clients_never_become_labels(client):
    before = scrape(client)
    assert client.get("/no/such/path-4f2a9c").status == 404
    assert client.request("FROBNICATE", "/healthz").status == 405
    reply = client.get("/metrics")
    after = parse(reply.body.decode())[0]
    assert b"path-4f2a9c" not in reply.body and b"FROBNICATE" not in reply.body
    assert (
        requests_total(after, "(unmatched)", "GET", 404)
        - requests_total(before, "(unmatched)", "GET", 404)
    ) == 1
    assert (
        requests_total(after, "(unmatched)", "OTHER", 405)
        - requests_total(before, "(unmatched)", "OTHER", 405)
    ) == 1


def test_duration_histogram_is_cumulative_and_counts_each_request(client):
    before = scrape(client)
    for _ in range(4):
        client.get("/healthz")
    after = scrape(client)
    name = "dataproc_http_request_duration_seconds"
    count = value(after, name + "_count", route="/healthz")
    assert count - value(before, name + "_count", route="/healthz") == 4
    buckets = [value(after, name + "_bucket", route="/healthz", le=repr(b)) for b in BUCKETS]
    buckets.append(value(after, name + "_bucket", route="/healthz", le="+Inf"))
    assert buckets == sorted(buckets), "buckets must be cumulative"
    assert buckets[-1] == count
    assert 0 < value(after, name + "_sum", route="/healthz") < count * 10


def test_pool_gauges_start_time_and_build_info_are_exposed(client):
    samples = scrape(client)
    size = value(samples, "dataproc_db_pool_connections", state="size")
    in_use = value(samples, "dataproc_db_pool_connections", state="in_use")
    waiting = value(samples, "dataproc_db_pool_connections", state="waiting")
    assert size >= 1 and 0 <= in_use <= size and waiting >= 0
    started = value(samples, "process_start_time_seconds")
    assert time.time() - 600 < started <= time.time()
    assert value(samples, "dataproc_build_info", version=dataproc.__version__) == 1


@pytest.mark.parametrize(
    ("upstream_path", "overrides", "outcome", "status"),
    [
        ("/", {}, "stored", 200),
        ("/garbage", {}, "rejected", 502),
        ("/status/500", {}, "upstream_error", 502),
        ("/slow?delay=2", {"upstream_timeout_s": 0.2}, "timeout", 504),
        (None, {}, "unconfigured", 503),
    ],
)
def test_populate_outcomes_are_counted_by_kind(
    service_factory, upstream, clean_db, upstream_path, overrides, outcome, status
):
    url = upstream[1].rstrip("/") + upstream_path if upstream_path else None
    service = service_factory(upstream_url=url, **overrides)
    client = Client(service.url)
    create_user(clean_db, "root", "root-password", "admin")
    token = login(client, "root", "root-password")["access_token"]
    before = scrape(client)
    assert client.get("/api/populate", token=token).status == status
    after = scrape(client)
    for kind in ("stored", "duplicate", "rejected", "upstream_error", "timeout", "unconfigured"):
        moved = value(after, "dataproc_populate_outcomes_total", outcome=kind) - value(
            before, "dataproc_populate_outcomes_total", outcome=kind
        )
        assert moved == (1 if kind == outcome else 0), kind
    client.close()


def test_the_same_upstream_document_twice_counts_stored_then_duplicate(
    service_factory, upstream, clean_db
):
    service = service_factory(upstream_url=upstream[1].rstrip("/") + "/fixed")
    client = Client(service.url)
    create_user(clean_db, "root", "root-password", "admin")
    token = login(client, "root", "root-password")["access_token"]
    reply = client.get("/api/populate?count=2", token=token)
    assert reply.status == 200 and reply.json()["duplicates"] == 1
    samples = scrape(client)
    assert value(samples, "dataproc_populate_outcomes_total", outcome="stored") == 1
    assert value(samples, "dataproc_populate_outcomes_total", outcome="duplicate") == 1
    client.close()


def test_metrics_switched_off_is_a_404_and_the_rest_still_serves(service_factory):
    service = service_factory(metrics_enabled=False)
    client = Client(service.url)
    assert client.get("/metrics").status == 404
    assert client.get("/healthz").status == 200
    assert service.metrics is None
    client.close()


# --- the renderer, with literal inputs ------------------------------------------------------


class _Seen:
    def __init__(self, method: str, route: str, status: int = 200):
        self.method, self.route, self.status = method, route, status


def test_render_puts_a_boundary_duration_in_its_own_bucket_and_escapes_label_values():
    metrics = Metrics('1.0 "quoted" \\ back\nslash', start_time=1700000000.5)
    metrics.observe(_Seen("GET", "/healthz"), _Seen("GET", "", 200), 0.001)
    metrics.observe(_Seen("GET", "/healthz"), _Seen("GET", "", 200), 20.0)
    samples, _ = parse(metrics.render({"size": 4, "in_use": 1, "waiting": 0}).decode())
    name = "dataproc_http_request_duration_seconds_bucket"
    assert value(samples, name, route="/healthz", le="0.001") == 1
    assert value(samples, name, route="/healthz", le="10.0") == 1
    assert value(samples, name, route="/healthz", le="+Inf") == 2
    assert value(samples, "process_start_time_seconds") == 1700000000.5
    assert value(samples, "dataproc_build_info", version='1.0 "quoted" \\ back\nslash') == 1
    assert value(samples, "dataproc_db_pool_connections", state="size") == 4
