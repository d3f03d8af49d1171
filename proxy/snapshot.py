"""The stats model read at one moment: one worker's counters and gauges as plain
JSON-ready data, and the merge of every worker's into the whole instance's.

The admin console's SHOW commands, /metrics and the stats log line all render from a
merged snapshot, so they cannot disagree. Gauges (who is active, waiting, pinned, for
how long) are computed here, when read; the relay only bumps counters (stats.py).
Times are wall-clock seconds (``time.time``) once in a snapshot.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from . import __version__
from .config import ADMIN_DATABASES
from .pool import ClientState, Pool, Registry, ServerState
from .protocol import codes
from .stats import PERIOD_FIELDS, PoolStats

Snapshot = dict[str, Any]


class NoSnapshot(Exception):
    """No snapshot can be had now (with workers: none of them has answered)."""


ADMIN_DB = ADMIN_DATABASES[0]  # the console's row in SHOW DATABASES/POOLS/STATS
STATEMENT_CHARS = 200  # of the last statement, in SHOW CLIENTS/SERVERS and log lines

# Parts a snapshot can carry besides pools, databases and the instance's state.
CLIENTS, SERVERS, USERS, MEM = "clients", "servers", "users", "mem"

# Pool fields that add up across workers (the rest: see merge).
_POOL_SUMS = (
    "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
    "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested",
    "sv_login", "cl_idle_in_transaction", "sv_pinned", "prepared_hits", "prepared_misses",
    "logins", "servers_old",
)  # fmt: skip


def take(registry: Registry, parts: Iterable[str] = ()) -> Snapshot:
    """This worker's stats now; ``parts`` adds the per-connection rows and the like."""
    parts = set(parts)
    mono = time.monotonic()
    wall = time.time()
    offset = wall - mono  # monotonic -> wall clock

    pools: dict[tuple[str, str], dict[str, Any]] = {}
    stats_of: dict[int, tuple[dict[str, Any], PoolStats]] = {}
    for pool in registry.iter_pools():
        entry = _pool_entry(pools, pool, mono)
        stats_of.setdefault(id(pool.stats), (entry, pool.stats))

    admin_clients = 0
    login_clients = 0
    for client in registry.clients:
        state = client.state
        if state is ClientState.ADMIN:
            admin_clients += 1
            continue
        if state is ClientState.LOGIN or client.pool is None:
            login_clients += 1
            continue
        pool = client.pool
        entry = _pool_entry(pools, pool, mono)
        stats_of.setdefault(id(pool.stats), (entry, pool.stats))
        if state is ClientState.WAITING:
            entry["cl_waiting"] += 1
        elif state is not ClientState.CLOSED:
            entry["cl_active"] += 1
            server = client.server
            if server is not None and client.busy_since <= 0 and server.tx_status != codes.TX_IDLE:
                entry["cl_idle_in_transaction"] += 1

    totals = live_totals(registry)
    for key, (entry, stats) in stats_of.items():
        entry["totals"] = totals[key][1]
        entry["period"] = list(stats.period) if stats.period is not None else None
        entry["hist"] = stats.histograms()
        entry["errors"] = dict(stats.errors)
        entry["pooler_errors"] = [[r, c, n] for (r, c), n in stats.pooler_errors.items()]
        entry["pins"] = dict(stats.pins)
        entry["prepared_hits"] = stats.prepared_hits
        entry["prepared_misses"] = stats.prepared_misses
        entry["logins"] = stats.logins
    admin = _admin_pool(registry, admin_clients)
    snap: Snapshot = {
        "version": __version__,
        "worker": registry.worker,
        "workers": registry.config.workers,
        "pid": os.getpid(),
        "time": wall,
        "started": registry.started_at,
        "stats_period": registry.config.stats_period,
        "max_client_conn": registry.config.max_client_conn,  # the instance's, not a share
        "state": {
            "paused": registry.paused,
            "paused_databases": sorted(registry.paused_databases),
            "disabled_databases": sorted(registry.disabled_databases),
            "shutting_down": registry.shutting_down,
            "listening": registry.listening,
        },
        "pools": [admin, *pools.values()],
        "databases": _databases(registry, pools),
        "unpooled": {
            "pooler_errors": [[r, c, n] for (r, c), n in registry.stats.pooler_errors.items()],
        },
        "lists": {
            "databases": len(registry.config.databases) + 1,
            "users": len(_user_names(registry)),
            "pools": len(pools) + 1,
            "used_clients": len(registry.clients) - login_clients,
            "login_clients": login_clients,
            "used_servers": sum(len(p.servers) for p in registry.iter_pools()),
        },
    }
    if CLIENTS in parts:
        snap["clients"] = [_client_row(registry, c, offset) for c in list(registry.clients)]
    if SERVERS in parts:
        snap["servers"] = [
            _server_row(registry, s, offset) for p in registry.iter_pools() for s in p.servers
        ]
    if USERS in parts:
        snap["users"] = _users(registry)
    if MEM in parts:
        snap["mem"] = _memory(registry)
    for entry in pools.values():
        del entry["_seen"]  # bookkeeping of _pool_entry, not for JSON
    return snap


