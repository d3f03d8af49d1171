"""The server a client is linked to is lost: in transaction mode the client's session
goes on (issue 12: "clients in a transaction on the old [primary] get 08006 for that
transaction only").

PostgreSQL's own pg_terminate_backend() ends the backend (FATAL 57P01, then the
connection closes), with real drivers in front. Each request still awaiting a reply gets
an ERROR 08006 naming the pool, the host and why, instead of the server's FATAL; a client
that was in a transaction block is in a failed block, answered by pgmux as PostgreSQL
answers one, until it ends it with ROLLBACK (or COMMIT, reported as ROLLBACK). Session
mode, a client pinned to its server, and a loss in the middle of a COPY keep the old
behaviour: the client gets a FATAL and its connection closes. Afterwards the pool is
clean: nothing left in SHOW POOLS, nothing idle in a transaction on the server.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest
from support.admin import ADMIN_USERS, Admin, Console, show
from support.faulty import FaultyRelay
from support.helpers import (
    Su,
    app_backends,
    app_table,
    connect_asyncpg,
    connect_psycopg,
    connect_raw,
    fetch_value,
    psql_command,
    tool_env,
    wait_until,
)
from support.pgcluster import APP_DB, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge
from support.wire import (
    RawClient,
    bind,
    copy_data,
    describe_portal,
    describe_statement,
    execute,
    flush,
    parse,
    parse_fields,
    query,
    sync,
)

LOST = 'server connection for pool "app/app" to 127.0.0.1:'
ADMIN_SHUTDOWN = "terminating connection due to administrator command"
ABORTED = "current transaction is aborted, commands ignored until end of transaction block"


@pytest.fixture
def proxy(pgmux_factory: PgmuxFactory) -> PgmuxProcess:
    return pgmux_factory(deep_merge(ADMIN_USERS, {"default_pool_size": 2}))


async def _terminate_busy(su: Su, what: str = "pg_sleep", state: str | None = "active") -> int:
    """pg_terminate_backend() on the app backend running ``what`` (in ``state``, if
    given); its pid."""

    async def busy() -> int | None:
        for pid, now, _, sql in await app_backends(su):
            if (state is None or now == state) and what in (sql or ""):
                return int(pid)
        return None

    pid = await wait_until(busy, 10, what=f"{what} running")
    assert await fetch_value(su, "SELECT pg_terminate_backend(%s)", [pid]) is True
    return int(pid)


async def _terminate(su: Su, pid: int) -> None:
    assert await fetch_value(su, "SELECT pg_terminate_backend(%s)", [pid]) is True

    async def gone() -> bool:
        return all(p != pid for p, _, _, _ in await app_backends(su))

    await wait_until(gone, 10, what=f"backend {pid} gone")


async def _assert_clean(admin: Admin, su: Su) -> None:
    """No server busy or client waiting in pgmux, nothing open on the server."""

    async def clean() -> bool:
        pools = [row for row in await show(admin, "POOLS") if row["database"] == APP_DB]
        idle_pools = all(row["sv_active"] == 0 and row["cl_waiting"] == 0 for row in pools)
        backends = await app_backends(su)
        return idle_pools and not any(xact for _, _, xact, _ in backends)

    await wait_until(clean, 10, what="pool and server clean")


def _errors_counted(pgmux: PgmuxProcess, reason: str) -> int:
    port = int(pgmux.config["metrics"]["listen_port"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0
    for line in text.splitlines():
        if line.startswith("pgmux_errors_total{") and f'reason="{reason}"' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


# -- asyncpg -----------------------------------------------------------------------------


async def test_asyncpg_transaction_fails_and_the_connection_goes_on(
    proxy: PgmuxProcess, su: Su, console: Console, pg: PgCluster
) -> None:
    admin = await console(proxy)
    conn = await connect_asyncpg(proxy)
    try:
        with app_table(pg, "loss_tx", "n int") as table:
            with pytest.raises(asyncpg.PostgresError) as info:
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
                    sleep = asyncio.create_task(conn.fetchval("SELECT pg_sleep(20)"))
                    await _terminate_busy(su)
                    await asyncio.wait_for(sleep, 10)
            # The statement's error; then asyncpg's ROLLBACK succeeded (else it raised).
            error = info.value
            assert error.sqlstate == "08006", repr(error)
            assert isinstance(error, asyncpg.ConnectionFailureError)
            message = str(error)
            assert message.startswith(LOST), message
            assert ADMIN_SHUTDOWN in message and "the transaction was rolled back" in message
            assert not conn.is_closed() and not conn.is_in_transaction()
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
            assert await conn.fetchval(f"SELECT array_agg(n) FROM {table}") == [2]
        await _assert_clean(admin, su)
        assert _errors_counted(proxy, "server_connection_lost") == 1
        assert "request(s) answered with 08006" in proxy.log()
    finally:
        await conn.close()


async def test_asyncpg_statement_outside_a_transaction(proxy: PgmuxProcess, su: Su) -> None:
    conn = await connect_asyncpg(proxy)
    try:
        sleep = asyncio.create_task(conn.fetchval("SELECT pg_sleep(20)"))
        await _terminate_busy(su)
        with pytest.raises(asyncpg.ConnectionFailureError) as info:
            await asyncio.wait_for(sleep, 10)
        assert info.value.sqlstate == "08006"
        assert not conn.is_in_transaction()
        assert await asyncio.wait_for(conn.fetchval("SELECT 41 + 1"), 10) == 42
    finally:
        await conn.close()


async def test_asyncpg_savepoint_then_outer_rollback(proxy: PgmuxProcess, su: Su) -> None:
    """A nested transaction (SAVEPOINT): its ROLLBACK TO finds the block failed (25P02,
    the savepoint went with the server), the outer ROLLBACK ends it."""
    conn = await connect_asyncpg(proxy)
    try:
        outer = conn.transaction()
        await outer.start()
        inner = conn.transaction()
        await inner.start()
        sleep = asyncio.create_task(conn.fetchval("SELECT pg_sleep(20)"))
        await _terminate_busy(su)
        with pytest.raises(asyncpg.ConnectionFailureError):
            await asyncio.wait_for(sleep, 10)
        with pytest.raises(asyncpg.InFailedSQLTransactionError) as info:
            await inner.rollback()
        assert info.value.message == ABORTED
        await outer.rollback()
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT 7") == 7
    finally:
        await conn.close()


async def test_asyncpg_named_statements_before_and_after(proxy: PgmuxProcess, su: Su) -> None:
    """asyncpg's statement cache (named statements): what it prepared before the loss
    works after it, on a server that never saw it."""
    conn = await connect_asyncpg(proxy, statement_cache_size=100)
    try:
        statement = await conn.prepare("SELECT $1::int * 2")
        assert await statement.fetchval(21) == 42
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        async with conn.transaction():
            assert await statement.fetchval(1) == 2
            sleep = asyncio.create_task(conn.fetchval("SELECT pg_sleep($1::int)", 20))
            await _terminate_busy(su)
            with pytest.raises(asyncpg.ConnectionFailureError):
                await asyncio.wait_for(sleep, 10)
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await statement.fetchval(2)  # a named statement in the failed block
            await conn.execute("ROLLBACK")
            await conn.execute("BEGIN")  # so asyncpg's own COMMIT at the end has a block
        assert await statement.fetchval(4) == 8
        assert await conn.fetchval("SELECT pg_sleep($1::int)", 0) is None
        assert await conn.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await conn.close()


# -- psycopg -----------------------------------------------------------------------------


async def test_psycopg_without_autocommit(proxy: PgmuxProcess, su: Su) -> None:
    conn = await connect_psycopg(proxy, autocommit=False)
    try:
        await conn.execute("SELECT 1")  # psycopg's BEGIN, then the query
        sleep = asyncio.create_task(conn.execute("SELECT pg_sleep(20)"))
        await _terminate_busy(su)
        with pytest.raises(psycopg.errors.ConnectionFailure) as info:
            await asyncio.wait_for(sleep, 10)
        assert info.value.sqlstate == "08006"
        assert not conn.closed
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            await conn.execute("SELECT 2")
        await conn.rollback()
        cur = await conn.execute("SELECT 3")
        assert await cur.fetchone() == (3,)
        await conn.commit()
    finally:
        await conn.close()


async def test_psycopg_prepared_statements(proxy: PgmuxProcess, su: Su) -> None:
    """psycopg with prepare_threshold = 0: every query a named statement."""
    conn = await connect_psycopg(proxy, prepare_threshold=0)
    try:
        for n in (1, 2):
            cur = await conn.execute("SELECT %s::int + 1", [n])
            assert await cur.fetchone() == (n + 1,)
        sleep = asyncio.create_task(conn.execute("SELECT pg_sleep(%s)", [20]))
        await _terminate_busy(su)
        with pytest.raises(psycopg.errors.ConnectionFailure):
            await asyncio.wait_for(sleep, 10)
        for n in (3, 4):
            cur = await conn.execute("SELECT %s::int + 1", [n])
            assert await cur.fetchone() == (n + 1,)
        cur = await conn.execute("SELECT pg_sleep(%s)", [0])
        assert await cur.fetchone() == ("",)
    finally:
        await conn.close()


# -- the protocol by hand, and psql -------------------------------------------------------


async def _failed_block(proxy: PgmuxProcess, su: Su) -> RawClient:
    """A raw client whose transaction block failed under it (BEGIN; a killed query)."""
    client = await connect_raw(proxy)
    assert (await client.simple_query("BEGIN")).status == "T"
    await client.send(query("SELECT pg_sleep(20)"))
    await _terminate_busy(su)
    result = await client.read_result()
    assert [e["C"] for e in result.errors] == ["08006"], result
    assert result.errors[0]["S"] == "ERROR"
    assert result.errors[0]["M"].startswith(LOST)
    assert "ROLLBACK" in result.errors[0]["H"]
    assert result.status == "E"
    return client


@pytest.mark.parametrize("end", ["COMMIT", "rollback;", "END WORK", "ABORT AND NO CHAIN"])
async def test_simple_protocol_block_ends_as_in_postgresql(
    proxy: PgmuxProcess, su: Su, console: Console, end: str
) -> None:
    admin = await console(proxy)
    async with await _failed_block(proxy, su) as client:
        for sql in ("SELECT 1", "ROLLBACK TO SAVEPOINT a", "SAVEPOINT a", "BEGIN"):
            result = await client.simple_query(sql)
            assert [(e["C"], e["M"]) for e in result.errors] == [("25P02", ABORTED)], sql
            assert result.status == "E"
        rows = [row for row in await show(admin, "CLIENTS") if row["database"] == APP_DB]
        assert [row["state"] for row in rows] == ["idle in transaction (aborted)"]
        result = await client.simple_query(" -- a comment\n  ")
        assert (result.errors, result.status) == ([], "E")
        result = await client.simple_query(end)
        assert (result.tags, result.errors, result.status) == (["ROLLBACK"], [], "I")
        result = await client.simple_query("SELECT 42")
        assert (result.rows, result.status) == ([["42"]], "I")
    await _assert_clean(admin, su)


async def test_rollback_then_more_in_one_query(proxy: PgmuxProcess, su: Su) -> None:
    """ROLLBACK ends the block and the rest of the query string runs on a server."""
    async with await _failed_block(proxy, su) as client:
        result = await client.simple_query("ROLLBACK; SELECT 5; SELECT 6")
        assert (result.tags, result.rows, result.status) == (
            ["ROLLBACK", "SELECT 1", "SELECT 1"],
            [["5"], ["6"]],
            "I",
        )


async def test_extended_protocol_in_the_failed_block(proxy: PgmuxProcess, su: Su) -> None:
    """An extended-query batch is refused through its Sync; a ROLLBACK sent through the
    extended protocol (pgjdbc, psycopg's pipeline mode) ends the block."""
    async with await _failed_block(proxy, su) as client:
        reply = await client.exchange(parse("SELECT 1") + bind() + execute() + sync())
        assert (reply.types, reply.sqlstates, reply.status) == ("EZ", ["25P02"], "E")
        reply = await client.exchange(
            parse("ROLLBACK") + bind() + describe_portal() + execute() + sync()
        )
        assert (reply.types, reply.tags, reply.status) == ("12nCZ", ["ROLLBACK"], "I")
        reply = await client.exchange(parse("SELECT 8") + bind() + execute() + sync())
        assert (reply.rows, reply.status) == ([["8"]], "I")


async def test_psql_commit_after_the_loss_reports_rollback(proxy: PgmuxProcess, su: Su) -> None:
    """psql sends each statement on its own: the killed pg_sleep fails with 08006, the
    COMMIT reports ROLLBACK as PostgreSQL does in a failed block, and the session goes
    on."""
    psql = await asyncio.create_subprocess_exec(
        *psql_command(proxy),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=tool_env(),
    )
    assert psql.stdin is not None
    psql.stdin.write(b"\\set QUIET off\nBEGIN;\nSELECT pg_sleep(20);\n")
    await psql.stdin.drain()
    await _terminate_busy(su)
    psql.stdin.write(b"COMMIT;\nSELECT 'still here';\n")
    psql.stdin.close()
    out, _ = await asyncio.wait_for(psql.communicate(), 20)
    text = out.decode()
    assert psql.returncode == 0, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0] == "BEGIN", text
    assert lines[1].startswith(f"ERROR:  {LOST}"), text
    assert "ROLLBACK" in lines and lines[-1] == "still here", text
    assert "FATAL" not in text and "connection to server" not in text, text


