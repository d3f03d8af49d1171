"""Pools of server connections, the queue of clients waiting for one, and the registry.

This is the one place where connections move between lists and change state (like
PgBouncer's objects.c): a server is CONNECTING/LOGIN, IDLE in ``Pool.idle``, TESTED
(server_check_query), ACTIVE while linked to a client, or CLOSED; a client is LOGIN,
IDLE (logged in, no server), WAITING in ``Pool.waiters``, ACTIVE (linked), or CLOSED.
Connection code asks the pool to make a move; it does not shuffle lists itself. Live
control lands here too: PAUSE (no server is handed out, released ones close),
generations (RELOAD and RECONNECT: servers of an older one close as they come back) and
new settings from a reload.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .config import CHECK_EMPTY_QUERY, Config, DatabaseConfig, worker_share
from .errors import (
    DatabaseClientLimit,
    ProxyError,
    QueryWaitTimeout,
    ServerUnreachable,
    UserClientLimit,
)
from .limits import ServerLimit
from .prepared import StatementNames
from .stats import PoolStats
from .users import Credential, SecretCache, static_credential

if TYPE_CHECKING:
    import asyncio

    from .hosts import HostList

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
    TESTED = "tested"  # running server_check_query for the queue; counted in Pool.testing
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
    # In a transaction block that failed when its server was lost: holds no server,
    # pgmux answers it as PostgreSQL answers an aborted block, until it ends the block.
    FAILED = "failed"
    ADMIN = "admin"  # logged in to the admin console; never holds a server
    CLOSED = "closed"


# The states as module-level names, for code on the relay's path: in Python 3.11 an enum
# member read through its class costs about 70 ns, a global name about 4.
SERVER_CONNECTING = ServerState.CONNECTING
SERVER_LOGIN = ServerState.LOGIN
SERVER_IDLE = ServerState.IDLE
SERVER_ACTIVE = ServerState.ACTIVE
SERVER_TESTED = ServerState.TESTED
SERVER_CLOSED = ServerState.CLOSED
CLIENT_LOGIN = ClientState.LOGIN
CLIENT_IDLE = ClientState.IDLE
CLIENT_WAITING = ClientState.WAITING
CLIENT_ACTIVE = ClientState.ACTIVE
CLIENT_FAILED = ClientState.FAILED
CLIENT_ADMIN = ClientState.ADMIN
CLIENT_CLOSED = ClientState.CLOSED


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

    def check(self, query: str, timeout: float) -> None: ...


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
    reserve_pool_size: int = 0

    @property
    def name(self) -> str:
        return f"{self.database.name}/{self.user}"


class Pool:
    """Server connections for one (database, user), and the clients queued for them."""

    # Slots: the relay reads a pool's attributes on every transaction, and slot access
    # is the fastest (more than 30 attributes also end CPython's shared-key dicts).
    __slots__ = (
        "_interned",
        "_open_server",
        "cap",
        "check_before",
        "check_query",
        "client_count",
        "client_idle_timeout",
        "config",
        "connecting",
        "draining",
        "generation",
        "hosts",
        "idle",
        "idle_transaction_timeout",
        "in_reserve",
        "last_error",
        "last_error_at",
        "limits",
        "logging_in",
        "mode",
        "n_waiting",
        "name",
        "param_names",
        "params",
        "paused",
        "query_timeout",
        "query_wait_timeout",
        "queue_logged_at",
        "reserve",
        "reserve_timeout",
        "retired",
        "round_robin",
        "server_credential",
        "servers",
        "settings",
        "shrink_reason",
        "size",
        "stats",
        "testing",
        "tls_fallback",
        "transaction_timeout",
        "verified",
        "waiters",
        "welcome_cache",
    )

    def __init__(
        self,
        settings: PoolSettings,
        config: Config,
        open_server: Callable[[Pool], None],
        stats: PoolStats | None = None,
    ) -> None:
        self.name = settings.name
        self.mode = settings.pool_mode
        self.idle: deque[PooledServer] = deque()
        # reserve_pool_size: the pool may grow by that much once a client has waited
        # reserve_pool_timeout; ``cap`` is the size it may grow to now.
        self.in_reserve = False
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
        # Why servers beyond ``cap`` close as they are released (see _close_released).
        self.shrink_reason = ""
        # max_db_connections and max_user_connections this pool counts against (set by
        # the Registry; each a ServerLimit shared with the other pools under it).
        self.limits: tuple[ServerLimit, ...] = ()
        self.servers: set[PooledServer] = set()
        self.connecting = 0  # TCP connects in progress (not yet in servers)
        self.logging_in = 0  # in servers, login in progress
        self.testing = 0  # idle servers running server_check_query before being handed out
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
        # The database's hosts and what each did lately (server.py keeps it up to date).
        self.hosts: HostList | None = None

    def __repr__(self) -> str:
        return f"<Pool {self.name} {len(self.servers)}+{self.connecting}/{self.size}>"

    def _configure(self, settings: PoolSettings, config: Config) -> None:
        self.settings = settings
        self.config = config
        self.size = settings.pool_size
        self.reserve = settings.reserve_pool_size
        self.reserve_timeout = config.reserve_pool_timeout
        if not (self.reserve and self.reserve_timeout):
            self.in_reserve = False
        self.cap = self.size + self.reserve if self.in_reserve else self.size
        # acquire takes idle servers from the right: released ones go there (LIFO: the
        # warmest first) or, with server_round_robin, to the left (FIFO: every server
        # used in turn). A branch here costs the relay less than a stored bound method.
        self.round_robin = config.server_round_robin
        user = settings.user
        self.query_wait_timeout = config.timeout_for("query_wait_timeout", user)
        self.client_idle_timeout = config.timeout_for("client_idle_timeout", user)
        self.idle_transaction_timeout = config.timeout_for("idle_transaction_timeout", user)
        self.query_timeout = config.timeout_for("query_timeout", user)
        self.transaction_timeout = config.timeout_for("transaction_timeout", user)
        query = config.server_check_query
        self.check_query = "" if query == CHECK_EMPTY_QUERY else query
        self.update_check_before(time.monotonic())

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
        self.shrink_reason = f"pool_size lowered to {self.size} (RELOAD or SET)"
        excess = len(self.servers) - self.cap
        for server in list(self.idle):
            if excess <= 0:
                break
            server.close(self.shrink_reason)
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
            or len(self.servers) > self.cap  # pool_size lowered while servers were busy
            or self.in_reserve  # reserve servers close once nobody waits
            or any(limit.blocked for limit in self.limits)  # another pool needs a slot
        )

    def _close_released(self, server: PooledServer) -> bool:
        """While draining: close a released server that must not be reused (True)."""
        if self.paused:
            server.close("pool paused (PAUSE): servers close as they are released")
        elif self.retired and not self.client_count:
            server.close("its pool was replaced by a reload (pool_mode changed)")
        elif server.generation != self.generation:
            server.close("the configuration changed (RELOAD or RECONNECT)")
        elif self.in_reserve and not self.n_waiting:
            # The rush is over: back to pool_size, the reserve servers close as released.
            self.in_reserve = False
            self.cap = self.size
            self.shrink_reason = (
                f"reserve pool no longer needed: no client waits (pool_size {self.size})"
            )
            log.info("pool %s: %s", self.name, self.shrink_reason)
            return self._close_released(server)
        elif len(self.servers) > self.cap:
            server.close(self.shrink_reason)
        elif (taker := self._slot_taker()) is not None:
            taker_limit, taker_pool = taker
            server.close(
                f"its slot goes to pool {taker_pool.name}, whose clients wait "
                f"({taker_limit.describe()} reached)"
            )
        else:
            self._update_draining()  # nothing left to do here: the fast path again
            return False
        return True

    def _slot_taker(self) -> tuple[ServerLimit, Pool] | None:
        for limit in self.limits:
            if limit.blocked:
                taker = limit.should_yield(self)
                if taker is not None:
                    return limit, taker
        return None

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
        """An idle server for ``client`` now, or None with the client queued (FIFO).

        An idle server due for server_check_query is checked first, the client queued
        meanwhile: check_passed hands it over as release does.
        """
        if self.idle and not self.n_waiting:
            server = self.idle.pop()  # LIFO, or FIFO with server_round_robin (release)
            if server.idle_since >= self.check_before:
                server.state = SERVER_ACTIVE
                client.state = CLIENT_ACTIVE
                self.stats.server_assignments += 1
                return server
            return self._acquire_due(client, server)
        client.state = CLIENT_WAITING
        client.wait_started = time.monotonic()
        self.waiters.append(client)
        self.n_waiting += 1
        if self.idle:
            self._check_idle()
        self._dispatch()
        return None

    # -- server_check_query ------------------------------------------------------------

    def update_check_before(self, now: float) -> None:
        """Idle servers idle since before ``check_before`` are due for server_check_query
        (SHOW POOLS sv_used). The janitor moves it at each sweep, so acquire compares
        two floats and never reads the clock: a check may come up to a sweep late."""
        delay = self.config.server_check_delay
        if not self.config.server_check_query:
            self.check_before = -math.inf  # checks off
        elif not delay:
            self.check_before = math.inf  # server_check_delay = 0: always
        else:
            self.check_before = now - delay

    def _acquire_due(self, client: PooledClient, server: PooledServer) -> PooledServer | None:
        """acquire took an idle server due for a check. With server_round_robin a more
        recently used one may need none (PgBouncer, too, hands out an idle server that
        needs no check before checking one); else the client waits for a check."""
        idle = self.idle
        if self.round_robin:
            idle.append(server)  # back where it was: the longest idle
            if idle[0].idle_since >= self.check_before:
                server = idle.popleft()
                server.state = SERVER_ACTIVE
                client.state = CLIENT_ACTIVE
                self.stats.server_assignments += 1
                return server
        else:
            idle.append(server)  # the others have been idle longer: due as well
        client.state = CLIENT_WAITING
        client.wait_started = time.monotonic()
        self.waiters.append(client)
        self.n_waiting += 1
        self._check_idle()
        return None

    def _check_idle(self) -> None:
        """Clients wait while idle servers remain only when those were due for a check
        (acquire hands out no other): check one for each client not already waiting
        on a check. A server that fails its check closes and the pool opens a new one
        rather than checking the next: when one idle server died (a firewall dropped
        it, PostgreSQL restarted), the others likely did too."""
        while self.idle and self.n_waiting > self.testing:
            server = self.idle.pop()  # the most recently used: the likeliest alive
            server.state = SERVER_TESTED
            self.testing += 1
            server.check(self.check_query, self.config.server_connect_timeout)

    def check_passed(self, server: PooledServer) -> None:
        """server_check_query answered: the server goes to the longest waiter, as a
        released one does (or back to idle, freshly checked, if nobody waits now)."""
        if server.state is not SERVER_TESTED:
            return
        self.testing -= 1
        server.state = SERVER_ACTIVE
        self.release(server)

    def leave_queue(self, client: PooledClient) -> None:
        """A waiting client gave up (disconnected); it is skipped when its turn comes."""
        if client.state is CLIENT_WAITING:
            client.state = CLIENT_IDLE
            self.n_waiting -= 1

    def release(self, server: PooledServer) -> None:
        """A clean server comes back: straight to the longest waiter, else idle."""
        if server.state is SERVER_CLOSED:
            return
        if self.draining and self._close_released(server):
            return
        now = time.monotonic()
        if now > server.retire_at and not self.n_waiting:
            server.close(f"server_lifetime of {self.config.server_lifetime:g} s reached")
            return
        waiter = self._next_waiter()
        if waiter is not None:
            server.state = SERVER_ACTIVE
            waiter.state = CLIENT_ACTIVE
            stats = self.stats
            stats.server_assignments += 1
            stats.count_wait(now - waiter.wait_started)
            waiter.assign_server(server)
            return
        server.state = SERVER_IDLE
        server.idle_since = now
        if self.round_robin:
            self.idle.appendleft(server)
        else:
            self.idle.append(server)

    def _next_waiter(self) -> PooledClient | None:
        waiters = self.waiters
        while waiters:
            client = waiters.popleft()
            if client.state is CLIENT_WAITING:
                self.n_waiting -= 1
                return client
        return None

    def server_connected(self, server: PooledServer) -> None:
        self.connecting -= 1
        self.logging_in += 1
        server.state = SERVER_LOGIN
        server.retire_at = lifetime_end(server.created_at, self.config.server_lifetime)
        self.servers.add(server)

    def server_logged_in(self, server: PooledServer) -> None:
        self.logging_in -= 1
        self.last_error = None
        self.release(server)

    def _forget(self, server: PooledServer) -> None:
        if server.state is SERVER_LOGIN:
            self.logging_in -= 1
        elif server.state is SERVER_IDLE:
            with contextlib.suppress(ValueError):
                self.idle.remove(server)
        elif server.state is SERVER_TESTED:
            self.testing -= 1  # failed its check: _dispatch opens another for the queue
        server.state = SERVER_CLOSED
        if server in self.servers:
            self.servers.discard(server)
            self._slot_freed()
        if self.draining:
            self._update_draining()

    def _slot_freed(self) -> None:
        """A server of this pool is gone (or its connect failed): the shared limits
        count one less, and a pool blocked on one of them may open a server now."""
        for limit in self.limits:
            limit.count -= 1
            if limit.blocked:
                taker = limit.next_blocked(other_than=self)
                if taker is not None:
                    taker._dispatch()

    def server_closed(self, server: PooledServer) -> None:
        """A server connection ended, for whatever reason; forget it."""
        self._forget(server)
        self._dispatch()

    def connect_failed(self, error: ProxyError) -> None:
        """A TCP connect for this pool failed (it was counted in ``connecting``)."""
        self.connecting -= 1
        self._slot_freed()
        self._record_failure(error)

    def login_failed(self, server: PooledServer, error: ProxyError) -> None:
        """A server connected but could not log in; it is gone."""
        if server.state is SERVER_CLOSED:
            return
        self._forget(server)
        self._record_failure(error)

    def server_moved_on(self, server: PooledServer) -> None:
        """A server connection to one host of a list failed, or was not the kind of
        server target_session_attrs asks for: it is gone, and its attempt goes on with
        another host, counted as connecting again. No failure is recorded yet, and the
        attempt keeps its slot under the shared limits (unlike _forget)."""
        if server.state is SERVER_LOGIN:
            self.logging_in -= 1
        server.state = SERVER_CLOSED
        self.servers.discard(server)
        self.connecting += 1
        if self.draining:
            self._update_draining()

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
                client.state = CLIENT_IDLE
                client.fail_wait(error)

    def _dispatch(self) -> None:
        """Open server connections while clients wait and the pool has room."""
        while (
            self.n_waiting > self.connecting + self.logging_in + self.testing
            and len(self.servers) + self.connecting < self.cap
            and not self.paused
            and not self._retry_blocked()
        ):
            if self.limits and not self._limits_allow():
                return
            self._open()

    def _open(self) -> None:
        self.connecting += 1
        for limit in self.limits:
            limit.count += 1
        self._open_server(self)

    def _limits_allow(self) -> bool:
        """Room under every shared limit, made by closing an idle server of another
        pool if need be; else this pool waits for a slot (False)."""
        for limit in self.limits:
            while limit.full():
                # Not woken by the slot it frees itself: a pool blocked longer gets it.
                limit.blocked.discard(self)
                victim = limit.idle_victim(self)
                if victim is None:
                    self._block(limit)
                    return False
                before = limit.count
                victim.longest_idle().close(
                    f"closed to make room for pool {self.name} ({limit.describe()} reached)"
                )
                if limit.count >= before:  # did not go: never loop on it
                    self._block(limit)
                    return False
        return True

    def longest_idle(self) -> PooledServer:
        """The idle server idle longest (there must be one)."""
        return self.idle[-1] if self.round_robin else self.idle[0]

    def _block(self, limit: ServerLimit) -> None:
        """Wait for a slot under ``limit``; meanwhile its other pools look at every
        release whether to hand a server's slot over (see limits.should_yield)."""
        if self in limit.blocked:
            return
        limit.blocked.add(self)
        log.info(
            "pool %s: clients wait for a server slot: %s reached (%d open); raise it, or "
            "the other pools' servers are handed over as they are released",
            self.name,
            limit.describe(),
            limit.count,
        )
        for pool in limit.pools:
            pool.draining = True

    def oldest_wait(self) -> float | None:
        """When the longest-waiting client of this pool started waiting, if it waits
        for a server that is not already coming."""
        if self.n_waiting <= self.connecting + self.logging_in + self.testing:
            return None
        for client in self.waiters:
            if client.state is CLIENT_WAITING:
                return client.wait_started
        return None

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
            if client.state is not CLIENT_WAITING:
                waiters.popleft()
                continue
            waited = now - client.wait_started
            if waited < timeout:
                return
            waiters.popleft()
            self.n_waiting -= 1
            client.state = CLIENT_IDLE
            client.wait_expired(self._wait_timeout_error(waited))

    def _wait_timeout_error(self, waited: float) -> QueryWaitTimeout:
        busy = len(self.servers)
        shared = next((limit for limit in self.limits if self in limit.blocked), None)
        if shared is not None and busy < self.cap:
            # The pool has room of its own: a limit shared with other pools is the cause.
            return QueryWaitTimeout(
                f'pool "{self.name}" exhausted: {shared.describe()} reached, '
                f"{shared.count} server connections open in {len(shared.pools)} pools, "
                f"waited {waited:.1f} s (query_wait_timeout)",
                hint=f"raise {shared.name} or query_wait_timeout, or shorten the "
                "transactions that hold server connections",
            )
        return QueryWaitTimeout(
            f'pool "{self.name}" exhausted: {busy} of {self.size} server connections '
            f"busy, waited {waited:.1f} s (query_wait_timeout)",
            hint="raise pool_size or query_wait_timeout, or shorten the "
            "transactions that hold server connections",
        )

    def use_reserve(self, now: float) -> None:
        """reserve_pool_size: a client has waited reserve_pool_timeout, so the pool may
        grow by the reserve until nobody waits (called by the janitor)."""
        if self.in_reserve or not self.reserve or not self.reserve_timeout or self.paused:
            return
        started = self.oldest_wait()
        if started is None or now - started < self.reserve_timeout:
            return
        self.in_reserve = True
        self.cap = self.size + self.reserve
        log.info(
            "pool %s: a client has waited %.1f s (reserve_pool_timeout = %g s): growing "
            "by up to %d reserve servers (reserve_pool_size) while clients wait",
            self.name,
            now - started,
            self.reserve_timeout,
            self.reserve,
        )
        self.draining = True  # released servers look whether the rush is over
        self._dispatch()

    def close_idle_servers(self, now: float) -> None:
        idle_timeout = self.config.server_idle_timeout
        lifetime = self.config.server_lifetime
        keep = self.settings.min_pool_size
        for server in list(self.idle):
            if len(self.servers) <= keep:
                return
            if len(self.servers) > self.cap:
                server.close(self.shrink_reason or f"pool over its size of {self.cap}")
            elif idle_timeout and now - server.idle_since > idle_timeout:
                server.close(f"server_idle_timeout of {idle_timeout:g} s reached")
            elif now > server.retire_at:
                server.close(f"server_lifetime of {lifetime:g} s reached")

    def take_stale_settings(self, live: set[int]) -> list[PooledServer]:
        """Idle servers still holding settings that no connected client has (``live``:
        ids of the clients' settings tuples), taken out of the idle list to be reset."""
        stale = [s for s in self.idle if s.settings and id(s.settings) not in live]
        for server in stale:
            self.idle.remove(server)
            server.state = SERVER_ACTIVE
        return stale

    def retry_dispatch(self) -> None:
        """Try again to open servers for clients still queued (after failures)."""
        self._dispatch()

    def fill_min_pool(self) -> None:
        if self.paused or self.retired:
            return
        missing = self.settings.min_pool_size - len(self.servers) - self.connecting
        while missing > 0 and not self._retry_blocked():
            if any(limit.full() for limit in self.limits):
                return  # min_pool_size never takes a slot another pool could need
            missing -= 1
            self._open()


