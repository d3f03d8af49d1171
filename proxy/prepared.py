"""Prepared statements across transaction pooling, and the request side of session state.

A client's named statement ``N`` (its Parse: query text + parameter types) maps to a
pgmux-wide name (``pgmux_17``) shared by every client that prepares the same text. Each
server connection remembers which pgmux names it holds, in an LRU of at most
``max_prepared_statements``. On the way to a server:

- Parse N: if the server holds the statement, a no-op ``Close`` goes instead and its
  CloseComplete comes back as the ParseComplete the client expects; else the Parse goes
  under the pgmux name. Re-Parse of an existing N gets PostgreSQL's own 42P05 error.
- Bind / Describe N: renamed; on a server that lacks the statement its Parse is sent
  first and that ParseComplete is swallowed. An unknown N goes unchanged, so the server
  answers with its own 26000 error.
- Close N: the mapping is forgotten; the Close goes unchanged (a server never has N).

Every Parse and Close forwarded adds an entry to the server's ``ops`` queue, matched in
order against the ParseComplete/CloseComplete replies. After an ErrorResponse the server
skips to Sync, so the entries of that batch are dropped and what they did is undone.
Errors pgmux must make itself (42P05, refused session state) are sent as a Parse or
Query that fails with a syntax error naming a marker; that ErrorResponse, at exactly the
right place in the stream and with the transaction aborted as PostgreSQL would, is then
replaced by the real error.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .protocol import messages
from .protocol.errors import ProtocolError
from .protocol.extended import (
    CLOSE_COMPLETE,
    PARSE_COMPLETE,
    STATEMENT,
    build_bind,
    build_parse,
    build_target,
    parse_query,
    split_bind,
    split_parse,
    split_target,
)
from .session_state import (
    ANY_TRIGGER,
    FORGETS_STATEMENTS,
    TEXT_TRIGGER,
    deallocated_name,
    refusal,
)

if TYPE_CHECKING:
    from .client import ClientConnection
    from .server import ServerConnection

log = logging.getLogger("pgmux.prepared")

# What the reply to a forwarded Parse/Close means (ServerConnection.ops entries).
A_PASS = 0  # the client's own message; its reply goes through
A_PARSE = 1  # the client's Parse under the pgmux name; reply goes through
A_FAKE_PARSE = 2  # no-op Close instead of a Parse the server needs not do: '3' -> '1'
A_INJECT = 3  # a Parse pgmux added before a Bind/Describe: its '1' is swallowed
A_CLOSE = 4  # the client's Close; if skipped after an error, its mapping comes back

# client.last_sql of a FunctionCall (compared by identity): a request with no SQL text.
FUNCTION_CALL = b"(function call)"
NOOP_SUFFIX = b"_noop"  # pgmux_17_noop: names no statement, says which one it stands for
MARKER_PREFIX = b"pgmux_error_"

Op = tuple[int, int, "Statement | None", bytes]  # (batch, action, statement, client name)


class Statement:
    """One distinct (query, parameter types): its pgmux name, the Parse creating it, and
    the no-op Close sent in place of a Parse the server needs not do."""

    __slots__ = ("key", "name", "noop_close", "parse")

    def __init__(self, name: bytes, rest: bytes) -> None:
        self.key = rest
        self.name = name
        self.parse = build_parse(name, rest)
        self.noop_close = build_target(b"C", STATEMENT, name + NOOP_SUFFIX)


class StatementNames:
    """The registry's map from Parse contents to pgmux-wide statements (bounded)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._by_key: dict[bytes, Statement] = {}
        self._counter = itertools.count(1)
        self._limit = limit
        self._markers = itertools.count(1)

    def statement_for(self, rest: bytes) -> Statement:
        found = self._by_key.get(rest)
        if found is None:
            if len(self._by_key) >= self._limit:
                self._by_key.clear()  # clients keep their Statement objects; only sharing resets
            found = self._by_key[rest] = Statement(b"pgmux_%d" % next(self._counter), rest)
        return found

    def renew(self, statement: Statement) -> None:
        """The next Parse of this text gets a new name (its plans went stale)."""
        if self._by_key.get(statement.key) is statement:
            del self._by_key[statement.key]

    def count(self) -> int:
        """Distinct statements known (SHOW MEM)."""
        return len(self._by_key)

    def new_marker(self) -> bytes:
        return MARKER_PREFIX + b"%d" % next(self._markers)


