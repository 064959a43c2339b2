"""`/auth/signup`, `/auth/login`, `/auth/refresh`: accounts and token pairs."""

from __future__ import annotations

from typing import Any

from .. import auth, rules, store
from ..errors import ApiError, ValidationError, problem
from ..web import Request, Response, read_body
from .context import Context


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
    if "username" in values and not rules.USERNAME.fullmatch(values["username"]):
        problems.append(problem("body", "username", rules.USERNAME_RULE, "string_pattern_mismatch"))
    minimum = ctx.config.password_min_bytes
    if "password" in values and not rules.password_fits(values["password"], minimum):
        too_short = len(values["password"].encode()) < minimum
        problems.append(
            problem(
                "body",
                "password",
                rules.password_rule(minimum),
                "string_too_short" if too_short else "string_too_long",
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
    # An unknown user costs one (dummy) bcrypt check too, so the time tells nothing.
    matches = ctx.checker.verify(values["password"], user.hashed_password if user else None)
    if user is None or not matches:
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


ROUTES = (
    ("POST", "/auth/signup", signup),
    ("POST", "/auth/login", login),
    ("POST", "/auth/refresh", refresh),
)
