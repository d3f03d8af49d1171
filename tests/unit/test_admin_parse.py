"""The admin console's grammar (``proxy.admin.parse_command``) and the result-set
encoders it answers with (``proxy.protocol.results``), checked on bytes.

Expected bytes are spelled out from the protocol documentation here, and binary
numerics are also checked against psycopg's own numeric codec, an implementation
independent of pgmux's.
"""

from __future__ import annotations

import struct
from decimal import Decimal

import pytest
from psycopg.types.numeric import DecimalBinaryDumper, NumericBinaryLoader

from proxy.admin import Command, parse_command
from proxy.admin_show import FAKE_PARAMETERS, HELP_TEXT, SHOW_COMMANDS
from proxy.errors import AdminError
from proxy.protocol.results import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    EMPTY_QUERY,
    INT4,
    INT8,
    NO_DATA,
    NO_PARAMETERS,
    NUMERIC,
    PARSE_COMPLETE,
    TEXT,
    command_complete,
    data_row,
    encode_binary,
    encode_numeric,
    encode_text,
    result_formats,
    row_description,
)

# -- the grammar ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "verb", "arg"),
    [
        ("SHOW POOLS", "show", "pools"),
        ("  show   pools ; ", "show", "pools"),
        ("SHOW pools\n", "show", "pools"),
        ('SHOW "pools"', "show", "pools"),
        ("Show Stats_Totals", "show", "stats_totals"),
        ("SELECT clients", "show", "clients"),  # PgBouncer's alias
        ("show help", "show", "help"),
        ("SHOW PINS", "show", "pins"),
        ("SHOW TimeZone", "show", "timezone"),  # a parameter drivers ask for
        ("SHOW client_encoding;", "show", "client_encoding"),
        ("SET default_pool_size = 10", "set", "default_pool_size=10"),
        ("set Default_Pool_Size=10;", "set", "default_pool_size=10"),
        ("SET log_statement_text TO 'a''b'", "set", "log_statement_text=a'b"),
        ("SET metrics.listen_port = '9200'", "set", "metrics.listen_port=9200"),
        ("PAUSE", "pause", None),
        ("pause app", "pause", "app"),
        ("PAUSE App", "pause", "app"),  # a bare word is folded, as in SQL
        ('PAUSE "MyDb"', "pause", "MyDb"),  # a quoted one is not
        ('PAUSE "a""b"', "pause", 'a"b'),
        ("RESUME app;", "resume", "app"),
        ("KILL_CLIENT 17", "kill_client", "17"),
        ("shutdown wait_for_clients", "shutdown", "wait_for_clients"),
        ("SUSPEND", "suspend", None),  # parsed; refused when run
        ("RELOAD", "reload", None),
        ("WAIT_CLOSE app", "wait_close", "app"),
    ],
)
def test_parse_command(sql: str, verb: str, arg: str | None) -> None:
    command = parse_command(sql)
    assert command == Command(verb, arg, sql.strip())


@pytest.mark.parametrize("sql", ["", "   ", ";", " ; \n", "\t;"])
def test_empty_query(sql: str) -> None:
    assert parse_command(sql) is None


@pytest.mark.parametrize(
    ("sql", "hint"),
    [
        ("SHOW POOL", "did you mean SHOW POOLS?"),
        ("show pool", "did you mean SHOW POOLS?"),
        ("SHOW POOLS extra", "did you mean SHOW POOLS?"),
        ("SHOW POOLS;;", "did you mean SHOW POOLS?"),
        ("show stats_total", "did you mean SHOW STATS_TOTALS?"),
        ("SHOW  CLIENT", "did you mean SHOW CLIENTS?"),
        ("PAUSED", "did you mean PAUSE?"),
        ("FROBNICATE", "SHOW HELP lists the commands"),
        ("SELECT 1", "SHOW HELP lists the commands"),
        ("SET a = b c", "SHOW HELP lists the commands"),
        ('SHOW "POOLS"', "did you mean SHOW POOLS?"),  # quoted: no case folding
    ],
)
def test_invalid_command(sql: str, hint: str) -> None:
    with pytest.raises(AdminError) as info:
        parse_command(sql)
    error = info.value
    assert error.message == f"invalid command '{sql.strip()}', use SHOW HELP;"
    assert error.hint == hint
    assert error.sqlstate == "08P01"  # as PgBouncer's


@pytest.mark.parametrize("sql", ["SHOW FDS", "SHOW SOCKETS", "SHOW DNS_HOSTS", "SHOW"])
def test_pgbouncer_internals_are_not_commands(sql: str) -> None:
    with pytest.raises(AdminError):
        parse_command(sql)


