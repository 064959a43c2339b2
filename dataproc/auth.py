"""Who is calling: bearer tokens to users and sessions, passwords to token pairs, throttling.

Owns: the access/refresh token pair (claims of API.md: sub, role, type, iat, exp, jti, sid),
sessions (a login starts one; a refresh token works once; reuse of a spent one ends the
session; logout), the per-process record of which sessions are live, the checks on an
`Authorization` header, the bcrypt queue and the throttle on repeated login failures. Every
function that decides by the time takes `now` (the handlers pass `ctx.clock()`, the one
clock); nothing here reads the system clock (the bcrypt queue measures durations with a
monotonic clock, which decides nothing about tokens). Leaves the HS256 mechanics to `jwt`,
bcrypt to `passwords`, and every SQL statement to `store`.

Sessions on the hot path: a request's session is looked up in the database once per process,
then trusted until the shared `Listener` reports that it ended (a NOTIFY from a trigger, so
every writer is heard) or this process ends it itself. While the listener cannot hear
(`healthy` is False), every request asks the database: fail closed.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from psycopg_pool import ConnectionPool

from . import jwt, passwords, store
from .config import Config
from .errors import ApiError, Unauthorized, retry_later
from .store import sessions as session_store
from .web import Request

log = logging.getLogger("dataproc.auth")

ACCESS, REFRESH = "access", "refresh"
SESSIONS_CHANNEL = "dataproc_sessions"


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller, with the role the database holds now, and its session."""

    username: str
    role: str
    sid: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def new_id() -> str:
    """An unguessable identifier (session ids, token ids): 144 random bits."""
    return secrets.token_urlsafe(18)


