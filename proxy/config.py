"""The configuration: a TOML file read into frozen dataclasses, validated key by key.

Knobs carry PgBouncer's names and defaults where PgBouncer has the knob (documented in
config.example.toml). Unknown keys are errors, so a typo never silently falls back to
a default. Every error names the file, the key and what is wrong.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("trust", "md5", "scram-sha-256")
LOG_LEVELS = ("debug", "info", "warning", "error")

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration file is missing, unreadable or invalid."""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen_addr: str = "127.0.0.1"
    listen_port: int = 9127


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """A ``[databases.NAME]`` entry: the name clients use and where it really lives."""

    name: str
    host: str = "127.0.0.1"
    port: int = 5432
    dbname: str = ""
    user: str | None = None
    password: str | None = None
    pool_size: int | None = None
    min_pool_size: int | None = None
    pool_mode: str | None = None


@dataclass(frozen=True, slots=True)
class UserConfig:
    """A ``[users.NAME]`` entry: the client login and, by default, the server login."""

    name: str
    password: str | None = None
    pool_mode: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    path: str = "<defaults>"
    listen_addr: str = "127.0.0.1"
    listen_port: int = 6432
    listen_backlog: int = 1024
    pool_mode: str = "transaction"
    default_pool_size: int = 20
    min_pool_size: int = 0
    max_client_conn: int = 100
    query_wait_timeout: float = 120.0
    client_login_timeout: float = 60.0
    server_connect_timeout: float = 15.0
    server_login_retry: float = 15.0
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    server_reset_query: str = "DISCARD ALL"
    cancel_wait_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    max_packet_size: int = 2147483647
    auth_type: str = "scram-sha-256"
    admin_users: tuple[str, ...] = ()
    stats_users: tuple[str, ...] = ()
    log_level: str = "info"
    log_connections: bool = True
    log_disconnections: bool = True
    tcp_keepalive: bool = True
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    databases: Mapping[str, DatabaseConfig] = field(default_factory=dict)
    users: Mapping[str, UserConfig] = field(default_factory=dict)

    def pool_mode_for(self, database: DatabaseConfig, user: str) -> str:
        """The user's pool_mode, else the database's, else the global one."""
        user_config = self.users.get(user)
        if user_config is not None and user_config.pool_mode is not None:
            return user_config.pool_mode
        return database.pool_mode or self.pool_mode

    def pool_size_for(self, database: DatabaseConfig) -> int:
        return database.pool_size if database.pool_size is not None else self.default_pool_size

    def min_pool_size_for(self, database: DatabaseConfig) -> int:
        if database.min_pool_size is not None:
            return database.min_pool_size
        return self.min_pool_size


# -- loading --------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read and validate the file at ``path``; raises ConfigError naming what is wrong."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, str(path))


def parse_config(raw: Mapping[str, Any], path: str = "<config>") -> Config:
    reader = _Reader(path, raw, "")
    defaults = Config()
    values: dict[str, Any] = {"path": path}
    values["listen_addr"] = reader.string("listen_addr", defaults.listen_addr, nonempty=True)
    values["listen_port"] = reader.integer("listen_port", defaults.listen_port, 1, 65535)
    values["listen_backlog"] = reader.integer("listen_backlog", defaults.listen_backlog, 1)
    values["pool_mode"] = reader.choice("pool_mode", defaults.pool_mode, POOL_MODES)
    values["default_pool_size"] = reader.integer("default_pool_size", 20, 1)
    values["min_pool_size"] = reader.integer("min_pool_size", 0, 0)
    values["max_client_conn"] = reader.integer("max_client_conn", 100, 1)
    for name in (
        "query_wait_timeout",
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
    values["max_packet_size"] = reader.integer("max_packet_size", 2147483647, 1024, 2147483647)
    values["auth_type"] = reader.choice("auth_type", defaults.auth_type, AUTH_TYPES)
    values["admin_users"] = reader.string_list("admin_users")
    values["stats_users"] = reader.string_list("stats_users")
    values["log_level"] = reader.choice("log_level", "info", LOG_LEVELS)
    values["log_connections"] = reader.boolean("log_connections", True)
    values["log_disconnections"] = reader.boolean("log_disconnections", True)
    values["tcp_keepalive"] = reader.boolean("tcp_keepalive", True)

    metrics = reader.table("metrics")
    values["metrics"] = MetricsConfig(
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
    return Config(**values)


def _user(name: str, table: _Reader) -> UserConfig:
    config = UserConfig(
        name=name,
        password=table.optional("password", table.string),
        pool_mode=table.optional("pool_mode", lambda k, d: table.choice(k, d, POOL_MODES)),
    )
    table.finish()
    return config


def _database(name: str, table: _Reader) -> DatabaseConfig:
    config = DatabaseConfig(
        name=name,
        host=table.string("host", "127.0.0.1", nonempty=True),
        port=table.integer("port", 5432, 1, 65535),
        dbname=table.string("dbname", name, nonempty=True),
        user=table.optional("user", table.string),
        password=table.optional("password", table.string),
        pool_size=table.optional("pool_size", lambda k, d: table.integer(k, d, 1)),
        min_pool_size=table.optional("min_pool_size", lambda k, d: table.integer(k, d, 0)),
        pool_mode=table.optional("pool_mode", lambda k, d: table.choice(k, d, POOL_MODES)),
    )
    table.finish()
    if config.password is not None and config.user is None:
        raise ConfigError(
            f"{table.path}: {table.prefix}password: set only together with "
            f"{table.prefix}user (the forced server login)"
        )
    return config


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

    def seconds(self, key: str, default: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, f"must be a number of seconds, got {_describe(value)}")
        if value < 0:
            raise self._fail(key, f"must be 0 (off) or a positive number of seconds, got {value}")
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
