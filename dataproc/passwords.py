"""Password hashing with bcrypt.

Owns: hashing, verifying, enforcing the 72-byte rule (`rules.MAX_PASSWORD_BYTES`: bcrypt
only reads 72 bytes; bcrypt >= 5 raises beyond that and older versions silently truncate, so
the rule is enforced here for every version), and the dummy hash that makes an unknown user
cost as much time as a wrong password.

Leaves to others: users, roles, login throttling and HTTP (``auth``), where hashes are
stored (``store``), and which cost to use (``config``).

Importing this module does no work: the dummy hash for a cost is computed on first use.
"""

from __future__ import annotations

import functools
import re

import bcrypt

from .rules import MAX_PASSWORD_BYTES

__all__ = [
    "MAX_PASSWORD_BYTES",
    "PasswordTooLong",
    "hash_password",
    "verify_password",
]

# "$2b$12$" + 22 characters of salt + 31 of checksum, in bcrypt's base64 alphabet.
# $2a$, $2x$ and $2y$ are older spellings of the same scheme that bcrypt still checks.
_BCRYPT_HASH = re.compile(r"\$2[abxy]\$[0-9]{2}\$[./A-Za-z0-9]{53}")

_DUMMY_PASSWORD = b"dataproc: no such user"


class PasswordTooLong(ValueError):
    """The password is over MAX_PASSWORD_BYTES bytes of UTF-8."""


def hash_password(password: str, cost: int) -> str:
    """Hash a password with bcrypt at the given cost; raises PasswordTooLong over 72 bytes."""
    secret = password.encode("utf-8")
    if len(secret) > MAX_PASSWORD_BYTES:
        raise PasswordTooLong(
            f"password is {len(secret)} bytes of UTF-8; bcrypt uses at most {MAX_PASSWORD_BYTES}"
        )
    return bcrypt.hashpw(secret, bcrypt.gensalt(rounds=cost)).decode("ascii")


def verify_password(password: str, hashed: str | None, cost: int) -> bool:
    """True when password matches hashed; False otherwise, in the time a real check takes."""
    secret = _usable_secret(password)
    stored = _usable_hash(hashed)
    if secret is not None and stored is not None:
        try:
            return bcrypt.checkpw(secret, stored)
        except ValueError:
            pass  # a hash bcrypt refuses (e.g. bad salt bits): fall through to the dummy work
    # An unknown user, a broken hash or an over-long password must not answer faster
    # than a wrong password does, or the timing tells which usernames exist.
    bcrypt.checkpw(_DUMMY_PASSWORD, _dummy_hash(cost))
    return False


def _usable_secret(password: str) -> bytes | None:
    """The password as bcrypt input, or None when it cannot match any stored hash."""
    try:
        secret = password.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):  # not a str, or lone surrogates
        return None
    return secret if len(secret) <= MAX_PASSWORD_BYTES else None


def _usable_hash(hashed: str | None) -> bytes | None:
    """The stored hash as bytes, or None when it is missing or not a bcrypt hash."""
    if not isinstance(hashed, str) or _BCRYPT_HASH.fullmatch(hashed) is None:
        return None
    return hashed.encode("ascii")


@functools.lru_cache(maxsize=8)
def _dummy_hash(cost: int) -> bytes:
    """A hash of a fixed password at this cost, made once per cost on first need."""
    return bcrypt.hashpw(_DUMMY_PASSWORD, bcrypt.gensalt(rounds=cost))
