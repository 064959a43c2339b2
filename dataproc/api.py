"""The endpoints of API.md as plain functions `handler(request, ctx) -> Response`.

Owns: each handler, the validation of its parameters and bodies (422 naming each bad one),
the keyset cursor of `/api/data`, the mapping of ingestion failures to 502/503/504, and
`build_router(ctx)`. Leaves sockets to `server`, tokens and passwords to `auth`, fetching to
`ingest`, and every SQL statement to `store`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlencode

from psycopg_pool import ConnectionPool

from . import auth, ingest, openapi, rfc3339, store
from .config import Config
from .errors import ApiError, ValidationError, problem
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import Metrics
from .web import Request, Response, Router, read_body

USERNAME = re.compile(r"[A-Za-z0-9._@-]{3,64}")
INTEGER = re.compile(r"[+-]?[0-9]{1,19}")  # not \d: it matches "１" and other non-ASCII digits
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_SKIP = 1_000_000_000


@dataclass
class Context:
    """What handlers need: configuration, the pool, the upstream, and the login guards."""

    config: Config
    pool: ConnectionPool
    upstream_url: str | None
    clock: Callable[[], float] = time.time
    on_outcome: Callable[[str], None] | None = None
    metrics: Metrics | None = None  # served at /metrics; None (or DATAPROC_METRICS=false): 404
    throttle: auth.LoginThrottle = field(init=False)
    checker: auth.PasswordChecker = field(init=False)

    def __post_init__(self) -> None:
        self.throttle = auth.LoginThrottle(
            self.config.login_max_failures, self.config.login_window_s
        )
        self.checker = auth.PasswordChecker(self.config)

    def ingestor(self) -> ingest.Ingestor:
        """An ingestor for the configured upstream."""
        return ingest.Ingestor(
            self.config, self.pool, self.upstream_url, clock=self.clock, on_outcome=self.on_outcome
        )


# --- /auth ----------------------------------------------------------------------------------


def _body(request: Request, ctx: Context) -> dict[str, Any]:
    return read_body(request, max_fields=ctx.config.max_query_params)


def _string_fields(
    body: dict[str, Any], names: tuple[str, ...]
) -> tuple[dict[str, str], list[dict]]:
    values, problems = {}, []
    for name in names:
        value = body.get(name)
        if value is None:
            problems.append(problem("body", name, "Field required", "missing"))
        elif not isinstance(value, str):
            problems.append(problem("body", name, "Input should be a valid string", "string_type"))
        else:
            values[name] = value
    return values, problems


def signup(request: Request, ctx: Context) -> Response:
    """POST /auth/signup: create a user (never an admin)."""
    values, problems = _string_fields(_body(request, ctx), ("username", "password"))
    if "username" in values and not USERNAME.fullmatch(values["username"]):
        problems.append(
            problem(
                "body",
                "username",
                "3 to 64 characters from A-Z a-z 0-9 . _ @ -",
                "string_pattern_mismatch",
            )
        )
    if "password" in values:
        size, minimum = len(values["password"].encode()), ctx.config.password_min_bytes
        if not minimum <= size <= 72:
            problems.append(
                problem(
                    "body",
                    "password",
                    f"must be {minimum} to 72 bytes of UTF-8",
                    "string_too_short" if size < minimum else "string_too_long",
                )
            )
    if problems:
        raise ValidationError(problems)
    username = values["username"]
    if store.get_user(ctx.pool, username) is None:  # spare a bcrypt hash for a taken name
        hashed = ctx.checker.hash(values["password"])
        if store.create_user(ctx.pool, username, hashed, "user"):
            return Response.json({"username": username, "role": "user"}, 201)
    raise ApiError(409, "username already taken")


def login(request: Request, ctx: Context) -> Response:
    """POST /auth/login: the OAuth2 password flow (form or JSON) to a token pair."""
    values, problems = _string_fields(_body(request, ctx), ("username", "password"))
    if problems:
        raise ValidationError(problems)
    username, now = values["username"], ctx.clock()
    ctx.throttle.check(username, request.client, now)
    user = store.get_user(ctx.pool, username) if len(username) <= 256 else None
    if not ctx.checker.verify(values["password"], user.hashed_password if user else None):
        ctx.throttle.failed(username, request.client, now)
        raise ApiError(400, "Incorrect username or password")
    ctx.throttle.succeeded(username)
    return Response.json(auth.issue_tokens(ctx.config, user.username, user.role, now))


def refresh(request: Request, ctx: Context) -> Response:
    """POST /auth/refresh: a refresh token to a new pair (the user must still exist)."""
    values, problems = _string_fields(_body(request, ctx), ("refresh_token",))
    if problems:
        raise ValidationError(problems)
    now = ctx.clock()
    caller = auth.verify_token(ctx.config, ctx.pool, values["refresh_token"], auth.REFRESH, now)
    return Response.json(auth.issue_tokens(ctx.config, caller.username, caller.role, now))


# --- /api/data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataQuery:
    start: datetime | None = None
    end: datetime | None = None
    skip: int = 0
    limit: int = 100
    after: tuple[datetime, int] | None = None


def _single(request: Request, name: str, problems: list[dict]) -> str | None:
    values = request.query.get(name)
    if values is None:
        return None
    if len(values) > 1:
        problems.append(problem("query", name, "given more than once", "value_error"))
        return None
    return values[0]


def _integer(text: str, name: str, low: int, high: int, problems: list[dict]) -> int | None:
    if not INTEGER.fullmatch(text):
        problems.append(problem("query", name, "Input should be a valid integer", "int_parsing"))
        return None
    value = int(text)
    if value < low:
        problems.append(
            problem(
                "query",
                name,
                f"Input should be greater than or equal to {low}",
                "greater_than_equal",
            )
        )
    elif value > high:
        problems.append(
            problem(
                "query", name, f"Input should be less than or equal to {high}", "less_than_equal"
            )
        )
    else:
        return value
    return None


def _datetime(text: str, name: str, problems: list[dict]) -> datetime | None:
    try:
        return rfc3339.parse(text)
    except ValueError as error:
        problems.append(
            problem("query", name, f"Input should be a valid datetime: {error}", "datetime_parsing")
        )
        return None


def parse_data_query(request: Request) -> DataQuery:
    """The validated parameters of GET /api/data (422 lists every bad one)."""
    problems: list[dict] = []
    raw = {
        name: _single(request, name, problems)
        for name in ("start", "end", "skip", "limit", "after")
    }
    values: dict[str, Any] = {}
    for name in ("start", "end"):
        if raw[name] is not None:
            values[name] = _datetime(raw[name], name, problems)
    if raw["skip"] is not None:
        values["skip"] = _integer(raw["skip"], "skip", 0, MAX_SKIP, problems)
    if raw["limit"] is not None:
        values["limit"] = _integer(raw["limit"], "limit", 1, 1000, problems)
    if raw["after"] is not None:
        values["after"] = decode_cursor(raw["after"])
        if values["after"] is None:
            problems.append(
                problem("query", "after", "not a cursor from a Link header", "value_error")
            )
    if values.get("start") and values.get("end") and values["start"] > values["end"]:
        problems.append(problem("query", "start", "start must not be after end", "value_error"))
    if problems:
        raise ValidationError(problems)
    return DataQuery(**values)


def encode_cursor(last: tuple[datetime, int]) -> str:
    """The keyset cursor after a row: its time (µs since the epoch) and id, base64url."""
    micros = (last[0] - EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}.{last[1]}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, int] | None:
    """The `(time, id)` a cursor names, or None when it is not one of ours."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    match = re.fullmatch(r"(-?\d{1,18})\.(\d{1,18})", raw)
    if not match:
        return None
    try:
        return EPOCH + timedelta(microseconds=int(match[1])), int(match[2])
    except OverflowError:
        return None


