"""The extended query protocol's messages that name statements: read and rewrite them.

Parse, Bind, Describe and Close carry a prepared statement's name; pgmux maps client
names to its own server-side names, so it splits and rebuilds exactly those messages
(nothing else is re-encoded). Bodies are the bytes after the 5-byte header.
See https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import struct

from .errors import ProtocolError

_HEADER = struct.Struct("!cI")

PARSE_COMPLETE = b"1\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
STATEMENT = ord("S")
PORTAL = ord("P")


def _cstring_end(body: bytes, start: int, what: str) -> int:
    end = body.find(b"\x00", start)
    if end < 0:
        raise ProtocolError(f"{what} is not NUL-terminated")
    return end


def split_parse(body: bytes) -> tuple[bytes, bytes]:
    """Parse: (statement name, the rest: query, NUL, parameter types)."""
    end = _cstring_end(body, 0, "Parse statement name")
    return body[:end], body[end + 1 :]


def build_parse(name: bytes, rest: bytes) -> bytes:
    return _HEADER.pack(b"P", len(name) + 1 + len(rest) + 4) + name + b"\x00" + rest


def parse_query(rest: bytes) -> bytes:
    """The query text of a Parse, from what ``split_parse`` calls the rest."""
    end = rest.find(b"\x00")
    if end < 0:
        raise ProtocolError("Parse query is not NUL-terminated")
    return rest[:end]


def split_bind(body: bytes) -> tuple[int, bytes, int]:
    """Bind: (end of the portal name, statement name, offset after the statement name)."""
    portal_end = _cstring_end(body, 0, "Bind portal name")
    name_end = _cstring_end(body, portal_end + 1, "Bind statement name")
    return portal_end, body[portal_end + 1 : name_end], name_end + 1


def build_bind(body: bytes, portal_end: int, name: bytes, offset: int) -> bytes:
    """The Bind ``body`` with its statement name (which ended at ``offset``) replaced."""
    head = body[: portal_end + 1]
    rest = body[offset:]
    length = len(head) + len(name) + 1 + len(rest) + 4
    return b"".join((_HEADER.pack(b"B", length), head, name, b"\x00", rest))


def split_target(body: bytes, what: str) -> tuple[int, bytes]:
    """Describe / Close: ('S' or 'P', name)."""
    if len(body) < 2 or body[0] not in (STATEMENT, PORTAL):
        raise ProtocolError(f"{what} must name a statement (S) or a portal (P)")
    end = _cstring_end(body, 1, f"{what} name")
    if end != len(body) - 1:
        raise ProtocolError(f"{what} has bytes after its name")
    return body[0], body[1:end]


def build_target(type_byte: bytes, kind: int, name: bytes) -> bytes:
    """A Describe ('D') or Close ('C') message for statement/portal ``name``."""
    return _HEADER.pack(type_byte, len(name) + 6) + bytes((kind,)) + name + b"\x00"
