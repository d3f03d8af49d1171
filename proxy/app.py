"""The running proxy: listeners, the registry of pools and clients, signals, shutdown.

Lifecycle as in uvicorn: ``startup`` opens the listeners, ``main_loop`` waits for a
signal, ``shutdown`` stops accepting, closes idle clients, lets transactions in
flight finish up to shutdown_timeout, then closes everything. A second signal makes
the shutdown immediate. With ``workers`` > 1 each worker process runs one App
(``WorkerSlot`` says which) under the supervisor in workers.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time

from .admin import AdminSession
from .auth_query import AuthQuery
from .cancel import CancelListener, worker_socket_path
from .client import ClientConnection
from .config import Config
from .errors import ShuttingDown
from .janitor import run_janitor
from .pool import ClientState, Registry
from .protocol.stream import SCANNER
from .server import open_server
from .tls import channel_binding_hash, client_facing_context, server_facing_context
from .workers import SupervisorLink, WorkerSlot

log = logging.getLogger("pgmux")


class App:
    def __init__(self, config: Config, worker: WorkerSlot | None = None) -> None:
        if worker is not None:
            # The supervisor's count rules: pids and shares must agree between workers
            # even if the file was edited before this worker was (re)started.
            config = dataclasses.replace(config, workers=worker.count)
        self.config = config
        self.worker = worker
        self.registry: Registry | None = None
        self.listeners: list[asyncio.Server] = []
        self.cancel_listener: asyncio.Server | None = None
        self.link: SupervisorLink | None = None
        self._orphaned = False  # the supervisor died (it cannot clean up after us)
        self._stop = asyncio.Event()
        self._force = False
        self._janitor: asyncio.Task[None] | None = None

    async def run(self) -> None:
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        worker = self.worker
        registry = self.registry = Registry(
            config,
            loop,
            client_tls=client_facing_context(config),
            server_tls=server_facing_context(config),
            client_tls_cert_hash=channel_binding_hash(config),
            worker=worker.index if worker is not None else 0,
            worker_dir=worker.directory if worker is not None else "",
        )
        registry.open_server = lambda pool: open_server(registry, pool)
        registry.open_admin = AdminSession
        registry.auth_query = AuthQuery(registry)
        if worker is not None:
            # Before any client can get a key: CancelRequests passed on by other workers.
            path = worker_socket_path(worker.directory, worker.index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # this worker's predecessor, if it died
            self.cancel_listener = await loop.create_unix_server(
                lambda: CancelListener(registry), path, backlog=config.listen_backlog
            )
        # The unix socket first: once the TCP port answers, everything is ready.
        if worker is not None and worker.unix_fd is not None:
            # Bound once by the supervisor and shared by all workers (see workers.py).
            listener = await loop.create_unix_server(
                lambda: ClientConnection(registry),
                sock=socket.socket(fileno=worker.unix_fd),
                backlog=config.listen_backlog,
            )
            self.listeners.append(listener)
        elif config.unix_socket_dir:
            path = config.unix_socket_path()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left behind by a previous run that was killed
            listener = await loop.create_unix_server(
                lambda: ClientConnection(registry), path, backlog=config.listen_backlog
            )
            os.chmod(path, config.unix_socket_mode)  # who may connect (PgBouncer: 0777)
            self.listeners.append(listener)
        hosts = [h.strip() for h in config.listen_addr.split(",") if h.strip()]
        for host in hosts:
            bind = None if host == "*" else host
            listener = await loop.create_server(
                lambda: ClientConnection(registry),
                bind,
                config.listen_port,
                backlog=config.listen_backlog,
                reuse_address=True,
                # Every worker binds the port itself; the kernel spreads connections.
                reuse_port=config.workers > 1,
            )
            if config.tcp_keepalive:
                for sock in listener.sockets:
                    # Accepted connections inherit SO_KEEPALIVE from the listening
                    # socket: set once here, not with a syscall per client.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self.listeners.append(listener)
        addresses = ", ".join(
            _format_addr(sock.getsockname()) for lst in self.listeners for sock in lst.sockets
        )
        log.info(
            "pgmux listening on %s (pool_mode=%s, databases: %s; %s stream scanner)",
            addresses,
            config.pool_mode,
            ", ".join(sorted(config.databases)),
            SCANNER,
        )
        self._janitor = loop.create_task(run_janitor(registry))
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        if worker is not None:
            link = self.link = SupervisorLink(self._supervisor_gone)
            await loop.connect_accepted_socket(
                lambda: link, socket.socket(fileno=worker.control_fd)
            )
            link.ready()

    def _supervisor_gone(self) -> None:
        if not self._stop.is_set():
            log.warning("the supervisor is gone: shutting down")
        self._orphaned = True
        self._stop.set()

    def _on_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning("second %s: shutting down now", signal.Signals(sig).name)
            self._force = True
        else:
            log.info("%s: shutting down (a second signal makes it immediate)",
                     signal.Signals(sig).name)  # fmt: skip
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    async def main_loop(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        registry = self.registry
        if registry is None:
            return
        registry.shutting_down = True
        for listener in self.listeners:
            listener.close()
        error = ShuttingDown("pooler is shutting down; reconnect to another instance")
        deadline = time.monotonic() + self.config.shutdown_timeout
        # Idle clients go now; clients in a transaction may finish it first.
        while True:
            for client in list(registry.clients):
                if client.state is not ClientState.ACTIVE or self._force:
                    client.fail(error)
            if not registry.clients or time.monotonic() >= deadline or self._force:
                break
            await asyncio.sleep(0.05)
        for client in list(registry.clients):
            client.fail(error)
        for pool in registry.iter_pools():
            for server in list(pool.servers):
                server.close("pooler is shutting down")
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        for listener in self.listeners:
            await listener.wait_closed()
        await asyncio.sleep(0)  # let the transports flush their goodbyes
        if self.cancel_listener is not None and self.worker is not None:
            # Kept open until now: clients finishing their transaction could be cancelled.
            self.cancel_listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(worker_socket_path(self.worker.directory, self.worker.index))
            if self._orphaned:
                with contextlib.suppress(OSError):
                    os.rmdir(self.worker.directory)  # the last worker out succeeds
        if self.link is not None:
            self.link.close()
        log.info("pgmux stopped")


def _format_addr(sockname: object) -> str:
    if isinstance(sockname, tuple):
        host, port = sockname[0], sockname[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockname)
