"""Small helpers the integration tests share: clients, polling, process inspection.

- ``connect_asyncpg`` / ``connect_psycopg``: clients to pgmux with the settings the
  transaction pool needs (no named prepared statements unless asked for).
- ``connect_raw``: a logged-in ``support.wire.RawClient`` to pgmux or PostgreSQL itself.
- ``superuser(pg)``: a psycopg autocommit connection straight to PostgreSQL over the
  unix socket, to look at ``pg_stat_activity`` and ``pg_locks`` behind pgmux's back.
- ``app_backends`` / ``app_locks``: what the ``app`` role's backends do and hold.
- ``wait_until`` / ``wait_until_sync``: poll a condition with a deadline.
- ``psql_command`` / ``run_psql`` / ``tool_env``: psql and pgbench against pgmux;
  ``run_pgbench`` / ``pgbench_tps``: a pgbench run, and its tps once checked clean;
  ``run_psql_conninfo``: psql with a whole libpq conninfo (TLS parameters and all).
- ``vm_rss_kib``: a process's resident set size from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import asyncpg
import psycopg
from psycopg.rows import TupleRow

from .pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster, find_client_tool
from .pgmux import PgmuxProcess
from .wire import RawClient

T = TypeVar("T")


# -- clients -----------------------------------------------------------------------------


async def connect_asyncpg(
    pgmux: PgmuxProcess,
    user: str = APP_USER,
    password: str = APP_PASSWORD,
    database: str = APP_DB,
    **kwargs: Any,
) -> asyncpg.Connection:
    """asyncpg through pgmux; its statement cache (named statements) is off."""
    kwargs.setdefault("statement_cache_size", 0)
    kwargs.setdefault("timeout", 15)
    return await asyncpg.connect(
        host=pgmux.host,
        port=pgmux.port,
        user=user,
        password=password,
        database=database,
        **kwargs,
    )


async def connect_psycopg(
    pgmux: PgmuxProcess,
    user: str = APP_USER,
    password: str = APP_PASSWORD,
    dbname: str = APP_DB,
    *,
    autocommit: bool = True,
    prepare_threshold: int | None = None,
    **params: Any,
) -> psycopg.AsyncConnection[TupleRow]:
    """psycopg through pgmux; no server-side prepares unless ``prepare_threshold`` is
    given (0: every query is prepared). Extra params go to the conninfo."""
    params.setdefault("connect_timeout", 15)
    return await psycopg.AsyncConnection.connect(
        pgmux.conninfo(user, password, dbname, **params),
        autocommit=autocommit,
        prepare_threshold=prepare_threshold,
    )


class _Address(Protocol):
    host: str
    port: int


async def connect_raw(
    target: _Address,
    user: str = APP_USER,
    password: str = APP_PASSWORD,
    database: str = APP_DB,
    params: Mapping[str, str] | None = None,
) -> RawClient:
    """A RawClient logged in to ``target`` (a PgmuxProcess, or a PgCluster over TCP)."""
    client = await RawClient.open(target.host, target.port)
    try:
        await client.login(user, password, database, params)
    except BaseException:
        client.abort()
        raise
    return client


def postgres_error(exc: BaseException) -> asyncpg.PostgresError:
    """The server's error behind an asyncpg exception.

    When the connection closes right after a FATAL ErrorResponse, asyncpg raises
    ConnectionDoesNotExistError (08003) with the FATAL error as its ``__cause__``.
    """
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError) and isinstance(
        exc.__cause__, asyncpg.PostgresError
    ):
        return exc.__cause__
    assert isinstance(exc, asyncpg.PostgresError), repr(exc)
    return exc


Su = psycopg.AsyncConnection[TupleRow]
"""A superuser connection to PostgreSQL itself."""


async def error_of(coro: Awaitable[object]) -> asyncpg.PostgresError:
    """The PostgreSQL error (made by pgmux) that ``coro`` fails with."""
    try:
        await coro
    except (asyncpg.PostgresError, asyncpg.ConnectionDoesNotExistError) as exc:
        return postgres_error(exc)
    raise AssertionError("expected an error")


async def superuser(pg: PgCluster) -> Su:
    """A superuser autocommit connection to PostgreSQL itself (not through pgmux)."""
    kwargs = pg.superuser_kwargs()
    return await psycopg.AsyncConnection.connect(
        host=kwargs["host"],
        port=kwargs["port"],
        user=kwargs["user"],
        dbname=kwargs["dbname"],
        autocommit=True,
    )


async def fetch_all(
    conn: psycopg.AsyncConnection[TupleRow], sql: str, params: Sequence[Any] | None = None
) -> list[tuple[Any, ...]]:
    async with conn.cursor() as cur:
        await cur.execute(sql, params)
        return await cur.fetchall()


async def fetch_value(
    conn: psycopg.AsyncConnection[TupleRow], sql: str, params: Sequence[Any] | None = None
) -> Any:
    rows = await fetch_all(conn, sql, params)
    assert len(rows) == 1 and len(rows[0]) == 1, rows
    return rows[0][0]


async def app_backends(su: psycopg.AsyncConnection[TupleRow]) -> list[tuple[Any, ...]]:
    """(pid, state, xact open?, query) of every client backend of the app role."""
    return await fetch_all(
        su,
        "SELECT pid, state, xact_start IS NOT NULL, query FROM pg_stat_activity"
        " WHERE usename = %s AND backend_type = 'client backend' ORDER BY pid",
        [APP_USER],
    )


async def app_locks(su: psycopg.AsyncConnection[TupleRow]) -> list[tuple[Any, ...]]:
    """Locks held by app backends, other than their own virtual transaction id."""
    return await fetch_all(
        su,
        "SELECT l.pid, l.locktype, l.relation::regclass::text, l.mode, l.granted"
        " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE a.usename = %s AND l.locktype <> 'virtualxid'"
        " AND l.relation IS DISTINCT FROM 'pg_locks'::regclass",
        [APP_USER],
    )


# -- waiting -----------------------------------------------------------------------------


@contextlib.contextmanager
def app_table(pg: PgCluster, name: str, columns: str) -> Iterator[str]:
    """A fresh table ``name (columns)`` owned by the app role, dropped afterwards."""
    pg.psql(
        f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns});"
        f" ALTER TABLE {name} OWNER TO {APP_USER}"
    )
    try:
        yield name
    finally:
        pg.psql(f"DROP TABLE IF EXISTS {name}")


@contextlib.asynccontextmanager
async def counting_backends(
    su: psycopg.AsyncConnection[TupleRow], user: str = APP_USER, interval: float = 0.01
) -> AsyncIterator[list[int]]:
    """Sample, while the block runs, how many client backends PostgreSQL has for
    ``user``; the list of counts fills as it goes."""
    samples: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            count = await fetch_value(
                su,
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
                " AND backend_type = 'client backend'",
                [user],
            )
            samples.append(count)
            await asyncio.sleep(interval)

    sampler = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        done.set()
        await sampler


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 5,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        last = result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout:g} s (last value: {last!r})")
        await asyncio.sleep(interval)


def wait_until_sync(
    predicate: Callable[[], T], timeout: float = 5, interval: float = 0.05, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not met within {timeout:g} s (last value: {result!r})")
        time.sleep(interval)


# -- command-line tools ------------------------------------------------------------------


def tool_env(password: str = APP_PASSWORD) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = password
    env["PGCONNECT_TIMEOUT"] = "15"
    return env


def run_pgbench(target: PgmuxProcess | PgCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """pgbench as the app user against pgmux or PostgreSQL itself (60 s at most)."""
    return subprocess.run(
        [
            find_client_tool("pgbench"),
            *("-h", target.host, "-p", str(target.port), "-U", APP_USER),
            *args,
            APP_DB,
        ],
        env=tool_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def pgbench_tps(proc: subprocess.CompletedProcess[str]) -> float:
    """The tps of a pgbench run that must have succeeded with no failed transaction."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is not None and int(failed.group(1)) == 0, out
    tps = re.search(r"tps = ([0-9.]+)", out)
    assert tps is not None, out
    assert float(tps.group(1)) > 0, out
    return float(tps.group(1))


