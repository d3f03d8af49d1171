"""Results of the bench runs and how they are shown: the per-run record, the aggregate over
rounds, and the Markdown tables."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.targets import Target, short

# -- one run ---------------------------------------------------------------------------


@dataclass
class RunResult:
    """One measured run of one scenario against one target; all of it goes to results.json."""

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
