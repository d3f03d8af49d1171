"""Prometheus /metrics, /healthz and /readyz, checked against real clients and the console.

What a scrape says is compared with what was done (a client holding the pool of 1
while another queues, pgbench load, errors and pins caused on purpose) and with SHOW
POOLS / SHOW STATS read at about the same moment. Labels must be database and user
(plus reason, sqlstate_class, origin, version where the README says), never an address
or query text. ``[metrics] enabled = false``, a taken metrics port and ``workers = 2``
(the supervisor's /metrics covers every worker) are covered too.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import psycopg
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support.helpers import (
    connect_asyncpg,
    connect_psycopg,
    connect_raw,
    error_of,
    pgbench_tps,
    postgres_error,
    run_pgbench,
    wait_until,
)
from support.pgcluster import APP_DB, APP_USER, PgCluster, free_port
from support.pgmux import (
    DEFAULT_COMMAND,
    REPO_ROOT,
    PgmuxFactory,
    PgmuxProcess,
    deep_merge,
    default_config,
    to_toml,
)
from support.wire import parse, sync

T = TypeVar("T")

ADMIN_USER, ADMIN_PASSWORD = "admin", "adminpw"
WITH_ADMIN: dict[str, Any] = {"users": {ADMIN_USER: {"password": ADMIN_PASSWORD}}}
APP = {"database": APP_DB, "user": APP_USER}

# Every family the README's table lists for pools and databases (exporter-style names).
POOL_GAUGES = (
    "pgmux_pools_client_active_connections",
    "pgmux_pools_client_waiting_connections",
    "pgmux_pools_client_idle_in_transaction_connections",
    "pgmux_pools_server_active_connections",
    "pgmux_pools_server_idle_connections",
    "pgmux_pools_server_used_connections",
    "pgmux_pools_server_testing_connections",
    "pgmux_pools_server_login_connections",
    "pgmux_pools_server_pinned_connections",
    "pgmux_pools_client_maxwait_seconds",
    "pgmux_pools_pool_size",
)
POOL_COUNTERS = (
    "pgmux_stats_sql_transactions_pooled",
    "pgmux_stats_queries_pooled",
    "pgmux_stats_server_assignments",
    "pgmux_stats_received_bytes",
    "pgmux_stats_sent_bytes",
    "pgmux_stats_server_in_transaction_seconds",
    "pgmux_stats_queries_duration_seconds",
    "pgmux_stats_client_wait_seconds",
    "pgmux_stats_client_parses",
    "pgmux_stats_server_parses",
    "pgmux_stats_binds",
    "pgmux_stats_client_logins",
    "pgmux_prepared_statement_cache_hits",
    "pgmux_prepared_statement_cache_misses",
)
HISTOGRAMS = (
    "pgmux_pool_wait_seconds",
    "pgmux_transaction_duration_seconds",
    "pgmux_query_duration_seconds",
)
# Families whose labels are not (database, user); any other label would be a leak.
LABELS: dict[str, set[str]] = {
    "pgmux_version_info": {"version"},
    "pgmux_errors": {"database", "user", "origin", "sqlstate_class", "reason"},
    "pgmux_pins": {"database", "user", "reason"},
}
# prometheus_client's OpenMetrics parser has no annotations.
openmetrics_families: Callable[[str], Iterator[Metric]] = (
    openmetrics_parser.text_string_to_metric_families
)
INSTANCE_GAUGES = (
    "pgmux_up", "pgmux_workers", "pgmux_start_time_seconds", "pgmux_paused",
    "pgmux_client_connections", "pgmux_max_client_connections",
)  # fmt: skip


def expected_labels(family: str) -> set[str]:
    """The label names a family's samples must have ("le" aside)."""
    if family in INSTANCE_GAUGES:
        return set()
    if family in LABELS:
        return LABELS[family]
    if family.startswith("pgmux_databases_"):
        return {"database"}
    return {"database", "user"}


# -- scraping ----------------------------------------------------------------------------


