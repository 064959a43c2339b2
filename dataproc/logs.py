"""Log set-up: one line per record, as text or as JSON lines (`DATAPROC_LOG_FORMAT=json`).

Owns: the handler and the formatters. Leaves what is logged to each module; no module logs
tokens, passwords, bodies or query strings, so nothing here has to scrub them.
"""

from __future__ import annotations

import json
import logging
import sys
import time

# Fields the access log attaches with `extra=`; the JSON formatter copies them when present.
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


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send the `dataproc` loggers to stderr at `level`, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
