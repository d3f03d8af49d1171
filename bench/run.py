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
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from support.pgcluster import APP_DB, APP_USER, PgCluster, find_client_tool  # noqa: E402

from bench.chart import write_chart  # noqa: E402
from bench.procstat import raise_fd_limit  # noqa: E402
from bench.report import RunResult, aggregate, render  # noqa: E402
from bench.targets import (  # noqa: E402
    HOST,
    DirectTarget,
    PgbouncerTarget,
    PgmuxTarget,
    ProcessTarget,
    Target,
    TargetError,
    client_env,
    pgbouncer_binary,
    run_text,
    short,
    tail,
)
from bench.workloads import SCENARIOS, Bench, Kind, Scenario, clients_for  # noqa: E402
from proxy.protocol.stream import SCANNER  # noqa: E402

if TYPE_CHECKING:
    from support.certs import CertFiles

ALL_TARGETS = ("direct", "pgmux", "pgbouncer")


# -- small helpers ---------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """Raised from the SIGTERM/SIGHUP handler so cleanup runs as for Ctrl-C."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"received {signal.Signals(signum).name}")


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
        # The same interpreter and tree run pgmux: C when _scan.c was built, else Python.
        "pgmux_scanner": SCANNER,
    }


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


# Defaults of the flags --quick changes: (full run, --quick). Flags given explicitly win.
RUN_SIZE = {
    "duration": (10, 3),
    "rounds": (3, 1),
    "warmup": (2, 1),
    "idle_clients": (10000, 500),
    "copy_rows": (10_000_000, 1_000_000),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not the None/False of flags whose help says what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="pgmux side by side with PostgreSQL direct and PgBouncer: pgbench "
        "throughput and latency, idle clients' memory, COPY throughput.",
        formatter_class=_HelpFormatter,
    )

    def sized(name: str) -> str:
        full, quick = RUN_SIZE[name]
        return f"(default: {full:,}; with --quick: {quick:,})"

    p.add_argument("--duration", type=int, default=None,
                   help=f"seconds per pgbench run {sized('duration')}")  # fmt: skip
    p.add_argument("--rounds", type=int, default=None,
                   help=f"interleaved rounds {sized('rounds')}")  # fmt: skip
    p.add_argument("--pool-size", type=int, default=20, help="server pool size (both poolers)")
    p.add_argument("--pgmux-workers", type=int, default=1,
                   help="pgmux's `workers` (processes sharing the port; the pool is split "
                   "between them, so PostgreSQL still sees --pool-size connections)")  # fmt: skip
    p.add_argument("--clients", type=int, default=50,
                   help="pgbench -c for select-simple/-extended/-prepared and tpcb")  # fmt: skip
    p.add_argument("--connect-clients", type=int, default=20,
                   help="pgbench -c for 'connect' and 'connect-tls'")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j")
    p.add_argument("--rate", type=int, default=2000,
                   help="pgbench -R (transactions per second) of the latency scenario")  # fmt: skip
    p.add_argument("--rate-clients", type=int, default=10,
                   help="pgbench -c of the latency scenario")  # fmt: skip
    p.add_argument("--tx-log-sampling", type=float, default=0.1,
                   help="share of transactions pgbench logs for the p50/p99 of the throughput "
                        "scenarios (connect and latency scenarios log all)")  # fmt: skip
    p.add_argument("--keep-tx-logs", action="store_true",
                   help="keep pgbench's per-transaction logs in OUT/txlogs/")  # fmt: skip
    p.add_argument(
        "--idle-clients",
        type=int,
        default=None,
        help=f"clients of the idle-clients scenario {sized('idle_clients')}",
    )
    p.add_argument("--copy-rows", type=int, default=None,
                   help=f"rows of the copy-out scenario, ~109 bytes each "
                        f"{sized('copy_rows')}")  # fmt: skip
    p.add_argument(
        "--targets",
        default=None,
        help=f"comma list of {','.join(ALL_TARGETS)} (default: all available)",
    )
    p.add_argument("--scenarios", default=None,
                   help=f"comma list of {','.join(SCENARIOS)} (default: all; connect-tls only "
                        "when the cryptography package can make its certificates)")  # fmt: skip
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor")
    p.add_argument("--warmup", type=int, default=None,
                   help="seconds of unrecorded select-simple per target before round 1 (0: none) "
                        f"{sized('warmup')}")  # fmt: skip
    p.add_argument(
        "--pgbouncer-auth",
        choices=("scram", "plain"),
        default="scram",
        help="auth_file content: SCRAM secret from pg_authid, or plaintext password",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="result dir (default: bench/results/<timestamp>/)"
    )
    p.add_argument("--quick", action="store_true",
                   help="smoke run of every scenario: 1 round of 3 s, 500 idle clients, 1M COPY "
                        "rows (explicit flags win)")  # fmt: skip
    args = p.parse_args(argv)
    for name, (full, quick) in RUN_SIZE.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
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
           args.connect_clients, args.scale, args.rate, args.rate_clients, args.idle_clients,
           args.copy_rows) < 1:  # fmt: skip
        p.error("numeric options must be >= 1")
    if args.warmup < 0 or not 0 < args.tx_log_sampling <= 1:
        p.error("--warmup must be >= 0 and --tx-log-sampling in (0, 1]")
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
    report["params"]["scenario_kinds"] = {s: str(SCENARIOS[s].kind) for s in args.scenarios}
    report["params"]["scenario_clients"] = {s: clients_for(SCENARIOS[s], args)
                                            for s in args.scenarios}  # fmt: skip
    for name, why in args.skipped_scenarios.items():
        log(f"skipping scenario {name}: {why}")

    def save() -> None:
        report["runs"] = [asdict(r) for r in runs]
        report["targets"] = {t.name: {**t.info(), "log_tail": t.log_tail() if t.start_error
                                      else None} for t in targets}  # fmt: skip
        cells = aggregate(runs)
        report["summary"] = {f"{s}/{t}": c.summary() for (s, t), c in cells.items()}
        (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    # One descriptor per client connection, in pgbench, in the idle client and in the
    # poolers (our children inherit the limit); PostgreSQL uses max_files_per_process.
    idle = any(SCENARIOS[s].kind is Kind.IDLE for s in args.scenarios)
    wanted = max([clients_for(SCENARIOS[s], args) for s in args.scenarios] + [0]) * 2 + 1024
    report["params"]["fd_limit"] = raise_fd_limit(wanted)
    if report["params"]["fd_limit"] < wanted:
        log(f"file descriptor limit {report['params']['fd_limit']} < {wanted} wanted: "
            "the runs with most clients may fail")  # fmt: skip
    max_client_conn = max(10000, args.idle_clients + 100 if idle else 0)

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
            # Every pgbench client direct is a backend; both poolers hold their pools too.
            direct_clients = [clients_for(SCENARIOS[s], args) for s in args.scenarios
                              if SCENARIOS[s].applies_to("direct")]  # fmt: skip
            max_conn = max(300, max(direct_clients, default=0) + 2 * args.pool_size + 50)
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
                    target = PgmuxTarget(cluster, out, args.pool_size, certs, max_client_conn)
                    target.workers = args.pgmux_workers
                else:
                    bouncer = PgbouncerTarget(cluster, out, args.pool_size, args.pgbouncer,
                                              args.pgbouncer_auth, certs,
                                              max_client_conn)  # fmt: skip
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
            total = args.rounds * sum(SCENARIOS[s].applies_to(t.name) for s in args.scenarios
                                      for t in live)  # fmt: skip
            n = 0
            for rnd in range(1, args.rounds + 1):
                shift = (rnd - 1) % len(live) if live else 0
                order = live[shift:] + live[:shift]
                for scen_name in args.scenarios:
                    scenario = SCENARIOS[scen_name]
                    for pos, target in enumerate(order):
                        if not scenario.applies_to(target.name):
                            continue
                        n += 1
                        result = run_one(bench, target, scenario, rnd, pos, args.duration)
                        runs.append(result)
                        save()
                        log(f"[{n}/{total}] round {rnd} {scen_name:<19} {target.name:<9} "
                            f"{describe_run(result)}")  # fmt: skip
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
                if cluster is not None and report["machine"] and runs:
                    skipped = write_chart(out / "chart.png", report["params"], aggregate(runs),
                                          [t.name for t in targets])  # fmt: skip
                    report["chart"] = skipped or "chart.png"
                    log(f"chart: {skipped or out / 'chart.png'}")
                save()
                if cluster is not None and report["machine"]:
                    text = render(report, runs, targets)
                    (out / "results.md").write_text(text)
                    print(text, flush=True)
                log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return exit_code


def describe_run(r: RunResult) -> str:
    """One progress line's worth of a run."""
    if not r.ok:
        return f"FAIL ({short(r.error or '', 100)})"
    if r.kind == Kind.COPY:
        return f"{r.copy_mb_per_s:,.0f} MB/s ({r.copy_bytes or 0:,} bytes in {r.copy_seconds} s)"
    if r.kind == Kind.IDLE:
        return (f"{r.idle_connected} clients: RSS {(r.rss_before_kib or 0) / 1024:,.1f} -> "
                f"{(r.rss_with_clients_kib or 0) / 1024:,.1f} MiB, {r.rss_per_client_kib} "
                f"KiB/client; login {r.login_seconds} s")  # fmt: skip
    return (f"{r.tps or 0:,.0f} tps, avg {r.latency_ms} ms, p50 {r.latency_p50_ms} ms, "
            f"p99 {r.latency_p99_ms} ms")  # fmt: skip


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
            return RunResult(rnd, scenario.name, target.name, pos, [], scenario.sslmode,
                             kind=str(scenario.kind), ok=False,
                             error=f"{target.name} restart failed: {exc}", notes=notes,
                             stderr_tail=target.log_tail())  # fmt: skip
    log_name = f"r{rnd}-{scenario.name}-{target.name}.log"
    result = bench.run(target, scenario, rnd, pos, duration, log_name)
    result.notes[:0] = notes
    return result


if __name__ == "__main__":
    sys.exit(main())
