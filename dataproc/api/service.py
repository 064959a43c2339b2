"""Service endpoints: health, readiness, metrics, the OpenAPI document, `/docs`, `/view` and `/`."""

from __future__ import annotations

from functools import cache
from importlib import resources

from .. import openapi, store
from ..errors import ApiError
from ..metrics import CONTENT_TYPE as METRICS_TYPE
from ..web import Request, Response
from .context import Context


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


@cache
def view_html() -> bytes:
    """The `/view` page, read once from the package data."""
    return resources.files("dataproc.static").joinpath("view.html").read_bytes()


def view(request: Request, ctx: Context) -> Response:
    """GET /view: the self-contained chart page (the same strict policy as /docs)."""
    return Response(200, view_html(), dict(DOCS_HEADERS))


def root(request: Request, ctx: Context) -> Response:
    """GET /: a temporary redirect to the chart page, /view."""
    return Response(307, b"", {"Location": "/view"})


def prometheus_metrics(request: Request, ctx: Context) -> Response:
    """GET /metrics: Prometheus text (format 0.0.4), the pool read at scrape time."""
    if ctx.metrics is None:
        raise ApiError(404, "Not Found")
    text = ctx.metrics.render(store.pool_stats(ctx.pool))
    return Response(200, text, {"Content-Type": METRICS_TYPE, "Cache-Control": "no-store"})


ROUTES = (
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", prometheus_metrics),
    ("GET", "/openapi.json", openapi_json),
    ("GET", "/docs", docs),
    ("GET", "/view", view),
    ("GET", "/", root),
)
