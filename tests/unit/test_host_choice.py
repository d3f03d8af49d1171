"""Several hosts per database, on their own: host and port lists as parse_config reads
them (libpq's rules), whether a server suits target_session_attrs, and the order a
walk tries the hosts in (proxy/hosts.py, no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.config import ConfigError, DatabaseConfig, parse_config
from proxy.errors import NoMatchingServer, ServerLoginFailed, ServerUnreachable
from proxy.hosts import (
    RECHECK,
    HostList,
    Try,
    Walk,
    address_text,
    check_query,
    mismatch_reason,
    query_verdict,
    role_verdict,
)
from proxy.pool import NO_SETTINGS, ClientState, Pool, Registry, ServerState, Settings

A, B, C = ("a", 5432), ("b", 5433), ("/run/pg", 5432)
PRIMARY = {"in_hot_standby": "off", "default_transaction_read_only": "off"}
STANDBY = {"in_hot_standby": "on", "default_transaction_read_only": "off"}
READ_ONLY_PRIMARY = {"in_hot_standby": "off", "default_transaction_read_only": "on"}


def database(**entry: Any) -> DatabaseConfig:
    return parse_config({"databases": {"app": entry}}).databases["app"]


# -- host and port lists in the config ------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "hosts"),
    [
        ({}, (("127.0.0.1", 5432),)),
        ({"host": "a,b", "port": 6000}, (("a", 6000), ("b", 6000))),
        ({"host": "a, b ,/run/pg"}, (("a", 5432), ("b", 5432), ("/run/pg", 5432))),
        ({"host": ["a", "b"], "port": [5432, 5433]}, (A, B)),
        ({"host": "a,b", "port": "5432,5433"}, (A, B)),
        ({"host": "a,b", "port": "7"}, (("a", 7), ("b", 7))),
        ({"host": ["a", "b"], "port": [7, 7]}, (("a", 7), ("b", 7))),
    ],
)
def test_host_and_port_lists(entry: dict[str, Any], hosts: tuple[tuple[str, int], ...]) -> None:
    assert database(**entry).hosts == hosts


def test_one_port_for_all_is_kept_as_one() -> None:
    db = database(host=["a", "b"], port=[7, 7])
    assert (db.host, db.port) == ("a,b", 7)
    db = database(host="a,b", port=[5432, 5433])
    assert (db.host, db.port) == ("a,b", (5432, 5433))


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"host": ""}, "databases.app.host: must not be empty"),
        ({"host": []}, "databases.app.host: must not be empty"),
        ({"host": "a,,b"}, "has an empty entry in 'a,,b'; separate hosts with single commas"),
        ({"host": "a,"}, "has an empty entry"),
        ({"host": ["a", 5]}, "must be a string or a list of strings, got a list"),
        ({"host": ["a,b"]}, "a list entry must be one host"),
        ({"host": 5}, "must be a string or a list of strings, got 5"),
        (
            {"host": "a,b", "port": [1, 2, 3]},
            "databases.app.port: 3 ports for 2 hosts (a, b): give one port for every host, "
            "or one per host in the same order (libpq's rule)",
        ),
        ({"host": "a,b,c", "port": "1,2"}, "2 ports for 3 hosts"),
        ({"port": "5432,x"}, "a string like \"5432,5433\", got '5432,x'"),
        ({"port": [5432, 0]}, "must be 1 to 65535, got 0"),
        ({"port": 70000}, "must be 1 to 65535, got 70000"),
        ({"port": True}, "must be a port number or a list of them, got true"),
        ({"port": []}, "must be a port number or a list of them"),
        ({"load_balance_hosts": "sideways"}, "must be one of disable, round-robin, random"),
        ({"target_session_attrs": "rw"}, "must be one of any, read-write, read-only, primary"),
    ],
)
def test_bad_host_lists_say_what_to_change(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        database(**entry)
    assert problem in str(info.value)


def test_per_database_values_override_the_global_ones() -> None:
    config = parse_config(
        {
            "load_balance_hosts": "round-robin",
            "target_session_attrs": "read-write",
            "databases": {"a": {}, "b": {"load_balance_hosts": "random"}},
        }
    )
    a, b = config.databases["a"], config.databases["b"]
    assert config.load_balance_hosts_for(a) == "round-robin"
    assert config.load_balance_hosts_for(b) == "random"
    assert config.target_session_attrs_for(b) == "read-write"
    defaults = parse_config({"databases": {"a": {}}})
    assert defaults.load_balance_hosts == "disable"
    assert defaults.target_session_attrs == "any"
    with pytest.raises(ConfigError, match="target_session_attrs: must be one of"):
        parse_config({"target_session_attrs": "master", "databases": {"a": {}}})


# -- is it the right kind of server -------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "params", "verdict"),
    [
        ("any", {}, True),
        ("prefer-standby", PRIMARY, True),
        ("read-write", PRIMARY, True),
        ("read-write", STANDBY, False),
        ("read-write", READ_ONLY_PRIMARY, False),
        ("read-only", PRIMARY, False),
        ("read-only", STANDBY, True),
        ("read-only", READ_ONLY_PRIMARY, True),
        ("primary", PRIMARY, True),
        ("primary", READ_ONLY_PRIMARY, True),  # libpq: primary is about recovery only
        ("primary", STANDBY, False),
        ("standby", STANDBY, True),
        ("standby", READ_ONLY_PRIMARY, False),
        # PostgreSQL before 14 reports neither: ask.
        ("read-write", {}, None),
        ("read-write", {"default_transaction_read_only": "off"}, None),
        ("primary", {"default_transaction_read_only": "off"}, None),
        ("standby", {}, None),
    ],
)
def test_role_verdict(target: str, params: dict[str, str], verdict: bool | None) -> None:
    assert role_verdict(target, params) is verdict


def test_libpqs_words_for_a_server_of_the_wrong_kind() -> None:
    assert mismatch_reason("read-write", STANDBY) == "server is in hot standby mode"
    assert mismatch_reason("read-write", READ_ONLY_PRIMARY) == "session is read-only"
    assert mismatch_reason("read-only", PRIMARY) == "session is not read-only"
    assert mismatch_reason("primary", STANDBY) == "server is in hot standby mode"
    assert mismatch_reason("standby", PRIMARY) == "server is not in hot standby mode"


@pytest.mark.parametrize(
    ("target", "value", "answer"),
    [
        ("read-write", "off", (True, "")),
        ("read-write", "on", (False, "session is read-only")),
        ("read-only", "off", (False, "session is not read-only")),
        ("read-only", "on", (True, "")),
        ("primary", "f", (True, "")),
        ("primary", "t", (False, "server is in hot standby mode")),
        ("standby", "t", (True, "")),
        ("standby", "f", (False, "server is not in hot standby mode")),
    ],
)
def test_the_check_query_for_older_servers(
    target: str, value: str, answer: tuple[bool, str]
) -> None:
    if target in ("read-write", "read-only"):
        assert check_query(target) == "SHOW transaction_read_only"
    else:
        assert check_query(target) == "SELECT pg_catalog.pg_is_in_recovery()"
    assert query_verdict(target, value) == answer


def test_addresses_as_shown() -> None:
    assert address_text("db", 5432) == "db:5432"
    assert address_text("::1", 5432) == "[::1]:5432"
    assert address_text("/run/pg", 5432) == "/run/pg:5432"
    assert str(Try("::1", 7, "any")) == "[::1]:7"


# -- which host next ----------------------------------------------------------------------


def tries(walk: Walk, now: float = 0.0) -> list[tuple[str, str]]:
    """Every host the walk would try, each failing to connect."""
    out = []
    while (attempt := walk.next(now)) is not None:
        out.append((attempt.host, attempt.target))
        walk.failed(attempt, "cannot connect: refused", unreachable(attempt), now, hard=False)
    return out


def unreachable(attempt: Try) -> ServerUnreachable:
    return ServerUnreachable(f'cannot connect to server {attempt} for pool "app/app": refused')


def test_disable_tries_the_hosts_in_order_every_time() -> None:
    hosts = HostList((A, B, C), "disable", "any")
    for _ in range(3):
        walk = hosts.walk(0.0, retry_after=0.0)
        first = walk.next(0.0)
        assert first is not None and first.address == A
        walk.succeeded(first)


def test_round_robin_starts_each_server_connection_at_the_next_host() -> None:
    hosts = HostList((A, B, C), "round-robin", "any")
    firsts = []
    for _ in range(4):
        attempt = hosts.walk(0.0, retry_after=0.0).next(0.0)
        assert attempt is not None
        firsts.append(attempt.host)
    assert firsts == ["a", "b", "/run/pg", "a"]
    # ... and each walk still tries every host once, from there on.
    assert [host for host, _ in tries(hosts.walk(0.0, 0.0))] == ["b", "/run/pg", "a"]


def test_random_shuffles() -> None:
    hosts = HostList((A, B, C), "random", "any", shuffle=lambda items: items.reverse())
    assert [host for host, _ in tries(hosts.walk(0.0, 0.0))] == ["/run/pg", "b", "a"]


def test_a_host_that_failed_lately_is_tried_last_not_skipped() -> None:
    hosts = HostList((A, B), "disable", "any")
    walk = hosts.walk(0.0, retry_after=15.0)
    assert [host for host, _ in tries(walk)] == ["a", "b"]  # both failed at 0
    walk = hosts.walk(1.0, retry_after=15.0)
    first = walk.next(1.0)
    assert first is not None and first.address == A  # both failed: the order stands
    walk.failed(first, "cannot connect: refused", unreachable(first), 1.0, hard=False)
    second = walk.next(1.0)
    assert second is not None and second.address == B
    walk.succeeded(second)  # b is up again: a, which failed at 1, goes last
    assert [t.host for t in hosts.walk(2.0, retry_after=15.0).queue] == ["b", "a"]
    # Once server_login_retry has passed since a failed, a is first again.
    assert [t.host for t in hosts.walk(16.5, retry_after=15.0).queue] == ["a", "b"]


def test_a_host_of_the_wrong_kind_is_checked_again_by_one_walk_at_a_time() -> None:
    hosts = HostList((A, B), "disable", "read-write")
    walk = hosts.walk(0.0, 15.0)
    standby = walk.next(0.0)
    assert standby is not None and standby.address == A
    walk.rejected(standby, "server is in hot standby mode", 0.0)
    primary = walk.next(0.0)
    assert primary is not None and primary.address == B
    walk.succeeded(primary)
    # Within RECHECK, new server connections go straight to the primary.
    walk = hosts.walk(0.5, 15.0)
    attempt = walk.next(0.5)
    assert attempt is not None and attempt.address == B
    # After it, one walk checks a again; the others skip it meanwhile.
    later = RECHECK + 0.1
    checking, other = hosts.walk(later, 15.0), hosts.walk(later, 15.0)
    attempt = checking.next(later)
    assert attempt is not None and attempt.address == A
    attempt = other.next(later)
    assert attempt is not None and attempt.address == B
    assert "checked again in a moment" in other.outcomes[A].text


def test_prefer_standby_asks_for_a_standby_then_for_any_server() -> None:
    hosts = HostList((A, B, C), "disable", "prefer-standby")
    walk = hosts.walk(0.0, 15.0)
    seen = []
    while (attempt := walk.next(0.0)) is not None:
        seen.append((attempt.host, attempt.target))
        if attempt.address == B:  # down
            walk.failed(attempt, "cannot connect: refused", unreachable(attempt), 0.0, hard=False)
        else:
            walk.rejected(attempt, "server is not in hot standby mode", 0.0)
    # The second pass leaves out b, which could not be reached a moment ago.
    assert seen == [
        ("a", "standby"), ("b", "standby"), ("/run/pg", "standby"), ("a", "any"), ("/run/pg", "any")
    ]  # fmt: skip
    assert walk.wait(0.0, 15.0) is None  # prefer-standby takes any server: no waiting


def test_a_walk_waits_while_a_host_answers_with_the_wrong_kind() -> None:
    hosts = HostList((A, B), "disable", "read-write")
    walk = hosts.walk(0.0, 15.0)
    down = walk.next(0.0)
    assert down is not None
    walk.failed(down, "cannot connect: refused", unreachable(down), 0.0, hard=False)
    standby = walk.next(0.0)
    assert standby is not None
    walk.rejected(standby, "server is in hot standby mode", 0.0)
    assert walk.next(0.0) is None
    assert walk.wait(0.2, budget=15.0) == pytest.approx(RECHECK - 0.2)
    assert walk.wait(5.0, budget=15.0) == pytest.approx(0.05)  # overdue: soon
    assert walk.wait(14.98, budget=15.0) == pytest.approx(0.02)  # never past the budget
    assert walk.wait(15.0, budget=15.0) is None
    # The next round: the standby's check is due again, a (still down) goes last.
    walk.restart(RECHECK)
    assert [h for h, _ in tries(walk, RECHECK)] == ["b", "a"]


def test_a_walk_with_only_outages_and_refusals_does_not_wait() -> None:
    hosts = HostList((A, B), "disable", "read-write")
    walk = hosts.walk(0.0, 15.0)
    tries(walk)
    assert walk.wait(0.0, 15.0) is None
    any_walk = HostList((A,), "disable", "any").walk(0.0, 15.0)
    tries(any_walk)
    assert any_walk.wait(0.0, 15.0) is None


def test_one_host_fails_with_its_own_error() -> None:
    walk = HostList((A,), "disable", "any").walk(0.0, 15.0)
    attempt = walk.next(0.0)
    assert attempt is not None
    error = unreachable(attempt)
    walk.failed(attempt, "cannot connect: refused", error, 0.0, hard=False)
    assert walk.error("app/app", "app", 0.0) is error


def test_several_hosts_fail_with_each_one_named() -> None:
    walk = HostList((A, B), "disable", "any").walk(0.0, 15.0)
    error = ServerUnreachable("x")
    first = walk.next(0.0)
    assert first is not None
    walk.failed(first, "cannot connect: Connection refused", error, 0.0, hard=False)
    second = walk.next(0.0)
    assert second is not None
    refused = ServerLoginFailed("y", sqlstate="28P01", hint="the password")
    walk.failed(second, 'password authentication failed for user "app"', refused, 0.0, hard=True)
    got = walk.error("app/app", "app", 0.0)
    assert isinstance(got, ServerLoginFailed)  # the refusal, not the outage, decides
    assert (got.sqlstate, got.reason, got.hint) == ("28P01", "server_login_failed", "the password")
    assert got.message == (
        'no server of [databases.app] could be used for pool "app/app": '
        "a:5432: cannot connect: Connection refused; "
        'b:5433: password authentication failed for user "app"'
    )
    walk = HostList((A, B), "disable", "any").walk(0.0, 15.0)
    tries(walk)
    got = walk.error("app/app", "app", 0.0)
    assert type(got) is ServerUnreachable and got.sqlstate == "08001"
    assert got.hint is not None and "one of [databases.app] host" in got.hint


def test_no_host_of_the_right_kind_names_the_knob_and_each_host() -> None:
    walk = HostList((A, B), "disable", "standby").walk(0.0, 15.0)
    down = walk.next(0.0)
    assert down is not None
    walk.failed(down, "cannot connect: Connection refused", unreachable(down), 0.0, hard=False)
    primary = walk.next(0.0)
    assert primary is not None
    walk.rejected(primary, "server is not in hot standby mode", 0.0)
    error = walk.error("app/app", "app", 0.0)
    assert isinstance(error, NoMatchingServer)
    assert (error.sqlstate, error.reason) == ("08001", "target_session_attrs")
    assert error.message == (
        'no server for pool "app/app" matches target_session_attrs = standby: '
        "a:5432: cannot connect: Connection refused; b:5433: server is not in hot standby mode"
    )
    assert error.hint is not None and "target_session_attrs" in error.hint
    walk.restart(2.0)
    while (attempt := walk.next(2.0)) is not None:
        walk.rejected(attempt, "server is not in hot standby mode", 2.0)
    assert walk.error("app/app", "app", 3.5).message.endswith("(looked for 3.5 s)")


def test_a_reload_makes_a_new_host_list() -> None:
    hosts = HostList((A, B), "disable", "any")
    assert hosts.same((A, B), "disable", "any")
    assert not hosts.same((A,), "disable", "any")
    assert not hosts.same((A, B), "round-robin", "any")
    assert not hosts.same((A, B), "disable", "primary")


# -- the pool's counts while a walk moves from host to host ----------------------------------


class _Server:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.state = ServerState.CONNECTING
        self.settings: Settings = NO_SETTINGS
        self.created_at = self.idle_since = 0.0
        self.retire_at = float("inf")
        self.generation = pool.generation

    def close(self, reason: str) -> None:
        self.pool.server_closed(self)

    def reset_settings(self) -> None:
        pass


class _Client:
    def __init__(self) -> None:
        self.state = ClientState.IDLE
        self.wait_started = 0.0
        self.error: Any = None

    def assign_server(self, server: Any) -> None:
        pass

    def fail_wait(self, error: Any) -> None:
        self.error = error

    def wait_expired(self, error: Any) -> None:
        self.error = error


def test_a_walk_keeps_its_place_in_the_pool_and_its_slot_under_the_limits() -> None:
    config = parse_config({"databases": {"app": {"host": "a,b", "max_db_connections": 1}}})
    loop = asyncio.new_event_loop()
    try:
        registry = Registry(config, loop)
        opened: list[Pool] = []
        registry.open_server = opened.append
        pool = registry.pool_for(config.databases["app"], "app", None)
        client = _Client()
        assert pool.acquire(client) is None  # queued; one walk starts
        assert opened == [pool] and pool.connecting == 1
        limit = pool.limits[0]
        assert limit.count == 1
        server = _Server(pool)
        pool.server_connected(server)  # host a answered, and is logging in
        pool.server_moved_on(server)  # ... but was the wrong kind: on to host b
        assert (pool.connecting, pool.logging_in, len(pool.servers)) == (1, 0, 0)
        assert limit.count == 1 and server.state is ServerState.CLOSED
        assert client.error is None  # still waiting
        error = NoMatchingServer("no server for pool matches")
        pool.connect_failed(error)  # the walk gives up
        assert (pool.connecting, limit.count) == (0, 0)
        assert client.error is error
    finally:
        loop.close()