async def test_loss_while_idle_in_a_transaction(proxy: PgmuxProcess, su: Su) -> None:
    """Nothing was in flight: the client hears of the loss with its next request. A
    COMMIT then fails (an ERROR, never a ROLLBACK that looks like success)."""
    for then in ("INSERT", "COMMIT"):
        async with await connect_raw(proxy) as client:
            assert (await client.simple_query("BEGIN")).status == "T"
            pid = int((await client.simple_query("SELECT pg_backend_pid()")).rows[0][0] or 0)
            await _terminate(su, pid)
            result = await client.simple_query("SELECT 1" if then == "INSERT" else "COMMIT")
            assert [e["C"] for e in result.errors] == ["08006"], result
            assert "while this client was idle in a transaction" in result.errors[0]["M"]
            if then == "INSERT":
                assert result.status == "E"
                assert [e["C"] for e in (await client.simple_query("SELECT 2")).errors] == ["25P02"]
                assert (await client.simple_query("ROLLBACK")).tags == ["ROLLBACK"]
            else:
                assert result.status == "I"
            assert (await client.simple_query("SELECT 3")).rows == [["3"]]


async def test_pipelined_requests_are_all_answered(proxy: PgmuxProcess, su: Su) -> None:
    """Requests queued behind the one running were lost with it: one error each."""
    async with await connect_raw(proxy) as client:
        assert (await client.simple_query("BEGIN")).status == "T"
        await client.send(query("SELECT pg_sleep(20)") + query("SELECT 1") + query("SELECT 2"))
        await _terminate_busy(su)
        results = [await client.read_result() for _ in range(3)]
        assert [[e["C"] for e in r.errors] for r in results] == [["08006"]] * 3
        assert [r.status for r in results] == ["E"] * 3
        assert (await client.simple_query("ROLLBACK")).tags == ["ROLLBACK"]
        assert (await client.simple_query("SELECT 4")).rows == [["4"]]


