"""``pgmux demo``: the problem and its fix, measured on this machine in a few seconds.

Starts a throwaway PostgreSQL with a small max_connections and pgmux in front of it,
then runs the same burst of concurrent clients straight at PostgreSQL and through
pgmux, and prints what happened to each. Needs only PostgreSQL's server binaries.
A top-level command like ``__main__``: nothing in the package imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .demo_pg import (
    DEMO_DB,
    DEMO_USER,
    SUPERUSER_RESERVED,
    Cluster,
    Connection,
    DemoError,
    ServerError,
    find_bindir,
    free_port,
    server_version,
)
from .protocol.errors import ProtocolError
from .toml_out import to_toml

DIRECT, POOLED = "direct to PostgreSQL", "through pgmux"
SAMPLE_INTERVAL = 0.05
# Client backends other than the sampler's own: what max_connections limits.
COUNT_BACKENDS = (
    "SELECT count(*) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
# pgmux's ERROR lines, and the last line of a traceback ("RecursionError: ...").
_LOG_ERROR = re.compile(r" (ERROR|CRITICAL) |^\w+(Error|Exception): ")


class _Terminated(BaseException):
    """SIGTERM arrived outside the event loop; unwinds like KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _status(text: str) -> None:
    print(f"pgmux demo: {text}", file=sys.stderr, flush=True)


# -- pgmux ----------------------------------------------------------------------------------


