"""Sessions and user administration in PostgreSQL: one function per statement or transaction.

Owns: the SQL of sessions (start, rotate a refresh token, end, the expiry sweep), of claiming
a username before its password is hashed, and of the admin's user operations (list, change,
delete) with the last-admin rule. Leaves tokens and what a session means to `auth`.

A session ends by setting `ended_at` (a trigger in schema.sql then NOTIFYs
`dataproc_sessions`); every function that ends sessions returns their ids, so that the
replica that ended them forgets them at once, before the NOTIFY comes back.

Whether a session has *expired* is decided on the service's clock (`auth` passes its `now`),
never PostgreSQL's `now()`: `expires_at` is written from that clock, and a test that moves
the `Context`'s clock moves session expiry with token expiry. `now()` only stamps events
(`ended_at`, `refreshed_at`, `created_at`) and what is measured from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from psycopg_pool import ConnectionPool

from . import connection, read_one

# --- sessions -------------------------------------------------------------------------------

INSERT_SESSION = """
INSERT INTO sessions (id, user_id, refresh_jti, expires_at) VALUES (%s, %s, %s, %s)"""

# Spends the refresh token `jti` of a live session and puts the next one in its place. The
# row lock makes two simultaneous refreshes queue: the second re-reads the row, finds the jti
# changed, and updates nothing. The user's name and role come from the same statement.
ROTATE_REFRESH = """
UPDATE sessions s SET refresh_jti = %(new_jti)s, expires_at = %(expires_at)s, refreshed_at = now()
FROM users u
WHERE s.id = %(sid)s AND s.refresh_jti = %(jti)s AND s.ended_at IS NULL
  AND s.expires_at > %(now)s AND u.id = s.user_id
RETURNING u.username, u.role"""

END_SESSION = """
UPDATE sessions SET ended_at = now(), end_reason = %s
WHERE id = %s AND ended_at IS NULL RETURNING id"""

# Logout with a refresh token: the session ends either way; whether the token was its current
# one (`true`) or a spent one (reuse) decides the answer.
END_WITH_REFRESH = """
UPDATE sessions SET ended_at = now(),
  end_reason = CASE WHEN refresh_jti = %(jti)s THEN 'logout' ELSE 'refresh token reuse' END
WHERE id = %(sid)s AND ended_at IS NULL RETURNING refresh_jti = %(jti)s"""

# Not ended; whether it has expired is the caller's comparison, on its clock.
SELECT_LIVE_SESSION = "SELECT expires_at FROM sessions WHERE id = %s AND ended_at IS NULL"

END_USER_SESSIONS = """
UPDATE sessions SET ended_at = now(), end_reason = %(reason)s
WHERE user_id = %(user_id)s AND ended_at IS NULL AND id IS DISTINCT FROM %(keep)s RETURNING id"""

SET_PASSWORD = "UPDATE users SET hashed_password = %s WHERE id = %s"

SWEEP_LOCK_KEY = 7261657273  # shared by every replica; neither the schema's nor the poller's
TRY_SWEEP_LOCK = "SELECT pg_try_advisory_xact_lock(%s)"
# Expired sessions (on the service's clock), and ended ones once a day has passed (kept that
# long to tell a spent token from an unknown one in the logs; `ended_at` is PostgreSQL's), in
# batches so no statement holds locks for long.
SWEEP_SESSIONS = """
DELETE FROM sessions WHERE id IN (
  SELECT id FROM sessions
  WHERE expires_at < %(now)s OR ended_at < now() - %(keep_ended_s)s * interval '1 second'
  LIMIT %(batch)s)"""


def start_session(
    pool: ConnectionPool, user_id: int, sid: str, refresh_jti: str, expires_at: datetime
) -> None:
    """Record a new session whose current refresh token is `refresh_jti`."""
    with connection(pool) as conn:
        conn.execute(INSERT_SESSION, (sid, user_id, refresh_jti, expires_at))


def rotate_refresh(
    pool: ConnectionPool, sid: str, jti: str, new_jti: str, expires_at: datetime, now: datetime
) -> tuple[str, str] | None:
    """Spend refresh token `jti` of session `sid`, live at `now`, for `new_jti`: the user's
    (name, role), or None when `jti` is not the session's current token or the session is not
    live."""
    params = {"sid": sid, "jti": jti, "new_jti": new_jti, "expires_at": expires_at, "now": now}
    with connection(pool) as conn:
        row = conn.execute(ROTATE_REFRESH, params).fetchone()
    return (row[0], row[1]) if row else None


def end_session(pool: ConnectionPool, sid: str, reason: str) -> bool:
    """End a live session; False when it had ended already (or never existed)."""
    with connection(pool) as conn:
        return conn.execute(END_SESSION, (reason, sid)).fetchone() is not None


def end_with_refresh(pool: ConnectionPool, sid: str, jti: str) -> bool | None:
    """End live session `sid`: True when `jti` was its current refresh token, False when it
    was a spent one (reuse: ended all the same), None when there was no live session."""
    with connection(pool) as conn:
        row = conn.execute(END_WITH_REFRESH, {"sid": sid, "jti": jti}).fetchone()
    return None if row is None else bool(row[0])


def live_session_expiry(pool: ConnectionPool, sid: str) -> datetime | None:
    """When session `sid` expires (perhaps already: the caller compares with its clock), or
    None when it ended or never existed."""
    row = read_one(pool, SELECT_LIVE_SESSION, (sid,))
    return row[0] if row else None


def change_password(
    pool: ConnectionPool, user_id: int, hashed_password: str, keep_sid: str
) -> list[str]:
    """Set a user's password and end every other session of theirs (ids returned)."""
    params = {"reason": "password changed", "user_id": user_id, "keep": keep_sid}
    with connection(pool) as conn, conn.transaction():
        conn.execute(SET_PASSWORD, (hashed_password, user_id))
        return [row[0] for row in conn.execute(END_USER_SESSIONS, params).fetchall()]


