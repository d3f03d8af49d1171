"""The metrics reference: every family /metrics exports, rendered from the collector.

The families, their types, HELP texts and labels come from ``metric_families`` over a
snapshot of a small unstarted Registry (no listener, no PostgreSQL) whose pool has
counted a wait, a pin and errors, so every family has samples carrying all its labels.
Only what PgBouncer calls each one, and notes, are written here. Regenerate
docs/metrics.md with ``python -m proxy.metrics_doc > docs/metrics.md``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.core import Metric

from .config import parse_config
from .metrics import metric_families
from .pool import Registry
from .session_state import LOAD_REASON, REASONS, SESSION_AUTHORIZATION_REASON
from .snapshot import Snapshot, merge, take

INSTANCE = "The instance"
DATABASES = "Per database (SHOW DATABASES)"
POOL_GAUGES = "Per pool: clients and servers now (SHOW POOLS)"
POOL_COUNTERS = "Per pool: traffic and time (SHOW STATS)"
DETAIL = "Per pool: logins, prepared statements, pins"
HISTOGRAMS = "Per pool: latency histograms"
ERRORS = "Errors"
GROUPS = (INSTANCE, DATABASES, POOL_GAUGES, POOL_COUNTERS, DETAIL, HISTOGRAMS, ERRORS)

PIN_REASONS = sorted({*REASONS.values(), LOAD_REASON, SESSION_AUTHORIZATION_REASON})


@dataclass(frozen=True, slots=True)
class MetricDoc:
    """What the code's HELP text does not say: where the family is listed, PgBouncer's
    SHOW column and pgbouncer_exporter's metric for the same number (empty: none), and
    a note."""

    group: str
    show: str = ""
    exporter: str = ""
    note: str = ""


def _pools(column: str, exporter: str = "", note: str = "") -> MetricDoc:
    return MetricDoc(POOL_GAUGES, f"SHOW POOLS `{column}`", exporter, note)


def _stats(column: str, exporter: str) -> MetricDoc:
    return MetricDoc(POOL_COUNTERS, f"SHOW STATS `{column}`", exporter)


GROUP_INTROS = {
    INSTANCE: "",
    DATABASES: "Gauges per `[databases.NAME]` entry.",
    POOL_GAUGES: "Gauges per (database, user) pool, computed when scraped.",
    POOL_COUNTERS: "Counters per (database, user) pool, where PgBouncer's SHOW STATS and "
    "pgbouncer_exporter have one row per database: `sum by (database)` to compare. Times "
    "are in seconds here, in microseconds in SHOW STATS.",
    DETAIL: "",
    HISTOGRAMS: "Per (database, user) pool; one observation per queued request, per "
    "transaction and per request.",
    ERRORS: "",
}
_ALWAYS_ZERO = "Always 0 today: exists for dashboards written for pgbouncer_exporter."

# Keyed by the name a scrape shows (counters with their _total).
DESCRIPTIONS: Mapping[str, MetricDoc] = {
    "pgmux_up": MetricDoc(
        INSTANCE,
        exporter="pgbouncer_up",
        note="The exporter's says whether its query to PgBouncer worked; a pgmux that "
        "answers at all says 1, so alert on `up` or `absent(pgmux_up)`.",
    ),
    "pgmux_version_info": MetricDoc(INSTANCE, "SHOW VERSION", "pgbouncer_version_info"),
    "pgmux_workers": MetricDoc(INSTANCE, "SHOW STATE `workers` (pgmux's own row)"),
    "pgmux_start_time_seconds": MetricDoc(INSTANCE),
    "pgmux_paused": MetricDoc(INSTANCE, "SHOW STATE `paused`"),
    "pgmux_client_connections": MetricDoc(
        INSTANCE,
        "SHOW LISTS `used_clients` + `login_clients`",
        note="Compare with `pgmux_max_client_connections` to alert before logins are "
        "refused with 53300.",
    ),
    "pgmux_max_client_connections": MetricDoc(
        INSTANCE,
        "SHOW CONFIG `max_client_conn`",
        "pgbouncer_config_max_client_connections",
        note="The whole instance's limit, also with workers.",
    ),
    "pgmux_databases_pool_size": MetricDoc(
        DATABASES, "SHOW DATABASES `pool_size`", "pgbouncer_databases_pool_size"
    ),
    "pgmux_databases_min_pool_size": MetricDoc(
        DATABASES, "SHOW DATABASES `min_pool_size`", "pgbouncer_databases_min_pool_size"
    ),
    "pgmux_databases_current_connections": MetricDoc(
        DATABASES,
        "SHOW DATABASES `current_connections`",
        "pgbouncer_databases_current_connections",
    ),
    "pgmux_databases_current_client_connections": MetricDoc(
        DATABASES, "SHOW DATABASES `current_client_connections`"
    ),
    "pgmux_databases_max_connections": MetricDoc(
        DATABASES,
        "SHOW DATABASES `max_connections`",
        "pgbouncer_databases_max_connections",
        note="Alert when `pgmux_databases_current_connections` stays at it: the "
        "database's pools share it, and their clients wait for a slot.",
    ),
    "pgmux_databases_max_client_connections": MetricDoc(
        DATABASES, "SHOW DATABASES `max_client_connections`"
    ),
    "pgmux_databases_paused": MetricDoc(
        DATABASES, "SHOW DATABASES `paused`", "pgbouncer_databases_paused"
    ),
    "pgmux_databases_disabled": MetricDoc(
        DATABASES, "SHOW DATABASES `disabled`", "pgbouncer_databases_disabled"
    ),
    "pgmux_pools_client_active_connections": _pools(
        "cl_active", "pgbouncer_pools_client_active_connections"
    ),
    "pgmux_pools_client_waiting_connections": _pools(
        "cl_waiting",
        "pgbouncer_pools_client_waiting_connections",
        "Above 0 for long: the pool is too small for the load, or transactions hold "
        "servers too long (see `pgmux_pools_client_maxwait_seconds`).",
    ),
    "pgmux_pools_client_active_cancel_connections": _pools(
        "cl_active_cancel_req",
        "pgbouncer_pools_client_active_cancel_connections",
        _ALWAYS_ZERO + " pgmux passes a cancel request on the moment it arrives.",
    ),
    "pgmux_pools_client_waiting_cancel_connections": _pools(
        "cl_waiting_cancel_req",
        "pgbouncer_pools_client_waiting_cancel_connections",
        _ALWAYS_ZERO,
    ),
    "pgmux_pools_client_idle_in_transaction_connections": _pools(
        "cl_idle_in_transaction",
        note="pgmux's own column. These clients hold a server and do nothing with it: the "
        "usual cause of an exhausted pool (idle_transaction_timeout ends them).",
    ),
    "pgmux_pools_server_active_connections": _pools(
        "sv_active", "pgbouncer_pools_server_active_connections"
    ),
    "pgmux_pools_server_active_cancel_connections": _pools(
        "sv_active_cancel", "pgbouncer_pools_server_active_cancel_connections"
    ),
    "pgmux_pools_server_being_canceled_connections": _pools(
        "sv_being_canceled", "pgbouncer_pools_server_being_canceled_connections"
    ),
    "pgmux_pools_server_idle_connections": _pools(
        "sv_idle", "pgbouncer_pools_server_idle_connections"
    ),
    "pgmux_pools_server_used_connections": _pools(
        "sv_used",
        "pgbouncer_pools_server_used_connections",
        "Idle longer than server_check_delay: server_check_query runs on each before a "
        "client gets it. Not counted in the idle gauge, as in PgBouncer.",
    ),
    "pgmux_pools_server_testing_connections": _pools(
        "sv_tested", "pgbouncer_pools_server_testing_connections"
    ),
    "pgmux_pools_server_login_connections": _pools(
        "sv_login",
        "pgbouncer_pools_server_login_connections",
        "Stuck above 0: PostgreSQL is slow to accept connections or logins "
        "(server_connect_timeout bounds each attempt).",
    ),
    "pgmux_pools_server_pinned_connections": _pools(
        "sv_pinned",
        note="pgmux's own column; SHOW PINS says who holds them and why.",
    ),
    "pgmux_pools_pool_size": _pools(
        "pool_size",
        note="pgmux's own column; `pgmux_databases_pool_size` is the database's, this one "
        "includes a `[users]` pool_size.",
    ),
    "pgmux_pools_client_maxwait_seconds": MetricDoc(
        POOL_GAUGES,
        "SHOW POOLS `maxwait`, `maxwait_us`",
        "pgbouncer_pools_client_maxwait_seconds",
    ),
    "pgmux_stats_server_assignments_total": _stats(
        "total_server_assignment_count", "pgbouncer_stats_server_assignments_total"
    ),
    "pgmux_stats_sql_transactions_pooled_total": _stats(
        "total_xact_count", "pgbouncer_stats_sql_transactions_pooled_total"
    ),
    "pgmux_stats_queries_pooled_total": _stats(
        "total_query_count", "pgbouncer_stats_queries_pooled_total"
    ),
    "pgmux_stats_received_bytes_total": _stats(
        "total_received", "pgbouncer_stats_received_bytes_total"
    ),
    "pgmux_stats_sent_bytes_total": _stats("total_sent", "pgbouncer_stats_sent_bytes_total"),
    "pgmux_stats_server_in_transaction_seconds_total": _stats(
        "total_xact_time",
        "pgbouncer_stats_server_in_transaction_seconds_total",
    ),
    "pgmux_stats_queries_duration_seconds_total": _stats(
        "total_query_time",
        "pgbouncer_stats_queries_duration_seconds_total",
    ),
    "pgmux_stats_client_wait_seconds_total": _stats(
        "total_wait_time",
        "pgbouncer_stats_client_wait_seconds_total",
    ),
    "pgmux_stats_client_parses_total": _stats(
        "total_client_parse_count", "pgbouncer_stats_client_parses_total"
    ),
    "pgmux_stats_server_parses_total": _stats(
        "total_server_parse_count", "pgbouncer_stats_server_parses_total"
    ),
    "pgmux_stats_binds_total": _stats("total_bind_count", "pgbouncer_stats_binds_total"),
    "pgmux_stats_client_logins_total": MetricDoc(DETAIL),
    "pgmux_prepared_statement_cache_hits_total": MetricDoc(DETAIL),
    "pgmux_prepared_statement_cache_misses_total": MetricDoc(
        DETAIL,
        note="Many misses against few hits: max_prepared_statements may be too small for "
        "the number of distinct statements.",
    ),
    "pgmux_pins_total": MetricDoc(
        DETAIL,
        "SHOW PINS (pgmux's own)",
        note="`reason` is one of: " + ", ".join(f"`{r}`" for r in PIN_REASONS) + ".",
    ),
    "pgmux_pool_wait_seconds": MetricDoc(HISTOGRAMS),
    "pgmux_transaction_duration_seconds": MetricDoc(HISTOGRAMS),
    "pgmux_query_duration_seconds": MetricDoc(HISTOGRAMS),
    "pgmux_errors_total": MetricDoc(
        ERRORS,
        note="`origin` is `server` (PostgreSQL's error, passed on; `reason` empty) or "
        "`pgmux` (pgmux's own, with its `reason`). `sqlstate_class` is the SQLSTATE's "
        "first two characters. Errors before a client has a pool (a failed login) have "
        "empty database and user. [troubleshooting.md](troubleshooting.md) lists every "
        "reason, its cause and the knob to change.",
    ),
}

INTRO = """\
# pgmux metrics reference

