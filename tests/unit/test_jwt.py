"""Tests for dataproc.jwt: one behaviour per test, known answers from RFC 7515, and hand-forged tokens."""

import base64
import hashlib
import hmac
import json
import time

import pytest

from dataproc import jwt
from dataproc.jwt import InvalidToken, b64url_decode, b64url_encode, decode, encode, sign

KEY = b"k" * 32 + b"-test-secret-do-not-leak"
NOW = 1_700_000_000
CLAIMS = {
    "sub": "alice",
    "role": "user",
    "type": "access",
    "iat": NOW,
    "exp": NOW + 1800,
    "jti": "j1",
}

# RFC 7515 Appendix A.1
A1_KEY = base64.urlsafe_b64decode(
    "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow=="
)
A1_HEADER = b'{"typ":"JWT",\r\n "alg":"HS256"}'
A1_PAYLOAD = b'{"iss":"joe",\r\n "exp":1300819380,\r\n "http://example.com/is_root":true}'
A1_TOKEN = (
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header, claims, key=KEY, digest=hashlib.sha256, signature=None) -> str:
    """Build a token by hand, as an independent implementation would; dicts are dumped, bytes taken raw."""
    raw = [
        part if isinstance(part, bytes) else json.dumps(part).encode() for part in (header, claims)
    ]
    signing_input = f"{b64(raw[0])}.{b64(raw[1])}"
    if signature is None:
        signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64(signature)}"


def reason_of(token, key=KEY, **kwargs) -> str:
    kwargs.setdefault("now", NOW)
    with pytest.raises(InvalidToken) as info:
        decode(token, key, **kwargs)
    return info.value.reason


def with_claims(**changes) -> str:
    claims = {**CLAIMS, **changes}
    return forge({"alg": "HS256", "typ": "JWT"}, {k: v for k, v in claims.items() if v is not ...})


# --- known answers and round trips ---------------------------------------------------------------


def test_sign_matches_rfc7515_appendix_a1_signature():
    signing_input = f"{b64(A1_HEADER)}.{b64(A1_PAYLOAD)}".encode()
    assert b64url_encode(sign(signing_input, A1_KEY)) == A1_TOKEN.split(".")[2]


def test_rfc7515_appendix_a1_segments_are_the_expected_bytes():
    assert A1_TOKEN.split(".")[:2] == [b64(A1_HEADER), b64(A1_PAYLOAD)]


def test_decode_accepts_rfc7515_appendix_a1_token_before_exp():
    claims = decode(A1_TOKEN, A1_KEY, now=1300819379)
    assert claims == {"iss": "joe", "exp": 1300819380, "http://example.com/is_root": True}


def test_decode_rejects_rfc7515_appendix_a1_token_at_exp():
    assert reason_of(A1_TOKEN, A1_KEY, now=1300819380) == "token expired"


def test_encode_then_decode_returns_the_claims():
    assert decode(encode(CLAIMS, KEY), KEY, now=NOW) == CLAIMS


def test_encode_writes_the_exact_compact_header():
    assert b64url_decode(encode(CLAIMS, KEY).split(".")[0]) == b'{"alg":"HS256","typ":"JWT"}'


def test_encode_writes_compact_json_claims_without_padding():
    token = encode(CLAIMS, KEY)
    assert "=" not in token
    assert b64url_decode(token.split(".")[1]) == json.dumps(CLAIMS, separators=(",", ":")).encode()


def test_str_key_is_utf8_encoded():
    assert decode(encode(CLAIMS, "clé"), "clé".encode(), now=NOW) == CLAIMS


def test_encode_refuses_an_empty_key():
    with pytest.raises(ValueError):
        encode(CLAIMS, b"")


def test_decode_refuses_a_nan_clock():
    with pytest.raises(ValueError):
        decode(encode(CLAIMS, KEY), KEY, now=float("nan"))


# --- strict base64url ----------------------------------------------------------------------------


def test_b64url_decode_inverts_encode_for_every_length():
    for n in range(40):
        assert b64url_decode(b64url_encode(bytes(range(n)))) == bytes(range(n))


def test_b64url_decode_rejects_impossible_length():
    with pytest.raises(ValueError):
        b64url_decode("abcde")


# --- size, shape and encoding --------------------------------------------------------------------


def test_decode_rejects_non_str_token():
    assert reason_of(encode(CLAIMS, KEY).encode()) == "token is not a string"


def test_decode_rejects_token_longer_than_max_token_bytes():
    token = with_claims(pad="x" * jwt.MAX_TOKEN_BYTES)
    assert reason_of(token) == "token too long"


def test_decode_rejects_non_ascii_token():
    assert reason_of(encode(CLAIMS, KEY) + "é") == "token is not ASCII"


def test_decode_rejects_two_segments():
    assert reason_of(encode(CLAIMS, KEY).rsplit(".", 1)[0]) == "malformed token"


def test_decode_rejects_four_segments():
    assert reason_of(encode(CLAIMS, KEY) + ".e30") == "malformed token"


