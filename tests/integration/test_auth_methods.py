"""How clients log in and what their user may do: auth_type plain / md5 / hba, the unix
socket, the admin console, per-user pool overrides and the client timeouts.

Every test talks to a real pgmux subprocess in front of the session's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
from support.auth import (
    TracingClient,
    first_auth_request,
    md5_hash,
    role_secret,
    unix_conninfo,
    unix_psql,
    write_hba,
)
from support.helpers import (
    Su,
    app_backends,
    connect_asyncpg,
    connect_psycopg,
    error_of,
    fetch_value,
    run_psql,
    wait_until,
)
from support.pgcluster import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    MD5_PASSWORD,
    MD5_USER,
    PASSTHRU_PASSWORD,
    PASSTHRU_USER,
    PgCluster,
    free_port,
)
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge, default_config, run_check
from support.wire import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    RawClient,
    ServerError,
    parse_fields,
    query,
)

from proxy import __version__
from proxy.auth import ScramSecret

# -- helpers ---------------------------------------------------------------------------------


async def _query_as(
    pgmux: PgmuxProcess, user: str, password: str, dbname: str = APP_DB
) -> tuple[str, str]:
    """asyncpg logs in and asks the server who and where it is."""
    conn = await connect_asyncpg(pgmux, user, password, dbname)
    try:
        row = await conn.fetchrow("SELECT current_user, current_database()")
        assert row is not None
        return row[0], row[1]
    finally:
        await conn.close()


async def _all_clients_work(pgmux: PgmuxProcess, user: str, password: str) -> None:
    """psql, asyncpg and psycopg log in as ``user`` and run a query on the server."""
    proc = run_psql(pgmux, "-c", "SELECT current_user", user=user, password=password)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == user
    assert await _query_as(pgmux, user, password) == (user, APP_DB)
    async with await connect_psycopg(pgmux, user, password) as conn:
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == (user,)


async def _backends(su: Su, user: str) -> int:
    return int(
        await fetch_value(
            su,
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
            " AND backend_type = 'client backend'",
            [user],
        )
    )


async def _no_backends(su: Su, *users: str) -> None:
    """Wait until earlier tests' pgmux servers of these users are gone."""

    async def gone() -> bool:
        return all([await _backends(su, user) == 0 for user in users])

    await wait_until(gone, timeout=10, what=f"no backends of {users}")


async def _closed_by_pgmux(client: RawClient, timeout: float) -> dict[str, str]:
    """The FATAL ErrorResponse pgmux sends before closing ``client``; then EOF."""
    typ, body = await client.read_message(timeout)
    assert typ == b"E", (typ, body)
    fields = parse_fields(body)
    assert fields.get("V", fields.get("S")) == "FATAL", fields
    assert await client.read_until_eof(3) == b""
    return fields


def _secret(pg: PgCluster, user: str, password: str, kind: str) -> str:
    if kind == "plain":
        return password
    if kind == "md5":
        return md5_hash(user, password)
    # app: its real secret; md5user (stored md5 in PostgreSQL): a SCRAM secret of its own.
    if user == APP_USER:
        return role_secret(pg, user)
    return ScramSecret.from_password(password).to_string()


# -- auth_type = "plain" ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "md5", "scram"])
@pytest.mark.parametrize(("user", "password"), [(APP_USER, APP_PASSWORD), (MD5_USER, MD5_PASSWORD)])
async def test_plain_auth_any_secret_kind(
    pg: PgCluster, pgmux_factory: PgmuxFactory, user: str, password: str, kind: str
) -> None:
    """A cleartext password is checked against plaintext, md5 and SCRAM secrets; then
    pgmux knows the password and logs in to PostgreSQL with it, whatever method the
    server asks (app: SCRAM, which an md5 hash alone could not answer; md5user: md5)."""
    pgmux = pgmux_factory(
        {"auth_type": "plain", "users": {user: {"password": _secret(pg, user, password, kind)}}}
    )
    assert await first_auth_request(pgmux.host, pgmux.port, user) == (AUTH_CLEARTEXT, None)
    await _all_clients_work(pgmux, user, password)
    error = await error_of(connect_asyncpg(pgmux, user, "wrong"))
    assert error.sqlstate == "28P01"
    assert error.message == f'password authentication failed for user "{user}"'
    proc = run_psql(pgmux, "-c", "SELECT 1", user=user, password="wrong")
    assert proc.returncode != 0
    assert f'password authentication failed for user "{user}"' in proc.stderr


