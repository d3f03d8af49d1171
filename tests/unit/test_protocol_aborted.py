"""A failed transaction block with no server (protocol/aborted.py), on bytes alone:
the statements' leading keywords, and PostgreSQL's answers, fed whole and byte by byte."""

from __future__ import annotations

import struct

import pytest

from proxy.protocol import aborted, codes, messages
from proxy.protocol.aborted import (
    ABORTED,
    BEGIN,
    CANNOT,
    CLOSED,
    COMMIT,
    COMMIT_AND_CHAIN,
    ENDED,
    GO_ON,
    HAND_OVER,
    LOST,
    OTHER,
    PREPARE_TRANSACTION,
    PREPARED,
    ROLLBACK,
    ROLLBACK_AND_CHAIN,
    TERMINATE,
    AbortedBlock,
    Error,
    Reply,
    lost_query,
    statement_kinds,
)
from proxy.protocol.errors import ProtocolError
from proxy.protocol.extended import STATEMENT, build_target

MAX = 1 << 30


def kinds(sql: bytes) -> list[int]:
    return [kind for kind, _, _ in statement_kinds(sql)]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (b"ROLLBACK", [ROLLBACK]),
        (b"rollback;", [ROLLBACK]),
        (b"  Rollback Work  ;  ", [ROLLBACK]),
        (b"ROLLBACK TRANSACTION AND NO CHAIN", [ROLLBACK]),
        (b"ROLLBACK AND CHAIN", [ROLLBACK_AND_CHAIN]),
        (b"ABORT", [ROLLBACK]),
        (b"abort work and no chain", [ROLLBACK]),
        (b"COMMIT", [COMMIT]),
        (b"END", [COMMIT]),
        (b"END TRANSACTION", [COMMIT]),
        (b"commit and chain", [COMMIT_AND_CHAIN]),
        (b"COMMIT AND NO CHAIN;", [COMMIT]),
        (b"PREPARE TRANSACTION 'gid''s'", [PREPARE_TRANSACTION]),
        (b"BEGIN", [BEGIN]),
        (b"begin isolation level serializable", [BEGIN]),
        (b"START TRANSACTION READ ONLY", [BEGIN]),
        # Not ending a block: these stay "other" (25P02 in a failed block).
        (b"ROLLBACK TO SAVEPOINT a", [OTHER]),
        (b"ROLLBACK TO a", [OTHER]),
        (b"ROLLBACK PREPARED 'x'", [OTHER]),
        (b"COMMIT PREPARED 'x'", [OTHER]),
        (b"PREPARE q AS SELECT 1", [OTHER]),
        (b"START", [OTHER]),
        (b"RELEASE SAVEPOINT a", [OTHER]),
        (b"SAVEPOINT a", [OTHER]),
        (b"rollbacks", [OTHER]),
        (b"COMMIT foo", [OTHER]),
        (b"SELECT 1", [OTHER]),
        (b'"commit"', [OTHER]),
        # Comments, empty statements, several statements.
        (b"", []),
        (b" ;; -- nothing\n /* at /* all */ */", []),
        (b"/* c */ COMMIT -- done", [COMMIT]),
        (b"/* nested /* */ still */COMMIT", [COMMIT]),
        (b"--c\nROLLBACK\n;SELECT 1", [ROLLBACK, OTHER]),
        (b"BEGIN; UPDATE t SET a = 1; COMMIT", [BEGIN, OTHER, COMMIT]),
        # Semicolons inside literals, identifiers, dollar quotes and comments.
        (b"SELECT ';COMMIT'; ROLLBACK", [OTHER, ROLLBACK]),
        (b"SELECT 'it''s;'; COMMIT", [OTHER, COMMIT]),
        (b"SELECT E'\\';COMMIT'; ABORT", [OTHER, ROLLBACK]),
        (b'SELECT ";COMMIT"""; END', [OTHER, COMMIT]),
        (b"DO $$BEGIN; COMMIT; END$$; ROLLBACK", [OTHER, ROLLBACK]),
        (b"DO $body$ $$;COMMIT$$ $body$; COMMIT", [OTHER, COMMIT]),
        (b"SELECT $1; COMMIT", [OTHER, COMMIT]),
        (b"SELECT a$b; COMMIT", [OTHER, COMMIT]),
        (b"SELECT 1 /* ; COMMIT */", [OTHER]),
        (b"SELECT 1 -- ; COMMIT\n; BEGIN", [OTHER, BEGIN]),
        (b"SELECT 'unterminated; COMMIT", [OTHER]),
    ],
)
def test_statement_kinds(sql: bytes, expected: list[int]) -> None:
    assert kinds(sql) == expected


