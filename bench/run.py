#!/usr/bin/env python3
"""Side-by-side pgbench: PostgreSQL direct vs pgmux vs PgBouncer, in one command.

Starts a throwaway PostgreSQL (``tests/support/pgcluster.py``), initializes it with
``pgbench -i``, starts pgmux and PgBouncer in front of it with the same pool size, then
runs every scenario against every target in interleaved rounds (the target order rotates
each round so no target always runs first or last) and prints a Markdown table of tps and
average latency: the median over rounds with the min-max spread.

Results go to ``bench/results/<timestamp>/``: ``results.md`` (the table), ``results.json``
(every run with all parsed fields plus machine info) and the logs of every process.

Usage::

    .venv/bin/python bench/run.py                   # full run: 3 rounds x 10 s per run
    .venv/bin/python bench/run.py --quick           # smoke run: 1 round x 3 s
    .venv/bin/python bench/run.py --targets direct,pgbouncer --scenarios select-simple

Everything it starts (pgmux, PgBouncer, PostgreSQL) is stopped again on exit, also on
Ctrl-C, SIGTERM or error. PostgreSQL and PgBouncer run as the ``postgres`` OS user when
this is run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.pgcluster import (  # noqa: E402
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgCluster,
    find_client_tool,
    free_port,
)

if TYPE_CHECKING:
    from support.certs import CertFiles

ALL_TARGETS = ("direct", "pgmux", "pgbouncer")
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    """One pgbench workload; ``args`` are the workload flags (clients/jobs added later)."""

    name: str
    args: tuple[str, ...]
    description: str
    connect_per_tx: bool = False
    sslmode: str = "disable"  # the client's PGSSLMODE

    @property
    def tls(self) -> bool:
        return self.sslmode != "disable"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("select-simple", ("-S", "-M", "simple"),
                 "pgbench -S, simple query protocol (one Query message per statement)"),
        Scenario("select-extended", ("-S", "-M", "extended"),
                 "pgbench -S, extended protocol with unnamed statements (Parse/Bind/Execute)"),
        Scenario("select-prepared", ("-S", "-M", "prepared"),
                 "pgbench -S, named prepared statements (Parse once per connection, then "
                 "Bind/Execute)"),
        Scenario("connect", ("-S", "-C"),
                 "pgbench -S -C: a new connection (SCRAM login) for every transaction",
                 connect_per_tx=True),
        Scenario("connect-tls", ("-S", "-C"),
                 "pgbench -S -C with PGSSLMODE=require: a new TLS connection (TLS handshake "
                 "+ SCRAM login) for every transaction",
                 connect_per_tx=True, sslmode="require"),
    )
}  # fmt: skip


# -- small helpers ---------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """Raised from the SIGTERM/SIGHUP handler so cleanup runs as for Ctrl-C."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"received {signal.Signals(signum).name}")


def as_postgres_kwargs() -> dict[str, Any]:
    """Popen keyword arguments to run a child as the ``postgres`` OS user when we are root."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def file_tail(path: Path, lines: int = 20) -> str:
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# libpq variables of the caller's environment that would change what pgbench measures.
CLIENT_ENV_DROPPED = frozenset((
    "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGHOST", "PGHOSTADDR",
    "PGSSLCERT", "PGSSLKEY", "PGSSLROOTCERT", "PGSSLCRL", "PGSSLCRLDIR", "PGSSLNEGOTIATION",
    "PGSSLMINPROTOCOLVERSION", "PGSSLMAXPROTOCOLVERSION",
))  # fmt: skip


def client_env(sslmode: str = "disable") -> dict[str, str]:
    """Environment for pgbench/psql: password, no GSS negotiation round trip, and no SSL
    either unless ``sslmode`` says so (``require``: TLS without certificate checks)."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV_DROPPED}
    env.update(PGPASSWORD=APP_PASSWORD, PGSSLMODE=sslmode, PGGSSENCMODE="disable",
               PGCONNECT_TIMEOUT="10")  # fmt: skip
    return env


def run_text(args: Sequence[str], timeout: float = 30) -> str:
    """stdout+stderr of a short command, or "" if it cannot run."""
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (proc.stdout + proc.stderr).strip()


