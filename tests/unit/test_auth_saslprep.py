"""SASLprep (RFC 4013) and PostgreSQL's password-bytes rule."""

import pytest

from proxy.auth import saslprep, scram_password_bytes


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        # RFC 4013 section 3, examples 1-5.
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),  # no transformation
        ("USER", "USER"),  # case preserved, will not match #2
        ("\u00aa", "a"),  # output is NFKC, input in ISO 8859-1
        ("\u2168", "IX"),  # output is NFKC, will match #1
    ],
)
def test_rfc4013_examples(given: str, expected: str) -> None:
    assert saslprep(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        "\u0007",  # RFC 4013 section 3 example 6: prohibited character
        "\u0627\u0031",  # RFC 4013 section 3 example 7: bidi check
    ],
)
def test_rfc4013_error_examples(given: str) -> None:
    with pytest.raises(ValueError):
        saslprep(given)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("a\u00a0b", "a b"),  # NO-BREAK SPACE (C.1.2) maps to SPACE
        ("\u3000x", " x"),  # IDEOGRAPHIC SPACE too
        ("a b", "a b"),  # ASCII space (C.1.1) is allowed
        ("a\u200db\ufeff", "ab"),  # zero-width characters (B.1) map to nothing
        # ZERO WIDTH SPACE is in both C.1.2 and B.1; mapping to SPACE comes first, as
        # in PostgreSQL's pg_saslprep().
        ("a\u200bb", "a b"),
        ("\u00ad", ""),  # the RFC allows an empty result
        ("", ""),
        ("\u0627\u0628", "\u0627\u0628"),  # all right-to-left is fine
        ("\u0627 1 \u0628", "\u0627 1 \u0628"),  # neutral characters in between too
        ("p\u00e4ssw\u00f6rd", "p\u00e4ssw\u00f6rd"),
        ("pa\u0308ssword", "p\u00e4ssword"),  # NFKC composes
    ],
)
def test_mapping_and_normalization(given: str, expected: str) -> None:
    assert saslprep(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        "a\u0000b",  # ASCII control (C.2.1)
        "a\u0085",  # non-ASCII control (C.2.2)
        "\ue000",  # private use (C.3)
        "\ufdd0",  # non-character (C.4)
        "\ud800",  # lone surrogate (C.5)
        "\ufffd",  # inappropriate for plain text (C.6)
        "\u2ff0",  # inappropriate for canonical representation (C.7)
        "a\u200eb",  # LEFT-TO-RIGHT MARK: display property (C.8)
        "\U000e0001",  # tagging character (C.9)
        "\u0221",  # unassigned in Unicode 3.2 (A.1), assigned later
        "\u0627a\u0627",  # RandALCat with LCat
        "1\u0627",  # RandALCat string not starting with RandALCat
    ],
)
def test_prohibited(given: str) -> None:
    with pytest.raises(ValueError):
        saslprep(given)


def test_error_message_does_not_echo_the_input() -> None:
    with pytest.raises(ValueError) as excinfo:
        saslprep("secret\ue000")
    message = str(excinfo.value)
    assert "secret" not in message
    assert "\ue000" not in message
    assert "private use" in message


def test_password_bytes_prepared() -> None:
    assert scram_password_bytes("pencil") == b"pencil"
    assert scram_password_bytes("I\u00adX") == b"IX"
    assert scram_password_bytes("\u2168") == b"IX"
    assert scram_password_bytes("a\u00a0b") == b"a b"
    assert scram_password_bytes("") == b""


@pytest.mark.parametrize(
    "password",
    [
        "\u0007",  # ASCII: PostgreSQL skips SASLprep for pure ASCII anyway
        "a\ue000b",  # prohibited: raw UTF-8
        "\u0627\u0031",  # bidi violation: raw UTF-8
        "x\u0221",  # unassigned: raw UTF-8
    ],
)
def test_password_bytes_fall_back_to_raw_utf8(password: str) -> None:
    with pytest.raises(ValueError):
        saslprep(password)
    assert scram_password_bytes(password) == password.encode("utf-8")


def test_password_bytes_empty_after_mapping_uses_raw_bytes() -> None:
    # pg_saslprep() refuses a non-empty password that maps to nothing.
    assert saslprep("\u00ad") == ""
    assert scram_password_bytes("\u00ad") == b"\xc2\xad"


def test_password_bytes_checks_before_normalization_like_postgresql() -> None:
    # pg_saslprep() runs the prohibited/bidi checks on the mapped, not yet normalized
    # string: TRADE MARK SIGN is bidi-neutral, but its NFKC form "TM" is left-to-right.
    # The RFC rejects the result; PostgreSQL accepts it and hashes the normalized form.
    password = "\u0627\u2122\u0627"
    with pytest.raises(ValueError):
        saslprep(password)
    assert scram_password_bytes(password) == "\u0627TM\u0627".encode()


def test_password_bytes_invalid_utf8_round_trips() -> None:
    # A password read from non-UTF-8 bytes with surrogateescape hashes as those bytes.
    password = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert scram_password_bytes(password) == b"caf\xe9"
