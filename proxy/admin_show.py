"""The admin console's SHOW commands: result sets rendered from a merged snapshot.

Column names, order and types are PgBouncer 1.25's, so scripts and exporters written
for PgBouncer read pgmux unchanged; pgmux's own columns come after PgBouncer's. Types
are those PgBouncer sends: text, int4, int8 and numeric (every stats column).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import __version__
from .config import Config, config_items
from .snapshot import ADMIN_DB, CLIENTS, MEM, SERVERS, USERS, Snapshot

TEXT, INT4, INT8, NUMERIC = 25, 23, 20, 1700

Row = list[Any]
Columns = list[tuple[str, int]]

_CONNECTION_COLUMNS: Columns = [
    ("type", TEXT), ("user", TEXT), ("database", TEXT), ("replication", TEXT),
    ("state", TEXT), ("addr", TEXT), ("port", INT4), ("local_addr", TEXT),
    ("local_port", INT4), ("connect_time", TEXT), ("request_time", TEXT), ("wait", INT4),
    ("wait_us", INT4), ("close_needed", INT4), ("ptr", TEXT), ("link", TEXT),
    ("remote_pid", INT4), ("tls", TEXT), ("application_name", TEXT),
    ("prepared_statements", INT4), ("id", INT4),
    # pgmux's own
    ("xact_start", TEXT), ("query_start", TEXT), ("pin_reason", TEXT),
    ("last_statement", TEXT), ("worker", INT4),
]  # fmt: skip

# Each statistic: its name in SHOW STATS (after total_), in SHOW STATS' averages (after
# avg_), in SHOW STATS_TOTALS / STATS_AVERAGES, in SHOW TOTALS (after total_ / avg_),
# and its key in snapshots. PgBouncer names one number differently in each command.
_STAT_NAMES = (
    ("server_assignment_count", "server_assignment_count", "server_assignment_count",
     "server_assignment_count", "server_assignments"),
    ("xact_count", "xact_count", "xact_count", "xact_count", "xact_count"),
    ("query_count", "query_count", "query_count", "query_count", "query_count"),
    ("received", "recv", "bytes_received", "client_bytes", "bytes_received"),
    ("sent", "sent", "bytes_sent", "server_bytes", "bytes_sent"),
    ("xact_time", "xact_time", "xact_time", "xact_time", "xact_time"),
    ("query_time", "query_time", "query_time", "query_time", "query_time"),
    ("wait_time", "wait_time", "wait_time", "wait_time", "wait_time"),
    ("client_parse_count", "client_parse_count", "client_parse_count",
     "ps_client_parse_count", "client_parses"),
    ("server_parse_count", "server_parse_count", "server_parse_count",
     "ps_server_parse_count", "server_parses"),
    ("bind_count", "bind_count", "bind_count", "ps_bind_count", "binds"),
)  # fmt: skip
_KEYS = [names[4] for names in _STAT_NAMES]
_TIMES = ("xact_time", "query_time", "wait_time")  # seconds in snapshots, µs when shown


@dataclass(frozen=True, slots=True)
class Show:
    """One SHOW command: the snapshot parts it needs and how it renders."""

    parts: tuple[str, ...]
    columns: Columns
    rows: Callable[[Snapshot, Config], list[Row]]


# -- formatting -------------------------------------------------------------------------


def format_time(wall: float | None, *, millis: bool = False) -> str | None:
    """PgBouncer's ``%Y-%m-%d %H:%M:%S %Z`` (local time); pgmux's own columns add ms."""
    if wall is None:
        return None
    local = time.localtime(wall)
    text = time.strftime("%Y-%m-%d %H:%M:%S", local)
    if millis:
        text += f".{int(wall * 1000) % 1000:03d}"
    return f"{text} {time.strftime('%Z', local)}"


def _split_seconds(seconds: float) -> tuple[int, int]:
    micros = int(seconds * 1_000_000)
    return micros // 1_000_000, micros % 1_000_000


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


# -- the commands -----------------------------------------------------------------------


def _version(snap: Snapshot, config: Config) -> list[Row]:
    return [[f"pgmux {__version__}"]]


def _config(snap: Snapshot, config: Config) -> list[Row]:
    return [
        [item.key, item.shown(config), item.default_text, "yes" if item.live else "no"]
        for item in config_items()
    ]


def _databases(snap: Snapshot, config: Config) -> list[Row]:
    return [
        [
            db["name"], db["host"], db["port"], db["database"], db["force_user"],
            db["pool_size"], db["min_pool_size"], db["reserve_pool_size"], db["server_lifetime"],
            db["pool_mode"], db.get("load_balance_hosts"), db["max_connections"],
            db["current_connections"],
            db["max_client_connections"], db["current_client_connections"],
            int(db["paused"]), int(db["disabled"]),
        ]
        for db in snap["databases"]
    ]  # fmt: skip


def _pools(snap: Snapshot, config: Config) -> list[Row]:
    rows = []
    for p in snap["pools"]:
        wait_s, wait_us = _split_seconds(p["maxwait"])
        rows.append(
            [
                p["database"], p["user"], p["cl_active"], p["cl_waiting"],
                p["cl_active_cancel_req"], p["cl_waiting_cancel_req"], p["sv_active"],
                p["sv_active_cancel"], p["sv_being_canceled"], p["sv_idle"], p["sv_used"],
                p["sv_tested"], p["sv_login"], wait_s, wait_us, p["pool_mode"],
                p.get("load_balance_hosts"),
                p["cl_idle_in_transaction"], p["sv_pinned"], p["pool_size"], int(p["paused"]),
            ]
        )  # fmt: skip
    return rows


def _connection_rows(snap: Snapshot, kind: str) -> list[Row]:
    mine, theirs = ("C", "S") if kind == CLIENTS else ("S", "C")
    rows = []
    for c in sorted(snap[kind], key=lambda r: r["id"]):
        state = c["state"]
        if state == "login":
            continue  # PgBouncer does not list logins in progress
        if state == "admin":
            state = "active"  # a console session, as PgBouncer lists it
        wait_s, wait_us = _split_seconds(c["wait"])
        link = c["link"]
        rows.append(
            [
                mine, c["user"], c["database"], "none", state, c["addr"], c["port"],
                c["local_addr"], c["local_port"], format_time(c["connect_time"]),
                format_time(c["request_time"]), wait_s, wait_us, int(c.get("close_needed", 0)),
                f"{mine}-{c['id']}", f"{theirs}-{link}" if link is not None else "",
                c["remote_pid"], c["tls"] or "", c["application_name"],
                c["prepared_statements"], c["id"],
                format_time(c["xact_start"], millis=True),
                format_time(c["query_start"], millis=True), c["pin_reason"],
                c["last_statement"], c["worker"],
            ]
        )  # fmt: skip
    return rows


def _clients(snap: Snapshot, config: Config) -> list[Row]:
    return _connection_rows(snap, CLIENTS)


def _servers(snap: Snapshot, config: Config) -> list[Row]:
    return _connection_rows(snap, SERVERS)


def _users(snap: Snapshot, config: Config) -> list[Row]:
    # PgBouncer prints the per-user sizes as text, "%9d", and "" when not set.
    return [
        [
            u["name"], _per_user_size(u["pool_size"]), _per_user_size(u["reserve_pool_size"]),
            u["pool_mode"], u["max_user_connections"], u["current_connections"],
            u["max_user_client_connections"], u["current_client_connections"],
        ]
        for u in snap[USERS]
    ]  # fmt: skip


def _per_user_size(size: int | None) -> str:
    return f"{size:9d}" if size is not None else ""


def _per_database(snap: Snapshot) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """(database, totals, averages) with the pools of each database added up."""
    now = snap["time"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for pool in snap["pools"]:
        groups.setdefault(pool["database"], []).append(pool)
    result = []
    for name, pools in groups.items():
        totals = {k: sum(p["totals"][k] for p in pools) for k in pools[0]["totals"]}
        periods = [p["period"] for p in pools if p["period"] is not None]
        if periods:
            length = max(p[0] for p in periods)
            delta = {k: sum(p[1][k] for p in periods) for k in totals}
        else:  # younger than one stats_period: average over the time it has run
            length = max(now - snap["started"], 1e-6)
            delta = totals
        result.append((name, totals, averages(delta, length)))
    return result


def averages(delta: dict[str, float], length: float) -> dict[str, float]:
    """PgBouncer's averages (1.23+) over a window of ``length`` seconds: counts and
    bytes per second, xact and query time per transaction and per query, wait time
    per server assignment (times in seconds here)."""
    out = {k: delta[k] / length for k in delta}
    out["xact_time"] = delta["xact_time"] / delta["xact_count"] if delta["xact_count"] else 0
    out["query_time"] = delta["query_time"] / delta["query_count"] if delta["query_count"] else 0
    assignments = delta["server_assignments"]
    out["wait_time"] = delta["wait_time"] / assignments if assignments else 0
    return out


def _shown(values: dict[str, float], key: str) -> int:
    value = values[key]
    return _us(value) if key in _TIMES else int(value)


def _stats(snap: Snapshot, config: Config) -> list[Row]:
    return [
        [name] + [_shown(totals, key) for key in _KEYS] + [_shown(avg, key) for key in _KEYS]
        for name, totals, avg in _per_database(snap)
    ]


def _stats_totals(snap: Snapshot, config: Config) -> list[Row]:
    return [
        [name] + [_shown(totals, key) for key in _KEYS] for name, totals, _ in _per_database(snap)
    ]


def _stats_averages(snap: Snapshot, config: Config) -> list[Row]:
    return [[name] + [_shown(avg, key) for key in _KEYS] for name, _, avg in _per_database(snap)]


def _totals(snap: Snapshot, config: Config) -> list[Row]:
    per_db = _per_database(snap)
    totals = {k: sum(t[k] for _, t, _ in per_db) for k in _KEYS}
    avgs = {k: sum(a[k] for _, _, a in per_db) for k in _KEYS}
    # Times average per event, so they are weighted by each database's events.
    for key, weight in (("xact_time", "xact_count"), ("query_time", "query_count")):
        count = sum(a[weight] for _, _, a in per_db)
        avgs[key] = sum(a[key] * a[weight] for _, _, a in per_db) / count if count else 0
    count = sum(a["server_assignments"] for _, _, a in per_db)
    avgs["wait_time"] = (
        sum(a["wait_time"] * a["server_assignments"] for _, _, a in per_db) / count if count else 0
    )
    rows: list[Row] = [[f"total_{n[3]}", _shown(totals, n[4])] for n in _STAT_NAMES]
    rows += [[f"avg_{n[3]}", _shown(avgs, n[4])] for n in _STAT_NAMES]
    return rows


def _lists(snap: Snapshot, config: Config) -> list[Row]:
    lists = snap["lists"]
    return [
        ["databases", lists["databases"]], ["users", lists["users"]], ["peers", 0],
        ["pools", lists["pools"]], ["peer_pools", 0], ["free_clients", 0],
        ["used_clients", lists["used_clients"]], ["login_clients", lists["login_clients"]],
        ["free_servers", 0], ["used_servers", lists["used_servers"]], ["dns_names", 0],
        ["dns_zones", 0], ["dns_queries", 0], ["dns_pending", 0],
    ]  # fmt: skip


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _state(snap: Snapshot, config: Config) -> list[Row]:
    state = snap["state"]
    return [
        ["active", _yes(not state["paused"])],
        ["paused", _yes(state["paused"])],
        ["suspended", "no"],
        # pgmux's own
        ["shutting_down", _yes(state["shutting_down"])],
        ["paused_databases", ",".join(state["paused_databases"])],
        ["disabled_databases", ",".join(state["disabled_databases"])],
        ["workers", str(snap["workers"])],
    ]


def _mem(snap: Snapshot, config: Config) -> list[Row]:
    return [[m["name"], m["size"], m["used"], 0, m["size"] * m["used"]] for m in snap[MEM]]


def _pins(snap: Snapshot, config: Config) -> list[Row]:
    rows = []
    for c in sorted(snap[CLIENTS], key=lambda r: r["id"]):
        if c["pin_reason"] is None:
            continue
        pinned_for = snap["time"] - c["pinned_at"] if c["pinned_at"] else 0.0
        rows.append(
            [
                c["id"], c["user"], c["database"], c["link"], c["remote_pid"],
                c["pin_reason"], format_time(c["pinned_at"], millis=True),
                round(pinned_for, 3), c["application_name"], c["addr"], c["pinned_by"],
                c["last_statement"], c["worker"],
            ]
        )  # fmt: skip
    return rows


_STAT_COLUMNS: Columns = [(f"total_{n[0]}", NUMERIC) for n in _STAT_NAMES]
_AVG_COLUMNS: Columns = [(f"avg_{n[1]}", NUMERIC) for n in _STAT_NAMES]
_PLAIN_STAT_COLUMNS: Columns = [(n[2], NUMERIC) for n in _STAT_NAMES]

# fmt: off
SHOW_COMMANDS: dict[str, Show] = {
    "version": Show((), [("version", TEXT)], _version),
    "config": Show(
        (), [("key", TEXT), ("value", TEXT), ("default", TEXT), ("changeable", TEXT)], _config
    ),
    "databases": Show(
        (),
        [
            ("name", TEXT), ("host", TEXT), ("port", INT4), ("database", TEXT),
            ("force_user", TEXT), ("pool_size", INT4), ("min_pool_size", INT4),
            ("reserve_pool_size", INT4), ("server_lifetime", INT4), ("pool_mode", TEXT),
            ("load_balance_hosts", TEXT), ("max_connections", INT4),
            ("current_connections", INT4), ("max_client_connections", INT4),
            ("current_client_connections", INT4), ("paused", INT4), ("disabled", INT4),
        ],
        _databases,
    ),
    "pools": Show(
        (),
        [
            ("database", TEXT), ("user", TEXT), ("cl_active", INT4), ("cl_waiting", INT4),
            ("cl_active_cancel_req", INT4), ("cl_waiting_cancel_req", INT4),
            ("sv_active", INT4), ("sv_active_cancel", INT4), ("sv_being_canceled", INT4),
            ("sv_idle", INT4), ("sv_used", INT4), ("sv_tested", INT4), ("sv_login", INT4),
            ("maxwait", INT4), ("maxwait_us", INT4), ("pool_mode", TEXT),
            ("load_balance_hosts", TEXT),
            # pgmux's own
            ("cl_idle_in_transaction", INT4), ("sv_pinned", INT4), ("pool_size", INT4),
            ("paused", INT4),
        ],
        _pools,
    ),
    "clients": Show((CLIENTS,), _CONNECTION_COLUMNS, _clients),
    "servers": Show((SERVERS,), _CONNECTION_COLUMNS, _servers),
    "users": Show(
        (USERS,),
        [
            ("name", TEXT), ("pool_size", TEXT), ("reserve_pool_size", TEXT),
            ("pool_mode", TEXT), ("max_user_connections", INT4), ("current_connections", INT4),
            ("max_user_client_connections", INT4), ("current_client_connections", INT4),
        ],
        _users,
    ),
    "stats": Show((), [("database", TEXT), *_STAT_COLUMNS, *_AVG_COLUMNS], _stats),
    "stats_totals": Show((), [("database", TEXT), *_PLAIN_STAT_COLUMNS], _stats_totals),
    "stats_averages": Show(
        (),
        [("database", TEXT), *_PLAIN_STAT_COLUMNS[:8]]
        + [(f"avg_{name}", NUMERIC) for name, _ in _PLAIN_STAT_COLUMNS[8:]],
        _stats_averages,
    ),
    "totals": Show((), [("name", TEXT), ("value", NUMERIC)], _totals),
    "lists": Show((), [("list", TEXT), ("items", INT4)], _lists),
    "state": Show((), [("key", TEXT), ("value", TEXT)], _state),
    "mem": Show(
        (MEM,),
        [("name", TEXT), ("size", INT4), ("used", INT4), ("free", INT4), ("memtotal", INT4)],
        _mem,
    ),
    "pins": Show(
        (CLIENTS,),
        [
            ("client_id", INT4), ("user", TEXT), ("database", TEXT), ("server_id", INT4),
            ("remote_pid", INT4), ("pin_reason", TEXT), ("pinned_since", TEXT),
            ("pinned_seconds", NUMERIC), ("application_name", TEXT), ("addr", TEXT),
            ("pinned_by", TEXT), ("last_statement", TEXT), ("worker", INT4),
        ],
        _pins,
    ),
}
# fmt: on

# What drivers and tools may ask any server for (PgBouncer answers these too).
FAKE_PARAMETERS = {
    "client_encoding": "UTF-8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
    "extra_float_digits": "2",
}

HELP_TEXT = "\n\t" + "\n\t".join(
    (
        "SHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION",
        "SHOW LISTS|MEM|STATE|PINS",
        "SHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS",
        "SET key = arg",
        "RELOAD",
        "PAUSE [<db>]",
        "RESUME [<db>]",
        "DISABLE <db>",
        "ENABLE <db>",
        "RECONNECT [<db>]",
        "KILL [<db>]",
        "KILL_CLIENT <client_id>",
        "SHUTDOWN",
        "SHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS",
        "WAIT_CLOSE [<db>]",
    )
)

__all__ = ["ADMIN_DB", "FAKE_PARAMETERS", "HELP_TEXT", "SHOW_COMMANDS", "Show", "averages"]