def proc_tree_cpu_seconds(root_pid: int) -> float | None:
    """utime+stime (+ reaped children's) of a process and all its live descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): ppid=4, utime=14, stime=15, cutime=16, cstime=17
        ticks = sum(int(x) for x in fields[11:15])
        stats[int(entry)] = (int(fields[1]), ticks / CLK_TCK)
    if root_pid not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def summarize_error(stderr: str, stdout: str = "") -> str:
    """A one-line reason for a failed pgbench/psql run, e.g. 'prepared statement "P_0" ...'."""
    lines = (stderr + "\n" + stdout).splitlines()
    for pattern in (r"(?:ERROR|FATAL|PANIC):\s+(.*)", r"error:\s+(.*)", r"(?i)(.*fail.*)"):
        for line in lines:
            m = re.search(pattern, line)
            if m and m.group(1).strip():
                return m.group(1).strip()
    return tail(stderr or stdout, 1).strip() or "no output"


def short(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# -- targets ---------------------------------------------------------------------------


class TargetError(RuntimeError):
    pass


class Target:
    """Something pgbench connects to. Subclasses start/stop a process in front of PG."""

    name = "?"

    def __init__(self, cluster: PgCluster, out: Path, pool_size: int,
                 certs: CertFiles | None = None) -> None:  # fmt: skip
        self.cluster = cluster
        self.out = out
        self.pool_size = pool_size
        self.certs = certs  # set: accept TLS clients with certs.server_cert / server_key
        self.port = cluster.port
        self.start_error: str | None = None
        self.events: list[str] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def exit_status(self) -> int | None:
        """None while running (or not a process), else the process exit code."""
        return None

    def pid(self) -> int | None:
        return None

    def log_tail(self) -> str:
        return ""

    def cpu_seconds(self) -> float | None:
        pid = self.pid()
        return proc_tree_cpu_seconds(pid) if pid else None

    def info(self) -> dict[str, Any]:
        return {"port": self.port, "start_error": self.start_error, "events": self.events}

    def smoke(self, sslmode: str = "disable") -> None:
        """A real login + query, so a target that only accepts TCP counts as not started.

        With ``sslmode="require"`` the login goes over TLS (libpq refuses a server that
        answers the SSLRequest with "no").
        """
        args = [find_client_tool("psql"), "-X", "-q", "-A", "-t", "-h", HOST,
                "-p", str(self.port), "-U", APP_USER, "-d", APP_DB,
                "-c", "select count(*) from pgbench_branches"]  # fmt: skip
        what = "smoke query" if sslmode == "disable" else f"TLS smoke login (sslmode={sslmode})"
        try:
            proc = subprocess.run(args, capture_output=True, text=True,
                                  env=client_env(sslmode), timeout=30)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise TargetError(f"{what} through {self.name} timed out") from exc
        if proc.returncode != 0:
            raise TargetError(
                f"{what} through {self.name} failed: {summarize_error(proc.stderr, proc.stdout)}"
            )


class DirectTarget(Target):
    name = "direct"


class ProcessTarget(Target):
    """A pooler run in the foreground as our child; ready when its port accepts TCP."""

    start_timeout = 30.0

    def __init__(self, cluster: PgCluster, out: Path, pool_size: int,
                 certs: CertFiles | None = None) -> None:  # fmt: skip
        super().__init__(cluster, out, pool_size, certs)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()

    def command(self) -> tuple[list[str], dict[str, Any]]:
        raise NotImplementedError

    @property
    def stdout_path(self) -> Path:
        return self.out / f"{self.name}.stdout.log"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        args, kwargs = self.command()
        with open(self.stdout_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         **kwargs)  # fmt: skip
        self.events.append(f"started pid {self.proc.pid} on port {self.port}")
        deadline = time.monotonic() + self.start_timeout
        while not port_open(self.port):
            code = self.proc.poll()
            if code is not None:
                last = tail(self.log_tail(), 1).strip()
                raise TargetError(
                    f"{self.name} exited with code {code} during startup"
                    + (f": {last}" if last else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TargetError(f"{self.name} did not listen on port {self.port} "
                                  f"within {self.start_timeout:.0f}s")  # fmt: skip
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.events.append("did not stop on SIGTERM within 10s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Leftover workers in the process group we created for it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.events.append(f"stopped, exit code {proc.returncode}")

    def exit_status(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log_tail(self) -> str:
        return file_tail(self.stdout_path)


def pgmux_config_keys() -> set[str]:
    """Top-level keys of pgmux's Config dataclass, asked in a child; empty if unknown.

    The TLS fields (``client_tls`` / ``server_tls``, of type ``TLSConfig``) are flat keys in
    the file: ``client_tls_sslmode``, ``client_tls_key_file``, ... (one per TLSConfig field).
    """
    code = (
        "import dataclasses as d, proxy.config as c\n"
        "tls = getattr(c, 'TLSConfig', None)\n"
        "for f in d.fields(c.Config):\n"
        "    print(f.name)\n"
        "    if tls is not None and f.name in ('client_tls', 'server_tls'):\n"
        "        print(*(f'{f.name}_{g.name}' for g in d.fields(tls)))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


def toml_str(value: object) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(str(value))


class PgmuxTarget(ProcessTarget):
    name = "pgmux"

    @property
    def config_path(self) -> Path:
        return self.out / "pgmux.toml"

    def command(self) -> tuple[list[str], dict[str, Any]]:
        # Same footing as PgBouncer (no per-connection log lines) and no fixed metrics port,
        # but only with keys this pgmux version knows: unknown keys are config errors.
        known = pgmux_config_keys()
        extra = "".join(f"{key} = false\n" for key in ("log_connections", "log_disconnections")
                        if key in known)  # fmt: skip
        # Server connections stay plain, as PgBouncer's (server_tls_sslmode = disable there
        # too): pgmux's default "prefer" would put TLS under every pooled server connection
        # once the bench cluster has ssl = on, and change the relay comparison.
        if "server_tls_sslmode" in known:
            extra += 'server_tls_sslmode = "disable"\n'
        if self.certs is not None:
            client_keys = ("client_tls_sslmode", "client_tls_key_file", "client_tls_cert_file")
            if all(key in known for key in client_keys):
                # prefer: TLS for clients that ask (connect-tls), plain for the others.
                extra += (
                    'client_tls_sslmode = "prefer"\n'
                    f"client_tls_key_file = {toml_str(self.certs.server_key.resolve())}\n"
                    f"client_tls_cert_file = {toml_str(self.certs.server_cert.resolve())}\n"
                )
            else:
                self.events.append("config has no client_tls_* keys: no TLS for clients")
        if "metrics" in known:
            extra += f'\n[metrics]\nlisten_addr = "{HOST}"\nlisten_port = {free_port()}\n'
        self.config_path.write_text(
            f'listen_addr = "{HOST}"\n'
            f"listen_port = {self.port}\n"
            'pool_mode = "transaction"\n'
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 10000\n"
            "query_wait_timeout = 120\n"
            'auth_type = "scram-sha-256"\n'
            'admin_users = ["admin"]\n'
            f"{extra}"
            "\n"
            f"[databases.{APP_DB}]\n"
            f'host = "{HOST}"\n'
            f"port = {self.cluster.port}\n"
            f'dbname = "{APP_DB}"\n'
            f"pool_size = {self.pool_size}\n"
            "\n"
            f"[users.{APP_USER}]\n"
            f'password = "{APP_PASSWORD}"\n'
        )
        args = [sys.executable, "-m", "proxy", "--config", str(self.config_path)]
        return args, {"cwd": str(REPO)}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "config": str(self.config_path)}


def pgbouncer_binary() -> str | None:
    env = os.environ.get("PGMUX_PGBOUNCER")
    if env:
        return env
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None


def pgbouncer_version(binary: str) -> tuple[str, tuple[int, ...]]:
    text = run_text([binary, "--version"])
    m = re.search(r"PgBouncer\s+(\d+(?:\.\d+)+)", text)
    if not m:
        return text.splitlines()[0] if text else "unknown", (0,)
    return m.group(1), tuple(int(x) for x in m.group(1).split("."))


class PgbouncerTarget(ProcessTarget):
    """PgBouncer in the foreground (no -d) as the postgres user; files in a /tmp dir it owns.

    auth_file holds either the plaintext password (``auth="plain"``) or the SCRAM secret
    from pg_authid (``auth="scram"``; PgBouncer then logs in to the server by SCRAM
    pass-through, using the keys from the client's own SCRAM exchange).

    With ``certs`` it accepts TLS clients (client_tls_sslmode = prefer) with its own copies
    of the server certificate and key in that dir, owned by postgres, the key mode 0600.
    Server connections are always plain (server_tls_sslmode = disable).
    """

    name = "pgbouncer"

    def __init__(self, cluster: PgCluster, out: Path, pool_size: int, binary: str,
                 auth: str, certs: CertFiles | None = None) -> None:  # fmt: skip
        super().__init__(cluster, out, pool_size, certs)
        self.binary = binary
        self.auth = auth
        self.version, self.version_tuple = pgbouncer_version(binary)
        self.dir = Path(tempfile.mkdtemp(prefix="pgmux-bench-pgbouncer-", dir="/tmp"))
        os.chmod(self.dir, 0o700)
        self._chown(self.dir)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    @property
    def ini_path(self) -> Path:
        return self.dir / "pgbouncer.ini"

    @property
    def logfile(self) -> Path:
        return self.dir / "pgbouncer.log"

    def command(self) -> tuple[list[str], dict[str, Any]]:
        if self.auth == "scram":
            secret = self.cluster.psql(
                f"select rolpassword from pg_authid where rolname = '{APP_USER}'",
                dbname="postgres",
            )
        else:
            secret = APP_PASSWORD
        userlist = self.dir / "userlist.txt"
        userlist.write_text(f'"{APP_USER}" "{secret}"\n')
        os.chmod(userlist, 0o600)
        self._chown(userlist)
        extra = ""
        if self.version_tuple >= (1, 21):
            extra += "max_prepared_statements = 200\n"
        if self.certs is not None:
            key_file, cert_file = self.dir / "tls.key", self.dir / "tls.crt"
            for source, target, mode in (
                (self.certs.server_key, key_file, 0o600),
                (self.certs.server_cert, cert_file, 0o644),
            ):
                target.unlink(missing_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as f:
                    f.write(source.read_bytes())
                os.chmod(target, mode)
                self._chown(target)
            extra += (
                "client_tls_sslmode = prefer\n"
                f"client_tls_key_file = {key_file}\n"
                f"client_tls_cert_file = {cert_file}\n"
            )  # fmt: skip
        self.ini_path.write_text(
            "[databases]\n"
            f"{APP_DB} = host={HOST} port={self.cluster.port} dbname={APP_DB}\n"
            "\n"
            "[pgbouncer]\n"
            f"listen_addr = {HOST}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {userlist}\n"
            f"logfile = {self.logfile}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 10000\n"
            "max_db_connections = 0\n"
            "query_wait_timeout = 120\n"
            "ignore_startup_parameters = extra_float_digits\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "stats_period = 60\n"
            "server_tls_sslmode = disable\n"
            f"{extra}"
        )
        self._chown(self.ini_path)
        shutil.copy(self.ini_path, self.out / "pgbouncer.ini")
        return [self.binary, str(self.ini_path)], {"cwd": str(self.dir), **as_postgres_kwargs()}

    def log_tail(self) -> str:
        return tail(file_tail(self.logfile) + "\n" + file_tail(self.stdout_path), 20)

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(OSError):
            shutil.copy(self.logfile, self.out / "pgbouncer.log")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "version": self.version, "binary": self.binary,
                "auth_file": self.auth}  # fmt: skip


# -- pgbench ---------------------------------------------------------------------------


@dataclass
class RunResult:
    round: int
    scenario: str
    target: str
    position: int
    command: list[str]
    sslmode: str = "disable"  # PGSSLMODE of the run
    exit_code: int | None = None
    ok: bool = False
    error: str | None = None
    tps: float | None = None
    latency_ms: float | None = None
    latency_stddev_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    initial_connection_ms: float | None = None
    average_connection_ms: float | None = None
    wall_seconds: float | None = None
    proxy_cpu_seconds: float | None = None
    proxy_cpu_us_per_tx: float | None = None
    postgres_cpu_seconds: float | None = None
    postgres_cpu_us_per_tx: float | None = None
    notes: list[str] = field(default_factory=list)
    stdout_tail: str = ""
    stderr_tail: str = ""


_FLOAT = r"([0-9]+(?:\.[0-9]+)?)"


def parse_pgbench(stdout: str, result: RunResult) -> None:
    """Fill the summary fields of ``result`` from pgbench's final report."""

    def grab(pattern: str) -> str | None:
        m = re.search(pattern, stdout, re.MULTILINE)
        return m.group(1) if m else None

    tps = grab(rf"^tps = {_FLOAT} \((?:without initial connection time|including reconnection)")
    tps = tps or grab(rf"^tps = {_FLOAT}")
    values: dict[str, str | None] = {
        "tps": tps,
        "latency_ms": grab(rf"^latency average = {_FLOAT} ms"),
        "latency_stddev_ms": grab(rf"^latency stddev = {_FLOAT} ms"),
        "initial_connection_ms": grab(rf"^initial connection time = {_FLOAT} ms"),
        "average_connection_ms": grab(rf"^average connection time = {_FLOAT} ms"),
    }
    for key, value in values.items():
        if value is not None:
            setattr(result, key, float(value))
    tx = grab(r"^number of transactions actually processed: ([0-9]+)")
    failed = grab(r"^number of failed transactions: ([0-9]+)")
    result.transactions = int(tx) if tx is not None else None
    result.failed_transactions = int(failed) if failed is not None else None


@dataclass
class Bench:
    args: argparse.Namespace
    cluster: PgCluster
    out: Path
    pgbench: str = field(default_factory=lambda: find_client_tool("pgbench"))

    def pgbench_args(self, scenario: Scenario, port: int, duration: int) -> list[str]:
        clients = self.args.connect_clients if scenario.connect_per_tx else self.args.clients
        jobs = min(self.args.jobs, clients)
        return [self.pgbench, "-n", *scenario.args, "-c", str(clients), "-j", str(jobs),
                "-T", str(duration), "-h", HOST, "-p", str(port), "-U", APP_USER,
                APP_DB]  # fmt: skip

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.cluster.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def run(self, target: Target, scenario: Scenario, rnd: int, position: int,
            duration: int, log_name: str) -> RunResult:  # fmt: skip
        cmd = self.pgbench_args(scenario, target.port, duration)
        result = RunResult(rnd, scenario.name, target.name, position, cmd, scenario.sslmode)
        pg_pid = self.postmaster_pid()
        proxy0 = target.cpu_seconds()
        pg0 = proc_tree_cpu_seconds(pg_pid) if pg_pid else None
        started = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=client_env(scenario.sslmode),
                                  timeout=duration * 3 + 60)  # fmt: skip
            stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            stdout = _decode(exc.stdout)
            stderr = _decode(exc.stderr) + f"\npgbench killed after {exc.timeout:.0f}s timeout"
            code = None
            result.error = f"timeout: pgbench hung for {exc.timeout:.0f}s"
        result.wall_seconds = round(time.monotonic() - started, 3)
        proxy1 = target.cpu_seconds()
        pg1 = proc_tree_cpu_seconds(pg_pid) if pg_pid else None
        (self.out / "logs" / log_name).write_text(
            f"$ PGSSLMODE={scenario.sslmode} {' '.join(cmd)}\nexit code: {code}\n"
            f"--- stdout\n{stdout}\n--- stderr\n{stderr}\n"
        )
        result.exit_code = code
        result.stdout_tail, result.stderr_tail = tail(stdout), tail(stderr)
        parse_pgbench(stdout, result)
        if code == 0 and result.tps is not None:
            result.ok = True
        elif result.error is None:
            result.error = summarize_error(stderr, "" if code == 0 else stdout)
            if code == 0:
                result.error = "no tps in pgbench output"
        tx = result.transactions or 0
        if proxy0 is not None and proxy1 is not None:
            result.proxy_cpu_seconds = round(proxy1 - proxy0, 3)
            if tx:
                result.proxy_cpu_us_per_tx = round(result.proxy_cpu_seconds / tx * 1e6, 2)
        if pg0 is not None and pg1 is not None:
            result.postgres_cpu_seconds = round(pg1 - pg0, 3)
            if tx:
                result.postgres_cpu_us_per_tx = round(result.postgres_cpu_seconds / tx * 1e6, 2)
        exit_status = target.exit_status()
        if exit_status is not None:
            result.ok = False
            died = f"{target.name} exited with code {exit_status} during the run"
            result.error = f"{died}; pgbench: {result.error}" if result.error else died
            result.stderr_tail += f"\n--- {target.name} log tail\n{target.log_tail()}"
        return result


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


