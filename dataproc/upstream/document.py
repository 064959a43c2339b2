"""One upstream document, read strictly into a `Reading`: the inputs of the validity rules.

Owns: the rules of API.md, "Data points", for what the upstream sends: a JSON object (read by
`strictjson`) with `time` (Unix seconds, or an RFC 3339 string with an offset, read by
`rfc3339`), `value` (4 bytes, decoded as little-endian IEEE-754 float32) and optional `tags`;
text PostgreSQL can store; and the document's identity for de-duplication. Every refusal is an
`InvalidDocument` whose reason names the field.

Leaves to others: fetching the bytes (`upstream.fetch`); the validity rules themselves (invalid
tags, maximum age, non-finite values: `ingest`); storing (`store`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .. import rfc3339, strictjson

__all__ = ["MAX_TAGS", "MAX_TAG_CHARS", "InvalidDocument", "Reading", "decode_value", "parse"]

MAX_TAGS = 32
MAX_TAG_CHARS = 64

_FLOAT32_LE = struct.Struct("<f")  # the upstream sends IEEE-754 float32, little-endian
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_END_OF_TIME = 253402300800  # 10000-01-01T00:00:00Z in Unix seconds: datetime stops at 9999


@dataclass(frozen=True, slots=True)
class Reading:
    """One upstream document, checked and decoded: what the validity rules look at."""

    time: datetime  # timezone-aware, UTC
    value: float  # the decoded float32; may be nan or +-inf (validity is ingest's call)
    tags: tuple[str, ...]
    identity: bytes  # sha256 of the canonical JSON of time, value and tags as received


class InvalidDocument(Exception):
    """The upstream's answer is not a valid document; .reason says why, naming the field."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_value(raw: Sequence[int] | bytes) -> float:
    """Decode exactly 4 bytes as an IEEE-754 float32, little-endian."""
    if isinstance(raw, int):  # bytes(4) would quietly mean four zero bytes
        raise TypeError("decode_value needs 4 bytes, not an int")
    data = bytes(raw)
    if len(data) != 4:
        raise ValueError(f"decode_value needs exactly 4 bytes, got {len(data)}")
    value: float = _FLOAT32_LE.unpack(data)[0]
    return value


def parse(raw: bytes) -> Reading:
    """Parse and check one upstream document; raises InvalidDocument naming the field."""
    document = _load_object(raw)
    for field in ("time", "value"):
        if field not in document:
            raise InvalidDocument(f"{field}: missing")
    reading = Reading(
        time=_time_field(document["time"]),
        value=_value_field(document["value"]),
        tags=_tags_field(document.get("tags")),
        identity=_identity(document),
    )
    _check_storable(document)
    return reading


# --------------------------------------------------------------------------- the object


def _load_object(raw: bytes) -> dict[str, Any]:
    """Strict JSON (UTF-8 only, see strictjson) whose top level is an object."""
    try:
        document = strictjson.loads(raw)
    except strictjson.InvalidJSON as error:
        raise InvalidDocument(_located(error)) from None
    if not isinstance(document, dict):
        raise InvalidDocument("not a JSON object")
    return document


def _located(error: strictjson.InvalidJSON) -> str:
    """The reason for a loader's refusal: the field when it found one, else "not JSON"."""
    if error.path is None:
        return f"not JSON: {error.reason}"
    if error.path and isinstance(error.path[0], str):
        return f"{_field_name(error.path[0])}: {error.reason}"
    return f"document: {error.reason}"


