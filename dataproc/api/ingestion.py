"""`/api/populate`: one ingestion run on an admin's request, its failures mapped to 502/503/504."""

from __future__ import annotations

import json

from .. import auth, ingest, rules
from ..errors import ApiError, ValidationError
from ..web import Request, Response
from .context import Context
from .params import integer_param, single_param

_FAILURE_STATUS = {"unconfigured": 503, "timeout": 504, "unreachable": 502, "invalid": 502}


def populate(request: Request, ctx: Context) -> Response:
    """GET|POST /api/populate: fetch, process and store one point (or `count` points)."""
    caller = auth.current_caller(request, ctx.config, ctx.pool, ctx.sessions, ctx.clock())
    auth.require_admin(caller)
    problems: list[dict] = []
    count = integer_param(single_param(request, "count", problems), "count", rules.COUNT, problems)
    if problems:
        raise ValidationError(problems)
    ingestor = ctx.ingestor()
    try:
        if count is None:
            return Response.raw_json(ingestor.one()[0])
        batch = ingestor.batch(count)
    except ingest.IngestFailure as failure:
        raise ApiError(_FAILURE_STATUS[failure.kind], failure.reason) from None
    finally:
        ctx.cache.wrote()  # before the answer: this replica's next read sees what it stored
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


ROUTES = (
    ("GET", "/api/populate", populate),
    ("POST", "/api/populate", populate),
)
