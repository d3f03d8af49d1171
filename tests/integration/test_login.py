"""Logging in through pgmux: authentication, refusals, startup parameters, config checks.

Every test talks to a real pgmux subprocess in front of the session's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import psycopg
import pytest
from support.auth import TracingClient
from support.helpers import connect_asyncpg, connect_psycopg, run_psql
from support.pgcluster import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    MD5_PASSWORD,
    MD5_USER,
    PgCluster,
    free_port,
)
from support.pgmux import PgmuxFactory, PgmuxProcess, default_config, run_check, to_toml
from support.wire import AUTH_OK, AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL, ServerError

# -- successful logins -------------------------------------------------------------------


async def test_scram_login_asyncpg(pgmux: PgmuxProcess) -> None:
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
        assert await conn.fetchval("SELECT current_database()") == APP_DB
        assert await conn.fetchval("SELECT 1 + 1") == 2
    finally:
        await conn.close()


async def test_scram_login_psycopg(pgmux: PgmuxProcess) -> None:
    async with await connect_psycopg(pgmux) as conn:
        cur = await conn.execute("SELECT current_user, current_database()")
        assert await cur.fetchone() == (APP_USER, APP_DB)
        assert conn.info.parameter_status("server_version")


def test_scram_login_psql(pgmux: PgmuxProcess) -> None:
    proc = run_psql(pgmux, "-c", "SELECT current_user || '@' || current_database()")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{APP_USER}@{APP_DB}"


@pytest.mark.parametrize(("user", "password"), [(MD5_USER, MD5_PASSWORD), (APP_USER, APP_PASSWORD)])
async def test_md5_auth_type(pgmux_factory: PgmuxFactory, user: str, password: str) -> None:
    pgmux = pgmux_factory({"auth_type": "md5"})
    conn = await connect_asyncpg(pgmux, user, password)
    try:
        assert await conn.fetchval("SELECT current_user") == user
    finally:
        await conn.close()
    async with await connect_psycopg(pgmux, user, password) as pconn:
        cur = await pconn.execute("SELECT current_user")
        assert await cur.fetchone() == (user,)
    proc = run_psql(pgmux, "-c", "SELECT current_user", user=user, password=password)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == user


async def test_md5_auth_type_wrong_password(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"auth_type": "md5"})
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await connect_asyncpg(pgmux, MD5_USER, "wrong")
    assert info.value.sqlstate == "28P01"
    assert info.value.message == f'password authentication failed for user "{MD5_USER}"'


async def test_trust_auth_type(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"auth_type": "trust"})
    # Any password (or none) is accepted; pgmux logs in to PostgreSQL with its own.
    conn = await connect_asyncpg(pgmux, password="not-the-password")
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
    finally:
        await conn.close()
    proc = run_psql(pgmux, "-c", "SELECT 42", password="")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "42"


# -- refused logins ----------------------------------------------------------------------


async def test_wrong_password(pgmux: PgmuxProcess) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await connect_asyncpg(pgmux, password="wrong")
    assert info.value.sqlstate == "28P01"
    assert info.value.message == f'password authentication failed for user "{APP_USER}"'
    with pytest.raises(psycopg.OperationalError) as pinfo:
        await connect_psycopg(pgmux, password="wrong")
    assert f'password authentication failed for user "{APP_USER}"' in str(pinfo.value)
    # pgmux is fine afterwards
    conn = await connect_asyncpg(pgmux)
    await conn.close()


async def test_unknown_user_looks_like_wrong_password(pgmux: PgmuxProcess) -> None:
    with pytest.raises(asyncpg.PostgresError) as wrong:
        await connect_asyncpg(pgmux, password="wrong")
    with pytest.raises(asyncpg.PostgresError) as unknown:
        await connect_asyncpg(pgmux, user="nosuchuser", password="wrong")
    assert type(unknown.value) is type(wrong.value) is asyncpg.InvalidPasswordError
    assert unknown.value.sqlstate == wrong.value.sqlstate == "28P01"
    assert unknown.value.message == 'password authentication failed for user "nosuchuser"'
    assert unknown.value.message.replace("nosuchuser", APP_USER) == wrong.value.message
    assert unknown.value.hint == wrong.value.hint
    assert unknown.value.detail == wrong.value.detail


async def test_unknown_database(pgmux: PgmuxProcess) -> None:
    with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
        await connect_asyncpg(pgmux, database="nosuchdb")
    assert info.value.sqlstate == "3D000"
    assert "no such database" in info.value.message
    assert "nosuchdb" in info.value.message


async def test_scram_final_comes_before_what_follows_it(pgmux: PgmuxProcess) -> None:
    """pgmux holds AuthenticationSASLFinal back to send it in one write with the welcome
    or with an error; either way the client must read it first, as from PostgreSQL."""
    async with await TracingClient.open(pgmux.host, pgmux.port) as client:
        await client.login(APP_USER, APP_PASSWORD, APP_DB)  # verifies the server's proof
        assert client.auth_codes == [AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL, AUTH_OK]
        kinds = [typ for typ, _ in client.seen]
        assert kinds[:4] == [b"R"] * 4 and kinds[-2:] == [b"K", b"Z"]
    async with await TracingClient.open(pgmux.host, pgmux.port) as client:
        with pytest.raises(ServerError) as info:
            await client.login(APP_USER, APP_PASSWORD, "nosuchdb")
        assert info.value.sqlstate == "3D000"
        assert client.auth_codes == [AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL]
        assert [typ for typ, _ in client.seen] == [b"R", b"R", b"R", b"E"]


async def test_max_client_conn(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"max_client_conn": 3})
    conns = [await connect_asyncpg(pgmux) for _ in range(3)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await connect_asyncpg(pgmux)
        assert info.value.sqlstate == "53300"
        assert "max_client_conn" in info.value.message
        for conn in conns:  # the three still work
            assert await conn.fetchval("SELECT 1") == 1
        await conns.pop().close()

        # A slot is free again once a client has gone.
        async def fourth() -> asyncpg.Connection:
            return await connect_asyncpg(pgmux)

        conns.append(await asyncio.wait_for(fourth(), 10))
        assert await conns[-1].fetchval("SELECT 2") == 2
    finally:
        for conn in conns:
            await conn.close()


# -- startup parameters ------------------------------------------------------------------

_SETTINGS_A = {
    "application_name": "client-a",
    "TimeZone": "America/New_York",
    "DateStyle": "SQL, DMY",
    "extra_float_digits": "2",
    "search_path": "schema_a, public",
    "options": "-c statement_timeout=1234",
}
_SETTINGS_B = {
    "application_name": "client-b",
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "extra_float_digits": "-3",
    "search_path": "schema_b, public",
    "options": "-c statement_timeout=4321",
}
_EXPECTED_A = {
    "application_name": "client-a",
    "TimeZone": "America/New_York",
    "DateStyle": "SQL, DMY",
    "extra_float_digits": "2",
    "search_path": "schema_a, public",
    "statement_timeout": "1234ms",
}
_EXPECTED_B = {
    "application_name": "client-b",
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "extra_float_digits": "-3",
    "search_path": "schema_b, public",
    "statement_timeout": "4321ms",
}
_SHOW = (
    "SELECT current_setting('application_name'), current_setting('TimeZone'),"
    " current_setting('DateStyle'), current_setting('extra_float_digits'),"
    " current_setting('search_path'), current_setting('statement_timeout')"
)


async def _settings_seen(conn: asyncpg.Connection) -> dict[str, str]:
    row = await conn.fetchrow(_SHOW)
    assert row is not None
    return dict(zip(_EXPECTED_A, row, strict=True))


async def test_startup_parameters_through_pool_of_one(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1})
    a = await connect_asyncpg(pgmux, server_settings=_SETTINGS_A)
    b = await connect_asyncpg(pgmux, server_settings=_SETTINGS_B)
    try:
        # Reported at login as the client asked.
        assert a.get_settings().application_name == "client-a"
        assert b.get_settings().application_name == "client-b"
        assert a.get_settings().TimeZone == "America/New_York"
        assert b.get_settings().TimeZone == "UTC"
        assert a.get_settings().DateStyle == "SQL, DMY"
        for round_ in range(4):
            for conn, expected in ((a, _EXPECTED_A), (b, _EXPECTED_B)):
                async with conn.transaction():
                    assert await _settings_seen(conn) == expected, f"round {round_}"
                    pid = await conn.fetchval("SELECT pg_backend_pid()")
                    assert await conn.fetchval("SHOW TimeZone") == expected["TimeZone"]
                    assert await conn.fetchval("SELECT pg_backend_pid()") == pid
                # and outside a transaction block
                assert await _settings_seen(conn) == expected, f"round {round_}"
        # One server served both: the pool really is of size 1.
        assert await a.fetchval("SELECT pg_backend_pid()") == await b.fetchval(
            "SELECT pg_backend_pid()"
        )
        # statement_timeout from options really applies.
        with pytest.raises(asyncpg.QueryCanceledError):
            await a.execute("SELECT pg_sleep(3)")
        assert await a.fetchval("SELECT 1") == 1
        assert await b.fetchval("SELECT pg_sleep(2)::text") == ""
    finally:
        await a.close()
        await b.close()


async def test_startup_parameters_psycopg_and_asyncpg_interleaved(
    pgmux_factory: PgmuxFactory,
) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1})
    a = await connect_psycopg(
        pgmux,
        application_name="psycopg-a",
        options="-c TimeZone=America/New_York -c search_path=schema_a,public",
        autocommit=False,
    )
    b = await connect_asyncpg(pgmux, server_settings={"TimeZone": "UTC"})
    try:
        assert a.info.parameter_status("TimeZone") == "America/New_York"
        assert a.info.parameter_status("application_name") == "psycopg-a"
        for _ in range(3):
            cur = await a.execute(
                "SELECT current_setting('TimeZone'), current_setting('search_path'),"
                " current_setting('application_name')"
            )
            assert await cur.fetchone() == ("America/New_York", "schema_a,public", "psycopg-a")
            await a.commit()
            assert await b.fetchval("SHOW TimeZone") == "UTC"
            assert await b.fetchval("SHOW search_path") == '"$user", public'
            assert await b.fetchval("SHOW application_name") == ""
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    ("settings", "sqlstate", "words"),
    [
        ({"options": "-c no_such_setting=1"}, "42704", "no_such_setting"),
        ({"TimeZone": "Not/AZone"}, "22023", "Not/AZone"),
        ({"extra_float_digits": "banana"}, "22023", "extra_float_digits"),
    ],
    ids=["unknown-setting", "bad-timezone", "bad-number"],
)
async def test_invalid_startup_setting_fails_login(
    pgmux_factory: PgmuxFactory, settings: dict[str, str], sqlstate: str, words: str
) -> None:
    pgmux = pgmux_factory({"default_pool_size": 1})
    # Once with a fresh pool (nothing learned yet), once after a good login.
    for attempt in range(2):
        with pytest.raises(asyncpg.PostgresError) as info:
            await connect_asyncpg(pgmux, server_settings=settings)
        assert info.value.sqlstate == sqlstate, (attempt, info.value)
        assert words in info.value.message, (attempt, info.value.message)
        good = await connect_asyncpg(pgmux)
        try:
            assert await good.fetchval("SELECT 1") == 1
        finally:
            await good.close()


async def test_invalid_startup_setting_psycopg(pgmux: PgmuxProcess) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        await connect_psycopg(pgmux, options="-c no_such_setting=1")
    assert "no_such_setting" in str(info.value)


# -- config checking ---------------------------------------------------------------------


def _check(workdir: Any, text: str) -> tuple[int, str]:
    proc = run_check(text, workdir)
    return proc.returncode, proc.stdout + proc.stderr


def test_check_valid_config(pg: PgCluster, workdir: Any) -> None:
    code, out = _check(workdir, to_toml(default_config(pg, free_port())))
    assert code == 0, out


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (
            lambda text: text.replace("default_pool_size = 5", 'default_pool_size = "x"'),
            "default_pool_size",
        ),
        (
            lambda text: text.replace("default_pool_size = 5", "defualt_pool_size = 5"),
            "defualt_pool_size",
        ),
        (lambda text: text + "\nthis is not toml\n", "TOML"),
    ],
    ids=["wrong-type", "unknown-key", "not-toml"],
)
def test_check_invalid_config(pg: PgCluster, workdir: Any, edit: Any, key: str) -> None:
    text = edit(to_toml(default_config(pg, free_port())))
    code, out = _check(workdir, text)
    assert code == 1, out
    assert str(workdir / "check.toml") in out
    assert key in out


def test_check_missing_databases_section(pg: PgCluster, workdir: Any) -> None:
    config = default_config(pg, free_port())
    del config["databases"]
    code, out = _check(workdir, to_toml(config))
    assert code == 1, out
    assert "check.toml" in out and "databases" in out


# -- server-side problems ----------------------------------------------------------------


async def test_unreachable_server(pgmux_factory: PgmuxFactory) -> None:
    dead_port = free_port()
    pgmux = pgmux_factory({"databases": {APP_DB: {"port": dead_port}}})
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        await connect_asyncpg(pgmux)
    elapsed = time.monotonic() - started
    assert info.value.sqlstate == "08001"
    assert f"127.0.0.1:{dead_port}" in info.value.message
    assert elapsed < 3, f"took {elapsed:.1f} s"
    # Still fast the second time, and pgmux still runs.
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        await connect_asyncpg(pgmux)
    assert info.value.sqlstate == "08001"
    assert time.monotonic() - started < 3
    assert pgmux.running


async def test_wrong_server_password(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"users": {APP_USER: {"password": "not-the-server-password"}}})
    # The client logs in to pgmux with the configured password; PostgreSQL refuses pgmux.
    with pytest.raises(asyncpg.PostgresError) as info:
        await connect_asyncpg(pgmux, password="not-the-server-password")
    assert info.value.sqlstate == "28P01"
    assert info.value.hint is not None and f"[users.{APP_USER}].password" in info.value.hint
    # A second attempt gets the same answer (cached during server_login_retry), fast.
    started = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as info:
        await connect_asyncpg(pgmux, password="not-the-server-password")
    assert info.value.sqlstate == "28P01"
    assert time.monotonic() - started < 3
    # Other users' pools are not affected.
    conn = await connect_asyncpg(pgmux, MD5_USER, MD5_PASSWORD)
    try:
        assert await conn.fetchval("SELECT current_user") == MD5_USER
    finally:
        await conn.close()
