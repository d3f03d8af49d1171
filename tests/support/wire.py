"""The PostgreSQL wire protocol by hand, for tests that must send exactly these bytes.

Independent of ``proxy.protocol`` on purpose: a test written with the proxy's own
encoders would share its bugs.

- Encoders: ``startup_packet``, ``ssl_request``, ``gssenc_request``, ``cancel_request``,
  ``message``, ``query``, ``parse``, ``bind``, ``execute``, ``sync``, ``flush``, ``copy_data``,
  ``copy_done``, ``terminate``, ``describe_statement``, ``describe_portal``,
  ``close_statement``, ``close_portal``.
- Replies as lists of ``(type byte, body)``: ``RawClient.read_until_ready`` / ``exchange``
  (one batch, up to ReadyForQuery) and ``exchange_batches`` (several); ``Reply`` wraps
  such a list with ``types`` ("12DCZ"), ``rows``, ``errors``, ``tags``, ``status``.
- ``parse_row_description`` / ``parse_parameter_description``.
- ``run_steps``: a scripted exchange (``Step``: bytes to send, what to read back), to run
  the same script against PostgreSQL itself and through pgmux and compare.
- ``RawClient``: an asyncio stream to pgmux (or PostgreSQL) that reads whole messages
  and can log in (trust, cleartext, md5, SCRAM-SHA-256 and SCRAM-SHA-256-PLUS) and run
  simple queries. TLS either way: ``RawClient.open(..., ssl_context=ctx)`` is TLS from the
  first byte (PostgreSQL 17's direct TLS; give the context ALPN "postgresql"), and
  ``request_tls(ctx)`` is the SSLRequest upgrade of a plain connection.
- ``parse_fields``: the fields of an ErrorResponse / NoticeResponse.
- ``tls_server_end_point``: RFC 5929 channel binding data of a DER certificate.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import ssl
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
ALPN_POSTGRESQL = "postgresql"

_INT32 = struct.Struct("!I")
_HEADER = struct.Struct("!cI")


# -- encoders ----------------------------------------------------------------------------


def _cstring(text: str) -> bytes:
    return text.encode() + b"\x00"


def startup_packet(params: Mapping[str, str], major: int = 3, minor: int = 0) -> bytes:
    body = _INT32.pack((major << 16) | minor)
    body += b"".join(_cstring(k) + _cstring(v) for k, v in params.items()) + b"\x00"
    return _INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return struct.pack("!II", 8, GSSENC_REQUEST_CODE)


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, pid, key)


def message(type_byte: bytes, body: bytes = b"") -> bytes:
    """Type byte, Int32 length (counting itself), body."""
    return _HEADER.pack(type_byte, len(body) + 4) + body


def query(sql: str) -> bytes:
    return message(b"Q", _cstring(sql))


def parse(sql: str, name: str = "", param_types: Sequence[int] = ()) -> bytes:
    """Parse ``sql`` as statement ``name``; ``param_types``: parameter type OIDs (0: any)."""
    types = struct.pack(f"!H{len(param_types)}I", len(param_types), *param_types)
    return message(b"P", _cstring(name) + _cstring(sql) + types)


def bind(portal: str = "", statement: str = "", params: Sequence[str | None] = ()) -> bytes:
    """Bind with text parameters (None: NULL), text results."""
    body = _cstring(portal) + _cstring(statement) + struct.pack("!HH", 0, len(params))
    for value in params:
        if value is None:
            body += struct.pack("!i", -1)
        else:
            data = value.encode()
            body += struct.pack("!i", len(data)) + data
    return message(b"B", body + struct.pack("!H", 0))


def describe_statement(name: str = "") -> bytes:
    return message(b"D", b"S" + _cstring(name))


def describe_portal(name: str = "") -> bytes:
    return message(b"D", b"P" + _cstring(name))


def close_statement(name: str = "") -> bytes:
    return message(b"C", b"S" + _cstring(name))


def close_portal(name: str = "") -> bytes:
    return message(b"C", b"P" + _cstring(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", _cstring(portal) + _INT32.pack(max_rows))


def sync() -> bytes:
    return message(b"S")


def flush() -> bytes:
    return message(b"H")


def copy_data(data: bytes) -> bytes:
    return message(b"d", data)


def copy_done() -> bytes:
    return message(b"c")


def terminate() -> bytes:
    return message(b"X")


# -- decoders ----------------------------------------------------------------------------


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code: value}."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.index(b"\x00", pos + 1)
        fields[code] = body[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return fields


def parse_row_description(body: bytes) -> list[tuple[str, int]]:
    """RowDescription body -> [(column name, type OID)]."""
    (count,) = struct.unpack_from("!H", body)
    pos = 2
    columns = []
    for _ in range(count):
        end = body.index(b"\x00", pos)
        name = body[pos:end].decode()
        _table, _column, type_oid, _size, _mod, _fmt = struct.unpack_from("!IHIhiH", body, end + 1)
        columns.append((name, type_oid))
        pos = end + 1 + 18
    return columns


def parse_parameter_description(body: bytes) -> list[int]:
    """ParameterDescription body -> parameter type OIDs."""
    (count,) = struct.unpack_from("!H", body)
    return list(struct.unpack_from(f"!{count}I", body, 2))


Message = tuple[bytes, bytes]


@dataclass
class Reply:
    """Messages the server sent, as ``(type byte, body)`` pairs, with views on them."""

    messages: list[Message]

    @property
    def types(self) -> str:
        """The message types in order, e.g. "12DCZ"."""
        return "".join(typ.decode() for typ, _ in self.messages)

    @property
    def rows(self) -> list[list[str | None]]:
        return [_data_row(body) for typ, body in self.messages if typ == b"D"]

    @property
    def errors(self) -> list[dict[str, str]]:
        return [parse_fields(body) for typ, body in self.messages if typ == b"E"]

    @property
    def sqlstates(self) -> list[str | None]:
        return [error.get("C") for error in self.errors]

    @property
    def tags(self) -> list[str]:
        return [body.rstrip(b"\x00").decode() for typ, body in self.messages if typ == b"C"]

    @property
    def status(self) -> str:
        """The transaction status of the last ReadyForQuery ("" if none)."""
        found = [body.decode() for typ, body in self.messages if typ == b"Z"]
        return found[-1] if found else ""

    def first(self, typ: bytes) -> bytes:
        """The body of the first message of type ``typ``."""
        for t, body in self.messages:
            if t == typ:
                return body
        raise AssertionError(f"no {typ!r} message in {self.types!r}")

    def split(self) -> list[Reply]:
        """One Reply per ReadyForQuery (per batch)."""
        out: list[Reply] = []
        current: list[Message] = []
        for msg in self.messages:
            current.append(msg)
            if msg[0] == b"Z":
                out.append(Reply(current))
                current = []
        if current:
            out.append(Reply(current))
        return out


Step = tuple[bytes, int | bytes]
"""What to send, and what to read back: that many batches (ReadyForQuery each), or up
to and including the first message of that type (e.g. b"G" for CopyInResponse)."""


async def run_steps(client: RawClient, steps: Sequence[Step], timeout: float = 10) -> list[Reply]:
    """Send each step and read its replies: one Reply per batch (or per step read
    up to a message type)."""
    replies: list[Reply] = []
    for payload, until in steps:
        await client.send(payload)
        if isinstance(until, int):
            for _ in range(until):
                replies.append(await client.read_until_ready(timeout))
        else:
            replies.append(Reply(await client.read_until(until, timeout)))
    return replies


class ServerError(Exception):
    """An ErrorResponse where the test did not expect one."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('C')}: {fields.get('M')}")
        self.fields = fields

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")


