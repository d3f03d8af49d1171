"""The event loop's own socket options that pgmux relies on instead of setting them.

``server.tune_socket`` leaves TCP_NODELAY to the loop: uvloop (pgmux's loop) and
asyncio both set it on every TCP transport, accepted or connected. If a release
stopped doing so, every small reply would wait for Nagle's algorithm.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from proxy.server import tune_socket


class _Recorder(asyncio.Protocol):
    def __init__(self, seen: list[tuple[int, int]]) -> None:
        self.seen = seen

    def connection_made(self, transport: Any) -> None:
        tune_socket(transport, keepalive=True)
        sock = transport.get_extra_info("socket")
        self.seen.append(
            (
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            )
        )
        transport.close()


async def _accept_and_connect() -> list[tuple[int, int]]:
    loop = asyncio.get_running_loop()
    seen: list[tuple[int, int]] = []
    server = await loop.create_server(lambda: _Recorder(seen), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await loop.create_connection(lambda: _Recorder(seen), "127.0.0.1", port)
    for _ in range(100):
        if len(seen) == 2:
            break
        await asyncio.sleep(0.01)
    server.close()
    await server.wait_closed()
    return seen


@pytest.mark.parametrize(
    "new_loop",
    [uvloop.new_event_loop, asyncio.new_event_loop],
    ids=["uvloop", "asyncio"],
)
def test_tcp_transports_have_nodelay_and_keepalive(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    loop = new_loop()
    try:
        seen = loop.run_until_complete(_accept_and_connect())
    finally:
        loop.close()
    assert len(seen) == 2  # the accepted side and the connecting side
    for nodelay, keepalive in seen:
        assert nodelay != 0, "the loop no longer sets TCP_NODELAY: set it in tune_socket"
        assert keepalive != 0
