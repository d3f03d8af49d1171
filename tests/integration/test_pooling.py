"""Pooling: many clients on few servers, transaction/statement/session modes, pgbench."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import psycopg
import pytest
from support.helpers import (
    Su,
    app_backends,
    app_table,
    connect_asyncpg,
    connect_psycopg,
    connect_raw,
    counting_backends,
    error_of,
    fetch_value,
    pgbench_tps,
    postgres_error,
    psql_command,
    run_pgbench,
    run_psql,
    superuser,
    tool_env,
    wait_until,
)
from support.pgcluster import APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess
from support.wire import bind, execute, parse, query, sync


@pytest.fixture
async def table(pg: PgCluster) -> AsyncIterator[str]:
    """A fresh table ``pool_t`` owned by app."""
    with app_table(pg, "pool_t", "client int, n int, note text") as name:
        yield name


# -- many clients, few servers -----------------------------------------------------------


async def test_300_clients_on_5_servers(pg: PgCluster, pgmux: PgmuxProcess, table: str) -> None:
    n_clients = 300
    su = await superuser(pg)

    async def client(i: int) -> None:
        conn = await connect_asyncpg(pgmux, timeout=60)
        try:
            assert await conn.fetchval("SELECT $1::int * 2", i) == i * 2
            assert await conn.fetchval("SELECT current_user") == APP_USER
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES ($1, 1, 'a')", i)
                await asyncio.sleep(0.01)  # hold the server a little: clients must queue
                await conn.execute(f"INSERT INTO {table} VALUES ($1, 2, 'b')", i)
            rows = await conn.fetch(f"SELECT n FROM {table} WHERE client = $1 ORDER BY n", i)
            assert [r["n"] for r in rows] == [1, 2]
        finally:
            await conn.close()

    started = time.monotonic()
    async with counting_backends(su) as samples:
        results = await asyncio.gather(
            *(client(i) for i in range(n_clients)), return_exceptions=True
        )
    elapsed = time.monotonic() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of {n_clients} clients failed, first: {failures[0]!r}"
    assert await fetch_value(su, f"SELECT count(*) FROM {table}") == 2 * n_clients
    assert samples, "no pg_stat_activity samples taken"
    assert max(samples) <= 5, f"PostgreSQL saw {max(samples)} app backends"
    print(f"300 clients in {elapsed:.1f} s; {len(samples)} samples, max {max(samples)} backends")
    await su.close()


async def test_a_burst_of_logins_on_a_fresh_pool(pgmux_factory: PgmuxFactory) -> None:
    """Logins that all wait for the pool's first server (its parameters are not known
    yet) are handed the server one after the other. That once nested a stack frame per
    queued login and failed with RecursionError from about 170 at once."""
    pgmux = pgmux_factory({"auth_type": "trust", "default_pool_size": 2, "max_client_conn": 600})
    n_clients = 400

    async def client() -> int:
        conn = await connect_raw(pgmux)
        try:
            reply = await conn.exchange(query("SELECT 1"))
            return len(reply.rows)
        finally:
            conn.abort()

    results = await asyncio.gather(*(client() for _ in range(n_clients)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of {n_clients} logins failed, first: {failures[0]!r}"
    assert results == [1] * n_clients
    assert "RecursionError" not in pgmux.log() and "recursion" not in pgmux.log()


async def test_server_lifetime_retires_servers_without_errors(
    pgmux_factory: PgmuxFactory,
) -> None:
    """A server past server_lifetime is closed when it comes back, and the client's next
    transaction gets a fresh one, never an error."""
    pgmux = pgmux_factory({"default_pool_size": 1, "server_lifetime": 1})
    conn = await connect_asyncpg(pgmux)
    try:
        pids = set()
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
            await asyncio.sleep(0.05)
        assert len(pids) >= 3, pids  # one server per second or so
    finally:
        await conn.close()
    assert "server_lifetime of 1 s reached" in pgmux.log()


async def test_server_lifetime_is_jittered_so_a_pool_does_not_reconnect_at_once(
    pgmux_factory: PgmuxFactory, su: Su
) -> None:
    """Twenty servers opened together retire over the last tenth of server_lifetime
    (here 30 s: from 27 s on), not in the one janitor sweep that finds them all due.
    Without jitter the closes could spread no wider than the openings did plus one
    sweep (0.5 s); with it, twenty draws over 3 s spread wider than 1 s but for a
    chance of about 1e-7."""
    lifetime, n = 30, 20
    pgmux = pgmux_factory({"default_pool_size": n, "server_lifetime": lifetime})
    conns = [await connect_asyncpg(pgmux) for _ in range(n)]
    try:
        await asyncio.gather(*(c.execute("SELECT pg_sleep(0.3)") for c in conns))
        opened = await fetch_value(
            su,
            "SELECT extract(epoch FROM max(backend_start) - min(backend_start)) "
            "FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'",
            [APP_USER],
        )
        reached = f"server_lifetime of {lifetime} s reached"
        await wait_until(
            lambda: pgmux.log().count(reached) == n,
            timeout=lifetime + 5,
            interval=0.2,
            what=f"all {n} servers retired",
        )
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    closes = sorted(
        _clock_seconds(line.split(" ")[1]) for line in pgmux.log().splitlines() if reached in line
    )
    spread = closes[-1] - closes[0]
    assert spread > float(opened) + 0.5 + 0.5, (spread, float(opened))


def _clock_seconds(stamp: str) -> float:
    """HH:MM:SS.mmm of a log line, in seconds."""
    hours, minutes, seconds = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


async def test_transaction_stays_on_one_server(pgmux: PgmuxProcess, table: str) -> None:
    """Concurrent clients: inside BEGIN..COMMIT every statement sees the same backend."""

    async def client(i: int) -> set[int]:
        conn = await connect_asyncpg(pgmux)
        pids: set[int] = set()
        try:
            for t in range(10):
                async with conn.transaction():
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    txid = await conn.fetchval("SELECT txid_current()")
                    for _ in range(3):
                        await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", i, t)
                        await asyncio.sleep(0)
                        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
                        assert await conn.fetchval("SELECT txid_current()") == txid
                    count = await conn.fetchval(
                        f"SELECT count(*) FROM {table} WHERE client = $1 AND n = $2", i, t
                    )
                    assert count == 3
                pids.add(pid)
                # A rolled-back transaction leaves nothing behind.
                tr = conn.transaction()
                await tr.start()
                await conn.execute(f"INSERT INTO {table} VALUES ($1, -1)", i)
                await tr.rollback()
            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE n = -1") == 0
        finally:
            await conn.close()
        return pids

    results = await asyncio.gather(*(client(i) for i in range(12)))
    all_pids = set().union(*results)
    assert 1 <= len(all_pids) <= 5, all_pids


# -- waiting for a server ----------------------------------------------------------------


async def test_query_wait_timeout(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1, "query_wait_timeout": 1})
    holder = await connect_asyncpg(pgmux)
    waiter = await connect_asyncpg(pgmux)
    try:
        await holder.execute("BEGIN")
        pid = await holder.fetchval("SELECT pg_backend_pid()")
        started = time.monotonic()
        with pytest.raises(asyncpg.PostgresError) as info:
            await waiter.fetchval("SELECT 1", timeout=10)
        elapsed = time.monotonic() - started
        error = postgres_error(info.value)
        assert error.sqlstate == "57014"
        assert "exhausted" in error.message and "1 of 1" in error.message
        assert "query_wait_timeout" in error.message
        assert 0.9 <= elapsed < 3, f"failed after {elapsed:.2f} s"
        # An ERROR, not FATAL: the waiter's session goes on and may retry.
        assert error.severity == "ERROR"
        assert not waiter.is_closed()
        # The holder is unaffected and still in its transaction on the same server.
        assert await holder.fetchval("SELECT pg_backend_pid()") == pid
        assert await holder.fetchval("SELECT txid_current() = txid_current()") is True
        xid = await holder.fetchval("SELECT txid_current()")
        assert await holder.fetchval("SELECT txid_current()") == xid
        await holder.execute("COMMIT")
        assert await holder.fetchval("SELECT 1") == 1
        # The retry on the same connection gets the server the holder gave back.
        assert await waiter.fetchval("SELECT 2") == 2
    finally:
        await holder.close()
        waiter.terminate()
    # The pool recovers for new clients.
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT 3") == 3
    finally:
        await conn.close()


async def test_query_wait_timeout_psycopg(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1, "query_wait_timeout": 1})
    async with await connect_psycopg(pgmux, autocommit=False) as holder:
        await holder.execute("SELECT 1")  # opens a transaction and keeps it
        async with await connect_psycopg(pgmux) as waiter:
            with pytest.raises(psycopg.errors.QueryCanceled) as info:
                await waiter.execute("SELECT 2")
            assert info.value.sqlstate == "57014"
            assert "query_wait_timeout" in str(info.value)
            assert not (waiter.closed or waiter.broken)
            await holder.commit()
            assert await (await waiter.execute("SELECT 3")).fetchone() == (3,)


async def test_query_wait_timeout_in_a_pipeline(pgmux_factory: PgmuxFactory) -> None:
    """Three pipelined batches while the pool is held: the first that waited too long
    gets the ERROR (and its ReadyForQuery), the two behind it queue again as new
    requests and run once the holder lets go, each answered in order."""
    pgmux = pgmux_factory({"default_pool_size": 1, "query_wait_timeout": 1})
    holder = await connect_asyncpg(pgmux)
    raw = await connect_raw(pgmux)
    try:
        await holder.execute("BEGIN")
        batch = b"".join(parse(f"SELECT {n}") + bind() + execute() + sync() for n in (1, 2, 3))
        await raw.send(batch)
        first = await raw.read_until_ready(timeout=10)
        assert [e.get("C") for e in first.errors] == ["57014"]
        assert first.types == "EZ" and first.status == "I"
        await asyncio.sleep(0.5)  # the rest wait again, well inside a fresh timeout
        await holder.execute("COMMIT")
        second = await raw.read_until_ready(timeout=10)
        third = await raw.read_until_ready(timeout=10)
        assert (second.rows, third.rows) == ([["2"]], [["3"]])
        # And the session is as good as new.
        assert (await raw.exchange(query("SELECT 4"))).rows == [["4"]]
    finally:
        raw.abort()
        await holder.close()


async def test_a_lone_sync_is_answered_without_a_server(pgmux_factory: PgmuxFactory) -> None:
    """With no batch open, Sync gets ReadyForQuery idle at once, as from PostgreSQL, even
    while every server is busy (asyncpg sends one after a failed Flush-ed prepare)."""
    pgmux = pgmux_factory({"default_pool_size": 1, "query_wait_timeout": 30})
    holder = await connect_asyncpg(pgmux)
    raw = await connect_raw(pgmux)
    try:
        await holder.execute("BEGIN")
        reply = await raw.exchange(sync(), timeout=2)
        assert (reply.types, reply.status) == ("Z", "I")
    finally:
        raw.abort()
        await holder.close()


async def test_query_wait_timeout_at_login_is_still_fatal(pgmux_factory: PgmuxFactory) -> None:
    """A login whose settings the pool has never tried takes a server to check them; one
    that waits too long for it has no session to go on with."""
    pgmux = pgmux_factory({"default_pool_size": 1, "query_wait_timeout": 1})
    holder = await connect_asyncpg(pgmux)
    try:
        await holder.execute("BEGIN")
        error = await error_of(connect_asyncpg(pgmux, server_settings={"TimeZone": "Asia/Tokyo"}))
        assert (error.sqlstate, error.severity) == ("57014", "FATAL"), error
        assert "query_wait_timeout" in error.message
    finally:
        await holder.close()


@pytest.mark.parametrize("notify", [1, 0])
async def test_query_wait_notify(pgmux_factory: PgmuxFactory, notify: int) -> None:
    """A client queued query_wait_notify seconds gets one NOTICE naming the pool, its
    place and the holder; 0 turns it off."""
    pgmux = pgmux_factory(
        {"default_pool_size": 1, "query_wait_timeout": 30, "query_wait_notify": notify}
    )
    holder = await connect_asyncpg(pgmux, server_settings={"application_name": "holder-app"})
    waiters = [await connect_asyncpg(pgmux) for _ in range(2)]
    notices: list[list[str]] = [[], []]
    for waiter, seen in zip(waiters, notices, strict=True):
        waiter.add_log_listener(lambda _c, m, seen=seen: seen.append(m.message))
    try:
        await holder.execute("BEGIN")
        queued = [asyncio.create_task(w.fetchval("SELECT 7")) for w in waiters]
        await asyncio.sleep(2.6)  # past the notice, by several janitor sweeps
        await holder.execute("COMMIT")
        assert await asyncio.gather(*queued) == [7, 7]
    finally:
        await holder.close()
        for waiter in waiters:
            await waiter.close()
    if not notify:
        assert notices == [[], []]
        return
    assert [len(seen) for seen in notices] == [1, 1], notices  # once per wait
    first, second = notices[0][0], notices[1][0]
    assert 'pool "app/app" has 1 of 1 server connections busy' in first
    assert "0 clients queued ahead" in first and "1 clients queued ahead" in second
    assert "holder-app" in first and "idle in transaction" in first
    assert "(query_wait_notify)" in first
    assert "127.0.0.1" not in first  # holders by id, not by address


async def test_waiters_are_served_in_turn(pgmux_factory: PgmuxFactory) -> None:
    """Pool of 1, many clients with short transactions: all of them get through."""
    pgmux = pgmux_factory({"default_pool_size": 1})

    async def client(i: int) -> int:
        conn = await connect_asyncpg(pgmux)
        try:
            total = 0
            for _ in range(5):
                async with conn.transaction():
                    total += await conn.fetchval("SELECT $1::int", i)
                    await asyncio.sleep(0.005)
            return total
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(i) for i in range(30)))
    assert results == [5 * i for i in range(30)]


# -- statement mode ----------------------------------------------------------------------


async def _no_open_transaction(pg: PgCluster) -> None:
    su = await superuser(pg)
    try:
        await wait_until(lambda: _all_idle(su), 3, what="app backends idle outside a transaction")
    finally:
        await su.close()


async def _all_idle(su: psycopg.AsyncConnection[Any]) -> bool:
    rows = await app_backends(su)
    return all(state == "idle" and not in_xact for _, state, in_xact, _ in rows)


async def _in_transaction(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Simple protocol: now() = statement_timestamp() unless a transaction is open."""
    async with psycopg.AsyncClientCursor(conn) as cur:
        await cur.execute("SELECT now() <> statement_timestamp()")
        row = await cur.fetchone()
        assert row is not None
        return bool(row[0])


