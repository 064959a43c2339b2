"""`/api/users`: user administration over HTTP, for admins (401 / 403 as for populate).

List, change role, reset password, delete. A reset, a demotion or a deletion ends the user's
sessions; the last admin cannot be demoted or deleted (409, decided under row locks in the
store so that two concurrent demotions cannot both pass).
"""

from __future__ import annotations

from typing import Any

from .. import auth, rules
from ..errors import ApiError, ValidationError, problem
from ..store import sessions as session_store
from ..web import Request, Response, path_param
from .accounts import _body, password_problem, username_problem
from .context import Context
from .params import integer_param, single_param

ROLES = ("user", "admin")
LAST_ADMIN = "the last admin cannot be removed"


def _admin(request: Request, ctx: Context) -> auth.Caller:
    caller = auth.current_caller(request, ctx.config, ctx.pool, ctx.sessions, ctx.clock())
    auth.require_admin(caller)
    return caller


def _account(account: session_store.Account) -> dict[str, Any]:
    return {
        "username": account.username,
        "role": account.role,
        "created_at": account.created_at,
    }


def _username(request: Request) -> str:
    username = path_param(request, "username")
    if not rules.USERNAME.fullmatch(username):
        raise ValidationError([username_problem("path")])
    return username


def list_users(request: Request, ctx: Context) -> Response:
    """GET /api/users: users ordered by username, `skip`/`limit` as in /api/data."""
    _admin(request, ctx)
    problems: list[dict] = []
    skip = integer_param(single_param(request, "skip", problems), "skip", rules.SKIP, problems)
    limit = integer_param(single_param(request, "limit", problems), "limit", rules.LIMIT, problems)
    if problems:
        raise ValidationError(problems)
    skip = rules.DEFAULT_SKIP if skip is None else skip
    limit = rules.DEFAULT_LIMIT if limit is None else limit
    accounts = session_store.list_users(ctx.pool, skip, limit)
    return Response.json([_account(account) for account in accounts])


def _patch_body(request: Request, ctx: Context) -> tuple[str | None, str | None]:
    body = _body(request, ctx)
    role, password, problems = body.get("role"), body.get("password"), []
    if role is None and password is None:
        problems.append(problem("body", "role", "give role and/or password", "missing"))
    if role is not None and role not in ROLES:
        problems.append(problem("body", "role", "Input should be 'admin' or 'user'", "enum"))
    if password is not None:
        if not isinstance(password, str):
            problems.append(
                problem("body", "password", "Input should be a valid string", "string_type")
            )
        elif bad := password_problem(password, "password", ctx):
            problems.append(bad)
    if problems:
        raise ValidationError(problems)
    return role, password


def patch_user(request: Request, ctx: Context) -> Response:
    """PATCH /api/users/{username}: change the role and/or reset the password; 200 with the
    user. A reset or a demotion ends the user's sessions."""
    _admin(request, ctx)
    username = _username(request)
    role, password = _patch_body(request, ctx)
    hashed = ctx.checker.hash(password) if password is not None else None
    try:
        changed = session_store.update_user(ctx.pool, username, role, hashed)
    except session_store.LastAdmin:
        raise ApiError(409, LAST_ADMIN) from None
    if changed is None:
        raise ApiError(404, "user not found")
    account, ended = changed
    ctx.sessions.forget(ended)
    return Response.json(_account(account))


def delete_user(request: Request, ctx: Context) -> Response:
    """DELETE /api/users/{username}: 204; the user's sessions end."""
    _admin(request, ctx)
    username = _username(request)
    try:
        ended = session_store.delete_user(ctx.pool, username)
    except session_store.LastAdmin:
        raise ApiError(409, LAST_ADMIN) from None
    if ended is None:
        raise ApiError(404, "user not found")
    ctx.sessions.forget(ended)
    return Response(204)


ROUTES = (
    ("GET", "/api/users", list_users),
    ("PATCH", "/api/users/{username}", patch_user),
    ("DELETE", "/api/users/{username}", delete_user),
)
