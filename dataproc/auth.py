"""Who is calling: bearer tokens to users, passwords to token pairs, and login throttling.

Owns: the access/refresh token pair (claims of API.md: sub, role, type, iat, exp, jti), the
checks on an `Authorization` header, the bound on concurrent bcrypt checks and the throttle on
repeated login failures. Every function that decides by the time takes `now` (the handlers
pass `ctx.clock()`, the one clock); nothing here reads the system clock. Leaves the HS256
mechanics to `jwt`, bcrypt to `passwords`, and every SQL statement to `store`.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from . import jwt, passwords, store
from .config import Config
from .errors import ApiError, Unauthorized, retry_later
from .web import Request

ACCESS, REFRESH = "access", "refresh"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller, with the role the database holds now."""

    username: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def issue_tokens(config: Config, username: str, role: str, now: float) -> dict:
    """A new access/refresh pair, as the login and refresh endpoints return it."""
    issued = int(now)

    def token(kind: str, ttl_s: int) -> str:
        claims = {
            "sub": username,
            "role": role,
            "type": kind,
            "iat": issued,
            "exp": issued + ttl_s,
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode(claims, signing_key(config, kind))

    return {
        "access_token": token(ACCESS, config.access_ttl_s),
        "refresh_token": token(REFRESH, config.refresh_ttl_s),
        "token_type": "bearer",
        "expires_in": config.access_ttl_s,
    }


def signing_key(config: Config, kind: str) -> str:
    """The key of `kind` tokens. `zeroconf.resolve` never serves without both; a `Config`
    handed to `create_app` unresolved gets a 503, not a token signed with nothing."""
    key = config.jwt_secret_key if kind == ACCESS else config.jwt_refresh_secret_key
    if not key:
        raise ApiError(503, "no signing keys configured")
    return key


def token_subject(config: Config, token: str, kind: str, now: float) -> str:
    """The username a token names, if it verifies and has the right type (no database)."""
    try:
        claims = jwt.decode(token, signing_key(config, kind), now=now, leeway=5, expected_type=kind)
    except jwt.InvalidToken as error:
        raise Unauthorized(f"invalid token: {error.reason}", token_sent=True) from None
    username = claims.get("sub")
    if not isinstance(username, str):
        raise Unauthorized("invalid token: no subject", token_sent=True)
    return username


def user_gone() -> Unauthorized:
    """The 401 for a valid token whose user no longer exists."""
    return Unauthorized("invalid token: user no longer exists", token_sent=True)


def verify_token(config: Config, pool: ConnectionPool, token: str, kind: str, now: float) -> Caller:
    """The caller a token names, if it verifies, has the right type and the user still exists."""
    username = token_subject(config, token, kind, now)
    role = store.user_role(pool, username)
    if role is None:
        raise user_gone()
    return Caller(username, role)


def bearer_token(request: Request) -> str:
    """The token of a single `Authorization: Bearer` header; 401 without one."""
    if "access_token" in request.query:  # RFC 6750 §2.3 allows it; query strings end up in logs
        raise Unauthorized("tokens in the query string are not accepted", token_sent=True)
    values = request.headers.get("authorization", [])
    if not values:
        raise Unauthorized("Not authenticated", token_sent=False)
    if len(values) > 1:
        raise Unauthorized("more than one Authorization header", token_sent=True)
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected Authorization: Bearer <token>", token_sent=True)
    return token.strip()


def access_token_subject(request: Request, config: Config, now: float) -> str:
    """The username of a request's valid access token at `now`; the caller checks the user
    exists."""
    return token_subject(config, bearer_token(request), ACCESS, now)


def current_caller(request: Request, config: Config, pool: ConnectionPool, now: float) -> Caller:
    """The caller of a request carrying an access token valid at `now`."""
    return verify_token(config, pool, bearer_token(request), ACCESS, now)


class LoginThrottle:
    """Failures per username and per client address in a sliding window; 429 past the limit.

    In memory, per process: a replica behind a load balancer keeps its own counts. The maps
    are bounded (oldest entries dropped) so a flood of made-up names cannot grow them forever.
    """

    MAX_KEYS = 10_000

    def __init__(self, max_failures: int, window_s: float):
        self.max_failures, self.window_s = max_failures, window_s
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, username: str, client: str, now: float) -> None:
        """Raise 429 with `Retry-After` when either key has too many recent failures."""
        with self._lock:
            for key in (f"user:{username}", f"addr:{client}"):
                recent = self._recent(key, now)
                if len(recent) >= self.max_failures:
                    wait_s = recent[0] + self.window_s - now
                    raise retry_later(429, "too many failed logins, retry later", wait_s)

    def failed(self, username: str, client: str, now: float) -> None:
        """Count one failure against the username and the address."""
        with self._lock:
            for key in (f"user:{username}", f"addr:{client}"):
                self._failures[key] = self._recent(key, now) + [now]
                self._failures.move_to_end(key)
            while len(self._failures) > self.MAX_KEYS:
                self._failures.popitem(last=False)

    def succeeded(self, username: str) -> None:
        """A correct password clears that username's failures (not the address's)."""
        with self._lock:
            self._failures.pop(f"user:{username}", None)

    def _recent(self, key: str, now: float) -> list[float]:
        return [t for t in self._failures.get(key, ()) if t > now - self.window_s]


class PasswordChecker:
    """bcrypt checks, at most `concurrency` at once, so logins cannot take every core."""

    def __init__(self, config: Config):
        self._cost, self._wait_s = config.bcrypt_cost, config.login_wait_s
        self._slots = threading.BoundedSemaphore(config.login_concurrency)

    def verify(self, password: str, hashed: str | None) -> bool:
        """bcrypt (or the dummy hash for an unknown user, same time) inside a slot."""
        return self._bounded(passwords.verify_password, password, hashed, self._cost)

    def hash(self, password: str) -> str:
        """A new bcrypt hash inside a slot."""
        return self._bounded(passwords.hash_password, password, self._cost)

    def _bounded(self, function, *args):
        if not self._slots.acquire(timeout=self._wait_s):
            raise retry_later(503, "too many logins in progress, retry shortly", 1)
        try:
            return function(*args)
        finally:
            self._slots.release()


def require_admin(caller: Caller) -> None:
    """403 unless the caller is an admin."""
    if not caller.is_admin:
        raise ApiError(403, "admin role required")