def sweep_sessions(
    pool: ConnectionPool, keep_ended_s: float, now: datetime, batch: int = 10_000
) -> int | None:
    """Delete sessions expired at `now` and ended ones older than `keep_ended_s`, one batch per
    transaction under a lock only one replica gets; the rows removed, or None when another
    replica holds the lock."""
    removed = 0
    while True:
        with connection(pool) as conn, conn.transaction():
            locked = conn.execute(TRY_SWEEP_LOCK, (SWEEP_LOCK_KEY,)).fetchone()
            if not (locked and locked[0]):
                return None if removed == 0 else removed
            count = conn.execute(
                SWEEP_SESSIONS, {"keep_ended_s": keep_ended_s, "now": now, "batch": batch}
            ).rowcount
        removed += count
        if count < batch:
            return removed


# --- claiming a username before hashing (signup bursts) -------------------------------------

PENDING_PASSWORD = "!pending"  # never a bcrypt hash: no password matches it while it is there

# A placeholder row claims the name; a placeholder older than `stale_s` (its signup died
# between claim and hash) may be claimed again. RETURNING id only when this call claimed it.
CLAIM_USERNAME = """
INSERT INTO users (username, hashed_password, role) VALUES (%(username)s, %(pending)s, 'user')
ON CONFLICT (username) DO UPDATE SET created_at = now()
  WHERE users.hashed_password = %(pending)s
    AND users.created_at < now() - %(stale_s)s * interval '1 second'
RETURNING id"""
SET_CLAIMED_PASSWORD = """
UPDATE users SET hashed_password = %s, created_at = now()
WHERE id = %s AND hashed_password = %s"""
RELEASE_CLAIM = "DELETE FROM users WHERE id = %s AND hashed_password = %s"
DELETE_STALE_CLAIMS = """
DELETE FROM users WHERE hashed_password = %s AND created_at < now() - %s * interval '1 second'"""


def claim_username(pool: ConnectionPool, username: str, stale_s: float) -> int | None:
    """The id of a placeholder user that claims `username`, or None when it is taken."""
    params = {"username": username, "pending": PENDING_PASSWORD, "stale_s": stale_s}
    with connection(pool) as conn:
        row = conn.execute(CLAIM_USERNAME, params).fetchone()
    return row[0] if row else None


def complete_claim(pool: ConnectionPool, user_id: int, hashed_password: str) -> bool:
    """Give a claimed user its password; False when the claim was lost (taken over as stale)."""
    with connection(pool) as conn:
        return (
            conn.execute(
                SET_CLAIMED_PASSWORD, (hashed_password, user_id, PENDING_PASSWORD)
            ).rowcount
            == 1
        )


def release_claim(pool: ConnectionPool, user_id: int) -> None:
    """Give a claimed name back (its password could not be hashed)."""
    with connection(pool) as conn:
        conn.execute(RELEASE_CLAIM, (user_id, PENDING_PASSWORD))


