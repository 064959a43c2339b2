"""Log set-up: one line per record, as text or as JSON lines (`DATAPROC_LOG_FORMAT=json`).

Owns: the handler and the formatters. Records are written by one background thread
(`BackgroundHandler`): the request threads only queue them, so they never wait for one
another on the stream's lock or for the write to stderr (an access-log line per request made
that lock the most contended point of the server). Leaves what is logged to each module; no module logs
tokens, passwords, bodies or query strings, so nothing here has to scrub them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time

# Fields the access log attaches with `extra=`; the JSON formatter copies them when present.
WRITE_EVERY_S = 0.05  # how long a log line may wait in the queue before it is written
EXTRA_FIELDS = ("request_id", "method", "route", "status", "duration_ms", "bytes", "client")


_second: tuple[int, str] = (-1, "")


def utc_second(created: float) -> str:
    """`created` as `YYYY-MM-DDTHH:MM:SS` in UTC, formatted once per second: every access-log
    line asks, and `strftime` costs more than the rest of a text line."""
    global _second
    whole = int(created)
    cached = _second  # one read: another thread may replace it meanwhile
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return cached[1]


class TextFormatter(logging.Formatter):
    """`time.mmmZ LEVEL logger message` (UTC, milliseconds), the time from `utc_second`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_second(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the request fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": utc_second(record.created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class BackgroundHandler(logging.Handler):
    """Queues each record (without a lock: `SimpleQueue.put` is atomic) for one thread that
    hands it to `target`. The message is formatted from its arguments here, in the caller's
    thread, so a later change to an argument cannot alter the line. `flush` waits until what
    was queued before it is written; `close` (which `logging.shutdown` calls) writes the rest
    and stops the thread. A forked child starts its own thread and queue."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target
        self._closed = False
        self._start()
        os.register_at_fork(after_in_child=self._restart)

    def _restart(self) -> None:
        if not self._closed:  # the parent's thread did not survive the fork; its queue is its
            self._start()

    def _start(self) -> None:
        self._queue: queue.SimpleQueue[logging.LogRecord | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()  # set by `close`: write the rest now
        self._thread = threading.Thread(target=self._write, name="dataproc-log", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:
        """Filter and queue `record` (no handler lock: the queue is the synchronisation)."""
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        """Queue `record`, or write it at once after `close`."""
        record.msg, record.args = record.getMessage(), None
        if self._closed:
            self.target.handle(record)
        else:
            self._queue.put(record)

    def _write(self) -> None:
        """Every `WRITE_EVERY_S`, write what was queued. Polling, not a blocking `get`: a
        thread waiting in `get` is woken by every `put`, and that wake-up (a futex call and
        a GIL hand-off per line) cost the request threads more than the line itself."""
        while True:
            self._wake.wait(WRITE_EVERY_S)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    return
                if isinstance(item, threading.Event):
                    item.set()
                else:
                    self.target.handle(item)

    def flush(self) -> None:
        """Return once every record queued before this call is written (at most 5 s)."""
        if self._closed or not self._thread.is_alive():
            return
        written = threading.Event()
        self._queue.put(written)
        written.wait(5)
        self.target.flush()

    def close(self) -> None:
        """Write what is queued, stop the thread, close the target."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._wake.set()
            if self._thread.is_alive() and self._thread is not threading.current_thread():
                self._thread.join(5)
        self.target.close()
        super().close()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send the `dataproc` loggers to stderr at `level`, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, BackgroundHandler):
            old.close()  # configured twice (the CLI before and after reading the settings)
    root.handlers[:] = [BackgroundHandler(handler)]
    root.setLevel(level)
