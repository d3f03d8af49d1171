"""Result sets pgmux answers itself (the admin console): RowDescription, DataRow in
text or binary format, and the extended-query messages that frame them.

Only the types the console sends are encoded: text (25), int4 (23), int8 (20) and
numeric (1700). Binary formats follow PostgreSQL's send functions (``int4send``,
``numeric_send``), so drivers that ask for binary results, asyncpg among them, read
them. https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from .messages import cstring, message

TEXT, INT4, INT8, NUMERIC = 25, 23, 20, 1700
_TYPE_LENGTHS = {TEXT: -1, INT4: 4, INT8: 8, NUMERIC: -1}

_FIELD = struct.Struct("!IhIhih")  # table oid, attnum, type oid, typlen, typmod, format
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_INT64 = struct.Struct("!q")
_NULL = _INT32.pack(-1)

PARSE_COMPLETE = message(b"1")
BIND_COMPLETE = message(b"2")
CLOSE_COMPLETE = message(b"3")
NO_DATA = message(b"n")
EMPTY_QUERY = message(b"I")
NO_PARAMETERS = message(b"t", _INT16.pack(0))

Columns = Sequence[tuple[str, int]]


def result_formats(codes: Sequence[int], count: int) -> list[int]:
    """Bind's result format codes for ``count`` columns (none: all text; one: all)."""
    if not codes:
        return [0] * count
    if len(codes) == 1:
        return [codes[0]] * count
    if len(codes) != count:
        raise ValueError(f"Bind gave {len(codes)} result formats for {count} columns")
    return list(codes)


def row_description(columns: Columns, formats: Sequence[int] | None = None) -> bytes:
    body = bytearray(_INT16.pack(len(columns)))
    for index, (name, oid) in enumerate(columns):
        fmt = formats[index] if formats else 0
        body += cstring(name) + _FIELD.pack(0, 0, oid, _TYPE_LENGTHS[oid], -1, fmt)
    return message(b"T", bytes(body))


def data_row(
    columns: Columns, values: Sequence[Any], formats: Sequence[int] | None = None
) -> bytes:
    body = bytearray(_INT16.pack(len(values)))
    for index, value in enumerate(values):
        if value is None:
            body += _NULL
            continue
        oid = columns[index][1]
        data = encode_binary(oid, value) if formats and formats[index] else encode_text(value)
        body += _INT32.pack(len(data)) + data
    return message(b"D", bytes(body))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstring(tag))


def encode_text(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"1" if value else b"0"
    return str(value).encode("utf-8", "surrogateescape")


def encode_binary(oid: int, value: Any) -> bytes:
    if oid == INT4:
        return _INT32.pack(int(value))
    if oid == INT8:
        return _INT64.pack(int(value))
    if oid == NUMERIC:
        return encode_numeric(Decimal(str(value)))
    return encode_text(value)


def encode_numeric(value: Decimal) -> bytes:
    """PostgreSQL's binary numeric: ndigits, weight, sign, dscale, base-10000 digits."""
    if not value.is_finite():
        raise ValueError(f"cannot send {value} as numeric")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    dscale = max(0, -exponent)
    text = "".join(map(str, digits))
    # Split into integer and fraction digits, padded out to groups of four.
    if exponent >= 0:
        whole, fraction = text + "0" * exponent, ""
    else:
        whole, fraction = text[:exponent] or "0", text[exponent:].rjust(-exponent, "0")
    whole = whole.lstrip("0")
    whole = whole.rjust((len(whole) + 3) // 4 * 4, "0")
    fraction = fraction.ljust((len(fraction) + 3) // 4 * 4, "0")
    groups = [int(whole[i : i + 4]) for i in range(0, len(whole), 4)]
    weight = len(groups) - 1
    groups += [int(fraction[i : i + 4]) for i in range(0, len(fraction), 4)]
    while groups and groups[-1] == 0:  # trailing zero groups are implied
        groups.pop()
    while groups and groups[0] == 0:  # leading ones move the weight
        groups.pop(0)
        weight -= 1
    if not groups:  # zero: PostgreSQL has no negative zero (-0.0 is sent as 0)
        weight, sign = 0, 0
    header = struct.pack("!hhHh", len(groups), weight, 0x4000 if sign else 0, dscale)
    return header + b"".join(struct.pack("!H", g) for g in groups)