def psql_command(
    pgmux: PgmuxProcess,
    *args: str,
    user: str = APP_USER,
    dbname: str = APP_DB,
    sslmode: str = "disable",
) -> list[str]:
    """psql -X -q -A -t against pgmux, with the given extra arguments."""
    conninfo = f"host={pgmux.host} port={pgmux.port} user={user} dbname={dbname} sslmode={sslmode}"
    return [find_client_tool("psql"), "-X", "-q", "-A", "-t", "-d", conninfo, *args]


def run_psql(
    pgmux: PgmuxProcess,
    *args: str,
    password: str = APP_PASSWORD,
    input: str | None = None,
    timeout: float = 30,
    **kwargs: str,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        psql_command(pgmux, *args, **kwargs),
        env=tool_env(password),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_psql_conninfo(
    conninfo: str,
    *args: str,
    password: str = APP_PASSWORD,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """psql -X -q -A -t -d CONNINFO ARGS; output captured, exit code not checked."""
    return subprocess.run(
        [find_client_tool("psql"), "-X", "-q", "-A", "-t", "-d", conninfo, *args],
        env=tool_env(password),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def psql_process(
    pgmux: PgmuxProcess, *args: str, password: str = APP_PASSWORD
) -> Iterator[subprocess.Popen[str]]:
    """psql against pgmux in the background, reading SQL from a pipe (``proc.stdin``).

    Killed (if still running) and reaped on exit, its pipe closed.
    """
    proc = subprocess.Popen(
        psql_command(pgmux, *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=tool_env(password),
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()


# -- processes ---------------------------------------------------------------------------


def vm_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def log_lines(pgmux: PgmuxProcess, since: int = 0, levels: Sequence[str] = ()) -> list[str]:
    """pgmux log lines from character offset ``since``, optionally only these levels."""
    lines = pgmux.log()[since:].splitlines()
    if levels:
        lines = [ln for ln in lines if any(f" {level} " in ln for level in levels)]
    return lines