def issue_tokens(
    config: Config, username: str, role: str, now: float, sid: str, refresh_jti: str
) -> dict:
    """A new access/refresh pair of session `sid`, as login and refresh return it."""
    issued = int(now)

    def token(kind: str, ttl_s: int, jti: str) -> str:
        claims = {
            "sub": username,
            "role": role,
            "type": kind,
            "iat": issued,
            "exp": issued + ttl_s,
            "jti": jti,
            "sid": sid,
        }
        return jwt.encode(claims, signing_key(config, kind))

    return {
        "access_token": token(ACCESS, config.access_ttl_s, new_id()),
        "refresh_token": token(REFRESH, config.refresh_ttl_s, refresh_jti),
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


def claim_stale_s(config: Config) -> float:
    """After how long a signup's claim on a name (made before hashing) counts as abandoned:
    longer than any signup can take (the queue's wait plus a hash), with room to spare."""
    return 2 * config.login_wait_s + 60


def refresh_expiry(config: Config, now: float) -> datetime:
    """When a refresh token issued now (and so its session, unless refreshed) expires."""
    return _instant(int(now) + config.refresh_ttl_s)


def _instant(seconds: float) -> datetime:
    """Unix seconds as an aware UTC datetime, as the store compares `expires_at` with it."""
    return datetime.fromtimestamp(seconds, UTC)


class VerifiedTokens:
    """Access tokens whose signature and claims checked out, so that a client polling with
    one token pays the HMAC and the JSON parse once (a sixth of a cached read's CPU).

    Keyed by the signing key and the whole token text, so only that exact token, verified
    with that key, can hit; a hit still re-checks the time and the type (`jwt.check_claims`),
    and the session is checked by the caller on every request as before. Bounded (LRU)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._entries: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, key: str, token: str) -> dict[str, Any] | None:
        """The claims of `token` verified with `key` before, or None."""
        with self._lock:
            claims = self._entries.get((key, token))
            if claims is not None:
                self._entries.move_to_end((key, token))
            return claims

    def put(self, key: str, token: str, claims: dict[str, Any]) -> None:
        """Remember a token that verified with `key` and passed every check."""
        with self._lock:
            self._entries[(key, token)] = claims
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)


VERIFIED = VerifiedTokens()
LEEWAY_S = 5  # clock skew between replicas that a token's times may have


def token_claims(config: Config, token: str, kind: str, now: float) -> dict[str, Any]:
    """The claims of a token that verifies at `now`, has the right type, a subject and a
    session (no database). A token without `sid` was issued before sessions existed: refused.
    Access tokens verified before skip the signature (see `VerifiedTokens`)."""
    key = signing_key(config, kind)
    remembered = VERIFIED.get(key, token) if kind == ACCESS else None
    try:
        if remembered is not None:
            jwt.check_claims(remembered, now=now, leeway=LEEWAY_S, expected_type=kind)
            return remembered
        claims = jwt.decode(token, key, now=now, leeway=LEEWAY_S, expected_type=kind)
    except jwt.InvalidToken as error:
        raise Unauthorized(f"invalid token: {error.reason}", token_sent=True) from None
    if not isinstance(claims.get("sub"), str):
        raise Unauthorized("invalid token: no subject", token_sent=True)
    if not isinstance(claims.get("sid"), str) or not claims["sid"]:
        raise Unauthorized("invalid token: no session (log in again)", token_sent=True)
    if kind == REFRESH and not isinstance(claims.get("jti"), str):
        raise Unauthorized("invalid token: no token id", token_sent=True)
    if kind == ACCESS:
        VERIFIED.put(key, token, claims)
    return claims


def user_gone() -> Unauthorized:
    """The 401 for a valid token whose user no longer exists."""
    return Unauthorized("invalid token: user no longer exists", token_sent=True)


def session_ended() -> Unauthorized:
    """The 401 for a valid token whose session has ended."""
    return Unauthorized("invalid token: the session has ended", token_sent=True)


class Listener(Protocol):
    """What sessions need of `notify.Listener` (the one LISTEN/NOTIFY connection)."""

    @property
    def healthy(self) -> bool: ...

    def subscribe(self, channel: str, callback: Callable[[str], None]) -> None: ...

    def on_reset(self, callback: Callable[[], None]) -> None: ...


class SessionRegistry:
    """Which sessions are live, as this process knows it, so that checking a token's session
    costs no round trip. A session seen for the first time is looked up once and then
    trusted until a NOTIFY (or this process) says it ended; a generation counter keeps a
    lookup that raced with an end from being trusted. Without a healthy listener, every
    check asks the database (fail closed). Both maps are bounded: a dropped entry only costs
    a lookup."""

    MAX_ENTRIES = 100_000

    def __init__(self, pool: ConnectionPool, listener: Listener | None = None):
        self._pool, self._listener = pool, listener
        self._live: OrderedDict[str, float] = OrderedDict()  # sid -> expiry (Unix seconds)
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._generation = 0  # bumped by every end and every listener reset
        self._lock = threading.Lock()
        if listener is not None:
            listener.subscribe(SESSIONS_CHANNEL, self._heard)
            listener.on_reset(self._deafened)

    def is_live(self, sid: str, now: float) -> bool:
        """True while session `sid` has not ended nor expired."""
        if self._listener is None or not self._listener.healthy:
            found = self._lookup(sid)  # cannot hear ends: trust nothing remembered
            return found is not None and found > now
        with self._lock:
            if sid in self._ended:
                return False
            expires, generation = self._live.get(sid), self._generation
        if expires is not None:
            return expires > now
        found = self._lookup(sid)
        if found is None or found <= now:
            return False
        with self._lock:
            # An end heard (or a reset) while we looked: our answer may predate it.
            if generation == self._generation:
                self._live[sid] = found
                while len(self._live) > self.MAX_ENTRIES:
                    self._live.popitem(last=False)
        return True

    def forget(self, sids: Iterable[str]) -> None:
        """Sessions that ended (heard from the listener, or ended by this process)."""
        with self._lock:
            self._generation += 1
            for sid in sids:
                self._live.pop(sid, None)
                self._ended[sid] = None
                self._ended.move_to_end(sid)
            while len(self._ended) > self.MAX_ENTRIES:
                self._ended.popitem(last=False)

    def _heard(self, sid: str) -> None:
        # '' is a TRUNCATE of the sessions table: every session ended.
        if sid:
            self.forget((sid,))
        else:
            self._deafened()

    def _deafened(self) -> None:
        # The listener reconnected: ends may have gone unheard, so every live entry is stale.
        with self._lock:
            self._generation += 1
            self._live.clear()

    def _lookup(self, sid: str) -> float | None:
        expires = session_store.live_session_expiry(self._pool, sid)
        return expires.timestamp() if expires is not None else None


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


def access_claims(
    request: Request, config: Config, sessions: SessionRegistry, now: float
) -> dict[str, Any]:
    """The claims of a request's access token valid at `now`, of a session live at `now` (no
    round trip once this process knows the session); the caller checks the user exists."""
    claims = token_claims(config, bearer_token(request), ACCESS, now)
    if not sessions.is_live(claims["sid"], now):
        raise session_ended()
    return claims


def access_token_subject(
    request: Request, config: Config, sessions: SessionRegistry, now: float
) -> str:
    """The username of a request's access token valid at `now`, of a live session; the caller
    checks the user exists."""
    return access_claims(request, config, sessions, now)["sub"]


def current_caller(
    request: Request,
    config: Config,
    pool: ConnectionPool,
    sessions: SessionRegistry,
    now: float,
) -> Caller:
    """The caller of a request carrying an access token valid at `now`, of a live session."""
    claims = access_claims(request, config, sessions, now)
    role = store.user_role(pool, claims["sub"])
    if role is None:
        raise user_gone()
    return Caller(claims["sub"], role, claims["sid"])


# --- session lifecycle ----------------------------------------------------------------------


def start_session(config: Config, pool: ConnectionPool, user: store.User, now: float) -> dict:
    """A login: a new session of `user` and its first token pair."""
    sid, refresh_jti = new_id(), new_id()
    session_store.start_session(pool, user.id, sid, refresh_jti, refresh_expiry(config, now))
    return issue_tokens(config, user.username, user.role, now, sid, refresh_jti)


def refresh_session(
    config: Config, pool: ConnectionPool, sessions: SessionRegistry, token: str, now: float
) -> dict:
    """Spend a refresh token for the next pair of its session (RFC 9700 §4.14.2). A token that
    is not the session's current one was spent already: reuse, and the session ends."""
    claims = token_claims(config, token, REFRESH, now)
    sid, next_jti = claims["sid"], new_id()
    user = session_store.rotate_refresh(
        pool, sid, claims["jti"], next_jti, refresh_expiry(config, now), _instant(now)
    )
    if user is None:
        # Spent, or the session ended (logout, reuse, expiry, its user deleted). Spent is
        # the case that matters: the owner and a thief both hold it, and we cannot tell which
        # one this is, so the session ends for both. The loser of two simultaneous refreshes
        # lands here too; that is the same race a thief runs.
        if session_store.end_session(pool, sid, "refresh token reuse"):
            log.warning("refresh token reuse: session of %r ended", claims["sub"])
        sessions.forget((sid,))
        raise Unauthorized(
            "invalid token: refresh token already used or session ended", token_sent=True
        )
    return issue_tokens(config, user[0], user[1], now, sid, next_jti)


