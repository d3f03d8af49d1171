"""``pgmux convert pgbouncer.ini [-o pgmux.toml]``: a PgBouncer config as pgmux TOML.

The TOML is checked with ``parse_config`` before anything is written, so pgmux accepts
what this writes. What did not convert, and what converted with a change of meaning,
follows the settings as comments naming the ini file and line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ConfigError, parse_config
from .pgbouncer_ini import Converted, read_pgbouncer_ini
from .toml_out import to_toml


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pgmux convert",
        description="Write a PgBouncer config (with its %include files) as pgmux TOML. "
        "Settings pgmux lacks are listed at the end of the output.",
    )
    parser.add_argument("ini", metavar="PGBOUNCER_INI", help="the pgbouncer.ini to convert")
    parser.add_argument(
        "-o", "--output", metavar="OUT.toml", help="write the TOML here (default: stdout)"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT.toml if it exists")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    ini = Path(args.ini)
    converted: Converted | None = None
    try:
        converted = read_pgbouncer_ini(ini)
        text = render(converted, ini)
        parse_config(tomllib.loads(text), str(ini))
    except ConfigError as exc:
        print(f"pgmux convert: cannot convert: {exc}", file=sys.stderr)
        for line in converted.unsupported if converted is not None else ():
            print(f"pgmux convert: not converted: {line}", file=sys.stderr)
        return 1
    if args.output is None:
        sys.stdout.write(text)
        where = "the output"
    else:
        output = Path(args.output)
        if output.exists() and os.path.samefile(output, ini):
            print(f"pgmux convert: {output} is the file being converted", file=sys.stderr)
            return 1
        try:
            with output.open("w" if args.force else "x") as f:
                f.write(text)
        except FileExistsError:
            print(f"pgmux convert: {output} exists; add --force to replace it", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"pgmux convert: cannot write {output}: {exc.strerror}", file=sys.stderr)
            return 1
        where = str(output)
    print(f"pgmux convert: {summary(converted)} (listed at the end of {where})", file=sys.stderr)
    return 0


def render(converted: Converted, source: Path) -> str:
    """The TOML file: a header naming ``source``, the settings, then the notes and the
    unsupported settings as comments."""
    lines = [
        f"# pgmux configuration converted from {source} by `pgmux convert`.",
        "# Keys keep PgBouncer's names; config.example.toml documents each one.",
    ]
    if converted.notes or converted.unsupported:
        lines.append("# Read the notes and the settings left out, at the end of this file.")
    text = "\n".join(lines) + "\n\n" + to_toml(converted.raw)
    sections = (
        ("Converted with a change of meaning, or with PgBouncer's default written out",
         converted.notes),
        ("Not converted: pgmux does not support these (yet)", converted.unsupported),
    )  # fmt: skip
    for title, entries in sections:
        if entries:
            text += f"\n# -- {title} --\n"
            text += "".join(f"# {' '.join(entry.splitlines())}\n" for entry in entries)
    return text


def summary(converted: Converted) -> str:
    raw = converted.raw
    settings = sum(1 for value in raw.values() if not isinstance(value, Mapping))
    databases: Mapping[str, Any] = raw.get("databases", {})
    users: Mapping[str, Any] = raw.get("users", {})
    return (
        f"converted {settings} settings, {len(databases)} databases, {len(users)} users; "
        f"{len(converted.unsupported)} settings not supported, {len(converted.notes)} notes"
    )
