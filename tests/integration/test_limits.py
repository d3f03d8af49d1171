"""Limits shared by pools, client limits, the reserve pool and server_round_robin,
through real clients against the real PostgreSQL.

- max_db_connections shared by two users' pools: PostgreSQL never sees more, an idle
  server of one pool makes room for the other, and a pool that arrives while the other
  keeps every server busy is not starved (its clients commit within seconds).
- max_user_connections shared by two databases' pools of one user.
- max_db_client_connections and max_user_client_connections: 53300 naming the limit,
  and a slot frees when a client leaves.
- reserve_pool_size / reserve_pool_timeout: the pool grows only after a client waited
  that long, and shrinks back once nobody waits.
- server_round_robin: every server used in turn, where the default reuses the warmest.
Each test ends with the pools quiet: no client waiting, backends within the limits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from support.admin import Console, show, start_with_admin
from support.helpers import (
    Su,
    connect_asyncpg,
    counting_backends,
    error_of,
    fetch_value,
    wait_until,
)
from support.pgcluster import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    MD5_PASSWORD,
    MD5_USER,
    PgCluster,
)
from support.pgmux import PgmuxFactory, PgmuxProcess

BACKENDS_OF_DB = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'"
    " AND usename IN ('app', 'md5user')"
)


async def _backends(su: Su, where: str = BACKENDS_OF_DB, arg: str = APP_DB) -> int:
    count: int = await fetch_value(su, where, [arg])
    return count


async def _loop(
    pgmux: PgmuxProcess,
    user: str,
    password: str,
    until: float,
    done: list[float],
    database: str = APP_DB,
    hold: float = 0.05,
) -> None:
    """One client: short transactions holding a server ``hold`` s each, until ``until``;
    the time of each commit goes to ``done``."""
    conn = await connect_asyncpg(pgmux, user, password, database, timeout=30)
    try:
        while time.monotonic() < until:
            async with conn.transaction():
                await conn.execute(f"SELECT pg_sleep({hold})")
            done.append(time.monotonic())
    finally:
        await conn.close()


async def _quiet(console: Console, pgmux: PgmuxProcess) -> list[dict[str, Any]]:
    admin = await console(pgmux)

    async def settled() -> list[dict[str, Any]] | None:
        pools = await show(admin, "POOLS")
        pools = [p for p in pools if p["database"] != "pgbouncer"]  # the console itself
        busy = [p for p in pools if p["cl_waiting"] or p["cl_active"] or p["sv_active"]]
        return None if busy else pools

    return await wait_until(settled, timeout=20, what="pools quiet")


# -- max_db_connections -------------------------------------------------------------------


async def test_max_db_connections_is_shared_and_no_pool_starves(
    pgmux_factory: PgmuxFactory, su: Su, console: Console
) -> None:
    """app's 12 clients keep all 4 servers busy; md5user's 12 clients arrive a second
    later. PgBouncer would hand md5user nothing until an app server idles out; pgmux
    hands slots over as app's servers are released, so both pools commit."""
    pgmux = start_with_admin(
        pgmux_factory,
        default_pool_size=4,
        max_db_connections=4,
        query_wait_timeout=8,
    )
    app_done: list[float] = []
    md5_done: list[float] = []
    start = time.monotonic()
    until = start + 5
    async with (
        counting_backends(su, interval=0.02) as samples_app,
        counting_backends(su, MD5_USER, interval=0.02) as samples_md5,
    ):
        app = [
            asyncio.create_task(_loop(pgmux, APP_USER, APP_PASSWORD, until, app_done))
            for _ in range(12)
        ]
        await wait_until(lambda: len(app_done) > 20, timeout=10, what="app under way")
        md5_start = time.monotonic()
        md5 = [
            asyncio.create_task(_loop(pgmux, MD5_USER, MD5_PASSWORD, until, md5_done))
            for _ in range(12)
        ]
        await asyncio.gather(*app, *md5)
    both = [a + b for a, b in zip(samples_app, samples_md5, strict=False)]
    assert md5_done, "md5user's pool starved behind app's"
    print(
        f"app {len(app_done)} commits, md5user {len(md5_done)}; md5user's first after "
        f"{md5_done[0] - md5_start:.2f} s; at most {max(both)} backends"
    )
    assert max(both) <= 4, f"PostgreSQL saw {max(both)} backends of database app"
    assert md5_done[0] - md5_start < 3
    after_md5 = [t for t in app_done if t > md5_start + 1]
    later_md5 = [t for t in md5_done if t > md5_start + 1]
    # Both pools share the limit once the second arrived: neither gets less than a third.
    assert len(later_md5) > len(after_md5) / 3, (len(after_md5), len(later_md5))
    assert len(after_md5) > len(later_md5) / 3, (len(after_md5), len(later_md5))
    pools = await _quiet(console, pgmux)
    assert sum(p["sv_idle"] for p in pools if p["database"] == APP_DB) <= 4
    assert await _backends(su) <= 4


