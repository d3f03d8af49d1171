"""Message types beyond queries: notices, notifications, FunctionCall, ParameterStatus."""

from __future__ import annotations

import asyncio
import struct

from support.helpers import connect_asyncpg, connect_psycopg
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER
from support.pgmux import PgmuxFactory, PgmuxProcess
from support.wire import RawClient, message, parse_fields

PG_BACKEND_PID_OID = 2026  # pg_catalog.pg_backend_pid()
INT4PL_OID = 177  # pg_catalog.int4pl(int4, int4)


async def test_notice_reaches_the_client(pgmux: PgmuxProcess) -> None:
    conn = await connect_psycopg(pgmux)
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(str(diag.message_primary)))
    try:
        await conn.execute("DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$")
        await conn.execute("SELECT 1")
    finally:
        await conn.close()
    assert notices == ["hello from plpgsql"]


async def test_notifications_in_session_mode(pgmux_factory: PgmuxFactory) -> None:
    proxy = pgmux_factory({"pool_mode": "session"})
    listener = await connect_asyncpg(proxy)
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("pgmux_channel", lambda *args: received.put_nowait(args[3]))
    sender = await connect_asyncpg(proxy)
    try:
        await sender.execute("NOTIFY pgmux_channel, 'payload-1'")
        await sender.execute("SELECT pg_notify('pgmux_channel', 'payload-2')")
        got = [await asyncio.wait_for(received.get(), 5) for _ in range(2)]
    finally:
        await sender.close()
        await listener.close()
    assert got == ["payload-1", "payload-2"]


async def test_notify_to_self_within_a_transaction(pgmux: PgmuxProcess) -> None:
    """Transaction mode: LISTEN, NOTIFY and COMMIT in one transaction deliver to itself."""
    async with await RawClient.open(pgmux.host, pgmux.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        await client.send(message(b"Q", b"BEGIN; LISTEN ch_self; NOTIFY ch_self, 'me'; COMMIT\0"))
        messages = await client.read_until(b"Z")
    notifications = [body for typ, body in messages if typ == b"A"]
    assert len(notifications) == 1
    assert notifications[0][4:].split(b"\0")[:2] == [b"ch_self", b"me"]


def function_call(oid: int, args: list[int]) -> bytes:
    body = struct.pack("!IHH", oid, 1, 1) + struct.pack("!H", len(args))
    for arg in args:
        body += struct.pack("!II", 4, arg)
    return message(b"F", body + struct.pack("!H", 1))


async def test_function_call(pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(pgmux.host, pgmux.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        await client.send(function_call(INT4PL_OID, [40, 2]))
        replies = await client.read_until(b"Z")
        assert [typ for typ, _ in replies] == [b"V", b"Z"]
        length, value = struct.unpack("!iI", replies[0][1])
        assert (length, value) == (4, 42)
        # The server went back to the pool: a following query works normally.
        result = await client.simple_query("SELECT 1")
        assert result.rows == [["1"]] and result.status == "I"


async def test_function_call_error_keeps_session(pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(pgmux.host, pgmux.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        await client.send(function_call(4294967295, []))
        replies = await client.read_until(b"Z")
        errors = [parse_fields(body) for typ, body in replies if typ == b"E"]
        assert errors and errors[0]["C"] == "42883"  # undefined_function
        result = await client.simple_query("SELECT 2")
        assert result.rows == [["2"]]


async def test_parameter_status_forwarded_on_set(pgmux: PgmuxProcess) -> None:
    """A client's SET of a reported parameter reaches it as ParameterStatus."""
    async with await RawClient.open(pgmux.host, pgmux.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)
        assert client.params["TimeZone"]
        await client.send(message(b"Q", b"SET TimeZone = 'Asia/Tokyo'\0"))
        replies = await client.read_until(b"Z")
        statuses = [body.split(b"\0")[:2] for typ, body in replies if typ == b"S"]
        assert [b"TimeZone", b"Asia/Tokyo"] in statuses
        result = await client.simple_query("SHOW TimeZone")
        assert result.rows == [["Asia/Tokyo"]]
