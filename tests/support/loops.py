"""Clients that loop requests through pgmux until stopped, for tests that change things
under load (PAUSE, RELOAD, a PostgreSQL restart) and then count what went through.

- ``open_clients(pgmux, n, **kwargs)``: ``n`` asyncpg connections (``connect_asyncpg``'s
  keyword arguments), terminated when the block ends.
- ``Loops(conns, step)``: each connection runs ``await step(i, conn)`` over and over until
  ``stop()``. ``counts[i]`` is how many steps client ``i`` finished, ``total`` their sum;
  the first exception of a client ends its loop and lands in ``errors``;
  ``each_did(n, since)`` waits until every client finished ``n`` more steps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg

from .helpers import connect_asyncpg, wait_until
from .pgmux import PgmuxProcess

DEADLINE = 30.0  # seconds: generous, the machine is small and shared

Step = Callable[[int, asyncpg.Connection], Awaitable[Any]]


@contextlib.asynccontextmanager
async def open_clients(pgmux: PgmuxProcess, n: int, **kwargs: Any) -> AsyncIterator[list[Any]]:
    conns = list(await asyncio.gather(*(connect_asyncpg(pgmux, **kwargs) for _ in range(n))))
    try:
        yield conns
    finally:
        for conn in conns:
            conn.terminate()


class Loops:
    """The connections each looping ``step`` until stopped (see the module docstring)."""

    def __init__(self, conns: list[asyncpg.Connection], step: Step) -> None:
        self.counts = [0] * len(conns)
        self.errors: list[BaseException] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._loop(i, c, step)) for i, c in enumerate(conns)]

    async def _loop(self, i: int, conn: asyncpg.Connection, step: Step) -> None:
        while not self._stop.is_set():
            try:
                await step(i, conn)
            except Exception as exc:
                self.errors.append(exc)
                return
            self.counts[i] += 1

    @property
    def total(self) -> int:
        return sum(self.counts)

    async def each_did(self, n: int, since: list[int] | None = None) -> None:
        """Wait until every client finished ``n`` steps more than ``since`` (default: now);
        an error in any client fails at once."""
        base = list(self.counts) if since is None else since

        def check() -> bool:
            assert not self.errors, self.errors
            return all(c - b >= n for c, b in zip(self.counts, base, strict=True))

        await wait_until(check, DEADLINE, what=f"every client did {n} more steps")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), DEADLINE)
