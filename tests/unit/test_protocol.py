"""Bytes-only tests of `dataproc.protocol`: request heads parsed, responses rendered, no socket."""

from __future__ import annotations

import gzip
import re
import zlib

import pytest

from dataproc import protocol
from dataproc.config import Config
from dataproc.protocol import Incomplete, ProtocolError

LIMITS = Config(
    max_request_line_bytes=256,
    max_header_count=8,
    max_header_bytes=1024,
    max_body_bytes=1024,
    max_query_params=4,
)


def head(*lines: str, first: str = "GET /p?a=1&a=2 HTTP/1.1") -> bytes:
    return ("\r\n".join([first, *lines]) + "\r\n\r\n").encode("latin-1")


def status_of(data: bytes) -> int:
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_head(data, LIMITS)
    return caught.value.status


def parse_response(data: bytes) -> tuple[str, dict[str, list[str]], bytes]:
    raw_head, _, body = data.partition(b"\r\n\r\n")
    lines = raw_head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        headers.setdefault(name.lower(), []).append(value)
    return lines[0], headers, body


# --- request heads ------------------------------------------------------------------------


def test_a_request_head_is_parsed_into_method_path_query_and_headers():
    parsed = protocol.parse_head(head("Host: x", "X-Request-ID: id-1", "A: 1", "a: 2"), LIMITS)
    assert (parsed.method, parsed.target, parsed.version) == ("GET", "/p?a=1&a=2", (1, 1))
    assert (parsed.path, parsed.query) == ("/p", {"a": ["1", "2"]})
    assert parsed.headers["a"] == ["1", "2"] and parsed.request_id == "id-1"
    assert parsed.keep_alive and parsed.content_length == 0 and not parsed.expect_continue


def test_the_end_of_a_head_is_found_with_crlf_or_bare_lf():
    assert protocol.head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY") == 27
    assert protocol.head_end(b"GET / HTTP/1.1\nHost: x\n\nBODY") == 24
    assert protocol.head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1


def test_a_head_that_stops_short_is_incomplete():
    with pytest.raises(Incomplete):
        protocol.parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n", LIMITS)
    with pytest.raises(Incomplete):
        protocol.parse_head(b"GET / HT", LIMITS)


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [("1.1", None, True), ("1.1", "close", False), ("1.1", "Keep-Alive, Close", False),
     ("1.0", None, False), ("1.0", "keep-alive", True)],
)  # fmt: skip
def test_keep_alive_follows_the_version_and_the_connection_header(version, connection, keep_alive):
    lines = ["Host: x"] + ([f"Connection: {connection}"] if connection else [])
    parsed = protocol.parse_head(head(*lines, first=f"GET / HTTP/{version}"), LIMITS)
    assert parsed.keep_alive is keep_alive


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /x HTTP/2.0\r\n\r\n", 505),
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /" + b"a" * 300, 414),  # still arriving, already too long
        (head(*[f"X-{i}: v" for i in range(9)]), 431),
        (b"GET / HTTP/1.1\r\nX: " + b"v" * 1100, 431),  # still arriving, already too large
        (head("Host: x", " folded"), 400),
        (head("Host: x", "Bad Name: v"), 400),
        (head("Host: x", "X: a\x00b"), 400),
        (head(), 400),  # HTTP/1.1 without Host
        (head("Host: a", "Host: b"), 400),
        (head("Host: x", first="GET http://x/ HTTP/1.1"), 400),
        (head("Host: x", first="GET /caf%E9 HTTP/1.1"), 400),
        (head("Host: x", first="GET /?a=1&&b HTTP/1.1"), 400),
        (head("Host: x", first="GET /?a&b&c&d&e HTTP/1.1"), 400),
        (head("Host: x", "Transfer-Encoding: chunked"), 411),
        (head("Host: x", "Content-Length: 1", "Content-Length: 1"), 400),
        (head("Host: x", "Content-Length: +1"), 400),
        (head("Host: x", "Content-Length: 1025"), 413),
        (head("Host: x", "Expect: coffee"), 417),
    ],
)
def test_a_bad_head_is_a_protocol_error_with_its_status(data, status):
    assert status_of(data) == status


def test_a_protocol_error_after_the_headers_carries_the_clients_request_id():
    with pytest.raises(ProtocolError) as caught:
        protocol.parse_head(head("Host: x", "X-Request-ID: r-1", "Content-Length: x"), LIMITS)
    assert caught.value.request_id == "r-1"


def test_a_head_at_every_limit_is_accepted():
    lines = ["Host: x", *[f"X-{i}: v" for i in range(7)], "Content-Length: 1024"]
    parsed = protocol.parse_head(head(*lines[:8]), LIMITS)
    assert len(parsed.headers) == 8


