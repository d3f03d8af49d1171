"""Named prepared statements through transaction pooling.

pgmux maps each client's statement names to shared server-side ``pgmux_N`` statements
and prepares them on whichever server a client gets (see proxy/prepared.py). Checked
with real drivers (asyncpg's statement cache, psycopg's prepare_threshold, pgbench -M
prepared) and by hand on the wire. Many of the wire tests run the same script against
PostgreSQL itself and through pgmux and require the same replies: PostgreSQL is the
oracle for what a client must see.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest
from support.helpers import (
    Su,
    connect_asyncpg,
    connect_psycopg,
    connect_raw,
    counting_backends,
    log_lines,
    pgbench_tps,
    run_pgbench,
)
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess
from support.wire import (
    RawClient,
    Reply,
    Step,
    bind,
    close_portal,
    close_statement,
    copy_data,
    copy_done,
    describe_portal,
    describe_statement,
    execute,
    flush,
    parse,
    parse_parameter_description,
    parse_row_description,
    query,
    run_steps,
    sync,
)

INT4, TEXT = 23, 25


@pytest.fixture
def pool2(pgmux_factory: PgmuxFactory) -> PgmuxProcess:
    return pgmux_factory({"default_pool_size": 2})


@pytest.fixture
def prep_table(pg: PgCluster) -> str:
    """Table ``prep_t`` (a int) with one row, 1; owned by app."""
    pg.psql(
        "DROP TABLE IF EXISTS prep_t; CREATE TABLE prep_t (a int); INSERT INTO prep_t VALUES (1);"
        f" ALTER TABLE prep_t OWNER TO {APP_USER}"
    )
    return "prep_t"


def _summary(reply: Reply) -> tuple[Any, ...]:
    """What a client sees of a batch, for comparing with PostgreSQL's own replies."""
    errors = [(e.get("S"), e.get("C"), e.get("M")) for e in reply.errors]
    return (reply.types, errors, reply.rows, reply.tags, reply.status)


async def _same_as_postgres(
    pg: PgCluster, pgmux: PgmuxProcess, steps: Sequence[Step]
) -> list[Reply]:
    """Run ``steps`` against PostgreSQL directly, then through pgmux; the replies must
    match batch by batch. Returns pgmux's."""
    async with await connect_raw(pg) as direct:
        want = await run_steps(direct, steps)
    async with await connect_raw(pgmux) as pooled:
        got = await run_steps(pooled, steps)
    assert len(got) == len(want)
    differences = [
        f"batch {n}: pgmux {_summary(g)} != pg {_summary(w)}"
        for n, (g, w) in enumerate(zip(got, want, strict=True))
        if _summary(g) != _summary(w)
    ]
    assert not differences, "\n".join(differences)
    return got


def _pbes(sql: str, name: str, params: Sequence[str | None] = ()) -> bytes:
    """Parse + Bind + Execute + Sync of a named statement."""
    return parse(sql, name) + bind("", name, params) + execute() + sync()


def _bes(name: str, params: Sequence[str | None] = ()) -> bytes:
    """Bind + Execute + Sync of an existing named statement."""
    return bind("", name, params) + execute() + sync()


async def _pid(client: RawClient) -> int:
    result = await client.simple_query("SELECT pg_backend_pid()")
    assert not result.errors, result.errors
    value = result.rows[0][0]
    assert value is not None
    return int(value)


# -- drivers -----------------------------------------------------------------------------

# (query, args, expected result) for client i, query j.
_ASYNCPG_QUERIES = (
    ("SELECT $1::int + 1", lambda n: (n,), lambda n: n + 1),
    ("SELECT $1::int * 2", lambda n: (n,), lambda n: n * 2),
    ("SELECT $1::text || '-x'", lambda n: (str(n),), lambda n: f"{n}-x"),
    ("SELECT $1::int - $2::int", lambda n: (n, 7), lambda n: n - 7),
    ("SELECT count(*) FROM generate_series(1, $1::int)", lambda n: (n % 50,), lambda n: n % 50),
    ("SELECT length($1::text)", lambda n: ("y" * (n % 20),), lambda n: n % 20),
)