def logout(
    config: Config,
    pool: ConnectionPool,
    sessions: SessionRegistry,
    request: Request,
    refresh_token: str | None,
    now: float,
) -> None:
    """End the session of the request's bearer access token, or else of `refresh_token`
    (either checked at `now`); 401 when there is neither, or the session had ended already."""
    if request.headers.get("authorization") or refresh_token is None:
        sid = token_claims(config, bearer_token(request), ACCESS, now)["sid"]
        current: bool | None = session_store.end_session(pool, sid, "logout") or None
    else:
        claims = token_claims(config, refresh_token, REFRESH, now)
        sid = claims["sid"]
        current = session_store.end_with_refresh(pool, sid, claims["jti"])
    sessions.forget((sid,))
    if current is None:
        raise session_ended()
    if not current:
        log.warning("refresh token reuse at logout: session ended")
        raise Unauthorized(
            "invalid token: refresh token already used; the session has ended", token_sent=True
        )


def change_password(
    pool: ConnectionPool, sessions: SessionRegistry, user: store.User, sid: str, hashed: str
) -> None:
    """Set a user's new password hash; every session of theirs but `sid` ends."""
    sessions.forget(session_store.change_password(pool, user.id, hashed, sid))


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
    """bcrypt work, at most `concurrency` at once, so logins cannot take every core.

    Requests queue for a slot, first come first served (a released slot is handed to the
    oldest waiter). The time one bcrypt operation takes is measured (an EWMA), so a request
    whose wait, given the queue ahead of it, would exceed `login_wait_s` is refused at once
    with 503 and a `Retry-After` computed from that queue, instead of waiting in vain; a
    waiter re-checks as the measurement moves (before the first one, nothing is refused early).
    """

    EWMA_WEIGHT = 0.2  # of the newest sample: follows a machine that gets busier in ~5 hashes
    RECHECK_S = 0.25  # how often a waiter looks at its expected wait again

    def __init__(self, config: Config):
        self._cost, self._wait_s = config.bcrypt_cost, config.login_wait_s
        self._concurrency = config.login_concurrency
        self._lock = threading.Lock()
        self._running = 0  # slots held
        self._waiting: deque[threading.Event] = deque()  # oldest first; set = slot handed over
        self._hash_s: float | None = None  # measured time of one bcrypt operation

    def verify(self, password: str, hashed: str | None) -> bool:
        """bcrypt (or the dummy hash for an unknown user, same time) inside a slot."""
        return self._bounded(passwords.verify_password, password, hashed, self._cost)

    def hash(self, password: str) -> str:
        """A new bcrypt hash inside a slot."""
        return self._bounded(passwords.hash_password, password, self._cost)

    def expected_wait_s(self, ahead: int) -> float:
        """How long a request with `ahead` others holding or awaiting a slot would wait."""
        return 0.0 if ahead < self._concurrency else self._wait_behind(ahead - self._concurrency)

    def _wait_behind(self, waiters: int) -> float:
        # With every slot busy and `waiters` queued ahead, a slot comes after `waiters + 1`
        # operations end, `concurrency` of them at a time.
        if self._hash_s is None:
            return 0.0
        return (waiters + 1) * self._hash_s / self._concurrency

    def _busy(self, expected_s: float) -> ApiError:
        # Retry when the queue will have drained to what a wait can cover.
        return retry_later(
            503, "too many logins in progress, retry shortly", expected_s - self._wait_s
        )

    def _acquire(self) -> None:
        deadline = time.monotonic() + self._wait_s
        with self._lock:
            if self._running < self._concurrency and not self._waiting:
                self._running += 1
                return
            expected = self._wait_behind(len(self._waiting))
            if expected > self._wait_s:
                raise self._busy(expected)
            turn = threading.Event()
            self._waiting.append(turn)
        while not turn.wait(max(0.0, min(self.RECHECK_S, deadline - time.monotonic()))):
            with self._lock:
                if turn.is_set():  # handed over between the wait and the lock
                    return
                now, expected = time.monotonic(), self._wait_behind(self._waiting.index(turn))
                if now >= deadline or now + expected > deadline:
                    self._waiting.remove(turn)
                    raise self._busy(max(expected, self._wait_s + 1))

    def _release(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # the slot passes on: `_running` stays
            else:
                self._running -= 1

    def _bounded(self, function, *args):
        self._acquire()
        try:
            started = time.perf_counter()
            result = function(*args)
            self._measured(time.perf_counter() - started)
            return result
        finally:
            self._release()

    def _measured(self, seconds: float) -> None:
        with self._lock:
            previous = self._hash_s
            self._hash_s = (
                seconds if previous is None else previous + self.EWMA_WEIGHT * (seconds - previous)
            )


def require_admin(caller: Caller) -> None:
    """403 unless the caller is an admin."""
    if not caller.is_admin:
        raise ApiError(403, "admin role required")
