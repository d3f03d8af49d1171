"""Session state through transaction pooling.

Settings (startup parameters, SET, RESET, set_config) follow a client to every server
it gets, and never leak to another client. State that cannot follow it (temporary
tables, session advisory locks, LISTEN, cursors WITH HOLD, SQL-level PREPARE) pins the
client to its server until cleared (``session_state = "pin"``), or is refused with
0A000 (``session_state = "error"``). See proxy/session_state.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
import pytest
from support.helpers import (
    Su,
    connect_asyncpg,
    connect_psycopg,
    connect_raw,
    error_of,
    fetch_all,
    log_lines,
    wait_until,
)
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess

DEFAULT_SEARCH_PATH = '"$user", public'
SETTINGS_SQL = (
    "SELECT pg_backend_pid(), current_setting('application_name'),"
    " current_setting('statement_timeout'), current_setting('search_path'),"
    " current_setting('work_mem')"
)


@pytest.fixture
def pool2(pgmux_factory: PgmuxFactory) -> PgmuxProcess:
    return pgmux_factory({"default_pool_size": 2})


async def _pid(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT pg_backend_pid()"))


async def _settings(conn: asyncpg.Connection) -> tuple[int, str, str, str, str]:
    """(backend pid, application_name, statement_timeout, search_path, work_mem)."""
    row = await conn.fetchrow(SETTINGS_SQL)
    assert row is not None
    return (row[0], row[1], row[2], row[3], row[4])


class Holders:
    """Two connections that keep a chosen server of a pool of 2 busy, so the next
    transaction of another client must land on the other server."""

    def __init__(self, pgmux: PgmuxProcess) -> None:
        self.pgmux = pgmux
        self.conns: list[asyncpg.Connection] = []

    async def __aenter__(self) -> Holders:
        self.conns = [await connect_asyncpg(self.pgmux) for _ in range(2)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)

    async def release(self) -> None:
        for conn in self.conns:
            if conn.is_in_transaction():
                await conn.execute("COMMIT")

    async def hold(self, pid: int) -> None:
        """Keep the server with backend ``pid`` in a transaction; the other one free."""
        await self.release()
        holder = None
        for conn in self.conns:
            await conn.execute("BEGIN")
            if await _pid(conn) == pid:
                holder = conn
                break
        assert holder is not None, f"no holder got the server with pid {pid}"
        for conn in self.conns:
            if conn is not holder and conn.is_in_transaction():
                await conn.execute("COMMIT")


# -- settings follow the client ----------------------------------------------------------


async def test_40_clients_own_settings(pgmux_factory: PgmuxFactory) -> None:
    """40 clients, each with its own application_name, statement_timeout and
    search_path (asyncpg server_settings, or psycopg options), 3 servers: every
    transaction sees the client's own values."""
    pgmux = pgmux_factory({"default_pool_size": 3})

    def expected(i: int) -> tuple[str, str, str]:
        return (f"ss_app_{i}", f"{10 + i}s", f"sp{i},public")

    async def via_asyncpg(i: int) -> set[int]:
        app, timeout, path = expected(i)
        conn = await connect_asyncpg(
            pgmux,
            timeout=60,
            server_settings={
                "application_name": app,
                "statement_timeout": timeout,
                "search_path": path,
            },
        )
        pids: set[int] = set()
        try:
            for t in range(10):
                if t % 2:
                    async with conn.transaction():
                        pid, *got = await _settings(conn)
                        await asyncio.sleep(0.002)
                        assert (pid, *got) == await _settings(conn)
                else:
                    pid, *got = await _settings(conn)
                assert tuple(got[:3]) == expected(i), (i, t, got)
                pids.add(pid)
        finally:
            await conn.close()
        return pids

    async def via_psycopg(i: int) -> set[int]:
        app, timeout, path = expected(i)
        pids: set[int] = set()
        async with await connect_psycopg(
            pgmux,
            application_name=app,
            options=f"-c statement_timeout={timeout} -c search_path={path}",
        ) as conn:
            for t in range(10):
                if t % 2:
                    async with conn.transaction():
                        rows = await fetch_all(conn, SETTINGS_SQL)
                        await asyncio.sleep(0.002)
                else:
                    rows = await fetch_all(conn, SETTINGS_SQL)
                pid, *got = rows[0]
                assert tuple(got[:3]) == expected(i), (i, t, got)
                pids.add(pid)
        return pids

    results = await asyncio.gather(
        *(via_psycopg(i) if i % 4 == 3 else via_asyncpg(i) for i in range(40))
    )
    servers = set().union(*results)
    assert len(servers) <= 3, servers
    assert any(len(pids) > 1 for pids in results), "no client ever changed servers"