async def test_batch_open_when_lost_fails_with_the_next_message(
    proxy: PgmuxProcess, su: Su
) -> None:
    """asyncpg without a statement cache prepares with Parse, Describe, Flush, and binds
    in a second round trip: lost in between, the batch fails with the client's Bind and
    the rest is discarded up to its Sync, as PostgreSQL does after an error there."""
    async with await connect_raw(proxy) as client:
        await client.send(parse("SELECT 4711") + describe_statement() + flush())
        assert (await client.read_until(b"T"))[0][0] == b"1"
        await _terminate_busy(su, "SELECT 4711", state=None)
        await asyncio.sleep(0.2)  # the FATAL reached pgmux: not relayed
        reply = await client.exchange(bind() + execute() + sync())
        assert (reply.types, reply.sqlstates, reply.status) == ("EZ", ["08006"], "I")
        assert (await client.simple_query("SELECT 5")).rows == [["5"]]


async def test_batch_waiting_for_replies_gets_the_error(proxy: PgmuxProcess, su: Su) -> None:
    """A client that sent Flush and waits for replies the lost server never sent gets
    the error without sending anything more (after BATCH_ERROR_GRACE); its Sync then
    gets the ReadyForQuery."""
    async with await connect_raw(proxy) as client:
        await client.send(parse("SELECT pg_sleep(20)") + bind() + execute() + flush())
        await _terminate_busy(su)
        got = await client.read_until(b"E", timeout=5)  # after ParseComplete, BindComplete
        assert [typ for typ, _ in got if typ not in b"12"] == [b"E"], got
        assert parse_fields(got[-1][1])["C"] == "08006"
        reply = await client.exchange(sync())
        assert (reply.types, reply.status) == ("Z", "I")
        assert (await client.simple_query("SELECT 6")).rows == [["6"]]


