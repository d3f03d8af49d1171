"""The stats line logged every ``stats_period`` (``log_stats``), like PgBouncer's: rates
and average times over the last period, for the whole instance, plus what is queued
and held right now."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .snapshot import NoSnapshot, Snapshot
from .stats import PERIOD_FIELDS

log = logging.getLogger("pgmux.stats")


class StatsLog:
    """Remembers the totals at the last line, so each line covers one period (the
    first: from ``started``, when every counter was zero)."""

    def __init__(self, started: float) -> None:
        self.last: tuple[float, dict[str, float]] | None = (
            started,
            dict.fromkeys(PERIOD_FIELDS, 0.0),
        )

    def line(self, snap: Snapshot) -> str | None:
        pools = [p for p in snap["pools"] if not p.get("admin")]
        totals = {k: sum(p["totals"][k] for p in pools) for k in PERIOD_FIELDS}
        now = snap["time"]
        last, self.last = self.last, (now, totals)
        if last is None or now <= last[0]:
            return None
        length = now - last[0]
        # A worker that restarted starts from zero: never report a negative rate.
        d = {k: max(0.0, totals[k] - last[1][k]) for k in PERIOD_FIELDS}

        def per_event(time_key: str, count_key: str) -> int:
            return int(d[time_key] * 1e6 / d[count_key]) if d[count_key] else 0

        clients = sum(p["cl_active"] + p["cl_waiting"] for p in pools)
        waiting = sum(p["cl_waiting"] for p in pools)
        active = sum(p["sv_active"] for p in pools)
        idle = sum(p["sv_idle"] + p["sv_used"] for p in pools)
        return (
            f"stats: {d['xact_count'] / length:.0f} xacts/s, "
            f"{d['query_count'] / length:.0f} queries/s, "
            f"{d['client_parses'] / length:.0f} client parses/s, "
            f"{d['server_parses'] / length:.0f} server parses/s, "
            f"{d['binds'] / length:.0f} binds/s, "
            f"in {d['bytes_received'] / length:.0f} B/s, out {d['bytes_sent'] / length:.0f} B/s, "
            f"xact {per_event('xact_time', 'xact_count')} us, "
            f"query {per_event('query_time', 'query_count')} us, "
            f"wait {per_event('wait_time', 'server_assignments')} us; "
            f"clients {clients} ({waiting} waiting), servers {active} active, {idle} idle"
        )


async def run_stats_log(
    source: Callable[[], Awaitable[Snapshot]], period: Callable[[], float],
    enabled: Callable[[], bool],
) -> None:  # fmt: skip
    """Log the stats line every period (re-read each time: a reload may change it)."""
    stats = StatsLog(time.time())
    while True:
        await asyncio.sleep(period())
        try:
            line = stats.line(await source())
        except NoSnapshot as exc:
            log.info("no stats line this period: %s", exc)
            continue
        except Exception:  # a bug here must not end the stats lines
            log.exception("stats line failed")
            continue
        if line is not None and enabled():
            log.info("%s", line)
