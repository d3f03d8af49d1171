#!/usr/bin/env python3
"""Open N logged-in PostgreSQL connections, hold them idle, and read the pooler's memory.

The pooler's resident memory (VmRSS of its process tree, /proc/PID/status) is read before
the connections open, once all N are logged in and idle, and again after they close; the
difference over N is the memory a pooler spends per idle client. Logins are real ones
(StartupMessage, then SCRAM-SHA-256 with ``proxy/auth/scram.py``'s client, or MD5 or
cleartext, until ReadyForQuery) over asyncio streams, at most ``--concurrency`` at a time;
the SaltedPassword is cached per salt, so when the pooler presents the same SCRAM secret
every time the client pays PBKDF2 once, not per login.

Used by ``bench/run.py`` (scenario ``idle-clients``) and on its own::

    .venv/bin/python bench/idle_clients.py --port 6432 --pid "$(pgrep -o pgbouncer)" -n 10000
    .venv/bin/python bench/idle_clients.py --port 6432 -n 100 --hold 60   # no memory readings

Each process needs a file descriptor per connection: the soft RLIMIT_NOFILE is raised as
far as needed (and the hard one too when run as root); the pooler needs as many.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.procstat import Memory, proc_tree_cpu_seconds, proc_tree_memory, raise_fd_limit  # noqa: E402
from proxy.auth.errors import AuthError  # noqa: E402
from proxy.auth.md5 import md5_response  # noqa: E402
from proxy.auth.scram import SCRAM_SHA_256, ScramClientSession  # noqa: E402
from proxy.protocol import messages  # noqa: E402
from proxy.protocol.errors import ProtocolError  # noqa: E402

_HEADER = struct.Struct("!cI")
# Authentication request codes (protocol message formats: AuthenticationOk, ...).
_AUTH_OK, _AUTH_CLEARTEXT, _AUTH_MD5 = 0, 3, 5
_AUTH_SASL, _AUTH_SASL_CONTINUE, _AUTH_SASL_FINAL = 10, 11, 12
# Nothing during a login is anywhere near this; a bigger length is a broken peer.
_MAX_LOGIN_MESSAGE = 1 << 20
# File descriptors beyond one per connection: stdio, the event loop, /proc reads.
_FD_MARGIN = 64


class LoginError(Exception):
    pass


@dataclass(frozen=True)
class LoginParams:
    host: str
    port: int
    user: str
    password: str
    dbname: str
    timeout: float


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    type_byte, length = _HEADER.unpack(await reader.readexactly(5))
    if not 4 <= length <= _MAX_LOGIN_MESSAGE:
        raise LoginError(f"bad message length {length} for type {type_byte!r}")
    return type_byte, await reader.readexactly(length - 4)


async def _login(
    params: LoginParams, cache: dict[tuple[bytes, bytes, int], bytes]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and log in; returns the open streams once the server sent ReadyForQuery."""
    reader, writer = await asyncio.open_connection(params.host, params.port)
    try:
        writer.write(
            messages.startup_message(
                {
                    "user": params.user,
                    "database": params.dbname,
                    "application_name": "pgmux-bench-idle",
                }
            )
        )
        scram: ScramClientSession | None = None
        while True:
            type_byte, body = await _read_message(reader)
            if type_byte == b"Z":
                return reader, writer
            if type_byte == b"E":
                raise LoginError(messages.error_summary(messages.parse_fields(body)))
            if type_byte != b"R":
                continue  # ParameterStatus, BackendKeyData, NoticeResponse
            code, payload = messages.parse_authentication(body)
            if code == _AUTH_OK:
                continue
            if code == _AUTH_SASL:
                mechanisms = messages.parse_sasl_mechanisms(payload)
                if SCRAM_SHA_256 not in mechanisms:
                    raise LoginError(f"server offers no {SCRAM_SHA_256}: {mechanisms}")
                scram = ScramClientSession(params.password, salted_password_cache=cache)
                writer.write(messages.sasl_initial_response(SCRAM_SHA_256, scram.client_first()))
            elif code == _AUTH_SASL_CONTINUE and scram is not None:
                writer.write(messages.sasl_response(scram.handle_server_first(payload)))
            elif code == _AUTH_SASL_FINAL and scram is not None:
                scram.verify_server_final(payload)
            elif code == _AUTH_MD5:
                writer.write(
                    messages.password_message(md5_response(params.user, params.password, payload))
                )
            elif code == _AUTH_CLEARTEXT:
                writer.write(messages.password_message(params.password.encode()))
            else:
                raise LoginError(f"unsupported authentication request {code}")
    except BaseException:
        writer.close()
        raise


