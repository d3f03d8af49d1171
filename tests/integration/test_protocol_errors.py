"""Malformed and unusual protocol traffic, byte by byte over raw sockets."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import psycopg
import pytest
from support.helpers import app_backends, connect_asyncpg, run_psql, superuser, wait_until
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster
from support.pgmux import PgmuxFactory, PgmuxProcess
from support.wire import (
    RawClient,
    gssenc_request,
    message,
    parse_fields,
    query,
    ssl_request,
    startup_packet,
)

STARTUP = {"user": APP_USER, "database": APP_DB}


async def _still_serves(pgmux: PgmuxProcess) -> None:
    assert pgmux.running
    conn = await connect_asyncpg(pgmux)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 5) == 1
    finally:
        await conn.close()


def _errors_in(data: bytes) -> list[dict[str, str]]:
    """The ErrorResponses in a byte stream of whole backend messages."""
    errors = []
    pos = 0
    while pos + 5 <= len(data):
        typ = data[pos : pos + 1]
        (length,) = struct.unpack_from("!I", data, pos + 1)
        if typ == b"E":
            errors.append(parse_fields(data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return errors


# -- before login ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        b"\x00\x00\x00\x04",  # shorter than any startup packet
        b"\x00\x00\x00\x10\x12\x34\x56\x78garbage!",  # unknown protocol code 0x1234
        b"\x00\x00\x00\x0c\x00\x03\x00\x00user",  # params without terminator
    ],
    ids=["http", "too-short", "bad-version", "no-terminator"],
)
async def test_garbage_instead_of_startup(pgmux: PgmuxProcess, garbage: bytes) -> None:
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        await raw.send(garbage)
        data = await raw.read_until_eof(5)
    for error in _errors_in(data):
        assert error["C"] in ("08P01", "0A000"), error
    await _still_serves(pgmux)


async def test_startup_packet_too_long(pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        await raw.send(struct.pack("!II", 100000, 3 << 16) + b"user\x00app\x00" + b"x" * 2000)
        data = await raw.read_until_eof(5)
    errors = _errors_in(data)
    assert errors == [] or errors[0]["C"] == "08P01", errors
    await _still_serves(pgmux)


async def test_ssl_request_then_plain_startup(pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        await raw.send(ssl_request())
        assert await raw.read_exactly(1) == b"N"
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        result = await raw.simple_query("SELECT 'plain'")
        assert result.rows == [["plain"]] and result.status == "I"


async def test_gssenc_request_then_plain_startup(pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        await raw.send(gssenc_request())
        assert await raw.read_exactly(1) == b"N"
        await raw.send(ssl_request())
        assert await raw.read_exactly(1) == b"N"
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        result = await raw.simple_query("SELECT 1")
        assert result.rows == [["1"]]


def test_psql_sslmode_prefer_and_require(pgmux: PgmuxProcess) -> None:
    proc = run_psql(pgmux, "-c", "SELECT 'prefer ok'", sslmode="prefer")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "prefer ok"
    proc = run_psql(pgmux, "-c", "SELECT 1", sslmode="require")
    assert proc.returncode == 2, proc.stderr
    assert "SSL" in proc.stderr, proc.stderr
    assert pgmux.running


async def test_psycopg_sslmode_prefer(pgmux: PgmuxProcess) -> None:
    async with await connect_psycopg_prefer(pgmux) as conn:
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def connect_psycopg_prefer(pgmux: PgmuxProcess) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        pgmux.conninfo(sslmode="prefer", gssencmode="prefer"),
        autocommit=True,
        prepare_threshold=None,
    )


async def test_protocol_3_1_negotiation(pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        await raw.send(startup_packet({**STARTUP, "_pq_.frobnicate": "on"}, 3, 1))
        typ, body = await raw.read_message()
        assert typ == b"v", (typ, body)
        newest_minor, count = struct.unpack_from("!II", body)
        assert newest_minor == 0
        assert count == 1 and body[8:] == b"_pq_.frobnicate\x00"
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, send_startup=False)
        result = await raw.simple_query("SELECT 'negotiated'")
        assert result.rows == [["negotiated"]]


async def test_protocol_3_1_without_options(pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        await raw.send(startup_packet(STARTUP, 3, 1))
        typ, body = await raw.read_message()
        assert typ == b"v"
        assert struct.unpack_from("!II", body) == (0, 0)
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, send_startup=False)


async def test_protocol_2_refused(pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        await raw.send(startup_packet(STARTUP, 2, 0))
        data = await raw.read_until_eof(5)
    errors = _errors_in(data)
    assert len(errors) == 1 and errors[0]["C"] == "0A000", data
    await _still_serves(pgmux)


# -- after login -------------------------------------------------------------------------


async def _logged_in(pgmux: PgmuxProcess) -> RawClient:
    raw = await RawClient.open(pgmux.host, pgmux.port)
    await raw.login(APP_USER, APP_PASSWORD, APP_DB)
    return raw


@pytest.mark.parametrize(
    "bad",
    [
        b"Q\x00\x00\x00\x02",  # length smaller than the length word
        b"Q\xff\xff\xff\xff" + b"x" * 20,  # absurd length
        message(b"\x01", b""),  # unknown type
        message(b"z", b"hello"),  # unknown type
        message(b"p", b"secret\x00"),  # password message after login
    ],
    ids=["length-2", "length-huge", "type-0x01", "type-z", "password-after-login"],
)
@pytest.mark.parametrize("in_transaction", [False, True], ids=["idle", "in-transaction"])
async def test_invalid_message_after_login(
    pg: PgCluster, pgmux: PgmuxProcess, bad: bytes, in_transaction: bool
) -> None:
    async with await _logged_in(pgmux) as raw:
        if in_transaction:
            assert (await raw.simple_query("BEGIN")).status == "T"
        await raw.send(bad)
        data = await raw.read_until_eof(5)
    errors = _errors_in(data)
    assert len(errors) == 1 and errors[0]["C"] == "08P01", data
    await _still_serves(pgmux)
    su = await superuser(pg)
    try:
        await wait_until(
            lambda: _no_transaction(su), 3, what="no transaction left open by the bad client"
        )
    finally:
        await su.close()


async def _no_transaction(su: psycopg.AsyncConnection[Any]) -> bool:
    return not any(xact for _, _, xact, _ in await app_backends(su))


@pytest.mark.parametrize("in_transaction", [False, True], ids=["first-message", "in-transaction"])
async def test_partial_message_then_disconnect(
    pgmux_factory: PgmuxFactory, in_transaction: bool
) -> None:
    """The client sends half a message and leaves while holding the pool's only server."""
    pgmux = pgmux_factory({"default_pool_size": 1})
    async with await _logged_in(pgmux) as raw:
        if in_transaction:
            assert (await raw.simple_query("BEGIN")).status == "T"
        whole = query("SELECT 'this message never ends'")
        await raw.send(whole[:12])
        await asyncio.sleep(0.3)  # pgmux forwards what it got
    started = time.monotonic()
    conn = await connect_asyncpg(pgmux)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 8) == 1
    finally:
        await conn.close()
    took = time.monotonic() - started
    assert took < 3, f"next client served after {took:.1f} s"


