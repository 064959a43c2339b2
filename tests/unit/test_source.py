"""Tests for dataproc.source: value decoding, document rules, times, and fetch over real sockets."""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dataproc.source import (
    MAX_TAG_CHARS,
    MAX_TAGS,
    InvalidDocument,
    Reading,
    UpstreamError,
    UpstreamTimeout,
    decode_value,
    fetch,
    format_time,
    parse_document,
    parse_time,
)

UTC = UTC
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
    assert reading.document == GOOD


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


def test_parse_document_keeps_unknown_keys_in_document():
    reading = parse_document(doc(extra={"a": 1}))
    assert reading.document["extra"] == {"a": 1}


def test_parse_document_non_finite_value_is_a_reading_not_an_error():
    assert math.isnan(parse_document(doc(value=[0, 0, 0xC0, 0x7F])).value)


def test_parse_document_reading_is_frozen():
    reading = parse_document(doc())
    with pytest.raises(AttributeError):
        reading.value = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- identity


def test_identity_is_sha256_of_canonical_time_value_tags():
    import hashlib

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


# --------------------------------------------------------------------------- format_time


def test_format_time_whole_seconds_have_no_fraction():
    assert format_time(datetime(2024, 4, 22, 15, 7, 57, tzinfo=UTC)) == "2024-04-22T15:07:57Z"


def test_format_time_half_second_strips_trailing_zeros():
    moment = datetime(2024, 4, 22, 15, 7, 57, 500000, tzinfo=UTC)
    assert format_time(moment) == "2024-04-22T15:07:57.5Z"


def test_format_time_keeps_all_six_digits_when_needed():
    moment = datetime(2024, 4, 22, 15, 7, 57, 123456, tzinfo=UTC)
    assert format_time(moment) == "2024-04-22T15:07:57.123456Z"