_JSON_TYPE_NAMES = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def _kind(value: object) -> str:
    """The JSON type of a parsed value, for messages."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- the fields


def _time_field(value: object) -> datetime:
    """time: Unix seconds (int, or float keeping its fraction) or ISO 8601 with an offset."""
    parse_time = _TIME_PARSERS.get(type(value))  # by exact type: bool is not a number here
    if parse_time is None:
        raise InvalidDocument(
            f"time: expected Unix seconds or an ISO 8601 string, got {_kind(value)}"
        )
    return parse_time(value)


def _time_from_unix(seconds: int | float) -> datetime:
    """Unix seconds to aware UTC; microsecond precision for floats."""
    # NaN fails every comparison, so it lands here too (json gives inf for 1e400).
    if not 0 <= seconds < _END_OF_TIME:
        raise InvalidDocument(
            f"time: Unix seconds must be from 0 to {_END_OF_TIME - 1}, got {_clip(seconds)}"
        )
    try:
        return _EPOCH + timedelta(seconds=seconds)
    except OverflowError:  # a float a hair under the limit that rounds up to year 10000
        raise InvalidDocument(f"time: out of range: {_clip(seconds)}") from None


def _time_from_text(text: str) -> datetime:
    """An RFC 3339 string; here it must say its offset, as a bare local time is ambiguous."""
    try:
        return rfc3339.parse_with_offset(text)
    except ValueError as exc:
        raise InvalidDocument(f"time: {exc}") from None


_TIME_PARSERS: dict[type, Callable[[Any], datetime]] = {
    int: _time_from_unix,
    float: _time_from_unix,
    str: _time_from_text,
}


def _value_field(value: object) -> float:
    """value: exactly 4 integers 0..255, decoded as float32 little-endian."""
    if type(value) is not list:
        raise _bad_value(f"got {_kind(value)}")
    if len(value) != 4:
        raise _bad_value(f"got {len(value)} items")
    for index, item in enumerate(value):
        # type() is int, not isinstance: true is not 1, and 7.0 is not 7.
        if type(item) is not int or not 0 <= item <= 255:
            raise _bad_value(f"item {index} is {_clip(item)}")
    return decode_value(value)


def _bad_value(problem: str) -> InvalidDocument:
    return InvalidDocument(f"value: expected 4 integers 0..255, {problem}")


def _tags_field(value: object) -> tuple[str, ...]:
    """tags: missing or null means none; else at most 32 strings of at most 64 characters."""
    if value is None:
        return ()
    if type(value) is not list:
        raise InvalidDocument(f"tags: expected a list of strings, got {_kind(value)}")
    if len(value) > MAX_TAGS:
        raise InvalidDocument(f"tags: at most {MAX_TAGS} tags, got {len(value)}")
    for index, tag in enumerate(value):
        if type(tag) is not str:
            raise InvalidDocument(f"tags: item {index} is {_kind(tag)}, not a string")
        if len(tag) > MAX_TAG_CHARS:
            raise InvalidDocument(f"tags: item {index} is over {MAX_TAG_CHARS} characters")
    return tuple(value)


# --------------------------------------------------------------------------- the whole


def _identity(document: dict[str, Any]) -> bytes:
    """sha256 of the canonical JSON of time, value and tags as received (missing tags: null)."""
    core = {"time": document["time"], "value": document["value"], "tags": document.get("tags")}
    canonical = json.dumps(core, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).digest()


def _check_storable(document: dict[str, Any]) -> None:
    """Refuse U+0000, which PostgreSQL text cannot hold, before anyone tries to store it.
    (strictjson has already refused unpaired surrogates, naming where.)"""
    for key, value in document.items():
        if _has_nul(value):
            raise InvalidDocument(f"{_field_name(key)}: text contains U+0000")
    if _has_nul(list(document)):
        raise InvalidDocument("document: a key contains U+0000")


def _field_name(key: str) -> str:
    """A key as it reads in a message: bare when plain, repr when odd or long."""
    return key if key.isprintable() and 0 < len(key) <= MAX_TAG_CHARS else _clip(key)


def _has_nul(value: object) -> bool:
    """True when any string in value (keys included) contains U+0000; iterative, any depth."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _clip(text: object, limit: int = 64) -> str:
    """A short repr for messages, so a huge input does not become a huge message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