async def test_plain_auth_unknown_user(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"auth_type": "plain"})
    wrong = await error_of(connect_asyncpg(pgmux, APP_USER, "wrong"))
    unknown = await error_of(connect_asyncpg(pgmux, "nosuch", "wrong"))
    assert type(unknown) is type(wrong) is asyncpg.InvalidPasswordError
    assert unknown.message == 'password authentication failed for user "nosuch"'


async def test_plain_login_teaches_pgmux_the_password_for_later_servers(
    pg: PgCluster, pgmux_factory: PgmuxFactory
) -> None:
    """With only a SCRAM secret of another salt (pass-through impossible), servers for
    every later client are logged in with the password learned from the first."""
    other = ScramSecret.from_password(APP_PASSWORD).to_string()
    pgmux = pgmux_factory({"auth_type": "plain", "users": {APP_USER: {"password": other}}})
    a = await connect_asyncpg(pgmux)
    b = await connect_asyncpg(pgmux)
    try:
        async with a.transaction():
            pid_a = await a.fetchval("SELECT pg_backend_pid()")
            pid_b = await b.fetchval("SELECT pg_backend_pid()")  # needs a second server
        assert pid_a != pid_b
    finally:
        await a.close()
        await b.close()


# -- auth_type = "md5" -----------------------------------------------------------------------


@pytest.mark.parametrize(("user", "password"), [(APP_USER, APP_PASSWORD), (MD5_USER, MD5_PASSWORD)])
async def test_md5_auth_plaintext_users(
    pgmux_factory: PgmuxFactory, user: str, password: str
) -> None:
    pgmux = pgmux_factory({"auth_type": "md5"})
    assert await first_auth_request(pgmux.host, pgmux.port, user) == (AUTH_MD5, None)
    await _all_clients_work(pgmux, user, password)
    error = await error_of(connect_asyncpg(pgmux, user, "wrong"))
    assert error.sqlstate == "28P01"


