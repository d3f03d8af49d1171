"""Client login: the startup packet, TLS, choosing and running the authentication method.

A ``Login`` lives only while its client logs in. It reads the startup packet (after
an SSLRequest upgrade or PostgreSQL 17's direct TLS), picks the method (``auth_type``
or the first matching hba rule), finds the user's secret ([users], auth_file, then
auth_query), runs the exchange, and hands the client a logged-in session. Every
failure says which rule or limit refused, with PostgreSQL's SQLSTATEs; unknown users
fail exactly like wrong passwords.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import re
from typing import TYPE_CHECKING

from .auth import (
    NONCE_BYTES,
    TLS_SERVER_END_POINT,
    AuthError,
    AuthProtocolError,
    ScramSecret,
    ScramServerSession,
    md5_secret,
    md5_verify,
)
from .auth.hba import describe_no_match, describe_reject, match_hba
from .cancel import route_cancel
from .config import ADMIN_DATABASES, DatabaseConfig
from .errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    FeatureNotSupported,
    InvalidParameter,
    ProtocolViolation,
    ProxyError,
    ShuttingDown,
    TooManyConnections,
    UnknownDatabase,
)
from .protocol import codes, messages
from .protocol.errors import ProtocolError
from .protocol.reader import MessageReader
from .protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupPacket,
    parse_options,
    parse_startup_packet,
)
from .tls import ALPN_POSTGRESQL, TLSTransport, peer_common_name
from .users import Credential, static_credential

if TYPE_CHECKING:
    from .client import ClientConnection

log = logging.getLogger("pgmux.client")

# Login phases.
PHASE_STARTUP = 0  # waiting for the startup packet
PHASE_TLS = 1  # TLS handshake in progress
PHASE_LOOKUP = 2  # waiting for auth_query to find the user's secret
PHASE_PASSWORD = 3  # sent AuthenticationCleartextPassword / MD5Password
PHASE_SASL_FIRST = 4
PHASE_SASL_FINAL = 5
PHASE_DONE = 6  # authenticated; the client takes over

TLS_HANDSHAKE_BYTE = 0x16  # a TLS record of type handshake: direct TLS (PostgreSQL 17)

# Startup parameters that are not session settings.
_NOT_SETTINGS = frozenset(("user", "database", "options", "replication"))
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)*\Z")
_METHOD_NAMES = {"password": "plain"}  # pg_hba.conf's name for cleartext passwords


class Login:
    __slots__ = (
        "client",
        "credential",
        "database",
        "method",
        "mock",
        "phase",
        "reader",
        "salt",
        "scram",
        "tls",
    )

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.reader = MessageReader(10000)
        self.phase = PHASE_STARTUP
        self.tls = False
        self.method = ""
        self.credential: Credential | None = None
        self.database: DatabaseConfig | None = None
        self.mock = False
        self.salt = b""
        self.scram: ScramServerSession | None = None

    # -- bytes in -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        client = self.client
        if (
            self.phase == PHASE_STARTUP
            and not self.tls
            and not self.reader.buffered
            and data[0] == TLS_HANDSHAKE_BYTE
        ):
            self._start_tls(data, direct=True)
            return
        self.reader.feed(data)
        try:
            self._process()
        except ProtocolError as exc:
            client.fail(ProtocolViolation(str(exc)))
        except AuthProtocolError as exc:
            client.fail(ProtocolViolation(str(exc)))
        except AuthError:
            client.fail(self._password_failed())
        except ProxyError as exc:
            client.fail(exc)

    def _process(self) -> None:
        reader = self.reader
        transport = self.client.transport
        while not transport.is_closing():
            phase = self.phase
            if phase == PHASE_STARTUP:
                packet = reader.next_startup_packet()
                if packet is None:
                    return
                self._startup(parse_startup_packet(packet))
                transport = self.client.transport  # may have become TLS
            elif phase in (PHASE_PASSWORD, PHASE_SASL_FIRST, PHASE_SASL_FINAL):
                msg = reader.next_message()
                if msg is None:
                    return
                typ, body = msg
                if typ != codes.F_PASSWORD:
                    raise ProtocolViolation(
                        f"expected a password message during login, got {chr(typ)!r}"
                    )
                self._auth_response(body)
            else:
                return  # handshake, lookup or done: later bytes wait in the reader

    def take_rest(self) -> bytes:
        """Bytes the client sent after its login (pipelined), for the session."""
        return self.reader.take_rest()

    # -- startup --------------------------------------------------------------------------

    def _startup(self, packet: StartupPacket) -> None:
        client = self.client
        if isinstance(packet, SSLRequest):
            if self.tls:
                raise ProtocolViolation("SSLRequest on a connection that already uses TLS")
            if client.registry.client_tls is None or client.is_unix:
                client.transport.write(b"N")  # client_tls_sslmode = disable
                return
            if self.reader.buffered:
                # Anything sent before the handshake was not encrypted (CVE-2021-23214).
                raise ProtocolViolation("received unencrypted data after SSLRequest")
            client.transport.write(b"S")
            self._start_tls(b"", direct=False)
        elif isinstance(packet, GSSENCRequest):
            client.transport.write(b"N")  # no GSSAPI encryption; the client goes on
        elif isinstance(packet, CancelRequest):
            client.close()  # PostgreSQL answers a CancelRequest with nothing
            route_cancel(client.registry, packet, client)
        else:
            assert isinstance(packet, StartupMessage)
            self._check_startup(packet)

    def _start_tls(self, first: bytes, *, direct: bool) -> None:
        client = self.client
        context = client.registry.client_tls
        if context is None or client.is_unix:
            why = "on the unix socket" if client.is_unix else "client_tls_sslmode = disable"
            log.info("%s: direct TLS connection refused (%s)", client, why)
            client.close(f"direct TLS refused ({why})")
            return
        self.phase = PHASE_TLS
        self.tls = True
        tls = TLSTransport(
            client.transport,
            client,
            context,
            server_side=True,
            on_handshake=lambda error: self._tls_ready(error, direct),
        )
        client.transport = tls
        if first:
            tls.data_received(first)

    def _tls_ready(self, error: BaseException | None, direct: bool) -> None:
        client = self.client
        if error is not None:
            log.info("%s: TLS handshake failed: %s", client, error)
            client.close(f"TLS handshake failed: {error}")
            return
        ssl_object = client.transport.get_extra_info("ssl_object")
        if direct and ssl_object.selected_alpn_protocol() != ALPN_POSTGRESQL:
            # PostgreSQL's rule: direct TLS must negotiate ALPN "postgresql", so a TLS
            # connection meant for another protocol is not mistaken for ours.
            client.fail(
                ProtocolViolation(
                    'direct TLS connection without ALPN protocol "postgresql"',
                    hint="use a PostgreSQL 17+ client with sslnegotiation=direct",
                )
            )
            return
        self.phase = PHASE_STARTUP

    def _check_startup(self, packet: StartupMessage) -> None:
        client = self.client
        registry = client.registry
        config = registry.config
        if packet.major != 3:
            raise FeatureNotSupported(
                f"unsupported frontend protocol {packet.major}.{packet.minor}: "
                "pgmux supports protocol 3.0"
            )
        params = packet.params
        unknown_options = [name for name in params if name.startswith("_pq_.")]
        if packet.minor > 0 or unknown_options:
            client.transport.write(messages.negotiate_protocol_version(0, unknown_options))
        user = params.get("user")
        if not user:
            raise AuthorizationFailed("no PostgreSQL user name specified in startup packet")
        client.user = user
        client.dbname = params.get("database") or user
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise FeatureNotSupported(
                "replication connections are not supported through pgmux; "
                "connect to PostgreSQL directly for replication"
            )
        client.settings = client.startup_settings = _settings_from(params)
        if registry.shutting_down:
            raise ShuttingDown("pooler is shutting down; reconnect to another instance")
        limit = registry.max_client_conn
        if len(registry.clients) > limit:
            where = ""
            if config.workers > 1:
                where = (
                    f" in this worker (max_client_conn = {config.max_client_conn} is split "
                    f"between {config.workers} workers)"
                )
            raise TooManyConnections(
                f"no more connections allowed (max_client_conn): {len(registry.clients) - 1} "
                f"of {limit} client connections in use{where}",
                hint="raise max_client_conn in the pgmux config, or close idle clients",
            )
        mode = config.client_tls.sslmode
        if not self.tls and not client.is_unix and mode in ("require", "verify-ca", "verify-full"):
            raise AuthorizationFailed(
                f"pgmux accepts only TLS connections (client_tls_sslmode = {mode})",
                hint="connect with sslmode=require (or verify-ca / verify-full)",
            )
        if self.tls and mode == "verify-full":
            common_name = peer_common_name(client.transport)
            if common_name != user:
                raise AuthorizationFailed(
                    f'certificate common name "{common_name}" does not match user "{user}" '
                    "(client_tls_sslmode = verify-full)"
                )
        self.method = self._choose_method()
        self._find_credential()

    def _choose_method(self) -> str:
        client = self.client
        config = client.registry.config
        if config.auth_type != "hba":
            return config.auth_type
        conn_type = "local" if client.is_unix else "host"
        address = None if client.is_unix else client.host
        rule = match_hba(
            config.hba_rules,
            conn_type=conn_type,
            ssl=self.tls,
            database=client.dbname,
            user=client.user,
            address=address,
        )
        if rule is None:
            raise AuthorizationFailed(
                describe_no_match(conn_type, self.tls, client.dbname, client.user, address),
                hint="add a line for this connection to auth_hba_file",
            )
        if rule.method == "reject":
            raise AuthorizationFailed(
                describe_reject(conn_type, self.tls, client.dbname, client.user, address),
                hint=f"rule on line {rule.line} of auth_hba_file",
            )
        clientcert = dict(rule.options).get("clientcert")
        if clientcert is not None:
            self._check_certificate(full=clientcert == "verify-full")
        return _METHOD_NAMES.get(rule.method, rule.method)

    # -- whose secret -----------------------------------------------------------------------

    def _find_credential(self) -> None:
        client = self.client
        registry = client.registry
        config = registry.config
        credential = static_credential(config, client.user)
        known = credential is not None and credential.secret is not None
        if known or not config.auth_user or client.user == config.auth_user:
            self._begin_auth(credential)
            return
        # Not in the config: ask PostgreSQL (auth_query), unless there is no database
        # to ask in, which is then the first thing wrong with this login.
        database = config.databases.get(config.auth_dbname or client.dbname)
        if database is None:
            if client.dbname in ADMIN_DATABASES:
                self._begin_auth(None)
                return
            raise _unknown_database(client)
        self.phase = PHASE_LOOKUP
        registry.auth_query(database, client.user, self._credential_found)

    def _credential_found(self, credential: Credential | None, error: ProxyError | None) -> None:
        client = self.client
        if client.transport.is_closing() or self.phase != PHASE_LOOKUP:
            return
        if error is not None:
            client.fail(error)
            return
        try:
            self._begin_auth(credential)
        except ProxyError as exc:
            client.fail(exc)

    # -- the exchange -----------------------------------------------------------------------

    def _begin_auth(self, credential: Credential | None) -> None:
        client = self.client
        self.credential = credential
        self.mock = credential is None or credential.secret is None
        method = self.method
        if method == "trust":
            self._authenticated()
        elif method == "cert":
            self._check_certificate()
            self._authenticated()
        elif method == "plain":
            self.phase = PHASE_PASSWORD
            client.transport.write(messages.authentication_cleartext())
        elif method == "md5" and (self.mock or self._kind() != "scram"):
            self.phase = PHASE_PASSWORD
            self.salt = os.urandom(4)
            client.transport.write(messages.authentication_md5(self.salt))
        else:
            # scram-sha-256, or md5 for a user with a SCRAM secret (as PgBouncer does).
            self._begin_scram()

    def _kind(self) -> str:
        return self.credential.kind if self.credential is not None else "none"

    def _begin_scram(self) -> None:
        client = self.client
        registry = client.registry
        credential = self.credential
        if not self.mock and self._kind() == "md5":
            log.warning(
                "%s: user has an md5-hashed password (from %s); SCRAM needs a plaintext "
                "password or a SCRAM secret, so this login will fail",
                client,
                credential.source if credential else "?",
            )
            self.mock = True
        if self.mock or credential is None:
            secret = ScramSecret.mock(client.user, registry.mock_key)
        else:
            secret = registry.secrets.scram_secret(credential)
        binding = None
        if self.tls and registry.client_tls_cert_hash is not None:
            binding = (TLS_SERVER_END_POINT, registry.client_tls_cert_hash)
        nonce = base64.b64encode(registry.random_bytes(NONCE_BYTES))
        self.scram = ScramServerSession(
            secret, nonce=nonce, channel_binding=binding, mock=self.mock
        )
        self.phase = PHASE_SASL_FIRST
        client.transport.write(messages.authentication_sasl(list(self.scram.mechanisms)))

    def _auth_response(self, body: bytes) -> None:
        client = self.client
        if self.phase == PHASE_PASSWORD:
            response = messages.parse_password_message(body)
            if not self._password_ok(response):
                raise self._password_failed()
            self._authenticated()
            return
        session = self.scram
        assert session is not None
        if self.phase == PHASE_SASL_FIRST:
            mechanism, data = messages.parse_sasl_initial_response(body)
            reply = session.handle_client_first(mechanism, data)
            self.phase = PHASE_SASL_FINAL
            client.transport.write(messages.authentication_sasl_continue(reply))
            return
        reply = session.handle_client_final(body)
        self.scram = None
        if self.credential is not None:
            # With this, pgmux can log in to PostgreSQL holding only a SCRAM secret.
            client.registry.secrets.remember_client_key(self.credential, session.client_key)
        # AuthenticationSASLFinal goes out with whatever answers the login next (the
        # welcome, or an error): one write, one segment, as for a password login.
        client.greeting = messages.authentication_sasl_final(reply)
        self._authenticated()
        client.flush_greeting()  # when the welcome waits for a server: say this much now

    def _password_ok(self, response: bytes) -> bool:
        """A cleartext or md5 response against whatever kind of secret the user has."""
        credential = self.credential
        if self.mock or credential is None or credential.secret is None:
            return False
        user = self.client.user
        secret = credential.secret
        if self.method == "md5":
            return md5_verify(user, secret, self.salt, response)
        password = response.decode("utf-8", "surrogateescape")
        kind = credential.kind
        if kind == "plain":
            ok = hmac.compare_digest(secret.encode(), response)
        elif kind == "md5":
            ok = hmac.compare_digest(md5_secret(user, password), secret)
        else:
            stored = ScramSecret.parse(secret)
            derived = ScramSecret.from_password(password, stored.salt, stored.iterations)
            ok = hmac.compare_digest(derived.stored_key, stored.stored_key)
        if ok:
            # Now pgmux knows the password itself: any server method will do.
            self.client.registry.secrets.remember_password(credential, password)
        return ok

    def _check_certificate(self, *, full: bool = True) -> None:
        """A verified client certificate is required; ``full``: its CN is the user."""
        client = self.client
        common_name = peer_common_name(client.transport) if self.tls else None
        if common_name is None:
            raise AuthorizationFailed(
                f'certificate authentication failed for user "{client.user}": '
                "no verified client certificate",
                hint="connect over TLS with sslcert/sslkey signed by client_tls_ca_file",
            )
        if full and common_name != client.user:
            raise AuthorizationFailed(
                f'certificate authentication failed for user "{client.user}": the '
                f'certificate is for "{common_name}"',
                hint="client_tls_sslmode verify-full needs the certificate's CN to be the "
                "user name; connect as that user or use a certificate issued for this one",
            )

    def _password_failed(self) -> ProxyError:
        return AuthenticationFailed(f'password authentication failed for user "{self.client.user}"')

    def _authenticated(self) -> None:
        client = self.client
        config = client.registry.config
        self.phase = PHASE_DONE
        if client.dbname in ADMIN_DATABASES:
            if client.user not in config.admin_users and client.user not in config.stats_users:
                raise AuthorizationFailed(
                    f'user "{client.user}" may not use the admin console "{client.dbname}"',
                    hint="list the user in admin_users or stats_users",
                )
            client.start_admin()
            return
        database = config.databases.get(client.dbname)
        if database is None:
            raise _unknown_database(client)
        if client.dbname in client.registry.disabled_databases:
            raise ProxyError(
                f'database "{client.dbname}" is disabled',
                sqlstate="57P03",  # cannot_connect_now
                reason="database_disabled",
                hint="an admin ran DISABLE in the admin console; ENABLE lets clients in again",
            )
        client.start_session(database, self.credential)


def _unknown_database(client: ClientConnection) -> ProxyError:
    databases = client.registry.config.databases
    return UnknownDatabase(
        f'no such database: "{client.dbname}"',
        hint="pgmux serves the databases configured as [databases.NAME]: "
        + ", ".join(sorted(databases)),
    )


def _settings_from(params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The session settings a startup packet asks for, as sorted (name, value) pairs."""
    settings: dict[str, str] = {}
    for name, value in params.items():
        if name not in _NOT_SETTINGS and not name.startswith("_pq_."):
            settings[name.lower()] = value
    if "options" in params:
        try:
            options = parse_options(params["options"])
        except ValueError as exc:
            raise InvalidParameter(f"invalid options startup parameter: {exc}") from None
        for name, value in options.items():
            settings[name.lower()] = value
    for name in settings:
        if not _SETTING_NAME.match(name):
            raise InvalidParameter(f"invalid configuration parameter name {name!r}")
    if "application_name" in settings:
        settings["application_name"] = clean_application_name(settings["application_name"])
    return tuple(sorted(settings.items()))


def clean_application_name(value: str) -> str:
    """What PostgreSQL 15 stores: printable ASCII only (others become '?'), 63 bytes."""
    cleaned = "".join(ch if 32 <= ord(ch) <= 126 else "?" for ch in value)
    return cleaned[:63]
