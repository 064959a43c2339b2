"""Query parameters of the API, validated into typed values (a 422 names each bad one), and the
keyset cursor of `/api/data`."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import rfc3339, rules
from ..errors import ValidationError, problem
from ..web import Request

INTEGER = re.compile(r"[+-]?[0-9]{1,19}")  # not \d: it matches "１" and other non-ASCII digits
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class DataQuery:
    start: datetime | None = None
    end: datetime | None = None
    skip: int = rules.DEFAULT_SKIP
    limit: int = rules.DEFAULT_LIMIT
    after: tuple[datetime, int] | None = None


def single_param(request: Request, name: str, problems: list[dict]) -> str | None:
    """The one value of query parameter `name`, or None; given twice is a problem."""
    values = request.query.get(name)
    if values is None:
        return None
    if len(values) > 1:
        problems.append(problem("query", name, "given more than once", "value_error"))
        return None
    return values[0]


def integer_param(
    text: str | None, name: str, bounds: rules.Range, problems: list[dict]
) -> int | None:
    """`text` as an ASCII integer within `bounds`; None when `text` is None (not given) or
    with the problem recorded."""
    if text is None:
        return None
    low, high = bounds.low, bounds.high
    if not INTEGER.fullmatch(text):
        problems.append(problem("query", name, "Input should be a valid integer", "int_parsing"))
        return None
    value = int(text)
    if value < low:
        problems.append(
            problem(
                "query",
                name,
                f"Input should be greater than or equal to {low}",
                "greater_than_equal",
            )
        )
    elif value > high:
        problems.append(
            problem(
                "query", name, f"Input should be less than or equal to {high}", "less_than_equal"
            )
        )
    else:
        return value
    return None


def _datetime(text: str, name: str, problems: list[dict]) -> datetime | None:
    try:
        return rfc3339.parse(text)
    except ValueError as error:
        problems.append(
            problem("query", name, f"Input should be a valid datetime: {error}", "datetime_parsing")
        )
        return None


def parse_window(request: Request, problems: list[dict]) -> tuple[datetime | None, datetime | None]:
    """The inclusive `start`..`end` of a read (either may be absent); problems recorded."""
    bounds = {}
    for name in ("start", "end"):
        text = single_param(request, name, problems)
        bounds[name] = _datetime(text, name, problems) if text is not None else None
    start, end = bounds["start"], bounds["end"]
    if start and end and start > end:
        problems.append(problem("query", "start", "start must not be after end", "value_error"))
    return start, end


def parse_data_query(request: Request) -> DataQuery:
    """The validated parameters of GET /api/data (422 lists every bad one)."""
    problems: list[dict] = []
    start, end = parse_window(request, problems)
    raw = {name: single_param(request, name, problems) for name in ("skip", "limit", "after")}
    values: dict[str, Any] = {"start": start, "end": end}
    if raw["skip"] is not None:
        values["skip"] = integer_param(raw["skip"], "skip", rules.SKIP, problems)
    if raw["limit"] is not None:
        values["limit"] = integer_param(raw["limit"], "limit", rules.LIMIT, problems)
    if raw["after"] is not None:
        values["after"] = decode_cursor(raw["after"])
        if values["after"] is None:
            problems.append(
                problem("query", "after", "not a cursor from a Link header", "value_error")
            )
    if problems:
        raise ValidationError(problems)
    return DataQuery(**values)


def encode_cursor(last: tuple[datetime, int]) -> str:
    """The keyset cursor after a row: its time (µs since the epoch) and id, base64url."""
    micros = (last[0] - EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"{micros}.{last[1]}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, int] | None:
    """The `(time, id)` a cursor names, or None when it is not one of ours."""
    if not re.fullmatch(rules.CURSOR_PATTERN, text):
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    match = re.fullmatch(r"(-?\d{1,18})\.(\d{1,18})", raw)
    if not match:
        return None
    try:
        return EPOCH + timedelta(microseconds=int(match[1])), int(match[2])
    except OverflowError:
        return None