async def test_md5_auth_scram_secret_gets_scram(pg: PgCluster, pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory(
        {"auth_type": "md5", "users": {APP_USER: {"password": role_secret(pg, APP_USER)}}}
    )
    assert await first_auth_request(pgmux.host, pgmux.port, APP_USER) == (AUTH_SASL, None)
    assert await first_auth_request(pgmux.host, pgmux.port, MD5_USER) == (AUTH_MD5, None)
    # Unknown users get the md5 challenge (mock), like any user without a SCRAM secret.
    assert await first_auth_request(pgmux.host, pgmux.port, "nosuch") == (AUTH_MD5, None)
    # psql answers the SCRAM request; pgmux passes the key through to PostgreSQL.
    await _all_clients_work(pgmux, APP_USER, APP_PASSWORD)
    await _all_clients_work(pgmux, MD5_USER, MD5_PASSWORD)


# -- auth_type = "hba" -----------------------------------------------------------------------

HBA_LINES = (
    "hostnossl other app 127.0.0.1/32 md5",
    "host all app 127.0.0.1/32 scram-sha-256",
    "host app md5user 127.0.0.1/32 md5",
    "host other md5user 127.0.0.1/32 password",
    "host all nobody 0.0.0.0/0 reject",
    "hostssl all passthru 127.0.0.1/32 trust",
    "host all all 10.0.0.0/8 trust",
)


@pytest.fixture
def hba_pgmux(pg: PgCluster, pgmux_factory: PgmuxFactory, workdir: Path) -> PgmuxProcess:
    path = write_hba(workdir / "pgmux_hba.conf", *HBA_LINES)
    return pgmux_factory(
        {
            "auth_type": "hba",
            "auth_hba_file": str(path),
            "databases": {"other": {"host": pg.host, "port": pg.port, "dbname": APP_DB}},
            "users": {PASSTHRU_USER: {"password": PASSTHRU_PASSWORD}},
        }
    )


async def test_hba_methods_per_line(hba_pgmux: PgmuxProcess) -> None:
    pgmux = hba_pgmux
    assert await first_auth_request(pgmux.host, pgmux.port, APP_USER) == (AUTH_SASL, None)
    # hostnossl matches a connection without TLS
    assert await first_auth_request(pgmux.host, pgmux.port, APP_USER, "other") == (AUTH_MD5, None)
    assert await first_auth_request(pgmux.host, pgmux.port, MD5_USER) == (AUTH_MD5, None)
    assert await first_auth_request(pgmux.host, pgmux.port, MD5_USER, "other") == (
        AUTH_CLEARTEXT,
        None,
    )
    await _all_clients_work(pgmux, APP_USER, APP_PASSWORD)
    await _all_clients_work(pgmux, MD5_USER, MD5_PASSWORD)
    assert await _query_as(pgmux, APP_USER, APP_PASSWORD, "other") == (APP_USER, APP_DB)
    assert await _query_as(pgmux, MD5_USER, MD5_PASSWORD, "other") == (MD5_USER, APP_DB)
    error = await error_of(connect_asyncpg(pgmux, APP_USER, "wrong"))
    assert error.sqlstate == "28P01"


async def test_hba_reject_line(hba_pgmux: PgmuxProcess) -> None:
    error = await error_of(connect_asyncpg(hba_pgmux, "nobody", "whatever"))
    assert error.sqlstate == "28000"
    assert error.message == (
        'pg_hba.conf rejects connection for host "127.0.0.1", user "nobody", '
        'database "app", no encryption'
    )
    proc = run_psql(hba_pgmux, "-c", "SELECT 1", user="nobody", password="x")
    assert proc.returncode != 0
    assert "pg_hba.conf rejects connection" in proc.stderr


@pytest.mark.parametrize(
    ("user", "dbname"),
    [
        (MD5_USER, "nosuchdb"),  # md5user's lines name databases app and other only
        ("ghost", APP_DB),  # no line for this user (10.0.0.0/8 trust never matches)
        (PASSTHRU_USER, APP_DB),  # its hostssl line does not match a plain connection
    ],
)
async def test_hba_no_matching_line(hba_pgmux: PgmuxProcess, user: str, dbname: str) -> None:
    error = await error_of(connect_asyncpg(hba_pgmux, user, "whatever", dbname))
    assert error.sqlstate == "28000"
    assert error.message == (
        f'no pg_hba.conf entry for host "127.0.0.1", user "{user}", database "{dbname}", '
        "no encryption"
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("host all all 127.0.0.1/32 ident", 'unsupported authentication method "ident"'),
        ("host all all samenet trust", 'unsupported address "samenet"'),
        ("host all all 127.0.0.1/32 md5 foo=bar", "unsupported option 'foo'"),
        ("hostgssenc all all 127.0.0.1/32 md5", 'unsupported connection type "hostgssenc"'),
        ("host all all 127.0.0.1/32", "end-of-line before authentication method"),
    ],
)
def test_bad_hba_file_fails_check(pg: PgCluster, workdir: Path, line: str, problem: str) -> None:
    write_hba(workdir / "hba.conf", "local all all trust", line)  # comment, local, then line 3
    config = deep_merge(
        default_config(pg, free_port()), {"auth_type": "hba", "auth_hba_file": "hba.conf"}
    )
    proc = run_check(config, workdir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "auth_hba_file" in proc.stderr and "line 3" in proc.stderr, proc.stderr
    assert problem in proc.stderr, proc.stderr


def test_hba_needs_a_file(pg: PgCluster, workdir: Path) -> None:
    config = deep_merge(default_config(pg, free_port()), {"auth_type": "hba"})
    proc = run_check(config, workdir)
    assert proc.returncode == 1
    assert "auth_hba_file" in proc.stderr, proc.stderr


# -- the unix socket -------------------------------------------------------------------------


def _socket_dir(workdir: Path) -> Path:
    path = workdir / "sock"
    path.mkdir()
    path.chmod(0o777)
    return path


async def test_unix_socket_login(pgmux_factory: PgmuxFactory, workdir: Path) -> None:
    sock = _socket_dir(workdir)
    pgmux = pgmux_factory({"unix_socket_dir": str(sock)})
    assert (sock / f".s.PGSQL.{pgmux.port}").is_socket()
    proc = unix_psql(sock, pgmux, "-c", "SELECT current_user", password=APP_PASSWORD)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == APP_USER
    conninfo = unix_conninfo(sock, pgmux, MD5_USER, password=MD5_PASSWORD)
    async with await psycopg.AsyncConnection.connect(
        conninfo, autocommit=True, prepare_threshold=None
    ) as conn:
        cur = await conn.execute("SELECT current_user, 1 + 1")
        assert await cur.fetchone() == (MD5_USER, 2)
    # Still a password login on the socket (auth_type scram-sha-256) ...
    proc = unix_psql(sock, pgmux, "-c", "SELECT 1", password="wrong")
    assert proc.returncode != 0
    assert "password authentication failed" in proc.stderr
    # ... and TCP works alongside.
    assert await _query_as(pgmux, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB)
    pgmux.wait_for_log(f"{MD5_USER}@{APP_DB} unix: login ok")


@pytest.mark.skipif(os.geteuid() != 0, reason="runs psql as another OS user")
def test_unix_socket_other_os_user(pgmux_factory: PgmuxFactory, workdir: Path) -> None:
    """Like PostgreSQL (unix_socket_permissions) and PgBouncer (unix_socket_mode), both
    0777 by default, the socket admits local users other than pgmux's own: access is
    decided by authentication, not by the file mode."""
    sock = _socket_dir(workdir)
    pgmux = pgmux_factory({"unix_socket_dir": str(sock)})
    mode = stat.S_IMODE(os.stat(sock / f".s.PGSQL.{pgmux.port}").st_mode)
    proc = unix_psql(
        sock, pgmux, "-c", "SELECT current_user", password=APP_PASSWORD, os_user="postgres"
    )
    assert proc.returncode == 0, f"socket mode {mode:o}: {proc.stderr}"
    assert proc.stdout.strip() == APP_USER


async def test_unix_socket_hba_local_trust(pgmux_factory: PgmuxFactory, workdir: Path) -> None:
    sock = _socket_dir(workdir)
    hba = write_hba(
        workdir / "hba.conf",
        "local all nobody reject",
        "local all all trust",
        "host all all 127.0.0.1/32 scram-sha-256",
    )
    pgmux = pgmux_factory(
        {"unix_socket_dir": str(sock), "auth_type": "hba", "auth_hba_file": str(hba)}
    )
    # No password on the socket ...
    proc = unix_psql(sock, pgmux, "-c", "SELECT current_user")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == APP_USER
    async with await psycopg.AsyncConnection.connect(
        unix_conninfo(sock, pgmux, MD5_USER), autocommit=True, prepare_threshold=None
    ) as conn:
        cur = await conn.execute("SELECT current_user")
        assert await cur.fetchone() == (MD5_USER,)
    async with await TracingClient.open_unix(sock, pgmux.port) as client:
        await client.login(APP_USER, "", APP_DB)
        assert client.auth_codes == [AUTH_OK]
        result = await client.simple_query("SELECT current_user")
        assert result.rows == [[APP_USER]]
    # ... while TCP still needs one.
    assert await first_auth_request(pgmux.host, pgmux.port, APP_USER) == (AUTH_SASL, None)
    error = await error_of(connect_asyncpg(pgmux, APP_USER, "wrong"))
    assert error.sqlstate == "28P01"
    assert await _query_as(pgmux, APP_USER, APP_PASSWORD) == (APP_USER, APP_DB)
    # A local reject line names the socket as PostgreSQL does.
    async with await TracingClient.open_unix(sock, pgmux.port) as client:
        with pytest.raises(ServerError) as info:
            await client.login("nobody", "", APP_DB)
    assert info.value.sqlstate == "28000"
    assert info.value.fields["M"] == (
        'pg_hba.conf rejects connection for host "[local]", user "nobody", '
        'database "app", no encryption'
    )


# -- the admin console -----------------------------------------------------------------------

ADMIN_PASSWORD = "adminpw"


@pytest.fixture
def admin_pgmux(pgmux_factory: PgmuxFactory) -> PgmuxProcess:
    return pgmux_factory(
        {
            "admin_users": ["admin"],
            "stats_users": ["watcher"],
            "users": {
                "admin": {"password": ADMIN_PASSWORD},
                "watcher": {"password": "watchpw"},
            },
        }
    )


@pytest.mark.parametrize("dbname", ["pgbouncer", "pgmux"])
def test_admin_show_version_psql(admin_pgmux: PgmuxProcess, dbname: str) -> None:
    proc = run_psql(
        admin_pgmux, "-c", "SHOW VERSION", user="admin", dbname=dbname, password=ADMIN_PASSWORD
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("pgmux "), proc.stdout
    assert proc.stdout.strip() == f"pgmux {__version__}"


async def test_admin_console_session(admin_pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(admin_pgmux.host, admin_pgmux.port) as client:
        await client.login("admin", ADMIN_PASSWORD, "pgbouncer")
        assert client.params["server_version"].startswith("pgmux")
        result = await client.simple_query("SHOW VERSION")
        assert result.rows[0][0].startswith("pgmux")  # type: ignore[union-attr]
        result = await client.simple_query("SHOW NONSENSE")
        assert [e["C"] for e in result.errors] == ["08P01"]
        assert result.errors[0]["S"] == "ERROR"
        assert result.status == "I"
        # still usable
        result = await client.simple_query("show   version;")
        assert not result.errors and result.rows[0][0].startswith("pgmux")  # type: ignore[union-attr]


async def test_admin_console_stats_user(admin_pgmux: PgmuxProcess) -> None:
    async with await RawClient.open(admin_pgmux.host, admin_pgmux.port) as client:
        await client.login("watcher", "watchpw", "pgmux")
        result = await client.simple_query("SHOW VERSION")
        assert result.rows[0][0].startswith("pgmux")  # type: ignore[union-attr]


async def test_admin_console_refusals(admin_pgmux: PgmuxProcess) -> None:
    # A real user with the right password is not an admin.
    error = await error_of(connect_asyncpg(admin_pgmux, APP_USER, APP_PASSWORD, "pgbouncer"))
    assert error.sqlstate == "28000"
    assert "admin console" in error.message
    assert "admin_users" in f"{error.message} {error.hint}"
    proc = run_psql(admin_pgmux, "-c", "SHOW VERSION", dbname="pgbouncer")
    assert proc.returncode != 0 and "admin" in proc.stderr
    # The admin with a wrong password: an ordinary 28P01.
    async with await RawClient.open(admin_pgmux.host, admin_pgmux.port) as client:
        with pytest.raises(ServerError) as info:
            await client.login("admin", "wrong", "pgbouncer")
    assert info.value.sqlstate == "28P01"
    assert info.value.fields["M"] == 'password authentication failed for user "admin"'
    # The admin is no PostgreSQL role: admin_users do not make it one.
    error = await error_of(connect_asyncpg(admin_pgmux, "admin", ADMIN_PASSWORD))
    assert error.sqlstate == "28P01"  # PostgreSQL refuses pgmux's server login


def test_admin_database_name_reserved(pg: PgCluster, workdir: Path) -> None:
    for name in ("pgbouncer", "pgmux"):
        config = deep_merge(
            default_config(pg, free_port()),
            {"databases": {name: {"host": pg.host, "port": pg.port, "dbname": APP_DB}}},
        )
        proc = run_check(config, workdir)
        assert proc.returncode == 1
        assert f"databases.{name}" in proc.stderr and "reserved" in proc.stderr, proc.stderr


# -- per-user pool overrides -----------------------------------------------------------------


async def test_user_pool_size(pgmux_factory: PgmuxFactory, su: Su) -> None:
    await _no_backends(su, APP_USER, MD5_USER)
    pgmux = pgmux_factory({"default_pool_size": 5, "users": {APP_USER: {"pool_size": 1}}})
    a = await connect_asyncpg(pgmux)
    b = await connect_asyncpg(pgmux)
    m1 = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    m2 = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    try:
        tx = a.transaction()
        await tx.start()
        await a.fetchval("SELECT 1")
        second = asyncio.create_task(b.fetchval("SELECT 2"))
        await asyncio.sleep(0.7)
        assert not second.done()  # waits for app's only server
        assert await _backends(su, APP_USER) == 1
        # md5user has default_pool_size: two transactions at once.
        async with m1.transaction(), m2.transaction():
            pids = {await m1.fetchval("SELECT pg_backend_pid()")}
            pids.add(await m2.fetchval("SELECT pg_backend_pid()"))
            assert len(pids) == 2
        await tx.commit()
        assert await asyncio.wait_for(second, 5) == 2
        assert await _backends(su, APP_USER) == 1
    finally:
        for conn in (a, b, m1, m2):
            await conn.close()


async def test_user_pool_mode_session(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"users": {APP_USER: {"pool_mode": "session"}}})
    pid = "SELECT pg_backend_pid()"
    a = await connect_asyncpg(pgmux)
    b = await connect_asyncpg(pgmux)
    m1 = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    m2 = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    try:
        # app (session): a keeps its server across transactions; b cannot have it.
        pid_a = await a.fetchval(pid)
        async with a.transaction():
            assert await a.fetchval(pid) == pid_a
        pid_b = await b.fetchval(pid)
        assert pid_b != pid_a
        assert await a.fetchval(pid) == pid_a
        # md5user (transaction): one idle server serves both in turn.
        pid_m1 = await m1.fetchval(pid)
        assert await m2.fetchval(pid) == pid_m1
    finally:
        for conn in (a, b, m1, m2):
            await conn.close()


async def test_user_query_wait_timeout(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory(
        {"query_wait_timeout": 10, "users": {APP_USER: {"pool_size": 1, "query_wait_timeout": 1}}}
    )
    a = await connect_asyncpg(pgmux)
    b = await connect_asyncpg(pgmux)
    try:
        async with a.transaction():
            await a.fetchval("SELECT 1")
            started = time.monotonic()
            error = await error_of(asyncio.wait_for(b.fetchval("SELECT 2"), 8))
            elapsed = time.monotonic() - started
        assert error.sqlstate == "57014"
        assert "query_wait_timeout" in error.message
        assert 0.9 <= elapsed < 2.5, elapsed
        assert await a.fetchval("SELECT 3") == 3
    finally:
        await a.close()
        await b.close()


# -- client timeouts -------------------------------------------------------------------------


@pytest.fixture
def itx_table(pg: PgCluster) -> str:
    pg.psql(
        "DROP TABLE IF EXISTS authm_itx; CREATE TABLE authm_itx (id int);"
        f" ALTER TABLE authm_itx OWNER TO {APP_USER}; GRANT ALL ON authm_itx TO {MD5_USER}"
    )
    return "authm_itx"


async def _raw_login(
    pgmux: PgmuxProcess, user: str = APP_USER, password: str = APP_PASSWORD
) -> RawClient:
    client = await RawClient.open(pgmux.host, pgmux.port)
    await client.login(user, password, APP_DB)
    return client


async def test_client_idle_timeout(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"client_idle_timeout": 1})
    idle = await _raw_login(pgmux)
    busy = await _raw_login(pgmux)
    sleeper = await _raw_login(pgmux, MD5_USER, MD5_PASSWORD)
    try:
        started = time.monotonic()
        await sleeper.send(query("SELECT pg_sleep(2.5)"))

        async def keep_busy() -> None:
            while time.monotonic() - started < 2.5:
                result = await busy.simple_query("SELECT 1")
                assert result.rows == [["1"]]
                await asyncio.sleep(0.3)

        pinger = asyncio.create_task(keep_busy())
        fields = await _closed_by_pgmux(idle, 5)
        elapsed = time.monotonic() - started
        assert fields["C"] == "57P05", fields
        assert "client_idle_timeout" in fields["M"]
        assert 0.9 <= elapsed < 2.5, elapsed
        await pinger
        # The one sending queries and the one running a long query are still there.
        assert (await busy.simple_query("SELECT 2")).rows == [["2"]]
        result = await sleeper.read_result(5)
        assert not result.errors and result.status == "I"
    finally:
        for client in (idle, busy, sleeper):
            await client.close()


async def test_client_idle_timeout_session_mode(pgmux_factory: PgmuxFactory) -> None:
    """In session mode an idle client holds its server, but is idle all the same."""
    pgmux = pgmux_factory({"client_idle_timeout": 1, "pool_mode": "session"})
    client = await _raw_login(pgmux)
    try:
        assert (await client.simple_query("SELECT 1")).rows == [["1"]]
        fields = await _closed_by_pgmux(client, 4)
        assert fields["C"] == "57P05", fields
    finally:
        await client.close()


async def test_idle_transaction_timeout(
    pgmux_factory: PgmuxFactory, su: Su, itx_table: str
) -> None:
    pgmux = pgmux_factory({"idle_transaction_timeout": 1, "default_pool_size": 1})
    client = await _raw_login(pgmux)
    try:
        assert (await client.simple_query("BEGIN")).status == "T"
        result = await client.simple_query(f"INSERT INTO {itx_table} VALUES (1)")
        assert result.status == "T" and not result.errors
        started = time.monotonic()
        fields = await _closed_by_pgmux(client, 5)
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    assert fields["C"] == "25P03", fields
    assert "idle_transaction_timeout" in fields["M"] and "rolled back" in fields["M"]
    assert 0.9 <= elapsed < 2.5, elapsed
    assert await fetch_value(su, f"SELECT count(*) FROM {itx_table}") == 0
    # The pool's one server serves the next client at once.
    conn = await connect_asyncpg(pgmux)
    try:
        assert await asyncio.wait_for(conn.fetchval(f"SELECT count(*) FROM {itx_table}"), 3) == 0
    finally:
        await conn.close()


async def test_query_timeout(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"query_timeout": 1})
    conn = await connect_asyncpg(pgmux)
    try:
        started = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError) as info:
            await asyncio.wait_for(conn.fetchval("SELECT pg_sleep(10)"), 8)
        elapsed = time.monotonic() - started
        assert info.value.sqlstate == "57014"
        assert 0.9 <= elapsed < 2.5, elapsed
        assert await conn.fetchval("SELECT 1") == 1
        # A query shorter than the limit is left alone.
        assert await conn.fetchval("SELECT pg_sleep(0.5)::text") == ""
    finally:
        await conn.close()
    pgmux.wait_for_log("over query_timeout")


