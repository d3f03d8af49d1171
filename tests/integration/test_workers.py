"""workers = N: N processes share the port, pools divide, cancels find their worker.

The worker holding a client is recovered from the BackendKeyData pid pgmux gave it
(pid % workers). Processes are found with ``ps`` by the config file on their command
line (``PgmuxProcess.processes``), so orphans would show even after their parent died.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from support.helpers import (
    Su,
    app_backends,
    app_table,
    connect_asyncpg,
    connect_psycopg,
    counting_backends,
    error_of,
    fetch_value,
    log_lines,
    wait_until,
)
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster, free_port
from support.pgmux import (
    DEFAULT_COMMAND,
    REPO_ROOT,
    PgmuxFactory,
    PgmuxProcess,
    deep_merge,
    default_config,
    run_check,
    to_toml,
)
from support.wire import cancel_request, ssl_request, startup_packet

WORKERS = 2


def _workers_of(conns: list[asyncpg.Connection]) -> set[int]:
    return {conn.get_server_pid() % WORKERS for conn in conns}


async def _connect_many(pgmux: PgmuxProcess, n: int) -> list[asyncpg.Connection]:
    return list(await asyncio.gather(*(connect_asyncpg(pgmux, timeout=60) for _ in range(n))))


async def _close_all(conns: list[asyncpg.Connection]) -> None:
    await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)


async def _no_app_backends(su: Su) -> bool:
    return not await app_backends(su)


async def _count_sleeping(su: Su, n: int) -> bool:
    rows = await app_backends(su)
    return sum(1 for _, state, _, q in rows if state == "active" and "pg_sleep" in q) >= n


@pytest.fixture
async def table(pg: PgCluster) -> AsyncIterator[str]:
    with app_table(pg, "workers_t", "n int") as name:
        yield name


# -- the process model -------------------------------------------------------------------


def test_one_worker_is_one_process(pgmux: PgmuxProcess) -> None:
    assert pgmux.processes() == {pgmux.pid: pgmux.processes()[pgmux.pid]}
    assert "--worker" not in pgmux.processes()[pgmux.pid]
    assert "supervisor" not in pgmux.log()


async def test_connections_are_spread_over_the_workers(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"workers": WORKERS, "default_pool_size": 4})
    workers = pgmux.worker_pids()
    assert sorted(workers) == [0, 1]
    assert set(pgmux.processes()) == {pgmux.pid, *workers.values()}
    conns = await _connect_many(pgmux, 40)
    try:
        results = await asyncio.gather(
            *(c.fetchval("SELECT $1::int + 1", i) for i, c in enumerate(conns))
        )
        assert results == [i + 1 for i in range(40)]
        assert _workers_of(conns) == {0, 1}  # 40 connections all on one: p = 2**-39
    finally:
        await _close_all(conns)
    for index in range(WORKERS):
        assert any(f"[worker {index}] C-" in line and "login ok" in line
                   for line in log_lines(pgmux)), f"worker {index} logged no login"  # fmt: skip


@pytest.mark.parametrize("pool_size", [4, 3])
async def test_pool_size_is_divided_between_workers(
    pgmux_factory: PgmuxFactory, su: Su, pool_size: int
) -> None:
    """PostgreSQL sees at most pool_size backends, whatever worker the clients land on."""
    pgmux = pgmux_factory({"workers": WORKERS, "default_pool_size": pool_size})
    await wait_until(lambda: _no_app_backends(su), 10, what="no app backends left over")
    conns = await _connect_many(pgmux, 30)
    try:
        assert _workers_of(conns) == {0, 1}

        async def work(conn: asyncpg.Connection) -> None:
            for _ in range(5):
                assert await conn.fetchval("SELECT pg_sleep(0.05)::text") == ""

        async with counting_backends(su) as samples:
            await asyncio.gather(*(work(c) for c in conns))
        assert samples, "no pg_stat_activity samples taken"
        assert max(samples) <= pool_size, f"PostgreSQL saw {max(samples)} app backends"
        # Both workers filled their share (2 + 2, or 2 + 1): the servers stay idle in
        # their pools, so the count after the load is the sum of the shares.
        final = await fetch_value(
            su,
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
            " AND backend_type = 'client backend'",
            [APP_USER],
        )
        assert final == pool_size
    finally:
        await _close_all(conns)


async def test_pool_smaller_than_workers_warns(pgmux_factory: PgmuxFactory, su: Su) -> None:
    pgmux = pgmux_factory({"workers": WORKERS, "default_pool_size": 1})
    line = pgmux.wait_for_log("default_pool_size = 1 is less than workers = 2")
    assert " WARNING " in line and "up to 2 server connections" in line
    await wait_until(lambda: _no_app_backends(su), 10, what="no app backends left over")
    conns = await _connect_many(pgmux, 10)
    try:
        async with counting_backends(su) as samples:
            await asyncio.gather(*(c.fetchval("SELECT pg_sleep(0.05)::text") for c in conns))
        assert max(samples) <= WORKERS  # each worker's pool has 1
    finally:
        await _close_all(conns)


async def test_max_client_conn_is_divided_between_workers(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"workers": WORKERS, "max_client_conn": 2})
    conns: list[asyncpg.Connection] = []
    errors: list[asyncpg.PostgresError] = []
    try:
        for _ in range(6):  # each worker admits one; after two, every login is refused
            try:
                conns.append(await connect_asyncpg(pgmux))
            except (asyncpg.PostgresError, asyncpg.ConnectionDoesNotExistError) as exc:
                errors.append(await error_of(_raise(exc)))
        assert len(conns) <= 2
        assert errors
        assert all(e.sqlstate == "53300" for e in errors), errors
        assert "of 1 client connections in use in this worker" in errors[0].args[0]
        assert "max_client_conn = 2 is split between 2 workers" in errors[0].args[0]
    finally:
        await _close_all(conns)


async def _raise(exc: BaseException) -> None:
    raise exc


# -- cancel ------------------------------------------------------------------------------


async def test_cancel_reaches_the_worker_holding_the_client(
    pgmux_factory: PgmuxFactory, su: Su
) -> None:
    """A cancel connection lands on either worker; it must cancel the right query."""
    n = 8
    # 16: every worker can run all eight sleeps at once, however the clients land.
    pgmux = pgmux_factory({"workers": WORKERS, "default_pool_size": 16, "log_level": "debug"})
    passed_on = 0
    for _ in range(5):  # each round passes a cancel on unless 8 coins all fall one way
        since = len(pgmux.log())
        conns = [await connect_psycopg(pgmux) for _ in range(n)]
        try:

            async def sleeper(conn: psycopg.AsyncConnection[Any]) -> str | None:
                try:
                    await conn.execute("SELECT pg_sleep(30)")
                except psycopg.errors.QueryCanceled as exc:
                    return exc.sqlstate
                return "finished"

            tasks = [asyncio.create_task(sleeper(c)) for c in conns]
            await wait_until(lambda: _count_sleeping(su, n), 10, what=f"{n} pg_sleep running")
            for conn in conns:
                await conn.cancel_safe()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert results == ["57014"] * n
            for conn in conns:  # and the sessions go on
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
        finally:
            for conn in conns:
                await conn.close()
        passed_on += sum("cancel request passed to worker" in ln for ln in log_lines(pgmux, since))
        if passed_on:
            break
    assert passed_on, "no cancel request went to the other worker in 5 rounds"
    alarming = log_lines(pgmux, levels=("WARNING", "ERROR", "CRITICAL"))
    assert not alarming, alarming


async def test_worker_socket_takes_only_cancel_requests(pgmux_factory: PgmuxFactory) -> None:
    """The private socket takes one CancelRequest and nothing else (not a login)."""
    pgmux = pgmux_factory({"workers": WORKERS})
    match = re.search(r" --worker-dir (\S+) ", " ".join(pgmux.processes().values()))
    assert match is not None
    worker_dir = Path(match.group(1))
    assert stat.S_IMODE(worker_dir.stat().st_mode) == 0o700
    since = len(pgmux.log())
    for packet in (startup_packet({"user": APP_USER, "database": APP_DB}), ssl_request()):
        reader, writer = await asyncio.open_unix_connection(str(worker_dir / "cancel-0.sock"))
        writer.write(packet)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer
        writer.close()
    assert len(log_lines(pgmux, since)) == 2, log_lines(pgmux, since)
    assert all("worker cancel socket:" in line for line in log_lines(pgmux, since))
    # A real one is still welcome (a stale key: ignored quietly).
    since = len(pgmux.log())
    reader, writer = await asyncio.open_unix_connection(str(worker_dir / "cancel-0.sock"))
    writer.write(cancel_request(2, 12345))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert not log_lines(pgmux, since, levels=("WARNING", "ERROR"))
    assert pgmux.running


# -- lifecycle ---------------------------------------------------------------------------


async def test_killed_worker_is_restarted(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"workers": WORKERS})
    before = pgmux.worker_pids()
    since = len(pgmux.log())
    os.kill(before[1], signal.SIGKILL)
    line = pgmux.wait_for_log(f"worker 1 (pid {before[1]}) was killed by SIGKILL", 10, since=since)
    assert " ERROR " in line and "exit code -9" in line and "restarting it in" in line
    pgmux.wait_for_log("all 2 workers ready", 15, since=since)
    after = pgmux.worker_pids()
    assert after[0] == before[0] and after[1] != before[1]
    conns = await _connect_many(pgmux, 20)
    try:
        assert await asyncio.gather(*(c.fetchval("SELECT 1") for c in conns)) == [1] * 20
        assert _workers_of(conns) == {0, 1}
    finally:
        await _close_all(conns)


async def test_sigterm_lets_transactions_finish_and_leaves_no_process(
    pgmux_factory: PgmuxFactory, su: Su, table: str
) -> None:
    pgmux = pgmux_factory({"workers": WORKERS, "shutdown_timeout": 20})
    busy = await connect_asyncpg(pgmux)
    idle = await connect_asyncpg(pgmux)
    try:
        await busy.execute("BEGIN")
        await busy.execute(f"INSERT INTO {table} VALUES (1)")
        sleep = asyncio.create_task(busy.fetchval("SELECT pg_sleep(1)::text"))
        await wait_until(lambda: _count_sleeping(su, 1), 5, what="pg_sleep running")
        pgmux.signal(signal.SIGTERM)
        assert await asyncio.wait_for(sleep, 10) == ""
        await busy.execute(f"INSERT INTO {table} VALUES (2)")
        await busy.execute("COMMIT")
        assert await fetch_value(su, f"SELECT count(*) FROM {table}") == 2
        # The idle client was told at once (asyncpg notices the FATAL by itself).
        await wait_until(idle.is_closed, 5, what="the idle client closed")
        assert "FATAL 57P01: pooler is shutting down" in pgmux.log()
    finally:
        busy.terminate()
        idle.terminate()
    await wait_until(lambda: not pgmux.running, 15, what="the supervisor exited")
    assert pgmux.proc.returncode == 0
    assert pgmux.processes() == {}
    log = pgmux.log()
    assert "SIGTERM: stopping the workers" in log
    assert "pgmux stopped: all 2 workers exited" in log


async def test_killed_supervisor_leaves_no_workers(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"workers": WORKERS})
    workers = pgmux.worker_pids()
    assert len(workers) == WORKERS
    pgmux.proc.kill()  # SIGKILL: the supervisor cannot pass anything on
    pgmux.proc.wait()
    await wait_until(lambda: not pgmux.processes(), 15, what="the workers exited")
    assert pgmux.log().count("the supervisor is gone: shutting down") == WORKERS


async def test_unix_socket_is_shared_by_the_workers(
    pgmux_factory: PgmuxFactory, workdir: Path
) -> None:
    sock = workdir / "sock"
    sock.mkdir()
    pgmux = pgmux_factory({"workers": WORKERS, "unix_socket_dir": str(sock)})
    path = sock / f".s.PGSQL.{pgmux.port}"
    assert path.is_socket()
    conns = [
        await asyncpg.connect(
            host=str(sock),
            port=pgmux.port,
            user=APP_USER,
            password=APP_PASSWORD,
            database=APP_DB,
            statement_cache_size=0,
        )
        for _ in range(10)
    ]
    try:
        assert [await c.fetchval("SELECT 1") for c in conns] == [1] * 10
    finally:
        await _close_all(conns)
    assert pgmux.stop() == 0
    assert not path.exists()  # the supervisor removed what it made


def test_second_instance_on_the_same_port_is_refused(
    pgmux_factory: PgmuxFactory, pg: PgCluster, workdir: Path
) -> None:
    """SO_REUSEPORT would let a second pgmux join the port; the supervisor checks first."""
    first = pgmux_factory({"workers": WORKERS})
    config = deep_merge(default_config(pg, first.port), {"workers": WORKERS})
    path = workdir / "second.toml"
    path.write_text(to_toml(config))
    proc = subprocess.run(
        [*DEFAULT_COMMAND, "--config", str(path)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{first.port}" in proc.stderr
    assert "Address already in use" in proc.stderr
    assert first.running and len(first.worker_pids()) == WORKERS


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "workers: must be 1 to 64, got 0"),
        (65, "workers: must be 1 to 64, got 65"),
        ("two", "workers: must be an integer, got the string 'two'"),
    ],
)
def test_workers_config_errors(pg: PgCluster, workdir: Path, value: object, message: str) -> None:
    config = deep_merge(default_config(pg, free_port()), {"workers": value})
    proc = run_check(config, workdir)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "one per CPU core" in proc.stderr