# -- machine info ----------------------------------------------------------------------


def machine_info(cluster: PgCluster, bouncer: PgbouncerTarget | None) -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = run_text(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = run_text(["git", "-C", str(REPO), "status", "--porcelain", "--", "proxy"])
    try:
        pg_version = cluster.psql("show server_version", dbname="postgres")
    except RuntimeError:
        pg_version = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "loadavg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "python_ssl": ssl.OPENSSL_VERSION,
        "postgresql": pg_version,
        "pgbench": run_text([find_client_tool("pgbench"), "--version"]),
        "pgbouncer": bouncer.version if bouncer else None,
        "pgmux_commit": commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None,
        "pgmux_worktree_dirty": bool(dirty),
    }


# -- report ----------------------------------------------------------------------------


@dataclass
class Cell:
    """Aggregate over rounds of one (scenario, target)."""

    runs: int = 0
    ok: int = 0
    tps: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    proxy_cpu: list[float] = field(default_factory=list)
    pg_cpu: list[float] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def tps_median(self) -> float | None:
        return statistics.median(self.tps) if self.tps else None

    def summary(self) -> dict[str, Any]:
        def med(xs: list[float]) -> float | None:
            return round(statistics.median(xs), 3) if xs else None

        return {
            "runs": self.runs, "ok": self.ok, "failed": self.runs - self.ok,
            "tps_median": med(self.tps), "tps_min": min(self.tps, default=None),
            "tps_max": max(self.tps, default=None), "latency_ms_median": med(self.latency),
            "proxy_cpu_us_per_tx_median": med(self.proxy_cpu),
            "postgres_cpu_us_per_tx_median": med(self.pg_cpu),
            "average_connection_ms_median": med(self.connect_ms),
            "first_error": self.errors[0] if self.errors else None,
        }  # fmt: skip


