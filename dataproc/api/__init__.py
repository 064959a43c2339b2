"""The endpoints of API.md as plain functions `handler(request, ctx) -> Response`, one module
per concern, and `build_router(ctx)` that binds them.

Owns: each handler, the validation of its parameters and bodies (422 naming each bad one),
the keyset cursor of `/api/data`, the mapping of ingestion failures to 502/503/504. Leaves
sockets to `server`, tokens and passwords to `auth`, fetching to `ingest`, and every SQL
statement to `store`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ApiError
from ..web import Request, Response, Router
from . import accounts, data, export, ingestion, service, sessions, summary, users
from .context import Context
from .params import decode_cursor, encode_cursor, parse_data_query

__all__ = [
    "ROUTES",
    "Context",
    "build_router",
    "decode_cursor",
    "encode_cursor",
    "parse_data_query",
]

Handler = Callable[[Request, Context], Response]
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    *accounts.ROUTES,
    *sessions.ROUTES,
    *users.ROUTES,
    *data.ROUTES,
    *summary.ROUTES,
    *export.ROUTES,
    *ingestion.ROUTES,
    *service.ROUTES,
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
        if handler is service.prometheus_metrics and (
            ctx.metrics is None or not ctx.config.metrics_enabled
        ):
            continue  # switched off: /metrics does not exist (404)
        if path.startswith("/auth/"):
            handler = _never_cached(handler)
        router.add(method, path, _bound(handler, ctx))
    return router


def _bound(handler: Handler, ctx: Context) -> Callable[[Request], Response]:
    """`handler` with `ctx` filled in: what the router calls with a request."""

    def serve(request: Request) -> Response:
        return handler(request, ctx)

    return serve
