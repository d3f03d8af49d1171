"""The running proxy: listeners, the registry of pools and clients, signals, reload,
shutdown.

Lifecycle as in uvicorn: ``startup`` opens the listeners, ``main_loop`` waits for a
signal, ``shutdown`` stops accepting, closes idle clients, lets transactions in
flight finish up to shutdown_timeout, then closes everything. A second signal makes
the shutdown immediate. SIGHUP (or RELOAD) re-reads the config file; SIGUSR1 and
SIGUSR2 are PAUSE and RESUME, as in PgBouncer. With ``workers`` > 1 each worker
process runs one App (``WorkerSlot`` says which) under the supervisor in workers.py,
which serves /metrics and logs the stats line for all of them; a lone App does both.
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

from . import sd_notify
from .admin import AdminSession
from .auth_query import AuthQuery
from .cancel import CancelListener, worker_socket_path
from .client import ClientConnection
from .config import RESTART_KEYS, Config, ConfigError, config_items
from .config_sources import ConfigSource
from .control import Cancelled, LocalControl
from .errors import ShuttingDown
from .janitor import run_janitor
from .logs import reconfigure_logging
from .metrics import MetricsServer
from .peers import Console, PeerListener, peer_socket_path
from .pool import ClientState, Registry
from .protocol.stream import SCANNER
from .server import open_server
from .snapshot import Snapshot
from .sockets import apply_tcp_options, tcp_options
from .stats_log import run_stats_log
from .tls import channel_binding_hash, client_facing_context, server_facing_context
from .workers import SupervisorLink, WorkerSlot

log = logging.getLogger("pgmux")


class StartupError(Exception):
    """pgmux cannot start; the message says why and which setting to change."""


class App:
    def __init__(
        self, config: Config, worker: WorkerSlot | None = None, source: ConfigSource | None = None
    ) -> None:
        if worker is not None:
            # The supervisor's count rules: pids and shares must agree between workers
            # even if the file was edited before this worker was (re)started.
            config = dataclasses.replace(config, workers=worker.count)
        self.config = config
        self.worker = worker
        # What a reload reads again: the file, --upstream, PGMUX_* and --set.
        self.source = source if source is not None else ConfigSource(file=config.path)
        self.registry: Registry | None = None
        self.listeners: list[asyncio.Server] = []
        self.cancel_listener: asyncio.Server | None = None
        self.peer_listener: asyncio.Server | None = None
        self.metrics: MetricsServer | None = None
        self.console: Console | None = None
        self.link: SupervisorLink | None = None
        self._orphaned = False  # the supervisor died (it cannot clean up after us)
        self._stop = asyncio.Event()
        self._force = False
        # How shutdown treats clients: wait_for_servers (signals: transactions in flight
        # finish), wait_for_clients (every client leaves on its own), or "" (at once).
        self._shutdown_mode = "wait_for_servers"
        self._tasks: list[asyncio.Task[None]] = []

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
        control = LocalControl(registry, self)
        console = self.console = Console(registry, control)
        registry.open_admin = lambda client: AdminSession(client, console)
        registry.auth_query = AuthQuery(registry)
        if worker is not None:
            # Before any client can get a key: CancelRequests passed on by other workers,
            # and the other workers' (and the supervisor's) snapshot and control requests.
            path = worker_socket_path(worker.directory, worker.index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # this worker's predecessor, if it died
            self.cancel_listener = await loop.create_unix_server(
                lambda: CancelListener(registry), path, backlog=config.listen_backlog
            )
            path = peer_socket_path(worker.directory, worker.index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.peer_listener = await loop.create_unix_server(
                lambda: PeerListener(registry, control), path, backlog=config.listen_backlog
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
            self.listeners.append(listener)
        self._tune_listeners(config)
        if worker is None and config.metrics.enabled:
            # With workers the supervisor serves /metrics for all of them.
            metrics = self.metrics = MetricsServer(self._snapshot)
            try:
                await metrics.start(config.metrics.listen_addr, config.metrics.listen_port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {config.metrics.listen_addr}:"
                    f"{config.metrics.listen_port}: {exc.strerror or exc} ([metrics] "
                    "listen_addr/listen_port, or enabled = false)"
                ) from None
        registry.listening = True
        addresses = ", ".join(
            _format_addr(sock.getsockname()) for lst in self.listeners for sock in lst.sockets
        )
        log.info(
            "pgmux listening on %s (pool_mode=%s, databases: %s; %s stream scanner%s)",
            addresses,
            config.pool_mode,
            ", ".join(sorted(config.databases)),
            SCANNER,
            f"; metrics on {config.metrics.listen_addr}:{config.metrics.listen_port}"
            if self.metrics is not None
            else "",
        )
        self._tasks.append(loop.create_task(run_janitor(registry)))
        if worker is None:
            self._tasks.append(
                loop.create_task(
                    run_stats_log(
                        self._snapshot,
                        lambda: registry.config.stats_period,
                        lambda: registry.config.log_stats,
                    )
                )
            )
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        for sig, handler in (
            (signal.SIGHUP, self._on_sighup),
            (signal.SIGUSR1, lambda: self._signal_command("pause")),
            (signal.SIGUSR2, lambda: self._signal_command("resume")),
        ):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, handler)
        if worker is not None:
            link = self.link = SupervisorLink(self._supervisor_gone)
            await loop.connect_accepted_socket(
                lambda: link, socket.socket(fileno=worker.control_fd)
            )
            link.ready()
        sd_notify.notify("READY=1", f"STATUS=listening on {addresses}")

    async def _snapshot(self) -> Snapshot:
        assert self.console is not None
        answer = await self.console.snapshot([])
        assert answer.snapshot is not None
        return answer.snapshot

    # -- reload (Lifecycle, for the admin console; SIGHUP) ---------------------------------

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading %s", self.source.name)
        with contextlib.suppress(ConfigError):  # logged by reload(); the old one runs on
            self.reload()

    def _signal_command(self, command: str) -> None:
        """SIGUSR1 / SIGUSR2: PAUSE / RESUME of everything, as in PgBouncer."""
        assert self.console is not None
        log.info("%s: %s", "SIGUSR1" if command == "pause" else "SIGUSR2", command.upper())
        task = asyncio.get_running_loop().create_task(
            self.console.control.run(command, None, asyncio.Event())
        )
        task.add_done_callback(_log_command_result)

    def reload(self) -> list[str]:
        """Re-read every config source; on any error the running config stays (raised)."""
        path = self.source.name
        sd_notify.reloading()
        try:
            config = self.source.load().config
            client_facing_context(config)  # a bad certificate or key fails the reload
            server_facing_context(config)
        except ConfigError as exc:
            log.error("reload of %s failed, keeping the running configuration: %s", path, exc)
            sd_notify.notify("READY=1", f"STATUS=reload failed: {exc}")
            raise
        changes = self.apply_config(config)
        sd_notify.notify("READY=1", "STATUS=reloaded")
        log.info("reloaded %s: %s", path, "; ".join(changes) if changes else "nothing changed")
        return changes

    def apply_config(self, config: Config) -> list[str]:
        """Run with ``config`` from now on, except what needs a restart (kept, logged)."""
        registry = self.registry
        assert registry is not None
        old = self.config
        changes = []
        keep: dict[str, object] = {"workers": old.workers}
        for item in config_items():
            if item.key in RESTART_KEYS and item.value(config) != item.value(old):
                log.warning(
                    "%s changed to %s in %s: restart pgmux for it to take effect",
                    item.key,
                    item.shown(config),
                    config.path,
                )
                top = item.path[0]
                keep[top] = getattr(old, top)
        config = dataclasses.replace(config, **keep)  # type: ignore[arg-type]
        for item in config_items():
            if item.key not in RESTART_KEYS and item.value(config) != item.value(old):
                changes.append(f"{item.key} {item.shown(old)} -> {item.shown(config)}")
        server_tls_changed = config.server_tls != old.server_tls
        if config.client_tls != old.client_tls:
            registry.client_tls = client_facing_context(config)
            registry.client_tls_cert_hash = channel_binding_hash(config)
        if server_tls_changed:
            registry.server_tls = server_facing_context(config)
        added = sorted(set(config.databases) - set(old.databases))
        removed = sorted(set(old.databases) - set(config.databases))
        if added:
            changes.append(f"databases added: {', '.join(added)}")
        if removed:
            changes.append(f"databases removed (their clients stay): {', '.join(removed)}")
        if config.users != old.users or config.auth_file_users != old.auth_file_users:
            changes.append("users changed")
        self.config = config
        self._tune_listeners(config)
        changes += registry.apply_config(config, server_tls_changed=server_tls_changed)
        reconfigure_logging(config, self.worker.index if self.worker is not None else None)
        return changes

    def _tune_listeners(self, config: Config) -> None:
        """Accepted connections inherit the TCP options of the listening socket: set
        once here (and again on reload), not with a syscall per client."""
        options = tcp_options(config)
        for listener in self.listeners:
            for sock in listener.sockets:
                apply_tcp_options(sock, options)

    def shutdown_requested(self, mode: str) -> None:
        """SHUTDOWN from the console: "" now, wait_for_servers, or wait_for_clients."""
        self._shutdown_mode = mode
        self._force = mode == ""
        log.info("SHUTDOWN %s from the admin console", mode.upper() or "(immediate)")
        if self.link is not None:
            self.link.stopping()  # the supervisor must not restart us
        self._stop.set()

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
        sd_notify.notify("STOPPING=1")
        for listener in self.listeners:
            listener.close()
        # /metrics stays up until the end: /readyz answers 503 "shutting down" while
        # transactions drain (a load balancer stops sending), /healthz still 200.
        error = ShuttingDown("pooler is shutting down; reconnect to another instance")
        deadline = time.monotonic() + self.config.shutdown_timeout
        if self._shutdown_mode == "wait_for_clients" and not self._force:
            log.info("waiting for %d clients to disconnect (WAIT_FOR_CLIENTS)",
                     len(registry.clients))  # fmt: skip
            registry.serving_until_clients_leave = True  # their requests still run
            while registry.clients and not self._force:
                await asyncio.sleep(0.05)
            registry.serving_until_clients_leave = False
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
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for listener in self.listeners:
            await listener.wait_closed()
        await asyncio.sleep(0)  # let the transports flush their goodbyes
        if self.cancel_listener is not None and self.worker is not None:
            # Kept open until now: clients finishing their transaction could be cancelled.
            self.cancel_listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(worker_socket_path(self.worker.directory, self.worker.index))
        if self.peer_listener is not None and self.worker is not None:
            self.peer_listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(peer_socket_path(self.worker.directory, self.worker.index))
            if self._orphaned:
                with contextlib.suppress(OSError):
                    os.rmdir(self.worker.directory)  # the last worker out succeeds
        if self.link is not None:
            self.link.close()
        if self.metrics is not None:
            self.metrics.close()
        log.info("pgmux stopped")


def _log_command_result(task: asyncio.Task[str]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, Cancelled):
        log.warning("%s", getattr(exc, "message", exc))


def _format_addr(sockname: object) -> str:
    if isinstance(sockname, tuple):
        host, port = sockname[0], sockname[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockname)
