"""Results of the bench runs and how they are shown: the per-run record, the aggregate over
rounds, and the Markdown tables (one per kind of scenario, plus CPU per transaction)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.targets import Target, short

# -- one run ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """One measured run of one scenario against one target; all of it goes to results.json.

    Which fields are set depends on ``kind`` (see ``bench/workloads.py``): pgbench runs fill
    tps and latencies, copy runs the ``copy_*`` fields, idle runs the login and memory ones.
    """

    round: int
    scenario: str
    target: str
    position: int
    command: list[str]
    sslmode: str = "disable"  # PGSSLMODE of the run
    kind: str = "pgbench"
    exit_code: int | None = None
    ok: bool = False
    error: str | None = None
    # pgbench's own report
    tps: float | None = None
    latency_ms: float | None = None
    latency_stddev_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    initial_connection_ms: float | None = None
    average_connection_ms: float | None = None
    # from pgbench's per-transaction log (a sample of tx_log_sampling of the transactions)
    tx_log_sampling: float | None = None
    latency_samples: int | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    # copy-out
    copy_rows: int | None = None
    copy_bytes: int | None = None
    copy_seconds: float | None = None
    copy_mb_per_s: float | None = None
    proxy_cpu_s_per_gb: float | None = None
    postgres_cpu_s_per_gb: float | None = None
    # idle-clients (all of idle_clients.py's JSON is in ``idle``)
    idle_clients: int | None = None
    idle_connected: int | None = None
    idle_alive: int | None = None
    login_seconds: float | None = None
    logins_per_second: float | None = None
    login_cpu_ms: float | None = None
    rss_before_kib: int | None = None
    rss_with_clients_kib: int | None = None
    rss_after_close_kib: int | None = None
    rss_per_client_kib: float | None = None
    pss_per_client_kib: float | None = None
    idle: dict[str, Any] | None = None
    # all kinds
    wall_seconds: float | None = None
    proxy_cpu_seconds: float | None = None
    proxy_cpu_us_per_tx: float | None = None
    postgres_cpu_seconds: float | None = None
    postgres_cpu_us_per_tx: float | None = None
    notes: list[str] = field(default_factory=list)
    stdout_tail: str = ""
    stderr_tail: str = ""


# Numeric RunResult fields aggregated over the good rounds of a cell.
METRICS = (
    "tps", "latency_ms", "average_connection_ms", "latency_p50_ms", "latency_p90_ms",
    "latency_p99_ms", "latency_max_ms", "proxy_cpu_us_per_tx", "postgres_cpu_us_per_tx",
    "copy_mb_per_s", "copy_seconds", "proxy_cpu_s_per_gb", "postgres_cpu_s_per_gb",
    "login_seconds", "logins_per_second", "login_cpu_ms", "rss_before_kib",
    "rss_with_clients_kib", "rss_after_close_kib", "rss_per_client_kib", "pss_per_client_kib",
    "idle_connected",
)  # fmt: skip


# -- aggregate -------------------------------------------------------------------------


@dataclass
class Cell:
    """Aggregate over rounds of one (scenario, target): the metrics of its good runs."""

    runs: int = 0
    ok: int = 0
    values: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def get(self, metric: str) -> list[float]:
        return self.values.get(metric, [])

    def median(self, metric: str) -> float | None:
        xs = self.get(metric)
        return statistics.median(xs) if xs else None

    @property
    def tps_median(self) -> float | None:
        return self.median("tps")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"runs": self.runs, "ok": self.ok, "failed": self.runs - self.ok}
        for metric, xs in self.values.items():
            out[f"{metric}_median"] = round(statistics.median(xs), 3)
            out[f"{metric}_min"], out[f"{metric}_max"] = min(xs), max(xs)
        out["first_error"] = self.errors[0] if self.errors else None
        return out


def aggregate(runs: list[RunResult]) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    for r in runs:
        cell = cells.setdefault((r.scenario, r.target), Cell())
        cell.runs += 1
        if not r.ok:
            cell.errors.append(r.error or "failed")
            continue
        cell.ok += 1
        for metric in METRICS:
            value = getattr(r, metric)
            if value is not None:
                cell.values.setdefault(metric, []).append(float(value))
    return cells


# -- formatting ------------------------------------------------------------------------


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def fmt_num(values: list[float], digits: int = 2) -> str:
    """Median with the min-max spread when there are several values."""
    if not values:
        return "—"
    med = statistics.median(values)
    text = f"{med:,.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    return text


def fmt_metric(cell: Cell | None, metric: str, start_error: str | None, digits: int = 0,
               scale: float = 1.0) -> str:  # fmt: skip
    """The main number of a cell: median (min-max), or why there is none."""
    if cell is None or cell.runs == 0:
        return _md(f"FAIL ({short(start_error, 120)})") if start_error else "—"
    values = [v * scale for v in cell.get(metric)]
    if not values:
        return _md(f"FAIL ({short(cell.errors[0], 70)})") if cell.errors else "—"
    text = fmt_num(values, digits)
    failed = cell.runs - cell.ok
    if failed:
        text += f" ⚠ {failed}/{cell.runs} FAIL ({short(cell.errors[0], 60)})"
    return _md(text)


def fmt_latency(cell: Cell | None) -> str:
    """Latency average; for connect-per-transaction also pgbench's average connection time."""
    if cell is None:
        return "—"
    text = fmt_num(cell.get("latency_ms"))
    connect = cell.median("average_connection_ms")
    if connect is not None:
        text += f" (connect {connect:.2f})"
    return text


