"""Pools of server connections, the queue of clients waiting for one, and the registry.

This is the one place where connections move between lists and change state (like
PgBouncer's objects.c): a server is CONNECTING/LOGIN, IDLE in ``Pool.idle``, ACTIVE
while linked to a client, or CLOSED; a client is LOGIN, IDLE (logged in, no server),
WAITING in ``Pool.waiters``, ACTIVE (linked), or CLOSED. Connection code asks the pool
to make a move; it does not shuffle lists itself. Live control lands here too: PAUSE
(no server is handed out, released ones close), generations (RELOAD and RECONNECT:
servers of an older one close as they come back) and new settings from a reload.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .config import Config, DatabaseConfig, worker_share
from .errors import ProxyError, QueryWaitTimeout, ServerUnreachable
from .prepared import StatementNames
from .stats import PoolStats
from .users import Credential, SecretCache, static_credential

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("pgmux.pool")

Settings = tuple[tuple[str, str], ...]
"""A client's session settings: sorted ``(lowercase name, value)`` pairs, interned."""

NO_SETTINGS: Settings = ()

# BackendKeyData's process id is an Int32; pgmux's made-up ones are positive.
PID_LIMIT = 2**31
RANDOM_CHUNK = 4096


class ServerState(enum.Enum):
    CONNECTING = "connecting"  # TCP connect in progress; counted in Pool.connecting
    LOGIN = "login"  # logging in; in Pool.servers
    IDLE = "idle"  # logged in, in Pool.idle
    ACTIVE = "active"  # linked to a client (or running pgmux's own reset/settings)
    CLOSED = "closed"


# Server login failures that mean "not now" rather than "not like this": 57P03
# (cannot_connect_now: starting up, shutting down, in recovery) and 08006 (the
# connection closed during the login, as in a restart or crash).
TRANSIENT = frozenset(("57P03", "08006"))

# Each server retires after server_lifetime less a random part of up to this fraction,
# drawn when it connects: servers opened together (a pool filled in a burst) do not all
# reconnect in the same moment. PgBouncer has no jitter.
LIFETIME_JITTER = 0.1


def lifetime_end(created_at: float, lifetime: float) -> float:
    """When a server created at ``created_at`` retires (``inf``: server_lifetime = 0)."""
    if not lifetime:
        return float("inf")
    return created_at + lifetime * (1.0 - LIFETIME_JITTER * random.random())


class ClientState(enum.Enum):
    LOGIN = "login"  # startup and authentication
    IDLE = "idle"  # logged in, holds no server
    WAITING = "waiting"  # in Pool.waiters, wants a server
    ACTIVE = "active"  # linked to a server
    ADMIN = "admin"  # logged in to the admin console; never holds a server
    CLOSED = "closed"


class PooledServer(Protocol):
    """What the pool needs of a server connection."""

    state: ServerState
    settings: Settings
    created_at: float
    retire_at: float  # server_lifetime, jittered: see lifetime_end
    idle_since: float
    generation: int

    def close(self, reason: str) -> None: ...

    def reset_settings(self) -> None: ...


