"""Whole-message framing for the phases where pgmux reads every message itself.

Used during startup and login, where messages are few and small. The relay never
uses this: it inspects headers only (see ``stream``).
"""

from __future__ import annotations

import struct

from .errors import ProtocolError
from .startup import startup_packet_length

_HEADER = struct.Struct("!BI")


class MessageReader:
    """Buffers received bytes and hands out complete messages, checking every length."""

    __slots__ = ("_buf", "_max_length")

    def __init__(self, max_length: int) -> None:
        self._buf = bytearray()
        self._max_length = max_length

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_message(self) -> tuple[int, bytes] | None:
        """The next ``(type, body)``, or None until a whole message has arrived."""
        buf = self._buf
        if len(buf) < 5:
            return None
        typ, length = _HEADER.unpack_from(buf)
        if length < 4 or length > self._max_length:
            raise ProtocolError(
                f"invalid length {length} in message of type {chr(typ)!r} "
                f"(must be 4 to {self._max_length}, max_packet_size)"
            )
        end = 1 + length
        if len(buf) < end:
            return None
        body = bytes(buf[5:end])
        del buf[:end]
        return typ, body

    def next_startup_packet(self) -> bytes | None:
        """The next untyped startup packet, length word included, or None."""
        buf = self._buf
        if len(buf) < 4:
            return None
        length = startup_packet_length(bytes(buf[:4]))
        if len(buf) < length:
            return None
        packet = bytes(buf[:length])
        del buf[:length]
        return packet

    def take_rest(self) -> bytes:
        """Everything buffered and not yet handed out; the reader is left empty."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest
