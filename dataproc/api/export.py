"""`GET /api/data/export`: every point the caller can see in a window, in `(time, id)` order,
streamed as CSV (RFC 4180) or NDJSON with no limit.

Owns: choosing the format (`format=`, else `Accept`), the per-process bound on concurrent
exports (past it a 503 with `Retry-After`), and the attachment headers. Every parameter is
checked before the first byte, so a bad one is a plain 422; the rows come from
`store.export`, on a connection of the export's own, and the server frames the stream.
"""

from __future__ import annotations

from psycopg_pool import ConnectionPool

from .. import auth, store
from ..errors import ApiError, ValidationError, problem
from ..store.export import Export
from ..web import Request, Response
from .context import Context
from .params import parse_window, single_param

FORMATS = {
    "csv": ("text/csv; charset=utf-8", "data_points.csv"),
    "ndjson": ("application/x-ndjson", "data_points.ndjson"),
}
MEDIA_TYPES = {"text/csv": "csv", "application/x-ndjson": "ndjson"}
RETRY_AFTER_S = "5"  # an export slot frees when one finishes: a guess, not a promise


def export(request: Request, ctx: Context) -> Response:
    """GET /api/data/export: the window as a stream of CSV or NDJSON lines."""
    username = auth.access_token_subject(request, ctx.config, ctx.sessions, ctx.clock())
    problems: list[dict] = []
    start, end = parse_window(request, problems)
    fmt = _format(request, problems)
    if problems:
        raise ValidationError(problems)
    role = store.user_role(ctx.pool, username)
    if role is None:
        raise auth.user_gone()

    def start_on(pool: ConnectionPool) -> Export:
        # On the read standby first when there is one (a third of the wait), else the primary.
        if not ctx.exports.acquire(blocking=False):
            raise ApiError(
                503, "too many exports in progress, retry shortly", {"Retry-After": RETRY_AFTER_S}
            )
        wait_s = ctx.config.db_wait_s / (3 if pool is not ctx.pool else 1)
        return Export(
            store.conninfo_of(pool),
            fmt,
            start=start,
            end=end,
            everything=role == "admin",
            connect_timeout_s=wait_s,
            release=ctx.exports.release,
        ).start()  # releases the slot itself when it cannot start

    assert ctx.reads is not None  # Context makes it
    lines = ctx.reads.run(start_on)
    content_type, filename = FORMATS[fmt]
    headers = {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Cache-Control": "no-store",
    }
    return Response.streamed(lines, content_type, headers)


def _format(request: Request, problems: list[dict]) -> str:
    """`format=` when given (else a 422), else the best of `Accept`, else NDJSON."""
    given = single_param(request, "format", problems)
    if given is not None:
        if given not in FORMATS:
            problems.append(problem("query", "format", "Input should be 'csv' or 'ndjson'", "enum"))
        return given if given in FORMATS else "ndjson"
    return _from_accept(request.header("accept") or "")


def _from_accept(accept: str) -> str:
    """The supported media type with the highest q in an `Accept` header (RFC 9110 §12.5.1);
    ties go to the one listed first, and nothing acceptable means NDJSON."""
    best, best_q = "ndjson", 0.0
    for item in accept.split(",")[:32]:
        media, _, params = item.strip().partition(";")
        fmt = MEDIA_TYPES.get(media.strip().lower())
        if fmt is not None and (q := _quality(params)) > best_q:
            best, best_q = fmt, q
    return best


def _quality(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0


ROUTES = (("GET", "/api/data/export", export),)