async def test_asyncpg_statement_cache_many_clients(pgmux_factory: PgmuxFactory, su: Su) -> None:
    """100 asyncpg clients with their default statement cache (named statements) x 30
    queries over 6 statements, through 4 servers: every result right, no error."""
    pgmux = pgmux_factory({"default_pool_size": 4})

    async def client(i: int) -> int:
        conn = await connect_asyncpg(pgmux, statement_cache_size=100, timeout=60)
        try:
            for j in range(30):
                sql, args, expected = _ASYNCPG_QUERIES[(i + j) % len(_ASYNCPG_QUERIES)]
                n = i * 1000 + j
                got = await conn.fetchval(sql, *args(n))
                assert got == expected(n), (i, j, sql, got)
            # Named statements were used: the server holds pgmux's names for them.
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'pgmux_%'"
                )
            )
        finally:
            await conn.close()

    started = time.monotonic()
    async with counting_backends(su, interval=0.02) as samples:
        results = await asyncio.gather(*(client(i) for i in range(100)), return_exceptions=True)
    elapsed = time.monotonic() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} of 100 clients failed, first: {failures[0]!r}"
    assert all(isinstance(r, int) and r >= 1 for r in results), results
    assert samples and max(samples) <= 4, f"PostgreSQL saw {max(samples)} app backends"
    print(f"100 asyncpg clients x 30 prepared queries in {elapsed:.1f} s")


async def test_asyncpg_small_statement_cache(pool2: PgmuxProcess) -> None:
    """A cache smaller than the working set: asyncpg closes evicted statements
    (protocol Close) and prepares them again, across servers."""

    async def client(i: int) -> None:
        conn = await connect_asyncpg(pool2, statement_cache_size=2)
        try:
            for j in range(24):
                sql, args, expected = _ASYNCPG_QUERIES[j % len(_ASYNCPG_QUERIES)]
                n = i * 100 + j
                assert await conn.fetchval(sql, *args(n)) == expected(n)
        finally:
            await conn.close()

    await asyncio.gather(*(client(i) for i in range(6)))


async def test_psycopg_prepare_threshold_0(pool2: PgmuxProcess, prep_table: str) -> None:
    """psycopg preparing every query (``_pg3_N`` names), several clients on 2 servers,
    autocommit and explicit transactions, and a small prepared_max so psycopg closes
    statements (protocol Close) as it goes."""

    async def client(i: int) -> None:
        async with await connect_psycopg(pool2, prepare_threshold=0) as conn:
            conn.prepared_max = 3
            for j in range(20):
                k = j % 5
                async with conn.cursor() as cur:
                    if k == 0:
                        await cur.execute("SELECT %s::int + 1", [i * 100 + j])
                        assert await cur.fetchone() == (i * 100 + j + 1,)
                    elif k == 1:
                        await cur.execute("SELECT %s::text || 'z'", [f"c{i}"])
                        assert await cur.fetchone() == (f"c{i}z",)
                    elif k == 2:
                        await cur.execute("SELECT a FROM prep_t WHERE a = %s", [1])
                        assert await cur.fetchall() == [(1,)]
                    elif k == 3:
                        async with conn.transaction():
                            await cur.execute("SELECT %s::int * 3", [j])
                            assert await cur.fetchone() == (j * 3,)
                            await cur.execute("SELECT %s::int + 1", [j])
                            assert await cur.fetchone() == (j + 1,)
                    else:
                        await cur.execute(
                            "SELECT count(*) FROM generate_series(1, %s::int)", [i + j]
                        )
                        assert await cur.fetchone() == (i + j,)
            names = await (await conn.execute("SELECT name FROM pg_prepared_statements")).fetchall()
            assert names, "psycopg prepared nothing"
            assert all(name.startswith("pgmux_") for (name,) in names), names

    await asyncio.gather(*(client(i) for i in range(6)))


async def test_psycopg_pipeline_prepared(pool2: PgmuxProcess) -> None:
    """psycopg pipeline mode with every query prepared: several clients, several
    pipelines each, so statements are prepared in one pipeline and used in another on
    another server."""

    async def client(i: int) -> None:
        async with await connect_psycopg(pool2, prepare_threshold=0) as conn:
            for round_ in range(4):
                async with conn.pipeline():
                    curs = []
                    for j in range(8):
                        if j % 2:
                            cur = await conn.execute("SELECT %s::int + %s::int", [j, round_])
                        else:
                            cur = await conn.execute("SELECT %s::text || %s::text", [i, j])
                        curs.append((j, cur))
                for j, cur in curs:
                    row = await cur.fetchone()
                    assert row == ((j + round_) if j % 2 else f"{i}{j}",), (i, round_, j, row)
                # And a pipeline inside a transaction.
                async with conn.transaction(), conn.pipeline():
                    cur1 = await conn.execute("SELECT %s::int + %s::int", [i, round_])
                    cur2 = await conn.execute("SELECT %s::text || %s::text", [round_, i])
                assert await cur1.fetchone() == (i + round_,)
                assert await cur2.fetchone() == (f"{round_}{i}",)
            cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
            assert await cur.fetchone() != (0,), "nothing was prepared"

    await asyncio.gather(*(client(i) for i in range(5)))


