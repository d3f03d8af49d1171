"""A small TOML writer: the inverse of ``tomllib.load`` for config-shaped data.

``pgmux --check`` prints the effective config with it, ``pgmux convert`` writes a
PgBouncer config as TOML, and the tests write their config files with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_STRING_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _STRING_ESCAPES:
            out.append(_STRING_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: object, where: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"to_toml: keys must be strings, got {key!r} in {where or 'top level'}")
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: object, where: str) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item, where) for item in value) + "]"
    raise TypeError(f"to_toml: unsupported value {value!r} at {where}")


def _emit_table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    where = ".".join(path)
    # A table holding only sub-tables needs no header of its own; an empty one does.
    if path and (scalars or not tables):
        if lines:
            lines.append("")
        lines.append("[" + ".".join(_toml_key(part, where) for part in path) + "]")
    for key, value in scalars:
        name = _toml_key(key, where)
        lines.append(f"{name} = {_toml_value(value, f'{where}.{key}' if where else key)}")
    for key, sub in tables:
        _toml_key(key, where)
        _emit_table(lines, (*path, key), sub)


def to_toml(data: Mapping[str, Any]) -> str:
    """TOML text for ``data``: str, int, float, bool, lists of those, nested tables.

    Top-level scalars come first, then each table (its scalars, then its sub-tables).
    Keys that are not bare TOML keys (``"*"``, ``"a.b"``) are quoted. Anything else,
    ``None`` included, raises ``TypeError``.
    """
    lines: list[str] = []
    _emit_table(lines, (), data)
    return "\n".join(lines) + "\n" if lines else ""


def toml_key(key: str) -> str:
    """``key`` as a TOML key: bare when it can be, quoted otherwise."""
    return _toml_key(key, "")


def toml_value(value: object) -> str:
    """``value`` (str, int, float, bool or a list of those) as a TOML value."""
    return _toml_value(value, "")
