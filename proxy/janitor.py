"""Periodic housekeeping: queue timeouts, idle and old servers, minimum pool sizes."""

from __future__ import annotations

import asyncio
import logging
import time

from .pool import Registry

log = logging.getLogger("pgmux.janitor")

# Often enough that query_wait_timeout is honoured to within half a second.
INTERVAL = 0.5


async def run_janitor(registry: Registry) -> None:
    while True:
        await asyncio.sleep(INTERVAL)
        try:
            sweep(registry, time.monotonic())
        except Exception:  # a bug here must not stop future sweeps
            log.exception("janitor sweep failed")


def sweep(registry: Registry, now: float) -> None:
    for pool in registry.iter_pools():
        pool.expire_waiters(now)
        pool.close_idle_servers(now)
        if not registry.shutting_down:
            pool.fill_min_pool()
            pool.retry_dispatch()
