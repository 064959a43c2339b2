"""`/auth/signup`, `/auth/login`, `/auth/refresh`: accounts, sessions and token pairs, and
the signup rules for a username and a password that the other account endpoints share."""

from __future__ import annotations

from typing import Any

from .. import auth, rules, store
from ..errors import ApiError, ValidationError, problem
from ..store import sessions as session_store
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


def username_problem(where: str, name: str = "username") -> dict:
    """The 422 entry of a username that breaks the signup rule (`rules.USERNAME`)."""
    return problem(where, name, rules.USERNAME_RULE, "string_pattern_mismatch")


def password_problem(password: str, name: str, ctx: Context) -> dict | None:
    """The 422 entry of a new password that breaks the signup rule, or None."""
    minimum = ctx.config.password_min_bytes
    if rules.password_fits(password, minimum):
        return None
    kind = "string_too_short" if len(password.encode()) < minimum else "string_too_long"
    return problem("body", name, rules.password_rule(minimum), kind)


def signup(request: Request, ctx: Context) -> Response:
    """POST /auth/signup: create a user (never an admin). The name is claimed before the
    password is hashed, so a burst of signups of one name costs one hash (API.md Bursts)."""
    values, problems = _string_fields(_body(request, ctx), ("username", "password"))
    if "username" in values and not rules.USERNAME.fullmatch(values["username"]):
        problems.append(username_problem("body"))
    if "password" in values and (bad := password_problem(values["password"], "password", ctx)):
        problems.append(bad)
    if problems:
        raise ValidationError(problems)
    username = values["username"]
    # A claim older than any signup can take was left by a process that died between claim
    # and hash: it may be claimed again.
    user_id = session_store.claim_username(ctx.pool, username, auth.claim_stale_s(ctx.config))
    if user_id is None:
        raise ApiError(409, "username already taken")
    try:
        hashed = ctx.checker.hash(values["password"])
    except BaseException:
        session_store.release_claim(ctx.pool, user_id)  # a 503 from the queue: the name is free
        raise
    if not session_store.complete_claim(ctx.pool, user_id, hashed):
        raise ApiError(409, "username already taken")
    return Response.json({"username": username, "role": "user"}, 201)


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
    return Response.json(auth.start_session(ctx.config, ctx.pool, user, now))


def refresh(request: Request, ctx: Context) -> Response:
    """POST /auth/refresh: spend a refresh token for the next pair of its session (the
    user must still exist); a spent one ends the session."""
    values, problems = _string_fields(_body(request, ctx), ("refresh_token",))
    if problems:
        raise ValidationError(problems)
    token, now = values["refresh_token"], ctx.clock()
    return Response.json(auth.refresh_session(ctx.config, ctx.pool, ctx.sessions, token, now))


ROUTES = (
    ("POST", "/auth/signup", signup),
    ("POST", "/auth/login", login),
    ("POST", "/auth/refresh", refresh),
)
