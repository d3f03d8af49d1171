"""The admin console's SHOW side, through real clients against the real PostgreSQL.

- Column names, order and types of every SHOW command that Debian's PgBouncer 1.18 also
  has, compared with a real PgBouncer started here (skipped when it is not installed).
- The simple protocol (psql) and the extended one (asyncpg's binary results, psycopg
  prepared and not), SHOW HELP as a NOTICE, the empty query.
- A known situation read back: a pool of one held inside a transaction, a client queued
  behind it (SHOW POOLS / CLIENTS / SERVERS), and ``log_statement_text = false``.
- Counters after known traffic (STATS, STATS_TOTALS, STATS_AVERAGES, TOTALS) and the
  rows of LISTS, STATE, MEM, USERS, DATABASES, CONFIG, VERSION.
- SHOW PINS and the ``pinned`` state; errors that leave the session usable; stats_users
  against admin_users; and, with ``workers = 2``, one answer for the whole instance.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.rows import DictRow, dict_row
from support.helpers import connect_asyncpg, error_of, run_psql, wait_until
from support.pgbouncer import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    WATCHER_PASSWORD,
    WATCHER_USER,
    PgBouncerProcess,
    find_pgbouncer,
)
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster, free_port
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge, default_config
from support.wire import RawClient, bind, execute, parse, query, sync

from proxy import __version__

ADMIN_OVERRIDES: dict[str, Any] = {
    "admin_users": [ADMIN_USER],
    "stats_users": [WATCHER_USER],
    "users": {
        ADMIN_USER: {"password": ADMIN_PASSWORD},
        WATCHER_USER: {"password": WATCHER_PASSWORD},
    },
}
TEXT, INT4, INT8, NUMERIC = 25, 23, 20, 1700
DEADLINE = 20.0  # seconds for state to settle: the machine is small and shared

AdminConn = psycopg.AsyncConnection[DictRow]


def _start(factory: PgmuxFactory, **overrides: Any) -> PgmuxProcess:
    return factory(deep_merge(ADMIN_OVERRIDES, overrides))


async def _admin(
    pgmux: PgmuxProcess,
    user: str = ADMIN_USER,
    password: str = ADMIN_PASSWORD,
    dbname: str = "pgbouncer",
    **kwargs: Any,
) -> AdminConn:
    """psycopg (dict rows, autocommit) to the console; kwargs go to connect()."""
    kwargs.setdefault("prepare_threshold", None)
    return await psycopg.AsyncConnection.connect(
        pgmux.conninfo(user, password, dbname, connect_timeout=15),
        autocommit=True,
        row_factory=dict_row,
        **kwargs,
    )


async def _show(conn: AdminConn, command: str) -> list[dict[str, Any]]:
    cur = await conn.execute(f"SHOW {command}")
    return await cur.fetchall()


def _app_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["user"] == APP_USER and r["database"] == APP_DB]


async def _app_pool(conn: AdminConn) -> dict[str, Any]:
    rows = _app_rows(await _show(conn, "POOLS"))
    assert len(rows) == 1, rows
    return rows[0]


async def _named(conn: AdminConn, command: str, key: str = "name") -> dict[str, Any]:
    """A key/value SHOW (TOTALS, LISTS, STATE) as a dict."""
    rows = await _show(conn, command)
    value = "items" if command == "LISTS" else "value"
    return {r[key]: r[value] for r in rows}


def _client_port(conn: asyncpg.Connection) -> int:
    """The local port of an asyncpg connection: pgmux's ``port`` for that client."""
    return int(conn._transport.get_extra_info("sockname")[1])  # type: ignore[attr-defined]


# -- columns as PgBouncer's ----------------------------------------------------------------

# Debian's PgBouncer is 1.18; pgmux follows PgBouncer 1.25, which added columns since,
# some of them in the middle of a row (replication, server_lifetime, load_balance_hosts,
# server_assignment_count, the prepared statement counters, the per-user limits ...),
# and 1.24 renamed SHOW DATABASES' reserve_pool to reserve_pool_size (#1232).
# So 1.18's columns are checked in order, names and types, against pgmux's columns less
# the ones listed here: they must be a prefix of that list, where pgmux's own come after.
# Every listed column must be in pgmux's result, so the allowance cannot go stale.
_SOCKET_ADDED = {"replication", "prepared_statements", "id"}
_ADDED_SINCE_1_18: dict[str, set[str]] = {
    "DATABASES": {
        "server_lifetime", "load_balance_hosts", "max_client_connections",
        "current_client_connections",
    },
    "POOLS": {"load_balance_hosts"},
    "CLIENTS": _SOCKET_ADDED,
    "SERVERS": _SOCKET_ADDED,
    "USERS": {
        "pool_size", "reserve_pool_size", "max_user_connections", "current_connections",
        "max_user_client_connections", "current_client_connections",
    },
    "STATS": {
        "total_server_assignment_count", "total_client_parse_count",
        "total_server_parse_count", "total_bind_count", "avg_server_assignment_count",
        "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count",
    },
    "STATS_TOTALS": {
        "server_assignment_count", "client_parse_count", "server_parse_count", "bind_count",
    },
    "STATS_AVERAGES": {
        "server_assignment_count", "avg_client_parse_count", "avg_server_parse_count",
        "avg_bind_count",
    },
    # Rows rather than columns: SHOW LISTS' and SHOW TOTALS' names.
    "LISTS rows": {"peers", "peer_pools"},
    "TOTALS rows": {
        "total_server_assignment_count", "total_ps_client_parse_count",
        "total_ps_server_parse_count", "total_ps_bind_count", "avg_server_assignment_count",
        "avg_ps_client_parse_count", "avg_ps_server_parse_count", "avg_ps_bind_count",
    },
}  # fmt: skip
_RENAMED_SINCE_1_18 = {"DATABASES": {"reserve_pool": "reserve_pool_size"}}

