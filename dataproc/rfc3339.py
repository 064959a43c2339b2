"""RFC 3339 date-times (and the ISO 8601 extended forms people type), parsed into aware UTC.

Owns: the one date-time grammar of the service, used for the query parameters of our API
(`api`, where no offset means UTC) and for the `time` strings of upstream documents
(`upstream.document`, where an offset is required). Errors are `ValueError`s whose message
quotes the input, clipped.

Leaves to others: what a caller does with a bad date-time (a 422, an invalid document) and
Unix-seconds times. A leaf: it imports nothing from `dataproc`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

__all__ = ["parse", "parse_with_offset"]

# A date, optionally a time with optional seconds and fraction, and an offset only where there
# is a time. re.ASCII keeps \d to 0-9; other Unicode digits are not dates.
_ISO_DATETIME = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d\d)-(?P<day>\d\d)"
    r"(?:[Tt ](?P<hour>\d\d):(?P<minute>\d\d)"
    r"(?::(?P<second>\d\d)(?:[.,](?P<fraction>\d+))?)?"
    r"(?P<offset>[Zz]|(?P<sign>[+-])(?P<off_h>\d\d)(?::?(?P<off_m>\d\d))?)?)?",
    re.ASCII,
)


def parse(text: str) -> datetime:
    """Parse an RFC 3339 / ISO 8601 date-time into aware UTC; no offset means UTC."""
    moment = _parse_iso(text)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return _to_utc(moment, text)


def parse_with_offset(text: str) -> datetime:
    """Like `parse`, but the text must say its offset (or Z): a bare local time is ambiguous."""
    moment = _parse_iso(text)
    if moment.tzinfo is None:
        raise ValueError(f"an ISO 8601 string needs an offset or Z: {_clip(text)}")
    return _to_utc(moment, text)


def _parse_iso(text: str) -> datetime:
    """The date-time in text, naive when it has no offset; ValueError when it is not one."""
    match = _ISO_DATETIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not an RFC 3339 date-time (like 2024-04-22T15:07:57Z): {_clip(text)}")
    parts = match.groupdict()
    try:
        return datetime(
            int(parts["year"]),
            int(parts["month"]),
            int(parts["day"]),
            int(parts["hour"] or 0),
            int(parts["minute"] or 0),
            int(parts["second"] or 0),
            _microseconds(parts["fraction"]),
            tzinfo=_offset(parts),
        )
    except ValueError as exc:  # month 13, day 31 in April, year 0, hour 24, offset 24:00 ...
        raise ValueError(f"not a valid date-time: {_clip(text)} ({exc})") from None


def _microseconds(fraction: str | None) -> int:
    """Fractional seconds as microseconds, truncated (rounding could carry into the next second)."""
    return int(fraction[:6].ljust(6, "0")) if fraction else 0


def _offset(parts: dict[str, str | None]) -> timezone | None:
    """The tzinfo for the offset group: None when absent, UTC for Z."""
    if parts["offset"] is None:
        return None
    if parts["sign"] is None or parts["off_h"] is None:  # the regex sets off_h with sign
        return UTC
    hours, minutes = int(parts["off_h"]), int(parts["off_m"] or 0)
    if hours > 23 or minutes > 59:
        raise ValueError(f"offset {parts['offset']} is out of range")
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if parts["sign"] == "-" else delta)


def _to_utc(moment: datetime, text: str) -> datetime:
    """Convert an aware datetime to UTC; the offset can push it past year 1 or 9999."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"date-time out of range (years 1..9999 in UTC): {_clip(text)}") from None


def _clip(text: object, limit: int = 64) -> str:
    """A short repr for messages, so a huge input does not become a huge message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
