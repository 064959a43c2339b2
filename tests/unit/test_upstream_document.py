"""Tests for dataproc.upstream.document: value decoding, the document rules, and identity."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from datetime import UTC, datetime, timedelta

import pytest

from dataproc.upstream.document import (
    MAX_TAG_CHARS,
    MAX_TAGS,
    InvalidDocument,
    Reading,
    decode_value,
)
from dataproc.upstream.document import parse as parse_document

GOOD = {"time": 1713798477, "value": [157, 42, 76, 190], "tags": []}


def doc(**fields: object) -> bytes:
    """GOOD with some fields replaced (a field set to ... is removed), as JSON bytes."""
    document = {**GOOD, **fields}
    return json.dumps({k: v for k, v in document.items() if v is not ...}).encode()


def reason_of(raw: bytes) -> str:
    with pytest.raises(InvalidDocument) as caught:
        parse_document(raw)
    return caught.value.reason


# --------------------------------------------------------------------------- decode_value


def test_decode_value_known_answer():
    assert decode_value([157, 42, 76, 190]) == -0.19938130676746368


def test_decode_value_accepts_bytes():
    assert decode_value(bytes([157, 42, 76, 190])) == -0.19938130676746368


def test_decode_value_is_little_endian_not_big_endian():
    raw = struct.pack("<f", 1.5)
    assert decode_value(raw) == 1.5
    assert decode_value(raw) != struct.unpack(">f", raw)[0]


def test_decode_value_nan_pattern_decodes_to_nan():
    assert math.isnan(decode_value([0x00, 0x00, 0xC0, 0x7F]))


def test_decode_value_positive_infinity_pattern_decodes_to_inf():
    assert decode_value([0x00, 0x00, 0x80, 0x7F]) == math.inf


def test_decode_value_negative_infinity_pattern_decodes_to_minus_inf():
    assert decode_value([0x00, 0x00, 0x80, 0xFF]) == -math.inf


@pytest.mark.parametrize("raw", [[1, 2, 3], [1, 2, 3, 4, 5], b""])
def test_decode_value_requires_exactly_four_bytes(raw):
    with pytest.raises(ValueError):
        decode_value(raw)


def test_decode_value_refuses_an_int_that_bytes_would_expand():
    with pytest.raises(TypeError):
        decode_value(4)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- parse_document: good


def test_parse_document_returns_reading_for_the_api_example():
    reading = parse_document(doc())
    assert isinstance(reading, Reading)
    assert reading.time == datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)
    assert reading.value == -0.19938130676746368
    assert reading.tags == ()


def test_parse_document_float_time_keeps_its_fraction():
    reading = parse_document(doc(time=1713798477.25))
    assert reading.time == datetime(2024, 4, 22, 15, 7, 57, 250000, tzinfo=UTC)


def test_parse_document_iso_time_with_offset_is_converted_to_utc():
    reading = parse_document(doc(time="2024-04-22T17:07:57+02:00"))
    assert reading.time == datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)
    assert reading.time.utcoffset() == timedelta(0)


def test_parse_document_iso_time_with_z_is_accepted():
    reading = parse_document(doc(time="2024-04-22T15:07:57Z"))
    assert reading.time == datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)


def test_parse_document_time_zero_is_the_epoch():
    assert parse_document(doc(time=0)).time == datetime(1970, 1, 1, tzinfo=UTC)


def test_parse_document_tags_null_means_no_tags():
    assert parse_document(doc(tags=None)).tags == ()


def test_parse_document_tags_missing_means_no_tags():
    assert parse_document(doc(tags=...)).tags == ()


def test_parse_document_keeps_tags_in_order():
    assert parse_document(doc(tags=["system", "b"])).tags == ("system", "b")


def test_parse_document_accepts_32_tags_of_64_characters():
    tags = ["x" * MAX_TAG_CHARS] * MAX_TAGS
    assert parse_document(doc(tags=tags)).tags == tuple(tags)


def test_parse_document_accepts_unknown_keys():
    # The document is stored as received (ingest keeps the raw bytes); unknown keys are no fault.
    reading = parse_document(doc(extra={"a": 1}))
    assert (reading.time, reading.value, reading.tags) == (
        datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC),
        -0.19938130676746368,
        (),
    )


def test_parse_document_non_finite_value_is_a_reading_not_an_error():
    assert math.isnan(parse_document(doc(value=[0, 0, 0xC0, 0x7F])).value)


def test_parse_document_reading_is_frozen():
    reading = parse_document(doc())
    with pytest.raises(AttributeError):
        reading.value = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- identity


def test_identity_is_sha256_of_canonical_time_value_tags():
    canonical = b'{"tags":[],"time":1713798477,"value":[157,42,76,190]}'
    assert parse_document(doc()).identity == hashlib.sha256(canonical).digest()


def test_identity_same_for_document_reserialised_with_other_whitespace_and_key_order():
    spaced = b'{ "tags" : [ ],\n "value": [157,42,76,190],   "time": 1713798477 }'
    assert parse_document(spaced).identity == parse_document(doc()).identity


def test_identity_differs_for_a_different_value():
    assert parse_document(doc(value=[157, 42, 76, 191])).identity != parse_document(doc()).identity


def test_identity_differs_for_a_different_time():
    assert parse_document(doc(time=1713798478)).identity != parse_document(doc()).identity


def test_identity_differs_for_different_tags():
    assert parse_document(doc(tags=["system"])).identity != parse_document(doc()).identity


def test_identity_ignores_unknown_keys():
    assert parse_document(doc(extra=1)).identity == parse_document(doc()).identity


# --------------------------------------------------------------------------- parse_document: invalid


def test_parse_document_rejects_value_with_3_items():
    assert reason_of(doc(value=[1, 2, 3])).startswith("value:")


def test_parse_document_rejects_value_with_5_items():
    assert reason_of(doc(value=[1, 2, 3, 4, 5])).startswith("value:")


def test_parse_document_rejects_value_with_256():
    assert (
        reason_of(doc(value=[1, 2, 3, 256])) == "value: expected 4 integers 0..255, item 3 is 256"
    )


def test_parse_document_rejects_value_with_minus_1():
    assert reason_of(doc(value=[-1, 2, 3, 4])).startswith("value:")


def test_parse_document_rejects_value_with_float_1_5():
    assert reason_of(doc(value=[1.5, 2, 3, 4])).startswith("value:")


def test_parse_document_rejects_value_with_float_7_0():
    assert reason_of(doc(value=[7.0, 2, 3, 4])).startswith("value:")


def test_parse_document_rejects_value_with_string_7():
    assert reason_of(doc(value=["7", 2, 3, 4])).startswith("value:")


def test_parse_document_rejects_value_with_true():
    assert reason_of(doc(value=[True, 2, 3, 4])).startswith("value:")


def test_parse_document_rejects_value_that_is_not_a_list():
    assert reason_of(doc(value="nZ1M")).startswith("value:")


def test_parse_document_rejects_missing_value():
    assert reason_of(doc(value=...)) == "value: missing"


def test_parse_document_rejects_missing_time():
    assert reason_of(doc(time=...)) == "time: missing"


def test_parse_document_rejects_time_bool():
    assert reason_of(doc(time=True)).startswith("time:")


def test_parse_document_rejects_time_negative():
    assert reason_of(doc(time=-1)).startswith("time:")


def test_parse_document_rejects_time_nan_literal():
    raw = b'{"time": NaN, "value": [157, 42, 76, 190]}'
    assert reason_of(raw).startswith("not JSON:")


def test_parse_document_rejects_time_infinity_literal():
    raw = b'{"time": Infinity, "value": [157, 42, 76, 190]}'
    assert reason_of(raw).startswith("not JSON:")


def test_parse_document_rejects_time_overflowing_to_infinity():
    raw = b'{"time": 1e400, "value": [157, 42, 76, 190]}'
    assert reason_of(raw).startswith("time:")


def test_parse_document_rejects_time_huge():
    assert reason_of(doc(time=10**20)).startswith("time:")


def test_parse_document_rejects_time_just_past_year_9999():
    assert reason_of(doc(time=253402300800)).startswith("time:")


def test_parse_document_accepts_time_at_the_last_second_of_year_9999():
    assert parse_document(doc(time=253402300799)).time.year == 9999


def test_parse_document_rejects_time_string_without_offset():
    assert reason_of(doc(time="2024-04-22T15:07:57")).startswith("time:")


def test_parse_document_rejects_time_garbage_string():
    assert reason_of(doc(time="yesterday")).startswith("time:")


def test_parse_document_rejects_time_null():
    assert reason_of(doc(time=None)).startswith("time:")


def test_parse_document_rejects_tags_not_a_list():
    assert reason_of(doc(tags="system")).startswith("tags:")


def test_parse_document_rejects_33_tags():
    assert reason_of(doc(tags=["t"] * (MAX_TAGS + 1))) == "tags: at most 32 tags, got 33"


def test_parse_document_rejects_a_65_character_tag():
    assert reason_of(doc(tags=["x" * (MAX_TAG_CHARS + 1)])).startswith("tags:")


def test_parse_document_rejects_a_tag_that_is_not_a_string():
    assert reason_of(doc(tags=["ok", 7])).startswith("tags:")


def test_parse_document_rejects_a_tag_with_nul():
    assert reason_of(doc(tags=["a\u0000b"])).startswith("tags:")


def test_parse_document_rejects_a_lone_surrogate_in_an_unknown_key():
    raw = b'{"time": 1, "value": [1, 2, 3, 4], "note": "\\ud800"}'
    assert reason_of(raw).startswith("note:")


def test_parse_document_rejects_duplicate_keys():
    raw = b'{"time": 1, "time": 2, "value": [157, 42, 76, 190]}'
    assert reason_of(raw) == "not JSON: duplicate key 'time'"


def test_parse_document_rejects_not_json():
    assert reason_of(b"<html>oops</html>").startswith("not JSON:")


def test_parse_document_rejects_empty_bytes():
    assert reason_of(b"").startswith("not JSON:")


def test_parse_document_rejects_invalid_utf8():
    assert reason_of(b'{"time": 1, "value": [1, 2, 3, 4], "x": "\xff"}').startswith("not JSON:")


def test_parse_document_rejects_utf16_even_though_json_loads_would_take_it():
    assert reason_of(json.dumps(GOOD).encode("utf-16")).startswith("not JSON:")


def test_parse_document_rejects_top_level_list():
    assert reason_of(b"[1713798477, [157, 42, 76, 190]]") == "not a JSON object"


def test_parse_document_rejects_deep_nesting_without_recursion_error():
    assert reason_of(b"[" * 100_000).startswith("not JSON:")


# --------------------------------------------------------------------------- the strict loader
# The document is read by dataproc.strictjson, the loader request bodies use too; where the
# two old loaders differed, the stricter rule holds (see test_strictjson.py for the loader).


def test_parse_document_names_a_non_finite_constant():
    raw = b'{"time": 1, "value": [157, 42, 76, 190], "x": -Infinity}'
    assert reason_of(raw) == "not JSON: -Infinity is not valid JSON"


def test_parse_document_accepts_nesting_at_the_limit():
    nested = "[" * 31 + "]" * 31  # inside the document's own object: 32 levels in all
    raw = b'{"time": 1, "value": [157, 42, 76, 190], "x": ' + nested.encode() + b"}"
    assert parse_document(raw).time == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)


def test_parse_document_refuses_nesting_over_the_limit():
    nested = "[" * 32 + "]" * 32
    raw = b'{"time": 1, "value": [157, 42, 76, 190], "x": ' + nested.encode() + b"}"
    assert reason_of(raw) == "not JSON: nested too deeply (over 32 levels)"


def test_parse_document_names_the_field_of_a_lone_surrogate_at_any_depth():
    raw = b'{"time": 1, "value": [1, 2, 3, 4], "note": {"a": ["ok", "\\ud800"]}}'
    assert reason_of(raw) == "note: text contains an unpaired surrogate"


def test_parse_document_names_the_field_of_a_lone_surrogate_in_a_nested_key():
    raw = b'{"time": 1, "value": [1, 2, 3, 4], "note": {"\\udc00": 1}}'
    assert reason_of(raw) == "note: a key contains an unpaired surrogate"


def test_parse_document_refuses_a_lone_surrogate_in_a_top_level_key():
    raw = b'{"time": 1, "value": [1, 2, 3, 4], "\\ud800": 1}'
    assert reason_of(raw) == "document: a key contains an unpaired surrogate"


def test_parse_document_refuses_a_lone_surrogate_in_the_time_string():
    # json.dumps writes the lone surrogate as the escape \ud800, as a hostile upstream would.
    assert reason_of(doc(time="2024-04-22T15:07:57Z\ud800")) == (
        "time: text contains an unpaired surrogate"
    )


def test_parse_document_refuses_nul_in_a_top_level_key():
    raw = b'{"time": 1, "value": [1, 2, 3, 4], "a\\u0000b": 1}'
    assert reason_of(raw) == "document: a key contains U+0000"


def test_parse_document_names_the_field_of_a_nul_in_an_unknown_key():
    raw = b'{"time": 1, "value": [1, 2, 3, 4], "note": "a\\u0000b"}'
    assert reason_of(raw) == "note: text contains U+0000"
