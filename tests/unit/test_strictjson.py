"""Tests for dataproc.strictjson: the one strict JSON loader of request bodies and upstream
documents. Literals in, values or `InvalidJSON` out."""

from __future__ import annotations

import json

import pytest

from dataproc.strictjson import MAX_DEPTH, InvalidJSON, loads

# --- what web's loader asserted (moved from test_web.py) -----------------------------------


def test_loads_strict_reads_plain_json_from_bytes_or_text():
    assert loads(b'{"a": [1, 2.5, "x", true, null]}') == {"a": [1, 2.5, "x", True, None]}
    assert loads("[]") == []


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}'])
def test_loads_strict_refuses_non_finite_constants(text):
    with pytest.raises(ValueError, match="not valid JSON"):
        loads(text)


def test_loads_strict_refuses_duplicate_keys_at_any_depth():
    with pytest.raises(ValueError, match="duplicate key"):
        loads('{"a": {"b": 1, "b": 2}}')


def test_loads_strict_accepts_nesting_at_the_limit():
    depth = MAX_DEPTH
    assert loads("[" * depth + "]" * depth) == json.loads("[" * depth + "]" * depth)


def test_loads_strict_refuses_nesting_over_the_limit():
    depth = MAX_DEPTH + 1
    with pytest.raises(ValueError, match="nested too deeply"):
        loads("[" * depth + "]" * depth)


def test_loads_strict_does_not_count_brackets_inside_strings():
    assert loads('{"password": "' + "[" * 60 + '{"}') == {"password": "[" * 60 + "{"}
    assert loads(r'{"a": "\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}')["a"].startswith('"[')


def test_loads_strict_nesting_cannot_hide_behind_closing_brackets_in_strings():
    text = '{"a": "' + "]" * 100 + '", "b": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(ValueError, match="nested too deeply"):
        loads(text)


def test_loads_strict_refuses_invalid_utf8_as_a_value_error():
    with pytest.raises(ValueError):
        loads(b'"\xc3\x28"')


def test_loads_strict_refuses_a_lone_surrogate():
    with pytest.raises(ValueError):
        loads(r'{"name": "\ud800"}')


# --- one error type, with a message ---------------------------------------------------------


def reason_of(data: bytes | str) -> InvalidJSON:
    with pytest.raises(InvalidJSON) as caught:
        loads(data)
    return caught.value


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"{'a': 1}", b'{"a": 1} x', b'{"a": 01}', b"[1,]", b"\xff", b"[" * 100_000],
    ids=[
        "empty",
        "truncated",
        "single-quotes",
        "trailing",
        "leading-zero",
        "comma",
        "utf8",
        "deep",
    ],
)
def test_every_refusal_is_an_invalid_json_that_is_a_value_error(data):
    error = reason_of(data)
    assert isinstance(error, ValueError) and error.reason and str(error)
    assert error.path is None


def test_a_duplicate_key_is_named():
    assert reason_of('{"time": 1, "time": 2}').reason == "duplicate key 'time'"


def test_a_long_duplicate_key_is_clipped_in_the_message():
    key = "k" * 10_000
    text = '{"' + key + '": 1, "' + key + '": 2}'
    assert len(reason_of(text).reason) < 100


def test_each_constant_is_named():
    assert reason_of("[-Infinity]").reason == "-Infinity is not valid JSON"
    assert reason_of("[NaN]").reason == "NaN is not valid JSON"


def test_deep_nesting_says_the_limit():
    assert reason_of("[" * 100).reason == f"nested too deeply (over {MAX_DEPTH} levels)"


def test_the_depth_limit_can_be_lowered_per_call():
    assert loads("[[]]", max_depth=2) == [[]]
    with pytest.raises(InvalidJSON, match="over 1 levels"):
        loads("[[]]", max_depth=1)


def test_objects_count_towards_depth_like_arrays():
    text = '{"a": ' * MAX_DEPTH + "1" + "}" * MAX_DEPTH
    assert loads(text) is not None
    with pytest.raises(InvalidJSON, match="nested too deeply"):
        loads('{"a": ' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1))


def test_an_escaped_backslash_ends_before_the_closing_quote():
    # "\\" is one backslash: the quote after it closes the string, so the brackets count.
    text = '["\\\\", ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "]"
    with pytest.raises(InvalidJSON, match="nested too deeply"):
        loads(text)


def test_brackets_in_an_unterminated_string_are_a_syntax_error_not_nesting():
    error = reason_of('["' + "[" * 100)
    assert "nested" not in error.reason


def test_invalid_utf8_says_where():
    assert reason_of(b'{"x": "\xff"}').reason == "not UTF-8 (invalid start byte at byte 7)"


def test_utf16_is_refused_though_json_loads_would_take_it():
    assert json.loads(json.dumps({"a": 1}).encode("utf-16")) == {"a": 1}
    assert reason_of(json.dumps({"a": 1}).encode("utf-16")).reason.startswith("not UTF-8")


def test_an_integer_over_pythons_digit_limit_is_invalid_json():
    assert reason_of("1" * 5000).path is None


def test_large_numbers_are_not_refused():
    # 1e400 reads as inf: a value the caller judges (a document's time, out of range).
    assert loads("[1e400]") == [float("inf")]


# --- unpaired surrogates: refused, and located ------------------------------------------------


def test_a_lone_surrogate_is_located_by_its_path():
    error = reason_of(r'{"a": [1, {"b": "x\ud800"}]}')
    assert error.reason == "text contains an unpaired surrogate"
    assert error.path == ("a", 1, "b")
    assert str(error) == "text contains an unpaired surrogate at '/a/1/b'"


def test_a_lone_surrogate_in_a_key_is_located_at_its_object():
    error = reason_of(r'{"a": {"\udc00": 1}}')
    assert (error.reason, error.path) == ("a key contains an unpaired surrogate", ("a",))


def test_a_lone_surrogate_at_the_top_has_the_empty_path():
    assert reason_of(r'"\ud800"').path == ()
    assert reason_of(r'{"\ud800": 1}').path == ()


def test_a_raw_surrogate_in_text_input_is_refused_too():
    assert reason_of('["\ud800"]').path == (0,)


def test_a_surrogate_pair_is_text():
    assert loads(r'["\ud83d\ude00"]') == ["\U0001f600"]


def test_the_pointer_escapes_slash_and_tilde_and_never_holds_the_surrogate():
    error = reason_of(r'{"a/b~c": "\ud800"}')
    assert str(error).endswith("at '/a~1b~0c'")
    str(error).encode("utf-8")  # the message itself is text a response can carry


def test_nul_is_text_and_is_not_the_loaders_business():
    assert loads(r'{"a": "\u0000"}') == {"a": "\x00"}