def test_decode_rejects_padding():
    assert reason_of(encode(CLAIMS, KEY) + "=") == "invalid base64url"


@pytest.mark.parametrize("char", ["+", "/", " "])
def test_decode_rejects_characters_outside_the_base64url_alphabet(char):
    h, p, s = encode(CLAIMS, KEY).split(".")
    assert reason_of(f"{h}.{p[:5]}{char}{p[6:]}.{s}") == "invalid base64url"


def test_decode_rejects_non_canonical_base64_that_decodes_to_the_same_bytes():
    h, p, s = encode(CLAIMS, KEY).split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    other = (
        s[:-1] + alphabet[alphabet.index(s[-1]) ^ 1]
    )  # 43 chars carry 256 bits: low 2 bits unused
    assert base64.urlsafe_b64decode(other + "=") == base64.urlsafe_b64decode(s + "=")
    assert reason_of(f"{h}.{p}.{other}") == "invalid base64url"


# --- header ---------------------------------------------------------------------------------------


def test_decode_rejects_alg_none():
    assert reason_of(forge({"alg": "none", "typ": "JWT"}, CLAIMS)) == "unsupported alg"


def test_decode_rejects_alg_none_with_empty_signature():
    assert reason_of(forge({"alg": "none"}, CLAIMS, signature=b"")) == "unsupported alg"


def test_decode_rejects_alg_hs512():
    token = forge({"alg": "HS512", "typ": "JWT"}, CLAIMS, digest=hashlib.sha512)
    assert reason_of(token) == "unsupported alg"


def test_decode_rejects_alg_rs256():
    assert reason_of(forge({"alg": "RS256", "typ": "JWT"}, CLAIMS)) == "unsupported alg"


def test_decode_rejects_missing_alg():
    assert reason_of(forge({"typ": "JWT"}, CLAIMS)) == "unsupported alg"


def test_decode_rejects_alg_that_is_not_a_string():
    assert reason_of(forge({"alg": ["HS256"], "typ": "JWT"}, CLAIMS)) == "unsupported alg"


def test_decode_checks_alg_before_computing_any_hmac(monkeypatch):
    def no_hmac(*args):
        raise AssertionError("HMAC computed for a token with the wrong alg")

    monkeypatch.setattr(jwt, "sign", no_hmac)
    assert reason_of(forge({"alg": "HS512"}, CLAIMS, digest=hashlib.sha512)) == "unsupported alg"


def test_decode_rejects_header_that_is_a_json_list():
    assert reason_of(forge(["HS256"], CLAIMS)) == "header not a JSON object"


def test_decode_rejects_header_that_is_not_json():
    assert reason_of(forge(b"alg=HS256", CLAIMS)) == "malformed header"


def test_decode_rejects_deeply_nested_header():
    assert reason_of(forge(b"[" * 5000, CLAIMS)) == "malformed header"


def test_decode_accepts_lowercase_typ():
    assert decode(forge({"alg": "HS256", "typ": "jwt"}, CLAIMS), KEY, now=NOW) == CLAIMS


def test_decode_rejects_other_typ():
    assert reason_of(forge({"alg": "HS256", "typ": "JOSE+JSON"}, CLAIMS)) == "unsupported typ"


def test_decode_rejects_crit_header():
    token = forge({"alg": "HS256", "typ": "JWT", "crit": ["exp"], "exp": 1}, CLAIMS)
    assert reason_of(token) == "unsupported crit header"


def test_decode_rejects_duplicate_keys_in_header():
    assert reason_of(forge(b'{"alg":"none","alg":"HS256"}', CLAIMS)) == "duplicate key in header"


# --- signature ------------------------------------------------------------------------------------


def test_decode_rejects_tampered_payload():
    h, _, s = encode(CLAIMS, KEY).split(".")
    p = b64url_encode(json.dumps({**CLAIMS, "role": "admin"}, separators=(",", ":")).encode())
    assert reason_of(f"{h}.{p}.{s}") == "signature mismatch"


def test_decode_rejects_tampered_signature():
    h, p, s = encode(CLAIMS, KEY).split(".")
    flipped = bytes([b64url_decode(s)[0] ^ 1]) + b64url_decode(s)[1:]
    assert reason_of(f"{h}.{p}.{b64url_encode(flipped)}") == "signature mismatch"


def test_decode_rejects_wrong_key():
    assert (
        reason_of(encode(CLAIMS, KEY), b"another key of sufficient length!") == "signature mismatch"
    )


def test_decode_rejects_signature_of_wrong_length():
    h, p, s = encode(CLAIMS, KEY).split(".")
    assert reason_of(f"{h}.{p}.{b64url_encode(b64url_decode(s)[:31])}") == "bad signature length"


# --- claims ---------------------------------------------------------------------------------------


def test_decode_rejects_expired_token():
    assert reason_of(with_claims(exp=NOW - 1)) == "token expired"


def test_decode_accepts_expired_token_within_leeway():
    assert decode(with_claims(exp=NOW - 1), KEY, now=NOW, leeway=5)["exp"] == NOW - 1


def test_decode_rejects_missing_exp():
    assert reason_of(with_claims(exp=...)) == "missing exp claim"


