"""The admin console: the virtual database ``pgbouncer`` (or ``pgmux``).

Only ``admin_users`` and ``stats_users`` get in (login.py enforces it). Like
PgBouncer's console it speaks the simple query protocol only. Today it answers
``SHOW VERSION``; the SHOW and control commands arrive with the observability work,
and until then every other command gets an error saying so.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import __version__
from .errors import FeatureNotSupported, ProtocolViolation
from .protocol import codes, messages
from .protocol.errors import ProtocolError
from .protocol.reader import MessageReader

if TYPE_CHECKING:
    from .client import ClientConnection

log = logging.getLogger("pgmux.admin")

_PARAMS = {
    "server_version": f"pgmux {__version__}",
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO",
    "TimeZone": "UTC",
    "standard_conforming_strings": "on",
    "integer_datetimes": "on",
    "application_name": "",
}
_TEXT_OID = 25
_EXTENDED = frozenset(b"PBDECH")


class AdminSession:
    __slots__ = ("client", "failed_batch", "reader")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.reader = MessageReader(client.registry.config.max_packet_size)
        self.failed_batch = False
        client.transport.write(
            messages.AUTH_OK
            + b"".join(messages.parameter_status(k, v) for k, v in _PARAMS.items())
            + messages.backend_key_data(client.cancel_pid, client.cancel_key)
            + messages.READY_IDLE
        )

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        client = self.client
        try:
            while not client.transport.is_closing():
                msg = self.reader.next_message()
                if msg is None:
                    return
                self._message(*msg)
        except ProtocolError as exc:
            client.fail(ProtocolViolation(str(exc)))

    def _message(self, typ: int, body: bytes) -> None:
        client = self.client
        if typ == codes.F_QUERY:
            sql, _ = messages.read_cstring(body, 0)
            self._query(sql)
        elif typ == codes.F_TERMINATE:
            client.close("client sent Terminate")
        elif typ == codes.F_SYNC:
            self.failed_batch = False
            client.transport.write(messages.READY_IDLE)
        elif typ in _EXTENDED:
            if not self.failed_batch:
                self.failed_batch = True
                client.transport.write(
                    messages.error_response(
                        "ERROR",
                        "08P01",
                        "the admin console speaks the simple query protocol only",
                    )
                )
        else:
            raise ProtocolError(f"invalid frontend message type {chr(typ)!r}")

    def _query(self, sql: str) -> None:
        client = self.client
        command = " ".join(sql.strip().rstrip(";").split()).lower()
        log.info("%s: admin command %r", client, command[:200])
        if not command:
            client.transport.write(messages.message(b"I") + messages.READY_IDLE)
        elif command == "show version":
            client.transport.write(
                _row_description(["version"])
                + _data_row([f"pgmux {__version__}"])
                + messages.message(b"C", messages.cstring("SHOW"))
                + messages.READY_IDLE
            )
        else:
            client.send_error(
                FeatureNotSupported(
                    f"admin console command not available yet: {command[:60]!r}",
                    hint="this version of the console answers SHOW VERSION only",
                ),
                fatal=False,
            )


def _row_description(columns: list[str]) -> bytes:
    body = len(columns).to_bytes(2, "big")
    for name in columns:
        body += messages.cstring(name) + (0).to_bytes(4, "big") + (0).to_bytes(2, "big")
        body += _TEXT_OID.to_bytes(4, "big") + (-1).to_bytes(2, "big", signed=True)
        body += (-1).to_bytes(4, "big", signed=True) + (0).to_bytes(2, "big")
    return messages.message(b"T", body)


def _data_row(values: list[str]) -> bytes:
    body = len(values).to_bytes(2, "big")
    for value in values:
        data = value.encode()
        body += len(data).to_bytes(4, "big") + data
    return messages.message(b"D", body)
