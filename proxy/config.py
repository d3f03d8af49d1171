"""The configuration: a TOML file read into frozen dataclasses, validated key by key.

Knobs carry PgBouncer's names and defaults where PgBouncer has the knob (documented in
config.example.toml). Unknown keys are errors, so a typo never silently falls back to
a default. Every error names the file, the key and what is wrong.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .auth.hba import HbaError, HbaRule, parse_hba
from .auth.userlist import UserlistError, parse_userlist

POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("trust", "plain", "md5", "scram-sha-256", "cert", "hba")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
# libpq's values (its load_balance_hosts has disable and random; PgBouncer's has
# disable and round-robin): see hosts.py.
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
LOAD_BALANCE_HOSTS = ("disable", "round-robin", "random")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
MAX_WORKERS = 64
# Virtual databases that reach pgmux's admin console instead of PostgreSQL.
ADMIN_DATABASES = ("pgbouncer", "pgmux")
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < pg_catalog.now() THEN NULL ELSE rolpassword END "
    "FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
)
# server_check_query's spelling for "send an empty query" (PgBouncer 1.24's default);
# an empty string turns the checks off, as in PgBouncer.
CHECK_EMPTY_QUERY = "<empty>"

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """``[metrics]``: the HTTP endpoint serving /metrics, /healthz and /readyz."""

    enabled: bool = True
    listen_addr: str = "127.0.0.1"
    listen_port: int = 9127


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """A ``[databases.NAME]`` entry: the name clients use and where it really lives."""

    name: str
    # One host (or unix socket directory), or several separated by commas, tried as
    # libpq tries them (see hosts.py); port is one for all of them, or one per host.
    host: str = "127.0.0.1"
    port: int | tuple[int, ...] = 5432
    dbname: str = ""
    user: str | None = None
    password: str | None = None
    pool_size: int | None = None
    min_pool_size: int | None = None
    pool_mode: str | None = None
    reserve_pool_size: int | None = None
    max_db_connections: int | None = None
    max_db_client_connections: int | None = None
    load_balance_hosts: str | None = None
    target_session_attrs: str | None = None

    @property
    def hosts(self) -> tuple[tuple[str, int], ...]:
        """Every (host, port) of the list, in the configured order."""
        names = self.host.split(",")
        port = self.port
        ports = port if isinstance(port, tuple) else (port,) * len(names)
        return tuple(zip(names, ports, strict=True))


@dataclass(frozen=True, slots=True)
class UserConfig:
    """A ``[users.NAME]`` entry: the client login and, by default, the server login.

    ``password`` is plaintext, an md5 hash (``md5...``) or a SCRAM secret
    (``SCRAM-SHA-256$...``), as PostgreSQL stores it. The other fields override the
    global or per-database value for this user's pools and connections.
    """

    name: str
    password: str | None = None
    pool_mode: str | None = None
    pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_user_connections: int | None = None
    max_user_client_connections: int | None = None
    query_wait_timeout: float | None = None
    client_idle_timeout: float | None = None
    idle_transaction_timeout: float | None = None
    query_timeout: float | None = None
    transaction_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """One leg's TLS settings (``client_tls_*`` or ``server_tls_*``)."""

    sslmode: str = "disable"
    key_file: str = ""
    cert_file: str = ""
    ca_file: str = ""
    protocols: str = "secure"
    ciphers: str = "default"