def fmt_ratio(num: Cell | None, den: Cell | None, metric: str = "tps") -> str:
    a = num.median(metric) if num else None
    b = den.median(metric) if den else None
    return f"{a / b:.2f}" if a and b else "—"


def fmt_added(cell: Cell | None, base: Cell | None, metric: str, scale: float = 1.0) -> str:
    """What a target adds over the baseline (medians), e.g. ``+85``."""
    a = cell.median(metric) if cell else None
    b = base.median(metric) if base else None
    return "—" if a is None or b is None else f"{(a - b) * scale:+,.0f}"


# -- the report ------------------------------------------------------------------------


def _scenarios_of(params: dict[str, Any], *kinds: str) -> list[str]:
    found: list[str] = params["scenarios"]
    return [s for s in found if params.get("scenario_kinds", {}).get(s, "pgbench") in kinds]


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
        f"{params['clients']} clients (connect scenarios: {params['connect_clients']}, "
        f"scenarios named -N: N), {params['jobs']} jobs, pool size {params['pool_size']}, "
        f"scale {params['scale']}.  ",
        f"{machine.get('nproc')} CPU ({machine.get('cpu_model')}), "
        f"PostgreSQL {machine.get('postgresql')}, PgBouncer {machine.get('pgbouncer') or '—'}, "
        f"Python {machine.get('python')}, pgmux {commit} "
        f"({machine.get('pgmux_scanner', '?')} stream scanner).",
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
    chart = report.get("chart")
    if chart:
        lines += ["", f"Chart: {_md(chart)}"]

    def cell(scen: str, name: str) -> Cell | None:
        return cells.get((scen, name))

    both = "pgmux" in names and "pgbouncer" in names
    vs_direct = "pgmux" in names and "direct" in names
    throughput = _scenarios_of(params, "pgbench")
    if throughput:
        lines += [
            "",
            "### Throughput",
            "",
            "tps: median over rounds (min-max). Ratios: of median tps. lat ms: pgbench's "
            "average latency (connect scenarios: plus its average connection time). p99 ms: "
            "from pgbench's per-transaction log (a sample; see results.json), median over "
            "rounds.",
            "",
        ]
        header = ["scenario", "clients", *(f"{n} tps" for n in names)]
        header += ["pgmux/pgbouncer"] * both + ["pgmux/direct"] * vs_direct
        header += [f"{n} lat ms" for n in names] + [f"{n} p99 ms" for n in names]
        rows = []
        for scen in throughput:
            row = [scen, str(params.get("scenario_clients", {}).get(scen, "?"))]
            row += [fmt_metric(cell(scen, n), "tps", start_errors[n]) for n in names]
            row += [fmt_ratio(cell(scen, "pgmux"), cell(scen, "pgbouncer"))] * both
            row += [fmt_ratio(cell(scen, "pgmux"), cell(scen, "direct"))] * vs_direct
            row += [fmt_latency(cell(scen, n)) for n in names]
            row += [fmt_num((cell(scen, n) or Cell()).get("latency_p99_ms")) for n in names]
            rows.append(row)
        lines += _table(header, rows)

    for scen in _scenarios_of(params, "latency"):
        lines += [
            "",
            f"### Latency at a fixed rate: {scen}",
            "",
            f"pgbench -S -M simple -R {params.get('rate')} -c {params.get('rate_clients')}: "
            "every transaction's latency from pgbench's per-transaction log (µs, counted "
            "from the scheduled start, so queueing behind a slow one counts), median "
            "over rounds (min-max). added: the target's median minus direct's.",
            "",
        ]
        header = [
            "target",
            "tps",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "max µs",
            "added p50 µs",
            "added p99 µs",
        ]
        base = cell(scen, "direct")
        rows = []
        for n in names:
            c = cell(scen, n)
            rows.append(
                [
                    n,
                    fmt_metric(c, "tps", start_errors[n]),
                    *(
                        fmt_metric(c, m, start_errors[n], scale=1000)
                        for m in (
                            "latency_p50_ms",
                            "latency_p90_ms",
                            "latency_p99_ms",
                            "latency_max_ms",
                        )
                    ),
                    "—" if n == "direct" else fmt_added(c, base, "latency_p50_ms", 1000),
                    "—" if n == "direct" else fmt_added(c, base, "latency_p99_ms", 1000),
                ]
            )
        lines += _table(header, rows)

    for scen in _scenarios_of(params, "copy"):
        rows_n = params.get("copy_rows") or 0
        lines += [
            "",
            f"### Large result: {scen}",
            "",
            f"COPY of {rows_n:,} rows ({_copy_mb(runs, scen)} MB of text) TO STDOUT "
            "through psql, its output counted by the bench; MB = 10^6 bytes, over psql's "
            "whole run (login included). CPU: seconds per GB copied.",
            "",
        ]
        header = ["target", "MB/s", "vs direct", "seconds", "pooler CPU s/GB", "postgres CPU s/GB"]
        base = cell(scen, "direct")
        rows = []
        for n in names:
            c = cell(scen, n)
            rows.append(
                [
                    n,
                    fmt_metric(c, "copy_mb_per_s", start_errors[n]),
                    "—" if n == "direct" else fmt_ratio(c, base, "copy_mb_per_s"),
                    fmt_num((c or Cell()).get("copy_seconds")),
                    "—" if n == "direct" else fmt_num((c or Cell()).get("proxy_cpu_s_per_gb")),
                    fmt_num((c or Cell()).get("postgres_cpu_s_per_gb")),
                ]
            )
        lines += _table(header, rows)

    for scen in _scenarios_of(params, "idle"):
        lines += [
            "",
            f"### Idle clients: {scen}",
            "",
            f"{params.get('idle_clients'):,} clients log in (SCRAM) and stay idle; the "
            "pooler's resident memory (VmRSS of its process tree) before and with them. "
            "KiB/client = (with - before) / clients; PSS splits pages shared between "
            "processes. Each run starts from a freshly restarted pooler (one smoke login); "
            "not run against PostgreSQL direct.",
            "",
        ]
        header = [
            "target",
            "logged in",
            "login s",
            "logins/s",
            "pooler CPU ms/login",
            "RSS before MiB",
            "RSS with clients MiB",
            "RSS KiB/client",
            "PSS KiB/client",
        ]
        rows = []
        for n in names:
            c = cell(scen, n)
            if c is None and n == "direct":
                continue
            rows.append(
                [
                    n,
                    fmt_metric(c, "idle_connected", start_errors[n]),
                    fmt_num((c or Cell()).get("login_seconds"), 2),
                    fmt_num((c or Cell()).get("logins_per_second"), 0),
                    fmt_num((c or Cell()).get("login_cpu_ms"), 3),
                    fmt_num([v / 1024 for v in (c or Cell()).get("rss_before_kib")], 1),
                    fmt_num([v / 1024 for v in (c or Cell()).get("rss_with_clients_kib")], 1),
                    fmt_num((c or Cell()).get("rss_per_client_kib"), 1),
                    fmt_num((c or Cell()).get("pss_per_client_kib"), 1),
                ]
            )
        lines += _table(header, rows)

    per_tx = _scenarios_of(params, "pgbench", "latency")
    if per_tx:
        proxies = [n for n in names if n != "direct"]
        header = [
            "scenario",
            *(f"{n} proc µs/tx" for n in proxies),
            *(f"postgres µs/tx via {n}" for n in names),
        ]
        lines += [
            "",
            "### CPU time per transaction",
            "",
            "µs, median over rounds; from /proc utime+stime, 10 ms ticks.",
            "",
        ]
        rows = []
        for scen in per_tx:
            of = {n: cells.get((scen, n), Cell()) for n in names}
            rows.append(
                [
                    scen,
                    *(fmt_num(of[n].get("proxy_cpu_us_per_tx"), 1) for n in proxies),
                    *(fmt_num(of[n].get("postgres_cpu_us_per_tx"), 1) for n in names),
                ]
            )
        lines += _table(header, rows)

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


def _copy_mb(runs: list[RunResult], scenario: str) -> str:
    sizes = [r.copy_bytes for r in runs if r.scenario == scenario and r.ok and r.copy_bytes]
    return f"{sizes[0] / 1e6:,.0f}" if sizes else "?"