def test_format_time_converts_an_offset_to_utc():
    moment = datetime(2024, 4, 22, 17, 7, 57, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(moment) == "2024-04-22T15:07:57Z"


def test_format_time_treats_naive_as_utc():
    assert format_time(datetime(2024, 4, 22, 15, 7, 57)) == "2024-04-22T15:07:57Z"


def test_format_time_pads_small_years():
    assert format_time(datetime(5, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0005-01-02T03:04:05Z"


# --------------------------------------------------------------------------- parse_time


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


def test_parse_time_round_trips_format_time():
    moment = datetime(2024, 4, 22, 15, 7, 57, 120000, tzinfo=UTC)
    assert parse_time(format_time(moment)) == moment


# --------------------------------------------------------------------------- fetch: a real upstream

GOOD_BODY = json.dumps(GOOD).encode()
SHORT_TIMEOUT_S = 0.3


class _Upstream(BaseHTTPRequestHandler):
    """A misbehaving upstream; each path is one way to answer."""

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_GET(self):
        route = getattr(self, "route_" + self.path.strip("/").replace("-", "_"), None)
        try:
            (route or self.route_missing)()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as the timeout tests intend

    def _answer(self, status, body, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_missing(self):
        self._answer(404, b'{"detail":"Not Found"}')

    def route_good(self):
        self._answer(200, GOOD_BODY)

    def route_headers(self):
        seen = {"user-agent": self.headers.get("User-Agent"), "accept": self.headers.get("Accept")}
        self._answer(200, json.dumps(seen).encode())

    def route_error(self):
        self._answer(500, b'{"detail":"boom"}')

    def route_big_error(self):
        self._answer(503, b"e" * 70000)

    def route_big(self):
        self._answer(200, b"x" * 70000)

    def route_exact(self):
        self._answer(200, b"y" * 100)

    def route_slow(self):
        time.sleep(2)
        self._answer(200, GOOD_BODY)

    def route_trickle(self):
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for _ in range(100):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.1)

    def route_trickle_headers(self):
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        for _ in range(100):
            self.wfile.write(b"X-Slow: 1\r\n")
            self.wfile.flush()
            time.sleep(0.1)

    def route_drop(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b'{"time": 17')
        self.wfile.flush()
        self.close_connection = True

    def route_hang_up(self):
        self.close_connection = True  # close without a single byte of answer

    def route_garbage(self):
        self.wfile.write(b"this is not HTTP\r\n\r\n")
        self.close_connection = True

    def route_chunked(self):
        self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(GOOD_BODY), GOOD_BODY))
        self.close_connection = True

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_to_good(self):
        self._redirect("/good")

    def route_to_file(self):
        self._redirect("file:///etc/passwd")

    def route_to_ftp(self):
        self._redirect("ftp://127.0.0.1/etc/passwd")

    def route_loop(self):
        self._redirect("/loop")


@pytest.fixture(scope="module")
def upstream():
    """Base URL of a real HTTP server on a loopback port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True  # sleeping handlers must not hold up teardown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def dead_port():
    """A loopback port nothing listens on: bound to learn it, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def upstream_error(url: str, timeout_s: float = 5, **kwargs) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        fetch(url, timeout_s=timeout_s, **kwargs)
    return caught.value


def test_fetch_returns_the_body(upstream):
    assert fetch(upstream + "/good", timeout_s=5) == GOOD_BODY


def test_fetch_sends_user_agent_and_accept(upstream):
    seen = json.loads(fetch(upstream + "/headers", timeout_s=5))
    assert seen == {"user-agent": "dataproc", "accept": "application/json"}


def test_fetch_reads_a_chunked_body(upstream):
    assert fetch(upstream + "/chunked", timeout_s=5) == GOOD_BODY


def test_fetch_follows_a_redirect_to_http(upstream):
    assert fetch(upstream + "/to-good", timeout_s=5) == GOOD_BODY


def test_fetch_accepts_a_body_of_exactly_max_bytes(upstream):
    assert fetch(upstream + "/exact", timeout_s=5, max_bytes=100) == b"y" * 100


def test_fetch_http_500_is_upstream_error_with_body(upstream):
    error = upstream_error(upstream + "/error")
    assert type(error) is UpstreamError
    assert error.reason == "upstream answered HTTP 500"
    assert error.body == b'{"detail":"boom"}'


def test_fetch_http_404_is_upstream_error(upstream):
    assert upstream_error(upstream + "/nothing-here").reason == "upstream answered HTTP 404"


def test_fetch_error_body_is_capped_at_max_bytes(upstream):
    error = upstream_error(upstream + "/big-error")
    assert error.reason == "upstream answered HTTP 503"
    assert error.body == b"e" * 65536


def test_fetch_oversized_answer_is_upstream_error_with_first_bytes(upstream):
    error = upstream_error(upstream + "/big")
    assert type(error) is UpstreamError
    assert error.reason == "upstream answer over 65536 bytes"
    assert error.body == b"x" * 65537


def test_fetch_oversize_follows_max_bytes(upstream):
    error = upstream_error(upstream + "/exact", max_bytes=99)
    assert error.reason == "upstream answer over 99 bytes"
    assert error.body == b"y" * 100


def test_fetch_slow_answer_is_upstream_timeout(upstream):
    started = time.monotonic()
    error = upstream_error(upstream + "/slow", timeout_s=SHORT_TIMEOUT_S)
    assert isinstance(error, UpstreamTimeout)
    assert error.reason == "upstream did not answer within 0.3 s"
    assert time.monotonic() - started < 1.5


def test_fetch_trickling_body_times_out_at_the_total_deadline(upstream):
    # Every byte comes within the per-operation timeout; only a total deadline stops it.
    started = time.monotonic()
    error = upstream_error(upstream + "/trickle", timeout_s=0.5)
    assert isinstance(error, UpstreamTimeout)
    assert time.monotonic() - started < 1.5


def test_fetch_trickling_headers_time_out_at_the_total_deadline(upstream):
    started = time.monotonic()
    error = upstream_error(upstream + "/trickle-headers", timeout_s=0.5)
    assert isinstance(error, UpstreamTimeout)
    assert time.monotonic() - started < 1.5


def test_fetch_dropped_mid_body_is_upstream_error(upstream):
    error = upstream_error(upstream + "/drop")
    assert type(error) is UpstreamError
    assert error.reason == "upstream closed the connection mid-answer"


def test_fetch_hang_up_before_answering_is_upstream_error(upstream):
    error = upstream_error(upstream + "/hang-up")
    assert error.reason == "upstream closed the connection mid-answer"


def test_fetch_non_http_answer_is_upstream_error(upstream):
    assert upstream_error(upstream + "/garbage").reason.startswith("upstream sent a malformed")


def test_fetch_refuses_a_redirect_to_file(upstream):
    error = upstream_error(upstream + "/to-file")
    assert "file" in error.reason
    assert error.body is None


def test_fetch_refuses_a_redirect_to_ftp(upstream):
    assert "ftp" in upstream_error(upstream + "/to-ftp").reason


def test_fetch_redirect_loop_is_upstream_error(upstream):
    assert upstream_error(upstream + "/loop").reason == "upstream answered HTTP 302"


def test_fetch_https_to_a_plain_http_server_is_upstream_error(upstream):
    error = upstream_error(upstream.replace("http://", "https://") + "/good")
    assert type(error) is UpstreamError
    assert error.reason.startswith("upstream unreachable:")


def test_fetch_refused_port_is_upstream_unreachable(dead_port):
    error = upstream_error(f"http://127.0.0.1:{dead_port}/")
    assert type(error) is UpstreamError
    assert error.reason.startswith("upstream unreachable:")
    assert error.body is None


def test_fetch_unknown_host_is_upstream_unreachable():
    assert upstream_error("http://nonexistent.invalid/").reason.startswith("upstream unreachable:")


def test_fetch_refuses_a_file_url():
    error = upstream_error("file:///etc/passwd")
    assert type(error) is UpstreamError
    assert "file" in error.reason


def test_fetch_refuses_an_ftp_url():
    assert "ftp" in upstream_error("ftp://127.0.0.1/etc/passwd").reason


def test_fetch_refuses_a_url_without_host():
    assert upstream_error("http:///good").reason.startswith("invalid upstream URL")


def test_fetch_refuses_a_url_with_a_bad_port():
    assert upstream_error("http://127.0.0.1:notaport/").reason.startswith("invalid upstream URL")


def test_fetch_ignores_http_proxy_from_the_environment(upstream, dead_port, monkeypatch):
    dead_proxy = f"http://127.0.0.1:{dead_port}"
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert urllib.request.getproxies()["http"] == dead_proxy  # a default opener would use it
    assert fetch(upstream + "/good", timeout_s=5) == GOOD_BODY


def test_fetch_refuses_a_non_positive_timeout(upstream):
    with pytest.raises(ValueError):
        fetch(upstream + "/good", timeout_s=0)
