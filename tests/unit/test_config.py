"""Config loading: defaults, overrides, and errors that name the file, the key, the fix."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from proxy.config import (
    Config,
    ConfigError,
    DatabaseConfig,
    MetricsConfig,
    TLSConfig,
    UserConfig,
    load_config,
    parse_config,
    worker_share,
    worker_share_warnings,
)

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"databases": {"app": {}}}


def test_example_config_is_valid_and_documents_every_key() -> None:
    example = ROOT / "config.example.toml"
    config = load_config(example)
    assert config.databases["app"].dbname == "app"
    text = example.read_text()
    derived = ("path", "databases", "users", "metrics", "auth_file_users", "hba_rules", "raw")
    for f in dataclasses.fields(Config):
        if f.name in derived:
            continue
        if f.name in ("client_tls", "server_tls"):
            for sub in dataclasses.fields(TLSConfig):
                key = f"{f.name}_{sub.name}"
                assert re.search(rf"^{key} = ", text, re.M), f"{key} missing in the example"
            continue
        assert re.search(rf"^{f.name} = ", text, re.M), f"{f.name} missing in the example"
    metrics = text[text.index("[metrics]") :]
    for f in dataclasses.fields(MetricsConfig):
        assert re.search(rf"^{f.name} = ", metrics, re.M), f"metrics.{f.name} missing"
    for cls, section in ((DatabaseConfig, "databases"), (UserConfig, "users")):
        for f in dataclasses.fields(cls):
            if f.name != "name":
                pattern = rf"^#? ?{f.name} = "
                assert re.search(pattern, text, re.M), f"{section}.*.{f.name} missing"


def test_defaults_follow_pgbouncer() -> None:
    config = parse_config(MINIMAL)
    assert config.default_pool_size == 20
    assert config.max_client_conn == 100
    assert config.query_wait_timeout == 120
    assert config.server_reset_query == "DISCARD ALL"
    assert config.databases["app"].dbname == "app"
    assert config.databases["app"].port == 5432


def test_overrides_resolve_per_pool() -> None:
    config = parse_config(
        {
            "pool_mode": "transaction",
            "databases": {"a": {"pool_mode": "session", "pool_size": 3}, "b": {}},
            "users": {"u": {"pool_mode": "statement"}},
        }
    )
    a, b = config.databases["a"], config.databases["b"]
    assert config.pool_mode_for(a, "x") == "session"
    assert config.pool_mode_for(a, "u") == "statement"
    assert config.pool_mode_for(b, "x") == "transaction"
    assert config.pool_size_for(a) == 3
    assert config.pool_size_for(b) == 20


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"default_pool_size": "x", **MINIMAL}, "default_pool_size: must be an integer"),
        ({"default_pool_size": 0, **MINIMAL}, "default_pool_size: must be at least 1"),
        ({"defualt_pool_size": 5, **MINIMAL}, "defualt_pool_size: unknown setting"),
        ({"pool_mode": "txn", **MINIMAL}, "pool_mode: must be one of session, transaction"),
        ({"query_wait_timeout": -1, **MINIMAL}, "query_wait_timeout: must be 0 (off)"),
        ({"listen_port": 70000, **MINIMAL}, "listen_port: must be 1 to 65535"),
        ({"admin_users": "admin", **MINIMAL}, "admin_users: must be a list of strings"),
        ({"databases": {"app": {"prot": 1}}}, "databases.app.prot: unknown setting"),
        ({"databases": {"app": {"password": "x"}}}, "databases.app.password: set only"),
        ({"databases": {"app": 5}}, "databases.app: must be a table"),
        ({"users": {"u": {"password": 5}}, **MINIMAL}, "users.u.password: must be a string"),
        ({}, "databases: no [databases.NAME] section"),
        ({"workers": 0, **MINIMAL}, "workers: must be 1 to 64, got 0 (the number of pgmux"),
        ({"workers": 65, **MINIMAL}, "workers: must be 1 to 64, got 65"),
        ({"workers": "two", **MINIMAL}, "workers: must be an integer, got the string 'two'"),
        ({"workers": 2.0, **MINIMAL}, "workers: must be an integer, got 2.0"),
        (
            {"server_check_delay": -1, **MINIMAL},
            "server_check_delay: must be 0 (check every time) or",
        ),
        ({"server_check_query": 1, **MINIMAL}, "server_check_query: must be a string"),
        (
            {"server_check_query": "SELECT 1\x00", **MINIMAL},
            "server_check_query: must not contain a NUL character",
        ),
    ],
)
def test_errors_name_the_key(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "pgmux.toml")
    assert str(info.value).startswith("pgmux.toml: ")
    assert message in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen_port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_workers_default_and_range() -> None:
    assert parse_config(MINIMAL).workers == 1
    assert parse_config({"workers": 64, **MINIMAL}).workers == 64


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7, 64])
def test_worker_shares_add_up_to_the_limit(workers: int) -> None:
    for total in range(0, 150):
        shares = [worker_share(total, i, workers, minimum=0) for i in range(workers)]
        assert sum(shares) == total
        assert max(shares) - min(shares) <= 1
        assert shares == sorted(shares, reverse=True)  # the extra ones go to the first
        at_least_one = [worker_share(total, i, workers) for i in range(workers)]
        assert at_least_one == [max(share, 1) for share in shares]


def test_worker_share_examples() -> None:
    assert [worker_share(20, i, 3) for i in range(3)] == [7, 7, 6]
    assert [worker_share(1, i, 2) for i in range(2)] == [1, 1]  # 2 in total, not 1
    assert [worker_share(1, i, 2, minimum=0) for i in range(2)] == [1, 0]  # min_pool_size


def test_worker_share_warnings_name_the_small_limits() -> None:
    assert worker_share_warnings(parse_config({"default_pool_size": 1, **MINIMAL})) == []
    config = parse_config(
        {
            "workers": 4,
            "default_pool_size": 20,
            "max_client_conn": 3,
            "databases": {"big": {"pool_size": 8}, "small": {"pool_size": 2}},
            "users": {"u": {"pool_size": 1}},
        }
    )
    warnings = worker_share_warnings(config)
    assert len(warnings) == 3
    assert warnings[0].startswith("databases.small.pool_size = 2 is less than workers = 4")
    assert "up to 4 server connections to small in total instead of 2" in warnings[0]
    assert warnings[1].startswith("users.u.pool_size = 1 is less than workers = 4")
    assert warnings[2].startswith("max_client_conn = 3 is less than workers = 4")


def test_worker_share_warnings_cover_the_shared_limits() -> None:
    config = parse_config(
        {"workers": 4, "max_db_connections": 2, "max_user_client_connections": 8, **MINIMAL}
    )
    warnings = worker_share_warnings(config)
    assert len(warnings) == 1
    assert warnings[0].startswith("max_db_connections = 2 is less than workers = 4")
    assert "up to 4 server connections per database in total instead of 2" in warnings[0]


def test_limits_take_the_most_specific_value() -> None:
    config = parse_config(
        {
            "max_db_connections": 10,
            "reserve_pool_size": 1,
            "max_user_client_connections": 7,
            "databases": {"a": {"max_db_connections": 3, "reserve_pool_size": 2}, "b": {}},
            "users": {"u": {"reserve_pool_size": 4, "max_user_client_connections": 0}},
        }
    )
    a, b = config.databases["a"], config.databases["b"]
    assert config.db_limit(a, "max_db_connections") == 3
    assert config.db_limit(b, "max_db_connections") == 10
    assert config.reserve_pool_size_for(a, "x") == 2
    assert config.reserve_pool_size_for(a, "u") == 4  # the user's wins
    assert config.reserve_pool_size_for(b, "x") == 1
    assert config.user_limit("u", "max_user_client_connections") == 0  # 0: no limit for u
    assert config.user_limit("x", "max_user_client_connections") == 7
    with pytest.raises(ConfigError, match="max_db_connections: must be at least 0, got -1"):
        parse_config({"databases": {"a": {"max_db_connections": -1}}})
