"""Reloading the configuration of a running pgmux: RELOAD, SIGHUP and SET.

Pool sizes change live (seen in pg_stat_activity and in SHOW POOLS / DATABASES), a
file that does not load is refused and the old configuration keeps running, a changed
server and a new database apply without a restart while connected clients go on, SET
changes one setting (not those needing a restart), and with workers every worker
reloads.
"""

from __future__ import annotations

import asyncio
import os
import signal

import asyncpg
import pytest
from support.admin import Admin, Console, command, refused, show, start_with_admin
from support.helpers import (
    Su,
    app_backends,
    connect_asyncpg,
    counting_backends,
    error_of,
    fetch_all,
    wait_until,
)
from support.loops import Loops, open_clients
from support.pgcluster import APP_DB, APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge, to_toml

DEADLINE = 30.0  # seconds: generous, the machine is small and shared
SLEEP = "SELECT pg_sleep(0.1)::text"


# -- helpers -----------------------------------------------------------------------------


async def config_value(admin: Admin, key: str) -> str:
    rows = [row["value"] for row in await show(admin, "CONFIG") if row["key"] == key]
    assert len(rows) == 1, key
    return str(rows[0])


async def pool_sizes(admin: Admin, database: str = APP_DB) -> tuple[int, int]:
    """(SHOW POOLS pool_size, SHOW DATABASES pool_size) of ``database``."""
    pools = [r["pool_size"] for r in await show(admin, "POOLS") if r["database"] == database]
    dbs = [r["pool_size"] for r in await show(admin, "DATABASES") if r["name"] == database]
    assert len(pools) == 1 and len(dbs) == 1, (pools, dbs)
    return pools[0], dbs[0]


async def reload(pgmux: PgmuxProcess, admin: Admin, how: str) -> None:
    """Have pgmux re-read its file: RELOAD on the console, or SIGHUP."""
    since = len(pgmux.log())
    if how == "console":
        assert await command(admin, "RELOAD") == "RELOAD"
    else:
        pgmux.signal(signal.SIGHUP)
    for _ in range(pgmux.workers):  # each worker logs its own reload
        line = pgmux.wait_for_log("reloaded ", DEADLINE, since=since)
        since = pgmux.log().index(line, since) + len(line)


def write_raw(pgmux: PgmuxProcess, text: str) -> None:
    """Replace the config file with ``text`` atomically (it may not even be TOML)."""
    tmp = pgmux.config_path.with_suffix(".toml.raw")
    tmp.write_text(text)
    os.replace(tmp, pgmux.config_path)


async def backend_count(su: Su) -> int:
    return len(await app_backends(su))


class Sleepers(Loops):
    """Clients each running short pg_sleep requests (or ``sql``) until stopped."""

    def __init__(self, conns: list[asyncpg.Connection], sql: str = SLEEP) -> None:
        super().__init__(conns, lambda i, conn: conn.fetchval(sql))


async def max_backends_under(su: Su, sleepers: Sleepers, rounds: int = 3) -> int:
    """The most app backends PostgreSQL had while every sleeper did ``rounds`` more."""
    async with counting_backends(su) as samples:
        await sleepers.each_did(rounds)
    assert len(samples) >= 5, samples
    return max(samples)


# -- pool_size -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["console", "sighup"])
async def test_reload_changes_pool_size_live(
    pgmux_factory: PgmuxFactory, console: Console, su: Su, how: str
) -> None:
    pgmux = start_with_admin(pgmux_factory, default_pool_size=2)
    admin = await console(pgmux)
    await wait_until(lambda: _no_backends(su), DEADLINE, what="no app backends left over")
    async with open_clients(pgmux, 6) as conns:
        sleepers = Sleepers(conns)
        try:
            assert await max_backends_under(su, sleepers) == 2
            assert await pool_sizes(admin) == (2, 2)

            pgmux.write_config(deep_merge(pgmux.config, {"default_pool_size": 4}))
            await reload(pgmux, admin, how)
            assert await pool_sizes(admin) == (4, 4)
            assert await config_value(admin, "default_pool_size") == "4"
            # The larger pool serves the queue now: up to 4 backends, never more.
            await wait_until(lambda: _backends_are(su, 4), DEADLINE, what="4 app backends")
            assert await max_backends_under(su, sleepers) == 4
        finally:
            await sleepers.stop()
        assert not sleepers.errors, sleepers.errors
        assert "pool app/app: pool_size 2 -> 4" in pgmux.log()

        # Lowering it closes idle servers at once.
        assert len(await show(admin, "SERVERS")) == 4
        pgmux.write_config(deep_merge(pgmux.config, {"default_pool_size": 1}))
        await reload(pgmux, admin, how)
        assert await pool_sizes(admin) == (1, 1)
        await wait_until(lambda: _backends_are(su, 1), DEADLINE, what="1 app backend left")
        assert len(await show(admin, "SERVERS")) == 1
        # And the clients, connected all along, go on with one server.
        results = await asyncio.gather(
            *(conn.fetchval("SELECT $1::int", i) for i, conn in enumerate(conns))
        )
        assert results == list(range(len(conns)))
        assert await backend_count(su) == 1


