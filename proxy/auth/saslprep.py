"""SASLprep (RFC 4013) and PostgreSQL's rule for turning a password into SCRAM bytes.

SASLprep is the stringprep (RFC 3454) profile that SCRAM (RFC 5802 section 5.1) applies
to passwords before hashing. The tables come from the standard library's `stringprep`
module, which carries RFC 3454's Unicode 3.2 tables.
"""

import stringprep
import unicodedata


def _prohibited_reason(ch: str) -> str | None:
    """Why `ch` may not appear in SASLprep output, or None if it may."""
    # RFC 4013 section 2.3: the prohibited output tables. ASCII space (C.1.1) is allowed.
    if stringprep.in_table_c12(ch):
        return "non-ASCII space character"
    if stringprep.in_table_c21_c22(ch):
        return "control character"
    if stringprep.in_table_c3(ch):
        return "private use character"
    if stringprep.in_table_c4(ch):
        return "non-character code point"
    if stringprep.in_table_c5(ch):
        return "surrogate code point"
    if stringprep.in_table_c6(ch):
        return "character inappropriate for plain text"
    if stringprep.in_table_c7(ch):
        return "character inappropriate for canonical representation"
    if stringprep.in_table_c8(ch):
        # Also bidi requirement 1 of RFC 3454 section 6.
        return "character that changes display properties or is deprecated"
    if stringprep.in_table_c9(ch):
        return "tagging character"
    # RFC 4013 section 2.5: SASLprep prepares stored strings, so unassigned code points
    # (table A.1) are prohibited (RFC 3454 section 7).
    if stringprep.in_table_a1(ch):
        return "unassigned code point"
    return None


def _map(s: str) -> str:
    # RFC 4013 section 2.1: non-ASCII space characters (C.1.2) map to SPACE (U+0020);
    # the "commonly mapped to nothing" characters (B.1) are removed.
    out: list[str] = []
    for ch in s:
        if stringprep.in_table_c12(ch):
            out.append(" ")
        elif not stringprep.in_table_b1(ch):
            out.append(ch)
    return "".join(out)


def _check(s: str) -> None:
    """Raise ValueError if `s` breaks the prohibited-output or bidi rules."""
    for ch in s:
        reason = _prohibited_reason(ch)
        if reason is not None:
            # Name the kind of character, never the character itself: this may be a
            # password and the message may end up in a log.
            raise ValueError(f"SASLprep: string contains a prohibited {reason}")
    # RFC 4013 section 2.4 / RFC 3454 section 6: a string with any RandALCat (D.1)
    # character must contain no LCat (D.2) character and must start and end with a
    # RandALCat character.
    randal = [stringprep.in_table_d1(ch) for ch in s]
    if any(randal):
        if any(stringprep.in_table_d2(ch) for ch in s):
            raise ValueError("SASLprep: string mixes right-to-left and left-to-right characters")
        if not (randal[0] and randal[-1]):
            raise ValueError(
                "SASLprep: right-to-left string must start and end with a right-to-left character"
            )


def saslprep(s: str) -> str:
    """Prepare `s` with SASLprep (RFC 4013); raise ValueError on prohibited input.

    Follows the RFC literally: map, normalize with NFKC as of Unicode 3.2 (the version
    RFC 3454 fixes), then check the prohibited-output, unassigned and bidi rules on the
    normalized result.
    """
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", _map(s))
    _check(prepared)
    return prepared


def _pg_saslprep(password: str) -> str:
    """PostgreSQL's pg_saslprep() (src/common/saslprep.c), quirks included.

    It differs from the RFC in three ways that change the resulting bytes, and a
    pooler must hash exactly like the server or logins fail:
    - pure-ASCII input is returned untouched, control characters and all;
    - input that maps to the empty string is rejected;
    - the prohibited, unassigned and bidi checks look at the mapped string *before*
      normalization, and normalization uses the server's current Unicode tables.
    """
    if password.isascii():
        return password
    mapped = _map(password)
    if not mapped:
        raise ValueError("SASLprep: password maps to the empty string")
    _check(mapped)
    return unicodedata.normalize("NFKC", mapped)


def scram_password_bytes(password: str) -> bytes:
    """The bytes PostgreSQL feeds to SCRAM's Hi() for `password`.

    The PostgreSQL docs ("Password Authentication") and the header of
    src/backend/libpq/auth-scram.c: the password is SASLprep'd, but if that fails
    because of a prohibited character (or the password is not valid UTF-8), the raw
    bytes are used instead rather than refusing the password.
    """
    try:
        prepared = _pg_saslprep(password)
    except ValueError:
        prepared = password
    # surrogateescape: a password decoded from non-UTF-8 bytes that way (as os.fsdecode
    # does) turns back into exactly those bytes, which is what the server hashes.
    return prepared.encode("utf-8", "surrogateescape")
