"""The per-process read cache: answers of read endpoints and who is an admin, kept fresh by
LISTEN/NOTIFY, failing closed.

Owns: an LRU of finished answers (ETag, body, headers) bounded in bytes, keyed by
(route, normalised query, the caller's role) — an answer depends on nothing else — and the
bookkeeping that makes a cached answer as fresh as a database read: the data version
(`dataproc_data_version`, bumped and NOTIFYed by a trigger on every change of data_points),
and a small username → role map for the hit path, so a hit needs no database at all. It also
makes the strong `ETag` of an answer from the same bookkeeping. Leaves the listening to
`notify` and every SQL statement to `store`.

The rules (DESIGN.md, "read cache"):
- Nothing is served, and nothing stored, unless the listener is healthy (hears every write).
- Every reset of the listener (a reconnect: we may have been deaf), every notification of a
  version we do not hold, and every write through this process clears the answers and
  advances an epoch; the users' notifications do the same for the roles.
- An answer is stored only when no such event happened while it was computed (the epoch
  taken BEFORE the query is still current after it) and the version read in the query's own
  snapshot is the version we hold: a read that raced a write is never cached as current.
- A role is cached only from a successful database read, never "no such user": a deleted or
  demoted user's tokens reach the database again at its notification.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

POINTS, USERS = "dataproc_points", "dataproc_users"  # notify's channels (notify.POINTS, USERS)
MAX_ROLES = 100_000  # usernames whose role is kept: about 10 MB at worst, far fewer in practice
_ENTRY_OVERHEAD = 256  # bytes an entry costs beyond its body and headers (key, dicts, object)


class ListenerLike(Protocol):
    """What the cache needs of `notify.Listener`."""

    @property
    def healthy(self) -> bool: ...

    def subscribe(self, channel: str, callback) -> None: ...

    def on_reset(self, callback) -> None: ...


@dataclass(frozen=True, slots=True)
class Answer:
    """A read as the database gave it: the caller's role (None: no such user), the data
    version of the snapshot it was read in, the body and the headers of a 200."""

    role: str | None
    version: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached 200: its strong ETag, body and headers, and the data version it shows."""

    etag: str
    body: bytes
    headers: dict[str, str]
    version: int
    size: int


@dataclass(frozen=True, slots=True)
class Ticket:
    """What `begin()` saw before a query: compared by `store()` after it."""

    epoch: int
    users_epoch: int


def make_etag(version: int, role: str, key: tuple) -> str:
    """The strong tag of the answer to `key` for `role` at data `version`: the same on every
    replica for the same state, different whenever the answer may differ."""
    text = repr((version, role, key)).encode()
    digest = hashlib.sha256(text).digest()[:18]
    return '"' + base64.urlsafe_b64encode(digest).decode() + '"'


