"""PostgreSQL restarted (pg_ctl restart -m fast / -m immediate) under 100 looping clients.

The module has a cluster of its own, so restarting it never disturbs the session's ``pg``.
100 clients (80 asyncpg, 20 psycopg) loop one-row INSERT transactions through pgmux and,
like applications, count every commit and every error, roll back after an error in a
transaction, and reconnect when their connection is gone. PostgreSQL restarts in the
middle. The test asserts, with counts:

- every client commits again, on the new postmaster, within ``RECOVERY_BOUND`` of
  PostgreSQL accepting connections, and keeps going with no error at all after that;
- errors come only between the restart and that client's recovery, and only of the
  kinds in ``ALLOWED`` (the restart's own);
- a transaction whose server died gets an ERROR 08006 and its connection goes on (at
  most one per server, never PostgreSQL's FATAL 57P01); only the requests that waited
  for a server through the outage end their connection (FATAL, see below);
- no acknowledged commit is lost, and none appears that a client was not told about
  (at most one per error: a COMMIT whose answer the restart cut off);
- pgmux runs on, holds at most pool_size servers under load, and once the clients are
  gone SHOW POOLS shows no client and only idle servers, the same backends
  pg_stat_activity shows, none in a transaction.

It prints what it measured (``pytest -s``): when PostgreSQL was back, the first and the
last client's first commit after that, the errors by kind, how many of them left the
connection usable, and how many connections closed.

Everything runs with pgmux's defaults. A restart makes PostgreSQL refuse pgmux's logins
for a moment ("the database system is shutting down" / "is starting up", or a reset from
a postmaster going away); pgmux tries again at once rather than wait server_login_retry
(15 s), which is for logins PostgreSQL refuses for good. A client whose request waited
for a server through the outage gets the error as FATAL, so drivers start over clean:
``test_an_outage_ends_waiting_sessions_so_drivers_start_clean`` shows why with asyncpg's
transaction blocks, shown on its own with PostgreSQL stopped and started.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest
from support.admin import ADMIN_USERS, Admin, Console, show
from support.helpers import (
    Su,
    app_backends,
    connect_asyncpg,
    connect_psycopg,
    counting_backends,
    fetch_all,
    fetch_value,
    log_lines,
    postgres_error,
    superuser,
    wait_until,
)
from support.pgcluster import APP_DB, APP_USER, PgCluster, running_cluster
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge

CLIENTS = 100
PSYCOPG_EVERY = 5  # every fifth client uses psycopg (libpq), the others asyncpg
POOL_SIZE = 10
WARMUP = 3  # commits every client makes before the restart
# s from PostgreSQL accepting connections to every client's commit: well under 1 s is
# usual here (before pgmux stopped applying server_login_retry to a restart: about 15 s).
RECOVERY_BOUND = 10.0
CLEAN_RUN = 5  # commits every client makes after the last one is back
DEADLINE = 30.0  # s: generous, the machine is small and shared
STEP_TIMEOUT = 30.0  # s: a client's own bound on one connect or one transaction
BACKOFF = 0.1  # s an application waits after an error before it tries again
TABLE = "restart_load"
INSERT = f"INSERT INTO {TABLE} (client) VALUES ($1) RETURNING pg_postmaster_start_time()"

# Errors the client libraries report without a SQLSTATE.
NO_SQLSTATE_LOGIN = "no SQLSTATE: login refused"
NO_SQLSTATE_LOST = "no SQLSTATE: connection lost"

ALLOWED = {
    # -m fast always, -m immediate often: PostgreSQL refused pgmux's login ("the database
    # system is shutting down", "... is starting up", "... is not yet accepting
    # connections"); pgmux passes the SQLSTATE on to the requests waiting for a server
    # (as FATAL) and tries the login again at once.
    "57P03": "cannot_connect_now: the database system is shutting down / starting up",
    # Not seen: PostgreSQL's answer when another backend crashed.
    "57P02": "crash_shutdown",
    # -m immediate: pgmux's login was reset by the dying postmaster ("server closed the
    # connection ([Errno 104] Connection reset by peer)"), passed on as above.
    "08001": "sqlclient_unable_to_establish_sqlconnection: pgmux could not log in",
    # Both modes: the backend died under a client's transaction (-m fast: its FATAL
    # 57P01, which pgmux does not relay; -m immediate: the connection just closed), and
    # pgmux answered the transaction with this ERROR, the session going on. -m
    # immediate, often: pgmux's login was cut off ("server login failed ... server
    # closed the connection"), passed as FATAL to the requests waiting for a server.
    "08006": "connection_failure: pgmux's server connection closed under the transaction",
    # Both modes: asyncpg's own code for a connection that closed during a request.
    "08003": "connection_does_not_exist",
    # Both modes: psycopg's connect (libpq) has no SQLSTATE for a FATAL at login; the
    # message is pgmux's 57P03 or 08001 ("server login has been failing ...").
    NO_SQLSTATE_LOGIN: "psycopg: connection failed: FATAL: ...",
    # Both modes, a few: the connection ended with no error the client could read. libpq:
    # "server closed the connection unexpectedly" (the FATAL was lost to a TCP reset);
    # asyncpg: InternalClientError "another operation (2) is in progress" (a FATAL came
    # between two requests, and the next one found the protocol still consuming it).
    NO_SQLSTATE_LOST: "the connection ended without an error the client could read",
}


class NotBackInTime(AssertionError):
    """Not every client committed again within RECOVERY_BOUND."""


def allowed(key: str) -> bool:
    return key in ALLOWED or key.startswith("08")


@pytest.fixture(scope="module")
def restart_pg() -> Iterator[PgCluster]:
    """This module's own cluster, with commits durable across an immediate shutdown
    (synchronous_commit on, unlike the session's), and the table the clients fill."""
    with running_cluster({"synchronous_commit": "on"}) as cluster:
        cluster.psql(
            f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, client int NOT NULL);"
            f"ALTER TABLE {TABLE} OWNER TO {APP_USER}"
        )
        yield cluster


