"""Where pgmux finds secrets: [users], auth_file, auth_query; and SCRAM pass-through.

A secret is plaintext, an md5 hash or a SCRAM secret, in any of the three sources.
With only a SCRAM secret pgmux logs in to PostgreSQL with the ClientKey recovered from
a client's own SCRAM proof. Every test talks to a real pgmux in front of the session's
PostgreSQL (see ``support.pgcluster`` for the roles).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from support.auth import (
    CountingAuthFunction,
    TracingClient,
    md5_hash,
    only_users,
    role_secret,
    write_userlist,
)
from support.helpers import (
    Su,
    connect_asyncpg,
    connect_psycopg,
    error_of,
    fetch_all,
    run_psql,
    wait_until,
)
from support.pgcluster import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    AUTH_PASSWORD,
    AUTH_QUERY,
    AUTH_USER,
    EXPIRED_PASSWORD,
    EXPIRED_USER,
    MD5_PASSWORD,
    MD5_USER,
    PASSTHRU_PASSWORD,
    PASSTHRU_USER,
    PgCluster,
    free_port,
)
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge, default_config, run_check
from support.wire import AUTH_SASL, AUTH_SASL_FINAL, ServerError

from proxy.auth import ScramSecret

# -- helpers -------------------------------------------------------------------------------


async def _works(pgmux: PgmuxProcess, user: str, password: str, dbname: str = APP_DB) -> None:
    """asyncpg logs in as ``user`` through pgmux and runs a query on the server."""
    conn = await connect_asyncpg(pgmux, user, password, dbname)
    try:
        assert await conn.fetchval("SELECT current_user") == user
        assert await conn.fetchval("SELECT 40 + 2") == 42
    finally:
        await conn.close()


async def _works_psycopg(
    pgmux: PgmuxProcess, user: str, password: str, dbname: str = APP_DB
) -> None:
    async with await connect_psycopg(pgmux, user, password, dbname) as conn:
        cur = await conn.execute("SELECT current_user, current_database()")
        assert await cur.fetchone() == (user, pgmux.config["databases"][dbname]["dbname"])


def _works_psql(pgmux: PgmuxProcess, user: str, password: str) -> None:
    proc = run_psql(pgmux, "-c", "SELECT current_user", user=user, password=password)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == user


async def _login_error(
    pgmux: PgmuxProcess, user: str, password: str, dbname: str = APP_DB
) -> asyncpg.PostgresError:
    """The error an asyncpg login (and a first query) gets through pgmux."""

    async def login_and_query() -> None:
        conn = await connect_asyncpg(pgmux, user, password, dbname)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    return await error_of(login_and_query())


async def _wrong_password_error(pgmux: PgmuxProcess, user: str) -> asyncpg.PostgresError:
    return await error_of(connect_asyncpg(pgmux, user, "certainly-wrong"))


async def _auth_user_databases(su: Su) -> set[str]:
    """The databases authuser has backends in (pgmux's auth_query connections)."""
    rows = await fetch_all(
        su, "SELECT datname FROM pg_stat_activity WHERE usename = %s", [AUTH_USER]
    )
    return {datname for (datname,) in rows}


async def _no_auth_user_backends(su: Su) -> bool:
    return not await _auth_user_databases(su)


def _assert_looks_like_wrong_password(
    error: asyncpg.PostgresError, reference: asyncpg.PostgresError, user: str, ref_user: str
) -> None:
    """``error`` (for ``user``) is indistinguishable from ``reference`` (for ``ref_user``)."""
    assert type(error) is type(reference) is asyncpg.InvalidPasswordError
    assert error.sqlstate == reference.sqlstate == "28P01"
    assert error.message == f'password authentication failed for user "{user}"'
    assert error.message.replace(user, ref_user) == reference.message
    assert error.hint == reference.hint
    assert error.detail == reference.detail


# -- [users.NAME].password: plaintext, md5 hash, SCRAM secret --------------------------------


async def test_users_plaintext_password_scram(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"users": {APP_USER: {"password": APP_PASSWORD}}})
    await _works(pgmux, APP_USER, APP_PASSWORD)
    await _works_psycopg(pgmux, APP_USER, APP_PASSWORD)