def rewrite_requests(
    client: ClientConnection,
    server: ServerConnection,
    buf: bytes,
    end: int,
    events: Sequence[tuple[int, int, int, int]],
    begin: int = 0,
) -> bytes | memoryview:
    """What to send for ``buf[begin:end]``: the bytes as they are, or rewritten.

    A request whose effect on the statement names is not known yet (a Parse or Close
    in flight, DEALLOCATE ALL, DISCARD ALL) holds back the requests pipelined after
    it: they wait in ``client.deferred`` until its ReadyForQuery, then are rewritten
    against what really happened (``resume_deferred``).
    """
    registry = client.registry
    tracking = registry.config.max_prepared_statements > 0
    refuse = registry.config.session_state == "error"
    parts: list[bytes | memoryview] | None = None
    cursor = begin
    answered = client.fe.answered
    for index, (typ, start, stop, batch) in enumerate(events):
        if batch > client.barrier >= answered:
            client.deferred = (buf, events[index:], start, end)
            end = start
            break
        replacement: bytes | None = None
        if typ == 81:  # Query: the hot path, so its text is sliced out only once
            if buf[stop - 1] != 0:
                raise ProtocolError("Query is not NUL-terminated")
            sql = buf[start + 5 : stop - 1]
            client.last_sql = sql
            if refuse:
                replacement = _refused(client, server, sql, query=True)
            if ANY_TRIGGER.search(sql.lower()):
                if TEXT_TRIGGER.search(sql):
                    _trigger(client, sql)
                if replacement is None and tracking and client.statements:
                    replacement = _deallocate(client, server, sql)
                if FORGETS_STATEMENTS.search(sql):
                    client.barrier = batch
        elif typ == 80:  # Parse
            name, rest = split_parse(buf[start + 5 : stop])
            sql = parse_query(rest)
            client.last_sql = sql
            if ANY_TRIGGER.search(sql.lower()) and TEXT_TRIGGER.search(sql):
                _trigger(client, sql)
            if refuse:
                replacement = _refused(client, server, sql, query=False)
            if replacement is None:
                replacement = _parse(client, server, name, rest, batch, tracking)
        elif typ == 66:  # Bind
            # Only a client's own named statements are renamed: with none, nothing to do
            # (an unknown name goes through for PostgreSQL's own 26000, as _known says).
            if tracking and client.statements:
                body = buf[start + 5 : stop]
                portal_end, name, offset = split_bind(body)
                statement = _known(client, name)
                if statement is not None:
                    server.stats.binds += 1
                    inject = _ensure(client, server, statement, batch)
                    replacement = inject + build_bind(body, portal_end, statement.name, offset)
                    if client.batch_copy is None:
                        client.batch_copy = bytearray()  # keep this request (see replan)
        elif typ == 68:  # Describe
            if tracking and client.statements:
                kind, name = split_target(buf[start + 5 : stop], "Describe")
                statement = _known(client, name) if kind == STATEMENT else None
                if statement is not None:
                    inject = _ensure(client, server, statement, batch)
                    replacement = inject + build_target(b"D", STATEMENT, statement.name)
        elif typ == 67:  # Close
            kind, name = split_target(buf[start + 5 : stop], "Close")
            closed = None
            if kind == STATEMENT and name and client.statements:
                closed = client.statements.pop(name, None)  # restored if it is skipped
            _ops(server).append((batch, A_CLOSE, closed, name))
            client.barrier = batch
        elif typ == 70:  # FunctionCall: no SQL; marked so last_sql is not taken for it
            client.last_sql = FUNCTION_CALL
        if replacement is not None:
            if parts is None:
                parts = []
            parts.append(memoryview(buf)[cursor:start])
            parts.append(replacement)
            cursor = stop
    if parts is None:
        return buf if begin == 0 and end == len(buf) else memoryview(buf)[begin:end]
    parts.append(memoryview(buf)[cursor:end])
    return b"".join(parts)


