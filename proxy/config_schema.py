"""What every setting means, and the configuration reference rendered from it.

Only the words live here: defaults come from the config dataclasses (through
``config_items()`` and ``format_value``), restart-or-live from ``RESTART_KEYS``, so
docs/configuration.md cannot show a default the code does not have. Regenerate it with
``python -m proxy.config_schema > docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import (
    AUTH_TYPES,
    LOAD_BALANCE_HOSTS,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    POOL_MODES,
    RESTART_KEYS,
    SSLMODES,
    TARGET_SESSION_ATTRS,
    DatabaseConfig,
    UserConfig,
    config_items,
    format_value,
)


@dataclass(frozen=True, slots=True)
class Setting:
    """One key's description: where it is listed, what it takes, what it does.

    ``unset`` is for ``[databases.NAME]`` / ``[users.NAME]`` keys whose dataclass default
    is "not set": the top-level key whose value applies instead, ``NAME`` (the table's
    own name) or ``none``.
    """

    section: str
    kind: str
    meaning: str
    unset: str = ""


LISTENING = "Listening"
WORKERS = "Workers"
POOLS = "Pools"
SESSION = "Prepared statements and session state"
TIMEOUTS = "Timeouts"
CONNECTIONS = "Connections"
AUTHENTICATION = "Authentication"
TLS = "TLS"
LOGGING = "Logging"
METRICS = "Metrics"
PER_DATABASE = "Per database"
PER_USER = "Per user"

# Headings in the order the reference shows them.
SECTIONS = (
    LISTENING, WORKERS, POOLS, SESSION, TIMEOUTS, CONNECTIONS, AUTHENTICATION, TLS,
    LOGGING, METRICS, PER_DATABASE, PER_USER,
)  # fmt: skip

SECTION_INTROS = {
    LISTENING: "Where clients connect.",
    WORKERS: "How many processes serve the port.",
    POOLS: "How many server connections each (database, user) pool may have, and when "
    "a client gives its server back.",
    SESSION: "What makes transaction pooling behave like a dedicated connection.",
    TIMEOUTS: "Seconds; fractions are allowed, and 0 turns a timeout off. The client "
    "timeouts are checked by sampling every 0.5 s.",
    CONNECTIONS: "Server connections and the wire protocol.",
    AUTHENTICATION: "How clients prove who they are, where secrets come from, and who may "
    "use the admin console (database `pgbouncer` or `pgmux`).",
    TLS: "`client_tls_*` is the leg towards clients, `server_tls_*` the leg towards "
    "PostgreSQL (PgBouncer's names).",
    LOGGING: "Logs go to stderr.",
    METRICS: "The `[metrics]` table: the HTTP endpoint serving `/metrics` (Prometheus), "
    "`/healthz` (liveness) and `/readyz` (readiness). With workers the supervisor "
    "serves it for the whole instance.",
    PER_DATABASE: "A `[databases.NAME]` table per database: NAME is what clients connect "
    "to; at least one is required. Set these in the file or with `--set "
    "databases.NAME.KEY=VALUE`; `--upstream` makes one. A reload applies them; a "
    "pool whose server settings change (host, port, dbname, user, password, "
    "target_session_attrs) gets new server connections as the old ones go idle.",
    PER_USER: "A `[users.NAME]` table per user: the client login (checked with "
    "`auth_type`) and, unless the database forces its own `user`, the server login. Set "
    "these in the file or with `--set users.NAME.KEY=VALUE`. The timeouts override the "
    "global ones for this user's connections.",
}


def _choice(values: tuple[str, ...]) -> str:
    return "one of " + ", ".join(f"`{v}`" for v in values)


_SECONDS = "seconds, 0 = off"
_BOOL = "boolean"

# Every top-level and [metrics] key, as config_items() names them.
SETTINGS: Mapping[str, Setting] = {
    # -- Listening
    "listen_addr": Setting(
        LISTENING,
        "string",
        "Address to accept TCP clients on: one host, a comma-separated list, or `*` for "
        "every interface (PgBouncer's setting; PgBouncer listens on no TCP address "
        "unless it is set).",
    ),
    "listen_port": Setting(
        LISTENING,
        "TCP port, 1 to 65535",
        "Port for clients (PgBouncer's default). It also names the unix socket, "
        "`.s.PGSQL.<listen_port>`.",
    ),
    "listen_backlog": Setting(
        LISTENING,
        "integer, at least 1",
        "Length of the kernel's accept queue on each listening socket. PgBouncer defaults "
        "to 128; pgmux to 1024, so a connection storm waits in the queue instead of being "
        "refused.",
    ),
    "unix_socket_dir": Setting(
        LISTENING,
        "directory",
        "Also listen on the unix socket `DIR/.s.PGSQL.<listen_port>`; empty: no unix "
        "socket. PgBouncer defaults to /tmp; pgmux listens on TCP only unless this is set. "
        'In `auth_hba_file`, "local" lines match this socket.',
    ),
    "unix_socket_mode": Setting(
        LISTENING,
        'octal file mode as a string, "0000" to "0777"',
        "File mode of the unix socket: who may connect through it (PgBouncer's setting).",
    ),
    # -- Workers
    "workers": Setting(
        WORKERS,
        f"integer, 1 to {MAX_WORKERS}",
        "Worker processes; one Python process uses one CPU core. With more than 1, pgmux "
        "supervises that many workers: each binds `listen_port` with SO_REUSEPORT, they "
        "share the unix socket, and one that dies is restarted. Every pool_size, "
        "min_pool_size and max_client_conn is split between them (but no worker gets "
        "less than 1, so a limit below `workers` is exceeded, with a warning at startup). "
        "PgBouncer runs a single process.",
    ),
    # -- Pools
    "pool_mode": Setting(
        POOLS,
        _choice(POOL_MODES),
        "When a client's server connection goes back to the pool: when the client "
        "disconnects (`session`, then `server_reset_query` runs), when a transaction ends "
        "(`transaction`), or after every statement (`statement`; transaction blocks are "
        "refused with 0A000). PgBouncer defaults to `session`; pgmux to `transaction`. "
        "Overridden per database and per user; a change applies to clients that log in "
        "after it.",
    ),
    "default_pool_size": Setting(
        POOLS,
        "integer, at least 1",
        "Server connections per (database, user) pool (PgBouncer's meaning and default). "
        "Clients beyond it queue, first come first served, for up to "
        "`query_wait_timeout`. Overridden by `[databases.NAME] pool_size` and "
        "`[users.NAME] pool_size`; with workers, split between them.",
    ),
    "min_pool_size": Setting(
        POOLS,
        "integer, at least 0",
        "Server connections each pool opens ahead of demand and keeps open even when "
        "idle, so a burst after a quiet spell does not wait for server logins "
        "(PgBouncer's meaning). Overridden per database.",
    ),
    "max_client_conn": Setting(
        POOLS,
        "integer, at least 1",
        "Client connections pgmux accepts in total, logging in or logged in (PgBouncer's "
        "meaning and default). One more gets SQLSTATE 53300 at login. Each costs a few "
        "KiB of memory, not a PostgreSQL backend, so it can be far above PostgreSQL's "
        "max_connections. With workers, split between them.",
    ),
    "reserve_pool_size": Setting(
        POOLS,
        "integer, at least 0",
        "Extra server connections a pool may open once a client has waited "
        "`reserve_pool_timeout` (PgBouncer's meaning). They close again as they are "
        "released with no client waiting, so the pool shrinks back to its size when the "
        "rush is over (PgBouncer keeps them until server_idle_timeout). Still within "
        "`max_db_connections` and `max_user_connections`. Overridden per database and per "
        "user; with workers, split between them. 0: no reserve.",
    ),
    "reserve_pool_timeout": Setting(
        POOLS,
        _SECONDS,
        "How long the longest-waiting client of a pool waits before the reserve pool "
        "opens (checked twice a second). 0: never.",
    ),
    "max_db_connections": Setting(
        POOLS,
        "integer, at least 0",
        "Server connections per database, all its pools (users) together. A pool that "
        "needs one more first closes an idle server of another pool of the database; "
        "when there is none, its clients wait, and servers released by pools holding "
        "more than their share go to the pool waiting longest, so no pool starves behind "
        "a busy one. Counts the `[databases]` name clients use. Overridden per database; "
        "with workers, split between them. 0: no limit.",
    ),
    "max_user_connections": Setting(
        POOLS,
        "integer, at least 0",
        "Server connections per server login (the database's forced `user`, else the "
        "client's user), all its databases together; shared as `max_db_connections` is. "
        "Overridden per user; with workers, split between them. 0: no limit.",
    ),
    "max_db_client_connections": Setting(
        POOLS,
        "integer, at least 0",
        "Logged-in client connections per database; one more gets SQLSTATE 53300 at "
        "login. Overridden per database; with workers, split between them. 0: no limit.",
    ),
    "max_user_client_connections": Setting(
        POOLS,
        "integer, at least 0",
        "Logged-in client connections per user (the client's login); one more gets "
        "SQLSTATE 53300 at login. Overridden per user; with workers, split between them. "
        "0: no limit.",
    ),
    "server_round_robin": Setting(
        POOLS,
        "boolean",
        "Hand out the server that has been idle longest, so all are used in turn "
        "(useful when the servers are behind a TCP load balancer). Off: the one used "
        "most recently, whose caches are warm (PgBouncer's meaning and default).",
    ),
    # -- Prepared statements and session state
    "max_prepared_statements": Setting(
        SESSION,
        "integer, at least 0",
        "Named prepared statements work in transaction mode: each client's statement maps "
        "to a shared server-side one, prepared on whichever server the client gets. Each "
        "server keeps at most this many (the least recently used are closed when it goes "
        "back to the pool). 0 turns the mapping off: names pass through unchanged, as "
        "with PgBouncer before 1.21 (PgBouncer 1.21+ has the same knob).",
    ),
    "session_state": Setting(
        SESSION,
        "one of `pin`, `error`",
        "SET, RESET and set_config() follow a client to every server it gets. For state "
        "that cannot follow it (temporary tables, session advisory locks, LISTEN, cursors "
        "WITH HOLD, SQL-level PREPARE, LOAD): `pin` keeps the client on its server until "
        "the state is cleared or it disconnects (logged once, with the reason); `error` "
        "refuses such statements with 0A000. pgmux's own.",
    ),
    "session_state_check": Setting(
        SESSION,
        "one of `auto`, `always`",
        "When pgmux asks the server what a session holds: `auto` after a transaction "
        "whose command tags or query text hint at state; `always` after every "
        "transaction (one more round trip each, but it also catches functions that "
        "change settings or create temporary tables internally). pgmux's own.",
    ),
    # -- Timeouts
    "query_wait_timeout": Setting(
        TIMEOUTS,
        _SECONDS,
        "How long a request may wait in a pool's queue for a server connection; then "
        "it gets an ERROR 57014 naming the pool and its size, and the session goes on "
        "(PgBouncer disconnects the client). Requests pipelined behind it queue again. "
        "A login still waiting for the pool's first server gets it as FATAL. "
        "Overridden per user.",
    ),
    "query_wait_notify": Setting(
        TIMEOUTS,
        _SECONDS,
        "A client queued this long gets one NOTICE saying so: the pool, how many servers "
        "are busy, its place in the queue and who holds the servers (PgBouncer's "
        "setting and default; pgmux's notice also names the holders).",
    ),
    "client_login_timeout": Setting(
        TIMEOUTS,
        _SECONDS,
        "Time a client has from connecting to the end of its login (TLS, startup, "
        "authentication, and the first server connection when one is needed); then it "
        "gets 57014 (PgBouncer's meaning and default).",
    ),
    "server_connect_timeout": Setting(
        TIMEOUTS,
        _SECONDS,
        "Bound on the TCP connect to PostgreSQL and, separately, on the server login "
        "that follows (PgBouncer's meaning and default).",
    ),
    "server_login_retry": Setting(
        TIMEOUTS,
        _SECONDS,
        "After a server login failed (PostgreSQL refused it), new client logins to that "
        "pool get the cached error this long instead of another attempt, while no server "
        "connection of the pool is up (PgBouncer's knob and default). pgmux does not "
        "apply it to outages: a server it cannot reach, one that closes the connection "
        "during the login, or one starting up or shutting down (57P03) is tried again "
        "at once, so a PostgreSQL restart costs clients only its own length.",
    ),
    "server_idle_timeout": Setting(
        TIMEOUTS,
        _SECONDS,
        "Close server connections idle in the pool this long, down to min_pool_size "
        "(PgBouncer's meaning and default).",
    ),
    "server_lifetime": Setting(
        TIMEOUTS,
        _SECONDS,
        "Close server connections this old when they are released and nobody waits, or "
        "when idle (PgBouncer's meaning and default). Each server's lifetime is this "
        "less a random part of up to a tenth, drawn when it connects, so servers opened "
        "together do not all reconnect at once (PgBouncer has no jitter).",
    ),
    "cancel_wait_timeout": Setting(
        TIMEOUTS,
        "seconds (0 means 10)",
        "Bound on forwarding a cancel request to PostgreSQL, and on cleaning up a server "
        "left busy by a client that disconnected mid-query; a server still busy then is "
        "closed. Unlike the other timeouts, 0 does not turn it off.",
    ),
    "shutdown_timeout": Setting(
        TIMEOUTS,
        _SECONDS,
        "On SIGTERM or SIGINT, idle clients are closed at once and clients in a "
        "transaction may finish it for this long; a second signal ends it now. pgmux's "
        "own.",
    ),
    "client_idle_timeout": Setting(
        TIMEOUTS,
        _SECONDS,
        "Close clients that sent nothing (outside a transaction) this long, with 57P05 "
        "(PgBouncer's meaning). Overridden per user.",
    ),
    "idle_transaction_timeout": Setting(
        TIMEOUTS,
        _SECONDS,
        "Close clients idle inside a transaction this long, with 25P03; their "
        "transaction is rolled back and the server goes back to the pool (PgBouncer's "
        "meaning). Overridden per user.",
    ),
    "query_timeout": Setting(
        TIMEOUTS,
        _SECONDS,
        "Cancel queries that run this long. PgBouncer closes both connections; pgmux "
        "sends PostgreSQL a cancel request, so the client gets 57014 and stays "
        "connected. Overridden per user.",
    ),
    "transaction_timeout": Setting(
        TIMEOUTS,
        _SECONDS,
        "A transaction open this long, explicit or the implicit one of a single "
        "statement, busy or idle, ends its client's connection with FATAL 25P04; the "
        "transaction is rolled back (a running query cancelled first) and the server "
        "goes back clean. PostgreSQL 17's and PgBouncer's meaning. Overridden per user.",
    ),
    # -- Connections
    "server_reset_query": Setting(
        CONNECTIONS,
        "SQL, empty = none",
        "Run on a server connection released in session mode, before another client "
        "gets it (PgBouncer's meaning and default). In transaction mode pgmux resets "
        "what differs itself.",
    ),
    "server_check_query": Setting(
        CONNECTIONS,
        'SQL; "<empty>" = an empty query; empty = no checks',
        "Run on a server connection idle longer than server_check_delay before a client "
        "gets it; the client waits for the answer. A server that fails it (an error, a "
        "transaction left open, no answer within server_connect_timeout when that is "
        "set, the connection closing) is closed with a log line, and the client gets "
        "another server without seeing an error. PgBouncer's meaning and 1.24's default "
        "(`<empty>`: a Query with no statement, the cheapest round trip). Unlike "
        "PgBouncer, an error counts as a failure (PgBouncer ignores it), and the wait for "
        "the answer is bounded (PgBouncer waits until TCP gives up).",
    ),
    "server_check_delay": Setting(
        CONNECTIONS,
        "seconds, 0 = check every time",
        "How long a server connection may sit idle and still be handed out unchecked "
        "(PgBouncer's meaning and default). Measured to within the janitor's 0.5 s "
        "sweep. A server handed straight from one client to a waiting one, or opened "
        "for a waiting client, goes to it unchecked.",
    ),
    "tcp_keepalive": Setting(
        CONNECTIONS,
        _BOOL,
        "SO_KEEPALIVE on every client and server socket, so dead peers are noticed "
        "(PgBouncer's setting). The timings are the kernel's unless set below.",
    ),
    "tcp_keepidle": Setting(
        CONNECTIONS,
        "whole seconds, 0 = the kernel's (7200 on Linux)",
        "Idle time before the first keepalive probe (TCP_KEEPIDLE), on client and server "
        "sockets, with tcp_keepalive on. PgBouncer's setting. A reload applies it to "
        "connections made afterwards.",
    ),
    "tcp_keepintvl": Setting(
        CONNECTIONS,
        "whole seconds, 0 = the kernel's (75 on Linux)",
        "Time between keepalive probes (TCP_KEEPINTVL). PgBouncer's setting.",
    ),
    "tcp_keepcnt": Setting(
        CONNECTIONS,
        "count, 0 to 127, 0 = the kernel's (9 on Linux)",
        "Unanswered probes before the connection is dropped (TCP_KEEPCNT). PgBouncer's "
        "setting. Dead peer noticed after about tcp_keepidle + tcp_keepintvl x tcp_keepcnt.",
    ),
    "tcp_user_timeout": Setting(
        CONNECTIONS,
        "milliseconds, 0 = the kernel's",
        "How long sent data may stay unacknowledged before the connection is dropped "
        "(TCP_USER_TIMEOUT): a server or client that vanished mid-transfer is noticed "
        "without waiting for retransmissions to run out. PgBouncer's setting and unit.",
    ),
    "max_packet_size": Setting(
        CONNECTIONS,
        "bytes, 1024 to 2147483647",
        "Largest protocol message accepted from clients and servers. Every length on the "
        "wire is checked against it before it is trusted; a longer one is a protocol "
        "violation (08P01) and closes the connection (PgBouncer's name and default).",
    ),
    "load_balance_hosts": Setting(
        CONNECTIONS,
        _choice(LOAD_BALANCE_HOSTS),
        "For a database with several hosts: the order a new server connection tries them "
        "in. `disable`: as configured, every time (libpq's default); `round-robin`: each "
        "new server connection starts at the next host (PgBouncer's); `random`: shuffled "
        "(libpq's). Either way a host that failed within server_login_retry is tried "
        "after the others, and one that is up is never skipped for one that is not.",
    ),
    "target_session_attrs": Setting(
        CONNECTIONS,
        _choice(TARGET_SESSION_ATTRS),
        "Which servers a new server connection accepts, as libpq defines it: `read-write` "
        "and `read-only` by in_hot_standby and default_transaction_read_only, `primary` and "
        "`standby` by in_hot_standby (reported at login by PostgreSQL 14+; older servers "
        "are asked with SHOW transaction_read_only or pg_is_in_recovery()), "
        "`prefer-standby` a standby when one answers, else any. A host of the wrong kind is "
        "closed and the next one tried; while one answers with the wrong kind (a standby "
        "not yet promoted), waiting clients wait and pgmux looks again every second, for up "
        "to server_connect_timeout, then they get 08001 naming each host and what it was. "
        "A server that stops matching later is closed once released.",
    ),
    # -- Authentication
    "auth_type": Setting(
        AUTHENTICATION,
        _choice(AUTH_TYPES),
        "How clients prove who they are. `plain` is PgBouncer's cleartext method; "
        "`scram-sha-256` also offers SCRAM-SHA-256-PLUS on TLS; `cert` takes the user "
        "from a client certificate's CN; `hba` decides per connection by "
        "`auth_hba_file`. An unknown user fails like a wrong password (28P01). PgBouncer "
        "defaults to `md5`.",
    ),
    "auth_file": Setting(
        AUTHENTICATION,
        "path, relative to the config file",
        'PgBouncer\'s userlist.txt, read unchanged: lines of `"user" "secret"` (plaintext, '
        "md5 hash or SCRAM secret). Consulted after `[users.NAME]`, before auth_query.",
    ),
    "auth_hba_file": Setting(
        AUTHENTICATION,
        "path, relative to the config file",
        'pg_hba.conf-style rules for `auth_type = "hba"`: local, host, hostssl, '
        "hostnossl; methods trust, reject, md5, password, scram-sha-256, cert; the "
        "option clientcert=verify-ca|verify-full. Anything else is refused at load time.",
    ),
    "auth_user": Setting(
        AUTHENTICATION,
        "user name, empty = off",
        "Users found neither in `[users]` nor in auth_file are looked up in PostgreSQL: "
        "pgmux connects as this user (whose own password must be in `[users]` or "
        "auth_file) and runs `auth_query` (PgBouncer's meaning).",
    ),
    "auth_query": Setting(
        AUTHENTICATION,
        "SQL taking the user name as $1",
        "The lookup auth_user runs; it returns the user name and its secret. The default "
        "is PgBouncer's, schema-qualified, and returns no secret for roles past "
        "rolvaliduntil.",
    ),
    "auth_dbname": Setting(
        AUTHENTICATION,
        "database name, empty = the client's",
        "The `[databases]` entry auth_query runs in (PgBouncer's meaning); empty: the "
        "database the client asked for.",
    ),
    "auth_query_cache_ttl": Setting(
        AUTHENTICATION,
        "seconds, 0 = ask every time",
        'How long auth_query answers (also "no such user") are cached, so a connection '
        "storm does not become an auth_query storm; concurrent logins of one user share "
        "one query. pgmux's own.",
    ),
    "admin_users": Setting(
        AUTHENTICATION,
        "list of user names",
        "Users allowed to run every admin console command (SHOW, SET, PAUSE, RESUME, "
        "KILL, RELOAD, SHUTDOWN, ...). They authenticate like any user (PgBouncer's "
        "meaning).",
    ),
    "stats_users": Setting(
        AUTHENTICATION,
        "list of user names",
        "Users allowed into the admin console for SHOW commands only (PgBouncer's meaning).",
    ),
    # -- TLS
    "client_tls_sslmode": Setting(
        TLS,
        _choice(SSLMODES),
        "TLS towards clients. `disable`: SSLRequest is answered N; `allow`/`prefer`: TLS "
        "when the client asks (SSLRequest or PostgreSQL 17 direct TLS); `require`: TCP "
        "clients must use TLS (else 28000); `verify-ca`: and present a certificate signed "
        "by client_tls_ca_file; `verify-full`: whose CN is the user name.",
    ),
    "client_tls_key_file": Setting(
        TLS,
        "path (PEM)",
        "pgmux's private key for client connections; needed with client_tls_cert_file "
        "for any mode but disable.",
    ),
    "client_tls_cert_file": Setting(
        TLS,
        "path (PEM)",
        "pgmux's certificate for client connections.",
    ),
    "client_tls_ca_file": Setting(
        TLS,
        "path (PEM)",
        "CA that signs client certificates (for `cert` authentication, clientcert= and "
        "the verify-* modes).",
    ),
    "client_tls_protocols": Setting(
        TLS,
        "`secure` (TLS 1.2 and 1.3), `all`, or a list",
        "TLS versions offered to clients (PgBouncer's syntax).",
    ),
    "client_tls_ciphers": Setting(
        TLS,
        "`default`, `normal`, `fast`, or an OpenSSL cipher list",
        "Ciphers offered to clients (PgBouncer's syntax).",
    ),
    "server_tls_sslmode": Setting(
        TLS,
        _choice(SSLMODES),
        "TLS towards PostgreSQL. `allow`: plain first, TLS if the server refuses a plain "
        "login; `prefer`: TLS if offered; `require`: TLS or fail; `verify-ca`: the "
        "server certificate must be signed by server_tls_ca_file; `verify-full`: and "
        "name the `[databases]` host. Not used on unix sockets.",
    ),
    "server_tls_key_file": Setting(
        TLS,
        "path (PEM)",
        "Private key of the client certificate pgmux shows PostgreSQL (for its cert "
        "authentication); optional.",
    ),
    "server_tls_cert_file": Setting(
        TLS,
        "path (PEM)",
        "Client certificate pgmux shows PostgreSQL; optional, with server_tls_key_file.",
    ),
    "server_tls_ca_file": Setting(
        TLS,
        "path (PEM)",
        "CA that signs PostgreSQL's certificate, for verify-ca and verify-full.",
    ),
    "server_tls_protocols": Setting(
        TLS,
        "`secure` (TLS 1.2 and 1.3), `all`, or a list",
        "TLS versions pgmux accepts from PostgreSQL.",
    ),
    "server_tls_ciphers": Setting(
        TLS,
        "`default`, `normal`, `fast`, or an OpenSSL cipher list",
        "Ciphers pgmux offers PostgreSQL.",
    ),
    # -- Logging
    "log_level": Setting(LOGGING, _choice(LOG_LEVELS), "The least severe log lines written."),
    "log_format": Setting(
        LOGGING,
        _choice(LOG_FORMATS),
        "`json` writes one JSON object per line (time, level, logger, message, worker) "
        "for log shippers.",
    ),
    "log_connections": Setting(
        LOGGING, _BOOL, "A line per successful client login (PgBouncer's setting)."
    ),
    "log_disconnections": Setting(
        LOGGING, _BOOL, "A line per client disconnect, with why (PgBouncer's setting)."
    ),
    "log_pooler_errors": Setting(
        LOGGING,
        _BOOL,
        "A line per error pgmux sends a client, with its SQLSTATE and message "
        "(PgBouncer's setting).",
    ),
    "log_stats": Setting(
        LOGGING,
        _BOOL,
        "The stats line every stats_period: rates, averages, and what is queued and held "
        "(PgBouncer's setting).",
    ),
    "log_statement_text": Setting(
        LOGGING,
        _BOOL,
        "Show the first 200 characters of the last statement in SHOW CLIENTS, SERVERS "
        "and PINS and in the log lines naming who holds a pool; `false` hides statement "
        "text everywhere (it may carry personal data). pgmux's own.",
    ),
    "stats_period": Setting(
        LOGGING,
        "seconds, at least 1",
        "Period of the stats line and the window of SHOW STATS_AVERAGES (PgBouncer's "
        "meaning and default).",
    ),
    "idle_transaction_warn": Setting(
        LOGGING,
        _SECONDS,
        "The leak detector: a client idle inside a transaction this long is logged once, "
        "naming it, its application_name, the server it holds and its last statement. "
        "Nothing is done to it (idle_transaction_timeout does that). pgmux's own.",
    ),
    # -- Metrics
    "metrics.enabled": Setting(METRICS, _BOOL, "Serve the HTTP endpoint at all."),
    "metrics.listen_addr": Setting(
        METRICS,
        "address",
        "Address of the HTTP endpoint; `0.0.0.0` for a scraper on another host.",
    ),
    "metrics.listen_port": Setting(
        METRICS,
        "TCP port, 1 to 65535",
        "Port of the HTTP endpoint; the default is pgbouncer_exporter's, so scrape "
        "configs written for it keep working.",
    ),
}

DATABASE_SETTINGS: Mapping[str, Setting] = {
    "host": Setting(
        PER_DATABASE,
        "host name, address, or unix socket directory; or several: a comma-separated "
        "string or a list",
        'Where PostgreSQL runs; a value starting with "/" is the directory of its unix '
        "socket (PgBouncer's meaning). Several hosts are tried as libpq tries them (see "
        "load_balance_hosts and target_session_attrs).",
    ),
    "port": Setting(
        PER_DATABASE,
        'TCP port, 1 to 65535; or one per host: a list or a string like "5432,5433"',
        "PostgreSQL's port: one for every host, or one per host in the same order (libpq's rule).",
    ),
    "dbname": Setting(
        PER_DATABASE,
        "database name",
        "The database on the server; clients connect to NAME, pgmux to this.",
        unset="NAME",
    ),
    "user": Setting(
        PER_DATABASE,
        "role name",
        "Every client of this database is logged in to the server as this role "
        "(PgBouncer's forced user), with `password` when the server asks for one. "
        "Unset: each client's own user and secret.",
        unset="none",
    ),
    "password": Setting(
        PER_DATABASE,
        "secret (plaintext, md5 hash or SCRAM secret)",
        "The forced `user`'s password on the server; only together with `user`.",
        unset="none",
    ),
    "pool_size": Setting(
        PER_DATABASE,
        "integer, at least 1",
        "Server connections per pool of this database.",
        unset="default_pool_size",
    ),
    "min_pool_size": Setting(
        PER_DATABASE,
        "integer, at least 0",
        "Server connections kept open per pool of this database.",
        unset="min_pool_size",
    ),
    "reserve_pool_size": Setting(
        PER_DATABASE,
        "integer, at least 0",
        "Reserve servers per pool of this database; a `[users]` reserve_pool_size wins.",
        unset="reserve_pool_size",
    ),
    "max_db_connections": Setting(
        PER_DATABASE,
        "integer, at least 0",
        "Server connections to this database, all users together (0: no limit).",
        unset="max_db_connections",
    ),
    "max_db_client_connections": Setting(
        PER_DATABASE,
        "integer, at least 0",
        "Client connections to this database (0: no limit).",
        unset="max_db_client_connections",
    ),
    "pool_mode": Setting(
        PER_DATABASE,
        _choice(POOL_MODES),
        "This database's pool mode; a `[users]` pool_mode still wins.",
        unset="pool_mode",
    ),
    "load_balance_hosts": Setting(
        PER_DATABASE,
        _choice(LOAD_BALANCE_HOSTS),
        "This database's order of trying its hosts.",
        unset="load_balance_hosts",
    ),
    "target_session_attrs": Setting(
        PER_DATABASE,
        _choice(TARGET_SESSION_ATTRS),
        "The kind of server this database's connections accept.",
        unset="target_session_attrs",
    ),
}

USER_SETTINGS: Mapping[str, Setting] = {
    "password": Setting(
        PER_USER,
        "secret (plaintext, md5 hash or SCRAM secret)",
        "The user's secret as PostgreSQL stores it. pgmux checks the client's login with "
        "it and logs in to the server with it; with only a SCRAM secret, by pass-through "
        "of the client's own SCRAM login. Unset: auth_file, then auth_query.",
        unset="none",
    ),
    "pool_mode": Setting(
        PER_USER,
        _choice(POOL_MODES),
        "This user's pool mode in every database; it wins over the database's. Unset: "
        "the database's pool_mode, else the global one.",
        unset="pool_mode",
    ),
    "pool_size": Setting(
        PER_USER,
        "integer, at least 1",
        "Server connections per pool of this user, in every database; it wins over the "
        "database's pool_size. Unset: the database's pool_size, else default_pool_size.",
        unset="default_pool_size",
    ),
    "reserve_pool_size": Setting(
        PER_USER,
        "integer, at least 0",
        "Reserve servers per pool of this user; it wins over the database's.",
        unset="reserve_pool_size",
    ),
    "max_user_connections": Setting(
        PER_USER,
        "integer, at least 0",
        "Server connections logged in as this user, all databases together (0: no limit).",
        unset="max_user_connections",
    ),
    "max_user_client_connections": Setting(
        PER_USER,
        "integer, at least 0",
        "Client connections of this user (0: no limit).",
        unset="max_user_client_connections",
    ),
    "query_wait_timeout": Setting(
        PER_USER, _SECONDS, "query_wait_timeout for this user.", unset="query_wait_timeout"
    ),
    "client_idle_timeout": Setting(
        PER_USER, _SECONDS, "client_idle_timeout for this user.", unset="client_idle_timeout"
    ),
    "idle_transaction_timeout": Setting(
        PER_USER,
        _SECONDS,
        "idle_transaction_timeout for this user.",
        unset="idle_transaction_timeout",
    ),
    "query_timeout": Setting(
        PER_USER, _SECONDS, "query_timeout for this user.", unset="query_timeout"
    ),
    "transaction_timeout": Setting(
        PER_USER, _SECONDS, "transaction_timeout for this user.", unset="transaction_timeout"
    ),
}

INTRO = """\
# pgmux configuration reference