async def test_user_idle_transaction_timeout(
    pgmux_factory: PgmuxFactory, su: Su, itx_table: str
) -> None:
    pgmux = pgmux_factory({"users": {APP_USER: {"idle_transaction_timeout": 1}}})
    app = await _raw_login(pgmux)
    md5 = await _raw_login(pgmux, MD5_USER, MD5_PASSWORD)
    try:
        for client, value in ((app, 1), (md5, 2)):
            assert (await client.simple_query("BEGIN")).status == "T"
            result = await client.simple_query(f"INSERT INTO {itx_table} VALUES ({value})")
            assert result.status == "T" and not result.errors
        fields = await _closed_by_pgmux(app, 5)
        assert fields["C"] == "25P03", fields
        await asyncio.sleep(1.0)  # md5user has no limit: still in its transaction
        result = await md5.simple_query("COMMIT")
        assert result.tags == ["COMMIT"] and result.status == "I"
    finally:
        await app.close()
        await md5.close()
    rows = await fetch_value(su, f"SELECT array_agg(id ORDER BY id) FROM {itx_table}")
    assert rows == [2]


async def test_user_query_and_idle_timeouts(pgmux_factory: PgmuxFactory) -> None:
    """[users.NAME] query_timeout and client_idle_timeout apply to that user only."""
    pgmux = pgmux_factory(
        {"users": {MD5_USER: {"query_timeout": 1}, APP_USER: {"client_idle_timeout": 1}}}
    )
    md5 = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    app_idle = await _raw_login(pgmux)
    app = await connect_asyncpg(pgmux)
    try:
        app_query = asyncio.create_task(app.fetchval("SELECT pg_sleep(2)::text"))
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(md5.fetchval("SELECT pg_sleep(10)"), 8)
        fields = await _closed_by_pgmux(app_idle, 5)
        assert fields["C"] == "57P05"
        assert await asyncio.wait_for(app_query, 5) == ""  # no query_timeout for app
        await asyncio.sleep(1.5)  # md5user has no client_idle_timeout
        assert await md5.fetchval("SELECT 1") == 1
    finally:
        await md5.close()
        await app.close()
        await app_idle.close()


