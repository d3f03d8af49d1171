"""tcp_keepalive: SO_KEEPALIVE on client and server sockets, seen from the kernel.

Client sockets inherit it from pgmux's listening socket; server sockets get it when
they connect. /proc/net/tcp shows a socket's pending timer: 2 (keepalive) on an idle
connection that has it, 0 on one that has not.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster
from support.pgmux import PgmuxFactory
from support.wire import RawClient

TIMER_KEEPALIVE = "02"
TIMER_NONE = "00"
TIMER_ACK = "01"  # retransmit or delayed ACK, pending just after traffic


def _timers(local_port: int, remote_port: int) -> list[str]:
    """The timer field of each IPv4 TCP socket between these ports."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = int(fields[1].rsplit(":", 1)[1], 16)
        remote = int(fields[2].rsplit(":", 1)[1], 16)
        if (local, remote) == (local_port, remote_port):
            found.append(fields[5].split(":")[0])
    return found


async def _settled(local_port: int, remote_port: int) -> list[str]:
    """The timers once the last exchange's (delayed) ACKs have gone: timer 1 is those."""
    for _ in range(100):
        timers = _timers(local_port, remote_port)
        if TIMER_ACK not in timers:
            break
        await asyncio.sleep(0.02)
    return timers


@pytest.mark.parametrize("keepalive", [True, False])
async def test_client_and_server_sockets(
    pg: PgCluster, pgmux_factory: PgmuxFactory, keepalive: bool
) -> None:
    pgmux = pgmux_factory({"tcp_keepalive": keepalive, "default_pool_size": 1})
    async with await RawClient.open(pgmux.host, pgmux.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        client_port = client.writer.get_extra_info("sockname")[1]
        result = await client.simple_query("SELECT inet_client_port()")
        server_port = int(result.rows[0][0] or 0)  # pgmux's end of its server connection
        wanted = [TIMER_KEEPALIVE if keepalive else TIMER_NONE]
        assert await _settled(pgmux.port, client_port) == wanted
        assert await _settled(server_port, pg.port) == wanted


def _keepalive_due(local_port: int, remote_port: int) -> list[float]:
    """Seconds until each such socket's keepalive timer fires (/proc/net/tcp's tm->when,
    in USER_HZ ticks of 1/100 s)."""
    due = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local = int(fields[1].rsplit(":", 1)[1], 16)
        remote = int(fields[2].rsplit(":", 1)[1], 16)
        timer, when = fields[5].split(":")
        if (local, remote) == (local_port, remote_port) and timer == TIMER_KEEPALIVE:
            due.append(int(when, 16) / 100)
    return due


async def test_tcp_keepidle_reaches_client_and_server_sockets_and_reloads(
    pg: PgCluster, pgmux_factory: PgmuxFactory
) -> None:
    """tcp_keepidle = 30: the first probe is due within 30 s, not the kernel's 2 hours;
    a reload to 40 reaches clients that connect afterwards."""
    pgmux = pgmux_factory({"tcp_keepidle": 30, "tcp_keepintvl": 5, "default_pool_size": 1})
    async with await RawClient.open(pgmux.host, pgmux.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        client_port = client.writer.get_extra_info("sockname")[1]
        result = await client.simple_query("SELECT inet_client_port()")
        server_port = int(result.rows[0][0] or 0)
        await _settled(pgmux.port, client_port)
        for ends in ((pgmux.port, client_port), (server_port, pg.port)):
            (due,) = _keepalive_due(*ends)
            assert 20 < due <= 30, (ends, due)
    pgmux.write_config({**pgmux.config, "tcp_keepidle": 40})
    since = len(pgmux.log())
    pgmux.signal(signal.SIGHUP)
    pgmux.wait_for_log("reloaded", since=since)
    async with await RawClient.open(pgmux.host, pgmux.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        client_port = client.writer.get_extra_info("sockname")[1]
        await client.simple_query("SELECT 1")
        await _settled(pgmux.port, client_port)
        (due,) = _keepalive_due(pgmux.port, client_port)
        assert 30 < due <= 40, due
