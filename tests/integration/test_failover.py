"""A failover under load: the primary stops, its standby is promoted, and pgmux, given
both hosts with target_session_attrs = "read-write", finds the new primary by itself.

The module makes its own pair: a primary (PgCluster with REPLICATION_HBA) and a
streaming standby of it (pg_basebackup -R, PgCluster.standby_of). 30 asyncpg clients
loop a one-row INSERT transaction through pgmux; like applications they count every
commit and every error, roll back after an error in a transaction, reconnect when their
connection is gone, and go on. Then ``pg_ctl stop -m fast`` on the primary and
``pg_ctl promote`` on the standby. The test asserts, with counts, the issue's words
("clients in a transaction on the old one get 08006 for that transaction only; the rest
notice nothing"):

- every error is 08006, and no client connection closes: a client whose transaction
  held a server of the old primary gets one ERROR for that transaction (PostgreSQL's
  FATAL is not relayed), keeps its connection, and its ROLLBACK is answered by pgmux;
- one error per such transaction (as many as pgmux logged clients losing their server,
  at most the pool's size), only between the stop and that client's first commit on
  the new primary; every other client notices only the delay: clients waiting for a
  server wait through the switch (pgmux looks for a read-write host every second);
- every client commits on the new primary within RECOVERY_BOUND of the promotion, and
  runs clean after that;
- no acknowledged commit is lost: the new primary has every row a client saw committed.
  Replication is asynchronous; ``-m fast`` makes the old primary's shutdown wait until
  the standby has confirmed it flushed all WAL (the walsenders exit last), so the
  standby has every commit before it is promoted. (``-m immediate`` could lose the last
  few acknowledged commits; synchronous_standby_names would prevent that.)

It prints what it measured (``pytest -s``): how long the stop and the promotion took,
the time from the promotion to the first commit on the new primary and to the last
client's, the errors by SQLSTATE and the client connections that closed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg
import pytest
from support.admin import ADMIN_USERS, Console, show
from support.helpers import connect_asyncpg, postgres_error, wait_until
from support.pgcluster import APP_DB, APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge

CLIENTS = 30
POOL_SIZE = 10
WARMUP = 3  # commits each client makes before the switch
CLEAN_RUN = 5  # commits each client makes after the last one is back
RECOVERY_BOUND = 10.0  # s from the promotion to every client's commit on the new primary
DEADLINE = 30.0  # s: generous, the machine is small and shared
STEP_TIMEOUT = 30.0  # s: a client's own bound on one connect or one transaction
BACKOFF = 0.1  # s an application waits after an error before it tries again
TABLE = "failover_load"
INSERT = f"INSERT INTO {TABLE} (client) VALUES ($1) RETURNING id, inet_server_port()"
LOST = "no SQLSTATE: connection lost"
# pgmux's ERROR for a transaction whose server was lost (the only error expected).
CONNECTION_FAILURE = "08006"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[PgCluster, PgCluster]]:
    """(primary, standby) and the table the clients fill, made on the primary."""
    with PgCluster.primary_and_standby(
        f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, client int NOT NULL);"
        f"ALTER TABLE {TABLE} OWNER TO {APP_USER}"
    ) as clusters:
        yield clusters


@dataclass
class Tally:
    """What one client did."""

    commits: int = 0
    acked: list[int] = field(default_factory=list)  # ids of rows it saw committed
    first_after: float | None = None  # when its first commit on the new primary ended
    errors: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, key)
    closed: int = 0  # times it found its connection closed after an error


def error_key(exc: Exception) -> str:
    if isinstance(exc, asyncpg.PostgresError):
        return str(postgres_error(exc).sqlstate)
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError | OSError):
        return LOST
    return f"{type(exc).__name__}: {exc}"


class Load:
    """``CLIENTS`` clients looping one INSERT transaction each through pgmux."""

    def __init__(self, pgmux: PgmuxProcess, new_port: int) -> None:
        self.pgmux = pgmux
        self.new_port = new_port
        self.tallies = [Tally() for _ in range(CLIENTS)]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._run(i)) for i in range(CLIENTS)]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self._stop.set()
        _, pending = await asyncio.wait(self._tasks, timeout=DEADLINE if exc_type is None else 1)
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        if exc_type is None:
            assert not pending, f"{len(pending)} clients still busy"
            assert not any(isinstance(r, BaseException) for r in results), results

    async def _run(self, i: int) -> None:
        tally = self.tallies[i]
        conn: asyncpg.Connection | None = None
        try:
            while not self._stop.is_set():
                try:
                    async with asyncio.timeout(STEP_TIMEOUT):
                        if conn is None:
                            conn = await connect_asyncpg(self.pgmux)
                        await conn.execute("BEGIN")
                        row = await conn.fetchrow(INSERT, i)
                        await conn.execute("COMMIT")
                except Exception as exc:
                    tally.errors.append((time.monotonic(), error_key(exc)))
                    if conn is not None and not await self._recover(tally, conn):
                        conn.terminate()  # gone, or unsure: start over, as a driver would
                        conn = None
                    await asyncio.sleep(BACKOFF)
                    continue
                assert row is not None
                tally.commits += 1
                tally.acked.append(row["id"])
                if row["inet_server_port"] == self.new_port and tally.first_after is None:
                    tally.first_after = time.monotonic()
        finally:
            if conn is not None:
                conn.terminate()

    @staticmethod
    async def _recover(tally: Tally, conn: asyncpg.Connection) -> bool:
        """After an error: end a failed transaction block as an application would;
        whether the connection can go on."""
        if conn.is_closed():
            tally.closed += 1
            return False
        if conn.is_in_transaction():
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await conn.execute("ROLLBACK")
            except Exception as exc:
                tally.errors.append((time.monotonic(), f"on ROLLBACK: {error_key(exc)}"))
                tally.closed += conn.is_closed()
                return False
        return True

    def each_committed(self, n: int, since: list[int] | None = None) -> bool:
        base = since or [0] * CLIENTS
        return all(t.commits - b >= n for t, b in zip(self.tallies, base, strict=True))

    def all_back(self) -> bool:
        return all(t.first_after is not None for t in self.tallies)

    def errors(self) -> Counter[str]:
        return Counter(key for t in self.tallies for _, key in t.errors)

    def closed(self) -> int:
        return sum(t.closed for t in self.tallies)


async def test_failover_to_a_promoted_standby_under_load(
    pair: tuple[PgCluster, PgCluster], pgmux_factory: PgmuxFactory, console: Console
) -> None:
    primary, standby = pair
    assert standby.psql("SELECT pg_is_in_recovery()") == "t"
    pgmux = pgmux_factory(
        deep_merge(
            ADMIN_USERS,  # and query_wait_timeout = 60
            {
                "default_pool_size": POOL_SIZE,
                "max_client_conn": CLIENTS + 20,
                "target_session_attrs": "read-write",
                "databases": {
                    APP_DB: {"host": "127.0.0.1,127.0.0.1", "port": [primary.port, standby.port]}
                },
            },
        )
    )
    admin = await console(pgmux)
    async with Load(pgmux, standby.port) as load:
        await wait_until(lambda: load.each_committed(WARMUP), DEADLINE, what="a warm-up")
        assert not load.errors(), load.errors()

        t_stop = time.monotonic()
        await asyncio.to_thread(primary.stop, "fast")
        t_stopped = time.monotonic()
        await asyncio.to_thread(standby.promote)
        t_promoted = time.monotonic()
        try:
            await wait_until(load.all_back, RECOVERY_BOUND, what="every client on the new primary")
        except TimeoutError:
            missing = [i for i, t in enumerate(load.tallies) if t.first_after is None]
            raise AssertionError(
                f"clients {missing} did not commit on the new primary within "
                f"{RECOVERY_BOUND:g} s of the promotion; errors {dict(load.errors())}\n"
                + pgmux.log_tail(60)
            ) from None
        counts = [t.commits for t in load.tallies]
        await wait_until(
            lambda: load.each_committed(CLEAN_RUN, counts), DEADLINE, what="a clean run"
        )

    firsts = sorted(t.first_after for t in load.tallies if t.first_after is not None)
    errors = load.errors()
    erring = [i for i, t in enumerate(load.tallies) if t.errors]
    # pgmux logs one line per client whose server was lost under a transaction.
    lost = f"to 127.0.0.1:{primary.port} was lost ("
    affected = sum(
        lost in line and "answered with 08006" in line for line in pgmux.log().splitlines()
    )
    print(
        f"\nfailover: pg_ctl stop -m fast took {t_stopped - t_stop:.2f} s, pg_ctl promote "
        f"{t_promoted - t_stopped:.2f} s; the first commit on the new primary came "
        f"{firsts[0] - t_promoted:+.2f} s after the promotion returned "
        f"({firsts[0] - t_stop:.2f} s after the stop began), the last client's "
        f"{firsts[-1] - t_promoted:+.2f} s; {sum(errors.values())} errors "
        f"{dict(errors.most_common())} for {len(erring)} of {CLIENTS} clients "
        f"({affected} lost their server in a transaction); "
        f"{load.closed()} client connections closed"
    )

    # Errors: 08006 only, one per transaction that held a server of the old primary,
    # only during the switch; no client connection closed; the others saw nothing.
    assert set(errors) <= {CONNECTION_FAILURE}, errors
    assert load.closed() == 0, [(i, t.errors) for i, t in enumerate(load.tallies) if t.closed]
    for i, tally in enumerate(load.tallies):
        assert tally.first_after is not None
        late = [(round(at - t_stop, 2), key) for at, key in tally.errors if at > tally.first_after]
        assert not late, f"client {i}: errors after it was back: {late}"
        early = [key for at, key in tally.errors if at < t_stop]
        assert not early, f"client {i}: errors before the stop: {early}"
        assert len(tally.errors) <= 1, f"client {i}: {tally.errors}"
    assert len(erring) == affected <= POOL_SIZE, (len(erring), affected, errors)

    # Every acknowledged commit is on the new primary.
    acked = {row_id for t in load.tallies for row_id in t.acked}
    on_new = {int(x) for x in standby.psql(f"SELECT id FROM {TABLE}").split()}
    lost = acked - on_new
    assert not lost, f"{len(lost)} acknowledged commits lost: {sorted(lost)[:20]}"

    # pgmux's servers are all on the new primary now, and the old one is named in the log.
    servers = [row for row in await show(admin, "SERVERS") if row["database"] == APP_DB]
    assert servers and {row["port"] for row in servers} == {standby.port}, servers
    assert f"127.0.0.1:{primary.port}" in pgmux.log()
    assert pgmux.running, pgmux.log_tail()
