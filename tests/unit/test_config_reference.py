"""docs/configuration.md against the code: rendered from proxy/config_schema.py, a
description for every key pgmux accepts and none for a key it does not, every key in
config.example.toml, and every default shown equal to what parse_config produces."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    DatabaseConfig,
    UserConfig,
    config_items,
    parse_config,
)
from proxy.config_schema import (
    DATABASE_SETTINGS,
    PER_DATABASE,
    PER_USER,
    SECTION_INTROS,
    SECTIONS,
    SETTINGS,
    USER_SETTINGS,
    Setting,
    default_text,
    env_var,
    render,
    table_default,
)

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "config.example.toml"
REGENERATE = "python -m proxy.config_schema > docs/configuration.md"

# A minimal config: one database, one user with nothing set.
MINIMAL = {"databases": {"app": {}}, "users": {"app": {}}}

TABLE_LINE = re.compile(r"^\s*\[([^\]]+)\]\s*(?:#.*)?$")
KEY_LINE = re.compile(r"^\s*#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")
CELL_SPLIT = re.compile(r"(?<!\\)\|")


TOP_SECTIONS = [s for s in SECTIONS if s not in (PER_DATABASE, PER_USER)]


def _fields(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"name"}


def _doc_rows() -> dict[str, dict[str, list[str]]]:
    """Section heading -> key -> the row's cells, from the rendered reference."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in render().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:], {})
        elif current is not None and line.startswith("| `"):
            cells = [cell.strip() for cell in CELL_SPLIT.split(line)[1:-1]]
            current[cells[0].strip("`")] = cells
    return sections


# -- (a) the file is the rendering ----------------------------------------------------------


def test_the_reference_is_up_to_date() -> None:
    assert REFERENCE.is_file(), f"docs/configuration.md is missing: run {REGENERATE}"
    assert REFERENCE.read_text() == render(), (
        f"docs/configuration.md differs from proxy/config_schema.py: run {REGENERATE}"
    )


# -- (b) one description per key, and no more ---------------------------------------------------


def test_every_top_level_key_is_described() -> None:
    keys = {item.key for item in config_items()}
    missing = sorted(keys - set(SETTINGS))
    extra = sorted(set(SETTINGS) - keys)
    assert not missing, f"describe these in proxy/config_schema.py SETTINGS: {missing}"
    assert not extra, f"SETTINGS describes keys pgmux does not have: {extra}"


@pytest.mark.parametrize(
    ("cls", "settings"),
    [(DatabaseConfig, DATABASE_SETTINGS), (UserConfig, USER_SETTINGS)],
    ids=["databases", "users"],
)
def test_every_table_field_is_described(cls: type[Any], settings: dict[str, Setting]) -> None:
    missing = sorted(_fields(cls) - set(settings))
    extra = sorted(set(settings) - _fields(cls))
    assert not missing, f"describe these {cls.__name__} fields in proxy/config_schema.py: {missing}"
    assert not extra, f"proxy/config_schema.py describes {cls.__name__} fields that do not exist"


def test_descriptions_are_complete() -> None:
    """A known section, a type and a meaning for each; an unset table key names what
    applies instead, and that is a real setting."""
    keys = {item.key for item in config_items()}
    assert set(SECTION_INTROS) == set(SECTIONS)
    for key, setting in SETTINGS.items():
        assert setting.section in TOP_SECTIONS, key
        assert setting.kind and setting.meaning.endswith("."), key
        assert not setting.unset, f"{key}: unset is for [databases] and [users] keys"
    for section, settings in ((PER_DATABASE, DATABASE_SETTINGS), (PER_USER, USER_SETTINGS)):
        for key, setting in settings.items():
            assert setting.section == section, key
            assert setting.kind and setting.meaning.endswith("."), key
            assert setting.unset in ("", "NAME", "none") or setting.unset in keys, key


def test_every_section_has_rows_and_every_key_one_row() -> None:
    rows = _doc_rows()
    assert [s for s in SECTIONS if s in rows] == list(SECTIONS)
    assert all(rows[section] for section in SECTIONS)
    top = {key for section in TOP_SECTIONS for key in rows[section]}
    assert top == set(SETTINGS)
    assert set(rows[PER_DATABASE]) == _fields(DatabaseConfig)
    assert set(rows[PER_USER]) == _fields(UserConfig)