async def test_statement_mode(pg: PgCluster, pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"pool_mode": "statement", "default_pool_size": 1})
    conn = await connect_asyncpg(pgmux)
    try:
        for i in range(5):
            assert await conn.fetchval("SELECT $1::int", i) == i
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute("BEGIN")
        assert info.value.sqlstate == "0A000"
        assert "statement" in info.value.message
        assert await conn.fetchval("SELECT 1") == 1
        await _no_open_transaction(pg)
        with pytest.raises(asyncpg.PostgresError) as info:
            async with conn.transaction():
                await conn.execute("SELECT 1")
        assert info.value.sqlstate == "0A000"
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()
    await _no_open_transaction(pg)
    # The same through psycopg's simple protocol, on the one server.
    async with await connect_psycopg(pgmux) as pconn:
        assert not await _in_transaction(pconn)
        with pytest.raises(psycopg.errors.FeatureNotSupported) as pinfo:
            await pconn.execute("BEGIN")
        assert "statement" in str(pinfo.value)
        assert not await _in_transaction(pconn)
    await _no_open_transaction(pg)


async def test_statement_mode_psycopg_implicit_begin(
    pg: PgCluster, pgmux_factory: PgmuxFactory
) -> None:
    """psycopg outside autocommit sends a lone ``BEGIN`` first: it must get the 0A000."""
    pgmux = pgmux_factory({"pool_mode": "statement", "default_pool_size": 1})
    async with await connect_psycopg(pgmux, autocommit=False) as pconn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            await pconn.execute("SELECT 1")
        assert "statement" in str(info.value)
    await _no_open_transaction(pg)