async def test_users_scram_secret_from_pg_authid(
    pg: PgCluster, pgmux_factory: PgmuxFactory
) -> None:
    secret = role_secret(pg, APP_USER)
    assert secret.startswith("SCRAM-SHA-256$4096:")
    pgmux = pgmux_factory({"users": {APP_USER: {"password": secret}}})
    await _works(pgmux, APP_USER, APP_PASSWORD)
    await _works_psycopg(pgmux, APP_USER, APP_PASSWORD)
    _works_psql(pgmux, APP_USER, APP_PASSWORD)
    assert (await _wrong_password_error(pgmux, APP_USER)).sqlstate == "28P01"


async def test_users_md5_hash_with_md5_auth(pgmux_factory: PgmuxFactory) -> None:
    # md5user's server login is md5 too (pg_hba.conf), which the hash itself answers.
    pgmux = pgmux_factory(
        {"auth_type": "md5", "users": {MD5_USER: {"password": md5_hash(MD5_USER, MD5_PASSWORD)}}}
    )
    await _works(pgmux, MD5_USER, MD5_PASSWORD)
    await _works_psycopg(pgmux, MD5_USER, MD5_PASSWORD)
    _works_psql(pgmux, MD5_USER, MD5_PASSWORD)
    error = await _wrong_password_error(pgmux, MD5_USER)
    assert error.sqlstate == "28P01"
    assert error.message == f'password authentication failed for user "{MD5_USER}"'


async def test_users_md5_hash_with_scram_auth_fails_like_wrong_password(
    pgmux_factory: PgmuxFactory,
) -> None:
    pgmux = pgmux_factory({"users": {MD5_USER: {"password": md5_hash(MD5_USER, MD5_PASSWORD)}}})
    reference = await _wrong_password_error(pgmux, APP_USER)
    since = len(pgmux.log())
    error = await error_of(connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD))
    _assert_looks_like_wrong_password(error, reference, MD5_USER, APP_USER)
    line = pgmux.wait_for_log("md5-hashed password", since=since)
    assert MD5_USER in line and "[users]" in line and "SCRAM" in line


async def test_users_md5_hash_cannot_answer_scram_server(pgmux_factory: PgmuxFactory) -> None:
    """app's server login is SCRAM: an md5 hash logs the client in (md5) but cannot
    log in to PostgreSQL, and the error says why."""
    pgmux = pgmux_factory(
        {"auth_type": "md5", "users": {APP_USER: {"password": md5_hash(APP_USER, APP_PASSWORD)}}}
    )
    error = await _login_error(pgmux, APP_USER, APP_PASSWORD)
    assert error.sqlstate == "28P01"
    assert "SCRAM" in error.message and "md5 hash" in error.message, error.message


# -- SCRAM pass-through ----------------------------------------------------------------------


async def test_scram_passthrough_no_plaintext_anywhere(
    pg: PgCluster, pgmux_factory: PgmuxFactory, su: Su
) -> None:
    secret = role_secret(pg, APP_USER)
    pgmux = pgmux_factory(only_users({APP_USER: {"password": secret}}))
    assert APP_PASSWORD not in pgmux.config_path.read_text()
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        # A real server session of app, authenticated by PostgreSQL itself.
        rows = await fetch_all(
            su, "SELECT usename, host(client_addr) FROM pg_stat_activity WHERE pid = %s", [pid]
        )
        assert rows == [(APP_USER, "127.0.0.1")]
        async with await connect_psycopg(pgmux) as pconn:
            # Two concurrent clients: the second server login uses the remembered key.
            async with pconn.transaction():
                await pconn.execute("SELECT 1")
                assert await conn.fetchval("SELECT 2") == 2
            cur = await pconn.execute("SELECT current_user")
            assert await cur.fetchone() == (APP_USER,)
    finally:
        await conn.close()
    assert "pass-through" not in pgmux.log()


async def test_scram_secret_with_trust_cannot_log_in_to_server(
    pg: PgCluster, pgmux_factory: PgmuxFactory
) -> None:
    pgmux = pgmux_factory(
        {"auth_type": "trust", **only_users({APP_USER: {"password": role_secret(pg, APP_USER)}})}
    )
    error = await _login_error(pgmux, APP_USER, "")
    assert error.sqlstate == "28P01"
    assert "holds only a SCRAM secret" in error.message, error.message
    assert "no client has logged in with SCRAM" in error.message, error.message
    assert "pass-through" in error.message
    pgmux.wait_for_log("no client has logged in with SCRAM")
    # Later logins within server_login_retry get the same explanation.
    error = await _login_error(pgmux, APP_USER, "")
    assert "holds only a SCRAM secret" in error.message, error.message


