"""Tests for dataproc.rfc3339: the one date-time grammar, for query parameters and documents."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dataproc.rfc3339 import parse as parse_time
from dataproc.rfc3339 import parse_with_offset


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-04-22T15:07:57Z", datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)),
        ("2024-04-22T15:07:57.123+02:00", datetime(2024, 4, 22, 13, 7, 57, 123000, tzinfo=UTC)),
        ("2024-04-22T15:07:57", datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)),
        ("2024-04-22 15:07:57Z", datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)),
        ("2024-04-22", datetime(2024, 4, 22, tzinfo=UTC)),
        ("2024-04-22t15:07:57z", datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)),
        ("2024-04-22T15:07:57-05:30", datetime(2024, 4, 22, 20, 37, 57, tzinfo=UTC)),
        ("2024-04-22T15:07:57.1234567Z", datetime(2024, 4, 22, 15, 7, 57, 123456, tzinfo=UTC)),
        ("2024-04-22T15:07Z", datetime(2024, 4, 22, 15, 7, tzinfo=UTC)),
    ],
)
def test_parse_time_accepts(text, expected):
    assert parse_time(text) == expected


def test_parse_time_returns_aware_utc():
    assert parse_time("2024-04-22T15:07:57+02:00").tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "1713798477",
        "2024-04-22T15:07:57Zjunk",
        "2024-04-22T15:07:57Z\n",
        "2024-02-30T00:00:00Z",
        "2024-04-22T24:00:00Z",
        "2024-04-22T15:07:57+24:00",
        "2024-04-22Z",
        "0000-01-01T00:00:00Z",
        "10000-01-01T00:00:00Z",
        "9999-12-31T23:59:59-01:00",
        "0001-01-01T00:00:00+01:00",
        "٢٠٢٤-04-22T15:07:57Z",
    ],
)
def test_parse_time_rejects(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_parse_time_error_message_quotes_the_input():
    with pytest.raises(ValueError, match="yesterday"):
        parse_time("yesterday")


def test_parse_time_reads_what_the_service_writes():
    # Points carry RFC 3339 in UTC with "Z", fractional seconds only when not zero.
    moment = datetime(2024, 4, 22, 15, 7, 57, 120000, tzinfo=UTC)
    assert parse_time("2024-04-22T15:07:57.12Z") == moment


# --------------------------------------------------------------------------- parse_with_offset
# What upstream documents use: the same grammar, but the offset (or Z) must be written.


def test_parse_with_offset_converts_to_aware_utc():
    moment = parse_with_offset("2024-04-22T17:07:57+02:00")
    assert moment == datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC) and moment.tzinfo is UTC


@pytest.mark.parametrize("text", ["2024-04-22T15:07:57", "2024-04-22"])
def test_parse_with_offset_refuses_a_bare_local_time(text):
    with pytest.raises(ValueError, match="needs an offset or Z"):
        parse_with_offset(text)


@pytest.mark.parametrize(
    "text",
    ["yesterday", "2024-02-30T00:00:00Z", "9999-12-31T23:59:59-01:00", "٢٠٢٤-04-22T15:07:57Z"],
)
def test_parse_with_offset_refuses_what_parse_refuses(text):
    with pytest.raises(ValueError):
        parse_with_offset(text)


def test_a_huge_input_makes_a_short_message():
    with pytest.raises(ValueError) as caught:
        parse_time("x" * 100_000)
    assert len(str(caught.value)) < 200


def test_a_non_string_is_a_value_error_not_a_type_error():
    with pytest.raises(ValueError):
        parse_time(20240422)  # type: ignore[arg-type]