<!-- Generated by `python -m proxy.config_schema > docs/configuration.md` from
proxy/config_schema.py and the defaults in proxy/config.py. Do not edit by hand:
tests/unit/test_config_reference.py fails when this file differs from the code. -->

Every setting pgmux accepts. Knobs carry PgBouncer's names and meanings where PgBouncer
has the knob; where pgmux differs, the meaning says so. The default column is read from
the code, written as in the TOML file. `config.example.toml` has every key with a
comment.

## Where settings come from

Later sources win:

1. the defaults below;
2. the config file: TOML from `--config FILE` (or `PGMUX_CONFIG`), or a PgBouncer
   config from `--pgbouncer-ini FILE` (or `PGMUX_PGBOUNCER_INI`);
3. `--upstream postgres://user:password@host:5432/dbname` (or `PGMUX_UPSTREAM`,
   several URLs separated by spaces): a `[databases.dbname]` and a `[users.user]` with
   that password;
4. environment variables `PGMUX_<KEY>`, the env var column (the key in capitals, `.`
   as `_`): top-level and `[metrics]` keys only;
5. `--set key=value` (repeatable), for any key, `databases.NAME.KEY` and
   `users.NAME.KEY` included.

Whatever the source, each value is checked as if it were in the file, and an error
names the key and where the value came from. From the environment and `--set`, booleans
are `true`/`false`, `on`/`off`, `1`/`0` or `yes`/`no`, and lists are separated by commas
or spaces. `pgmux --check` prints the effective configuration with the source of every
value that is not a default.

