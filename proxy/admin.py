"""The admin console: the virtual database ``pgbouncer`` (or ``pgmux``).

Only ``admin_users`` and ``stats_users`` get in (login.py enforces it); stats users
may SHOW, admin users may also SET and run control commands. PgBouncer's grammar,
result sets and error texts; unlike PgBouncer the console also speaks the extended
query protocol, so drivers can ``fetch("SHOW POOLS")``. Messages are handled one at a
time: a command that waits (PAUSE, WAIT_CLOSE, SHOW across workers) holds back the
ones after it, and a cancel request ends the wait.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__
from .admin_show import FAKE_PARAMETERS, HELP_TEXT, SHOW_COMMANDS
from .control import SHUTDOWN_MODES, Cancelled
from .errors import AdminError, ProtocolViolation, ProxyError
from .peers import Answer, Console
from .protocol import codes, messages
from .protocol.errors import ProtocolError
from .protocol.reader import MessageReader
from .protocol.results import (
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    EMPTY_QUERY,
    NO_DATA,
    NO_PARAMETERS,
    PARSE_COMPLETE,
    TEXT,
    Columns,
    command_complete,
    data_row,
    result_formats,
    row_description,
)

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

# PgBouncer's grammar: a command word and at most one argument (a word or a "quoted"
# identifier); SET key = value with the value a word or a 'quoted' string.
_WORD = r'(?:"(?:[^"]|"")*"|[0-9a-z_]+)'
_COMMAND = re.compile(rf"\s*([a-z_]+)(?:\s+({_WORD}))?\s*;?\s*\Z", re.IGNORECASE)
_SET = re.compile(
    r"\s*set\s+([0-9a-z_.]+)\s*(?:=|\s+to\s+)\s*('(?:[^']|'')*'|[^\s;']+)\s*;?\s*\Z",
    re.IGNORECASE,
)
_CONTROL = (
    "pause", "resume", "disable", "enable", "reconnect", "kill", "kill_client", "reload",
    "shutdown", "wait_close", "suspend",
)  # fmt: skip
_ALL_COMMANDS = [f"show {name}" for name in (*SHOW_COMMANDS, "help")] + list(_CONTROL)


@dataclass(frozen=True, slots=True)
class Command:
    """One parsed console command: ``show`` + item, ``set`` + key=value, or a control
    command with its optional argument."""

    verb: str
    arg: str | None
    text: str

    def columns(self) -> Columns | None:
        """The result columns it sends, known before it runs (Describe)."""
        if self.verb == "show" and self.arg is not None:
            show = SHOW_COMMANDS.get(self.arg)
            if show is not None:
                return show.columns
            if self.arg in FAKE_PARAMETERS:
                return [(self.arg, TEXT)]
        return None


def parse_command(sql: str) -> Command | None:
    """The command in ``sql``, None for an empty query; AdminError if it is not one."""
    text = sql.strip()
    if not text.rstrip(";").strip():
        return None
    match = _SET.match(text)
    if match:
        key, value = match.group(1).lower(), match.group(2)
        if value.startswith("'"):
            value = value[1:-1].replace("''", "'")
        return Command("set", f"{key}={value}", text)
    match = _COMMAND.match(text)
    if match:
        verb = match.group(1).lower()
        arg = match.group(2)
        if arg is not None:
            arg = arg[1:-1].replace('""', '"') if arg.startswith('"') else arg.lower()
        if verb == "select":
            verb = "show"  # PgBouncer's alias: SELECT clients
        if (
            verb == "show"
            and arg is not None
            and (arg in SHOW_COMMANDS or arg == "help" or arg in FAKE_PARAMETERS)
        ):
            return Command(verb, arg, text)
        if verb in _CONTROL:
            return Command(verb, arg, text)
    raise _invalid(text)


def _invalid(text: str) -> AdminError:
    words = text.lower().rstrip(";").split()
    if words in (["show"], ["select"]):
        return AdminError(
            f"invalid command '{text}', use SHOW HELP;",
            hint="SHOW needs an item: " + ", ".join(name.upper() for name in SHOW_COMMANDS),
        )
    close = difflib.get_close_matches(" ".join(text.lower().split()), _ALL_COMMANDS, n=1)
    hint = f"did you mean {close[0].upper()}?" if close else "SHOW HELP lists the commands"
    return AdminError(f"invalid command '{text}', use SHOW HELP;", hint=hint)


class AdminSession:
    """One logged-in console connection."""

    __slots__ = (
        "busy",
        "cancelled",
        "client",
        "console",
        "failed",
        "is_admin",
        "portals",
        "queue",
        "reader",
        "statements",
    )

    def __init__(self, client: ClientConnection, console: Console) -> None:
        self.client = client
        self.console = console
        config = client.registry.config
        self.is_admin = client.user in config.admin_users
        self.reader = MessageReader(config.max_packet_size)
        self.queue: deque[tuple[int, bytes]] = deque()
        self.busy = False  # a command is waiting; later messages stay queued
        self.cancelled = asyncio.Event()
        self.failed = False  # an error in an extended batch: skip to its Sync
        self.statements: dict[str, Command | None] = {}
        self.portals: dict[str, tuple[Command | None, list[int]]] = {}
        client.transport.write(
            messages.AUTH_OK
            + b"".join(messages.parameter_status(k, v) for k, v in _PARAMS.items())
            + messages.backend_key_data(client.cancel_pid, client.cancel_key)
            + messages.READY_IDLE
        )

    # -- bytes in ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (msg := self.reader.next_message()) is not None:
                self.queue.append(msg)
        except ProtocolError as exc:
            self.client.fail(ProtocolViolation(str(exc)))
            return
        self._drain()

    def cancel(self) -> None:
        """A CancelRequest with this session's key: stop waiting (PAUSE resumes)."""
        if self.busy:
            self.cancelled.set()

    def _drain(self) -> None:
        client = self.client
        while self.queue and not self.busy and not client.transport.is_closing():
            typ, body = self.queue.popleft()
            try:
                self._message(typ, body)
            except ProtocolError as exc:
                client.fail(ProtocolViolation(str(exc)))
                return

    def _write(self, data: bytes) -> None:
        if not self.client.transport.is_closing():
            self.client.transport.write(data)

    def _error(self, error: ProxyError) -> None:
        """An error inside an extended batch: reported once, the rest skipped to Sync."""
        self.client.send_error(error, fatal=False, ready=False)
        self.failed = True

    # -- messages ---------------------------------------------------------------------

    def _message(self, typ: int, body: bytes) -> None:
        client = self.client
        if typ == codes.F_TERMINATE:
            client.close("client sent Terminate")
        elif typ == codes.F_QUERY:
            sql, _ = messages.read_cstring(body, 0)
            self._simple(sql)
        elif typ == codes.F_SYNC:
            self.failed = False
            self._write(messages.READY_IDLE)
        elif typ == codes.F_FLUSH:
            pass  # everything is written as soon as it is made
        elif typ in _EXTENDED:
            if not self.failed:
                try:
                    _EXTENDED[typ](self, body)
                except AdminError as exc:
                    self._error(exc)
                except (ValueError, IndexError) as exc:
                    self._error(ProtocolViolation(f"malformed {chr(typ)!r} message: {exc}"))
        else:
            raise ProtocolError(f"invalid frontend message type {chr(typ)!r}")

    def _simple(self, sql: str) -> None:
        try:
            command = parse_command(sql)
        except AdminError as exc:
            self.client.send_error(exc, fatal=False)
            return
        if command is None:
            self._write(EMPTY_QUERY + messages.READY_IDLE)
            return
        self._run(command, [], describe=True, ready=True)

    def _parse(self, body: bytes) -> None:
        name, pos = messages.read_cstring(body, 0)
        sql, _ = messages.read_cstring(body, pos)
        self.statements[name] = parse_command(sql)
        self._write(PARSE_COMPLETE)

    def _bind(self, body: bytes) -> None:
        portal, pos = messages.read_cstring(body, 0)
        name, pos = messages.read_cstring(body, pos)
        if name not in self.statements:
            raise AdminError(f'prepared statement "{name}" does not exist', sqlstate="26000")
        command = self.statements[name]
        count = int.from_bytes(body[pos : pos + 2])
        pos += 2 + 2 * count  # parameter format codes
        params = int.from_bytes(body[pos : pos + 2])
        if params:
            raise AdminError(
                f"admin console commands take no parameters (got {params})", sqlstate="08P01"
            )
        pos += 2
        count = int.from_bytes(body[pos : pos + 2])
        codes_ = [int.from_bytes(body[pos + 2 + 2 * i : pos + 4 + 2 * i]) for i in range(count)]
        columns = command.columns() if command is not None else None
        formats = result_formats(codes_, len(columns)) if columns else []
        self.portals[portal] = (command, formats)
        self._write(BIND_COMPLETE)

    def _describe(self, body: bytes) -> None:
        kind = body[:1]
        name, _ = messages.read_cstring(body, 1)
        if kind == b"S":
            if name not in self.statements:
                raise AdminError(f'prepared statement "{name}" does not exist', sqlstate="26000")
            command, formats = self.statements[name], list[int]()
            prefix = NO_PARAMETERS
        else:
            if name not in self.portals:
                raise AdminError(f'portal "{name}" does not exist', sqlstate="34000")
            command, formats = self.portals[name]
            prefix = b""
        columns = command.columns() if command is not None else None
        self._write(prefix + (row_description(columns, formats) if columns else NO_DATA))

    def _execute(self, body: bytes) -> None:
        name, _ = messages.read_cstring(body, 0)
        if name not in self.portals:
            raise AdminError(f'portal "{name}" does not exist', sqlstate="34000")
        command, formats = self.portals[name]
        if command is None:
            self._write(EMPTY_QUERY)
            return
        self._run(command, formats, describe=False, ready=False)

    def _close(self, body: bytes) -> None:
        name, _ = messages.read_cstring(body, 1)
        (self.statements if body[:1] == b"S" else self.portals).pop(name, None)
        self._write(CLOSE_COMPLETE)

    # -- commands -----------------------------------------------------------------------

    def _run(self, command: Command, formats: list[int], *, describe: bool, ready: bool) -> None:
        registry = self.client.registry
        registry.admin_stats.query_count += 1
        registry.admin_stats.xact_count += 1
        if command.verb == "show":
            log.debug("%s: %s", self.client, command.text)
        else:
            log.info("%s: admin command %r", self.client, command.text[:200])
        try:
            immediate = self._immediate(command, describe)
        except AdminError as exc:
            self._fail(exc, ready)
            return
        if immediate is not None:
            self._write(immediate + (messages.READY_IDLE if ready else b""))
            return
        self.busy = True
        self.cancelled.clear()
        task = registry.loop.create_task(self._wait_for(command, formats, describe, ready))
        task.add_done_callback(_log_failure)

    def _fail(self, error: ProxyError, ready: bool) -> None:
        if ready:
            self.client.send_error(error, fatal=False)
        else:
            self._error(error)

    def _immediate(self, command: Command, describe: bool) -> bytes | None:
        """The reply of a command answered at once, or None for one that must wait
        (``describe``: the simple protocol, where a result set has its RowDescription)."""
        verb, arg = command.verb, command.arg
        if verb == "show":
            if arg == "help":
                return messages.error_response(
                    "NOTICE", "00000", "Console usage", HELP_TEXT, notice=True
                ) + command_complete("SHOW")
            if arg in FAKE_PARAMETERS:
                columns = [(arg, TEXT)]
                head = row_description(columns) if describe else b""
                return head + data_row(columns, [FAKE_PARAMETERS[arg]]) + command_complete("SHOW")
            return None
        if verb == "set" and arg is not None and arg.partition("=")[0] in FAKE_PARAMETERS:
            return messages.error_response(
                "NOTICE", "00000", "SET ignored", notice=True
            ) + command_complete("SET")
        if verb == "reload" and arg is not None:
            raise AdminError(f"invalid command '{command.text}', use SHOW HELP;",
                             hint="RELOAD takes no argument")  # fmt: skip
        if verb == "shutdown" and (arg or "") not in SHUTDOWN_MODES:
            raise AdminError(
                f"invalid command '{command.text}', use SHOW HELP;",
                hint="SHUTDOWN [WAIT_FOR_SERVERS | WAIT_FOR_CLIENTS]",
            )
        if not self.is_admin:
            raise AdminError(
                "admin access needed",
                hint=f'user "{self.client.user}" is in stats_users, which may only SHOW; '
                "list it in admin_users to run control commands",
            )
        if verb == "suspend":
            raise AdminError(
                "SUSPEND is not supported by pgmux (it has no online restart)",
                hint="PAUSE waits for transactions and closes the server connections",
                sqlstate="0A000",
            )
        return None

    async def _wait_for(
        self, command: Command, formats: list[int], describe: bool, ready: bool
    ) -> None:
        console = self.console
        out = b""
        try:
            if command.verb == "show":
                assert command.arg is not None
                show = SHOW_COMMANDS[command.arg]
                answer = await console.snapshot(list(show.parts))
                assert answer.snapshot is not None
                rows = show.rows(answer.snapshot, self.client.registry.config)
                if describe:
                    out += row_description(show.columns, formats)
                out += b"".join(data_row(show.columns, row, formats) for row in rows)
                out += command_complete("SHOW")
            else:
                answer = await console.command(command.verb, command.arg, self.cancelled)
                out += command_complete(answer.tag)
            self._write(_notices(answer) + out + (messages.READY_IDLE if ready else b""))
        except Cancelled:
            self._fail(
                ProxyError("canceling statement due to user request", sqlstate="57014"), ready
            )
        except AdminError as exc:
            self._fail(exc, ready)
        except Exception as exc:  # a bug: answer anyway, or the session would hang
            log.exception("%s: admin command %r failed", self.client, command.text[:200])
            self._fail(
                ProxyError(
                    f"internal error in pgmux running {command.text[:200]!r}: {exc!r}",
                    sqlstate="XX000",
                    hint="the pgmux log has the traceback",
                ),
                ready,
            )
        finally:
            self.busy = False
            self.cancelled.clear()
        self._drain()


def _notices(answer: Answer) -> bytes:
    return b"".join(
        messages.error_response("WARNING", "01000", text, notice=True) for text in answer.notices
    )


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("admin command failed", exc_info=task.exception())


_EXTENDED: dict[int, Any] = {
    codes.F_PARSE: AdminSession._parse,
    codes.F_BIND: AdminSession._bind,
    codes.F_DESCRIBE: AdminSession._describe,
    codes.F_EXECUTE: AdminSession._execute,
    codes.F_CLOSE: AdminSession._close,
}