def live_totals(registry: Registry) -> dict[int, tuple[PoolStats, dict[str, float]]]:
    """id(PoolStats) -> (those stats, their totals now): each pool's counters with what
    its live clients answered, received and sent so far (they add theirs on leaving)."""
    live = {id(pool.stats): (pool.stats, [0, 0, 0]) for pool in registry.iter_pools()}
    for client in registry.clients:
        stats = client.stats
        if stats is not None:  # logged in to a pool
            counters = live.setdefault(id(stats), (stats, [0, 0, 0]))[1]
            counters[0] += client.fe.answered
            counters[1] += client.bytes_in
            counters[2] += client.bytes_out
    return {key: (stats, stats.totals((c[0], c[1], c[2]))) for key, (stats, c) in live.items()}


def _load_balance_hosts(pool: Pool) -> str | None:
    """SHOW POOLS' load_balance_hosts: as PgBouncer, for a host list only."""
    database = pool.settings.database
    return pool.config.load_balance_hosts_for(database) if "," in database.host else None


def _new_pool_entry(pool: Pool) -> dict[str, Any]:
    settings = pool.settings
    entry: dict[str, Any] = dict.fromkeys(_POOL_SUMS, 0)
    entry.update(
        database=settings.database.name,
        user=settings.user,
        pool_mode=pool.mode,
        load_balance_hosts=_load_balance_hosts(pool),
        pool_size=pool.size,
        paused=pool.paused,
        maxwait=0.0,
        last_error=None,
        servers_up=0,
        totals=dict.fromkeys(PERIOD_FIELDS, 0),
        period=None,
        hist=None,
        errors={},
        pooler_errors=[],
        pins={},
    )
    return entry


def _pool_entry(
    pools: dict[tuple[str, str], dict[str, Any]], pool: Pool, mono: float
) -> dict[str, Any]:
    """The entry for the pool's (database, user), its servers counted on first sight."""
    key = (pool.settings.database.name, pool.settings.user)
    entry = pools.get(key)
    if entry is not None and (id(pool) in entry["_seen"]):
        return entry
    if entry is None:
        entry = pools[key] = _new_pool_entry(pool)
        entry["_seen"] = set()
    entry["_seen"].add(id(pool))
    server: Any
    check_before = pool.check_before
    for server in pool.servers:
        state = server.state
        if state is ServerState.LOGIN:
            entry["sv_login"] += 1
        elif state is ServerState.IDLE:
            # PgBouncer's sv_used: idle, but due for server_check_query before reuse.
            entry["sv_used" if server.idle_since < check_before else "sv_idle"] += 1
        elif state is ServerState.TESTED:
            entry["sv_tested"] += 1
        elif state is ServerState.ACTIVE:
            if server.client is not None:
                entry["sv_active"] += 1
                if server.client.pinned:
                    entry["sv_pinned"] += 1
            else:
                entry["sv_tested"] += 1  # pgmux's own cleanup, reset or check query
        cancels = server.cancel_pending
        if cancels:
            entry["sv_being_canceled"] += 1
            entry["sv_active_cancel"] += cancels
        if server.generation != pool.generation:
            entry["servers_old"] += 1
    entry["sv_login"] += pool.connecting
    entry["servers_up"] += len(pool.servers) - pool.logging_in
    for waiter in pool.waiters:
        if waiter.state is ClientState.WAITING:
            entry["maxwait"] = max(entry["maxwait"], mono - waiter.wait_started)
            break
    error = pool.last_error
    if error is not None and not pool.servers:
        entry["last_error"] = error.message
    return entry


