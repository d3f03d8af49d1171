"""Server connections: connect and log in to PostgreSQL, relay its replies, come back clean.

After login every received chunk goes through one BackendStream scanner. While linked
to a client (``relaying``) the bytes are forwarded unchanged and only ReadyForQuery,
ParameterStatus, ErrorResponse and CopyInResponse are looked at; while pgmux runs its
own commands (settings, ROLLBACK, reset, draining a departed client) replies are
swallowed and ReadyForQuery drives the next step.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from .auth import AuthError
from .errors import (
    NoMatchingServer,
    ProxyError,
    ServerConnectionLost,
    ServerLoginFailed,
    ServerUnreachable,
)
from .hosts import (
    READ_ONLY,
    ROLE_PARAMETERS,
    WATCHED_TARGETS,
    HostList,
    Try,
    Walk,
    address_text,
    mismatch_reason,
    role_verdict,
)
from .pool import (
    NO_SETTINGS,
    SERVER_CLOSED,
    SERVER_CONNECTING,
    SERVER_IDLE,
    SERVER_LOGIN,
    SERVER_TESTED,
    TRANSIENT,
    Pool,
    Registry,
    Settings,
)
from .prepared import (
    CACHED_PLAN_ERROR,
    MARKER_PREFIX,
    Op,
    Statement,
    batch_done,
    error_reply,
    evictions,
    forget_statements,
    renew_stale,
    replan,
    reply_for,
    resume_deferred,
)
from .protocol import codes, messages
from .protocol.errors import ProtocolError
from .protocol.stream import (
    RELAY_INTERESTING,
    REQ_SYNC,
    BackendStream,
    Event,
    FrontendStream,
    interesting_table,
)
from .server_login import ServerLogin
from .server_loss import may_outlive, outlive_server
from .session_state import (
    FORGET_STATEMENTS_TAGS,
    LOAD_REASON,
    REASONS,
    SESSION_AUTHORIZATION_REASON,
    SESSION_USER,
    STATE_QUERY,
    STATE_TAGS,
)
from .sockets import apply_tcp_options, tcp_options
from .stats import DURATION_BOUNDS

if TYPE_CHECKING:
    from .client import ClientConnection

log = logging.getLogger("pgmux.server")

_monotonic = time.monotonic
# The first histogram bounds, for an inline bucket lookup on the hot path: most
# transactions fall in one of these, and comparing floats inline costs a third of a
# bisect_left call. Prometheus buckets are "le": a value equal to a bound is in it.
_LE0, _LE1, _LE2 = DURATION_BOUNDS[:3]

# Past this many bytes queued towards a peer, stop reading from the other side.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024

# Reasons a server's reading is paused (bit mask).
PAUSE_CLIENT_FULL = 1

# Transaction and statement modes also watch CommandComplete (session state, and a
# BEGIN refused in statement mode), ParseComplete and CloseComplete (prepared statements).
TRACKED_INTERESTING = interesting_table(b"ZSEGC13I")
_BEGIN_TAGS = (b"BEGIN", b"START TRANSACTION")
_WATCHED_TAGS = STATE_TAGS | frozenset(_BEGIN_TAGS)

# pgmux's own queries that return rows (auth_query) also read DataRow whole.
FETCH_INTERESTING = interesting_table(b"ZSEGD")

ErrorFields = dict[str, str]
Rows = list[list[bytes | None]]
QueryDone = Callable[[int, ErrorFields | None], None]

# Where the value of default_transaction_read_only comes from ("session": a client's SET).
_READ_ONLY_SOURCE = (
    "SELECT source FROM pg_catalog.pg_settings WHERE name = 'default_transaction_read_only'"
)


def open_server(registry: Registry, pool: Pool) -> None:
    """Start connecting a new server for ``pool`` (the pool counted it as connecting):
    a walk through the database's hosts begins (see hosts.py)."""
    now = time.monotonic()
    _walk_on(registry, pool, _host_list(pool).walk(now, registry.config.server_login_retry))


def _host_list(pool: Pool) -> HostList:
    """The pool's HostList, new when a reload changed its hosts or their settings."""
    config = pool.config
    database = pool.settings.database
    hosts = database.hosts
    load_balance = config.load_balance_hosts_for(database)
    target = config.target_session_attrs_for(database)
    found = pool.hosts
    if found is None or not found.same(hosts, load_balance, target):
        found = pool.hosts = HostList(hosts, load_balance, target)
    return found


def _walk_on(registry: Registry, pool: Pool, walk: Walk) -> None:
    """Connect to the walk's next host. When a round ends without a server, wait and
    start another (a standby not promoted yet), or report the failure to the pool,
    which counts the walk as one server connecting all along."""
    now = time.monotonic()
    hosts = _host_list(pool)
    if walk.hosts is not hosts:  # a reload changed the hosts: walk the new ones
        walk = hosts.walk(now, registry.config.server_login_retry)
    attempt = walk.next(now)
    if attempt is not None:
        server = ServerConnection(registry, pool, walk, attempt)
        registry.loop.create_task(server.connect())
        return
    # No client waiting: no reason to keep looking (min_pool_size asks again later).
    budget = (registry.config.server_connect_timeout or float("inf")) if pool.n_waiting else 0.0
    delay = None if registry.shutting_down else walk.wait(now, budget)
    if delay is not None:
        registry.loop.call_later(delay, _next_round, registry, pool, walk)
        return
    error = walk.error(pool.name, pool.settings.database.name, now)
    # One host: its failure is logged already; a walk that only skipped hosts checked
    # a moment ago (min_pool_size asking again) has nothing new to say.
    if (len(hosts.hosts) > 1 or isinstance(error, NoMatchingServer)) and walk.tried:
        log.warning("pool %s: %s", pool.name, error.message)
    pool.connect_failed(error)