def metrics_port(pgmux: PgmuxProcess) -> int:
    return int(pgmux.config["metrics"]["listen_port"])


def _get(port: int, path: str, accept: str | None) -> tuple[int, str, str]:
    headers = {"Accept": accept} if accept else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            body = response.read().decode()
            return response.status, response.headers.get("Content-Type", ""), body
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


async def http_get(pgmux: PgmuxProcess, path: str, accept: str | None = None) -> tuple[int, str]:
    """(status, body) of GET ``path`` on pgmux's metrics listener."""
    status, _, body = await asyncio.to_thread(_get, metrics_port(pgmux), path, accept)
    return status, body


@dataclass
class Scrape:
    """One /metrics answer, parsed."""

    text: str
    families: dict[str, Metric]

    @property
    def samples(self) -> Iterator[tuple[Metric, Sample]]:
        for family in self.families.values():
            for sample in family.samples:
                yield family, sample

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``
        (0 when there is none: a counter nothing has bumped yet)."""
        return sum(
            s.value
            for _, s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def count(self, name: str, **labels: str) -> int:
        return sum(
            1
            for _, s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def pool(self, suffix: str) -> float:
        """A pgmux_pools_* gauge of the app/app pool."""
        return self.value(f"pgmux_pools_{suffix}", **APP)

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """(le, cumulative count) of a histogram's series, in bucket order."""
        return sorted(
            (float(s.labels["le"]), s.value)
            for _, s in self.samples
            if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())
        )


async def scrape(pgmux: PgmuxProcess) -> Scrape:
    status, body = await http_get(pgmux, "/metrics")
    assert status == 200, body
    return Scrape(body, {f.name: f for f in text_string_to_metric_families(body)})


async def settle(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 20) -> T:
    """``wait_until`` for an async probe that returns what it saw once that is right."""
    return cast(T, await wait_until(cast(Any, probe), timeout, what=what))


# -- the admin console -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def admin_console(pgmux: PgmuxProcess) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect_asyncpg(
        pgmux, user=ADMIN_USER, password=ADMIN_PASSWORD, database="pgbouncer"
    )
    try:
        yield conn
    finally:
        await conn.close()


async def show_pool(admin: asyncpg.Connection) -> asyncpg.Record:
    rows = [
        r
        for r in await admin.fetch("SHOW POOLS")
        if r["database"] == APP_DB and r["user"] == APP_USER
    ]
    assert len(rows) == 1, rows
    return rows[0]


async def show_stats(admin: asyncpg.Connection) -> asyncpg.Record:
    rows = [r for r in await admin.fetch("SHOW STATS") if r["database"] == APP_DB]
    assert len(rows) == 1, rows
    return rows[0]


def _seconds(micros: Decimal | int) -> float:
    return int(micros) / 1_000_000


# -- the endpoints -----------------------------------------------------------------------


