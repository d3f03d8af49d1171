"""The relay's header-only scanners, on bytes alone: whole chunks and byte by byte."""

from __future__ import annotations

import contextlib
import struct

import pytest
from support.scanners import SCANNER_IDS, SCANNERS

from proxy.protocol import messages
from proxy.protocol import stream as stream_module
from proxy.protocol.errors import ProtocolError
from proxy.protocol.stream import (
    MARK_COPY_END,
    REQ_QUERY,
    REQ_SYNC,
    BackendStream,
    FrontendStream,
    failed_request_end,
    first_request_end,
)

MAX = 1 << 30


def msg(typ: bytes, body: bytes = b"") -> bytes:
    return messages.message(typ, body)


def parse(name: bytes = b"") -> bytes:
    return msg(b"P", name + b"\0select 1\0\0\0")


BIND = msg(b"B", b"\0\0\0\0\0\0\0\0\0")
EXECUTE = msg(b"E", b"\0\0\0\0\0")
SYNC = msg(b"S")
FLUSH = msg(b"H")
QUERY = messages.query("select 1")
COPY_DATA = msg(b"d", b"1\tabc\n")
COPY_DONE = msg(b"c")
TERMINATE = msg(b"X")


def feed_front(stream: FrontendStream, data: bytes, *, bytewise: bool) -> tuple[bytes, bool]:
    """Feed whole or a byte at a time; returns everything forwardable and terminated."""
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    out = bytearray()
    for chunk in chunks:
        buf, end, _, terminated = stream.feed(chunk)
        out += buf[:end]
        if terminated:
            return bytes(out), True
    return bytes(out), False


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


