"""Prometheus /metrics, /healthz and /readyz on ``[metrics]`` listen_addr:listen_port.

Every scrape renders one merged snapshot (snapshot.py) into metric families, so the
numbers are those SHOW POOLS and SHOW STATS give at that moment. Names follow
prometheus-community's pgbouncer_exporter with a ``pgmux_`` prefix, so dashboards
port; labels are database and user (plus a reason or SQLSTATE class), never addresses
or query text. The HTTP side is a small asyncio server: a request, an answer, close.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from .oneshot import OneShot
from .snapshot import NoSnapshot, Snapshot
from .stats import DURATION_BOUNDS, WAIT_BOUNDS, sqlstate_class

log = logging.getLogger("pgmux.metrics")

Source = Callable[[], Awaitable[Snapshot]]
MAX_REQUEST = 16384  # bytes of request line and headers

POOL_LABELS = ["database", "user"]

# (metric suffix, SHOW POOLS field, help)
_POOL_GAUGES = (
    ("client_active_connections", "cl_active", "Client connections logged in and not waiting"),
    ("client_waiting_connections", "cl_waiting", "Client connections queued for a server"),
    ("client_active_cancel_connections", "cl_active_cancel_req",
     "Client cancel requests being forwarded"),
    ("client_waiting_cancel_connections", "cl_waiting_cancel_req",
     "Client cancel requests not yet forwarded"),
    ("client_idle_in_transaction_connections", "cl_idle_in_transaction",
     "Client connections holding a server, idle inside a transaction"),
    ("server_active_connections", "sv_active", "Server connections linked to a client"),
    ("server_active_cancel_connections", "sv_active_cancel",
     "Cancel requests pgmux has open towards the server"),
    ("server_being_canceled_connections", "sv_being_canceled",
     "Server connections waiting for a cancel to finish"),
    ("server_idle_connections", "sv_idle", "Server connections idle and ready"),
    ("server_used_connections", "sv_used", "Server connections idle and due for a check"),
    ("server_testing_connections", "sv_tested",
     "Server connections running server_check_query or pgmux's own cleanup or reset query"),
    ("server_login_connections", "sv_login", "Server connections connecting or logging in"),
    ("server_pinned_connections", "sv_pinned",
     "Server connections pinned to one client by session state"),
)  # fmt: skip

# (metric name, snapshot total, help, seconds?)
_POOL_COUNTERS = (
    ("pgmux_stats_server_assignments", "server_assignments",
     "Times a server connection was handed to a client"),
    ("pgmux_stats_sql_transactions_pooled", "xact_count", "Transactions pooled"),
    ("pgmux_stats_queries_pooled", "query_count", "Requests (queries, or Syncs) answered"),
    ("pgmux_stats_received_bytes", "bytes_received", "Bytes received from clients"),
    ("pgmux_stats_sent_bytes", "bytes_sent", "Bytes sent to clients"),
    ("pgmux_stats_server_in_transaction_seconds", "xact_time",
     "Seconds spent in transactions, first request to end"),
    ("pgmux_stats_queries_duration_seconds", "query_time",
     "Seconds servers spent answering requests"),
    ("pgmux_stats_client_wait_seconds", "wait_time", "Seconds clients spent queued for a server"),
    ("pgmux_stats_client_parses", "client_parses", "Named Parse messages from clients"),
    ("pgmux_stats_server_parses", "server_parses", "Named Parse messages sent to servers"),
    ("pgmux_stats_binds", "binds", "Bind messages of named prepared statements"),
)  # fmt: skip

_HISTOGRAMS = (
    ("pgmux_pool_wait_seconds", "wait", "wait_time", WAIT_BOUNDS,
     "Time a queued client waited for a server connection"),
    ("pgmux_transaction_duration_seconds", "xact", "xact_time", DURATION_BOUNDS,
     "Transaction duration, first request to end"),
    ("pgmux_query_duration_seconds", "query", "query_time", DURATION_BOUNDS,
     "Request duration, sent to answered"),
)  # fmt: skip


def metric_families(snap: Snapshot) -> Iterator[Metric]:
    """The snapshot as Prometheus metric families."""
    up = GaugeMetricFamily("pgmux_up", "1 while pgmux runs and answers")
    up.add_metric([], 1)
    yield up
    info = GaugeMetricFamily("pgmux_version_info", "pgmux's version", labels=["version"])
    info.add_metric([snap["version"]], 1)
    yield info
    yield GaugeMetricFamily("pgmux_workers", "Worker processes", value=snap["workers"])
    yield GaugeMetricFamily(
        "pgmux_start_time_seconds", "When pgmux started (Unix time)", value=snap["started"]
    )
    yield GaugeMetricFamily(
        "pgmux_paused", "1 while PAUSE (of all databases) is in effect",
        value=int(snap["state"]["paused"]),
    )  # fmt: skip
    lists = snap["lists"]
    yield GaugeMetricFamily(
        "pgmux_client_connections",
        "Client connections, logging in and logged in (max_client_conn counts these)",
        value=lists["used_clients"] + lists["login_clients"],
    )
    yield GaugeMetricFamily(
        "pgmux_max_client_connections",
        "max_client_conn: client connections allowed",
        value=snap["max_client_conn"],
    )
    yield from _database_families(snap)
    pools = [p for p in snap["pools"] if not p.get("admin")]
    for suffix, field, text in _POOL_GAUGES:
        family = GaugeMetricFamily(f"pgmux_pools_{suffix}", text, labels=POOL_LABELS)
        for p in pools:
            family.add_metric([p["database"], p["user"]], p[field])
        yield family
    family = GaugeMetricFamily(
        "pgmux_pools_pool_size",
        "Server connections this pool may open (its user's pool_size, else the database's)",
        labels=POOL_LABELS,
    )
    for p in pools:
        family.add_metric([p["database"], p["user"]], p["pool_size"])
    yield family
    family = GaugeMetricFamily(
        "pgmux_pools_client_maxwait_seconds",
        "How long the oldest queued client has waited",
        labels=POOL_LABELS,
    )
    for p in pools:
        family.add_metric([p["database"], p["user"]], p["maxwait"])
    yield family
    for name, key, text in _POOL_COUNTERS:
        counter = CounterMetricFamily(name, text, labels=POOL_LABELS)
        for p in pools:
            counter.add_metric([p["database"], p["user"]], p["totals"][key])
        yield counter
    yield from _detail_families(pools)
    for name, key, total, bounds, text in _HISTOGRAMS:
        histogram = HistogramMetricFamily(name, text, labels=POOL_LABELS)
        for p in pools:
            histogram.add_metric(
                [p["database"], p["user"]],
                _cumulative(bounds, p["hist"][key]),
                sum_value=p["totals"][total],
            )
        yield histogram
    yield _error_family(snap, pools)


def _database_families(snap: Snapshot) -> Iterator[Metric]:
    fields = (
        ("pool_size", "pool_size", "Server connections allowed per pool"),
        ("min_pool_size", "min_pool_size", "Server connections kept open per pool"),
        ("current_connections", "current_connections", "Server connections open"),
        ("max_connections", "max_connections", "max_db_connections (0: no limit)"),
        (
            "max_client_connections",
            "max_client_connections",
            "max_db_client_connections (0: no limit)",
        ),
        ("current_client_connections", "current_client_connections", "Client connections"),
        ("paused", "paused", "1 while the database is paused (PAUSE or KILL)"),
        ("disabled", "disabled", "1 while new logins are refused (DISABLE)"),
    )
    databases = [d for d in snap["databases"] if not d.get("admin")]
    for suffix, field, text in fields:
        family = GaugeMetricFamily(f"pgmux_databases_{suffix}", text, labels=["database"])
        for d in databases:
            family.add_metric([d["name"]], int(d[field]))
        yield family


def _detail_families(pools: list[dict[str, Any]]) -> Iterator[Metric]:
    logins = CounterMetricFamily("pgmux_stats_client_logins", "Client logins", labels=POOL_LABELS)
    hits = CounterMetricFamily(
        "pgmux_prepared_statement_cache_hits",
        "Named statements a server already had",
        labels=POOL_LABELS,
    )
    misses = CounterMetricFamily(
        "pgmux_prepared_statement_cache_misses",
        "Named statements that had to be parsed on the server first",
        labels=POOL_LABELS,
    )
    pins = CounterMetricFamily(
        "pgmux_pins", "Clients pinned to their server, by reason", labels=[*POOL_LABELS, "reason"]
    )
    for p in pools:
        labels = [p["database"], p["user"]]
        logins.add_metric(labels, p["logins"])
        hits.add_metric(labels, p["prepared_hits"])
        misses.add_metric(labels, p["prepared_misses"])
        for reason, count in sorted(p["pins"].items()):
            pins.add_metric([*labels, reason], count)
    yield from (logins, hits, misses, pins)


def _error_family(snap: Snapshot, pools: list[dict[str, Any]]) -> Metric:
    errors = CounterMetricFamily(
        "pgmux_errors",
        "Errors sent to clients: by PostgreSQL (origin server) or by pgmux (with its reason)",
        labels=[*POOL_LABELS, "origin", "sqlstate_class", "reason"],
    )
    for p in pools:
        for cls, count in sorted(p["errors"].items()):
            errors.add_metric([p["database"], p["user"], "server", cls, ""], count)
    own: dict[tuple[str, str, str, str], int] = {}
    sources = [(p["database"], p["user"], p["pooler_errors"]) for p in snap["pools"]]
    sources.append(("", "", snap["unpooled"]["pooler_errors"]))
    for database, user, items in sources:
        for reason, code, count in items:
            key = (database, user, sqlstate_class(code), reason)
            own[key] = own.get(key, 0) + count
    for (database, user, cls, reason), count in sorted(own.items()):
        errors.add_metric([database, user, "pgmux", cls, reason], count)
    return errors


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    total = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return buckets


def readiness(snap: Snapshot) -> list[str]:
    """Why the instance should not get traffic now (empty: ready)."""
    state = snap["state"]
    problems = []
    if not state["listening"]:
        problems.append("not listening yet")
    if state["shutting_down"]:
        problems.append("shutting down")
    if state["paused"]:
        problems.append("paused (PAUSE)")
    for name in state["paused_databases"]:
        problems.append(f"database {name} paused")
    for pool in snap["pools"]:
        if pool.get("last_error") and not pool["servers_up"]:
            problems.append(f"pool {pool['database']}/{pool['user']}: {pool['last_error']}")
    return problems


class _SnapshotCollector:
    """A prometheus_client collector that renders the snapshot it is handed."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        if self.snapshot is not None:
            yield from metric_families(self.snapshot)