<!-- Generated by `python -m proxy.metrics_doc > docs/metrics.md` from the families
proxy/metrics.py exports and the notes in proxy/metrics_doc.py. Do not edit by hand:
tests/unit/test_metrics_reference.py fails when this file differs from the code. -->

`GET /metrics` on `[metrics]` listen_addr:listen_port (default `127.0.0.1:9127`) answers
in the Prometheus text format, or OpenMetrics when the scraper asks for it. Each scrape
renders one snapshot of the stats model, the same one SHOW POOLS and SHOW STATS read, so
the numbers agree with the admin console at that moment; with `workers` > 1 the
supervisor merges every worker's.

Names follow prometheus-community's pgbouncer_exporter with a `pgmux_` prefix, so its
dashboards and alerts port by renaming; the PgBouncer column says which SHOW column and
exporter metric carry the same number. Labels are `database` and `user` (plus `reason`,
`origin` or `sqlstate_class` where shown), never addresses or query text, so the number
of series grows with the number of pools only. Counters are shown with the `_total` a
scrape gives them; a histogram is scraped as `_bucket{le=...}`, `_sum` and `_count`.
`deploy/` has alert rules and a Grafana dashboard built on these.
"""


def sample_snapshot() -> Snapshot:
    """A merged snapshot of a Registry with one pool that has seen a queue wait, a pin
    and errors of both origins (and a login error before any pool)."""
    config = parse_config({"databases": {"app": {}}})
    loop = asyncio.new_event_loop()  # the Registry keeps it; nothing runs on it
    try:
        registry = Registry(config, loop)
        stats = registry.pool_for(config.databases["app"], "app", None).stats
        stats.count_wait(0.02)
        stats.count_pin(PIN_REASONS[0])
        stats.count_error("42P01")
        stats.count_pooler_error("query_wait_timeout", "57014")
        registry.stats.count_pooler_error("authentication_failed", "28P01")
        return merge([take(registry)])
    finally:
        loop.close()


def sample_families() -> list[Metric]:
    """What a scrape of ``sample_snapshot()`` exports."""
    return list(metric_families(sample_snapshot()))


def exposed_name(family: Metric) -> str:
    """The name a scrape shows: prometheus_client keeps a counter's name without the
    ``_total`` it adds to the sample."""
    return family.name + "_total" if family.type == "counter" else family.name


def family_labels(family: Metric) -> list[str]:
    """The family's label names in the order the code gives them (``le`` left out)."""
    labels: dict[str, None] = {}
    for sample in family.samples:
        labels.update(dict.fromkeys(name for name in sample.labels if name != "le"))
    return list(labels)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(family: Metric, doc: MetricDoc) -> str:
    labels = ", ".join(f"`{name}`" for name in family_labels(family)) or "—"
    meaning = family.documentation.rstrip(".") + "."
    if doc.note:
        meaning += " " + doc.note
    parts = [doc.show] if doc.show else []
    if doc.exporter:
        parts.append(f"`{doc.exporter}`")
    pgbouncer = "; ".join(parts) or "— (pgmux's own)"
    cells = (f"`{exposed_name(family)}`", family.type, labels, meaning, pgbouncer)
    return "| " + " | ".join(_escape(cell) for cell in cells) + " |"


def render(families: list[Metric] | None = None) -> str:
    """docs/metrics.md. Raises KeyError naming a family DESCRIPTIONS lacks."""
    families = sample_families() if families is None else families
    rows: dict[str, list[str]] = {group: [] for group in GROUPS}
    for family in families:
        name = exposed_name(family)
        doc = DESCRIPTIONS.get(name)
        if doc is None:
            raise KeyError(f"{name} is exported but not described in proxy/metrics_doc.py")
        rows[doc.group].append(_row(family, doc))
    out = [INTRO]
    for group in GROUPS:
        out.append(f"## {group}\n")
        if GROUP_INTROS[group]:
            out.append(GROUP_INTROS[group] + "\n")
        out.append("| metric | type | labels | meaning | PgBouncer |")
        out.append("|---|---|---|---|---|")
        out.extend(rows[group])
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