def test_statement_mode_psql(pg: PgCluster, pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"pool_mode": "statement", "default_pool_size": 1})
    proc = run_psql(pgmux, "-c", "BEGIN")
    assert proc.returncode != 0
    assert "statement" in proc.stderr, proc.stderr
    proc = run_psql(pgmux, "-v", "VERBOSITY=verbose", "-c", "BEGIN")
    assert "0A000" in proc.stderr, proc.stderr
    proc = run_psql(pgmux, input="BEGIN;\nSELECT now() = statement_timestamp();\n")
    assert "statement" in proc.stderr
    assert proc.stdout.strip() == "t", proc.stdout
    proc = run_psql(pgmux, "-c", "SELECT 7")
    assert proc.returncode == 0 and proc.stdout.strip() == "7", proc.stderr
    asyncio.run(_no_open_transaction(pg))


# -- session mode ------------------------------------------------------------------------


async def test_session_mode(pg: PgCluster, pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"pool_mode": "session", "default_pool_size": 1})
    conn = await connect_asyncpg(pgmux)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        for _ in range(3):
            async with conn.transaction():
                assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        await conn.execute("SET myapp.flavour = 'mint'")
        await conn.execute("SET statement_timeout = 777")
        await conn.execute("CREATE TEMP TABLE session_tmp (x int)")
        await conn.execute("SELECT pg_advisory_lock(4242)")
        await conn.execute("PREPARE session_stmt AS SELECT 1")
        assert await conn.fetchval("SELECT current_setting('myapp.flavour')") == "mint"
    finally:
        await conn.close()
    conn = await connect_asyncpg(pgmux)
    try:
        # Same server (pool of 1), but reset: DISCARD ALL.
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        assert await conn.fetchval("SELECT current_setting('myapp.flavour', true)") in (None, "")
        assert await conn.fetchval("SHOW statement_timeout") == "0"
        assert await conn.fetchval("SELECT to_regclass('pg_temp.session_tmp')") is None
        assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
    finally:
        await conn.close()


