"""The server side failing under pgmux: connections cut, hosts hanging or refusing.

A FaultyRelay sits between pgmux and PostgreSQL, so the faults are real TCP events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from support.faulty import FaultyRelay
from support.helpers import connect_asyncpg, postgres_error
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess
from support.wire import RawClient


@pytest.fixture
async def relay(pg: PgCluster) -> AsyncIterator[FaultyRelay]:
    relay = await FaultyRelay(pg.host, pg.port).start()
    yield relay
    await relay.close()


@pytest.fixture
def proxy(pgmux_factory: PgmuxFactory, relay: FaultyRelay) -> PgmuxProcess:
    return pgmux_factory(
        {
            "default_pool_size": 2,
            "server_connect_timeout": 2,
            "databases": {"app": {"port": relay.port}},
        }
    )


async def test_connection_cut_mid_result(proxy: PgmuxProcess, relay: FaultyRelay) -> None:
    """The server dies in the middle of a DataRow: the client is closed (no error can be
    framed inside a half-sent message), and nobody else notices."""
    conn = await connect_asyncpg(proxy)
    bystander = await connect_asyncpg(proxy)
    try:
        big = asyncio.create_task(
            conn.fetch("SELECT repeat('x', 1000) FROM generate_series(1, 2000000)")
        )
        while relay.bytes_from_server < 1_000_000:
            await asyncio.sleep(0.01)
        relay.cut()
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)) as info:
            await asyncio.wait_for(big, 10)
        if isinstance(info.value, asyncpg.PostgresError):
            # 08006 when the cut fell between messages; 08003 (closed) inside one.
            assert postgres_error(info.value).sqlstate in ("08006", "08003")
        # The bystander's idle session is untouched; it gets a fresh server.
        assert await asyncio.wait_for(bystander.fetchval("SELECT 41 + 1"), 10) == 42
    finally:
        conn.terminate()
        await bystander.close()


async def test_connection_cut_between_messages(proxy: PgmuxProcess, relay: FaultyRelay) -> None:
    """Cut while the server is quiet inside a transaction: nothing is in flight, so the
    client hears of it with its next request (08006); its block has failed until it
    ends it, and the session goes on (test_server_loss.py has the rest)."""
    async with await RawClient.open(proxy.host, proxy.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        result = await client.simple_query("BEGIN")
        assert result.status == "T"
        relay.cut()
        await asyncio.sleep(0.2)
        result = await client.simple_query("SELECT 1")
        assert [(e["S"], e["C"]) for e in result.errors] == [("ERROR", "08006")], result
        message = result.errors[0]["M"]
        assert message.startswith(
            f'server connection for pool "app/app" to 127.0.0.1:{relay.port} was lost while '
            "this client was idle in a transaction: server closed the connection"
        ), message
        assert result.status == "E"
        result = await client.simple_query("ROLLBACK")
        assert (result.tags, result.status) == (["ROLLBACK"], "I")
        assert (await client.simple_query("SELECT 2")).rows == [["2"]]


async def test_cut_while_idle_in_pool(proxy: PgmuxProcess, relay: FaultyRelay) -> None:
    conn = await connect_asyncpg(proxy)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        relay.cut()  # the pooled server dies while nobody holds it
        await asyncio.sleep(0.2)
        assert await asyncio.wait_for(conn.fetchval("SELECT 2"), 10) == 2
    finally:
        await conn.close()


async def test_server_refusing_connections(proxy: PgmuxProcess, relay: FaultyRelay) -> None:
    await relay.refuse()
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        await connect_asyncpg(proxy)
    error = postgres_error(info.value)
    assert error.sqlstate == "08001"
    assert f"127.0.0.1:{relay.port}" in str(error)
    assert time.monotonic() - started < 2


async def test_server_hanging_at_connect(proxy: PgmuxProcess, relay: FaultyRelay) -> None:
    relay.stall()
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        await connect_asyncpg(proxy)
    error = postgres_error(info.value)
    took = time.monotonic() - started
    assert error.sqlstate == "08001"
    assert "server_connect_timeout" in str(error)
    assert 1.5 < took < 6


async def test_pool_recovers_after_outage(proxy: PgmuxProcess, relay: FaultyRelay) -> None:
    conn = await connect_asyncpg(proxy)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        relay.stall()
        relay.cut()
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await asyncio.wait_for(conn.fetchval("SELECT 2"), 10)
    finally:
        conn.terminate()
    relay.stalled = False
    conn = await connect_asyncpg(proxy)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT 3"), 10) == 3
    finally:
        await conn.close()
