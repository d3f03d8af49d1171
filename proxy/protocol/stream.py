"""Header-only scanning of the relayed byte streams, one class per direction.

The relay hands every received chunk to ``feed``. The scanner walks the message
headers (type byte + Int32 length), keeps the little state pooling decisions need,
and says how many bytes may be forwarded unchanged. Bodies are never copied, except
for the few backend message types the pooler must read whole: those are held back
until complete and reported as events. Every length is checked before it is trusted.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import codes
from .errors import ProtocolError

_unpack_length = struct.Struct("!I").unpack_from
_unpack_header = struct.Struct("!BI").unpack_from  # type byte, length

Event = tuple[int, int, int]
"""``(message type, start, end)`` of a whole message inside the returned buffer."""

FrontendEvent = tuple[int, int, int, int]
"""``(message type, start, end, requests sent before it)`` of a whole client message."""

NO_EVENTS: Sequence[Any] = ()

# What a frontend message means for request tracking (index: type byte).
K_INVALID = 0
K_REQUEST = 1  # Query, FunctionCall: answered by exactly one ReadyForQuery
K_SYNC = 2  # ends an extended-query batch; answered by one ReadyForQuery
K_EXTENDED = 3  # Parse, Bind, Describe, Execute, Close: batch is open until Sync
K_COPY_DATA = 4
K_COPY_END = 5  # CopyDone, CopyFail
K_TERMINATE = 6
K_FLUSH = 7  # asks for pending output; opens nothing and awaits no ReadyForQuery


def _kind_table() -> bytes:
    table = bytearray(256)
    for typ in (codes.F_QUERY, codes.F_FUNCTION_CALL):
        table[typ] = K_REQUEST
    table[codes.F_SYNC] = K_SYNC
    for typ in (
        codes.F_PARSE,
        codes.F_BIND,
        codes.F_DESCRIBE,
        codes.F_EXECUTE,
        codes.F_CLOSE,
    ):
        table[typ] = K_EXTENDED
    table[codes.F_FLUSH] = K_FLUSH
    table[codes.F_COPY_DATA] = K_COPY_DATA
    table[codes.F_COPY_DONE] = K_COPY_END
    table[codes.F_COPY_FAIL] = K_COPY_END
    table[codes.F_TERMINATE] = K_TERMINATE
    return bytes(table)


_FRONTEND_KIND = _kind_table()

# Entries of FrontendStream.requests.
REQ_QUERY = 1  # a Query or FunctionCall sent to the server
REQ_SYNC = 2  # a Sync sent to the server
MARK_COPY_END = 3  # a CopyDone/CopyFail whose copy-in has not been seen starting yet


def interesting_table(types: bytes) -> bytes:
    """A 256-entry lookup table marking the backend message types to report whole."""
    table = bytearray(256)
    for typ in types:
        table[typ] = 1
    return bytes(table)


# The backend messages the relay acts on: ReadyForQuery (release decisions),
# ParameterStatus (parameter tracking), ErrorResponse (fatal errors, logging) and
# CopyInResponse (Syncs sent during copy-in are ignored by the server).
RELAY_INTERESTING = interesting_table(b"ZSEG")


# Client messages the relay reads whole when it tracks prepared statements and session
# state: Parse, Bind, Describe, Close (statement names), Query (its SQL) and
# FunctionCall (a request without SQL: see server_loss.py, what a lost request leaves).
TRACKED_FRONTEND = interesting_table(b"PBDCQF")
NOTHING = interesting_table(b"")


def _request_messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(start, kind, end) of each whole client message in ``data`` that can be part of
    a request; on one that is malformed or no part of a request (COPY data, Terminate)
    it yields (start, K_INVALID, start) and stops. An incomplete last message ends it."""
    pos = 0
    n = len(data)
    while n - pos >= 5:
        kind = _FRONTEND_KIND[data[pos]]
        length: int = _unpack_length(data, pos + 1)[0]
        end = pos + 1 + length
        if length < 4 or end > n or kind not in (K_REQUEST, K_SYNC, K_EXTENDED, K_FLUSH):
            yield pos, K_INVALID, pos
            return
        yield pos, kind, end
        pos = end


