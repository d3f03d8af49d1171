"""Encoders for the messages pgmux itself sends, and decoders for the few it reads whole.

pgmux never rebuilds messages it relays; these functions are for what it originates
(errors, login replies, its own queries) and for the small messages whose content
changes pooler state (authentication requests, ParameterStatus, errors, keys).
Formats: https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

from . import codes
from .errors import ProtocolError

_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")
_INT32_PAIR = struct.Struct("!II")
_INT32_SIGNED = struct.Struct("!i")
_INT16 = struct.Struct("!H")

# Field codes of ErrorResponse / NoticeResponse.
FIELD_SEVERITY = "S"
FIELD_SEVERITY_RAW = "V"
FIELD_SQLSTATE = "C"
FIELD_MESSAGE = "M"
FIELD_DETAIL = "D"
FIELD_HINT = "H"


def message(type_byte: bytes, body: bytes = b"") -> bytes:
    """One framed message: type byte, Int32 length (counting itself), body."""
    return _HEADER.pack(type_byte, len(body) + 4) + body


def cstring(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\x00"


# -- backend messages pgmux originates (to clients) -----------------------------------

READY_IDLE = message(b"Z", b"I")
AUTH_OK = message(b"R", _INT32.pack(codes.AUTH_OK))


def ready_for_query(status: int) -> bytes:
    return message(b"Z", bytes((status,)))


def error_response(
    severity: str,
    sqlstate: str,
    text: str,
    detail: str | None = None,
    hint: str | None = None,
    *,
    notice: bool = False,
) -> bytes:
    """ErrorResponse (or NoticeResponse when ``notice``) with the usual fields."""
    body = bytearray()
    for code, value in (
        (FIELD_SEVERITY, severity),
        (FIELD_SEVERITY_RAW, severity),
        (FIELD_SQLSTATE, sqlstate),
        (FIELD_MESSAGE, text),
        (FIELD_DETAIL, detail),
        (FIELD_HINT, hint),
    ):
        if value is not None:
            body += code.encode() + cstring(value)
    body += b"\x00"
    return message(b"N" if notice else b"E", bytes(body))


def authentication_md5(salt: bytes) -> bytes:
    return message(b"R", _INT32.pack(codes.AUTH_MD5) + salt)


def authentication_cleartext() -> bytes:
    return message(b"R", _INT32.pack(codes.AUTH_CLEARTEXT))


def authentication_sasl(mechanisms: list[str]) -> bytes:
    body = _INT32.pack(codes.AUTH_SASL) + b"".join(cstring(m) for m in mechanisms) + b"\x00"
    return message(b"R", body)


def authentication_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _INT32.pack(codes.AUTH_SASL_CONTINUE) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return message(b"R", _INT32.pack(codes.AUTH_SASL_FINAL) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", _INT32_PAIR.pack(pid, key))


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    body = _INT32_PAIR.pack(newest_minor, len(unrecognized))
    return message(b"v", body + b"".join(cstring(o) for o in unrecognized))


# -- frontend messages pgmux originates (to servers) ----------------------------------

SYNC = message(b"S")
TERMINATE = message(b"X")
SSL_REQUEST = _INT32.pack(8) + _INT32.pack(codes.SSL_REQUEST_CODE)


def startup_message(params: Mapping[str, str]) -> bytes:
    body = _INT32.pack(codes.PROTOCOL_3_0)
    body += b"".join(cstring(k) + cstring(v) for k, v in params.items()) + b"\x00"
    return _INT32.pack(len(body) + 4) + body


def cancel_request(pid: int, key: int) -> bytes:
    return _INT32.pack(16) + _INT32.pack(codes.CANCEL_REQUEST_CODE) + _INT32_PAIR.pack(pid, key)


def password_message(payload: bytes) -> bytes:
    """PasswordMessage: ``payload`` is the password or md5 response, NUL added here."""
    return message(b"p", payload + b"\x00")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstring(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


def query(sql: str) -> bytes:
    return message(b"Q", cstring(sql))


def parse(name: str, sql: str) -> bytes:
    """Parse with no parameter types given (the server infers them)."""
    return message(b"P", cstring(name) + cstring(sql) + b"\x00\x00")


def bind(portal: str, statement: str, params: Sequence[str | None]) -> bytes:
    """Bind with every parameter and result in text format."""
    body = bytearray(cstring(portal) + cstring(statement))
    body += _INT16.pack(0) + _INT16.pack(len(params))
    for param in params:
        if param is None:
            body += _INT32.pack(0xFFFFFFFF)
        else:
            data = param.encode("utf-8", "surrogateescape")
            body += _INT32.pack(len(data)) + data
    body += _INT16.pack(0)
    return message(b"B", bytes(body))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", cstring(portal) + _INT32.pack(max_rows))


def copy_fail(reason: str) -> bytes:
    return message(b"f", cstring(reason))


# -- decoders -------------------------------------------------------------------------


def read_cstring(body: bytes, pos: int) -> tuple[str, int]:
    """The NUL-terminated string at ``pos`` and the position after its NUL."""
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("string in message is not NUL-terminated")
    return body[pos:end].decode("utf-8", "surrogateescape"), end + 1


def parse_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse body, by field code."""
    fields: dict[str, str] = {}
    pos = 0
    while True:
        if pos >= len(body):
            raise ProtocolError("error/notice message is missing its terminator")
        code = body[pos]
        if code == 0:
            return fields
        value, pos = read_cstring(body, pos + 1)
        fields[chr(code)] = value


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstring(body, 0)
    value, _ = read_cstring(body, pos)
    return name, value


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    """The authentication request code and its payload."""
    if len(body) < 4:
        raise ProtocolError("authentication request too short")
    return _INT32.unpack_from(body)[0], body[4:]