def aggregate(runs: list[RunResult]) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    for r in runs:
        cell = cells.setdefault((r.scenario, r.target), Cell())
        cell.runs += 1
        if r.ok and r.tps is not None:
            cell.ok += 1
            cell.tps.append(r.tps)
            if r.latency_ms is not None:
                cell.latency.append(r.latency_ms)
            if r.proxy_cpu_us_per_tx is not None:
                cell.proxy_cpu.append(r.proxy_cpu_us_per_tx)
            if r.postgres_cpu_us_per_tx is not None:
                cell.pg_cpu.append(r.postgres_cpu_us_per_tx)
            if r.average_connection_ms is not None:
                cell.connect_ms.append(r.average_connection_ms)
        else:
            cell.errors.append(r.error or "failed")
    return cells


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def fmt_tps(cell: Cell | None, start_error: str | None) -> str:
    if cell is None or cell.runs == 0:
        return _md(f"FAIL ({short(start_error, 120)})") if start_error else "—"
    failed = cell.runs - cell.ok
    if not cell.tps:
        return _md(f"FAIL ({short(cell.errors[0], 70)})")
    med = cell.tps_median or 0.0
    text = f"{med:,.0f}"
    if len(cell.tps) > 1:
        text += f" ({min(cell.tps):,.0f}-{max(cell.tps):,.0f})"
    if failed:
        text += f" ⚠ {failed}/{cell.runs} FAIL ({short(cell.errors[0], 60)})"
    return _md(text)


