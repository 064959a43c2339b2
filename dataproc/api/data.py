"""`GET /api/data`: a page of points in `(time, id)` order, with a keyset `Link` to the next."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlencode

from .. import auth
from ..store import replica
from ..web import Request, Response
from .context import Context
from .params import DataQuery, encode_cursor, parse_data_query


def data(request: Request, ctx: Context) -> Response:
    """GET /api/data: a page of points; users see valid points only."""
    username = auth.access_token_subject(request, ctx.config, ctx.clock())
    query = parse_data_query(request)
    # One round trip: the store checks the user and its role in the same statement (with a
    # read standby, two: the role on the primary, the page on the standby).
    assert ctx.reads is not None  # Context makes it
    page = replica.list_points(
        ctx.reads,
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
    params: dict[str, str] = {
        name: request.query[name][0] for name in ("start", "end") if name in request.query
    }
    params.update(limit=str(query.limit), after=encode_cursor(last))
    return f"{request.path}?{urlencode(params)}"


ROUTES = (("GET", "/api/data", data),)