async def test_health_readiness_and_unknown_paths(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory(WITH_ADMIN)
    assert await http_get(pgmux, "/healthz") == (200, "ok\n")
    assert await http_get(pgmux, "/readyz") == (200, "ready\n")
    status, body = await http_get(pgmux, "/no/such/path")
    assert status == 404, body
    status, body = await http_get(pgmux, "/metrics.json")
    assert status == 404, body

    async with admin_console(pgmux) as admin:
        await admin.execute("PAUSE")
        status, body = await http_get(pgmux, "/readyz")
        assert status == 503, body
        assert "paused (PAUSE)" in body, body
        # Paused is not dead: liveness stays up, and /metrics says so.
        assert (await http_get(pgmux, "/healthz"))[0] == 200
        paused = await scrape(pgmux)
        assert paused.value("pgmux_paused") == 1
        assert paused.value("pgmux_databases_paused", database=APP_DB) == 1
        await admin.execute("RESUME")
        assert await http_get(pgmux, "/readyz") == (200, "ready\n")
        assert (await scrape(pgmux)).value("pgmux_paused") == 0


async def test_while_draining_readyz_says_shutting_down_and_healthz_stays_up(
    pgmux_factory: PgmuxFactory,
) -> None:
    """A load balancer must see "not ready" during a drain, while liveness holds: a
    draining pgmux is not dead, and restarting it would cut the transactions short."""
    pgmux = pgmux_factory()
    conn = await connect_asyncpg(pgmux)
    try:
        tx = conn.transaction()
        await tx.start()
        pgmux.signal(signal.SIGTERM)
        pgmux.wait_for_log("shutting down")
        status, body = await http_get(pgmux, "/readyz")
        assert (status, "shutting down" in body) == (503, True), body
        assert await http_get(pgmux, "/healthz") == (200, "ok\n")
        await tx.commit()
    finally:
        await conn.close()
    assert pgmux.proc.wait(10) == 0


async def test_metrics_names_types_and_histograms(pgmux: PgmuxProcess) -> None:
    conn = await connect_asyncpg(pgmux)
    try:
        for i in range(3):
            assert await conn.fetchval("SELECT $1::int", i) == i
    finally:
        await conn.close()
    s = await scrape(pgmux)
    assert s.value("pgmux_up") == 1
    assert s.value("pgmux_workers") == 1
    assert abs(s.value("pgmux_start_time_seconds") - time.time()) < 600
    versions = [smp for _, smp in s.samples if smp.name == "pgmux_version_info"]
    assert len(versions) == 1 and versions[0].value == 1
    assert re.fullmatch(r"\d+\.\d+\S*", versions[0].labels["version"]), versions

    for name in INSTANCE_GAUGES:
        assert s.families[name].type == "gauge", name
    for name in POOL_GAUGES:
        assert s.families[name].type == "gauge", name
        assert s.count(name, **APP) == 1, name
    for name in POOL_COUNTERS:
        assert s.families[name].type == "counter", name
        assert s.count(f"{name}_total", **APP) == 1, name
    assert s.value("pgmux_databases_pool_size", database=APP_DB) == 5
    for suffix in ("min_pool_size", "current_connections", "current_client_connections"):
        assert s.count(f"pgmux_databases_{suffix}", database=APP_DB) == 1, suffix
    # The console is not a pool or database of /metrics.
    assert 'database="pgbouncer"' not in s.text

    # The three transactions: counted, and in the histograms.
    assert s.value("pgmux_stats_sql_transactions_pooled_total", **APP) == 3
    assert s.value("pgmux_stats_queries_pooled_total", **APP) == 3
    assert s.value("pgmux_stats_client_logins_total", **APP) == 1
    assert s.value("pgmux_stats_received_bytes_total", **APP) > 0
    assert s.value("pgmux_stats_sent_bytes_total", **APP) > 0
    for name in HISTOGRAMS:
        assert s.families[name].type == "histogram", name
        buckets = s.buckets(name, **APP)
        assert len(buckets) > 10, (name, buckets)
        assert buckets[-1][0] == float("inf"), name
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), (name, buckets)  # cumulative
        assert buckets[-1][1] == s.value(f"{name}_count", **APP), name
        assert s.count(f"{name}_sum", **APP) == 1, name
    assert s.value("pgmux_transaction_duration_seconds_count", **APP) == 3
    assert s.value("pgmux_query_duration_seconds_count", **APP) == 3
    assert s.value("pgmux_transaction_duration_seconds_sum", **APP) > 0

    # OpenMetrics when the scraper asks for it, with the same numbers.
    status, ctype, body = await asyncio.to_thread(
        _get, metrics_port(pgmux), "/metrics", "application/openmetrics-text; version=1.0.0"
    )
    assert status == 200
    assert ctype.startswith("application/openmetrics-text"), ctype
    assert body.rstrip().endswith("# EOF")
    om = {f.name: f for f in openmetrics_families(body)}
    xacts = [x for x in om["pgmux_stats_sql_transactions_pooled"].samples if x.labels == APP]
    assert [x.value for x in xacts if x.name.endswith("_total")] == [3]