@pytest.mark.parametrize(
    ("sql", "ends_block", "committing"),
    [
        (b"COMMIT", True, True),
        (b"END;", True, True),
        (b"ROLLBACK", True, False),
        (b"PREPARE TRANSACTION 'x'", True, True),
        (b"COMMIT AND CHAIN", False, True),
        (b"ROLLBACK AND CHAIN", False, False),
        (b"COMMIT PREPARED 'x'", False, True),
        (b"SELECT pg_sleep(5)", False, False),
        (b"BEGIN; SELECT 1", False, False),
        (b"UPDATE t SET a = 1; COMMIT", False, True),
        (b"", False, False),
    ],
)
def test_lost_query(sql: bytes, ends_block: bool, committing: bool) -> None:
    assert lost_query(sql) == (ends_block, committing)


# -- the block --------------------------------------------------------------------------

Q = messages.query
SYNC = messages.SYNC
FLUSH = messages.message(b"H")
TERM = messages.TERMINATE
READY_E = messages.ready_for_query(codes.TX_FAILED)
READY_I = messages.ready_for_query(codes.TX_IDLE)
ROLLBACK_TAG = messages.message(b"C", b"ROLLBACK\x00")
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"


def parse(sql: str, name: bytes = b"", types: tuple[int, ...] = ()) -> bytes:
    rest = sql.encode() + b"\0" + struct.pack(f"!H{len(types)}I", len(types), *types)
    return messages.message(b"P", name + b"\0" + rest)


def bind(statement: bytes = b"", portal: bytes = b"") -> bytes:
    return messages.message(b"B", portal + b"\0" + statement + b"\0\0\0\0\0\0\0")


def execute(portal: bytes = b"") -> bytes:
    return messages.message(b"E", portal + b"\0\0\0\0\0")


def describe(kind: int, name: bytes = b"") -> bytes:
    return build_target(b"D", kind, name)


def close(kind: int, name: bytes = b"") -> bytes:
    return build_target(b"C", kind, name)


NAMED = {b"s_rollback": b"ROLLBACK\0\0\0", b"s_select": b"SELECT $1\0\0\x01\0\0\0\x17"}


def lookup(name: bytes) -> bytes | None:
    return NAMED.get(name)


def run(
    block: AbortedBlock, data: bytes, *, bytewise: bool
) -> tuple[list[bytes | Error], list[Reply], bytes]:
    """Feed ``data``; every part answered, the replies, and once the block is over
    what is left for a server (the block's leftover and the bytes not fed yet)."""
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    parts: list[bytes | Error] = []
    replies: list[Reply] = []
    for index, chunk in enumerate(chunks):
        block.receive_data(chunk)
        while (reply := block.next_reply(lookup)) is not None:
            parts.extend(reply.parts)
            replies.append(reply)
            if reply.outcome != GO_ON:
                return parts, replies, block.leftover() + b"".join(chunks[index + 1 :])
    return parts, replies, b""


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_queries_are_refused_until_the_block_ends(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=True)
    parts, replies, rest = run(
        block, Q("SELECT 1") + Q("ROLLBACK TO a") + Q(" ; "), bytewise=bytewise
    )
    assert parts == [ABORTED, READY_E, ABORTED, READY_E, messages.message(b"I"), READY_E]
    assert [r.ready for r in replies] == [True] * 3
    parts, replies, rest = run(block, Q("COMMIT") + Q("SELECT 2"), bytewise=bytewise)
    assert parts == [ROLLBACK_TAG, READY_I]  # COMMIT of a failed block reports ROLLBACK
    assert replies[-1].outcome == ENDED
    assert rest == Q("SELECT 2")