def fmt_num(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    text = f"{med:,.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    return text


def fmt_latency(cell: Cell | None) -> str:
    """Latency average; for connect-per-transaction also pgbench's average connection time."""
    if cell is None:
        return "—"
    text = fmt_num(cell.latency)
    if cell.connect_ms:
        text += f" (connect {statistics.median(cell.connect_ms):.2f})"
    return text


def fmt_ratio(num: Cell | None, den: Cell | None) -> str:
    a = num.tps_median if num else None
    b = den.tps_median if den else None
    return f"{a / b:.2f}" if a and b else "—"


def render(report: dict[str, Any], runs: list[RunResult], targets: list[Target]) -> str:
    params, machine = report["params"], report["machine"]
    names = [t.name for t in targets]
    start_errors = {t.name: t.start_error for t in targets}
    cells = aggregate(runs)
    done_rounds = max((r.round for r in runs), default=0)
    commit = (machine.get("pgmux_commit") or "uncommitted")[:12]
    if machine.get("pgmux_worktree_dirty"):
        commit += " (dirty)"
    lines = [
        f"## pgmux bench — {report['started_at']}",
        "",
        f"{done_rounds}/{params['rounds']} rounds x {params['duration']} s per run; "
        f"{params['clients']} clients (connect scenarios: {params['connect_clients']}), "
        f"{params['jobs']} jobs, pool size {params['pool_size']}, scale {params['scale']}.  ",
        f"{machine.get('nproc')} CPU ({machine.get('cpu_model')}), "
        f"PostgreSQL {machine.get('postgresql')}, PgBouncer {machine.get('pgbouncer') or '—'}, "
        f"Python {machine.get('python')}, pgmux {commit}.",
        "",
        "tps: median over rounds (min-max). Latency: average per transaction in ms, median over "
        "rounds (connect scenarios: plus pgbench's average connection time). Ratios: of median "
        "tps.",
    ]
    tls = [s for s in params["scenarios"] if params.get("scenario_sslmode", {}).get(s, "disable")
           != "disable"]  # fmt: skip
    if tls:
        lines += ["", f"{', '.join(tls)}: client TLS (PGSSLMODE=require, no certificate check; "
                  "EC P-256 server certificate) to every target; pgmux/PgBouncer server "
                  "connections stay plain (server_tls_sslmode = disable). All other scenarios: "
                  "PGSSLMODE=disable."]  # fmt: skip
    for name, why in params.get("skipped_scenarios", {}).items():
        lines += ["", f"Skipped {name}: {_md(why)}"]
    if report.get("interrupted"):
        lines += ["", f"**Interrupted ({report['interrupted']}): partial results.**"]
    lines.append("")
    header = ["scenario", *(f"{n} tps" for n in names)]
    if "pgmux" in names and "pgbouncer" in names:
        header.append("pgmux/pgbouncer")
    if "pgmux" in names and "direct" in names:
        header.append("pgmux/direct")
    header += [f"{n} lat ms" for n in names]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scen in params["scenarios"]:
        row = [scen, *(fmt_tps(cells.get((scen, n)), start_errors[n]) for n in names)]
        if "pgmux" in names and "pgbouncer" in names:
            row.append(fmt_ratio(cells.get((scen, "pgmux")), cells.get((scen, "pgbouncer"))))
        if "pgmux" in names and "direct" in names:
            row.append(fmt_ratio(cells.get((scen, "pgmux")), cells.get((scen, "direct"))))
        row += [fmt_latency(cells.get((scen, n))) for n in names]
        lines.append("| " + " | ".join(row) + " |")

    proxies = [n for n in names if n != "direct"]
    cpu_header = ["scenario", *(f"{n} proc µs/tx" for n in proxies),
                  *(f"postgres µs/tx via {n}" for n in names)]  # fmt: skip
    lines += ["", "CPU time per transaction (µs, median over rounds; from /proc utime+stime):", "",
              "| " + " | ".join(cpu_header) + " |", "|" + "---|" * len(cpu_header)]  # fmt: skip
    for scen in params["scenarios"]:
        empty = Cell()
        row = [scen, *(fmt_num(cells.get((scen, n), empty).proxy_cpu, 1) for n in proxies),
               *(fmt_num(cells.get((scen, n), empty).pg_cpu, 1) for n in names)]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")

    notes = []
    for t in targets:
        if t.start_error:
            notes.append(f"- **{t.name} did not start**: {_md(t.start_error)}")
            log = report["targets"].get(t.name, {}).get("log_tail")
            if log:
                notes.append("  ```\n" + "\n".join("  " + x for x in log.splitlines()) + "\n  ```")
    for r in runs:
        if not r.ok:
            notes.append(f"- FAIL round {r.round} {r.scenario} @ {r.target} (exit {r.exit_code}): "
                         f"{_md(short(r.error or '', 200))}")  # fmt: skip
        for note in r.notes:
            notes.append(f"- note round {r.round} {r.scenario} @ {r.target}: {_md(note)}")
    if notes:
        lines += ["", "Failures and notes:", "", *notes]
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------


def tls_unavailable() -> str | None:
    """Why the TLS scenarios cannot run here, or None."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return ("connect-tls needs the cryptography package to make its certificates "
                "(tests/support/certs.py): .venv/bin/pip install -e '.[test]'")  # fmt: skip
    return None


def make_bench_certs() -> CertFiles:
    """Fresh certificates (tests/support/certs.py) in a new /tmp dir, mode 0755.

    Certificates are world-readable, the keys 0600 and owned by us: pgmux (our child) reads
    them in place; PostgreSQL (``PgCluster.create(tls=...)``) and PgBouncer run as the
    postgres user and get their own copies, owned by postgres.
    """
    from support.certs import make_certs

    directory = Path(tempfile.mkdtemp(prefix="pgmux-bench-certs-", dir="/tmp"))
    os.chmod(directory, 0o755)
    try:
        return make_certs(directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="pgbench side by side: PostgreSQL direct vs pgmux vs PgBouncer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--pool-size", type=int, default=20, help="server pool size (both poolers)")
    p.add_argument("--clients", type=int, default=50, help="pgbench -c (select scenarios)")
    p.add_argument("--connect-clients", type=int, default=20,
                   help="pgbench -c for 'connect' and 'connect-tls'")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j")
    p.add_argument(
        "--targets",
        default=None,
        help=f"comma list of {','.join(ALL_TARGETS)} (default: all available)",
    )
    p.add_argument("--scenarios", default=None,
                   help=f"comma list of {','.join(SCENARIOS)} (default: all; connect-tls only "
                        "when the cryptography package can make its certificates)")  # fmt: skip
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of unrecorded select-simple per target before round 1 (0: none)",
    )
    p.add_argument(
        "--pgbouncer-auth",
        choices=("scram", "plain"),
        default="scram",
        help="auth_file content: SCRAM secret from pg_authid, or plaintext password",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="result dir (default: bench/results/<timestamp>/)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: --duration 3 --rounds 1 --warmup 1"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 3, 1, 1
    bouncer = pgbouncer_binary()
    if args.targets is None:
        args.targets = [t for t in ALL_TARGETS if t != "pgbouncer" or bouncer]
    else:
        args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.skipped_scenarios = {}
    if args.scenarios is None:
        args.scenarios = list(SCENARIOS)
        why = tls_unavailable()
        if why:
            args.scenarios = [s for s in args.scenarios if not SCENARIOS[s].tls]
            args.skipped_scenarios = {s.name: why for s in SCENARIOS.values() if s.tls}
    else:
        args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for t in args.targets:
        if t not in ALL_TARGETS:
            p.error(f"unknown target {t!r}; choose from {', '.join(ALL_TARGETS)}")
    if "pgbouncer" in args.targets and not bouncer:
        p.error("pgbouncer not found (install it or set PGMUX_PGBOUNCER)")
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose from {', '.join(SCENARIOS)}")
    if any(SCENARIOS[s].tls for s in args.scenarios) and (why := tls_unavailable()):
        p.error(why)
    if not args.targets or not args.scenarios:
        p.error("need at least one target and one scenario")
    if min(args.duration, args.rounds, args.pool_size, args.clients, args.jobs,
           args.connect_clients, args.scale) < 1:  # fmt: skip
        p.error("numeric options must be >= 1")
    args.pgbouncer = bouncer
    return args


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM/SIGHUP behave like Ctrl-C for the duration (so cleanup always runs)."""
    sigs = [s for s in (signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]
    old = {s: signal.signal(s, _on_signal) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Cleanup must not be cut short by a second Ctrl-C."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = dt.datetime.now().astimezone()
    out: Path = args.out or REPO / "bench" / "results" / started_at.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    log(f"results in {out}")

    runs: list[RunResult] = []
    targets: list[Target] = []
    report: dict[str, Any] = {
        "started_at": started_at.isoformat(timespec="seconds"),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {},
        "targets": {},
        "interrupted": None,
        "runs": [],
    }
    report["params"]["scenario_descriptions"] = {s: SCENARIOS[s].description
                                                 for s in args.scenarios}  # fmt: skip
    report["params"]["scenario_sslmode"] = {s: SCENARIOS[s].sslmode for s in args.scenarios}
    for name, why in args.skipped_scenarios.items():
        log(f"skipping scenario {name}: {why}")

    def save() -> None:
        report["runs"] = [asdict(r) for r in runs]
        report["targets"] = {t.name: {**t.info(), "log_tail": t.log_tail() if t.start_error
                                      else None} for t in targets}  # fmt: skip
        cells = aggregate(runs)
        report["summary"] = {f"{s}/{t}": c.summary() for (s, t), c in cells.items()}
        (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    cleanups: list[Callable[[], None]] = []
    cluster: PgCluster | None = None
    certs: CertFiles | None = None
    tls_scenarios = [s for s in args.scenarios if SCENARIOS[s].tls]
    exit_code = 0
    with signals_raise():
        try:
            if tls_scenarios:
                certs = make_bench_certs()
                cert_dir = certs.directory
                cleanups.append(lambda: shutil.rmtree(cert_dir, ignore_errors=True))
                report["params"]["tls_certs"] = str(cert_dir)
                log(f"certificates for {', '.join(tls_scenarios)} in {cert_dir}")
            max_conn = max(300, args.clients + args.connect_clients + 50)
            log(f"starting PostgreSQL (max_connections={max_conn}"
                f"{', ssl=on' if certs else ''})")  # fmt: skip
            cluster = PgCluster.create({"max_connections": str(max_conn)}, tls=certs)
            cleanups.append(cluster.destroy)
            log(f"PostgreSQL on port {cluster.port}; pgbench -i -s {args.scale}")
            init = subprocess.run(
                [find_client_tool("pgbench"), "-i", "-q", "-s", str(args.scale), "-h", HOST,
                 "-p", str(cluster.port), "-U", APP_USER, APP_DB],
                capture_output=True, text=True, env=client_env(),
            )  # fmt: skip
            (out / "logs" / "pgbench-init.log").write_text(init.stdout + init.stderr)
            if init.returncode != 0:
                raise RuntimeError(f"pgbench -i failed:\n{tail(init.stderr)}")
            cluster.psql("vacuum analyze", dbname=APP_DB)

            bouncer: PgbouncerTarget | None = None
            for name in args.targets:
                target: Target
                if name == "direct":
                    target = DirectTarget(cluster, out, args.pool_size, certs)
                elif name == "pgmux":
                    target = PgmuxTarget(cluster, out, args.pool_size, certs)
                else:
                    bouncer = PgbouncerTarget(cluster, out, args.pool_size, args.pgbouncer,
                                              args.pgbouncer_auth, certs)  # fmt: skip
                    target = bouncer
                    cleanups.append(bouncer.destroy)
                targets.append(target)
                if isinstance(target, ProcessTarget) and not isinstance(target, PgbouncerTarget):
                    cleanups.append(target.stop)
            report["machine"] = machine_info(cluster, bouncer)

            bench = Bench(args, cluster, out)
            for target in targets:
                try:
                    target.start()
                    target.smoke()
                    log(f"{target.name} ready on port {target.port}")
                except (TargetError, OSError) as exc:
                    target.start_error = str(exc)
                    log(f"{target.name} FAILED to start: {exc}\n{target.log_tail()}")
                    target.stop()
                    continue
                if certs is not None:
                    # Not fatal: the plain scenarios still run; connect-tls shows the error.
                    try:
                        target.smoke(sslmode="require")
                        target.events.append("TLS smoke login ok")
                    except (TargetError, OSError) as exc:
                        target.events.append(str(exc))
                        log(f"{target.name}: {exc}; {', '.join(tls_scenarios)} will fail")
                if args.warmup:
                    res = bench.run(target, SCENARIOS["select-simple"], 0, 0, args.warmup,
                                    f"warmup-{target.name}.log")  # fmt: skip
                    log(
                        f"{target.name} warmup: "
                        f"{f'{res.tps:,.0f} tps' if res.ok and res.tps else res.error}"
                    )
            save()

            live = [t for t in targets if t.start_error is None]
            total = args.rounds * len(args.scenarios) * len(live)
            n = 0
            for rnd in range(1, args.rounds + 1):
                shift = (rnd - 1) % len(live) if live else 0
                order = live[shift:] + live[:shift]
                for scen_name in args.scenarios:
                    scenario = SCENARIOS[scen_name]
                    for pos, target in enumerate(order):
                        n += 1
                        result = run_one(bench, target, scenario, rnd, pos, args.duration)
                        runs.append(result)
                        save()
                        what = (f"{result.tps:,.0f} tps, {result.latency_ms} ms"
                                if result.ok and result.tps is not None
                                else f"FAIL ({short(result.error or '', 100)})")  # fmt: skip
                        log(f"[{n}/{total}] round {rnd} {scen_name:<16} {target.name:<9} {what}")
        except KeyboardInterrupt as exc:
            report["interrupted"] = str(exc) or "SIGINT"
            log(f"interrupted ({report['interrupted']}); cleaning up")
            exit_code = 130
        except Exception as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
            log(f"ERROR: {report['error']}")
            exit_code = 1
        finally:
            with signals_ignored():
                for cleanup in reversed(cleanups):
                    try:
                        cleanup()
                    except Exception as exc:  # keep cleaning up the rest
                        log(f"cleanup error: {type(exc).__name__}: {exc}")
                report["finished_at"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
                save()
                if cluster is not None and report["machine"]:
                    text = render(report, runs, targets)
                    (out / "results.md").write_text(text)
                    print(text, flush=True)
                log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return exit_code


def run_one(bench: Bench, target: Target, scenario: Scenario, rnd: int, pos: int,
            duration: int) -> RunResult:  # fmt: skip
    """One measured run; restarts a pooler that died since the last run, once per run."""
    notes: list[str] = []
    code = target.exit_status()
    if code is not None:
        notes.append(f"{target.name} had exited with code {code} before this run; restarted")
        log(f"{target.name} exited with code {code}; restarting\n{target.log_tail()}")
        try:
            target.stop()
            target.start()
        except (TargetError, OSError) as exc:
            cmd = bench.pgbench_args(scenario, target.port, duration)
            return RunResult(rnd, scenario.name, target.name, pos, cmd, scenario.sslmode, ok=False,
                             error=f"{target.name} restart failed: {exc}", notes=notes,
                             stderr_tail=target.log_tail())  # fmt: skip
    log_name = f"r{rnd}-{scenario.name}-{target.name}.log"
    result = bench.run(target, scenario, rnd, pos, duration, log_name)
    result.notes[:0] = notes
    return result


if __name__ == "__main__":
    sys.exit(main())
