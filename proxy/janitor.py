"""Periodic housekeeping: queue timeouts, idle and old servers, minimum pool sizes,
settings left behind by departed clients, and the client timeouts
(client_idle_timeout, idle_transaction_timeout, query_timeout).

Client timeouts are measured by sampling, so the relay never reads the clock: each
sweep notes a client's request counters, and a state that persists with unchanged
counters has lasted at least since the sweep that first saw it (±INTERVAL).
"""

from __future__ import annotations

import asyncio
import logging
import time

from .client import ClientConnection
from .errors import ProxyError
from .pool import ClientState, Registry
from .protocol import codes

log = logging.getLogger("pgmux.janitor")

# Often enough that the timeouts are honoured to within half a second.
INTERVAL = 0.5


async def run_janitor(registry: Registry) -> None:
    while True:
        await asyncio.sleep(INTERVAL)
        try:
            sweep(registry, time.monotonic())
        except Exception:  # a bug here must not stop future sweeps
            log.exception("janitor sweep failed")


def sweep(registry: Registry, now: float) -> None:
    watch_clients = False
    for pool in registry.iter_pools():
        pool.expire_waiters(now)
        pool.close_idle_servers(now)
        if not registry.shutting_down:
            pool.fill_min_pool()
            pool.retry_dispatch()
        watch_clients = watch_clients or bool(
            pool.client_idle_timeout or pool.idle_transaction_timeout or pool.query_timeout
        )
    if watch_clients:
        for client in list(registry.clients):
            check_client(client, now)
    if not registry.shutting_down:
        reset_stale_settings(registry)


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


def check_client(client: ClientConnection, now: float) -> None:
    """Apply the client timeouts of the client's pool to one client."""
    if not client.welcomed or client.state is ClientState.ADMIN:
        return
    pool = client.pool
    fe = client.fe
    server = client.server
    if client.state is ClientState.IDLE:
        condition, limit = "idle", pool.client_idle_timeout
    elif client.state is not ClientState.ACTIVE or server is None or client.terminating:
        client.watch = None
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
        client.watch = (key, now, False)
        return
    since, acted = watch[1], watch[2]
    lasted = now - since
    if not limit or acted or lasted < limit:
        return
    if condition == "idle":
        client.fail(
            ProxyError(
                f"client_idle_timeout: no request for {lasted:.0f} s (limit {limit:g} s)",
                sqlstate="57P05",  # idle_session_timeout
            )
        )
    elif condition == "idle in transaction":
        client.fail(
            ProxyError(
                f"idle_transaction_timeout: idle in a transaction for {lasted:.0f} s "
                f"(limit {limit:g} s); the transaction was rolled back",
                sqlstate="25P03",  # idle_in_transaction_session_timeout
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
        client.watch = (key, since, True)
        server.forward_cancel()