def first_request_end(data: bytes) -> int | None:
    """Where the first request in ``data`` (whole client messages, nothing sent yet)
    ends: after its Query or FunctionCall, or after the Sync closing an extended batch.
    None when that end has not arrived yet, or the first message is not part of a
    request (COPY data, Terminate) or is malformed: then nothing can be cut off."""
    for _, kind, end in _request_messages(data):
        if kind == K_INVALID:
            return None
        if kind in (K_REQUEST, K_SYNC):
            return end
    return None


def failed_request_end(data: bytes) -> tuple[int, bool] | None:
    """How much of ``data`` (whole client messages, nothing sent yet) an error answers
    when its first request fails before reaching a server, as PostgreSQL would: a Query
    or FunctionCall alone; an extended batch through its Sync, since after an error the
    server discards messages until Sync (protocol docs, "Extended Query"). Returns (end,
    whether a Sync or Query ends it, so a ReadyForQuery follows the error); without one
    yet (a batch sent with Flush, awaiting replies) the whole of ``data`` is answered
    and its Sync is still to come. None if a message is incomplete or not a request
    (COPY data, Terminate): then nothing can be answered cleanly."""
    last = 0
    for pos, kind, end in _request_messages(data):
        if kind == K_INVALID:
            return None
        if kind == K_SYNC or (kind == K_REQUEST and pos == 0):
            return end, True
        last = end
    if last != len(data) or last == 0:
        return None
    return last, False