def test_the_client_not_yet_told_gets_the_loss_first(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=False)
    parts, _, _ = run(block, Q("SELECT 1") + Q("SELECT 2"), bytewise=bytewise)
    assert parts == [LOST, READY_E, ABORTED, READY_E]


def test_an_untold_commit_fails(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=False)
    parts, replies, _ = run(block, Q("COMMIT; SELECT 1"), bytewise=bytewise)
    assert parts == [LOST, READY_I]  # not ROLLBACK: nobody told it anything failed
    assert replies[-1].outcome == ENDED
    block = AbortedBlock(MAX, told=False)
    parts, _, _ = run(block, Q("ROLLBACK"), bytewise=bytewise)
    assert parts == [ROLLBACK_TAG, READY_I]


def test_rollback_then_more_hands_the_rest_over(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=True)
    parts, replies, rest = run(block, Q("ROLLBACK; SELECT 1;") + SYNC, bytewise=bytewise)
    assert parts == [ROLLBACK_TAG]
    assert (replies[-1].outcome, replies[-1].rest, replies[-1].ready) == (
        HAND_OVER,
        b" SELECT 1;",
        False,
    )
    assert rest == SYNC


@pytest.mark.parametrize("sql", ["COMMIT AND CHAIN", "ROLLBACK AND CHAIN"])
def test_and_chain_needs_a_server(sql: str) -> None:
    block = AbortedBlock(MAX, told=True)
    assert run(block, Q(sql), bytewise=False)[1][-1].outcome == CANNOT
    assert run(AbortedBlock(MAX, told=True), parse(sql), bytewise=False)[1][-1].outcome == CANNOT


def test_function_call_flush_and_copy(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=True)
    data = FLUSH + messages.message(b"d", b"1\n") + messages.message(b"c")
    data += messages.message(b"F", b"\0\0\0\x01\0\0\0\0\0\0")
    parts, _, _ = run(block, data, bytewise=bytewise)
    assert parts == [ABORTED, READY_E]
    assert run(block, TERM, bytewise=bytewise)[1][-1].outcome == TERMINATE


def test_extended_batch_is_skipped_to_its_sync(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=True)
    batch = parse("SELECT 1") + bind() + describe(ord("P")) + execute() + Q("SELECT 2") + SYNC
    parts, replies, _ = run(block, batch + batch, bytewise=bytewise)
    assert parts == [ABORTED, READY_E, ABORTED, READY_E]
    assert [r.ready for r in replies if r.parts] == [False, True, False, True]


def test_extended_rollback_ends_the_block(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=True)
    data = parse("ROLLBACK", types=(23,)) + describe(STATEMENT) + bind() + describe(ord("P"))
    data += execute() + close(STATEMENT) + FLUSH + SYNC + Q("SELECT 1")
    parts, replies, rest = run(block, data, bytewise=bytewise)
    described = messages.message(b"t", b"\0\x01\0\0\0\x17")
    assert parts == [
        PARSE_COMPLETE,
        described,
        NO_DATA,
        BIND_COMPLETE,
        NO_DATA,
        ROLLBACK_TAG,
        CLOSE_COMPLETE,
        READY_I,
    ]
    assert replies[-1].outcome == ENDED
    assert rest == Q("SELECT 1")


def test_extended_commit_untold_fails_and_ends_the_block(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=False)
    data = parse("COMMIT") + bind() + execute() + parse("SELECT 1") + SYNC
    parts, replies, _rest = run(block, data, bytewise=bytewise)
    assert parts == [PARSE_COMPLETE, BIND_COMPLETE, LOST, READY_I]
    assert replies[-1].outcome == ENDED


def test_after_an_extended_rollback_the_rest_of_the_batch_needs_a_server(
    bytewise: bool,
) -> None:
    block = AbortedBlock(MAX, told=True)
    tail = parse("SELECT 1") + bind() + execute() + SYNC
    parts, replies, rest = run(block, parse("ABORT") + bind() + execute() + tail, bytewise=bytewise)
    assert parts == [PARSE_COMPLETE, BIND_COMPLETE, ROLLBACK_TAG]
    assert replies[-1].outcome == HAND_OVER
    assert rest == tail


