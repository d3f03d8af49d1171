"""TLS towards PostgreSQL: pgmux as a TLS client of ``pg_tls`` (TLS-only, SCRAM), of
the plain ``pg``, of clusters made here (wrong host name, certificate authentication)
and of fake servers that answer SSLRequest badly.

Clients reach pgmux over plain TCP unless a test says otherwise, so whatever TLS a
backend reports (``pg_stat_ssl``) is pgmux's own server leg.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from support.certs import (
    SERVER_HOSTNAME,
    SERVER_IP,
    CertFiles,
    client_ssl_context,
    pgmux_client_tls,
    pgmux_server_tls,
)
from support.helpers import (
    connect_asyncpg,
    connect_psycopg,
    postgres_error,
    superuser,
    vm_rss_kib,
)
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, TLS_ONLY_HBA, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess
from support.wire import RawClient, query

SSL_STATUS = "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
MB = 1024 * 1024


def backend(cluster: PgCluster, host: str = SERVER_IP, **overrides: Any) -> dict[str, Any]:
    """Overrides that point pgmux's ``app`` database at ``cluster`` under ``host``."""
    return {"databases": {APP_DB: {"host": host, "port": cluster.port}}, **overrides}


async def ssl_status(pgmux: PgmuxProcess, **kwargs: Any) -> tuple[bool, str | None]:
    """(ssl, version) of the backend serving a query through pgmux."""
    kwargs.setdefault("ssl", False)
    conn = await connect_asyncpg(pgmux, **kwargs)
    try:
        row = await conn.fetchrow(SSL_STATUS)
        assert row is not None
        assert await conn.fetchval("SELECT current_user") == APP_USER
        return row["ssl"], row["version"]
    finally:
        await conn.close()


async def login_error(pgmux: PgmuxProcess, **kwargs: Any) -> asyncpg.PostgresError:
    """The error a client gets when pgmux cannot log in to the server."""
    kwargs.setdefault("ssl", False)
    with pytest.raises(asyncpg.PostgresError) as caught:
        conn = await connect_asyncpg(pgmux, **kwargs)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
    return postgres_error(caught.value)


# -- encrypting without verifying ---------------------------------------------------------


@pytest.mark.parametrize("mode", [None, "prefer", "require"])
async def test_tls_to_server(
    pgmux_factory: PgmuxFactory, pg_tls: PgCluster, mode: str | None
) -> None:
    """prefer (the default) and require: the backend pgmux logs in to uses TLS."""
    overrides = backend(pg_tls, **(pgmux_server_tls(mode) if mode else {}))
    pgmux = pgmux_factory(overrides)
    ssl_on, version = await ssl_status(pgmux)
    assert ssl_on is True
    assert version in ("TLSv1.2", "TLSv1.3")
    async with await connect_psycopg(pgmux) as conn:
        cur = await conn.execute(SSL_STATUS)
        assert (await cur.fetchone())[0] is True  # type: ignore[index]


async def test_prefer_to_plain_server_stays_plain(pgmux: PgmuxProcess) -> None:
    """prefer against the session's cluster (ssl = off): the server says N, pgmux goes on."""
    assert await ssl_status(pgmux) == (False, None)


async def test_server_tls_protocols(pgmux_factory: PgmuxFactory, pg_tls: PgCluster) -> None:
    tls = pgmux_server_tls("require", server_tls_protocols="tlsv1.2")
    pgmux = pgmux_factory(backend(pg_tls, **tls))
    assert await ssl_status(pgmux) == (True, "TLSv1.2")