# -- pgbench ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pgbench_tables(pg: PgCluster) -> None:
    init = run_pgbench(pg, "-i", "-s", "1", "-q")
    assert init.returncode == 0, init.stdout + init.stderr


@pytest.mark.parametrize("mode", ["prepared", "extended"])
def test_pgbench_protocol_modes(
    pgmux_factory: PgmuxFactory, pgbench_tables: None, mode: str
) -> None:
    pgmux = pgmux_factory({"default_pool_size": 2})
    select_only = pgbench_tps(run_pgbench(pgmux, "-M", mode, "-S", "-c", "8", "-j", "2", "-T", "3"))
    # -j = -c: pgbench -M prepared prepares synchronously per thread (see the brief).
    tpcb = pgbench_tps(run_pgbench(pgmux, "-M", mode, "-c", "4", "-j", "4", "-T", "3"))
    print(f"pgbench -M {mode} through pgmux: -S {select_only:.0f} tps, TPC-B {tpcb:.0f} tps")
    assert not log_lines(pgmux, levels=("ERROR", "WARNING")), log_lines(pgmux)


# -- on the wire: statements follow the client -------------------------------------------


async def test_bind_in_later_transaction_same_server(pool1: PgmuxProcess) -> None:
    """Pool of 1: the statement is still on the server; the client sees exactly what
    PostgreSQL would send, and another client's use of the server changes nothing."""
    async with await connect_raw(pool1) as x, await connect_raw(pool1) as other:
        first = await x.exchange(_pbes("SELECT $1::int + 1", "s1", ["41"]))
        assert first.types == "12DCZ" and first.rows == [["42"]], first
        assert (await other.simple_query("SELECT 5")).rows == [["5"]]
        again = await x.exchange(_bes("s1", ["1"]))
        assert again.types == "2DCZ" and again.rows == [["2"]] and again.status == "I", again
        # Inside an explicit transaction too.
        assert (await x.simple_query("BEGIN")).status == "T"
        inside = await x.exchange(_bes("s1", ["9"]))
        assert inside.types == "2DCZ" and inside.rows == [["10"]] and inside.status == "T"
        assert (await x.simple_query("COMMIT")).status == "I"


async def test_bind_on_another_server(pool2: PgmuxProcess) -> None:
    """The next transaction lands on the other server (the first is held by another
    client): pgmux prepares the statement there first, and hides that ParseComplete."""
    async with (
        await connect_raw(pool2) as x,
        await connect_raw(pool2) as h1,
        await connect_raw(pool2) as h2,
    ):
        assert (await h1.simple_query("BEGIN")).status == "T"
        pid_a = await _pid(h1)  # h1 holds server A
        first = await x.exchange(_pbes("SELECT pg_backend_pid(), $1::int * 2", "s1", ["1"]))
        assert first.types == "12DCZ", first
        pid_b = int(first.rows[0][0] or 0)
        assert pid_b != pid_a
        assert (await h2.simple_query("BEGIN")).status == "T"
        assert await _pid(h2) == pid_b  # h2 holds server B
        assert (await h1.simple_query("COMMIT")).status == "I"  # A is free

        again = await x.exchange(_bes("s1", ["2"]))
        assert again.types == "2DCZ", again  # no ParseComplete of pgmux's own Parse
        assert again.rows == [[str(pid_a), "4"]]

        # Describe of the statement on a server that lacks it, inside a transaction.
        assert (await h1.simple_query("BEGIN")).status == "T"
        assert await _pid(h1) == pid_a
        assert (await h2.simple_query("COMMIT")).status == "I"
        assert (await x.simple_query("BEGIN")).status == "T"
        described = await x.exchange(describe_statement("s1") + sync())
        assert described.types == "tTZ", described
        assert parse_parameter_description(described.first(b"t")) == [INT4]
        assert [t for _, t in parse_row_description(described.first(b"T"))] == [INT4, INT4]
        used = await x.exchange(_bes("s1", ["3"]))
        assert used.types == "2DCZ" and used.rows == [[str(pid_b), "6"]], used
        assert (await x.simple_query("COMMIT")).status == "I"
        assert (await h1.simple_query("COMMIT")).status == "I"


async def test_two_clients_same_name_different_queries(pool1: PgmuxProcess) -> None:
    async with await connect_raw(pool1) as a, await connect_raw(pool1) as b:
        ra = await a.exchange(_pbes("SELECT 'a:' || $1::text", "s1", ["1"]))
        rb = await b.exchange(_pbes("SELECT 'b:' || $1::text, 2", "s1", ["1"]))
        assert (ra.types, ra.rows) == ("12DCZ", [["a:1"]])
        assert (rb.types, rb.rows) == ("12DCZ", [["b:1", "2"]])
        for n in range(3):
            ra = await a.exchange(_bes("s1", [str(n)]))
            rb = await b.exchange(_bes("s1", [str(n)]))
            assert (ra.types, ra.rows) == ("2DCZ", [[f"a:{n}"]])
            assert (rb.types, rb.rows) == ("2DCZ", [[f"b:{n}", "2"]])
        # The same query under the same name by a third client shares the statement.
        async with await connect_raw(pool1) as c:
            rc = await c.exchange(_pbes("SELECT 'a:' || $1::text", "s1", ["c"]))
            assert (rc.types, rc.rows) == ("12DCZ", [["a:c"]])