@dataclass(frozen=True, slots=True)
class Config:
    path: str = "<defaults>"
    listen_addr: str = "127.0.0.1"
    listen_port: int = 6432
    listen_backlog: int = 1024
    workers: int = 1
    pool_mode: str = "transaction"
    default_pool_size: int = 20
    min_pool_size: int = 0
    max_client_conn: int = 100
    reserve_pool_size: int = 0
    reserve_pool_timeout: float = 5.0
    max_db_connections: int = 0
    max_user_connections: int = 0
    max_db_client_connections: int = 0
    max_user_client_connections: int = 0
    server_round_robin: bool = False
    load_balance_hosts: str = "disable"
    target_session_attrs: str = "any"
    query_wait_timeout: float = 120.0
    query_wait_notify: float = 5.0
    client_login_timeout: float = 60.0
    server_connect_timeout: float = 15.0
    server_login_retry: float = 15.0
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    server_reset_query: str = "DISCARD ALL"
    server_check_query: str = CHECK_EMPTY_QUERY
    server_check_delay: float = 30.0
    cancel_wait_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    max_packet_size: int = 2147483647
    auth_type: str = "scram-sha-256"
    auth_file: str = ""
    auth_hba_file: str = ""
    auth_user: str = ""
    auth_query: str = DEFAULT_AUTH_QUERY
    auth_dbname: str = ""
    auth_query_cache_ttl: float = 10.0
    client_idle_timeout: float = 0.0
    idle_transaction_timeout: float = 0.0
    query_timeout: float = 0.0
    transaction_timeout: float = 0.0
    unix_socket_dir: str = ""
    unix_socket_mode: int = 0o777
    max_prepared_statements: int = 200
    session_state: str = "pin"
    session_state_check: str = "auto"
    client_tls: TLSConfig = field(default_factory=TLSConfig)
    server_tls: TLSConfig = field(default_factory=lambda: TLSConfig(sslmode="prefer"))
    admin_users: tuple[str, ...] = ()
    stats_users: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "text"
    log_connections: bool = True
    log_disconnections: bool = True
    log_pooler_errors: bool = True
    log_stats: bool = True
    log_statement_text: bool = True
    stats_period: float = 60.0
    idle_transaction_warn: float = 60.0
    tcp_keepalive: bool = True
    tcp_keepidle: int = 0
    tcp_keepintvl: int = 0
    tcp_keepcnt: int = 0
    tcp_user_timeout: int = 0
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    databases: Mapping[str, DatabaseConfig] = field(default_factory=dict)
    users: Mapping[str, UserConfig] = field(default_factory=dict)
    # Parsed contents of auth_file and auth_hba_file (read at load, like PgBouncer).
    auth_file_users: Mapping[str, str] = field(default_factory=dict)
    hba_rules: tuple[HbaRule, ...] = ()
    # The file's parsed TOML, for SET in the admin console (which re-parses it changed).
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def _layered(self, name: str, database: DatabaseConfig, user: str, fallback: str) -> Any:
        """The user's ``name``, else the database's, else the global ``fallback`` key
        (PgBouncer's order: a [users] value applies to all of that user's pools)."""
        user_config = self.users.get(user)
        value = getattr(user_config, name) if user_config is not None else None
        if value is None:
            value = getattr(database, name)
        return value if value is not None else getattr(self, fallback)

    def pool_mode_for(self, database: DatabaseConfig, user: str) -> str:
        """The user's pool_mode, else the database's, else the global one."""
        mode: str = self._layered("pool_mode", database, user, "pool_mode")
        return mode

    def pool_size_for(self, database: DatabaseConfig, user: str = "") -> int:
        """The user's pool_size, else the database's, else default_pool_size."""
        size: int = self._layered("pool_size", database, user, "default_pool_size")
        return size

    def reserve_pool_size_for(self, database: DatabaseConfig, user: str) -> int:
        """The user's reserve_pool_size, else the database's, else the global one."""
        size: int = self._layered("reserve_pool_size", database, user, "reserve_pool_size")
        return size

    def db_limit(self, database: DatabaseConfig, name: str) -> int:
        """max_db_connections or max_db_client_connections of ``database`` (0: none)."""
        value: int | None = getattr(database, name)
        return value if value is not None else int(getattr(self, name))

    def user_limit(self, user: str, name: str) -> int:
        """max_user_connections or max_user_client_connections of ``user`` (0: none)."""
        user_config = self.users.get(user)
        value: int | None = getattr(user_config, name) if user_config is not None else None
        return value if value is not None else int(getattr(self, name))

    def timeout_for(self, name: str, user: str) -> float:
        """A per-user timeout override, else the global value (seconds, 0 = off)."""
        user_config = self.users.get(user)
        if user_config is not None:
            value = getattr(user_config, name)
            if value is not None:
                return float(value)
        return float(getattr(self, name))

    def min_pool_size_for(self, database: DatabaseConfig) -> int:
        if database.min_pool_size is not None:
            return database.min_pool_size
        return self.min_pool_size

    def load_balance_hosts_for(self, database: DatabaseConfig) -> str:
        return database.load_balance_hosts or self.load_balance_hosts

    def target_session_attrs_for(self, database: DatabaseConfig) -> str:
        return database.target_session_attrs or self.target_session_attrs

    def unix_socket_path(self) -> str:
        """Where clients find the unix socket (PostgreSQL's name for it), when one is set."""
        return f"{self.unix_socket_dir}/.s.PGSQL.{self.listen_port}"