@pytest.mark.parametrize("busy", [False, True], ids=["between statements", "mid-statement"])
async def test_transaction_timeout(
    pgmux_factory: PgmuxFactory, su: Su, itx_table: str, busy: bool
) -> None:
    """A transaction open longer than transaction_timeout, busy or not, ends with 25P04
    naming the limit; it is rolled back and the pool's server is clean for the next
    client. Shorter transactions, and time between transactions, are left alone."""
    pgmux = pgmux_factory({"transaction_timeout": 2, "default_pool_size": 1})
    client = await _raw_login(pgmux)
    try:
        # A transaction shorter than the limit, then idle time longer than it: fine.
        assert (await client.simple_query("BEGIN")).status == "T"
        await asyncio.sleep(1)
        assert (await client.simple_query("COMMIT")).status == "I"
        await asyncio.sleep(2.5)
        assert (await client.simple_query("BEGIN")).status == "T"
        result = await client.simple_query(f"INSERT INTO {itx_table} VALUES (1)")
        assert result.status == "T" and not result.errors
        started = time.monotonic()
        if busy:
            await client.send(query("SELECT pg_sleep(30)"))
        fields = await _closed_by_pgmux(client, 6)
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    assert fields["C"] == "25P04" and fields["S"] == "FATAL", fields
    assert "transaction_timeout" in fields["M"] and "rolled back" in fields["M"]
    assert 1.4 <= elapsed < 3.5, elapsed
    assert await fetch_value(su, f"SELECT count(*) FROM {itx_table}") == 0
    conn = await connect_asyncpg(pgmux)
    try:  # the one server: no sleep running on it, no transaction left open
        assert await asyncio.wait_for(conn.fetchval(f"SELECT count(*) FROM {itx_table}"), 3) == 0
    finally:
        await conn.close()
    backends = await app_backends(su)
    assert all(state == "idle" for _, state, _, _ in backends), backends


async def test_transaction_timeout_counts_a_single_statement_and_is_per_user(
    pgmux_factory: PgmuxFactory,
) -> None:
    """A lone statement is a transaction too (PostgreSQL's rule); [users.NAME]
    transaction_timeout overrides the global one."""
    pgmux = pgmux_factory(
        {"transaction_timeout": 1, "users": {MD5_USER: {"transaction_timeout": 0}}}
    )
    app = await connect_asyncpg(pgmux)
    md5 = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    try:
        error = await error_of(asyncio.wait_for(app.fetchval("SELECT pg_sleep(10)"), 8))
        assert error.sqlstate == "25P04", error
        assert await md5.fetchval("SELECT pg_sleep(1.6)::text") == ""  # no limit for md5user
    finally:
        app.terminate()
        await md5.close()