def test_named_statements(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=True)
    # A client's own named ROLLBACK, bound and run; Bind of a name it lacks is 26000.
    data = bind(b"s_rollback", b"p1") + describe(ord("P"), b"p1") + execute(b"p1") + SYNC
    parts, _, _ = run(block, data, bytewise=bytewise)
    assert parts == [BIND_COMPLETE, NO_DATA, ROLLBACK_TAG, READY_I]
    block = AbortedBlock(MAX, told=True)
    parts, _, _ = run(block, bind(b"nope") + execute() + SYNC, bytewise=bytewise)
    assert parts == [Error("26000", 'prepared statement "nope" does not exist'), READY_E]
    parts, _, _ = run(block, bind(b"s_select") + SYNC, bytewise=bytewise)
    assert parts == [ABORTED, READY_E]
    parts, _, _ = run(block, describe(STATEMENT, b"s_select") + SYNC, bytewise=bytewise)
    assert parts == [ABORTED, READY_E]
    parts, _, _ = run(block, parse("ROLLBACK", b"s_rollback") + SYNC, bytewise=bytewise)
    assert parts == [Error("42P05", 'prepared statement "s_rollback" already exists'), READY_E]


def test_effects_on_the_clients_statements() -> None:
    block = AbortedBlock(MAX, told=True)
    _, replies, _ = run(
        block, parse("ROLLBACK", b"s_new") + close(STATEMENT, b"s_old"), bytewise=False
    )
    assert [r.effect for r in replies] == [
        (PREPARED, b"s_new", b"ROLLBACK\0\0\0"),
        (CLOSED, b"s_old", b""),
    ]


def test_protocol_errors() -> None:
    block = AbortedBlock(100, told=True)
    block.receive_data(b"Q\x00\x00\x00\x03")
    with pytest.raises(ProtocolError, match="invalid length 3"):
        block.next_reply(lookup)
    block = AbortedBlock(100, told=True)
    block.receive_data(b"Q\x00\x00\x01\x00")
    with pytest.raises(ProtocolError, match="max_packet_size"):
        block.next_reply(lookup)
    block = AbortedBlock(100, told=True)
    block.receive_data(messages.message(b"z"))
    with pytest.raises(ProtocolError, match="invalid frontend message type"):
        block.next_reply(lookup)
    block = AbortedBlock(100, told=True)
    block.receive_data(messages.message(b"Q", b"no terminator"))
    with pytest.raises(ProtocolError, match="NUL-terminated"):
        block.next_reply(lookup)


def test_errors_are_postgresqls() -> None:
    assert aborted.ABORTED == (
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
    )


def test_a_batch_left_open_fails_with_the_next_message(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=True, batch=True, in_block=False)
    parts, replies, rest = run(
        block, bind() + execute() + parse("ROLLBACK") + SYNC + Q("SELECT 1"), bytewise=bytewise
    )
    assert parts == [LOST, READY_I]  # no block was open: the Sync ends it all
    assert replies[-1].outcome == ENDED
    assert rest == Q("SELECT 1")


def test_a_batch_left_open_in_a_block(bytewise: bool) -> None:
    block = AbortedBlock(MAX, told=True, batch=True)
    parts, replies, _ = run(block, SYNC + Q("SELECT 1") + Q("ABORT"), bytewise=bytewise)
    assert parts == [LOST, READY_E, ABORTED, READY_E, ROLLBACK_TAG, READY_I]
    assert replies[-1].outcome == ENDED


def test_a_batch_waiting_for_replies_gets_its_error_now() -> None:
    block = AbortedBlock(MAX, told=True, batch=True, in_block=False)
    assert block.batch_error() == LOST
    assert block.batch_error() is None
    parts, replies, _ = run(block, execute() + FLUSH + SYNC, bytewise=False)
    assert parts == [READY_I]
    assert replies[-1].outcome == ENDED
    block = AbortedBlock(MAX, told=True, batch=True)
    assert run(block, TERM, bytewise=False)[1][-1].outcome == TERMINATE
