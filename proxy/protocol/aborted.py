"""A transaction that lost its server: the status the lost request leaves, and what
PostgreSQL answers in a failed transaction block, decided on bytes alone.

When the server connection a client is linked to is lost, pgmux answers the requests
still awaiting a reply itself, and a client that was in a transaction block is then in
PostgreSQL's "aborted transaction block" state with no server behind it (server_loss.py).
In that state PostgreSQL refuses everything with 25P02 except a statement that ends
the block: COMMIT, ROLLBACK and PREPARE TRANSACTION (postgres.c, IsTransactionExitStmt),
each reported as ROLLBACK; an extended-query batch is skipped to its Sync after the
first error (protocol docs, "Extended Query"). ``AbortedBlock`` plays that part.

Only the leading keywords of each statement are read: the text is split into
statements at semicolons outside quotes, dollar quotes and comments, and a statement
is classified by its first words, as PostgreSQL's grammar spells them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from . import codes
from .errors import ProtocolError
from .extended import (
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    STATEMENT,
    parse_query,
    split_bind,
    split_parse,
    split_target,
)
from .messages import message, ready_for_query

# What a statement does to the transaction block, by its leading keywords.
OTHER = 0
BEGIN = 1  # BEGIN, START TRANSACTION
COMMIT = 2  # COMMIT, END [WORK | TRANSACTION] [AND NO CHAIN]
ROLLBACK = 3  # ROLLBACK, ABORT [WORK | TRANSACTION] [AND NO CHAIN]; not ROLLBACK TO
PREPARE_TRANSACTION = 4  # PREPARE TRANSACTION 'gid'
COMMIT_AND_CHAIN = 5  # COMMIT ... AND CHAIN: ends the block and opens another
ROLLBACK_AND_CHAIN = 6
EXITS = (COMMIT, ROLLBACK, PREPARE_TRANSACTION)  # end a block, no new one opened
CHAINED = (COMMIT_AND_CHAIN, ROLLBACK_AND_CHAIN)

_EXIT_WORDS = {b"commit": COMMIT, b"end": COMMIT, b"rollback": ROLLBACK, b"abort": ROLLBACK}
_SPACE = frozenset(b" \t\n\r\f\v")
_WORD_START = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_") | frozenset(
    range(128, 256)
)
_TAG = _WORD_START | frozenset(b"0123456789")
_WORD = _TAG | frozenset(b"$")
_INT16 = struct.Struct("!H")
_INT32 = struct.Struct("!I")


def _skip_blank(sql: bytes, pos: int) -> int:
    """Past whitespace and comments (``--`` to the line's end, ``/* */`` nested)."""
    n = len(sql)
    while pos < n:
        char = sql[pos]
        if char in _SPACE:
            pos += 1
        elif sql.startswith(b"--", pos):
            end = sql.find(b"\n", pos)
            pos = n if end < 0 else end + 1
        elif sql.startswith(b"/*", pos):
            depth = 1
            pos += 2
            while pos < n and depth:
                if sql.startswith(b"/*", pos):
                    depth += 1
                    pos += 2
                elif sql.startswith(b"*/", pos):
                    depth -= 1
                    pos += 2
                else:
                    pos += 1
        else:
            break
    return pos


def _word(sql: bytes, pos: int) -> tuple[bytes, int]:
    """The keyword or identifier at ``pos`` (lowercased) and where it ends; b"" if none."""
    if pos >= len(sql) or sql[pos] not in _WORD_START:
        return b"", pos
    end = pos + 1
    while end < len(sql) and sql[end] in _WORD:
        end += 1
    return sql[pos:end].lower(), end


def _quoted_end(sql: bytes, pos: int, quote: int, backslashes: bool) -> int:
    """The end of the literal or quoted identifier opening at ``pos``."""
    n = len(sql)
    pos += 1
    while pos < n:
        char = sql[pos]
        if backslashes and char == 0x5C:  # \ escapes the next byte in E'...'
            pos += 2
        elif char == quote:
            if pos + 1 < n and sql[pos + 1] == quote:  # '' or "" stands for one
                pos += 2
            else:
                return pos + 1
        else:
            pos += 1
    return n


def _dollar_tag_end(sql: bytes, pos: int) -> int:
    """The end of the dollar-quote tag (``$$``, ``$body$``) opening at ``pos``; 0 if
    there is none (``$1`` is a parameter)."""
    end = pos + 1
    if end < len(sql) and sql[end] in _WORD_START:
        while end < len(sql) and sql[end] in _TAG:
            end += 1
    if end < len(sql) and sql[end] == 0x24:
        return end + 1
    return 0


def _statement_end(sql: bytes, pos: int) -> int:
    """Where the statement starting at ``pos`` ends: at its semicolon, or the text's
    end. String literals, quoted identifiers, dollar quotes and comments are skipped."""
    n = len(sql)
    while pos < n:
        char = sql[pos]
        if char == 0x3B:  # ;
            return pos
        if char == 0x27:  # '
            escapes = pos > 0 and sql[pos - 1] in b"eE" and (pos < 2 or sql[pos - 2] not in _WORD)
            pos = _quoted_end(sql, pos, char, escapes)
        elif char == 0x22:  # "
            pos = _quoted_end(sql, pos, char, False)
        elif char == 0x24 and (pos == 0 or sql[pos - 1] not in _WORD):
            tag_end = _dollar_tag_end(sql, pos)
            if tag_end:  # $tag$ ... $tag$
                found = sql.find(sql[pos:tag_end], tag_end)
                pos = n if found < 0 else found + tag_end - pos
            else:
                pos += 1  # $1, a parameter
        elif sql.startswith(b"--", pos) or sql.startswith(b"/*", pos):
            pos = _skip_blank(sql, pos)
        else:
            pos += 1
    return n


def _kind(sql: bytes, pos: int, end: int) -> int:
    """What the statement ``sql[pos:end]`` (starting at a non-blank) does to a block."""
    word, at = _word(sql, pos)
    if word == b"begin":
        return BEGIN
    if word == b"start":
        return BEGIN if _word(sql, _skip_blank(sql, at))[0] == b"transaction" else OTHER
    if word == b"prepare":
        word, at = _word(sql, _skip_blank(sql, at))
        if word != b"transaction":
            return OTHER  # PREPARE name AS ...
        at = _skip_blank(sql, at)
        if at >= end or sql[at] != 0x27:
            return OTHER
        at = _skip_blank(sql, _quoted_end(sql, at, 0x27, False))
        return PREPARE_TRANSACTION if at >= end else OTHER
    kind = _EXIT_WORDS.get(word, OTHER)
    if kind == OTHER:
        return OTHER
    word, after = _word(sql, _skip_blank(sql, at))
    if word in (b"work", b"transaction"):
        at = after
        word, after = _word(sql, _skip_blank(sql, at))
    if word == b"and":
        word, after = _word(sql, _skip_blank(sql, after))
        chained = word != b"no"
        if not chained:
            word, after = _word(sql, _skip_blank(sql, after))
        if word != b"chain":
            return OTHER
        at = after
        if chained:
            kind = COMMIT_AND_CHAIN if kind == COMMIT else ROLLBACK_AND_CHAIN
    # Anything more (ROLLBACK TO SAVEPOINT, COMMIT PREPARED 'x', a typo) is not a plain end.
    return kind if _skip_blank(sql, at) >= end else OTHER


def statement_kinds(sql: bytes) -> list[tuple[int, int, int]]:
    """(kind, start, end) of each non-empty statement of a query text, in order."""
    found = []
    pos = 0
    n = len(sql)
    while pos < n:
        pos = _skip_blank(sql, pos)
        if pos >= n:
            break
        if sql[pos] == 0x3B:
            pos += 1
            continue
        end = _statement_end(sql, pos)
        found.append((_kind(sql, pos, end), pos, end))
        pos = end + 1
    return found


class LostQuery(NamedTuple):
    """What the text of a simple Query lost with its server tells: whether it is one
    statement that ends the transaction block (COMMIT, ROLLBACK, PREPARE TRANSACTION;
    PostgreSQL ends the block even when that statement fails), and whether it may have
    committed something (COMMIT, END, PREPARE TRANSACTION, COMMIT PREPARED)."""

    ends_block: bool
    committing: bool


def lost_query(sql: bytes) -> LostQuery:
    kinds = statement_kinds(sql)
    committing = any(
        kind in (COMMIT, PREPARE_TRANSACTION, COMMIT_AND_CHAIN) or _word(sql, start)[0] == b"commit"
        for kind, start, _ in kinds
    )
    return LostQuery(len(kinds) == 1 and kinds[0][0] in EXITS, committing)


# -- the aborted block -------------------------------------------------------------------


class Error(NamedTuple):
    """An error to send: ``sqlstate`` and ``text``. ``text`` empty: the error that
    failed the block, which the client has not been told yet (server_loss.py makes it)."""

    sqlstate: str
    text: str


ABORTED = Error(
    "25P02", "current transaction is aborted, commands ignored until end of transaction block"
)
LOST = Error("08006", "")

# What the client should do after a message (Reply.outcome).
GO_ON = 0  # still in the failed block
ENDED = 1  # the block is over: later messages go to a server as usual
HAND_OVER = 2  # the block is over, and this message (or Reply.rest) needs a server
CANNOT = 3  # PostgreSQL's answer needs a server (AND CHAIN): give up the session
TERMINATE = 4

# Effects on the client's prepared statements (Reply.effect).
PREPARED = 1  # a named exit statement was parsed: (PREPARED, name, Parse rest)
CLOSED = 2  # a named statement was closed: (CLOSED, name, b"")

COMMAND_ROLLBACK = message(b"C", b"ROLLBACK\x00")
EMPTY_QUERY = message(b"I")
BIND_COMPLETE = message(b"2")
NO_DATA = message(b"n")
READY_FAILED = ready_for_query(codes.TX_FAILED)
READY_IDLE = ready_for_query(codes.TX_IDLE)


StatementLookup = Callable[[bytes], "bytes | None"]


class Reply(NamedTuple):
    parts: tuple[bytes | Error, ...] = ()
    outcome: int = GO_ON
    ready: bool = False  # a ReadyForQuery ends the parts: one request answered
    rest: bytes | None = None  # HAND_OVER of a Query: the text after its first statement
    effect: tuple[int, bytes, bytes] | None = None


NOTHING = Reply()


def _parameter_types(rest: bytes) -> bytes:
    """The Int16 count and Int32 type OIDs after a Parse's query text."""
    start = len(parse_query(rest)) + 1
    if len(rest) < start + 2:
        raise ProtocolError("Parse has no parameter count")
    count = _INT16.unpack_from(rest, start)[0]
    types = rest[start : start + 2 + 4 * count]
    if len(types) != 2 + 4 * count:
        raise ProtocolError("Parse parameter types are cut short")
    return types


def only_kind(sql: bytes) -> int:
    """The kind of a text holding one statement (a Parse); OTHER for several or none,
    which PostgreSQL refuses in a prepared statement anyway."""
    kinds = statement_kinds(sql)
    return kinds[0][0] if len(kinds) == 1 else OTHER


class AbortedBlock:
    """The server's side of a session in a failed transaction block, played by pgmux.

    ``receive_data`` buffers what the client sends; each ``next_reply`` takes one whole
    message and returns PostgreSQL's answer to it (None: no whole message yet). Once
    the block is over (ENDED, HAND_OVER), ``leftover`` is what the client sent after
    the last message answered: a HAND_OVER message stays in it, for a server.

    ``told`` is False while the client has not learned why the block failed (its
    server was lost while it sent nothing): the first error it gets is that one, and a
    COMMIT fails with it rather than reporting ROLLBACK. ``batch``: the server was
    lost while an extended-query batch was open (no Sync yet): the error is due with
    the client's next message (or ``batch_error``, when it waits for replies instead),
    and everything up to the batch's Sync is discarded, as PostgreSQL does after an
    error in a batch. With ``in_block`` False no transaction block was open: that Sync
    ends it all (ReadyForQuery I). ``statement`` looks up a client's named prepared
    statement: the rest of its Parse (query, parameter types), or None.
    """

    __slots__ = (
        "_buffer",
        "_max_length",
        "_pos",
        "batch_failing",
        "ended",
        "portals",
        "skipping",
        "statements",
        "told",
    )

    def __init__(
        self, max_length: int, *, told: bool, batch: bool = False, in_block: bool = True
    ) -> None:
        self._buffer = b""
        self._pos = 0
        self._max_length = max_length
        self.told = told and not batch
        self.batch_failing = batch  # the open batch's error is still to be sent
        self.skipping = False  # an error inside an extended-query batch: skip to Sync
        self.ended = not in_block  # the block is over (COMMIT/ROLLBACK ran); Sync to come
        self.statements: dict[bytes, tuple[int, bytes]] = {}  # parsed here: kind, types
        self.portals: dict[bytes, int] = {}  # bound here: kind

    def receive_data(self, data: bytes) -> None:
        self._buffer = self._buffer[self._pos :] + data
        self._pos = 0

    def leftover(self) -> bytes:
        rest = self._buffer[self._pos :]
        self._buffer, self._pos = b"", 0
        return rest

    def next_reply(self, statement: StatementLookup) -> Reply | None:
        buffer, pos = self._buffer, self._pos
        if len(buffer) - pos < 5:
            return None
        typ = buffer[pos]
        length: int = _INT32.unpack_from(buffer, pos + 1)[0]
        if length < 4 or length > self._max_length:
            raise ProtocolError(
                f"invalid length {length} in client message of type {chr(typ)!r} "
                f"(must be 4 to {self._max_length}, max_packet_size)"
            )
        end = pos + 1 + length
        if end > len(buffer):
            return None
        reply = self.receive(typ, buffer[pos + 5 : end], statement)
        if reply.outcome != HAND_OVER or reply.rest is not None:
            self._pos = end
        return reply

    def _error(self, *, extended: bool) -> Error:
        error = ABORTED if self.told else LOST
        self.told = True
        self.skipping = extended
        return error

    def batch_error(self) -> Error | None:
        """The error of the batch the lost server left open, due now: the client sends
        nothing more, waiting for replies that will never come. None if already sent."""
        if not self.batch_failing:
            return None
        self.batch_failing = False
        return self._error(extended=True)

    def receive(self, typ: int, body: bytes, statement: StatementLookup) -> Reply:
        if self.batch_failing and typ != codes.F_TERMINATE:
            # The open batch fails at this message: it and the rest up to Sync go unread.
            error = self.batch_error()
            assert error is not None
            if typ != codes.F_SYNC:
                return Reply((error,))
            reply = self.receive(typ, body, statement)
            return reply._replace(parts=(error, *reply.parts))
        if typ == codes.F_SYNC:
            self.skipping = False
            if self.ended:
                return Reply((READY_IDLE,), ENDED, ready=True)
            return Reply((READY_FAILED,), ready=True)
        if typ == codes.F_TERMINATE:
            return Reply(outcome=TERMINATE)
        if typ in (codes.F_COPY_DATA, codes.F_COPY_DONE, codes.F_COPY_FAIL, codes.F_FLUSH):
            return NOTHING  # COPY messages after a failed COPY are ignored (postgres.c)
        if typ not in _HANDLED:
            raise ProtocolError(f"invalid frontend message type {chr(typ)!r}")
        if self.skipping:
            return NOTHING
        if self.ended and typ != codes.F_CLOSE:
            return Reply(outcome=HAND_OVER)
        if typ == codes.F_QUERY:
            return self._query(body)
        if typ == codes.F_FUNCTION_CALL:
            return Reply((self._error(extended=False), READY_FAILED), ready=True)
        if typ == codes.F_PARSE:
            return self._parse(body, statement)
        if typ == codes.F_BIND:
            return self._bind(body, statement)
        if typ == codes.F_DESCRIBE:
            return self._describe(body, statement)
        if typ == codes.F_EXECUTE:
            return self._execute(body)
        return self._close(body)

    def _query(self, body: bytes) -> Reply:
        if not body or body[-1] != 0:
            raise ProtocolError("Query is not NUL-terminated")
        sql = body[:-1]
        kinds = statement_kinds(sql)
        if not kinds:
            return Reply((EMPTY_QUERY, READY_FAILED), ready=True)
        kind, _, end = kinds[0]
        if kind in CHAINED:
            return Reply(outcome=CANNOT)
        if kind not in EXITS:
            return Reply((self._error(extended=False), READY_FAILED), ready=True)
        if kind != ROLLBACK and not self.told:
            # Nobody told the client its transaction was lost: its COMMIT fails (the
            # rest of the query string is skipped after an error) and ends the block.
            return Reply((self._error(extended=False), READY_IDLE), ENDED, ready=True)
        if len(kinds) > 1:  # ROLLBACK; more: the rest runs as a query of its own
            return Reply((COMMAND_ROLLBACK,), HAND_OVER, rest=sql[end + 1 :])
        return Reply((COMMAND_ROLLBACK, READY_IDLE), ENDED, ready=True)

    def _known(self, name: bytes, statement: StatementLookup) -> tuple[int, bytes] | None:
        found = self.statements.get(name)
        if found is None and name:
            rest = statement(name)
            if rest is not None:
                found = (only_kind(parse_query(rest)), _parameter_types(rest))
        return found

    def _parse(self, body: bytes, statement: StatementLookup) -> Reply:
        name, rest = split_parse(body)
        kind = only_kind(parse_query(rest))
        types = _parameter_types(rest)
        if not name:
            self.statements.pop(b"", None)  # PostgreSQL drops it before parsing
        if kind in CHAINED:
            return Reply(outcome=CANNOT)
        if kind not in EXITS:
            return Reply((self._error(extended=True),))
        if name and (name in self.statements or statement(name) is not None):
            self.skipping = True
            shown = name.decode("utf-8", "replace")
            return Reply((Error("42P05", f'prepared statement "{shown}" already exists'),))
        self.statements[name] = (kind, types)
        return Reply((PARSE_COMPLETE,), effect=(PREPARED, name, rest) if name else None)

    def _bind(self, body: bytes, statement: StatementLookup) -> Reply:
        portal_end, name, _ = split_bind(body)
        portal = body[:portal_end]
        found = self._known(name, statement)
        if found is None and name:
            self.skipping = True
            shown = name.decode("utf-8", "replace")
            return Reply((Error("26000", f'prepared statement "{shown}" does not exist'),))
        if found is None or found[0] not in EXITS:
            return Reply((self._error(extended=True),))
        self.portals[portal] = found[0]
        return Reply((BIND_COMPLETE,))

    def _describe(self, body: bytes, statement: StatementLookup) -> Reply:
        target, name = split_target(body, "Describe")
        if target == STATEMENT:
            found = self._known(name, statement)
            if found is None and name:
                self.skipping = True
                shown = name.decode("utf-8", "replace")
                return Reply((Error("26000", f'prepared statement "{shown}" does not exist'),))
            if found is not None and found[0] in EXITS:
                # No result columns, so PostgreSQL describes it even in a failed block.
                return Reply((message(b"t", found[1]), NO_DATA))
        elif name in self.portals:
            return Reply((NO_DATA,))
        return Reply((self._error(extended=True),))

    def _execute(self, body: bytes) -> Reply:
        portal = body[: body.find(b"\x00")] if b"\x00" in body else None
        if portal is None:
            raise ProtocolError("Execute portal name is not NUL-terminated")
        kind = self.portals.pop(portal, None)
        if kind is None:
            return Reply((self._error(extended=True),))
        self.ended = True
        self.statements.pop(b"", None)
        self.portals.clear()
        if kind != ROLLBACK and not self.told:
            return Reply((self._error(extended=True),))  # see _query
        return Reply((COMMAND_ROLLBACK,))

    def _close(self, body: bytes) -> Reply:
        target, name = split_target(body, "Close")
        if target == STATEMENT:
            self.statements.pop(name, None)
            return Reply((CLOSE_COMPLETE,), effect=(CLOSED, name, b"") if name else None)
        self.portals.pop(name, None)
        return Reply((CLOSE_COMPLETE,))


_HANDLED = frozenset(
    (
        codes.F_QUERY,
        codes.F_FUNCTION_CALL,
        codes.F_PARSE,
        codes.F_BIND,
        codes.F_DESCRIBE,
        codes.F_EXECUTE,
        codes.F_CLOSE,
    )
)
