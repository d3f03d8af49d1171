"""CancelRequest through pgmux: pgmux-made keys, forwarded to the right server only."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg
import psycopg
import pytest
from support.helpers import (
    Su,
    app_backends,
    connect_asyncpg,
    connect_psycopg,
    connect_raw,
    log_lines,
    wait_until,
)
from support.pgmux import PgmuxProcess
from support.wire import RawClient, cancel_request

from proxy.protocol import messages


async def _sleeping(su: Su) -> bool:
    return any(
        state == "active" and "pg_sleep" in query for _, state, _, query in await app_backends(su)
    )


async def _nobody_sleeping(su: Su) -> bool:
    return not await _sleeping(su)


async def test_asyncpg_timeout_cancels(pgmux: PgmuxProcess, su: Su) -> None:
    conn = await connect_asyncpg(pgmux)
    try:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=1)
        assert time.monotonic() - started < 5
        # The server really stopped sleeping, and the connection is usable.
        await wait_until(lambda: _nobody_sleeping(su), 3, what="pg_sleep cancelled")
        assert await conn.fetchval("SELECT 1") == 1
        assert time.monotonic() - started < 5
        async with conn.transaction():
            assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()


async def test_asyncpg_statement_timeout_style_cancel_in_transaction(
    pgmux: PgmuxProcess, su: Su
) -> None:
    conn = await connect_asyncpg(pgmux)
    try:
        await conn.execute("BEGIN")
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=1)
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("SELECT 1")
        await conn.execute("ROLLBACK")
        assert await conn.fetchval("SELECT 3") == 3
    finally:
        await conn.close()
    await wait_until(lambda: _nobody_sleeping(su), 3, what="pg_sleep cancelled")


async def test_psycopg_cancel_from_another_task(pgmux: PgmuxProcess, su: Su) -> None:
    async with await connect_psycopg(pgmux) as conn:

        async def sleeper() -> None:
            await conn.execute("SELECT pg_sleep(30)")

        task = asyncio.create_task(sleeper())
        await wait_until(lambda: _sleeping(su), 5, what="pg_sleep running")
        started = time.monotonic()
        await conn.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            await asyncio.wait_for(task, 5)
        assert info.value.sqlstate == "57014"
        assert time.monotonic() - started < 5
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_cancel_key_is_made_by_pgmux(pool1: PgmuxProcess) -> None:
    async with await connect_psycopg(pool1) as a:
        cur = await a.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        assert a.info.backend_pid != row[0]
    conn = await connect_asyncpg(pool1)
    try:
        assert conn.get_server_pid() != await conn.fetchval("SELECT pg_backend_pid()")
    finally:
        await conn.close()


async def test_stale_cancel_key_does_not_hit_the_next_client(pool1: PgmuxProcess, su: Su) -> None:
    async with await connect_psycopg(pool1) as a, await connect_psycopg(pool1) as b:
        cur = await a.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        real_pid = row[0]  # A's query is finished; its server went back to the pool

        async def b_sleeps() -> Any:
            cur = await b.execute("SELECT pg_backend_pid(), pg_sleep(3)")
            return await cur.fetchone()

        started = time.monotonic()
        task = asyncio.create_task(b_sleeps())
        await wait_until(lambda: _sleeping(su), 5, what="B's pg_sleep running")
        await a.cancel_safe()  # A's key, while B runs on the server A used
        b_row = await asyncio.wait_for(task, 10)
        assert b_row is not None and b_row[0] == real_pid  # same server: the pool has one
        assert time.monotonic() - started >= 2.9, "B's sleep was cut short"


async def test_cancel_with_unknown_key_does_nothing(pgmux: PgmuxProcess, su: Su) -> None:
    conn = await connect_asyncpg(pgmux)
    try:
        task = asyncio.create_task(conn.fetchval("SELECT pg_sleep(1.5)::text"))
        await wait_until(lambda: _sleeping(su), 5, what="pg_sleep running")
        since = len(pgmux.log())
        # A random key, and the right pid with a wrong key.
        for pid, key in (
            (random.randrange(1, 2**31), random.randrange(2**32)),
            (conn.get_server_pid(), random.randrange(2**32)),
        ):
            async with await RawClient.open(pgmux.host, pgmux.port) as raw:
                await raw.send(cancel_request(pid, key))
                assert await raw.read_until_eof(5) == b""  # closed, no answer
        assert await asyncio.wait_for(task, 5) == ""  # not cancelled
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    assert pgmux.running
    alarming = log_lines(pgmux, since, levels=("WARNING", "ERROR", "CRITICAL"))
    alarming += [ln for ln in log_lines(pgmux, since) if "Traceback" in ln]
    assert not alarming, alarming


async def test_cancel_while_waiting_for_a_server(pool1: PgmuxProcess, su: Su) -> None:
    """B is queued for the only server (A holds it): cancelling B answers B's query with
    57014 at once, without waiting for a server, and touches nothing of A's."""
    a = await connect_asyncpg(pool1)
    b = await connect_psycopg(pool1)
    try:
        await a.execute("BEGIN")
        task_a = asyncio.create_task(a.fetchval("SELECT pg_sleep(2)::text"))
        await wait_until(lambda: _sleeping(su), 5, what="A's pg_sleep running")

        async def b_query() -> Any:
            cur = await b.execute("SELECT 42")
            return await cur.fetchone()

        task_b = asyncio.create_task(b_query())
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await b.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled, match="waiting for a server"):
            await asyncio.wait_for(task_b, 5)
        assert time.monotonic() - started < 1, "B waited for A's server to be cancelled"
        assert not task_a.done(), "A was disturbed"
        assert await asyncio.wait_for(task_a, 5) == ""  # A was not cancelled
        await a.execute("COMMIT")
        cur = await b.execute("SELECT 43")
        assert await cur.fetchone() == (43,)
    finally:
        await a.close()
        await b.close()