class TestFrontendStream:
    def test_simple_query_counts_one_request(self, bytewise: bool) -> None:
        fe = FrontendStream(MAX)
        out, terminated = feed_front(fe, QUERY, bytewise=bytewise)
        assert out == QUERY and not terminated
        assert list(fe.requests) == [REQ_QUERY]
        assert not fe.idle
        fe.on_ready_for_query()
        assert fe.idle

    def test_pipelined_queries(self, bytewise: bool) -> None:
        fe = FrontendStream(MAX)
        feed_front(fe, QUERY * 3, bytewise=bytewise)
        assert len(fe.requests) == 3
        fe.on_ready_for_query()
        fe.on_ready_for_query()
        assert not fe.idle
        fe.on_ready_for_query()
        assert fe.idle

    def test_extended_batch_open_until_sync(self, bytewise: bool) -> None:
        fe = FrontendStream(MAX)
        feed_front(fe, parse() + BIND + EXECUTE + FLUSH, bytewise=bytewise)
        assert fe.extended_open and not fe.requests and not fe.idle
        feed_front(fe, SYNC, bytewise=bytewise)
        assert not fe.extended_open and list(fe.requests) == [REQ_SYNC]
        fe.on_ready_for_query()
        assert fe.idle

    def test_flush_after_sync_opens_nothing(self, bytewise: bool) -> None:
        # psycopg's pipeline mode sends Flush after Sync; nothing awaits a reply then.
        fe = FrontendStream(MAX)
        feed_front(fe, parse() + BIND + EXECUTE + SYNC + FLUSH, bytewise=bytewise)
        fe.on_ready_for_query()
        assert fe.idle

    def test_terminate_stops_forwarding(self, bytewise: bool) -> None:
        fe = FrontendStream(MAX)
        out, terminated = feed_front(fe, QUERY + TERMINATE + QUERY, bytewise=bytewise)
        assert terminated and out == QUERY

    def test_partial_message_is_mid_message(self) -> None:
        fe = FrontendStream(MAX)
        buf, end, _, _ = fe.feed(QUERY[:7])
        assert buf[:end] == QUERY[:7]  # body bytes go on as they come
        assert fe.mid_message and fe.partial
        fe.feed(QUERY[7:])
        assert not fe.mid_message and not fe.partial

    def test_partial_header_is_held(self) -> None:
        fe = FrontendStream(MAX)
        buf, end, _, _ = fe.feed(QUERY[:3])
        # Held, not forwarded: the server's stream is intact, the client's is not.
        assert end == 0 and fe.partial and not fe.mid_message
        buf, end, _, _ = fe.feed(QUERY[3:])
        assert buf[:end] == QUERY

    def test_simple_copy_in(self, bytewise: bool) -> None:
        fe = FrontendStream(MAX)
        feed_front(fe, messages.query("copy t from stdin"), bytewise=bytewise)
        fe.on_copy_in_response()
        assert fe.copy_in and not fe.copy_in_extended and not fe.idle
        feed_front(fe, COPY_DATA * 3 + COPY_DONE, bytewise=bytewise)
        assert not fe.copy_in and list(fe.requests) == [REQ_QUERY]
        fe.on_ready_for_query()
        assert fe.idle

    def test_extended_copy_in_ignores_sync_inside_copy(self, bytewise: bool) -> None:
        # libpq: Parse/Bind/Execute/Sync, then (after CopyInResponse) data, CopyDone, Sync.
        fe = FrontendStream(MAX)
        feed_front(fe, parse() + BIND + EXECUTE + SYNC, bytewise=bytewise)
        fe.on_copy_in_response()
        assert fe.copy_in and fe.copy_in_extended and not fe.requests
        feed_front(fe, COPY_DATA + COPY_DONE + SYNC, bytewise=bytewise)
        assert list(fe.requests) == [REQ_SYNC]
        fe.on_ready_for_query()
        assert fe.idle

    def test_extended_copy_in_fully_pipelined(self, bytewise: bool) -> None:
        fe = FrontendStream(MAX)
        data = parse() + BIND + EXECUTE + SYNC + COPY_DATA + COPY_DONE + SYNC + QUERY
        feed_front(fe, data, bytewise=bytewise)
        assert list(fe.requests) == [REQ_SYNC, MARK_COPY_END, REQ_SYNC, REQ_QUERY]
        fe.on_copy_in_response()
        assert not fe.copy_in
        assert list(fe.requests) == [REQ_SYNC, REQ_QUERY]
        fe.on_ready_for_query()
        fe.on_ready_for_query()
        assert fe.idle

    def test_stray_copy_done_does_not_block(self) -> None:
        fe = FrontendStream(MAX)
        fe.feed(COPY_DONE + QUERY)
        fe.on_ready_for_query()
        assert fe.idle

    @pytest.mark.parametrize("length", [0, 3, MAX + 1, 0xFFFFFFFF])
    def test_bad_length_is_protocol_error(self, length: int) -> None:
        fe = FrontendStream(MAX)
        with pytest.raises(ProtocolError, match="invalid length"):
            fe.feed(b"Q" + struct.pack("!I", length) + b"xxxx")

    @pytest.mark.parametrize("typ", [b"Z", b"\x00", b"\xff", b"p", b"A"])
    def test_unknown_type_is_protocol_error(self, typ: bytes) -> None:
        fe = FrontendStream(MAX)
        with pytest.raises(ProtocolError, match="invalid frontend message type"):
            fe.feed(QUERY + typ + struct.pack("!I", 4))
        # Counted but never forwarded: the stream is broken, its server must be closed.
        assert fe.mid_message

    def test_length_cap_is_max_packet_size(self) -> None:
        fe = FrontendStream(1024)
        fe.feed(msg(b"Q", b"x" * 1019 + b"\0"))  # 1024 exactly
        with pytest.raises(ProtocolError, match="max_packet_size"):
            fe.feed(msg(b"Q", b"x" * 1020 + b"\0"))

    def test_garbage_never_crashes_with_other_errors(self) -> None:
        import random

        rng = random.Random(1234)
        for _ in range(2000):
            fe = FrontendStream(1 << 20)
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
            with contextlib.suppress(ProtocolError):
                fe.feed(data)


def feed_back(stream: BackendStream, data: bytes, *, bytewise: bool) -> tuple[bytes, list[bytes]]:
    """Everything forwardable, and the whole interesting messages reported."""
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    out = bytearray()
    events: list[bytes] = []
    for chunk in chunks:
        buf, end, evs = stream.feed(chunk)
        for _typ, start, stop in evs:
            assert stop <= end
            events.append(bytes(buf[start:stop]))
        out += buf[:end]
    return bytes(out), events


ROW_DESCRIPTION = msg(b"T", b"\0\1x\0" + b"\0" * 18)
DATA_ROW = msg(b"D", b"\0\1\0\0\0\1" + b"1")
COMMAND_COMPLETE = msg(b"C", b"SELECT 1\0")
READY = messages.ready_for_query(ord("I"))
PARAM = messages.parameter_status("TimeZone", "UTC")
ERROR = messages.error_response("ERROR", "42601", "syntax error")


