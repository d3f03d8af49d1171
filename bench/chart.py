"""The bench's chart.png: tps and p99 latency by scenario and target, plus COPY MB/s and the
idle clients' memory when those ran. matplotlib is optional (``pip install -e '.[bench]'``):
without it the bench still runs and says the chart was skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.report import Cell

COLORS = {"direct": "#7f7f7f", "pgmux": "#1f77b4", "pgbouncer": "#ff7f0e"}

# (title, y label, metric, log scale, number format, scenario kinds)
PANELS = (
    ("Throughput (higher is better)", "tps", "tps", True, "{:,.0f}", ("pgbench",)),
    ("p99 latency (lower is better)", "ms", "latency_p99_ms", True, "{:.2f}",
     ("pgbench", "latency")),
    ("COPY out (higher is better)", "MB/s", "copy_mb_per_s", False, "{:,.0f}", ("copy",)),
    ("Memory per idle client (lower is better)", "KiB RSS / client", "rss_per_client_kib",
     False, "{:.1f}", ("idle",)),
)  # fmt: skip


def write_chart(
    path: Path, params: dict[str, Any], cells: dict[tuple[str, str], Cell], targets: list[str]
) -> str | None:
    """Draw the panels that have data into ``path``; None when written, else why not."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "skipped: matplotlib is not installed (.venv/bin/pip install -e '.[bench]')"

    kinds: dict[str, str] = params.get("scenario_kinds", {})
    panels = []
    for title, ylabel, metric, log, fmt, panel_kinds in PANELS:
        scenarios = [s for s in params["scenarios"] if kinds.get(s, "pgbench") in panel_kinds]
        if any(cells.get((s, t)) and cells[(s, t)].get(metric) for s in scenarios for t in targets):
            panels.append((title, ylabel, metric, log, fmt, scenarios))
    if not panels:
        return "skipped: no successful run to draw"

    # tps and p99 (one bar group per scenario) get a row each; COPY and idle share the last.
    wide = [p for p in panels if p[2] in ("tps", "latency_p99_ms")]
    small = [p for p in panels if p[2] not in ("tps", "latency_p99_ms")]
    rows = len(wide) + (1 if small else 0)
    fig = plt.figure(figsize=(13, 4.2 * rows), layout="constrained")
    grid = fig.add_gridspec(rows, max(1, len(small)))
    axes = [fig.add_subplot(grid[i, :]) for i in range(len(wide))]
    axes += [fig.add_subplot(grid[rows - 1, j]) for j in range(len(small))]
    for ax, (title, ylabel, metric, log, fmt, scenarios) in zip(axes, wide + small, strict=True):
        shown = [t for t in targets if any(cells.get((s, t)) for s in scenarios)]
        everything = [v for s in scenarios for t in shown
                      for v in (cells[(s, t)].get(metric) if (s, t) in cells else [])]  # fmt: skip
        # A log axis only where the values span more than a factor 20 (tps: connect vs select).
        log = log and max(everything) > 20 * max(min(everything), 1e-9)
        spread = False
        width = 0.8 / max(1, len(shown))
        for i, target in enumerate(shown):
            xs, meds, lows, highs, labels = [], [], [], [], []
            for x, scen in enumerate(scenarios):
                cell = cells.get((scen, target))
                values = cell.get(metric) if cell else []
                pos = x - 0.4 + width * (i + 0.5)
                if not values:
                    if cell is not None:  # ran, but no good round: say so where the bar would be
                        ax.text(
                            pos,
                            0.02,
                            "fail",
                            transform=ax.get_xaxis_transform(),
                            ha="center",
                            fontsize=7,
                            rotation=90,
                            color=COLORS.get(target),
                        )
                    continue
                med = cell.median(metric) if cell else None
                assert med is not None
                xs.append(pos)
                meds.append(med)
                lows.append(med - min(values))
                highs.append(max(values) - med)
                spread = spread or len(values) > 1
                labels.append(fmt.format(med))
            bars = ax.bar(
                xs,
                meds,
                width,
                label=target,
                color=COLORS.get(target),
                yerr=[lows, highs] if spread else None,
                capsize=2,
                error_kw={"elinewidth": 0.8},
            )
            ax.bar_label(bars, labels=labels, fontsize=6, rotation=90, padding=2)
        ax.set_title(title)
        ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
        ax.set_xticks(
            range(len(scenarios)),
            scenarios,
            rotation=20 if len(scenarios) > 4 else 0,
            ha="right" if len(scenarios) > 4 else "center",
            fontsize=8,
        )
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.25)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"pgmux bench (median over rounds, bars: min-max) — pool size {params.get('pool_size')}"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