def resume_deferred(client: ClientConnection, server: ServerConnection) -> None:
    """The request that held back later ones is answered: send them now (some may be
    held again behind a new one)."""
    deferred = client.deferred
    if deferred is None or client.fe.answered <= client.barrier:
        return
    client.deferred = None
    buf, events, begin, end = deferred
    out = rewrite_requests(client, server, buf, end, events, begin)
    if client.batch_copy is not None:
        copy_batch(client, out)
    if out and server.transport is not None:
        server.transport.write(out)


def _trigger(client: ClientConnection, sql: bytes) -> None:
    if not client.state_check:
        client.state_check = True
        client.trigger_sql = sql


def _deallocate(client: ClientConnection, server: ServerConnection, sql: bytes) -> bytes | None:
    """SQL ``DEALLOCATE name`` of a statement the client prepared through the protocol:
    the server never had that name, so pgmux forgets it and answers itself (an empty
    query whose EmptyQueryResponse becomes CommandComplete DEALLOCATE)."""
    name = deallocated_name(sql)
    statements = client.statements
    if name is None or not statements or statements.pop(name, None) is None:
        return None
    replies = server.empty_replies
    if replies is None:
        replies = server.empty_replies = deque()
    replies.append(messages.message(b"C", b"DEALLOCATE\x00"))
    return messages.query("")


def _ops(server: ServerConnection) -> deque[Op]:
    ops = server.ops
    if ops is None:
        ops = server.ops = deque()
    return ops


def _known(client: ClientConnection, name: bytes) -> Statement | None:
    if not name or not client.statements:
        return None
    return client.statements.get(name)


def _ensure(
    client: ClientConnection, server: ServerConnection, statement: Statement, batch: int
) -> bytes:
    """The Parse to send first if this server lacks the statement, else b""."""
    prepared = server.prepared
    if prepared is None:
        prepared = server.prepared = OrderedDict()
    stats = server.stats
    if statement.name in prepared:
        prepared.move_to_end(statement.name)
        stats.prepared_hits += 1
        return b""
    prepared[statement.name] = statement
    stats.prepared_misses += 1
    stats.server_parses += 1
    ops = _ops(server)
    client.barrier = batch
    if statement.name in server.stale:
        # Its plan went stale here: replace it (the server still holds the old one).
        server.stale.discard(statement.name)
        ops.append((batch, A_INJECT, statement, b""))  # the CloseComplete
        ops.append((batch, A_INJECT, statement, b""))  # the ParseComplete
        return build_target(b"C", STATEMENT, statement.name) + statement.parse
    ops.append((batch, A_INJECT, statement, b""))
    return statement.parse


def _parse(
    client: ClientConnection,
    server: ServerConnection,
    name: bytes,
    rest: bytes,
    batch: int,
    tracking: bool,
) -> bytes | None:
    ops = _ops(server)
    if not name or not tracking:
        ops.append((batch, A_PASS, None, b""))
        return None
    client.barrier = batch
    statements = client.statements
    if statements is None:
        statements = client.statements = {}
    if name in statements:
        # PostgreSQL's own answer, and the session carries on (PgBouncer closes it).
        shown = name.decode("utf-8", "replace")
        return _marker(
            client,
            server,
            messages.error_response(
                "ERROR", "42P05", f'prepared statement "{shown}" already exists'
            ),
            "42P05",
            reason=None,  # PostgreSQL's own error, as a direct connection would get it
            query=False,
        )
    statement = client.registry.statement_names.statement_for(rest)
    statements[name] = statement
    prepared = server.prepared
    if prepared is None:
        prepared = server.prepared = OrderedDict()
    stats = server.stats
    stats.client_parses += 1
    if statement.name in prepared:
        prepared.move_to_end(statement.name)
        ops.append((batch, A_FAKE_PARSE, statement, name))
        stats.prepared_hits += 1
        return statement.noop_close
    prepared[statement.name] = statement
    ops.append((batch, A_PARSE, statement, name))
    stats.prepared_misses += 1
    stats.server_parses += 1
    return statement.parse