class FrontendStream:
    """Client -> server: frames, validates and counts what awaits a ReadyForQuery.

    ``requests`` holds, in order, each Query/FunctionCall/Sync forwarded whose
    ReadyForQuery has not come back. The server can be given back to the pool only
    when it is empty, no extended-query batch is open (messages after the last Sync)
    and the client is not in the middle of a COPY FROM STDIN. Messages whose type is
    marked in ``interesting`` are held until whole and reported as events.
    """

    __slots__ = (
        "_hold",
        "_max_length",
        "_need",
        "_skip",
        "answered",
        "broken",
        "copy_in",
        "copy_in_extended",
        "extended_open",
        "interesting",
        "requests",
        "sent",
    )

    def __init__(self, max_length: int, interesting: bytes = NOTHING) -> None:
        self._skip = 0
        self._hold = bytearray()
        self._need = 0  # total length of the held message, once its header is known
        self._max_length = max_length
        self.interesting = interesting
        self.requests: deque[int] = deque()
        self.extended_open = False
        self.copy_in = False
        self.copy_in_extended = False
        self.broken = False
        # Monotonic counters of requests sent and answered: the janitor tells activity
        # from idleness by them, so the relay never reads the clock.
        self.sent = 0
        self.answered = 0

    @property
    def idle(self) -> bool:
        """Nothing sent is still awaiting its reply, and no batch or copy is open."""
        return not self.requests and not self.extended_open and not self.copy_in

    @property
    def mid_message(self) -> bool:
        """Part of a message has been forwarded and the rest has not arrived, or the
        stream broke: either way the server cannot be told where the next message is.
        (Held bytes were never forwarded and do not count.)"""
        return self._skip > 0 or self.broken

    @property
    def partial(self) -> bool:
        """The next chunk continues a message rather than starting one."""
        return self._skip > 0 or bool(self._hold)

    def take_held(self) -> bytes:
        """Give up the start of a message held back until whole (never forwarded): the
        bytes, for whoever reads the client's stream from here on."""
        held = bytes(self._hold)
        self._hold.clear()
        self._need = 0
        return held

    def feed(self, data: bytes) -> tuple[bytes, int, Sequence[FrontendEvent], bool]:
        """Scan a chunk. Returns ``(buf, end, events, terminated)``: forward ``buf[:end]``.

        ``events`` are the interesting messages, whole, inside ``buf[:end]``.
        ``terminated`` means a Terminate message starts at ``end``; it and anything
        after it must not reach a pooled server.
        """
        pos = self._skip
        n = len(data)
        if pos:
            if pos >= n:
                self._skip = pos - n
                return data, n, NO_EVENTS, False
            self._skip = 0
        elif self._hold:
            hold = self._hold
            if self._need and len(hold) + n < self._need:
                hold += data  # a large message still arriving: nothing to forward yet
                return data, 0, NO_EVENTS, False
            data = bytes(hold) + data
            hold.clear()
            self._need = 0
            n = len(data)
        kinds = _FRONTEND_KIND
        interesting = self.interesting
        requests = self.requests
        max_length = self._max_length
        events: list[FrontendEvent] | None = None
        while True:
            if n - pos < 5:
                if pos < n:
                    self._hold += data[pos:]
                return data, pos, events or NO_EVENTS, False
            typ = data[pos]
            (length,) = _unpack_length(data, pos + 1)
            if length < 4 or length > max_length:
                self.broken = True
                raise ProtocolError(
                    f"invalid length {length} in client message of type {chr(typ)!r} "
                    f"(must be 4 to {max_length}, max_packet_size)"
                )
            end = pos + 1 + length
            if interesting[typ]:
                if end > n:
                    self._hold += data[pos:]
                    self._need = end - pos
                    return data, pos, events or NO_EVENTS, False
                # The count of requests before it tells which batch it belongs to.
                if events is None:
                    events = [(typ, pos, end, self.sent)]
                else:
                    events.append((typ, pos, end, self.sent))
            kind = kinds[typ]
            if kind == K_REQUEST:
                requests.append(REQ_QUERY)
                self.sent += 1
            elif kind == K_SYNC:
                self.extended_open = False
                # The server ignores Sync during copy-in (protocol docs, "COPY Operations").
                if not self.copy_in:
                    requests.append(REQ_SYNC)
                    self.sent += 1
            elif kind == K_EXTENDED:
                self.extended_open = True
            elif kind == K_COPY_END:
                if self.copy_in:
                    self.copy_in = False
                else:
                    requests.append(MARK_COPY_END)
            elif kind == K_TERMINATE:
                return data, pos, events or NO_EVENTS, True
            elif kind == K_INVALID:
                self.broken = True
                raise ProtocolError(f"invalid frontend message type {chr(typ)!r}")
            if end > n:
                self._skip = end - n
                return data, n, events or NO_EVENTS, False
            pos = end

    def on_ready_for_query(self) -> None:
        """The server answered the oldest request."""
        self.answered += 1
        requests = self.requests
        while requests:
            if requests.popleft() != MARK_COPY_END:
                return

    def on_copy_in_response(self) -> None:
        """The server entered copy-in; Syncs sent inside the copy will be ignored.

        The copy window runs from the command that started the copy to the client's
        CopyDone/CopyFail. A simple Query stays the request answered at the end; in
        the extended protocol every Sync up to CopyDone is dropped and the Sync after
        it is the one answered.
        """
        requests = self.requests
        head = requests.popleft() if requests and requests[0] == REQ_QUERY else None
        self.copy_in_extended = head is None
        ended = False
        while requests:
            entry = requests[0]
            if entry == MARK_COPY_END:
                requests.popleft()
                ended = True
                break
            if entry != REQ_SYNC:
                break  # a client pipelining commands into a copy; the server errors it out
            requests.popleft()
            self.answered += 1  # an ignored Sync is "answered" by nothing: keep counts even
        if head is not None:
            requests.appendleft(head)
        self.copy_in = not ended