async def test_pooled_tls_servers_under_load(
    pgmux_factory: PgmuxFactory, pg_tls: PgCluster
) -> None:
    """Many clients sharing five TLS server connections, transactions and all."""
    pgmux = pgmux_factory(backend(pg_tls, **pgmux_server_tls("require")))

    async def worker(n: int) -> None:
        conn = await connect_asyncpg(pgmux)
        try:
            for i in range(30):
                assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
            async with conn.transaction():
                assert (await conn.fetchrow(SSL_STATUS))["ssl"] is True  # type: ignore[index]
                await conn.execute("SELECT pg_sleep(0.01)")
        finally:
            await conn.close()

    await asyncio.gather(*(worker(n) for n in range(25)))
    su = await superuser(pg_tls)
    try:
        cur = await su.execute(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a"
            " JOIN pg_stat_ssl s USING (pid) WHERE a.usename = %s",
            [APP_USER],
        )
        count, all_ssl = await cur.fetchone()  # type: ignore[misc]
    finally:
        await su.close()
    assert 1 <= count <= 5
    assert all_ssl is True


async def test_bulk_through_both_legs_tls(
    pgmux_factory: PgmuxFactory, pg_tls: PgCluster, certs: CertFiles
) -> None:
    """TLS from the client to pgmux and from pgmux to PostgreSQL: 20+ MB each way."""
    pgmux = pgmux_factory(
        {**backend(pg_tls, **pgmux_server_tls("require")), **pgmux_client_tls(certs, "require")}
    )
    pg_tls.psql(
        "DROP TABLE IF EXISTS tls_bulk_t; CREATE UNLOGGED TABLE tls_bulk_t (id int, p text);"
        f" ALTER TABLE tls_bulk_t OWNER TO {APP_USER}"
    )
    rows = 21_000
    source = f"SELECT i, repeat(md5(i::text), 32) FROM generate_series(1, {rows}) i"
    try:
        async with await connect_psycopg(pgmux, sslmode="require") as conn:
            assert conn.pgconn.ssl_in_use
            cur = await conn.execute(SSL_STATUS)
            assert (await cur.fetchone())[0] is True  # type: ignore[index]
            received = bytearray()
            async with conn.cursor() as cur:
                async with cur.copy(f"COPY ({source}) TO STDOUT") as copy:
                    async for block in copy:
                        received += block
                assert cur.rowcount == rows
                assert len(received) == sum(len(str(i)) + 1026 for i in range(1, rows + 1))
                assert len(received) > 20 * MB
                async with cur.copy("COPY tls_bulk_t (id, p) FROM STDIN") as copy:
                    for start in range(0, len(received), MB):
                        await copy.write(received[start : start + MB])
                assert cur.rowcount == rows
                await cur.execute(
                    "SELECT md5(string_agg(id || E'\\t' || p || E'\\n', '' ORDER BY id))"
                    " FROM tls_bulk_t"
                )
                row = await cur.fetchone()
                assert row is not None and row[0] == hashlib.md5(received).hexdigest()
        conn2 = await connect_asyncpg(pgmux, ssl=client_ssl_context(None))
        try:
            got = await conn2.fetch("SELECT id, p FROM tls_bulk_t ORDER BY id")
            assert len(got) == rows
            assert sum(len(r["p"]) for r in got) == rows * 1024
        finally:
            await conn2.close()
    finally:
        pg_tls.psql("DROP TABLE IF EXISTS tls_bulk_t")


async def test_slow_reader_both_legs_tls_keeps_rss_bounded(
    pgmux_factory: PgmuxFactory, pg_tls: PgCluster, certs: CertFiles
) -> None:
    """Backpressure through two TLS layers: a client that stops reading a 100 MB result
    makes pgmux stop reading from PostgreSQL instead of buffering the result."""
    pgmux = pgmux_factory(
        {**backend(pg_tls, **pgmux_server_tls("require")), **pgmux_client_tls(certs, "require")}
    )
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        assert await raw.request_tls(client_ssl_context(None)) == b"S"
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        assert (await raw.simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                ).rows == [["t"]]  # fmt: skip
        baseline = vm_rss_kib(pgmux.pid)
        await raw.send(query("SELECT repeat('x', 10000) FROM generate_series(1, 10000)"))
        peak = baseline
        for _ in range(30):  # 3 s of not reading
            await asyncio.sleep(0.1)
            peak = max(peak, vm_rss_kib(pgmux.pid))
        result = await raw.read_result(timeout=60)
        assert len(result.rows) == 10_000
        assert all(row == ["x" * 10000] for row in result.rows)
    grown_mb = (peak - baseline) / 1024
    assert grown_mb < 40, f"pgmux grew {grown_mb:.0f} MB while the client did not read"