@dataclass
class QueryResult:
    """What a simple Query returned, up to and including ReadyForQuery."""

    rows: list[list[str | None]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    status: str = ""


# -- the client --------------------------------------------------------------------------


class RawClient:
    """One connection speaking the protocol by hand (asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_key = 0
        self.sasl_mechanisms: list[str] = []  # offered by the last AuthenticationSASL
        self.mechanism = ""  # the SASL mechanism ``login`` chose

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> RawClient:
        """Connect; with ``ssl_context`` the TLS handshake starts at once (direct TLS)."""
        if ssl_context is None:
            reader, writer = await asyncio.open_connection(host, port)
        else:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl_context, server_hostname=server_hostname or host
            )
        return cls(reader, writer)

    async def request_tls(
        self, context: ssl.SSLContext, server_hostname: str | None = None
    ) -> bytes:
        """Send SSLRequest; on ``S`` run the TLS handshake over this connection.

        Returns the one-byte answer (``b"S"`` or ``b"N"``); an ErrorResponse or a close
        instead of an answer raises. The handshake's own errors (``ssl.SSLError``,
        ``ConnectionError``) propagate.
        """
        await self.send(ssl_request())
        answer = await self.read_exactly(1)
        if answer == b"S":
            host = server_hostname or str(self.writer.get_extra_info("peername")[0])
            await self.writer.start_tls(context, server_hostname=host)
        return answer

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS session, or None on a plain connection."""
        obj: ssl.SSLObject | None = self.writer.get_extra_info("ssl_object")
        return obj

    def channel_binding_data(self) -> bytes:
        """tls-server-end-point data for the certificate the server presented."""
        obj = self.ssl_object
        if obj is None:
            raise AssertionError("channel binding needs a TLS connection")
        der = obj.getpeercert(binary_form=True)
        if der is None:
            raise AssertionError("the server presented no certificate")
        return tls_server_end_point(der)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_exactly(self, n: int, timeout: float = 10) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.readexactly(n)

    async def read_message(self, timeout: float = 10) -> tuple[bytes, bytes]:
        """The next ``(type byte, body)``; IncompleteReadError at end of stream."""
        async with asyncio.timeout(timeout):
            header = await self.reader.readexactly(5)
            typ, length = _HEADER.unpack(header)
            body = await self.reader.readexactly(length - 4)
        return typ, body

    async def read_until_eof(self, timeout: float = 10) -> bytes:
        """Everything until the peer closes (ConnectionResetError counts as a close)."""
        chunks = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)

    async def read_until(self, wanted: bytes, timeout: float = 10) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the first of type ``wanted``."""
        got = []
        while True:
            typ, body = await self.read_message(timeout)
            got.append((typ, body))
            if typ == wanted:
                return got

    async def read_until_ready(self, timeout: float = 10) -> Reply:
        """Every message up to and including the next ReadyForQuery."""
        return Reply(await self.read_until(b"Z", timeout))

    async def exchange(self, data: bytes, timeout: float = 10) -> Reply:
        """Send ``data`` (one batch ending in Sync or a Query) and read its replies."""
        await self.send(data)
        return await self.read_until_ready(timeout)

    async def exchange_batches(self, data: bytes, batches: int, timeout: float = 10) -> list[Reply]:
        """Send ``data`` holding ``batches`` batches; the replies of each, in order."""
        await self.send(data)
        return [await self.read_until_ready(timeout) for _ in range(batches)]

    async def login(
        self,
        user: str,
        password: str,
        database: str,
        params: Mapping[str, str] | None = None,
        *,
        send_startup: bool = True,
        channel_binding: bool | bytes = False,
        gs2_flag: str = "n",
    ) -> None:
        """Startup and authentication up to the first ReadyForQuery.

        Raises ``ServerError`` on an ErrorResponse. ``send_startup=False`` when the
        caller has already sent the startup packet itself. ``channel_binding``: True
        insists on SCRAM-SHA-256-PLUS with the binding data of the server's certificate
        (AssertionError if it is not offered); bytes: the same with these bytes as the
        binding data (a man in the middle's). The chosen mechanism ends up in
        ``self.mechanism``, the offered ones in ``self.sasl_mechanisms``. ``gs2_flag``
        (without channel binding): "n", or "y" for a client that supports channel binding
        but believes the server does not (what libpq sends on TLS when -PLUS is missing).
        """
        if send_startup:
            await self.send(startup_packet({"user": user, "database": database, **(params or {})}))
        scram: _ScramClient | None = None
        while True:
            typ, body = await self.read_message()
            if typ == b"E":
                raise ServerError(parse_fields(body))
            if typ == b"R":
                (code,) = _INT32.unpack_from(body)
                payload = body[4:]
                if code == AUTH_CLEARTEXT:
                    await self.send(message(b"p", _cstring(password)))
                elif code == AUTH_MD5:
                    await self.send(message(b"p", _cstring(md5_password(user, password, payload))))
                elif code == AUTH_SASL:
                    self.sasl_mechanisms = [
                        name.decode() for name in payload.split(b"\x00") if name
                    ]
                    if channel_binding is False:
                        self.mechanism = SCRAM_SHA_256
                        scram = _ScramClient(password, f"{gs2_flag},,")
                    else:
                        if SCRAM_SHA_256_PLUS not in self.sasl_mechanisms:
                            raise AssertionError(
                                f"SCRAM-SHA-256-PLUS not offered: {self.sasl_mechanisms}"
                            )
                        data = (
                            channel_binding
                            if isinstance(channel_binding, bytes)
                            else self.channel_binding_data()
                        )
                        self.mechanism = SCRAM_SHA_256_PLUS
                        scram = _ScramClient(password, "p=tls-server-end-point,,", data)
                    first = scram.client_first()
                    body = _cstring(self.mechanism) + _INT32.pack(len(first)) + first
                    await self.send(message(b"p", body))
                elif code == AUTH_SASL_CONTINUE:
                    assert scram is not None
                    await self.send(message(b"p", scram.client_final(payload)))
                elif code == AUTH_SASL_FINAL:
                    assert scram is not None
                    scram.verify_server_final(payload)
                elif code != AUTH_OK:
                    raise AssertionError(f"unsupported authentication request {code}")
            elif typ == b"S":
                name, value, _ = body.split(b"\x00", 2)
                self.params[name.decode()] = value.decode()
            elif typ == b"K":
                self.backend_pid, self.backend_key = struct.unpack("!II", body)
            elif typ == b"Z":
                return

    async def simple_query(self, sql: str, timeout: float = 10) -> QueryResult:
        """Send one Query and read its replies up to ReadyForQuery."""
        await self.send(query(sql))
        return await self.read_result(timeout)

    async def read_result(self, timeout: float = 10) -> QueryResult:
        result = QueryResult()
        while True:
            typ, body = await self.read_message(timeout)
            if typ == b"D":
                result.rows.append(_data_row(body))
            elif typ == b"C":
                result.tags.append(body.rstrip(b"\x00").decode())
            elif typ == b"E":
                result.errors.append(parse_fields(body))
            elif typ == b"Z":
                result.status = body.decode()
                return result

    def abort(self) -> None:
        """Drop the connection without a Terminate (RST)."""
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close without a Terminate message (a FIN, like a client that just goes away)."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.writer.is_closing():
            self.abort()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def _data_row(body: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!H", body)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length].decode())
            pos += length
    return values


# -- authentication ----------------------------------------------------------------------


def md5_password(user: str, password: str, salt: bytes) -> str:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


def tls_server_end_point(der: bytes) -> bytes:
    """RFC 5929 section 4.1: the certificate hashed with its signature's hash algorithm,
    SHA-256 instead of MD5 or SHA-1."""
    algorithm = x509.load_der_x509_certificate(der).signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(der)
    return digest.finalize()


class _ScramClient:
    """RFC 5802 / 7677 client side: without channel binding (gs2 header ``n,,``, as
    libpq does without TLS), or SCRAM-SHA-256-PLUS with ``p=tls-server-end-point,,`` and
    the binding data."""

    def __init__(self, password: str, gs2_header: str = "n,,", cbind_data: bytes = b"") -> None:
        self.password = password.encode()
        self.gs2_header = gs2_header
        self.cbind_data = cbind_data
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.client_first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""

    def client_first(self) -> bytes:
        return (self.gs2_header + self.client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode()
        attrs = dict(part.split("=", 1) for part in text.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self.nonce):
            raise AssertionError("server nonce does not extend the client nonce")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        cbind = base64.b64encode(self.gs2_header.encode() + self.cbind_data).decode()
        without_proof = f"c={cbind},r={nonce}"
        auth_message = f"{self.client_first_bare},{text},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        text = server_final.decode()
        if not text.startswith("v="):
            raise AssertionError(f"SCRAM server-final without a verifier: {text!r}")
        if base64.b64decode(text[2:]) != self.server_signature:
            raise AssertionError("SCRAM server signature does not verify")