def _next_round(registry: Registry, pool: Pool, walk: Walk) -> None:
    now = time.monotonic()
    if registry.shutting_down or not pool.n_waiting:  # nobody needs the server now
        pool.connect_failed(walk.error(pool.name, pool.settings.database.name, now))
        return
    walk.restart(now)
    _walk_on(registry, pool, walk)


class ServerConnection(asyncio.Protocol):
    __slots__ = (
        "address",
        "attempt",
        "backend_key",
        "backend_pid",
        "batch_started",
        "begun",
        "cancel_pending",
        "client",
        "created_at",
        "discard_pending",
        "doomed",
        "doubt",
        "drain_fe",
        "empty_replies",
        "error_fields",
        "fatal",
        "generation",
        "held",
        "host",
        "id",
        "idle_since",
        "login",
        "markers",
        "on_ready",
        "ops",
        "params",
        "paused",
        "pool",
        "port",
        "prepared",
        "registry",
        "relaying",
        "reset_pending",
        "retire_at",
        "retrying",
        "rows",
        "settings",
        "settle_after_cancel",
        "stale",
        "state",
        "statement_mode",
        "stats",
        "stream",
        "timer",
        "transport",
        "tx_status",
        "used_tls",
        "walk",
        "watch",
        "write_paused",
    )

    def __init__(self, registry: Registry, pool: Pool, walk: Walk, attempt: Try) -> None:
        now = time.monotonic()
        self.registry = registry
        self.pool = pool
        # The host of the database's list this connection tries, and the walk through
        # the list it is part of (hosts.py).
        self.walk = walk
        self.attempt = attempt
        self.host = attempt.host
        self.port = attempt.port
        self.address = address_text(attempt.host, attempt.port)
        # Once logged in: the target_session_attrs it must go on matching (None: any
        # server will do), and why it must be closed once released (it stopped matching).
        self.watch: str | None = None
        self.doomed: str | None = None
        # Only default_transaction_read_only says so, which a client may SET itself:
        # asked of the server once released (see _confirm_read_only).
        self.doubt = False
        self.stats = pool.stats
        self.generation = pool.generation
        self.id = registry.new_server_id()
        self.state = SERVER_CONNECTING
        self.transport: asyncio.Transport | None = None
        self.client: ClientConnection | None = None
        self.relaying = False
        self.settings: Settings = NO_SETTINGS
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key = 0
        self.tx_status = codes.TX_IDLE
        self.created_at = now
        self.retire_at = float("inf")  # set by the pool once connected (lifetime_end)
        self.idle_since = now
        self.login: ServerLogin | None = None  # while logging in
        self.statement_mode = pool.mode == "statement"
        self.stream = BackendStream(
            registry.config.max_packet_size,
            RELAY_INTERESTING if pool.mode == "session" else TRACKED_INTERESTING,
        )
        self.held: bytes | None = None
        # Prepared statements this server holds (LRU), the queue matching replies to
        # what pgmux sent, and marker errors to replace (see prepared.py).
        self.prepared: OrderedDict[bytes, Statement] | None = None
        self.retrying = False  # swallowing a failed attempt until its ReadyForQuery
        self.batch_started = False
        # fe.answered when a BEGIN's CommandComplete went to the client: the number of
        # the request it belongs to (see server_loss.py).
        self.begun = -1
        self.ops: deque[Op] | None = None
        # A failing stand-in's marker -> (the error to send instead, its SQLSTATE, and
        # its reason when pgmux makes it; None: PostgreSQL's own, counted as the server's).
        self.markers: dict[bytes, tuple[bytes, str, str | None]] | None = None
        self.empty_replies: deque[bytes] | None = None
        self.stale: set[bytes] = set()  # statements whose plans went stale: closed at release
        self.timer: asyncio.TimerHandle | None = None
        self.cancel_pending = 0
        self.settle_after_cancel = False
        self.reset_pending = False
        self.discard_pending = False
        self.on_ready: Callable[[int], None] | None = None
        self.error_fields: ErrorFields | None = None
        self.drain_fe: FrontendStream | None = None
        self.fatal = False
        self.used_tls = False
        self.rows: list[list[bytes | None]] | None = None
        self.paused = 0
        self.write_paused = False

    def __repr__(self) -> str:
        return f"S-{self.id} {self.pool.name} {self.address} pid={self.backend_pid}"

    # -- connect and login ------------------------------------------------------------

    async def connect(self) -> None:
        pool = self.pool
        host, port = self.host, self.port
        timeout = self.registry.config.server_connect_timeout or None
        loop = self.registry.loop
        try:
            async with asyncio.timeout(timeout):
                if host.startswith("/"):
                    await loop.create_unix_connection(lambda: self, f"{host}/.s.PGSQL.{port}")
                else:
                    await loop.create_connection(lambda: self, host, port)
        except (OSError, TimeoutError) as exc:
            if self.state is not SERVER_CONNECTING:
                return  # connected, then failed: reported by connection_lost
            self.state = SERVER_CLOSED
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {timeout:g} s (server_connect_timeout)"
            else:
                reason = exc.strerror or str(exc)
            error = ServerUnreachable(
                f'cannot connect to server {self.address} for pool "{pool.name}": {reason}',
                hint=f"check that PostgreSQL is running there and "
                f"[databases.{pool.settings.database.name}] host and port",
            )
            log.warning("%s: %s", self, error.message)
            self._host_failed(error, f"cannot connect: {reason}", connected=False)

    def _host_failed(self, error: ProxyError, outcome: str, *, connected: bool) -> None:
        """This host could not be used: the walk goes on with the next one, or reports
        the failure to the pool when there is none."""
        hard = not (isinstance(error, ServerUnreachable) or error.sqlstate in TRANSIENT)
        self.walk.failed(self.attempt, outcome, error, time.monotonic(), hard=hard)
        if connected:
            self.pool.server_moved_on(self)
        _walk_on(self.registry, self.pool, self.walk)

    def role_rejected(self, why: str) -> None:
        """Logged in, but the server is not the kind target_session_attrs asks for
        (called by ServerLogin, with libpq's words for it): try the next host."""
        if self.state is SERVER_CLOSED:
            return
        self._cancel_timer()
        log.info(
            "%s: %s, not what target_session_attrs = %s asks for; trying the next host",
            self,
            why,
            self.attempt.target,
        )
        self.walk.rejected(self.attempt, why, time.monotonic())
        self.login = None  # logged in: close with Terminate
        self.pool.server_moved_on(self)
        self._close_transport()
        _walk_on(self.registry, self.pool, self.walk)

    def _login_timed_out(self, timeout: float) -> None:
        self.timer = None
        self.login_failed(
            ServerUnreachable(
                f"server {self.address} did not complete the login for pool "
                f'"{self.pool.name}" within {timeout:g} s (server_connect_timeout)',
                hint="check that PostgreSQL is up and not overloaded, or raise "
                "server_connect_timeout",
            )
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.state is not SERVER_CONNECTING:
            transport.abort()  # the connect timed out while the kernel finished it
            return
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            apply_tcp_options(sock, tcp_options(self.registry.config))
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.pool.server_connected(self)
        timeout = self.registry.config.server_connect_timeout
        if timeout:
            self.timer = self.registry.loop.call_later(timeout, self._login_timed_out, timeout)
        self.login = ServerLogin(self)
        self.login.start()

    def logged_in(self, rest: bytes) -> None:
        """ReadyForQuery ended the login (called by ServerLogin); ``rest`` came after it."""
        self._cancel_timer()
        self.login = None
        self.walk.succeeded(self.attempt)
        target = self.walk.hosts.target
        self.watch = target if target in WATCHED_TARGETS else None
        self.pool.learn_params(self.params)
        log.debug("%s: logged in", self)
        self.pool.server_logged_in(self)
        if rest and self.state is not SERVER_CLOSED:
            self.data_received(rest)

    def login_failed(self, error: ProxyError) -> None:
        """The login cannot complete (called here and by ServerLogin)."""
        if self.state is SERVER_CLOSED:
            return
        self._cancel_timer()
        pool = self.pool
        if (
            error.sqlstate == "28000"
            and "no encryption" in error.message
            and self.registry.config.server_tls.sslmode == "allow"
            and not pool.tls_fallback
            and self.registry.server_tls is not None
        ):
            log.info("%s: server refused a plain login; retrying with TLS (allow)", self)
            pool.retry_with_tls(self)
            self._close_transport()
            return
        log.warning("%s: %s", self, error.message)
        self._close_transport()
        outcome = error.message.removeprefix(f'server login failed for pool "{pool.name}": ')
        self._host_failed(error, outcome, connected=True)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- receiving --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.relaying:
            client = self.client
            assert client is not None
            client.bytes_out += len(data)
            try:
                buf, end, events = self.stream.feed(data)
            except ProtocolError as exc:
                self.close(f"protocol error from server: {exc}")
                return
            if events or self.held is not None:
                self._relay_events(client, buf, end, events)
            elif end:
                client.transport.write(buf if end == len(buf) else memoryview(buf)[:end])
                self.batch_started = True
            return
        try:
            if self.state is SERVER_LOGIN:
                assert self.login is not None
                self.login.data_received(data)
                return
            buf, end, events = self.stream.feed(data)
            for typ, start, stop in events:
                self._internal_event(typ, buf, start, stop)
        except (ProtocolError, AuthError) as exc:
            if self.state is SERVER_LOGIN:
                self.login_failed(
                    ServerLoginFailed(f'server login failed for pool "{self.pool.name}": {exc}')
                )
            else:
                self.close(f"protocol error from server: {exc}")
        except ServerLoginFailed as exc:
            self.login_failed(exc)

    def _relay_events(
        self, client: ClientConnection, buf: bytes, end: int, events: Sequence[Event]
    ) -> None:
        """Forward ``buf[:end]`` to the client, acting on the interesting messages.

        Most chunks go out whole in one write. A reply pgmux must hide, rewrite or
        replace (prepared statements, refused BEGIN in statement mode, marker errors)
        splits the chunk around it.
        """
        fe = client.fe
        write = client.transport.write
        parts: list[bytes | memoryview] | None = None
        cursor = 0
        done = False
        batch_start = 0  # where the reply to the request now in flight begins
        batch_parts = -1  # len(parts) at batch_start (-1: parts did not exist yet)
        held = self.held
        if held is not None:
            self.held = None
            if not (
                events and events[0][0] == codes.B_READY_FOR_QUERY and events[0][1] == 0
                and buf[5] != codes.TX_IDLE
            ):  # fmt: skip
                write(held)  # what followed the BEGIN was not its refusal after all
        for index, (typ, start, stop) in enumerate(events):
            replacement: bytes | None = None
            if self.retrying:
                # A failed attempt being retried: nothing of it reaches the client.
                replacement = b""
                if typ == codes.B_READY_FOR_QUERY:
                    self.retrying = False
                    resend = client.batch_copy
                    client.batch_copy = None
                    assert self.transport is not None and resend is not None
                    self.transport.write(bytes(resend))
            elif typ == codes.B_READY_FOR_QUERY:
                status = buf[start + 5]
                fe.on_ready_for_query()
                if fe.idle:
                    client.batch_copy = None
                    started = client.busy_since
                    if started > 0:  # all it sent is answered: count the request
                        took = _monotonic() - started
                        client.busy_since = -started
                        if status == codes.TX_IDLE and not client.xact_since:
                            # A transaction of one request: the common case, cheapest.
                            stats = self.stats
                            stats.one_time += took
                            stats.one_hist[
                                0 if took <= _LE0 else 1 if took <= _LE1
                                else 2 if took <= _LE2 else bisect_left(DURATION_BOUNDS, took)
                            ] += 1  # fmt: skip
                        else:
                            self._count_request(client, status, started, took)
                self.tx_status = status
                if self.ops or self.markers:
                    batch_done(self, client)
                if status != codes.TX_IDLE and self.statement_mode:
                    parts = parts or []
                    parts.append(memoryview(buf)[cursor:start])
                    write(b"".join(parts))
                    self._refuse_transaction(client, fe)
                    return
                done = status == codes.TX_IDLE
                batch_start = stop
                if parts is not None:
                    parts.append(memoryview(buf)[cursor:stop])
                    cursor = stop
                    batch_parts = len(parts)
            elif typ == codes.B_COMMAND_COMPLETE:
                tag = buf[start + 5 : stop - 1]
                if tag in _WATCHED_TAGS:  # one lookup for the common tags' miss
                    if tag not in _BEGIN_TAGS:
                        client.note_tag(tag)
                        if tag in FORGET_STATEMENTS_TAGS:
                            forget_statements(self, client)
                    elif not self.statement_mode:
                        # The client knows a block is open even before the request's
                        # ReadyForQuery (see server_loss.py).
                        self.begun = fe.answered
                    # Hold a BEGIN's CommandComplete until we know it is refused.
                    elif stop == end:
                        replacement = b""
                        self.held = buf[start:stop]
                    elif index + 1 < len(events):
                        typ2, start2, _ = events[index + 1]
                        if (
                            typ2 == codes.B_READY_FOR_QUERY
                            and start2 == stop
                            and buf[start2 + 5] != codes.TX_IDLE
                        ):
                            replacement = b""
            elif typ == codes.B_PARSE_COMPLETE or typ == codes.B_CLOSE_COMPLETE:
                replacement = reply_for(self, typ)
            elif typ == codes.B_EMPTY_QUERY and self.empty_replies:
                replacement = self.empty_replies.popleft()  # a request pgmux answered
            elif typ == codes.B_ERROR_RESPONSE:
                body = buf[start + 5 : stop]
                fields = self._note_error(body)
                if self.fatal:
                    # The server ends the session (shutdown, pg_terminate_backend): its
                    # FATAL would end the client's too. Where the client can go on,
                    # it is not relayed: pgmux answers what the client awaits instead.
                    self.batch_started = start > batch_start or (
                        not batch_start and self.batch_started
                    )
                    if may_outlive(client, self):
                        parts = parts or []
                        parts.append(memoryview(buf)[cursor:start])
                        write(b"".join(parts))
                        self.close(fields.get("M") or "server reported a fatal error")
                        return
                if not (self.markers and MARKER_PREFIX in body):  # error_reply counts those
                    self.stats.count_error(fields.get("C"))
                retry = None
                if CACHED_PLAN_ERROR in body:
                    if self.tx_status == codes.TX_IDLE and not (
                        self.batch_started and batch_start == 0
                    ):
                        retry = replan(self, client, fe.answered)
                    if retry is None:
                        renew_stale(self, client)
                if retry is not None:
                    # Nothing of this attempt goes out: drop its replies so far in this
                    # chunk (an earlier chunk held none of them) and skip to its end.
                    client.batch_copy = bytearray(retry)
                    self.retrying = True
                    if parts is None or batch_parts < 0:
                        parts = [memoryview(buf)[:batch_start]]
                    else:
                        del parts[batch_parts:]
                    cursor = stop
                    continue
                elif self.ops or self.markers:
                    replacement = error_reply(self, client, body)
            elif typ == codes.B_PARAMETER_STATUS:
                name, value = messages.parse_parameter_status(buf[start + 5 : stop])
                self.params[name] = value
                client.setting_reported(name, value)
                self.settings = client.settings
                if name in ROLE_PARAMETERS and self.watch is not None:
                    self._role_reported(name)
            elif typ == codes.B_COPY_IN_RESPONSE:
                fe.on_copy_in_response()
            if replacement is not None:
                if parts is None:
                    parts = []
                parts.append(memoryview(buf)[cursor:start])
                if replacement:
                    parts.append(replacement)
                cursor = stop
        if parts is None:
            write(buf if end == len(buf) else memoryview(buf)[:end])
        else:
            parts.append(memoryview(buf)[cursor:end])
            write(b"".join(parts))
        if client.deferred is not None:
            resume_deferred(client, self)
        # Has the client been sent anything of the request now in flight?
        self.batch_started = not (events and events[-1][0] == codes.B_READY_FOR_QUERY
                                  and events[-1][2] == end)  # fmt: skip
        self._after_relay(client, fe, done)

    def _after_relay(self, client: ClientConnection, fe: FrontendStream, done: bool) -> None:
        if client.terminating:
            if fe.idle:
                client.close("client sent Terminate")  # settles this server
        elif done and fe.idle and self.pool.mode != "session" and self.client is client:
            if client.state_check or self.registry.config.session_state_check == "always":
                self._check_state(client)
            elif not client.pinned:
                client.detach()
                self.settle(None)

    def _count_request(
        self, client: ClientConnection, status: int, started: float, took: float
    ) -> None:
        """A request answered inside a longer transaction (see PoolStats): its time,
        and the transaction's when it ended there."""
        stats = self.stats
        stats.query_time += took
        stats.query_hist[bisect_left(DURATION_BOUNDS, took)] += 1
        since = client.xact_since
        if status == codes.TX_IDLE:
            client.xact_since = 0.0
            took = started + took - since
            stats.xact_count += 1
            stats.xact_time += took
            stats.xact_hist[bisect_left(DURATION_BOUNDS, took)] += 1
        elif not since:
            client.xact_since = started

    def _note_error(self, body: bytes) -> ErrorFields:
        fields = messages.parse_fields(body)
        if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
            # The server is about to close this connection; never hand it out again.
            self.fatal = True
            log.info("%s: server reports %s", self, messages.error_summary(fields))
        if self.error_fields is None:
            self.error_fields = fields
        return fields

    def _internal_event(self, typ: int, buf: bytes, start: int, stop: int) -> None:
        """An interesting message while pgmux, not a client, is in charge of the server."""
        if typ == codes.B_READY_FOR_QUERY:
            status = buf[start + 5]
            self.tx_status = status
            callback = self.on_ready
            if callback is None:
                log.warning("%s: unexpected ReadyForQuery while idle; closing", self)
                self.close("out of step with pgmux")
            else:
                callback(status)
        elif typ == codes.B_ERROR_RESPONSE:
            self._note_error(buf[start + 5 : stop])
            if self.on_ready is None and self.state is SERVER_IDLE:
                summary = messages.error_summary(self.error_fields or {})
                log.info("%s: error while idle: %s", self, summary)
                self.error_fields = None
        elif typ == codes.B_PARAMETER_STATUS:
            name, value = messages.parse_parameter_status(buf[start + 5 : stop])
            self.params[name] = value
            if name in ROLE_PARAMETERS and self.watch is not None:
                self._role_reported(name)
        elif typ == codes.B_DATA_ROW and self.rows is not None:
            self.rows.append(messages.parse_data_row(buf[start + 5 : stop]))
        elif typ == codes.B_COPY_IN_RESPONSE and self.drain_fe is not None:
            self._fail_copy(self.drain_fe)

    def _role_reported(self, name: str) -> None:
        """in_hot_standby or default_transaction_read_only changed (ParameterStatus): a
        server that no longer suits the pool's target_session_attrs is not reused. It
        closes once released (now, if idle); the transaction on it runs to its end."""
        watch = self.watch
        assert watch is not None
        if role_verdict(watch, self.params) is not False:
            self.doomed, self.doubt = None, False  # it suits again (a RESET)
            return
        self.doubt = name == READ_ONLY and (self.doomed is None or self.doubt)
        why = mismatch_reason(watch, self.params)
        self.doomed = f"{why} now, and target_session_attrs = {watch}"
        if self.doubt:
            log.debug("%s: %s; asking why once released", self, self.doomed)
            return
        log.info("%s: %s; closing it once released", self, self.doomed)
        if self.state is SERVER_IDLE:
            self.close(self.doomed)

    def _confirm_read_only(self) -> None:
        """default_transaction_read_only changed and the server no longer suits: a
        client's own SET is its business (the server stays), a change of the server's
        configuration (ALTER SYSTEM and a reload) is not (it closes)."""

        def known(rows: Rows, error: ErrorFields | None) -> None:
            if self.state is SERVER_CLOSED:
                return
            if error is None and rows and rows[0] and rows[0][0] == b"session":
                self.doomed, self.doubt = None, False
                self.settle(None)
                return
            reason = self.doomed or "default_transaction_read_only changed"
            log.info("%s: %s; closing it", self, reason)
            self.close(reason)

        self.fetch_rows(_READ_ONLY_SOURCE, [], known)

    # -- pgmux's own commands -----------------------------------------------------------

    def run_query(self, sql: str, done: QueryDone) -> None:
        """Send one simple Query of pgmux's own; replies are swallowed.

        ``done(status, error)`` runs at its ReadyForQuery with the transaction status
        and the first ErrorResponse's fields, if any.
        """
        self.run_messages(messages.query(sql), done)

    def check(self, query: str, timeout: float) -> None:
        """server_check_query on this idle server before a queued client gets it (the
        pool made it TESTED). It fails on an error, a transaction left open, no answer
        within ``timeout`` (0: none) or the connection closing; then the server closes
        and the pool opens another for the client, who sees nothing of it."""
        if self.fatal or self.transport is None or self.transport.is_closing():
            self.close("server_check_query not sent: the connection is closing")
            return
        if timeout:
            self.timer = self.registry.loop.call_later(timeout, self._check_timed_out, timeout)
        self.run_query(query, self._checked)

    def _checked(self, status: int, error: ErrorFields | None) -> None:
        self._cancel_timer()
        if self.state is not SERVER_TESTED:
            return  # closed meanwhile; close() said why
        if error is not None or status != codes.TX_IDLE:
            why = messages.error_summary(error) if error else f"transaction status {chr(status)}"
            log.warning("%s: server_check_query failed (%s); closing the server", self, why)
            self.close(f"server_check_query failed: {why}")
            return
        self.pool.check_passed(self)

    def _check_timed_out(self, timeout: float) -> None:
        self.timer = None
        log.warning(
            "%s: server_check_query got no answer within %g s (server_connect_timeout); "
            "closing the server",
            self,
            timeout,
        )
        self.close(f"server_check_query got no answer within {timeout:g} s")

    def run_messages(self, payload: bytes, done: QueryDone) -> None:
        """Send protocol messages of pgmux's own ending in one Query or Sync; replies
        are swallowed and ``done`` runs at the ReadyForQuery."""
        assert self.transport is not None
        self.relaying = False
        self.error_fields = None

        def on_ready(status: int) -> None:
            self.on_ready = None
            error, self.error_fields = self.error_fields, None
            done(status, error)

        self.on_ready = on_ready
        self.transport.write(payload)

    def fetch_rows(
        self, sql: str, params: list[str | None], done: Callable[[Rows, ErrorFields | None], None]
    ) -> None:
        """Run one parameterised query of pgmux's own (extended protocol) and collect
        its rows; ``done(rows, error)`` at ReadyForQuery."""
        assert self.transport is not None
        rows: Rows = []
        self.relaying = False
        self.error_fields = None
        self.rows = rows
        relay_types = self.stream.interesting
        self.stream.interesting = FETCH_INTERESTING

        def on_ready(status: int) -> None:
            self.on_ready = None
            self.rows = None
            self.stream.interesting = relay_types
            error, self.error_fields = self.error_fields, None
            done(rows, error)

        self.on_ready = on_ready
        self.transport.write(
            messages.parse("", sql)
            + messages.bind("", "", params)
            + messages.execute()
            + messages.SYNC
        )

    def apply_settings(self, wanted: Settings, done: Callable[[ErrorFields | None], None]) -> None:
        """Make this server's session settings equal ``wanted``, then call ``done``."""
        current = dict(self.settings)
        changes = [(name, value) for name, value in wanted if current.get(name) != value]
        wanted_names = {name for name, _ in wanted}
        resets = [name for name in current if name not in wanted_names]
        if not changes and not resets:
            self.settings = wanted
            done(None)
            return
        statements = [f"RESET {_quote_name(name)}" for name in resets]
        if changes:
            calls = ", ".join(
                f"pg_catalog.set_config({_quote_literal(n)}, {_quote_literal(v)}, false)"
                for n, v in changes
            )
            statements.append(f"SELECT {calls}")

        def applied(status: int, error: ErrorFields | None) -> None:
            if error is None:
                self.settings = wanted
                pool = self.pool
                for name, value in changes:
                    spelled = pool.param_names.get(name, name)
                    pool.verified[(name, value)] = self.params.get(spelled)
            done(error)

        self.run_query(";".join(statements), applied)

    def reset_settings(self) -> None:
        """The janitor took this idle server: its settings belong to no connected client
        any more, so return them to the server's defaults and give the server back."""
        self.apply_settings(NO_SETTINGS, self._settings_reset)

    def _settings_reset(self, error: ErrorFields | None) -> None:
        if self.state is SERVER_CLOSED:
            return
        if error is not None:
            self.close(f"resetting session settings failed: {messages.error_summary(error)}")
            return
        if self.doomed is not None:
            self.settle(None)  # closes it, or asks why first
            return
        self.pool.release(self)

    def _refuse_transaction(self, client: ClientConnection, fe: FrontendStream) -> None:
        """Statement mode: a statement left a transaction open. Roll it back, say why."""
        if not fe.idle:
            client.fail(
                ProxyError(
                    "transaction blocks are not allowed in pool_mode statement",
                    sqlstate="0A000",
                    reason="statement_mode_transaction",
                    hint="use pool_mode = transaction for this database or user",
                )
            )
            self.close("transaction opened in statement mode with requests in flight")
            return

        def rolled_back(status: int, error: ErrorFields | None) -> None:
            if self.client is client:
                client.detach()
                client.send_error(
                    ProxyError(
                        "transaction blocks are not allowed in pool_mode statement; "
                        "the transaction was rolled back",
                        sqlstate="0A000",
                        reason="statement_mode_transaction",
                        hint="use pool_mode = transaction for this database or user, "
                        "or run the statements without BEGIN",
                    ),
                    fatal=False,
                )
            self.settle(None)

        self.run_query("ROLLBACK", rolled_back)

    # -- coming back clean ----------------------------------------------------------------

    def settle(
        self,
        fe: FrontendStream | None,
        *,
        reset: bool = False,
        cancel: bool = True,
        discard: bool = False,
    ) -> None:
        """Bring an unlinked server back to a clean idle state, then give it back.

        ``fe`` is the stream of a client that left with requests in flight: their
        replies are drained first. Then a pending cancel is waited for, an open
        transaction rolled back, and server_reset_query run (``reset``: session mode)
        or DISCARD ALL (``discard``: a client pinned by session state left).
        """
        self.relaying = False
        if reset:
            self.reset_pending = True
        if discard:
            self.discard_pending = True
        if self.state is SERVER_CLOSED:
            return
        if self.fatal:
            self.close("server reported a fatal error")
            return
        if self.doomed is not None and not self.doubt:
            self.close(self.doomed)
            return
        if fe is not None and fe.mid_message:
            # Part of a message went to the server and the rest never will: the stream
            # cannot be resynchronised, and the server waits for bytes (ignoring cancels).
            self.close("its client left in the middle of a message")
            return
        if fe is not None and not fe.idle:
            self._drain(fe, cancel)
            return
        if self.cancel_pending:
            self.settle_after_cancel = True
            return
        if self.tx_status != codes.TX_IDLE:
            self.run_query("ROLLBACK", self._after_cleanup_query)
            return
        if self.reset_pending or self.discard_pending:
            reset_query = self.registry.config.server_reset_query if self.reset_pending else ""
            if self.discard_pending:
                reset_query = "DISCARD ALL"  # whatever server_reset_query says
            self.reset_pending = self.discard_pending = False
            if reset_query:
                if "ALL" in reset_query.upper():  # DISCARD ALL / RESET ALL
                    self.settings = NO_SETTINGS
                    forget_statements(self, None)
                self.run_query(reset_query, self._after_cleanup_query)
                return
        limit = self.registry.config.max_prepared_statements
        prepared = self.prepared
        if self.stale or (prepared is not None and len(prepared) > limit):
            # Over max_prepared_statements: close the least recently used, now that no
            # portal of a client can depend on them (and statements whose plans went
            # stale).
            closes = evictions(self, limit)
            self.run_messages(closes + messages.SYNC, self._after_cleanup_query)
            return
        if self.doomed is not None:
            self._confirm_read_only()
            return
        self.pool.release(self)

    # -- session state ---------------------------------------------------------------

    def _check_state(self, client: ClientConnection) -> None:
        """The transaction may have changed session state: ask the server what it holds."""
        client.state_check = False
        self.fetch_rows(STATE_QUERY, [], lambda rows, error: self._state_known(client, rows, error))

    def _state_known(self, client: ClientConnection, rows: Rows, error: ErrorFields | None) -> None:
        if self.state is SERVER_CLOSED:
            return
        linked = self.client is client
        if error is not None:
            log.warning(
                "%s: session state check failed (%s); closing the server to be safe",
                self,
                messages.error_summary(error),
            )
            if linked:
                client.detach()
            self.close("session state unknown")
            return
        settings: dict[str, str] = {}
        reasons: set[str] = set()
        for row in rows:
            kind = row[0]
            if kind == b"s" and row[1] is not None and row[2] is not None:
                settings[row[1].decode().lower()] = row[2].decode("utf-8", "replace")
            elif kind == SESSION_USER:
                if (row[1] or b"").decode() != self.pool.settings.server_user:
                    reasons.add(SESSION_AUTHORIZATION_REASON)
            elif kind is not None and kind in REASONS:
                reasons.add(REASONS[kind])
        if client.loaded:
            reasons.add(LOAD_REASON)
        if not linked:
            # The client left during the check: clean whatever cannot be replayed.
            self.settle(None, reset=bool(reasons))
            return
        pool = self.pool
        self.settings = pool.intern(tuple(sorted(settings.items())))
        # As in PostgreSQL, what the client gave at startup is what RESET returns to.
        wanted = dict(client.startup_settings)
        wanted.update(settings)
        client.settings = pool.intern(tuple(sorted(wanted.items())))
        if not reasons:
            client.unpin(self)
            client.detach()
            self.settle(None)
            return
        client.pin(self, sorted(reasons))
        if client.settings is self.settings:
            client.relay_pending(self)
            return

        def reapplied(error: ErrorFields | None) -> None:
            if self.client is client:
                client.relay_pending(self)
            else:
                self.settle(None, discard=True)

        self.apply_settings(client.settings, reapplied)

    def _after_cleanup_query(self, status: int, error: ErrorFields | None) -> None:
        if error is not None or status != codes.TX_IDLE:
            summary = messages.error_summary(error) if error else f"status {chr(status)}"
            self.close(f"cleanup query failed: {summary}")
            return
        self.settle(None)

    def _drain(self, fe: FrontendStream, cancel: bool) -> None:
        """The client left mid-request: finish what it started, swallowing replies.

        Requests still running are cancelled, unless the client ended with Terminate:
        then, as with PostgreSQL itself, what it sent runs to completion.
        """
        assert self.transport is not None
        in_flight = bool(fe.requests) or fe.extended_open
        if fe.copy_in:
            self._fail_copy(fe)
        elif fe.extended_open:
            # Close the client's half-sent batch so the server answers with ReadyForQuery.
            self.transport.write(messages.SYNC)
            fe.requests.append(REQ_SYNC)
            fe.extended_open = False
        if in_flight and cancel:
            self.forward_cancel()
        self.drain_fe = fe
        self.on_ready = self._drain_ready
        timeout = self.registry.config.cancel_wait_timeout or 10.0
        self.timer = self.registry.loop.call_later(timeout, self._drain_timed_out, timeout)

    def _fail_copy(self, fe: FrontendStream) -> None:
        assert self.transport is not None
        if not fe.copy_in:
            fe.on_copy_in_response()
        self.transport.write(messages.copy_fail("client disconnected during COPY"))
        if fe.copy_in_extended:
            self.transport.write(messages.SYNC)
            fe.requests.append(REQ_SYNC)
        fe.copy_in = False

    def _drain_ready(self, status: int) -> None:
        fe = self.drain_fe
        assert fe is not None
        fe.on_ready_for_query()
        if fe.idle:
            self.drain_fe = None
            self.on_ready = None
            self.error_fields = None
            self._cancel_timer()
            self.settle(None)

    def _drain_timed_out(self, timeout: float) -> None:
        self.timer = None
        self.close(f"left behind by its client and still busy after {timeout:g} s")

    def copy_ended(self) -> None:
        """The client finished a COPY FROM STDIN the server had already failed."""
        client = self.client
        if (
            client is not None
            and self.relaying
            and self.tx_status == codes.TX_IDLE
            and self.pool.mode != "session"
        ):
            client.detach()
            self.settle(None)

    # -- cancel ---------------------------------------------------------------------------

    def forward_cancel(self) -> None:
        """Ask PostgreSQL to cancel whatever this server connection is running.

        The server is not handed to anyone else until the cancel connection is done,
        so a late cancel cannot hit the next client's query.
        """
        self.cancel_pending += 1
        self.registry.loop.create_task(self._send_cancel())

    async def _send_cancel(self) -> None:
        host, port = self.host, self.port  # the host this connection is on
        timeout = self.registry.config.cancel_wait_timeout or 10.0
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                if host.startswith("/"):
                    path = f"{host}/.s.PGSQL.{port}"
                    reader, writer = await asyncio.open_unix_connection(path)
                else:
                    reader, writer = await asyncio.open_connection(host, port)
                    if self.used_tls:
                        await self._cancel_over_tls(reader, writer)
                writer.write(messages.cancel_request(self.backend_pid, self.backend_key))
                await writer.drain()
                await reader.read()  # PostgreSQL closes the connection once it is done
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.warning("%s: forwarding cancel request failed: %s", self, exc)
        finally:
            if writer is not None:
                writer.close()
            self.cancel_pending -= 1
            if not self.cancel_pending and self.settle_after_cancel:
                self.settle_after_cancel = False
                self.settle(None)

    async def _cancel_over_tls(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The cancel key is a secret: send it encrypted when the session itself was."""
        context = self.registry.server_tls
        assert context is not None
        writer.write(messages.SSL_REQUEST)
        await writer.drain()
        answer = await reader.readexactly(1)
        if answer != b"S":
            raise OSError(f"server answered SSLRequest for the cancel with {answer!r}")
        await writer.start_tls(context, server_hostname=self.host)

    # -- flow control -----------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.write_paused = True
        client = self.client
        if client is not None:
            client.pause_reading(2)

    def resume_writing(self) -> None:
        self.write_paused = False
        client = self.client
        if client is not None:
            client.resume_reading(2)

    def pause_reading(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None:
                self.transport.resume_reading()

    # -- closing ----------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Close this server connection; idempotent. A linked client is told: its
        session goes on where it can (server_loss.py), else it closes."""
        if self.state is SERVER_CLOSED:
            return
        log.info("%s: closing: %s", self, reason)
        client = self.client
        outlived = client is not None and may_outlive(client, self)
        self._cancel_timer()
        self.relaying = False
        callback, self.on_ready = self.on_ready, None
        self.pool.server_closed(self)
        if client is not None and outlived:
            self.client = None
            outlive_server(client, self, reason)
        elif client is not None:
            self.client = None
            client.server_lost(
                ServerConnectionLost(
                    f'server connection for pool "{self.pool.name}" closed: {reason}',
                    hint="the transaction in flight is lost; reconnect and retry it",
                ),
                # After a FATAL the client knows; mid-message, an error cannot be framed.
                already_told=self.fatal or self.stream.mid_message,
            )
        self._close_transport()
        if callback is not None:
            # pgmux's own query was in flight: end it with an error, not silence.
            self.error_fields = {
                "S": "FATAL",
                "V": "FATAL",
                "C": "08006",
                "M": f"server connection closed: {reason}",
            }
            callback(codes.TX_FAILED)

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self.login is None:
                transport.write(messages.TERMINATE)  # a polite goodbye once logged in
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not SERVER_CLOSED:
            why = f"server closed the connection ({exc})" if exc else "server closed the connection"
            if self.state is SERVER_LOGIN:
                self.login_failed(
                    ServerLoginFailed(
                        f'server login failed for pool "{self.pool.name}": {why}',
                        hint="PostgreSQL restarting or crashing does this; otherwise its log "
                        "says why",
                        sqlstate="08006",  # connection_failure: tried again at once
                    )
                )
            else:
                log.info("%s: %s", self, why)
                self.close(why)


def _quote_literal(text: str) -> str:
    # E'' strings read the same whatever standard_conforming_strings says.
    if "\\" in text:
        return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + text.replace("'", "''") + "'"


def _quote_name(name: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))
