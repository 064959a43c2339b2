"""`GET /api/data/summary`: the visible points in epoch-aligned time buckets.

Owns: the `bucket` parameter (`30s`, `5m`, `1h`, `1d` or integer seconds, 1 s to 31 d), the
default bucket (the smallest listed size giving at most 500 buckets), the 10,000-bucket cap,
the window as used (a missing bound is the first / last visible point's time) and the JSON
shape. The query, and where each piece of the window is read from (rollups or raw rows), is
`store.rollups`'.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from .. import auth
from ..cache import Answer
from ..errors import ValidationError, problem
from ..store import rollups
from ..web import Request, Response
from .cached import cached_read
from .context import Context
from .params import parse_window, single_param

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
BUCKET = re.compile(r"([0-9]{1,8})([smhd]?)")  # ASCII digits only, as INTEGER in params
MIN_BUCKET_S, MAX_BUCKET_S = 1, 31 * 86400
DEFAULT_SIZES = tuple(
    n * UNITS[u]
    for n, u in (
        (1, "s"),
        (5, "s"),
        (10, "s"),
        (30, "s"),
        (1, "m"),
        (5, "m"),
        (10, "m"),
        (30, "m"),
        (1, "h"),
        (3, "h"),
        (6, "h"),
        (12, "h"),
        (1, "d"),
        (7, "d"),
    )
)
DEFAULT_MAX_BUCKETS = 500
MAX_BUCKETS = 10_000


@dataclass(frozen=True)
class SummaryQuery:
    start: datetime | None = None
    end: datetime | None = None
    bucket_s: int | None = None


def parse_bucket(text: str, problems: list[dict]) -> int | None:
    """`30s`, `5m`, `1h`, `1d` or integer seconds as seconds (1 s to 31 d), else a problem."""
    match = BUCKET.fullmatch(text)
    if match is None:
        problems.append(
            problem(
                "query",
                "bucket",
                "Input should be a bucket size like 30s, 5m, 1h, 1d or integer seconds",
                "value_error",
            )
        )
        return None
    seconds = int(match[1]) * UNITS[match[2]]
    if not MIN_BUCKET_S <= seconds <= MAX_BUCKET_S:
        problems.append(problem("query", "bucket", "must be from 1 s to 31 d", "value_error"))
        return None
    return seconds


def parse_summary_query(request: Request) -> SummaryQuery:
    """The validated parameters of GET /api/data/summary (422 lists every bad one)."""
    problems: list[dict] = []
    start, end = parse_window(request, problems)
    values: dict = {"start": start, "end": end}
    if (bucket := single_param(request, "bucket", problems)) is not None:
        values["bucket_s"] = parse_bucket(bucket, problems)
    if problems:
        raise ValidationError(problems)
    return SummaryQuery(**values)


def bucket_count(start: datetime, end: datetime, bucket_s: int) -> int:
    """How many epoch-aligned buckets of `bucket_s` the window `start..end` touches."""
    width = bucket_s * 1_000_000
    return rollups.to_micros(end) // width - rollups.to_micros(start) // width + 1


def choose_bucket(start: datetime, end: datetime, requested: int | None) -> int:
    """The bucket size to use: the requested one, else the smallest listed size giving at
    most 500 buckets (7 d when none does); more than 10,000 buckets is a 422 on `bucket`."""
    size = requested
    if size is None:
        fits = (s for s in DEFAULT_SIZES if bucket_count(start, end, s) <= DEFAULT_MAX_BUCKETS)
        size = next(fits, DEFAULT_SIZES[-1])
    count = bucket_count(start, end, size)
    if count > MAX_BUCKETS:
        raise ValidationError(
            [
                problem(
                    "query",
                    "bucket",
                    f"the window holds {count} buckets of {label(size)}; at most {MAX_BUCKETS}: "
                    "give a larger bucket or a shorter window",
                    "value_error",
                )
            ]
        )
    return size


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with `Z`, a fraction only when not zero (as every point's time)."""
    utc = moment.astimezone(UTC)
    text = utc.replace(tzinfo=None, microsecond=0).isoformat()
    return text + (f".{utc.microsecond:06d}".rstrip("0") if utc.microsecond else "") + "Z"


def label(bucket_s: int) -> str:
    """A bucket size in its largest whole unit: 90 -> `90s`, 3600 -> `1h`."""
    for unit in ("d", "h", "m"):
        if bucket_s % UNITS[unit] == 0:
            return f"{bucket_s // UNITS[unit]}{unit}"
    return f"{bucket_s}s"


def _window(
    ctx: Context, username: str, query: SummaryQuery
) -> tuple[str | None, int | None, datetime | None, datetime | None]:
    """(role, version, start, end): the window as used. A missing bound is the first / last
    visible point's time inside the other one; with no visible point there, the other bound
    (or None when both miss). Role and version come from that read (None when none was
    needed)."""
    if query.start is not None and query.end is not None:
        return None, None, query.start, query.end
    role, version, first, last = rollups.visible_span(
        ctx.pool, username, query.start, query.end, reads=ctx.reads
    )
    start = query.start or first or query.end
    end = query.end or last or query.start
    return role, version, start, end


def _compute(ctx: Context, query: SummaryQuery, username: str) -> Answer:
    """The summary read from the database, with the role and data version it was read at.
    When the window's bounds came from an earlier statement, the older of the two versions
    is the answer's: a write between them then makes the answer stale at once."""
    role, span_version, start, end = _window(ctx, username, query)
    if start is None or end is None:  # no visible point and no bound: nothing to bucket
        body = _body(None, None, query.bucket_s or DEFAULT_SIZES[0], b"[]")
        return Answer(role, span_version or 0, body)
    size = choose_bucket(start, end, query.bucket_s)
    role, buckets, _, version = rollups.summarize(
        ctx.pool, username, start, end, size, reads=ctx.reads
    )
    if span_version is not None:
        version = min(version, span_version)
    return Answer(role, version, _body(start, end, size, buckets))


def summary(request: Request, ctx: Context) -> Response:
    """GET /api/data/summary: non-empty epoch-aligned buckets of the visible points, with
    the read cache, `ETag` and 304 of `/api/data`."""
    username = auth.access_token_subject(request, ctx.config, ctx.sessions, ctx.clock())
    query = parse_summary_query(request)
    key = (query.start, query.end, query.bucket_s)
    return cached_read(
        request, ctx, key, lambda user: _compute(ctx, query, user), username=username
    )


def _body(start: datetime | None, end: datetime | None, size: int, buckets: bytes) -> bytes:
    """The answer, its buckets' JSON passed through as PostgreSQL built it."""
    head = {
        "start": format_time(start) if start else None,
        "end": format_time(end) if end else None,
        "bucket": label(size),
        "bucket_s": size,
    }
    return json.dumps(head, separators=(",", ":")).encode()[:-1] + b',"buckets":' + buckets + b"}"


ROUTES = (("GET", "/api/data/summary", summary),)