async def test_cancel_to_tls_server(pgmux_factory: PgmuxFactory, pg_tls: PgCluster) -> None:
    pgmux = pgmux_factory(backend(pg_tls, **pgmux_server_tls("require")))
    conn = await connect_asyncpg(pgmux)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        assert await conn.fetchval("SELECT 5") == 5
        assert time.monotonic() - started < 5
    finally:
        await conn.close()


async def test_server_terminated_over_tls(pgmux_factory: PgmuxFactory, pg_tls: PgCluster) -> None:
    """The server ends a TLS connection: the client is told, the pool recovers."""
    pgmux = pgmux_factory(backend(pg_tls, **pgmux_server_tls("require"), pool_mode="session"))
    conn = await connect_asyncpg(pgmux)
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        pg_tls.psql(f"SELECT pg_terminate_backend({pid})")
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()
    assert (await ssl_status(pgmux))[0] is True


# -- disable and allow ------------------------------------------------------------------


async def test_disable_against_tls_only_server(
    pgmux_factory: PgmuxFactory, pg_tls: PgCluster
) -> None:
    pgmux = pgmux_factory(backend(pg_tls, **pgmux_server_tls("disable")))
    error = await login_error(pgmux)
    assert error.sqlstate == "28000"
    assert "no encryption" in error.message, error.message
    assert "pg_hba.conf" in error.message
    # The server gives no hint; pgmux should say which of its knobs is the cause.
    assert error.hint is not None and "server_tls_sslmode" in error.hint, error.hint


async def test_allow_retries_with_tls(pgmux_factory: PgmuxFactory, pg_tls: PgCluster) -> None:
    pgmux = pgmux_factory(backend(pg_tls, **pgmux_server_tls("allow")))
    assert (await ssl_status(pgmux))[0] is True  # the very first client is not refused
    pgmux.wait_for_log("retrying with TLS (allow)")
    # Later server connections go straight to TLS.
    conns = [await connect_asyncpg(pgmux) for _ in range(3)]
    try:
        async with contextlib.AsyncExitStack() as stack:
            for c in conns:
                await stack.enter_async_context(c.transaction())
            for c in conns:
                assert (await c.fetchrow(SSL_STATUS))["ssl"] is True  # type: ignore[index]
    finally:
        for c in conns:
            await c.close()
    assert pgmux.log().count("retrying with TLS (allow)") == 1


async def test_allow_against_plain_server_stays_plain(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory(pgmux_server_tls("allow"))
    assert await ssl_status(pgmux) == (False, None)
    assert "retrying with TLS" not in pgmux.log()


async def test_require_against_plain_server(pgmux_factory: PgmuxFactory, pg: PgCluster) -> None:
    pgmux = pgmux_factory(pgmux_server_tls("require"))
    error = await login_error(pgmux)
    assert "does not accept TLS" in error.message, error.message
    assert "server_tls_sslmode = require" in error.message
    assert error.hint is not None and "ssl" in error.hint


# -- verifying the server -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "host"),
    [("verify-ca", SERVER_IP), ("verify-full", SERVER_IP), ("verify-full", SERVER_HOSTNAME)],
)
async def test_verify_server(
    pgmux_factory: PgmuxFactory, pg_tls: PgCluster, certs: CertFiles, mode: str, host: str
) -> None:
    pgmux = pgmux_factory(backend(pg_tls, host, **pgmux_server_tls(mode, ca=certs.ca_cert)))
    ssl_on, _ = await ssl_status(pgmux)
    assert ssl_on is True


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
async def test_verify_server_other_ca_fails(
    pgmux_factory: PgmuxFactory, pg_tls: PgCluster, certs: CertFiles, mode: str
) -> None:
    pgmux = pgmux_factory(backend(pg_tls, **pgmux_server_tls(mode, ca=certs.other_ca_cert)))
    error = await login_error(pgmux)
    assert error.sqlstate == "08001"
    assert "TLS handshake" in error.message, error.message
    assert "certificate verify failed" in error.message
    assert f"{SERVER_IP}:{pg_tls.port}" in error.message
    assert error.hint is not None and "server_tls_ca_file" in error.hint
    # It is not a login failure that blocks retries: a fixed config is not needed to see
    # the same message again, and pgmux keeps running.
    again = await login_error(pgmux)
    assert "TLS handshake" in again.message
    assert pgmux.running


