"""CancelRequests: matched to the client whose key they carry, in whichever worker holds it.

A CancelRequest comes on a connection of its own (PostgreSQL protocol, "Canceling
Requests in Progress"), so with ``workers`` > 1 the kernel may hand it to any worker.
The process id pgmux gave the client says which one: pid % workers
(``Registry.register_cancel_key``). A request for another worker's client is passed
on, as the same 16 bytes, over that worker's private unix socket, and handled there as
if a client had sent it. A request is passed on at most once, so none can go round.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from typing import cast

from .pool import ClientState, Registry, ServerState
from .protocol import messages
from .protocol.errors import ProtocolError
from .protocol.startup import CancelRequest, parse_startup_packet

log = logging.getLogger("pgmux.cancel")

CANCEL_REQUEST_LENGTH = 16  # Int32 length, Int32 code, Int32 pid, Int32 key


def worker_socket_path(worker_dir: str, index: int) -> str:
    """Worker ``index``'s private socket, which takes CancelRequests from other workers."""
    return f"{worker_dir}/cancel-{index}.sock"


def route_cancel(registry: Registry, request: CancelRequest, source: object) -> None:
    """A CancelRequest from a client (``source``, for the log): cancel the query here, or
    pass the request to the worker whose client it is for."""
    owner = request.pid % registry.config.workers
    if owner == registry.worker:
        cancel_query(registry, request, source)
    else:
        _pass_to_worker(registry, owner, request, source)


def cancel_query(registry: Registry, request: CancelRequest, source: object) -> None:
    """Cancel the running query of the client this worker gave ``request``'s key, if
    that client runs one; any other request is ignored, as PostgreSQL does."""
    target = registry.cancel_keys.get(request.pid)
    if target is None or not hmac.compare_digest(
        target.cancel_key.to_bytes(4, "big"), request.key.to_bytes(4, "big")
    ):
        log.debug("%s: cancel request with an unknown key ignored", source)
        return
    server = target.server
    if server is not None and server.state is ServerState.ACTIVE:
        log.info("%s: forwarding cancel request to %s", target, server)
        server.forward_cancel()
    elif target.state is ClientState.WAITING:
        target.cancel_wait()
    elif target.state is ClientState.ADMIN and target.admin is not None:
        target.admin.cancel()  # a console command that waits (PAUSE) stops waiting


def _pass_to_worker(registry: Registry, owner: int, request: CancelRequest, source: object) -> None:
    path = worker_socket_path(registry.worker_dir, owner)
    packet = messages.cancel_request(request.pid, request.key)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            # Neither call can block the event loop: a unix stream connect completes at
            # once or fails (EAGAIN when the other worker's accept queue is full), and
            # 16 bytes fit in a new socket's empty send buffer. So no task is needed.
            sock.setblocking(False)
            sock.connect(path)
            sent = sock.send(packet)
    except OSError as exc:
        log.warning(
            "%s: cancel request for worker %d lost: cannot reach %s: %s",
            source,
            owner,
            path,
            exc.strerror or exc,
        )
        return
    if sent != len(packet):
        log.warning("%s: cancel request for worker %d lost: short write", source, owner)
        return
    log.debug("%s: cancel request passed to worker %d", source, owner)


class CancelListener(asyncio.Protocol):
    """One connection on a worker's private socket: one CancelRequest, nothing else.

    Only processes of pgmux's own user can connect (the socket lives in the
    supervisor's 0700 directory); still, anything but exactly one CancelRequest is
    dropped unread, so the socket can never become a way in past client login.
    """

    __slots__ = ("buf", "registry", "transport")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= CANCEL_REQUEST_LENGTH:
            self._finish()

    def eof_received(self) -> bool | None:
        self._finish()
        return None

    def _finish(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        try:
            if len(self.buf) != CANCEL_REQUEST_LENGTH:
                raise ProtocolError(f"{len(self.buf)} bytes instead of a CancelRequest")
            request = parse_startup_packet(self.buf)
            if not isinstance(request, CancelRequest):
                raise ProtocolError("not a CancelRequest")
        except ProtocolError as exc:
            log.warning("worker cancel socket: %s; ignored", exc)
            return
        cancel_query(self.registry, request, "cancel request from another worker")
