"""Errors a handler raises to answer a client: the status, the `detail` and extra headers.

Owns: the exception types. Leaves to `web.error_response` the one place where they become the
contract's JSON (FastAPI's shapes); this module knows neither sockets nor JSON.
"""

from __future__ import annotations


class ApiError(Exception):
    """An answer other than success: `status`, `detail` (str, or a list for 422), `headers`."""

    def __init__(
        self,
        status: int,
        detail: str | list[dict],
        headers: dict[str, str] | None = None,
        *,
        close: bool = False,
    ):
        super().__init__(detail if isinstance(detail, str) else f"{len(detail)} problem(s)")
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})
        self.close = close  # the connection cannot be reused (e.g. an unread body)


class ValidationError(ApiError):
    """422 with one `{"loc", "msg", "type"}` entry per problem, as FastAPI reports them."""

    def __init__(self, problems: list[dict]):
        super().__init__(422, problems)


def problem(where: str, name: str, msg: str, kind: str = "value_error") -> dict:
    """One 422 entry; `where` is "query", "body" or "header"."""
    return {"loc": [where, name], "msg": msg, "type": kind}


def invalid(where: str, name: str, msg: str, kind: str = "value_error") -> ValidationError:
    """A 422 naming a single field or parameter."""
    return ValidationError([problem(where, name, msg, kind)])


class Unauthorized(ApiError):
    """401 with `WWW-Authenticate: Bearer`, and `error="invalid_token"` when one was rejected."""

    def __init__(self, detail: str, *, token_sent: bool):
        challenge = 'Bearer error="invalid_token"' if token_sent else "Bearer"
        super().__init__(401, detail, {"WWW-Authenticate": challenge})


def retry_later(status: int, detail: str, retry_after_s: float) -> ApiError:
    """A 429 or 503 with `Retry-After` in whole seconds (at least 1)."""
    return ApiError(status, detail, {"Retry-After": str(max(1, int(retry_after_s + 0.999)))})
