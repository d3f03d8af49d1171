"""Nothing leaks between clients: servers left by dying clients come back clean.

Every test runs a pool of ONE server, so the next client always gets the server the
dead client left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
from support.helpers import (
    Su,
    app_backends,
    app_locks,
    connect_asyncpg,
    fetch_value,
    psql_process,
    wait_until,
)
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess
from support.wire import (
    RawClient,
    bind,
    copy_data,
    execute,
    flush,
    message,
    parse,
    query,
    terminate,
)


@pytest.fixture
def rows(pg: PgCluster) -> str:
    """Table ``dirty_t`` with rows (1, 0) and (2, 0), owned by app."""
    pg.psql(
        "DROP TABLE IF EXISTS dirty_t; CREATE TABLE dirty_t (id int PRIMARY KEY, v int);"
        f" INSERT INTO dirty_t VALUES (1, 0), (2, 0); ALTER TABLE dirty_t OWNER TO {APP_USER}"
    )
    return "dirty_t"


@pytest.fixture
def pool1(pgmux_factory: PgmuxFactory) -> PgmuxProcess:
    return pgmux_factory({"default_pool_size": 1, "query_wait_timeout": 10})


async def _in_transaction(su: Su) -> bool:
    return any(in_xact for _, _, in_xact, _ in await app_backends(su))


async def _state(su: Su, state: str) -> bool:
    backends = await app_backends(su)
    return bool(backends) and all(s == state for _, s, _, _ in backends)


async def _clean(su: Su) -> bool:
    """Every app backend idle, outside a transaction, holding no locks."""
    backends = await app_backends(su)
    if any(s != "idle" or in_xact for _, s, in_xact, _ in backends):
        return False
    return not await app_locks(su)


async def _next_client_updates(pgmux: PgmuxProcess, table: str, value: int) -> float:
    """A new client through the pool updates row 1; the seconds it took."""
    started = time.monotonic()
    conn = await connect_asyncpg(pgmux)
    try:
        await conn.execute("SET lock_timeout = '3s'")
        status = await asyncio.wait_for(
            conn.execute(f"UPDATE {table} SET v = $1 WHERE id = 1", value), 5
        )
        assert status == "UPDATE 1"
        assert await conn.fetchval(f"SELECT v FROM {table} WHERE id = 1") == value
        await conn.execute("RESET lock_timeout")
    finally:
        await conn.close()
    return time.monotonic() - started


# -- killed while holding a row lock -----------------------------------------------------


async def test_psql_killed_holding_row_lock(pool1: PgmuxProcess, su: Su, rows: str) -> None:
    with psql_process(pool1) as proc:
        assert proc.stdin is not None
        proc.stdin.write(
            f"BEGIN;\nSELECT * FROM {rows} WHERE id = 1 FOR UPDATE;\n"
            f"UPDATE {rows} SET v = 99 WHERE id = 2;\n"
        )
        proc.stdin.flush()
        await wait_until(
            lambda: _state(su, "idle in transaction"), 10, what="psql idle in transaction"
        )
        assert await app_locks(su), "no row locks seen"
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    took = await _next_client_updates(pool1, rows, 7)
    assert took < 3, f"next client needed {took:.1f} s"
    await wait_until(lambda: _clean(su), 3, what="no leftover transaction or lock")
    # The killed client's UPDATE was rolled back, not committed.
    assert await fetch_value(su, f"SELECT v FROM {rows} WHERE id = 2") == 0


async def test_asyncpg_aborted_holding_row_lock(pool1: PgmuxProcess, su: Su, rows: str) -> None:
    conn = await connect_asyncpg(pool1)
    await conn.execute("BEGIN")
    await conn.execute(f"UPDATE {rows} SET v = 99 WHERE id = 1")
    await conn.fetch(f"SELECT * FROM {rows} WHERE id = 2 FOR UPDATE")
    assert await _in_transaction(su)
    conn._transport.abort()  # RST, no Terminate
    conn.terminate()
    took = await _next_client_updates(pool1, rows, 8)
    assert took < 3, f"next client needed {took:.1f} s"
    await wait_until(lambda: _clean(su), 3, what="no leftover transaction or lock")
    assert await fetch_value(su, f"SELECT v FROM {rows} WHERE id = 1") == 8


async def test_raw_client_closes_in_transaction(pool1: PgmuxProcess, su: Su, rows: str) -> None:
    """FIN without Terminate, while idle in transaction with an uncommitted INSERT."""
    async with await RawClient.open(pool1.host, pool1.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        result = await client.simple_query(
            f"BEGIN; INSERT INTO {rows} VALUES (3, 3); CREATE TEMP TABLE ghost_tmp (x int);"
            " SET LOCAL statement_timeout = 1111; SET LOCAL search_path = nowhere"
        )
        assert not result.errors and result.status == "T", result
        await client.close()
    conn = await connect_asyncpg(pool1)
    try:
        assert await conn.fetchval(f"SELECT count(*) FROM public.{rows} WHERE id = 3") == 0
        assert await conn.fetchval("SELECT to_regclass('pg_temp.ghost_tmp')") is None
        assert await conn.fetchval("SHOW statement_timeout") == "0"
        assert await conn.fetchval("SHOW search_path") == '"$user", public'
    finally:
        await conn.close()
    assert await fetch_value(su, f"SELECT count(*) FROM {rows} WHERE id = 3") == 0
    await wait_until(lambda: _clean(su), 3, what="no leftover transaction or lock")


# -- killed in the middle of a query -----------------------------------------------------


async def test_disconnect_during_long_query(pool1: PgmuxProcess, su: Su) -> None:
    conn = await connect_asyncpg(pool1)
    task = asyncio.create_task(conn.fetchval("SELECT pg_sleep(30)"))
    await wait_until(lambda: _state(su, "active"), 5, what="pg_sleep running")
    conn._transport.abort()
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
        await task
    conn.terminate()
    started = time.monotonic()
    await wait_until(lambda: _state(su, "idle"), 3, what="server backend idle again")
    idle_after = time.monotonic() - started
    conn = await connect_asyncpg(pool1)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 5) == 1
    finally:
        await conn.close()
    assert idle_after < 3


async def test_psql_killed_during_long_query(pool1: PgmuxProcess, su: Su) -> None:
    with psql_process(pool1, "-c", "SELECT pg_sleep(30)") as proc:
        await wait_until(lambda: _state(su, "active"), 10, what="pg_sleep running")
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
    await wait_until(lambda: _state(su, "idle"), 3, what="server backend idle again")
    conn = await connect_asyncpg(pool1)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT 2"), 5) == 2
    finally:
        await conn.close()


async def test_disconnect_during_long_query_in_transaction(
    pool1: PgmuxProcess, su: Su, rows: str
) -> None:
    conn = await connect_asyncpg(pool1)
    await conn.execute("BEGIN")
    await conn.execute(f"UPDATE {rows} SET v = 50 WHERE id = 1")
    task = asyncio.create_task(conn.fetchval("SELECT pg_sleep(30)"))
    await wait_until(lambda: _state(su, "active"), 5, what="pg_sleep running")
    conn._transport.abort()
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
        await task
    conn.terminate()
    took = await _next_client_updates(pool1, rows, 9)
    assert took < 4, f"next client needed {took:.1f} s"
    await wait_until(lambda: _clean(su), 3, what="no leftover transaction or lock")


# -- killed during COPY FROM STDIN -------------------------------------------------------


@pytest.fixture
def copy_table(pg: PgCluster) -> str:
    pg.psql(
        "DROP TABLE IF EXISTS dirty_copy; CREATE TABLE dirty_copy (id int, note text);"
        f" ALTER TABLE dirty_copy OWNER TO {APP_USER}"
    )
    return "dirty_copy"


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "in-transaction"])
@pytest.mark.parametrize("how", ["abort", "close"])
async def test_disconnect_mid_copy_in(
    pool1: PgmuxProcess, su: Su, copy_table: str, in_transaction: bool, how: str
) -> None:
    async with await RawClient.open(pool1.host, pool1.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        if in_transaction:
            result = await client.simple_query(f"BEGIN; INSERT INTO {copy_table} VALUES (0, 'tx')")
            assert result.status == "T", result
        await client.send(query(f"COPY {copy_table} FROM STDIN"))
        typ, _ = await client.read_message()
        assert typ == b"G", typ
        payload = b"".join(b"%d\tsome text\n" % i for i in range(1000))
        for _ in range(5):
            await client.send(copy_data(payload))
        await client.send(copy_data(b"1000\tpartial ro"))  # half a row, then gone
        await wait_until(lambda: _state(su, "active"), 5, what="COPY running")
        if how == "abort":
            client.abort()
        else:
            await client.close()
    await wait_until(lambda: _clean(su), 3, what="server idle, no transaction after COPY")
    conn = await connect_asyncpg(pool1)
    try:
        assert await asyncio.wait_for(conn.fetchval(f"SELECT count(*) FROM {copy_table}"), 5) == 0
        assert await conn.fetchval("SELECT now() = now()") is True
    finally:
        await conn.close()
    assert await fetch_value(su, f"SELECT count(*) FROM {copy_table}") == 0


async def test_asyncpg_aborted_mid_copy_in(pool1: PgmuxProcess, su: Su, copy_table: str) -> None:
    conn = await connect_asyncpg(pool1)

    async def source() -> AsyncIterator[bytes]:
        for i in range(20):
            yield b"".join(b"%d\tx\n" % (i * 1000 + j) for j in range(1000))
            await asyncio.sleep(0)
            if i == 10:
                conn._transport.abort()
                return

    with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
        await conn.copy_to_table(copy_table, source=source())
    conn.terminate()
    await wait_until(lambda: _clean(su), 3, what="server idle, no transaction after COPY")
    conn = await connect_asyncpg(pool1)
    try:
        assert await asyncio.wait_for(conn.fetchval(f"SELECT count(*) FROM {copy_table}"), 5) == 0
    finally:
        await conn.close()


# -- abandoned transactions: nothing visible, nothing committed ---------------------------


async def _kill_psql(pool1: PgmuxProcess, su: Su, sql: str) -> None:
    with psql_process(pool1) as proc:
        assert proc.stdin is not None
        proc.stdin.write(sql)
        proc.stdin.flush()
        await wait_until(
            lambda: _state(su, "idle in transaction"), 10, what="psql idle in transaction"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)


async def _kill_asyncpg(pool1: PgmuxProcess, su: Su, sql: str) -> None:
    conn = await connect_asyncpg(pool1)
    await conn.execute(sql)
    assert await _in_transaction(su)
    conn._transport.abort()
    conn.terminate()


@pytest.mark.parametrize("kill", [_kill_psql, _kill_asyncpg], ids=["psql-sigkill", "asyncpg-rst"])
async def test_uncommitted_insert_of_killed_client(
    pool1: PgmuxProcess,
    su: Su,
    rows: str,
    kill: Callable[[PgmuxProcess, Su, str], Awaitable[None]],
) -> None:
    # The next client is already waiting for the pool's only server when the first dies.
    await kill(
        pool1,
        su,
        f"BEGIN;\nINSERT INTO {rows} VALUES (10, 10);\nSET LOCAL work_mem = '7MB';\n"
        "CREATE TEMP TABLE killed_tmp (x int);\n",
    )
    conn = await connect_asyncpg(pool1)
    try:
        started = time.monotonic()
        assert (
            await asyncio.wait_for(conn.fetchval(f"SELECT count(*) FROM {rows} WHERE id = 10"), 5)
            == 0
        )
        assert time.monotonic() - started < 3
        assert await conn.fetchval("SHOW work_mem") == "4MB"
        assert await conn.fetchval("SELECT to_regclass('pg_temp.killed_tmp')") is None
        # The key is free: the INSERT really was rolled back, not just invisible.
        await conn.execute(f"INSERT INTO {rows} VALUES (10, 11)")
    finally:
        await conn.close()
    assert await fetch_value(su, f"SELECT v FROM {rows} WHERE id = 10") == 11


async def test_waiting_client_served_when_holder_dies(
    pool1: PgmuxProcess, su: Su, rows: str
) -> None:
    holder = await connect_asyncpg(pool1)
    await holder.execute("BEGIN")
    await holder.execute(f"INSERT INTO {rows} VALUES (20, 20)")
    waiter = await connect_asyncpg(pool1)
    try:
        task = asyncio.create_task(waiter.fetchval(f"SELECT count(*) FROM {rows} WHERE id = 20"))
        await asyncio.sleep(0.3)
        assert not task.done()
        holder._transport.abort()
        holder.terminate()
        assert await asyncio.wait_for(task, 5) == 0
    finally:
        with contextlib.suppress(Exception):
            await waiter.close()
    await wait_until(lambda: _clean(su), 3, what="no leftover transaction or lock")


# -- other ways to leave a server dirty --------------------------------------------------


async def test_abandoned_failed_transaction(pool1: PgmuxProcess, su: Su, rows: str) -> None:
    """A client leaves while its transaction is in the failed state ('E')."""
    async with await RawClient.open(pool1.host, pool1.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        result = await client.simple_query(f"BEGIN; UPDATE {rows} SET v = 5 WHERE id = 1")
        assert result.status == "T"
        result = await client.simple_query("SELECT 1/0")
        assert result.status == "E" and result.errors[0]["C"] == "22012", result
        await client.close()
    took = await _next_client_updates(pool1, rows, 6)
    assert took < 3
    await wait_until(lambda: _clean(su), 3, what="no leftover transaction or lock")


async def test_graceful_close_inside_transaction(pool1: PgmuxProcess, su: Su, rows: str) -> None:
    """Terminate (asyncpg close()) while in a transaction: pgmux must roll it back."""
    conn = await connect_asyncpg(pool1)
    await conn.execute(f"BEGIN; UPDATE {rows} SET v = 77 WHERE id = 2")
    await conn.close()
    took = await _next_client_updates(pool1, rows, 1)
    assert took < 3
    assert await fetch_value(su, f"SELECT v FROM {rows} WHERE id = 2") == 0
    await wait_until(lambda: _clean(su), 3, what="no leftover transaction or lock")


@pytest.mark.parametrize("sql", ["SELECT pg_sleep(30)", "BEGIN"], ids=["sleep", "begin"])
async def test_extended_batch_without_sync_then_disconnect(
    pool1: PgmuxProcess, su: Su, sql: str
) -> None:
    """Parse/Bind/Execute with no Sync yet, then the client is gone."""
    async with await RawClient.open(pool1.host, pool1.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        await client.send(parse(sql) + bind() + execute() + flush())
        if sql.startswith("SELECT"):
            await wait_until(lambda: _state(su, "active"), 5, what="query running")
        else:
            got = await client.read_until(b"C")  # ParseComplete, BindComplete, BEGIN
            assert [typ for typ, _ in got] == [b"1", b"2", b"C"], got
            assert await _in_transaction(su)
        client.abort()
    await wait_until(lambda: _clean(su), 4, what="server idle, no transaction")
    conn = await connect_asyncpg(pool1)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT now() = now()"), 5) is True
    finally:
        await conn.close()


async def test_terminate_after_batch_without_sync(pool1: PgmuxProcess, su: Su) -> None:
    """asyncpg's client-side DataError leaves Parse/Describe/Flush without Sync and then
    closes: Terminate must close at once (as PostgreSQL does), not wait for a Sync."""
    async with await RawClient.open(pool1.host, pool1.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        await client.send(parse("SELECT $1::text") + message(b"D", b"S\0") + flush())
        got = await client.read_until(b"T")  # ParseComplete, ParameterDescription, RowDesc
        assert got[0][0] == b"1", got
        started = time.monotonic()
        await client.send(terminate())
        assert await client.read_until_eof(5) == b""
        assert time.monotonic() - started < 2
    conn = await connect_asyncpg(pool1)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT 7"), 5) == 7
    finally:
        await conn.close()
    await wait_until(lambda: _clean(su), 4, what="server idle, no transaction")


# -- session settings the server reports (ParameterStatus) follow their client ------------


async def test_reported_settings_follow_their_client(pool1: PgmuxProcess) -> None:
    """SET of a reported parameter (TimeZone, application_name, DateStyle) in transaction
    mode: the client keeps it on whatever server it gets next; others never see it."""
    a = await connect_asyncpg(pool1)
    b = await connect_asyncpg(pool1)
    try:
        default_tz = await b.fetchval("SHOW TimeZone")
        default_ds = await b.fetchval("SHOW DateStyle")
        await a.execute("SET TimeZone = 'Asia/Tokyo'")
        await a.execute("SET application_name = 'leaky'")
        await a.execute("SET DateStyle = 'German'")
        for _ in range(3):
            assert await b.fetchval("SHOW TimeZone") == default_tz
            assert await b.fetchval("SHOW application_name") == ""
            assert await b.fetchval("SHOW DateStyle") == default_ds
            assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
            assert await a.fetchval("SHOW application_name") == "leaky"
            assert await a.fetchval("SHOW DateStyle") == "German, DMY"
        # SET LOCAL and a rolled-back SET end with their transaction.
        async with a.transaction():
            await a.execute("SET LOCAL TimeZone = 'Europe/Paris'")
            assert await a.fetchval("SHOW TimeZone") == "Europe/Paris"
        tr = a.transaction()
        await tr.start()
        await a.execute("SET TimeZone = 'Africa/Cairo'")
        await tr.rollback()
        assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
        assert await b.fetchval("SHOW TimeZone") == default_tz
        await a.execute("RESET ALL")
        assert await a.fetchval("SHOW TimeZone") == default_tz
        assert await a.fetchval("SHOW application_name") == ""
    finally:
        await a.close()
        await b.close()


# -- the server goes away ----------------------------------------------------------------


async def test_idle_pooled_server_terminated(pg: PgCluster, pool1: PgmuxProcess, su: Su) -> None:
    conn = await connect_asyncpg(pool1)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        await fetch_value(su, "SELECT pg_terminate_backend(%s)", [pid])
        await wait_until(lambda: _no_backend(su, pid), 3, what="backend gone")
        await asyncio.sleep(0.2)
        started = time.monotonic()
        new_pid = await asyncio.wait_for(conn.fetchval("SELECT pg_backend_pid()"), 5)
        assert new_pid != pid
        assert time.monotonic() - started < 3
    finally:
        await conn.close()


async def _no_backend(su: Su, pid: int) -> bool:
    return all(p != pid for p, _, _, _ in await app_backends(su))


async def test_server_terminated_during_transaction(pool1: PgmuxProcess, su: Su) -> None:
    conn = await connect_asyncpg(pool1)
    try:
        await conn.execute("BEGIN")
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        task = asyncio.create_task(conn.fetchval("SELECT pg_sleep(10)"))
        await wait_until(lambda: _state(su, "active"), 5, what="pg_sleep running")
        await fetch_value(su, "SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)) as info:
            await asyncio.wait_for(task, 5)
        cause = info.value.__cause__ or info.value
        assert getattr(cause, "sqlstate", None) in ("57P01", "08006"), repr(info.value)
    finally:
        conn.terminate()
    conn = await connect_asyncpg(pool1)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 5) == 1
    finally:
        await conn.close()
