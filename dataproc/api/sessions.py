"""`/auth/logout` and `/auth/password`: ending a session, and changing one's own password."""

from __future__ import annotations

from .. import auth, store
from ..errors import ApiError, ValidationError, problem
from ..web import Request, Response
from .accounts import _body, _string_fields, password_problem
from .context import Context


def logout(request: Request, ctx: Context) -> Response:
    """POST /auth/logout: end the session of the bearer access token (or of the body's
    `refresh_token`); 204. An ended session's token, or a second logout: 401."""
    body = {} if request.headers.get("authorization") else _body(request, ctx)
    token = body.get("refresh_token")
    if token is not None and not isinstance(token, str):
        raise ValidationError(
            [problem("body", "refresh_token", "Input should be a valid string", "string_type")]
        )
    auth.logout(ctx.config, ctx.pool, ctx.sessions, request, token, ctx.clock())
    return Response(204)


def change_password(request: Request, ctx: Context) -> Response:
    """POST /auth/password: check the current password (throttled as a login), set the new
    one (signup rules), and end every other session of the user; 204."""
    caller = auth.current_caller(request, ctx.config, ctx.pool, ctx.sessions, ctx.clock())
    values, problems = _string_fields(_body(request, ctx), ("current_password", "new_password"))
    if "new_password" in values and (
        bad := password_problem(values["new_password"], "new_password", ctx)
    ):
        problems.append(bad)
    if problems:
        raise ValidationError(problems)
    now = ctx.clock()
    ctx.throttle.check(caller.username, request.client, now)
    user = store.get_user(ctx.pool, caller.username)
    if user is None:
        raise auth.user_gone()
    if not ctx.checker.verify(values["current_password"], user.hashed_password):
        ctx.throttle.failed(caller.username, request.client, now)
        raise ApiError(400, "Incorrect password")
    ctx.throttle.succeeded(caller.username)
    hashed = ctx.checker.hash(values["new_password"])
    auth.change_password(ctx.pool, ctx.sessions, user, caller.sid, hashed)
    return Response(204)


ROUTES = (
    ("POST", "/auth/logout", logout),
    ("POST", "/auth/password", change_password),
)
