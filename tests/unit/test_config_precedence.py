"""ConfigSource on its own: --upstream URLs, PGMUX_<KEY>, --set, their order, --check."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.config import ConfigError, config_items, parse_config
from proxy.config_sources import ConfigSource, describe, mask_url

URL = "postgres://app:secret@db.internal:5433/appdb"


def source(*upstreams: str, sets: tuple[str, ...] = (), **environ: str) -> ConfigSource:
    return ConfigSource(upstreams=upstreams, sets=sets, environ=environ)


def test_an_upstream_url_becomes_a_database_and_its_user() -> None:
    config = source(URL).load().config
    db = config.databases["appdb"]
    assert (db.host, db.port, db.dbname) == ("db.internal", 5433, "appdb")
    assert config.users["app"].password == "secret"
    assert config.auth_type == "scram-sha-256"  # clients prove the same password


@pytest.mark.parametrize(
    ("url", "host", "port", "dbname"),
    [
        ("postgresql://app:pw@db/app", "db", 5432, "app"),
        ("postgres://app:pw@db:6000", "db", 6000, "app"),  # libpq: dbname defaults to user
        ("postgres://app:pw@/app?host=/var/run/postgresql", "/var/run/postgresql", 5432, "app"),
        ("postgres://app:pw@[::1]:5432/app", "::1", 5432, "app"),
        ("postgres://app:pw@db/my%20db?port=7000", "db", 7000, "my db"),
    ],
)
def test_url_forms(url: str, host: str, port: int, dbname: str) -> None:
    config = source(url).load().config
    db = config.databases[dbname]
    assert (db.host, db.port, db.dbname) == (host, port, dbname)


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("postgres://app:pw@h1:5432,h2:5433/app", "h1,h2", (5432, 5433)),
        ("postgres://app:pw@h1,h2/app", "h1,h2", 5432),
        ("postgres://app:pw@h1,h2:6000/app", "h1,h2", (5432, 6000)),  # libpq: 5432 if none
        ("postgres://app:pw@h1:7,[::1]:7/app", "h1,::1", 7),
        ("postgres://app:pw@/app?host=/run/a,/run/b&port=5432,5433", "/run/a,/run/b", (5432, 5433)),
    ],
)
def test_url_host_lists_as_libpq_reads_them(url: str, host: str, port: object) -> None:
    db = source(url).load().config.databases["app"]
    assert (db.host, db.port) == (host, port)


def test_url_failover_parameters() -> None:
    url = "postgres://app:pw@h1,h2/app?target_session_attrs=read-write&load_balance_hosts=random"
    db = source(url).load().config.databases["app"]
    assert (db.target_session_attrs, db.load_balance_hosts) == ("read-write", "random")
    assert db.hosts == (("h1", 5432), ("h2", 5432))


def test_a_host_list_survives_check_and_set() -> None:
    loaded = source("postgres://app:pw@h1:5432,h2:5433/app").load()
    text = describe(loaded)
    assert 'host = "h1,h2"' in text and "port = [5432, 5433]" in text
    reread = tomllib.loads(text.replace('"********"', '"pw"'))
    assert parse_config(reread).databases["app"].hosts == (("h1", 5432), ("h2", 5433))
    config = source(URL, sets=("databases.appdb.host=a,b", "databases.appdb.port=1,2")).load()
    assert config.config.databases["appdb"].hosts == (("a", 1), ("b", 2))


def test_url_parameters_and_percent_encoded_secrets() -> None:
    url = "postgres://app:p%40ss%3Aword@db/app?sslmode=require&pool_size=4&pool_mode=session"
    config = source(url).load().config
    assert config.users["app"].password == "p@ss:word"
    assert config.server_tls.sslmode == "require"
    assert config.databases["app"].pool_size == 4
    assert config.databases["app"].pool_mode == "session"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://app:pw@db/app", "must start with postgres://"),
        ("postgres://db/app", "name the user"),
        ("postgres://app:pw@db:99999/app", "port is not a number"),
        ("postgres://app:pw@a,,b/app", "an empty host in the list"),
        ("postgres://app:pw@a:5432,b:x/app", "port is not a number"),
        ("postgres://app:pw@[::1/app", "not a URL"),
        ("postgres://app:pw@[::1]x/app", "is not a host or [address]:port"),
        ("postgres://app:pw@db/app?pool_size=many", "pool_size must be a number"),
        ("postgres://app:pw@db/app?target_session=any", "unknown parameter"),
        ("postgres://app:pw@db/app?target_session_attrs=rw", "must be one of any, read-write"),
        ("postgres://app:pw@a,b/app?port=1,2,3", "3 ports for 2 hosts"),
    ],
)
def test_bad_urls_are_refused_with_the_password_masked(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        source(url).load()
    assert problem in str(info.value)
    assert ":pw@" not in str(info.value)


def test_no_password_means_trust_with_a_warning_unless_auth_type_is_set() -> None:
    loaded = source("postgres://app@db/app").load()
    assert loaded.config.auth_type == "trust"
    assert any("has no password" in w for w in loaded.warnings)
    loaded = source("postgres://app@db/app", PGMUX_AUTH_TYPE="md5").load()
    assert loaded.config.auth_type == "md5"


def test_every_setting_has_a_pgmux_variable() -> None:
    for item in config_items():
        name = "PGMUX_" + item.key.upper().replace(".", "_")
        text = item.default_text if item.default_text is not None else ""
        if isinstance(item.default, tuple):
            text = "admin"
        loaded = source(URL, **{name: text}).load()
        assert loaded.origins[item.key] == name, item.key


def test_variables_take_setting_syntax() -> None:
    config = (
        source(
            URL,
            PGMUX_LOG_STATS="off",
            PGMUX_QUERY_TIMEOUT="2.5",
            PGMUX_ADMIN_USERS="app, admin",
            PGMUX_METRICS_LISTEN_PORT="9300",
            PGMUX_UNIX_SOCKET_MODE="0700",
        )
        .load()
        .config
    )
    assert config.log_stats is False
    assert config.query_timeout == 2.5
    assert config.admin_users == ("app", "admin")
    assert config.metrics.listen_port == 9300
    assert config.unix_socket_mode == 0o700


def test_unknown_variables_are_warned_about_and_harness_variables_are_not() -> None:
    loaded = source(URL, PGMUX_POOLSIZE="3", PGMUX_PG_BIN="/usr/bin").load()
    assert [w for w in loaded.warnings if "PGMUX_" in w] == [
        "ignoring PGMUX_POOLSIZE: no setting is called 'poolsize' (docs/configuration.md "
        "lists them)"
    ]


def test_kubernetes_service_link_variables_are_not_settings() -> None:
    links = {
        "PGMUX_SERVICE_HOST": "10.0.0.1",
        "PGMUX_SERVICE_PORT": "6432",
        "PGMUX_SERVICE_PORT_METRICS": "9127",
        "PGMUX_PORT": "tcp://10.0.0.1:6432",
        "PGMUX_PORT_6432_TCP": "tcp://10.0.0.1:6432",
        "PGMUX_PORT_6432_TCP_ADDR": "10.0.0.1",
        "PGMUX_PORT_6432_TCP_PORT": "6432",
        "PGMUX_PORT_6432_TCP_PROTO": "tcp",
    }
    loaded = source(URL, **links).load()
    assert not [w for w in loaded.warnings if "PGMUX_" in w]
    assert loaded.config.listen_port == 6432


def test_the_order_file_upstream_environment_set(tmp_path: Path) -> None:
    path = tmp_path / "pgmux.toml"
    path.write_text(
        'default_pool_size = 3\nmax_client_conn = 50\n[databases.appdb]\nhost = "old"\n'
    )
    loaded = ConfigSource(
        file=str(path),
        upstreams=(URL,),
        sets=("default_pool_size=5",),
        environ={"PGMUX_DEFAULT_POOL_SIZE": "4", "PGMUX_MAX_CLIENT_CONN": "60"},
    ).load()
    config = loaded.config
    assert config.default_pool_size == 5 and loaded.origins["default_pool_size"] == "--set"
    assert config.max_client_conn == 60
    assert loaded.origins["max_client_conn"] == "PGMUX_MAX_CLIENT_CONN"
    assert config.databases["appdb"].host == "db.internal"  # the URL beats the file
    assert loaded.origins["databases.appdb.host"] == "--upstream"
    assert config.path == str(path)


def test_set_reaches_databases_and_users_by_their_field_types() -> None:
    config = (
        source(
            URL,
            sets=(
                "databases.appdb.pool_size=2",
                "databases.other.host=10.0.0.9",
                "users.app.query_timeout=1.5",
                "users.app.password=12345",
            ),
        )
        .load()
        .config
    )
    assert config.databases["appdb"].pool_size == 2
    assert config.databases["other"].host == "10.0.0.9"
    assert config.users["app"].query_timeout == 1.5
    assert config.users["app"].password == "12345"  # a string, though it looks like a number


@pytest.mark.parametrize(
    ("assignment", "problem"),
    [
        ("default_pool_size", "write it as key=value"),
        ("no_such_key=1", "unknown setting"),
        ("databases.appdb.poolsize=1", "no setting 'poolsize'"),
        ("databases.appdb.pool_size=big", "must be a number"),
        ("default_pool_size=0", "(set by --set)"),
        ("log_stats=perhaps", "must be true or false"),
    ],
)
def test_bad_set_assignments(assignment: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        source(URL, sets=(assignment,)).load()
    assert problem in str(info.value)


def test_choosing_sources() -> None:
    with pytest.raises(ConfigError, match="nothing to proxy"):
        ConfigSource.from_command_line(
            file=None, pgbouncer_ini=None, upstreams=[], sets=[], environ={}
        )
    with pytest.raises(ConfigError, match="not both"):
        ConfigSource.from_command_line(
            file="a.toml", pgbouncer_ini="b.ini", upstreams=[], sets=[], environ={}
        )
    chosen = ConfigSource.from_command_line(
        file=None,
        pgbouncer_ini=None,
        upstreams=[],
        sets=["workers=1"],
        environ={"PGMUX_UPSTREAM": f"{URL} postgres://b:pw@h/b", "HOME": "/root"},
    )
    assert chosen.upstreams == (URL, "postgres://b:pw@h/b")
    assert "HOME" not in chosen.environ
    # What a worker is handed comes back whole, with the environment it inherits.
    handed = ConfigSource.from_command_line(
        file=None,
        pgbouncer_ini=None,
        upstreams=[],
        sets=[],
        environ={"PGMUX_WORKER_SOURCE": chosen.to_json(), **chosen.environ},
    )
    assert (handed.upstreams, handed.sets) == (chosen.upstreams, chosen.sets)


def test_describe_is_toml_that_loads_back_with_passwords_masked() -> None:
    loaded = source(URL, sets=("users.app.pool_size=3",), PGMUX_WORKERS="2").load()
    text = describe(loaded)
    assert "secret" not in text
    again = parse_config(tomllib.loads(text), "printed")
    assert again.workers == 2 and again.users["app"].pool_size == 3
    assert again.users["app"].password == "********"
    for item in config_items():
        assert item.value(again) == item.value(loaded.config), item.key


def test_mask_url() -> None:
    assert mask_url(URL) == "postgres://app:********@db.internal:5433/appdb"
    assert mask_url("postgres://app@db/app") == "postgres://app@db/app"
