"""PostgreSQL's MD5 password scheme."""

import hashlib

import pytest

from proxy.auth import is_md5_secret, md5_response, md5_secret, md5_verify

USER, PASSWORD = "md5user", "md5secret"
# pg_authid.rolpassword as PostgreSQL 15 stored it for CREATE ROLE md5user PASSWORD
# 'md5secret' with password_encryption = md5.
PG_SECRET = "md51df59ed3db2d942a46e855424bbafc45"
SALT = b"\x01\x02\xfe\xff"


def _expected_response(user: str, password: str, salt: bytes) -> bytes:
    # The PostgreSQL docs, AuthenticationMD5Password:
    # concat('md5', md5(concat(md5(concat(password, username)), random-salt)))
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()


def test_secret_known_value() -> None:
    expected = "md5" + hashlib.md5(b"md5secretmd5user").hexdigest()
    assert md5_secret(USER, PASSWORD) == expected
    assert md5_secret(USER, PASSWORD) == PG_SECRET


def test_secret_non_ascii() -> None:
    expected = "md5" + hashlib.md5("pässwördjürgen".encode()).hexdigest()
    assert md5_secret("jürgen", "pässwörd") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PG_SECRET, True),
        ("md5" + "0" * 32, True),
        (PG_SECRET.upper(), False),
        ("MD5" + PG_SECRET[3:], False),
        (PG_SECRET[:-1], False),
        (PG_SECRET + "0", False),
        (PG_SECRET + "\n", False),
        ("md5" + "g" * 32, False),
        (PG_SECRET[3:], False),
        ("", False),
        ("SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5", False),
    ],
)
def test_is_md5_secret(text: str, expected: bool) -> None:
    assert is_md5_secret(text) is expected


def test_response_from_password_and_from_secret_agree() -> None:
    expected = _expected_response(USER, PASSWORD, SALT)
    assert md5_response(USER, PASSWORD, SALT) == expected
    assert md5_response(USER, PG_SECRET, SALT) == expected
    assert len(expected) == 35


def test_response_depends_on_salt() -> None:
    assert md5_response(USER, PASSWORD, SALT) != md5_response(USER, PASSWORD, b"\x00" * 4)


@pytest.mark.parametrize("salt", [b"", b"\x00\x01\x02", b"\x00" * 5])
def test_response_rejects_bad_salt_length(salt: bytes) -> None:
    with pytest.raises(ValueError):
        md5_response(USER, PASSWORD, salt)


@pytest.mark.parametrize("stored", [PASSWORD, PG_SECRET])
def test_verify(stored: str) -> None:
    response = _expected_response(USER, PASSWORD, SALT)
    assert md5_verify(USER, stored, SALT, response)


@pytest.mark.parametrize("stored", [PASSWORD, PG_SECRET])
def test_verify_rejects(stored: str) -> None:
    good = _expected_response(USER, PASSWORD, SALT)
    assert not md5_verify(USER, stored, SALT, _expected_response(USER, "wrong", SALT))
    assert not md5_verify(USER, stored, b"\x00" * 4, good)
    assert not md5_verify(USER, stored, SALT, good + b"\x00")
    assert not md5_verify(USER, stored, SALT, b"")
    assert not md5_verify(USER, stored, SALT, good.upper())


def test_verify_plaintext_user_matters() -> None:
    response = _expected_response(USER, PASSWORD, SALT)
    assert not md5_verify("someone", PASSWORD, SALT, response)