def parse_sasl_mechanisms(payload: bytes) -> list[str]:
    mechanisms: list[str] = []
    pos = 0
    while True:
        name, pos = read_cstring(payload, pos)
        if not name:
            return mechanisms
        mechanisms.append(name)


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    if len(body) != 8:
        raise ProtocolError(f"BackendKeyData of {len(body)} bytes, expected 8")
    pid, key = _INT32_PAIR.unpack(body)
    return pid, key


def parse_password_message(body: bytes) -> bytes:
    """The payload of a PasswordMessage (cleartext or md5 response), NUL stripped."""
    if not body.endswith(b"\x00"):
        raise ProtocolError("password message is not NUL-terminated")
    return body[:-1]


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mechanism, pos = read_cstring(body, 0)
    if len(body) < pos + 4:
        raise ProtocolError("SASLInitialResponse too short")
    (length,) = _INT32.unpack_from(body, pos)
    data = body[pos + 4 :]
    if length == 0xFFFFFFFF:
        data = b""
    elif length != len(data):
        raise ProtocolError("SASLInitialResponse length does not match its data")
    return mechanism, data


def parse_data_row(body: bytes) -> list[bytes | None]:
    """The column values of a DataRow (None for NULL)."""
    if len(body) < 2:
        raise ProtocolError("DataRow too short")
    (count,) = _INT16.unpack_from(body)
    values: list[bytes | None] = []
    pos = 2
    for _ in range(count):
        if len(body) < pos + 4:
            raise ProtocolError("DataRow column length missing")
        (length,) = _INT32_SIGNED.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        if len(body) < pos + length:
            raise ProtocolError("DataRow column runs past the message")
        values.append(body[pos : pos + length])
        pos += length
    return values


def error_summary(fields: Mapping[str, str]) -> str:
    """``SEVERITY SQLSTATE: message`` for logs."""
    return "{} {}: {}".format(
        fields.get(FIELD_SEVERITY_RAW, fields.get(FIELD_SEVERITY, "ERROR")),
        fields.get(FIELD_SQLSTATE, "?????"),
        fields.get(FIELD_MESSAGE, ""),
    )
