"""HTTP as data: `Request`, `Response`, the `Router`, and the one place errors become JSON.

Owns: matching a method and path to a handler (404, 405 with `Allow`, HEAD served by GET),
building JSON, streamed and 304 responses, reading request bodies (JSON through
`strictjson`, or form) strictly, and turning an `ApiError` into FastAPI's error shapes. Leaves
to `protocol.py` the bytes on the wire (`Content-Length` is computed there, never by hand), to
`server.py` every socket, and to `api/` every route.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from . import strictjson
from .errors import ApiError, invalid

log = logging.getLogger("dataproc.web")

JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"


@dataclass(slots=True)
class Request:
    """One parsed request. Header names are lower-case; each maps to all its values."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]
    body: bytes = b""
    client: str = ""
    request_id: str = ""
    route: str = ""  # the route template the router matched ("" when none did)

    def header(self, name: str) -> str | None:
        """The single value of a header; a duplicated header is a 400 (sharp edge 15)."""
        values = self.headers.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise ApiError(400, f"duplicate {name} header")
        return values[0]


@dataclass(slots=True)
class Response:
    """Status, headers and either the body bytes, built once, or a `stream` of byte chunks.

    A streamed response has an empty `body`; the server sends it chunked (HTTP/1.1) or ended
    by the close (HTTP/1.0), and closes the iterator when the client goes away, on HEAD, and
    at the end (so a generator's `finally` can cancel its query)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False  # ask the server to close the connection after this response
    stream: Iterator[bytes] | None = None

    def __post_init__(self) -> None:
        if self.stream is not None and self.body:
            raise ValueError("a streamed response has no body bytes")

    @classmethod
    def json(
        cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        """Serialise `payload` as compact JSON (NaN and Infinity refused: they are not JSON)."""
        body = json.dumps(payload, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        return cls.raw_json(body.encode(), status, headers)

    @classmethod
    def raw_json(
        cls, body: bytes, status: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        """A response whose JSON body is already bytes (e.g. built by PostgreSQL)."""
        return cls(status, body, {"Content-Type": JSON_TYPE, **(headers or {})})

    @classmethod
    def streamed(
        cls,
        chunks: Iterable[bytes],
        content_type: str,
        headers: dict[str, str] | None = None,
        status: int = 200,
    ) -> Response:
        """A body sent as `chunks` are produced. An exception before the first non-empty
        chunk is answered as a handler's would be (an `ApiError` as its JSON); after it, the
        transfer ends without its last chunk, so the client sees a truncated body."""
        return cls(
            status, b"", {"Content-Type": content_type, **(headers or {})}, stream=iter(chunks)
        )

    @classmethod
    def not_modified(cls, etag: str, headers: dict[str, str] | None = None) -> Response:
        """`304 Not Modified` (RFC 9110 §15.4.5): the `ETag` and the given headers (pass
        `Cache-Control` and `Vary` as the 200 has them), no body; the server adds
        `X-Request-ID` and `Date`."""
        return cls(304, b"", {**(headers or {}), "ETag": etag})


def error_response(error: ApiError) -> Response:
    """The contract's JSON for an `ApiError`: `{"detail": ...}` with its headers."""
    response = Response.json({"detail": error.detail}, error.status, error.headers)
    response.close = error.close
    return response


Handler = Callable[[Request], Response]


class Router:
    """Paths to handlers per method; GET implies HEAD. A path segment `{name}` in a template
    matches any one non-empty segment (`path_param` reads it); static paths win."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}
        self._templates: list[tuple[str, ...]] = []  # the templated paths, split at "/"

    def add(self, method: str, path: str, handler: Handler) -> None:
        """Serve `method path` with `handler`."""
        if "{" in path and path not in self._routes:
            self._templates.append(tuple(path.split("/")))
        methods = self._routes.setdefault(path, {})
        methods[method] = handler
        if method == "GET":
            methods.setdefault("HEAD", handler)

    def routes(self) -> dict[str, tuple[str, ...]]:
        """Each path with its methods (HEAD left implicit), for the OpenAPI consistency test."""
        return {
            path: tuple(m for m in methods if m != "HEAD") for path, methods in self._routes.items()
        }

    def match(self, method: str, path: str) -> tuple[Handler, str]:
        """The handler and route template for a request, or an `ApiError` 404/405."""
        template = path if path in self._routes else self._template_of(path)
        if template is None:
            raise ApiError(404, "Not Found")
        methods = self._routes[template]
        handler = methods.get(method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            raise ApiError(405, "Method Not Allowed", {"Allow": allow})
        return handler, template

    def _template_of(self, path: str) -> str | None:
        segments = path.split("/")
        for template in self._templates:
            if _segments_match(template, segments):
                return "/".join(template)
        return None


def _segments_match(template: tuple[str, ...], segments: list[str]) -> bool:
    if len(template) != len(segments):
        return False
    return all(
        (part.startswith("{") and part.endswith("}") and value) or part == value
        for part, value in zip(template, segments, strict=True)
    )


def path_param(request: Request, name: str) -> str:
    """The value of `{name}` in the route the request matched (the path is already unquoted)."""
    for part, value in zip(request.route.split("/"), request.path.split("/"), strict=False):
        if part == "{" + name + "}":
            return value
    raise KeyError(name)


def make_app(router: Router) -> Handler:
    """The callable the server runs: route, call, and turn any error into JSON."""

    def app(request: Request) -> Response:
        try:
            handler, request.route = router.match(request.method, request.path)
            return handler(request)
        except ApiError as error:
            return error_response(error)
        except Exception:
            # Example 2 of DESIGN.md: log the traceback, answer a fixed body.
            log.exception(
                "unhandled error in %s %s [%s]",
                request.method,
                request.route or "-",
                request.request_id,
            )
            return error_response(ApiError(500, "Internal Server Error"))

    return app


# --- request bodies -----------------------------------------------------------------------


def read_body(request: Request, *, max_fields: int) -> dict[str, Any]:
    """The body as a dict: JSON object or form fields; 415 for other types, 422 if malformed."""
    media_type = (request.header("content-type") or "").split(";")[0].strip().lower()
    if not request.body and not media_type:
        return {}
    if media_type == JSON_TYPE or media_type.endswith("+json"):
        try:
            payload = strictjson.loads(request.body)
        except strictjson.InvalidJSON as error:
            raise invalid("body", "body", f"invalid JSON: {error}", "json_invalid") from None
        if not isinstance(payload, dict):
            raise invalid("body", "body", "expected a JSON object", "model_attributes_type")
        return payload
    if media_type == FORM_TYPE:
        return _read_form(request.body, max_fields)
    raise ApiError(
        415, f"unsupported Content-Type {media_type or '(none)'}; send {JSON_TYPE} or {FORM_TYPE}"
    )


def _read_form(body: bytes, max_fields: int) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
        fields = parse_qs(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            max_num_fields=max_fields,
            errors="strict",
        )
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid("body", "body", f"invalid form body: {error}", "value_error") from None
    for name, values in fields.items():
        if len(values) > 1:
            raise invalid("body", name, "given more than once", "value_error")
    return {name: values[0] for name, values in fields.items()}
