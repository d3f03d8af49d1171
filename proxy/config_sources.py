"""Where the running configuration comes from, and in which order the sources win.

defaults < the file (``--config``/PGMUX_CONFIG TOML, or ``--pgbouncer-ini``)
< ``--upstream``/PGMUX_UPSTREAM URLs < PGMUX_<KEY> environment variables < ``--set``.
Every source is turned into the same TOML-shaped dict and checked by ``parse_config``,
so a value from the environment is validated exactly as one from the file, and an
error names where the bad value came from. ``describe`` renders the effective config
(for ``--check``) as TOML with each value's origin and the secrets masked.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .config import (
    Config,
    ConfigError,
    ConfigItem,
    DatabaseConfig,
    UserConfig,
    config_items,
    parse_config,
    read_toml,
)
from .toml_out import toml_key, toml_value

ENV_PREFIX = "PGMUX_"
# PGMUX_ variables that choose sources rather than set a key.
ENV_CONFIG = "PGMUX_CONFIG"
ENV_UPSTREAM = "PGMUX_UPSTREAM"
ENV_PGBOUNCER_INI = "PGMUX_PGBOUNCER_INI"
# How a supervisor hands its sources to its workers: the environment, not argv, so
# passwords in --upstream or --set do not show in ps.
ENV_WORKER_SOURCE = "PGMUX_WORKER_SOURCE"
_SOURCE_VARS = (ENV_CONFIG, ENV_UPSTREAM, ENV_PGBOUNCER_INI, ENV_WORKER_SOURCE)
# Read by the test suite and the demo, not settings: never warned about.
_NOT_SETTINGS = frozenset(("PGMUX_PG_BIN",))
# What Kubernetes puts in every pod's environment for a Service named "pgmux" (its
# docker-link variables): not settings either.
_SERVICE_LINK = re.compile(
    r"PGMUX_(SERVICE_(HOST|PORT)(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?)?)"
)
MASK = "********"
# URL query parameters --upstream understands, and the key each one sets.
_URL_PARAMS = {
    "sslmode": "server_tls_sslmode",
    "pool_size": "databases.pool_size",
    "min_pool_size": "databases.min_pool_size",
    "pool_mode": "databases.pool_mode",
    "target_session_attrs": "databases.target_session_attrs",
    "load_balance_hosts": "databases.load_balance_hosts",
}
# Of those, the ones that take text rather than a number.
_URL_TEXT_PARAMS = frozenset(("pool_mode", "target_session_attrs", "load_balance_hosts"))


@dataclass(frozen=True, slots=True)
class Loaded:
    """The checked config, where each non-default value came from, and warnings."""

    config: Config
    origins: Mapping[str, str]  # dotted key -> "PGMUX_X", "--set", "--upstream", file name
    warnings: tuple[str, ...] = ()
    # From --pgbouncer-ini: settings converted with a change of meaning, defaults pinned.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """The sources one pgmux process reads its config from, re-read on every reload."""

    file: str | None = None  # a TOML file
    pgbouncer_ini: str | None = None  # or a PgBouncer ini file
    upstreams: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()
    environ: Mapping[str, str] = field(default_factory=dict)  # the PGMUX_<KEY> variables

    @classmethod
    def from_command_line(
        cls,
        *,
        file: str | None,
        pgbouncer_ini: str | None,
        upstreams: list[str],
        sets: list[str],
        environ: Mapping[str, str],
    ) -> ConfigSource:
        """Command-line choices first, then PGMUX_CONFIG / PGMUX_PGBOUNCER_INI /
        PGMUX_UPSTREAM (one URL, or several separated by spaces)."""
        handed = environ.get(ENV_WORKER_SOURCE)
        if handed:
            return cls.from_json(handed, environ)
        if file is None and pgbouncer_ini is None:
            file = environ.get(ENV_CONFIG) or None
            pgbouncer_ini = environ.get(ENV_PGBOUNCER_INI) or None
        if file is not None and pgbouncer_ini is not None:
            raise ConfigError(
                "give either a TOML config (--config / PGMUX_CONFIG) or a PgBouncer one "
                "(--pgbouncer-ini / PGMUX_PGBOUNCER_INI), not both"
            )
        if not upstreams:
            upstreams = environ.get(ENV_UPSTREAM, "").split()
        if file is None and pgbouncer_ini is None and not upstreams:
            raise ConfigError(
                "nothing to proxy: give --upstream postgres://user:password@host:5432/dbname "
                "(or PGMUX_UPSTREAM), --config pgmux.toml (or PGMUX_CONFIG), or "
                "--pgbouncer-ini pgbouncer.ini"
            )
        return cls(
            file=_absolute(file),
            pgbouncer_ini=_absolute(pgbouncer_ini),
            upstreams=tuple(upstreams),
            sets=tuple(sets),
            environ={k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)},
        )

    def to_json(self) -> str:
        """The command-line part, for a worker (the environment it inherits anyway)."""
        return json.dumps({
            "file": self.file, "pgbouncer_ini": self.pgbouncer_ini,
            "upstreams": list(self.upstreams), "sets": list(self.sets),
        })  # fmt: skip

    @classmethod
    def from_json(cls, text: str, environ: Mapping[str, str]) -> ConfigSource:
        data = json.loads(text)
        return cls(
            file=data["file"],
            pgbouncer_ini=data["pgbouncer_ini"],
            upstreams=tuple(data["upstreams"]),
            sets=tuple(data["sets"]),
            environ={k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)},
        )

    @property
    def name(self) -> str:
        """How log lines and errors name the configuration."""
        if self.file is not None:
            return self.file
        if self.pgbouncer_ini is not None:
            return self.pgbouncer_ini
        return "the command line and environment"

    def load(self) -> Loaded:
        """Read every source again and check the result; raises ConfigError."""
        raw: dict[str, Any] = {}
        origins: dict[str, str] = {}
        warnings: list[str] = []
        notes: tuple[str, ...] = ()
        if self.file is not None:
            raw = read_toml(self.file)
            _note_origins(origins, raw, (), Path(self.file).name)
        elif self.pgbouncer_ini is not None:
            from .pgbouncer_ini import read_pgbouncer_ini

            converted = read_pgbouncer_ini(self.pgbouncer_ini)
            raw = copy.deepcopy(converted.raw)
            _note_origins(origins, raw, (), Path(self.pgbouncer_ini).name)
            warnings += [f"{line} (ignored)" for line in converted.unsupported]
            notes = converted.notes
        for url in self.upstreams:
            _apply_upstream(raw, origins, url, warnings)
        items = {item.key: item for item in config_items()}
        by_env = {ENV_PREFIX + key.upper().replace(".", "_"): item for key, item in items.items()}
        for name in sorted(self.environ):
            if name in _SOURCE_VARS or name in _NOT_SETTINGS or _SERVICE_LINK.fullmatch(name):
                continue
            item = by_env.get(name)
            if item is None:
                warnings.append(
                    f"ignoring {name}: no setting is called "
                    f"{name[len(ENV_PREFIX) :].lower()!r} (docs/configuration.md lists them)"
                )
                continue
            try:
                value = item.parse(self.environ[name])
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            _put(raw, item.key.split("."), value)
            origins[item.key] = name
        for assignment in self.sets:
            key, value = _parse_set(assignment, items)
            _put(raw, key.split("."), value)
            origins[key] = "--set"
        try:
            config = parse_config(raw, self.name)
        except ConfigError as exc:
            raise ConfigError(_blame(str(exc), origins)) from None
        return Loaded(config, origins, tuple(warnings), notes)


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def _note_origins(origins: dict[str, str], table: Mapping[str, Any], path: tuple[str, ...],
                  origin: str) -> None:  # fmt: skip
    for key, value in table.items():
        if isinstance(value, Mapping):
            _note_origins(origins, value, (*path, key), origin)
        else:
            origins[".".join((*path, key))] = origin


def _put(raw: dict[str, Any], path: list[str], value: Any) -> None:
    table = raw
    for part in path[:-1]:
        nested = table.get(part)
        if not isinstance(nested, dict):
            nested = table[part] = {}
        table = nested
    table[path[-1]] = value


def _blame(message: str, origins: Mapping[str, str]) -> str:
    """Add which variable or option set the key a ConfigError names."""
    for key, origin in origins.items():
        if f": {key}:" in message and (origin.startswith(ENV_PREFIX) or origin.startswith("--")):
            return f"{message} (set by {origin})"
    return message


# -- --upstream ---------------------------------------------------------------------------


def _apply_upstream(raw: dict[str, Any], origins: dict[str, str], url: str,
                    warnings: list[str]) -> None:  # fmt: skip
    """One ``postgres://user:password@host:port/dbname?sslmode=...`` as a database and
    its user: clients log in to pgmux with the same name and password. As in libpq,
    the URL may name several hosts, ``postgres://u:p@h1:5432,h2:5433/db``."""
    shown = mask_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unbalanced [ or ] around an IPv6 address
        raise ConfigError(f"--upstream {shown}: not a URL: {exc}") from None
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError(
            f"--upstream {shown}: must start with postgres:// or postgresql://, "
            "e.g. postgres://app:secret@db.internal:5432/app"
        )
    user = unquote(parts.username or "")
    if not user:
        raise ConfigError(
            f"--upstream {shown}: name the user, as in postgres://USER:password@host/dbname"
        )
    dbname = unquote(parts.path.lstrip("/")) or user  # libpq's default database
    database: dict[str, Any] = {"dbname": dbname}
    database.update(_url_hosts(shown, parts.netloc.rpartition("@")[2]))
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "host":  # a unix socket directory: ?host=/var/run/postgresql
            database["host"] = value
        elif name == "port":
            database["port"] = value if "," in value else _url_int(shown, name, value)
        elif name not in _URL_PARAMS:
            raise ConfigError(
                f"--upstream {shown}: unknown parameter {name!r} (known: host, port, "
                f"{', '.join(_URL_PARAMS)})"
            )
        elif _URL_PARAMS[name].startswith("databases."):
            field_name = _URL_PARAMS[name].split(".", 1)[1]
            text = name in _URL_TEXT_PARAMS
            database[field_name] = value if text else _url_int(shown, name, value)
        else:
            raw[_URL_PARAMS[name]] = value
            origins[_URL_PARAMS[name]] = "--upstream"
    databases = raw.setdefault("databases", {})
    databases[dbname] = {**databases.get(dbname, {}), **database}
    _note_origins(origins, database, ("databases", dbname), "--upstream")
    users = raw.setdefault("users", {})
    user_table = users.setdefault(user, {})
    if parts.password is not None:
        user_table["password"] = unquote(parts.password)
        origins[f"users.{user}.password"] = "--upstream"
    elif "auth_type" not in raw and "password" not in user_table:
        raw["auth_type"] = "trust"
        origins["auth_type"] = "--upstream"
        warnings.append(
            f"--upstream {shown} has no password: clients get in without one "
            '(auth_type = "trust"); put the password in the URL, or set auth_type'
        )