@dataclass
class IdleResult:
    """What one run measured; memory in KiB, times in seconds."""

    host: str
    port: int
    pid: int | None
    requested: int
    connected: int = 0
    failed: int = 0
    first_error: str | None = None
    alive_at_measurement: int | None = None
    login_seconds: float | None = None
    logins_per_second: float | None = None
    pooler_cpu_seconds: float | None = None
    pooler_cpu_ms_per_login: float | None = None
    rss_before_kib: int | None = None
    rss_with_clients_kib: int | None = None
    rss_after_close_kib: int | None = None
    rss_per_client_kib: float | None = None
    pss_before_kib: int | None = None
    pss_with_clients_kib: int | None = None
    pss_per_client_kib: float | None = None
    processes: int | None = None
    fd_limit: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.requested > 0 and self.connected == self.requested

    def take_before(self, memory: Memory | None) -> None:
        if memory is not None:
            self.rss_before_kib, self.pss_before_kib = memory.rss_kib, memory.pss_kib

    def take_with_clients(self, memory: Memory | None) -> None:
        if memory is None:
            return
        self.rss_with_clients_kib, self.pss_with_clients_kib = memory.rss_kib, memory.pss_kib
        self.processes = memory.processes
        n = self.alive_at_measurement or 0
        if n and self.rss_before_kib is not None:
            self.rss_per_client_kib = round((memory.rss_kib - self.rss_before_kib) / n, 3)
        if n and self.pss_before_kib is not None and memory.pss_kib is not None:
            self.pss_per_client_kib = round((memory.pss_kib - self.pss_before_kib) / n, 3)


async def run_idle_clients(
    params: LoginParams,
    clients: int,
    *,
    pid: int | None = None,
    concurrency: int = 32,
    settle: float = 1.0,
    deadline: float = 600.0,
    hold: float = 0.0,
    progress: bool = False,
) -> IdleResult:
    """Log ``clients`` connections in, measure, hold for ``hold`` s, close, measure again.

    Logins stop at ``deadline`` seconds (the ones done count); a failed login is counted
    and the others go on.
    """
    result = IdleResult(params.host, params.port, pid, clients)
    result.fd_limit = raise_fd_limit(clients + _FD_MARGIN)
    if result.fd_limit < clients + _FD_MARGIN:
        result.notes.append(
            f"file descriptor limit {result.fd_limit} < {clients} clients + {_FD_MARGIN}: "
            "logins past it fail (raise `ulimit -n`)"
        )
    if pid is not None:
        result.take_before(proc_tree_memory(pid))
    cpu0 = proc_tree_cpu_seconds(pid) if pid is not None else None

    cache: dict[tuple[bytes, bytes, int], bytes] = {}
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: dict[str, int] = {}
    remaining = clients
    step = max(1, clients // 10)

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                conns.append(await asyncio.wait_for(_login(params, cache), params.timeout))
            except (OSError, EOFError, TimeoutError, LoginError, AuthError, ProtocolError) as exc:
                what = f"{type(exc).__name__}: {exc}"
                errors[what] = errors.get(what, 0) + 1
                if result.first_error is None:
                    result.first_error = what
            done = len(conns) + sum(errors.values())
            if progress and done % step == 0:
                print(f"  {done}/{clients} logins ({len(conns)} ok)", file=sys.stderr, flush=True)

    started = time.monotonic()
    workers = [asyncio.create_task(worker()) for _ in range(max(1, min(concurrency, clients)))]
    try:
        await asyncio.wait_for(asyncio.gather(*workers), deadline)
    except TimeoutError:
        result.notes.append(f"logins stopped at the {deadline:.0f} s deadline")
    login_seconds = time.monotonic() - started
    result.connected = len(conns)
    result.failed = sum(errors.values())
    result.login_seconds = round(login_seconds, 3)
    if conns and login_seconds > 0:
        result.logins_per_second = round(len(conns) / login_seconds, 1)
    if len(errors) > 1:
        result.notes.append(f"login errors: {errors}")
    cpu1 = proc_tree_cpu_seconds(pid) if pid is not None else None
    if cpu0 is not None and cpu1 is not None:
        result.pooler_cpu_seconds = round(cpu1 - cpu0, 3)
        if conns:
            result.pooler_cpu_ms_per_login = round((cpu1 - cpu0) / len(conns) * 1e3, 3)

    try:
        await asyncio.sleep(settle)  # let the pooler finish whatever a login leaves behind
        result.alive_at_measurement = sum(1 for reader, _ in conns if not reader.at_eof())
        if pid is not None:
            result.take_with_clients(proc_tree_memory(pid))
        if hold > 0:
            await asyncio.sleep(hold)
    finally:
        for _, writer in conns:
            if not writer.is_closing():
                writer.write(messages.TERMINATE)
                writer.close()
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(w.wait_closed()) for _, w in conns], timeout=30
            )
    if pid is not None:
        await asyncio.sleep(settle)
        after = proc_tree_memory(pid)
        result.rss_after_close_kib = after.rss_kib if after else None
    return result