async def test_set_follows_client_across_servers(pool2: PgmuxProcess) -> None:
    x = await connect_asyncpg(pool2)
    try:
        async with Holders(pool2) as holders:

            async def on_both_servers(
                check: Callable[[tuple[int, str, str, str, str]], None],
            ) -> None:
                """Run ``check`` on x's settings on one server, then on the other."""
                first = await _settings(x)
                check(first)
                await holders.hold(first[0])
                second = await _settings(x)
                await holders.release()
                assert second[0] != first[0], "x did not change servers"
                check(second)

            await x.execute("SET statement_timeout = '4s'")
            await x.execute("SET search_path = x, public")
            assert await x.fetchval("SELECT set_config('work_mem', '8MB', false)") == "8MB"

            def custom(s: tuple[int, str, str, str, str]) -> None:
                assert s[2:] == ("4s", "x, public", "8MB"), s

            await on_both_servers(custom)
            await on_both_servers(custom)

            # SET LOCAL ends with its transaction.
            async with x.transaction():
                await x.execute("SET LOCAL statement_timeout = '7s'")
                await x.execute("SET LOCAL work_mem = '1MB'")
                assert (await _settings(x))[2:] == ("7s", "x, public", "1MB")
            await on_both_servers(custom)

            # A SET in a rolled-back transaction is undone; in a committed one, kept.
            tr = x.transaction()
            await tr.start()
            await x.execute("SET work_mem = '16MB'")
            await tr.rollback()
            await on_both_servers(custom)
            async with x.transaction():
                await x.execute("SET work_mem = '9MB'")

            def work_mem_9(s: tuple[int, str, str, str, str]) -> None:
                assert s[2:] == ("4s", "x, public", "9MB"), s

            await on_both_servers(work_mem_9)

            await x.execute("RESET statement_timeout")

            def reset_timeout(s: tuple[int, str, str, str, str]) -> None:
                assert s[2:] == ("0", "x, public", "9MB"), s

            await on_both_servers(reset_timeout)

            await x.execute("RESET ALL")

            def defaults(s: tuple[int, str, str, str, str]) -> None:
                assert s[2:] == ("0", DEFAULT_SEARCH_PATH, "4MB"), s

            await on_both_servers(defaults)
    finally:
        await x.close()


