"""server_check_query in the pool: which idle servers are checked before a client gets
one, who waits meanwhile, and what a passed or failed check hands on.

The pool is driven with stand-in connections: a server records the checks it is asked
to run, and a client the server it is given.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from proxy.config import parse_config
from proxy.errors import ProxyError
from proxy.pool import NO_SETTINGS, ClientState, Pool, PoolSettings, ServerState


class Server:
    def __init__(self, pool: Pool, idle_since: float) -> None:
        self.pool = pool
        self.state = ServerState.IDLE
        self.settings = NO_SETTINGS
        self.created_at = idle_since
        self.retire_at = math.inf
        self.idle_since = idle_since
        self.generation = pool.generation
        self.checks: list[tuple[str, float]] = []
        self.closed_because = ""

    def close(self, reason: str) -> None:
        if self.state is not ServerState.CLOSED:
            self.closed_because = reason
            self.pool.server_closed(self)

    def reset_settings(self) -> None:
        raise AssertionError("not in these tests")

    def check(self, query: str, timeout: float) -> None:
        self.checks.append((query, timeout))


class Client:
    def __init__(self) -> None:
        self.state = ClientState.IDLE
        self.wait_started = 0.0
        self.server: Any = None

    def assign_server(self, server: Any) -> None:
        self.server = server

    def fail_wait(self, error: ProxyError) -> None:
        raise AssertionError(f"no client should fail: {error.message}")

    wait_expired = fail_wait


def make_pool(size: int = 3, **settings: Any) -> tuple[Pool, list[int]]:
    """A pool over ``settings``; the list counts the servers it asked to open."""
    config = parse_config({"databases": {"app": {}}, **settings})
    opened: list[int] = []
    pool_settings = PoolSettings(
        database=config.databases["app"],
        user="app",
        server_user="app",
        pool_mode="transaction",
        pool_size=size,
        min_pool_size=0,
    )
    return Pool(pool_settings, config, lambda pool: opened.append(1)), opened


def add_idle(pool: Pool, idle_for: float) -> Server:
    """An idle server that went idle ``idle_for`` seconds ago (the newest at the right)."""
    server = Server(pool, time.monotonic() - idle_for)
    pool.servers.add(server)
    pool.idle.append(server)
    return server


def test_a_server_idle_less_than_the_delay_is_handed_out_unchecked() -> None:
    pool, opened = make_pool(server_check_delay=30)
    server = add_idle(pool, 5)
    client = Client()
    assert pool.acquire(client) is server
    assert (server.state, client.state, server.checks) == (
        ServerState.ACTIVE,
        ClientState.ACTIVE,
        [],
    )
    assert not opened


def test_a_server_due_is_checked_while_the_client_waits_then_handed_over() -> None:
    pool, opened = make_pool(server_check_delay=30, server_connect_timeout=4)
    server = add_idle(pool, 40)
    client = Client()
    assert pool.acquire(client) is None
    assert client.state is ClientState.WAITING and pool.n_waiting == 1
    assert server.state is ServerState.TESTED and pool.testing == 1
    assert server.checks == [("", 4.0)]  # "<empty>": an empty query, bounded at 4 s
    assert not opened  # the check is what the client waits for
    pool.check_passed(server)
    assert client.server is server and client.state is ClientState.ACTIVE
    assert (server.state, pool.testing, pool.n_waiting) == (ServerState.ACTIVE, 0, 0)


def test_a_failed_check_closes_the_server_and_opens_another_for_the_client() -> None:
    pool, opened = make_pool(size=2, server_check_query="SELECT 1")
    dead = add_idle(pool, 40)
    spare = add_idle(pool, 35)
    client = Client()
    assert pool.acquire(client) is None
    assert spare.checks == [("SELECT 1", 15.0)]  # LIFO: the most recently used first
    spare.close("server_check_query failed: ERROR 22012: division by zero")
    assert pool.testing == 0 and spare not in pool.servers
    assert opened == [1]  # a new connection, not a check of the next idle one
    assert dead.checks == [] and client.state is ClientState.WAITING


def test_a_burst_checks_one_idle_server_per_waiting_client() -> None:
    pool, opened = make_pool(size=3)
    servers = [add_idle(pool, 60 - n) for n in range(2)]
    clients = [Client() for _ in range(3)]
    for client in clients:
        assert pool.acquire(client) is None
    assert [len(s.checks) for s in servers] == [1, 1] and pool.testing == 2
    assert opened == [1]  # only the third client needs a new server
    for server in reversed(servers):
        pool.check_passed(server)
    assert [c.server for c in clients[:2]] == [servers[1], servers[0]]  # first come first


def test_a_client_that_left_during_the_check_leaves_the_server_idle_and_fresh() -> None:
    pool, _ = make_pool()
    server = add_idle(pool, 40)
    client = Client()
    pool.acquire(client)
    pool.leave_queue(client)
    pool.check_passed(server)
    assert server.state is ServerState.IDLE and list(pool.idle) == [server]
    assert server.idle_since >= pool.check_before  # just checked: not due again
    assert pool.acquire(Client()) is server


@pytest.mark.parametrize(
    ("settings", "check_before"),
    [
        ({"server_check_query": ""}, -math.inf),  # empty: no checks, as in PgBouncer
        ({"server_check_delay": 0}, math.inf),  # 0: every time
    ],
)
def test_empty_query_turns_checks_off_and_delay_0_checks_every_time(
    settings: dict[str, Any], check_before: float
) -> None:
    pool, _ = make_pool(**settings)
    assert pool.check_before == check_before
    server = add_idle(pool, 0.001 if check_before > 0 else 10_000)
    got = pool.acquire(Client())
    assert (got is None) == (check_before > 0)
    assert len(server.checks) == (1 if check_before > 0 else 0)


def test_delay_0_still_hands_a_released_server_straight_to_a_waiter_unchecked() -> None:
    pool, _ = make_pool(size=1, server_check_delay=0)
    server = Server(pool, time.monotonic())
    server.state = ServerState.ACTIVE
    pool.servers.add(server)
    waiter = Client()
    pool.acquire(waiter)  # no idle server: queued
    pool.release(server)
    assert waiter.server is server and server.checks == []


def test_round_robin_prefers_a_server_that_needs_no_check() -> None:
    pool, _ = make_pool(server_round_robin=True)
    old = add_idle(pool, 40)
    recent = add_idle(pool, 1)
    assert pool.acquire(Client()) is recent
    assert list(pool.idle) == [old] and old.checks == []


def test_the_janitor_moves_check_before_and_a_reload_applies_new_values() -> None:
    pool, _ = make_pool(server_check_delay=30)
    pool.update_check_before(1000.0)
    assert pool.check_before == 970.0
    config = parse_config({"databases": {"app": {}}, "server_check_delay": 5})
    pool.reconfigure(pool.settings, config, new_servers=False)
    pool.update_check_before(1000.0)
    assert pool.check_before == 995.0