async def test_two_clients_same_name_concurrently(pool2: PgmuxProcess) -> None:
    """Same idea with concurrency: 8 raw clients, each its own query under name "s"."""

    async def client(i: int) -> None:
        async with await connect_raw(pool2) as c:
            r = await c.exchange(_pbes(f"SELECT {i} * 1000 + $1::int", "s", ["0"]))
            assert (r.types, r.rows) == ("12DCZ", [[str(i * 1000)]]), r
            for n in range(1, 15):
                r = await c.exchange(_bes("s", [str(n)]))
                assert (r.types, r.rows) == ("2DCZ", [[str(i * 1000 + n)]]), (i, n, r)
                await asyncio.sleep(0)

    await asyncio.gather(*(client(i) for i in range(8)))


# -- on the wire: errors, as PostgreSQL makes them ----------------------------------------


async def test_reparse_existing_name(pg: PgCluster, pool1: PgmuxProcess) -> None:
    replies = await _same_as_postgres(
        pg,
        pool1,
        [
            (_pbes("SELECT 1", "s1"), 1),
            # Re-Parse (other text, then the same text): 42P05, rest of the batch skipped.
            (_pbes("SELECT 2", "s1"), 1),
            (parse("SELECT 1", "s1") + bind("", "s1") + execute() + sync(), 1),
            (_bes("s1"), 1),  # still the original query
            (query("SELECT 'after'"), 1),
        ],
    )
    error = replies[1].errors[0]
    assert (replies[1].types, error["C"]) == ("EZ", "42P05")
    assert error["M"] == 'prepared statement "s1" already exists'
    assert replies[3].rows == [["1"]]


async def test_reparse_existing_name_in_transaction(pg: PgCluster, pool1: PgmuxProcess) -> None:
    replies = await _same_as_postgres(
        pg,
        pool1,
        [
            (_pbes("SELECT 1", "s1"), 1),
            (query("BEGIN"), 1),
            (_pbes("SELECT 2", "s1"), 1),  # 42P05 aborts the transaction
            (_bes("s1"), 1),  # 25P02
            (query("ROLLBACK"), 1),
            (_bes("s1"), 1),
        ],
    )
    assert replies[2].sqlstates == ["42P05"] and replies[2].status == "E"
    assert replies[3].sqlstates == ["25P02"] and replies[3].status == "E"
    assert replies[5].rows == [["1"]] and replies[5].status == "I"


async def test_bind_unknown_name(pg: PgCluster, pgmux: PgmuxProcess) -> None:
    replies = await _same_as_postgres(
        pg,
        pgmux,
        [
            (_bes("nope"), 1),
            (describe_statement("nope") + sync(), 1),
            (query("SELECT 1"), 1),
        ],
    )
    assert replies[0].sqlstates == ["26000"]
    assert replies[0].errors[0]["M"] == 'prepared statement "nope" does not exist'


async def test_parse_error_is_not_cached(pg: PgCluster, pool1: PgmuxProcess) -> None:
    replies = await _same_as_postgres(
        pg,
        pool1,
        [
            (_pbes("SELEC 1", "s1"), 1),  # 42601
            (_bes("s1"), 1),  # 26000: it was never prepared
            (_pbes("SELECT 'ok'", "s1"), 1),
            (_bes("s1"), 1),
            # A Parse that fails on a missing table, same name afterwards.
            (parse("SELECT * FROM no_such_table", "s2") + sync(), 1),
            (_pbes("SELECT 2", "s2"), 1),
        ],
    )
    assert replies[0].sqlstates == ["42601"]
    assert replies[1].sqlstates == ["26000"]
    assert replies[3].rows == [["ok"]]
    assert replies[4].sqlstates == ["42P01"]
    assert replies[5].rows == [["2"]]