async def test_an_idle_server_of_another_pool_makes_room(
    pgmux_factory: PgmuxFactory, su: Su, console: Console
) -> None:
    pgmux = start_with_admin(pgmux_factory, default_pool_size=3, max_db_connections=3)
    # app opens all three servers, then leaves them idle in its pool.
    conns = [await connect_asyncpg(pgmux) for _ in range(3)]
    txs = [conn.transaction() for conn in conns]
    for tx in txs:
        await tx.start()
    for tx in txs:
        await tx.commit()
    assert await _backends(su) == 3
    mark = len(pgmux.log())
    other = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    started = time.monotonic()
    assert await other.fetchval("SELECT current_user") == MD5_USER
    assert time.monotonic() - started < 2  # not a queue_wait_timeout's worth
    assert await _backends(su) == 3
    line = pgmux.wait_for_log("closed to make room for pool app/md5user", since=mark)
    assert 'max_db_connections = 3 for database "app" reached' in line
    # And back: app's clients still get servers (md5user's is idle now).
    assert all([await conn.fetchval("SELECT 1") == 1 for conn in conns])
    assert await _backends(su) <= 3
    for conn in [*conns, other]:
        await conn.close()
    await _quiet(console, pgmux)


async def test_max_db_connections_waits_and_then_times_out_with_the_pool_named(
    pgmux_factory: PgmuxFactory, su: Su, console: Console
) -> None:
    """Every slot busy in a transaction: the other pool's client waits (not an error at
    once), then gets query_wait_timeout's 57014; its session goes on afterwards."""
    pgmux = start_with_admin(
        pgmux_factory, default_pool_size=5, max_db_connections=2, query_wait_timeout=1.5
    )
    waiter = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    holders = [await connect_asyncpg(pgmux) for _ in range(2)]
    txs = [conn.transaction() for conn in holders]
    for tx in txs:
        await tx.start()  # BEGIN takes a server, held until COMMIT
    started = time.monotonic()
    error = await error_of(waiter.fetchval("SELECT 1"))
    waited = time.monotonic() - started
    assert error.sqlstate == "57014", error
    assert str(error).splitlines()[0] == (
        'pool "app/md5user" exhausted: max_db_connections = 2 for database "app" reached, '
        f"2 server connections open in 2 pools, waited {waited:.1f} s (query_wait_timeout)"
    )
    assert "raise max_db_connections" in (error.hint or "")
    assert 1.4 < waited < 4, waited
    assert await _backends(su) == 2
    admin = await console(pgmux)
    databases = {d["name"]: d for d in await show(admin, "DATABASES")}
    assert databases[APP_DB]["max_connections"] == 2
    assert databases[APP_DB]["current_connections"] == 2
    for tx in txs:
        await tx.commit()
    assert await waiter.fetchval("SELECT current_user") == MD5_USER  # the session goes on
    for conn in [*holders, waiter]:
        await conn.close()
    await _quiet(console, pgmux)
    assert await _backends(su) <= 2


# -- max_user_connections ------------------------------------------------------------------


async def test_max_user_connections_is_shared_by_a_users_databases(
    pg: PgCluster, pgmux_factory: PgmuxFactory, su: Su, console: Console
) -> None:
    pgmux = start_with_admin(
        pgmux_factory,
        default_pool_size=5,
        databases={"app2": {"host": pg.host, "port": pg.port, "dbname": APP_DB}},
        users={APP_USER: {"max_user_connections": 3}},
    )
    one: list[float] = []
    two: list[float] = []
    until = time.monotonic() + 3
    async with counting_backends(su, interval=0.02) as samples:
        await asyncio.gather(
            *(_loop(pgmux, APP_USER, APP_PASSWORD, until, one) for _ in range(8)),
            *(_loop(pgmux, APP_USER, APP_PASSWORD, until, two, "app2") for _ in range(8)),
        )
    print(f"app {len(one)} commits, app2 {len(two)}; at most {max(samples)} backends")
    assert max(samples) <= 3, f"PostgreSQL saw {max(samples)} backends of user app"
    assert len(one) > 10 and len(two) > 10, (len(one), len(two))
    admin = await console(pgmux)
    users = {u["name"]: u for u in await show(admin, "USERS")}
    assert users[APP_USER]["max_user_connections"] == 3
    assert users[APP_USER]["current_connections"] <= 3
    await _quiet(console, pgmux)


