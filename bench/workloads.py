"""The bench scenarios and how one run of each is measured: pgbench (throughput, or latency
at a fixed rate, with percentiles from its per-transaction log), idle clients
(``idle_clients.py``, the pooler's memory per client) and a large COPY through psql."""

from __future__ import annotations

import argparse
import contextlib
import enum
import fcntl
import json
import math
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from support.pgcluster import APP_DB, APP_USER, PgCluster, find_client_tool

from bench.procstat import proc_tree_cpu_seconds
from bench.report import RunResult
from bench.targets import (
    HOST,
    REPO,
    ProcessTarget,
    Target,
    TargetError,
    client_env,
    summarize_error,
    tail,
)


class Kind(enum.StrEnum):
    PGBENCH = "pgbench"  # pgbench as fast as it goes: tps
    LATENCY = "latency"  # pgbench at a fixed rate (-R): latency percentiles
    COPY = "copy"  # a large COPY ... TO STDOUT through psql: MB/s
    IDLE = "idle"  # N logged-in idle clients: the pooler's memory per client


@dataclass(frozen=True)
class Scenario:
    """One workload. For pgbench kinds ``args`` are the workload flags; clients, jobs,
    duration and the per-transaction log are added per run."""

    name: str
    args: tuple[str, ...]
    description: str
    kind: Kind = Kind.PGBENCH
    clients: int | None = None  # None: --clients, or --connect-clients with connect_per_tx
    connect_per_tx: bool = False
    sslmode: str = "disable"  # the client's PGSSLMODE
    poolers_only: bool = False  # not run against PostgreSQL direct

    @property
    def tls(self) -> bool:
        return self.sslmode != "disable"

    def applies_to(self, target: str) -> bool:
        return not (self.poolers_only and target == "direct")


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
        Scenario("select-simple-500", ("-S", "-M", "simple"),
                 "select-simple with 500 clients", clients=500),
        Scenario("select-extended-500", ("-S", "-M", "extended"),
                 "select-extended with 500 clients", clients=500),
        Scenario("select-prepared-500", ("-S", "-M", "prepared"),
                 "select-prepared with 500 clients", clients=500),
        Scenario("tpcb", ("-M", "simple"),
                 "pgbench's default TPC-B-like script: 3 UPDATEs, a SELECT and an INSERT in "
                 "BEGIN/END"),
        Scenario("connect", ("-S", "-C"),
                 "pgbench -S -C: a new connection (SCRAM login) for every transaction",
                 connect_per_tx=True),
        Scenario("connect-200", ("-S", "-C"),
                 "connect with 200 clients: a connection storm", connect_per_tx=True,
                 clients=200),
        Scenario("connect-tls", ("-S", "-C"),
                 "pgbench -S -C with PGSSLMODE=require: a new TLS connection (TLS handshake "
                 "+ SCRAM login) for every transaction",
                 connect_per_tx=True, sslmode="require"),
        Scenario("latency", ("-S", "-M", "simple"),
                 "pgbench -S at a fixed rate (-R, --rate-clients clients): latency "
                 "percentiles from the per-transaction log", kind=Kind.LATENCY),
        Scenario("copy-out", (),
                 "COPY (SELECT g, repeat('x', 100) FROM generate_series(1, ROWS) g) TO STDOUT "
                 "through psql, counted by the bench: MB/s", kind=Kind.COPY),
        Scenario("idle-clients", (),
                 "bench/idle_clients.py holds N logged-in idle clients: pooler RSS per client",
                 kind=Kind.IDLE, poolers_only=True),
    )
}  # fmt: skip

COPY_WIDTH = 100  # the repeat('x', N) column of copy-out


def copy_sql(rows: int) -> str:
    return f"COPY (SELECT g, repeat('x', {COPY_WIDTH}) FROM generate_series(1, {rows}) g) TO STDOUT"


def copy_expected_bytes(rows: int, width: int = COPY_WIDTH) -> int:
    """The size of copy_sql's text output: ``g<TAB>xxx...<LF>`` for g = 1..rows."""
    total = rows * (width + 2)
    digits, low = 1, 1
    while low <= rows:
        total += digits * (min(rows, low * 10 - 1) - low + 1)
        digits, low = digits + 1, low * 10
    return total