async def test_labels_are_never_addresses_or_query_text(
    pg: PgCluster, pgmux_factory: PgmuxFactory
) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1, "query_wait_timeout": 1})
    probe = "label_probe_q7731"
    conn = await connect_asyncpg(pgmux, server_settings={"application_name": "label_app_x"})
    try:
        assert await conn.fetchval(f"SELECT '{probe}'::text") == probe
        error = await error_of(conn.fetch(f"SELECT * FROM {probe}_missing"))
        assert error.sqlstate == "42P01" and probe in error.message
        await error_of(conn.fetch("SELECT 1/0"))
        await conn.execute(f"SELECT pg_advisory_lock(7731) /* {probe} */")
        await conn.execute("SELECT pg_advisory_unlock_all()")
    finally:
        await conn.close()
    assert (await error_of(connect_asyncpg(pgmux, database=f"{probe}_db"))).sqlstate == "3D000"

    s = await scrape(pgmux)
    assert s.value("pgmux_errors_total", origin="server") == 2
    assert s.value("pgmux_pins_total") == 1
    ports = {str(pgmux.port), str(pg.port), str(metrics_port(pgmux))}
    seen: set[str] = set()
    for family, sample in s.samples:
        assert set(sample.labels) - {"le"} == expected_labels(family.name), sample
        for key, value in sample.labels.items():
            if key == "le":
                assert value == "+Inf" or float(value) > 0, sample
                continue
            seen.add(value)
            assert "127.0.0.1" not in value and "/" not in value, (family.name, sample)
            assert probe not in value and "label_app_x" not in value, (family.name, sample)
            assert not any(port in value for port in ports), (family.name, sample)
            assert not re.search(r"\d{4,}", value), (family.name, sample)  # no port at all
            if key == "sqlstate_class":
                assert re.fullmatch(r"[0-9A-Z]{2}", value), sample
            if key == "database":
                assert value in (APP_DB, ""), sample  # "": errors before a pool
            if key == "user":
                assert value in (APP_USER, ""), sample
    # The error and pin series are there, labelled as documented.
    assert {"42", "22", "3D", "unknown_database", "session advisory lock"} <= seen


# -- a known situation: one server held, one client queued --------------------------------


