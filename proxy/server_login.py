"""A server connection's login: TLS negotiation, the startup packet, answering the
server's authentication request (cleartext, md5, SCRAM with a password or by
pass-through of a client's proof), and checking that the server is the kind
target_session_attrs asks for (hosts.py), as libpq does before a connection is ready.

One ServerLogin exists per server connection while it logs in; the connection routes
received bytes here until ReadyForQuery, then drops it. Failures are raised
(ProtocolError, AuthError, ServerLoginFailed) or reported with
``ServerConnection.login_failed``; the connection turns them into the pool's error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .auth import ScramClientSession, md5_response
from .errors import ServerLoginFailed, ServerUnreachable
from .hosts import check_query, mismatch_reason, query_verdict, role_verdict
from .pool import Pool, ServerState
from .protocol import codes, messages
from .protocol.errors import ProtocolError
from .protocol.reader import MessageReader
from .tls import TLSTransport
from .users import Credential

if TYPE_CHECKING:
    from .server import ServerConnection

ErrorFields = dict[str, str]


class ServerLogin:
    """Logs one server connection in; see the module docstring."""

    __slots__ = (
        "check_value",
        "checking",
        "pool",
        "reader",
        "registry",
        "scram",
        "server",
        "ssl_answer_pending",
    )

    def __init__(self, server: ServerConnection) -> None:
        self.server = server
        self.pool = server.pool
        self.registry = server.registry
        self.reader = MessageReader(self.registry.config.max_packet_size)
        self.scram: ScramClientSession | None = None
        self.ssl_answer_pending = False
        self.checking = False  # check_query sent, its ReadyForQuery not yet read
        self.check_value: bytes | None = None

    def start(self) -> None:
        """The connection is up: ask for TLS first, or send the startup packet."""
        if self._wants_tls():
            assert self.server.transport is not None
            self.ssl_answer_pending = True
            self.server.transport.write(messages.SSL_REQUEST)
        else:
            self._send_startup()

    def _wants_tls(self) -> bool:
        if self.registry.server_tls is None or self.server.host.startswith("/"):
            return False  # TLS is not offered on unix sockets
        return self.registry.config.server_tls.sslmode != "allow" or self.pool.tls_fallback

    def _send_startup(self) -> None:
        assert self.server.transport is not None
        settings = self.pool.settings
        self.server.transport.write(
            messages.startup_message(
                {"user": settings.server_user, "database": settings.database.dbname}
            )
        )

    def _ssl_answer(self, data: bytes) -> None:
        """The server's one-byte answer to SSLRequest."""
        self.ssl_answer_pending = False
        answer, rest = data[:1], data[1:]
        server = self.server
        mode = self.registry.config.server_tls.sslmode
        if answer == b"S":
            if rest:
                # Bytes before the handshake were not encrypted: maybe injected (CVE-2021-23222).
                raise ProtocolError("server sent unencrypted data after its SSL answer")
            context = self.registry.server_tls
            assert context is not None and self.server.transport is not None
            self.server.used_tls = True
            self.server.transport = TLSTransport(
                self.server.transport,
                self.server,
                context,
                server_side=False,
                server_hostname=server.host,
                on_handshake=self._tls_ready,
            )
        elif answer == b"N":
            if mode in ("require", "verify-ca", "verify-full"):
                raise ServerLoginFailed(
                    f"server {server.address} does not accept TLS but server_tls_sslmode = {mode}",
                    hint="enable ssl in postgresql.conf, or lower server_tls_sslmode",
                )
            self._send_startup()
            if rest:
                self.data_received(rest)
        else:
            raise ProtocolError(f"server answered SSLRequest with {answer!r}, not S or N")

    def _tls_ready(self, error: BaseException | None) -> None:
        if error is None:
            self._send_startup()
            return
        server = self.server
        mode = self.registry.config.server_tls.sslmode
        hint = None
        if mode in ("verify-ca", "verify-full"):
            hint = "server_tls_ca_file must hold the CA that signed the server's certificate" + (
                f", and the certificate must name {server.host}" if mode == "verify-full" else ""
            )
        self.server.login_failed(
            ServerUnreachable(
                f"TLS handshake with server {server.address} failed for pool "
                f'"{self.pool.name}" (server_tls_sslmode = {mode}): {error}',
                hint=hint,
            )
        )

    def data_received(self, data: bytes) -> None:
        if self.ssl_answer_pending:
            self._ssl_answer(data)
            return
        reader = self.reader
        reader.feed(data)
        while self.server.state is ServerState.LOGIN:
            msg = reader.next_message()
            if msg is None:
                return
            typ, body = msg
            if typ == codes.B_AUTHENTICATION:
                self._answer_auth(body)
            elif typ == codes.B_PARAMETER_STATUS:
                name, value = messages.parse_parameter_status(body)
                self.server.params[name] = value
            elif typ == codes.B_BACKEND_KEY_DATA:
                pid, key = messages.parse_backend_key_data(body)
                self.server.backend_pid, self.server.backend_key = pid, key
            elif typ == codes.B_ERROR_RESPONSE:
                fields = messages.parse_fields(body)
                self.server.login_failed(
                    ServerLoginFailed(
                        f'server login failed for pool "{self.pool.name}": '
                        f"{fields.get('M', 'unknown error')}",
                        detail=fields.get("D"),
                        hint=_login_hint(self.pool, fields),
                        sqlstate=fields.get("C", "08001"),
                    )
                )
            elif typ == codes.B_READY_FOR_QUERY:
                self._ready(reader)
            elif typ == codes.B_DATA_ROW and self.checking:
                self.check_value = messages.parse_data_row(body)[0]
            elif self.checking and typ in (codes.B_ROW_DESCRIPTION, codes.B_COMMAND_COMPLETE):
                pass
            elif typ not in (codes.B_NOTICE_RESPONSE, codes.B_NEGOTIATE_PROTOCOL_VERSION):
                raise ProtocolError(f"unexpected message {chr(typ)!r} from server during login")

    def _ready(self, reader: MessageReader) -> None:
        """ReadyForQuery: logged in, or the role check answered. A server that does not
        say what it is (PostgreSQL before 14 reports neither in_hot_standby nor
        default_transaction_read_only) is asked, as libpq asks it."""
        server = self.server
        target = server.attempt.target
        if self.checking:
            self.checking = False
            value = self.check_value.decode() if self.check_value is not None else None
            suits, why = query_verdict(target, value)
        else:
            verdict = role_verdict(target, server.params)
            if verdict is None:
                assert server.transport is not None
                self.checking = True
                server.transport.write(messages.query(check_query(target)))
                return
            suits = verdict
            why = "" if suits else mismatch_reason(target, server.params)
        if suits:
            server.logged_in(reader.take_rest())
        else:
            server.role_rejected(why)

    def _answer_auth(self, body: bytes) -> None:
        transport = self.server.transport
        assert transport is not None
        code, payload = messages.parse_authentication(body)
        if code == codes.AUTH_OK:
            return
        if code == codes.AUTH_SASL_CONTINUE and self.scram is not None:
            transport.write(messages.sasl_response(self.scram.handle_server_first(payload)))
            return
        if code == codes.AUTH_SASL_FINAL and self.scram is not None:
            self.scram.verify_server_final(payload)
            self.scram = None
            return
        if code not in (codes.AUTH_CLEARTEXT, codes.AUTH_MD5, codes.AUTH_SASL):
            raise ServerLoginFailed(
                f'server asks for authentication method {code} for pool "{self.pool.name}", '
                "which pgmux does not support (use scram-sha-256, md5 or password in "
                "pg_hba.conf for pgmux's address)"
            )
        settings = self.pool.settings
        credential = self.pool.server_credential
        user = settings.server_user
        if credential is None or credential.secret is None:
            raise ServerLoginFailed(
                f'server requires a password for user "{user}" but pgmux has none',
                hint=f"set {_password_key(self.pool)} (or list the user in auth_file)",
                sqlstate="28P01",
            )
        password = self.registry.secrets.password(credential)
        kind = credential.kind
        if code == codes.AUTH_CLEARTEXT:
            if password is None:
                raise self._cannot_answer("a cleartext password", credential)
            transport.write(messages.password_message(password.encode()))
        elif code == codes.AUTH_MD5:
            if len(payload) != 4:
                raise ProtocolError("md5 authentication request without a 4-byte salt")
            secret = password if password is not None else credential.secret
            if kind == "scram" and password is None:
                raise self._cannot_answer("md5", credential)
            transport.write(messages.password_message(md5_response(user, secret, payload)))
        else:
            mechanisms = messages.parse_sasl_mechanisms(payload)
            if "SCRAM-SHA-256" not in mechanisms:
                raise ServerLoginFailed(
                    f"server offers SASL mechanisms {mechanisms}, pgmux speaks SCRAM-SHA-256"
                )
            if password is not None:
                cache = self.registry.salted_password_cache
                if len(cache) > 256:
                    cache.clear()
                self.scram = ScramClientSession(password, salted_password_cache=cache)
            elif kind == "scram":
                self.scram = self._passthrough(credential)
            else:
                raise self._cannot_answer("SCRAM", credential)
            transport.write(
                messages.sasl_initial_response("SCRAM-SHA-256", self.scram.client_first())
            )

    def _passthrough(self, credential: Credential) -> ScramClientSession:
        """SCRAM with only a SCRAM secret: the ClientKey a client proved it holds."""
        client_key = self.registry.secrets.client_key(credential)
        if client_key is None:
            raise ServerLoginFailed(
                f'cannot log in to the server as "{credential.user}": pgmux holds only a '
                f"SCRAM secret (from {credential.source}), which works by pass-through of a "
                "client's own SCRAM login, and no client has logged in with SCRAM yet",
                hint="let clients use scram-sha-256 (not md5, trust or cert), or give pgmux "
                "the plaintext password",
                sqlstate="28P01",
            )
        secret = self.registry.secrets.scram_secret(credential)
        return ScramClientSession(
            client_key=client_key,
            server_key=secret.server_key,
            expected_salt=(secret.salt, secret.iterations),
        )

    def _cannot_answer(self, method: str, credential: Credential) -> ServerLoginFailed:
        held = {"md5": "an md5 hash", "scram": "a SCRAM secret"}.get(credential.kind, "no password")
        return ServerLoginFailed(
            f'server asks for {method} authentication for user "{credential.user}", but pgmux '
            f"holds only {held} for it (from {credential.source})",
            hint="give pgmux the plaintext password, or make pg_hba.conf ask pgmux's address "
            "for a method that secret can answer (md5 hash: md5; SCRAM secret: scram-sha-256)",
            sqlstate="28P01",
        )


def _password_key(pool: Pool) -> str:
    settings = pool.settings
    if settings.database.user is not None:
        return f"[databases.{settings.database.name}].password"
    credential = pool.server_credential
    if credential is not None and credential.source != "[users]":
        return f"the password of {settings.user!r} in {credential.source}"
    return f"[users.{settings.user}].password"


def _login_hint(pool: Pool, fields: ErrorFields) -> str | None:
    if fields.get("C") == "28000" and "no encryption" in fields.get("M", ""):
        return (
            "the server accepts pgmux only over TLS: set server_tls_sslmode = prefer "
            "(or require) in the pgmux config"
        )
    if fields.get("C") == "28P01":
        return (
            f"pgmux logs in to PostgreSQL with {_password_key(pool)}; it must match the "
            "role's password"
        )
    return fields.get("H")