def clients_for(scenario: Scenario, args: argparse.Namespace) -> int:
    """Concurrent client connections of a scenario with these command-line arguments."""
    if scenario.kind is Kind.LATENCY:
        return int(args.rate_clients)
    if scenario.kind is Kind.IDLE:
        return int(args.idle_clients)
    if scenario.kind is Kind.COPY:
        return 1
    if scenario.clients is not None:
        return scenario.clients
    return int(args.connect_clients if scenario.connect_per_tx else args.clients)


# -- pgbench output ----------------------------------------------------------------------

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


def read_tx_latencies_us(directory: Path) -> list[int]:
    """The latency column of every pgbench per-transaction log in ``directory``, sorted.

    A line is ``client_id transaction_no time script_no time_epoch time_us [lag] ...``
    with ``time`` in µs (pgbench docs, "Per-Transaction Logging"); failed and skipped
    transactions have a word there instead and are left out. With -R the time counts
    from the transaction's scheduled start, so it includes any schedule lag.
    """
    values: list[int] = []
    for path in sorted(directory.glob("tx.*")):
        with path.open() as f:
            for line in f:
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[2].isdigit():
                    values.append(int(parts[2]))
    values.sort()
    return values


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


# -- the runner --------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    cluster: PgCluster
    out: Path
    pgbench: str = field(default_factory=lambda: find_client_tool("pgbench"))
    psql: str = field(default_factory=lambda: find_client_tool("psql"))

    def clients_for(self, scenario: Scenario) -> int:
        return clients_for(scenario, self.args)

    def sampling_rate(self, scenario: Scenario) -> float:
        """Share of transactions pgbench logs: all where there are few (fixed rate,
        connection per transaction), else --tx-log-sampling."""
        if scenario.kind is Kind.LATENCY or scenario.connect_per_tx:
            return 1.0
        return float(self.args.tx_log_sampling)

    def pgbench_args(
        self, scenario: Scenario, port: int, duration: int, tx_log_prefix: Path | None = None
    ) -> list[str]:
        clients = self.clients_for(scenario)
        jobs = min(self.args.jobs, clients)
        cmd = [
            self.pgbench,
            "-n",
            *scenario.args,
            "-c",
            str(clients),
            "-j",
            str(jobs),
            "-T",
            str(duration + self.connect_allowance(scenario)),
        ]
        if scenario.kind is Kind.LATENCY:
            cmd += ["-R", str(self.args.rate)]
        if tx_log_prefix is not None:
            cmd += ["-l", f"--log-prefix={tx_log_prefix}"]
            rate = self.sampling_rate(scenario)
            if rate < 1.0:
                cmd.append(f"--sampling-rate={rate:g}")
        return [*cmd, "-h", HOST, "-p", str(port), "-U", APP_USER, APP_DB]

    def connect_allowance(self, scenario: Scenario) -> int:
        """Seconds added to -T for scenarios with many clients.

        pgbench 15 starts its -T clock before its clients connect, and 500 logins (SCRAM,
        and a backend fork each direct) take seconds: ~2.5 s direct on an idle 2-core
        machine, over 8 s on a busy one. Its tps leaves that time out, but the measured
        window would shrink, or vanish in a short run: 500 clients get 10 s more.
        """
        clients = self.clients_for(scenario)
        return 0 if scenario.connect_per_tx or clients <= 100 else math.ceil(clients / 50)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.cluster.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def run(
        self,
        target: Target,
        scenario: Scenario,
        rnd: int,
        position: int,
        duration: int,
        log_name: str,
    ) -> RunResult:
        """One measured run, with the CPU time of the pooler and of PostgreSQL meanwhile."""
        result = RunResult(
            rnd, scenario.name, target.name, position, [], scenario.sslmode, kind=str(scenario.kind)
        )
        if scenario.kind is Kind.IDLE and isinstance(target, ProcessTarget):
            # A pooler keeps the memory of an earlier crowd of clients (PgBouncer its slab
            # caches, Python its arenas), so a later round would measure ~0 KiB per client:
            # each idle-clients run starts from a freshly started, logged-into pooler.
            try:
                target.stop()
                target.start()
                target.smoke()
            except (TargetError, OSError) as exc:
                result.error = f"restart before the idle clients failed: {exc}"
                return result
        pg_pid = self.postmaster_pid()
        proxy0 = target.cpu_seconds()
        pg0 = proc_tree_cpu_seconds(pg_pid) if pg_pid else None
        started = time.monotonic()
        if scenario.kind is Kind.COPY:
            self._run_copy(target, result, log_name)
        elif scenario.kind is Kind.IDLE:
            self._run_idle(target, result, log_name)
        else:
            self._run_pgbench(target, scenario, result, duration, log_name)
        result.wall_seconds = round(time.monotonic() - started, 3)
        if scenario.kind is Kind.COPY:
            # One backend did all the work and exits as psql does: until the postmaster has
            # reaped it, its CPU time is neither a live process's nor in cutime (one direct
            # round read 0.02 s/GB instead of 2.8).
            time.sleep(0.5)
        proxy1 = target.cpu_seconds()
        pg1 = proc_tree_cpu_seconds(pg_pid) if pg_pid else None
        if proxy0 is not None and proxy1 is not None:
            result.proxy_cpu_seconds = round(proxy1 - proxy0, 3)
        if pg0 is not None and pg1 is not None:
            result.postgres_cpu_seconds = round(pg1 - pg0, 3)
        tx = result.transactions or 0
        if tx and result.proxy_cpu_seconds is not None:
            result.proxy_cpu_us_per_tx = round(result.proxy_cpu_seconds / tx * 1e6, 2)
        if tx and result.postgres_cpu_seconds is not None:
            result.postgres_cpu_us_per_tx = round(result.postgres_cpu_seconds / tx * 1e6, 2)
        if result.copy_bytes:
            gb = result.copy_bytes / 1e9
            if result.proxy_cpu_seconds is not None:
                result.proxy_cpu_s_per_gb = round(result.proxy_cpu_seconds / gb, 3)
            if result.postgres_cpu_seconds is not None:
                result.postgres_cpu_s_per_gb = round(result.postgres_cpu_seconds / gb, 3)
        exit_status = target.exit_status()
        if exit_status is not None:
            result.ok = False
            died = f"{target.name} exited with code {exit_status} during the run"
            result.error = f"{died}; client: {result.error}" if result.error else died
            result.stderr_tail += f"\n--- {target.name} log tail\n{target.log_tail()}"
        return result

    def _write_log(
        self, log_name: str, header: str, code: int | None, stdout: str, stderr: str
    ) -> None:
        (self.out / "logs" / log_name).write_text(
            f"{header}\nexit code: {code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n"
        )

    # -- pgbench -------------------------------------------------------------------------

    def _run_pgbench(
        self, target: Target, scenario: Scenario, result: RunResult, duration: int, log_name: str
    ) -> None:
        tx_dir = self.out / "txlogs" / Path(log_name).stem
        shutil.rmtree(tx_dir, ignore_errors=True)
        tx_dir.mkdir(parents=True)
        cmd = self.pgbench_args(scenario, target.port, duration, tx_dir / "tx")
        result.command = cmd
        clients = self.clients_for(scenario)
        try:
            # Connecting hundreds of clients takes a while before -T starts counting.
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=client_env(scenario.sslmode),
                timeout=duration * 3 + 60 + clients // 5,
            )
            stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            stdout = _decode(exc.stdout)
            stderr = _decode(exc.stderr) + f"\npgbench killed after {exc.timeout:.0f}s timeout"
            code = None
            result.error = f"timeout: pgbench hung for {exc.timeout:.0f}s"
        self._write_log(
            log_name, f"$ PGSSLMODE={scenario.sslmode} {' '.join(cmd)}", code, stdout, stderr
        )
        result.exit_code = code
        result.stdout_tail, result.stderr_tail = tail(stdout), tail(stderr)
        parse_pgbench(stdout, result)
        latencies = read_tx_latencies_us(tx_dir)
        if not self.args.keep_tx_logs:
            shutil.rmtree(tx_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # OUT/txlogs itself, once empty
                tx_dir.parent.rmdir()
        result.tx_log_sampling = self.sampling_rate(scenario)
        result.latency_samples = len(latencies)
        if latencies:
            result.latency_p50_ms = percentile(latencies, 50) / 1000
            result.latency_p90_ms = percentile(latencies, 90) / 1000
            result.latency_p99_ms = percentile(latencies, 99) / 1000
            result.latency_max_ms = latencies[-1] / 1000
        if code == 0 and result.tps is not None:
            result.ok = True
        elif result.error is None:
            result.error = summarize_error(stderr, "" if code == 0 else stdout)
            if code == 0 and result.transactions == 0:
                seconds = cmd[cmd.index("-T") + 1]
                result.error = (f"no transaction within -T {seconds}: connecting {clients} "
                                "clients took all of it (machine busy?)")  # fmt: skip
            elif code == 0:
                result.error = "no tps in pgbench output"

    # -- COPY ----------------------------------------------------------------------------

    def _run_copy(self, target: Target, result: RunResult, log_name: str) -> None:
        """psql runs the COPY; its stdout comes to us through a pipe and is only counted."""
        rows = int(self.args.copy_rows)
        expected = copy_expected_bytes(rows)
        cmd = [
            self.psql,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            HOST,
            "-p",
            str(target.port),
            "-U",
            APP_USER,
            "-d",
            APP_DB,
            "-c",
            copy_sql(rows),
        ]
        result.command = cmd
        result.copy_rows = rows
        timeout = 60 + rows / 1e6 * 30  # 30 s per million rows (~100 MB) is 3 MB/s
        err_path = self.out / "logs" / f"{Path(log_name).stem}.stderr"
        received, code, error = 0, None, None
        buf = bytearray(1 << 20)
        started = time.monotonic()
        with open(err_path, "w+b") as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=client_env()
            )
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            with contextlib.suppress(OSError):  # fewer, larger reads; 1 MiB is the default max
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
            try:
                while True:
                    left = started + timeout - time.monotonic()
                    if left <= 0:
                        error = f"timeout: COPY still running after {timeout:.0f}s"
                        break
                    if not select.select([fd], [], [], min(left, 1.0))[0]:
                        continue
                    n = os.readv(fd, [buf])
                    if n == 0:
                        break
                    received += n
                if error is None:
                    code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                error = "psql did not exit within 30 s after its output ended"
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
            elapsed = time.monotonic() - started
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        err_path.unlink(missing_ok=True)
        summary = f"received {received:,} bytes (expected {expected:,}) in {elapsed:.3f} s"
        self._write_log(
            log_name, "$ " + " ".join([*cmd[:-2], "-c", repr(cmd[-1])]), code, summary, stderr
        )
        result.exit_code = code
        result.stderr_tail = tail(stderr)
        result.copy_bytes = received
        if error is None and code != 0:
            error = summarize_error(stderr) if stderr.strip() else f"psql exit code {code}"
        if error is None and received != expected:
            error = f"received {received:,} bytes, expected {expected:,}"
        if error is None:
            result.ok = True
            result.copy_seconds = round(elapsed, 3)
            result.copy_mb_per_s = round(received / 1e6 / elapsed, 1)
        result.error = error

    # -- idle clients --------------------------------------------------------------------

    def _run_idle(self, target: Target, result: RunResult, log_name: str) -> None:
        n = int(self.args.idle_clients)
        pid = target.pid()
        deadline = max(120.0, n * 0.02)
        cmd = [
            sys.executable,
            str(REPO / "bench" / "idle_clients.py"),
            "--json",
            "--port",
            str(target.port),
            "-n",
            str(n),
            "--deadline",
            f"{deadline:g}",
        ]
        if pid is not None:
            cmd += ["--pid", str(pid)]
        result.command = cmd
        result.idle_clients = n
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=client_env(),
                cwd=REPO,
                timeout=deadline + 180,
            )
            stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            stdout, stderr, code = _decode(exc.stdout), _decode(exc.stderr), None
            result.error = f"timeout: idle_clients.py still running after {exc.timeout:.0f}s"
        self._write_log(log_name, "$ " + " ".join(cmd), code, stdout, stderr)
        result.exit_code = code
        result.stdout_tail, result.stderr_tail = tail(stdout), tail(stderr)
        lines = stdout.strip().splitlines()
        try:
            data = json.loads(lines[-1]) if lines else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            result.error = result.error or summarize_error(stderr, stdout)
            return
        result.idle = data
        result.idle_connected = data.get("connected")
        result.idle_alive = data.get("alive_at_measurement")
        result.login_seconds = data.get("login_seconds")
        result.logins_per_second = data.get("logins_per_second")
        result.login_cpu_ms = data.get("pooler_cpu_ms_per_login")
        result.rss_before_kib = data.get("rss_before_kib")
        result.rss_with_clients_kib = data.get("rss_with_clients_kib")
        result.rss_after_close_kib = data.get("rss_after_close_kib")
        result.rss_per_client_kib = data.get("rss_per_client_kib")
        result.pss_per_client_kib = data.get("pss_per_client_kib")
        if result.idle_connected != n:
            result.error = (
                f"{result.idle_connected}/{n} clients logged in; first error: "
                f"{data.get('first_error')}"
            )
        elif result.idle_alive != n:
            result.error = f"only {result.idle_alive}/{n} clients still connected when measured"
        elif result.rss_per_client_kib is None:
            result.error = "no memory reading of the pooler process"
        else:
            result.ok = True
