"""Prometheus metrics in the text exposition format 0.0.4, kept in this process.

Owns: the counters and the histogram (requests by route template, method and status; request
durations by route; populate outcomes), and rendering them with the process start time, the
build version and the database pool gauges handed in at scrape time. Leaves to `server` the
call after each response (`observe`), to `ingest` the naming of outcomes (`outcome`), and to
`api` serving the text at `/metrics`. A leaf: it imports no other `dataproc` module.

Labels come only from fixed sets (route templates, known methods, status codes), never from
what a client typed: a path no route matched is `route="(unmatched)"`, an unknown method is
`method="OTHER"`, so no client can grow the label space.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Mapping
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UNMATCHED = "(unmatched)"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTCOMES = ("stored", "duplicate", "rejected", "upstream_error", "timeout", "unconfigured")
POOL_STATES = ("size", "in_use", "waiting")
RETENTION_KINDS = ("points", "rejects", "partitions")  # what a retention run removes


class _Histogram:
    """Per-bucket counts (not cumulative: one increment per observation), their sum and count."""

    __slots__ = ("counts", "total", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last slot is +Inf only
        self.total = 0.0
        self.count = 0


class Metrics:
    """Thread-safe counters of one process; `observe` and `outcome` cost a lock and a dict update."""

    def __init__(self, version: str, *, start_time: float | None = None):
        self.version = version
        self.start_time = time.time() if start_time is None else start_time
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = {}
        self._durations: dict[str, _Histogram] = {}
        self._outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._retention: dict[str, int] = dict.fromkeys(RETENTION_KINDS, 0)
        self._retention_runs = 0

    def observe(self, request: Any, response: Any, duration_s: float) -> None:
        """Count one answered request (the server's observer: request, response, seconds)."""
        route = request.route or UNMATCHED
        method = request.method if request.method in METHODS else "OTHER"
        index = bisect.bisect_left(BUCKETS, duration_s)  # `le` is inclusive: 0.001 lands in 0.001
        with self._lock:
            key = (route, method, response.status)
            self._requests[key] = self._requests.get(key, 0) + 1
            histogram = self._durations.get(route)
            if histogram is None:
                histogram = self._durations[route] = _Histogram()
            histogram.counts[index] += 1
            histogram.total += duration_s
            histogram.count += 1

    def outcome(self, name: str) -> None:
        """Count one populate outcome (`stored`, `duplicate`, `rejected`, `upstream_error`, ...)."""
        with self._lock:
            self._outcomes[name] = self._outcomes.get(name, 0) + 1

    def retention(self, removed: Mapping[str, int]) -> None:
        """Count one retention run in this process and what it removed, by `RETENTION_KINDS`."""
        with self._lock:
            self._retention_runs += 1
            for kind in RETENTION_KINDS:
                self._retention[kind] += int(removed.get(kind, 0))

    def render(self, pool_stats: Mapping[str, int] | None = None) -> bytes:
        """The exposition text; `pool_stats` (size, in_use, waiting) is read by the caller now."""
        with self._lock:  # copy under the lock, format outside it
            requests = sorted(self._requests.items())
            durations = sorted(
                (route, list(h.counts), h.total, h.count) for route, h in self._durations.items()
            )
            outcomes = sorted(self._outcomes.items())
            retention, runs = sorted(self._retention.items()), self._retention_runs
        lines = _requests_lines(requests) + _duration_lines(durations) + _outcome_lines(outcomes)
        lines += _retention_lines(retention, runs)
        if pool_stats is not None:
            lines += _pool_lines(pool_stats)
        lines += [
            "# HELP process_start_time_seconds Start time of the process since the Unix epoch in seconds.",
            "# TYPE process_start_time_seconds gauge",
            f"process_start_time_seconds {_number(self.start_time)}",
            "# HELP dataproc_build_info The running version of dataproc (always 1).",
            "# TYPE dataproc_build_info gauge",
            f"dataproc_build_info{_labels(version=self.version)} 1",
        ]
        return ("\n".join(lines) + "\n").encode("utf-8")


def _requests_lines(requests: list) -> list[str]:
    lines = [
        "# HELP dataproc_http_requests_total HTTP requests answered, by route template, "
        "method and status.",
        "# TYPE dataproc_http_requests_total counter",
    ]
    for (route, method, status), value in requests:
        lines.append(
            f"dataproc_http_requests_total{_labels(route=route, method=method, status=status)}"
            f" {value}"
        )
    return lines


def _duration_lines(durations: list) -> list[str]:
    name = "dataproc_http_request_duration_seconds"
    lines = [
        f"# HELP {name} Time from the request line read to the response written, by route.",
        f"# TYPE {name} histogram",
    ]
    for route, counts, total, count in durations:
        cumulative = 0
        bounds = [*map(_number, BUCKETS), "+Inf"]
        for le, bucket_count in zip(bounds, counts, strict=True):
            cumulative += bucket_count
            lines.append(f"{name}_bucket{_labels(route=route, le=le)} {cumulative}")
        lines.append(f"{name}_sum{_labels(route=route)} {_number(total)}")
        lines.append(f"{name}_count{_labels(route=route)} {count}")
    return lines


def _outcome_lines(outcomes: list) -> list[str]:
    lines = [
        "# HELP dataproc_populate_outcomes_total Results of fetching one upstream document.",
        "# TYPE dataproc_populate_outcomes_total counter",
    ]
    lines += [
        f"dataproc_populate_outcomes_total{_labels(outcome=name)} {value}"
        for name, value in outcomes
    ]
    return lines


def _retention_lines(removed: list, runs: int) -> list[str]:
    return [
        "# HELP dataproc_retention_runs_total Retention runs (DATAPROC_RETENTION) of this process.",
        "# TYPE dataproc_retention_runs_total counter",
        f"dataproc_retention_runs_total {runs}",
        "# HELP dataproc_retention_removed_total What retention removed: points, rejects, "
        "whole partitions.",
        "# TYPE dataproc_retention_removed_total counter",
        *(f"dataproc_retention_removed_total{_labels(kind=k)} {v}" for k, v in removed),
    ]


def _pool_lines(stats: Mapping[str, int]) -> list[str]:
    lines = [
        "# HELP dataproc_db_pool_connections Database pool connections by state, at scrape time.",
        "# TYPE dataproc_db_pool_connections gauge",
    ]
    lines += [
        f"dataproc_db_pool_connections{_labels(state=state)} {int(stats.get(state, 0))}"
        for state in POOL_STATES
    ]
    return lines


def _labels(**labels: object) -> str:
    body = ",".join(f'{name}="{_escape(str(value))}"' for name, value in labels.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    # The 0.0.4 format escapes exactly these three in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value))  # shortest round-tripping form: "0.001", "10.0", "1716.25"