@pytest.fixture(scope="module")
def pg_wrong_host(certs: CertFiles) -> Iterator[PgCluster]:
    """A TLS-only cluster presenting the certificate for db.example.invalid."""
    cluster = PgCluster.create(tls=certs.serving(certs.wrong_host), hba=TLS_ONLY_HBA)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.mark.parametrize("host", [SERVER_IP, SERVER_HOSTNAME])
async def test_verify_full_wrong_host(
    pgmux_factory: PgmuxFactory, pg_wrong_host: PgCluster, certs: CertFiles, host: str
) -> None:
    pgmux = pgmux_factory(
        backend(pg_wrong_host, host, **pgmux_server_tls("verify-full", ca=certs.ca_cert))
    )
    error = await login_error(pgmux)
    assert error.sqlstate == "08001"
    assert "TLS handshake" in error.message, error.message
    assert host in error.message
    assert "mismatch" in error.message or "match" in error.message, error.message
    assert error.hint is not None and f"must name {host}" in error.hint, error.hint


async def test_verify_ca_wrong_host_is_fine(
    pgmux_factory: PgmuxFactory, pg_wrong_host: PgCluster, certs: CertFiles
) -> None:
    pgmux = pgmux_factory(backend(pg_wrong_host, **pgmux_server_tls("verify-ca", ca=certs.ca_cert)))
    assert (await ssl_status(pgmux))[0] is True


# -- pgmux's own client certificate ------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_cert_auth(certs: CertFiles) -> Iterator[PgCluster]:
    """A cluster where TCP logins are by client certificate alone."""
    hba = "local all all trust\nhostssl all all 127.0.0.1/32 cert\n"
    cluster = PgCluster.create(tls=certs, hba=hba)
    try:
        yield cluster
    finally:
        cluster.destroy()