# -- client limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "setting", "what"),
    [
        ({"max_db_client_connections": 3}, "max_db_client_connections", 'database "app"'),
        ({"users": {APP_USER: {"max_user_client_connections": 3}}},
         "max_user_client_connections", 'user "app"'),
    ],
)  # fmt: skip
async def test_client_limits_refuse_one_more_login(
    pgmux_factory: PgmuxFactory,
    console: Console,
    overrides: dict[str, Any],
    setting: str,
    what: str,
) -> None:
    pgmux = start_with_admin(pgmux_factory, **overrides)
    conns = [await connect_asyncpg(pgmux) for _ in range(3)]
    with pytest.raises(asyncpg.PostgresError) as refused:
        await connect_asyncpg(pgmux)
    error = refused.value
    assert error.sqlstate == "53300", error
    assert (
        str(error).splitlines()[0]
        == f"too many client connections for {what} ({setting}): 3 of 3 in use"
    )
    assert setting in (error.hint or "")
    # Other users / databases are not limited by it: md5user logs in to app still
    # (the database limit counts it, so close one of app's first for that case).
    await conns.pop().close()
    other = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    assert await other.fetchval("SELECT 1") == 1
    if setting == "max_user_client_connections":
        conns.append(await connect_asyncpg(pgmux))  # md5user does not count for app
    else:
        with pytest.raises(asyncpg.PostgresError):
            await connect_asyncpg(pgmux)  # md5user counts for the database
    admin = await console(pgmux)
    databases = {d["name"]: d for d in await show(admin, "DATABASES")}
    # app's 2 or 3, and md5user's.
    expected = 4 if setting == "max_user_client_connections" else 3
    assert databases[APP_DB]["current_client_connections"] == expected
    for conn in [*conns, other]:
        await conn.close()
    # Slots free as clients leave.
    again = [await connect_asyncpg(pgmux) for _ in range(3)]
    for conn in again:
        await conn.close()


# -- the reserve pool ----------------------------------------------------------------------


async def test_reserve_pool_grows_after_the_timeout_and_shrinks_after_the_rush(
    pgmux_factory: PgmuxFactory, su: Su, console: Console
) -> None:
    pgmux = start_with_admin(
        pgmux_factory, default_pool_size=2, reserve_pool_size=2, reserve_pool_timeout=1
    )
    conns = [await connect_asyncpg(pgmux) for _ in range(8)]
    # A short burst, shorter than reserve_pool_timeout: the reserve does not open.
    async with counting_backends(su, interval=0.02) as samples:
        await asyncio.gather(*(conn.execute("SELECT pg_sleep(0.1)") for conn in conns[:4]))
    assert max(samples) <= 2, samples
    mark = len(pgmux.log())
    # A long one: 8 clients x 1.5 s on 2 servers would take 6 s; the reserve opens
    # once the first in line has waited 1 s.
    started = time.monotonic()
    timeline: list[tuple[float, int]] = []

    async def sample() -> None:
        while True:
            timeline.append((time.monotonic() - started, await _backends(su)))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(conn.execute("SELECT pg_sleep(1.5)") for conn in conns))
    elapsed = time.monotonic() - started
    sampler.cancel()
    early = [n for t, n in timeline if t < 0.8]
    assert max(early) <= 2, timeline
    assert max(n for _, n in timeline) == 4, timeline
    assert elapsed < 5.5, elapsed  # the reserve did the work
    line = pgmux.wait_for_log("growing by up to 2 reserve servers", since=mark)
    assert "reserve_pool_timeout = 1 s" in line
    # The rush is over: back to pool_size as the reserve servers come back.
    pgmux.wait_for_log("reserve pool no longer needed", since=mark)
    await wait_until(lambda: _at_most(su, 2), timeout=10, what="back to pool_size")
    for conn in conns:
        await conn.close()
    await _quiet(console, pgmux)


async def _at_most(su: Su, limit: int) -> bool:
    return await _backends(su) <= limit


# -- server_round_robin ----------------------------------------------------------------------


@pytest.mark.parametrize("round_robin", [True, False])
async def test_server_round_robin_uses_every_server_in_turn(
    pgmux_factory: PgmuxFactory, round_robin: bool
) -> None:
    pgmux = pgmux_factory({"default_pool_size": 3, "server_round_robin": round_robin})
    conns = [await connect_asyncpg(pgmux) for _ in range(3)]
    txs = [conn.transaction() for conn in conns]
    for tx in txs:
        await tx.start()
    for conn in conns:
        await conn.execute("SELECT 1")  # three servers open
    for tx in txs:
        await tx.commit()
    pids = [await conns[0].fetchval("SELECT pg_backend_pid()") for _ in range(6)]
    if round_robin:
        assert len(set(pids)) == 3 and pids[:3] == pids[3:], pids
    else:
        assert len(set(pids)) == 1, pids  # the warmest, each time
    for conn in conns:
        await conn.close()
