"""PostgreSQL's legacy MD5 password scheme: stored secrets, responses and checks.

The PostgreSQL docs (Frontend/Backend Protocol, "Message Flow",
AuthenticationMD5Password) define the client's answer to a 4-byte salt as
``concat('md5', md5(concat(md5(concat(password, username)), random-salt)))``, and
pg_authid stores the inner part as ``'md5' || md5(password || username)``.
"""

import hashlib
import hmac
import re

# The form pg_authid.rolpassword takes for an MD5 secret: "md5" and 32 lowercase hex
# digits (PostgreSQL's isMD5() in src/backend/libpq/crypt.c).
_MD5_SECRET_RE = re.compile(r"md5[0-9a-f]{32}")
_MD5_PREFIX = "md5"
# AuthenticationMD5Password carries exactly four salt bytes (protocol message formats).
_SALT_LEN = 4


def _md5_hex(data: bytes) -> str:
    # Not a security use of MD5 in Python's sense: it is the wire format PostgreSQL
    # fixes, so tell FIPS-mode OpenSSL builds not to refuse it.
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_secret(user: str, password: str) -> str:
    """The secret PostgreSQL stores for `password`: "md5" + md5hex(password + user)."""
    return _MD5_PREFIX + _md5_hex(password.encode("utf-8") + user.encode("utf-8"))


def is_md5_secret(s: str) -> bool:
    """True if `s` is a stored MD5 secret ("md5" followed by 32 lowercase hex digits)."""
    return _MD5_SECRET_RE.fullmatch(s) is not None


def md5_response(user: str, secret_or_password: str, salt: bytes) -> bytes:
    """What a client sends in PasswordMessage for `salt` (without the trailing NUL).

    `secret_or_password` is either a stored MD5 secret (used as is, the way PostgreSQL
    treats a password that already looks like one) or the plaintext password.
    """
    if len(salt) != _SALT_LEN:
        raise ValueError(f"MD5 salt must be {_SALT_LEN} bytes, got {len(salt)}")
    if is_md5_secret(secret_or_password):
        inner = secret_or_password[len(_MD5_PREFIX) :]
    else:
        inner = md5_secret(user, secret_or_password)[len(_MD5_PREFIX) :]
    return _MD5_PREFIX.encode("ascii") + _md5_hex(inner.encode("ascii") + salt).encode("ascii")


def md5_verify(user: str, secret_or_password: str, salt: bytes, response: bytes) -> bool:
    """Check a client's PasswordMessage `response` (without the NUL) in constant time."""
    expected = md5_response(user, secret_or_password, salt)
    return hmac.compare_digest(expected, response)