async def test_pool_of_one_with_a_holder_and_a_waiter(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({**WITH_ADMIN, "default_pool_size": 1, "query_wait_timeout": 30})
    a = await connect_asyncpg(pgmux)
    b = await connect_asyncpg(pgmux)
    b_query: asyncio.Task[Any] | None = None
    try:
        await a.execute("BEGIN")
        assert await a.fetchval("SELECT 1") == 1
        before = await scrape(pgmux)
        assert before.pool("client_active_connections") == 2
        assert before.pool("client_waiting_connections") == 0
        assert before.pool("client_idle_in_transaction_connections") == 1
        assert before.pool("server_active_connections") == 1
        assert before.pool("server_idle_connections") == 0

        b_started = time.monotonic()
        b_query = asyncio.create_task(b.fetchval("SELECT 2"))

        async def queued() -> Scrape | None:
            s = await scrape(pgmux)
            return s if s.pool("client_waiting_connections") == 1 else None

        held = await settle(queued, "B queued in /metrics")
        b_queued = time.monotonic()  # B was in the queue by now
        assert held.pool("client_active_connections") == 1
        assert held.pool("client_waiting_connections") == 1
        assert held.pool("client_idle_in_transaction_connections") == 1
        assert held.pool("server_active_connections") == 1
        assert held.pool("server_idle_connections") == 0
        assert held.pool("server_login_connections") == 0
        assert held.pool("client_maxwait_seconds") > 0
        assert held.value("pgmux_databases_current_client_connections", database=APP_DB) == 2
        assert held.value("pgmux_databases_current_connections", database=APP_DB) == 1
        assert held.pool("pool_size") == 1
        assert held.value("pgmux_client_connections") == 2  # A and B
        assert held.value("pgmux_max_client_connections") == pgmux.config["max_client_conn"]

        async with admin_console(pgmux) as admin:
            now = await scrape(pgmux)
            row = await show_pool(admin)
        assert (
            (row["cl_active"], row["cl_waiting"], row["sv_active"], row["sv_idle"])
            == (
                now.pool("client_active_connections"),
                now.pool("client_waiting_connections"),
                now.pool("server_active_connections"),
                now.pool("server_idle_connections"),
            )
            == (1, 1, 1, 0)
        )
        assert row["cl_idle_in_transaction"] == 1 and row["pool_size"] == 1
        assert row["maxwait"] * 1_000_000 + row["maxwait_us"] > 0
        assert now.pool("client_maxwait_seconds") > 0

        await asyncio.sleep(1.0)  # B keeps waiting while A holds the server
        assert not b_query.done()
        a_commit = time.monotonic()
        await a.execute("COMMIT")
        assert await asyncio.wait_for(b_query, 15) == 2
        b_done = time.monotonic()

        async def settled() -> Scrape | None:
            s = await scrape(pgmux)
            ok = s.pool("server_idle_connections") == 1 and s.pool("server_active_connections") == 0
            return s if ok else None

        after = await settle(settled, "the server back in the pool")
        assert after.pool("client_waiting_connections") == 0
        assert after.pool("client_active_connections") == 2
        assert after.pool("client_idle_in_transaction_connections") == 0
        assert after.pool("client_maxwait_seconds") == 0
        name = "pgmux_pool_wait_seconds"
        assert after.value(f"{name}_count", **APP) == before.value(f"{name}_count", **APP) + 1
        waited = after.value(f"{name}_sum", **APP) - before.value(f"{name}_sum", **APP)
        # B queued after b_started and before b_queued, got the server after a_commit
        # and before b_done.
        assert a_commit - b_queued <= waited <= b_done - b_started, waited
        assert waited >= 1.0
        wait_total = "pgmux_stats_client_wait_seconds_total"
        assert after.value(wait_total, **APP) == after.value(f"{name}_sum", **APP)
        # One wait of about 1 s: in the buckets from 1.0 up, none below 0.5.
        buckets = dict(after.buckets(name, **APP))
        assert buckets[0.5] == dict(before.buckets(name, **APP))[0.5]
        assert buckets[float("inf")] - buckets[0.5] >= 1
    finally:
        await a.close()  # lets B through, if it still waits
        if b_query is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(b_query, 15)
        await b.close()


# -- counters under load -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pgbench_tables(pg: PgCluster) -> None:
    init = run_pgbench(pg, "-i", "-s", "1", "-q")
    assert init.returncode == 0, init.stdout + init.stderr


async def test_counters_under_pgbench_agree_with_show_stats(
    pgmux_factory: PgmuxFactory, pgbench_tables: None
) -> None:
    pgmux = pgmux_factory({**WITH_ADMIN, "default_pool_size": 2})
    bench = await asyncio.to_thread(run_pgbench, pgmux, "-S", "-n", "-c", "8", "-j", "2", "-T", "3")
    pgbench_tps(bench)
    processed = re.search(r"number of transactions actually processed: (\d+)", bench.stdout)
    assert processed is not None, bench.stdout
    transactions = int(processed.group(1))
    assert transactions > 0

    async with admin_console(pgmux) as admin:

        async def quiet() -> bool:
            # pgbench's clients gone, and the janitor done resetting the settings
            # they left on the servers (application_name).
            s = await scrape(pgmux)
            row = await show_pool(admin)
            return (
                s.pool("client_active_connections") == 0
                and s.pool("server_idle_connections") == 2
                and (row["cl_active"], row["sv_idle"]) == (0, 2)
            )

        await settle(quiet, "pgbench's clients gone, servers idle")
        s = await scrape(pgmux)
        stats = await show_stats(admin)
        again = await scrape(pgmux)

    def total(name: str) -> float:
        value = s.value(f"{name}_total", **APP)
        assert again.value(f"{name}_total", **APP) == value, f"{name} moved at rest"
        return value

    xacts = total("pgmux_stats_sql_transactions_pooled")
    queries = total("pgmux_stats_queries_pooled")
    assert xacts == stats["total_xact_count"]
    assert queries == stats["total_query_count"]
    assert xacts >= transactions, (xacts, transactions)
    assert queries >= transactions, (queries, transactions)
    assert total("pgmux_stats_server_assignments") == stats["total_server_assignment_count"]
    received = total("pgmux_stats_received_bytes")
    sent = total("pgmux_stats_sent_bytes")
    assert received == stats["total_received"] and received > 0
    assert sent == stats["total_sent"] and sent > 0
    assert total("pgmux_stats_client_logins") == 9  # 8 clients and pgbench's own setup
    for name, column in (
        ("pgmux_stats_server_in_transaction_seconds", "total_xact_time"),
        ("pgmux_stats_queries_duration_seconds", "total_query_time"),
        ("pgmux_stats_client_wait_seconds", "total_wait_time"),
    ):
        assert total(name) == pytest.approx(_seconds(stats[column]), abs=2e-6), name
    assert total("pgmux_stats_queries_duration_seconds") > 0

    # The histograms count what the counters count (stats.py: every transaction and
    # every request timed once; queries_pooled also counts Syncs answered without one).
    hist = "pgmux_transaction_duration_seconds"
    assert s.value(f"{hist}_count", **APP) == xacts
    assert s.value(f"{hist}_sum", **APP) == s.value(
        "pgmux_stats_server_in_transaction_seconds_total", **APP
    )
    hist = "pgmux_query_duration_seconds"
    assert transactions <= s.value(f"{hist}_count", **APP) <= queries
    assert s.value(f"{hist}_sum", **APP) == s.value(
        "pgmux_stats_queries_duration_seconds_total", **APP
    )
    # 8 clients on 2 servers queued, and each wait was counted once.
    hist = "pgmux_pool_wait_seconds"
    assert s.value(f"{hist}_count", **APP) > 0
    assert s.value(f"{hist}_count", **APP) <= s.value("pgmux_stats_server_assignments_total", **APP)
    assert s.value(f"{hist}_sum", **APP) == s.value("pgmux_stats_client_wait_seconds_total", **APP)
    assert s.value("pgmux_databases_current_connections", database=APP_DB) == 2


# -- errors, pins, prepared statements -----------------------------------------------------


async def test_errors_by_origin_and_reason(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1, "query_wait_timeout": 1})
    errors = "pgmux_errors_total"
    before = await scrape(pgmux)

    for _ in range(2):
        error = await error_of(connect_asyncpg(pgmux, database="no_such_db"))
        assert error.sqlstate == "3D000", error
    holder = await connect_asyncpg(pgmux)
    waiter = await connect_asyncpg(pgmux)
    try:
        for _ in range(3):
            assert (await error_of(holder.fetch("SELECT 1/0"))).sqlstate == "22012"
        await holder.execute("BEGIN")
        with pytest.raises(asyncpg.PostgresError) as info:
            await waiter.fetchval("SELECT 1", timeout=15)
        assert postgres_error(info.value).sqlstate == "57014"
        await holder.execute("ROLLBACK")
    finally:
        await holder.close()
        waiter.terminate()
    s = await scrape(pgmux)

    def delta(**labels: str) -> float:
        return s.value(errors, **labels) - before.value(errors, **labels)

    assert delta(origin="pgmux", reason="unknown_database", sqlstate_class="3D") == 2
    assert s.value(errors, database="", user="", origin="pgmux", reason="unknown_database") == 2
    assert delta(origin="server", sqlstate_class="22", **APP) == 3
    assert delta(origin="server") == 3  # the ROLLBACK was no error
    assert delta(origin="pgmux", reason="query_wait_timeout", sqlstate_class="57", **APP) == 1
    assert delta(origin="pgmux") == 3
    assert s.count(errors, origin="server", reason="") == s.count(errors, origin="server")


