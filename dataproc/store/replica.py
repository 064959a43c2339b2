"""Reads of points from a streaming standby (`DATAPROC_READ_DATABASE_URL`), with the primary
standing in whenever the standby does not answer.

Owns: the standby's pool, the choice between it and the primary, and the page query's form
that takes the viewer's role as a parameter. Leaves the role itself to the primary: users,
sessions and role checks are read there (a standby may lag, and a demoted admin or a deleted
user must lose access as fast as on the primary), so a page read from the standby costs one
extra round trip to the primary for the role.

Freshness (README "Partitions, retention and a read replica"): a standby shows the primary's
committed state as of its last replayed WAL record, so a reader may see the data as it was up
to the standby's replay lag ago (usually milliseconds on a healthy link; unbounded while replay
is paused or behind) — never a state that did not exist, never rows out of order, and never a
point the caller's role may not see (the role comes from the primary).

When the standby fails (refused, timed out, a dropped connection), the read is retried on the
primary at once, within the database wait, and the standby is left alone for `DOWN_S`; the
next read after that tries it again, so a standby that comes back is used again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from psycopg_pool import ConnectionPool

from . import (
    SELECT_PAGE,
    DatabaseUnavailable,
    Page,
    make_pool,
    one_row,
    page_params,
    read_one,
    user_role,
)
from . import (
    list_points as list_points_on,
)

log = logging.getLogger("dataproc.replica")

T = TypeVar("T")
DOWN_S = 2.0  # after a failure, how long reads skip the standby before trying it again

# A read that looks its viewer's role up, in the form that takes the role as a parameter
# (read on the primary): every such query of the store names the viewer this one way.
_VIEWER = "FROM users WHERE username = %(viewer)s"
_GIVEN_ROLE = "FROM (SELECT %(role)s::varchar AS role) AS given"


def for_role(sql: str) -> str:
    """`sql` with its viewer's role taken from `%(role)s` instead of the users table."""
    if _VIEWER not in sql:
        raise ValueError("a read through the standby must look its viewer up as store does")
    return sql.replace(_VIEWER, _GIVEN_ROLE)


def make_standby_pool(conninfo: str, *, max_size: int, wait_s: float) -> ConnectionPool:
    """The standby's pool, opened without waiting: the service starts whether or not the
    standby answers (reads go to the primary until it does). A short wait for a connection,
    so that falling back to the primary fits in the database wait."""
    pool = make_pool(conninfo, max_size=max_size, wait_s=wait_s, name="dataproc-standby")
    pool.open(wait=False)
    return pool


class Reads:
    """Where reads of points go: the standby when there is one and it answers, else the primary."""

    def __init__(self, primary: ConnectionPool, standby: ConnectionPool | None = None):
        self.primary, self.standby = primary, standby
        self.standby_reads = 0  # reads the standby answered (tests and metrics look)
        self.fallbacks = 0  # reads the primary answered because the standby did not
        self._down_until = 0.0
        self._lock = threading.Lock()

    @property
    def standby_up(self) -> bool:
        """True when reads try the standby first."""
        return self.standby is not None and time.monotonic() >= self._down_until

    def run(self, read: Callable[[ConnectionPool], T]) -> T:
        """`read(pool)` on the standby, or on the primary when the standby fails or is down."""
        if self.standby is not None and self.standby_up:
            try:
                result = read(self.standby)
            except DatabaseUnavailable as error:
                self._mark_down(error)
            else:
                with self._lock:
                    self.standby_reads += 1
                return result
        return read(self.primary)

    def _mark_down(self, error: DatabaseUnavailable) -> None:
        with self._lock:
            first = time.monotonic() >= self._down_until
            self._down_until = time.monotonic() + DOWN_S
            self.fallbacks += 1
        if first:
            log.warning(
                "read standby not answering (%s): reading from the primary, retrying the "
                "standby in %g s",
                error.detail,
                DOWN_S,
            )

    def read_as_viewer(self, sql: str, params: dict) -> tuple | None:
        """`read_one` of a statement that looks up `params["viewer"]`'s role: with a standby,
        the role from the primary and the statement on the standby (or the primary)."""
        if self.standby is None:
            return read_one(self.primary, sql, params)
        role = user_role(self.primary, params["viewer"])
        if role is None:  # no such viewer: the primary answers the "nobody" row
            return read_one(self.primary, sql, params)
        given = {**params, "role": role}
        return self.run(lambda pool: read_one(pool, for_role(sql), given))

    def close(self) -> None:
        """Close the standby's pool (the primary's belongs to the service)."""
        if self.standby is not None:
            self.standby.close(timeout=5)


def list_points(reads: Reads, **query) -> Page | None:
    """`store.list_points` through `reads`: with a standby, the role from the primary and the
    page (with the data version of its snapshot) from the standby, or from the primary when
    the standby fails. None: no such viewer."""
    if reads.standby is None:
        return list_points_on(reads.primary, **query)
    row = one_row(reads.read_as_viewer(SELECT_PAGE, page_params(**query)))
    role, body, count, last_time, last_id, version = row
    if role is None:
        return None
    return Page(body.encode(), count, (last_time, last_id) if count else None, role, version)
