"""Which PgBouncer settings pgmux lacks, and why: the tables pgbouncer_ini.py reads.

Each missing setting says whether pgmux may gain it ("not supported by pgmux yet") or
it does not apply to pgmux, and with which values pgmux behaves the same anyway (then
the converter writes a note instead of listing it as unsupported).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Missing:
    """A PgBouncer setting pgmux lacks, and why. ``same``: the values (after ``_normal``;
    ``*`` is any) with which pgmux behaves the same, so the line is a note. ``off_with``:
    a setting that, when off, makes this one moot, and whether unset counts as off."""

    reason: str
    same: tuple[str, ...] = ()
    later: bool = True  # "not supported by pgmux yet", else "does not apply to pgmux"
    off_with: tuple[str, bool] | None = None


def _table(later: bool, entries: dict[str, tuple[str | None, str]]) -> dict[str, Missing]:
    """``{key: (same values separated by |, or None; reason)}`` as Missing entries."""
    return {
        key: Missing(reason, () if same is None else tuple(same.split("|")), later)
        for key, (same, reason) in entries.items()
    }


_STDERR = "pgmux logs to stderr: systemd, docker or a redirect keeps it"
_DNS = "pgmux asks the system resolver at each new server connection and caches nothing"
_STARTUP_PARAMETER = (
    "pgmux sends no startup parameters of its own; set it for the database or role "
    "instead: ALTER DATABASE ... SET / ALTER ROLE ... SET"
)

# [pgbouncer] settings that belong to the process: pgmux leaves them to its supervisor.
MISSING = _table(False, {
    "logfile": ("", _STDERR),
    "syslog": ("0", _STDERR + "; journald or docker's log driver can forward it"),
    "syslog_ident": (None, _STDERR),
    "syslog_facility": (None, _STDERR),
    "pidfile": ("", "pgmux does not daemonize or write a pid file; let systemd or docker "
                "supervise it"),
    "user": ("", "pgmux does not switch users; start it as the user it runs as (systemd "
             "User=)"),
    "unix_socket_group": ("", "pgmux does not change its socket's group; start it with that "
                          "group (unix_socket_mode sets who may connect)"),
    "conffile": ("*", "pgmux reads the file it is started with"),
    "service_name": ("*", "a Windows service name"),
    "job_name": ("*", "a Windows service name"),
    "so_reuseport": ("0", "pgmux runs several processes on one port itself: set workers = N "
                     "(cancel requests reach the right one)"),
    "pkt_buf": ("4096", "pgmux sizes its buffers itself"),
    "sbuf_loopcnt": ("5", "pgmux's event loop shares time between connections itself"),
    "tcp_defer_accept": ("*", "a latency tweak pgmux does not make"),
    "tcp_socket_buffer": ("0|", "pgmux leaves socket buffer sizes to the kernel"),
    "suspend_timeout": ("*", "pgmux has no SUSPEND or online restart (-R)"),
})  # fmt: skip
# [pgbouncer] settings a later pgmux may add, or whose job pgmux does another way.
MISSING |= _table(True, {
    "peer_id": ("0", "pgmux's workers forward cancel requests among themselves; peering "
                "separate pgmux instances is not supported"),
    "ignore_startup_parameters": ("*", "pgmux accepts every startup parameter and applies it "
                                  "on the server (extra_float_digits, search_path, ...)"),
    "track_extra_parameters": ("*", "pgmux makes every setting a client sets, at startup or "
                               "with SET, follow it to each server"),
    "server_reset_query_always": ("0", "pgmux runs server_reset_query in session mode only; "
                                  "in transaction mode it undoes what clients SET itself"),
    "server_fast_close": ("0", "pgmux closes a session-mode server that RECONNECT or a "
                          "reload made stale when its client leaves"),
    "autodb_idle_timeout": ("*", "pgmux has no fallback (*) database"),
    "pool_idle_timeout": ("0", "pgmux keeps empty pools"),
    "disable_pqexec": ("0", "pgmux does not refuse the simple query protocol"),
    "application_name_add_host": ("0", "pgmux passes application_name on unchanged; SHOW "
                                  "CLIENTS shows each client's address"),
    "login_notify_message": ("", "pgmux sends no message at login"),
    "dns_max_ttl": ("15", _DNS),
    "dns_nxdomain_ttl": ("15", _DNS),
    "dns_zone_check_period": ("0", _DNS),
    "resolv_conf": ("", "pgmux uses the system resolver (/etc/resolv.conf)"),
    "auth_ident_file": ("", "pgmux has no user name maps"),
    "auth_ldap_options": ("", "pgmux has no LDAP authentication"),
    "scram_iterations": ("4096", "pgmux makes SCRAM secrets with 4096 iterations, as "
                         "PostgreSQL does"),
    "client_tls13_ciphers": ("", "OpenSSL's TLS 1.3 cipher suites apply"),
    "server_tls13_ciphers": ("", "OpenSSL's TLS 1.3 cipher suites apply"),
    "client_tls_ecdhcurve": ("auto", "OpenSSL's default curves apply"),
    "client_tls_dheparams": ("auto", "OpenSSL's defaults apply"),
})  # fmt: skip
# Moot when another setting is off (True: also when that one is unset).
_OFF_WITH = {
    "syslog_ident": ("syslog", True),
    "syslog_facility": ("syslog", True),
}
for _key, _off_with in _OFF_WITH.items():
    MISSING[_key] = Missing(MISSING[_key].reason, (), MISSING[_key].later, _off_with)

# PgBouncer settings pgmux has under the same name and meaning, converted by the type of
# pgmux's default (a MISSING key that pgmux gains converts the same way, unchanged).
SAME_NAME = frozenset((
    "listen_port", "listen_backlog", "default_pool_size", "min_pool_size", "max_client_conn",
    "max_packet_size", "max_prepared_statements", "query_wait_timeout", "query_wait_notify",
    "transaction_timeout", "reserve_pool_size", "reserve_pool_timeout", "max_db_connections",
    "max_user_connections", "max_db_client_connections", "max_user_client_connections",
    "server_round_robin",
    "client_login_timeout", "server_connect_timeout", "server_login_retry",
    "server_idle_timeout", "cancel_wait_timeout", "client_idle_timeout",
    "idle_transaction_timeout", "query_timeout", "stats_period", "server_reset_query",
    "server_check_query", "server_check_delay",
    "auth_file", "auth_hba_file", "auth_user", "auth_query", "auth_dbname", "admin_users",
    "stats_users", "log_connections", "log_disconnections", "log_pooler_errors", "log_stats",
    "tcp_keepalive", "tcp_keepidle", "tcp_keepintvl", "tcp_keepcnt", "tcp_user_timeout",
    "client_tls_key_file", "client_tls_cert_file", "client_tls_ca_file",
    "client_tls_protocols", "client_tls_ciphers", "server_tls_key_file",
    "server_tls_cert_file", "server_tls_ca_file", "server_tls_protocols", "server_tls_ciphers",
))  # fmt: skip

# [databases] connection parameters and [users] options pgmux lacks.
DB_MISSING = _table(True, {
    "auth_query": (None, "pgmux has one global auth_query"),
    "connect_query": (None, "for settings use ALTER DATABASE ... SET / ALTER ROLE ... SET"),
    "client_encoding": (None, _STARTUP_PARAMETER),
    "datestyle": (None, _STARTUP_PARAMETER),
    "timezone": (None, _STARTUP_PARAMETER),
    "application_name": (None, _STARTUP_PARAMETER),
    "server_lifetime": (None, "pgmux has one global server_lifetime"),
    "query_wait_timeout": ("-1", "set it globally or per user ([users.NAME])"),
})  # fmt: skip
USER_MISSING: dict[str, Missing] = {}
# PgBouncer's "-1 = not set" for per-database and per-user timeouts.
UNSET_TIMEOUT = "-1"