async def test_server_cert_auth(
    pgmux_factory: PgmuxFactory, pg_cert_auth: PgCluster, certs: CertFiles
) -> None:
    """server_tls_cert_file/key_file: PostgreSQL's cert method lets pgmux in with no
    password (the [users] password here is only the client's, and not the role's)."""
    tls = pgmux_server_tls("verify-full", ca=certs.ca_cert, client=certs.client_app)
    pgmux = pgmux_factory(
        backend(pg_cert_auth, **tls, users={APP_USER: {"password": "only-for-pgmux"}})
    )
    conn = await connect_asyncpg(pgmux, password="only-for-pgmux")
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
        row = await conn.fetchrow(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        assert row is not None and tuple(row) == (True, "/O=pgmux tests/CN=app")
    finally:
        await conn.close()


async def test_server_cert_auth_without_certificate(
    pgmux_factory: PgmuxFactory, pg_cert_auth: PgCluster, certs: CertFiles
) -> None:
    pgmux = pgmux_factory(backend(pg_cert_auth, **pgmux_server_tls("require")))
    error = await login_error(pgmux)
    assert error.sqlstate == "28000"
    assert "certificate" in error.message, error.message


# -- servers that answer SSLRequest badly -------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[int]:
    """A one-trick TCP server on 127.0.0.1 in this process; yields its port. On exit its
    connections are closed and their handlers awaited."""
    tasks: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, SERVER_IP, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Read and ignore everything until pgmux (or the test's end) closes the connection."""
    while await reader.read(65536):
        pass


def answer(reply: bytes) -> Handler:
    """Read the 8-byte SSLRequest, send ``reply``, then wait for the close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readexactly(8)
        assert request == b"\x00\x00\x00\x08\x04\xd2\x16\x2f", request
        if reply == b"close":
            return
        writer.write(reply)
        await writer.drain()
        await until_closed(reader)

    return handler


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"S" + b"\x00\x00\x00\x08\x00\x03\x00\x00", "unencrypted data"),
        (b"S\x15\x03\x03\x00\x02\x02\x28", "unencrypted data"),  # an alert, in the clear
        (b"X", "not S or N"),
        (b"N", "does not accept TLS"),
        (b"close", "closed the connection"),
        (b"S", "within 1 s"),  # says S, then never speaks TLS: server_connect_timeout
    ],
    ids=["S-and-data", "S-and-alert", "X", "N", "close", "S-then-silence"],
)
async def test_bad_ssl_answers(pgmux_factory: PgmuxFactory, reply: bytes, message: str) -> None:
    async with fake_server(answer(reply)) as port:
        pgmux = pgmux_factory(
            {
                "databases": {APP_DB: {"host": SERVER_IP, "port": port}},
                "server_tls_sslmode": "require",
                "server_connect_timeout": 1,
                "query_wait_timeout": 5,
            }
        )
        started = time.monotonic()
        error = await login_error(pgmux)
        assert message in error.message, error.message
        assert time.monotonic() - started < 4
        assert pgmux.running


async def test_garbage_tls_from_server(pgmux_factory: PgmuxFactory) -> None:
    """The server says S, then sends something that is not a TLS ServerHello."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)
        writer.write(b"S")
        await writer.drain()
        await reader.read(1)  # the ClientHello
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 8)
        await writer.drain()
        await until_closed(reader)

    async with fake_server(handler) as port:
        pgmux = pgmux_factory(
            {
                "databases": {APP_DB: {"host": SERVER_IP, "port": port}},
                "server_tls_sslmode": "prefer",
                "server_connect_timeout": 10,
            }
        )
        started = time.monotonic()
        error = await login_error(pgmux)
        assert error.sqlstate == "08001"
        assert "TLS handshake" in error.message, error.message
        assert time.monotonic() - started < 5


async def test_verify_full_on_both_legs(
    pgmux_factory: PgmuxFactory, pg_tls: PgCluster, certs: CertFiles
) -> None:
    """Both legs verify-full: a libpq client checks pgmux, pgmux checks PostgreSQL."""
    pgmux = pgmux_factory(
        {
            **backend(pg_tls, SERVER_HOSTNAME, **pgmux_server_tls("verify-full", ca=certs.ca_cert)),
            **pgmux_client_tls(certs, "verify-full", ca=certs.ca_cert),
        }
    )
    info = make_conninfo(
        host=SERVER_HOSTNAME, hostaddr=SERVER_IP, port=pgmux.port, user=APP_USER,
        password=APP_PASSWORD, dbname=APP_DB, sslmode="verify-full",
        sslrootcert=str(certs.ca_cert), sslcert=str(certs.client_app_cert),
        sslkey=str(certs.client_app_key), channel_binding="require", connect_timeout=15,
    )  # fmt: skip
    with psycopg.connect(info, autocommit=True, prepare_threshold=None) as conn:
        assert conn.pgconn.ssl_in_use
        row = conn.execute(SSL_STATUS).fetchone()
        assert row is not None and row[0] is True
