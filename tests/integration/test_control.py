"""The admin console's control commands against real clients and a real PostgreSQL.

PAUSE / RESUME (under load, and with PostgreSQL restarted in between), KILL_CLIENT,
KILL, DISABLE / ENABLE, RECONNECT / WAIT_CLOSE, cancelling a PAUSE that waits, what a
stats user may not do, SHUTDOWN, and PAUSE / RESUME acting on every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import subprocess
from collections import Counter
from collections.abc import Awaitable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import support.loops
from support.admin import Admin, Console, command, refused, show, start_with_admin
from support.helpers import (
    Su,
    app_backends,
    connect_asyncpg,
    connect_psycopg,
    error_of,
    run_psql,
    superuser,
    wait_until,
)
from support.loops import open_clients
from support.pgcluster import APP_DB, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess

DEADLINE = 30.0  # seconds: generous, the machine is small and shared


# -- helpers -----------------------------------------------------------------------------


async def state(admin: Admin) -> dict[str, str]:
    return {row["key"]: row["value"] for row in await show(admin, "STATE")}


async def pool_row(admin: Admin, database: str = APP_DB) -> dict[str, Any]:
    rows = [row for row in await show(admin, "POOLS") if row["database"] == database]
    assert len(rows) == 1, rows
    return rows[0]


async def app_clients(admin: Admin) -> list[dict[str, Any]]:
    """SHOW CLIENTS without the console sessions."""
    return [row for row in await show(admin, "CLIENTS") if row["database"] == APP_DB]


async def database_row(admin: Admin, database: str = APP_DB) -> dict[str, Any]:
    rows = [row for row in await show(admin, "DATABASES") if row["name"] == database]
    assert len(rows) == 1, rows
    return rows[0]


def psql_console(pgmux: PgmuxProcess, text: str) -> subprocess.CompletedProcess[str]:
    return run_psql(pgmux, "-c", text, user="admin", password="adminpw", dbname="pgbouncer")


async def no_app_backends(su: Su) -> bool:
    return not await app_backends(su)


async def not_done(task: asyncio.Future[Any], seconds: float = 0.5) -> bool:
    """True if ``task`` is still running after ``seconds`` (a bounded look, not a sync)."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return not done