async def test_close_statement(pg: PgCluster, pool1: PgmuxProcess) -> None:
    replies = await _same_as_postgres(
        pg,
        pool1,
        [
            (_pbes("SELECT 1", "s1"), 1),
            (close_statement("s1") + sync(), 1),
            (_bes("s1"), 1),  # 26000
            (close_statement("never_was") + sync(), 1),  # closing nothing is fine
            (_pbes("SELECT 'new'", "s1"), 1),
            (close_statement("s1") + sync(), 1),
            (_pbes("SELECT 1", "s1"), 1),  # the original text again
            # Close and Parse of the same name in one batch.
            (close_statement("s1") + _pbes("SELECT 'again'", "s1"), 1),
            (_bes("s1"), 1),
        ],
    )
    assert replies[1].types == "3Z"
    assert replies[2].sqlstates == ["26000"]
    assert replies[4].rows == [["new"]]
    assert replies[6].rows == [["1"]]
    assert replies[7].types == "312DCZ" and replies[8].rows == [["again"]]


async def test_describe_statement(pg: PgCluster, pool1: PgmuxProcess) -> None:
    sql = "SELECT $1::int AS a, $2::text AS b, now() AS c"
    replies = await _same_as_postgres(
        pg,
        pool1,
        [
            (parse(sql, "s1") + sync(), 1),
            (describe_statement("s1") + sync(), 1),
            (parse("SELECT $1::int + $2", "s2", [0, INT4]) + describe_statement("s2") + sync(), 1),
            (bind("p", "s1", ["1", "x"]) + describe_portal("p") + sync(), 1),
        ],
    )
    described = replies[1]
    assert described.types == "tTZ"
    assert parse_parameter_description(described.first(b"t")) == [INT4, TEXT]
    columns = parse_row_description(described.first(b"T"))
    assert [name for name, _ in columns] == ["a", "b", "c"]
    assert [oid for _, oid in columns][:2] == [INT4, TEXT]
    assert parse_parameter_description(replies[2].first(b"t")) == [INT4, INT4]


async def test_deallocate_all_and_discard_all(pg: PgCluster, pool1: PgmuxProcess) -> None:
    replies = await _same_as_postgres(
        pg,
        pool1,
        [
            (_pbes("SELECT 1", "s1"), 1),
            (query("DEALLOCATE ALL"), 1),
            (_bes("s1"), 1),  # 26000
            (_pbes("SELECT 2", "s1"), 1),
            (query("DISCARD ALL"), 1),
            (_bes("s1"), 1),  # 26000
            (_pbes("SELECT 3", "s1"), 1),
            (_bes("s1"), 1),
        ],
    )
    assert replies[1].tags == ["DEALLOCATE ALL"] and replies[4].tags == ["DISCARD ALL"]
    assert replies[2].sqlstates == ["26000"] and replies[5].sqlstates == ["26000"]
    assert replies[3].rows == [["2"]] and replies[7].rows == [["3"]]


@pytest.mark.parametrize("sql", ["DEALLOCATE ALL", "DISCARD ALL"])
async def test_deallocate_all_pipelined(pg: PgCluster, pool1: PgmuxProcess, sql: str) -> None:
    """DEALLOCATE ALL / DISCARD ALL and the batches after it in one write: the later
    batches see no statements, as on PostgreSQL (pgmux learns of the DEALLOCATE only
    from its CommandComplete, after it has rewritten what follows)."""
    await _same_as_postgres(
        pg,
        pool1,
        [
            (_pbes("SELECT 1", "s1") + _pbes("SELECT 2", "s2"), 2),
            (query(sql) + _pbes("SELECT 'new'", "s1") + _bes("s2"), 3),
        ],
    )


async def test_deallocate_all_spares_other_clients(pool1: PgmuxProcess) -> None:
    """One client's DEALLOCATE ALL drops every statement on the shared server; another
    client's statement there is prepared again when it next uses it."""
    async with await connect_raw(pool1) as a, await connect_raw(pool1) as b:
        assert (await b.exchange(_pbes("SELECT 'b'", "sb"))).rows == [["b"]]
        assert (await a.exchange(_pbes("SELECT 'b'", "sa"))).rows == [["b"]]  # shared
        assert (await a.simple_query("DEALLOCATE ALL")).tags == ["DEALLOCATE ALL"]
        r = await b.exchange(_bes("sb"))
        assert (r.types, r.rows) == ("2DCZ", [["b"]]), r
        r = await a.exchange(_bes("sa"))
        assert r.sqlstates == ["26000"], r


async def test_sql_deallocate_of_protocol_statement(pg: PgCluster, pool1: PgmuxProcess) -> None:
    """PostgreSQL lets SQL DEALLOCATE drop a protocol-level statement (they share one
    namespace); older psycopg and other drivers do exactly that."""
    await _same_as_postgres(
        pg,
        pool1,
        [
            (_pbes("SELECT 1", "s1"), 1),
            (query("DEALLOCATE s1"), 1),
            (_bes("s1"), 1),  # 26000
            (_pbes("SELECT 2", "s1"), 1),
        ],
    )


# -- eviction and the switch ---------------------------------------------------------------