# -- the looping clients -----------------------------------------------------------------


@dataclass
class Tally:
    """What one client did."""

    commits: int = 0
    first_after: float | None = None  # when its first commit after the restart ended
    errors: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, key)
    kept: list[str] = field(default_factory=list)  # errors after which the session went on
    closed: int = 0  # connections it lost (and replaced)
    busy_since: float | None = None  # inside a connect or a transaction since then


def error_key(exc: Exception, connecting: bool, usable: bool) -> str:
    """The SQLSTATE behind a client's error, else what kind of error it was."""
    if isinstance(exc, asyncpg.PostgresError):
        return str(postgres_error(exc).sqlstate)
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        return exc.sqlstate
    if isinstance(exc, TimeoutError):
        return "timeout"  # the client's own STEP_TIMEOUT, or a connect timeout
    if isinstance(exc, psycopg.OperationalError) and connecting:
        return NO_SQLSTATE_LOGIN
    lost = (psycopg.OperationalError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
    if isinstance(exc, lost) and not usable:
        return NO_SQLSTATE_LOST
    return f"{type(exc).__name__}: {exc}"


class Load:
    """``CLIENTS`` clients looping a one-row INSERT in a transaction through pgmux.

    A client that meets an error counts it, reconnects if its connection cannot go on,
    waits ``BACKOFF`` and goes on. A commit whose pg_postmaster_start_time() is not
    ``before`` is one after the restart.
    """

    def __init__(self, pgmux: PgmuxProcess, before: datetime.datetime) -> None:
        self.pgmux = pgmux
        self.before = before
        self.tallies = [Tally() for _ in range(CLIENTS)]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(CLIENTS)]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Let every client end its transaction and disconnect; after a failure, cancel
        the ones still waiting after a second."""
        self._stop.set()
        grace = DEADLINE if exc_type is None else 1.0
        _, pending = await asyncio.wait(self._tasks, timeout=grace)
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        if exc_type is None:
            assert not pending, f"{len(pending)} clients still busy after {grace:g} s"
            assert not any(isinstance(r, BaseException) for r in results), results

    async def _run(self, i: int) -> None:
        tally = self.tallies[i]
        conn: Any = None
        try:
            while not self._stop.is_set():
                tally.busy_since = time.monotonic()
                connecting = conn is None
                try:
                    async with asyncio.timeout(STEP_TIMEOUT):
                        if conn is None:
                            conn = await self._connect(i)
                        connecting = False
                        started = await self._transaction(i, conn)
                except Exception as exc:
                    at = time.monotonic()
                    tally.busy_since = None
                    usable = conn is not None and await _recover(conn, exc)
                    key = error_key(exc, connecting, usable)
                    tally.errors.append((at, key))
                    if usable:
                        tally.kept.append(key)
                    elif conn is not None:
                        tally.closed += 1
                        await _close(conn)
                        conn = None
                    await asyncio.sleep(BACKOFF)
                    continue
                tally.busy_since = None
                tally.commits += 1
                if started != self.before and tally.first_after is None:
                    tally.first_after = time.monotonic()
        finally:
            if conn is not None:
                await _close(conn)

    async def _connect(self, i: int) -> Any:
        if i % PSYCOPG_EVERY == 0:
            return await connect_psycopg(self.pgmux, application_name=f"loop-{i}")
        return await connect_asyncpg(self.pgmux, server_settings={"application_name": f"loop-{i}"})

    async def _transaction(self, i: int, conn: Any) -> datetime.datetime:
        # asyncpg: plain BEGIN/COMMIT; conn.transaction() is covered by
        # test_an_outage_ends_waiting_sessions_so_drivers_start_clean.
        if isinstance(conn, asyncpg.Connection):
            await conn.execute("BEGIN")
            started: datetime.datetime = await conn.fetchval(INSERT, i)
            await conn.execute("COMMIT")
            return started
        async with conn.transaction():
            cur = await conn.execute(INSERT.replace("$1", "%s"), [i])
            row = await cur.fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

    # -- reading the counts --------------------------------------------------------------

    @property
    def commits(self) -> int:
        return sum(t.commits for t in self.tallies)

    def errors(self) -> Counter[str]:
        return Counter(key for t in self.tallies for _, key in t.errors)

    def kept(self) -> Counter[str]:
        return Counter(key for t in self.tallies for key in t.kept)

    def closed(self) -> int:
        return sum(t.closed for t in self.tallies)

    def error_times(self) -> list[float]:
        return sorted(at for t in self.tallies for at, _ in t.errors)

    def each_committed(self, n: int, since: list[int] | None = None) -> bool:
        base = since or [0] * CLIENTS
        return all(t.commits - b >= n for t, b in zip(self.tallies, base, strict=True))

    def all_back(self) -> bool:
        return all(t.first_after is not None for t in self.tallies)

    def laggards(self) -> str:
        """The clients not back since the restart, and what they are doing."""
        now = time.monotonic()
        lines = []
        for i, t in enumerate(self.tallies):
            if t.first_after is None:
                busy = f"busy for {now - t.busy_since:.1f} s" if t.busy_since else "not busy"
                last = t.errors[-1][1] if t.errors else None
                lines.append(f"client {i}: {busy}, {len(t.errors)} errors, the last {last!r}")
        return "\n".join(lines)


async def _recover(conn: Any, exc: Exception) -> bool:
    """After an error: can the session go on? (Rolls back an open transaction.)"""
    if isinstance(conn, asyncpg.Connection):
        if conn.is_closed() or not isinstance(exc, asyncpg.PostgresError):
            return False  # asyncpg's own errors (InternalClientError...) leave it unsure
        if not conn.is_in_transaction():
            return True
        try:
            async with asyncio.timeout(5):
                await conn.execute("ROLLBACK")
        except Exception:
            return False
        return not conn.is_closed()
    # psycopg's transaction() block already rolled back if it could.
    return isinstance(exc, psycopg.Error) and not (conn.closed or conn.broken)


async def _close(conn: Any) -> None:
    if isinstance(conn, asyncpg.Connection):
        try:
            await conn.close(timeout=5)
        except Exception:
            conn.terminate()
        return
    try:
        await asyncio.wait_for(conn.close(), 5)
    except Exception:
        conn.pgconn.finish()


# -- PostgreSQL itself -------------------------------------------------------------------


async def postmaster_start(pg: PgCluster) -> datetime.datetime | None:
    """pg_postmaster_start_time(), asked of PostgreSQL directly; None while it is down."""
    try:
        su = await asyncio.wait_for(superuser(pg), 2)
    except (psycopg.Error, OSError):  # TimeoutError is an OSError
        return None
    try:
        started: datetime.datetime = await fetch_value(su, "SELECT pg_postmaster_start_time()")
    except psycopg.Error:
        return None
    finally:
        await su.close()
    return started


async def restart(pg: PgCluster, mode: str, before: datetime.datetime) -> tuple[float, float]:
    """pg_ctl restart -m ``mode``. Returns (when a new postmaster first answered a
    connection, polled every 20 ms, when pg_ctl returned), in monotonic time."""
    ctl = asyncio.ensure_future(asyncio.to_thread(pg.restart, mode))
    try:

        async def back() -> bool:
            started = await postmaster_start(pg)
            return started is not None and started != before

        await wait_until(back, DEADLINE, interval=0.02, what="PostgreSQL to accept connections")
        up = time.monotonic()
    finally:
        await asyncio.wait_for(ctl, DEADLINE)
    return up, time.monotonic()


async def rows_per_client(su: Su) -> dict[int, int]:
    rows = await fetch_all(su, f"SELECT client, count(*) FROM {TABLE} GROUP BY client")
    return {client: count for client, count in rows}


# -- pgmux -------------------------------------------------------------------------------


async def pool_row(admin: Admin) -> dict[str, Any]:
    rows = [row for row in await show(admin, "POOLS") if row["database"] == APP_DB]
    assert len(rows) == 1, rows
    return rows[0]


async def quiet_pool(admin: Admin) -> dict[str, Any] | None:
    """The app pool's SHOW POOLS row once no client, busy server or login is left."""
    row = await pool_row(admin)
    busy = ("cl_active", "cl_waiting", "sv_active", "sv_login")
    return None if any(row[key] for key in busy) else row