async def _no_backends(su: Su) -> bool:
    return await backend_count(su) == 0


async def _backends_are(su: Su, n: int) -> bool:
    return await backend_count(su) == n


# -- a file that does not load ---------------------------------------------------------


BROKEN = {
    "bad_toml": "not valid TOML",
    "bad_value": "default_pool_size: must be at least 1, got 0",
}


def write_broken(pgmux: PgmuxProcess, kind: str) -> None:
    if kind == "bad_toml":
        # Otherwise a change pgmux would apply, so applying half of it would show.
        good = to_toml(deep_merge(pgmux.config, {"default_pool_size": 4}))
        write_raw(pgmux, good + "\nthis line = = is not TOML\n")
    else:
        write_raw(pgmux, to_toml(deep_merge(pgmux.config, {"default_pool_size": 0})))


@pytest.mark.parametrize("kind", sorted(BROKEN))
async def test_reload_of_a_broken_file_keeps_the_old_config(
    pgmux_factory: PgmuxFactory, console: Console, kind: str
) -> None:
    pgmux = start_with_admin(pgmux_factory, default_pool_size=3)
    admin = await console(pgmux)
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        since = len(pgmux.log())
        write_broken(pgmux, kind)
        error = await refused(admin, "RELOAD")
        assert error.sqlstate == "F0000"
        message = error.diag.message_primary or ""
        assert message.startswith("RELOAD failed: ") and BROKEN[kind] in message, message
        assert str(pgmux.config_path) in message
        assert "the old configuration keeps running" in (error.diag.message_hint or "")
        line = pgmux.wait_for_log("reload of ", since=since)
        assert " ERROR " in line and "keeping the running configuration" in line
        assert BROKEN[kind] in line

        # The old values run on; the session and the clients go on.
        assert await config_value(admin, "default_pool_size") == "3"
        assert await pool_sizes(admin) == (3, 3)
        assert await conn.fetchval("SELECT 2") == 2
        async with open_clients(pgmux, 1) as (fresh,):
            assert await fresh.fetchval("SELECT 3") == 3
        assert pgmux.running

        # Once the file is fixed, RELOAD works again.
        pgmux.write_config(deep_merge(pgmux.config, {"default_pool_size": 4}))
        assert await command(admin, "RELOAD") == "RELOAD"
        assert await config_value(admin, "default_pool_size") == "4"
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", sorted(BROKEN))
async def test_sighup_with_a_broken_file_keeps_the_old_config(
    pgmux_factory: PgmuxFactory, console: Console, kind: str
) -> None:
    pgmux = start_with_admin(pgmux_factory, default_pool_size=3)
    admin = await console(pgmux)
    conn = await connect_asyncpg(pgmux)
    try:
        since = len(pgmux.log())
        write_broken(pgmux, kind)
        pgmux.signal(signal.SIGHUP)
        line = pgmux.wait_for_log("reload of ", DEADLINE, since=since)
        assert " ERROR " in line and "keeping the running configuration" in line
        assert BROKEN[kind] in line
        assert "SIGHUP: reloading" in pgmux.log()[since:]
        assert pgmux.running
        assert await config_value(admin, "default_pool_size") == "3"
        assert await conn.fetchval("SELECT 4") == 4
        async with open_clients(pgmux, 1) as (fresh,):
            assert await fresh.fetchval("SELECT 5") == 5
    finally:
        await conn.close()


# -- servers and databases -------------------------------------------------------------


