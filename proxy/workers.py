"""Workers: with ``workers`` = N > 1, ``pgmux`` is a small supervisor of N processes.

Each worker is ``python -m proxy --config PATH --worker I ...`` (hidden arguments): a
whole pgmux with its own event loop, pools and clients. Workers bind the TCP port with
SO_REUSEPORT so the kernel spreads new connections over them. The supervisor binds the
unix socket once and hands it down, forwards SIGTERM/SIGINT (and SIGHUP, SIGUSR1,
SIGUSR2), restarts a worker that dies (with backoff), and exits when every worker has.
It also serves /metrics and logs the stats line for the whole instance, from the
workers' snapshots (peers.py). It never forks a running event loop: workers are fresh
interpreters. A socketpair per worker carries "ready" (and "stopping", after a
console SHUTDOWN) up and, by closing, tells a worker that its supervisor is gone, so
no worker outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from . import sd_notify
from .config import Config, ConfigError, worker_share_warnings
from .config_sources import ENV_WORKER_SOURCE, ConfigSource
from .metrics import MetricsServer
from .peers import gather_snapshots
from .snapshot import NoSnapshot, Snapshot, merge
from .stats_log import run_stats_log

log = logging.getLogger("pgmux.workers")

READY = b"R"  # a worker's first message to its supervisor: listening
STOPPING = b"Q"  # ... and maybe a second: SHUTDOWN from the console, do not restart me
FIRST_RESTART_DELAY = 0.5  # seconds; doubles per quick death, up to the maximum
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 60.0  # a worker that ran this long restarts at the first delay again


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """What a worker is told by its supervisor (on its command line)."""

    index: int  # 0 .. count-1
    count: int  # the supervisor's workers, whatever the config file says by now
    directory: str  # the supervisor's private 0700 directory (cancel sockets)
    control_fd: int  # this worker's end of its socketpair with the supervisor
    unix_fd: int | None  # the listening unix socket, when unix_socket_dir is set


class SupervisorLink(asyncio.Protocol):
    """A worker's end of its socketpair: says ready once; losing it means the
    supervisor is gone (even killed with SIGKILL), and the worker shuts down."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def ready(self) -> None:
        if self.transport is not None:
            self.transport.write(READY)

    def stopping(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(STOPPING)

    def data_received(self, data: bytes) -> None:
        pass  # the supervisor says nothing; signals carry its orders

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.on_lost()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


def run_supervisor(config: Config, source: ConfigSource) -> int:
    """Run ``config.workers`` workers until a signal stops them; the exit code.

    Raises OSError when the listen port or the unix socket cannot be had.
    """
    return Supervisor(config, source).run()


class Supervisor:
    def __init__(self, config: Config, source: ConfigSource) -> None:
        self.config = config
        self.source = source
        self.count = config.workers
        self.directory = ""
        self.unix_socket: socket.socket | None = None
        self.unix_inode = 0
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.ready: set[int] = set()
        self.started = False  # every worker has been ready at least once
        self.failed = False
        self.signals = 0
        self.stopping: asyncio.Event | None = None
        self.metrics: MetricsServer | None = None

    def run(self) -> int:
        # Private: only pgmux's user may reach the workers' cancel sockets in here.
        self.directory = tempfile.mkdtemp(prefix="pgmux-")
        try:
            _check_port_free(self.config)
            if self.config.unix_socket_dir:
                self.unix_socket = _bind_unix_socket(self.config)
                self.unix_inode = os.stat(self.config.unix_socket_path()).st_ino
            for warning in worker_share_warnings(self.config):
                log.warning("%s", warning)
            return asyncio.run(self._main())
        finally:
            if self.unix_socket is not None:
                _remove_unix_socket(
                    self.config.unix_socket_path(), self.unix_inode, self.unix_socket
                )
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _main(self) -> int:
        self.stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(sig, self._pass_on, sig)
        log.info("pgmux supervisor (pid %d): starting %d workers", os.getpid(), self.count)
        config = self.config
        if config.metrics.enabled:
            metrics = self.metrics = MetricsServer(self.snapshot, self._health)
            try:
                await metrics.start(config.metrics.listen_addr, config.metrics.listen_port)
            except OSError as exc:
                log.error(
                    "cannot serve metrics on %s:%d: %s ([metrics] listen_addr/listen_port)",
                    config.metrics.listen_addr,
                    config.metrics.listen_port,
                    exc.strerror or exc,
                )
                return 1
        stats = loop.create_task(
            run_stats_log(
                self.snapshot, lambda: self.config.stats_period, lambda: self.config.log_stats
            )
        )
        try:
            await asyncio.gather(*(self._keep_running(index) for index in range(self.count)))
        finally:
            stats.cancel()
            if self.metrics is not None:
                self.metrics.close()
        log.info("pgmux stopped: all %d workers exited", self.count)
        return 1 if self.failed else 0

    async def snapshot(self) -> Snapshot:
        """The whole instance: every worker's snapshot, merged."""
        snaps, missing = await gather_snapshots(self.directory, sorted(self.ready), [])
        for line in missing:
            log.warning("%s", line)
        if not snaps:
            raise NoSnapshot("no worker is ready yet" if not missing else "; ".join(missing))
        return merge(snaps)

    def _health(self) -> list[str]:
        """Why the instance is not whole: workers not running or not ready yet."""
        return [
            f"worker {index} is not running" for index in range(self.count)
            if index not in self.ready
        ]  # fmt: skip

    def _pass_on(self, sig: int) -> None:
        """SIGHUP (reload), SIGUSR1 (pause), SIGUSR2 (resume): each worker acts itself."""
        name = signal.Signals(sig).name
        log.info("%s: passing it on to the workers", name)
        if sig == signal.SIGHUP:
            # Its own stats_period and log_stats; each worker logs why a reload failed.
            sd_notify.reloading()
            with contextlib.suppress(ConfigError):
                self.config = self.source.load().config
            sd_notify.notify("READY=1")
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def _on_signal(self, sig: int) -> None:
        assert self.stopping is not None
        name = signal.Signals(sig).name
        self.signals += 1
        if self.signals == 1:
            log.info("%s: stopping the workers (a second signal makes it immediate)", name)
        else:
            log.warning("second %s: the workers stop now", name)
        self.stopping.set()
        sd_notify.notify("STOPPING=1")
        # Each signal is passed on, so a second one is a second one for the workers too.
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    async def _keep_running(self, index: int) -> None:
        """Worker ``index``, restarted whenever it dies until pgmux stops."""
        stopping = self.stopping
        assert stopping is not None
        quick_deaths = 0
        while not stopping.is_set():
            started = time.monotonic()
            proc, link = await self._spawn(index)
            try:
                self.procs[index] = proc
                if stopping.is_set():  # the signal came while it was being started
                    proc.send_signal(signal.SIGTERM)
                log.info("worker %d started (pid %d)", index, proc.pid)
                # READY once it listens; nothing (EOF) if it died first.
                loop = asyncio.get_running_loop()
                watch = None
                if await loop.sock_recv(link, 1) == READY:
                    self._worker_ready(index, proc.pid)
                    watch = loop.create_task(self._watch_link(index, link))
                code = await proc.wait()
                if watch is not None:
                    watch.cancel()
            finally:
                link.close()
                self.procs.pop(index, None)
                self.ready.discard(index)
            how = _describe_exit(code)
            if stopping.is_set():
                log.info("worker %d (pid %d) %s", index, proc.pid, how)
                return
            if not self.started:
                log.error("worker %d (pid %d) %s while starting; stopping", index, proc.pid, how)
                self.failed = True
                self._on_signal(signal.SIGTERM)
                return
            ran = time.monotonic() - started
            quick_deaths = 1 if ran >= STABLE_AFTER else quick_deaths + 1
            delay = min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2 ** (quick_deaths - 1))
            log.error(
                "worker %d (pid %d) %s after %.1f s; restarting it in %g s",
                index,
                proc.pid,
                how,
                ran,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)

    async def _spawn(self, index: int) -> tuple[asyncio.subprocess.Process, socket.socket]:
        link, child_end = socket.socketpair()
        link.setblocking(False)
        pass_fds = [child_end.fileno()]
        argv = [
            sys.executable, "-m", "proxy",
            "--worker", str(index), "--worker-count", str(self.count),
            "--worker-dir", self.directory, "--worker-control-fd", str(child_end.fileno()),
        ]  # fmt: skip
        if self.source.file is not None:
            # For ps only (the worker reads its sources from the environment): which
            # pgmux a worker belongs to. A file name is no secret; an --upstream URL is.
            argv += ["--config", self.source.file]
        if self.unix_socket is not None:
            pass_fds.append(self.unix_socket.fileno())
            argv += ["--worker-unix-fd", str(self.unix_socket.fileno())]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                env=self._worker_env(),
                pass_fds=pass_fds,
                # Its own process group: a Ctrl-C in a terminal reaches the supervisor
                # only, which passes it on once (twice would mean "immediately").
                process_group=0,
            )
        except BaseException:
            link.close()
            raise
        finally:
            child_end.close()
        return proc, link

    def _worker_env(self) -> dict[str, str]:
        """The sources go to workers in the environment (argv shows in ps); only the
        supervisor, the main PID, talks to systemd."""
        env = dict(os.environ)
        env[ENV_WORKER_SOURCE] = self.source.to_json()
        env.pop("NOTIFY_SOCKET", None)
        return env

    async def _watch_link(self, index: int, link: socket.socket) -> None:
        """After READY a worker says STOPPING only after a console SHUTDOWN: every
        worker runs it, and none is restarted."""
        stopping = self.stopping
        assert stopping is not None
        while await asyncio.get_running_loop().sock_recv(link, 1) == STOPPING:
            if not stopping.is_set():
                log.info("worker %d: SHUTDOWN from the admin console; stopping", index)
                stopping.set()

    def _worker_ready(self, index: int, pid: int) -> None:
        self.ready.add(index)
        log.info("worker %d (pid %d) ready", index, pid)
        if len(self.ready) == self.count:
            if not self.started:
                sd_notify.notify("READY=1", f"STATUS={self.count} workers ready")
            self.started = True
            log.info("all %d workers ready", self.count)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
    return f"exited with code {code}"


