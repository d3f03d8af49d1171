"""Exceptions raised by the authentication package.

Messages are written for a server log and for the client's ErrorResponse: they say what
went wrong in words and never contain a password, a key, a proof or a stored secret.
"""


class AuthError(Exception):
    """A failed or malformed authentication exchange.

    Carries SQLSTATE 28P01 (invalid_password), the code PostgreSQL reports for a failed
    password or SCRAM exchange, so the connection code can answer the client with it.
    """

    sqlstate = "28P01"


class AuthProtocolError(AuthError):
    """A malformed SCRAM/SASL message, or one sent out of order.

    Carries SQLSTATE 08P01 (protocol_violation), which is what PostgreSQL reports for
    syntactically broken SCRAM messages (auth-scram.c) as opposed to a wrong password.
    """

    sqlstate = "08P01"
