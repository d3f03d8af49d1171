"""The errors pgmux reports to clients, each with the SQLSTATE a client can act on.

Messages name the limit, the numbers and the knob to change. They reach a client
only through ``ClientConnection.send_error``.
"""

from __future__ import annotations


class ProxyError(Exception):
    """An error pgmux itself makes, to be sent to a client as an ErrorResponse."""

    sqlstate = "XX000"

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        if sqlstate is not None:
            self.sqlstate = sqlstate


class TooManyConnections(ProxyError):
    sqlstate = "53300"  # too_many_connections


class QueryWaitTimeout(ProxyError):
    sqlstate = "57014"  # query_canceled


class LoginTimeout(ProxyError):
    sqlstate = "57014"


class ServerUnreachable(ProxyError):
    sqlstate = "08001"  # sqlclient_unable_to_establish_sqlconnection


class ServerConnectionLost(ProxyError):
    sqlstate = "08006"  # connection_failure


class ServerLoginFailed(ProxyError):
    """The server refused pgmux's login; carries the server's own SQLSTATE."""

    sqlstate = "08001"


class AuthenticationFailed(ProxyError):
    sqlstate = "28P01"  # invalid_password


class AuthorizationFailed(ProxyError):
    sqlstate = "28000"  # invalid_authorization_specification


class UnknownDatabase(ProxyError):
    sqlstate = "3D000"  # invalid_catalog_name


class ProtocolViolation(ProxyError):
    sqlstate = "08P01"  # protocol_violation


class FeatureNotSupported(ProxyError):
    sqlstate = "0A000"  # feature_not_supported


class InvalidParameter(ProxyError):
    sqlstate = "22023"  # invalid_parameter_value


class ShuttingDown(ProxyError):
    sqlstate = "57P01"  # admin_shutdown
