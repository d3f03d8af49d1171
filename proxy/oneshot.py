"""A connection that reads one request, answers it once, and closes: the workers'
private sockets (peers.py) and the HTTP endpoint (metrics.py) are both made of it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast


class OneShot(asyncio.Protocol):
    """Buffers bytes until ``terminator`` (at most ``limit`` of them), then hands what
    came before it to ``request`` once; ``reply`` writes the answer and closes. Bytes
    after the request are ignored."""

    terminator = b"\n"
    limit = 65536

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            return
        self.buf += data
        end = self.buf.find(self.terminator)
        if end >= 0:
            self.request(self.buf[:end])
        elif len(self.buf) > self.limit:
            self.too_long()

    def request(self, head: bytes) -> None:
        """The request is whole: answer it (now, or from a Task kept in ``self.task``)."""
        raise NotImplementedError

    def too_long(self) -> None:
        """The request outgrew ``limit``: answer so, with ``reply``."""
        raise NotImplementedError

    def start(self, answer: Coroutine[Any, Any, None]) -> None:
        """Answer from a Task (a request that waits)."""
        self.task = asyncio.get_running_loop().create_task(answer)

    def reply(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            transport.close()
