"""The TCP options pgmux sets on its sockets, by PgBouncer's names: tcp_keepalive,
tcp_keepidle, tcp_keepintvl, tcp_keepcnt and tcp_user_timeout.

Client sockets inherit them from the listening socket (Linux copies keepalive and
user-timeout settings to accepted sockets), so they are set there once, not with a
syscall per client; server sockets get them when they connect. TCP_NODELAY is left to
the event loop, which sets it on every TCP transport (tests/unit/test_socket_options.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from .config import Config

TcpOption = tuple[int, int, int]  # level, option, value


def tcp_options(config: Config) -> tuple[TcpOption, ...]:
    """What ``config`` asks for; 0 leaves a timing to the kernel's default."""
    options: list[TcpOption] = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(config.tcp_keepalive))]
    if config.tcp_keepalive:
        for option, value in (
            (socket.TCP_KEEPIDLE, config.tcp_keepidle),
            (socket.TCP_KEEPINTVL, config.tcp_keepintvl),
            (socket.TCP_KEEPCNT, config.tcp_keepcnt),
        ):
            if value:
                options.append((socket.IPPROTO_TCP, option, value))
    if config.tcp_user_timeout:
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, config.tcp_user_timeout))
    return tuple(options)


def apply_tcp_options(sock: socket.socket, options: Iterable[TcpOption]) -> None:
    """Set ``options`` on a TCP socket (a unix socket has none of them)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, option, value in options:
        sock.setsockopt(level, option, value)