def describe(result: IdleResult) -> str:
    def mib(kib: int | None) -> str:
        return "—" if kib is None else f"{kib / 1024:,.1f} MiB"

    lines = [
        f"{result.connected}/{result.requested} clients logged in to "
        f"{result.host}:{result.port} in {result.login_seconds} s "
        f"({result.logins_per_second or 0:,.0f}/s); {result.failed} failed"
        + (f" (first: {result.first_error})" if result.first_error else ""),
        f"still connected when measured: {result.alive_at_measurement}",
    ]
    if result.pid is not None:
        lines += [
            f"pooler pid {result.pid} ({result.processes} processes): RSS "
            f"{mib(result.rss_before_kib)} before, {mib(result.rss_with_clients_kib)} with the "
            f"clients, {mib(result.rss_after_close_kib)} after they closed",
            f"per client: {result.rss_per_client_kib} KiB RSS, {result.pss_per_client_kib} KiB "
            f"PSS; pooler CPU {result.pooler_cpu_ms_per_login} ms per login",
        ]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/idle_clients.py",
        description="Hold N logged-in idle connections to a PostgreSQL server or pooler and "
        "report the pooler's memory per client.",
    )
    d = " (default: %(default)s)"
    p.add_argument("-n", "--clients", type=int, default=10000, help="connections to open" + d)
    p.add_argument("--host", default="127.0.0.1", help="pooler (or server) address" + d)
    p.add_argument("--port", type=int, required=True, help="pooler (or server) port")
    p.add_argument("--user", default="app", help="login role" + d)
    p.add_argument("--password", help="password (default: $PGPASSWORD, else 'secret')")
    p.add_argument("--dbname", default="app", help="database" + d)
    p.add_argument(
        "--pid", type=int, help="pooler process whose VmRSS and CPU to read, with its descendants"
    )
    p.add_argument("--concurrency", type=int, default=32, help="logins in flight at once" + d)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per login" + d)
    p.add_argument(
        "--deadline",
        type=float,
        default=600.0,
        help="seconds for all logins; the ones done by then count" + d,
    )
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds to wait before each memory reading" + d
    )
    p.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="seconds to keep the connections open after measuring" + d,
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    if args.clients < 1 or args.concurrency < 1:
        p.error("--clients and --concurrency must be >= 1")
    if args.password is None:
        args.password = os.environ.get("PGPASSWORD", "secret")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    params = LoginParams(args.host, args.port, args.user, args.password, args.dbname, args.timeout)
    try:
        import uvloop  # the client's own overhead shares the cores with the pooler
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        result = runner(
            run_idle_clients(
                params,
                args.clients,
                pid=args.pid,
                concurrency=args.concurrency,
                settle=args.settle,
                deadline=args.deadline,
                hold=args.hold,
                progress=not args.json,
            )
        )
    except KeyboardInterrupt:
        return 130
    print(json.dumps(asdict(result)) if args.json else describe(result), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
