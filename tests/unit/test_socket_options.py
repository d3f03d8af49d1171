"""The event loop's own socket options that pgmux relies on instead of setting them.

``proxy.sockets`` leaves TCP_NODELAY to the loop: uvloop (pgmux's loop) and asyncio
both set it on every TCP transport, accepted or connected. If a release stopped doing
so, every small reply would wait for Nagle's algorithm. And the keepalive timings and
TCP_USER_TIMEOUT set on a listening socket reach the sockets it accepts (Linux copies
them), which is why pgmux sets them there once instead of per client.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from proxy.config import ConfigError, parse_config
from proxy.sockets import apply_tcp_options, tcp_options

TUNED = parse_config(
    {
        "databases": {"app": {}},
        "tcp_keepidle": 31,
        "tcp_keepintvl": 7,
        "tcp_keepcnt": 4,
        "tcp_user_timeout": 12345,
    }
)


class _Recorder(asyncio.Protocol):
    def __init__(self, seen: list[tuple[int, int]]) -> None:
        self.seen = seen

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        apply_tcp_options(sock, tcp_options(TUNED))
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
        assert nodelay != 0, "the loop no longer sets TCP_NODELAY: set it in proxy.sockets"
        assert keepalive != 0


def _timings(sock: socket.socket) -> tuple[int, int, int, int, int]:
    tcp = socket.IPPROTO_TCP
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
        sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
        sock.getsockopt(tcp, socket.TCP_KEEPCNT),
        sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
    )


def test_accepted_sockets_inherit_the_listeners_options() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        apply_tcp_options(listener, tcp_options(TUNED))
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert _timings(accepted) == (1, 31, 7, 4, 12345)
                assert _timings(client)[1:] != (31, 7, 4, 12345)  # untouched side


def test_off_means_the_kernels_defaults() -> None:
    plain = parse_config({"databases": {"app": {}}})
    assert tcp_options(plain) == ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),)
    off = parse_config({"databases": {"app": {}}, "tcp_keepalive": False, "tcp_keepidle": 5})
    assert tcp_options(off) == ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0),)
    with socket.socket(socket.AF_UNIX) as unix:
        apply_tcp_options(unix, tcp_options(TUNED))  # no TCP options on a unix socket


def test_tcp_keepcnt_is_bounded_as_the_kernel_bounds_it() -> None:
    with pytest.raises(ConfigError, match="tcp_keepcnt: must be 0 to 127"):
        parse_config({"databases": {"app": {}}, "tcp_keepcnt": 500})