async def test_scram_secret_with_other_salt_passthrough_impossible(
    pgmux_factory: PgmuxFactory,
) -> None:
    other = ScramSecret.from_password(APP_PASSWORD).to_string()
    pgmux = pgmux_factory(only_users({APP_USER: {"password": other}}))
    async with await TracingClient.open(pgmux.host, pgmux.port) as client:
        with pytest.raises(ServerError) as info:
            await client.login(APP_USER, APP_PASSWORD, APP_DB)
        # The client's own SCRAM login succeeded (pgmux's signature verified) ...
        assert client.auth_codes[0] == AUTH_SASL
        assert AUTH_SASL_FINAL in client.auth_codes
    # ... and then pgmux could not log in to PostgreSQL with that key.
    message = info.value.fields["M"]
    assert "pass-through impossible" in message and "differs" in message, message
    pgmux.wait_for_log("pass-through impossible")
    # The wrong password still fails as a wrong password, not with the server error.
    error = await _wrong_password_error(pgmux, APP_USER)
    assert error.sqlstate == "28P01"


# -- auth_file -------------------------------------------------------------------------------


async def test_auth_file_users_log_in(pgmux_factory: PgmuxFactory, workdir: Path) -> None:
    write_userlist(
        workdir / "userlist.txt",
        {APP_USER: APP_PASSWORD, MD5_USER: md5_hash(MD5_USER, MD5_PASSWORD)},
    )
    # Relative to the config file (workdir/pgmux-1/pgmux.toml), not to pgmux's cwd.
    pgmux = pgmux_factory({"auth_type": "md5", "auth_file": "../userlist.txt", **only_users({})})
    await _works(pgmux, APP_USER, APP_PASSWORD)
    await _works(pgmux, MD5_USER, MD5_PASSWORD)
    await _works_psycopg(pgmux, MD5_USER, MD5_PASSWORD)
    error = await _wrong_password_error(pgmux, APP_USER)
    assert error.sqlstate == "28P01"


async def test_auth_file_scram_secret_absolute_path(
    pg: PgCluster, pgmux_factory: PgmuxFactory, workdir: Path
) -> None:
    path = write_userlist(workdir / "users.txt", {APP_USER: role_secret(pg, APP_USER)})
    pgmux = pgmux_factory({"auth_file": str(path), **only_users({})})
    await _works(pgmux, APP_USER, APP_PASSWORD)
    await _works_psycopg(pgmux, APP_USER, APP_PASSWORD)


@pytest.fixture
def quoted_role(pg: PgCluster) -> Iterator[tuple[str, str]]:
    """A role whose name and password hold double quotes and a space (dropped after:
    other tests compare the session cluster's roles)."""
    user, password = 'we"ird user', 'pa"ss "word'
    ident = '"' + user.replace('"', '""') + '"'
    pg.psql(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{user}') THEN"
        f" CREATE ROLE {ident} LOGIN PASSWORD '{password}'; END IF; END $$;"
        f"GRANT CONNECT ON DATABASE {APP_DB} TO {ident}",
        dbname="postgres",
    )
    yield user, password
    pg.psql(f"REVOKE CONNECT ON DATABASE {APP_DB} FROM {ident}", dbname="postgres")
    pg.psql(f"DROP ROLE {ident}", dbname="postgres")


async def test_auth_file_escaped_quotes(
    pgmux_factory: PgmuxFactory, workdir: Path, quoted_role: tuple[str, str]
) -> None:
    user, password = quoted_role
    path = write_userlist(workdir / "userlist.txt", {user: password})
    assert '"we""ird user" "pa""ss ""word"' in path.read_text()
    pgmux = pgmux_factory({"auth_file": str(path)})
    await _works(pgmux, user, password)
    await _works_psycopg(pgmux, user, password)


async def test_users_table_takes_precedence_over_auth_file(
    pgmux_factory: PgmuxFactory, workdir: Path
) -> None:
    # auth_file says app's password is "filepw"; [users.app] says "secret".
    path = write_userlist(
        workdir / "userlist.txt", {APP_USER: "filepw", MD5_USER: "also-not-the-password"}
    )
    pgmux = pgmux_factory({"auth_file": str(path)})
    await _works(pgmux, APP_USER, APP_PASSWORD)
    assert (await error_of(connect_asyncpg(pgmux, APP_USER, "filepw"))).sqlstate == "28P01"
    # md5user is in [users] as well (default config): the file's entry is ignored.
    await _works(pgmux, MD5_USER, MD5_PASSWORD)