async def test_cancel_while_queued_keeps_pipelined_requests(pool1: PgmuxProcess) -> None:
    """Only the first of a queued client's pipelined requests is cancelled; the next one
    keeps its place in the queue and runs once a server is free."""
    a = await connect_asyncpg(pool1)
    try:
        await a.execute("BEGIN")  # A holds the only server
        async with await connect_raw(pool1) as b:
            await b.send(messages.query("SELECT 1") + messages.query("SELECT 2"))
            await asyncio.sleep(0.3)
            async with await RawClient.open(pool1.host, pool1.port) as raw:
                await raw.send(cancel_request(b.backend_pid, b.backend_key))
                assert await raw.read_until_eof(5) == b""
            first = await b.read_result(5)
            assert [e.get("C") for e in first.errors] == ["57014"] and first.status == "I"
            await a.execute("COMMIT")
            second = await b.read_result(5)
            assert second.rows == [["2"]] and not second.errors
            assert (await b.simple_query("SELECT 3")).rows == [["3"]]
    finally:
        await a.close()


async def test_many_cancels_concurrently(pgmux: PgmuxProcess, su: Su) -> None:
    """Five clients sleeping on five servers; each cancel lands on its own query."""
    conns = [await connect_psycopg(pgmux) for _ in range(5)]
    try:

        async def sleeper(conn: psycopg.AsyncConnection[Any], seconds: int) -> str:
            try:
                await conn.execute(f"SELECT pg_sleep({seconds})")
            except psycopg.errors.QueryCanceled:
                return "cancelled"
            return "finished"

        tasks = [
            asyncio.create_task(sleeper(c, 30 if i % 2 == 0 else 2)) for i, c in enumerate(conns)
        ]
        await wait_until(lambda: _count_sleeping(su, 5), 5, what="five pg_sleep running")
        for i, conn in enumerate(conns):
            if i % 2 == 0:
                await conn.cancel_safe()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert results == ["cancelled", "finished", "cancelled", "finished", "cancelled"]
    finally:
        for conn in conns:
            await conn.close()


async def _count_sleeping(su: Su, n: int) -> bool:
    rows = await app_backends(su)
    return sum(1 for _, state, _, q in rows if state == "active" and "pg_sleep" in q) >= n