# The SHOW commands both have (pgmux has no FDS, SOCKETS, ACTIVE_SOCKETS, DNS_HOSTS,
# DNS_ZONES: they show PgBouncer's internals). STATE is newer than 1.18: skipped when
# the PgBouncer at hand does not know it.
COMPARED = [
    "DATABASES", "POOLS", "CLIENTS", "SERVERS", "USERS", "STATS", "STATS_TOTALS",
    "STATS_AVERAGES", "TOTALS", "LISTS", "MEM", "CONFIG", "VERSION", "STATE",
]  # fmt: skip

Described = list[tuple[str, int]]


def _describe(conninfo: str, commands: list[str]) -> dict[str, Described | str]:
    """Each command's (column name, type OID) list, or the error text; plus
    "<CMD> rows" -> the first column of LISTS and TOTALS rows. Simple protocol
    (psycopg sends a query without parameters as a Query), as PgBouncer needs."""
    found: dict[str, Described | str] = {}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for command in commands:
            try:
                cur = conn.execute(f"SHOW {command}")
            except psycopg.Error as exc:
                found[command] = str(exc)
                continue
            assert cur.description is not None, command
            found[command] = [(d.name, d.type_code) for d in cur.description]
            if command in ("LISTS", "TOTALS"):
                found[f"{command} rows"] = [(str(row[0]), 0) for row in cur.fetchall()]
    return found


@pytest.fixture(scope="module")
def pgbouncer_columns(pg: PgCluster) -> dict[str, Described | str]:
    """What a real PgBouncer answers, read once per module (it is stopped at once)."""
    if find_pgbouncer() is None:
        pytest.skip("PgBouncer is not installed (/usr/sbin/pgbouncer: apt-get install pgbouncer)")
    path = Path(tempfile.mkdtemp(prefix="pgmux-admin-pgbouncer-", dir="/tmp"))
    try:
        os.chmod(path, 0o755)  # PgBouncer runs as postgres and must read its files
        with PgBouncerProcess.start(pg, path / "pgbouncer") as bouncer:
            return _describe(bouncer.conninfo(), COMPARED)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pgmux_columns(pg: PgCluster) -> Iterator[dict[str, Described | str]]:
    """The same from pgmux (one process for the module's comparisons)."""
    path = Path(tempfile.mkdtemp(prefix="pgmux-admin-columns-", dir="/tmp"))
    try:
        config = deep_merge(default_config(pg, free_port()), ADMIN_OVERRIDES)
        with PgmuxProcess.start(config, path / "pgmux") as pgmux:
            yield _describe(pgmux.conninfo(ADMIN_USER, ADMIN_PASSWORD, "pgbouncer"), COMPARED)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _compare(key: str, theirs: Described, ours: Described) -> None:
    renamed = _RENAMED_SINCE_1_18.get(key, {})
    added = _ADDED_SINCE_1_18.get(key, set())
    expected = [(renamed.get(name, name), oid) for name, oid in theirs]
    names = [name for name, _ in ours]
    assert not added - set(names), f"SHOW {key}: pgmux lacks PgBouncer 1.25's {added - set(names)}"
    assert len(set(names)) == len(names), f"SHOW {key}: duplicate columns {names}"
    shared = [(name, oid) for name, oid in ours if name not in added]
    assert shared[: len(expected)] == expected, (
        f"SHOW {key}: PgBouncer 1.18 {expected}\npgmux {ours}"
    )


@pytest.mark.parametrize("command", COMPARED)
def test_columns_follow_pgbouncer(
    pgbouncer_columns: dict[str, Described | str],
    pgmux_columns: dict[str, Described | str],
    command: str,
) -> None:
    theirs = pgbouncer_columns[command]
    ours = pgmux_columns[command]
    assert not isinstance(ours, str), f"pgmux: SHOW {command}: {ours}"
    if isinstance(theirs, str):
        assert "invalid command" in theirs, theirs
        pytest.skip(f"this PgBouncer has no SHOW {command}: {theirs.splitlines()[0]}")
    _compare(command, theirs, ours)
    if command in ("LISTS", "TOTALS"):  # their rows are named things too
        rows_theirs = pgbouncer_columns[f"{command} rows"]
        rows_ours = pgmux_columns[f"{command} rows"]
        assert not isinstance(rows_theirs, str) and not isinstance(rows_ours, str)
        _compare(f"{command} rows", rows_theirs, rows_ours)


def test_pgmux_columns_types(pgmux_columns: dict[str, Described | str]) -> None:
    """Only the types PgBouncer sends (text, int4, int8, numeric); every stats
    column numeric, as PgBouncer's 'N'."""
    for command, described in pgmux_columns.items():
        if command.endswith(" rows"):
            continue
        assert not isinstance(described, str), (command, described)
        assert {oid for _, oid in described} <= {TEXT, INT4, INT8, NUMERIC}, (command, described)
    for command in ("STATS", "STATS_TOTALS", "STATS_AVERAGES"):
        described = pgmux_columns[command]
        assert not isinstance(described, str)
        assert described[0] == ("database", TEXT)
        assert {oid for _, oid in described[1:]} == {NUMERIC}, described