def test_decode_rejects_exp_true():
    assert reason_of(with_claims(exp=True)) == "invalid exp claim"


def test_decode_rejects_exp_as_string():
    assert reason_of(with_claims(exp="9999999999")) == "invalid exp claim"


def test_decode_rejects_exp_written_as_raw_nan():
    raw = b'{"sub":"alice","exp":NaN}'
    assert reason_of(forge({"alg": "HS256", "typ": "JWT"}, raw)) == "malformed claims"


def test_decode_rejects_exp_that_overflows_to_infinity():
    raw = b'{"sub":"alice","exp":1e400}'
    assert reason_of(forge({"alg": "HS256", "typ": "JWT"}, raw)) == "invalid exp claim"


def test_decode_accepts_huge_integer_exp_without_overflow():
    assert decode(with_claims(exp=10**400), KEY, now=NOW, leeway=1)["exp"] == 10**400


def test_decode_rejects_iat_as_bool():
    assert reason_of(with_claims(iat=False)) == "invalid iat claim"


def test_decode_rejects_iat_in_the_future():
    assert reason_of(with_claims(iat=NOW + 60)) == "token issued in the future"


def test_decode_rejects_nbf_in_the_future():
    assert reason_of(with_claims(nbf=NOW + 60)) == "token not yet valid"


def test_decode_accepts_nbf_in_the_future_within_leeway():
    assert decode(with_claims(nbf=NOW + 5), KEY, now=NOW, leeway=5)["nbf"] == NOW + 5


def test_decode_rejects_sub_that_is_not_a_string():
    assert reason_of(with_claims(sub=42)) == "invalid sub claim"


def test_decode_rejects_wrong_type_when_expected_type_given():
    assert reason_of(encode(CLAIMS, KEY), expected_type="refresh") == "wrong token type"


def test_decode_accepts_matching_expected_type():
    assert decode(encode(CLAIMS, KEY), KEY, now=NOW, expected_type="access") == CLAIMS


def test_decode_rejects_duplicate_keys_in_claims():
    raw = b'{"sub":"alice","type":"refresh","type":"access","exp":9999999999}'
    assert reason_of(forge({"alg": "HS256", "typ": "JWT"}, raw)) == "duplicate key in claims"


def test_decode_rejects_claims_that_are_not_an_object():
    assert reason_of(forge({"alg": "HS256", "typ": "JWT"}, [1, 2])) == "claims not a JSON object"


# --- interoperability -----------------------------------------------------------------------------


def test_decode_accepts_a_token_built_by_hand_like_pyjwt():
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64(json.dumps(CLAIMS, separators=(",", ":")).encode())
    signature = b64(hmac.new(KEY, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    assert decode(f"{header}.{payload}.{signature}", KEY, now=NOW) == CLAIMS


def test_decode_accepts_other_key_order_and_whitespace():
    reordered = json.dumps(dict(reversed(CLAIMS.items())), indent=2).encode()
    token = forge(b'{ "typ" : "JWT",\n "alg" : "HS256" }', reordered)
    assert decode(token, KEY, now=NOW) == CLAIMS


def test_pyjwt_accepts_our_token():
    pyjwt = pytest.importorskip("jwt")
    claims = {**CLAIMS, "iat": int(time.time()), "exp": int(time.time()) + 600}
    assert pyjwt.decode(encode(claims, KEY), KEY, algorithms=["HS256"]) == claims


def test_decode_accepts_pyjwt_token():
    pyjwt = pytest.importorskip("jwt")
    claims = {**CLAIMS, "iat": int(time.time()), "exp": int(time.time()) + 600}
    assert decode(pyjwt.encode(claims, KEY, algorithm="HS256"), KEY, now=time.time()) == claims


def test_pyjwt_and_we_produce_identical_tokens():
    pyjwt = pytest.importorskip("jwt")
    assert pyjwt.encode(CLAIMS, KEY, algorithm="HS256") == encode(CLAIMS, KEY)


# --- what a rejection reveals ---------------------------------------------------------------------


def test_invalid_token_reason_never_contains_the_token_or_the_key():
    good = encode(CLAIMS, KEY)
    h, p, s = good.split(".")
    bad_tokens = [
        good + "=",
        good + ".x",
        f"{h}.{p}.{s[:-2]}",
        f"{h}.{p}",
        f"{h}.{p}.{s}é",
        good * 400,
        forge({"alg": "none"}, CLAIMS),
        forge(b"not json", CLAIMS),
        forge(b'{"alg":"HS256"}', b"{bad"),
        with_claims(exp=NOW - 1),
        with_claims(exp="x"),
        with_claims(sub=1),
        good,
    ]
    for token in bad_tokens:
        with pytest.raises(InvalidToken) as info:
            decode(token, KEY, now=NOW, expected_type="refresh")
        text = f"{info.value.reason} {info.value} {info.value!r}"
        assert not any(len(part) >= 8 and part in text for part in [token, *token.split(".")])
        assert KEY.decode() not in text and "do-not-leak" not in text