def _admin_pool(registry: Registry, admin_clients: int) -> dict[str, Any]:
    """The console's own pool row, as PgBouncer lists its ``pgbouncer`` database."""
    entry: dict[str, Any] = dict.fromkeys(_POOL_SUMS, 0)
    stats = registry.admin_stats
    entry.update(
        database=ADMIN_DB,
        user=ADMIN_DB,
        pool_mode="statement",
        pool_size=0,
        paused=False,
        maxwait=0.0,
        last_error=None,
        servers_up=0,
        cl_active=admin_clients,
        totals=stats.totals(),
        period=list(stats.period) if stats.period is not None else None,
        hist=stats.histograms(),
        errors={},
        pooler_errors=[[r, c, n] for (r, c), n in stats.pooler_errors.items()],
        pins={},
        admin=True,
    )
    return entry


def _databases(
    registry: Registry, pools: dict[tuple[str, str], dict[str, Any]]
) -> list[dict[str, Any]]:
    config = registry.config
    rows = [
        {
            "name": ADMIN_DB, "host": None, "port": config.listen_port, "database": ADMIN_DB,
            "force_user": ADMIN_DB, "pool_size": 2, "min_pool_size": 0, "reserve_pool_size": 0,
            "max_connections": 0, "max_client_connections": 0,
            "server_lifetime": int(config.server_lifetime), "pool_mode": "statement",
            "current_connections": 0, "current_client_connections": 0,
            "paused": False, "disabled": False, "admin": True,
        }
    ]  # fmt: skip
    servers: dict[str, int] = {}
    clients: dict[str, int] = {}
    for (name, _user), entry in pools.items():
        servers[name] = servers.get(name, 0) + entry["sv_active"] + entry["sv_idle"]
        servers[name] += entry["sv_used"] + entry["sv_tested"] + entry["sv_login"]
        clients[name] = clients.get(name, 0) + entry["cl_active"] + entry["cl_waiting"]
    for name, db in config.databases.items():
        rows.append(
            {
                "name": name,
                "host": db.host,  # "a,b" for a host list (PgBouncer shows it so too)
                "port": db.hosts[0][1],
                # As PgBouncer: shown for a host list only.
                "load_balance_hosts": config.load_balance_hosts_for(db) if "," in db.host else None,
                "database": db.dbname,
                "force_user": db.user,
                "pool_size": config.pool_size_for(db),
                "min_pool_size": config.min_pool_size_for(db),
                "reserve_pool_size": config.reserve_pool_size_for(db, ""),
                "max_connections": config.db_limit(db, "max_db_connections"),
                "max_client_connections": config.db_limit(db, "max_db_client_connections"),
                "server_lifetime": int(config.server_lifetime),
                "pool_mode": db.pool_mode,
                "current_connections": servers.get(name, 0),
                "current_client_connections": clients.get(name, 0),
                "paused": registry.is_paused(name),
                "disabled": name in registry.disabled_databases,
            }
        )
    return rows