class MetricsServer:
    """The HTTP endpoint; ``source`` gives the instance's merged snapshot."""

    def __init__(self, source: Source, health: Callable[[], list[str]] | None = None) -> None:
        self.source = source
        self.health = health or (lambda: [])
        self.collector = _SnapshotCollector()
        self.prometheus = CollectorRegistry(auto_describe=False)
        self.prometheus.register(self.collector)
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _HttpConnection(self), host, port, reuse_address=True
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def respond(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        try:
            return await self._respond(method, path.split("?", 1)[0], headers)
        except NoSnapshot as exc:
            return _response(503, f"no stats yet: {exc}\n".encode())

    async def _respond(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        if method not in ("GET", "HEAD"):
            return _response(405, b"only GET and HEAD\n", extra="Allow: GET, HEAD\r\n")
        if path == "/healthz":
            problems = self.health()
            if problems:
                return _response(503, ("\n".join(problems) + "\n").encode())
            return _response(200, b"ok\n")
        if path == "/readyz":
            snap = await self.source()
            problems = readiness(snap) + self.health()
            if problems:
                return _response(503, ("not ready:\n" + "\n".join(problems) + "\n").encode())
            return _response(200, b"ready\n")
        if path == "/metrics":
            snap = await self.source()
            self.collector.snapshot = snap
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            body = encoder(self.prometheus)
            return _response(200, body, content_type=content_type)
        if path == "/":
            return _response(
                200, b"pgmux: /metrics (Prometheus), /healthz (alive), /readyz (ready)\n"
            )
        return _response(404, b"not found: try /metrics, /healthz or /readyz\n")


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip


def _response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode() + body


class _HttpConnection(OneShot):
    terminator = b"\r\n\r\n"
    limit = MAX_REQUEST

    def __init__(self, server: MetricsServer) -> None:
        super().__init__()
        self.server = server

    def too_long(self) -> None:
        self._send(_response(400, b"request too large\n"), head_only=False)

    def request(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._send(_response(400, b"bad request line\n"), head_only=False)
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.start(self._answer(parts[0], parts[1], headers))

    async def _answer(self, method: str, path: str, headers: dict[str, str]) -> None:
        try:
            response = await self.server.respond(method, path, headers)
        except Exception:
            log.exception("%s %s failed", method, path)
            response = _response(500, b"internal error; see the pgmux log\n")
        self._send(response, head_only=method == "HEAD")

    def _send(self, response: bytes, *, head_only: bool) -> None:
        if head_only:
            response = response[: response.find(b"\r\n\r\n") + 4]
        self.reply(response)