async def _prepared_on_server(client: RawClient) -> list[str]:
    result = await client.simple_query("SELECT name FROM pg_prepared_statements ORDER BY name")
    assert not result.errors, result.errors
    return [row[0] or "" for row in result.rows]


async def test_eviction(pgmux_factory: PgmuxFactory) -> None:
    """max_prepared_statements = 2: a server returned to the pool keeps at most 2; the
    client's statements keep working (prepared again when needed)."""
    pgmux = pgmux_factory({"default_pool_size": 1, "max_prepared_statements": 2})
    async with await connect_raw(pgmux) as x:
        for i in range(1, 5):
            r = await x.exchange(_pbes(f"SELECT {i}", f"s{i}"))
            assert (r.types, r.rows) == ("12DCZ", [[str(i)]]), r
        names = await _prepared_on_server(x)
        assert len(names) <= 2 and all(n.startswith("pgmux_") for n in names), names
        for _ in range(2):
            for i in range(1, 5):
                r = await x.exchange(_bes(f"s{i}"))
                assert (r.types, r.rows) == ("2DCZ", [[str(i)]]), r
            names = await _prepared_on_server(x)
            assert len(names) <= 2, names
        # All four in one transaction: all on the server at once, trimmed afterwards.
        assert (await x.simple_query("BEGIN")).status == "T"
        for i in range(1, 5):
            r = await x.exchange(_bes(f"s{i}"))
            assert (r.types, r.rows) == ("2DCZ", [[str(i)]]), r
        assert len(await _prepared_on_server(x)) == 4
        assert (await x.simple_query("COMMIT")).status == "I"
        assert len(await _prepared_on_server(x)) <= 2
        # And in one pipelined batch.
        r = await x.exchange(b"".join(bind("", f"s{i}") + execute() for i in range(1, 5)) + sync())
        assert (r.types, r.rows) == ("2DC" * 4 + "Z", [["1"], ["2"], ["3"], ["4"]]), r
    assert not log_lines(pgmux, levels=("ERROR", "WARNING")), log_lines(pgmux)


async def test_mapping_off_passes_names_through(pgmux_factory: PgmuxFactory) -> None:
    """max_prepared_statements = 0: names go to the server unchanged (PgBouncer < 1.21)."""
    pgmux = pgmux_factory({"default_pool_size": 1, "max_prepared_statements": 0})
    async with await connect_raw(pgmux) as x:
        r = await x.exchange(_pbes("SELECT 'own'", "my_stmt"))
        assert (r.types, r.rows) == ("12DCZ", [["own"]])
        assert await _prepared_on_server(x) == ["my_stmt"]
        r = await x.exchange(_bes("my_stmt"))
        assert (r.types, r.rows) == ("2DCZ", [["own"]])
        async with await connect_raw(pgmux) as y:
            # Same server, same session: the name is taken (the server's own 42P05).
            r = await y.exchange(_pbes("SELECT 'other'", "my_stmt"))
            assert r.sqlstates == ["42P05"], r


# -- portals, pipelining ---------------------------------------------------------------


async def test_portal_with_row_limit(pg: PgCluster, pool2: PgmuxProcess) -> None:
    sql = "SELECT g FROM generate_series(1, 10) g"
    replies = await _same_as_postgres(
        pg,
        pool2,
        [
            (query("BEGIN"), 1),
            (parse(sql, "s1") + bind("p1", "s1") + execute("p1", 3) + sync(), 1),
            (execute("p1", 3) + sync(), 1),
            (describe_portal("p1") + execute("p1", 3) + sync(), 1),
            (execute("p1", 0) + sync(), 1),
            (close_portal("p1") + sync(), 1),
            (query("COMMIT"), 1),
            # Outside a transaction the portal ends with the batch.
            (bind("p2", "s1") + execute("p2", 4) + execute("p2", 4) + sync(), 1),
            (execute("p2", 1) + sync(), 1),  # 34000: no such portal
        ],
    )
    assert replies[1].types == "12DDDsZ" and replies[1].status == "T"
    assert replies[2].rows == [["4"], ["5"], ["6"]]
    assert replies[4].types == "DCZ" and replies[4].tags == ["SELECT 1"]
    assert replies[7].types == "2DDDDsDDDDsZ"
    assert replies[8].sqlstates == ["34000"]