def _refused(
    client: ClientConnection, server: ServerConnection, sql: bytes, *, query: bool
) -> bytes | None:
    found = refusal(sql)
    if found is None:
        return None
    feature, reason = found
    shown = (
        sql[:200].decode("utf-8", "replace")
        if client.registry.config.log_statement_text
        else "(log_statement_text = false)"
    )
    log.info("%s: refused %s (session_state = error): %s", client, feature, shown)
    return _marker(
        client,
        server,
        messages.error_response(
            "ERROR",
            "0A000",
            f"{feature} cannot be used through pgmux in pool_mode {client.pool.mode}: {reason}",
            hint='set session_state = "pin" (the client keeps its server while such state '
            'exists) or use pool_mode = "session" for this database or user',
        ),
        "0A000",
        reason="session_state_refused",
        query=query,
    )


def _marker(
    client: ClientConnection,
    server: ServerConnection,
    error: bytes,
    sqlstate: str,
    *,
    reason: str | None,
    query: bool,
) -> bytes:
    """A message that fails on the server (aborting the transaction as a real error
    would); its ErrorResponse is replaced by ``error`` on the way back."""
    token = client.registry.statement_names.new_marker()
    markers = server.markers
    if markers is None:
        markers = server.markers = {}
    markers[token] = (error, sqlstate, reason)
    if query:
        return messages.query(token.decode())
    return build_parse(b"pgmux_refused", token + b"\x00\x00\x00")


# -- the reply side ----------------------------------------------------------------------


def reply_for(server: ServerConnection, typ: int) -> bytes | None:
    """For a ParseComplete ('1') or CloseComplete ('3'): None to pass it on, or what to
    send instead (b"" to swallow it)."""
    ops = server.ops
    if not ops:
        return None
    action = ops.popleft()[1]
    if typ == 49:  # ParseComplete
        if action == A_INJECT:
            return b""
        if action in (A_PASS, A_PARSE):
            return None
    elif action == A_FAKE_PARSE:
        return PARSE_COMPLETE
    elif action in (A_PASS, A_CLOSE):
        return None
    elif action == A_INJECT:  # a Close pgmux sent itself
        return b""
    raise ProtocolError(f"reply {chr(typ)!r} does not match what pgmux sent (action {action})")


def error_reply(server: ServerConnection, client: ClientConnection, body: bytes) -> bytes | None:
    """An ErrorResponse: drop this batch's pending entries (the server skips to Sync)
    and undo what they did; returns the error to send instead of a marker's."""
    ops = server.ops
    if ops:
        batch = client.fe.answered
        while ops and ops[0][0] <= batch:
            _, action, statement, name = ops.popleft()
            _undo(server, client, action, statement, name)
    markers = server.markers
    if markers and MARKER_PREFIX in body:
        for token in list(markers):
            if token in body:
                error, sqlstate, reason = markers.pop(token)
                if reason is None:
                    server.stats.count_error(sqlstate)
                else:
                    server.stats.count_pooler_error(reason, sqlstate)
                return error
    return None