def if_none_match_matches(header: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.2: does an `If-None-Match` value (a list, `*`, `W/` tags) match `etag`?
    The weak comparison: `W/"x"` matches `"x"`. (The lead unifies this with protocol/web's.)"""
    if not header:
        return False
    wanted = etag.removeprefix("W/")
    for item in header.split(","):
        item = item.strip()
        if item == "*" or item.removeprefix("W/") == wanted:
            return True
    return False


class ReadCache:
    """Answers and roles, per process; see the module's rules. Thread-safe."""

    def __init__(self, listener: ListenerLike | None, *, max_bytes: int, enabled: bool = True):
        self.max_bytes = max_bytes
        self.enabled = enabled and listener is not None and max_bytes > 0
        self._listener = listener
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self._bytes = 0
        self._version: int | None = None  # the data version we hold; None: learn it from a read
        self._epoch = 0
        self._roles: OrderedDict[str, str] = OrderedDict()
        self._users_epoch = 0
        self.hits = self.misses = 0
        if self.enabled and listener is not None:
            listener.subscribe(POINTS, self._points_changed)
            listener.subscribe(USERS, self._user_changed)
            listener.on_reset(self.reset)

    # --- reads ------------------------------------------------------------------------------

    def usable(self) -> bool:
        """True when a hit may be served: on, and the listener hears every write."""
        listener = self._listener
        return self.enabled and listener is not None and listener.healthy

    def role(self, username: str) -> str | None:
        """The cached role of `username`, or None (unknown: ask the database)."""
        if not self.usable():
            return None
        with self._lock:
            return self._roles.get(username)

    def lookup(self, key: Hashable) -> Entry | None:
        """The cached answer to `key` at the version we hold, or None."""
        if not self.usable():
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.version != self._version:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def current_etag(self, key: tuple, role: str) -> str | None:
        """The tag an answer to `key` for `role` has now, when the version is known (a 304
        needs no entry, only the bookkeeping); None otherwise."""
        if not self.usable():
            return None
        with self._lock:
            version = self._version
        return None if version is None else make_etag(version, role, key)

    # --- filling ----------------------------------------------------------------------------

    def begin(self) -> Ticket:
        """Take this before the query whose answer may be stored."""
        with self._lock:
            return Ticket(self._epoch, self._users_epoch)

    def store(self, ticket: Ticket, key: tuple, answer: Answer, etag: str) -> bool:
        """Keep `answer` (for its role) when nothing changed since `ticket`; True if kept."""
        assert answer.role is not None
        size = (
            len(answer.body)
            + sum(len(k) + len(v) for k, v in answer.headers.items())
            + len(repr(key))
            + _ENTRY_OVERHEAD
        )
        with self._lock:
            if not self._current(ticket) or size > self.max_bytes:
                return False
            if self._version is None:
                self._version = answer.version  # learnt from a snapshot nothing has overtaken
            elif answer.version != self._version:
                return False  # a write we have not heard of yet is in (or missing from) it
            entry = Entry(etag, answer.body, answer.headers, answer.version, size)
            old = self._entries.pop(key, None)
            self._bytes += size - (old.size if old else 0)
            self._entries[key] = entry
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
            return True

    def remember_role(self, ticket: Ticket, username: str, role: str | None) -> None:
        """Keep the role a read found, when no user changed since `ticket`."""
        if role is None:
            return
        with self._lock:
            if not (self.usable() and ticket.users_epoch == self._users_epoch):
                return
            self._roles[username] = role
            self._roles.move_to_end(username)
            while len(self._roles) > MAX_ROLES:
                self._roles.popitem(last=False)

    def _current(self, ticket: Ticket) -> bool:
        return self.usable() and ticket.epoch == self._epoch

    # --- invalidation -----------------------------------------------------------------------

    def wrote(self) -> None:
        """A write through this process committed: its next read must see it, at once."""
        with self._lock:
            self._clear_answers(None)

    def forget_user(self, username: str) -> None:
        """A user changed through this process: its next request asks the database."""
        self._user_changed(username)

    def reset(self) -> None:
        """Everything may have changed (the listener reconnected): drop it all."""
        with self._lock:
            self._clear_answers(None)
            self._roles.clear()
            self._users_epoch += 1

    def _points_changed(self, payload: str) -> None:
        try:
            version: int | None = int(payload)
        except ValueError:
            version = None
        with self._lock:
            if version is not None and version == self._version:
                return  # a write we already read (our own, learnt from a later snapshot)
            self._clear_answers(version)

    def _user_changed(self, username: str) -> None:
        with self._lock:
            if username:
                self._roles.pop(username, None)
            else:  # '' is the users table truncated: everyone
                self._roles.clear()
            self._users_epoch += 1

    def _clear_answers(self, version: int | None) -> None:
        self._entries.clear()
        self._bytes = 0
        self._version = version
        self._epoch += 1

    def stats(self) -> dict[str, int]:
        """Entries, bytes, hits and misses, for metrics and tests."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "roles": len(self._roles),
                "hits": self.hits,
                "misses": self.misses,
            }
