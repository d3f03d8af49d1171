"""Periodic housekeeping: queue timeouts, idle and old servers (and which idle ones are
due for server_check_query), minimum pool sizes, settings left behind by departed
clients, the client timeouts (client_idle_timeout, idle_transaction_timeout,
query_timeout), the stats periods, and the log lines that name who holds a pool (a
queue formed, a client idle in a transaction too long).

Client timeouts are measured by sampling, so the relay never reads the clock for
them: each sweep notes a client's request counters, and a state that persists with
unchanged counters has lasted at least since the sweep that first saw it (±INTERVAL).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from .client import ClientConnection
from .errors import ProxyError
from .pool import ClientState, Pool, Registry
from .protocol import codes
from .snapshot import STATEMENT_CHARS, client_activity, live_totals

log = logging.getLogger("pgmux.janitor")

# Often enough that the timeouts are honoured to within half a second.
INTERVAL = 0.5
# The "who holds the pool" line: once the oldest waiter has waited this long, and at
# most once per QUEUE_LOG_INTERVAL per pool; naming up to QUEUE_LOG_HOLDERS clients.
QUEUE_LOG_AFTER = 1.0
QUEUE_LOG_INTERVAL = 30.0
QUEUE_LOG_HOLDERS = 5


class Janitor:
    """The sweeps of one process, and when its current stats period started."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.period_started = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            try:
                now = time.monotonic()
                sweep(self.registry, now)
                if now - self.period_started >= self.registry.config.stats_period:
                    end_stats_period(self.registry, now - self.period_started)
                    self.period_started = now
            except Exception:  # a bug here must not stop future sweeps
                log.exception("janitor sweep failed")


async def run_janitor(registry: Registry) -> None:
    await Janitor(registry).run()


def sweep(registry: Registry, now: float) -> None:
    config = registry.config
    watch_clients = bool(config.idle_transaction_warn)
    for pool in registry.iter_pools():
        pool.update_check_before(now)
        pool.expire_waiters(now)
        pool.close_idle_servers(now)
        if not registry.shutting_down:
            pool.fill_min_pool()
            pool.use_reserve(now)
            pool.retry_dispatch()
        watch_clients = watch_clients or bool(
            pool.client_idle_timeout
            or pool.idle_transaction_timeout
            or pool.query_timeout
            or pool.transaction_timeout
        )
        if pool.n_waiting and now - pool.queue_logged_at >= QUEUE_LOG_INTERVAL:
            log_queue(registry, pool, now)
        if pool.n_waiting and config.query_wait_notify:
            notify_waiters(pool, now, config.query_wait_notify)
    if watch_clients:
        for client in list(registry.clients):
            check_client(client, now)
    if registry.retired:
        registry.forget_retired()
    if not registry.shutting_down:
        reset_stale_settings(registry)


def end_stats_period(registry: Registry, length: float) -> None:
    """A stats period ended: each pool's counters remember its differences (SHOW
    STATS_AVERAGES). Live clients' counters are part of the totals, as when read."""
    for stats, totals in live_totals(registry).values():
        stats.end_period(totals, length)
    registry.admin_stats.end_period(registry.admin_stats.totals(), length)


def _statement(registry: Registry, client: ClientConnection) -> str:
    if not registry.config.log_statement_text:
        return "(log_statement_text = false)"
    sql = (client.trigger_sql or client.last_sql)[:STATEMENT_CHARS]
    return repr(sql.decode("utf-8", "replace")) if sql else "(none yet)"


def held_for(client: ClientConnection, now: float) -> float:
    """How long the client has held its server: its transaction, else its request,
    else since it was pinned (or, in session mode, since it connected)."""
    if client.xact_since:
        return now - client.xact_since
    if client.busy_since > 0:
        return now - client.busy_since
    return now - (client.pinned_at if client.pinned else client.connected_at)


def log_queue(registry: Registry, pool: Pool, now: float) -> None:
    """The pool has a queue: one line naming who holds its servers, longest first."""
    oldest = next((c for c in pool.waiters if c.state is ClientState.WAITING), None)
    if oldest is None or now - oldest.wait_started < QUEUE_LOG_AFTER:
        return
    pool.queue_logged_at = now
    holders = holding_clients(pool, now)
    described = [
        f"{c} application_name={dict(c.settings).get('application_name', '')!r} "
        f"{client_activity(c)} for {held_for(c, now):.1f} s, last statement "
        f"{_statement(registry, c)}"
        for c in holders[:QUEUE_LOG_HOLDERS]
    ]
    log.warning(
        'pool "%s" has a queue: %d clients waiting (the oldest for %.1f s), %d of %d '
        "server connections busy; holders: %s",
        pool.name,
        pool.n_waiting,
        now - oldest.wait_started,
        len(pool.servers),
        pool.size,
        "; ".join(described) or "none (servers still connecting)",
    )


def notify_waiters(pool: Pool, now: float, after: float) -> None:
    """query_wait_notify: one NOTICE to each client queued ``after`` seconds, per wait.
    The holders are named by client id, application_name and what they do, not by
    address or statement: the notice goes to another client of the same pool."""
    ahead = 0
    holders: str | None = None
    for waiter in pool.waiters:
        client = cast("ClientConnection", waiter)
        if client.state is not ClientState.WAITING:
            continue
        waited = now - client.wait_started
        if waited < after:
            return  # the queue is in arrival order
        if client.notified_wait != client.wait_started:
            client.notified_wait = client.wait_started
            if holders is None:
                holders = _holders(pool, now)
            client.send_notice(
                f'waiting for a server connection for {waited:.0f} s: pool "{pool.name}" '
                f"has {len(pool.servers)} of {pool.size} server connections busy, "
                f"{ahead} clients queued ahead of this one; held by {holders} "
                "(query_wait_notify)",
                hint=f"the request fails after query_wait_timeout "
                f"({pool.query_wait_timeout:g} s); raise pool_size, or shorten the "
                "transactions holding the servers",
            )
        ahead += 1