async def test_reload_changes_the_server_and_adds_a_database(
    pgmux_factory: PgmuxFactory, console: Console, pg: PgCluster, su: Su
) -> None:
    """app moves from TCP to PostgreSQL's unix socket (the same server, reached another
    way) and app2 appears: the clients connected before go on throughout."""
    pgmux = start_with_admin(pgmux_factory)
    admin = await console(pgmux)
    error = await error_of(connect_asyncpg(pgmux, database="app2"))
    assert error.sqlstate == "3D000", error
    async with open_clients(pgmux, 4) as conns, open_clients(pgmux, 1) as (holder,):
        sleepers = Sleepers(conns, "SELECT 1")
        try:
            await sleepers.each_did(3)
            await holder.execute("BEGIN")
            held_pid = await holder.fetchval("SELECT pg_backend_pid()")
            assert await _via(su) == {"tcp"}

            socket_dir = str(pg.socket_dir)
            pgmux.write_config(
                deep_merge(
                    pgmux.config,
                    {
                        "databases": {
                            "app": {"host": socket_dir},
                            "app2": {"host": pg.host, "port": pg.port, "dbname": APP_DB},
                        }
                    },
                )
            )
            await reload(pgmux, admin, "console")
            databases = {r["name"]: r for r in await show(admin, "DATABASES")}
            assert databases["app"]["host"] == socket_dir
            assert databases["app2"]["host"] == pg.host
            # The busy server of the old settings serves its transaction to the end.
            servers = await show(admin, "SERVERS")
            assert [s["close_needed"] for s in servers if s["remote_pid"] == held_pid] == [1]
            await sleepers.each_did(3)
            assert await holder.fetchval("SELECT pg_backend_pid()") == held_pid
            await holder.execute("COMMIT")
            assert await asyncio.wait_for(command(admin, "WAIT_CLOSE"), DEADLINE) == "WAIT_CLOSE"
            await wait_until(lambda: _only_via(su, "unix"), DEADLINE, what="TCP servers gone")
            await sleepers.each_did(3)
            assert await holder.fetchval("SELECT pg_backend_pid()") != held_pid
            assert {s["close_needed"] for s in await show(admin, "SERVERS")} == {0}

            # The new database answers, without a restart, over TCP.
            new = await connect_asyncpg(pgmux, database="app2")
            try:
                assert await new.fetchval("SELECT current_database()") == APP_DB
                assert await new.fetchval("SELECT current_user") == APP_USER
                assert await _via(su) == {"unix", "tcp"}
            finally:
                await new.close()
            await sleepers.each_did(3)
        finally:
            await sleepers.stop()
        assert not sleepers.errors, sleepers.errors
        assert not any(c.is_closed() for c in [*conns, holder])
    log = pgmux.log()
    assert "databases added: app2" in log
    assert "pool app/app: server settings changed, reconnecting" in log


async def _via(su: Su) -> set[str]:
    """How the app backends came in: over "tcp" or the "unix" socket."""
    rows = await fetch_all(
        su,
        "SELECT client_addr IS NULL FROM pg_stat_activity"
        " WHERE usename = %s AND backend_type = 'client backend'",
        [APP_USER],
    )
    return {"unix" if unix else "tcp" for (unix,) in rows}


async def _only_via(su: Su, how: str) -> bool:
    return await _via(su) == {how}


# -- SET ---------------------------------------------------------------------------------


async def test_lowering_pool_size_while_every_server_is_busy(
    pgmux_factory: PgmuxFactory, console: Console, su: Su
) -> None:
    """Servers busy when pool_size is lowered close as they are released instead of
    being handed to the next waiter, so the pool shrinks to the new size under load."""
    pgmux = start_with_admin(pgmux_factory, default_pool_size=5)
    admin = await console(pgmux)
    await wait_until(lambda: _no_backends(su), DEADLINE, what="no app backends left over")
    async with open_clients(pgmux, 8) as conns:
        holders = conns[:5]
        for conn in holders:
            await conn.execute("BEGIN")
            await conn.fetchval("SELECT 1")
        assert await backend_count(su) == 5
        assert (await command(admin, "SET default_pool_size = 2") or "").startswith("SET")
        for conn in holders:  # released into a queue of the three others
            await conn.execute("COMMIT")
        sleepers = Sleepers(conns)
        try:
            assert await max_backends_under(su, sleepers) <= 2
        finally:
            await sleepers.stop()
        assert not sleepers.errors, sleepers.errors
    assert "pool_size lowered to 2" in pgmux.log()