async def test_errors_pgmux_makes_in_place_of_a_stand_in_count_as_what_the_client_got(
    pgmux_factory: PgmuxFactory,
) -> None:
    """A refusal under session_state = "error" and a re-Parse's 42P05 reach the client in
    place of a stand-in statement's syntax error: they count as 0A000 by pgmux and as
    PostgreSQL's 42P05, never as the stand-in's 42601."""
    pgmux = pgmux_factory({"session_state": "error"})
    errors = "pgmux_errors_total"
    before = await scrape(pgmux)
    conn = await connect_psycopg(pgmux)
    try:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            await conn.execute("CREATE TEMP TABLE refused_t (n int)")
        raw = await connect_raw(pgmux)
        try:
            batch = parse("SELECT 1", "dup") + parse("SELECT 1", "dup") + sync()
            reply = await raw.exchange(batch)
            assert [f.get("C") for f in reply.errors] == ["42P05"]
        finally:
            raw.abort()
    finally:
        await conn.close()
    s = await scrape(pgmux)

    def delta(**labels: str) -> float:
        return s.value(errors, **labels) - before.value(errors, **labels)

    reason = "session_state_refused"
    assert delta(origin="pgmux", reason=reason, sqlstate_class="0A", **APP) == 1
    assert delta(origin="server", sqlstate_class="42", **APP) == 1  # the 42P05 alone
    assert delta() == 2