async def test_a_parse_in_flight_exists_as_the_client_saw_it(proxy: PgmuxProcess, su: Su) -> None:
    """A named Parse in the lost request: the statement exists afterwards exactly when
    the client got its ParseComplete, and a new server is given it when it is used."""
    async with await connect_raw(proxy) as client:
        await client.send(
            parse("SELECT pg_sleep($1::int)", "s1")
            + bind(statement="s1", params=["20"])
            + execute()
            + sync()
        )
        await _terminate_busy(su)
        lost = await client.read_until_ready()
        assert lost.sqlstates == ["08006"] and lost.status == "I", lost.types
        reply = await client.exchange(bind(statement="s1", params=["0"]) + execute() + sync())
        if "1" in lost.types:  # ParseComplete went out before the loss: it exists
            assert (reply.types, reply.status) == ("2DCZ", "I")
        else:
            assert reply.sqlstates == ["26000"], reply.types


async def test_statement_mode(pgmux_factory: PgmuxFactory, su: Su) -> None:
    proxy = pgmux_factory({"pool_mode": "statement"})
    async with await connect_raw(proxy) as client:
        await client.send(query("SELECT pg_sleep(20)"))
        await _terminate_busy(su)
        result = await client.read_result()
        assert ([e["C"] for e in result.errors], result.status) == (["08006"], "I")
        assert (await client.simple_query("SELECT 10")).rows == [["10"]]