def data(request: Request, ctx: Context) -> Response:
    """GET /api/data: a page of points; users see valid points only."""
    username = auth.access_token_subject(request, ctx.config)
    query = parse_data_query(request)
    # One round trip: the store checks the user and its role in the same statement.
    page = store.list_points(
        ctx.pool,
        viewer=username,
        start=query.start,
        end=query.end,
        after=query.after,
        skip=query.skip,
        limit=query.limit,
    )
    if page is None:
        raise auth.user_gone()
    headers = {}
    if page.count == query.limit and page.last is not None:
        headers["Link"] = f'<{_next_url(request, query, page.last)}>; rel="next"'
    return Response.raw_json(page.json, 200, headers)


def _next_url(request: Request, query: DataQuery, last: tuple[datetime, int]) -> str:
    params = {name: request.query[name][0] for name in ("start", "end") if name in request.query}
    params.update(limit=str(query.limit), after=encode_cursor(last))
    return f"{request.path}?{urlencode(params)}"


# --- /api/populate --------------------------------------------------------------------------

_FAILURE_STATUS = {"unconfigured": 503, "timeout": 504, "unreachable": 502, "invalid": 502}


def populate(request: Request, ctx: Context) -> Response:
    """GET|POST /api/populate: fetch, process and store one point (or `count` points)."""
    auth.require_admin(auth.current_caller(request, ctx.config, ctx.pool))
    problems: list[dict] = []
    raw_count = _single(request, "count", problems)
    count = _integer(raw_count, "count", 1, 100, problems) if raw_count is not None else None
    if problems:
        raise ValidationError(problems)
    ingestor = ctx.ingestor()
    try:
        if count is None:
            return Response.raw_json(ingestor.one()[0])
        batch = ingestor.batch(count)
    except ingest.IngestFailure as failure:
        raise ApiError(_FAILURE_STATUS[failure.kind], failure.reason) from None
    body = (
        b'{"stored":['
        + b",".join(batch.stored)
        + b'],"duplicates":'
        + str(batch.duplicates).encode()
        + b',"rejected":'
        + json.dumps([{"reason": r} for r in batch.rejected]).encode()
        + b"}"
    )
    return Response.raw_json(body)