async def backends_match(su: Su, servers: int) -> list[tuple[Any, ...]] | None:
    """PostgreSQL's app backends, once they are the ``servers`` pgmux says it has."""
    backends = await app_backends(su)
    return backends if len(backends) == servers else None


# -- the test ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_under_load(
    mode: str,
    restart_pg: PgCluster,
    pgmux_factory: PgmuxFactory,
    console: Console,
) -> None:
    restart_pg.psql(f"TRUNCATE {TABLE}")
    pgmux = pgmux_factory(
        deep_merge(
            ADMIN_USERS,  # and query_wait_timeout = 60: requests wait out the restart
            {
                "default_pool_size": POOL_SIZE,
                "max_client_conn": CLIENTS + 50,
                "databases": {APP_DB: {"host": restart_pg.host, "port": restart_pg.port}},
            },
        )
    )
    admin = await console(pgmux)
    before = await postmaster_start(restart_pg)
    assert before is not None
    async with Load(pgmux, before) as load:
        await wait_until(lambda: load.each_committed(WARMUP), DEADLINE, what="a warm-up")
        assert not load.errors(), load.errors()
        commits_before = load.commits

        t0 = time.monotonic()
        up, ctl_done = await restart(restart_pg, mode, before)
        try:
            await wait_until(
                load.all_back,
                RECOVERY_BOUND - (time.monotonic() - up),
                what="every client to commit again",
            )
        except TimeoutError:
            raise NotBackInTime(
                f"not every client committed within {RECOVERY_BOUND:g} s of PostgreSQL "
                f"accepting connections again; errors {dict(load.errors())}; the others:\n"
                f"{load.laggards()}"
            ) from None
        firsts = sorted(t.first_after for t in load.tallies if t.first_after is not None)
        settled = firsts[-1]

        # Under load again: every client goes on, on at most pool_size backends.
        su = await superuser(restart_pg)
        try:
            counts = [t.commits for t in load.tallies]
            async with counting_backends(su) as samples:
                await wait_until(
                    lambda: load.each_committed(CLEAN_RUN, counts), DEADLINE, what="a clean run"
                )
            assert samples and max(samples) <= POOL_SIZE, samples
        finally:
            await su.close()

    errors = load.errors()
    times = load.error_times()
    print(
        f"\npg_ctl restart -m {mode}: PostgreSQL accepted connections after {up - t0:.2f} s"
        f" (pg_ctl returned after {ctl_done - t0:.2f} s); after that, the first commit"
        f" came in {firsts[0] - up:+.2f} s and all {CLIENTS} clients were back in"
        f" {settled - up:+.2f} s; {sum(errors.values())} errors {dict(errors.most_common())}"
        + (f", from {times[0] - t0:+.2f} s to {times[-1] - t0:+.2f} s" if times else "")
        + f"; {sum(load.kept().values())} of them {dict(load.kept())} left the session"
        f" usable, {load.closed()} connections closed"
        + f"; commits {commits_before} before the restart, {load.commits} in all"
    )

    # Errors: only of the restart's kinds, only after it began, none once a client is back.
    assert all(allowed(key) for key in errors), errors
    # A transaction whose server died: 08006 as an ERROR, the session goes on (pgmux
    # does not relay the backend's FATAL); one per server at most.
    assert "57P01" not in errors, errors
    kept = load.kept()
    assert set(kept) <= {"08006"} and sum(kept.values()) <= POOL_SIZE, kept
    assert not times or times[0] >= t0, (times[0] - t0, errors)
    late = [
        (i, round(at - up, 2), key)
        for i, t in enumerate(load.tallies)
        for at, key in t.errors
        if t.first_after is not None and at > t.first_after
    ]
    assert not late, f"errors after the client was back (client, s after up, key): {late}"

    # No acknowledged commit lost; at most one unacknowledged per error (a COMMIT that
    # PostgreSQL made but whose answer the restart cut off).
    su = await superuser(restart_pg)
    try:
        rows = await rows_per_client(su)
        wrong = [
            (i, t.commits, rows.get(i, 0), len(t.errors))
            for i, t in enumerate(load.tallies)
            if not t.commits <= rows.get(i, 0) <= t.commits + len(t.errors)
        ]
        assert not wrong, f"(client, commits, rows, errors): {wrong}"

        # pgmux is up, its pool quiet, and PostgreSQL sees exactly its idle servers.
        assert pgmux.running, pgmux.log_tail()
        row = await wait_until(lambda: quiet_pool(admin), DEADLINE, what="a quiet pool")
        servers = row["sv_idle"] + row["sv_used"]
        assert 0 < servers <= POOL_SIZE, row
        backends = await wait_until(
            lambda: backends_match(su, servers), DEADLINE, what=f"{servers} backends"
        )
        assert all(state == "idle" and not in_xact for _, state, in_xact, _ in backends), backends
    finally:
        await su.close()
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    # Lines are "date time LEVEL logger ..."; pgmux's own errors at WARNING are expected.
    alarming = [
        line
        for line in log_lines(pgmux)
        if "Traceback" in line or line.split(" ", 3)[2:3] in (["ERROR"], ["CRITICAL"])
    ]
    assert not alarming, alarming