async def test_session_mode_second_client_waits(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"pool_mode": "session", "default_pool_size": 1})
    first = await connect_asyncpg(pgmux)
    second = await connect_asyncpg(pgmux)
    try:
        assert await first.fetchval("SELECT 1") == 1
        task = asyncio.create_task(second.fetchval("SELECT 2"))
        await asyncio.sleep(0.5)
        assert not task.done(), "second client got a server while the first holds it"
        await first.close()
        assert await asyncio.wait_for(task, 5) == 2
    finally:
        await first.close()
        await second.close()


# -- tools -------------------------------------------------------------------------------


def testrun_pgbench(pg: PgCluster, pgmux: PgmuxProcess) -> None:
    init = run_pgbench(pg, "-i", "-s", "1", "-q")
    assert init.returncode == 0, init.stdout + init.stderr
    select_only = pgbench_tps(run_pgbench(pgmux, "-c", "20", "-j", "2", "-T", "5", "-S"))
    tpcb = pgbench_tps(run_pgbench(pgmux, "-c", "10", "-j", "2", "-T", "5"))
    print(f"pgbench through pgmux: -S {select_only:.0f} tps, TPC-B {tpcb:.0f} tps")


def test_psql_multiple_statements(pgmux: PgmuxProcess) -> None:
    proc = run_psql(pgmux, "-c", "select 1; select 2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "2"]
    proc = run_psql(pgmux, input="select 3;\nbegin;\nselect 4;\ncommit;\nselect 5;\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "4", "5"], proc.stdout


def test_psql_interactive_style_session(pgmux: PgmuxProcess) -> None:
    """psql reading a script from stdin with a transaction across several lines."""
    script = (
        "\n".join(
            [
                "CREATE TEMP TABLE IF NOT EXISTS t_psql (x int);",  # fine: one statement
                "SELECT 'a';",
                "\\echo between",
                "SELECT 'b';",
            ]
        )
        + "\n"
    )
    proc = subprocess.run(
        psql_command(pgmux, "-v", "ON_ERROR_STOP=1"),
        input=script,
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["a", "between", "b"], proc.stdout


# -- pipelining --------------------------------------------------------------------------


async def test_psycopg_pipeline(pgmux: PgmuxProcess, table: str) -> None:
    async with await connect_psycopg(pgmux) as conn:
        async with conn.pipeline():
            cursors = []
            for i in range(20):
                cur = conn.cursor()
                await cur.execute("SELECT %s::int * 3, pg_backend_pid()", [i])
                cursors.append(cur)
            ins = conn.cursor()
            await ins.execute(f"INSERT INTO {table} (client, n) VALUES (%s, %s)", [1, 1])
        values = [await cur.fetchone() for cur in cursors]
        assert [v[0] for v in values if v] == [i * 3 for i in range(20)]
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        assert await cur.fetchone() == (1,)


async def test_psycopg_pipeline_in_transaction_concurrent(pgmux: PgmuxProcess, table: str) -> None:
    async def client(i: int) -> None:
        async with await connect_psycopg(pgmux, autocommit=False) as conn:
            for round_ in range(5):
                async with conn.pipeline() as pipeline:
                    c1 = await conn.execute("SELECT pg_backend_pid(), txid_current()")
                    await conn.execute(
                        f"INSERT INTO {table} (client, n) VALUES (%s, %s)", [i, round_]
                    )
                    c2 = await conn.execute("SELECT pg_backend_pid(), txid_current()")
                    c3 = await conn.execute(f"SELECT count(*) FROM {table} WHERE client = %s", [i])
                    await pipeline.sync()
                    first, second = await c1.fetchone(), await c2.fetchone()
                    assert first == second
                    assert await c3.fetchone() == (round_ + 1,)
                await conn.commit()

    await asyncio.gather(*(client(i) for i in range(10)))
    su_rows = await _count(pgmux, table)
    assert su_rows == 50


async def _count(pgmux: PgmuxProcess, table: str) -> int:
    async with await connect_psycopg(pgmux) as conn:
        cur = await conn.execute(f"SELECT count(*) FROM {table}")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_asyncpg_executemany(pgmux: PgmuxProcess, table: str) -> None:
    """asyncpg's executemany pipelines Bind/Execute without a Sync per row."""
    conn = await connect_asyncpg(pgmux)
    try:
        await conn.executemany(
            f"INSERT INTO {table} (client, n) VALUES ($1, $2)", [(7, i) for i in range(500)]
        )
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE client = 7") == 500
    finally:
        await conn.close()