def _listen_hosts(config: Config) -> list[str | None]:
    hosts = [h.strip() for h in config.listen_addr.split(",") if h.strip()]
    return [None if host == "*" else host for host in hosts]


def _check_port_free(config: Config) -> None:
    """Bind the TCP addresses once without SO_REUSEPORT, and let go.

    The workers bind with SO_REUSEPORT, which lets any process of the same user join
    the port: a second pgmux started by mistake would quietly share the first one's
    connections. A plain bind fails (EADDRINUSE) while anything listens there.
    """
    for host in _listen_hosts(config):
        infos = socket.getaddrinfo(
            host, config.listen_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:
                continue  # a family this host lacks (IPv6); asyncio skips it too
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)


def _bind_unix_socket(config: Config) -> socket.socket:
    """The unix socket, bound and listening, for all workers to accept on.

    SO_REUSEPORT does nothing for unix sockets: a path is bound once, and a worker that
    unlinked it and bound again would take it from the others. So the supervisor binds
    it and every worker accepts on this one listening socket; each connection goes to
    whichever worker accepts it first (served, though not balanced like the TCP port).
    """
    path = config.unix_socket_path()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left behind by a previous run that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, config.unix_socket_mode)  # who may connect (PgBouncer: 0777)
        sock.listen(config.listen_backlog)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{exc.strerror} (unix socket {path})") from None
    return sock


def _remove_unix_socket(path: str, inode: int, sock: socket.socket) -> None:
    """Unlink the socket file, unless another process has bound that path since."""
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    sock.close()
