"""The OpenAPI 3.1 document of the service, as plain data, and the `/docs` page that renders it.

Owns: `document()` (every route of `api.ROUTES` and the service endpoints, their parameters,
bodies, responses, error shapes, headers and security schemes), its bytes as served at
`/openapi.json`, and the bytes of `static/docs.html`. Both are built once and cached. Nothing
here looks at handlers at run time: `tests/unit/test_openapi.py` compares this document with
the router, so the two cannot drift apart. Its numbers and patterns (username, password, limit,
skip, count, cursor) are read from `rules`, which the handlers enforce. Near a leaf: it
imports only `rules` and the package's version.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from typing import Any

from . import __version__, rules

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
SECURED: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"OAuth2PasswordBearer": []}]


def _ref(kind: str, name: str) -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict:
    return _ref("schemas", name)


def _integer(bounds: rules.Range, **default: int) -> dict:
    return {"type": "integer", "minimum": bounds.low, "maximum": bounds.high, **default}


# --- components -----------------------------------------------------------------------------

SCHEMAS: dict[str, Any] = {
    "HTTPError": {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"type": "string", "description": "What went wrong, for people."}},
    },
    "ValidationError": {
        "type": "object",
        "required": ["loc", "msg", "type"],
        "properties": {
            "loc": {
                "type": "array",
                "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                "description": "Where: `query`, `body` or `header`, then the field's name.",
            },
            "msg": {"type": "string"},
            "type": {"type": "string", "description": "A machine-readable kind, as FastAPI's."},
        },
    },
    "HTTPValidationError": {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"type": "array", "items": _schema("ValidationError")}},
    },
    "Credentials": {
        "type": "object",
        "required": ["username", "password"],
        "properties": {
            "username": {
                "type": "string",
                "minLength": rules.USERNAME_MIN,
                "maxLength": rules.USERNAME_MAX,
                "pattern": f"^{rules.USERNAME_PATTERN}$",
                "description": rules.USERNAME_RULE + ".",
            },
            "password": {
                "type": "string",
                "minLength": 1,
                "description": f"{rules.DEFAULT_PASSWORD_MIN_BYTES} to "
                f"{rules.MAX_PASSWORD_BYTES} bytes of UTF-8 for a new account (the minimum "
                "is DATAPROC_PASSWORD_MIN_BYTES).",
            },
        },
    },
    "LoginForm": {
        "type": "object",
        "required": ["username", "password"],
        "description": "The OAuth2 password flow's form; `grant_type`, `scope`, `client_id` and "
        "`client_secret` are accepted and ignored.",
        "properties": {
            "username": {"type": "string"},
            "password": {"type": "string", "format": "password"},
            "grant_type": {"type": "string", "enum": ["password"]},
            "scope": {"type": "string"},
        },
    },
    "RefreshRequest": {
        "type": "object",
        "required": ["refresh_token"],
        "properties": {
            "refresh_token": {"type": "string", "description": "From login or refresh."}
        },
    },
    "User": {
        "type": "object",
        "required": ["username", "role"],
        "properties": {
            "username": {"type": "string"},
            "role": {"type": "string", "enum": ["user"]},
        },
    },
    "TokenPair": {
        "type": "object",
        "required": ["access_token", "refresh_token", "token_type", "expires_in"],
        "properties": {
            "access_token": {"type": "string", "description": "HS256 JWT, `type` access."},
            "refresh_token": {"type": "string", "description": "HS256 JWT, `type` refresh."},
            "token_type": {"type": "string", "enum": ["bearer"]},
            "expires_in": {"type": "integer", "description": "Seconds the access token lives."},
        },
    },
    "DataPoint": {
        "type": "object",
        "required": ["id", "time", "value", "valid", "tags"],
        "properties": {
            "id": {"type": "integer"},
            "time": {
                "type": "string",
                "format": "date-time",
                "examples": ["2024-04-22T15:07:57Z"],
                "description": "RFC 3339, UTC, `Z` suffix.",
            },
            "value": {
                "type": ["number", "null"],
                "description": "The upstream's 4 bytes as a little-endian float32; null "
                "when not finite (the point is then invalid).",
            },
            "valid": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    },
    "PopulateBatch": {
        "type": "object",
        "required": ["stored", "duplicates", "rejected"],
        "properties": {
            "stored": {"type": "array", "items": _schema("DataPoint")},
            "duplicates": {"type": "integer", "minimum": 0},
            "rejected": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["reason"],
                    "properties": {"reason": {"type": "string"}},
                },
            },
        },
    },
    "SummaryBucket": {
        "type": "object",
        "required": ["time", "count", "valid", "min", "max", "mean"],
        "properties": {
            "time": {
                "type": "string",
                "format": "date-time",
                "description": "The bucket's start: a whole multiple of its size since "
                "1970-01-01T00:00:00Z.",
            },
            "count": {"type": "integer", "minimum": 1, "description": "Visible points in it."},
            "valid": {"type": "integer", "minimum": 0, "description": "Of them, the valid ones."},
            "min": {"type": ["number", "null"], "description": "Over finite values; null: none."},
            "max": {"type": ["number", "null"], "description": "Over finite values; null: none."},
            "mean": {"type": ["number", "null"], "description": "Over finite values; null: none."},
        },
    },
    "Summary": {
        "type": "object",
        "required": ["start", "end", "bucket", "bucket_s", "buckets"],
        "properties": {
            "start": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "The window as used: as given, else the first visible point's "
                "time (null when there is none).",
            },
            "end": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "As given, else the last visible point's time.",
            },
            "bucket": {"type": "string", "examples": ["1h"], "description": "The size used."},
            "bucket_s": {"type": "integer", "minimum": 1, "maximum": 2678400},
            "buckets": {
                "type": "array",
                "items": _schema("SummaryBucket"),
                "description": "Only non-empty buckets, in time order.",
            },
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
    "LogoutRequest": {
        "type": "object",
        "properties": {
            "refresh_token": {
                "type": "string",
                "description": "The session's current refresh token; only read when no "
                "`Authorization` header is sent.",
            }
        },
    },
    "PasswordChange": {
        "type": "object",
        "required": ["current_password", "new_password"],
        "properties": {
            "current_password": {"type": "string", "format": "password"},
            "new_password": {
                "type": "string",
                "format": "password",
                "description": "8 to 72 bytes of UTF-8, as at signup.",
            },
        },
    },
    "Account": {
        "type": "object",
        "required": ["username", "role", "created_at"],
        "properties": {
            "username": {"type": "string"},
            "role": {"type": "string", "enum": ["user", "admin"]},
            "created_at": {
                "type": "string",
                "format": "date-time",
                "description": "RFC 3339, UTC.",
            },
        },
    },
    "UserPatch": {
        "type": "object",
        "minProperties": 1,
        "description": "The role and/or a new password. A reset or a demotion ends the user's "
        "sessions.",
        "properties": {
            "role": {"type": "string", "enum": ["user", "admin"]},
            "password": {"type": "string", "format": "password", "description": "8 to 72 bytes."},
        },
    },
}

HEADERS: dict[str, Any] = {
    "ETag": {
        "description": "A strong tag of this answer for this caller; it changes whenever the "
        "answer would (a point stored in the window, a change of the caller's role).",
        "schema": {"type": "string"},
    },
    "Cache-Control": {
        "description": "`private, no-cache`: per caller, revalidate with `If-None-Match`.",
        "schema": {"type": "string"},
    },
    "Vary": {"description": "`Authorization, Accept-Encoding`.", "schema": {"type": "string"}},
    "X-Request-ID": {
        "description": "The request's id (the client's when sane, else generated); "
        "the access log line carries the same.",
        "schema": {"type": "string"},
    },
    "WWW-Authenticate": {
        "description": '`Bearer`, or `Bearer error="invalid_token"` when a token '
        "was sent and rejected.",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "Link": {
        "description": 'The next page: `<URL>; rel="next"` (a keyset cursor in `after`), '
        "present when the page is full.",
        "schema": {"type": "string"},
    },
    "Location": {"description": "Where the resource is.", "schema": {"type": "string"}},
    "Content-Disposition": {
        "description": 'An attachment: `attachment; filename="data_points.csv"` (or `.ndjson`).',
        "schema": {"type": "string"},
    },
}

PARAMETERS: dict[str, Any] = {
    "IfNoneMatch": {
        "name": "If-None-Match",
        "in": "header",
        "required": False,
        "description": "An `ETag` of an earlier answer (a list, weak `W/` tags, or `*`): "
        "304 with no body while it still holds.",
        "schema": {"type": "string"},
    },
    "RequestId": {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "description": "Your id for this request (1-128 of `A-Z a-z 0-9 . _ : -`); "
        "echoed back, otherwise one is generated.",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    },
    "start": {
        "name": "start",
        "in": "query",
        "required": False,
        "description": "Earliest time, inclusive: RFC 3339 / ISO 8601 (`Z` or an offset; "
        "none means UTC).",
        "schema": {"type": "string", "format": "date-time"},
        "example": "2024-04-22T00:00:00Z",
    },
    "end": {
        "name": "end",
        "in": "query",
        "required": False,
        "description": "Latest time, inclusive; `start` after `end` is a 422.",
        "schema": {"type": "string", "format": "date-time"},
        "example": "2030-01-01T00:00:00Z",
    },
    "skip": {
        "name": "skip",
        "in": "query",
        "required": False,
        "description": "Rows to skip.",
        "schema": _integer(rules.SKIP, default=rules.DEFAULT_SKIP),
    },
    "limit": {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": "Rows per page.",
        "schema": _integer(rules.LIMIT, default=rules.DEFAULT_LIMIT),
    },
    "after": {
        "name": "after",
        "in": "query",
        "required": False,
        "description": "A keyset cursor, as found in the `Link` header of the previous page.",
        "schema": {"type": "string", "pattern": f"^{rules.CURSOR_PATTERN}$"},
    },
    "format": {
        "name": "format",
        "in": "query",
        "required": False,
        "description": "`csv` or `ndjson`; without it the `Accept` header chooses "
        "(`text/csv`, `application/x-ndjson`), else NDJSON.",
        "schema": {"type": "string", "enum": ["csv", "ndjson"]},
    },
    "username": {
        "name": "username",
        "in": "path",
        "required": True,
        "description": "A username (the signup rule; else 422).",
        "schema": {"type": "string", "pattern": f"^{rules.USERNAME_PATTERN}$"},
    },
    "bucket": {
        "name": "bucket",
        "in": "query",
        "required": False,
        "description": "Bucket size: an integer with `s`, `m`, `h` or `d` (`30s`, `5m`, `1h`, "
        "`1d`) or integer seconds, from 1 s to 31 d. Default: the smallest of 1s 5s 10s 30s 1m "
        "5m 10m 30m 1h 3h 6h 12h 1d 7d giving at most 500 buckets. More than 10,000 buckets in "
        "the window: 422.",
        "schema": {"type": "string", "pattern": "^[0-9]{1,8}[smhd]?$"},
        "example": "1h",
    },
    "count": {
        "name": "count",
        "in": "query",
        "required": False,
        "description": "Fetch this many points in one call; the answer is then a batch.",
        "schema": _integer(rules.COUNT),
    },
}

SECURITY_SCHEMES: dict[str, Any] = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An access token from `POST /auth/login`.",
    },
    "OAuth2PasswordBearer": {
        "type": "oauth2",
        "description": "The OAuth2 password flow.",
        "flows": {"password": {"tokenUrl": "/auth/login", "scopes": {}}},
    },
}


# --- responses ------------------------------------------------------------------------------


def _headers(*names: str) -> dict:
    return {name: _ref("headers", name) for name in ("X-Request-ID", *names)}


def _json(description: str, schema: dict, *headers: str) -> dict:
    return {
        "description": description,
        "headers": _headers(*headers),
        "content": {JSON: {"schema": schema}},
    }


CONDITIONAL = ("ETag", "Cache-Control", "Vary")


def _not_modified() -> dict:
    """The 304 of a conditional read: the validators, no body (RFC 9110 §15.4.5)."""
    return {
        "304": {
            "description": "Not Modified: `If-None-Match` holds the current tag.",
            "headers": _headers(*CONDITIONAL),
        }
    }


def _error(description: str, *headers: str) -> dict:
    return _json(description, _schema("HTTPError"), *headers)


ERRORS: dict[int, dict] = {
    400: _error(
        "Malformed request (query string, duplicated header) or, for login, "
        "incorrect username or password."
    ),
    401: _error(
        "Missing, expired, tampered or wrong-kind token, or its session ended (logout, "
        "refresh token reuse, password change) or was never there (a token without `sid`).",
        "WWW-Authenticate",
    ),
    403: _error("The token's user is not an admin."),
    409: _error("The username is already taken, or the last admin would be removed."),
    404: _error("No such user."),
    413: _error("Request body too large."),
    415: _error("Body is neither application/json nor application/x-www-form-urlencoded."),
    422: _json(
        "A parameter or body field is invalid; one entry per problem.",
        _schema("HTTPValidationError"),
    ),
    429: _error("Too many failed logins for this username or address.", "Retry-After"),
    502: _error(
        "The upstream refused, failed, or sent an invalid or oversized document "
        "(kept in the rejects table; nothing half-done is stored)."
    ),
    503: _error(
        "The database is unavailable, no upstream is configured, or the server is busy.",
        "Retry-After",
    ),
    504: _error("The upstream did not answer in time."),
}


def _responses(success: dict[str, Any], *errors: int) -> dict[str, Any]:
    responses = dict(success)
    responses.update({str(status): copy.deepcopy(ERRORS[status]) for status in sorted(errors)})
    return responses


def _body(schema: str, *, form_schema: str | None = None, form_first: bool = False) -> dict:
    content = {JSON: {"schema": _schema(schema)}, FORM: {"schema": _schema(form_schema or schema)}}
    if form_first:
        content = {FORM: content[FORM], JSON: content[JSON]}
    return {"required": True, "content": content}


def _operation(
    op_id: str, tag: str, summary: str, description: str, responses: dict, **extra: Any
) -> dict:
    parameters = [_ref("parameters", name) for name in extra.pop("params", ())]
    return {
        "operationId": op_id,
        "tags": [tag],
        "summary": summary,
        "description": description,
        "parameters": [*parameters, _ref("parameters", "RequestId")],
        "responses": responses,
        **extra,
    }


BODY_ERRORS = (400, 413, 415, 422)


def _paths() -> dict[str, Any]:
    populate: dict[str, Any] = dict(
        params=("count",),
        security=SECURED,
        responses=_responses(
            {
                "200": _json(
                    "The stored point, or with `count` a batch.",
                    {"oneOf": [_schema("DataPoint"), _schema("PopulateBatch")]},
                )
            },
            400,
            401,
            403,
            422,
            502,
            503,
            504,
        ),
    )
    populate_text = (
        "Admin only. Fetches one document from the upstream, decodes it, applies the "
        "validity rules and stores it (the same document twice is stored once)."
    )
    return {
        "/auth/signup": {
            "post": _operation(
                "signup",
                "auth",
                "Create an account",
                "Creates a user with the role `user` (never an admin). JSON or form body.",
                _responses({"201": _json("Created.", _schema("User"))}, *BODY_ERRORS, 409, 503),
                requestBody=_body("Credentials"),
                security=[],
            )
        },
        "/auth/login": {
            "post": _operation(
                "login",
                "auth",
                "Log in (OAuth2 password flow)",
                "A form (or JSON) `username` and `password` for an access and a refresh token. A wrong "
                "password and an unknown user get the same 400, in the same time.",
                _responses(
                    {"200": _json("The token pair.", _schema("TokenPair"))}, *BODY_ERRORS, 429, 503
                ),
                requestBody=_body("Credentials", form_schema="LoginForm", form_first=True),
                security=[],
            )
        },
        "/auth/refresh": {
            "post": _operation(
                "refresh",
                "auth",
                "Trade a refresh token for a new pair",
                "Rotation with reuse detection (RFC 9700 §4.14.2): a refresh token works once. "
                "Presenting a spent one again is reuse: 401, and its whole session ends (of two "
                "simultaneous refreshes with one token, exactly one gets 200). 401 too for an "
                "access token, an expired, tampered or malformed token, or a deleted user.",
                _responses(
                    {"200": _json("A new token pair.", _schema("TokenPair"))},
                    *BODY_ERRORS,
                    401,
                    503,
                ),
                requestBody=_body("RefreshRequest"),
                security=[],
            )
        },
        **_session_and_user_paths(),
        "/api/data": {
            "get": _operation(
                "data",
                "data",
                "List data points",
                "Ordered by time, then id. Admins see every point, other users valid ones only. A full "
                "page carries a `Link` header to the next one (a keyset cursor, fast at any depth).",
                _responses(
                    {
                        "200": _json(
                            "A page of points.",
                            {"type": "array", "items": _schema("DataPoint")},
                            "Link",
                            *CONDITIONAL,
                        ),
                        **_not_modified(),
                    },
                    400,
                    401,
                    422,
                    503,
                ),
                params=("start", "end", "skip", "limit", "after", "IfNoneMatch"),
                security=SECURED,
            )
        },
        "/api/data/summary": {
            "get": _operation(
                "summary",
                "data",
                "Summarise data points in time buckets",
                "The points the caller can see (admins: all, others: valid ones) in buckets "
                "aligned to the Unix epoch: per non-empty bucket its `count`, `valid`, and `min`, "
                "`max`, `mean` over finite values. The counts agree exactly with `/api/data` for "
                "the same window and caller. Served from per-minute, per-hour and per-day rollups "
                "kept by the database in every writer's transaction; only buckets under a minute "
                "and the partial minutes at the window's edges read raw rows.",
                _responses(
                    {
                        "200": _json("The buckets.", _schema("Summary"), *CONDITIONAL),
                        **_not_modified(),
                    },
                    400,
                    401,
                    422,
                    503,
                ),
                params=("start", "end", "bucket", "IfNoneMatch"),
                security=SECURED,
            )
        },
        "/api/data/export": {
            "get": _operation(
                "export",
                "data",
                "Export every point of a window",
                "Every point the caller can see in `start`..`end`, ordered by time then id, with "
                "no limit, streamed (`Transfer-Encoding: chunked`; on HTTP/1.0 the body ends with "
                "the connection). CSV is RFC 4180 with CRLF line ends and the header "
                "`id,time,value,valid,tags`; NDJSON is one point object per line, as `/api/data` "
                "shows it. A failure after the first byte ends the transfer without its last "
                "chunk: a truncated transfer, never a file that looks complete. At most "
                "`DATAPROC_MAX_EXPORTS` run at once per process; past it a 503 with `Retry-After`.",
                _responses(
                    {
                        "200": {
                            "description": "The points, streamed as an attachment.",
                            "headers": _headers("Content-Disposition"),
                            "content": {
                                "text/csv; charset=utf-8": {"schema": {"type": "string"}},
                                "application/x-ndjson": {"schema": {"type": "string"}},
                            },
                        }
                    },
                    400,
                    401,
                    422,
                    503,
                ),
                params=("start", "end", "format"),
                security=SECURED,
            )
        },
        "/api/populate": {
            "get": _operation(
                "populate",
                "data",
                "Fetch and store upstream points",
                populate_text,
                **copy.deepcopy(populate),
            ),
            "post": _operation(
                "populate_post",
                "data",
                "Fetch and store upstream points (POST)",
                populate_text,
                **copy.deepcopy(populate),
            ),
        },
        "/healthz": {
            "get": _operation(
                "healthz",
                "service",
                "Liveness",
                "200 while the process serves (no database access).",
                {"200": _json("Alive.", _schema("Status"))},
                security=[],
            )
        },
        "/readyz": {
            "get": _operation(
                "readyz",
                "service",
                "Readiness",
                "200 when the database answers, else 503.",
                _responses({"200": _json("Ready.", _schema("Status"))}, 503),
                security=[],
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "service",
                "Prometheus metrics",
                "Text exposition format 0.0.4: requests by route and status, a latency histogram, "
                "populate outcomes, database pool use. Absent (404) when DATAPROC_METRICS=false.",
                {
                    "200": {
                        "description": "The metrics.",
                        "headers": _headers(),
                        "content": {
                            "text/plain; version=0.0.4; charset=utf-8": {
                                "schema": {"type": "string"}
                            }
                        },
                    }
                },
                security=[],
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "service",
                "This document",
                "The OpenAPI 3.1 description of the service.",
                {"200": _json("The document.", {"type": "object"})},
                security=[],
            )
        },
        "/docs": {
            "get": _operation(
                "docs",
                "service",
                "Interactive documentation",
                "A self-contained page (no external requests) built from this document: log in, "
                "then try each operation.",
                {
                    "200": {
                        "description": "The page.",
                        "headers": _headers(),
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
                security=[],
            )
        },
        "/view": {
            "get": _operation(
                "view",
                "service",
                "Chart page",
                "A self-contained page (no external requests): log in, pick a window or drag "
                "to zoom, see the mean line and min-max band from the summary, the raw points "
                "when the window holds 2,000 or fewer, the latest points as a table; "
                "auto-refresh and CSV/NDJSON downloads.",
                {
                    "200": {
                        "description": "The page.",
                        "headers": _headers(),
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
                security=[],
            )
        },
        "/": {
            "get": _operation(
                "root",
                "service",
                "Redirect to /view",
                "Sends browsers to the chart page.",
                {"307": {"description": "To /view.", "headers": _headers("Location")}},
                security=[],
            )
        },
    }


def _no_content(description: str) -> dict[str, Any]:
    return {"204": {"description": description, "headers": _headers()}}


def _session_and_user_paths() -> dict[str, Any]:
    """Logout, password change and the admin's user endpoints."""
    user_errors = (400, 401, 403, 404, 409, 422, 503)
    return {
        "/auth/logout": {
            "post": _operation(
                "logout",
                "auth",
                "End this session",
                "With the bearer access token (or, without one, a body with the refresh token): "
                "the session ends, its refresh token at once, its access tokens at once on this "
                "replica and within 1 s on every other. Twice, or with an ended session: 401.",
                _responses(_no_content("Logged out."), 400, 401, 413, 415, 422, 503),
                requestBody={**_body("LogoutRequest"), "required": False},
                security=[*SECURED, {}],
            )
        },
        "/auth/password": {
            "post": _operation(
                "change_password",
                "auth",
                "Change your password",
                "Every other session of the user ends; this one stays. A wrong current password "
                "is a 400 counted by the login throttle (429 past it).",
                _responses(_no_content("Changed."), *BODY_ERRORS, 401, 429, 503),
                requestBody=_body("PasswordChange"),
                security=SECURED,
            )
        },
        "/api/users": {
            "get": _operation(
                "list_users",
                "users",
                "List users",
                "Admin only. Ordered by username.",
                _responses(
                    {
                        "200": _json(
                            "A page of users.", {"type": "array", "items": _schema("Account")}
                        )
                    },
                    400,
                    401,
                    403,
                    422,
                    503,
                ),
                params=("skip", "limit"),
                security=SECURED,
            )
        },
        "/api/users/{username}": {
            "patch": _operation(
                "update_user",
                "users",
                "Change a user's role or reset its password",
                "Admin only. A password reset or a demotion ends the user's sessions. Demoting "
                "the last admin: 409.",
                _responses({"200": _json("The user.", _schema("Account"))}, *user_errors, 413, 415),
                params=("username",),
                requestBody={"required": True, "content": {JSON: {"schema": _schema("UserPatch")}}},
                security=SECURED,
            ),
            "delete": _operation(
                "delete_user",
                "users",
                "Delete a user",
                "Admin only. The user's sessions end. Deleting the last admin: 409.",
                _responses(_no_content("Deleted."), *user_errors),
                params=("username",),
                security=SECURED,
            ),
        },
    }


@cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (one shared dict: do not mutate it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dataproc",
            "version": __version__,
            "summary": "Data-point ingestion: upstream readings to PostgreSQL, behind JWT logins.",
            "description": 'Errors are JSON: `{"detail": "..."}`, or for 422 a list of '
            "`{loc, msg, type}`. Every response carries `X-Request-ID`. `HEAD` "
            "works wherever `GET` does. Log in at `POST /auth/login`, then send "
            "`Authorization: Bearer <access_token>`.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "auth", "description": "Accounts and tokens."},
            {"name": "data", "description": "Data points."},
            {"name": "users", "description": "User administration (admins only)."},
            {"name": "service", "description": "Operating the service."},
        ],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "parameters": PARAMETERS,
            "headers": HEADERS,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


@cache
def document_bytes() -> bytes:
    """The document as compact UTF-8 JSON, serialised once."""
    return json.dumps(document(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@cache
def docs_html() -> bytes:
    """The `/docs` page, read once from the package data."""
    return resources.files("dataproc.static").joinpath("docs.html").read_bytes()