def link(client: Any, server: Any) -> None:
    """Pair a client with a server for a transaction (or a session)."""
    client.server = server
    server.client = client
    client.state = CLIENT_ACTIVE
    server.state = SERVER_ACTIVE


def unlink(client: Any, server: Any) -> None:
    """Undo ``link``; the server is then settled and released by its owner."""
    client.server = None
    server.client = None
    server.relaying = False
    if client.state is CLIENT_ACTIVE:
        client.state = CLIENT_IDLE


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
        # max_db_connections by database, max_user_connections by server login.
        self.server_limits: dict[tuple[str, str], ServerLimit] = {}
        # Logged-in clients by database and by user (max_db/user_client_connections).
        self.db_clients: dict[str, int] = {}
        self.user_clients: dict[str, int] = {}
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
            reserve_pool_size=self.share(config.reserve_pool_size_for(database, user), minimum=0),
        )

    def _new_pool(self, settings: PoolSettings, stats: PoolStats | None = None) -> Pool:
        pool = Pool(settings, self.config, self.open_server, stats)
        database = settings.database
        if database.user is not None:
            pool.server_credential = _forced_credential(database)
        self._attach_limits(pool)
        pool.set_paused(self.is_paused(database.name))
        return pool

    # -- limits shared by pools, and per database or user --------------------------------

    def _server_limit(self, name: str, key: str) -> ServerLimit:
        limit = self.server_limits.get((name, key))
        if limit is None:
            limit = self.server_limits[(name, key)] = ServerLimit(name, key)
            self._set_limit(limit)
        return limit

    def _set_limit(self, limit: ServerLimit) -> None:
        config = self.config
        if limit.name == "max_db_connections":
            database = config.databases.get(limit.key)
            if database is None:
                return  # no longer configured: its pools serve the clients they have
            total = config.db_limit(database, limit.name)
        else:
            total = config.user_limit(limit.key, limit.name)
        limit.limit = self.share(total) if total else 0

    def _attach_limits(self, pool: Pool) -> None:
        """Count ``pool`` against its database's and its server login's limits (moving
        its servers over when a reload changed which ones)."""
        settings = pool.settings
        wanted = (
            self._server_limit("max_db_connections", settings.database.name),
            self._server_limit("max_user_connections", settings.server_user),
        )
        if wanted == pool.limits:
            return
        held = len(pool.servers) + pool.connecting
        for limit in pool.limits:
            limit.count -= held
            limit.pools.remove(pool)
            limit.blocked.discard(pool)
        for limit in wanted:
            limit.count += held
            limit.pools.append(pool)
        pool.limits = wanted

    def _detach_limits(self, pool: Pool) -> None:
        for limit in pool.limits:
            limit.pools.remove(pool)
            limit.blocked.discard(pool)
            if not limit.pools:
                del self.server_limits[(limit.name, limit.key)]
        pool.limits = ()

    def admit_client(self, database: DatabaseConfig, user: str) -> None:
        """A client logs in to ``database`` as ``user``: counted, or refused when
        max_db_client_connections or max_user_client_connections is reached."""
        config = self.config
        name = database.name
        for error, key, counts, total, what, table in (
            (DatabaseClientLimit, name, self.db_clients,
             config.db_limit(database, "max_db_client_connections"), f'database "{name}"',
             f"[databases.{name}]"),
            (UserClientLimit, user, self.user_clients,
             config.user_limit(user, "max_user_client_connections"), f'user "{user}"',
             f"[users.{user}]"),
        ):  # fmt: skip
            count = counts.get(key, 0)
            if total and count >= self.share(total):
                setting = error.reason
                where = (
                    f" in this worker ({setting} = {total} is split between "
                    f"{config.workers} workers)"
                    if config.workers > 1
                    else ""
                )
                raise error(
                    f"too many client connections for {what} ({setting}): {count} of "
                    f"{self.share(total)} in use{where}",
                    hint=f"raise {setting} (globally or in {table}), or close idle clients",
                )
        self.db_clients[name] = self.db_clients.get(name, 0) + 1
        self.user_clients[user] = self.user_clients.get(user, 0) + 1

    def client_left(self, database: str, user: str) -> None:
        """Undo ``admit_client``."""
        for counts, key in ((self.db_clients, database), (self.user_clients, user)):
            left = counts.get(key, 0) - 1
            if left > 0:
                counts[key] = left
            else:
                counts.pop(key, None)

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
            new_servers = (
                server_tls_changed
                or _server_changed(old_settings.database, database)
                # servers chosen for another kind of server (hosts.py) are replaced too
                or old.target_session_attrs_for(old_settings.database)
                != config.target_session_attrs_for(database)
            )
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
            self._attach_limits(pool)
        for pool in self.retired:
            pool._configure(pool.settings, config)
        for limit in list(self.server_limits.values()):
            self._set_limit(limit)
            while not limit.full() and (blocked := limit.next_blocked()) is not None:
                limit.blocked.discard(blocked)  # raised: waiting pools open servers now
                blocked._dispatch()
        return changes

    def forget_retired(self) -> None:
        """Retired pools whose last client has left: close their idle servers, and drop
        them once no server is left."""
        for pool in self.retired:
            if not pool.client_count:
                for server in list(pool.idle):
                    server.close("its pool was replaced by a reload (pool_mode changed)")
        keep = []
        for pool in self.retired:
            if pool.client_count or pool.servers or pool.connecting:
                keep.append(pool)
            else:
                self._detach_limits(pool)
        self.retired = keep

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