def test_expect_100_continue_is_owed_on_http_1_1_only():
    assert protocol.parse_head(head("Host: x", "Expect: 100-continue"), LIMITS).expect_continue
    old = protocol.parse_head(head("Expect: 100-continue", first="GET / HTTP/1.0"), LIMITS)
    assert not old.expect_continue


@pytest.mark.parametrize("value", ["r" * 200, "<x>", "a b"])
def test_an_unsafe_request_id_is_replaced(value):
    parsed = protocol.parse_head(head("Host: x", f"X-Request-ID: {value}"), LIMITS)
    assert re.fullmatch(r"[0-9a-f]{16}", parsed.request_id)


# --- responses ----------------------------------------------------------------------------


def test_a_response_is_one_buffer_with_a_computed_content_length():
    data = protocol.render(200, {"Content-Type": "text/plain"}, b"hello", "id-1", close=False)
    status, headers, body = parse_response(data)
    assert status == "HTTP/1.1 200 OK" and body == b"hello"
    assert headers["content-length"] == ["5"] and headers["x-request-id"] == ["id-1"]
    assert headers["server"] == ["dataproc"] and headers["x-content-type-options"] == ["nosniff"]
    assert headers["date"][0].endswith(" GMT") and "connection" not in headers


def test_head_only_renders_the_same_head_without_the_body():
    full = protocol.render(200, {}, b"hello", "i", close=False)
    assert protocol.render(200, {}, b"hello", "i", close=False, head_only=True) == full[:-5]


def test_connection_is_said_when_closing_and_on_a_kept_http_1_0_connection():
    assert b"Connection: close\r\n" in protocol.render(200, {}, b"", "i", close=True)
    kept = protocol.render(200, {}, b"", "i", close=False, version=(1, 0))
    assert b"Connection: keep-alive\r\n" in kept


def test_a_header_value_cannot_break_the_line():
    data = protocol.render(200, {"X-Echo": "a\r\nSet-Cookie: x"}, b"", "i", close=False)
    assert parse_response(data)[1]["x-echo"] == ["a  Set-Cookie: x"]
    assert "set-cookie" not in parse_response(data)[1]


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_carry_neither_a_body_nor_a_content_length(status):
    data = protocol.render(status, {"ETag": '"a"'}, b"ignored", "i", close=False)
    _, headers, body = parse_response(data)
    assert body == b"" and "content-length" not in headers and headers["etag"] == ['"a"']


def test_a_stream_head_is_chunked_on_http_1_1_and_close_delimited_on_http_1_0():
    chunked = parse_response(protocol.render_head(200, {}, "i", length=None, close=False))[1]
    assert chunked["transfer-encoding"] == ["chunked"] and "content-length" not in chunked
    old = protocol.render_head(200, {}, "i", length=None, close=True, version=(1, 0))
    headers = parse_response(old)[1]
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert headers["connection"] == ["close"]


def test_chunks_are_framed_with_their_hex_size():
    assert protocol.chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert protocol.LAST_CHUNK == b"0\r\n\r\n"


# --- gzip ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "allowed"),
    [
        ([], False),
        (["gzip"], True),
        (["GZIP;Q=0.5"], True),
        (["deflate, gzip;q=1.0"], True),
        (["x-gzip"], True),
        (["gzip;q=0"], False),
        (["gzip;q=0.000"], False),
        (["*"], True),
        (["*;q=0"], False),
        (["*, gzip;q=0"], False),  # gzip refused explicitly: * does not bring it back
        (["identity"], False),
        (["br", "gzip"], True),  # several headers form one list
        (["gzip;q=high"], False),  # a malformed weight refuses rather than guesses
        (["gzip;q=1.5"], False),
    ],
)
def test_accept_encoding_is_read_with_its_q_values(values, allowed):
    assert protocol.accepts_gzip(values) is allowed


BIG_JSON = b"[" + b'{"id":1,"value":0.5},' * 100 + b"{}]"


def test_a_json_body_over_1_kib_is_gzipped_when_allowed_and_says_vary():
    headers, use = protocol.negotiate_gzip(
        ["gzip"], 200, {"Content-Type": "application/json"}, len(BIG_JSON)
    )
    assert use and headers["Content-Encoding"] == "gzip" and headers["Vary"] == "Accept-Encoding"
    assert gzip.decompress(protocol.gzip_body(BIG_JSON)) == BIG_JSON