@dataclass
class Pgmux:
    """pgmux as a child process in a session of its own, logging to a file."""

    work: Path
    port: int
    pool_size: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.work / "pgmux.log"

    def start(self, pg_port: int, clients: int, timeout: float) -> None:
        config = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "pool_mode": "transaction",
            "default_pool_size": self.pool_size,
            "max_client_conn": clients + 100,
            "query_wait_timeout": timeout,
            "shutdown_timeout": 1,
            # A throwaway local demo: the same trust the demo cluster gives its role.
            "auth_type": "trust",
            "server_tls_sslmode": "disable",
            "log_connections": False,
            "log_disconnections": False,
            "log_stats": False,
            "metrics": {"enabled": False},
            "databases": {DEMO_DB: {"host": "127.0.0.1", "port": pg_port}},
        }
        config_path = self.work / "pgmux.toml"
        config_path.write_text(to_toml(config))
        # python -m proxy finds this package whether it is installed or a checkout.
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "--config", str(config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )  # fmt: skip

    async def wait_listening(self, timeout: float = 30) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise DemoError(f"pgmux exited while starting; {self.log_path}:\n{self.log_tail()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if loop.time() > deadline:
                    raise DemoError(f"pgmux did not listen within {timeout:g} s") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_excerpt(self) -> str:
        """The first errors (and the exceptions that ended tracebacks), then the tail:
        a burst of failures repeats one line hundreds of times after the cause."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [line for line in lines if _LOG_ERROR.search(line)][:10]
        return "\n".join([*errors, "...", *lines[-5:]]) if errors else "\n".join(lines[-15:])

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 5 s. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None


# -- one phase: N clients at once -------------------------------------------------------------


@dataclass
class PhaseResult:
    label: str
    clients: int
    latencies: list[float] = field(default_factory=list)  # seconds, succeeded clients
    errors: Counter[str] = field(default_factory=Counter)
    peak: int | None = None
    sampler_error: str | None = None
    wall: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


class Progress:
    """A bar redrawn in place on a terminal; a line at start and end otherwise.

    The bar counts queries answered (a failed client's are all counted at once), so it
    moves while pgmux interleaves every client's queries and no client has finished.
    """

    def __init__(self, label: str, total: int, queries: int, stream: TextIO) -> None:
        self.label, self.total, self.queries, self.stream = label, total, queries, stream
        self.done = self.failed = self.steps = 0
        self.tty = stream.isatty()
        if not self.tty:
            print(f"{label}: {total} clients at once ...", file=stream, flush=True)

    def draw(self) -> None:
        if self.tty:
            width = 30
            filled = width * self.steps // max(self.total * self.queries, 1)
            bar = "#" * filled + "." * (width - filled)
            digits = len(str(self.total))
            self.stream.write(
                f"\r{self.label:<21} [{bar}] {self.done:>{digits}}/{self.total} clients done"
                f"  errors {self.failed}"
            )
            self.stream.flush()

    def finish(self, wall: float) -> None:
        if self.tty:
            self.draw()
            self.stream.write(f"  {wall:.1f} s\n")
            self.stream.flush()
        else:
            print(
                f"{self.label}: {self.done}/{self.total} done, {self.failed} failed, {wall:.1f} s",
                file=self.stream,
                flush=True,
            )


def _error_key(exc: Exception, timeout: float) -> str:
    if isinstance(exc, ServerError):
        return f"{exc.sqlstate} {exc.text}"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, ProtocolError):
        return f"protocol error: {exc}"
    return f"{type(exc).__name__}: {exc}"


async def _one_client(
    port: int, args: argparse.Namespace, result: PhaseResult, progress: Progress
) -> None:
    """Connect, run the query ``args.queries`` times, disconnect; record the outcome."""
    start = time.perf_counter()
    conn: Connection | None = None
    answered = 0
    try:
        async with asyncio.timeout(args.timeout):
            conn = await Connection.open(DEMO_USER, DEMO_DB, port=port)
            while answered < args.queries:
                await conn.query(args.query)
                answered += 1
                progress.steps += 1
        latency = time.perf_counter() - start
    except Exception as exc:  # whatever went wrong, it is this client's outcome
        result.errors[_error_key(exc, args.timeout)] += 1
        progress.failed += 1
        progress.steps += args.queries - answered
        if conn is not None:
            conn.abort()
    else:
        result.latencies.append(latency)
        assert conn is not None
        conn.close()
    progress.done += 1


async def _sample_peak(su: Connection, stop: asyncio.Event, result: PhaseResult) -> None:
    peak = 0
    try:
        while True:
            rows = await su.query(COUNT_BACKENDS)
            peak = max(peak, int(rows[0][0] or b"0"))
            result.peak = peak
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)
    except (ServerError, OSError, ProtocolError, ValueError) as exc:
        result.sampler_error = str(exc)


async def _redraw(progress: Progress) -> None:
    while True:
        progress.draw()
        await asyncio.sleep(0.1)


async def run_phase(label: str, port: int, args: argparse.Namespace, su: Connection) -> PhaseResult:
    result = PhaseResult(label, args.clients)
    progress = Progress(label, args.clients, args.queries, sys.stderr)
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_peak(su, stop, result))
    redraw = asyncio.create_task(_redraw(progress))
    start = time.perf_counter()
    try:
        await asyncio.gather(
            *(_one_client(port, args, result, progress) for _ in range(args.clients))
        )
        result.wall = time.perf_counter() - start
        stop.set()
        await sampler
    finally:
        redraw.cancel()
        sampler.cancel()
    progress.finish(result.wall)
    return result


async def wait_no_backends(su: Connection, timeout: float = 10) -> None:
    """Until the last phase's backends have exited, so the next phase starts clean."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            rows = await su.query(COUNT_BACKENDS)
        except (ServerError, OSError, ProtocolError):
            return  # the sampler's failure shows in the next phase's table
        if int(rows[0][0] or b"0") == 0:
            return
        await asyncio.sleep(SAMPLE_INTERVAL)


# -- the report ---------------------------------------------------------------------------


def _percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:,.0f} ms"


def render_table(direct: PhaseResult, pooled: PhaseResult, label_width: int = 44) -> str:
    rows: list[tuple[str, str, str]] = [
        ("clients", str(direct.clients), str(pooled.clients)),
        ("succeeded", str(len(direct.latencies)), str(len(pooled.latencies))),
        ("failed", str(direct.failed), str(pooled.failed)),
    ]
    for key, _ in (direct.errors + pooled.errors).most_common():
        # Long messages wrap under themselves: the whole text, never cut.
        first, *more = textwrap.wrap(key, label_width - 2, subsequent_indent="      ")
        rows.append((f"  {first}", str(direct.errors[key]), str(pooled.errors[key])))
        rows += [(f"  {line}", "", "") for line in more]
    for name, p in (("latency p50", 50), ("latency p99", 99)):
        rows.append(
            (name, _ms(_percentile(direct.latencies, p)), _ms(_percentile(pooled.latencies, p)))
        )
    rows.append(("latency max", _ms(max(direct.latencies, default=None)),
                 _ms(max(pooled.latencies, default=None))))  # fmt: skip
    rows.append(
        ("peak server connections", _peak(direct), _peak(pooled)),
    )
    rows.append(("wall time", f"{direct.wall:.1f} s", f"{pooled.wall:.1f} s"))
    width = max(len(label) for label, _, _ in rows)
    lines = [f"{'':<{width}}  {DIRECT:>20}  {POOLED:>14}"]
    lines += [f"{label:<{width}}  {a:>20}  {b:>14}".rstrip() for label, a, b in rows]
    return "\n".join(lines)


def _peak(result: PhaseResult) -> str:
    if result.sampler_error is not None:
        return "?"
    return "-" if result.peak is None else str(result.peak)


def explain(direct: PhaseResult, pooled: PhaseResult, args: argparse.Namespace) -> str:
    lines = [
        f"latency: per succeeded client, from connect to the answer to its last query "
        f"(login + {args.queries} x {args.query}).",
        f"peak server connections: client backends in pg_stat_activity, sampled every "
        f"{SAMPLE_INTERVAL * 1000:.0f} ms.",
        "",
    ]
    limit = (
        f"PostgreSQL admits max_connections = {args.max_connections} sessions, "
        f"{SUPERUSER_RESERVED} of them reserved for superusers"
    )
    if direct.failed:
        lines.append(f"Direct: {limit}, so {direct.failed} of {direct.clients} clients were "
                     "refused.")  # fmt: skip
    else:
        lines.append(f"Direct: {limit}; none was refused here (try more --clients).")
    through = (
        f"Through pgmux: {len(pooled.latencies)} of {pooled.clients} clients succeeded on "
        f"at most {_peak(pooled)} server connections"
    )
    if pooled.failed:
        lines.append(f"{through}; {pooled.failed} failed: see the errors above, and "
                     "pgmux's log on stderr.")  # fmt: skip
    else:
        lines.append(
            f"{through}: pgmux answered every login itself and queued the clients' "
            f"transactions onto a pool of {args.pool_size}. Its latency is mostly that "
            f"queue: every client's work got done, {args.pool_size} transactions at a "
            "time, instead of being refused."
        )
    for result in (direct, pooled):
        if result.sampler_error is not None:
            lines.append(f"peak ({result.label}): the sampler failed: {result.sampler_error}")
    return "\n".join(textwrap.fill(line, 88) if line else "" for line in lines)


# -- the command --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgmux demo",
        description="Start a throwaway PostgreSQL with a small max_connections and pgmux in "
        "front of it; run the same burst of clients straight at PostgreSQL and through "
        "pgmux; print what happened. Needs only PostgreSQL's server binaries.",
    )
    add = parser.add_argument
    add("--clients", type=int, default=500, help="concurrent clients per phase (500)")
    add("--max-connections", type=int, default=20, help="PostgreSQL's max_connections (20)")
    add("--pool-size", type=int, help="pgmux's pool_size (default: max-connections / 2)")
    add("--query", default="SELECT pg_sleep(0.05)", help="what each client runs")
    add("--queries", type=int, default=3, help="times each client runs it (3)")
    add("--timeout", type=float, default=60, help="seconds one client may take (60)")
    add("--pg-bin", help="directory holding initdb and postgres (default: $PGMUX_PG_BIN, "
        "pg_config --bindir, or the newest /usr/lib/postgresql/*/bin)")  # fmt: skip
    add("--keep", action="store_true", help="keep the work directory (configs, logs)")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_connections < SUPERUSER_RESERVED + 2:
        parser.error(f"--max-connections must be at least {SUPERUSER_RESERVED + 2}")
    if args.pool_size is None:
        args.pool_size = max(1, args.max_connections // 2)
    for name in ("clients", "pool_size", "queries"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    # Non-superusers get max_connections - reserved slots, and the sampler takes one.
    room = args.max_connections - SUPERUSER_RESERVED - 1
    if args.pool_size > room:
        _status(f"note: --pool-size {args.pool_size} is more than the {room} connections "
                "PostgreSQL leaves for it: pgmux will meet the limit too")  # fmt: skip


def _raise_fd_limit(needed: int) -> None:
    """Each client is a socket here and in pgmux; the children inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        _status(f"note: open files are limited to {hard}; some clients may fail for it")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@dataclass
class _Run:
    args: argparse.Namespace
    cluster: Cluster
    pgmux: Pgmux
    terminated: bool = False

    def on_sigterm(self, task: asyncio.Task[int]) -> None:
        self.terminated = True
        task.cancel()

    async def main(self) -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.on_sigterm, task)
        args, cluster, pgmux = self.args, self.cluster, self.pgmux
        su = await cluster.connect_superuser()
        try:
            await su.query(f"CREATE ROLE {DEMO_USER} LOGIN")
            await su.query(f"CREATE DATABASE {DEMO_DB} OWNER {DEMO_USER}")
            _status(f"PostgreSQL {server_version(su)} on 127.0.0.1:{cluster.port}, "
                    f"max_connections = {args.max_connections}")  # fmt: skip
            await pgmux.wait_listening()
            _status(f"pgmux on 127.0.0.1:{pgmux.port}, transaction pooling, "
                    f"pool_size = {args.pool_size}")  # fmt: skip
            _status(f"each client: connect, {args.queries} x {args.query}, disconnect")
            direct = await run_phase(DIRECT, cluster.port, args, su)
            await wait_no_backends(su)
            pooled = await run_phase(POOLED, pgmux.port, args, su)
        finally:
            su.abort()
        print()
        print(render_table(direct, pooled))
        print()
        print(explain(direct, pooled, args), flush=True)
        if pooled.failed:
            _status(f"from pgmux's log ({'kept' if args.keep else 'removed at exit'}: "
                    f"{pgmux.log_path}):\n{pgmux.log_excerpt()}")  # fmt: skip
            return 1
        return 0


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        bindir = find_bindir(args.pg_bin)
    except DemoError as exc:
        _status(str(exc))
        return 1
    _raise_fd_limit(args.clients + 200)
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    work: Path | None = None
    cluster: Cluster | None = None
    pgmux: Pgmux | None = None
    try:
        work = Path(tempfile.mkdtemp(prefix="pgmux-demo-"))
        os.chmod(work, 0o711)  # the cluster's OS user must reach work/pg
        _status(f"working in {work}")
        cluster = Cluster(bindir, work / "pg", free_port(), args.max_connections, work.name)
        cluster.initdb()
        cluster.start()
        pgmux = Pgmux(work, _other_free_port(cluster.port), args.pool_size)
        pgmux.start(cluster.port, args.clients, args.timeout)
        run = _Run(args, cluster, pgmux)
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                return runner.run(run.main())
        except asyncio.CancelledError:
            if run.terminated:
                raise _Terminated from None
            raise
    except DemoError as exc:
        _status(str(exc))
        return 1
    except KeyboardInterrupt:
        _status("interrupted; cleaning up")
        return EXIT_INTERRUPTED
    except _Terminated:
        _status("terminated; cleaning up")
        return EXIT_TERMINATED
    finally:
        # Cleanup runs to the end: every step is bounded by a timeout.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            _cleanup(work, cluster, pgmux, keep=args.keep)
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)


def _other_free_port(taken: int) -> int:
    port = free_port()
    while port == taken:
        port = free_port()
    return port


def _cleanup(
    work: Path | None, cluster: Cluster | None, pgmux: Pgmux | None, *, keep: bool
) -> None:
    with contextlib.ExitStack() as steps:  # each step runs even if an earlier one raises
        if work is not None:
            if keep:
                steps.callback(_status, f"kept {work}")
            else:
                steps.callback(shutil.rmtree, work, ignore_errors=True)
        if cluster is not None:
            steps.callback(cluster.stop)
        if pgmux is not None:
            steps.callback(pgmux.stop)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
