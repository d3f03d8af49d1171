"""COPY through pgmux: 100 MB in, ~100 MB out, backpressure, failures mid-stream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import asyncpg
import psycopg
import pytest
from support.helpers import app_backends, connect_asyncpg, connect_psycopg, superuser, vm_rss_kib
from support.pgcluster import APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess

MB = 1024 * 1024
ROW_PAYLOAD = b"y" * 190
ROWS_PER_CHUNK = 5000


@pytest.fixture
def copy_in_table(pg: PgCluster) -> Iterator[str]:
    pg.psql(
        "DROP TABLE IF EXISTS copy_in_t; CREATE UNLOGGED TABLE copy_in_t (id int, payload text);"
        f" ALTER TABLE copy_in_t OWNER TO {APP_USER}"
    )
    yield "copy_in_t"
    pg.psql("DROP TABLE IF EXISTS copy_in_t")


def _chunks(total_bytes: int) -> Iterator[bytes]:
    """COPY text rows ``id\\tyyyy...\\n`` in ~1 MB chunks, ``total_bytes`` or a little more."""
    sent = 0
    next_id = 0
    while sent < total_bytes:
        chunk = b"".join(
            b"%d\t%s\n" % (i, ROW_PAYLOAD) for i in range(next_id, next_id + ROWS_PER_CHUNK)
        )
        next_id += ROWS_PER_CHUNK
        sent += len(chunk)
        yield chunk


def _expected(total_bytes: int) -> tuple[int, int]:
    """(rows, bytes) that ``_chunks(total_bytes)`` produces."""
    rows = size = 0
    for chunk in _chunks(total_bytes):
        rows += chunk.count(b"\n")
        size += len(chunk)
    return rows, size


async def test_copy_in_100mb_psycopg(pgmux: PgmuxProcess, copy_in_table: str) -> None:
    rows, size = _expected(100 * MB)
    started = time.monotonic()
    async with await connect_psycopg(pgmux) as conn, conn.cursor() as cur:
        async with cur.copy(f"COPY {copy_in_table} (id, payload) FROM STDIN") as copy:
            for chunk in _chunks(100 * MB):
                await copy.write(chunk)
        assert cur.rowcount == rows
        await cur.execute(
            f"SELECT count(*), count(DISTINCT id), sum(length(payload)) FROM {copy_in_table}"
        )
        assert await cur.fetchone() == (rows, rows, rows * len(ROW_PAYLOAD))
    took = time.monotonic() - started
    print(f"COPY IN {size / MB:.0f} MB, {rows} rows via psycopg: {took:.1f} s")


async def test_copy_in_100mb_asyncpg(pgmux: PgmuxProcess, copy_in_table: str) -> None:
    rows, size = _expected(100 * MB)

    async def source() -> AsyncIterator[bytes]:
        for chunk in _chunks(100 * MB):
            yield chunk

    started = time.monotonic()
    conn = await connect_asyncpg(pgmux)
    try:
        status = await conn.copy_to_table(
            copy_in_table, source=source(), columns=["id", "payload"], timeout=60
        )
        assert status == f"COPY {rows}"
        assert await conn.fetchval(f"SELECT count(*) FROM {copy_in_table}") == rows
        assert await conn.fetchval(f"SELECT max(id) FROM {copy_in_table}") == rows - 1
    finally:
        await conn.close()
    took = time.monotonic() - started
    print(f"COPY IN {size / MB:.0f} MB, {rows} rows via asyncpg: {took:.1f} s")


# -- COPY TO STDOUT ----------------------------------------------------------------------

N_OUT = 450_000
COPY_OUT = f"COPY (SELECT i, repeat('x', 200) FROM generate_series(1, {N_OUT}) i) TO STDOUT"
EXPECTED_OUT_BYTES = sum(len(str(i)) + 1 + 200 + 1 for i in range(1, N_OUT + 1))


async def test_copy_out_100mb_psycopg(pgmux: PgmuxProcess) -> None:
    total = rows = 0
    started = time.monotonic()
    async with await connect_psycopg(pgmux) as conn:
        async with conn.cursor() as cur:
            async with cur.copy(COPY_OUT) as copy:
                async for data in copy:
                    total += len(data)
                    rows += bytes(data).count(b"\n")
            assert cur.rowcount == N_OUT
        # The session goes on.
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
    assert rows == N_OUT
    assert total == EXPECTED_OUT_BYTES
    print(f"COPY OUT {total / MB:.1f} MB via psycopg: {time.monotonic() - started:.1f} s")


class _RssSampler:
    """Samples a process's VmRSS from a thread (the event loop may be busy)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(vm_rss_kib(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_copy_out_slow_reader_keeps_pgmux_rss_bounded(pgmux: PgmuxProcess) -> None:
    """A client that reads slowly must not make pgmux buffer PostgreSQL's output."""
    async with await connect_psycopg(pgmux) as conn:
        await conn.execute("SELECT 1")  # warm up: the server connection exists
        baseline = vm_rss_kib(pgmux.pid)
        total = rows = 0
        started = time.monotonic()
        with _RssSampler(pgmux.pid) as sampler:
            async with conn.cursor() as cur, cur.copy(COPY_OUT) as copy:
                async for data in copy:
                    total += len(data)
                    rows += 1
                    elapsed = time.monotonic() - started
                    if elapsed < 2:
                        await asyncio.sleep(0.1)  # nearly stalled
                    elif elapsed < 5 and rows % 200 == 0:
                        await asyncio.sleep(0.01)  # slow: ~4 MB/s
        peak = max(sampler.samples)
    growth_mb = (peak - baseline) / 1024
    summary = (
        f"pgmux VmRSS baseline {baseline / 1024:.1f} MB, peak {peak / 1024:.1f} MB "
        f"(+{growth_mb:.1f} MB) over {len(sampler.samples)} samples, "
        f"{total / MB:.1f} MB copied in {time.monotonic() - started:.1f} s"
    )
    print(summary)
    assert rows == N_OUT and total == EXPECTED_OUT_BYTES
    assert growth_mb < 50, summary


