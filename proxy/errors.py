"""The errors pgmux reports to clients, each with the SQLSTATE a client can act on.

Messages name the limit, the numbers and the knob to change. They reach a client
only through ``ClientConnection.send_error``, which also counts each one by its
``reason`` (a short fixed name: the metrics' ``reason`` label, never free text).
"""

from __future__ import annotations


class ProxyError(Exception):
    """An error pgmux itself makes, to be sent to a client as an ErrorResponse."""

    sqlstate = "XX000"
    reason = "other"

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        hint: str | None = None,
        sqlstate: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        if sqlstate is not None:
            self.sqlstate = sqlstate
        if reason is not None:
            self.reason = reason


class TooManyConnections(ProxyError):
    sqlstate = "53300"  # too_many_connections
    reason = "max_client_conn"


class DatabaseClientLimit(TooManyConnections):
    reason = "max_db_client_connections"


class UserClientLimit(TooManyConnections):
    reason = "max_user_client_connections"


class QueryWaitTimeout(ProxyError):
    sqlstate = "57014"  # query_canceled
    reason = "query_wait_timeout"


class LoginTimeout(ProxyError):
    sqlstate = "57014"
    reason = "client_login_timeout"


class ServerUnreachable(ProxyError):
    sqlstate = "08001"  # sqlclient_unable_to_establish_sqlconnection
    reason = "server_unreachable"


class NoMatchingServer(ServerUnreachable):
    """No host of the database's list is the kind of server target_session_attrs asks
    for. Like an outage, it does not hold new attempts back for server_login_retry."""

    reason = "target_session_attrs"


class ServerConnectionLost(ProxyError):
    sqlstate = "08006"  # connection_failure
    reason = "server_connection_lost"


class FailedTransaction(ProxyError):
    """A request in a transaction block that failed when its server connection was
    lost: refused as PostgreSQL refuses one in an aborted block, until it ends."""

    sqlstate = "25P02"  # in_failed_sql_transaction
    reason = "failed_transaction"


class ServerLoginFailed(ProxyError):
    """The server refused pgmux's login; carries the server's own SQLSTATE."""

    sqlstate = "08001"
    reason = "server_login_failed"


class AuthenticationFailed(ProxyError):
    sqlstate = "28P01"  # invalid_password
    reason = "authentication_failed"


class AuthorizationFailed(ProxyError):
    sqlstate = "28000"  # invalid_authorization_specification
    reason = "authorization_failed"


class UnknownDatabase(ProxyError):
    sqlstate = "3D000"  # invalid_catalog_name
    reason = "unknown_database"


class ProtocolViolation(ProxyError):
    sqlstate = "08P01"  # protocol_violation
    reason = "protocol_violation"


class FeatureNotSupported(ProxyError):
    sqlstate = "0A000"  # feature_not_supported
    reason = "feature_not_supported"


class InvalidParameter(ProxyError):
    sqlstate = "22023"  # invalid_parameter_value
    reason = "invalid_parameter"


class ShuttingDown(ProxyError):
    sqlstate = "57P01"  # admin_shutdown
    reason = "shutting_down"


class AdminError(ProxyError):
    """A refused or failed admin console command (PgBouncer answers these with 08P01)."""

    sqlstate = "08P01"
    reason = "admin_command"