def test_columns_known_before_running() -> None:
    """Describe answers from the parsed command alone."""
    pools = parse_command("SHOW POOLS")
    assert pools is not None and pools.columns() == SHOW_COMMANDS["pools"].columns
    fake = parse_command("SHOW DateStyle")
    assert fake is not None and fake.columns() == [("datestyle", TEXT)]
    for sql in ("SHOW HELP", "PAUSE", "SET default_pool_size = 3", "KILL_CLIENT 3"):
        command = parse_command(sql)
        assert command is not None and command.columns() is None, sql


def test_every_show_command_parses_and_is_in_help() -> None:
    for name, show in SHOW_COMMANDS.items():
        command = parse_command(f"SHOW {name.upper()}")
        assert command == Command("show", name, f"SHOW {name.upper()}")
        assert name.upper() in HELP_TEXT, name
        assert show.columns and all(oid in (TEXT, INT4, INT8, NUMERIC) for _, oid in show.columns)
        names = [column for column, _ in show.columns]
        assert len(set(names)) == len(names), (name, names)
    for name in FAKE_PARAMETERS:
        assert parse_command(f"show {name}") == Command("show", name, f"show {name}")


# -- messages --------------------------------------------------------------------------------


def _message(typ: bytes, body: bytes) -> bytes:
    return typ + struct.pack("!I", len(body) + 4) + body


def test_fixed_messages() -> None:
    assert PARSE_COMPLETE == b"1\x00\x00\x00\x04"
    assert BIND_COMPLETE == b"2\x00\x00\x00\x04"
    assert CLOSE_COMPLETE == b"3\x00\x00\x00\x04"
    assert NO_DATA == b"n\x00\x00\x00\x04"
    assert EMPTY_QUERY == b"I\x00\x00\x00\x04"
    assert NO_PARAMETERS == b"t\x00\x00\x00\x06\x00\x00"
    assert command_complete("SHOW") == b"C\x00\x00\x00\x09SHOW\x00"


def _field(name: str, oid: int, typlen: int, fmt: int) -> bytes:
    # name, table oid, column number, type oid, type length, type modifier, format
    return name.encode() + b"\x00" + struct.pack("!IhIhih", 0, 0, oid, typlen, -1, fmt)


COLUMNS = [("database", TEXT), ("cl_active", INT4), ("total", INT8), ("avg", NUMERIC)]


def test_row_description_text() -> None:
    expected = struct.pack("!h", 4) + (
        _field("database", 25, -1, 0) + _field("cl_active", 23, 4, 0)
        + _field("total", 20, 8, 0) + _field("avg", 1700, -1, 0)
    )  # fmt: skip
    assert row_description(COLUMNS) == _message(b"T", expected)
    assert row_description(COLUMNS, [0, 0, 0, 0]) == _message(b"T", expected)


def test_row_description_binary_per_column() -> None:
    body = row_description(COLUMNS, [0, 1, 1, 1])[5:]
    assert body == struct.pack("!h", 4) + (
        _field("database", 25, -1, 0) + _field("cl_active", 23, 4, 1)
        + _field("total", 20, 8, 1) + _field("avg", 1700, -1, 1)
    )  # fmt: skip


def _value(data: bytes | None) -> bytes:
    return struct.pack("!i", -1) if data is None else struct.pack("!i", len(data)) + data


def test_data_row_text() -> None:
    row = data_row(COLUMNS, ["app", 7, 2**40, Decimal("1.50")])
    expected = struct.pack("!h", 4) + b"".join(
        _value(v) for v in (b"app", b"7", b"1099511627776", b"1.50")
    )
    assert row == _message(b"D", expected)


def test_data_row_null_and_text_forms() -> None:
    row = data_row(COLUMNS, [None, -3, None, 0], [0, 0, 1, 1])
    expected = struct.pack("!h", 4) + b"".join(
        _value(v) for v in (None, b"-3", None, b"\x00\x00\x00\x00\x00\x00\x00\x00")
    )
    assert row == _message(b"D", expected)
    assert encode_text(True) == b"1" and encode_text(False) == b"0"
    assert encode_text("é") == "é".encode()


def test_data_row_binary() -> None:
    row = data_row(COLUMNS, ["pgbouncer", -2, 2**40, 12], [1, 1, 1, 1])
    expected = struct.pack("!h", 4) + b"".join(
        _value(v)
        for v in (
            b"pgbouncer",  # text is the same bytes in binary
            b"\xff\xff\xff\xfe",
            b"\x00\x00\x01\x00\x00\x00\x00\x00",
            struct.pack("!hhHhH", 1, 0, 0, 0, 12),
        )
    )
    assert row == _message(b"D", expected)


