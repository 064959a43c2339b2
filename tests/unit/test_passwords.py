"""Tests for dataproc.passwords: bcrypt hashing, the 72-byte rule, unknown-user timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from dataproc import passwords
from dataproc.passwords import (
    MAX_PASSWORD_BYTES,
    PasswordTooLong,
    hash_password,
    verify_password,
)

COST = 4  # bcrypt's minimum: keeps the tests fast
ORIGINAL_ADMIN_HASH = "$2b$12$a/pMatsPyWuHa5KdqatsFOLZgPYjPZU4If4//jeretXqZ.ujoYFJG"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkpw_calls(monkeypatch):
    """Record every bcrypt.checkpw call (the work that sets the timing) and still run it."""
    calls = []
    real_checkpw = bcrypt.checkpw

    def recording_checkpw(password, hashed):
        calls.append(hashed)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", recording_checkpw)
    return calls


def test_hash_password_then_verify_password_round_trips():
    assert verify_password("correct horse", hash_password("correct horse", COST), COST)


def test_hash_password_makes_a_2b_hash_at_the_given_cost():
    assert hash_password("correct horse", COST).startswith("$2b$04$")


def test_hash_password_salts_each_hash():
    assert hash_password("correct horse", COST) != hash_password("correct horse", COST)


def test_verify_password_wrong_password_is_false():
    assert verify_password("wrong horse", hash_password("correct horse", COST), COST) is False


def test_verify_password_none_hash_is_false():
    assert verify_password("correct horse", None, COST) is False


@pytest.mark.parametrize(
    "garbage", ["", "not a hash", "$2b$04$short", "$1$abc$def", "$2b$99$" + "a" * 53]
)
def test_verify_password_garbage_hash_is_false(garbage):
    assert verify_password("correct horse", garbage, COST) is False


def test_verify_password_hash_with_bad_salt_is_false():
    assert verify_password("correct horse", "$2b$04$" + "z" * 53, COST) is False


def test_verify_password_non_string_hash_is_false():
    assert verify_password("correct horse", b"$2b$04$abc", COST) is False  # type: ignore[arg-type]


def test_verify_password_lone_surrogate_password_is_false():
    assert verify_password("\ud800", hash_password("correct horse", COST), COST) is False


def test_hash_password_refuses_73_bytes():
    with pytest.raises(PasswordTooLong):
        hash_password("a" * 73, COST)


def test_password_too_long_is_a_value_error():
    assert issubclass(PasswordTooLong, ValueError)


def test_verify_password_73_bytes_is_false_even_when_the_first_72_match():
    hashed = hash_password("a" * 72, COST)
    assert verify_password("a" * 73, hashed, COST) is False


def test_hash_password_accepts_72_bytes_of_two_byte_characters():
    password = "é" * 36  # 72 bytes of UTF-8, 36 characters
    assert len(password.encode()) == MAX_PASSWORD_BYTES
    assert verify_password(password, hash_password(password, COST), COST)


def test_hash_password_refuses_73_bytes_of_mostly_multibyte_characters():
    with pytest.raises(PasswordTooLong):
        hash_password("é" * 36 + "a", COST)  # 37 characters, 73 bytes


def test_hash_password_counts_bytes_not_characters():
    with pytest.raises(PasswordTooLong):
        hash_password("€" * 25, COST)  # 25 characters, 75 bytes


def test_verify_password_accepts_the_original_services_admin_hash():
    assert verify_password("admin", ORIGINAL_ADMIN_HASH, 12)


def test_verify_password_unknown_user_does_one_bcrypt_check_at_the_configured_cost(checkpw_calls):
    assert verify_password("correct horse", None, COST) is False
    assert len(checkpw_calls) == 1
    assert checkpw_calls[0].startswith(b"$2b$04$")


def test_verify_password_garbage_hash_does_one_bcrypt_check(checkpw_calls):
    assert verify_password("correct horse", "not a hash", COST) is False
    assert len(checkpw_calls) == 1


def test_verify_password_over_long_password_does_one_bcrypt_check(checkpw_calls):
    hashed = hash_password("correct horse", COST)
    assert verify_password("a" * 73, hashed, COST) is False
    assert len(checkpw_calls) == 1


def test_verify_password_reuses_the_dummy_hash_for_a_cost(checkpw_calls):
    verify_password("x", None, COST)
    verify_password("y", None, COST)
    assert checkpw_calls[0] == checkpw_calls[1]


def test_importing_passwords_does_no_bcrypt_work():
    # A fresh interpreter where any bcrypt call fails: the import must still succeed.
    code = (
        "import bcrypt\n"
        "def refuse(*args, **kwargs): raise AssertionError('bcrypt work at import')\n"
        "bcrypt.hashpw = bcrypt.gensalt = bcrypt.checkpw = refuse\n"
        "import dataproc.passwords as p\n"
        "assert p._dummy_hash.cache_info().currsize == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, check=True)


def test_module_exports_the_72_byte_limit():
    assert passwords.MAX_PASSWORD_BYTES == 72
