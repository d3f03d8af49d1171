"""The pool's moves under shared limits, the reserve pool and server_round_robin, with
stand-in connections: which server goes where, and when one is opened or closed.

The integration tests (tests/integration/test_limits.py) show the same through
PostgreSQL; these pin down the exact steps, which timing there cannot.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.config import Config, DatabaseConfig, UserConfig
from proxy.pool import NO_SETTINGS, ClientState, Pool, Registry, ServerState, Settings

_ids = itertools.count(1)


class Server:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.id = next(_ids)
        self.state = ServerState.CONNECTING
        self.settings: Settings = NO_SETTINGS
        self.created_at = self.idle_since = time.monotonic()
        self.retire_at = float("inf")
        self.generation = pool.generation
        self.closed_because = ""
        self.client: Client | None = None

    def close(self, reason: str) -> None:
        if self.state is ServerState.CLOSED:
            return
        self.closed_because = reason
        self.pool.server_closed(self)

    def reset_settings(self) -> None:
        pass

    def check(self, query: str, timeout: float) -> None:
        raise AssertionError("no server_check_query here: servers are fresh")

    def __repr__(self) -> str:
        return f"S{self.id}"


class Client:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.state = ClientState.IDLE
        self.wait_started = 0.0
        self.server: Server | None = None
        self.error: Any = None

    def assign_server(self, server: Server) -> None:
        self.server = server
        server.client = self

    def fail_wait(self, error: Any) -> None:
        self.error = error

    def wait_expired(self, error: Any) -> None:
        self.error = error

    def request(self) -> None:
        server = self.pool.acquire(self)
        if server is not None:
            self.assign_server(server)  # type: ignore[arg-type]

    def done(self) -> None:
        """The transaction ends: the server goes back."""
        server = self.server
        assert server is not None
        self.server = None
        server.client = None
        self.state = ClientState.IDLE
        self.pool.release(server)


class World:
    """A Registry whose server connects are completed by the test."""

    def __init__(self, config: Config) -> None:
        self.loop = asyncio.new_event_loop()
        self.registry = Registry(config, self.loop)
        self.opening: list[Pool] = []
        self.made: list[Server] = []
        self.registry.open_server = self.opening.append

    def pool(self, database: str, user: str) -> Pool:
        return self.registry.pool_for(self.registry.config.databases[database], user, None)

    def connect_all(self) -> list[Server]:
        """Every connect in progress succeeds (servers log in and are handed out)."""
        made = []
        while self.opening:
            pool = self.opening.pop(0)
            server = Server(pool)
            pool.server_connected(server)
            pool.learn_params({"server_version": "15"})
            pool.server_logged_in(server)
            made.append(server)
        self.made += made
        return made


@pytest.fixture
def world_factory() -> Iterator[Any]:
    worlds: list[World] = []

    def make(**settings: Any) -> World:
        databases = settings.pop("databases", {"app": DatabaseConfig(name="app", dbname="app")})
        users = settings.pop("users", {})
        world = World(Config(databases=databases, users=users, **settings))
        worlds.append(world)
        return world

    yield make
    for world in worlds:
        world.loop.close()


def _servers(pool: Pool) -> int:
    return len(pool.servers) + pool.connecting


def test_a_busy_pool_hands_slots_to_a_blocked_one_until_they_share(world_factory: Any) -> None:
    world = world_factory(default_pool_size=10, max_db_connections=4)
    a, b = world.pool("app", "a"), world.pool("app", "b")
    a_clients = [Client(a) for _ in range(10)]
    for client in a_clients:
        client.request()
    world.connect_all()
    assert _servers(a) == 4 and a.n_waiting == 6
    b_clients = [Client(b) for _ in range(6)]
    for client in b_clients:
        client.request()
    assert _servers(b) == 0 and b.n_waiting == 6  # no idle server to take: b waits
    limit = a.limits[0]
    assert limit.blocked == {a, b}
    # a's transactions end one by one; each time a still has clients waiting.
    for _ in range(6):
        active = next(c for c in a_clients if c.server is not None)
        active.done()
        world.connect_all()
        assert limit.count <= 4
    assert (len(a.servers), len(b.servers)) == (2, 2)
    assert any("its slot goes to pool app/b" in s.closed_because for s in world.made)
    # Balanced: from now on each pool keeps its servers for its own waiters.
    active = next(c for c in a_clients if c.server is not None)
    server = active.server
    active.done()
    assert server is not None and server.state is ServerState.ACTIVE  # to a's next client


def test_an_idle_server_of_another_pool_is_closed_to_make_room(world_factory: Any) -> None:
    world = world_factory(default_pool_size=5, max_db_connections=2)
    a, b = world.pool("app", "a"), world.pool("app", "b")
    first, second = Client(a), Client(a)
    first.request()
    second.request()
    idle = world.connect_all()
    first.done()
    second.done()
    assert len(a.idle) == 2
    client = Client(b)
    client.request()
    assert len(a.servers) == 1 and b.connecting == 1  # the longest idle one closed
    assert "closed to make room for pool app/b" in idle[0].closed_because
    assert 'max_db_connections = 2 for database "app" reached' in idle[0].closed_because
    world.connect_all()
    assert client.server is not None


def test_max_user_connections_spans_databases(world_factory: Any) -> None:
    world = world_factory(
        databases={
            "one": DatabaseConfig(name="one", dbname="app"),
            "two": DatabaseConfig(name="two", dbname="app"),
        },
        users={"app": UserConfig(name="app", max_user_connections=3)},
    )
    one, two = world.pool("one", "app"), world.pool("two", "app")
    for _ in range(3):
        Client(one).request()
    for _ in range(3):
        Client(two).request()
    assert _servers(one) == 3 and _servers(two) == 0
    assert one.limits[1].blocked == {two}
    world.connect_all()  # one's servers log in; one hands a slot to two
    world.connect_all()
    assert (len(one.servers), len(two.servers)) == (2, 1)
    # A forced server login counts against its own user, not the client's.
    world.registry.config = Config(
        databases={"three": DatabaseConfig(name="three", dbname="app", user="owner")},
        users={"app": UserConfig(name="app", max_user_connections=3)},
    )
    three = world.pool("three", "app")
    assert three.limits[1].key == "owner"


def test_raising_the_limit_by_reload_lets_blocked_pools_open(world_factory: Any) -> None:
    world = world_factory(default_pool_size=5, max_db_connections=1)
    a, b = world.pool("app", "a"), world.pool("app", "b")
    Client(a).request()
    world.connect_all()
    waiting = Client(b)
    waiting.request()
    assert b.n_waiting == 1 and not b.connecting
    config = world.registry.config
    world.registry.apply_config(
        Config(databases=config.databases, default_pool_size=5, max_db_connections=2)
    )
    assert b.connecting == 1
    world.connect_all()
    assert waiting.server is not None


def test_reserve_pool_opens_after_the_timeout_and_closes_when_nobody_waits(
    world_factory: Any,
) -> None:
    world = world_factory(default_pool_size=2, reserve_pool_size=2, reserve_pool_timeout=5)
    pool = world.pool("app", "a")
    clients = [Client(pool) for _ in range(6)]
    for client in clients:
        client.request()
        client.wait_started = 100.0
    world.connect_all()
    assert _servers(pool) == 2 and pool.n_waiting == 4
    pool.use_reserve(104.9)  # not yet
    assert _servers(pool) == 2
    pool.use_reserve(105.0)
    assert pool.connecting == 2  # the reserve
    world.connect_all()
    assert len(pool.servers) == 4 and pool.n_waiting == 2
    for client in clients:  # every transaction ends; nobody else comes
        if client.server is not None:
            client.done()
    for client in clients:
        if client.server is not None:
            client.done()
    assert len(pool.servers) == 2 and not pool.in_reserve  # back to pool_size
    assert len(pool.idle) == 2


def test_reserve_pool_respects_max_db_connections(world_factory: Any) -> None:
    world = world_factory(
        default_pool_size=2, reserve_pool_size=5, reserve_pool_timeout=1, max_db_connections=3
    )
    pool = world.pool("app", "a")
    for _ in range(8):
        client = Client(pool)
        client.request()
        client.wait_started = 0.0
    world.connect_all()
    pool.use_reserve(10.0)
    world.connect_all()
    assert len(pool.servers) == 3


@pytest.mark.parametrize(("round_robin", "expected"), [(False, [2, 2, 2]), (True, [0, 1, 2])])
def test_server_round_robin(world_factory: Any, round_robin: bool, expected: list[int]) -> None:
    world = world_factory(default_pool_size=3, server_round_robin=round_robin)
    pool = world.pool("app", "a")
    clients = [Client(pool) for _ in range(3)]
    for client in clients:
        client.request()
    servers = world.connect_all()
    for client in clients:
        client.done()
    used = []
    for _ in range(3):
        client = Client(pool)
        client.request()
        assert client.server is not None
        used.append(servers.index(client.server))
        client.done()
    assert used == expected