# -- failures ----------------------------------------------------------------------------


async def test_copy_in_bad_row_mid_stream_psycopg(
    pg: PgCluster, pgmux_factory: PgmuxFactory, copy_in_table: str
) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1})
    async with await connect_psycopg(pgmux) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as info:
            async with conn.cursor() as cur, cur.copy(f"COPY {copy_in_table} FROM STDIN") as copy:
                for n, chunk in enumerate(_chunks(20 * MB)):
                    await copy.write(chunk)
                    if n == 5:
                        await copy.write(b"not-a-number\tbad row\n")
        assert info.value.sqlstate == "22P02"
        assert "not-a-number" in str(info.value)
        cur = await conn.execute(f"SELECT count(*) FROM {copy_in_table}")
        assert await cur.fetchone() == (0,)
    # Another client on the pool's only server: clean, outside any transaction.
    conn2 = await connect_asyncpg(pgmux)
    try:
        assert await conn2.fetchval("SELECT 1") == 1
    finally:
        await conn2.close()
    su = await superuser(pg)
    try:
        backends = await app_backends(su)
        assert all(state == "idle" and not xact for _, state, xact, _ in backends), backends
    finally:
        await su.close()


async def test_copy_in_bad_row_asyncpg(pgmux_factory: PgmuxFactory, copy_in_table: str) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1})
    conn = await connect_asyncpg(pgmux)

    async def source() -> AsyncIterator[bytes]:
        for n, chunk in enumerate(_chunks(10 * MB)):
            yield chunk
            if n == 3:
                yield b"1\tok\n2\ttoo\tmany\tcolumns\n"

    try:
        with pytest.raises(asyncpg.BadCopyFileFormatError) as info:
            await conn.copy_to_table(copy_in_table, source=source(), timeout=30)
        assert info.value.sqlstate == "22P04"
        assert await conn.fetchval("SELECT 2") == 2
        assert await conn.fetchval(f"SELECT count(*) FROM {copy_in_table}") == 0
        # In a transaction, the failed COPY aborts it; ROLLBACK brings the session back.
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {copy_in_table} VALUES (-1, 'kept')")
        with pytest.raises(asyncpg.PostgresError):
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {copy_in_table} VALUES (-2, 'gone')")
                await conn.copy_to_table(copy_in_table, source=source(), timeout=30)
        assert await conn.fetchval(f"SELECT array_agg(id) FROM {copy_in_table}") == [-1]
    finally:
        await conn.close()


async def test_copy_out_error_mid_stream(pgmux: PgmuxProcess) -> None:
    """The query fails after some rows were sent: the error arrives, the session goes on."""
    async with await connect_psycopg(pgmux) as conn:
        got = 0
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY (SELECT i, 1 / (50000 - i) FROM generate_series(1, 60000) i) TO STDOUT"
                ) as copy,
            ):
                async for data in copy:
                    got += len(data)
        assert got > 0
        cur = await conn.execute("SELECT 5")
        assert await cur.fetchone() == (5,)


async def test_copy_in_client_copyfail(pgmux: PgmuxProcess, copy_in_table: str) -> None:
    """The client itself aborts the COPY (CopyFail): the session continues."""

    class GiveUp(Exception):
        pass

    async with await connect_psycopg(pgmux) as conn:
        with pytest.raises(GiveUp):
            async with conn.cursor() as cur, cur.copy(f"COPY {copy_in_table} FROM STDIN") as copy:
                await copy.write(b"1\ta\n")
                raise GiveUp
        cur = await conn.execute(f"SELECT count(*) FROM {copy_in_table}")
        assert await cur.fetchone() == (0,)


# -- single big messages -----------------------------------------------------------------


async def test_large_values_both_ways(pgmux: PgmuxProcess) -> None:
    """One 40 MB DataRow from the server, one 20 MB Query/Bind from the client."""
    conn = await connect_asyncpg(pgmux)
    try:
        value = await conn.fetchval("SELECT repeat('ab', 20 * 1024 * 1024)", timeout=30)
        assert len(value) == 40 * MB and value[:4] == "abab"
        big = "z" * (20 * MB)
        assert await conn.fetchval("SELECT length($1::text)", big, timeout=30) == 20 * MB
        assert await conn.fetchval(f"SELECT length('{big}')", timeout=30) == 20 * MB
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