# -- workers ----------------------------------------------------------------------------


def worker_share(total: int, index: int, workers: int, minimum: int = 1) -> int:
    """Worker ``index``'s part of a limit of ``total`` split between ``workers`` processes.

    The parts differ by at most one and add up to ``total``, except that none is below
    ``minimum``: pool sizes and max_client_conn get at least 1 per worker, so when such a
    limit is below ``workers`` the workers together allow more than it says.
    """
    share = total // workers + (1 if index < total % workers else 0)
    return max(share, minimum)


def worker_share_warnings(config: Config) -> list[str]:
    """The limits too small to split between the workers (each worker then gets 1)."""
    workers = config.workers
    if workers == 1:
        return []
    limits = [("default_pool_size", config.default_pool_size, "server connections per pool")]
    limits += [
        (f"databases.{name}.pool_size", db.pool_size, f"server connections to {name}")
        for name, db in config.databases.items()
        if db.pool_size is not None
    ]
    limits += [
        (f"users.{name}.pool_size", user.pool_size, f"server connections per pool of {name}")
        for name, user in config.users.items()
        if user.pool_size is not None
    ]
    limits.append(("max_client_conn", config.max_client_conn, "client connections"))
    shared = [
        ("max_db_connections", "server connections per database"),
        ("max_user_connections", "server connections per user"),
        ("max_db_client_connections", "client connections per database"),
        ("max_user_client_connections", "client connections per user"),
    ]
    limits += [(key, getattr(config, key), what) for key, what in shared if getattr(config, key)]
    return [
        f"{key} = {value} is less than workers = {workers}: each worker gets at least 1, "
        f"so up to {workers} {what} in total instead of {value} (raise {key} to at least "
        f"{workers} or lower workers)"
        for key, value, what in limits
        if value < workers
    ]


# -- loading --------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read and validate the file at ``path``; raises ConfigError naming what is wrong."""
    return parse_config(read_toml(path), str(path))


