#!/usr/bin/env python3
"""What observability costs under load: pgbench tps through pgmux with /metrics off,
on but not scraped, and scraped every second (plus SHOW POOLS / SHOW CLIENTS in the
admin console every second), in interleaved rounds on one PostgreSQL.

Prints a Markdown table (median tps over rounds, min-max, pgmux CPU per transaction)
and how long a scrape took. The counters themselves are bumped in every variant: they
feed the admin console too, so their cost is what ``bench/relay_cpu.py`` measures
(A/B two checkouts of pgmux with it).

    .venv/bin/python bench/metrics_overhead.py                  # 3 rounds x 10 s
    .venv/bin/python bench/metrics_overhead.py --rounds 1 --seconds 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import psycopg  # noqa: E402
from support.pgcluster import APP_DB, APP_USER, PgCluster, find_client_tool, free_port  # noqa: E402
from support.pgmux import PgmuxProcess, deep_merge, default_config  # noqa: E402

from bench.procstat import proc_tree_cpu_seconds  # noqa: E402

VARIANTS = ("metrics off", "metrics on", "scraped every 1 s")
ADMIN_PASSWORD = "adminpw"


class Scraper(threading.Thread):
    """GET /metrics and run SHOW POOLS + SHOW CLIENTS once a second until stopped."""

    def __init__(self, pgmux: PgmuxProcess) -> None:
        super().__init__(daemon=True)
        self.pgmux = pgmux
        self.stop = threading.Event()
        self.scrape_ms: list[float] = []
        self.show_ms: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        url = f"http://127.0.0.1:{self.pgmux.config['metrics']['listen_port']}/metrics"
        admin = psycopg.connect(
            self.pgmux.conninfo("admin", ADMIN_PASSWORD, "pgbouncer"), autocommit=True
        )
        try:
            while not self.stop.wait(1.0):
                try:
                    started = time.perf_counter()
                    with urllib.request.urlopen(url, timeout=10) as response:
                        response.read()
                    self.scrape_ms.append((time.perf_counter() - started) * 1000)
                    started = time.perf_counter()
                    admin.execute("SHOW POOLS").fetchall()
                    admin.execute("SHOW CLIENTS").fetchall()
                    self.show_ms.append((time.perf_counter() - started) * 1000)
                except Exception as exc:  # reported, and the run counts as failed
                    self.errors.append(repr(exc))
        finally:
            admin.close()


def start_pgmux(cluster: PgCluster, workdir: Path, variant: str, pool: int) -> PgmuxProcess:
    config = deep_merge(
        default_config(cluster, free_port()),
        {
            "default_pool_size": pool,
            "max_client_conn": 2000,
            "query_wait_timeout": 120,
            "log_connections": False,
            "log_disconnections": False,
            "server_tls_sslmode": "disable",
            "users": {"admin": {"password": ADMIN_PASSWORD}},
            "metrics": {"enabled": variant != "metrics off"},
        },
    )
    return PgmuxProcess.start(config, workdir / variant.replace(" ", "-"))


def pgbench(pgmux: PgmuxProcess, clients: int, seconds: int) -> float:
    env = dict(os.environ, PGPASSWORD="secret", PGSSLMODE="disable")
    proc = subprocess.run(
        [find_client_tool("pgbench"), "-n", "-S", "-M", "simple", "-c", str(clients),
         "-j", "2", "-T", str(seconds), "-h", pgmux.host, "-p", str(pgmux.port),
         "-U", APP_USER, APP_DB],
        capture_output=True, text=True, env=env, timeout=seconds + 120, check=False,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench failed: {proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--scale", type=int, default=10)
    args = parser.parse_args()

    cluster = PgCluster.create({"max_connections": "300"})
    workdir = Path(tempfile.mkdtemp(prefix="pgmux-bench-metrics-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    scrape_ms: list[float] = []
    show_ms: list[float] = []
    try:
        env = dict(os.environ, PGPASSWORD="secret")
        subprocess.run(
            [find_client_tool("pgbench"), "-i", "-q", "-s", str(args.scale), "-h", cluster.host,
             "-p", str(cluster.port), "-U", APP_USER, APP_DB],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        for rnd in range(args.rounds):
            order = VARIANTS[rnd % 3 :] + VARIANTS[: rnd % 3]  # rotate who goes first
            for variant in order:
                pgmux = start_pgmux(cluster, workdir, variant, args.pool)
                scraper = None
                try:
                    pgbench(pgmux, args.clients, 1)  # warm up: servers open, caches hot
                    if variant == "scraped every 1 s":
                        scraper = Scraper(pgmux)
                        scraper.start()
                    cpu0 = proc_tree_cpu_seconds(pgmux.pid) or 0.0
                    tps = pgbench(pgmux, args.clients, args.seconds)
                    cpu = (proc_tree_cpu_seconds(pgmux.pid) or 0.0) - cpu0
                finally:
                    if scraper is not None:
                        scraper.stop.set()
                        scraper.join(15)
                    pgmux.stop()
                if scraper is not None:
                    if scraper.errors:
                        raise RuntimeError(f"scrapes failed: {scraper.errors[:3]}")
                    scrape_ms += scraper.scrape_ms
                    show_ms += scraper.show_ms
                us_per_tx = cpu / (tps * args.seconds) * 1e6 if tps else 0.0
                results[variant].append({"tps": tps, "cpu_us_per_tx": us_per_tx})
                print(f"round {rnd + 1} {variant:18} {tps:9.0f} tps  {us_per_tx:5.1f} µs CPU/tx",
                      flush=True)  # fmt: skip
    finally:
        with contextlib.suppress(Exception):
            cluster.destroy()
    base = statistics.median(r["tps"] for r in results["metrics off"])
    print(f"\npgbench -S -M simple, {args.clients} clients, pool {args.pool}, "
          f"{args.rounds} rounds x {args.seconds} s\n")  # fmt: skip
    print("| variant | tps (median) | min-max | vs off | pgmux CPU µs/tx |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        tps = [r["tps"] for r in results[variant]]
        cpu = statistics.median(r["cpu_us_per_tx"] for r in results[variant])
        median = statistics.median(tps)
        print(f"| {variant} | {median:,.0f} | {min(tps):,.0f}-{max(tps):,.0f} | "
              f"{median / base:.3f} | {cpu:.1f} |")  # fmt: skip
    if scrape_ms:
        print(f"\n/metrics scrape: median {statistics.median(scrape_ms):.1f} ms, "
              f"max {max(scrape_ms):.1f} ms over {len(scrape_ms)} scrapes; SHOW POOLS + "
              f"SHOW CLIENTS: median {statistics.median(show_ms):.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