# -- protocols -----------------------------------------------------------------------------


async def test_simple_protocol_psql(pgmux_factory: PgmuxFactory) -> None:
    pgmux = _start(pgmux_factory)
    app = await connect_asyncpg(pgmux)  # so that the app pool exists
    try:
        proc = run_psql(
            pgmux, "-P", "tuples_only=off", "-P", "footer=off", "-c", "SHOW POOLS", user=ADMIN_USER,
            dbname="pgbouncer", password=ADMIN_PASSWORD,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        header = lines[0].split("|")
        assert header[:4] == ["database", "user", "cl_active", "cl_waiting"], lines
        rows = {tuple(line.split("|")[:2]): line.split("|") for line in lines[1:]}
        assert set(rows) == {("pgbouncer", "pgbouncer"), (APP_DB, APP_USER)}, lines
        app_row = dict(zip(header, rows[(APP_DB, APP_USER)], strict=True))
        assert app_row["cl_active"] == "1" and app_row["cl_waiting"] == "0", app_row
        assert app_row["pool_mode"] == "transaction" and app_row["pool_size"] == "5", app_row
        admin_row = dict(zip(header, rows[("pgbouncer", "pgbouncer")], strict=True))
        assert admin_row["cl_active"] == "1", admin_row  # psql itself
        assert admin_row["pool_mode"] == "statement", admin_row

        # Several commands in one session, the pgmux alias, SHOW HELP as a NOTICE.
        proc = run_psql(
            pgmux, "-c", "SHOW VERSION", "-c", "SHOW HELP", "-c", "show   state;",
            user=ADMIN_USER, dbname="pgmux", password=ADMIN_PASSWORD,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[0] == f"pgmux {__version__}", proc.stdout
        assert "active|yes" in proc.stdout.splitlines() and "paused|no" in proc.stdout
        assert "NOTICE:  Console usage" in proc.stderr, proc.stderr
        assert "SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION" in proc.stderr
        assert "ERROR" not in proc.stderr, proc.stderr
    finally:
        await app.close()


async def test_extended_protocol_asyncpg_binary(pgmux_factory: PgmuxFactory) -> None:
    """asyncpg asks for binary results: int4 and int8 come as int, numeric as Decimal."""
    pgmux = _start(pgmux_factory)
    app = await connect_asyncpg(pgmux)
    admin = await connect_asyncpg(pgmux, ADMIN_USER, ADMIN_PASSWORD, "pgbouncer")
    try:
        for _ in range(3):
            assert await app.fetchval("SELECT 1") == 1
        pools = {(r["database"], r["user"]): r for r in await admin.fetch("SHOW POOLS")}
        row = pools[(APP_DB, APP_USER)]
        assert list(row.keys())[:4] == ["database", "user", "cl_active", "cl_waiting"]
        assert type(row["cl_active"]) is int and row["cl_active"] == 1, dict(row)
        assert row["sv_idle"] == 1 and row["sv_active"] == 0 and row["maxwait"] == 0, dict(row)
        assert row["pool_mode"] == "transaction" and row["load_balance_hosts"] is None

        stats = {r["database"]: r for r in await admin.fetch("SHOW STATS_TOTALS")}
        app_stats = stats[APP_DB]
        assert isinstance(app_stats["xact_count"], Decimal), dict(app_stats)
        assert app_stats["xact_count"] == 3 and app_stats["query_count"] == 3, dict(app_stats)
        assert app_stats["bytes_received"] > 0 and app_stats["bytes_sent"] > 0

        mem = {r["name"]: r for r in await admin.fetch("SHOW MEM")}
        rss = mem["process_rss_kib"]
        assert type(rss["size"]) is int and rss["size"] > 1_000, dict(rss)
        assert type(rss["memtotal"]) is int and rss["memtotal"] == rss["size"] * rss["used"]

        clients = await admin.fetch("SHOW CLIENTS")
        # The console session is listed too (state active, database pgbouncer), as in
        # PgBouncer.
        assert sorted((r["user"], r["database"], r["state"], r["id"] > 0, type(r["port"]))
                      for r in clients) == [
            ("admin", "pgbouncer", "active", True, int),
            (APP_USER, APP_DB, "idle", True, int),
        ]  # fmt: skip
        assert [r["port"] for r in clients if r["user"] == APP_USER] == [_client_port(app)]
        assert await admin.fetchval("SHOW VERSION") == f"pgmux {__version__}"
        assert await admin.fetchval("SHOW client_encoding") == "UTF-8"  # a fake parameter
        # A prepared statement of the console, run twice.
        statement = await admin.prepare("SHOW LISTS")
        assert [a.name for a in statement.get_attributes()] == ["list", "items"]
        for _ in range(2):
            lists = dict(await statement.fetch())
            assert lists["databases"] == 2 and lists["used_clients"] == 2, lists
    finally:
        await app.close()
        await admin.close()


@pytest.mark.parametrize(
    ("prepare_threshold", "binary", "rounds"),
    [(0, False, 2), (0, True, 2), (None, True, 2), (5, False, 7)],
    ids=["prepared", "prepared-binary", "unnamed-binary", "default-threshold"],
)
async def test_extended_protocol_psycopg(
    pgmux_factory: PgmuxFactory, prepare_threshold: int | None, binary: bool, rounds: int
) -> None:
    """psycopg: prepared at once, never, or after psycopg's default five runs."""
    pgmux = _start(pgmux_factory)
    app = await connect_asyncpg(pgmux)
    admin = await _admin(pgmux, prepare_threshold=prepare_threshold)
    try:
        for _ in range(rounds):
            cur = admin.cursor(binary=binary)
            await cur.execute("SHOW POOLS")
            assert cur.description is not None
            assert [(d.name, d.type_code) for d in cur.description[:3]] == [
                ("database", TEXT), ("user", TEXT), ("cl_active", INT4),
            ]  # fmt: skip
            rows = _app_rows(await cur.fetchall())
            assert len(rows) == 1 and rows[0]["cl_active"] == 1, rows
            assert rows[0]["cl_waiting"] == 0 and rows[0]["sv_active"] == 0, rows
            await cur.execute("SHOW STATS")
            stats = {r["database"]: r for r in await cur.fetchall()}
            assert isinstance(stats["pgbouncer"]["total_query_count"], Decimal), stats
            assert stats["pgbouncer"]["total_query_count"] >= 2, stats
        # A second statement prepared beside the first, and an empty query.
        cur = await admin.execute("SHOW DATABASES")
        databases = {r["name"]: r for r in await cur.fetchall()}
        assert databases[APP_DB]["pool_size"] == 5, databases
        notices: list[str] = []
        admin.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        cur = await admin.execute("SHOW HELP")
        assert cur.description is None and notices == ["Console usage"], notices
        assert (await admin.execute("SHOW VERSION")).description is not None
    finally:
        await app.close()
        await admin.close()


async def test_help_notice_and_empty_query(pgmux_factory: PgmuxFactory) -> None:
    pgmux = _start(pgmux_factory)
    admin = await connect_asyncpg(pgmux, WATCHER_USER, WATCHER_PASSWORD, "pgmux")
    notices: list[asyncpg.PostgresLogMessage] = []
    admin.add_log_listener(lambda _conn, message: notices.append(message))
    try:
        assert await admin.fetch("SHOW HELP") == []  # extended: NoData, then the NOTICE
        await admin.execute("show help;")  # simple
        await wait_until(lambda: len(notices) == 2, DEADLINE, what="two NOTICEs")
        for notice in notices:
            assert notice.severity == "NOTICE" and notice.sqlstate == "00000"
            assert notice.message == "Console usage"
            assert notice.detail is not None
            assert "SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS" in notice.detail
            assert "PAUSE [<db>]" in notice.detail
        assert await admin.fetch("") == []
        assert await admin.fetch(" ; ") == []
        # (asyncpg's execute("") fails on PostgreSQL itself: EmptyQueryResponse has no tag)
        assert await admin.fetchval("SHOW VERSION") == f"pgmux {__version__}"
    finally:
        await admin.close()

    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        await raw.login(ADMIN_USER, ADMIN_PASSWORD, "pgbouncer")
        reply = await raw.exchange(query(""))
        assert reply.types == "IZ", reply.messages  # EmptyQueryResponse, ReadyForQuery
        reply = await raw.exchange(query("SHOW HELP"))
        assert reply.types == "NCZ" and reply.tags == ["SHOW"], reply.messages


# -- a known situation ---------------------------------------------------------------------


@pytest.mark.parametrize("log_statement_text", [True, False])
async def test_holder_and_waiter(pgmux_factory: PgmuxFactory, log_statement_text: bool) -> None:
    """Pool of one: A holds the server inside a transaction, B queues behind it."""
    pgmux = _start(
        pgmux_factory,
        default_pool_size=1,
        query_wait_timeout=60,
        log_statement_text=log_statement_text,
    )
    a = await connect_asyncpg(pgmux, server_settings={"application_name": "holder"})
    b = await connect_asyncpg(pgmux, server_settings={"application_name": "waiter"})
    admin = await _admin(pgmux)
    waiting: asyncio.Task[Any] | None = None
    try:
        tx = a.transaction()
        await tx.start()
        a_pid = await a.fetchval("SELECT pg_backend_pid() /* holder statement */")
        started = time.monotonic()
        waiting = asyncio.create_task(b.fetchval("SELECT 'served'"))

        async def queued() -> dict[str, Any] | None:
            pool = await _app_pool(admin)
            return pool if pool["cl_waiting"] == 1 else None

        await wait_until(queued, DEADLINE, what="B queued")

        async def waited_a_while() -> dict[str, Any] | None:
            pool = await _app_pool(admin)
            return pool if pool["maxwait"] * 1_000_000 + pool["maxwait_us"] >= 200_000 else None

        pool = await wait_until(waited_a_while, DEADLINE, what="maxwait grows")
        elapsed = time.monotonic() - started
        assert not waiting.done()
        assert pool["cl_active"] == 1 and pool["cl_waiting"] == 1, pool
        assert pool["sv_active"] == 1 and pool["sv_idle"] == 0 and pool["sv_login"] == 0, pool
        assert pool["cl_idle_in_transaction"] == 1 and pool["sv_pinned"] == 0, pool
        assert pool["pool_size"] == 1, pool
        assert pool["maxwait"] >= 0 and 0 <= pool["maxwait_us"] < 1_000_000, pool
        assert pool["maxwait"] + pool["maxwait_us"] / 1e6 <= elapsed + 0.01, (pool, elapsed)

        clients = {r["application_name"]: r for r in _app_rows(await _show(admin, "CLIENTS"))}
        assert set(clients) == {"holder", "waiter"}, clients
        holder, waiter = clients["holder"], clients["waiter"]
        assert holder["state"] == "idle in transaction", holder
        assert holder["ptr"] == f"C-{holder['id']}" and holder["type"] == "C", holder
        assert holder["port"] == _client_port(a) and holder["addr"] == "127.0.0.1", holder
        assert holder["remote_pid"] == a_pid, holder
        assert holder["xact_start"] is not None and holder["query_start"] is None, holder
        assert holder["wait"] == 0 and holder["wait_us"] == 0, holder
        if log_statement_text:
            assert holder["last_statement"] == "SELECT pg_backend_pid() /* holder statement */"
            # The queued request is read when it is relayed: nothing before that.
            assert waiter["last_statement"] in (None, "SELECT 'served'"), waiter
        else:
            assert holder["last_statement"] is None and waiter["last_statement"] is None
        assert waiter["state"] == "waiting" and waiter["link"] == "", waiter
        assert waiter["port"] == _client_port(b), waiter
        assert waiter["wait"] * 1_000_000 + waiter["wait_us"] >= 200_000, waiter
        assert waiter["remote_pid"] == 0 and waiter["xact_start"] is None, waiter

        servers = _app_rows(await _show(admin, "SERVERS"))
        assert len(servers) == 1, servers
        server = servers[0]
        assert server["type"] == "S" and server["ptr"] == f"S-{server['id']}", server
        assert server["link"] == holder["ptr"] and holder["link"] == server["ptr"], (server, holder)
        assert server["remote_pid"] == a_pid, server
        assert server["state"] == "idle in transaction", server
        assert server["last_statement"] == holder["last_statement"], server

        await tx.commit()
        assert await asyncio.wait_for(waiting, DEADLINE) == "served"

        async def drained() -> dict[str, Any] | None:
            pool = await _app_pool(admin)
            return pool if (pool["cl_waiting"], pool["sv_idle"]) == (0, 1) else None

        pool = await wait_until(drained, DEADLINE, what="queue drained")
        assert pool["cl_active"] == 2 and pool["sv_active"] == 0, pool
        assert pool["maxwait"] == 0 and pool["maxwait_us"] == 0, pool
        assert pool["cl_idle_in_transaction"] == 0, pool
        states = {
            r["application_name"]: r["state"] for r in _app_rows(await _show(admin, "CLIENTS"))
        }
        assert states == {"holder": "idle", "waiter": "idle"}, states
        servers = _app_rows(await _show(admin, "SERVERS"))
        assert [(s["state"], s["link"]) for s in servers] == [("idle", "")], servers
    finally:
        if waiting is not None and not waiting.done():
            waiting.cancel()
        for conn in (a, b):
            await conn.close()
        await admin.close()


# -- counters and the other SHOWs ----------------------------------------------------------


async def test_stats_after_known_traffic(pgmux_factory: PgmuxFactory) -> None:
    # A long stats_period: the averages cover the time since start, not a period.
    pgmux = _start(pgmux_factory, stats_period=3600)
    app = await connect_asyncpg(pgmux)
    admin = await _admin(pgmux)
    try:
        assert await app.fetchval("SELECT 1") == 1  # the app pool exists from here
        before = {r["database"]: r for r in await _show(admin, "STATS_TOTALS")}[APP_DB]
        singles, transactions = 20, 5
        for i in range(singles):
            assert await app.fetchval("SELECT $1::int", i) == i
        for _ in range(transactions):
            async with app.transaction():  # BEGIN, two queries, COMMIT
                await app.fetchval("SELECT 1")
                await app.fetchval("SELECT 2")
        after = {r["database"]: r for r in await _show(admin, "STATS_TOTALS")}[APP_DB]
        delta = {key: after[key] - before[key] for key in after if key != "database"}
        assert delta["xact_count"] == singles + transactions, delta
        assert delta["query_count"] == singles + 4 * transactions, delta
        assert delta["server_assignment_count"] == singles + transactions, delta
        assert delta["bytes_received"] > 0 and delta["bytes_sent"] > 0, delta
        assert delta["xact_time"] > 0 and delta["query_time"] > 0, delta
        assert delta["wait_time"] >= 0, delta
        assert after["xact_time"] >= after["query_time"] / 2, after  # whole transactions

        stats = {r["database"]: r for r in await _show(admin, "STATS")}
        row = stats[APP_DB]
        for key in ("xact_count", "query_count", "xact_time", "query_time", "wait_time"):
            assert row[f"total_{key}"] == after[key], (key, row, after)
        assert row["total_received"] == after["bytes_received"], row
        assert row["total_sent"] == after["bytes_sent"], row
        assert row["avg_xact_time"] == int(after["xact_time"] / after["xact_count"]), row
        assert row["avg_query_time"] == int(after["query_time"] / after["query_count"]), row
        assert row["avg_xact_time"] > 0 and row["avg_query_time"] > 0, row
        assert stats["pgbouncer"]["total_query_count"] >= 3, stats  # the console's own

        averages = {r["database"]: r for r in await _show(admin, "STATS_AVERAGES")}[APP_DB]
        assert averages["xact_time"] == row["avg_xact_time"], (averages, row)
        assert averages["query_time"] == row["avg_query_time"], (averages, row)
        assert averages["xact_count"] >= 0 and averages["bytes_received"] >= 0, averages

        every = await _show(admin, "STATS_TOTALS")
        totals = await _named(admin, "TOTALS")
        assert totals["total_client_bytes"] == sum(r["bytes_received"] for r in every), totals
        assert totals["total_server_bytes"] == sum(r["bytes_sent"] for r in every), totals
        # The console counts its own commands: SHOW TOTALS is one more.
        assert totals["total_xact_count"] == sum(r["xact_count"] for r in every) + 1, totals
        assert totals["total_query_count"] == sum(r["query_count"] for r in every) + 1
        assert totals["avg_xact_time"] > 0, totals
        assert list(totals)[:2] == ["total_server_assignment_count", "total_xact_count"]
    finally:
        await app.close()
        await admin.close()


async def test_other_shows(pg: PgCluster, pgmux_factory: PgmuxFactory) -> None:
    pgmux = _start(pgmux_factory, default_pool_size=3, users={APP_USER: {"pool_size": 2}})
    apps = [await connect_asyncpg(pgmux) for _ in range(2)]
    admin = await _admin(pgmux)
    try:
        for conn in apps:
            assert await conn.fetchval("SELECT 1") == 1

        databases = {r["name"]: r for r in await _show(admin, "DATABASES")}
        assert set(databases) == {"pgbouncer", APP_DB}, databases
        db = databases[APP_DB]
        assert (db["host"], db["port"], db["database"]) == (pg.host, pg.port, APP_DB), db
        assert db["pool_size"] == 3 and db["min_pool_size"] == 0, db
        assert db["current_client_connections"] == 2, db
        assert 1 <= db["current_connections"] <= 2, db
        assert (db["paused"], db["disabled"]) == (0, 0), db
        assert databases["pgbouncer"]["force_user"] == "pgbouncer", databases

        users = {r["name"]: r for r in await _show(admin, "USERS")}
        assert {APP_USER, ADMIN_USER, WATCHER_USER} <= set(users), users
        assert users[APP_USER]["pool_size"].strip() == "2", users[APP_USER]  # PgBouncer's %9d
        assert users[ADMIN_USER]["pool_size"] == "", users[ADMIN_USER]
        assert users[APP_USER]["current_client_connections"] == 2, users[APP_USER]
        assert users[ADMIN_USER]["current_client_connections"] == 0, users[ADMIN_USER]

        config = {r["key"]: r for r in await _show(admin, "CONFIG")}
        assert config["default_pool_size"]["value"] == "3", config["default_pool_size"]
        assert config["default_pool_size"]["default"] == "20", config["default_pool_size"]
        assert config["default_pool_size"]["changeable"] == "yes"
        assert config["listen_port"]["value"] == str(pgmux.port), config["listen_port"]
        assert config["listen_port"]["changeable"] == "no"
        assert config["pool_mode"]["value"] == "transaction"
        assert list(config) == sorted(config), "SHOW CONFIG is sorted by key"

        lists = await _named(admin, "LISTS", key="list")
        assert lists["databases"] == 2 and lists["pools"] == 2, lists
        assert lists["users"] == len(users), (lists, users)
        assert lists["used_clients"] == 3 and lists["login_clients"] == 0, lists  # + admin
        assert lists["used_servers"] == db["current_connections"], (lists, db)

        state = await _named(admin, "STATE", key="key")
        assert state == {
            "active": "yes", "paused": "no", "suspended": "no", "shutting_down": "no",
            "paused_databases": "", "disabled_databases": "", "workers": "1",
        }  # fmt: skip

        mem = {r["name"]: r for r in await _show(admin, "MEM")}
        assert mem["client_cache"]["used"] == 3 and mem["client_cache"]["size"] > 0, mem
        assert mem["server_cache"]["used"] == db["current_connections"], mem
        assert mem["process_rss_kib"]["size"] > 1_000, mem
        for row in mem.values():
            assert row["memtotal"] == row["size"] * row["used"], row

        assert [r["version"] for r in await _show(admin, "VERSION")] == [f"pgmux {__version__}"]
        assert await _show(admin, "PINS") == []
    finally:
        for conn in apps:
            await conn.close()
        await admin.close()


# -- pins ----------------------------------------------------------------------------------


async def test_pins(pgmux_factory: PgmuxFactory) -> None:
    pgmux = _start(pgmux_factory)
    locker = await connect_asyncpg(pgmux, server_settings={"application_name": "locker"})
    listener = await connect_asyncpg(pgmux, server_settings={"application_name": "listener"})
    admin = await connect_asyncpg(pgmux, ADMIN_USER, ADMIN_PASSWORD, "pgbouncer")
    try:
        lock_pid = await locker.fetchval("SELECT pg_backend_pid() FROM pg_advisory_lock(7)")
        await listener.execute("LISTEN admin_test_channel")

        async def two_pins() -> list[asyncpg.Record] | None:
            pins = await admin.fetch("SHOW PINS")
            return pins if len(pins) == 2 else None

        pins = {r["application_name"]: r for r in await wait_until(two_pins, DEADLINE)}
        lock = pins["locker"]
        assert lock["pin_reason"] == "session advisory lock", dict(lock)
        assert lock["last_statement"] == "SELECT pg_backend_pid() FROM pg_advisory_lock(7)"
        assert lock["remote_pid"] == lock_pid and lock["user"] == APP_USER, dict(lock)
        assert lock["database"] == APP_DB and lock["addr"] == "127.0.0.1", dict(lock)
        assert isinstance(lock["pinned_seconds"], Decimal) and lock["pinned_seconds"] >= 0
        assert lock["pinned_since"] is not None and lock["worker"] == 0, dict(lock)
        assert lock["pinned_by"] == lock["last_statement"], dict(lock)
        assert pins["listener"]["pin_reason"] == "LISTEN", dict(pins["listener"])

        # A later statement moves last_statement on; pinned_by still names the lock.
        assert await locker.fetchval("SELECT 'after the pin'") == "after the pin"
        lock = {r["application_name"]: r for r in await admin.fetch("SHOW PINS")}["locker"]
        assert lock["last_statement"] == "SELECT 'after the pin'", dict(lock)
        assert lock["pinned_by"] == "SELECT pg_backend_pid() FROM pg_advisory_lock(7)"

        clients = {r["application_name"]: r for r in await admin.fetch("SHOW CLIENTS")}
        for name, pin in pins.items():
            client = clients[name]
            assert client["state"] == "pinned", dict(client)
            assert client["pin_reason"] == pin["pin_reason"], dict(client)
            assert client["id"] == pin["client_id"], (dict(client), dict(pin))
            assert client["link"] == f"S-{pin['server_id']}", (dict(client), dict(pin))
        servers = {r["id"]: r for r in await admin.fetch("SHOW SERVERS")}
        assert servers[lock["server_id"]]["state"] == "pinned", servers
        assert servers[lock["server_id"]]["remote_pid"] == lock_pid, servers
        pools = {(r["database"], r["user"]): r for r in await admin.fetch("SHOW POOLS")}
        assert pools[(APP_DB, APP_USER)]["sv_pinned"] == 2, dict(pools[(APP_DB, APP_USER)])

        # Cleared state unpins: the client goes back to idle, its row leaves SHOW PINS.
        assert await locker.fetchval("SELECT pg_advisory_unlock_all()::text") == ""

        async def one_pin() -> list[asyncpg.Record] | None:
            pins = await admin.fetch("SHOW PINS")
            return pins if len(pins) == 1 else None

        left = await wait_until(one_pin, DEADLINE, what="the locker unpinned")
        assert left[0]["application_name"] == "listener", [dict(r) for r in left]
        clients = {r["application_name"]: r for r in await admin.fetch("SHOW CLIENTS")}
        assert clients["locker"]["state"] == "idle" and clients["locker"]["pin_reason"] is None
    finally:
        for conn in (locker, listener, admin):
            await conn.close()


# -- errors and permissions ----------------------------------------------------------------


def test_errors_keep_the_psql_session(pgmux_factory: PgmuxFactory) -> None:
    pgmux = _start(pgmux_factory)
    proc = run_psql(
        pgmux, user=ADMIN_USER, dbname="pgbouncer", password=ADMIN_PASSWORD,
        input="SHOW POOL;\nSHOW VERSION;\nSHOW POOLS extra;\nSHOW STATE;\n",
    )  # fmt: skip
    # psql sends the semicolon too; PgBouncer quotes the whole query likewise.
    assert "ERROR:  invalid command 'SHOW POOL;', use SHOW HELP;" in proc.stderr, proc.stderr
    assert "HINT:  did you mean SHOW POOLS?" in proc.stderr, proc.stderr
    assert "invalid command 'SHOW POOLS extra;'" in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"pgmux {__version__}", proc.stdout  # the same session went on
    assert "active|yes" in lines, proc.stdout
    assert "closed the connection" not in proc.stderr, proc.stderr


async def test_errors_keep_the_session(pgmux_factory: PgmuxFactory) -> None:
    pgmux = _start(pgmux_factory)
    # psycopg, extended protocol with named statements.
    admin = await _admin(pgmux, prepare_threshold=0)
    try:
        with pytest.raises(psycopg.errors.ProtocolViolation) as info:
            await admin.execute("SHOW POOL")
        assert info.value.diag.sqlstate == "08P01"
        assert info.value.diag.message_primary == "invalid command 'SHOW POOL', use SHOW HELP;"
        assert info.value.diag.message_hint == "did you mean SHOW POOLS?"
        # Bad arguments: a database that does not exist, a client id that is no number.
        with pytest.raises(psycopg.errors.ProtocolViolation) as info:
            await admin.execute("RESUME nosuchdb")
        assert info.value.diag.message_primary == "no such database: nosuchdb"
        assert info.value.diag.message_hint == f"SHOW DATABASES lists them: {APP_DB}"
        with pytest.raises(psycopg.errors.ProtocolViolation) as info:
            await admin.execute("KILL_CLIENT abc")
        assert info.value.diag.message_hint == "KILL_CLIENT takes an id from SHOW CLIENTS"
        assert not admin.closed
        assert len(await _show(admin, "POOLS")) == 1  # the console's own row
    finally:
        await admin.close()

    # asyncpg: the error arrives inside its extended batch, the connection goes on.
    conn = await connect_asyncpg(pgmux, ADMIN_USER, ADMIN_PASSWORD, "pgbouncer")
    try:
        error = await error_of(conn.fetch("SHOW POOL"))
        assert error.sqlstate == "08P01" and error.hint == "did you mean SHOW POOLS?", error
        error = await error_of(conn.fetch("SHOW CLIENTS please"))
        assert error.sqlstate == "08P01" and "SHOW CLIENTS please" in error.message, error
        assert not conn.is_closed()
        assert await conn.fetchval("SHOW VERSION") == f"pgmux {__version__}"
        assert [r["database"] for r in await conn.fetch("SHOW POOLS")] == ["pgbouncer"]
    finally:
        await conn.close()

    # By hand: a failed Parse skips the rest of its batch; the next batch is served.
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        await raw.login(ADMIN_USER, ADMIN_PASSWORD, "pgbouncer")
        bad = parse("SHOW NOTHING") + bind() + execute() + sync()
        good = parse("SHOW VERSION") + bind() + execute() + sync()
        first, second = await raw.exchange_batches(bad + good, 2)
        assert first.types == "EZ" and first.sqlstates == ["08P01"], first.messages
        assert first.status == "I"
        assert second.types == "12DCZ" and second.rows == [[f"pgmux {__version__}"]]


async def test_stats_user_may_only_show(pgmux_factory: PgmuxFactory) -> None:
    pgmux = _start(pgmux_factory)
    watcher = await _admin(pgmux, WATCHER_USER, WATCHER_PASSWORD)
    try:
        assert len(await _show(watcher, "POOLS")) == 1
        for command in ("PAUSE", "SET default_pool_size = 1", "RELOAD"):
            with pytest.raises(psycopg.errors.ProtocolViolation) as info:
                await watcher.execute(command)
            diag = info.value.diag
            assert (diag.sqlstate, diag.message_primary) == ("08P01", "admin access needed")
            assert diag.message_hint is not None
            assert f'user "{WATCHER_USER}" is in stats_users' in diag.message_hint
            assert "admin_users" in diag.message_hint
        state = {r["key"]: r["value"] for r in await _show(watcher, "STATE")}
        assert state["paused"] == "no", state  # PAUSE did not happen
        config = {r["key"]: r["value"] for r in await _show(watcher, "CONFIG")}
        assert config["default_pool_size"] == "5", config  # nor did SET
    finally:
        await watcher.close()
    # The admin may; RESUME undoes it.
    admin = await _admin(pgmux)
    try:
        await admin.execute("PAUSE")
        assert {r["key"]: r["value"] for r in await _show(admin, "STATE")}["paused"] == "yes"
        await admin.execute("RESUME")
        assert {r["key"]: r["value"] for r in await _show(admin, "STATE")}["paused"] == "no"
    finally:
        await admin.close()
    # Neither an admin nor a stats user: refused at login, whatever the password.
    for dbname in ("pgbouncer", "pgmux"):
        error = await error_of(connect_asyncpg(pgmux, APP_USER, APP_PASSWORD, dbname))
        assert error.sqlstate == "28000", error


# -- workers ---------------------------------------------------------------------------------


async def test_workers_one_answer_for_the_instance(pgmux_factory: PgmuxFactory) -> None:
    workers, wanted = 2, 8
    pgmux = _start(pgmux_factory, workers=workers)
    conns: list[asyncpg.Connection] = []
    admins: dict[int, AdminConn] = {}
    try:
        # Eight idle app clients with both workers among them (the kernel spreads them).
        for _ in range(100):
            on = [c.get_server_pid() % workers for c in conns]
            if len(conns) == wanted and len(set(on)) == workers:
                break
            if len(conns) == wanted:  # all on one worker: swap one out
                await conns.pop().close()
            conns.append(await connect_asyncpg(pgmux, timeout=60))
        on = [c.get_server_pid() % workers for c in conns]
        assert len(conns) == wanted and len(set(on)) == workers, on
        # An admin session on each worker.
        for _ in range(100):
            if len(admins) == workers:
                break
            admin = await _admin(pgmux)
            worker = admin.info.backend_pid % workers
            if worker in admins:
                await admin.close()
            else:
                admins[worker] = admin
        assert sorted(admins) == list(range(workers))

        for worker, admin in admins.items():

            async def settled(admin: AdminConn = admin) -> dict[str, Any] | None:
                pool = await _app_pool(admin)  # clients swapped out may still be leaving
                return pool if pool["cl_active"] == wanted else None

            pool = await wait_until(settled, DEADLINE, what=f"8 clients seen from {worker}")
            assert pool["cl_waiting"] == 0 and pool["sv_active"] == 0, pool
            assert pool["pool_size"] == 5, pool  # the workers' shares add up

            clients = _app_rows(await _show(admin, "CLIENTS"))
            assert len(clients) == wanted, clients
            assert sorted(r["worker"] for r in clients) == sorted(on), (clients, on)
            for row in clients:
                assert row["id"] % workers == row["worker"], row
                assert row["state"] == "idle", row
            assert {r["port"] for r in clients} == {_client_port(c) for c in conns}

            state = {r["key"]: r["value"] for r in await _show(admin, "STATE")}
            assert state["workers"] == str(workers), state
            databases = {r["name"]: r for r in await _show(admin, "DATABASES")}
            assert databases[APP_DB]["current_client_connections"] == wanted, databases
            lists = {r["list"]: r["items"] for r in await _show(admin, "LISTS")}
            assert lists["used_clients"] == wanted + workers, lists  # the two admins too
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        for admin in admins.values():
            await admin.close()