async def test_an_outage_ends_waiting_sessions_so_drivers_start_clean(
    restart_pg: PgCluster, pgmux_factory: PgmuxFactory, console: Console
) -> None:
    """A request that waits for a server while PostgreSQL is down gets 08001 as FATAL.
    Were the session kept, asyncpg 0.32's ``async with conn.transaction()`` would keep
    the BEGIN that failed as the connection's transaction, and every later block would
    send SAVEPOINT and fail with 25P01; a new connection starts clean."""
    pgmux = pgmux_factory(
        deep_merge(
            ADMIN_USERS,
            {"databases": {APP_DB: {"host": restart_pg.host, "port": restart_pg.port}}},
        )
    )
    admin = await console(pgmux)
    conn = await connect_asyncpg(pgmux)
    try:
        async with conn.transaction():
            assert await conn.fetchval("SELECT 1") == 1
        await asyncio.to_thread(restart_pg.stop, "fast")
        try:
            await wait_until(lambda: no_servers(admin), DEADLINE, what="pgmux to drop its servers")
            # asyncpg reports a FATAL as the connection gone (08003), with pgmux's words.
            with pytest.raises(asyncpg.ConnectionDoesNotExistError) as info:
                async with conn.transaction():
                    await conn.fetchval("SELECT 2")
            assert "cannot connect to server" in str(info.value), info.value
            await wait_until(conn.is_closed, 5, what="the session to end")
        finally:
            await asyncio.to_thread(restart_pg.start)
    finally:
        conn.terminate()
    # The application reconnects, as it must after a FATAL, and its blocks work.
    conn = await connect_asyncpg(pgmux)
    try:
        async with conn.transaction():
            assert await conn.fetchval("SELECT 3") == 3
    finally:
        await conn.close()


async def no_servers(admin: Admin) -> bool:
    row = await pool_row(admin)
    return not any(row[key] for key in ("sv_active", "sv_idle", "sv_used", "sv_login"))
