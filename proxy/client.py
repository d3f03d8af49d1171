"""Client connections: startup, login, and relaying a client's requests to its server.

Login is answered by pgmux itself: authentication against the configured users, then
the pool's cached ParameterStatus values and a pgmux-made BackendKeyData, so most
logins never touch PostgreSQL. Afterwards each chunk a client sends is scanned by its
FrontendStream and written unchanged to the server it holds; a client holding none
asks its pool for one first. Errors pgmux makes reach clients only via ``send_error``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import time
from typing import cast

from .auth import AuthError, AuthProtocolError, ScramSecret, ScramServerSession, md5_verify
from .errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    FeatureNotSupported,
    InvalidParameter,
    LoginTimeout,
    ProtocolViolation,
    ProxyError,
    ShuttingDown,
    TooManyConnections,
    UnknownDatabase,
)
from .pool import ClientState, Pool, Registry, ServerState, Settings, link, unlink
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
from .protocol.stream import FrontendStream
from .server import (
    PAUSE_CLIENT_FULL,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    ServerConnection,
    tune_socket,
)

log = logging.getLogger("pgmux.client")

# Reasons a client's reading is paused (bit mask).
PAUSE_WAITING = 1  # holds data for a server it does not have yet
PAUSE_SERVER_FULL = 2  # its server's send buffer is full
PAUSE_TERMINATING = 4  # sent Terminate; only replies to what came before are awaited

# A client without a server may send this much before pgmux stops reading from it.
# Below it, a queued client costs no pause/resume (two epoll_ctl calls) at all.
HOLD_LIMIT = 64 * 1024

# Login phases (all in ClientState.LOGIN).
PHASE_STARTUP = 0
PHASE_MD5 = 1
PHASE_SASL_FIRST = 2
PHASE_SASL_FINAL = 3
PHASE_WAIT = 4  # authenticated; waiting for a server to learn or check settings
PHASE_DONE = 5

# Startup parameters that are not session settings.
_NOT_SETTINGS = frozenset(("user", "database", "options", "replication"))
# Reported parameters a client can change with SET: followed from ParameterStatus.
_TRACKED = frozenset((
    "application_name", "client_encoding", "datestyle", "default_transaction_read_only",
    "intervalstyle", "search_path", "standard_conforming_strings", "timezone",
))  # fmt: skip
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)*\Z")


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "addr",
        "auth",
        "cancel_key",
        "cancel_pid",
        "connected_at",
        "dbname",
        "fe",
        "id",
        "md5_salt",
        "paused",
        "pending",
        "phase",
        "pool",
        "reader",
        "registry",
        "server",
        "settings",
        "state",
        "terminating",
        "timer",
        "transport",
        "user",
        "wait_started",
        "write_paused",
    )

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.id = registry.new_client_id()
        self.state = ClientState.LOGIN
        self.phase = PHASE_STARTUP
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.addr = "?"
        self.user = "?"
        self.dbname = "?"
        self.pool: Pool = None  # type: ignore[assignment]
        self.server: ServerConnection | None = None
        self.fe = FrontendStream(registry.config.max_packet_size)
        self.reader: MessageReader | None = MessageReader(10000)
        self.settings: Settings = ()
        self.pending: list[bytes] | None = None
        self.paused = 0
        self.write_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.auth: ScramServerSession | str | None = None
        self.md5_salt = b""
        self.cancel_pid = 0
        self.cancel_key = 0
        self.wait_started = 0.0
        self.terminating = False
        self.connected_at = time.monotonic()

    def __repr__(self) -> str:
        return f"C-{self.id} {self.user}@{self.dbname} {self.addr}"

    # -- connection events ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        self.registry.clients.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.addr = f"{peer[0]}:{peer[1]}"
        elif peer:
            self.addr = str(peer)
        else:
            self.addr = "unix"
        tune_socket(transport, self.registry.config.tcp_keepalive)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        timeout = self.registry.config.client_login_timeout
        if timeout:
            self.timer = self.registry.loop.call_later(timeout, self._login_timed_out, timeout)

    def data_received(self, data: bytes) -> None:
        server = self.server
        if server is not None and server.relaying:
            self._forward(server, data)
        elif self.state is ClientState.IDLE:
            self._start_request(data)
        elif self.state is ClientState.LOGIN:
            self._login_received(data)
        elif self.state is not ClientState.CLOSED:
            self._hold(data)  # waiting for a server, or the server runs pgmux's own query

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost cleans up

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not ClientState.CLOSED:
            self._release_everything(str(exc) if exc else "client disconnected")

    def close(self, reason: str = "closed by pgmux") -> None:
        """Close now: leave the queue, let go of the server, then close the socket.

        Everything is let go before the socket closes, so no server ever writes to a
        client that is on its way out.
        """
        if self.state is not ClientState.CLOSED:
            self._release_everything(reason)
        self.transport.close()

    def _release_everything(self, reason: str) -> None:
        if self.state is ClientState.WAITING:
            self.pool.leave_queue(self)
        self.state = ClientState.CLOSED
        self._cancel_timer()
        registry = self.registry
        registry.clients.discard(self)
        if self.cancel_pid:
            registry.cancel_keys.pop(self.cancel_pid, None)
        server = self.server
        if server is not None:
            unlink(self, server)
            self._restore_flow(server)
            if server.on_ready is None:
                # Left while linked: settle() drains, rolls back or closes the server.
                # (With pgmux's own query in flight, its callback settles the server.)
                server.settle(
                    self.fe, reset=self.pool.mode == "session", cancel=not self.terminating
                )
        if self.phase == PHASE_DONE and registry.config.log_disconnections:
            log.info(
                "%s: closing (%s), connected %.1f s",
                self,
                reason,
                time.monotonic() - self.connected_at,
            )

    # -- the relay ----------------------------------------------------------------------

    def _forward(self, server: ServerConnection, data: bytes) -> None:
        if self.terminating:
            return  # whatever follows Terminate is not for any server
        fe = self.fe
        copy_in = fe.copy_in
        try:
            buf, end, terminated = fe.feed(data)
        except ProtocolError as exc:
            self.fail(ProtocolViolation(str(exc)))
            return
        if end:
            server.transport.write(buf if end == len(buf) else memoryview(buf)[:end])  # type: ignore[union-attr]
        if terminated:
            if fe.idle:
                self.close("client sent Terminate")
            else:
                # Let what it sent before Terminate finish, as PostgreSQL does; the
                # relay closes the client once the last reply has gone out.
                self.terminating = True
                self.pause_reading(PAUSE_TERMINATING)
        elif copy_in and not fe.copy_in and fe.idle:
            # COPY FROM STDIN ended after the server had already answered (it failed
            # the copy early); nothing else will arrive to end the transaction.
            server.copy_ended()

    def _start_request(self, data: bytes) -> None:
        """A logged-in client without a server sent something: get it a server."""
        if data[0] == codes.F_TERMINATE and len(data) == 5 and not self.fe.mid_message:
            self.close("client sent Terminate")
            return
        if self.registry.shutting_down:
            self.fail(ShuttingDown("pooler is shutting down; reconnect to another instance"))
            return
        server = cast("ServerConnection | None", self.pool.acquire(self))
        if server is None:
            self._hold(data)
            return
        link(self, server)
        self._sync_flow(server)
        if server.settings is self.settings:
            server.relaying = True
            self._forward(server, data)
        else:
            self._hold(data)
            self._apply_settings(server)

    def assign_server(self, server: ServerConnection) -> None:
        """The pool hands this waiting client a server (called by Pool.release)."""
        link(self, server)
        self._sync_flow(server)
        if server.settings is self.settings and self.phase == PHASE_DONE:
            self._relay_pending(server)
        else:
            self._apply_settings(server)

    def _apply_settings(self, server: ServerConnection) -> None:
        server.apply_settings(self.settings, lambda error: self._settings_applied(server, error))

    def _settings_applied(self, server: ServerConnection, error: dict[str, str] | None) -> None:
        if self.server is not server:
            # The client left while the settings were being applied.
            server.settle(None, reset=self.pool.mode == "session")
            return
        if error is not None:
            summary = messages.error_summary(error)
            log.warning("%s: server refused the session settings: %s", self, summary)
            unlink(self, server)
            self._restore_flow(server)
            server.settle(None)
            self.fail(
                InvalidParameter(
                    f"server rejected the connection settings: {error.get('M', summary)}",
                    detail=error.get("D"),
                    sqlstate=error.get("C", "22023"),
                )
            )
            return
        if self.phase != PHASE_DONE:
            self.detach()
            server.settle(None)
            self._welcome()
            return
        self._relay_pending(server)

    def _relay_pending(self, server: ServerConnection) -> None:
        """The server is ready for this client: send what it sent meanwhile."""
        server.relaying = True
        pending = self.pending
        self.pending = None
        self.resume_reading(PAUSE_WAITING)
        if pending:
            for chunk in pending:
                if self.server is not server or not server.relaying:
                    self._hold(chunk)  # the first chunks ended the transaction already
                else:
                    self._forward(server, chunk)

    def _hold(self, data: bytes) -> None:
        """Keep data until a server is ready for it; stop reading past HOLD_LIMIT."""
        pending = self.pending
        if pending is None:
            self.pending = [data]
            if len(data) < HOLD_LIMIT:
                return
        else:
            pending.append(data)
            if sum(map(len, pending)) < HOLD_LIMIT:
                return
        self.pause_reading(PAUSE_WAITING)

    def detach(self) -> None:
        """Let go of the server (the transaction ended); it is settled by the caller."""
        server = self.server
        if server is None:
            return
        unlink(self, server)
        self._restore_flow(server)
        if self.pending:
            # Sent while the server was busy with pgmux's own query: a new request.
            self.registry.loop.call_soon(self._resend_pending)

    def _resend_pending(self) -> None:
        pending = self.pending
        self.pending = None
        if not pending or self.state is not ClientState.IDLE:
            if pending:
                self.pending = pending
            return
        self.resume_reading(PAUSE_WAITING)
        self.data_received(b"".join(pending))

    def setting_reported(self, name: str, value: str) -> None:
        """The server reported a parameter change (ParameterStatus) during our session.

        The client changed it with SET (or RESET, or the transaction that set it
        ended); the next server this client gets must have the same value.
        """
        lname = name.lower()
        if lname not in _TRACKED:
            return
        settings = dict(self.settings)
        default = self.pool.params.get(name) if self.pool.params else None
        if value == default:
            settings.pop(lname, None)
        else:
            settings[lname] = value
        self.settings = self.pool.intern(tuple(sorted(settings.items())))

    def server_lost(self, error: ProxyError, *, already_told: bool) -> None:
        """The linked server connection closed under this client."""
        server = self.server
        if server is not None:
            unlink(self, server)
        if self.state is ClientState.CLOSED:
            return
        if already_told:
            self.close("the server ended the session")
        else:
            self.fail(error)

    # -- errors -------------------------------------------------------------------------

    def send_error(self, error: ProxyError, *, fatal: bool) -> None:
        """The one way pgmux's own errors reach a client.

        FATAL closes the connection after the message; ERROR is followed by
        ReadyForQuery so the session carries on.
        """
        severity = "FATAL" if fatal else "ERROR"
        if fatal or self.phase != PHASE_DONE:
            log.warning("%s: %s %s: %s", self, severity, error.sqlstate, error.message)
        else:
            log.info("%s: %s %s: %s", self, severity, error.sqlstate, error.message)
        if self.state is ClientState.CLOSED or self.transport.is_closing():
            return
        payload = messages.error_response(
            severity, error.sqlstate, error.message, error.detail, error.hint
        )
        if fatal:
            self.transport.write(payload)
            self.close(f"{error.sqlstate}: {error.message}")
        else:
            self.transport.write(payload + messages.READY_IDLE)

    def fail(self, error: ProxyError) -> None:
        self.send_error(error, fatal=True)

    def fail_wait(self, error: ProxyError) -> None:
        """The pool gave up finding a server for this client (called by the pool)."""
        self.fail(error)

    # -- login --------------------------------------------------------------------------

    def _login_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None:
            return
        reader.feed(data)
        try:
            while self.state is ClientState.LOGIN and not self.transport.is_closing():
                if self.phase == PHASE_STARTUP:
                    packet = reader.next_startup_packet()
                    if packet is None:
                        return
                    self._startup(parse_startup_packet(packet))
                elif self.phase == PHASE_WAIT:
                    return  # pipelined after the password; handled after the welcome
                else:
                    msg = reader.next_message()
                    if msg is None:
                        return
                    typ, body = msg
                    if typ != codes.F_PASSWORD:
                        raise ProtocolViolation(
                            f"expected a password message during login, got {chr(typ)!r}"
                        )
                    self._auth_response(body)
        except ProtocolError as exc:
            self.fail(ProtocolViolation(str(exc)))
        except AuthProtocolError as exc:
            self.fail(ProtocolViolation(f"malformed SASL message: {exc}"))
        except AuthError:
            self.fail(self._password_failed())
        except ProxyError as exc:
            self.fail(exc)

    def _startup(self, packet: StartupPacket) -> None:
        if isinstance(packet, SSLRequest | GSSENCRequest):
            self.transport.write(b"N")  # no encryption; the client goes on in plaintext
            return
        if isinstance(packet, CancelRequest):
            self._cancel_request(packet)
            return
        assert isinstance(packet, StartupMessage)
        self._check_startup(packet)

    def _check_startup(self, packet: StartupMessage) -> None:
        if packet.major != 3:
            raise FeatureNotSupported(
                f"unsupported frontend protocol {packet.major}.{packet.minor}: "
                "pgmux supports protocol 3.0"
            )
        params = packet.params
        unknown_options = [name for name in params if name.startswith("_pq_.")]
        if packet.minor > 0 or unknown_options:
            self.transport.write(messages.negotiate_protocol_version(0, unknown_options))
        user = params.get("user")
        if not user:
            raise AuthorizationFailed("no PostgreSQL user name specified in startup packet")
        self.user = user
        self.dbname = params.get("database") or user
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise FeatureNotSupported(
                "replication connections are not supported through pgmux; "
                "connect to PostgreSQL directly for replication"
            )
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
        self.settings = tuple(sorted(settings.items()))
        registry = self.registry
        config = registry.config
        if registry.shutting_down:
            raise ShuttingDown("pooler is shutting down; reconnect to another instance")
        if len(registry.clients) > config.max_client_conn:
            raise TooManyConnections(
                f"no more connections allowed (max_client_conn): {len(registry.clients) - 1} "
                f"of {config.max_client_conn} client connections in use",
                hint="raise max_client_conn in the pgmux config, or close idle clients",
            )
        self._begin_auth()

    def _begin_auth(self) -> None:
        config = self.registry.config
        if config.auth_type == "trust":
            self._authenticated()
            return
        user_config = config.users.get(self.user)
        password = user_config.password if user_config is not None else None
        if config.auth_type == "md5":
            self.md5_salt = os.urandom(4)
            self.auth = password
            self.phase = PHASE_MD5
            self.transport.write(messages.authentication_md5(self.md5_salt))
            return
        secret, mock = self._scram_secret(password)
        self.auth = ScramServerSession(secret, mock=mock)
        self.phase = PHASE_SASL_FIRST
        self.transport.write(messages.authentication_sasl(list(self.auth.mechanisms)))

    def _scram_secret(self, password: str | None) -> tuple[ScramSecret, bool]:
        """The user's SCRAM secret (PBKDF2 once per user and password), or a mock one.

        An unknown user gets a made-up secret and an exchange that looks the same and
        then fails, as PostgreSQL does, so user names cannot be probed.
        """
        cache = self.registry.auth_cache
        if password is None:
            return ScramSecret.mock(self.user, self.registry.mock_key), True
        cached = cache.get(self.user)
        if cached is not None and cached[0] == password:
            return cached[1], False
        secret = ScramSecret.from_password(password)
        cache[self.user] = (password, secret)
        return secret, False

    def _auth_response(self, body: bytes) -> None:
        if self.phase == PHASE_MD5:
            response = messages.parse_password_message(body)
            password = self.auth if isinstance(self.auth, str) else None
            self.auth = None
            if password is None or not md5_verify(self.user, password, self.md5_salt, response):
                raise self._password_failed()
            self._authenticated()
            return
        session = self.auth
        assert isinstance(session, ScramServerSession)
        if self.phase == PHASE_SASL_FIRST:
            mechanism, data = messages.parse_sasl_initial_response(body)
            reply = session.handle_client_first(mechanism, data)
            self.phase = PHASE_SASL_FINAL
            self.transport.write(messages.authentication_sasl_continue(reply))
        else:
            reply = session.handle_client_final(body)
            self.auth = None
            self.transport.write(messages.authentication_sasl_final(reply))
            self._authenticated()

    def _password_failed(self) -> ProxyError:
        return AuthenticationFailed(f'password authentication failed for user "{self.user}"')

    def _authenticated(self) -> None:
        registry = self.registry
        database = registry.config.databases.get(self.dbname)
        if database is None:
            raise UnknownDatabase(
                f'no such database: "{self.dbname}"',
                hint="pgmux serves the databases configured as [databases.NAME]: "
                + ", ".join(sorted(registry.config.databases)),
            )
        pool = self.pool = registry.pool_for(database, self.user)
        self.settings = pool.intern(self.settings)
        error = pool.login_retry_error()
        if error is not None:
            raise ProxyError(
                f"server login has been failing, try again in a moment: {error.message} "
                "(server_login_retry)",
                hint=error.hint,
                sqlstate=error.sqlstate,
            )
        if self._can_welcome(pool):
            self._welcome()
            return
        # The pool has not yet learned the server's parameters, or these settings were
        # never tried: take a server once to learn and check them.
        self.phase = PHASE_WAIT
        server = cast("ServerConnection | None", pool.acquire(self))
        if server is not None:
            self.assign_server(server)

    def _can_welcome(self, pool: Pool) -> bool:
        if pool.params is None:
            return False
        verified = pool.verified
        return all(pair in verified or pair[0] == "application_name" for pair in self.settings)

    def _welcome(self) -> None:
        """AuthenticationOk, parameters, a pgmux-made cancel key, ReadyForQuery."""
        pool = self.pool
        assert pool.params is not None
        self._cancel_timer()
        self.phase = PHASE_DONE
        self.state = ClientState.IDLE
        welcome = pool.welcome_cache.get(self.settings)
        if welcome is None:
            params = dict(pool.params)
            for name, value in self.settings:
                spelled = pool.param_names.get(name)
                if spelled is None:
                    continue
                if name == "application_name":
                    params[spelled] = value
                else:
                    canonical = pool.verified.get((name, value))
                    if canonical is not None:
                        params[spelled] = canonical
            welcome = messages.AUTH_OK + b"".join(
                messages.parameter_status(k, v) for k, v in params.items()
            )
            pool.cache_welcome(self.settings, welcome)
        self.cancel_pid, self.cancel_key = self.registry.register_cancel_key(self)
        self.transport.write(
            welcome
            + messages.backend_key_data(self.cancel_pid, self.cancel_key)
            + messages.READY_IDLE
        )
        if self.registry.config.log_connections:
            log.info("%s: login ok%s", self, _describe_settings(self.settings))
        reader = self.reader
        self.reader = None
        rest = reader.take_rest() if reader is not None else b""
        pending = self.pending
        self.pending = None
        self.resume_reading(PAUSE_WAITING)
        if pending:
            rest += b"".join(pending)
        if rest:
            self.data_received(rest)

    def _login_timed_out(self, timeout: float) -> None:
        self.timer = None
        if self.state is ClientState.WAITING:
            self.pool.leave_queue(self)
        self.fail(
            LoginTimeout(
                f"login not completed within {timeout:g} s (client_login_timeout)",
                hint="the client stalled during startup or authentication, or no server "
                "connection became available to complete the login",
            )
        )

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- cancel ---------------------------------------------------------------------------

    def _cancel_request(self, request: CancelRequest) -> None:
        """A CancelRequest: cancel the target's running query, if it is running one."""
        self.phase = PHASE_DONE + 1  # not a session; no login or logout lines
        self.close()
        target = self.registry.cancel_keys.get(request.pid)
        if target is None or not hmac.compare_digest(
            target.cancel_key.to_bytes(4, "big"), request.key.to_bytes(4, "big")
        ):
            log.debug("%s: cancel request with an unknown key ignored", self)
            return
        server = target.server
        if server is not None and server.state is ServerState.ACTIVE:
            log.info("%s: forwarding cancel request to %s", target, server)
            server.forward_cancel()

    # -- flow control ---------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.write_paused = True
        server = self.server
        if server is not None:
            server.pause_reading(PAUSE_CLIENT_FULL)

    def resume_writing(self) -> None:
        self.write_paused = False
        server = self.server
        if server is not None:
            server.resume_reading(PAUSE_CLIENT_FULL)

    def pause_reading(self, reason: int) -> None:
        if not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    def _sync_flow(self, server: ServerConnection) -> None:
        """A new link: each side's full send buffer holds back the other's reading."""
        if self.write_paused:
            server.pause_reading(PAUSE_CLIENT_FULL)
        if server.write_paused:
            self.pause_reading(PAUSE_SERVER_FULL)

    def _restore_flow(self, server: ServerConnection) -> None:
        server.resume_reading(PAUSE_CLIENT_FULL)
        self.resume_reading(PAUSE_SERVER_FULL)


def clean_application_name(value: str) -> str:
    """What PostgreSQL 15 stores: printable ASCII only (others become '?'), 63 bytes."""
    cleaned = "".join(ch if 32 <= ord(ch) <= 126 else "?" for ch in value)
    return cleaned[:63]


def _describe_settings(settings: Settings) -> str:
    if not settings:
        return ""
    return " (" + ", ".join(f"{name}={value}" for name, value in settings) + ")"