async def test_pins_by_reason(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"default_pool_size": 2})
    conn = await connect_asyncpg(pgmux)
    other = await connect_asyncpg(pgmux)

    async def pins(advisory: int, temp: int, pinned: int) -> Scrape | None:
        # The pin is learned by pgmux's own query after the transaction's reply has
        # gone to the client, so the count can trail the client by a moment.
        s = await scrape(pgmux)
        now = (
            s.value("pgmux_pins_total", reason="session advisory lock", **APP),
            s.value("pgmux_pins_total", reason="temporary table", **APP),
            s.pool("server_pinned_connections"),
        )
        return s if now == (advisory, temp, pinned) else None

    try:
        assert (await scrape(pgmux)).value("pgmux_pins_total") == 0
        await conn.execute("SELECT pg_advisory_lock(42)")
        s = await settle(lambda: pins(1, 0, 1), "one advisory-lock pin")
        assert s.value("pgmux_pins_total") == 1
        await conn.execute("SELECT pg_advisory_unlock_all()")
        await settle(lambda: pins(1, 0, 0), "the pin released")
        await other.execute("CREATE TEMP TABLE pinned_t (n int)")
        await conn.execute("SELECT pg_advisory_lock(42)")  # pinned again: counted again
        s = await settle(lambda: pins(2, 1, 2), "three pins, two held")
        assert s.value("pgmux_pins_total") == 3
        assert s.count("pgmux_pins_total") == 2  # one series per reason
    finally:
        await conn.close()
        await other.close()


async def test_prepared_statement_cache_hits_and_misses(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1})
    hits, misses = (
        "pgmux_prepared_statement_cache_hits_total",
        "pgmux_prepared_statement_cache_misses_total",
    )
    before = await scrape(pgmux)
    assert before.value(hits) == before.value(misses) == 0
    conn = await connect_asyncpg(pgmux, statement_cache_size=100)
    try:
        for i in range(5):
            assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
    finally:
        await conn.close()
    s = await scrape(pgmux)
    # One server: the Parse had to go to it once; every Bind (and asyncpg's Describe
    # after its Parse) found the statement there.
    assert s.value(misses, **APP) == 1
    assert s.value("pgmux_stats_client_parses_total", **APP) == 1
    assert s.value("pgmux_stats_server_parses_total", **APP) == 1
    assert s.value("pgmux_stats_binds_total", **APP) == 5
    assert s.value(hits, **APP) >= 5
    first_hits = s.value(hits, **APP)
    # A second client with its own name for the same query: the server already has it.
    conn = await connect_asyncpg(pgmux, statement_cache_size=100)
    try:
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
    finally:
        await conn.close()
    s = await scrape(pgmux)
    assert s.value(misses, **APP) == 1
    assert s.value(hits, **APP) >= first_hits + 2  # its Parse and its Bind
    assert s.value("pgmux_stats_client_parses_total", **APP) == 2
    assert s.value("pgmux_stats_server_parses_total", **APP) == 1


