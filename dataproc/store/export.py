"""The export's query: every visible point of a window in `(time, id)` order, as ready-made CSV
or NDJSON lines, from a server-side cursor on a connection of its own.

Owns: the export's SQL, its dedicated connection (never one of the pool's: an export may run
for minutes, and API reads must not wait behind it), fetching in batches so that memory stays
constant whatever the window holds, and cancelling the query when the reader goes away. Leaves
the HTTP framing (chunks, gzip, truncation on failure) to `server`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

import psycopg

from . import _POINT_JSON, MIN_ID, NO_LOWER_BOUND, NO_UPPER_BOUND, DatabaseUnavailable

log = logging.getLogger("dataproc.store")

APPLICATION_NAME = "dataproc export"
BATCH_ROWS = 5_000  # one chunk: ~0.5 MB of CSV, a few ms of database time

CSV_HEADER = b"id,time,value,valid,tags\r\n"

# RFC 4180: CRLF line ends; only the tags field (a JSON array) can hold a comma or a quote,
# and then it is quoted with its quotes doubled. `value` as JSON shows it (float8 text is the
# shortest exact form, as Python's repr), empty for a non-finite value.
_CSV_LINE = """(p.id || ','
    || btrim(to_json(p.time AT TIME ZONE 'UTC')::text, '"') || 'Z,'
    || CASE WHEN p.value IN ('NaN'::float8, 'Infinity', '-Infinity') THEN ''
            ELSE p.value::text END || ','
    || p.valid || ','
    || CASE WHEN t.json ~ '[",]' THEN '"' || replace(t.json, '"', '""') || '"' ELSE t.json END
    || E'\\r\\n')"""
_NDJSON_LINE = f"({_POINT_JSON} || E'\\n')"

_SELECT_LINES = """
SELECT {line}
FROM data_points p CROSS JOIN LATERAL (SELECT coalesce(array_to_json(p.tags)::text, '[]')) t(json)
WHERE (p.time, p.id) >= (%(from_time)s, %(from_id)s) AND p.time <= %(end)s
  AND (p.valid OR %(everything)s)
ORDER BY p.time, p.id"""
SELECT_LINES = {
    "csv": _SELECT_LINES.format(line=_CSV_LINE),
    "ndjson": _SELECT_LINES.format(line=_NDJSON_LINE),
}


class Export:
    """The lines of one export as an iterator of byte chunks.

    `start()` connects and fetches the first batch, so that a database that does not answer is
    a clean 503 before any byte is sent. `close()` — at the end, on a failure, or when the
    client went away — cancels a running query, closes the connection and releases the
    export's slot, exactly once, from any thread.
    """

    def __init__(
        self,
        conninfo: str,
        fmt: str,
        *,
        start: datetime | None,
        end: datetime | None,
        everything: bool,
        connect_timeout_s: float,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self._conninfo, self._fmt, self._timeout = conninfo, fmt, connect_timeout_s
        self._params = {
            "from_time": start or NO_LOWER_BOUND,
            "from_id": MIN_ID,
            "end": end or NO_UPPER_BOUND,
            "everything": everything,
        }
        self._release = release
        self._conn: psycopg.Connection | None = None
        self._cursor: psycopg.ServerCursor | None = None
        self._first: bytes | None = None
        self._done = False
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> Export:
        """Connect, declare the cursor and fetch the first batch; `DatabaseUnavailable` if the
        database does not answer (the slot is released then)."""
        try:
            self._conn = psycopg.connect(
                self._conninfo,
                connect_timeout=max(1, round(self._timeout)),
                application_name=APPLICATION_NAME,  # an operator sees exports in pg_stat_activity
            )
            self._conn.read_only = True
            self._cursor = self._conn.cursor(name="dataproc_export")
            self._cursor.execute(SELECT_LINES[self._fmt], self._params)
            header = CSV_HEADER if self._fmt == "csv" else b""
            self._first = header + self._fetch()
        except psycopg.Error as error:
            self.close()
            log.warning(
                "export could not start: %s", str(error).splitlines()[0] if str(error) else error
            )
            raise DatabaseUnavailable() from None
        return self

    def _fetch(self) -> bytes:
        assert self._cursor is not None  # start() made it
        rows = self._cursor.fetchmany(BATCH_ROWS)
        if len(rows) < BATCH_ROWS:
            self._done = True
        return "".join([row[0] for row in rows]).encode()

    def __iter__(self) -> Export:
        return self

    def __next__(self) -> bytes:
        if self._first is not None:
            chunk, self._first = self._first, None
            if chunk:
                return chunk
        if self._done or self._closed.is_set():
            self.close()
            raise StopIteration
        chunk = self._fetch()
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        """Cancel what runs, close the connection, release the slot; only the first call acts."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        conn = self._conn
        try:
            if conn is not None and not conn.closed:
                if not self._done:
                    conn.cancel_safe(timeout=1)  # a FETCH may be running in another thread
                conn.close()
        except psycopg.Error as error:
            log.info(
                "export connection closed with: %s",
                str(error).splitlines()[0] if str(error) else error,
            )
        finally:
            self._release()
