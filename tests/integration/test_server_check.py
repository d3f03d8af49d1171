"""server_check_query and server_check_delay: an idle server is checked before reuse,
and a dead one is dropped while its client gets a good one without seeing an error.

The checks are counted with a sequence: ``server_check_query`` is a nextval(), so each
check PostgreSQL runs shows in the sequence whatever else the backend does afterwards.
A dead server is a backend stopped with SIGSTOP (it holds its socket and never answers,
as behind a firewall that dropped the connection) or one pg_terminate_backend() ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from support.admin import Admin, Console, show, start_with_admin
from support.helpers import (
    Su,
    connect_asyncpg,
    connect_psycopg,
    fetch_value,
    wait_until,
)
from support.pgcluster import APP_DB, APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge

SEQUENCE = "pgmux_checks"
COUNTING_CHECK = f"SELECT nextval('{SEQUENCE}')"

Checks = Callable[[], Awaitable[int]]


@pytest.fixture
async def checks(pg: PgCluster, su: Su) -> AsyncIterator[Checks]:
    """How many times PostgreSQL has run COUNTING_CHECK since the test began."""
    pg.psql(
        f"DROP SEQUENCE IF EXISTS {SEQUENCE}; CREATE SEQUENCE {SEQUENCE};"
        f" ALTER SEQUENCE {SEQUENCE} OWNER TO {APP_USER}"
    )

    async def count() -> int:
        return int(
            await fetch_value(
                su, f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {SEQUENCE}"
            )
        )

    yield count
    pg.psql(f"DROP SEQUENCE IF EXISTS {SEQUENCE}")


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The backend ``pid`` frozen (SIGSTOP) for the block, then let go: it then finds
    its connection closed and exits."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def pool_row(admin: Admin) -> dict[str, Any]:
    rows = [r for r in await show(admin, "POOLS") if r["database"] == APP_DB]
    assert len(rows) == 1, rows
    return rows[0]


async def app_backend_pids(su: Su) -> set[int]:
    async with su.cursor() as cur:
        await cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s"
            " AND backend_type = 'client backend'",
            [APP_USER],
        )
        return {row[0] for row in await cur.fetchall()}


async def assert_clean(admin: Admin, su: Su) -> None:
    """Nothing in flight, nobody queued, and PostgreSQL has exactly the backends of the
    servers pgmux keeps idle."""

    async def clean() -> bool:
        row = await pool_row(admin)
        busy = row["sv_active"] + row["sv_tested"] + row["sv_login"] + row["cl_waiting"]
        kept = row["sv_idle"] + row["sv_used"]
        return not busy and len(await app_backend_pids(su)) == kept

    await wait_until(clean, timeout=10, what="pool and pg_stat_activity back to baseline")


def used_gauge(pgmux: PgmuxProcess) -> float:
    port = pgmux.config["metrics"]["listen_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(
        r'^pgmux_pools_server_used_connections\{database="app",user="app"\} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert match, text
    return float(match.group(1))


def start(factory: PgmuxFactory, **overrides: Any) -> PgmuxProcess:
    return start_with_admin(factory, **{"default_pool_size": 1, **overrides})


async def test_a_server_idle_longer_than_the_delay_is_checked_before_reuse(
    pgmux_factory: PgmuxFactory, console: Console, su: Su, checks: Checks
) -> None:
    pgmux = start(pgmux_factory, server_check_delay=1, server_check_query=COUNTING_CHECK)
    admin = await console(pgmux)
    conn = await connect_asyncpg(pgmux)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert await conn.fetchval("SELECT 1") == 1
        assert await checks() == 0  # used moments ago: handed out as it is
        # Idle past the delay: due for a check (PgBouncer's sv_used, SHOW SERVERS "used").
        row = await wait_until(
            lambda: _row_if(admin, sv_used=1), timeout=5, what="the idle server due"
        )
        assert (row["sv_idle"], row["sv_tested"]) == (0, 0)
        states = [r["state"] for r in await show(admin, "SERVERS")]
        assert states == ["used"]
        assert await asyncio.to_thread(used_gauge, pgmux) == 1
        # The next request waits for the check, then runs on the same server.
        assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        assert await checks() == 1
        row = await pool_row(admin)
        assert (row["sv_idle"], row["sv_used"]) == (1, 0)
        assert await asyncio.to_thread(used_gauge, pgmux) == 0
    finally:
        await conn.close()
    await assert_clean(admin, su)


async def _row_if(admin: Admin, **want: int) -> dict[str, Any] | None:
    row = await pool_row(admin)
    return row if all(row[k] == v for k, v in want.items()) else None


async def test_no_check_before_the_delay(
    pgmux_factory: PgmuxFactory, console: Console, su: Su, checks: Checks
) -> None:
    """Idle for less than server_check_delay (even by a sweep's length): no check."""
    pgmux = start(pgmux_factory, server_check_delay=2, server_check_query=COUNTING_CHECK)
    admin = await console(pgmux)
    conn = await connect_psycopg(pgmux)
    try:
        for pause in (0.1, 1.0, 1.4):
            await asyncio.sleep(pause)
            await conn.execute("SELECT 1")
            assert (await pool_row(admin))["sv_used"] == 0
        assert await checks() == 0
        await asyncio.sleep(3)  # now past it
        await conn.execute("SELECT 1")
        assert await checks() == 1
    finally:
        await conn.close()
    await assert_clean(admin, su)


async def test_checks_off_with_an_empty_query_and_on_every_time_with_delay_0(
    pgmux_factory: PgmuxFactory, console: Console, su: Su, checks: Checks
) -> None:
    pgmux = start(pgmux_factory, server_check_delay=0, server_check_query="")
    admin = await console(pgmux)
    conn = await connect_psycopg(pgmux)
    try:
        for _ in range(3):
            await conn.execute("SELECT 1")
        assert (await pool_row(admin))["sv_used"] == 0
        # A reload (SIGHUP) turns them on: delay 0 checks every server taken from idle.
        since = len(pgmux.log())
        pgmux.write_config(deep_merge(pgmux.config, {"server_check_query": COUNTING_CHECK}))
        pgmux.signal(signal.SIGHUP)
        pgmux.wait_for_log("reloaded ", 10, since=since)
        assert await checks() == 0
        for _ in range(3):
            await conn.execute("SELECT 1")
        assert await checks() == 3
        assert (await pool_row(admin))["sv_used"] == 1  # idle, and due at once
    finally:
        await conn.close()
    await assert_clean(admin, su)


async def test_a_stopped_server_is_dropped_and_the_client_gets_another(
    pgmux_factory: PgmuxFactory, console: Console, su: Su
) -> None:
    """The backend never answers (the default check, an empty query): after
    server_connect_timeout the server is closed with a log line saying why, and the
    client's request runs on a new server, without an error."""
    pgmux = start(pgmux_factory, server_check_delay=0, server_connect_timeout=1.5)
    admin = await console(pgmux)
    conn = await connect_asyncpg(pgmux)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        with stopped(pid):
            started = time.monotonic()
            request = asyncio.create_task(conn.fetchval("SELECT pg_backend_pid()"))
            row = await wait_until(
                lambda: _row_if(admin, sv_tested=1, cl_waiting=1), what="the check in flight"
            )
            assert row["sv_idle"] + row["sv_used"] + row["sv_active"] == 0
            servers = await show(admin, "SERVERS")
            assert [(s["state"], s["remote_pid"]) for s in servers] == [("tested", pid)]
            new_pid = await asyncio.wait_for(request, 10)
            took = time.monotonic() - started
        assert new_pid != pid
        assert 1.5 <= took < 5, took
        line = pgmux.wait_for_log("server_check_query got no answer within 1.5 s")
        assert f"pid={pid}" in line
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()
    await wait_until(
        lambda: _gone(su, pid), timeout=10, what="the stopped backend to exit once let go"
    )
    await assert_clean(admin, su)


async def _gone(su: Su, pid: int) -> bool:
    return pid not in await app_backend_pids(su)


@pytest.mark.parametrize("wait_for_pgmux", [True, False], ids=["noticed", "racing"])
async def test_a_terminated_idle_server_is_replaced_without_an_error(
    pgmux_factory: PgmuxFactory, console: Console, su: Su, wait_for_pgmux: bool
) -> None:
    """pg_terminate_backend() on an idle server: pgmux sees the connection close at once
    ("noticed"). Asked for a server at that very moment ("racing"), the check (delay 0)
    finds it dying. Either way the client's request runs elsewhere, without an error."""
    pgmux = start(pgmux_factory, server_check_delay=0 if not wait_for_pgmux else 30)
    admin = await console(pgmux)
    conn = await connect_asyncpg(pgmux)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert await fetch_value(su, "SELECT pg_terminate_backend(%s)", [pid]) is True
        if wait_for_pgmux:
            await wait_until(lambda: _no_server(admin), what="pgmux to drop the server")
        new_pid = await asyncio.wait_for(conn.fetchval("SELECT pg_backend_pid()"), 10)
        assert new_pid != pid
    finally:
        await conn.close()
    await assert_clean(admin, su)


async def _no_server(admin: Admin) -> bool:
    return not await show(admin, "SERVERS")


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("SELECT 1/0", "ERROR 22012: division by zero"),
        ("BEGIN", "transaction status T"),
    ],
)
async def test_a_failing_check_drops_the_server_and_still_serves_the_client(
    pgmux_factory: PgmuxFactory, console: Console, su: Su, query: str, why: str
) -> None:
    """A check that always fails (a bad server_check_query) costs each request from an
    idle server a new connection, but every request is served and nothing spins: a
    server opened for a waiting client goes to it unchecked."""
    pgmux = start(pgmux_factory, server_check_delay=0, server_check_query=query)
    admin = await console(pgmux)
    conn = await connect_psycopg(pgmux)
    failed = f"server_check_query failed ({why}); closing the server"
    try:
        pids = set()
        for _ in range(4):
            cur = await conn.execute("SELECT pg_backend_pid()")
            row = await cur.fetchone()
            assert row is not None
            pids.add(row[0])
        assert len(pids) == 4
        assert pgmux.log().count(failed) == 4
        await asyncio.sleep(1.5)  # a few janitor sweeps: nothing more happens by itself
        assert pgmux.log().count(failed) == 4
        row = await pool_row(admin)
        assert (row["sv_idle"] + row["sv_used"], row["sv_tested"]) == (1, 0)
    finally:
        await conn.close()
    await assert_clean(admin, su)