@pytest.mark.parametrize(
    ("content", "line", "problem"),
    [
        ('"app" "secret"\n"md5user" md5secret\n', 3, "expected the password in double quotes"),
        ('\n"app" "secret\n', 3, "unterminated quoted password"),
        ('"app\n', 2, "unterminated quoted user name"),
    ],
)
def test_malformed_auth_file_fails_check(
    pg: PgCluster, workdir: Path, content: str, line: int, problem: str
) -> None:
    # write_userlist puts a comment on line 1.
    write_userlist(workdir / "userlist.txt", {}, raw=content)
    config = deep_merge(default_config(pg, free_port()), {"auth_file": "userlist.txt"})
    proc = run_check(config, workdir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(workdir / "userlist.txt") in proc.stderr
    assert f"line {line}" in proc.stderr and problem in proc.stderr, proc.stderr
    assert "auth_file" in proc.stderr
    assert "secret" not in proc.stderr.replace("userlist", "")  # never the password


def test_missing_auth_file_fails_check(pg: PgCluster, workdir: Path) -> None:
    config = deep_merge(default_config(pg, free_port()), {"auth_file": "nonexistent.txt"})
    proc = run_check(config, workdir)
    assert proc.returncode == 1
    assert "auth_file" in proc.stderr and "nonexistent.txt" in proc.stderr, proc.stderr


# -- auth_query ------------------------------------------------------------------------------


def _auth_query_config(query: str = AUTH_QUERY, **extra: object) -> dict[str, object]:
    return {
        "auth_user": AUTH_USER,
        "auth_query": query,
        "users": {AUTH_USER: {"password": AUTH_PASSWORD}},
        **extra,
    }


async def test_auth_query_passthru_logs_in(pgmux_factory: PgmuxFactory, su: Su) -> None:
    pgmux = pgmux_factory(_auth_query_config())
    assert PASSTHRU_USER not in pgmux.config_path.read_text()
    _works_psql(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)
    await _works(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)
    await _works_psycopg(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)
    # The lookup ran as authuser in the client's database.
    assert APP_DB in await _auth_user_databases(su)
    # Configured users still come from [users], not from auth_query.
    await _works(pgmux, APP_USER, APP_PASSWORD)


async def test_auth_query_refusals_look_like_wrong_passwords(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory(_auth_query_config())
    reference = await _wrong_password_error(pgmux, APP_USER)
    wrong = await error_of(connect_asyncpg(pgmux, PASSTHRU_USER, "wrong"))
    _assert_looks_like_wrong_password(wrong, reference, PASSTHRU_USER, APP_USER)
    # expired: VALID UNTIL 2000, so auth_query returns a NULL secret, even with the
    # right password.
    expired = await error_of(connect_asyncpg(pgmux, EXPIRED_USER, EXPIRED_PASSWORD))
    _assert_looks_like_wrong_password(expired, reference, EXPIRED_USER, APP_USER)
    unknown = await error_of(connect_asyncpg(pgmux, "nosuch", "whatever"))
    _assert_looks_like_wrong_password(unknown, reference, "nosuch", APP_USER)
    assert unknown.message == 'password authentication failed for user "nosuch"'
    # psycopg sees the same
    with pytest.raises(psycopg.OperationalError) as info:
        await connect_psycopg(pgmux, "nosuch", "whatever")
    assert 'password authentication failed for user "nosuch"' in str(info.value)
    # and the right password still works afterwards
    await _works(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)


async def test_auth_query_storm_runs_the_query_once(
    pg: PgCluster, pgmux_factory: PgmuxFactory
) -> None:
    counter = CountingAuthFunction(pg, sleep=0.5)
    try:
        pgmux = pgmux_factory(_auth_query_config(counter.query, auth_query_cache_ttl=30))

        async def login() -> None:
            conn = await connect_asyncpg(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)
            try:
                assert await conn.fetchval("SELECT current_user") == PASSTHRU_USER
            finally:
                await conn.close()

        await asyncio.gather(*(login() for _ in range(30)))
        assert counter.calls(PASSTHRU_USER) == 1
        # Unknown users are cached too: a probe storm does not reach PostgreSQL either.
        for _ in range(3):
            error = await error_of(connect_asyncpg(pgmux, "nosuch", "x"))
            assert error.sqlstate == "28P01"
        assert counter.calls("nosuch") == 1
    finally:
        counter.drop()


async def test_auth_query_cache_expires(pg: PgCluster, pgmux_factory: PgmuxFactory) -> None:
    counter = CountingAuthFunction(pg)
    try:
        pgmux = pgmux_factory(_auth_query_config(counter.query, auth_query_cache_ttl=1))
        await _works(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)
        await _works(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)
        assert counter.calls(PASSTHRU_USER) == 1
        await asyncio.sleep(1.3)
        await _works(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)
        assert counter.calls(PASSTHRU_USER) == 2
    finally:
        counter.drop()


async def test_auth_query_cache_ttl_zero_asks_every_time(
    pg: PgCluster, pgmux_factory: PgmuxFactory
) -> None:
    counter = CountingAuthFunction(pg)
    try:
        pgmux = pgmux_factory(_auth_query_config(counter.query, auth_query_cache_ttl=0))
        for _ in range(3):
            await _works(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)
        assert counter.calls(PASSTHRU_USER) == 3
    finally:
        counter.drop()


async def test_auth_query_missing_function_is_an_error_not_a_hang(
    pgmux_factory: PgmuxFactory,
) -> None:
    pgmux = pgmux_factory(
        _auth_query_config("SELECT usename, passwd FROM public.pgmux_no_such_function($1)")
    )
    started = time.monotonic()
    error = await asyncio.wait_for(_login_error(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD), 10)
    assert time.monotonic() - started < 5
    _assert_lookup_failed(error)
    # The details are for the operator, not for a client that has not logged in.
    assert "pgmux_no_such_function" not in error.message
    assert "pgmux_no_such_function" in pgmux.wait_for_log("user lookup for 'passthru' failed")
    # Configured users are unaffected.
    await _works(pgmux, APP_USER, APP_PASSWORD)


async def test_auth_query_wrong_column_count(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory(_auth_query_config("SELECT $1::text"))
    error = await asyncio.wait_for(_login_error(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD), 10)
    _assert_lookup_failed(error)
    assert "two columns" in pgmux.wait_for_log("user lookup for 'passthru' failed")


async def test_auth_query_unreachable_auth_database(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory(
        _auth_query_config(
            auth_dbname="deadauth",
            databases={"deadauth": {"host": "127.0.0.1", "port": free_port(), "dbname": APP_DB}},
        )
    )
    started = time.monotonic()
    error = await asyncio.wait_for(_login_error(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD), 15)
    assert time.monotonic() - started < 5
    _assert_lookup_failed(error)
    assert "cannot connect" in pgmux.wait_for_log("user lookup for 'passthru' failed")


async def test_auth_query_wrong_auth_user_password_fails_fast_every_time(
    pgmux_factory: PgmuxFactory,
) -> None:
    """authuser's own server login fails: every login that needs a lookup is told why,
    promptly, also while server_login_retry holds new server logins back."""
    config = _auth_query_config(query_wait_timeout=5)
    config["users"] = {AUTH_USER: {"password": "not-authsecret"}}
    pgmux = pgmux_factory(config)
    for attempt in range(2):
        started = time.monotonic()
        error = await asyncio.wait_for(_login_error(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD), 15)
        elapsed = time.monotonic() - started
        _assert_lookup_failed(error)
        assert elapsed < 3, f"attempt {attempt} took {elapsed:.1f} s: {error.message}"
    assert AUTH_USER in pgmux.wait_for_log("user lookup for 'passthru' failed")


def _assert_lookup_failed(error: Any) -> None:
    """What a not-yet-authenticated client is told when auth_query cannot answer."""
    assert error.sqlstate == "28000", error.sqlstate
    assert 'cannot verify user "passthru" now' in error.message, error.message
    assert "auth_query" in error.message


async def test_auth_query_md5_secret_with_md5_auth(pgmux_factory: PgmuxFactory) -> None:
    """md5user is only in PostgreSQL: auth_query returns its md5 hash, which answers
    both the client's md5 login and the server's md5 challenge."""
    pgmux = pgmux_factory(
        {
            "auth_type": "md5",
            **_auth_query_config(),
            **only_users({AUTH_USER: {"password": AUTH_PASSWORD}}),
        }
    )
    assert MD5_USER not in pgmux.config_path.read_text()
    await _works(pgmux, MD5_USER, MD5_PASSWORD)
    _works_psql(pgmux, MD5_USER, MD5_PASSWORD)
    assert (await _wrong_password_error(pgmux, MD5_USER)).sqlstate == "28P01"


async def test_auth_user_password_from_auth_file(
    pgmux_factory: PgmuxFactory, workdir: Path
) -> None:
    path = write_userlist(workdir / "userlist.txt", {AUTH_USER: AUTH_PASSWORD})
    config = _auth_query_config(auth_file=str(path))
    del config["users"]
    pgmux = pgmux_factory(config)
    await _works(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)


async def test_auth_file_takes_precedence_over_auth_query(
    pg: PgCluster, pgmux_factory: PgmuxFactory, workdir: Path
) -> None:
    counter = CountingAuthFunction(pg)
    try:
        path = write_userlist(workdir / "userlist.txt", {PASSTHRU_USER: "filepw"})
        pgmux = pgmux_factory(_auth_query_config(counter.query, auth_file=str(path)))
        error = await error_of(connect_asyncpg(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD))
        assert error.sqlstate == "28P01"
        assert counter.calls(PASSTHRU_USER) == 0
        # Users in neither file nor [users] are looked up.
        error = await error_of(connect_asyncpg(pgmux, EXPIRED_USER, EXPIRED_PASSWORD))
        assert error.sqlstate == "28P01"
        assert counter.calls(EXPIRED_USER) == 1
    finally:
        counter.drop()


async def test_auth_query_user_with_per_user_settings(pgmux_factory: PgmuxFactory, su: Su) -> None:
    """A [users.NAME] table with only pool settings holds no secret: the secret still
    comes from auth_query (the documented order: [users].password, auth_file,
    auth_query), as PgBouncer's [users] section does."""
    config = _auth_query_config()
    config["users"][PASSTHRU_USER] = {"pool_size": 1, "pool_mode": "session"}  # type: ignore[index]
    pgmux = pgmux_factory(config)
    await _works(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD)


async def test_auth_dbname_other_database(
    pg: PgCluster, pgmux_factory: PgmuxFactory, su: Su
) -> None:
    """The lookup runs in auth_dbname: the client's own database (postgres) has no
    auth function, database app has."""
    databases = {"pgdb": {"host": pg.host, "port": pg.port, "dbname": "postgres"}}
    without = pgmux_factory(_auth_query_config(databases=databases))
    error = await _login_error(without, PASSTHRU_USER, PASSTHRU_PASSWORD, "pgdb")
    _assert_lookup_failed(error)
    assert "does not exist" in without.wait_for_log("user lookup for 'passthru' failed")
    without.stop()
    await wait_until(
        lambda: _no_auth_user_backends(su), what="authuser's backends gone", timeout=10
    )

    pgmux = pgmux_factory(_auth_query_config(databases=databases, auth_dbname=APP_DB))
    conn = await connect_asyncpg(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD, "pgdb")
    try:
        assert await conn.fetchval("SELECT current_database()") == "postgres"
        assert await conn.fetchval("SELECT current_user") == PASSTHRU_USER
    finally:
        await conn.close()
    await _works_psycopg(pgmux, PASSTHRU_USER, PASSTHRU_PASSWORD, "pgdb")
    assert await _auth_user_databases(su) == {APP_DB}


def test_auth_dbname_must_be_configured(pg: PgCluster, workdir: Path) -> None:
    config = deep_merge(default_config(pg, free_port()), _auth_query_config(auth_dbname="nosuchdb"))
    proc = run_check(config, workdir)
    assert proc.returncode == 1
    assert "auth_dbname" in proc.stderr and "nosuchdb" in proc.stderr, proc.stderr


def test_auth_user_needs_a_password(pg: PgCluster, workdir: Path) -> None:
    config = deep_merge(default_config(pg, free_port()), {"auth_user": AUTH_USER})
    proc = run_check(config, workdir)
    assert proc.returncode == 1
    assert "auth_user" in proc.stderr and AUTH_USER in proc.stderr, proc.stderr