def test_encode_binary_ints() -> None:
    assert encode_binary(INT4, 2**31 - 1) == b"\x7f\xff\xff\xff"
    assert encode_binary(INT4, -(2**31)) == b"\x80\x00\x00\x00"
    assert encode_binary(INT4, True) == b"\x00\x00\x00\x01"
    assert encode_binary(INT8, -1) == b"\xff" * 8
    assert encode_binary(TEXT, 42) == b"42"
    with pytest.raises(struct.error):
        encode_binary(INT4, 2**31)  # out of range is refused, never wrapped


def test_result_formats() -> None:
    assert result_formats([], 3) == [0, 0, 0]  # none: all text
    assert result_formats([1], 3) == [1, 1, 1]  # one: all columns
    assert result_formats([0, 1, 0], 3) == [0, 1, 0]
    with pytest.raises(ValueError, match="2 result formats for 3 columns"):
        result_formats([0, 1], 3)


# -- binary numeric -------------------------------------------------------------------------


def _numeric(weight: int, sign: int, dscale: int, *digits: int) -> bytes:
    """numeric_send: ndigits, weight, sign, dscale, then base-10000 digits."""
    return struct.pack(f"!hhHh{len(digits)}H", len(digits), weight, sign, dscale, *digits)


POS, NEG = 0x0000, 0x4000


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", _numeric(0, POS, 0)),
        ("1", _numeric(0, POS, 0, 1)),
        ("9999", _numeric(0, POS, 0, 9999)),
        ("10000", _numeric(1, POS, 0, 1)),  # trailing zero digits are implied
        ("12345678", _numeric(1, POS, 0, 1234, 5678)),
        ("123456789", _numeric(2, POS, 0, 1, 2345, 6789)),
        ("1E+20", _numeric(5, POS, 0, 1)),
        ("0.5", _numeric(-1, POS, 1, 5000)),
        ("0.0001", _numeric(-1, POS, 4, 1)),
        ("0.00001", _numeric(-2, POS, 5, 1000)),  # leading zero digits move the weight
        ("0.000", _numeric(0, POS, 3)),  # zero keeps its scale
        ("123.450", _numeric(0, POS, 3, 123, 4500)),
        ("-1.5", _numeric(0, NEG, 1, 1, 5000)),
        ("-0.001", _numeric(-1, NEG, 3, 10)),
        ("3.14159", _numeric(0, POS, 5, 3, 1415, 9000)),
        ("-0", _numeric(0, POS, 0)),  # PostgreSQL has no negative zero
        ("-0.0", _numeric(0, POS, 1)),
    ],
)
def test_encode_numeric(value: str, expected: bytes) -> None:
    assert encode_numeric(Decimal(value)) == expected
    assert encode_binary(NUMERIC, Decimal(value)) == expected


@pytest.mark.parametrize(
    "value",
    [
        "0", "1", "-1", "42", "10000", "99999999", "100000000", "123456789012345678901234567890",
        "0.1", "0.25", "-0.333", "1.0001", "999.9999", "0.00000001", "-98765.4321000",
        "18446744073709551615", "1234567.8901",
    ],
)  # fmt: skip
def test_encode_numeric_as_psycopg(value: str) -> None:
    """pgmux's encoder against psycopg's: same bytes, and psycopg reads it back."""
    number = Decimal(value)
    data = encode_numeric(number)
    assert data == bytes(DecimalBinaryDumper(Decimal).dump(number))
    loaded = NumericBinaryLoader(NUMERIC).load(data)
    assert loaded == number and str(loaded) == str(number)


def test_encode_binary_numeric_from_python_numbers() -> None:
    """Stats are ints and floats in pgmux; the console sends them as numeric."""
    assert encode_binary(NUMERIC, 0) == _numeric(0, POS, 0)
    assert encode_binary(NUMERIC, 20000) == _numeric(1, POS, 0, 2)
    assert encode_binary(NUMERIC, 1.25) == _numeric(0, POS, 2, 1, 2500)
    assert encode_binary(NUMERIC, -0.0) == _numeric(0, POS, 1)
    assert encode_binary(NUMERIC, 0.123) == _numeric(-1, POS, 3, 1230)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "sNaN"])
def test_encode_numeric_refuses_non_finite(value: str) -> None:
    with pytest.raises(ValueError, match="cannot send"):
        encode_numeric(Decimal(value))