def read_toml(path: str | Path) -> dict[str, Any]:
    """The file's TOML, not yet checked; raises ConfigError if it cannot be read."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def parse_config(raw: Mapping[str, Any], path: str = "<config>") -> Config:
    reader = _Reader(path, raw, "")
    defaults = Config()
    values: dict[str, Any] = {"path": path}
    values["listen_addr"] = reader.string("listen_addr", defaults.listen_addr, nonempty=True)
    values["listen_port"] = reader.integer("listen_port", defaults.listen_port, 1, 65535)
    values["listen_backlog"] = reader.integer("listen_backlog", defaults.listen_backlog, 1)
    try:
        values["workers"] = reader.integer("workers", defaults.workers, 1, MAX_WORKERS)
    except ConfigError as exc:
        cores = os.cpu_count() or 1
        raise ConfigError(
            f"{exc} (the number of pgmux processes; one per CPU core, {cores} here, is the "
            "most that helps)"
        ) from None
    values["pool_mode"] = reader.choice("pool_mode", defaults.pool_mode, POOL_MODES)
    values["default_pool_size"] = reader.integer("default_pool_size", 20, 1)
    values["min_pool_size"] = reader.integer("min_pool_size", 0, 0)
    values["max_client_conn"] = reader.integer("max_client_conn", 100, 1)
    for name in (
        "reserve_pool_size",
        "max_db_connections",
        "max_user_connections",
        "max_db_client_connections",
        "max_user_client_connections",
    ):
        values[name] = reader.integer(name, 0, 0)
    values["reserve_pool_timeout"] = reader.seconds("reserve_pool_timeout", 5.0)
    values["server_round_robin"] = reader.boolean("server_round_robin", False)
    values["load_balance_hosts"] = reader.choice(
        "load_balance_hosts", "disable", LOAD_BALANCE_HOSTS
    )
    values["target_session_attrs"] = reader.choice(
        "target_session_attrs", "any", TARGET_SESSION_ATTRS
    )
    for name in (
        "query_wait_timeout",
        "query_wait_notify",
        "client_login_timeout",
        "server_connect_timeout",
        "server_login_retry",
        "server_idle_timeout",
        "server_lifetime",
        "cancel_wait_timeout",
        "shutdown_timeout",
    ):
        values[name] = reader.seconds(name, getattr(defaults, name))
    values["server_reset_query"] = reader.string("server_reset_query", "DISCARD ALL")
    values["server_check_query"] = reader.string("server_check_query", CHECK_EMPTY_QUERY)
    if "\0" in values["server_check_query"]:
        raise reader._fail("server_check_query", "must not contain a NUL character")
    values["server_check_delay"] = reader.seconds(
        "server_check_delay", defaults.server_check_delay, zero="check every time"
    )
    values["max_packet_size"] = reader.integer("max_packet_size", 2147483647, 1024, 2147483647)
    values["auth_type"] = reader.choice("auth_type", defaults.auth_type, AUTH_TYPES)
    for name in ("auth_file", "auth_hba_file", "auth_user", "auth_dbname", "unix_socket_dir"):
        values[name] = reader.string(name, "")
    values["auth_query"] = reader.string("auth_query", DEFAULT_AUTH_QUERY, nonempty=True)
    values["unix_socket_mode"] = _octal(reader, "unix_socket_mode", "0777")
    values["max_prepared_statements"] = reader.integer("max_prepared_statements", 200, 0)
    values["session_state"] = reader.choice("session_state", "pin", ("pin", "error"))
    values["session_state_check"] = reader.choice("session_state_check", "auto", ("auto", "always"))
    for name in (
        "auth_query_cache_ttl",
        "client_idle_timeout",
        "idle_transaction_timeout",
        "query_timeout",
        "transaction_timeout",
    ):
        values[name] = reader.seconds(name, getattr(defaults, name))
    values["client_tls"] = _tls(reader, "client_tls_", "disable")
    values["server_tls"] = _tls(reader, "server_tls_", "prefer")
    values["admin_users"] = reader.string_list("admin_users")
    values["stats_users"] = reader.string_list("stats_users")
    values["log_level"] = reader.choice("log_level", "info", LOG_LEVELS)
    values["log_format"] = reader.choice("log_format", "text", LOG_FORMATS)
    for name in (
        "log_connections",
        "log_disconnections",
        "log_pooler_errors",
        "log_stats",
        "log_statement_text",
        "tcp_keepalive",
    ):
        values[name] = reader.boolean(name, getattr(defaults, name))
    # Whole seconds and a count, as the socket options take them; tcp_user_timeout in
    # milliseconds (PgBouncer's units for all four). 0: the kernel's default.
    for name in ("tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt", "tcp_user_timeout"):
        values[name] = reader.integer(name, 0, 0, 2147483647)
    if values["tcp_keepcnt"] > 127:
        raise reader._fail("tcp_keepcnt", f"must be 0 to 127, got {values['tcp_keepcnt']}")
    values["stats_period"] = reader.seconds("stats_period", defaults.stats_period)
    if values["stats_period"] < 1:
        raise reader._fail(
            "stats_period", f"must be at least 1 second, got {values['stats_period']:g}"
        )
    values["idle_transaction_warn"] = reader.seconds(
        "idle_transaction_warn", defaults.idle_transaction_warn
    )

    metrics = reader.table("metrics")
    values["metrics"] = MetricsConfig(
        enabled=metrics.boolean("enabled", True),
        listen_addr=metrics.string("listen_addr", "127.0.0.1", nonempty=True),
        listen_port=metrics.integer("listen_port", 9127, 1, 65535),
    )
    metrics.finish()

    databases: dict[str, DatabaseConfig] = {}
    for name, table in reader.tables("databases"):
        databases[name] = _database(name, table)
    values["databases"] = databases

    values["users"] = {name: _user(name, table) for name, table in reader.tables("users")}
    reader.finish()

    if not databases:
        raise ConfigError(
            f"{path}: databases: no [databases.NAME] section; clients would have nowhere to go"
        )
    for name in ADMIN_DATABASES:
        if name in databases:
            raise ConfigError(
                f"{path}: databases.{name}: the name is reserved for pgmux's admin console"
            )
    base = Path(path).parent
    if values["auth_file"]:
        values["auth_file_users"] = _read_userlist(path, base, values["auth_file"])
    if values["auth_type"] == "hba" and not values["auth_hba_file"]:
        raise ConfigError(f'{path}: auth_hba_file: required when auth_type = "hba"')
    if values["auth_hba_file"]:
        values["hba_rules"] = tuple(_read_hba(path, base, values["auth_hba_file"]))
    values["raw"] = raw
    config = Config(**values)
    _check_auth(config)
    return config


def _read_file(path: str, base: Path, key: str, name: str) -> tuple[Path, str]:
    file = base / name
    try:
        return file, file.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {key}: cannot read {file}: {exc.strerror}") from None


def _read_userlist(path: str, base: Path, name: str) -> dict[str, str]:
    file, text = _read_file(path, base, "auth_file", name)
    try:
        return parse_userlist(text, str(file))
    except UserlistError as exc:
        raise ConfigError(f"{path}: auth_file: {exc}") from None


def _read_hba(path: str, base: Path, name: str) -> list[HbaRule]:
    file, text = _read_file(path, base, "auth_hba_file", name)
    try:
        return parse_hba(text, str(file))
    except HbaError as exc:
        raise ConfigError(f"{path}: auth_hba_file: {exc}") from None


def _check_auth(config: Config) -> None:
    """Combinations that cannot work are refused at load time, not at first login."""
    path = config.path
    tls = config.client_tls
    for rule in config.hba_rules:
        for name, value in rule.options:
            if name != "clientcert" or value not in ("verify-ca", "verify-full"):
                raise ConfigError(
                    f"{path}: auth_hba_file: line {rule.line}: unsupported option {name!r} "
                    "(pgmux supports clientcert=verify-ca and clientcert=verify-full)"
                )
    methods = {config.auth_type} | {rule.method for rule in config.hba_rules}
    if any(rule.options for rule in config.hba_rules):
        methods.add("cert")  # clientcert= needs client certificates too
    if "cert" in methods and not tls.ca_file:
        raise ConfigError(
            f"{path}: auth_type: cert authentication needs client certificates: set "
            "client_tls_ca_file (and client_tls_sslmode, key and cert)"
        )
    if config.auth_user:
        user = config.auth_user
        if user not in config.users and user not in config.auth_file_users:
            raise ConfigError(
                f"{path}: auth_user: {user!r} needs a password: add [users.{user}] "
                "or a line in auth_file"
            )
    if config.auth_dbname and config.auth_dbname not in config.databases:
        raise ConfigError(
            f"{path}: auth_dbname: {config.auth_dbname!r} is not one of the [databases] "
            f"({', '.join(sorted(config.databases))})"
        )


def _octal(reader: _Reader, key: str, default: str) -> int:
    text = reader.string(key, default, nonempty=True)
    try:
        value = int(text, 8)
    except ValueError:
        raise reader._fail(key, f'must be an octal file mode like "0777", got {text!r}') from None
    if not 0 <= value <= 0o777:
        raise reader._fail(key, f"must be between 0000 and 0777, got {text!r}")
    return value


def _tls(reader: _Reader, prefix: str, default_mode: str) -> TLSConfig:
    config = TLSConfig(
        sslmode=reader.choice(prefix + "sslmode", default_mode, SSLMODES),
        key_file=reader.string(prefix + "key_file", ""),
        cert_file=reader.string(prefix + "cert_file", ""),
        ca_file=reader.string(prefix + "ca_file", ""),
        protocols=reader.string(prefix + "protocols", "secure", nonempty=True),
        ciphers=reader.string(prefix + "ciphers", "default", nonempty=True),
    )
    mode = config.sslmode
    if prefix == "client_tls_" and mode != "disable" and not (config.key_file and config.cert_file):
        raise reader._fail(
            prefix + "sslmode",
            f"{mode} needs {prefix}key_file and {prefix}cert_file (pgmux's certificate)",
        )
    if mode in ("verify-ca", "verify-full") and not config.ca_file:
        raise reader._fail(prefix + "sslmode", f"{mode} needs {prefix}ca_file")
    if bool(config.key_file) != bool(config.cert_file):
        raise reader._fail(prefix + "key_file", f"set both {prefix}key_file and {prefix}cert_file")
    return config


def _user(name: str, table: _Reader) -> UserConfig:
    config = UserConfig(
        name=name,
        password=table.optional("password", table.string),
        pool_mode=table.optional("pool_mode", lambda k, d: table.choice(k, d, POOL_MODES)),
        pool_size=table.optional("pool_size", lambda k, d: table.integer(k, d, 1)),
        reserve_pool_size=table.optional("reserve_pool_size", _non_negative(table)),
        max_user_connections=table.optional("max_user_connections", _non_negative(table)),
        max_user_client_connections=table.optional(
            "max_user_client_connections", _non_negative(table)
        ),
        query_wait_timeout=table.optional("query_wait_timeout", table.seconds),
        client_idle_timeout=table.optional("client_idle_timeout", table.seconds),
        idle_transaction_timeout=table.optional("idle_transaction_timeout", table.seconds),
        query_timeout=table.optional("query_timeout", table.seconds),
        transaction_timeout=table.optional("transaction_timeout", table.seconds),
    )
    table.finish()
    return config


def _database(name: str, table: _Reader) -> DatabaseConfig:
    host, port = _hosts(table)
    config = DatabaseConfig(
        name=name,
        host=host,
        port=port,
        dbname=table.string("dbname", name, nonempty=True),
        user=table.optional("user", table.string),
        password=table.optional("password", table.string),
        pool_size=table.optional("pool_size", lambda k, d: table.integer(k, d, 1)),
        min_pool_size=table.optional("min_pool_size", lambda k, d: table.integer(k, d, 0)),
        pool_mode=table.optional("pool_mode", lambda k, d: table.choice(k, d, POOL_MODES)),
        reserve_pool_size=table.optional("reserve_pool_size", _non_negative(table)),
        max_db_connections=table.optional("max_db_connections", _non_negative(table)),
        max_db_client_connections=table.optional("max_db_client_connections", _non_negative(table)),
        load_balance_hosts=table.optional(
            "load_balance_hosts", lambda k, d: table.choice(k, d, LOAD_BALANCE_HOSTS)
        ),
        target_session_attrs=table.optional(
            "target_session_attrs", lambda k, d: table.choice(k, d, TARGET_SESSION_ATTRS)
        ),
    )
    table.finish()
    if config.password is not None and config.user is None:
        raise ConfigError(
            f"{table.path}: {table.prefix}password: set only together with "
            f"{table.prefix}user (the forced server login)"
        )
    return config


def _hosts(table: _Reader) -> tuple[str, int | tuple[int, ...]]:
    """``host`` and ``port`` by libpq's rules: one host or several (a comma-separated
    string or a list), and one port for all of them or one per host."""
    value = table._get("host")
    if value is None:
        value = "127.0.0.1"
    if value == "" or value == []:
        raise table._fail("host", "must not be empty")
    if isinstance(value, str):
        hosts = [part.strip() for part in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        if any("," in v for v in value):
            raise table._fail("host", f"a list entry must be one host, got {value!r}")
        hosts = [v.strip() for v in value]
    else:
        raise table._fail("host", f"must be a string or a list of strings, got {_describe(value)}")
    if not all(hosts):
        raise table._fail(
            "host", f"has an empty entry in {value!r}; separate hosts with single commas"
        )
    value = table._get("port")
    if value is None:
        value = 5432
    if isinstance(value, str):
        texts = [part.strip() for part in value.split(",")]
        if not all(text.isdigit() for text in texts):
            raise table._fail(
                "port",
                f'must be a port number, a list of them or a string like "5432,5433", '
                f"got {value!r}",
            )
        value = [int(text) for text in texts]
    ports = value if isinstance(value, list) else [value]
    if not ports or any(isinstance(p, bool) or not isinstance(p, int) for p in ports):
        raise table._fail(
            "port", f"must be a port number or a list of them, got {_describe(value)}"
        )
    bad = [p for p in ports if not 1 <= p <= 65535]
    if bad:
        raise table._fail("port", f"must be 1 to 65535, got {bad[0]}")
    if len(ports) not in (1, len(hosts)):
        raise table._fail(
            "port",
            f"{len(ports)} ports for {len(hosts)} hosts ({', '.join(hosts)}): give one port "
            "for every host, or one per host in the same order (libpq's rule)",
        )
    port: int | tuple[int, ...] = ports[0] if len(set(ports)) == 1 else tuple(ports)
    return ",".join(hosts), port


def _non_negative(table: _Reader) -> Callable[[str, Any], int]:
    return lambda key, default: table.integer(key, default, 0)


class _Reader:
    """Typed access to one TOML table that remembers which keys were used."""

    def __init__(self, path: str, raw: Mapping[str, Any], prefix: str) -> None:
        self.path = path
        self.raw = raw
        self.prefix = prefix
        self.used: set[str] = set()

    def _fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.prefix}{key}: {problem}")

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.raw.get(key)

    def optional(self, key: str, read: Callable[[str, Any], T]) -> T | None:
        if key not in self.raw:
            self.used.add(key)
            return None
        return read(key, None)

    def string(self, key: str, default: Any, *, nonempty: bool = False) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._fail(key, f"must be a string, got {_describe(value)}")
        if nonempty and not value:
            raise self._fail(key, "must not be empty")
        return value

    def integer(self, key: str, default: Any, minimum: int, maximum: int | None = None) -> Any:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, got {_describe(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"{minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise self._fail(key, f"must be {bound}, got {value}")
        return value

    def seconds(self, key: str, default: float, *, zero: str = "off") -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"must be a number of seconds, got {_describe(value)}")
        if value < 0:
            raise self._fail(
                key, f"must be 0 ({zero}) or a positive number of seconds, got {value}"
            )
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {_describe(value)}")
        return value

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> Any:
        value = self.string(key, default)
        if value is not None and value not in choices:
            raise self._fail(key, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def string_list(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, f"must be a list of strings, got {_describe(value)}")
        return tuple(value)

    def table(self, key: str) -> _Reader:
        value = self._get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self._fail(key, f"must be a table ([{self.prefix}{key}]), got {_describe(value)}")
        return _Reader(self.path, value, f"{self.prefix}{key}.")

    def tables(self, key: str) -> list[tuple[str, _Reader]]:
        """The sub-tables of ``[key.NAME]``, in file order."""
        outer = self.table(key)
        result = []
        for name in outer.raw:
            result.append((name, outer.table(name)))
        return result

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise self._fail(unknown[0], "unknown setting (check the spelling against "
                             "config.example.toml)")  # fmt: skip


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


# -- SHOW CONFIG and SET ------------------------------------------------------------------

# Keys a running pgmux cannot take from RELOAD or SET: they shape its sockets and
# processes. A reload that changes them logs that a restart is needed, and keeps them.
RESTART_KEYS = frozenset((
    "listen_addr", "listen_port", "listen_backlog", "workers", "unix_socket_dir",
    "unix_socket_mode", "metrics.enabled", "metrics.listen_addr", "metrics.listen_port",
))  # fmt: skip
# Config fields that are not top-level settings (tables, derived data, bookkeeping).
_NOT_ITEMS = frozenset((
    "path", "metrics", "client_tls", "server_tls", "databases", "users", "auth_file_users",
    "hba_rules", "raw",
))  # fmt: skip
_TLS_FIELDS = ("sslmode", "key_file", "cert_file", "ca_file", "protocols", "ciphers")


@dataclass(frozen=True, slots=True)
class ConfigItem:
    """One setting as SHOW CONFIG lists it and SET names it."""

    key: str  # "default_pool_size", "client_tls_sslmode", "metrics.listen_port"
    path: tuple[str, ...]  # where its value lives: ("client_tls", "sslmode")
    default: Any

    @property
    def live(self) -> bool:
        return self.key not in RESTART_KEYS

    def value(self, config: Config) -> Any:
        value: Any = config
        for name in self.path:
            value = getattr(value, name)
        return value

    def shown(self, config: Config) -> str | None:
        return format_value(self.key, self.value(config))

    @property
    def default_text(self) -> str | None:
        return format_value(self.key, self.default)

    def parse(self, text: str) -> Any:
        """A SET value (always text) as the TOML value the key takes."""
        kind = self.default
        if self.key == "unix_socket_mode":  # an int inside, octal text in the file
            return text
        if isinstance(kind, bool):
            lowered = text.strip().lower()
            if lowered in ("1", "true", "on", "yes"):
                return True
            if lowered in ("0", "false", "off", "no"):
                return False
            raise ConfigError(f"{self.key}: must be true or false (or on/off, 1/0), got {text!r}")
        if isinstance(kind, int):
            try:
                return int(text)
            except ValueError:
                raise ConfigError(f"{self.key}: must be an integer, got {text!r}") from None
        if isinstance(kind, float):
            try:
                number = float(text)
            except ValueError:
                raise ConfigError(
                    f"{self.key}: must be a number of seconds, got {text!r}"
                ) from None
            return int(number) if number.is_integer() else number
        if isinstance(kind, tuple):
            return [part for part in text.replace(",", " ").split() if part]
        return text


def format_value(key: str, value: Any) -> str | None:
    """PgBouncer's SHOW CONFIG style: booleans 0/1, seconds with %g, lists with
    commas, an unset string as NULL."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(value) or None
    if key == "unix_socket_mode" and isinstance(value, int):
        return f"0{value:o}"
    if value == "":
        return None
    return str(value)


