"""pgbouncer.ini conversion: PgBouncer's ini syntax, what converts, what is listed, and
``pgmux convert``; every converted file must be one ``parse_config`` accepts."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config, ConfigError, parse_config
from proxy.convert import main as convert_main
from proxy.pgbouncer_ini import Converted, parse_connstring, read_pgbouncer_ini
from proxy.toml_out import to_toml

DEBIAN_SAMPLES = (
    Path("/etc/pgbouncer/pgbouncer.ini"),
    Path("/usr/share/doc/pgbouncer/examples/pgbouncer.ini"),
    Path("/usr/share/doc/pgbouncer/pgbouncer-minimal.ini"),
)


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def convert(tmp_path: Path, text: str, name: str = "pgbouncer.ini") -> Converted:
    return read_pgbouncer_ini(write(tmp_path, name, text))


def load(converted: Converted, path: Path | str = "<converted>") -> Config:
    """The round trip pgmux convert makes: TOML text, read back, checked."""
    return parse_config(tomllib.loads(to_toml(converted.raw)), str(path))


def one(lines: tuple[str, ...], fragment: str) -> str:
    found = [line for line in lines if fragment in line]
    assert len(found) == 1, (fragment, lines)
    return found[0]


def absent(lines: tuple[str, ...], fragment: str) -> None:
    assert not [line for line in lines if fragment in line], (fragment, lines)


# -- ini syntax -------------------------------------------------------------------------


def test_sections_comments_and_values(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        ";; a comment\n"
        "# another\n"
        "[databases]\n"
        "app = host=10.0.0.1 port=6000 dbname=appdb\n"
        "\n"
        "  [pgbouncer]  \n"
        "   listen_port   =   7000   \n"
        "server_reset_query = DISCARD ALL; # not a comment after the start of a line\n"
        "[users]\n"
        "app = pool_mode=transaction pool_size=3\n",
    )
    raw = converted.raw
    assert raw["listen_port"] == 7000
    assert raw["server_reset_query"] == "DISCARD ALL; # not a comment after the start of a line"
    assert raw["databases"] == {"app": {"host": "10.0.0.1", "port": 6000, "dbname": "appdb"}}
    assert raw["users"] == {"app": {"pool_mode": "transaction", "pool_size": 3}}
    config = load(converted)
    assert config.databases["app"].port == 6000
    assert config.pool_mode_for(config.databases["app"], "app") == "transaction"
    assert config.pool_size_for(config.databases["app"], "app") == 3


def test_crlf_line_ends_and_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "pgbouncer.ini"
    path.write_bytes(
        b"\xef\xbb\xbf[pgbouncer]\r\nlisten_port = 7000\r\n[databases]\r\na = host=h\r\n"
    )
    converted = read_pgbouncer_ini(path)
    assert (converted.raw["listen_port"], converted.raw["databases"]) == (
        7000,
        {"a": {"host": "h"}},
    )


def test_keys_and_sections_are_case_insensitive(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        "[DATABASES]\nApp = host=h DBNAME=real\n[PgBouncer]\nListen_Port = 7001\n"
        "POOL_MODE = Transaction\n",
    )
    assert converted.raw["listen_port"] == 7001
    assert converted.raw["pool_mode"] == "transaction"
    # Database names keep their case (PostgreSQL's names are case-sensitive).
    assert converted.raw["databases"] == {"App": {"host": "h", "dbname": "real"}}


def test_the_later_line_wins_with_a_note(tmp_path: Path) -> None:
    converted = convert(tmp_path, "[pgbouncer]\nlisten_port = 7000\nlisten_port = 7002\n")
    assert converted.raw["listen_port"] == 7002
    assert one(converted.notes, "listen_port is also set at").startswith(
        f"{tmp_path / 'pgbouncer.ini'}:3: "
    )


def test_quoted_database_names(tmp_path: Path) -> None:
    converted = convert(tmp_path, '[databases]\n"my ""odd"" db" = host=h dbname=x\n[pgbouncer]\n')
    assert converted.raw["databases"] == {'my "odd" db': {"host": "h", "dbname": "x"}}
    assert 'my "odd" db' in load(converted).databases


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[pgbouncer]\nlisten port = 1\n", "pgbouncer.ini:2: syntax error"),
        ("[pgbouncer]\njust words\n", "pgbouncer.ini:2: syntax error"),
        ("[pgbouncer\n", "pgbouncer.ini:1: syntax error"),
        ("[pgbouncer]\n[pools]\n", "pgbouncer.ini:2: unknown section [pools]"),
        ("listen_port = 1\n[pgbouncer]\n", "pgbouncer.ini:1: listen_port is outside any section"),
        ("[databases]\napp = host=h\n", "no [pgbouncer] section"),
        ('"app" "secret"\n', "pgbouncer.ini:1: syntax error: expected KEY = VALUE"),
        ("[pgbouncer]\nlisten_port = many\n", "pgbouncer.ini:2: listen_port = many: not an"),
        ("[pgbouncer]\nlog_stats = maybe\n", "pgbouncer.ini:2: log_stats = maybe: not a bool"),
        ("[pgbouncer]\npool_mode = pooled\n", "pgbouncer.ini:2: pool_mode = pooled: must be"),
        ("[pgbouncer]\nauth_type = magic\n", "pgbouncer.ini:2: auth_type = magic: not a Pg"),
        ("[pgbouncer]\nquery_timeout = 5 minutes\n", "query_timeout = 5 minutes: not a number"),
        ("[databases]\npgbouncer = host=h\n[pgbouncer]\n", "pgbouncer.ini:2: the database"),
        ("[databases]\napp = host=\n[pgbouncer]\n", "pgbouncer.ini:2: host= has an empty value"),
        ("[databases]\napp = port=x\n[pgbouncer]\n", "pgbouncer.ini:2: port = x: not an integer"),
        ("[databases]\napp = pool_mode=x\n[pgbouncer]\n", "pgbouncer.ini:2: pool_mode=x"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        convert(tmp_path, text)
    assert problem in str(info.value)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        read_pgbouncer_ini(tmp_path / "nope.ini")


# -- connection strings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("host=h port=5432", [("host", "h"), ("port", "5432")]),
        ("  host=h   dbname=d  ", [("host", "h"), ("dbname", "d")]),
        ("host = h", [("host", "h")]),
        ("password='a b'", [("password", "a b")]),
        ("password='it''s'", [("password", "it's")]),
        ("password='it\\'s'", [("password", "it's")]),
        ("password='back\\slash'", [("password", "back\\slash")]),
        ("password=no'quote", [("password", "no'quote")]),
        ("connect_query='SELECT 1' user=u", [("connect_query", "SELECT 1"), ("user", "u")]),
        ("Host=h\tPORT=1", [("host", "h"), ("port", "1")]),
        ("", []),
    ],
)
def test_connection_strings_as_pgbouncer_reads_them(
    text: str, pairs: list[tuple[str, str]]
) -> None:
    assert parse_connstring(text, "x.ini:1") == pairs


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("host", "expected key=value"),
        ("=h", "expected key=value"),
        ("host=''", "empty value"),
        ("password='open", "unterminated quoted value"),
        ("password='a'b", "a blank must follow the closing quote"),
    ],
)
def test_bad_connection_strings(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        parse_connstring(text, "x.ini:7")
    assert str(info.value).startswith("x.ini:7: ")


def test_quoted_password_reaches_the_config(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        "[databases]\napp = host=h user=u password='p w''d\\'x'\n[pgbouncer]\n",
    )
    database = load(converted).databases["app"]
    assert (database.user, database.password) == ("u", "p w'd'x")


# -- %include -----------------------------------------------------------------------------


def test_include_is_relative_to_the_including_file_and_nests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(write(tmp_path, "elsewhere/x", "").parent)
    write(tmp_path, "conf/pgbouncer.ini", "[pgbouncer]\nlisten_port = 7000\n%include part/a.ini\n")
    write(tmp_path, "conf/part/a.ini", "default_pool_size = 3\n%include b.ini\nmax_client_conn=9\n")
    write(tmp_path, "conf/part/b.ini", "[databases]\napp = host=h\n[pgbouncer]\nlog_stats = 0\n")
    converted = read_pgbouncer_ini(tmp_path / "conf/pgbouncer.ini")
    raw = converted.raw
    # The section carries into and out of included files, as in PgBouncer.
    assert (raw["listen_port"], raw["default_pool_size"], raw["max_client_conn"]) == (7000, 3, 9)
    assert raw["log_stats"] is False
    assert raw["databases"] == {"app": {"host": "h"}}
    load(converted)


def test_include_falls_back_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "cwd/extra.ini", "default_pool_size = 4\n")
    monkeypatch.chdir(tmp_path / "cwd")
    converted = convert(tmp_path, "[pgbouncer]\n%include extra.ini\n", "etc/pgbouncer.ini")
    assert converted.raw["default_pool_size"] == 4
    assert "relative to the current directory" in one(converted.notes, "%include extra.ini")


def test_include_loops_are_errors_naming_the_files(tmp_path: Path) -> None:
    write(tmp_path, "a.ini", "[pgbouncer]\n%include b.ini\n")
    write(tmp_path, "b.ini", "%include c.ini\n")
    write(tmp_path, "c.ini", "\n%include a.ini\n")
    with pytest.raises(ConfigError) as info:
        read_pgbouncer_ini(tmp_path / "a.ini")
    a, b, c = (tmp_path / name for name in ("a.ini", "b.ini", "c.ini"))
    assert str(info.value) == f"{c}:2: %include a.ini: %include loop: {a} -> {b} -> {c} -> {a}"


def test_including_itself_is_a_loop(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="%include loop"):
        convert(tmp_path, "[pgbouncer]\n%include pgbouncer.ini\n")


def test_a_missing_include_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        convert(tmp_path, "[pgbouncer]\n\n%include gone.ini\n")
    assert str(info.value).startswith(f"{tmp_path / 'pgbouncer.ini'}:3: %include gone.ini: ")
    assert "file not found" in str(info.value)


def test_include_depth_is_limited(tmp_path: Path) -> None:
    for n in range(12):
        write(tmp_path, f"{n}.ini", f"%include {n + 1}.ini\n")
    write(tmp_path, "12.ini", "[pgbouncer]\n")
    with pytest.raises(ConfigError, match="nested more than 10 deep"):
        read_pgbouncer_ini(tmp_path / "0.ini")


# -- values -------------------------------------------------------------------------------


def test_value_types(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        "[databases]\napp = host=h\n[pgbouncer]\n"
        "max_client_conn = 0x20\n"  # strtol(..., 0), as PgBouncer reads integers
        "default_pool_size = 010\n"
        "server_idle_timeout = 5min\n"
        "query_wait_timeout = 1.5\n"
        "query_wait_notify = 7\n"
        "client_login_timeout = 500ms\n"
        "server_connect_timeout = 2s\n"
        "idle_transaction_timeout = 1h\n"
        "log_connections = no\n"
        "log_disconnections = off\n"
        "log_pooler_errors = TRUE\n"
        "tcp_keepalive = 1\n"
        "tcp_keepidle = 30\n"
        "tcp_user_timeout = 1000\n"
        "admin_users = admin, ops ,root\n"
        "stats_users =\n"
        "unix_socket_mode = 0700\n"
        "unix_socket_dir =\n",
    )
    raw = converted.raw
    assert (raw["max_client_conn"], raw["default_pool_size"]) == (32, 8)
    assert raw["server_idle_timeout"] == 300 and isinstance(raw["server_idle_timeout"], int)
    assert (raw["query_wait_timeout"], raw["client_login_timeout"]) == (1.5, 0.5)
    assert raw["query_wait_notify"] == 7
    assert (raw["server_connect_timeout"], raw["idle_transaction_timeout"]) == (2, 3600)
    assert (raw["log_connections"], raw["log_disconnections"]) == (False, False)
    assert (raw["log_pooler_errors"], raw["tcp_keepalive"]) == (True, True)
    assert (raw["tcp_keepidle"], raw["tcp_user_timeout"]) == (30, 1000)
    assert (raw["admin_users"], raw["stats_users"]) == (["admin", "ops", "root"], [])
    assert (raw["unix_socket_mode"], raw["unix_socket_dir"]) == ("0700", "")
    config = load(converted)
    assert config.unix_socket_mode == 0o700
    assert config.admin_users == ("admin", "ops", "root")


def test_files_become_absolute_beside_the_ini(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "etc/userlist.txt", '"app" "secret"\n')
    monkeypatch.chdir(write(tmp_path, "run/x", "").parent)
    converted = convert(
        tmp_path,
        "[databases]\napp = host=h\n[pgbouncer]\nauth_file = userlist.txt\n"
        "client_tls_ca_file = /abs/ca.pem\nauth_hba_file =\n",
        "etc/pgbouncer.ini",
    )
    raw = converted.raw
    assert raw["auth_file"] == str(tmp_path / "etc/userlist.txt")
    assert (raw["client_tls_ca_file"], raw["auth_hba_file"]) == ("/abs/ca.pem", "")
    # The TOML works from any directory: the auth_file is found and read.
    assert load(converted, tmp_path / "run/pgmux.toml").auth_file_users == {"app": "secret"}


def test_a_setting_pgmux_gained_converts_by_the_type_of_its_default(tmp_path: Path) -> None:
    converted = convert(tmp_path, "[pgbouncer]\nmax_prepared_statements = 50\n")
    assert converted.raw["max_prepared_statements"] == 50
    absent(converted.notes, "max_prepared_statements not set")


@pytest.mark.parametrize(
    ("query", "expected"),
    [("select 1", "select 1"), ("<empty>", "<empty>"), ("", "")],
)
def test_server_checks_convert_with_pgbouncers_meaning(
    tmp_path: Path, query: str, expected: str
) -> None:
    """server_check_query's three forms (a query, <empty>, empty = off) mean the same in
    pgmux, and server_check_delay comes along."""
    converted = convert(
        tmp_path,
        f"[databases]\napp = host=h\n[pgbouncer]\nserver_check_query = {query}\n"
        "server_check_delay = 10\n",
    )
    assert converted.raw["server_check_query"] == expected
    assert converted.raw["server_check_delay"] == 10
    absent(converted.unsupported, "server_check")
    config = load(converted)
    assert (config.server_check_query, config.server_check_delay) == (expected, 10.0)


# -- changes of meaning -------------------------------------------------------------------


def test_auth_types(tmp_path: Path) -> None:
    for value in ("trust", "plain", "md5", "scram-sha-256"):
        assert convert(tmp_path, f"[pgbouncer]\nauth_type = {value}\n").raw["auth_type"] == value
    trust = convert(tmp_path, "[pgbouncer]\nauth_type = trust\n")
    assert "required the name to be in auth_file" in one(trust.notes, "auth_type = trust")
    anyone = convert(tmp_path, "[pgbouncer]\nauth_type = any\n")
    assert anyone.raw["auth_type"] == "trust"
    assert "converted to trust" in one(anyone.notes, "pgbouncer.ini:2: auth_type = any")
    for value in ("pam", "ldap"):
        converted = convert(tmp_path, f"[pgbouncer]\nauth_type = {value}\n")
        assert "auth_type" not in converted.raw  # pgmux's default: passwords, fail closed
        line = one(converted.unsupported, f"auth_type = {value}")
        assert line.startswith(f"{tmp_path / 'pgbouncer.ini'}:2: ")
        assert "not supported by pgmux yet" in line


def test_listen_addr_star_and_lists(tmp_path: Path) -> None:
    assert convert(tmp_path, "[pgbouncer]\nlisten_addr = *\n").raw["listen_addr"] == "*"
    converted = convert(tmp_path, "[pgbouncer]\nlisten_addr = 127.0.0.1, ::1\n")
    assert converted.raw["listen_addr"] == "127.0.0.1,::1"


def test_tls(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        "[pgbouncer]\nclient_tls_sslmode = verify-full\nclient_tls_key_file = /k\n"
        "client_tls_cert_file = /c\nclient_tls_ca_file = /ca\nclient_tls_protocols = secure\n"
        "client_tls_ciphers = fast\nserver_tls_sslmode = Require\nserver_tls_ca_file = /sca\n",
    )
    raw = converted.raw
    assert raw["client_tls_sslmode"] == "verify-ca"  # what PgBouncer makes of verify-full
    assert "verify-ca" in one(converted.notes, "client_tls_sslmode = verify-full")
    assert (raw["client_tls_ciphers"], raw["server_tls_sslmode"]) == ("fast", "require")
    absent(converted.notes, "server_tls_sslmode not set")


def test_other_changes_of_meaning(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        "[pgbouncer]\nquery_timeout = 30\ncancel_wait_timeout = 0\nverbose = 2\n"
        "server_lifetime = 0\n",
    )
    raw = converted.raw
    assert (raw["query_timeout"], raw["log_level"]) == (30, "debug")
    assert "pgmux cancels the query" in one(converted.notes, "query_timeout = 30")
    assert "10 s" in one(converted.notes, "cancel_wait_timeout = 0")
    assert "one debug level" in one(converted.notes, "verbose = 2")
    assert "server_lifetime" not in raw
    assert "uses each server connection once" in one(converted.unsupported, "server_lifetime")
    assert convert(tmp_path, "[pgbouncer]\nserver_lifetime = 60\n").raw["server_lifetime"] == 60


# -- defaults that differ -----------------------------------------------------------------


def test_defaults_that_differ_are_written_out(tmp_path: Path) -> None:
    converted = convert(tmp_path, "[databases]\napp = host=h\n[pgbouncer]\nlisten_addr = *\n")
    raw = converted.raw
    assert raw["pool_mode"] == "session"
    assert raw["auth_type"] == "md5"
    assert raw["listen_backlog"] == 128
    assert "unix_socket_dir" not in raw
    for fragment in (
        'pool_mode = "session"',
        'auth_type = "md5"',
        "listen_backlog = 128",
        "unix_socket_dir not set",
        "server_tls_sslmode not set",
        "max_prepared_statements not set",
        "127.0.0.1:9127",
    ):
        assert one(converted.notes, fragment).startswith(f"{tmp_path / 'pgbouncer.ini'}: ")
    config = load(converted)
    assert (config.pool_mode, config.auth_type, config.listen_backlog) == ("session", "md5", 128)
    # Those PgBouncer and pgmux share are left to the default.
    assert not {"max_client_conn", "default_pool_size", "listen_port"} & set(raw)
    assert (config.max_client_conn, config.default_pool_size, config.listen_port) == (100, 20, 6432)


def test_set_values_are_kept_and_not_pinned(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        "[pgbouncer]\nlisten_addr = 10.0.0.1\npool_mode = statement\nauth_type = scram-sha-256\n"
        "listen_backlog = 4096\nunix_socket_dir = /run/pgmux\nserver_tls_sslmode = disable\n",
    )
    raw = converted.raw
    assert (raw["pool_mode"], raw["auth_type"]) == ("statement", "scram-sha-256")
    assert (raw["listen_backlog"], raw["unix_socket_dir"]) == (4096, "/run/pgmux")
    for fragment in ("pool_mode", "auth_type", "listen_backlog", "unix_socket_dir", "server_tls"):
        absent(converted.notes, f"{fragment} not set")


def test_no_listen_addr_means_the_unix_socket(tmp_path: Path) -> None:
    converted = convert(tmp_path, "[pgbouncer]\nlisten_port = 7000\n")
    assert (converted.raw["listen_addr"], converted.raw["unix_socket_dir"]) == ("127.0.0.1", "/tmp")
    assert "unix socket only" in one(converted.notes, "listen_addr not set")
    assert "only way" in one(converted.notes, "unix_socket_dir not set")


def test_database_without_host_uses_the_unix_socket_dir(tmp_path: Path) -> None:
    converted = convert(
        tmp_path, "[databases]\nfoodb =\n[pgbouncer]\nunix_socket_dir = /var/run/postgresql\n"
    )
    assert converted.raw["databases"] == {"foodb": {"host": "/var/run/postgresql"}}
    assert "no host=" in one(converted.notes, "[databases] foodb")
    default = convert(tmp_path, "[databases]\nfoodb = dbname=x\n[pgbouncer]\nlisten_addr=*\n")
    assert default.raw["databases"]["foodb"]["host"] == "/tmp"
    none = convert(tmp_path, "[databases]\nfoodb =\n[pgbouncer]\nunix_socket_dir =\n")
    assert "databases" not in none.raw
    assert "no unix socket" in one(none.unsupported, "[databases] foodb")


# -- databases and users ------------------------------------------------------------------


def test_databases(tmp_path: Path) -> None:
    write(tmp_path, "userlist.txt", '"owner" "ownerpw"\n"app" "secret"\n')
    converted = convert(
        tmp_path,
        "[databases]\n"
        "full = host=db1 port=5433 dbname=real user=owner password=pw pool_size=7 "
        "min_pool_size=2 pool_mode=STATEMENT\n"
        "forced = host=db1 user=owner\n"
        "loose = host=db1 password=ignored\n"
        "multi = host=db1,db2 dbname=m\n"
        "abstract = host=@sock\n"
        "pgmux = host=db1\n"
        "* = host=db1\n"
        "[pgbouncer]\nauth_file = userlist.txt\n",
    )
    databases = converted.raw["databases"]
    assert databases["full"] == {
        "host": "db1", "port": 5433, "dbname": "real", "user": "owner", "password": "pw",
        "pool_size": 7, "min_pool_size": 2, "pool_mode": "statement",
    }  # fmt: skip
    # PgBouncer takes a forced user's password from auth_file; pgmux from [databases].
    assert databases["forced"] == {"host": "db1", "user": "owner", "password": "ownerpw"}
    assert "copied its password from auth_file" in one(converted.notes, "[databases] forced")
    assert databases["loose"] == {"host": "db1"}
    assert "no effect" in one(converted.notes, "[databases] loose")
    # A host list keeps PgBouncer's round-robin, tried the libpq way (dead hosts skipped).
    assert databases["multi"] == {
        "host": "db1,db2", "dbname": "m", "load_balance_hosts": "round-robin"
    }  # fmt: skip
    assert "PgBouncer's default for a host list" in one(converted.notes, "host=db1,db2")
    assert not [line for line in converted.unsupported if "db1,db2" in line]
    assert set(databases) == {"full", "forced", "loose", "multi"}
    one(converted.unsupported, "host=@sock")
    assert "admin console" in one(converted.unsupported, "[databases] pgmux")
    assert "fallback database" in one(converted.unsupported, "[databases] *")
    config = load(converted)
    assert config.databases["forced"].password == "ownerpw"


def test_host_lists_and_their_settings_convert(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        "[databases]\n"
        "rw = host=db1,db2,/var/run/postgresql port=5433 load_balance_hosts=disable "
        "target_session_attrs=read-write\n"
        "ro = host=db1,db2 load_balance_hosts=Round-Robin target_session_attrs=standby\n"
        "[pgbouncer]\n",
    )
    databases = converted.raw["databases"]
    assert databases["rw"] == {
        "host": "db1,db2,/var/run/postgresql", "port": 5433,
        "load_balance_hosts": "disable", "target_session_attrs": "read-write",
    }  # fmt: skip
    assert databases["ro"] == {
        "host": "db1,db2", "load_balance_hosts": "round-robin", "target_session_attrs": "standby"
    }  # fmt: skip
    assert "stays on the host that worked last" in one(converted.notes, "[databases] rw")
    assert not [line for line in converted.notes if "[databases] ro" in line]
    assert converted.unsupported == ()
    config = load(converted)
    assert config.databases["rw"].hosts == (
        ("db1", 5433), ("db2", 5433), ("/var/run/postgresql", 5433)
    )  # fmt: skip
    with pytest.raises(ConfigError, match="load_balance_hosts = sideways: must be one of"):
        convert(tmp_path, "[databases]\na = host=h load_balance_hosts=sideways\n[pgbouncer]\n")


def test_database_options_pgmux_lacks_are_listed(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        "[databases]\n"
        "app = host=h password=hidden user=u reserve_pool=5 max_db_connections=0 "
        "max_db_client_connections=40 connect_query='SET x = 1' client_encoding=UTF8 "
        "timezone=UTC bogus=1\n"
        "[pgbouncer]\n",
    )
    where = f"{tmp_path / 'pgbouncer.ini'}:2: [databases] app: "
    assert one(converted.unsupported, "connect_query=SET x = 1").startswith(where)
    assert "not supported by pgmux yet" in one(converted.unsupported, "connect_query=SET x = 1")
    assert "ALTER DATABASE" in one(converted.unsupported, "client_encoding=UTF8")
    one(converted.unsupported, "timezone=UTC")
    assert "not a connection parameter" in one(converted.unsupported, "bogus=1")
    assert not [line for line in converted.unsupported + converted.notes if "hidden" in line]
    assert converted.raw["databases"]["app"] == {
        "host": "h", "user": "u", "password": "hidden", "reserve_pool_size": 5,
        "max_db_connections": 0, "max_db_client_connections": 40,
    }  # fmt: skip


def test_per_database_auth_user(tmp_path: Path) -> None:
    write(tmp_path, "userlist.txt", '"app" "secret"\n')
    same = convert(
        tmp_path,
        "[databases]\na = host=h auth_user=lookup\nb = host=h auth_user=lookup\n"
        "[pgbouncer]\nauth_file = userlist.txt\n",
    )
    assert same.raw["auth_user"] == "lookup"
    assert "global auth_user" in one(same.notes, "every database sets auth_user=lookup")
    # lookup has no password in auth_file: PgBouncer logs in as it without one.
    assert same.raw["users"] == {"lookup": {}}
    assert same.unsupported == ()
    load(same)
    mixed = convert(
        tmp_path,
        "[databases]\na = host=h auth_user=one\nb = host=h\n[pgbouncer]\n"
        "auth_file = userlist.txt\n",
    )
    assert "auth_user" not in mixed.raw
    assert "one global auth_user" in one(mixed.unsupported, "auth_user=one")


def test_users(tmp_path: Path) -> None:
    converted = convert(
        tmp_path,
        "[databases]\napp = host=h\n[pgbouncer]\n[users]\n"
        "app = pool_mode=Session pool_size=4 query_timeout=30 query_wait_timeout=-1 "
        "idle_transaction_timeout=1min client_idle_timeout=0 transaction_timeout=5min\n"
        "batch = max_user_connections=10 max_user_client_connections=0 reserve_pool_size=2 "
        "whatever=1\n",
    )
    users = converted.raw["users"]
    assert users == {
        "app": {"pool_mode": "session", "pool_size": 4, "query_timeout": 30,
                "idle_transaction_timeout": 60, "client_idle_timeout": 0,
                "transaction_timeout": 300},
        "batch": {"max_user_connections": 10, "max_user_client_connections": 0,
                  "reserve_pool_size": 2},
    }  # fmt: skip
    assert "means not set" in one(converted.notes, "query_wait_timeout=-1")
    assert one(converted.unsupported, "whatever=1").startswith(
        f"{tmp_path / 'pgbouncer.ini'}:6: [users] batch: "
    )
    config = load(converted)
    assert config.timeout_for("idle_transaction_timeout", "app") == 60


def test_peers_are_listed(tmp_path: Path) -> None:
    converted = convert(tmp_path, "[peers]\n1 = host=/tmp/a\n2 = host=/tmp/b\n[pgbouncer]\n")
    assert len([line for line in converted.unsupported if "[peers]" in line]) == 2
    assert one(converted.unsupported, "[peers] 2").startswith(f"{tmp_path / 'pgbouncer.ini'}:3: ")


# -- [pgbouncer] settings pgmux lacks -----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "listed_as"),
    [
        ("logfile = /var/log/pgbouncer.log", "does not apply to pgmux (pgmux logs to stderr"),
        ("pidfile = /run/pgbouncer.pid", "does not apply to pgmux"),
        ("user = postgres", "does not apply to pgmux"),
        ("so_reuseport = 1", "set workers = N"),
        ("syslog = 1", "does not apply to pgmux"),
        ("disable_pqexec = 1", "not supported by pgmux yet"),
        ("dns_max_ttl = 60", "not supported by pgmux yet"),
        ("peer_id = 1", "not supported by pgmux yet"),
        ("no_such_setting = 1", "not a PgBouncer setting pgmux knows"),
    ],
)
def test_settings_pgmux_lacks_are_listed_with_file_and_line(
    tmp_path: Path, line: str, listed_as: str
) -> None:
    converted = convert(tmp_path, f"[pgbouncer]\n\n{line}\n")
    key, value = (part.strip() for part in line.split("="))
    entry = one(converted.unsupported, f"{key} = {value}")
    assert entry.startswith(f"{tmp_path / 'pgbouncer.ini'}:3: {key} = {value}: ")
    assert listed_as in entry
    assert key not in converted.raw


@pytest.mark.parametrize(
    "line",
    [
        "logfile =",
        "syslog = 0",
        "dns_max_ttl = 15",
        "pkt_buf = 4096",
        "ignore_startup_parameters = extra_float_digits",
        "track_extra_parameters = IntervalStyle",
        "conffile = /etc/pgbouncer/pgbouncer.ini",
        "syslog_ident = pgbouncer",  # moot: syslog is off
    ],
)
def test_values_pgmux_behaves_the_same_with_are_notes(tmp_path: Path, line: str) -> None:
    converted = convert(tmp_path, f"[pgbouncer]\n{line}\n")
    key = line.split("=")[0].strip()
    assert "left out; pgmux behaves the same" in one(converted.notes, f"{key} =")
    absent(converted.unsupported, f"{key} =")


def test_moot_only_while_the_other_setting_is_off(tmp_path: Path) -> None:
    converted = convert(tmp_path, "[pgbouncer]\nsyslog = 1\nsyslog_ident = pgb\n")
    for key in ("syslog", "syslog_ident"):
        one(converted.unsupported, f"{key} =")
    syslog_off = convert(tmp_path, "[pgbouncer]\nsyslog = 0\nsyslog_ident = pgb\n")
    one(syslog_off.notes, "syslog_ident = pgb")


def test_lines_are_in_file_order(tmp_path: Path) -> None:
    write(tmp_path, "inc.ini", "pkt_buf = 1\n")
    converted = convert(
        tmp_path, "[pgbouncer]\nsyslog = 1\n%include inc.ini\nlogfile = x\n[peers]\n1 = host=h\n"
    )
    places = [line.split(": ")[0] for line in converted.unsupported]
    main = tmp_path / "pgbouncer.ini"
    assert places == [f"{main}:2", f"{main}:4", f"{main}:6", f"{tmp_path / 'inc.ini'}:1"]


# -- real files and the round trip --------------------------------------------------------


@pytest.mark.parametrize("sample", DEBIAN_SAMPLES, ids=lambda path: path.name)
def test_debian_samples_convert(sample: Path) -> None:
    if not sample.exists():
        pytest.skip(f"{sample} is not installed (apt-get install pgbouncer)")
    converted = read_pgbouncer_ini(sample)
    raw: dict[str, Any] = {**converted.raw, "databases": {"app": {"host": "/tmp"}}}
    config = parse_config(tomllib.loads(to_toml(raw)), str(sample))
    assert config.pool_mode == "session"
    assert config.auth_type == "md5"


def test_round_trip_of_everything(tmp_path: Path) -> None:
    write(tmp_path, "userlist.txt", '"app" "secret"\n"admin" "adminpw"\n"owner" "o"\n')
    write(tmp_path, "pools.ini", "default_pool_size = 7\nmin_pool_size = 1\n")
    converted = convert(
        tmp_path,
        "[databases]\n"
        "app = host=127.0.0.1 port=5432 dbname=app pool_size=10 reserve_pool=2 "
        "client_encoding=UTF8\n"
        "owned = host=/var/run/postgresql dbname=app user=owner pool_mode=transaction\n"
        "[pgbouncer]\n"
        "listen_addr = *\nlisten_port = 6543\nauth_type = scram-sha-256\n"
        "auth_file = userlist.txt\nadmin_users = admin\nstats_users = app\n"
        "max_client_conn = 2000\nserver_idle_timeout = 2min\nserver_lifetime = 1800\n"
        "query_wait_timeout = 30\nclient_tls_sslmode = disable\nserver_tls_sslmode = prefer\n"
        "logfile = /var/log/pgbouncer.log\npidfile = /run/pgbouncer.pid\n"
        "ignore_startup_parameters = extra_float_digits\nmax_prepared_statements = 100\n"
        "%include pools.ini\n"
        "[users]\napp = pool_mode=transaction pool_size=3\n",
    )
    text = to_toml(converted.raw)
    config = parse_config(tomllib.loads(text), str(tmp_path / "pgbouncer.ini"))
    assert (config.listen_addr, config.listen_port, config.auth_type) == (
        "*",
        6543,
        "scram-sha-256",
    )
    assert (config.default_pool_size, config.min_pool_size, config.max_client_conn) == (7, 1, 2000)
    assert (config.server_idle_timeout, config.server_lifetime) == (120.0, 1800.0)
    assert config.pool_mode == "session"
    assert config.auth_file_users["admin"] == "adminpw"
    assert config.databases["owned"].password == "o"
    assert config.pool_mode_for(config.databases["app"], "app") == "transaction"
    assert config.pool_mode_for(config.databases["owned"], "x") == "transaction"
    assert config.pool_mode_for(config.databases["app"], "x") == "session"
    assert config.max_prepared_statements == 100
    assert config.reserve_pool_size_for(config.databases["app"], "x") == 2
    assert len(converted.unsupported) == 3  # logfile, pidfile, client_encoding=UTF8


# -- pgmux convert ------------------------------------------------------------------------


INI = (
    "[databases]\napp = host=127.0.0.1 dbname=app client_encoding=UTF8\n"
    "[pgbouncer]\nlisten_addr = 127.0.0.1\nlogfile = pgbouncer.log\n"
)


def test_convert_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ini = write(tmp_path, "pgbouncer.ini", INI)
    assert convert_main([str(ini)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"# pgmux configuration converted from {ini} by `pgmux convert`.\n")
    raw = tomllib.loads(out)
    assert raw["databases"] == {"app": {"host": "127.0.0.1", "dbname": "app"}}
    assert raw["pool_mode"] == "session"
    tail = out[out.index("# -- Not converted") :]
    assert f"# {ini}:2: [databases] app: client_encoding=UTF8: not supported" in tail
    assert f"# {ini}:5: logfile = pgbouncer.log: does not apply" in tail
    assert "# -- Converted with a change of meaning" in out
    assert err == (
        "pgmux convert: converted 4 settings, 1 databases, 0 users; 2 settings not "
        "supported, 7 notes (listed at the end of the output)\n"
    )


def test_convert_to_a_file_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ini = write(tmp_path, "pgbouncer.ini", INI)
    out = tmp_path / "pgmux.toml"
    assert convert_main([str(ini), "-o", str(out)]) == 0
    assert f"(listed at the end of {out})" in capsys.readouterr().err
    first = out.read_text()
    assert tomllib.loads(first)["listen_addr"] == "127.0.0.1"
    out.write_text("# mine\n")
    assert convert_main([str(ini), "-o", str(out)]) == 1
    assert "exists; add --force" in capsys.readouterr().err
    assert out.read_text() == "# mine\n"
    assert convert_main([str(ini), "-o", str(out), "--force"]) == 0
    assert out.read_text() == first
    assert convert_main([str(ini), "-o", str(ini), "--force"]) == 1
    assert "is the file being converted" in capsys.readouterr().err
    assert ini.read_text() == INI


def test_convert_refuses_what_pgmux_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ini = write(tmp_path, "pgbouncer.ini", "[databases]\n* = host=h\n[pgbouncer]\n")
    out = tmp_path / "pgmux.toml"
    assert convert_main([str(ini), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "pgmux convert: cannot convert: " in err and "no [databases.NAME]" in err
    assert "not converted: " in err and "fallback database" in err
    assert not out.exists()
    bad = write(tmp_path, "bad.ini", "[pgbouncer]\nlisten_port = x\n")
    assert convert_main([str(bad)]) == 1
    assert f"{bad}:2: listen_port = x" in capsys.readouterr().err


def test_convert_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert convert_main([]) == 2
    assert "usage: pgmux convert" in capsys.readouterr().err
    assert convert_main(["--help"]) == 0
    assert "--force" in capsys.readouterr().out
