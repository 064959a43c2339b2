"""The API's rules, each written once: who may be a user, how long a password may be, the
ranges of `limit`, `skip` and `count`, and the shape of a page cursor.

Owns: the numbers and patterns that the handlers (`api`) enforce, the OpenAPI document
(`openapi`) publishes and the command line (`__main__`) checks, so the three cannot disagree
(`tests/unit/test_openapi.py` compares the document with this module). Leaves to others what
happens when a rule is broken (a 422 in `api`, one line on stderr in `__main__`). A leaf: it
imports nothing, so every layer may read it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A username: 3 to 64 characters from a small ASCII set (no spaces, nothing a URL or a log
# line would need to escape).
USERNAME_MIN, USERNAME_MAX = 3, 64
USERNAME_PATTERN = f"[A-Za-z0-9._@-]{{{USERNAME_MIN},{USERNAME_MAX}}}"
USERNAME = re.compile(USERNAME_PATTERN)
USERNAME_RULE = f"{USERNAME_MIN} to {USERNAME_MAX} characters from A-Z a-z 0-9 . _ @ -"

# bcrypt reads only the first 72 bytes of a password (bcrypt >= 5 raises beyond, older
# versions silently truncate): a longer one is refused, never cut. `passwords` enforces it.
MAX_PASSWORD_BYTES = 72
# The shortest password accepted for a new account, unless DATAPROC_PASSWORD_MIN_BYTES says.
DEFAULT_PASSWORD_MIN_BYTES = 8


def password_rule(minimum: int) -> str:
    """The password rule as the API and the command line state it."""
    return f"must be {minimum} to {MAX_PASSWORD_BYTES} bytes of UTF-8"


def password_fits(password: str, minimum: int) -> bool:
    """True when `password` is `minimum` to MAX_PASSWORD_BYTES bytes of UTF-8."""
    return minimum <= len(password.encode()) <= MAX_PASSWORD_BYTES


@dataclass(frozen=True)
class Range:
    """An integer parameter's inclusive bounds."""

    low: int
    high: int

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.low <= value <= self.high


LIMIT, DEFAULT_LIMIT = Range(1, 1000), 100  # rows per page of /api/data
SKIP, DEFAULT_SKIP = Range(0, 1_000_000_000), 0  # rows skipped first (a keyset cursor is faster)
COUNT = Range(1, 100)  # points one /api/populate call fetches (absent: one point, not a batch)

# A keyset cursor as `/api/data` writes it in its `Link` header: base64url, unpadded.
CURSOR_PATTERN = "[A-Za-z0-9_-]{1,64}"