def _user_names(registry: Registry) -> list[str]:
    config = registry.config
    names = dict.fromkeys([*config.users, *config.auth_file_users])
    names.update(dict.fromkeys(user for _db, user in registry.pools))
    names.update(dict.fromkeys(pool.settings.server_user for pool in registry.pools.values()))
    return sorted(names)


def _users(registry: Registry) -> list[dict[str, Any]]:
    config = registry.config
    servers: dict[str, int] = {}
    clients: dict[str, int] = {}
    for pool in registry.iter_pools():
        user = pool.settings.server_user  # max_user_connections counts server logins
        servers[user] = servers.get(user, 0) + len(pool.servers) + pool.connecting
    for client in registry.clients:
        if client.pool is not None and client.state is not ClientState.LOGIN:
            clients[client.user] = clients.get(client.user, 0) + 1
    rows = []
    for name in _user_names(registry):
        found = config.users.get(name)
        rows.append(
            {
                "name": name,
                "pool_size": found.pool_size if found is not None else None,
                "pool_mode": found.pool_mode if found is not None else None,
                "reserve_pool_size": found.reserve_pool_size if found is not None else None,
                "max_user_connections": config.user_limit(name, "max_user_connections"),
                "max_user_client_connections": config.user_limit(
                    name, "max_user_client_connections"
                ),
                "current_connections": servers.get(name, 0),
                "current_client_connections": clients.get(name, 0),
            }
        )
    return rows


def _transport_info(transport: Any) -> tuple[str, int, str | None]:
    """(local address, local port, TLS description) of a connection."""
    local, local_port = "unix", 0
    tls = None
    if transport is not None:
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple):
            local, local_port = str(sockname[0]), int(sockname[1])
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            tls = f"{ssl_object.version()}/{cipher[0] if cipher else '?'}"
    return local, local_port, tls


def _statement(registry: Registry, sql: bytes) -> str | None:
    if not registry.config.log_statement_text or not sql:
        return None
    return sql[:STATEMENT_CHARS].decode("utf-8", "replace")


def client_activity(client: Any) -> str:
    """What a logged-in client is doing: active (a request running), idle in
    transaction, idle in transaction (aborted) (its server was lost under its
    transaction block), pinned (holds its server between transactions), idle (no
    server), waiting (queued for one), login, or admin."""
    state = client.state
    if state is ClientState.WAITING:
        return "waiting"
    if state is ClientState.LOGIN:
        return "login"
    if state is ClientState.ADMIN:
        return "admin"
    if state is ClientState.FAILED:  # its server was lost: see ClientConnection.failed
        return "idle in transaction (aborted)"
    server = client.server
    if server is None:
        return "idle"
    if client.busy_since > 0:
        return "active"
    if server.tx_status != codes.TX_IDLE:
        return "idle in transaction"
    if client.pinned:
        return "pinned"
    return "active"  # session mode: the server is the client's for the whole session


def _client_row(registry: Registry, client: Any, offset: float) -> dict[str, Any]:
    addr, _, port = client.addr.rpartition(":")
    if client.is_unix or not addr:
        addr, port = "unix", str(registry.config.listen_port)
    local, local_port, tls = _transport_info(client.transport)
    server = client.server
    busy = client.busy_since
    request = abs(busy) if busy else client.connected_at
    query_start = busy if busy > 0 else None
    return {
        "id": client.id,
        "worker": registry.worker,
        "user": client.user,
        "database": client.dbname,
        "state": client_activity(client),
        "addr": addr,
        "port": int(port) if port.isdigit() else 0,
        "local_addr": local,
        "local_port": local_port,
        "connect_time": client.connected_at + offset,
        "request_time": request + offset,
        "wait": (time.monotonic() - client.wait_started)
        if client.state is ClientState.WAITING
        else 0.0,
        "link": server.id if server is not None else None,
        "remote_pid": server.backend_pid if server is not None else 0,
        "tls": tls,
        "application_name": dict(client.settings).get("application_name", ""),
        "prepared_statements": len(client.statements or ()),
        "xact_start": client.xact_since + offset if client.xact_since else None,
        "query_start": query_start + offset if query_start else None,
        "pin_reason": ", ".join(client.pinned) if client.pinned else None,
        "last_statement": _statement(registry, client.last_sql),
        "pinned_at": client.pinned_at + offset if client.pinned else None,
        "pinned_by": _statement(registry, client.pinned_by) if client.pinned else None,
    }