def _undo(
    server: ServerConnection,
    client: ClientConnection,
    action: int,
    statement: Statement | None,
    name: bytes,
) -> None:
    if statement is None:
        return
    if action in (A_PARSE, A_INJECT) and server.prepared is not None:
        server.prepared.pop(statement.name, None)
    statements = client.statements
    if action in (A_PARSE, A_FAKE_PARSE) and statements and statements.get(name) is statement:
        del statements[name]  # a Parse that did not happen is never cached
    elif action == A_CLOSE:
        if client.statements is None:
            client.statements = {}
        client.statements.setdefault(name, statement)  # a Close that did not happen


def batch_done(server: ServerConnection, client: ClientConnection) -> None:
    """ReadyForQuery: whatever is left of answered batches can no longer be answered."""
    ops = server.ops
    if ops:
        batch = client.fe.answered
        while ops and ops[0][0] < batch:
            _, action, statement, name = ops.popleft()
            _undo(server, client, action, statement, name)
    if server.markers and client.fe.idle:
        server.markers.clear()


def forget_lost(server: ServerConnection, client: ClientConnection) -> None:
    """The server was lost with requests in flight: what it had not confirmed did not
    happen, as after an error (a Parse never answered leaves no statement, a Close
    never answered leaves it in place). The server's own statements go with it."""
    ops = server.ops
    while ops:
        _, action, statement, name = ops.popleft()
        _undo(server, client, action, statement, name)
    if server.markers:
        server.markers.clear()
    if server.empty_replies:
        server.empty_replies.clear()
    server.retrying = False
    client.batch_copy = None


def client_statement(client: ClientConnection, name: bytes) -> bytes | None:
    """The Parse contents (query, parameter types) of a client's named statement."""
    statement = client.statements.get(name) if client.statements else None
    return None if statement is None else statement.key


def adopt_statement(client: ClientConnection, name: bytes, rest: bytes) -> bool:
    """A named statement pgmux parsed for the client itself (in a failed transaction
    block, see server_loss.py): servers get it when it is used. False when statements are
    not mapped (max_prepared_statements = 0): then only a server could hold it."""
    if client.registry.config.max_prepared_statements <= 0:
        return False
    if client.statements is None:
        client.statements = {}
    client.statements[name] = client.registry.statement_names.statement_for(rest)
    return True


def forget_statements(server: ServerConnection, client: ClientConnection | None) -> None:
    """DISCARD ALL / DEALLOCATE ALL ran: the session holds no prepared statement now."""
    if server.prepared:
        server.prepared.clear()
    if client is not None:
        client.statements = None


CACHED_PLAN_ERROR = b"cached plan must not change result type"
BATCH_COPY_LIMIT = 65536


def copy_batch(client: ClientConnection, data: bytes | memoryview) -> None:
    """Keep what was sent for a request that executes named statements, to resend it
    once after a "cached plan must not change result type" (see ``replan``)."""
    copy = client.batch_copy
    if copy is None:
        return
    if len(copy) + len(data) <= BATCH_COPY_LIMIT:
        copy += data
    else:
        copy[:] = b"-"  # too big to keep: this request gets no retry