def test_env_var_and_reload_columns() -> None:
    rows = _doc_rows()
    restart = {item.key for item in config_items() if not item.live}
    for key, setting in SETTINGS.items():
        cells = rows[setting.section][key]
        assert cells[2] == f"`{env_var(key)}`"
        assert cells[3] == ("restart" if key in restart else "live"), key
    assert env_var("metrics.listen_port") == "PGMUX_METRICS_LISTEN_PORT"
    assert env_var("client_tls_sslmode") == "PGMUX_CLIENT_TLS_SSLMODE"
    for section in (PER_DATABASE, PER_USER):
        for key, cells in rows[section].items():
            assert cells[2:4] == ["—", "live"], key


# -- (c) config.example.toml has every key ---------------------------------------------------


def _example_keys() -> dict[str, set[str]]:
    """Keys set or shown commented out in config.example.toml, by where they are:
    top level, [metrics], a [databases.X] table or a [users.X] table."""
    found: dict[str, set[str]] = {"": set(), "metrics": set(), "databases": set(), "users": set()}
    where: str | None = ""
    for line in EXAMPLE.read_text().splitlines():
        table = TABLE_LINE.match(line)
        if table:
            name = table.group(1).strip()
            where = name if name == "metrics" else name.split(".", 1)[0]
            where = where if where in found and (where == "metrics" or "." in name) else None
            continue
        key = KEY_LINE.match(line)
        if key and where is not None:
            found[where].add(key.group(1))
    return found


def _suggest(key: str, value: str) -> str:
    return f"{key} = {value}".ljust(42) + f"# default {value}"


def test_the_example_config_shows_every_key() -> None:
    found = _example_keys()
    items = {item.key: item for item in config_items()}
    lines: list[str] = []
    for key, item in items.items():
        section, _, name = key.rpartition(".")
        if name not in found[section]:
            where = f"[{section}]" if section else "the top level"
            lines.append(f"{where}: {_suggest(name, default_text(key, item.default))}")
    for table, settings, cls in (
        ("databases", DATABASE_SETTINGS, DatabaseConfig),
        ("users", USER_SETTINGS, UserConfig),
    ):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, setting in settings.items():
            if key not in found[table]:
                shown = table_default(key, setting, defaults[key]).replace("`", "")
                lines.append(f"[{table}.NAME]: # {key} = ...  # default: {shown}")
    assert not lines, "config.example.toml lacks these keys; add:\n" + "\n".join(lines)


# -- (d) the defaults shown are what parse_config gives ------------------------------------------


def test_top_level_defaults_match_parse_config() -> None:
    """Config()'s defaults (what the reference shows) against a parsed minimal file: a
    default changed in one and not the other fails here."""
    config = parse_config(MINIMAL)
    rows = _doc_rows()
    wrong = []
    for item in config_items():
        parsed = f"`{default_text(item.key, item.value(config))}`"
        shown = rows[SETTINGS[item.key].section][item.key][1]
        if shown != parsed:
            wrong.append(f"{item.key}: the reference shows {shown}, parse_config gives {parsed}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("section", "settings"),
    [(PER_DATABASE, DATABASE_SETTINGS), (PER_USER, USER_SETTINGS)],
    ids=["databases", "users"],
)
def test_table_defaults_match_parse_config(section: str, settings: dict[str, Setting]) -> None:
    config = parse_config(MINIMAL)
    entry = config.databases["app"] if section == PER_DATABASE else config.users["app"]
    rows = _doc_rows()[section]
    for key, setting in settings.items():
        value = getattr(entry, key)
        if setting.unset == "NAME":
            assert value == "app", f"{key}: unset, it should be the table's name"
            expected = "NAME"
        elif setting.unset:
            assert value is None, f"{key}: unset, {setting.unset} should apply"
            expected = table_default(key, setting, None)
        else:
            expected = f"`{default_text(key, value)}`"
        assert rows[key][1] == expected, f"{section} {key}: shown {rows[key][1]}, parsed {value!r}"


def test_unset_table_keys_take_the_global_value() -> None:
    """What "as `default_pool_size`" and the like promise: an unset key takes the
    top-level value, checked through the Config methods pools use."""
    raw = {
        **MINIMAL,
        "default_pool_size": 7,
        "min_pool_size": 2,
        "pool_mode": "session",
        "query_wait_timeout": 5,
        "client_idle_timeout": 6,
        "idle_transaction_timeout": 8,
        "query_timeout": 9,
        "transaction_timeout": 10,
    }
    config = parse_config(raw)
    database = config.databases["app"]
    assert DATABASE_SETTINGS["pool_size"].unset == USER_SETTINGS["pool_size"].unset
    assert config.pool_size_for(database, "app") == 7
    assert config.min_pool_size_for(database) == 2
    assert config.pool_mode_for(database, "app") == "session"
    for key, setting in USER_SETTINGS.items():
        if key.endswith("timeout"):
            assert setting.unset == key
            assert config.timeout_for(key, "app") == raw[key]
