"""Authentication for pgmux: SCRAM-SHA-256 (with channel binding), MD5, SASLprep, pg_hba.conf
rules and PgBouncer's auth_file.

Pure: this package imports only the standard library and never touches a socket, the
event loop or logging. It turns the bytes of an authentication exchange into replies
and verdicts; the connection code moves the bytes and maps AuthError (SQLSTATE 28P01)
and AuthProtocolError (08P01) to ErrorResponses.
"""

from .channel_binding import ChannelBindingError, certificate_hash, pem_to_der_certificates
from .errors import AuthError, AuthProtocolError
from .hba import HbaError, HbaRule, describe_no_match, describe_reject, match_hba, parse_hba
from .md5 import is_md5_secret, md5_response, md5_secret, md5_verify
from .saslprep import saslprep, scram_password_bytes
from .scram import (
    DEFAULT_ITERATIONS,
    NONCE_BYTES,
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    TLS_SERVER_END_POINT,
    ScramClientSession,
    ScramSecret,
    ScramServerSession,
)
from .userlist import UserlistError, parse_userlist, secret_kind

__all__ = [
    "DEFAULT_ITERATIONS",
    "NONCE_BYTES",
    "SCRAM_SHA_256",
    "SCRAM_SHA_256_PLUS",
    "TLS_SERVER_END_POINT",
    "AuthError",
    "AuthProtocolError",
    "ChannelBindingError",
    "HbaError",
    "HbaRule",
    "ScramClientSession",
    "ScramSecret",
    "ScramServerSession",
    "UserlistError",
    "certificate_hash",
    "describe_no_match",
    "describe_reject",
    "is_md5_secret",
    "match_hba",
    "md5_response",
    "md5_secret",
    "md5_verify",
    "parse_hba",
    "parse_userlist",
    "pem_to_der_certificates",
    "saslprep",
    "scram_password_bytes",
    "secret_kind",
]