def test_vary_is_merged_with_an_existing_one_and_not_repeated():
    given = {"Content-Type": "text/csv; charset=utf-8", "vary": "Authorization"}
    headers, use = protocol.negotiate_gzip(["gzip"], 200, given, None)
    assert use and headers["vary"] == "Authorization, Accept-Encoding" and "Vary" not in headers
    again, _ = protocol.negotiate_gzip(["gzip"], 200, {**given, "vary": "accept-encoding"}, None)
    assert again["vary"] == "accept-encoding"


def test_a_compressible_body_without_gzip_allowed_is_sent_as_is_with_vary():
    headers, use = protocol.negotiate_gzip([], 200, {"Content-Type": "text/html"}, 5000)
    assert not use and "Content-Encoding" not in headers and headers["Vary"] == "Accept-Encoding"


@pytest.mark.parametrize(
    ("status", "headers", "length"),
    [
        (200, {"Content-Type": "application/json"}, 1024),  # not over 1 KiB
        (200, {"Content-Type": "application/octet-stream"}, 5000),
        (200, {"Content-Type": "application/json", "Content-Encoding": "br"}, 5000),
        (304, {"Content-Type": "application/json"}, 5000),
        (204, {"Content-Type": "application/json"}, 5000),
    ],
    ids=["small", "binary", "encoded", "304", "204"],
)
def test_these_responses_are_never_gzipped(status, headers, length):
    result, use = protocol.negotiate_gzip(["gzip"], status, headers, length)
    assert not use and result is headers


def test_a_gzip_stream_flushes_every_chunk_so_data_flows_and_decodes_whole():
    parts = [b"id,time\r\n", b"1,2024\r\n" * 50, b"2,2025\r\n"]
    encoded = list(protocol.GzipStream(iter(parts)))
    decoder = zlib.decompressobj(31)
    assert decoder.decompress(encoded[0]) == parts[0]  # readable before the stream ends
    assert gzip.decompress(b"".join(encoded)) == b"".join(parts)


def test_closing_a_gzip_stream_closes_the_inner_generator():
    closed = []

    def rows():
        try:
            while True:
                yield b"row\n"
        finally:
            closed.append(True)

    stream = protocol.GzipStream(rows())
    next(stream)
    stream.close()
    assert closed == [True]


def test_closing_a_gzip_stream_before_its_first_chunk_closes_the_producer():
    producer = iter([b"a"])
    closed = []
    producer_with_close = type(
        "P",
        (),
        {"__next__": lambda self: next(producer), "close": lambda self: closed.append(True)},
    )()
    protocol.GzipStream(producer_with_close).close()  # HEAD: nothing was pulled
    assert closed == [True]


# --- If-None-Match ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "etag", "matches"),
    [
        (None, '"a"', False),
        ('"a"', '"a"', True),
        ('"b"', '"a"', False),
        ('"b", "a"', '"a"', True),
        ('"b" ,"a" ', '"a"', True),
        ('W/"a"', '"a"', True),  # weak comparison (RFC 9110 §8.8.3.2)
        ('"a"', 'W/"a"', True),
        ("*", '"a"', True),
        (" * ", '"a"', True),
        ('"a,b"', '"a,b"', True),  # a comma inside a tag is part of it
        ('"a,b"', '"a"', False),
        ("a", '"a"', False),  # unquoted: malformed, matches nothing
        ('"b", junk, "a"', '"a"', False),
        ("", '"a"', False),
    ],
)
def test_if_none_match_lists_weak_tags_and_star(header, etag, matches):
    assert protocol.if_none_match_matches(header, etag) is matches


def test_a_body_compressed_lately_is_not_compressed_again_and_decodes_the_same():
    import gzip

    from dataproc.protocol import CompressedBodies

    bodies = CompressedBodies()
    body = b'{"value": 1.5}' * 200
    first = bodies.gzip(body)
    assert bodies.gzip(body) is first  # the same encoding, from memory
    assert bodies.gzip(bytes(body)) is first  # equal bytes are the same body
    assert gzip.decompress(first) == body


def test_the_compressed_bodies_are_bounded_in_bytes():
    import gzip

    from dataproc.protocol import CompressedBodies

    bodies = CompressedBodies(max_bytes=10_000, max_body_bytes=8_000)
    first = bodies.gzip(b"a" * 4_000)
    for i in range(20):
        bodies.gzip(bytes([65 + i]) * 4_000)
    assert bodies._bytes <= 10_000
    assert bodies.gzip(b"a" * 4_000) is not first  # evicted, compressed anew
    big = b"z" * 9_000  # over max_body_bytes: compressed, never kept
    assert gzip.decompress(bodies.gzip(big)) == big
    assert big not in bodies._entries
