"""Conditional and cached reads: one call gives a read endpoint the read cache, its strong
`ETag`, `Cache-Control: private, no-cache`, `Vary` and the 304 of API.md.

    return cached_read(request, ctx, key_parts, compute)

`key_parts`: a tuple of everything the answer depends on besides the route and the caller's
role (the normalised query). `compute(username) -> cache.Answer`: the database read, whose
`version` comes from the same statement as its rows (splice `store.DATA_VERSION` into the
SELECT) and whose `role` is the caller's role read in that statement (None: no such user, 401).
"""

from __future__ import annotations

from collections.abc import Callable

from .. import auth
from ..cache import Answer, if_none_match_matches, make_etag
from ..web import Request, Response
from .context import Context

# The answer depends on who asks (the token) and is sent gzipped or not: a shared cache must
# never hand it to another caller, and every client must revalidate (the data changes).
CONDITIONAL_HEADERS = {
    "Cache-Control": "private, no-cache",
    "Vary": "Authorization, Accept-Encoding",
}


def cached_read(
    request: Request,
    ctx: Context,
    key_parts: tuple,
    compute: Callable[[str], Answer],
    *,
    username: str | None = None,
) -> Response:
    """The answer to a read: from the cache when it may be, else `compute`d (and kept when
    the rules allow); a 304 when `If-None-Match` holds its tag. `username`: the token's
    subject when the handler checked the token already (401 before 422)."""
    if username is None:
        username = auth.access_token_subject(request, ctx.config, ctx.sessions, ctx.clock())
    key = (request.route or request.path, *key_parts)
    validators = ",".join(request.headers.get("if-none-match", ()))
    cache = ctx.cache
    role = cache.role(username)
    if role is not None:
        entry = cache.lookup((key, role))
        if entry is not None:
            return _respond(entry.etag, entry.body, entry.headers, validators)
        etag = cache.current_etag(key, role)
        if etag is not None and if_none_match_matches(validators, etag):
            return _not_modified(etag)
    ticket = cache.begin()
    answer = compute(username)
    if answer.role is None:
        raise auth.user_gone()
    cache.remember_role(ticket, username, answer.role)
    etag = make_etag(answer.version, answer.role, key)
    cache.store(ticket, (key, answer.role), answer, etag)
    return _respond(etag, answer.body, answer.headers, validators)


def _respond(etag: str, body: bytes, headers: dict[str, str], validators: str) -> Response:
    if if_none_match_matches(validators, etag):
        return _not_modified(etag)
    return Response.raw_json(body, 200, {**headers, **CONDITIONAL_HEADERS, "ETag": etag})


def _not_modified(etag: str) -> Response:
    # RFC 9110 §15.4.5: the headers a 200 would have carried that describe it, no body.
    return Response(304, b"", {**CONDITIONAL_HEADERS, "ETag": etag})