async def test_query_then_terminate_in_one_packet(pg: PgCluster, pgmux: PgmuxProcess) -> None:
    """Query + Terminate sent together: as with PostgreSQL itself, the query runs to the
    end and is answered before the connection closes; Terminate never reaches a pooled
    server."""
    pg.psql(
        "DROP TABLE IF EXISTS term_t; CREATE TABLE term_t (x int);"
        f" ALTER TABLE term_t OWNER TO {APP_USER}"
    )
    async with await _logged_in(pgmux) as raw:
        await raw.send(query("INSERT INTO term_t SELECT 1 FROM pg_sleep(0.5)") + message(b"X"))
        data = await raw.read_until_eof(5)
    await asyncio.sleep(1)
    rows = pg.psql("SELECT count(*) FROM term_t")
    assert (rows, data) == ("1", b"C\x00\x00\x00\x0fINSERT 0 1\x00Z\x00\x00\x00\x05I")
    await _still_serves(pgmux)


# -- login timeout -----------------------------------------------------------------------


async def test_client_login_timeout_silent_client(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"client_login_timeout": 1})
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        started = time.monotonic()
        await raw.read_until_eof(5)
        took = time.monotonic() - started
    assert 0.8 <= took < 2.5, f"closed after {took:.2f} s"
    await _still_serves(pgmux)


async def test_client_login_timeout_at_password_step(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"client_login_timeout": 1})
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        started = time.monotonic()
        await raw.send(startup_packet(STARTUP))
        typ, _ = await raw.read_message()
        assert typ == b"R"  # AuthenticationSASL; we never answer
        data = await raw.read_until_eof(5)
        took = time.monotonic() - started
    errors = _errors_in(data)
    assert len(errors) == 1 and errors[0]["C"] == "57014", data
    assert "client_login_timeout" in errors[0]["M"]
    assert 0.8 <= took < 2.5, f"closed after {took:.2f} s"
    await _still_serves(pgmux)


async def test_client_login_timeout_half_startup_packet(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"client_login_timeout": 1})
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        started = time.monotonic()
        await raw.send(startup_packet(STARTUP)[:10])
        await raw.read_until_eof(5)
        took = time.monotonic() - started
    assert 0.8 <= took < 2.5, f"closed after {took:.2f} s"