async def test_set_changes_a_setting_until_the_next_reload(
    pgmux_factory: PgmuxFactory, console: Console, su: Su
) -> None:
    pgmux = start_with_admin(pgmux_factory, default_pool_size=5)
    admin = await console(pgmux)
    await wait_until(lambda: _no_backends(su), DEADLINE, what="no app backends left over")
    async with open_clients(pgmux, 6) as conns:
        tag = await command(admin, "SET default_pool_size = 3")
        assert tag is not None and tag.startswith("SET"), tag
        assert await config_value(admin, "default_pool_size") == "3"
        sleepers = Sleepers(conns)
        try:
            assert await max_backends_under(su, sleepers) == 3
        finally:
            await sleepers.stop()
        assert not sleepers.errors, sleepers.errors
        assert await pool_sizes(admin) == (3, 3)

        # Settings that need a restart, unknown keys and bad values are refused.
        error = await refused(admin, "SET listen_port = 1")
        message = error.diag.message_primary or ""
        assert "listen_port cannot change while pgmux runs" in message, message
        assert "restart pgmux" in message
        assert await config_value(admin, "listen_port") == str(pgmux.port)
        error = await refused(admin, "SET no_such_setting = 1")
        assert "unknown setting 'no_such_setting'" in (error.diag.message_primary or "")
        error = await refused(admin, "SET default_pool_size = 0")
        assert "must be at least 1, got 0" in (error.diag.message_primary or "")
        assert await config_value(admin, "default_pool_size") == "3"

        # SET is not written to the file: RELOAD goes back to what the file says.
        assert await command(admin, "RELOAD") == "RELOAD"
        assert await config_value(admin, "default_pool_size") == "5"
        assert await pool_sizes(admin) == (5, 5)
        assert await conns[0].fetchval("SELECT 6") == 6


# -- workers -----------------------------------------------------------------------------


async def test_reload_reaches_every_worker(
    pgmux_factory: PgmuxFactory, console: Console, su: Su
) -> None:
    pgmux = start_with_admin(pgmux_factory, workers=2, default_pool_size=2)
    admin = await console(pgmux)
    await wait_until(lambda: _no_backends(su), DEADLINE, what="no app backends left over")
    conns = await _on_both_workers(pgmux, 3)
    try:
        sleepers = Sleepers(conns)
        try:
            assert await max_backends_under(su, sleepers) == 2  # 1 + 1
            # Each worker has its pool; SHOW POOLS adds their shares up.
            assert await pool_sizes(admin) == (2, 2)

            pgmux.write_config(deep_merge(pgmux.config, {"default_pool_size": 4}))
            await reload(pgmux, admin, "console")
            assert await pool_sizes(admin) == (4, 4)  # 2 + 2: both workers reloaded
            await wait_until(lambda: _backends_are(su, 4), DEADLINE, what="4 app backends")
            assert await max_backends_under(su, sleepers) == 4

            # SIGHUP to the supervisor is passed on to every worker.
            pgmux.write_config(deep_merge(pgmux.config, {"default_pool_size": 6}))
            await reload(pgmux, admin, "sighup")
            assert await pool_sizes(admin) == (6, 6)  # 3 + 3
            await wait_until(lambda: _backends_are(su, 6), DEADLINE, what="6 app backends")
        finally:
            await sleepers.stop()
        assert not sleepers.errors, sleepers.errors
    finally:
        for conn in conns:
            conn.terminate()
    reloaded = [line for line in pgmux.log().splitlines() if "reloaded " in line]
    assert sum("[worker 0]" in line for line in reloaded) == 2, reloaded
    assert sum("[worker 1]" in line for line in reloaded) == 2, reloaded


async def _on_both_workers(pgmux: PgmuxProcess, each: int) -> list[asyncpg.Connection]:
    """Clients until both workers have at least ``each`` (the kernel picks the worker)."""
    conns: list[asyncpg.Connection] = []
    try:
        while min(sum(1 for c in conns if c.get_server_pid() % 2 == w) for w in (0, 1)) < each:
            assert len(conns) < 60, "the kernel put every client on one worker"
            conns.append(await connect_asyncpg(pgmux))
    except BaseException:
        for conn in conns:
            conn.terminate()
        raise
    return conns