async def test_idle_transaction_timeout_ends_a_failed_block(
    pgmux_factory: PgmuxFactory, su: Su
) -> None:
    """A failed block holds no server, but it is a transaction left open: the client's
    idle_transaction_timeout applies to it as to any other."""
    proxy = pgmux_factory({"idle_transaction_timeout": 1})
    async with await _failed_block(proxy, su) as client:
        typ, body = await client.read_message(timeout=5)
        fields = parse_fields(body)
        assert (typ, fields["S"], fields["C"]) == (b"E", "FATAL", "25P03"), fields
        assert await client.read_until_eof() == b""


# -- today's behaviour where the session cannot go on ----------------------------------


async def test_session_mode_keeps_the_fatal(pgmux_factory: PgmuxFactory, su: Su) -> None:
    proxy = pgmux_factory({"pool_mode": "session"})
    conn = await connect_asyncpg(proxy)
    try:
        sleep = asyncio.create_task(conn.fetchval("SELECT pg_sleep(20)"))
        await _terminate_busy(su)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await asyncio.wait_for(sleep, 10)
        await wait_until(conn.is_closed, 5, what="the connection closed")
    finally:
        conn.terminate()


async def test_pinned_client_keeps_the_fatal(proxy: PgmuxProcess, su: Su) -> None:
    conn = await connect_asyncpg(proxy)
    try:
        await conn.execute("CREATE TEMP TABLE pinned_by (n int)")  # pins the client
        sleep = asyncio.create_task(conn.fetchval("SELECT pg_sleep(20)"))
        await _terminate_busy(su)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await asyncio.wait_for(sleep, 10)
        await wait_until(conn.is_closed, 5, what="the connection closed")
    finally:
        conn.terminate()


async def test_a_reported_setting_changed_in_the_transaction_keeps_the_fatal(
    proxy: PgmuxProcess, su: Su
) -> None:
    """Rolling back a SET of application_name would need the lost server to report the
    old value: the client gets the FATAL, as before."""
    async with await connect_raw(proxy) as client:
        assert (await client.simple_query("BEGIN")).status == "T"
        await client.simple_query("SET LOCAL application_name = 'loss_probe'")
        await client.send(query("SELECT pg_sleep(20)"))
        await _terminate_busy(su)
        got = await client.read_until(b"E")  # after pg_sleep's RowDescription
        assert parse_fields(got[-1][1])["S"] == "FATAL", got
        assert await client.read_until_eof() == b""


async def test_loss_during_copy_keeps_the_fatal(proxy: PgmuxProcess, su: Su, pg: PgCluster) -> None:
    with app_table(pg, "loss_copy", "n int"):
        async with await connect_raw(proxy) as client:
            await client.send(query("COPY loss_copy FROM STDIN"))
            await client.read_until(b"G")
            await client.send(copy_data(b"1\n"))
            await _terminate_busy(su, "COPY")
            typ, body = await client.read_message()
            assert typ == b"E", (typ, body)
            assert b"FATAL" in body
            assert await client.read_until_eof() == b""


# -- no FATAL: the connection just drops -----------------------------------------------


@pytest.fixture
async def relay(pg: PgCluster) -> AsyncIterator[FaultyRelay]:
    relay = await FaultyRelay(pg.host, pg.port).start()
    yield relay
    await relay.close()


async def test_cut_connection_mid_query(
    pgmux_factory: PgmuxFactory, relay: FaultyRelay, su: Su
) -> None:
    proxy = pgmux_factory(
        {
            "default_pool_size": 2,
            "server_connect_timeout": 2,
            "databases": {"app": {"port": relay.port}},
        }
    )
    async with await connect_raw(proxy) as client:
        await client.send(query("SELECT pg_sleep(20)"))
        await asyncio.sleep(0.5)
        relay.cut()
        result = await client.read_result()
        assert [e["C"] for e in result.errors] == ["08006"], result
        assert re.search(r"was lost: server closed the connection", result.errors[0]["M"])
        assert result.status == "I"
        assert (await client.simple_query("SELECT 9")).rows == [["9"]]
    # The backend behind the cut sleeps on, unaware: end it, for the tests that follow.
    await _terminate_busy(su)