# --- service endpoints ----------------------------------------------------------------------


def healthz(request: Request, ctx: Context) -> Response:
    """GET /healthz: the process serves (no database access)."""
    return Response.json({"status": "ok"})


def readyz(request: Request, ctx: Context) -> Response:
    """GET /readyz: 200 when the database answers, else 503."""
    if store.ping(ctx.pool):
        return Response.json({"status": "ready"})
    raise store.DatabaseUnavailable("database unavailable")


# The docs page runs only its own inline code and talks only to this origin.
DOCS_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src data:; connect-src 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def openapi_json(request: Request, ctx: Context) -> Response:
    """GET /openapi.json: the OpenAPI 3.1 document (bytes built once)."""
    return Response.raw_json(openapi.document_bytes(), 200, {"Cache-Control": "no-cache"})


def docs(request: Request, ctx: Context) -> Response:
    """GET /docs: the self-contained interactive page."""
    return Response(200, openapi.docs_html(), dict(DOCS_HEADERS))


def root(request: Request, ctx: Context) -> Response:
    """GET /: a temporary redirect to /docs."""
    return Response(307, b"", {"Location": "/docs"})


def prometheus_metrics(request: Request, ctx: Context) -> Response:
    """GET /metrics: Prometheus text (format 0.0.4), the pool read at scrape time."""
    if ctx.metrics is None:
        raise ApiError(404, "Not Found")
    text = ctx.metrics.render(store.pool_stats(ctx.pool))
    return Response(200, text, {"Content-Type": METRICS_TYPE, "Cache-Control": "no-store"})


ROUTES: tuple[tuple[str, str, Callable[[Request, Context], Response]], ...] = (
    ("POST", "/auth/signup", signup),
    ("POST", "/auth/login", login),
    ("POST", "/auth/refresh", refresh),
    ("GET", "/api/data", data),
    ("GET", "/api/populate", populate),
    ("POST", "/api/populate", populate),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", prometheus_metrics),
    ("GET", "/openapi.json", openapi_json),
    ("GET", "/docs", docs),
    ("GET", "/", root),
)


def _never_cached(handler: Callable[..., Response]) -> Callable[..., Response]:
    """Every /auth answer, errors too (422, 429, 503), carries `Cache-Control: no-store`:
    tokens and credentials must not be cached."""

    def wrapped(request: Request, ctx: Context) -> Response:
        try:
            response = handler(request, ctx)
        except ApiError as error:
            error.headers.setdefault("Cache-Control", "no-store")
            raise
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return wrapped


def build_router(ctx: Context) -> Router:
    """Every route of API.md bound to `ctx`."""
    router = Router()
    for method, path, handler in ROUTES:
        if handler is prometheus_metrics and (
            ctx.metrics is None or not ctx.config.metrics_enabled
        ):
            continue  # switched off: /metrics does not exist (404)
        if path.startswith("/auth/"):
            handler = _never_cached(handler)
        router.add(method, path, partial(handler, ctx=ctx))
    return router
