"""Python CPU per relayed transaction, without sockets: a noise-free view of the relay.

Drives pgmux's real ClientConnection / ServerConnection / Pool objects through whole
transactions (the bytes pgbench -S sends, the bytes PostgreSQL answers) with in-memory
transports whose write() only counts. What it measures is exactly the Python work per
transaction that the kernel and the event loop do not account for; ``bench/run.py``
measures the whole thing. Use it to compare two versions of the relay:

    .venv/bin/python bench/relay_cpu.py            # all modes, best of 5
    .venv/bin/python bench/relay_cpu.py --mode simple --profile   # cProfile top frames
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.auth.scram import ScramClientSession
from proxy.client import ClientConnection
from proxy.config import parse_config
from proxy.hosts import HostList
from proxy.pool import ClientState, Registry
from proxy.protocol import messages
from proxy.protocol.stream import TRACKED_FRONTEND
from proxy.server import ServerConnection

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = 4242;"


class NullTransport:
    """Enough of an asyncio.Transport for the relay; write() only counts bytes (and
    keeps the last write, for the login dialogue)."""

    def __init__(self) -> None:
        self.written = 0
        self.last = b""

    def write(self, data: Any) -> None:
        self.written += len(data)
        self.last = data

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def _backend(typ: bytes, body: bytes) -> bytes:
    return typ + (len(body) + 4).to_bytes(4, "big") + body


def _row_description() -> bytes:
    field = b"abalance\x00" + (0).to_bytes(4, "big") + (0).to_bytes(2, "big")
    field += (23).to_bytes(4, "big") + (4).to_bytes(2, "big", signed=True)
    field += (-1).to_bytes(4, "big", signed=True) + (0).to_bytes(2, "big")
    return _backend(b"T", (1).to_bytes(2, "big") + field)


def _data_row() -> bytes:
    return _backend(b"D", (1).to_bytes(2, "big") + (1).to_bytes(4, "big") + b"0")


READY = _backend(b"Z", b"I")
SELECT_1 = _backend(b"C", b"SELECT 1\x00")


def transaction_bytes(mode: str) -> tuple[bytes, bytes]:
    """(what the client sends, what the server answers) for one pgbench -S transaction."""
    if mode == "simple":
        return messages.query(SQL), _row_description() + _data_row() + SELECT_1 + READY
    sql = SQL.replace("4242", "$1")
    execute = messages.bind("", "", ["4242"]) + messages.execute() + messages.SYNC
    bind_reply = _backend(b"2", b"") + _data_row() + SELECT_1 + READY
    assert mode == "extended", mode
    return messages.parse("", sql) + execute, _backend(b"1", b"") + bind_reply


def build(mode: str, clients: int) -> tuple[list[ClientConnection], ServerConnection]:
    config = parse_config(
        {
            "default_pool_size": 1,
            "databases": {"app": {"host": "127.0.0.1", "port": 5432}},
            "users": {"app": {"password": "secret"}},
        }
    )
    loop = asyncio.new_event_loop()
    registry = Registry(config, loop)
    database = config.databases["app"]
    pool = registry.pool_for(database, "app", None)
    pool.params = {"server_version": "15.0"}
    walk = HostList(database.hosts, "disable", "any").walk(0.0, 0.0)
    attempt = walk.next(0.0)
    assert attempt is not None
    server = ServerConnection(registry, pool, walk, attempt)
    server.transport = NullTransport()  # type: ignore[assignment]
    pool.server_connected(server)
    pool.server_logged_in(server)
    result = []
    for _ in range(clients):
        client = ClientConnection(registry)
        client.transport = NullTransport()  # type: ignore[assignment]
        client.pool = pool
        client.stats = pool.stats  # as start_session() sets them
        client.login = None
        client.welcomed = True
        client.state = ClientState.IDLE
        client.settings = pool.intern(())
        client.fe.interesting = TRACKED_FRONTEND  # as start_session() sets it
        registry.clients.add(client)
        result.append(client)
    return result, server


def run(mode: str, transactions: int, clients: int = 1) -> float:
    """Seconds of Python per transaction (wall clock of a CPU-only loop)."""
    conns, server = build(mode, clients)
    if mode == "prepared":
        # Each client prepares once (as pgbench -M prepared does), then binds by name.
        first = messages.parse("P_0", SQL.replace("4242", "$1")) + messages.SYNC
        for client in conns:
            client.data_received(first)
            server.data_received(_backend(b"1", b"") + READY)
        request = messages.bind("", "P_0", ["4242"]) + messages.execute() + messages.SYNC
        reply = _backend(b"2", b"") + _data_row() + SELECT_1 + READY
    else:
        request, reply = transaction_bytes(mode)  # simple or extended
    n = len(conns)
    start = time.perf_counter()
    for i in range(transactions):
        client = conns[i % n]
        client.data_received(request)
        if server.client is not client:
            raise RuntimeError(f"server not linked to the client at transaction {i}")
        server.data_received(reply)
    elapsed = time.perf_counter() - start
    if server.client is not None:
        raise RuntimeError("server still linked after the last transaction")
    return elapsed / transactions


def _sasl_data(reply: bytes) -> bytes:
    """The SCRAM payload of an AuthenticationSASLContinue/Final ('R', code 11/12)."""
    return bytes(reply[9:])


def run_logins(logins: int) -> float:
    """Seconds per SCRAM login answered by pgmux (startup to ReadyForQuery, then a
    Terminate), minus the client side's own SCRAM work measured separately."""
    (client,), _server = build("simple", 1)
    registry = client.registry
    registry.clients.discard(client)
    startup = messages.startup_message({"user": "app", "database": "app"})
    cache: dict[tuple[bytes, bytes, int], bytes] = {}

    def client_first() -> tuple[ScramClientSession, bytes]:
        scram = ScramClientSession("secret", salted_password_cache=cache)
        return scram, messages.sasl_initial_response("SCRAM-SHA-256", scram.client_first())

    def client_final(scram: ScramClientSession, server_first: bytes) -> bytes:
        return messages.sasl_response(scram.handle_server_first(_sasl_data(server_first)))

    start = time.perf_counter()
    client_cost = 0.0
    server_firsts = []
    for _ in range(logins):
        transport = NullTransport()
        conn = ClientConnection(registry)
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(startup)
        mark = time.perf_counter()
        scram, first = client_first()
        client_cost += time.perf_counter() - mark
        conn.data_received(first)
        mark = time.perf_counter()
        final = client_final(scram, transport.last)
        client_cost += time.perf_counter() - mark
        server_firsts.append(transport.last)
        conn.data_received(final)
        if conn.state is not ClientState.IDLE:
            raise RuntimeError(f"login did not complete: {conn.state}")
        conn.data_received(messages.TERMINATE)
        conn.connection_lost(None)
    elapsed = time.perf_counter() - start
    return (elapsed - client_cost) / logins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=("simple", "extended", "prepared", "login", "all"), default="all"
    )
    parser.add_argument("--transactions", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one run")
    parser.add_argument(
        "--profile-sort", default="tottime", help="pstats order: tottime, cumulative, ..."
    )
    args = parser.parse_args()
    modes = ("simple", "extended", "prepared", "login") if args.mode == "all" else (args.mode,)
    for mode in modes:
        count = args.transactions if mode != "login" else args.transactions // 20

        def once(mode: str = mode, count: int = count) -> float:
            return run_logins(count) if mode == "login" else run(mode, count)

        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            once()
            profiler.disable()
            pstats.Stats(profiler).sort_stats(args.profile_sort).print_stats(20)
            continue
        best = min(once() for _ in range(args.repeat))
        what = "SCRAM login" if mode == "login" else "transaction"
        print(f"{mode:9} {best * 1e6:7.2f} µs Python per {what} (best of {args.repeat})")


if __name__ == "__main__":
    main()
