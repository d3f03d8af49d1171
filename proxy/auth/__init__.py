"""Client and server authentication for pgmux: SCRAM-SHA-256, MD5 and SASLprep.

Pure: this package imports only the standard library and never touches a socket, the
event loop or logging. It turns the bytes of an authentication exchange into replies
and verdicts; the connection code moves the bytes and maps AuthError (SQLSTATE 28P01)
and AuthProtocolError (08P01) to ErrorResponses.
"""

from .errors import AuthError, AuthProtocolError
from .md5 import is_md5_secret, md5_response, md5_secret, md5_verify
from .saslprep import saslprep, scram_password_bytes
from .scram import (
    DEFAULT_ITERATIONS,
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    TLS_SERVER_END_POINT,
    ScramClientSession,
    ScramSecret,
    ScramServerSession,
)

__all__ = [
    "DEFAULT_ITERATIONS",
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "TLS_SERVER_END_POINT",
    "AuthError",
    "AuthProtocolError",
    "ScramClientSession",
    "ScramSecret",
    "ScramServerSession",
    "is_md5_secret",
    "md5_response",
    "md5_secret",
    "md5_verify",
    "saslprep",
    "scram_password_bytes",
]
