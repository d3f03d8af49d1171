"""The startup phase: the untyped first packet a client sends, and the ``options`` switch.

A connection opens with one of StartupMessage, SSLRequest, GSSENCRequest or
CancelRequest, each an Int32 length then an Int32 code (the protocol version for a
StartupMessage). See "Start-up" in the protocol flow chapter of the PostgreSQL docs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import codes
from .errors import ProtocolError

_INT32 = struct.Struct("!I")
_CANCEL = struct.Struct("!III")


@dataclass(frozen=True, slots=True)
class StartupMessage:
    major: int
    minor: int
    params: dict[str, str]


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    key: int


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def startup_packet_length(header: bytes) -> int:
    """Total length of the startup packet whose first four bytes are ``header``."""
    (length,) = _INT32.unpack_from(header)
    if length < 8 or length > codes.MAX_STARTUP_PACKET:
        raise ProtocolError(
            f"invalid startup packet length {length} (must be 8 to {codes.MAX_STARTUP_PACKET})"
        )
    return int(length)


def parse_startup_packet(packet: bytes) -> StartupPacket:
    """Decode a whole startup packet, length word included."""
    if len(packet) < 8 or startup_packet_length(packet) != len(packet):
        raise ProtocolError("startup packet length does not match its content")
    (code,) = _INT32.unpack_from(packet, 4)
    if code == codes.SSL_REQUEST_CODE:
        if len(packet) != 8:
            raise ProtocolError("SSLRequest with extra bytes")
        return SSLRequest()
    if code == codes.GSSENC_REQUEST_CODE:
        if len(packet) != 8:
            raise ProtocolError("GSSENCRequest with extra bytes")
        return GSSENCRequest()
    if code == codes.CANCEL_REQUEST_CODE:
        # Protocol 3.0 keys are 4 bytes; 3.2 allows longer ones, which we never issue.
        if len(packet) != 16:
            raise ProtocolError("CancelRequest with a key that pgmux never issued")
        _, pid, key = _CANCEL.unpack_from(packet, 4)
        return CancelRequest(pid, key)
    return StartupMessage(code >> 16, code & 0xFFFF, _parse_params(packet, 8))


def _parse_params(packet: bytes, pos: int) -> dict[str, str]:
    params: dict[str, str] = {}
    end = len(packet)
    while True:
        if pos >= end:
            raise ProtocolError("startup packet is missing its terminator")
        if packet[pos] == 0:
            if pos + 1 != end:
                raise ProtocolError("startup packet has bytes after its terminator")
            return params
        name, pos = _cstring(packet, pos)
        if pos >= end:
            raise ProtocolError(f"startup parameter {name!r} has no value")
        value, pos = _cstring(packet, pos)
        params[name] = value


def _cstring(packet: bytes, pos: int) -> tuple[str, int]:
    nul = packet.find(b"\x00", pos)
    if nul < 0:
        raise ProtocolError("startup packet string is not NUL-terminated")
    return packet[pos:nul].decode("utf-8", "surrogateescape"), nul + 1


def split_options(options: str) -> list[str]:
    """Split the ``options`` startup parameter like PostgreSQL's pg_split_opts.

    Words are separated by unescaped whitespace; a backslash takes the next character
    literally (so ``-c search_path=a,\\ b`` keeps its space).
    """
    words: list[str] = []
    word: list[str] = []
    in_word = False
    chars = iter(options)
    for ch in chars:
        if ch.isspace():
            if in_word:
                words.append("".join(word))
                word = []
                in_word = False
            continue
        in_word = True
        if ch == "\\":
            ch = next(chars, "")
        word.append(ch)
    if in_word:
        words.append("".join(word))
    return words


def parse_options(options: str) -> dict[str, str]:
    """The run-time settings in ``options``: ``-c name=value`` and ``--name=value``.

    Dashes in names become underscores, as in PostgreSQL's ParseLongOption. Any other
    command-line switch is refused: pgmux cannot pass backend switches through a pool.
    """
    settings: dict[str, str] = {}
    words = split_options(options)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c":
            i += 1
            if i == len(words):
                raise ValueError("-c in options is missing its name=value")
            assignment = words[i]
        elif word.startswith(("-c", "--")):
            assignment = word[2:]
        else:
            raise ValueError(f"unsupported switch {word!r} in options; only -c name=value works")
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise ValueError(f"{assignment!r} in options is not name=value")
        settings[name.replace("-", "_")] = value
        i += 1
    return settings