def _server_row(registry: Registry, server: Any, offset: float) -> dict[str, Any]:
    pool = server.pool
    db = pool.settings.database
    client = server.client
    state = server.state
    if state is ServerState.LOGIN:
        activity = "new"
    elif state is ServerState.IDLE:
        activity = "used" if server.idle_since < pool.check_before else "idle"
    elif server.cancel_pending:
        activity = "being_canceled"
    elif client is None:
        activity = "tested"  # pgmux's own query: check, cleanup, reset, settings
    else:
        activity = client_activity(client)
    local, local_port, tls = _transport_info(server.transport)
    host = server.host  # the host of the database's list this server is on
    busy = client.busy_since if client is not None else 0.0
    last_used = server.idle_since if state is ServerState.IDLE or not busy else abs(busy)
    return {
        "id": server.id,
        "worker": registry.worker,
        "user": pool.settings.server_user,
        "database": db.name,
        "state": activity,
        "addr": "unix" if host.startswith("/") else host,
        "port": server.port,
        "local_addr": local,
        "local_port": local_port,
        "connect_time": server.created_at + offset,
        "request_time": last_used + offset,
        "wait": 0.0,
        "close_needed": server.generation != pool.generation,
        "link": client.id if client is not None else None,
        "remote_pid": server.backend_pid,
        "tls": tls,
        "application_name": dict(server.settings).get("application_name", ""),
        "prepared_statements": len(server.prepared or ()),
        "xact_start": client.xact_since + offset if client and client.xact_since else None,
        "query_start": busy + offset if busy > 0 else None,
        "pin_reason": ", ".join(client.pinned) if client and client.pinned else None,
        "last_statement": _statement(registry, client.last_sql) if client else None,
    }