def holding_clients(pool: Pool, now: float) -> list[ClientConnection]:
    """The clients holding the pool's servers, the longest holder first."""
    holders: list[ClientConnection] = [
        s.client  # type: ignore[attr-defined]
        for s in pool.servers
        if getattr(s, "client", None) is not None
    ]
    holders.sort(key=lambda c: held_for(c, now), reverse=True)
    return holders


def _holders(pool: Pool, now: float) -> str:
    holders = holding_clients(pool, now)
    shown = [
        f"C-{c.id} (application_name {dict(c.settings).get('application_name', '')!r}, "
        f"{client_activity(c)} for {held_for(c, now):.0f} s)"
        for c in holders[:QUEUE_LOG_HOLDERS]
    ]
    more = len(holders) - len(shown)
    return "; ".join(shown) + (f" and {more} more" if more > 0 else "") or "no client yet"


def reset_stale_settings(registry: Registry) -> None:
    """Servers keep a client's settings between its transactions, so that it need not
    replay them each time; once no connected client has those settings, idle servers
    holding them are reset, so a pool at rest has only servers with default values."""
    if not any(s.settings for pool in registry.iter_pools() for s in pool.idle):
        return
    live = {id(client.settings) for client in registry.clients}
    for pool in registry.iter_pools():
        for server in pool.take_stale_settings(live):
            server.reset_settings()


def _transaction_timed_out(client: ClientConnection, now: float, limit: float) -> bool:
    """transaction_timeout: a transaction, explicit or the implicit one of a single
    statement, open longer than ``limit`` ends its client's connection, as PostgreSQL
    17's does; closing rolls it back (a running query is cancelled first)."""
    since = client.xact_since or max(client.busy_since, 0.0)
    if not since or now - since < limit:
        return False
    client.fail(
        ProxyError(
            f"transaction_timeout: in a transaction for {now - since:.0f} s (limit "
            f"{limit:g} s); the transaction was rolled back",
            hint="keep transactions short, or raise transaction_timeout (global or per user)",
            sqlstate="25P04",  # transaction_timeout
            reason="transaction_timeout",
        )
    )
    return True


def check_client(client: ClientConnection, now: float) -> None:
    """Apply the client timeouts of the client's pool to one client."""
    if not client.welcomed or client.state is ClientState.ADMIN:
        return
    pool = client.pool
    fe = client.fe
    server = client.server
    if client.state is ClientState.IDLE:
        condition, limit = "idle", pool.client_idle_timeout
    elif client.state is ClientState.FAILED:  # in a block whose server was lost
        condition, limit = "idle in transaction", pool.idle_transaction_timeout
    elif client.state is not ClientState.ACTIVE or server is None or client.terminating:
        client.watch = None
        return
    elif pool.transaction_timeout and _transaction_timed_out(client, now, pool.transaction_timeout):
        return
    elif fe.requests:
        condition, limit = "query", pool.query_timeout
    elif server.tx_status != codes.TX_IDLE and server.relaying:
        condition, limit = "idle in transaction", pool.idle_transaction_timeout
    elif server.relaying and fe.idle:
        # Session mode: linked between transactions, as idle as a client can be.
        condition, limit = "idle", pool.client_idle_timeout
    else:
        client.watch = None
        return
    key = (condition, fe.sent, fe.answered)
    watch = client.watch
    if watch is None or watch[0] != key:
        client.watch = (key, now, False, False)
        return
    since, acted, warned = watch[1], watch[2], watch[3]
    lasted = now - since
    warn = pool.config.idle_transaction_warn
    if condition == "idle in transaction" and warn and lasted >= warn and not warned:
        # The leak detector: said once, nothing is done to the client.
        client.watch = (key, since, acted, True)
        log.warning(
            "%s: idle in a transaction for %.0f s (idle_transaction_warn = %g s), holding "
            "%s; application_name=%r; last statement %s",
            client,
            lasted,
            warn,
            server or "no server (it was lost)",
            dict(client.settings).get("application_name", ""),
            _statement(client.registry, client),
        )
    if not limit or acted or lasted < limit:
        return
    if condition == "idle":
        client.fail(
            ProxyError(
                f"client_idle_timeout: no request for {lasted:.0f} s (limit {limit:g} s)",
                sqlstate="57P05",  # idle_session_timeout
                reason="client_idle_timeout",
            )
        )
    elif condition == "idle in transaction":
        client.fail(
            ProxyError(
                f"idle_transaction_timeout: idle in a transaction for {lasted:.0f} s "
                f"(limit {limit:g} s); the transaction was rolled back",
                sqlstate="25P03",  # idle_in_transaction_session_timeout
                reason="idle_transaction_timeout",
            )
        )
    else:
        assert server is not None
        log.warning(
            "%s: query running for %.0f s, over query_timeout (%g s): cancelling it",
            client,
            lasted,
            limit,
        )
        client.watch = (key, since, True, warned)
        server.forward_cancel()
