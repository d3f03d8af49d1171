"""Parse, Bind, Describe and Close on bytes alone: splitting, rebuilding, refusing garbage."""

from __future__ import annotations

import struct

import pytest

from proxy.protocol import messages
from proxy.protocol.errors import ProtocolError
from proxy.protocol.extended import (
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    PORTAL,
    STATEMENT,
    build_bind,
    build_parse,
    build_target,
    parse_query,
    split_bind,
    split_parse,
    split_target,
)


def body_of(message: bytes, type_byte: bytes) -> bytes:
    """The body of one framed message, after checking its type and length field."""
    typ, length = struct.unpack("!cI", message[:5])
    assert typ == type_byte
    assert length == len(message) - 1  # the length counts itself, not the type byte
    return message[5:]


def parse_rest(query: bytes, oids: tuple[int, ...] = ()) -> bytes:
    """What split_parse calls the rest: query, NUL, Int16 count, Int32 type OIDs."""
    return query + b"\x00" + struct.pack(f"!H{len(oids)}I", len(oids), *oids)


# The tail of a Bind after the statement name: two parameters (one text "42", one
# NULL), formats text then binary, one binary result column.
BIND_TAIL = (
    struct.pack("!HHH", 2, 0, 1)  # parameter format codes
    + struct.pack("!H", 2)  # parameter values
    + struct.pack("!i", 2)
    + b"42"
    + struct.pack("!i", -1)  # NULL
    + struct.pack("!HH", 1, 1)  # result format codes
)

NAMES = [b"", b"s1", b"P_0000002a", "café".encode(), b"x" * 63]


class TestConstants:
    def test_reply_messages(self) -> None:
        # ParseComplete '1' and CloseComplete '3': a type byte and a length of 4.
        assert PARSE_COMPLETE == b"1\x00\x00\x00\x04"
        assert CLOSE_COMPLETE == b"3\x00\x00\x00\x04"

    def test_target_kinds(self) -> None:
        assert STATEMENT == ord("S") == 0x53
        assert PORTAL == ord("P") == 0x50


class TestParse:
    def test_wire_bytes(self) -> None:
        # 'P', Int32 22, "s1\0", "select 1\0", Int16 1, Int32 23 (int4).
        rest = b"select 1\x00\x00\x01\x00\x00\x00\x17"
        assert build_parse(b"s1", rest) == (
            b"P\x00\x00\x00\x16s1\x00select 1\x00\x00\x01\x00\x00\x00\x17"
        )

    def test_unnamed_without_parameter_types(self) -> None:
        assert build_parse(b"", b"select 1\x00\x00\x00") == (
            b"P\x00\x00\x00\x10\x00select 1\x00\x00\x00"
        )

    def test_split_wire_bytes(self) -> None:
        body = b"s1\x00select $1\x00\x00\x01\x00\x00\x00\x17"
        name, rest = split_parse(body)
        assert name == b"s1"
        assert rest == b"select $1\x00\x00\x01\x00\x00\x00\x17"
        assert parse_query(rest) == b"select $1"

    @pytest.mark.parametrize("name", NAMES)
    @pytest.mark.parametrize(
        ("query", "oids"),
        [
            (b"select 1", ()),
            (b"", ()),
            (b"select $1::int, $2", (23, 25)),
            ("select 'héllo', $1".encode(), (0,)),
            (b"insert into t values ($1, $2, $3)", (20, 1043, 0xFFFFFFFF)),
        ],
    )
    def test_round_trip(self, name: bytes, query: bytes, oids: tuple[int, ...]) -> None:
        rest = parse_rest(query, oids)
        message = build_parse(name, rest)
        assert message == messages.message(b"P", name + b"\x00" + rest)
        assert split_parse(body_of(message, b"P")) == (name, rest)
        assert parse_query(rest) == query

    def test_rest_is_not_reencoded(self) -> None:
        # Whatever follows the name comes back untouched, NUL bytes in the OIDs included.
        rest = parse_rest(b"select $1, $2", (0, 0x00000100))
        assert b"\x00\x00\x00\x00" in rest
        assert split_parse(b"name\x00" + rest) == (b"name", rest)

    @pytest.mark.parametrize("body", [b"", b"s1", b"no terminator anywhere"])
    def test_name_without_nul(self, body: bytes) -> None:
        with pytest.raises(ProtocolError, match="Parse statement name"):
            split_parse(body)

    @pytest.mark.parametrize("rest", [b"", b"select 1", "séléct".encode()])
    def test_query_without_nul(self, rest: bytes) -> None:
        with pytest.raises(ProtocolError, match="Parse query"):
            parse_query(rest)

    def test_body_that_ends_after_the_name(self) -> None:
        name, rest = split_parse(b"s1\x00")
        assert (name, rest) == (b"s1", b"")
        with pytest.raises(ProtocolError):
            parse_query(rest)

    @pytest.mark.parametrize(
        "body",
        [
            b"s1\x00select $1, $2\x00\x00\x02\x00\x00\x00\x17",  # 2 OIDs announced, 1 sent
            b"s1\x00select $1\x00\x00\x01\x00\x00",  # an OID cut short
            b"s1\x00select 1\x00\x00",  # half of the Int16 count
            b"s1\x00select 1\x00",  # no count at all
        ],
        ids=["missing-oid", "short-oid", "short-count", "no-count"],
    )
    def test_parameter_types_pass_through_unchecked(self, body: bytes) -> None:
        """By design pgmux reads only the name and the query; what follows goes to the
        server byte for byte, and PostgreSQL rejects a short list with its own 08P01
        ERROR (the session survives, so pgmux need not judge it first)."""
        name, rest = split_parse(body)
        assert name == b"s1"
        assert build_parse(name, rest)[5:] == body
        assert parse_query(rest) == body[3 : body.index(b"\x00", 3)]


