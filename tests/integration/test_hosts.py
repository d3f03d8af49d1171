"""Several hosts per database, through real clients: a dead host skipped, round-robin over
two live servers, target_session_attrs choosing between a primary and its standby, a
clear error (and no hammering) when no host is the right kind, and a server that turns
read-only leaving the pool. The failover itself is in test_failover.py.

The module has its own primary (PgCluster with REPLICATION_HBA) and a streaming standby
of it made with pg_basebackup, so it never changes the session's ``pg``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from support.admin import ADMIN_USERS, Console, command, show
from support.helpers import connect_asyncpg, error_of, log_lines, wait_until
from support.pgcluster import APP_DB, PgCluster, free_port
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge

LOCAL = "127.0.0.1"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[PgCluster, PgCluster]]:
    """(primary, standby): the standby streams from the primary."""
    with PgCluster.primary_and_standby() as clusters:
        yield clusters


def databases(**entries: dict[str, Any]) -> dict[str, Any]:
    """[databases] entries on the app database, each with its own hosts and knobs."""
    return {"databases": {name: {"dbname": APP_DB, **entry} for name, entry in entries.items()}}


def hosts(*clusters: PgCluster | int) -> dict[str, Any]:
    """host and port for a list of clusters (an int: a port where nothing listens)."""
    ports = [c if isinstance(c, int) else c.port for c in clusters]
    return {"host": ",".join([LOCAL] * len(ports)), "port": ports}


async def server_ports(pgmux: PgmuxProcess, database: str, n: int) -> list[int]:
    """The port of the server each of ``n`` concurrent transactions landed on (each holds
    its server until all have one, so the pool opens ``n``)."""
    conns = [await connect_asyncpg(pgmux, database=database) for _ in range(n)]
    try:
        for conn in conns:
            await conn.execute("BEGIN")
        return [await conn.fetchval("SELECT inet_server_port()") for conn in conns]
    finally:
        for conn in conns:
            conn.terminate()


async def test_a_dead_host_is_skipped_and_then_tried_last(
    pair: tuple[PgCluster, PgCluster], pgmux_factory: PgmuxFactory, console: Console
) -> None:
    primary, _ = pair
    dead = free_port()
    pgmux = pgmux_factory(deep_merge(ADMIN_USERS, databases(app=hosts(dead, primary))))
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT inet_server_port()") == primary.port
    finally:
        await conn.close()
    assert len(log_lines(pgmux, levels=["WARNING"])) == 1, pgmux.log_tail()
    line = pgmux.wait_for_log(f"cannot connect to server 127.0.0.1:{dead}")
    assert f"S-1 app/app 127.0.0.1:{dead}" in line  # the host tried, not the first of a list
    # New server connections go straight to the live host: the dead one is tried last.
    assert await server_ports(pgmux, "app", 3) == [primary.port] * 3
    assert len([ln for ln in log_lines(pgmux) if "cannot connect" in ln]) == 1
    admin = await console(pgmux)
    servers = [row for row in await show(admin, "SERVERS") if row["database"] == "app"]
    assert {(row["addr"], row["port"]) for row in servers} == {(LOCAL, primary.port)}
    (db,) = [row for row in await show(admin, "DATABASES") if row["name"] == "app"]
    assert (db["host"], db["port"], db["load_balance_hosts"]) == (
        "127.0.0.1,127.0.0.1",
        dead,
        "disable",
    )


async def test_every_host_dead_names_each_one(
    pair: tuple[PgCluster, PgCluster], pgmux_factory: PgmuxFactory
) -> None:
    one, two = free_port(), free_port()
    pgmux = pgmux_factory(databases(app=hosts(one, two)))
    error = await error_of(connect_asyncpg(pgmux))
    assert error.sqlstate == "08001"
    assert error.message == (
        f'no server of [databases.app] could be used for pool "app/app": '
        f"127.0.0.1:{one}: cannot connect: Connection refused; "
        f"127.0.0.1:{two}: cannot connect: Connection refused"
    )


async def test_round_robin_spreads_new_server_connections(
    pair: tuple[PgCluster, PgCluster], pgmux_factory: PgmuxFactory, console: Console
) -> None:
    primary, standby = pair
    both = hosts(primary, standby)
    pgmux = pgmux_factory(
        deep_merge(
            ADMIN_USERS,
            databases(rr={**both, "load_balance_hosts": "round-robin"}, ordered=both),
        )
    )
    ports = await server_ports(pgmux, "rr", 4)
    assert Counter(ports) == {primary.port: 2, standby.port: 2}, ports
    # disable (the default): every server on the first host.
    assert await server_ports(pgmux, "ordered", 3) == [primary.port] * 3
    admin = await console(pgmux)
    pools = {row["database"]: row for row in await show(admin, "POOLS")}
    assert pools["rr"]["load_balance_hosts"] == "round-robin"
    assert pools["ordered"]["load_balance_hosts"] == "disable"


async def test_target_session_attrs_picks_the_server_of_the_kind_asked_for(
    pair: tuple[PgCluster, PgCluster], pgmux_factory: PgmuxFactory
) -> None:
    primary, standby = pair
    standby_first = hosts(standby, primary)
    primary_first = hosts(primary, standby)
    pgmux = pgmux_factory(
        databases(
            rw={**standby_first, "target_session_attrs": "read-write"},
            prim={**standby_first, "target_session_attrs": "primary"},
            ro={**primary_first, "target_session_attrs": "read-only"},
            sb={**primary_first, "target_session_attrs": "standby"},
            pref={**primary_first, "target_session_attrs": "prefer-standby"},
            pref_down={**hosts(free_port(), primary), "target_session_attrs": "prefer-standby"},
        )
    )
    expected = {
        "rw": primary.port, "prim": primary.port, "ro": standby.port, "sb": standby.port,
        "pref": standby.port, "pref_down": primary.port,
    }  # fmt: skip
    for database, port in expected.items():
        conn = await connect_asyncpg(pgmux, database=database)
        try:
            assert await conn.fetchval("SELECT inet_server_port()") == port, database
        finally:
            await conn.close()
    rejected = [ln for ln in log_lines(pgmux) if "asks for; trying the next host" in ln]
    assert any(
        f"rw/app 127.0.0.1:{standby.port}" in ln and "server is in hot standby mode" in ln
        for ln in rejected
    ), rejected
    assert any("server is not in hot standby mode, not what target_session_attrs = standby"
               in ln for ln in rejected), rejected  # fmt: skip


async def test_no_host_of_the_kind_asked_for_is_a_clear_error_without_hammering(
    pair: tuple[PgCluster, PgCluster], pgmux_factory: PgmuxFactory
) -> None:
    primary, _ = pair
    dead = free_port()
    pgmux = pgmux_factory(
        {
            "server_connect_timeout": 2,
            **databases(sb={**hosts(primary, dead), "target_session_attrs": "standby"}),
        }
    )
    started = time.monotonic()
    error = await error_of(connect_asyncpg(pgmux, database="sb"))
    took = time.monotonic() - started
    assert error.sqlstate == "08001"
    assert error.message.startswith(
        f'no server for pool "sb/app" matches target_session_attrs = standby: '
        f"127.0.0.1:{primary.port}: server is not in hot standby mode"
    ), error.message
    assert f"127.0.0.1:{dead}: cannot connect: Connection refused" in error.message
    assert re.search(r"\(looked for 2\.\d s\)$", error.message), error.message
    assert error.hint is not None and "target_session_attrs" in error.hint
    # pgmux looked again about once a second while the client waited, then gave up.
    assert 1.5 < took < 6, took
    logins = [ln for ln in log_lines(pgmux) if "not what target_session_attrs" in ln]
    assert 2 <= len(logins) <= 4, logins
    await asyncio.sleep(1.5)
    assert len([ln for ln in log_lines(pgmux) if "not what target_session_attrs" in ln]) == len(
        logins
    ), "pgmux kept logging in with nobody waiting"
    line = pgmux.wait_for_log('pool sb/app: no server for pool "sb/app" matches')
    assert " WARNING " in line


async def test_a_server_that_turns_read_only_leaves_a_read_write_pool(
    pair: tuple[PgCluster, PgCluster], pgmux_factory: PgmuxFactory
) -> None:
    primary, _ = pair
    pgmux = pgmux_factory(
        {
            "default_pool_size": 1,
            **databases(rw={**hosts(primary), "target_session_attrs": "read-write"}),
        }
    )
    conn = await connect_asyncpg(pgmux, database="rw")
    try:
        first = await conn.fetchval("SELECT pg_backend_pid()")
        # A client's own SET is its business: its server stays.
        await conn.execute("SET default_transaction_read_only = on")
        assert await conn.fetchval("SELECT pg_backend_pid()") == first
        await conn.execute("RESET default_transaction_read_only")
        assert await conn.fetchval("SELECT pg_backend_pid()") == first
        assert "closing" not in pgmux.log()

        primary.psql("ALTER SYSTEM SET default_transaction_read_only = on")
        primary.psql("SELECT pg_reload_conf()")
        try:
            # PostgreSQL reports the change (ParameterStatus) with the next reply of a
            # backend that has read the new configuration; that transaction runs, and
            # its server closes as it comes back.
            await asyncio.sleep(0.5)
            assert await conn.fetchval("SELECT 1") == 1
            pgmux.wait_for_log("closing: session is read-only now")
            line = pgmux.wait_for_log("session is read-only now, and target_session_attrs")
            assert f"S-1 rw/app 127.0.0.1:{primary.port} pid={first}" in line, line
        finally:
            primary.psql("ALTER SYSTEM RESET default_transaction_read_only")
            primary.psql("SELECT pg_reload_conf()")
    finally:
        conn.terminate()
    # Once PostgreSQL is read-write again, so are the servers pgmux opens.
    conn = await connect_asyncpg(pgmux, database="rw")
    try:

        async def read_write() -> bool:
            return bool(await conn.fetchval("SHOW transaction_read_only") == "off")

        await wait_until(read_write, 10, interval=0.2, what="a read-write server again")
        assert await conn.fetchval("SELECT pg_backend_pid()") != first
    finally:
        conn.terminate()


async def test_a_list_of_a_tcp_host_and_a_unix_socket(
    pair: tuple[PgCluster, PgCluster], pgmux_factory: PgmuxFactory, console: Console
) -> None:
    """Round-robin (set globally) over the primary by TCP and the standby by its unix
    socket; SHOW SERVERS says where each server is, SHOW DATABASES shows the list."""
    primary, standby = pair
    socket_dir = str(standby.socket_dir)
    pgmux = pgmux_factory(
        deep_merge(
            ADMIN_USERS,
            {
                "load_balance_hosts": "round-robin",
                **databases(
                    app={"host": [LOCAL, socket_dir], "port": [primary.port, standby.port]}
                ),
            },
        )
    )
    admin = await console(pgmux)
    conns = [await connect_asyncpg(pgmux) for _ in range(2)]
    try:
        for conn in conns:
            await conn.execute("BEGIN")
        ports = {await conn.fetchval("SELECT inet_server_port()") for conn in conns}
        assert ports == {primary.port, None}  # None: a unix socket has no port
        servers = [row for row in await show(admin, "SERVERS") if row["database"] == "app"]
        assert {(row["addr"], row["port"]) for row in servers} == {
            (LOCAL, primary.port),
            ("unix", standby.port),
        }
    finally:
        for conn in conns:
            conn.terminate()
    (db,) = [row for row in await show(admin, "DATABASES") if row["name"] == "app"]
    assert (db["host"], db["load_balance_hosts"]) == (f"{LOCAL},{socket_dir}", "round-robin")
    config = {row["key"]: row["value"] for row in await show(admin, "CONFIG")}
    assert (config["load_balance_hosts"], config["target_session_attrs"]) == ("round-robin", "any")


async def test_a_reload_changes_the_host_list_and_the_kind_of_server(
    pair: tuple[PgCluster, PgCluster], pgmux_factory: PgmuxFactory, console: Console
) -> None:
    """A reload that changes the hosts, or target_session_attrs alone, replaces the
    pool's servers as they come back; the client connected before goes on."""
    primary, standby = pair
    pgmux = pgmux_factory(deep_merge(ADMIN_USERS, databases(app=hosts(primary))))
    admin = await console(pgmux)
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT inet_server_port()") == primary.port

        async def on(port: int) -> bool:
            return bool(await conn.fetchval("SELECT inet_server_port()") == port)

        # The list grows: a dead host first, then the standby; any server will do.
        pgmux.write_config(deep_merge(pgmux.config, databases(app=hosts(free_port(), standby))))
        await command(admin, "RELOAD")
        await wait_until(lambda: on(standby.port), 10, interval=0.1, what="the standby")
        assert "pool app/app: server settings changed, reconnecting" in pgmux.log()
        # The same hosts, now read-write only: the standby's servers are replaced.
        both = {**hosts(standby, primary), "target_session_attrs": "read-write"}
        pgmux.write_config(deep_merge(pgmux.config, databases(app=both)))
        await command(admin, "RELOAD")
        await wait_until(lambda: on(primary.port), 10, interval=0.1, what="the primary")
        (db,) = [row for row in await show(admin, "DATABASES") if row["name"] == "app"]
        assert (db["host"], db["port"]) == ("127.0.0.1,127.0.0.1", standby.port)
    finally:
        await conn.close()
