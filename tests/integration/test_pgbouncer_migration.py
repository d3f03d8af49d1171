"""Migrating from PgBouncer in one command: a pgbouncer.ini (with an ``%include`` and a
userlist.txt) runs the real PgBouncer; ``pgmux convert`` turns the same file into the
config pgmux then runs with, on the same port. The same clients with the same passwords
work through both, with the same pool modes and the same SHOW CONFIG values.

Skipped when PgBouncer is not installed (``apt-get install pgbouncer``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.rows import dict_row
from support.admin import show
from support.helpers import connect_psycopg, run_psql_conninfo
from support.pgbouncer import (
    ADMIN_PASSWORD,
    ADMIN_USER,
    PgBouncerProcess,
    chown_to_postgres,
    find_pgbouncer,
)
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster, free_port
from support.pgmux import REPO_ROOT, PgmuxProcess, deep_merge

pytestmark = pytest.mark.skipif(
    find_pgbouncer() is None, reason="PgBouncer is not installed (apt-get install pgbouncer)"
)

# Settings both show in SHOW CONFIG, which must read the same after the conversion.
COMPARED = (
    "pool_mode", "auth_type", "listen_port", "listen_backlog", "default_pool_size",
    "max_client_conn", "server_idle_timeout", "query_wait_timeout", "admin_users",
)  # fmt: skip
TX_DB = "apptx"  # the same database again, in transaction mode


def write_pgbouncer_config(pg: PgCluster, directory: Path, port: int) -> Path:
    directory.mkdir(mode=0o755)
    chown_to_postgres(directory)
    files = {
        "userlist.txt": f'"{APP_USER}" "{APP_PASSWORD}"\n"{ADMIN_USER}" "{ADMIN_PASSWORD}"\n',
        # Pool sizing split off, as many deployments do; relative to PgBouncer's working
        # directory, which is this one (and pgmux convert looks beside the ini first).
        "pools.ini": "default_pool_size = 4\nmax_client_conn = 50\nserver_idle_timeout = 30\n",
        "pgbouncer.ini": (
            "[databases]\n"
            f"{APP_DB} = host={pg.host} port={pg.port} dbname={APP_DB}\n"
            f"{TX_DB} = host={pg.host} port={pg.port} dbname={APP_DB} pool_mode=transaction "
            "connect_query='SELECT 1'\n"
            "\n[pgbouncer]\n"
            "; pool_mode and auth_type are left to PgBouncer's defaults (session, md5)\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            "auth_file = userlist.txt\n"
            f"admin_users = {ADMIN_USER}\n"
            "query_wait_timeout = 15\n"
            "logfile = pgbouncer-file.log\n"
            "ignore_startup_parameters = extra_float_digits\n"
            "%include pools.ini\n"
            f"\n[users]\n{APP_USER} = max_user_connections=10\n"
        ),
    }
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        os.chmod(path, 0o644)
        chown_to_postgres(path)
    return directory / "pgbouncer.ini"


@contextlib.contextmanager
def running_pgbouncer(ini: Path, port: int) -> Iterator[PgBouncerProcess]:
    bouncer = PgBouncerProcess.run(ini, port)
    try:
        yield bouncer
    finally:
        bouncer.stop()


async def check_clients(host: str, port: int) -> None:
    """asyncpg and psql as the app user: session mode keeps one backend per client,
    and the transaction-mode database answers too."""
    conn = await asyncpg.connect(
        host=host, port=port, user=APP_USER, password=APP_PASSWORD, database=APP_DB,
        statement_cache_size=0, timeout=15,
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
        pids = {await conn.fetchval("SELECT pg_backend_pid()") for _ in range(3)}
        assert len(pids) == 1, "session pooling keeps the client's server"
    finally:
        await conn.close()
    tx = await asyncpg.connect(
        host=host, port=port, user=APP_USER, password=APP_PASSWORD, database=TX_DB,
        statement_cache_size=0, timeout=15,
    )  # fmt: skip
    try:
        assert await tx.fetchval("SELECT current_database()") == APP_DB
    finally:
        await tx.close()
    psql = run_psql_conninfo(
        f"host={host} port={port} user={APP_USER} dbname={APP_DB} sslmode=disable",
        "-c", "SELECT 40 + 2",
    )  # fmt: skip
    assert (psql.returncode, psql.stdout.strip()) == (0, "42"), psql.stderr


def console_rows(host: str, port: int, command: str) -> list[dict[str, Any]]:
    conninfo = (
        f"host={host} port={port} user={ADMIN_USER} password={ADMIN_PASSWORD} "
        "dbname=pgbouncer sslmode=disable connect_timeout=10"
    )
    with psycopg.connect(conninfo, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(f"SHOW {command}").fetchall()


async def test_convert_and_run_in_place_of_pgbouncer(pg: PgCluster, workdir: Path) -> None:
    port = free_port()
    ini = write_pgbouncer_config(pg, workdir / "bouncer", port)

    with running_pgbouncer(ini, port):
        await check_clients("127.0.0.1", port)
        theirs = {row["key"]: row["value"] for row in console_rows("127.0.0.1", port, "CONFIG")}
    assert (theirs["pool_mode"], theirs["auth_type"]) == ("session", "md5")

    out = workdir / "pgmux.toml"
    converted = subprocess.run(
        [sys.executable, "-m", "proxy", "convert", str(ini), "-o", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    assert converted.stdout == ""
    assert converted.stderr.startswith(
        "pgmux convert: converted 12 settings, 2 databases, 1 users; 2 settings not supported"
    )
    text = out.read_text()
    lines = ini.read_text().splitlines()
    logfile = lines.index("logfile = pgbouncer-file.log") + 1
    tx_db = next(i for i, line in enumerate(lines) if line.startswith(f"{TX_DB} =")) + 1
    assert f"# {ini}:{logfile}: logfile = pgbouncer-file.log: does not apply to pgmux" in text
    assert f"# {ini}:{tx_db}: [databases] {TX_DB}: connect_query=SELECT 1: not supported" in text
    raw = tomllib.loads(text)
    assert raw["users"][APP_USER] == {"max_user_connections": 10}
    assert raw["auth_file"] == str(ini.parent / "userlist.txt")
    assert raw["default_pool_size"] == 4  # from the %include'd file

    # The converted file as it is, but for the metrics port (PgBouncer has none; a
    # fixed 9127 could be taken on a shared test machine).
    config = deep_merge(raw, {"metrics": {"listen_port": free_port()}})
    with PgmuxProcess.start(config, workdir / "pgmux") as pgmux:
        assert pgmux.port == port
        await check_clients(pgmux.host, pgmux.port)
        admin = await connect_psycopg(pgmux, ADMIN_USER, ADMIN_PASSWORD, "pgbouncer")
        try:
            ours = {row["key"]: row["value"] for row in await show(admin, "CONFIG")}
            pools = {row["database"]: row["pool_mode"] for row in await show(admin, "POOLS")}
        finally:
            await admin.close()
    assert {key: ours[key] for key in COMPARED} == {key: theirs[key] for key in COMPARED}
    assert pools[APP_DB] == "session" and pools[TX_DB] == "transaction", pools


async def test_run_straight_from_the_pgbouncer_ini(pg: PgCluster, workdir: Path) -> None:
    """``pgmux --pgbouncer-ini`` reads the file PgBouncer ran with, unchanged; what it
    cannot take is logged as a warning naming file and line, never dropped silently."""
    port = free_port()
    ini = write_pgbouncer_config(pg, workdir / "bouncer", port)
    pgmux = PgmuxProcess.start(
        {"listen_port": port},
        workdir / "pgmux",
        args=("--pgbouncer-ini", str(ini)),
        env={"PGMUX_METRICS_LISTEN_PORT": str(free_port())},
        config_file=False,
    )
    with pgmux:
        await check_clients(pgmux.host, pgmux.port)
        log = pgmux.log()
        assert f"{ini}:" in log and "logfile = pgbouncer-file.log: does not apply" in log
        assert "connect_query=SELECT 1: not supported" in log
        assert 'wrote pool_mode = "session"' in log  # the notes reach the log too
        # A reload reads the ini again: its %include'd pool size changes live.
        (ini.parent / "pools.ini").write_text(
            "default_pool_size = 6\nmax_client_conn = 50\nserver_idle_timeout = 30\n"
        )
        since = len(pgmux.log())
        pgmux.signal(signal.SIGHUP)
        line = pgmux.wait_for_log("reloaded", since=since)
        assert "default_pool_size 4 -> 6" in line