# -- configuration ----------------------------------------------------------------------


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


async def test_metrics_disabled_listens_nowhere(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"metrics": {"enabled": False}})
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    assert _refused(metrics_port(pgmux))
    assert "metrics on" not in pgmux.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_port_taken_fails_startup(pg: PgCluster, workdir: Path, workers: int) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        config = deep_merge(
            default_config(pg, free_port()), {"workers": workers, "metrics": {"listen_port": taken}}
        )
        path = workdir / "taken.toml"
        path.write_text(to_toml(config))
        proc = subprocess.run(
            [*DEFAULT_COMMAND, "--config", str(path)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"cannot serve metrics on 127.0.0.1:{taken}" in out, out
    assert "address already in use" in out.lower(), out
    assert "listen_port" in out, out
    assert "listening on" not in out, out


# -- workers ----------------------------------------------------------------------------


async def test_supervisor_metrics_cover_every_worker(pgmux_factory: PgmuxFactory) -> None:
    workers = 2
    pgmux = pgmux_factory({**WITH_ADMIN, "workers": workers, "default_pool_size": 4})
    n = 8
    conns: list[asyncpg.Connection] = []
    try:
        conns = list(await asyncio.gather(*(connect_asyncpg(pgmux) for _ in range(n))))
        # The kernel spreads them; make sure both workers have some, still 8 in all.
        for _ in range(60):
            on = [c.get_server_pid() % workers for c in conns]
            if len(set(on)) == workers:
                break
            await conns.pop().close()
            conns.append(await connect_asyncpg(pgmux))
        per_worker = [sum(1 for c in conns if c.get_server_pid() % workers == w) for w in (0, 1)]
        assert min(per_worker) >= 1, per_worker

        async def all_counted() -> Scrape | None:
            s = await scrape(pgmux)
            return s if s.pool("client_active_connections") == n else None

        before = await settle(all_counted, f"{n} clients in /metrics")
        assert before.value("pgmux_workers") == workers
        assert before.value("pgmux_databases_pool_size", database=APP_DB) == 4
        assert before.value("pgmux_databases_current_client_connections", database=APP_DB) == n

        rounds = 5
        for _ in range(rounds):
            await asyncio.gather(*(c.fetchval("SELECT 1") for c in conns))
        s = await scrape(pgmux)
        xacts = "pgmux_stats_sql_transactions_pooled_total"
        done = rounds * n
        # More than either worker ran alone: both workers' counters are in the sum.
        assert done > rounds * max(per_worker)
        assert s.value(xacts, **APP) - before.value(xacts, **APP) >= done
        assert s.value("pgmux_stats_client_logins_total", **APP) >= n
        assert s.value("pgmux_transaction_duration_seconds_count", **APP) == s.value(xacts, **APP)
        async with admin_console(pgmux) as admin:
            row = await show_pool(admin)
            stats = await show_stats(admin)
            again = await scrape(pgmux)
        assert row["cl_active"] == again.pool("client_active_connections") == n
        assert row["pool_size"] == 4
        assert stats["total_xact_count"] == again.value(xacts, **APP)
        assert await http_get(pgmux, "/healthz") == (200, "ok\n")
        assert await http_get(pgmux, "/readyz") == (200, "ready\n")
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
