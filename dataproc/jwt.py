"""HS256 JSON Web Tokens, by hand: JWS compact serialization (RFC 7515) carrying JWT claims (RFC 7519).

Owns: strict base64url, HMAC-SHA256 signing, `encode`, and `decode`, which checks a token in a
fixed order (size → 3 segments → strict base64url → header with alg == "HS256" before any HMAC →
constant-time signature check → claims) and raises one exception type, `InvalidToken(reason)`.
Leaves to others: choosing and storing keys, what the claims mean (sub, role, jti), the clock (`now` is
a parameter), and HTTP. It imports no other dataproc module, so it can be lifted out alone.
"""

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from typing import Any

MAX_TOKEN_BYTES = 8192  # longer tokens are refused before any parsing
_HEADER = {"alg": "HS256", "typ": "JWT"}
_SIGNATURE_BYTES = 32  # SHA-256 output; RFC 7518 §3.2
_B64URL = re.compile(r"[A-Za-z0-9_-]*")  # explicit ranges: \w or \d would admit non-ASCII
_NUMERIC_DATES = ("exp", "nbf", "iat")  # RFC 7519 §2 NumericDate claims we check


class InvalidToken(Exception):
    """Raised for every rejected token; .reason is short, log-safe and client-safe (no token, no key)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2, Appendix C)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    """Strict inverse of b64url_encode; raises ValueError on anything it would not have produced."""
    # urlsafe_b64decode silently skips characters outside the alphabet, so check the alphabet first;
    # a length of 4n+1 cannot come from any byte string.
    if not isinstance(segment, str) or not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error:
        raise ValueError("not unpadded base64url") from None
    # Unused low bits in the last character must be zero (RFC 4648 §3.5): one token, one spelling.
    if b64url_encode(data) != segment:
        raise ValueError("non-canonical base64url")
    return data


def _key_bytes(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError("key must be bytes or str")
    if not key:
        raise ValueError(
            "empty HMAC key"
        )  # anyone could forge; a configuration error, not a bad token
    return bytes(key)


def sign(signing_input: bytes, key: bytes | str) -> bytes:
    """HMAC-SHA256 of the JWS signing input (RFC 7515 §5.1, RFC 7518 §3.2)."""
    return hmac.new(_key_bytes(key), signing_input, hashlib.sha256).digest()


def _dumps(obj: Mapping[str, Any]) -> bytes:
    # Compact, and never NaN/Infinity: we only emit what our own strict decoder accepts.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode(claims: Mapping[str, Any], key: bytes | str) -> str:
    """Compact JWS: header {"alg":"HS256","typ":"JWT"}, compact JSON claims, base64url without padding."""
    signing_input = f"{b64url_encode(_dumps(_HEADER))}.{b64url_encode(_dumps(dict(claims)))}"
    signature = sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{b64url_encode(signature)}"


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    # RFC 7515 §5.2 step 4 / RFC 7519 §7.2 step 4: duplicate names must be rejected, not last-wins.
    obj = {}
    for name, value in pairs:
        if name in obj:
            raise _DuplicateKey(name)
        obj[name] = value
    return obj


def _refuse_constant(name: str) -> None:
    raise ValueError("non-finite number")  # NaN/Infinity are not JSON (RFC 8259 §6)


def _load_object(raw: bytes, what: str) -> dict:
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_pairs)
    except _DuplicateKey:
        raise InvalidToken(f"duplicate key in {what}") from None
    except (
        UnicodeDecodeError,
        ValueError,
        RecursionError,
    ):  # RecursionError: absurdly nested arrays
        raise InvalidToken(f"malformed {what}") from None
    if not isinstance(value, dict):
        raise InvalidToken(f"{what} not a JSON object")
    return value


def _split(token: object) -> tuple[str, list[bytes]]:
    if not isinstance(token, str):
        raise InvalidToken("token is not a string")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidToken("token too long")
    if not token.isascii():
        raise InvalidToken("token is not ASCII")
    parts = token.split(".")
    if len(parts) != 3:  # JWS compact serialization; JWE (5 parts) and unsecured forms are not ours
        raise InvalidToken("malformed token")
    try:
        decoded = [b64url_decode(part) for part in parts]
    except ValueError:
        raise InvalidToken("invalid base64url") from None
    return f"{parts[0]}.{parts[1]}", decoded


def _check_header(header: dict) -> None:
    # The algorithm is fixed by us, never chosen by the token (RFC 8725 §2.1, §3.1): this rejects
    # "none", other HMACs, and RS256-with-our-secret-as-public-key confusion, before any HMAC.
    if header.get("alg") != "HS256":
        raise InvalidToken("unsupported alg")
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ.upper() != "JWT":  # case-insensitive: RFC 7515 §4.1.9
        raise InvalidToken("unsupported typ")
    if "crit" in header:  # we understand no extensions, so must refuse (RFC 7515 §4.1.11)
        raise InvalidToken("unsupported crit header")


def _check_signature(signing_input: str, signature: bytes, key: bytes | str) -> None:
    if len(signature) != _SIGNATURE_BYTES:
        raise InvalidToken("bad signature length")
    if not hmac.compare_digest(signature, sign(signing_input.encode("ascii"), key)):
        raise InvalidToken("signature mismatch")


def _numeric_date(claims: dict, name: str) -> None:
    value = claims[name]
    # bool is an int subclass; a float may be inf (1e400 parses as inf). Big ints are fine as they are.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken(f"invalid {name} claim")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidToken(f"invalid {name} claim")


def check_claims(
    claims: dict, *, now: float, leeway: float = 0.0, expected_type: str | None = None
) -> None:
    """The checks of `decode` that depend on the time and the type, for claims whose signature
    was verified before (a caller that remembers verified tokens re-checks them with this)."""
    if not (math.isfinite(now) and math.isfinite(leeway) and leeway >= 0):
        raise ValueError("now and leeway must be finite, leeway >= 0")
    if "exp" not in claims:
        raise InvalidToken("missing exp claim")
    for name in _NUMERIC_DATES:
        if name in claims:
            _numeric_date(claims, name)
    # Arithmetic stays on our side (now ± leeway): exp + leeway overflows for a huge int exp.
    if now - leeway >= claims["exp"]:  # RFC 7519 §4.1.4: on or after exp is expired
        raise InvalidToken("token expired")
    if "nbf" in claims and now + leeway < claims["nbf"]:  # RFC 7519 §4.1.5
        raise InvalidToken("token not yet valid")
    if "iat" in claims and claims["iat"] > now + leeway:
        raise InvalidToken("token issued in the future")
    if "sub" in claims and not isinstance(claims["sub"], str):  # RFC 7519 §4.1.2: a StringOrURI
        raise InvalidToken("invalid sub claim")
    if expected_type is not None and claims.get("type") != expected_type:
        raise InvalidToken("wrong token type")


def decode(
    token: str,
    key: bytes | str,
    *,
    now: float,
    leeway: float = 0.0,
    expected_type: str | None = None,
) -> dict:
    """Verify an HS256 compact JWS and return its claims; raise InvalidToken otherwise."""
    # A NaN clock would make every comparison false, so every token valid: fail loudly instead
    # (check_claims says so again, after the signature).
    if not (math.isfinite(now) and math.isfinite(leeway) and leeway >= 0):
        raise ValueError("now and leeway must be finite, leeway >= 0")
    signing_input, (raw_header, raw_claims, signature) = _split(token)
    _check_header(_load_object(raw_header, "header"))
    _check_signature(signing_input, signature, key)
    # Claims are parsed only once the signature proves we wrote them.
    claims = _load_object(raw_claims, "claims")
    check_claims(claims, now=now, leeway=leeway, expected_type=expected_type)
    return claims
