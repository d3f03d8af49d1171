"""PgBouncer's pgbouncer.ini, read unchanged, as the TOML-shaped dict ``parse_config`` takes.

The reader follows PgBouncer's own: libusual's ini parser (sections, ``;``/``#`` comment
lines, ``%include``) and loader.c's connection strings (single quotes, ``''`` and ``\\'``).
A setting pgmux has converts under pgmux's name (the same as PgBouncer's); one it lacks
is listed in ``unsupported`` with its file and line, never dropped; one that converts
with a change of meaning, or a default that differs between the two, gets a note.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .auth.userlist import UserlistError, parse_userlist
from .config import (
    ADMIN_DATABASES,
    AUTH_TYPES,
    LOAD_BALANCE_HOSTS,
    POOL_MODES,
    SSLMODES,
    TARGET_SESSION_ATTRS,
    ConfigError,
    DatabaseConfig,
    UserConfig,
    config_items,
)
from .pgbouncer_settings import (
    DB_MISSING,
    MISSING,
    SAME_NAME,
    UNSET_TIMEOUT,
    USER_MISSING,
    Missing,
)

MAX_INCLUDE_DEPTH = 10  # libusual's MAX_INCLUDE
SECTIONS = ("databases", "pgbouncer", "users", "peers")
# PgBouncer's defaults where pgmux's differ: written out when the file leaves them unset.
PGBOUNCER_POOL_MODE = "session"
PGBOUNCER_AUTH_TYPE = "md5"
PGBOUNCER_LISTEN_BACKLOG = 128
PGBOUNCER_UNIX_SOCKET_DIR = "/tmp"
PGBOUNCER_LOAD_BALANCE_HOSTS = "round-robin"  # for a [databases] host list

_BARE_KEY = re.compile(r"[A-Za-z0-9_.*-]*")  # libusual: isalnum() or one of "_.-*"
_SECONDS = re.compile(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|ms|s|min|h|d)?")
_UNITS = {None: 1.0, "us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_TRUE = ("1", "yes", "on", "true")
_FALSE = ("0", "no", "off", "false")


@dataclass(frozen=True)
class Converted:
    """A pgbouncer.ini as pgmux config: ``raw`` for ``parse_config``, and one line per
    setting left out (``unsupported``) or converted with a change of meaning (``notes``),
    each starting with the file and line it came from."""

    raw: dict[str, Any]
    unsupported: tuple[str, ...]
    notes: tuple[str, ...]


def read_pgbouncer_ini(path: str | Path) -> Converted:
    """Read the PgBouncer config at ``path`` (and its ``%include`` files) and convert it.

    Raises ConfigError naming the file and line for what PgBouncer would refuse too
    (a syntax error, an unknown section, a value of the wrong type) and for an
    ``%include`` that is missing or loops.
    """
    ini = _Ini()
    ini.read(Path(path))
    if not ini.saw_main_section:
        raise ConfigError(f"{path}: no [pgbouncer] section: is this a pgbouncer.ini?")
    return _Converter(ini, str(path)).run()


# -- the ini file -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Setting:
    """One ``key = value`` line, and where it is."""

    key: str
    value: str
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


class _Ini:
    """The settings of every section, the last line for a key winning (as in PgBouncer).

    Keys of ``[pgbouncer]`` are lowercased; database, user and peer names keep their case.
    The current section carries into and out of ``%include`` files, as in PgBouncer.
    """

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, _Setting]] = {name: {} for name in SECTIONS}
        self.section: str | None = None
        self.saw_main_section = False
        self.notes: list[str] = []

    def read(self, path: Path, chain: tuple[tuple[str, str], ...] = (), context: str = "") -> None:
        """Read ``path``; ``chain`` holds the (name, real path) of each file including it,
        and ``context`` starts error messages about an included one (file:line: %include)."""
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the text
        except FileNotFoundError:
            raise ConfigError(f"{context}{path}: file not found") from None
        except OSError as exc:
            raise ConfigError(f"{context}{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{context}{path}: not UTF-8 text: {exc.reason}") from None
        chain = (*chain, (str(path), os.path.realpath(path)))
        for number, line in enumerate(text.split("\n"), start=1):
            self._line(line, path, number, chain)

    def _line(self, line: str, path: Path, number: int, chain: tuple[tuple[str, str], ...]) -> None:
        where = f"{path}:{number}"
        rest = line.strip()
        while rest:
            if rest.startswith("%include") and rest[8:9] in (" ", "\t"):
                self._include(rest[9:].strip(), path, where, chain)
                return
            if rest[0] in "#;":
                return
            if rest[0] != "[":
                self._key_value(rest, path, number)
                return
            end = rest.find("]")
            if end < 0:
                raise ConfigError(f"{where}: syntax error: {rest!r} has no closing ]")
            name = rest[1:end].strip().lower()
            if name not in SECTIONS:
                raise ConfigError(
                    f"{where}: unknown section [{rest[1:end]}] (PgBouncer has "
                    f"{', '.join(f'[{s}]' for s in SECTIONS)})"
                )
            self.section = name
            self.saw_main_section |= name == "pgbouncer"
            rest = rest[end + 1 :].lstrip()  # PgBouncer reads on after the ]

    def _include(
        self, name: str, path: Path, where: str, chain: tuple[tuple[str, str], ...]
    ) -> None:
        context = f"{where}: %include {name}: "
        target = Path(name)
        if not target.is_absolute():
            # PgBouncer opens it relative to its working directory; the including file's
            # directory is what a config split in parts means, so that is tried first.
            beside = path.parent / target
            if not beside.exists() and target.exists():
                self.notes.append(
                    f"{where}: %include {name}: not found next to {path.name}; read "
                    f"{os.path.abspath(target)} (relative to the current directory, "
                    "as PgBouncer does)"
                )
            else:
                target = beside
        if any(os.path.realpath(target) == real for _, real in chain):
            files = " -> ".join([*(file for file, _ in chain), str(target)])
            raise ConfigError(f"{context}%include loop: {files}")
        if len(chain) > MAX_INCLUDE_DEPTH:
            raise ConfigError(f"{context}nested more than {MAX_INCLUDE_DEPTH} deep "
                              "(PgBouncer's limit)")  # fmt: skip
        self.read(target, chain, context)

    def _key_value(self, text: str, path: Path, number: int) -> None:
        where = f"{path}:{number}"
        if text.startswith('"'):  # a quoted database or user name, "" for a quote
            end = 1
            chars: list[str] = []
            while True:
                if end >= len(text):
                    raise ConfigError(f"{where}: syntax error: unterminated quoted name")
                if text[end] == '"':
                    if text[end + 1 : end + 2] != '"':
                        break
                    end += 1
                chars.append(text[end])
                end += 1
            key, end = "".join(chars), end + 1
        else:
            match = _BARE_KEY.match(text)
            assert match is not None  # the pattern matches the empty string
            key, end = match.group(), match.end()
        after = text[end:].lstrip(" \t")
        if not key or not after.startswith("="):
            raise ConfigError(f"{where}: syntax error: expected KEY = VALUE, got {text!r}")
        if self.section is None:
            raise ConfigError(
                f"{where}: {key} is outside any section (PgBouncer wants [pgbouncer], "
                "[databases] or [users] first)"
            )
        if self.section == "pgbouncer":
            key = key.lower()
        settings = self.sections[self.section]
        earlier = settings.pop(key, None)
        setting = _Setting(key, after[1:].strip(), str(path), number)
        if earlier is not None and self.section == "pgbouncer":
            self.notes.append(
                f"{where}: {key} is also set at {earlier.where}; this later line wins, "
                "as in PgBouncer"
            )
        settings[key] = setting


def parse_connstring(text: str, where: str) -> list[tuple[str, str]]:
    """A ``[databases]``/``[users]`` value as (key, value) pairs, as loader.c reads it.

    Pairs are separated by blanks; a value in single quotes may hold blanks, ``''`` or
    ``\\'`` for a quote (a backslash before anything else is itself). Empty values are
    an error, as in PgBouncer. Keys are lowercased.
    """
    pairs: list[tuple[str, str]] = []
    pos, size = 0, len(text)
    while True:
        while pos < size and text[pos] in " \t":
            pos += 1
        if pos >= size:
            return pairs
        start = pos
        while pos < size and text[pos] not in "= \t":
            pos += 1
        key = text[start:pos]
        while pos < size and text[pos] in " \t":
            pos += 1
        if not key or pos >= size or text[pos] != "=":
            raise ConfigError(
                f"{where}: syntax error in {text!r}: expected key=value at {text[start:]!r}"
            )
        pos += 1
        while pos < size and text[pos] in " \t":
            pos += 1
        if text[pos : pos + 1] == "'":
            pos += 1
            chars: list[str] = []
            while True:
                if pos >= size:
                    raise ConfigError(f"{where}: {key}=: unterminated quoted value")
                if text[pos] == "\\" and text[pos + 1 : pos + 2] == "'":
                    pos += 1
                elif text[pos] == "'":
                    if text[pos + 1 : pos + 2] != "'":
                        break
                    pos += 1
                chars.append(text[pos])
                pos += 1
            pos += 1
            if pos < size and text[pos] not in " \t":
                raise ConfigError(f"{where}: {key}=: a blank must follow the closing quote")
            value = "".join(chars)
        else:
            start = pos
            while pos < size and text[pos] not in " \t":
                pos += 1
            value = text[start:pos]
        if not value:
            raise ConfigError(f"{where}: {key}= has an empty value (PgBouncer refuses it too)")
        pairs.append((key.lower(), value))


# -- values -----------------------------------------------------------------------------


def _integer(text: str, where: str, key: str) -> int:
    """strtol(text, 0) as PgBouncer reads integers: 0x hex and 0-prefixed octal too."""
    match = re.fullmatch(r"\s*([-+]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\s*", text)
    if match is None:
        raise ConfigError(f"{where}: {key} = {text}: not an integer")
    sign, digits = match.groups()
    if digits[:2].lower() == "0x":
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    return -value if sign == "-" else value


def _seconds(text: str, where: str, key: str) -> int | float:
    """Seconds, fractions allowed, with an optional unit (us, ms, s, min, h, d)."""
    match = _SECONDS.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"{where}: {key} = {text}: not a number of seconds (e.g. 30, 0.5, 500ms, 5min)"
        )
    value = float(match.group(1)) * _UNITS[match.group(2)]
    return int(value) if value.is_integer() else value


def _boolean(text: str, where: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{where}: {key} = {text}: not a boolean (0/1, yes/no, on/off)")


def _names(text: str) -> list[str]:
    """A comma-separated list (admin_users, stats_users); blanks around names ignored."""
    return [name for name in re.split(r"[,\s]+", text) if name]


def _normal(text: str) -> str:
    """A value compared with the ones pgmux behaves the same with: "0"/"1" for
    booleans, "%g" for numbers, lowercased text otherwise."""
    lowered = text.strip().lower()
    if lowered in _FALSE:
        return "0"
    if lowered in _TRUE:
        return "1"
    try:
        return f"{float(lowered):g}"
    except ValueError:
        return lowered


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "seconds"
    if isinstance(default, tuple):
        return "list"
    return "str"


def _field_kinds(cls: type) -> dict[str, str]:
    """The kind of each field of a [databases]/[users] entry, from its annotation."""
    kinds = {}
    for f in fields(cls):
        text = str(f.type)
        kind = next((k for k in ("bool", "int", "float") if k in text), "str")
        kinds[f.name] = "seconds" if kind == "float" else kind
    kinds.pop("name", None)
    return kinds


# -- the conversion ---------------------------------------------------------------------


class _Converter:
    def __init__(self, ini: _Ini, path: str) -> None:
        self.ini = ini
        self.path = path
        self.settings = ini.sections["pgbouncer"]
        self.raw: dict[str, Any] = {}
        self.unsupported: list[str] = []
        self.notes: list[str] = list(ini.notes)
        self.items = {item.key: item for item in config_items() if "." not in item.key}
        self._userlist: dict[str, str] | None = None
        # Per-database auth_user/auth_dbname, decided once all databases are read.
        self.db_auth: dict[str, tuple[str, str, _Setting]] = {}

    def run(self) -> Converted:
        handlers: dict[str, Callable[[_Setting], None]] = {
            "listen_addr": self._listen_addr,
            "unix_socket_dir": self._unix_socket_dir,
            "unix_socket_mode": self._unix_socket_mode,
            "pool_mode": self._pool_mode,
            "auth_type": self._auth_type,
            "client_tls_sslmode": self._sslmode,
            "server_tls_sslmode": self._sslmode,
            "server_lifetime": self._server_lifetime,
            "verbose": self._verbose,
        }
        for setting in self.settings.values():
            handler = handlers.get(setting.key)
            if handler is not None:
                handler(setting)
            elif setting.key in self.items and (setting.key in SAME_NAME or setting.key in MISSING):
                self._same_name(setting)
            elif setting.key in MISSING:
                text = f"{setting.key} = {setting.value}"
                self._missing(setting.where, setting.value, text, MISSING[setting.key])
            else:
                self.unsupported.append(
                    f"{setting.where}: {setting.key} = {setting.value}: not a PgBouncer "
                    "setting pgmux knows; left out"
                )
        self._defaults_that_differ()
        databases = self._databases()
        users = self._users()
        self._auth_user(databases, users)
        if databases:
            self.raw["databases"] = databases
        if users:
            self.raw["users"] = users
        for peer in self.ini.sections["peers"].values():
            self.unsupported.append(
                f"{peer.where}: [peers] {peer.key}: not supported by pgmux (its workers "
                "forward cancel requests among themselves; separate pgmux instances do not)"
            )
        return Converted(self.raw, self._in_file_order(self.unsupported),
                         self._in_file_order(self.notes))  # fmt: skip

    def _in_file_order(self, lines: list[str]) -> tuple[str, ...]:
        """Lines about the whole file first, then by file (the main one first) and line."""

        def place(line: str) -> tuple[bool, bool, str, int]:
            match = re.match(r"(.*?):(\d+): ", line)
            if match is None:
                return (False, False, "", 0)
            file = match.group(1)
            return (True, file != self.path, file, int(match.group(2)))

        return tuple(sorted(lines, key=place))

    # -- [pgbouncer] ---------------------------------------------------------------------

    def _same_name(self, s: _Setting) -> None:
        kind = _kind(self.items[s.key].default)
        if kind == "bool":
            self.raw[s.key] = _boolean(s.value, s.where, s.key)
        elif kind == "int":
            self.raw[s.key] = _integer(s.value, s.where, s.key)
        elif kind == "seconds":
            self.raw[s.key] = _seconds(s.value, s.where, s.key)
            self._timeout_note(s)
        elif kind == "list":
            self.raw[s.key] = _names(s.value)
        elif s.key.endswith("_file"):
            self.raw[s.key] = self._file(s)
        else:
            self.raw[s.key] = s.value

    def _timeout_note(self, s: _Setting) -> None:
        value = self.raw[s.key]
        if s.key == "query_timeout" and value:
            self.notes.append(
                f"{s.where}: query_timeout = {s.value}: pgmux cancels the query and keeps the "
                "client connected (PgBouncer closes the client and server connections)"
            )
        elif s.key == "cancel_wait_timeout" and not value:
            self.notes.append(
                f"{s.where}: cancel_wait_timeout = {s.value}: pgmux still bounds a "
                "forwarded cancel at 10 s (PgBouncer: no limit)"
            )

    def _file(self, s: _Setting) -> str:
        """A file path made absolute against the ini's directory, so the converted
        config finds it wherever it is run from (PgBouncer: its working directory)."""
        if not s.value:
            return ""
        name = Path(s.value).expanduser()
        if name.is_absolute():
            return str(name)
        beside = Path(s.file).parent / name
        if not beside.exists() and name.exists():
            self.notes.append(
                f"{s.where}: {s.key} = {s.value}: not found next to {Path(s.file).name}; "
                f"using {os.path.abspath(name)} (relative to the current directory, as "
                "PgBouncer does)"
            )
            return os.path.abspath(name)
        return os.path.abspath(beside)

    def _missing(self, where: str, value: str, text: str, missing: Missing) -> None:
        if self._moot(value, missing):
            self.notes.append(f"{where}: {text}: left out; pgmux behaves the same "
                              f"({missing.reason})")  # fmt: skip
        elif missing.later:
            self.unsupported.append(f"{where}: {text}: not supported by pgmux yet "
                                    f"({missing.reason})")  # fmt: skip
        else:
            self.unsupported.append(f"{where}: {text}: does not apply to pgmux "
                                    f"({missing.reason})")  # fmt: skip

    def _moot(self, value: str, missing: Missing) -> bool:
        if "*" in missing.same or _normal(value) in missing.same:
            return True
        if missing.off_with is None:
            return False
        other, unset_is_off = missing.off_with
        setting = self.settings.get(other)
        if setting is None:
            return unset_is_off
        return _normal(setting.value) in ("0", "")

    def _listen_addr(self, s: _Setting) -> None:
        hosts = [host.strip() for host in s.value.split(",") if host.strip()]
        if hosts:
            self.raw["listen_addr"] = ",".join(hosts)

    def _unix_socket_dir(self, s: _Setting) -> None:
        if s.value.startswith("@"):
            self.unsupported.append(
                f"{s.where}: unix_socket_dir = {s.value}: not supported by pgmux yet "
                "(abstract-namespace sockets); no unix socket is opened"
            )
        else:
            self.raw["unix_socket_dir"] = self._file(s)

    def _unix_socket_mode(self, s: _Setting) -> None:
        mode = _integer(s.value, s.where, s.key)
        self.raw["unix_socket_mode"] = f"0{mode:o}"

    def _pool_mode(self, s: _Setting) -> None:
        self.raw["pool_mode"] = self._choice(s, s.value, POOL_MODES, "pool_mode")

    @staticmethod
    def _choice(s: _Setting, value: str, choices: tuple[str, ...], key: str) -> str:
        lowered = value.strip().lower()
        if lowered not in choices:
            raise ConfigError(f"{s.where}: {key} = {value}: must be one of {', '.join(choices)}")
        return lowered

    def _auth_type(self, s: _Setting) -> None:
        value = s.value.strip().lower()
        if value == "any":
            self.raw["auth_type"] = "trust"
            self.notes.append(
                f"{s.where}: auth_type = any: converted to trust. PgBouncer's any ignores the "
                "user name (every database logs in as its own user=) and lets anyone into "
                "the console; pgmux's trust takes the user name as given, so give each "
                "[databases] entry its user, and only admin_users/stats_users reach the console"
            )
        elif value in ("pam", "ldap", "peer"):
            self.unsupported.append(
                f"{s.where}: auth_type = {s.value}: not supported by pgmux yet (no {value} "
                "authentication); auth_type is left at pgmux's default scram-sha-256, so "
                "clients need a password from auth_file, [users] or auth_query"
            )
        elif value in AUTH_TYPES:
            self.raw["auth_type"] = value
            if value == "trust":
                self.notes.append(
                    f"{s.where}: auth_type = trust: pgmux admits any user name without a "
                    "password (PgBouncer also required the name to be in auth_file)"
                )
        else:
            raise ConfigError(
                f"{s.where}: auth_type = {s.value}: not a PgBouncer auth_type "
                f"({', '.join((*AUTH_TYPES, 'any', 'pam', 'ldap'))})"
            )

    def _sslmode(self, s: _Setting) -> None:
        mode = self._choice(s, s.value, SSLMODES, s.key)
        if s.key == "client_tls_sslmode" and mode == "verify-full":
            mode = "verify-ca"
            self.notes.append(
                f"{s.where}: client_tls_sslmode = verify-full: converted to verify-ca, which "
                "is what PgBouncer does with it (pgmux's verify-full also requires the "
                "certificate's CN to be the user name)"
            )
        self.raw[s.key] = mode

    def _server_lifetime(self, s: _Setting) -> None:
        value = _seconds(s.value, s.where, s.key)
        if value:
            self.raw["server_lifetime"] = value
        else:
            self.unsupported.append(
                f"{s.where}: server_lifetime = {s.value}: not supported by pgmux yet "
                "(PgBouncer then uses each server connection once; pgmux's 0 means no "
                "limit); pgmux's default of 3600 s applies"
            )

    def _verbose(self, s: _Setting) -> None:
        level = _integer(s.value, s.where, s.key)
        self.raw["log_level"] = "debug" if level > 0 else "info"
        if level > 0:
            self.notes.append(
                f'{s.where}: verbose = {s.value}: converted to log_level = "debug" '
                "(pgmux has one debug level)"
            )

    def _defaults_that_differ(self) -> None:
        """Write PgBouncer's value where the file relies on a default pgmux does not
        share, so clients see the pooler they had."""
        top, settings = self.path, self.settings
        if "pool_mode" not in settings:
            self.raw["pool_mode"] = PGBOUNCER_POOL_MODE
            self.notes.append(
                f'{top}: pool_mode not set: wrote pool_mode = "{PGBOUNCER_POOL_MODE}", '
                "PgBouncer's default (pgmux's is transaction; change it once your "
                "clients are ready for transaction pooling)"
            )
        if "auth_type" not in settings:
            self.raw["auth_type"] = PGBOUNCER_AUTH_TYPE
            self.notes.append(
                f'{top}: auth_type not set: wrote auth_type = "{PGBOUNCER_AUTH_TYPE}", '
                "PgBouncer's default (pgmux's is scram-sha-256)"
            )
        if "listen_backlog" not in settings:
            self.raw["listen_backlog"] = PGBOUNCER_LISTEN_BACKLOG
            self.notes.append(
                f"{top}: listen_backlog not set: wrote listen_backlog = "
                f"{PGBOUNCER_LISTEN_BACKLOG}, PgBouncer's default (pgmux's is 1024)"
            )
        port = self.raw.get("listen_port", 6432)
        if "listen_addr" not in self.raw:
            self.raw["listen_addr"] = "127.0.0.1"
            self.notes.append(
                f"{top}: listen_addr not set: PgBouncer then listens on its unix socket only; "
                'pgmux always listens on TCP too: wrote listen_addr = "127.0.0.1"'
            )
            if "unix_socket_dir" not in settings:
                self.raw["unix_socket_dir"] = PGBOUNCER_UNIX_SOCKET_DIR
                self.notes.append(
                    f"{top}: unix_socket_dir not set: wrote unix_socket_dir = "
                    f'"{PGBOUNCER_UNIX_SOCKET_DIR}", PgBouncer\'s default, the only way '
                    f"clients reached it (pgmux opens no unix socket unless it is set)"
                )
        elif "unix_socket_dir" not in settings:
            self.notes.append(
                f"{top}: unix_socket_dir not set: PgBouncer also listened on "
                f"{PGBOUNCER_UNIX_SOCKET_DIR}/.s.PGSQL.{port}; pgmux opens no unix socket "
                f'unless it is set: add unix_socket_dir = "{PGBOUNCER_UNIX_SOCKET_DIR}" '
                "if clients connect that way"
            )
        if "server_tls_sslmode" not in settings:
            self.notes.append(
                f"{top}: server_tls_sslmode not set: pgmux uses prefer (TLS to PostgreSQL "
                "when the server offers it), as PgBouncer 1.20+ does; older PgBouncer "
                'used disable: set server_tls_sslmode = "disable" to keep plain connections'
            )
        if "max_prepared_statements" not in settings:
            self.notes.append(
                f"{top}: max_prepared_statements not set: pgmux keeps named prepared "
                "statements working in transaction mode (200 per server), as PgBouncer "
                "1.24+ does; older PgBouncer passed them through unchanged"
            )
        self.notes.append(
            f"{top}: pgmux also serves /metrics, /healthz and /readyz on 127.0.0.1:9127, "
            "which PgBouncer does not: set [metrics] enabled = false, or another "
            "listen_port, if that port is taken"
        )

    # -- [databases] ---------------------------------------------------------------------

    def _databases(self) -> dict[str, dict[str, Any]]:
        kinds = _field_kinds(DatabaseConfig)
        databases: dict[str, dict[str, Any]] = {}
        for s in self.ini.sections["databases"].values():
            name = s.key
            if name == "pgbouncer":
                raise ConfigError(f"{s.where}: the database name pgbouncer is reserved for "
                                  "the admin console (PgBouncer refuses it too)")  # fmt: skip
            if name == "*":
                self.unsupported.append(
                    f"{s.where}: [databases] * = ...: not supported by pgmux yet (a fallback "
                    "database for any name); add a [databases.NAME] for each database "
                    "clients use"
                )
                continue
            if name in ADMIN_DATABASES:
                self.unsupported.append(
                    f"{s.where}: [databases] {name}: left out: pgmux's admin console has "
                    "that name; give the database another name"
                )
                continue
            table = self._database(s, kinds)
            if table is not None:
                databases[name] = table
        return databases

    def _database(self, s: _Setting, kinds: dict[str, str]) -> dict[str, Any] | None:
        name = s.key
        table: dict[str, Any] = {}
        for key, value in parse_connstring(s.value, s.where):
            label = f"[databases] {name}: {key}={'***' if key == 'password' else value}"
            if key == "host":
                host = self._host(s, value)
                if host is None:
                    return None
                table["host"] = host
            elif key in ("auth_user", "auth_dbname"):
                self.db_auth[f"{name}.{key}"] = (key, value, s)
            elif key == "load_balance_hosts":
                table[key] = self._choice(s, value, LOAD_BALANCE_HOSTS, key)
            elif key == "target_session_attrs":
                table[key] = self._choice(s, value, TARGET_SESSION_ATTRS, key)
            elif key == "reserve_pool" and "reserve_pool_size" in kinds:
                table["reserve_pool_size"] = _integer(value, s.where, key)
            elif key in kinds:
                table[key] = self._typed(value, kinds[key], s.where, key)
            elif key in DB_MISSING:
                self._missing(s.where, value, label, DB_MISSING[key])
            else:
                self.unsupported.append(
                    f"{s.where}: {label}: not a connection parameter pgmux knows; left out"
                )
        if "host" not in table:
            socket_dir = self.settings.get("unix_socket_dir")
            directory = PGBOUNCER_UNIX_SOCKET_DIR
            if socket_dir is not None:
                directory = self.raw.get("unix_socket_dir", socket_dir.value)
            if not directory or directory.startswith("@"):
                self.unsupported.append(
                    f"{s.where}: [databases] {name}: left out: no host=, and no unix socket "
                    "directory pgmux can use (PgBouncer takes unix_socket_dir)"
                )
                return None
            table["host"] = directory
            self.notes.append(
                f'{s.where}: [databases] {name}: no host=: wrote host = "{directory}", the '
                "unix socket directory PgBouncer connects through (pgmux's default is "
                "127.0.0.1)"
            )
        if "," in table["host"]:
            self._host_list(s, table)
        if "password" in table and "user" not in table:
            del table["password"]
            self.notes.append(
                f"{s.where}: [databases] {name}: password= without user= has no effect in "
                "PgBouncer; left out"
            )
        if "user" in table and "password" not in table:
            secret = self._auth_file_users().get(table["user"])
            if secret is not None:
                table["password"] = secret
                self.notes.append(
                    f"{s.where}: [databases] {name}: user={table['user']} without password=: "
                    "copied its password from auth_file, where PgBouncer takes it (pgmux "
                    "takes a forced user's password from [databases] only)"
                )
        return table

    def _host(self, s: _Setting, value: str) -> str | None:
        hosts = [host for host in value.split(",") if host]
        if value.startswith("@"):
            self.unsupported.append(
                f"{s.where}: [databases] {s.key}: host={value}: left out: pgmux cannot "
                "connect to abstract-namespace unix sockets yet"
            )
            return None
        return ",".join(hosts) if hosts else value

    def _host_list(self, s: _Setting, table: dict[str, Any]) -> None:
        """PgBouncer's host list: round-robin unless the line says otherwise; pgmux
        tries the hosts as libpq does, which differs in what happens to a host that
        fails."""
        where = f"{s.where}: [databases] {s.key}: host={table['host']}"
        mode = table.get("load_balance_hosts")
        if mode is None:
            table["load_balance_hosts"] = PGBOUNCER_LOAD_BALANCE_HOSTS
            self.notes.append(
                f'{where}: wrote load_balance_hosts = "{PGBOUNCER_LOAD_BALANCE_HOSTS}", '
                "PgBouncer's default for a host list (pgmux's is disable); unlike "
                "PgBouncer, pgmux skips a host it cannot reach and tries the next"
            )
        elif mode == "disable":
            self.notes.append(
                f"{where}: load_balance_hosts=disable: pgmux tries the hosts in the listed "
                "order for every new server connection (libpq's meaning); PgBouncer stays "
                "on the host that worked last until it fails"
            )

    def _typed(self, value: str, kind: str, where: str, key: str) -> Any:
        if kind == "int":
            return _integer(value, where, key)
        if kind == "seconds":
            return _seconds(value, where, key)
        if kind == "bool":
            return _boolean(value, where, key)
        if key == "pool_mode":
            lowered = value.lower()
            if lowered not in POOL_MODES:
                raise ConfigError(f"{where}: pool_mode={value}: must be one of "
                                  f"{', '.join(POOL_MODES)}")  # fmt: skip
            return lowered
        return value

    def _auth_file_users(self) -> dict[str, str]:
        """auth_file's users (empty if unset or unreadable: parse_config says why)."""
        if self._userlist is None:
            self._userlist = {}
            name = self.raw.get("auth_file")
            if name:
                with contextlib.suppress(OSError, UnicodeDecodeError, UserlistError):
                    self._userlist = parse_userlist(Path(name).read_text(), name)
        return self._userlist

    # -- [users] -------------------------------------------------------------------------

    def _users(self) -> dict[str, dict[str, Any]]:
        kinds = _field_kinds(UserConfig)
        kinds.pop("password", None)  # PgBouncer's [users] has none: auth_file holds them
        users: dict[str, dict[str, Any]] = {}
        for s in self.ini.sections["users"].values():
            table: dict[str, Any] = {}
            for key, value in parse_connstring(s.value, s.where):
                label = f"[users] {s.key}: {key}={value}"
                if kinds.get(key) == "seconds" and value.strip() == UNSET_TIMEOUT:
                    self.notes.append(f"{s.where}: {label}: means not set; left out")
                elif key in kinds:
                    table[key] = self._typed(value, kinds[key], s.where, key)
                elif key in USER_MISSING:
                    self._missing(s.where, value, label, USER_MISSING[key])
                else:
                    self.unsupported.append(
                        f"{s.where}: {label}: not a [users] option pgmux knows; left out"
                    )
            users[s.key] = table
        return users

    def _auth_user(
        self, databases: dict[str, dict[str, Any]], users: dict[str, dict[str, Any]]
    ) -> None:
        """Per-database auth_user/auth_dbname: pgmux has them globally only. One
        auth_user set the same on every database becomes the global one."""
        per_db = [(key, value, s) for key, value, s in self.db_auth.values()]
        auth_users = {value for key, value, _ in per_db if key == "auth_user"}
        with_auth_user = {s.key for key, _, s in per_db if key == "auth_user"}
        if (
            "auth_user" not in self.raw
            and len(auth_users) == 1
            and databases
            and with_auth_user >= set(databases)
        ):
            self.raw["auth_user"] = next(iter(auth_users))
            self.notes.append(
                f"{self.path}: every database sets auth_user={self.raw['auth_user']}: wrote "
                "it as the global auth_user (pgmux has no per-database one)"
            )
        for key, value, s in per_db:
            if self.raw.get(key) == value:
                continue
            self.unsupported.append(
                f"{s.where}: [databases] {s.key}: {key}={value}: not supported by pgmux "
                f"yet (one global {key} only)"
            )
        auth_user = self.raw.get("auth_user")
        if auth_user and auth_user not in users and auth_user not in self._auth_file_users():
            users[auth_user] = {}
            self.notes.append(
                f"{self.path}: auth_user {auth_user} is not in auth_file: wrote an empty "
                f"[users.{auth_user}] so pgmux logs in as it without a password, as "
                "PgBouncer does"
            )