def config_items() -> list[ConfigItem]:
    """Every top-level setting, sorted by key (as PgBouncer's SHOW CONFIG)."""
    defaults = Config()
    items = []
    for name in Config.__dataclass_fields__:
        if name not in _NOT_ITEMS:
            items.append(ConfigItem(name, (name,), getattr(defaults, name)))
    for leg in ("client_tls", "server_tls"):
        tls = getattr(defaults, leg)
        for name in _TLS_FIELDS:
            items.append(ConfigItem(f"{leg}_{name}", (leg, name), getattr(tls, name)))
    for name in MetricsConfig.__dataclass_fields__:
        items.append(
            ConfigItem(f"metrics.{name}", ("metrics", name), getattr(defaults.metrics, name))
        )
    return sorted(items, key=lambda item: item.key)


def set_value(config: Config, key: str, text: str) -> Config:
    """The running config with ``key`` set to ``text`` (the admin console's SET).

    The value is checked exactly as if it were in the file. Raises ConfigError for an
    unknown key, a key that needs a restart, or a bad value.
    """
    items = {item.key: item for item in config_items()}
    item = items.get(key.lower())
    if item is None:
        raise ConfigError(f"unknown setting {key!r} (SHOW CONFIG lists them)")
    if not item.live:
        raise ConfigError(
            f"{item.key} cannot change while pgmux runs: edit {config.path} and restart pgmux"
        )
    raw = dict(config.raw)
    if item.key.startswith("metrics."):
        raw["metrics"] = {**raw.get("metrics", {}), item.path[1]: item.parse(text)}
    else:
        raw[item.key] = item.parse(text)
    return parse_config(raw, config.path)