class PooledClient(Protocol):
    """What the pool needs of a client connection."""

    state: ClientState
    wait_started: float

    def assign_server(self, server: Any) -> None: ...

    def fail_wait(self, error: ProxyError) -> None: ...

    def wait_expired(self, error: ProxyError) -> None: ...


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Everything about a pool that comes from configuration."""

    database: DatabaseConfig
    user: str
    server_user: str
    pool_mode: str
    pool_size: int
    min_pool_size: int

    @property
    def name(self) -> str:
        return f"{self.database.name}/{self.user}"


class Pool:
    """Server connections for one (database, user), and the clients queued for them."""

    def __init__(
        self,
        settings: PoolSettings,
        config: Config,
        open_server: Callable[[Pool], None],
        stats: PoolStats | None = None,
    ) -> None:
        self.name = settings.name
        self.mode = settings.pool_mode
        self._configure(settings, config)
        self._open_server = open_server
        # Counters for SHOW STATS and /metrics; a pool replaced by a reload hands its
        # own to its successor, so totals never go backwards.
        self.stats = stats if stats is not None else PoolStats()
        self.generation = 0  # RELOAD/RECONNECT: servers of an older one are closed
        self.paused = False  # PAUSE: no server is handed out; released ones close
        # Paused, or servers of an older generation remain: release() looks closer.
        self.draining = False
        self.retired = False  # replaced by a reload; serves its clients until they go
        self.client_count = 0  # logged-in clients of this pool (a retired pool's last)
        self.queue_logged_at = 0.0  # the janitor's rate limit for the "who holds it" line
        self.idle: deque[PooledServer] = deque()
        self.servers: set[PooledServer] = set()
        self.connecting = 0  # TCP connects in progress (not yet in servers)
        self.logging_in = 0  # in servers, login in progress
        self.waiters: deque[PooledClient] = deque()
        self.n_waiting = 0
        # Learned from the first server login: what clients are told at login.
        self.params: dict[str, str] | None = None
        self.param_names: dict[str, str] = {}  # lowercase -> the server's spelling
        # (name, value) settings a server accepted, with the value it reported back.
        self.verified: dict[tuple[str, str], str | None] = {}
        self._interned: dict[Settings, Settings] = {NO_SETTINGS: NO_SETTINGS}
        self.last_error: ProxyError | None = None
        self.last_error_at = 0.0
        self.welcome_cache: dict[Settings, bytes] = {}
        # The secret pgmux logs in to the server with (see users.SecretCache for how a
        # SCRAM secret alone can do it).
        self.server_credential: Credential | None = None
        # server_tls_sslmode = allow: plain first; TLS once the server demanded it.
        self.tls_fallback = False

    def __repr__(self) -> str:
        return f"<Pool {self.name} {len(self.servers)}+{self.connecting}/{self.size}>"

    def _configure(self, settings: PoolSettings, config: Config) -> None:
        self.settings = settings
        self.config = config
        self.size = settings.pool_size
        user = settings.user
        self.query_wait_timeout = config.timeout_for("query_wait_timeout", user)
        self.client_idle_timeout = config.timeout_for("client_idle_timeout", user)
        self.idle_transaction_timeout = config.timeout_for("idle_transaction_timeout", user)
        self.query_timeout = config.timeout_for("query_timeout", user)
        self.transaction_timeout = config.timeout_for("transaction_timeout", user)

    # -- live control ----------------------------------------------------------------

    def reconfigure(self, settings: PoolSettings, config: Config, *, new_servers: bool) -> None:
        """A reload's settings for this pool. ``new_servers``: how pgmux reaches or logs
        in to the server changed, so servers of the old settings are replaced."""
        lifetime = self.config.server_lifetime
        self._configure(settings, config)
        if config.server_lifetime != lifetime:
            for server in self.servers:
                server.retire_at = lifetime_end(server.created_at, config.server_lifetime)
        if new_servers:
            self.new_generation("the configuration changed (RELOAD)")
        excess = len(self.servers) - self.size
        for server in list(self.idle):
            if excess <= 0:
                break
            server.close(f"pool_size lowered to {self.size} (RELOAD)")
            excess -= 1
        # Busy servers beyond the new size close as they are released, not reused.
        self._update_draining()
        self._dispatch()

    def new_generation(self, why: str) -> None:
        """Servers from now on are a new generation; idle ones of the old close now,
        busy ones when they are released (RECONNECT, or a reload changed the server)."""
        self.generation += 1
        self.last_error = None  # new settings: the old failure says nothing about them
        for server in list(self.idle):
            server.close(why)
        self._update_draining()
        self._dispatch()

    def set_paused(self, paused: bool) -> None:
        """PAUSE: transactions running finish, new requests wait in the queue, and every
        server closes once released (so PostgreSQL can restart); RESUME undoes it."""
        if paused == self.paused:
            return
        self.paused = paused
        self._update_draining()
        if paused:
            for server in list(self.idle):
                server.close("pool paused (PAUSE)")
        else:
            self._dispatch()

    def retire(self) -> None:
        """A reload replaced this pool (its pool_mode changed): it serves the clients it
        has, and its servers close once they are gone."""
        self.retired = True
        self._update_draining()

    def old_servers(self) -> int:
        """Servers of an older generation still open (SHOW SERVERS close_needed)."""
        return sum(1 for server in self.servers if server.generation != self.generation)

    def _update_draining(self) -> None:
        self.draining = (
            self.paused
            or self.retired
            or self.old_servers() > 0
            or len(self.servers) > self.size  # pool_size lowered while servers were busy
        )

    def _close_released(self, server: PooledServer) -> bool:
        """While draining: close a released server that must not be reused (True)."""
        if self.paused:
            server.close("pool paused (PAUSE): servers close as they are released")
        elif self.retired and not self.client_count:
            server.close("its pool was replaced by a reload (pool_mode changed)")
        elif server.generation != self.generation:
            server.close("the configuration changed (RELOAD or RECONNECT)")
        elif len(self.servers) > self.size:
            server.close(f"pool_size lowered to {self.size} (RELOAD or SET)")
        else:
            return False
        return True

    # -- settings ------------------------------------------------------------------

    def intern(self, settings: Settings) -> Settings:
        """One shared tuple per distinct settings, so equal settings compare by identity."""
        found = self._interned.get(settings)
        if found is not None:
            return found
        if len(self._interned) > 10000:
            self._interned.clear()
            self._interned[NO_SETTINGS] = NO_SETTINGS
        self._interned[settings] = settings
        return settings

    def cache_welcome(self, settings: Settings, welcome: bytes) -> None:
        """Remember the login reply for clients with these settings (bounded)."""
        if len(self.welcome_cache) > 1000:
            self.welcome_cache.clear()
        self.welcome_cache[settings] = welcome

    def learn_params(self, params: dict[str, str]) -> None:
        if self.params is None:
            self.params = dict(params)
            self.param_names = {name.lower(): name for name in params}

    # -- servers -------------------------------------------------------------------

    def acquire(self, client: PooledClient) -> PooledServer | None:
        """An idle server for ``client`` now, or None with the client queued (FIFO)."""
        if self.idle and not self.n_waiting:
            server = self.idle.pop()  # LIFO: the most recently used server is warmest
            server.state = ServerState.ACTIVE
            client.state = ClientState.ACTIVE
            self.stats.server_assignments += 1
            return server
        client.state = ClientState.WAITING
        client.wait_started = time.monotonic()
        self.waiters.append(client)
        self.n_waiting += 1
        self._dispatch()
        return None

    def leave_queue(self, client: PooledClient) -> None:
        """A waiting client gave up (disconnected); it is skipped when its turn comes."""
        if client.state is ClientState.WAITING:
            client.state = ClientState.IDLE
            self.n_waiting -= 1

    def release(self, server: PooledServer) -> None:
        """A clean server comes back: straight to the longest waiter, else idle."""
        if server.state is ServerState.CLOSED:
            return
        if self.draining and self._close_released(server):
            return
        now = time.monotonic()
        if now > server.retire_at and not self.n_waiting:
            server.close(f"server_lifetime of {self.config.server_lifetime:g} s reached")
            return
        waiter = self._next_waiter()
        if waiter is not None:
            server.state = ServerState.ACTIVE
            waiter.state = ClientState.ACTIVE
            stats = self.stats
            stats.server_assignments += 1
            stats.count_wait(now - waiter.wait_started)
            waiter.assign_server(server)
            return
        server.state = ServerState.IDLE
        server.idle_since = now
        self.idle.append(server)

    def _next_waiter(self) -> PooledClient | None:
        waiters = self.waiters
        while waiters:
            client = waiters.popleft()
            if client.state is ClientState.WAITING:
                self.n_waiting -= 1
                return client
        return None

    def server_connecting(self) -> None:
        self.connecting += 1

    def server_connected(self, server: PooledServer) -> None:
        self.connecting -= 1
        self.logging_in += 1
        server.state = ServerState.LOGIN
        server.retire_at = lifetime_end(server.created_at, self.config.server_lifetime)
        self.servers.add(server)

    def server_logged_in(self, server: PooledServer) -> None:
        self.logging_in -= 1
        self.last_error = None
        self.release(server)

    def _forget(self, server: PooledServer) -> None:
        if server.state is ServerState.LOGIN:
            self.logging_in -= 1
        elif server.state is ServerState.IDLE:
            with contextlib.suppress(ValueError):
                self.idle.remove(server)
        server.state = ServerState.CLOSED
        self.servers.discard(server)
        if self.draining:
            self._update_draining()

    def server_closed(self, server: PooledServer) -> None:
        """A server connection ended, for whatever reason; forget it."""
        self._forget(server)
        self._dispatch()

    def connect_failed(self, error: ProxyError) -> None:
        """A TCP connect for this pool failed (it was counted in ``connecting``)."""
        self.connecting -= 1
        self._record_failure(error)

    def login_failed(self, server: PooledServer, error: ProxyError) -> None:
        """A server connected but could not log in; it is gone."""
        if server.state is ServerState.CLOSED:
            return
        self._forget(server)
        self._record_failure(error)

    def retry_with_tls(self, server: PooledServer) -> None:
        """server_tls_sslmode = allow and the server refused a plain login: the next
        connections use TLS, and this failure is not reported to anyone."""
        self.tls_fallback = True
        self._forget(server)
        self._dispatch()

    def _record_failure(self, error: ProxyError) -> None:
        """When no server is left to serve the queue, waiting clients get the error now
        rather than a timeout later. No new attempt starts here: the next client, a
        closing server or the janitor starts one, so a dead server is not hammered."""
        self.last_error = error
        self.last_error_at = time.monotonic()
        if not self.servers and not self.connecting:
            # Nobody left who could serve the queue (a server still logging in counts).
            while (client := self._next_waiter()) is not None:
                client.state = ClientState.IDLE
                client.fail_wait(error)

    def _dispatch(self) -> None:
        """Open server connections while clients wait and the pool has room."""
        while (
            self.n_waiting > self.connecting + self.logging_in
            and len(self.servers) + self.connecting < self.size
            and not self.paused
            and not self._retry_blocked()
        ):
            self.connecting += 1
            self._open_server(self)

    def _retry_blocked(self) -> bool:
        """After a failed login, wait server_login_retry before hammering the server.
        Not after an outage: a server that cannot be reached, closed the connection
        during the login, or is starting up or shutting down (57P03) is tried again at
        once, so a restart of PostgreSQL costs clients its own length, not 15 s."""
        error = self.last_error
        if error is None or isinstance(error, ServerUnreachable) or error.sqlstate in TRANSIENT:
            return False
        return time.monotonic() - self.last_error_at < self.config.server_login_retry

    def login_retry_error(self) -> ProxyError | None:
        """The cached login error, while no new attempt is allowed and no server is up."""
        if self.servers or self.connecting or not self._retry_blocked():
            return None
        return self.last_error

    # -- timeouts (called by the janitor) -----------------------------------------------

    def expire_waiters(self, now: float) -> None:
        timeout = self.query_wait_timeout
        if not timeout:
            return
        waiters = self.waiters
        while waiters:
            client = waiters[0]
            if client.state is not ClientState.WAITING:
                waiters.popleft()
                continue
            waited = now - client.wait_started
            if waited < timeout:
                return
            waiters.popleft()
            self.n_waiting -= 1
            client.state = ClientState.IDLE
            busy = len(self.servers)
            client.wait_expired(
                QueryWaitTimeout(
                    f'pool "{self.name}" exhausted: {busy} of {self.size} server connections '
                    f"busy, waited {waited:.1f} s (query_wait_timeout)",
                    hint="raise pool_size or query_wait_timeout, or shorten the "
                    "transactions that hold server connections",
                )
            )

    def close_idle_servers(self, now: float) -> None:
        idle_timeout = self.config.server_idle_timeout
        lifetime = self.config.server_lifetime
        keep = self.settings.min_pool_size
        for server in list(self.idle):
            if len(self.servers) <= keep:
                return
            if idle_timeout and now - server.idle_since > idle_timeout:
                server.close(f"server_idle_timeout of {idle_timeout:g} s reached")
            elif now > server.retire_at:
                server.close(f"server_lifetime of {lifetime:g} s reached")

    def take_stale_settings(self, live: set[int]) -> list[PooledServer]:
        """Idle servers still holding settings that no connected client has (``live``:
        ids of the clients' settings tuples), taken out of the idle list to be reset."""
        stale = [s for s in self.idle if s.settings and id(s.settings) not in live]
        for server in stale:
            self.idle.remove(server)
            server.state = ServerState.ACTIVE
        return stale

    def retry_dispatch(self) -> None:
        """Try again to open servers for clients still queued (after failures)."""
        self._dispatch()

    def fill_min_pool(self) -> None:
        if self.paused or self.retired:
            return
        missing = self.settings.min_pool_size - len(self.servers) - self.connecting
        while missing > 0 and not self._retry_blocked():
            missing -= 1
            self.connecting += 1
            self._open_server(self)


def link(client: Any, server: Any) -> None:
    """Pair a client with a server for a transaction (or a session)."""
    client.server = server
    server.client = client
    client.state = ClientState.ACTIVE
    server.state = ServerState.ACTIVE


def unlink(client: Any, server: Any) -> None:
    """Undo ``link``; the server is then settled and released by its owner."""
    client.server = None
    server.client = None
    server.relaying = False
    if client.state is ClientState.ACTIVE:
        client.state = ClientState.IDLE


class Registry:
    """Everything the running proxy shares: pools, live clients and cancel keys.

    Owned by the App; connections reach shared state only through it. Nothing here is
    module-global, so tests and reloads get a fresh one.
    """

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        *,
        client_tls: ssl.SSLContext | None = None,
        server_tls: ssl.SSLContext | None = None,
        client_tls_cert_hash: bytes | None = None,
        worker: int = 0,
        worker_dir: str = "",
    ) -> None:
        self.config = config
        self.loop = loop
        # With workers = N: this process's index (0..N-1), and the supervisor's private
        # directory holding each worker's cancel socket (see cancel.py).
        self.worker = worker
        self.worker_dir = worker_dir
        self.max_client_conn = self.share(config.max_client_conn)
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients: set[Any] = set()
        self.cancel_keys: dict[int, Any] = {}
        self.shutting_down = False
        # SHUTDOWN WAIT_FOR_CLIENTS: while shutting down, connected clients are still
        # served (their requests get servers) until they leave.
        self.serving_until_clients_leave = False
        self._next_client_id = 0
        self._next_server_id = 0
        self.open_server: Callable[[Pool], None] = _no_server_opener
        # The admin console's session handler, set by the App (the console sits above
        # the client layer): called with a logged-in admin client, returns its handler.
        self.open_admin: Callable[[Any], Any] = _no_admin
        # auth_query lookups (auth_query.AuthQuery), set by the App likewise.
        self.auth_query: Callable[
            [DatabaseConfig, str, Callable[[Credential | None, ProxyError | None], None]], None
        ] = _no_auth_query
        self.secrets = SecretCache()
        self.statement_names = StatementNames()
        # Errors pgmux sent before a client had a pool (login failures and the like),
        # and the admin console's own commands (its "pgbouncer" row in SHOW STATS).
        self.stats = PoolStats()
        self.admin_stats = PoolStats()
        self.listening = False  # set by the App once every listener is open
        # Live control (admin console): PAUSE of everything or of some databases
        # (KILL pauses too), DISABLE of some databases (new logins refused).
        self.paused = False
        self.paused_databases: set[str] = set()
        self.disabled_databases: set[str] = set()
        # Pools replaced by a reload, still serving the clients they had.
        self.retired: list[Pool] = []
        self.started_at = time.time()
        self.salted_password_cache: dict[tuple[bytes, bytes, int], bytes] = {}
        self.mock_key = secrets.token_bytes(32)
        self._random = b""  # see random_bytes
        self._random_pos = 0
        self.client_tls = client_tls
        self.server_tls = server_tls
        # tls-server-end-point channel binding data of pgmux's own certificate, when it
        # can be computed: SCRAM-SHA-256-PLUS is offered to TLS clients only then.
        self.client_tls_cert_hash = client_tls_cert_hash

    def new_client_id(self) -> int:
        """Unique in the whole instance: with workers, id % workers names the worker
        (SHOW CLIENTS, KILL_CLIENT, the C-17 in log lines)."""
        self._next_client_id += 1
        return self._next_client_id * self.config.workers + self.worker

    def new_server_id(self) -> int:
        self._next_server_id += 1
        return self._next_server_id * self.config.workers + self.worker

    def pool_for(self, database: DatabaseConfig, user: str, credential: Credential | None) -> Pool:
        """The pool for (database, user); ``credential`` is what the client logged in
        with, and serves the server login unless the database forces its own user."""
        key = (database.name, user)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = self._new_pool(self._pool_settings(database, user))
        if database.user is None and credential is not None:
            pool.server_credential = credential  # auth_query secrets can change
        return pool

    def _pool_settings(self, database: DatabaseConfig, user: str) -> PoolSettings:
        config = self.config
        return PoolSettings(
            database=database,
            user=user,
            server_user=database.user if database.user is not None else user,
            pool_mode=config.pool_mode_for(database, user),
            pool_size=self.share(config.pool_size_for(database, user)),
            min_pool_size=self.share(config.min_pool_size_for(database), minimum=0),
        )

    def _new_pool(self, settings: PoolSettings, stats: PoolStats | None = None) -> Pool:
        pool = Pool(settings, self.config, self.open_server, stats)
        database = settings.database
        if database.user is not None:
            pool.server_credential = _forced_credential(database)
        pool.set_paused(self.is_paused(database.name))
        return pool

    # -- live control ----------------------------------------------------------------

    def is_paused(self, database: str) -> bool:
        return self.paused or database in self.paused_databases

    def update_pause(self) -> None:
        """Apply the pause state to every pool (after PAUSE, RESUME, KILL)."""
        for pool in self.iter_pools():
            pool.set_paused(self.is_paused(pool.settings.database.name))

    def apply_config(self, config: Config, *, server_tls_changed: bool = False) -> list[str]:
        """Run with a reloaded config from now on; what changed, for the log.

        Pools get their new sizes and timeouts at once. Pools whose server (address,
        database, login or TLS) changed get a new generation: their servers are
        replaced as they come back. A pool whose pool_mode changed is replaced by a new
        one for clients logging in from now on; the old one serves its clients until
        they leave. Pools of databases no longer configured serve the clients they
        have; new logins to those databases are refused.
        """
        old = self.config
        self.config = config
        self.max_client_conn = self.share(config.max_client_conn)
        changes = []
        for key, pool in list(self.pools.items()):
            database = config.databases.get(key[0])
            if database is None:
                continue
            settings = self._pool_settings(database, key[1])
            old_settings = pool.settings
            if settings.pool_mode != old_settings.pool_mode:
                pool.retire()
                self.retired.append(pool)
                self.pools[key] = replacement = self._new_pool(settings, pool.stats)
                replacement.server_credential = pool.server_credential
                changes.append(
                    f"pool {pool.name}: pool_mode {old_settings.pool_mode} -> "
                    f"{settings.pool_mode} for new clients"
                )
                continue
            new_servers = server_tls_changed or _server_changed(old_settings.database, database)
            user = key[1]
            if database.user is None:
                before, after = static_credential(old, user), static_credential(config, user)
                if (before and before.secret) != (after and after.secret):
                    new_servers = True
                    if after is not None and after.secret is not None:
                        pool.server_credential = after
            elif new_servers:
                pool.server_credential = _forced_credential(database)
            if settings.pool_size != old_settings.pool_size:
                changes.append(
                    f"pool {pool.name}: pool_size {old_settings.pool_size} -> {settings.pool_size}"
                )
            if new_servers:
                changes.append(f"pool {pool.name}: server settings changed, reconnecting")
            pool.reconfigure(settings, config, new_servers=new_servers)
        for pool in self.retired:
            pool._configure(pool.settings, config)
        return changes

    def forget_retired(self) -> None:
        """Retired pools whose last client has left: close their idle servers, and drop
        them once no server is left."""
        for pool in self.retired:
            if not pool.client_count:
                for server in list(pool.idle):
                    server.close("its pool was replaced by a reload (pool_mode changed)")
        self.retired = [p for p in self.retired if p.client_count or p.servers or p.connecting]

    def share(self, total: int, minimum: int = 1) -> int:
        """This worker's part of a configured limit (all of it without workers)."""
        return worker_share(total, self.worker, self.config.workers, minimum)

    def register_cancel_key(self, client: Any) -> tuple[int, int]:
        """A fresh (pid, key) for a client. Pids are random and unique among this
        worker's live clients, and pid % workers is this worker's index: a CancelRequest
        can land on any worker, and this is how it finds the one holding the client."""
        keys = self.cancel_keys
        workers = self.config.workers
        while True:
            draw = int.from_bytes(self.random_bytes(8))
            pid = (draw >> 32) % (PID_LIMIT // workers) * workers + self.worker
            if pid and pid not in keys:
                break
        keys[pid] = client
        return pid, draw & 0xFFFFFFFF

    def random_bytes(self, n: int) -> bytes:
        """``n`` bytes from the OS's CSPRNG (cancel keys, SCRAM nonces), read
        RANDOM_CHUNK at a time: one getrandom() per few hundred logins, not three each.
        Each worker is its own process with its own Registry, so none share bytes."""
        pos = self._random_pos
        if pos + n > len(self._random):
            self._random = os.urandom(max(RANDOM_CHUNK, n))
            pos = 0
        self._random_pos = pos + n
        return self._random[pos : pos + n]

    def iter_pools(self) -> Iterator[Pool]:
        """The pools, and those retired by a reload that still serve their clients."""
        return iter([*self.pools.values(), *self.retired])


def _forced_credential(database: DatabaseConfig) -> Credential:
    """The login a ``[databases]`` entry with its own user forces on every pool of it."""
    assert database.user is not None
    return Credential(database.user, database.password, f"[databases.{database.name}]")


def _server_changed(old: DatabaseConfig, new: DatabaseConfig) -> bool:
    return (old.host, old.port, old.dbname, old.user, old.password) != (
        new.host,
        new.port,
        new.dbname,
        new.user,
        new.password,
    )


def _no_server_opener(pool: Pool) -> None:
    raise RuntimeError("Registry.open_server was not set by the App")


def _no_admin(client: Any) -> Any:
    raise RuntimeError("Registry.open_admin was not set by the App")


def _no_auth_query(
    database: DatabaseConfig,
    user: str,
    done: Callable[[Credential | None, ProxyError | None], None],
) -> None:
    raise RuntimeError("Registry.auth_query was not set by the App")
