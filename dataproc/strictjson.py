"""The one strict JSON loader, for request bodies (`web`) and upstream documents (`upstream`).

Owns: reading JSON text as RFC 8259 and I-JSON (RFC 7493) mean it, refusing what Python's
`json` quietly accepts: NaN and Infinity (not JSON), duplicate keys (meaning undefined),
nesting deeper than `MAX_DEPTH` (refused by a scan before `json` recurses, so it is an error,
never a `RecursionError`), bytes that are not UTF-8 (`json.loads` would also take UTF-16 and
UTF-32), and strings with an unpaired surrogate (`"\\ud800"` parses, but is not text). Every
refusal is one `InvalidJSON` (a `ValueError`) with a message, and for an unpaired surrogate
the path to the string, so a caller can name the field.

Leaves to others: what the value must look like (an object, which fields), and what to
answer. A leaf: it imports nothing from `dataproc`. (`jwt` keeps its own loader, so that it
lifts out alone.)
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_DEPTH", "InvalidJSON", "loads"]

MAX_DEPTH = 32  # arrays and objects inside one another; ours and the upstream's need 2

# One token of the depth scan: a whole string (escapes included; an unterminated one runs to
# the end) or a bracket. Brackets inside strings are skipped, so they neither refuse a valid
# text nor hide real nesting. The unrolled loop keeps the regex linear on long strings.
_DEPTH_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)

Path = tuple[str | int, ...]


class InvalidJSON(ValueError):
    """The text is not strict JSON. `.reason` says why; `.path` locates an unpaired surrogate
    (the keys and indexes from the top down to the string; `()` for the top level, including
    its keys) and is None for every other refusal."""

    def __init__(self, reason: str, path: Path | None = None) -> None:
        super().__init__(reason if path is None else f"{reason} at {_pointer(path)}")
        self.reason = reason
        self.path = path


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse `data` (bytes must be UTF-8) strictly; `InvalidJSON` says what is wrong."""
    text = _decode(data)
    _check_depth(text, max_depth)
    try:
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:  # a last net: the depth scan should have refused it already
        raise InvalidJSON(f"nested too deeply (over {max_depth} levels)") from None
    except InvalidJSON:
        raise
    except ValueError as exc:  # JSONDecodeError, integers over Python's digit limit
        raise InvalidJSON(str(exc)) from None
    if "\\u" in text or not _is_text(text):  # else no string can hold a lone surrogate
        _check_text(value)
    return value


def _decode(data: bytes | str) -> str:
    """The text of `data`: bytes are decoded here, as UTF-8 only."""
    if isinstance(data, str):
        return data
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse nesting over max_depth before json's recursion meets it."""
    if text.count("[") + text.count("{") <= max_depth:
        return  # too few brackets to nest that deep: skip the scan (most texts, in C speed)
    depth = 0
    for token in _DEPTH_TOKEN.finditer(text):
        char = token.group()[0]
        if char in "[{":
            depth += 1
            if depth > max_depth:
                raise InvalidJSON(f"nested too deeply (over {max_depth} levels)")
        elif char in "]}":
            depth -= 1


def _refuse_constant(name: str) -> Any:
    """json.loads hook: NaN and Infinity are Python extensions, not JSON (RFC 8259 section 6)."""
    raise InvalidJSON(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads hook: refuse duplicate keys, whose meaning RFC 8259 leaves undefined."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidJSON(f"duplicate key {_clip(key)}")
        result[key] = value
    return result


def _check_text(value: Any) -> None:
    """Refuse a string or key with an unpaired surrogate, naming where; iterative, any depth."""
    pending: list[tuple[Path, Any]] = [((), value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if not _is_text(item):
                raise InvalidJSON("text contains an unpaired surrogate", path)
        elif isinstance(item, dict):
            if not all(_is_text(key) for key in item):
                raise InvalidJSON("a key contains an unpaired surrogate", path)
            pending.extend(((*path, key), member) for key, member in item.items())
        elif isinstance(item, list):
            pending.extend(((*path, index), member) for index, member in enumerate(item))


def _is_text(text: str) -> bool:
    """True when text is valid Unicode (JSON's \\ud800 escapes can make lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _pointer(path: Path) -> str:
    """A path as an RFC 6901 JSON Pointer ("" is the whole value), clipped for messages."""
    escaped = (str(part).replace("~", "~0").replace("/", "~1") for part in path)
    return _clip("".join("/" + part for part in escaped))


def _clip(text: object, limit: int = 64) -> str:
    """A short repr for messages, so a huge input does not become a huge message."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