The reload column: **live** settings change on SIGHUP or the admin console's `RELOAD`
(which read every source again), and top-level ones also with the console's
`SET key = value`. **restart** settings shape pgmux's sockets and processes: a reload
that changes them logs that a restart is needed and keeps the running value, and `SET`
refuses them.
"""


def env_var(key: str) -> str:
    """The environment variable that sets a top-level or ``metrics.*`` key."""
    return "PGMUX_" + key.upper().replace(".", "_")


def reload_text(key: str) -> str:
    return "restart" if key in RESTART_KEYS else "live"


def default_text(key: str, value: Any) -> str:
    """``value`` as it would be written in the TOML file (``format_value`` for numbers,
    so seconds read ``120``, not ``120.0``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    shown = format_value(key, value)
    if key == "unix_socket_mode":
        return json.dumps(shown)  # a string in TOML, so that it reads as octal
    return str(shown)


def table_default(key: str, setting: Setting, value: Any) -> str:
    """The default cell of a ``[databases.NAME]`` / ``[users.NAME]`` key: its value, or
    when the field is unset, what applies instead."""
    if value is None or value == "":
        if setting.unset in ("NAME", "none"):
            return setting.unset
        return f"as `{setting.unset}`"
    return f"`{default_text(key, value)}`"


def field_defaults(cls: type[Any]) -> dict[str, Any]:
    """A config dataclass's field defaults (``name``, which has none, left out)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name != "name"}


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(key: str, default: str, env: str, reload: str, setting: Setting) -> str:
    meaning = f"*{setting.kind}.* {setting.meaning}"
    cells = (f"`{key}`", default, env, reload, meaning)
    return "| " + " | ".join(_escape(cell) for cell in cells) + " |"


def render() -> str:
    """docs/configuration.md."""
    defaults = {item.key: item.default for item in config_items()}
    gone = sorted(set(SETTINGS) - set(defaults))
    if gone:
        raise KeyError(f"SETTINGS describes keys pgmux no longer has: {gone}")
    by_section: dict[str, list[str]] = {section: [] for section in SECTIONS}
    for key, setting in SETTINGS.items():
        shown = f"`{default_text(key, defaults[key])}`"
        row = _row(key, shown, f"`{env_var(key)}`", reload_text(key), setting)
        by_section[setting.section].append(row)
    tables = (
        (DATABASE_SETTINGS, field_defaults(DatabaseConfig)),
        (USER_SETTINGS, field_defaults(UserConfig)),
    )
    for settings, values in tables:
        if set(settings) - set(values):
            raise KeyError(f"no such fields any more: {sorted(set(settings) - set(values))}")
        for key, setting in settings.items():
            row = _row(key, table_default(key, setting, values[key]), "—", "live", setting)
            by_section[setting.section].append(row)
    out = [INTRO]
    for section in SECTIONS:
        out.append(f"## {section}\n\n{SECTION_INTROS[section]}\n")
        out.append("| key | default | env var | reload | meaning |")
        out.append("|---|---|---|---|---|")
        out.extend(by_section[section])
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