class BackendStream:
    """Server -> client: frames the stream and reports the messages pooling acts on.

    Messages whose type is marked in ``interesting`` are reported whole as events;
    their bytes are held back until complete. Everything else is only skipped over.
    """

    __slots__ = ("_hold", "_max_length", "_skip", "interesting")

    def __init__(self, max_length: int, interesting: bytes = RELAY_INTERESTING) -> None:
        self._skip = 0
        self._hold = b""
        self._max_length = max_length
        self.interesting = interesting  # may change between messages

    @property
    def mid_message(self) -> bool:
        return self._skip > 0 or bool(self._hold)

    @property
    def forwarded_partly(self) -> bool:
        """Part of a message went out and the rest has not arrived: nothing can be
        framed for the client until it does. (Held bytes never went out.)"""
        return self._skip > 0

    def feed(self, data: bytes) -> tuple[bytes, int, Sequence[Event]]:
        """Scan a chunk. Returns ``(buf, end, events)``: ``buf[:end]`` may be forwarded.

        Events are whole interesting messages inside ``buf[:end]``, in stream order.
        Bytes past ``end`` (a partial header or interesting message) stay held here.
        """
        pos = self._skip
        n = len(data)
        if pos:
            if pos >= n:
                self._skip = pos - n
                return data, n, NO_EVENTS
            self._skip = 0
        elif self._hold:
            data = self._hold + data
            self._hold = b""
            n = len(data)
        pos, events, stop, extra = scan_backend(data, pos, self.interesting, self._max_length)
        if stop == STOP_SKIP:
            self._skip = extra
            return data, n, events or NO_EVENTS
        if stop == STOP_BAD_LENGTH:
            raise ProtocolError(
                f"invalid length {extra} in server message of type {chr(data[pos])!r}"
            )
        if pos < n:
            self._hold = data[pos:]
        return data, pos, events or NO_EVENTS


# How scan_backend stopped (the same numbers as in _scan.c).
STOP_HOLD = 0  # at pos: a partial header, or an interesting message not yet whole
STOP_SKIP = 1  # an uninteresting message runs past the chunk by ``extra`` bytes
STOP_BAD_LENGTH = 2  # the message at pos declares length ``extra``, out of range

ScanResult = tuple[int, list[Event] | None, int, int]


def scan_backend_py(data: bytes, pos: int, interesting: bytes, max_length: int) -> ScanResult:
    """Walk whole message headers from ``pos``: ``(pos, events, stop, extra)``.

    Whole messages whose type is marked in ``interesting`` become events; the rest are
    only stepped over. The walk stops where a header is incomplete or an interesting
    message is not whole yet (STOP_HOLD at ``pos``), where an uninteresting message
    runs ``extra`` bytes past the chunk (STOP_SKIP), or at a length outside
    4..max_length (STOP_BAD_LENGTH, ``extra`` the length). ``_scan.scan_backend`` is
    the same in C; this one runs where it could not be built.
    """
    n = len(data)
    events: list[Event] | None = None
    last_header = n - 5
    while True:
        if pos > last_header:
            return pos, events, STOP_HOLD, 0
        typ, length = _unpack_header(data, pos)
        end = pos + 1 + length
        if end <= n and not interesting[typ] and 4 <= length <= max_length:
            pos = end  # the common case: a whole message nobody needs to look at
            continue
        if length < 4 or length > max_length:
            return pos, events, STOP_BAD_LENGTH, length
        if interesting[typ]:
            if end > n:
                return pos, events, STOP_HOLD, 0
            if events is None:
                events = [(typ, pos, end)]
            else:
                events.append((typ, pos, end))
        elif end > n:
            return pos, events, STOP_SKIP, end - n
        pos = end


scan_backend: Callable[[bytes, int, bytes, int], ScanResult]
try:
    from ._scan import scan_backend
except ImportError:  # built without a C compiler: the same walk in Python
    scan_backend = scan_backend_py
SCANNER = "C" if scan_backend is not scan_backend_py else "Python"