class TestBackendStream:
    @pytest.fixture(autouse=True, params=SCANNERS, ids=SCANNER_IDS)
    def scanner(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        """Every case runs through each header walk built here: C and Python."""
        monkeypatch.setattr(stream_module, "scan_backend", request.param)

    def test_result_then_ready(self, bytewise: bool) -> None:
        data = ROW_DESCRIPTION + DATA_ROW * 3 + COMMAND_COMPLETE + READY
        out, events = feed_back(BackendStream(MAX), data, bytewise=bytewise)
        assert out == data
        assert events == [READY]

    def test_interesting_messages_reported_whole(self, bytewise: bool) -> None:
        data = PARAM + DATA_ROW + ERROR + msg(b"G", b"\0\0\0") + READY
        out, events = feed_back(BackendStream(MAX), data, bytewise=bytewise)
        assert out == data
        assert events == [PARAM, ERROR, msg(b"G", b"\0\0\0"), READY]

    def test_large_row_streams_without_holding(self) -> None:
        big = msg(b"D", b"x" * 100_000)
        stream = BackendStream(MAX)
        buf, end, events = stream.feed(big[:50_000])
        assert end == 50_000 and not events and stream.mid_message
        buf, end, events = stream.feed(big[50_000:] + READY)
        assert end == len(buf) and len(events) == 1

    def test_partial_ready_is_held_back(self) -> None:
        stream = BackendStream(MAX)
        data = DATA_ROW + READY
        buf, end, events = stream.feed(data[:-2])
        assert buf[:end] == DATA_ROW and not events
        buf, end, events = stream.feed(data[-2:])
        assert buf[:end] == READY and len(events) == 1

    @pytest.mark.parametrize("length", [0, 2, 0x80000000])
    def test_bad_length(self, length: int) -> None:
        with pytest.raises(ProtocolError):
            BackendStream(1 << 30).feed(b"D" + struct.pack("!I", length))


# -- first_request_end (cancelling a queued client's first request) -----------------------


def test_first_request_end() -> None:
    q1, q2 = messages.query("select 1"), messages.query("select 2")
    batch = parse() + msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S")
    assert first_request_end(q1 + q2) == len(q1)
    assert first_request_end(batch + q1) == len(batch)
    assert first_request_end(msg(b"H") + batch) == len(msg(b"H")) + len(batch)
    fcall = msg(b"F", b"\0\0\0\1\0\0\0\0\0\0")
    assert first_request_end(fcall) == len(fcall)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        messages.query("select 1")[:-1],  # the Query has not fully arrived
        parse() + msg(b"B", b"\0\0\0\0\0\0\0\0"),  # a batch without its Sync yet
        msg(b"d", b"copy data") + messages.query("select 1"),  # not a request
        messages.TERMINATE,
        b"Q\0\0\0\2",  # a length below 4
        b"?\0\0\0\4",  # an unknown type
    ],
)
def test_first_request_end_nothing_to_cut(data: bytes) -> None:
    assert first_request_end(data) is None


# -- failed_request_end (query_wait_timeout answering a queued client's first request) ---


def test_failed_request_end() -> None:
    q1, q2 = messages.query("select 1"), messages.query("select 2")
    batch = parse() + msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S")
    flushed = parse() + msg(b"D", b"S\0") + msg(b"H")  # asyncpg's prepare
    assert failed_request_end(q1 + q2) == (len(q1), True)
    assert failed_request_end(batch + q1) == (len(batch), True)
    # After an error the server skips to Sync, a Query in between included.
    assert failed_request_end(flushed + q1 + msg(b"S") + q2) == (
        len(flushed) + len(q1) + 5,
        True,
    )
    # Sent with Flush and no Sync yet: all of it is answered, the ReadyForQuery later.
    assert failed_request_end(flushed) == (len(flushed), False)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        messages.query("select 1")[:-1],  # incomplete
        msg(b"d", b"row"),  # CopyData is not a request
        msg(b"X"),  # Terminate
        parse() + msg(b"X"),
    ],
)
def test_failed_request_end_nothing_to_answer(data: bytes) -> None:
    assert failed_request_end(data) is None