async def test_pipelined_batches(pg: PgCluster, pool1: PgmuxProcess) -> None:
    """Seven batches in one write, some failing in the middle: same replies, same order."""
    script = b"".join(
        [
            _pbes("SELECT $1::int + 1", "s1", ["1"]),
            _bes("s1", ["2"]),
            parse("SELECT 1 / $1::int", "s2") + _bes("s2", ["0"]),  # 22012 at Execute
            bind("", "nope") + execute() + _bes("s1", ["3"]),  # 26000, rest skipped
            _pbes("SELECT 'x'", "s1"),  # 42P05
            bind("", "s1", ["5"]) + execute() + describe_statement("s2") + _bes("s2", ["2"]),
            query("SELECT 7; SELECT 8"),
        ]
    )
    replies = await _same_as_postgres(pg, pool1, [(script, 7)])
    assert [r.types for r in replies] == [
        "12DCZ",
        "2DCZ",
        "1EZ",  # 1 / 0 is folded while planning at Bind
        "EZ",
        "EZ",
        "2DCtT2DCZ",
        "TDCTDCZ",
    ]
    assert [r.sqlstates for r in replies][2:5] == [["22012"], ["26000"], ["42P05"]]


async def test_parse_then_flush_keeps_the_server(pool2: PgmuxProcess) -> None:
    """Parse + Flush, then the Bind later: the batch is open, the server stays linked."""
    async with await connect_raw(pool2) as x, await connect_raw(pool2) as other:
        await x.send(parse("SELECT pg_backend_pid()", "s1") + describe_statement("s1") + flush())
        got = [await x.read_message() for _ in range(3)]
        assert [t for t, _ in got] == [b"1", b"t", b"T"]
        # The other client can use the other server meanwhile.
        assert (await other.simple_query("SELECT 1")).rows == [["1"]]
        r = await x.exchange(_bes("s1"))
        assert r.types == "2DCZ", r


# -- pipelines that fail before pgmux's own messages ----------------------------------------
#
# pgmux rewrites a whole chunk as it arrives, before the server has answered anything.
# When a batch fails early, the server skips what pgmux added to it; later batches of
# the same write were rewritten assuming it ran.

_EVICT_S1 = [
    (_pbes("SELECT 1", "s1"), 1),
    (_pbes("SELECT 2", "s2"), 1),  # with max_prepared_statements = 1, s1 leaves the server
]


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(
            # The injected Parse of s1 in batch 1 is skipped; batch 2 relies on it.
            [*_EVICT_S1, (bind("", "nope") + _bes("s1") + _bes("s1"), 2)],
            id="injected-parse-skipped",
        ),
        pytest.param(
            # A Close skipped by the server: PostgreSQL still has s1 afterwards.
            [*_EVICT_S1, (bind("", "nope") + close_statement("s1") + sync() + _bes("s1"), 2)],
            id="close-skipped",
        ),
        pytest.param(
            # A Parse skipped by the server: the same name can be parsed next batch.
            [
                *_EVICT_S1,
                (bind("", "nope") + parse("SELECT 3", "s3") + sync() + _pbes("SELECT 3", "s3"), 2),
            ],
            id="parse-skipped-then-parse",
        ),
        pytest.param(
            # A Parse skipped by the server: Bind of that name is PostgreSQL's 26000 for it.
            [*_EVICT_S1, (bind("", "nope") + parse("SELECT 4", "s4") + sync() + _bes("s4"), 2)],
            id="parse-skipped-then-bind",
        ),
    ],
)
async def test_pipeline_error_before_pgmux_messages(
    pg: PgCluster, pgmux_factory: PgmuxFactory, script: list[Step]
) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1, "max_prepared_statements": 1})
    await _same_as_postgres(pg, pgmux, script)


async def test_extended_copy_then_failed_parse(pg: PgCluster, pool1: PgmuxProcess) -> None:
    """COPY FROM STDIN through the extended protocol (its first Sync is ignored by the
    server), then a Parse that fails: the name must not stay cached."""
    pg.psql(
        "DROP TABLE IF EXISTS prep_copy; CREATE TABLE prep_copy (a int);"
        f" ALTER TABLE prep_copy OWNER TO {APP_USER}"
    )
    await _same_as_postgres(
        pg,
        pool1,
        [
            (parse("COPY prep_copy FROM STDIN") + bind() + execute() + sync(), b"G"),
            (copy_data(b"1\n") + copy_done() + sync(), 1),
            (parse("SELEC 1", "s1") + sync(), 1),  # 42601
            (_pbes("SELECT 1", "s1"), 1),
            (_bes("s1"), 1),
        ],
    )


# -- DDL under a prepared statement ------------------------------------------------------