def _url_hosts(shown: str, hostlist: str) -> dict[str, Any]:
    """The URL's ``host[:port]`` list as ``host`` and ``port`` (none when it names no
    host); a host without a port gets 5432, as in libpq."""
    if not hostlist:
        return {}
    hosts: list[str] = []
    ports: list[int | None] = []
    for entry in hostlist.split(","):
        if entry.startswith("["):  # [IPv6]:port
            host, bracket, rest = entry[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ConfigError(f"--upstream {shown}: {entry!r} is not a host or [address]:port")
            port_text = rest[1:]
        else:
            host, _, port_text = entry.partition(":")
        host = unquote(host)
        if not host:
            raise ConfigError(f"--upstream {shown}: an empty host in the list {hostlist!r}")
        port = None
        if port_text:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise ConfigError(f"--upstream {shown}: the port is not a number from 1 to 65535")
            port = int(port_text)
        hosts.append(host)
        ports.append(port)
    out: dict[str, Any] = {"host": hosts[0] if len(hosts) == 1 else ",".join(hosts)}
    if any(port is not None for port in ports):
        full = [5432 if port is None else port for port in ports]
        out["port"] = full[0] if len(set(full)) == 1 else full
    return out


def _url_int(shown: str, name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--upstream {shown}: {name} must be a number, got {value!r}") from None


def mask_url(url: str) -> str:
    """The URL with its password replaced, for log lines and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(//[^:/@]*:)[^@/]*@", rf"\g<1>{MASK}@", url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    return parts._replace(netloc=netloc).geturl()


# -- --set ------------------------------------------------------------------------------


def _parse_set(assignment: str, items: Mapping[str, ConfigItem]) -> tuple[str, Any]:
    """``key=value`` for any setting: top-level and ``metrics.*`` keys take the value
    as SET in the admin console does; ``databases.NAME.KEY`` and ``users.NAME.KEY``
    by the field's type."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: write it as key=value")
    item = items.get(key)
    if item is not None:
        try:
            return item.key, item.parse(text)
        except ConfigError as exc:
            raise ConfigError(f"--set {exc}") from None
    section, _, rest = key.partition(".")
    name, _, field_name = rest.rpartition(".")
    kinds = {"databases": DatabaseConfig, "users": UserConfig}.get(section)
    if kinds is None or not name or not field_name:
        raise ConfigError(
            f"--set {key}: unknown setting (top-level keys as in SHOW CONFIG, or "
            "databases.NAME.KEY / users.NAME.KEY)"
        )
    annotation = {f.name: str(f.type) for f in fields(kinds) if f.name != "name"}.get(field_name)
    if annotation is None:
        raise ConfigError(f"--set {key}: [{section}] entries have no setting {field_name!r}")
    if field_name == "port" and "," in text:
        return key, text  # one port per host: parse_config reads "5432,5433"
    if annotation.startswith(("int", "float")):
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"--set {key}: must be a number, got {text!r}") from None
        return key, int(number) if annotation.startswith("int") else number
    return key, text


# -- --check ------------------------------------------------------------------------------


def describe(loaded: Loaded) -> str:
    """The effective config as TOML, every setting with its value, non-defaults marked
    with where they came from, passwords masked. It loads back as the same config,
    but for the masked passwords."""
    config, origins = loaded.config, loaded.origins
    lines: list[str] = []
    rows = []
    for item in config_items():
        value = _toml_ready(item.key, item.value(config))
        rows.append((item.key, value, origins.get(item.key, "")))
    top = [(key, value, origin) for key, value, origin in rows if "." not in key]
    lines += _aligned(top)
    metrics = [(key.split(".", 1)[1], value, origins.get(key, ""))
               for key, value, _ in rows if key.startswith("metrics.")]  # fmt: skip
    lines += ["", "[metrics]", *_aligned(metrics)]
    for section, entries in (("databases", config.databases), ("users", config.users)):
        for name, entry in entries.items():
            prefix = f"{section}.{name}"
            table = []
            for f in fields(entry):
                value = getattr(entry, f.name)
                if f.name == "name" or value is None:
                    continue
                if f.name == "password":
                    value = MASK
                table.append((f.name, value, origins.get(f"{prefix}.{f.name}", "")))
            lines += ["", f"[{section}.{toml_key(name)}]", *_aligned(table)]
    return "\n".join(lines) + "\n"


def _toml_ready(key: str, value: Any) -> Any:
    if key == "unix_socket_mode":
        return f"0{value:o}"
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _aligned(rows: list[tuple[str, Any, str]]) -> list[str]:
    texts = [(f"{toml_key(key)} = {toml_value(value)}", origin) for key, value, origin in rows]
    # Comments line up, except behind the few long values (auth_query).
    width = max((len(text) for text, _ in texts if len(text) <= 48), default=0)
    return [f"{text:<{width}}  # {origin}" if origin else text for text, origin in texts]