async def _reset_sequence(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """SET then RESET / RESET ALL on a connection that logged in with settings."""
    seen = []

    async def look() -> None:
        row = await conn.fetchrow(
            "SELECT current_setting('statement_timeout'), current_setting('application_name')"
        )
        assert row is not None
        seen.append((row[0], row[1]))

    await look()
    await conn.execute("SET statement_timeout = '4s'")
    await conn.execute("SET application_name = 'changed'")
    await look()
    await conn.execute("RESET statement_timeout")
    await look()
    await conn.execute("RESET ALL")
    await look()
    await conn.execute("SET statement_timeout = '3s'")
    await conn.execute("DISCARD ALL")
    await look()
    return seen


async def test_reset_goes_back_to_startup_values(pg: PgCluster, pool2: PgmuxProcess) -> None:
    """RESET returns a setting to the value the client logged in with, as on PostgreSQL
    itself (the startup packet's value is the session default), not the server's."""
    settings = {"statement_timeout": "5s", "application_name": "startup_app"}
    direct = await asyncpg.connect(
        host=pg.host,
        port=pg.port,
        user=APP_USER,
        password=APP_PASSWORD,
        database=APP_DB,
        statement_cache_size=0,
        server_settings=settings,
    )
    try:
        want = await _reset_sequence(direct)
    finally:
        await direct.close()
    assert want[0] == ("5s", "startup_app") and want[2] == ("5s", "changed")  # the oracle
    pooled = await connect_asyncpg(pool2, server_settings=settings)
    try:
        got = await _reset_sequence(pooled)
    finally:
        await pooled.close()
    assert got == want, f"pgmux {got} != PostgreSQL {want}"


async def test_released_server_has_default_values(pool2: PgmuxProcess) -> None:
    """Clients with their own settings come and go; a client without settings then sees
    the defaults on every server of the pool."""

    async def custom_client(i: int) -> None:
        conn = await connect_asyncpg(
            pool2,
            server_settings={"application_name": f"gone_{i}", "statement_timeout": "3s"},
        )
        try:
            await conn.execute("SET search_path = gone, public")
            await conn.execute(f"SET work_mem = '{i + 5}MB'")
            for _ in range(5):
                async with conn.transaction():
                    assert (await _settings(conn))[1:3] == (f"gone_{i}", "3s")
                    await asyncio.sleep(0.005)
        finally:
            await conn.close()

    await asyncio.gather(*(custom_client(i) for i in range(6)))

    fresh = await connect_asyncpg(pool2)
    named = await connect_asyncpg(pool2, server_settings={"application_name": "fresh"})
    try:
        async with Holders(pool2) as holders:
            pids = set()
            for _ in range(2):
                pid, app, timeout, path, work_mem = await _settings(fresh)
                assert (app, timeout, path, work_mem) == ("", "0", DEFAULT_SEARCH_PATH, "4MB")
                assert await fresh.fetchval("SHOW statement_timeout") == "0"
                named_settings = await _settings(named)
                assert named_settings[1:] == ("fresh", "0", DEFAULT_SEARCH_PATH, "4MB")
                pids.add(pid)
                await holders.hold(pid)
            await holders.release()
            assert len(pids) == 2, pids
    finally:
        await fresh.close()
        await named.close()


async def test_pool_at_rest_has_default_settings(pool2: PgmuxProcess, su: Su) -> None:
    """Servers keep a connected client's settings between its transactions, so they need
    no replay; once no connected client has them, the janitor resets the idle servers.
    Seen from PostgreSQL itself, not through pgmux."""

    async def server_app_names() -> list[str]:
        rows = await fetch_all(
            su,
            "SELECT application_name FROM pg_stat_activity WHERE usename = %s ORDER BY 1",
            [APP_USER],
        )
        return [row[0] for row in rows]

    conns = [
        await connect_asyncpg(pool2, server_settings={"application_name": f"left_{i}"})
        for i in range(2)
    ]
    try:
        for conn in conns:
            await conn.execute("SET work_mem = '7MB'")
        # Both at once, so each client's settings end up on its own server.
        await asyncio.gather(*(conn.fetchval("SELECT pg_sleep(0.3)") for conn in conns))
        await asyncio.sleep(1.5)  # three janitor sweeps: nothing to reset yet
        assert await server_app_names() == ["left_0", "left_1"]
    finally:
        for conn in conns:
            await conn.close()

    async def reset() -> bool:
        return await server_app_names() == ["", ""]

    await wait_until(reset, timeout=5, what="idle servers reset to default settings")


# -- pinning ------------------------------------------------------------------------------


def _pin_lines(pgmux: PgmuxProcess, since: int = 0) -> list[str]:
    return [line for line in log_lines(pgmux, since) if ": pinned to " in line]


def _unpin_lines(pgmux: PgmuxProcess, since: int = 0) -> list[str]:
    return [line for line in log_lines(pgmux, since) if "session state cleared" in line]


async def test_pin_temp_table(pool2: PgmuxProcess) -> None:
    x = await connect_asyncpg(pool2)
    y = await connect_asyncpg(pool2)
    try:
        await x.execute("CREATE TEMP TABLE pin_t (x int)")
        pid = await _pid(x)
        await wait_until(lambda: _pin_lines(pool2), what="pin log line")
        for n in range(5):
            await x.execute("INSERT INTO pin_t VALUES ($1)", n)
            async with x.transaction():
                assert await _pid(x) == pid
                assert await x.fetchval("SELECT count(*) FROM pin_t") == n + 1
            # y gets the other server and has no pin_t.
            assert await _pid(y) != pid
            assert await y.fetchval("SELECT to_regclass('pin_t') IS NULL") is True
        assert len(_pin_lines(pool2)) == 1
        assert not _unpin_lines(pool2)
        await x.execute("DISCARD TEMP")
        await wait_until(lambda: _unpin_lines(pool2), what="unpin log line")
        # Unpinned: x's transactions can land on the other server now.
        async with Holders(pool2) as holders:
            await holders.hold(pid)
            assert await _pid(x) != pid
            await holders.release()
    finally:
        await x.close()
        await y.close()


async def test_pin_advisory_lock_pool1(pool1: PgmuxProcess, su: Su) -> None:
    """A session advisory lock pins; the only server is then not available to others
    until pg_advisory_unlock_all(), which unpins."""
    x = await connect_asyncpg(pool1)
    y = await connect_asyncpg(pool1)
    try:
        await x.execute("SELECT pg_advisory_lock(42)")
        pid = await _pid(x)
        await wait_until(lambda: _pin_lines(pool1), what="pin log line")
        for _ in range(3):
            async with x.transaction():
                assert await _pid(x) == pid
        assert await fetch_all(
            su, "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND pid = %s", [pid]
        ) == [(42,)]
        waiting = asyncio.create_task(y.fetchval("SELECT pg_backend_pid()"))
        await asyncio.sleep(0.5)
        assert not waiting.done(), "another client got the pinned server"
        await x.execute("SELECT pg_advisory_unlock_all()")
        assert await asyncio.wait_for(waiting, 5) == pid
        await wait_until(lambda: _unpin_lines(pool1), what="unpin log line")
        assert not await fetch_all(su, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")
        # Both take turns on the one server now.
        for _ in range(3):
            assert await x.fetchval("SELECT 1") == 1
            assert await y.fetchval("SELECT 2") == 2
    finally:
        await x.close()
        await y.close()


async def test_pin_advisory_lock_pid_changes_after_unlock(pool2: PgmuxProcess) -> None:
    x = await connect_asyncpg(pool2)
    try:
        await x.execute("SELECT pg_advisory_lock(43)")
        pid = await _pid(x)
        await x.execute("SELECT pg_advisory_unlock_all()")
        await wait_until(lambda: _unpin_lines(pool2), what="unpin log line")
        async with Holders(pool2) as holders:
            await holders.hold(pid)
            assert await _pid(x) != pid
            await holders.release()
    finally:
        await x.close()


async def test_pin_listen_notify(pool2: PgmuxProcess) -> None:
    listener = await connect_asyncpg(pool2)
    sender = await connect_asyncpg(pool2)
    got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_notify(conn: Any, pid: int, channel: str, payload: str) -> None:
        got.put_nowait((channel, payload))

    try:
        await listener.add_listener("chan_a", on_notify)
        await listener.add_listener("chan_b", on_notify)
        pid = await _pid(listener)
        for n in range(3):
            await sender.execute(f"NOTIFY chan_a, 'a{n}'")
            await sender.execute("SELECT pg_notify('chan_b', $1)", f"b{n}")
            assert await asyncio.wait_for(got.get(), 5) == ("chan_a", f"a{n}")
            assert await asyncio.wait_for(got.get(), 5) == ("chan_b", f"b{n}")
            assert await _pid(listener) == pid
        # A notification while the listener sits idle.
        await sender.execute("NOTIFY chan_a, 'idle'")
        assert await asyncio.wait_for(got.get(), 5) == ("chan_a", "idle")
        await listener.remove_listener("chan_b", on_notify)  # UNLISTEN chan_b: still pinned
        assert not _unpin_lines(pool2)
        await listener.execute("UNLISTEN *")
        await wait_until(lambda: _unpin_lines(pool2), what="unpin log line")
        assert len(_pin_lines(pool2)) == 1
    finally:
        await listener.close()
        await sender.close()


async def test_pin_cursor_with_hold(pool2: PgmuxProcess) -> None:
    x = await connect_asyncpg(pool2)
    try:
        await x.execute("DECLARE c CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 9) g")
        pid = await _pid(x)
        for start in (1, 4, 7):
            rows = await x.fetch("FETCH 3 FROM c")
            assert [r[0] for r in rows] == [start, start + 1, start + 2]
            assert await _pid(x) == pid
        await wait_until(lambda: _pin_lines(pool2), what="pin log line")
        await x.execute("CLOSE c")
        await wait_until(lambda: _unpin_lines(pool2), what="unpin log line")
    finally:
        await x.close()


async def test_pin_sql_prepare(pool2: PgmuxProcess) -> None:
    x = await connect_asyncpg(pool2)
    try:
        await x.execute("PREPARE p(int) AS SELECT $1 * 2")
        pid = await _pid(x)
        for n in range(3):
            assert await x.fetchval(f"EXECUTE p({n})") == n * 2
            assert await _pid(x) == pid
        await wait_until(lambda: _pin_lines(pool2), what="pin log line")
        assert "SQL-level PREPARE" in _pin_lines(pool2)[0]
        await x.execute("DEALLOCATE p")
        await wait_until(lambda: _unpin_lines(pool2), what="unpin log line")
    finally:
        await x.close()


async def test_discard_all_clears_pins(pool1: PgmuxProcess, su: Su) -> None:
    x = await connect_asyncpg(pool1)
    y = await connect_asyncpg(pool1)
    try:
        await x.execute("CREATE TEMP TABLE pin_t (x int)")
        await x.execute("SELECT pg_advisory_lock(44)")
        await x.execute("LISTEN chan_c")
        await x.execute("PREPARE p AS SELECT 1")
        await wait_until(lambda: len(_pin_lines(pool1)) >= 4, what="4 pin reasons")
        await x.execute("DISCARD ALL")
        await wait_until(lambda: _unpin_lines(pool1), what="unpin log line")
        assert await asyncio.wait_for(y.fetchval("SELECT to_regclass('pin_t') IS NULL"), 5)
        assert not await fetch_all(su, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")
    finally:
        await x.close()
        await y.close()


async def test_pinned_client_blocks_pool1_until_it_leaves(pool1: PgmuxProcess, su: Su) -> None:
    """Pool of 1: a pinned client keeps the server; when it disconnects, the waiting
    client gets that server, cleaned (no temp table, no lock, no LISTEN)."""
    x = await connect_asyncpg(pool1)
    y = await connect_asyncpg(pool1)
    try:
        await x.execute("CREATE TEMP TABLE pin_t (x int)")
        await x.execute("INSERT INTO pin_t VALUES (1)")
        await x.execute("SELECT pg_advisory_lock(45)")
        await x.execute("LISTEN chan_d")
        pid = await _pid(x)
        waiting = asyncio.create_task(
            y.fetchrow(
                "SELECT pg_backend_pid(), to_regclass('pin_t') IS NULL,"
                " (SELECT count(*) FROM pg_listening_channels())"
            )
        )
        await asyncio.sleep(0.5)
        assert not waiting.done(), "another client got the pinned server"
        await x.close()
        row = await asyncio.wait_for(waiting, 5)
        assert tuple(row) == (pid, True, 0)
        assert not await fetch_all(su, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")
    finally:
        await x.close()
        await y.close()


async def test_pin_log_line_once_per_reason(pool2: PgmuxProcess) -> None:
    x = await connect_asyncpg(pool2, server_settings={"application_name": "pin_logger"})
    try:
        long_sql = "CREATE TEMP TABLE pin_log_t (x int) -- " + "c" * 300
        await x.execute(long_sql)
        await wait_until(lambda: _pin_lines(pool2), what="pin log line")
        await x.execute("INSERT INTO pin_log_t VALUES (1)")
        await x.execute("CREATE TEMP TABLE pin_log_t2 (x int)")  # same reason: no new line
        await x.execute("SELECT pg_advisory_lock(46)")  # new reason: one new line
        await wait_until(lambda: len(_pin_lines(pool2)) >= 2, what="second pin log line")
        await x.execute("SELECT pg_advisory_lock(47)")
        await x.execute("SELECT 1")
        await asyncio.sleep(0.2)
        lines = _pin_lines(pool2)
        assert len(lines) == 2, lines
        first, second = lines
        assert "application_name=pin_logger" in first and "temporary table" in first
        assert "session advisory lock" not in first
        assert long_sql[:200] in first and long_sql[:201] not in first
        assert "C-" in first  # the client
        assert "application_name=pin_logger" in second and "session advisory lock" in second
        assert "temporary table" not in second
        assert "SELECT pg_advisory_lock(46)" in second
    finally:
        await x.close()


async def test_pin_log_line_names_statement_in_transaction(pool2: PgmuxProcess) -> None:
    """The log line names the statement that created the state, also when more
    statements follow it in the transaction."""
    x = await connect_asyncpg(pool2, server_settings={"application_name": "pin_tx"})
    try:
        async with x.transaction():
            await x.execute("CREATE TEMP TABLE pin_tx_t (x int)")
            await x.execute("INSERT INTO pin_tx_t VALUES (1)")
        await wait_until(lambda: _pin_lines(pool2), what="pin log line")
        (line,) = _pin_lines(pool2)
        assert "CREATE TEMP TABLE pin_tx_t" in line, line
    finally:
        await x.close()


# -- session_state = "error" ----------------------------------------------------------------


@pytest.fixture
def refusing(pgmux_factory: PgmuxFactory) -> PgmuxProcess:
    return pgmux_factory({"default_pool_size": 2, "session_state": "error"})


@pytest.mark.parametrize(
    ("sql", "feature"),
    [
        ("CREATE TEMP TABLE refused_t (a int)", "temporary tables"),
        ("CREATE TEMPORARY TABLE refused_t AS SELECT 1 AS a", "temporary tables"),
        ("SELECT 1 AS a INTO TEMP refused_t", "temporary tables"),
        ("SELECT pg_advisory_lock(1)", "session advisory locks"),
        ("SELECT pg_try_advisory_lock(1)", "session advisory locks"),
        ("LISTEN refused_chan", "LISTEN"),
        ("PREPARE refused_p AS SELECT 1", "SQL-level PREPARE"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "cursors WITH HOLD"),
    ],
)
async def test_error_mode_refuses(refusing: PgmuxProcess, su: Su, sql: str, feature: str) -> None:
    async with await connect_psycopg(refusing) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            await conn.execute(sql)
        assert info.value.sqlstate == "0A000"
        assert feature in str(info.value), str(info.value)
        assert info.value.diag.message_hint and "session_state" in info.value.diag.message_hint
        # Nothing happened on the server, and the session carries on.
        assert (await (await conn.execute("SELECT 1")).fetchone()) == (1,)
        assert await (await conn.execute("SELECT to_regclass('refused_t')")).fetchone() == (None,)
    assert not await fetch_all(su, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")
    assert not [line for line in log_lines(refusing) if ": pinned to " in line]


async def test_error_mode_in_transaction(refusing: PgmuxProcess) -> None:
    async with await connect_psycopg(refusing, autocommit=False) as conn:
        await conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            await conn.execute("CREATE TEMP TABLE refused_t (a int)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            await conn.execute("SELECT 2")
        await conn.rollback()
        assert await (await conn.execute("SELECT 3")).fetchone() == (3,)
        await conn.commit()
    async with await connect_raw(refusing) as raw:
        assert (await raw.simple_query("BEGIN")).status == "T"
        result = await raw.simple_query("SELECT pg_advisory_lock(5)")
        assert [e["C"] for e in result.errors] == ["0A000"] and result.status == "E"
        assert (await raw.simple_query("ROLLBACK")).status == "I"
        assert (await raw.simple_query("SELECT 4")).rows == [["4"]]


async def test_error_mode_allows_transaction_scoped_state(refusing: PgmuxProcess, su: Su) -> None:
    async with await connect_psycopg(refusing, autocommit=False) as conn:
        await conn.execute("CREATE TEMP TABLE ok_t (a int) ON COMMIT DROP")
        await conn.execute("INSERT INTO ok_t VALUES (1)")
        assert await (await conn.execute("SELECT count(*) FROM ok_t")).fetchone() == (1,)
        await conn.execute("SELECT pg_advisory_xact_lock(6)")
        await conn.commit()
        assert await (await conn.execute("SELECT to_regclass('ok_t')")).fetchone() == (None,)
        await conn.commit()
    assert not await fetch_all(su, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'")
    assert not [line for line in log_lines(refusing) if ": pinned to " in line]


async def test_error_mode_extended_protocol(refusing: PgmuxProcess) -> None:
    """asyncpg prepares (Parse) before it executes: the refusal comes at the Parse."""
    conn = await connect_asyncpg(refusing, statement_cache_size=100)
    try:

        async def refused(call: Awaitable[object]) -> None:
            error = await error_of(call)
            assert error.sqlstate == "0A000", error

        await refused(conn.fetchval("SELECT pg_advisory_lock($1)", 1))
        await refused(conn.fetch("CREATE TEMP TABLE refused_t (a int)"))
        await refused(conn.prepare("LISTEN refused_chan"))
        assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", 7)
        tr = conn.transaction()
        await tr.start()
        await refused(conn.fetchval("SELECT pg_try_advisory_lock($1)", 8))
        error = await error_of(conn.fetchval("SELECT 1"))
        assert error.sqlstate == "25P02"
        await tr.rollback()
        assert await conn.fetchval("SELECT 5") == 5
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 'shipped with hold' AS note",
        "SELECT 'please create temp table later' AS note",
    ],
)
async def test_error_mode_no_false_refusal(refusing: PgmuxProcess, sql: str) -> None:
    """Words inside a string literal are not statements: nothing to refuse."""
    async with await connect_psycopg(refusing) as conn:
        cur = await conn.execute(sql)
        assert (await cur.fetchone()) is not None


# -- state pgmux cannot see in the statement ------------------------------------------------


@pytest.fixture
def hidden_state_functions(pg: PgCluster) -> None:
    """Functions that change session state where neither the call's text nor its
    CommandComplete tag says so."""
    pg.psql(
        "CREATE OR REPLACE FUNCTION public.ss_tune() RETURNS int LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM pg_catalog.set_config('work_mem', '2MB', false); RETURN 1; END $$;"
        " CREATE OR REPLACE FUNCTION public.ss_scratch() RETURNS int LANGUAGE plpgsql AS $$"
        " BEGIN EXECUTE 'CREATE TEMP TABLE IF NOT EXISTS ss_scratch_t (x int)'; RETURN 1; END $$;"
        " GRANT EXECUTE ON FUNCTION public.ss_tune(), public.ss_scratch() TO PUBLIC"
    )


@pytest.fixture
def always_checked(pgmux_factory: PgmuxFactory) -> PgmuxProcess:
    """A pool of 1 that checks session state after every transaction: what a function
    does inside (set_config, CREATE TEMP TABLE) shows no tag or keyword to pgmux."""
    return pgmux_factory({"default_pool_size": 1, "session_state_check": "always"})


async def test_setting_changed_inside_function_does_not_leak(
    always_checked: PgmuxProcess, hidden_state_functions: None
) -> None:
    x = await connect_asyncpg(always_checked)
    y = await connect_asyncpg(always_checked)
    try:
        assert await x.fetchval("SELECT ss_tune()") == 1
        assert await x.fetchval("SHOW work_mem") == "2MB"
        assert await y.fetchval("SHOW work_mem") == "4MB", "x's work_mem leaked to y"
    finally:
        await x.close()
        await y.close()


async def test_temp_table_created_inside_function_does_not_leak(
    always_checked: PgmuxProcess, hidden_state_functions: None
) -> None:
    x = await connect_asyncpg(always_checked)
    y = await connect_asyncpg(always_checked)
    try:
        assert await x.fetchval("SELECT ss_scratch()") == 1
        await x.execute("INSERT INTO ss_scratch_t VALUES (1)")
        waiting = asyncio.create_task(y.fetchval("SELECT to_regclass('ss_scratch_t') IS NULL"))
        await asyncio.sleep(0.3)
        await x.close()  # if x was pinned, y gets the server now, cleaned
        assert await asyncio.wait_for(waiting, 5) is True, "x's temp table leaked to y"
    finally:
        await x.close()
        await y.close()


async def test_set_role_does_not_leak(pg: PgCluster, pool1: PgmuxProcess) -> None:
    """SET ROLE is a session setting pg_settings does not show (GUC_NO_SHOW_ALL)."""
    pg.psql(
        "DO $$ BEGIN CREATE ROLE ss_role NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL;"
        f" END $$; GRANT ss_role TO {APP_USER}"
    )
    x = await connect_asyncpg(pool1)
    y = await connect_asyncpg(pool1)
    try:
        await x.execute("SET ROLE ss_role")
        assert await x.fetchval("SELECT current_user") == "ss_role"
        assert await y.fetchval("SELECT current_user") == APP_USER, "x's role leaked to y"
        assert await x.fetchval("SELECT current_user") == "ss_role"
    finally:
        await x.close()
        await y.close()