def _memory(registry: Registry) -> list[dict[str, Any]]:
    """SHOW MEM: Python objects per kind (the size of one, measured), and the RSS."""
    rows = []
    clients = list(registry.clients)
    servers = [s for p in registry.iter_pools() for s in p.servers]
    for name, objects in (("client_cache", clients), ("server_cache", servers)):
        size = _connection_size(objects[0]) if objects else 0
        rows.append({"name": name, "size": size, "used": len(objects)})
    rows.append({"name": "pool_cache", "size": 0, "used": len(registry.pools)})
    rows.append({"name": "statement_cache", "size": 0, "used": registry.statement_names.count()})
    rss = 0
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    # In KiB: PgBouncer's SHOW MEM columns are int4, which bytes outgrow at 2 GiB.
    rows.append({"name": "process_rss_kib", "size": rss // 1024, "used": 1})
    return rows


def _connection_size(conn: Any) -> int:
    """Bytes of one connection object and the small objects only it owns."""
    size = sys.getsizeof(conn)
    fe = getattr(conn, "fe", None)
    if fe is not None:
        size += sys.getsizeof(fe) + sys.getsizeof(fe.requests)
    stream = getattr(conn, "stream", None)
    if stream is not None:
        size += sys.getsizeof(stream)
    return size


# -- merging ----------------------------------------------------------------------------


def merge(snaps: list[Snapshot]) -> Snapshot:
    """The whole instance from its workers' snapshots (one snapshot: itself)."""
    if len(snaps) == 1:
        return snaps[0]
    first = snaps[0]
    merged: Snapshot = {
        "version": first["version"],
        "worker": None,
        "workers": first["workers"],
        "pid": [s["pid"] for s in snaps],
        "time": max(s["time"] for s in snaps),
        "started": min(s["started"] for s in snaps),
        "stats_period": first["stats_period"],
        "max_client_conn": first["max_client_conn"],
        "state": {
            "paused": any(s["state"]["paused"] for s in snaps),
            "paused_databases": sorted({d for s in snaps for d in s["state"]["paused_databases"]}),
            "disabled_databases": sorted(
                {d for s in snaps for d in s["state"]["disabled_databases"]}
            ),
            "shutting_down": any(s["state"]["shutting_down"] for s in snaps),
            "listening": all(s["state"]["listening"] for s in snaps),
        },
        "pools": _merge_pools([p for s in snaps for p in s["pools"]]),
        "databases": _merge_rows(
            [d for s in snaps for d in s["databases"]],
            "name",
            sums=("current_connections", "current_client_connections"),
            anys=("paused", "disabled"),
        ),
        "unpooled": {
            "pooler_errors": _sum_error_lists([s["unpooled"]["pooler_errors"] for s in snaps])
        },
        "lists": {
            key: max(s["lists"][key] for s in snaps)
            if key in ("databases", "users", "pools")
            else sum(s["lists"][key] for s in snaps)
            for key in first["lists"]
        },
    }
    for part in (CLIENTS, SERVERS):
        if part in first:
            merged[part] = [row for s in snaps for row in s.get(part, ())]
    if USERS in first:
        merged[USERS] = _merge_rows(
            [u for s in snaps for u in s.get(USERS, ())],
            "name",
            sums=("current_connections", "current_client_connections"),
        )
    if MEM in first:
        merged[MEM] = _merge_rows(
            [m for s in snaps for m in s.get(MEM, ())], "name", sums=("used", "size"), anys=()
        )
    return merged


def _merge_rows(
    rows: list[dict[str, Any]], key: str, *, sums: tuple[str, ...], anys: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for row in rows:
        found = out.get(row[key])
        if found is None:
            out[row[key]] = dict(row)
            continue
        for name in sums:
            found[name] += row[name]
        for name in anys:
            found[name] = found[name] or row[name]
    return list(out.values())


def _sum_error_lists(lists: list[list[list[Any]]]) -> list[list[Any]]:
    counts: dict[tuple[str, str], int] = {}
    for items in lists:
        for reason, code, n in items:
            counts[(reason, code)] = counts.get((reason, code), 0) + n
    return [[r, c, n] for (r, c), n in counts.items()]


def _sum_dicts(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, n in d.items():
            out[k] = out.get(k, 0) + n
    return out


def _merge_pools(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in entries:
        groups.setdefault((entry["database"], entry["user"]), []).append(entry)
    merged = []
    for group in groups.values():
        out = dict(group[0])
        for name in (*_POOL_SUMS, "pool_size", "servers_up"):
            out[name] = sum(e[name] for e in group)
        out["maxwait"] = max(e["maxwait"] for e in group)
        out["paused"] = any(e["paused"] for e in group)
        out["last_error"] = next((e["last_error"] for e in group if e["last_error"]), None)
        out["totals"] = {k: sum(e["totals"][k] for e in group) for k in PERIOD_FIELDS}
        periods = [e["period"] for e in group if e["period"] is not None]
        out["period"] = (
            [
                max(p[0] for p in periods),
                {k: sum(p[1][k] for p in periods) for k in PERIOD_FIELDS},
            ]
            if periods
            else None
        )
        out["hist"] = {
            name: [sum(col) for col in zip(*(e["hist"][name] for e in group), strict=True)]
            for name in group[0]["hist"]
        }
        out["errors"] = _sum_dicts([e["errors"] for e in group])
        out["pins"] = _sum_dicts([e["pins"] for e in group])
        out["pooler_errors"] = _sum_error_lists([e["pooler_errors"] for e in group])
        merged.append(out)
    return merged