def replan(server: ServerConnection, client: ClientConnection, batch: int) -> bytes | None:
    """After DDL changed a statement's result type PostgreSQL refuses its cached plan.
    Return the request to send again on fresh plans, or None to let the error through.

    Retried: a request alone in flight, outside a transaction, nothing of it sent to the
    client yet, made only of Bind/Describe/Execute/Sync/Flush plus Parses pgmux had
    answered itself; and either it Describes (the client learns the new row shape) or
    every failing statement was parsed in it (PostgreSQL would have planned afresh).
    Otherwise the statements are renewed, so the client's own retry gets fresh plans.
    """
    copy = client.batch_copy
    prepared = server.prepared
    if not copy or prepared is None or len(client.fe.requests) != 1:
        return None
    data = bytes(copy)
    found = _plain_request(data, prepared)
    if found is None:
        return None
    bound, fake_parsed, described = found
    if not bound or not (described or bound <= fake_parsed):
        return None
    # What was pending for the failed attempt is replaced by what the retry will do;
    # nothing is undone (the client's Parses stand, they are only re-planned).
    ops = _ops(server)
    kept = [op for op in ops if op[0] != batch]
    ops.clear()
    ops.extend(kept)
    resend: list[bytes] = []
    for name in bound - fake_parsed:  # used but not parsed in this request: re-plan first
        statement = prepared[name]
        resend += (build_target(b"C", STATEMENT, name), statement.parse)
        ops.append((batch, A_INJECT, statement, b""))  # swallow the CloseComplete
        ops.append((batch, A_INJECT, statement, b""))  # and the ParseComplete
    pos = 0
    while pos < len(data):
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        if data[pos] == 67:  # pgmux's no-op Close standing for a Parse: a real one now
            name = split_target(data[pos + 5 : end], "Close")[1][: -len(NOOP_SUFFIX)]
            statement = prepared[name]
            resend += (build_target(b"C", STATEMENT, name), statement.parse)
            ops.append((batch, A_INJECT, statement, b""))  # swallow the CloseComplete
            ops.append((batch, A_PASS, None, b""))  # the ParseComplete the client awaits
        else:
            resend.append(data[pos:end])
        pos = end
    log.info("%s: statement result type changed; re-preparing and retrying", client)
    return b"".join(resend)


def _plain_request(
    data: bytes, prepared: OrderedDict[bytes, Statement]
) -> tuple[set[bytes], set[bytes], bool] | None:
    """(statements bound, statements pgmux fake-parsed, whether it Describes) for a
    request that can be sent again as it is; None for any other request."""
    bound: set[bytes] = set()
    fake_parsed: set[bytes] = set()
    described = False
    pos = 0
    while pos + 5 <= len(data):
        typ = data[pos]
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        if end > len(data) or typ in (80, 81, 70):  # Parse, Query, FunctionCall
            return None
        body = data[pos + 5 : end]
        if typ == 67:  # Close: only pgmux's own no-op for a statement it holds
            kind, name = split_target(body, "Close")
            stem = name[: -len(NOOP_SUFFIX)]
            if kind != STATEMENT or not name.endswith(NOOP_SUFFIX) or stem not in prepared:
                return None
            fake_parsed.add(stem)
        elif typ == 66:  # Bind
            name = split_bind(body)[1]
            if name:
                if name not in prepared:
                    return None
                bound.add(name)
        elif typ == 68:  # Describe
            described = True
        pos = end
    if pos != len(data) or not data.endswith(messages.SYNC):
        return None
    return bound, fake_parsed, described


def renew_stale(server: ServerConnection, client: ClientConnection) -> None:
    """The request is not retried: the statements it bound get fresh pgmux names (a new
    Parse of the same text plans afresh everywhere) and leave this server at release."""
    copy = client.batch_copy
    prepared = server.prepared
    if not copy or not prepared:
        return
    data = bytes(copy)
    names = client.registry.statement_names
    pos = 0
    while pos + 5 <= len(data):
        end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
        if data[pos] == 66 and end <= len(data):
            name = split_bind(data[pos + 5 : end])[1]
            statement = prepared.pop(name, None)
            if statement is not None:
                names.renew(statement)
                server.stale.add(name)
        pos = end


def evictions(server: ServerConnection, limit: int) -> bytes:
    """Close messages for stale statements and the least recently used beyond ``limit``."""
    prepared = server.prepared
    closes = [build_target(b"C", STATEMENT, name) for name in sorted(server.stale)]
    server.stale.clear()
    while prepared and len(prepared) > limit:
        name, _ = prepared.popitem(last=False)
        closes.append(build_target(b"C", STATEMENT, name))
    return b"".join(closes)


__all__ = [
    "CLOSE_COMPLETE",
    "FUNCTION_CALL",
    "Statement",
    "StatementNames",
    "adopt_statement",
    "batch_done",
    "client_statement",
    "error_reply",
    "evictions",
    "forget_lost",
    "forget_statements",
    "reply_for",
    "rewrite_requests",
]
