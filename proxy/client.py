"""Client connections: their session after login, and relaying requests to a server.

Login (``login.py``) ends here: the welcome is answered by pgmux itself from the pool's
cached ParameterStatus values with a pgmux-made BackendKeyData, so most logins never
touch PostgreSQL. Afterwards each chunk a client sends is scanned by its FrontendStream
and written unchanged to the server it holds; a client holding none asks its pool for
one first (one whose server was lost under its transaction: see server_loss.py).
Errors pgmux makes reach clients only via ``send_error``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

from .config import DatabaseConfig
from .errors import (
    InvalidParameter,
    LoginTimeout,
    ProtocolViolation,
    ProxyError,
    ShuttingDown,
)
from .login import Login
from .pool import (
    CLIENT_ADMIN,
    CLIENT_CLOSED,
    CLIENT_FAILED,
    CLIENT_IDLE,
    CLIENT_LOGIN,
    CLIENT_WAITING,
    Pool,
    Registry,
    Settings,
    link,
    unlink,
)
from .prepared import (
    Statement,
    copy_batch,
    rewrite_requests,
)
from .protocol import codes, messages
from .protocol.aborted import AbortedBlock
from .protocol.errors import ProtocolError
from .protocol.stream import (
    TRACKED_FRONTEND,
    FrontendEvent,
    FrontendStream,
    failed_request_end,
    first_request_end,
)
from .server import (
    PAUSE_CLIENT_FULL,
    WRITE_HIGH_WATER,
    WRITE_LOW_WATER,
    ServerConnection,
)
from .server_loss import answer_failed_block, transaction_mark
from .session_state import LOAD_TAG
from .stats import PoolStats
from .users import Credential

log = logging.getLogger("pgmux.client")

_monotonic = time.monotonic

# Reasons a client's reading is paused (bit mask).
PAUSE_WAITING = 1  # holds data for a server it does not have yet
PAUSE_SERVER_FULL = 2  # its server's send buffer is full
PAUSE_TERMINATING = 4  # sent Terminate; only replies to what came before are awaited

# A client without a server may send this much before pgmux stops reading from it.
# Below it, a queued client costs no pause/resume (two epoll_ctl calls) at all.
HOLD_LIMIT = 64 * 1024

# Reported parameters a client can change with SET: followed from ParameterStatus.
_TRACKED = frozenset((
    "application_name", "client_encoding", "datestyle", "default_transaction_read_only",
    "intervalstyle", "search_path", "standard_conforming_strings", "timezone",
))  # fmt: skip


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "addr",
        "admin",
        "barrier",
        "batch_copy",
        "busy_since",
        "bytes_in",
        "bytes_out",
        "cancel_key",
        "cancel_pid",
        "connected_at",
        "dbname",
        "deferred",
        "failed",
        "fe",
        "greeting",
        "host",
        "id",
        "is_unix",
        "last_sql",
        "loaded",
        "login",
        "lost",
        "notified_wait",
        "paused",
        "pending",
        "pinned",
        "pinned_at",
        "pinned_by",
        "pool",
        "registry",
        "reported_in",
        "server",
        "settings",
        "startup_settings",
        "state",
        "state_check",
        "statements",
        "stats",
        "terminating",
        "timer",
        "transport",
        "trigger_sql",
        "user",
        "wait_started",
        "watch",
        "welcomed",
        "write_paused",
        "xact_since",
    )

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.id = registry.new_client_id()
        self.state = CLIENT_LOGIN
        self.login: Login | None = Login(self)
        self.welcomed = False
        self.greeting = b""  # login bytes held back to go out with the welcome (or error)
        self.admin: Any = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.addr = "?"
        self.host = ""
        self.is_unix = False
        self.user = "?"
        self.dbname = "?"
        self.pool: Pool = None  # type: ignore[assignment]
        self.stats: PoolStats = None  # type: ignore[assignment]  # the pool's
        self.server: ServerConnection | None = None
        self.fe = FrontendStream(registry.config.max_packet_size)
        self.settings: Settings = ()
        self.pending: list[bytes] | None = None
        self.paused = 0
        self.write_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.cancel_pid = 0
        self.cancel_key = 0
        self.wait_started = 0.0
        self.notified_wait = 0.0  # the wait_started of the wait query_wait_notify told of
        self.terminating = False
        # Session state (session_state.py, prepared.py): client statement name ->
        # Statement, whether the transaction needs a state check, why the client keeps
        # its server, LOAD ran, and the last SQL seen (for the pin log line).
        self.statements: dict[bytes, Statement] | None = None
        self.state_check = False
        self.pinned: list[str] | None = None
        self.pinned_at = 0.0  # time.monotonic of the pin (SHOW PINS)
        self.pinned_by = b""  # the statement that pinned it (SHOW PINS)
        self.loaded = False
        self.last_sql = b""
        self.trigger_sql = b""  # what made this transaction need a state check
        self.startup_settings: Settings = ()
        self.batch_copy: bytearray | None = None  # see prepared.replan
        # Pipelined requests held behind one whose effect is not known yet.
        self.barrier = -1
        self.deferred: tuple[bytes, Sequence[FrontendEvent], int, int] | None = None
        # The janitor's note for client timeouts:
        # ((condition, sent, answered), since, acted, warned).
        self.watch: tuple[tuple[str, int, int], float, bool, bool] | None = None
        self.connected_at = time.monotonic()
        # When the request now being answered was sent (time.monotonic), read by the
        # relay once per request for query and transaction times. Negative once it has
        # been answered: then minus the time of the last request (SHOW request_time).
        self.busy_since = 0.0
        self.xact_since = 0.0  # when the open transaction's first request was sent
        self.bytes_in = 0  # relayed to servers (added to the pool's stats when it leaves)
        self.bytes_out = 0  # relayed from servers
        # A transaction block that failed when its server was lost (state FAILED), and
        # the error the client has not been told yet (it sent nothing meanwhile).
        self.failed: AbortedBlock | None = None
        self.lost: ProxyError | None = None
        # The transaction (see _transaction_mark) in which the server last reported a
        # setting change: rolled back with a lost server, it would need undoing.
        self.reported_in = 0.0

    def __repr__(self) -> str:
        return f"C-{self.id} {self.user}@{self.dbname} {self.addr}"

    # -- connection events ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        self.registry.clients.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.host = str(peer[0])
            self.addr = f"{peer[0]}:{peer[1]}"
        else:
            self.is_unix = True
            self.addr = "unix"
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        timeout = self.registry.config.client_login_timeout
        if timeout:
            self.timer = self.registry.loop.call_later(timeout, self._login_timed_out, timeout)

    def data_received(self, data: bytes) -> None:
        server = self.server
        if server is not None and server.relaying:
            self._forward(server, data)
        elif self.state is CLIENT_IDLE:
            self._start_request(data)
        elif self.state is CLIENT_LOGIN:
            if self.login is not None:
                self.login.data_received(data)
        elif self.state is CLIENT_ADMIN:
            self.admin.data_received(data)
        elif self.state is CLIENT_FAILED:
            answer_failed_block(self, data)
        elif self.state is not CLIENT_CLOSED:
            self._hold(data)  # waiting for a server, or the server runs pgmux's own query

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost cleans up

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not CLIENT_CLOSED:
            self._release_everything(str(exc) if exc else "client disconnected")

    def close(self, reason: str = "closed by pgmux") -> None:
        """Close now: leave the queue, let go of the server, then close the socket.

        Everything is let go before the socket closes, so no server ever writes to a
        client that is on its way out.
        """
        if self.state is not CLIENT_CLOSED:
            self._release_everything(reason)
        self.transport.close()

    def _release_everything(self, reason: str) -> None:
        if self.state is CLIENT_WAITING:
            self.pool.leave_queue(self)
        self.state = CLIENT_CLOSED
        self.cancel_timer()
        registry = self.registry
        registry.clients.discard(self)
        stats = self.stats
        if stats is not None:  # from now on no longer summed from the live clients
            self.pool.client_count -= 1
            registry.client_left(self.pool.settings.database.name, self.user)
            stats.query_count += self.fe.answered
            stats.bytes_received += self.bytes_in
            stats.bytes_sent += self.bytes_out
        if self.cancel_pid:
            registry.cancel_keys.pop(self.cancel_pid, None)
        server = self.server
        if server is not None:
            unlink(self, server)
            self._restore_flow(server)
            if server.on_ready is None:
                # Left while linked: settle() drains, rolls back or closes the server.
                # (With pgmux's own query in flight, its callback settles the server.)
                if self.loaded:
                    server.close("its client ran LOAD, which cannot be undone")
                elif self.deferred is not None:
                    # Counted requests that never went out: the server cannot answer them.
                    server.close("its client left with pipelined requests not yet sent")
                else:
                    server.settle(
                        self.fe,
                        reset=self.pool.mode == "session",
                        cancel=not self.terminating,
                        discard=self.pinned is not None,
                    )
        if self.welcomed and registry.config.log_disconnections:
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
        if self.busy_since <= 0:
            self.busy_since = _monotonic()  # a new request (see __init__)
        self.bytes_in += len(data)
        fe = self.fe
        copy_in = fe.copy_in
        try:
            buf, end, events, terminated = fe.feed(data)
            if events:
                out = rewrite_requests(self, server, buf, end, events)
            else:
                out = buf if end == len(buf) else memoryview(buf)[:end]
            if self.batch_copy is not None:
                copy_batch(self, out)
        except ProtocolError as exc:
            self.fail(ProtocolViolation(str(exc)))
            return
        if end:
            server.transport.write(out)  # type: ignore[union-attr]
        if terminated:
            if fe.idle or not (fe.requests or fe.copy_in):
                # Nothing awaits a reply (a batch left without Sync is closed by
                # settle()): leave now, as PostgreSQL would.
                self.terminating = True
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
        if len(data) == 5 and not self.fe.partial:
            if data[0] == codes.F_TERMINATE:
                self.close("client sent Terminate")
                return
            if data[0] == codes.F_SYNC:
                # A lone Sync with no batch open (e.g. after pgmux failed a batch sent
                # with Flush): PostgreSQL would answer ReadyForQuery idle; so does pgmux,
                # without taking a server.
                self.transport.write(messages.READY_IDLE)
                return
        registry = self.registry
        if registry.shutting_down and not registry.serving_until_clients_leave:
            self.fail(ShuttingDown("pooler is shutting down; reconnect to another instance"))
            return
        server: ServerConnection | None = self.pool.acquire(self)  # type: ignore[assignment]
        if server is None:
            self._hold(data)
            return
        link(self, server)
        if self.write_paused or server.write_paused:
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
        if server.settings is self.settings and self.welcomed:
            self.relay_pending(server)
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
        if not self.welcomed:
            self.detach()
            # Not settle() at once: with nothing to apply this runs inside Pool.release,
            # which would hand the server straight to the next login waiting for the
            # pool's first parameters, and so on, one stack frame per queued login
            # (RecursionError from about 170 logins at once on a fresh pool).
            self.registry.loop.call_soon(server.settle, None)
            self._welcome()
            return
        self.relay_pending(server)

    def relay_pending(self, server: ServerConnection) -> None:
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

    def cancel_wait(self) -> None:
        """A CancelRequest while this client waits in the queue: its first request never
        reached a server, so it is dropped and answered as PostgreSQL answers a
        cancelled statement; pipelined requests after it keep their place."""
        pending = b"".join(self.pending or ())
        end = first_request_end(pending)
        if end is None:
            return  # the request has not fully arrived: nothing can be cut off cleanly
        if end < len(pending):
            self.pending = [pending[end:]]
        else:
            self.pending = None
            self.pool.leave_queue(self)
            self.resume_reading(PAUSE_WAITING)
        self.send_error(
            ProxyError(
                "canceling statement due to user request (it was still waiting for a "
                "server connection)",
                sqlstate="57014",  # query_canceled
                reason="cancelled_while_waiting",
            ),
            fatal=False,
        )

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
        if self.paused or server.paused:
            self._restore_flow(server)
        if self.pending:
            # Sent while the server was busy with pgmux's own query: a new request.
            self.registry.loop.call_soon(self._resend_pending)

    def _resend_pending(self) -> None:
        pending = self.pending
        self.pending = None
        if not pending or self.state is not CLIENT_IDLE:
            if pending:
                self.pending = pending
            return
        self.resume_reading(PAUSE_WAITING)
        self.data_received(b"".join(pending))

    def note_tag(self, tag: bytes) -> None:
        """A CommandComplete tag after which session state may have changed."""
        if not self.state_check:
            self.state_check = True
            self.trigger_sql = self.last_sql
        if tag == LOAD_TAG:
            self.loaded = True

    def pin(self, server: ServerConnection, reasons: list[str]) -> None:
        """Session state that cannot follow the client: it keeps this server."""
        new = [reason for reason in reasons if not self.pinned or reason not in self.pinned]
        if not self.pinned:
            self.pinned_at = _monotonic()
        self.pinned = reasons
        for reason in new:
            self.stats.count_pin(reason)
        if new:
            self.pinned_by = self.trigger_sql or self.last_sql
            log.info(
                "%s: pinned to %s (application_name=%s): %s; statement: %s",
                self,
                server,
                dict(self.settings).get("application_name", ""),
                ", ".join(new),
                self.pinned_by[:200].decode("utf-8", "replace")
                if self.registry.config.log_statement_text
                else "(log_statement_text = false)",
            )
        self.trigger_sql = b""

    def unpin(self, server: ServerConnection) -> None:
        self.trigger_sql = b""
        if self.pinned:
            log.info("%s: session state cleared; %s goes back to the pool", self, server)
            self.pinned = None

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
        before = self.settings
        self.settings = self.pool.intern(tuple(sorted(settings.items())))
        if self.settings is not before:
            self.reported_in = transaction_mark(self)

    def server_lost(self, error: ProxyError, *, already_told: bool) -> None:
        """The linked server connection closed under this client."""
        server = self.server
        if server is not None:
            unlink(self, server)
        if self.state is CLIENT_CLOSED:
            return
        if already_told:
            self.close("the server ended the session")
        else:
            self.fail(error)

    # -- errors -------------------------------------------------------------------------

    def send_error(self, error: ProxyError, *, fatal: bool, ready: bool = True) -> None:
        """The one way pgmux's own errors reach a client.

        FATAL closes the connection after the message; ERROR is followed by
        ReadyForQuery so the session carries on (unless ``ready`` is False: inside an
        extended-query batch the ReadyForQuery comes with its Sync).
        """
        severity = "FATAL" if fatal else "ERROR"
        registry = self.registry
        if registry.config.log_pooler_errors:
            level = logging.WARNING if fatal or not self.welcomed else logging.INFO
            log.log(level, "%s: %s %s: %s", self, severity, error.sqlstate, error.message)
        if self.state is CLIENT_CLOSED or self.transport.is_closing():
            return
        (self.stats or registry.stats).count_pooler_error(error.reason, error.sqlstate)
        payload = self.greeting + messages.error_response(
            severity, error.sqlstate, error.message, error.detail, error.hint
        )
        self.greeting = b""
        if fatal:
            self.transport.write(payload)
            self.close(f"{error.sqlstate}: {error.message}")
        else:
            self.transport.write(payload + messages.READY_IDLE if ready else payload)

    def send_notice(self, text: str, hint: str | None = None) -> None:
        """A NoticeResponse: protocol-wise allowed at any time, shown by clients as a
        warning or passed to their notice handler."""
        if self.state is not CLIENT_CLOSED and not self.transport.is_closing():
            self.transport.write(
                messages.error_response("NOTICE", "00000", text, hint=hint, notice=True)
            )

    def fail(self, error: ProxyError) -> None:
        self.send_error(error, fatal=True)

    def fail_wait(self, error: ProxyError) -> None:
        """The pool cannot get a server for anyone (the server is down or refuses
        logins): the waiting client gets the error as FATAL, as from PgBouncer. Its
        session would only fail again, and drivers that track a transaction they began
        (asyncpg's transaction()) are left confused by a BEGIN that failed but kept the
        connection."""
        self.fail(error)

    def wait_expired(self, error: ProxyError) -> None:
        """query_wait_timeout (called by the pool, which has taken the client out of its
        queue): the request that waited gets an ERROR and the session goes on, so the
        client can retry on the same connection (PgBouncer closes it). The error answers
        what PostgreSQL's would (failed_request_end); requests pipelined after that are
        new requests and queue again, at the back. A login still waiting for the pool's
        first server, or a request not yet whole, cannot be answered on its own: that
        client gets the error as FATAL, as before."""
        pending = b"".join(self.pending or ())
        failed = failed_request_end(pending) if self.welcomed else None
        if failed is None:
            self.fail(error)
            return
        end, ready = failed
        self.send_error(error, fatal=False, ready=ready)
        if end < len(pending):
            self.pending = [pending[end:]]
            self.registry.loop.call_soon(self._resend_pending)
        else:
            self.pending = None
            self.resume_reading(PAUSE_WAITING)

    # -- after login ---------------------------------------------------------------------

    def start_session(self, database: DatabaseConfig, credential: Credential | None) -> None:
        """Authenticated for ``database``: join its pool and say welcome (called by Login)."""
        registry = self.registry
        registry.admit_client(database, self.user)  # max_db/user_client_connections
        pool = self.pool = registry.pool_for(database, self.user, credential)
        stats = self.stats = pool.stats
        stats.logins += 1
        pool.client_count += 1
        self.settings = pool.intern(self.settings)
        if pool.mode != "session":
            self.fe.interesting = TRACKED_FRONTEND
        error = pool.login_retry_error()
        if error is not None:
            raise ProxyError(
                f"server login has been failing, try again in a moment: {error.message} "
                "(server_login_retry)",
                hint=error.hint,
                sqlstate=error.sqlstate,
                reason="server_login_retry",
            )
        if self._can_welcome(pool):
            self._welcome()
            return
        # The pool has not yet learned the server's parameters, or these settings were
        # never tried: take a server once to learn and check them.
        server = cast("ServerConnection | None", pool.acquire(self))
        if server is not None:
            self.assign_server(server)

    def start_admin(self) -> None:
        """Authenticated for the admin console (called by Login)."""
        self.cancel_timer()
        self.welcomed = True
        self.state = CLIENT_ADMIN
        self.cancel_pid, self.cancel_key = self.registry.register_cancel_key(self)
        rest = self.login.take_rest() if self.login is not None else b""
        self.login = None
        self.flush_greeting()  # before the console's welcome
        self.admin = self.registry.open_admin(self)
        if self.registry.config.log_connections:
            log.info("%s: admin console login ok", self)
        if rest:
            self.admin.data_received(rest)

    def flush_greeting(self) -> None:
        """Write the login bytes held back for the welcome, if any are left."""
        if self.greeting:
            self.transport.write(self.greeting)
            self.greeting = b""

    def _can_welcome(self, pool: Pool) -> bool:
        if pool.params is None:
            return False
        verified = pool.verified
        return all(pair in verified or pair[0] == "application_name" for pair in self.settings)

    def _welcome(self) -> None:
        """AuthenticationOk, parameters, a pgmux-made cancel key, ReadyForQuery."""
        pool = self.pool
        assert pool.params is not None
        self.cancel_timer()
        self.welcomed = True
        self.state = CLIENT_IDLE
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
            self.greeting
            + welcome
            + messages.backend_key_data(self.cancel_pid, self.cancel_key)
            + messages.READY_IDLE
        )
        self.greeting = b""
        if self.registry.config.log_connections:
            log.info("%s: login ok%s", self, _describe_settings(self.settings))
        rest = self.login.take_rest() if self.login is not None else b""
        self.login = None
        pending = self.pending
        self.pending = None
        self.resume_reading(PAUSE_WAITING)
        if pending:
            rest += b"".join(pending)
        if rest:
            self.data_received(rest)

    def _login_timed_out(self, timeout: float) -> None:
        self.timer = None
        if self.state is CLIENT_WAITING:
            self.pool.leave_queue(self)
        self.fail(
            LoginTimeout(
                f"login not completed within {timeout:g} s (client_login_timeout)",
                hint="the client stalled during startup or authentication, or no server "
                "connection became available to complete the login",
            )
        )

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

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


def _describe_settings(settings: Settings) -> str:
    if not settings:
        return ""
    return " (" + ", ".join(f"{name}={value}" for name, value in settings) + ")"
