"""`GET /api/data`: a page of points in `(time, id)` order, with a keyset `Link` to the next,
served through the read cache with its `ETag`/304 (`cached`)."""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlencode

from .. import auth
from ..cache import Answer
from ..store import replica
from ..web import Request, Response
from .cached import cached_read
from .context import Context
from .params import DataQuery, encode_cursor, parse_data_query


def data(request: Request, ctx: Context) -> Response:
    """GET /api/data: a page of points; users see valid points only."""
    # 401 before 422
    username = auth.access_token_subject(request, ctx.config, ctx.sessions, ctx.clock())
    query = parse_data_query(request)
    # The raw start/end too: the Link header repeats them as the client wrote them.
    raw = tuple(
        request.query[name][0] if name in request.query else None for name in ("start", "end")
    )
    key = (query.start, query.end, query.after, query.skip, query.limit, raw)

    def compute(viewer: str) -> Answer:
        # One round trip: the store checks the user and its role, and reads the data version,
        # in the same statement (one snapshot). With a read standby, two: the role on the
        # primary, the page and its version on the standby.
        assert ctx.reads is not None  # Context makes it
        page = replica.list_points(
            ctx.reads,
            viewer=viewer,
            start=query.start,
            end=query.end,
            after=query.after,
            skip=query.skip,
            limit=query.limit,
        )
        if page is None:
            return Answer(None, 0, b"")
        headers = {}
        if page.count == query.limit and page.last is not None:
            headers["Link"] = f'<{_next_url(request, query, page.last)}>; rel="next"'
        return Answer(page.role, page.version, page.json, headers)

    return cached_read(request, ctx, key, compute, username=username)


def _next_url(request: Request, query: DataQuery, last: tuple[datetime, int]) -> str:
    params: dict[str, str] = {
        name: request.query[name][0] for name in ("start", "end") if name in request.query
    }
    params.update(limit=str(query.limit), after=encode_cursor(last))
    return f"{request.path}?{urlencode(params)}"


ROUTES = (("GET", "/api/data", data),)
