"""A client whose server connection was lost under it: what it still awaited is
answered, and its session goes on (transaction and statement pool modes).

``ServerConnection.close`` asks ``may_outlive`` whether the client's session can go on
after its server is lost, and ``outlive_server`` answers each request the client still
awaits with an ERROR 08006. A client that was in a transaction block is then in a
failed block (CLIENT_FAILED) with no server: ``answer_failed_block`` answers what
it sends as PostgreSQL answers in an aborted block (protocol/aborted.py), until it ends
the block. Everything else keeps the old way: a FATAL and the connection closed.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING

from .errors import FailedTransaction, ProtocolViolation, ServerConnectionLost
from .pool import CLIENT_FAILED, CLIENT_IDLE
from .prepared import FUNCTION_CALL, adopt_statement, client_statement, forget_lost
from .protocol import aborted, codes, messages
from .protocol.aborted import AbortedBlock, lost_query
from .protocol.errors import ProtocolError
from .protocol.stream import MARK_COPY_END, REQ_QUERY

if TYPE_CHECKING:
    from .client import ClientConnection
    from .server import ServerConnection

log = logging.getLogger("pgmux.client")

# A batch the lost server left open after part of its replies reached the client (it
# sent Flush) gets its error with the client's next message, as from PostgreSQL; a
# client that sends nothing for this long waits for more replies instead and gets the
# error then. (s) One that got nothing of the batch's replies gets the error at once.
BATCH_ERROR_GRACE = 1.0


def may_outlive(client: ClientConnection, server: ServerConnection) -> bool:
    """Can this client's session go on after ``server``, linked to it, is lost?

    Only where pgmux can answer exactly what is outstanding: transaction or
    statement mode; no session state that lived on the server (pinned, LOAD) or
    that the lost transaction changed and a rollback would undo (a reported
    setting); every message whole on both sides; no COPY from the client; and no
    requests held back unsent.
    """
    fe = client.fe
    return (
        client.server is server
        and server.relaying
        and server.on_ready is None
        and client.pool.mode != "session"
        and not client.pinned
        and not client.loaded
        and not client.terminating
        and client.deferred is None
        and not server.stream.forwarded_partly
        and not fe.mid_message
        and not fe.copy_in
        and MARK_COPY_END not in fe.requests
        and not (client.reported_in and client.reported_in == transaction_mark(client))
    )


def transaction_mark(client: ClientConnection) -> float:
    """Names the transaction now open: when its first request was sent."""
    return client.xact_since or client.busy_since


def _status_after_loss(
    client: ClientConnection, server: ServerConnection
) -> tuple[int, bool | None]:
    """The transaction status the client is left with when ``server`` is lost now,
    and whether the lost request may have committed (None: unknown).

    As PostgreSQL would report it had the request in flight failed just after the
    last reply the client got (replies come in order, so what it got of a request
    is all that ran of it, as far as it can tell): E when a transaction block was
    open then (the client's last ReadyForQuery said so, or a BEGIN of this request
    reached it), else I; and I after a lone COMMIT, ROLLBACK or PREPARE TRANSACTION,
    which end the block even when they fail.
    """
    fe = client.fe
    if server.statement_mode:  # no block outlives a statement there
        return codes.TX_IDLE, False
    in_block = server.tx_status != codes.TX_IDLE or (
        bool(fe.requests) and server.begun == fe.answered
    )
    status = codes.TX_FAILED if in_block else codes.TX_IDLE
    # The text of the request in flight, when it is a Query and the last one sent.
    last = len(fe.requests) == 1 and fe.requests[0] == REQ_QUERY and not fe.extended_open
    sql = client.last_sql if last else None
    if sql is FUNCTION_CALL:
        return status, False
    if sql is not None:
        ends_block, committing = lost_query(sql)
        return (codes.TX_IDLE if ends_block else status), committing
    return status, (None if in_block and fe.requests else False)


def outlive_server(client: ClientConnection, server: ServerConnection, why: str) -> None:
    """``server`` is lost under this client and ``may_outlive`` said yes (called by
    ServerConnection.close): each request still awaiting its ReadyForQuery gets an
    ERROR 08006, the session goes on, and its next request gets a server as usual.
    An extended-query batch still open (no Sync yet) fails too: what the client sends
    up to its Sync is discarded, as PostgreSQL does after an error in a batch, and
    its error comes with its next message (at once if nothing of the batch reached
    it: then it waits for replies). A client left in a transaction block is in a
    failed block (state FAILED), answered by pgmux as PostgreSQL would until it ends
    the block."""
    fe = client.fe
    status, committing = _status_after_loss(client, server)
    forget_lost(server, client)  # before detach: it needs the server's pending Parses
    client.detach()
    # The lost transaction's session state is gone with it (settings it changed
    # were never learned: their check runs after a transaction, which did not end).
    client.state_check = False
    client.trigger_sql = b""
    where = f'server connection for pool "{client.pool.name}" to {server.address} was lost'
    count = len(fe.requests)
    open_batch = fe.extended_open
    failed = status == codes.TX_FAILED
    if count or open_batch:
        if committing:
            outcome = "whether the transaction committed is unknown"
        else:
            outcome = "the transaction was rolled back"
        error = ServerConnectionLost(
            f'server connection for pool "{client.pool.name}" to {server.address} was '
            f"lost: {why}; {outcome}",
            detail="If the request was a COMMIT, whether it took effect is unknown."
            if committing is None
            else None,
            hint="the session goes on: end the transaction block (ROLLBACK), then "
            "retry the transaction"
            if failed
            else "the session goes on: retry the transaction",
        )
        ready = messages.ready_for_query(status)
        for _ in range(count):  # the requests pipelined behind it were lost too
            client.send_error(error, fatal=False, ready=False)
            client.transport.write(ready)
            fe.on_ready_for_query()
        if open_batch:  # its error comes with the client's next message
            fe.extended_open = False
            failed = failed or server.begun == fe.answered
        if client.busy_since > 0:
            client.busy_since = -client.busy_since
    if failed or open_batch:
        untold = error if open_batch else None
        if not (count or open_batch):
            untold = ServerConnectionLost(
                f"{where} while this client was idle in a transaction: {why}; the "
                "transaction was rolled back",
                hint="end the transaction block (ROLLBACK), then retry the transaction",
            )
        block = AbortedBlock(
            client.registry.config.max_packet_size,
            told=untold is None,
            batch=open_batch,
            in_block=failed,
        )
        block.receive_data(fe.take_held())  # the start of a message not sent on
        client.failed = block
        client.lost = untold
        client.state = CLIENT_FAILED
        if open_batch and (count or not server.batch_started):
            # Nothing of the batch reached the client: it waits for replies to what
            # it sent (or is still sending). The error is due now.
            _batch_error_due(client)
        elif open_batch:
            client.timer = client.registry.loop.call_later(
                BATCH_ERROR_GRACE, _batch_error_due, client
            )
    else:
        client.xact_since = 0.0
    if count or open_batch or failed:  # else its transaction had just ended
        log.info(
            "%s: %s (%s); %d request(s) answered with 08006%s, %s",
            client,
            where,
            why,
            count,
            " (and the open batch with its next message)" if open_batch else "",
            "in a failed transaction block until it ends it" if failed else "the session goes on",
        )


def answer_failed_block(client: ClientConnection, data: bytes) -> None:
    """A client in a failed transaction block sent something: answer each message
    as PostgreSQL would (protocol/aborted.py) until the block ends; what follows
    goes to a server as usual."""
    block = client.failed
    assert block is not None
    block.receive_data(data)
    statement = partial(client_statement, client)
    try:
        while (reply := block.next_reply(statement)) is not None:
            if client.timer is not None and not block.batch_failing:
                client.cancel_timer()  # the open batch's error came with a message
            for part in reply.parts:
                if isinstance(part, bytes):
                    client.transport.write(part)
                else:
                    _send_block_error(client, part)
            if reply.ready:  # one request answered (the janitor tells activity by it)
                client.fe.sent += 1
                client.fe.answered += 1
            outcome = reply.outcome
            if reply.effect is not None:
                effect, name, rest = reply.effect
                if effect == aborted.CLOSED:
                    if client.statements:
                        client.statements.pop(name, None)
                elif not adopt_statement(client, name, rest):
                    outcome = aborted.CANNOT
            if outcome == aborted.GO_ON:
                continue
            if outcome == aborted.TERMINATE:
                client.close("client sent Terminate")
            elif outcome == aborted.CANNOT:
                client.fail(
                    ServerConnectionLost(
                        "this request cannot be answered without the server connection "
                        "that was lost under the transaction block",
                        hint="end the block with a plain ROLLBACK, or reconnect",
                    )
                )
            else:  # the block is over: the rest goes to a server as usual
                client.failed = None
                client.lost = None
                client.xact_since = 0.0
                client.state = CLIENT_IDLE
                rest = block.leftover()
                if reply.rest is not None:  # ROLLBACK; more: the rest is a query
                    rest = messages.message(b"Q", reply.rest + b"\x00") + rest
                if rest:
                    client.data_received(rest)
            return
    except ProtocolError as exc:
        client.fail(ProtocolViolation(str(exc)))


def _batch_error_due(client: ClientConnection) -> None:
    client.timer = None
    block = client.failed
    error = block.batch_error() if block is not None else None
    if error is not None:
        _send_block_error(client, error)


def _send_block_error(client: ClientConnection, error: aborted.Error) -> None:
    if error is aborted.LOST:
        lost, client.lost = client.lost, None
        assert lost is not None
        client.send_error(lost, fatal=False, ready=False)
    elif error.sqlstate == aborted.ABORTED.sqlstate:
        client.send_error(
            FailedTransaction(
                error.text,
                hint="the transaction failed when its server connection was lost "
                "(08006); ROLLBACK ends it",
            ),
            fatal=False,
            ready=False,
        )
    else:  # PostgreSQL's own (26000, 42P05), as a direct connection would get it
        client.stats.count_error(error.sqlstate)
        client.transport.write(messages.error_response("ERROR", error.sqlstate, error.text))