def delete_stale_claims(pool: ConnectionPool, stale_s: float) -> int:
    """Remove placeholders older than `stale_s` (their signup died between claim and hash)."""
    with connection(pool) as conn:
        return conn.execute(DELETE_STALE_CLAIMS, (PENDING_PASSWORD, stale_s)).rowcount


# --- user administration --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    """A user as the admin endpoints show it."""

    username: str
    role: str
    created_at: str  # RFC 3339, UTC, "Z"


class LastAdmin(Exception):
    """The change would leave no admin."""


# created_at as RFC 3339 UTC text, a fraction only when not zero (PostgreSQL's JSON
# timestamps trim it so), as data points show their time.
_CREATED_AT = "btrim(to_json(created_at AT TIME ZONE 'UTC')::text, '\"') || 'Z'"
SELECT_USERS = f"""
SELECT username, role, {_CREATED_AT} FROM users WHERE hashed_password <> %s
ORDER BY username OFFSET %s LIMIT %s"""
# Every admin row locked, in one order (no deadlock between two admins' transactions), with
# FOR NO KEY UPDATE so that logins (whose session insert takes KEY SHARE) are not blocked.
# Two concurrent demotions of the last two admins then queue: the second re-reads the rows
# after the first commits and counts one admin.
LOCK_ADMINS = "SELECT id FROM users WHERE role = 'admin' ORDER BY id FOR NO KEY UPDATE"
LOCK_USER = """
SELECT id, role FROM users WHERE username = %s AND hashed_password <> %s FOR NO KEY UPDATE"""
UPDATE_USER = f"""
UPDATE users SET role = coalesce(%(role)s, role),
  hashed_password = coalesce(%(hashed)s, hashed_password)
WHERE id = %(id)s RETURNING username, role, {_CREATED_AT}"""
DELETE_USER = "DELETE FROM users WHERE id = %s"


def list_users(pool: ConnectionPool, skip: int, limit: int) -> list[Account]:
    """A page of users ordered by username (placeholders of signups in progress left out)."""
    with connection(pool) as conn:
        rows = conn.execute(SELECT_USERS, (PENDING_PASSWORD, skip, limit)).fetchall()
    return [Account(*row) for row in rows]


def update_user(
    pool: ConnectionPool, username: str, role: str | None, hashed_password: str | None
) -> tuple[Account, list[str]] | None:
    """Change a user's role and/or password; a reset or a demotion ends their sessions.
    Returns the user and the ended session ids; None for an unknown user; raises `LastAdmin`."""
    with connection(pool) as conn, conn.transaction():
        admins = [row[0] for row in conn.execute(LOCK_ADMINS).fetchall()]
        target = conn.execute(LOCK_USER, (username, PENDING_PASSWORD)).fetchone()
        if target is None:
            return None
        user_id, old_role = target
        demoted = old_role == "admin" and role == "user"
        if demoted and not set(admins) - {user_id}:
            raise LastAdmin()
        row = conn.execute(
            UPDATE_USER, {"role": role, "hashed": hashed_password, "id": user_id}
        ).fetchone()
        ended: list[str] = []
        if demoted or hashed_password is not None:
            reason = "password reset" if hashed_password is not None else "role changed"
            params = {"reason": reason, "user_id": user_id, "keep": None}
            ended = [r[0] for r in conn.execute(END_USER_SESSIONS, params).fetchall()]
    if row is None:  # the row is locked by us: it cannot have gone
        raise RuntimeError(f"user {username!r} vanished under its lock")
    return Account(*row), ended


def delete_user(pool: ConnectionPool, username: str) -> list[str] | None:
    """Delete a user (their sessions end, then go with them); the ended session ids, or None
    for an unknown user; raises `LastAdmin`."""
    with connection(pool) as conn, conn.transaction():
        admins = [row[0] for row in conn.execute(LOCK_ADMINS).fetchall()]
        target = conn.execute(LOCK_USER, (username, PENDING_PASSWORD)).fetchone()
        if target is None:
            return None
        user_id, role = target
        if role == "admin" and not set(admins) - {user_id}:
            raise LastAdmin()
        params = {"reason": "user deleted", "user_id": user_id, "keep": None}
        ended = [row[0] for row in conn.execute(END_USER_SESSIONS, params).fetchall()]
        conn.execute(DELETE_USER, (user_id,))
    return ended