async def finish(aw: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(aw, DEADLINE)


def pg_running(pg: PgCluster) -> bool:
    return (pg.datadir / "postmaster.pid").exists()


@contextlib.contextmanager
def restarting(pg: PgCluster) -> Iterator[None]:
    """Whatever happens inside, the shared cluster runs again afterwards."""
    try:
        yield
    finally:
        if not pg_running(pg):
            pg.start()


class Loops(support.loops.Loops):
    """Clients looping short transactions through pgmux until stopped.

    Each transaction reads the postmaster's start time (``started`` counts them by it),
    so transactions run after a restart of PostgreSQL can be told from the ones before.
    """

    def __init__(self, conns: list[asyncpg.Connection]) -> None:
        self.started: Counter[datetime.datetime] = Counter()
        super().__init__(conns, self._transaction)

    async def _transaction(self, i: int, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            started = await conn.fetchval("SELECT pg_postmaster_start_time()")
            assert await conn.fetchval("SELECT $1::int", i) == i
        self.started[started] += 1


# -- PAUSE and RESUME --------------------------------------------------------------------


async def test_pause_waits_for_servers_and_resume_releases_the_queue(
    pgmux_factory: PgmuxFactory, console: Console, su: Su
) -> None:
    pgmux = start_with_admin(pgmux_factory)
    admin = await console(pgmux)
    pauser = await console(pgmux)
    async with open_clients(pgmux, 8) as conns, open_clients(pgmux, 2) as (holder, late):
        loops = Loops(conns)
        try:
            await loops.each_did(3)
            # A transaction in flight keeps PAUSE waiting until it ends.
            await holder.execute("BEGIN")
            held_pid = await holder.fetchval("SELECT pg_backend_pid()")
            pause = asyncio.create_task(command(pauser, "PAUSE"))
            # Another console session is not held up by the PAUSE that waits.
            await wait_until(lambda: _paused(admin), DEADLINE, what="PAUSE to start")
            await wait_until(
                lambda: _only_server_is(admin, held_pid), DEADLINE, what="only the held server"
            )
            assert await not_done(pause), "PAUSE returned while a server was in use"
            # The transaction goes on; the loops' requests wait in the queue, no error.
            assert await holder.fetchval("SELECT pg_backend_pid()") == held_pid
            await holder.execute("COMMIT")
            assert await finish(pause) == "PAUSE"
            assert await show(admin, "SERVERS") == []
            await wait_until(lambda: no_app_backends(su), DEADLINE, what="no app backends")

            # New requests wait, and get no error.
            late_query = asyncio.create_task(late.fetchval("SELECT 42"))
            holder_query = asyncio.create_task(holder.fetchval("SELECT 43"))
            await wait_until(
                lambda: _waiting(admin, len(conns) + 2), DEADLINE, what="every client queued"
            )
            paused_counts = list(loops.counts)
            assert await not_done(late_query)
            assert loops.counts == paused_counts
            assert not loops.errors, loops.errors
            assert await show(admin, "SERVERS") == []
            assert await app_backends(su) == []
            row = await pool_row(admin)
            assert row["paused"] == 1 and row["cl_waiting"] == len(conns) + 2

            assert await command(admin, "RESUME") == "RESUME"
            assert await finish(late_query) == 42
            assert await finish(holder_query) == 43
            await loops.each_did(3, since=paused_counts)
            assert (await state(admin))["paused"] == "no"
        finally:
            await loops.stop()
    assert not loops.errors, loops.errors
    assert "PAUSE all databases: done, no server connections left" in pgmux.log()


async def _only_server_is(admin: Admin, pid: int) -> bool:
    servers = await show(admin, "SERVERS")
    return [s["remote_pid"] for s in servers] == [pid]


async def _waiting(admin: Admin, n: int) -> bool:
    row = await pool_row(admin)
    return bool(row["cl_waiting"] == n)


async def test_postgres_restarted_under_pause_without_client_errors(
    pgmux_factory: PgmuxFactory, console: Console, pg: PgCluster
) -> None:
    pgmux = start_with_admin(pgmux_factory)
    admin = await console(pgmux)
    with restarting(pg):
        async with open_clients(pgmux, 15) as conns:
            loops = Loops(conns)
            try:
                await loops.each_did(3)
                before = set(loops.started)
                assert len(before) == 1
                # As the README has it: psql -c PAUSE, restart, psql -c RESUME.
                paused = await asyncio.to_thread(psql_console, pgmux, "PAUSE")
                assert (paused.returncode, paused.stderr) == (0, "")
                assert await show(admin, "SERVERS") == []
                su = await superuser(pg)
                try:
                    await wait_until(lambda: no_app_backends(su), DEADLINE)
                finally:
                    await su.close()
                paused_total = loops.total
                await asyncio.to_thread(pg.restart)
                assert loops.total == paused_total  # nothing ran while paused
                assert not loops.errors, loops.errors
                resumed = await asyncio.to_thread(psql_console, pgmux, "RESUME")
                assert (resumed.returncode, resumed.stderr) == (0, "")
                await loops.each_did(10, since=list(loops.counts))
            finally:
                await loops.stop()
    assert not loops.errors, loops.errors
    after = {started: n for started, n in loops.started.items() if started not in before}
    assert len(after) == 1, loops.started  # one restart, one new postmaster
    assert sum(after.values()) >= 10 * len(conns), after


# -- killing clients ---------------------------------------------------------------------


async def test_kill_client_ends_exactly_that_client(
    pgmux_factory: PgmuxFactory, console: Console
) -> None:
    pgmux = start_with_admin(pgmux_factory)
    admin = await console(pgmux)
    conns = [await connect_psycopg(pgmux, application_name=f"kill-me-{i}") for i in range(3)]
    try:
        for conn in conns:
            assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        rows = await app_clients(admin)
        ids = {row["application_name"]: row["id"] for row in rows}
        assert set(ids) == {"kill-me-0", "kill-me-1", "kill-me-2"}, rows
        assert await command(admin, f"KILL_CLIENT {ids['kill-me-1']}") == "KILL_CLIENT"

        error = await killed(conns[1])
        assert (
            error.diag.message_primary
            == f"terminated by the admin console (KILL_CLIENT {ids['kill-me-1']})"
        )
        for conn in (conns[0], conns[2]):
            assert await conn_query(conn) == 7
        rows = await app_clients(admin)
        assert sorted(row["application_name"] for row in rows) == ["kill-me-0", "kill-me-2"]
        assert f"KILL_CLIENT {ids['kill-me-1']}: " in pgmux.log()

        # An unknown id is an ERROR with a hint; the admin session goes on.
        error = await refused(admin, "KILL_CLIENT 999999")
        assert error.diag.message_primary == "client not found"
        assert error.diag.message_hint == "SHOW CLIENTS lists the ids"
        error = await refused(admin, "KILL_CLIENT")
        assert error.diag.message_primary == "a client id is required"
        assert len(await app_clients(admin)) == 2
    finally:
        for conn in conns:
            await conn.close()


async def conn_query(conn: psycopg.AsyncConnection[Any]) -> Any:
    cur = await conn.execute("SELECT 7")
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def killed(conn: psycopg.AsyncConnection[Any]) -> psycopg.Error:
    """The error a client closed by the console meets on its next query (57P01)."""
    with pytest.raises(psycopg.errors.AdminShutdown) as info:
        await conn.execute("SELECT 1")
    assert info.value.sqlstate == "57P01"
    assert conn.closed or conn.broken
    return info.value


async def test_kill_database_closes_its_clients_and_servers_and_pauses_it(
    pgmux_factory: PgmuxFactory, console: Console, pg: PgCluster, su: Su
) -> None:
    other = {"host": pg.host, "port": pg.port, "dbname": APP_DB}
    pgmux = start_with_admin(pgmux_factory, databases={"other": other})
    admin = await console(pgmux)
    bystander = await connect_asyncpg(pgmux, database="other")
    busy = await connect_psycopg(pgmux)
    idle = await connect_psycopg(pgmux)
    try:
        await busy.execute("BEGIN")
        await busy.execute("SELECT 1")
        assert await conn_query(idle) == 7
        assert await bystander.fetchval("SELECT 3") == 3
        servers = await show(admin, "SERVERS")
        assert {s["database"] for s in servers} == {"app", "other"}

        assert await command(admin, "KILL app") == "KILL"
        for conn in (busy, idle):
            error = await killed(conn)
            assert error.diag.message_primary == (
                "terminated by the admin console (KILL app); reconnect once the database is resumed"
            )
        servers = await show(admin, "SERVERS")
        assert servers and {s["database"] for s in servers} == {"other"}, servers
        await wait_until(
            lambda: _backend_count(su, len(servers)), DEADLINE, what="app's backends gone"
        )
        # The other database goes on; app stays paused until RESUME app.
        assert await bystander.fetchval("SELECT 4") == 4
        assert (await database_row(admin))["paused"] == 1
        assert (await database_row(admin, "other"))["paused"] == 0
        assert (await state(admin))["paused_databases"] == "app"
        error = await refused(admin, "RESUME")
        assert error.diag.message_primary == "pooler is not paused/suspended"
        assert error.diag.message_hint == "paused databases need RESUME <db>: app"

        late = asyncio.create_task(_connect_and_query(pgmux))
        assert await not_done(late, 1.0), "a query ran on a killed (paused) database"
        assert await command(admin, "RESUME app") == "RESUME"
        assert await finish(late) == 5
        assert (await database_row(admin))["paused"] == 0
    finally:
        await bystander.close()
        await busy.close()
        await idle.close()


async def _connect_and_query(pgmux: PgmuxProcess) -> int:
    conn = await connect_asyncpg(pgmux, timeout=DEADLINE)
    try:
        return int(await conn.fetchval("SELECT 5"))
    finally:
        await conn.close()


async def _backend_count(su: Su, n: int) -> bool:
    return len(await app_backends(su)) == n


# -- DISABLE / ENABLE, RECONNECT / WAIT_CLOSE --------------------------------------------


async def test_disable_refuses_logins_and_enable_lets_them_in(
    pgmux_factory: PgmuxFactory,
    console: Console,
) -> None:
    pgmux = start_with_admin(pgmux_factory)
    admin = await console(pgmux)
    connected = await connect_asyncpg(pgmux)
    try:
        assert await command(admin, "DISABLE app") == "DISABLE"
        assert (await database_row(admin))["disabled"] == 1
        error = await error_of(connect_asyncpg(pgmux))
        assert error.sqlstate == "57P03", error
        assert 'database "app" is disabled' in str(error)
        # The connected client goes on.
        assert await connected.fetchval("SELECT 8") == 8
        async with connected.transaction():
            assert await connected.fetchval("SELECT 9") == 9

        error = await refused(admin, "DISABLE")
        assert error.diag.message_primary == "a database is required"
        error = await refused(admin, "DISABLE nosuchdb")
        assert error.diag.message_primary == "no such database: nosuchdb"
        assert error.diag.message_hint == "SHOW DATABASES lists them: app"

        assert await command(admin, "ENABLE app") == "ENABLE"
        assert (await database_row(admin))["disabled"] == 0
        async with open_clients(pgmux, 1) as (fresh,):
            assert await fresh.fetchval("SELECT 10") == 10
    finally:
        await connected.close()


async def test_reconnect_replaces_servers_as_released_and_wait_close_waits(
    pgmux_factory: PgmuxFactory, console: Console, su: Su
) -> None:
    pgmux = start_with_admin(pgmux_factory, default_pool_size=2)
    admin = await console(pgmux)
    waiter = await console(pgmux)
    async with open_clients(pgmux, 2) as (busy, idle):
        await busy.execute("BEGIN")
        old_pid = await busy.fetchval("SELECT pg_backend_pid()")
        other_pid = await idle.fetchval("SELECT pg_backend_pid()")
        assert other_pid != old_pid
        servers = await show(admin, "SERVERS")
        assert sorted(s["remote_pid"] for s in servers) == sorted([old_pid, other_pid])
        assert {s["close_needed"] for s in servers} == {0}

        assert await command(admin, "RECONNECT") == "RECONNECT"
        # The idle server closes now; the busy one is marked and serves on.
        await wait_until(
            lambda: _only_server_is(admin, old_pid), DEADLINE, what="idle server closed"
        )
        (server,) = await show(admin, "SERVERS")
        assert server["close_needed"] == 1
        wait_close = asyncio.create_task(command(waiter, "WAIT_CLOSE"))
        assert await not_done(wait_close), "WAIT_CLOSE returned with an old server open"
        assert await busy.fetchval("SELECT pg_backend_pid()") == old_pid
        await busy.execute("COMMIT")
        assert await finish(wait_close) == "WAIT_CLOSE"
        await wait_until(lambda: _pid_gone(su, old_pid), DEADLINE, what="the old backend to exit")
        new_pid = await busy.fetchval("SELECT pg_backend_pid()")
        assert new_pid not in (old_pid, other_pid)
        servers = await show(admin, "SERVERS")
        assert [(s["remote_pid"], s["close_needed"]) for s in servers] == [(new_pid, 0)]
        # Nothing old left: WAIT_CLOSE answers at once.
        assert await finish(command(waiter, "WAIT_CLOSE app")) == "WAIT_CLOSE"


async def _pid_gone(su: Su, pid: int) -> bool:
    return all(row[0] != pid for row in await app_backends(su))


# -- who may, cancelling, shutting down --------------------------------------------------


async def test_stats_user_may_show_but_not_pause(
    pgmux_factory: PgmuxFactory, console: Console
) -> None:
    pgmux = start_with_admin(pgmux_factory)
    watcher = await console(pgmux, "watcher", "watchpw")
    for text in ("PAUSE", "RESUME", "KILL_CLIENT 1", "RELOAD", "SET default_pool_size = 3"):
        error = await refused(watcher, text)
        assert error.diag.message_primary == "admin access needed", text
        assert "stats_users" in (error.diag.message_hint or ""), text
    # The session goes on, and nothing was paused.
    assert (await state(watcher))["paused"] == "no"
    assert await show(watcher, "VERSION")
    async with open_clients(pgmux, 1) as (conn,):
        assert await conn.fetchval("SELECT 11") == 11


async def test_cancelling_a_waiting_pause_resumes(
    pgmux_factory: PgmuxFactory, console: Console
) -> None:
    pgmux = start_with_admin(pgmux_factory)
    admin = await console(pgmux)
    pauser = await console(pgmux)
    async with open_clients(pgmux, 2) as (holder, other):
        await holder.execute("BEGIN")
        await holder.fetchval("SELECT 1")
        pause = asyncio.create_task(command(pauser, "PAUSE"))
        await wait_until(lambda: _paused(admin), DEADLINE, what="PAUSE to start")
        assert await not_done(pause)
        since = len(pgmux.log())
        await pauser.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled) as info:
            await finish(pause)
        assert info.value.diag.message_primary == "canceling statement due to user request"
        pgmux.wait_for_log("PAUSE all databases cancelled by the admin: resumed", since=since)
        assert (await state(admin))["paused"] == "no"
        # Not paused any more: another client gets a server while the holder holds one.
        assert await asyncio.wait_for(other.fetchval("SELECT 12"), DEADLINE) == 12
        await holder.execute("COMMIT")
        # The cancelled session goes on, and can PAUSE for real.
        assert await finish(command(pauser, "PAUSE")) == "PAUSE"
        assert await command(pauser, "RESUME") == "RESUME"


async def _paused(admin: Admin) -> bool:
    return (await state(admin))["paused"] == "yes"


async def test_shutdown_wait_for_clients_waits_for_the_last_client(
    pgmux_factory: PgmuxFactory,
    console: Console,
) -> None:
    pgmux = start_with_admin(pgmux_factory)
    admin = await console(pgmux)
    conn = await connect_asyncpg(pgmux)
    try:
        assert await command(admin, "SHUTDOWN WAIT_FOR_CLIENTS") == "SHUTDOWN"
        pgmux.wait_for_log("waiting for 2 clients to disconnect (WAIT_FOR_CLIENTS)")
        # Still serving the clients it has; taking no new ones.
        assert await conn.fetchval("SELECT 13") == 13
        assert pgmux.running
        with pytest.raises(OSError):
            await connect_asyncpg(pgmux)
        await admin.close()
        assert await conn.fetchval("SELECT 14") == 14
        assert pgmux.running
    finally:
        await conn.close()
    await wait_until(lambda: not pgmux.running, DEADLINE, what="pgmux to exit")
    assert pgmux.proc.returncode == 0
    assert "pgmux stopped" in pgmux.log()


async def test_shutdown_stops_pgmux_now(pgmux_factory: PgmuxFactory, console: Console) -> None:
    pgmux = start_with_admin(pgmux_factory)
    admin = await console(pgmux)
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT 15") == 15
        # The tag may or may not reach psql before the connection closes.
        with contextlib.suppress(psycopg.OperationalError):
            await command(admin, "SHUTDOWN")
        await wait_until(lambda: not pgmux.running, DEADLINE, what="pgmux to exit")
        assert pgmux.proc.returncode == 0
        await wait_until(conn.is_closed, DEADLINE, what="the client to be closed")
    finally:
        conn.terminate()
    log = pgmux.log()
    assert "SHUTDOWN (immediate) from the admin console" in log
    assert "pgmux stopped" in log


# -- workers -----------------------------------------------------------------------------


async def test_pause_and_resume_act_on_every_worker(
    pgmux_factory: PgmuxFactory, console: Console, su: Su
) -> None:
    pgmux = start_with_admin(pgmux_factory, workers=2, default_pool_size=4)
    admin = await console(pgmux)
    async with open_clients(pgmux, 16) as conns:
        assert {c.get_server_pid() % 2 for c in conns} == {0, 1}  # p = 2**-15 to fail
        loops = Loops(conns)
        try:
            await loops.each_did(2)
            servers = await show(admin, "SERVERS")
            assert {s["worker"] for s in servers} == {0, 1}, servers

            assert await finish(command(admin, "PAUSE")) == "PAUSE"
            assert await show(admin, "SERVERS") == []
            await wait_until(lambda: no_app_backends(su), DEADLINE, what="no app backends")
            await wait_until(lambda: _waiting(admin, len(conns)), DEADLINE, what="all queued")
            paused_counts = list(loops.counts)
            assert (await state(admin))["paused"] == "yes"
            assert await app_backends(su) == []
            assert loops.counts == paused_counts
            clients_rows = await app_clients(admin)
            assert {(r["worker"], r["state"]) for r in clients_rows} == {
                (0, "waiting"),
                (1, "waiting"),
            }

            assert await command(admin, "RESUME") == "RESUME"
            await loops.each_did(2, since=paused_counts)
            assert (await state(admin))["paused"] == "no"
        finally:
            await loops.stop()
    assert not loops.errors, loops.errors
    done = [line for line in pgmux.log().splitlines() if "PAUSE all databases: done" in line]
    assert len(done) == 2, done  # each worker paused its own part