class TestBind:
    def test_split_wire_bytes(self) -> None:
        body = b"portal\x00s1\x00" + BIND_TAIL
        portal_end, name, offset = split_bind(body)
        assert name == b"s1"
        assert body[:portal_end] == b"portal"
        assert body[offset:] == BIND_TAIL

    def test_unnamed_portal_and_statement(self) -> None:
        body = b"\x00\x00" + BIND_TAIL
        assert split_bind(body) == (0, b"", 2)

    def test_rename_wire_bytes(self) -> None:
        # 'B', Int32 length, portal "", statement "P_1", no formats, no params, no results.
        body = b"\x00s1\x00\x00\x00\x00\x00\x00\x00"
        portal_end, _, offset = split_bind(body)
        assert build_bind(body, portal_end, b"P_1", offset) == (
            b"B\x00\x00\x00\x0f\x00P_1\x00\x00\x00\x00\x00\x00\x00"
        )

    @pytest.mark.parametrize("portal", [b"", b"c1", "pörtal".encode()])
    @pytest.mark.parametrize("old", [b"", b"s1", b"a_much_longer_client_statement_name"])
    @pytest.mark.parametrize("new", NAMES)
    def test_rename_keeps_the_rest(self, portal: bytes, old: bytes, new: bytes) -> None:
        body = portal + b"\x00" + old + b"\x00" + BIND_TAIL
        portal_end, name, offset = split_bind(body)
        assert name == old
        message = build_bind(body, portal_end, new, offset)
        assert message == messages.message(b"B", portal + b"\x00" + new + b"\x00" + BIND_TAIL)
        rebuilt = body_of(message, b"B")
        portal_end2, name2, offset2 = split_bind(rebuilt)
        assert rebuilt[:portal_end2] == portal
        assert name2 == new
        assert rebuilt[offset2:] == BIND_TAIL  # byte-identical parameters and formats

    @pytest.mark.parametrize("name", NAMES)
    def test_same_name_rebuilds_the_original(self, name: bytes) -> None:
        body = b"c1\x00" + name + b"\x00" + BIND_TAIL
        portal_end, _, offset = split_bind(body)
        assert build_bind(body, portal_end, name, offset) == messages.message(b"B", body)

    @pytest.mark.parametrize(
        ("body", "what"),
        [
            (b"", "Bind portal name"),
            (b"portal", "Bind portal name"),
            (b"\x00", "Bind statement name"),
            (b"portal\x00s1", "Bind statement name"),
        ],
    )
    def test_names_without_nul(self, body: bytes, what: str) -> None:
        with pytest.raises(ProtocolError, match=what):
            split_bind(body)

    @pytest.mark.parametrize(
        "body",
        [
            b"\x00s1\x00",  # nothing after the statement name
            b"\x00s1\x00\x00\x02\x00\x00",  # 2 format codes announced, 1 sent
            b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x05ab",  # a 5-byte value of 2 bytes
            b"\x00s1\x00" + BIND_TAIL[:-1],  # result formats cut short
        ],
        ids=["no-tail", "short-formats", "short-value", "short-results"],
    )
    def test_parameters_pass_through_unchecked(self, body: bytes) -> None:
        """Only the names are read; renaming keeps the rest byte for byte, for the server
        to validate (it answers a short Bind with its own 08P01 ERROR)."""
        portal_end, name, offset = split_bind(body)
        assert name == b"s1"
        renamed = build_bind(body, portal_end, b"pgmux_1", offset)
        assert renamed[5:] == b"\x00pgmux_1\x00" + body[4:]