async def test_cached_plan_result_type_change(
    pg: PgCluster, pool1: PgmuxProcess, prep_table: str
) -> None:
    """ALTER TABLE under a prepared SELECT *: PostgreSQL itself fails the next Execute
    with 0A000 "cached plan must not change result type". pgmux re-prepares and retries
    transparently when the request Describes its portal (the client learns the new row
    shape, as psycopg does); a request that does not (asyncpg) gets PostgreSQL's own
    error, since the client decodes rows by the shape it was told before, and its
    retry then works on a fresh plan."""
    async with await connect_raw(pool1) as x:
        r = await x.exchange(_pbes("SELECT * FROM prep_t", "s1"))
        assert (r.types, r.rows) == ("12DCZ", [["1"]])
        pg.psql("ALTER TABLE prep_t ADD COLUMN b int DEFAULT 7")
        r = await x.exchange(bind("", "s1") + describe_portal("") + execute() + sync())
        assert r.errors == [] and r.types == "2TDCZ" and r.rows == [["1", "7"]], r
        pg.psql("ALTER TABLE prep_t ADD COLUMN c int DEFAULT 8")
        r = await x.exchange(_bes("s1"))
        assert r.sqlstates == ["0A000"], r  # as PostgreSQL answers
        r = await x.exchange(_bes("s1"))
        assert r.errors == [] and r.rows == [["1", "7", "8"]], r


async def test_new_parse_after_alter_table(
    pg: PgCluster, pool1: PgmuxProcess, prep_table: str
) -> None:
    """After ALTER TABLE, a NEW Parse of the same text must work, as it does on
    PostgreSQL (a fresh prepare plans against the new table), even though pgmux already
    holds a statement for that text on the server."""
    async with await connect_raw(pool1) as x:
        r = await x.exchange(_pbes("SELECT * FROM prep_t", "s1"))
        assert r.rows == [["1"]]
    pg.psql("ALTER TABLE prep_t ADD COLUMN b int DEFAULT 7")
    async with await connect_raw(pool1) as y:
        r = await y.exchange(_pbes("SELECT * FROM prep_t", "other_name"))
        assert r.errors == [] and (r.types, r.rows) == ("12DCZ", [["1", "7"]]), r


async def test_asyncpg_after_alter_table(pg: PgCluster, pool1: PgmuxProcess) -> None:
    """asyncpg, told "cached plan must not change result type" (0A000), clears its
    statement cache, prepares again and retries once: against PostgreSQL itself the
    query then works. It must through pgmux too."""

    async def scenario(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
        pg.psql(
            "DROP TABLE IF EXISTS prep_t; CREATE TABLE prep_t (a int);"
            f" INSERT INTO prep_t VALUES (1); ALTER TABLE prep_t OWNER TO {APP_USER}"
        )
        try:
            assert [tuple(r) for r in await conn.fetch("SELECT * FROM prep_t")] == [(1,)]
            pg.psql("ALTER TABLE prep_t ADD COLUMN b int DEFAULT 7")
            return [tuple(r) for r in await conn.fetch("SELECT * FROM prep_t")]
        finally:
            await conn.close()

    direct = await asyncpg.connect(
        host=pg.host, port=pg.port, user=APP_USER, password=APP_PASSWORD, database=APP_DB
    )
    assert await scenario(direct) == [(1, 7)]  # the oracle
    pooled = await connect_asyncpg(pool1, statement_cache_size=100)
    assert await scenario(pooled) == [(1, 7)]


async def test_psycopg_after_alter_table(
    pg: PgCluster, pool1: PgmuxProcess, prep_table: str
) -> None:
    """psycopg preparing every query: after ALTER TABLE, a NEW connection running the
    query (Parse + Bind + Describe + Execute in one batch) must work, as it does on
    PostgreSQL; and so must the connection that prepared it before."""
    async with await connect_psycopg(pool1, prepare_threshold=0) as first:
        rows = await (await first.execute("SELECT * FROM prep_t")).fetchall()
        assert rows == [(1,)]
        pg.psql("ALTER TABLE prep_t ADD COLUMN b int DEFAULT 7")
        async with await connect_psycopg(pool1, prepare_threshold=0) as second:
            rows = await (await second.execute("SELECT * FROM prep_t")).fetchall()
            assert rows == [(1, 7)]
        rows = await (await first.execute("SELECT * FROM prep_t")).fetchall()
        assert rows == [(1, 7)]


async def test_large_statement(pg: PgCluster, pgmux_factory: PgmuxFactory) -> None:
    """A 300 kB Parse, prepared again by pgmux after eviction."""
    pgmux = pgmux_factory({"default_pool_size": 1, "max_prepared_statements": 1})
    big = "SELECT length('" + "x" * 300_000 + "' || $1::text)"
    replies = await _same_as_postgres(
        pg,
        pgmux,
        [
            (_pbes(big, "big", ["yy"]), 1),
            (_pbes("SELECT 2", "small"), 1),  # evicts "big" from the server
            (_bes("big", ["y"]), 1),
            (describe_statement("big") + sync(), 1),
        ],
    )
    assert replies[0].rows == [["300002"]] and replies[2].rows == [["300001"]]