class TestTarget:
    def test_wire_bytes(self) -> None:
        # 'D' / 'C', Int32 length, Byte1 'S' or 'P', name, NUL.
        assert build_target(b"D", STATEMENT, b"s1") == b"D\x00\x00\x00\x08Ss1\x00"
        assert build_target(b"C", PORTAL, b"") == b"C\x00\x00\x00\x06P\x00"

    def test_split_wire_bytes(self) -> None:
        assert split_target(b"Ss1\x00", "Describe") == (STATEMENT, b"s1")
        assert split_target(b"P\x00", "Close") == (PORTAL, b"")

    @pytest.mark.parametrize("type_byte", [b"D", b"C"])
    @pytest.mark.parametrize("kind", [STATEMENT, PORTAL])
    @pytest.mark.parametrize("name", NAMES)
    def test_round_trip(self, type_byte: bytes, kind: int, name: bytes) -> None:
        message = build_target(type_byte, kind, name)
        assert message == messages.message(type_byte, bytes((kind,)) + name + b"\x00")
        assert split_target(body_of(message, type_byte), "Describe") == (kind, name)

    @pytest.mark.parametrize(
        "body",
        [b"", b"S", b"P", b"\x00", b"X\x00", b"s\x00", b"ps1\x00", b"Ds1\x00", b"\x00s1\x00"],
        ids=["empty", "S-only", "P-only", "nul", "X", "lower-s", "lower-p", "D", "no-kind"],
    )
    def test_wrong_kind(self, body: bytes) -> None:
        with pytest.raises(ProtocolError, match=r"Close must name a statement \(S\)"):
            split_target(body, "Close")

    @pytest.mark.parametrize("body", [b"Ss1", b"P portal", b"SS"])
    def test_name_without_nul(self, body: bytes) -> None:
        with pytest.raises(ProtocolError, match="Describe name is not NUL-terminated"):
            split_target(body, "Describe")

    @pytest.mark.parametrize("body", [b"S\x00\x00", b"Ss1\x00x", b"Ps1\x00s2\x00"])
    def test_bytes_after_the_name(self, body: bytes) -> None:
        with pytest.raises(ProtocolError, match="Describe has bytes after its name"):
            split_target(body, "Describe")


def test_errors_carry_protocol_violation() -> None:
    # Each kind of malformed body surfaces as the one sticky error, SQLSTATE 08P01.
    for call in (
        lambda: split_parse(b"s1"),
        lambda: parse_query(b"select 1"),
        lambda: split_bind(b"\x00s1"),
        lambda: split_target(b"Q\x00", "Describe"),
    ):
        with pytest.raises(ProtocolError) as info:
            call()
        assert info.value.sqlstate == "08P01"
