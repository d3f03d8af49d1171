"""Tests of the TLS and authentication test infrastructure, straight against PostgreSQL.

No pgmux here: the certificates (``support.certs``) are what each is meant to be; the
``pg_tls`` cluster serves TLS that psql, psycopg and asyncpg verify (sslmode=require,
verify-ca, verify-full by name and by IP address) and turns plain TCP away;
``PgCluster.create(hba=...)`` takes client-certificate authentication; and the extra
roles of the session's cluster (passthru, expired, authuser and its auth function) do
what the auth tests expect of them.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import pwd
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from cryptography import x509
from psycopg.conninfo import make_conninfo
from support.certs import (
    SERVER_HOSTNAME,
    SERVER_IP,
    WRONG_HOSTNAME,
    CertFiles,
    CertPair,
    client_ssl_context,
    libpq_ssl_params,
)
from support.helpers import tool_env
from support.pgcluster import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    AUTH_FUNCTION,
    AUTH_PASSWORD,
    AUTH_QUERY,
    AUTH_USER,
    DEFAULT_HBA,
    EXPIRED_PASSWORD,
    EXPIRED_USER,
    MD5_PASSWORD,
    MD5_USER,
    PASSTHRU_PASSWORD,
    PASSTHRU_USER,
    TLS_KEY_FILE,
    TLS_ONLY_HBA,
    PgCluster,
    find_client_tool,
)

SSL_STATUS = "SELECT ssl, version, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
CERT_HBA = "local all all trust\nhostssl all all 127.0.0.1/32 cert\n"


def libpq_conninfo(
    pg: PgCluster,
    host: str,
    *,
    user: str = APP_USER,
    password: str | None = APP_PASSWORD,
    **params: str,
) -> str:
    """A libpq conninfo for ``pg`` under the host name ``host`` (always 127.0.0.1)."""
    parts = {"host": host, "hostaddr": SERVER_IP, "port": str(pg.port), "user": user,
             "dbname": APP_DB, "connect_timeout": "15", **params}  # fmt: skip
    if password is not None:
        parts["password"] = password
    return make_conninfo(**parts)


def psycopg_status(conninfo: str) -> tuple[Any, ...]:
    """current_user and the ssl status of a psycopg connection made with ``conninfo``."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(f"SELECT current_user, s.* FROM ({SSL_STATUS}) s").fetchone()
    assert row is not None
    return tuple(row)


# -- the certificates ------------------------------------------------------------------


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def common_name(cert: x509.Certificate) -> str:
    (attr,) = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attr.value)


def sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in ext]


def all_pairs(certs: CertFiles) -> dict[str, CertPair]:
    return {
        "ca": CertPair(certs.ca_cert, certs.ca_key),
        "other_ca": CertPair(certs.other_ca_cert, certs.other_ca_key),
        "server": certs.server,
        "wrong_host": certs.wrong_host,
        "client_app": certs.client_app,
        "client_md5user": certs.client_md5user,
        "client_nobody": certs.client_nobody,
        "client_app_badca": certs.client_app_badca,
        "client_app_expired": certs.client_app_expired,
    }


def test_files_names_and_modes(certs: CertFiles) -> None:
    names = sorted(p.name for p in certs.directory.iterdir())
    expected = sorted(
        f"{stem}.{ext}"
        for stem in (
            "ca",
            "other-ca",
            "server",
            "wrong-host",
            "client-app",
            "client-md5user",
            "client-nobody",
            "client-app-badca",
            "client-app-expired",
        )
        for ext in ("crt", "key")
    )
    assert names == expected
    assert str(certs.directory).startswith("/tmp/")
    for pair in all_pairs(certs).values():
        assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600, pair.key
        assert pair.key.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
        assert stat.S_IMODE(pair.cert.stat().st_mode) == 0o644, pair.cert
        assert pair.cert.read_text().startswith("-----BEGIN CERTIFICATE-----\n")


@pytest.mark.parametrize(
    "name",
    [
        "server",
        "wrong_host",
        "client_app",
        "client_md5user",
        "client_nobody",
        "client_app_badca",
        "client_app_expired",
    ],
)
def test_every_pair_loads_into_an_ssl_context(certs: CertFiles, name: str) -> None:
    pair = all_pairs(certs)[name]
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(pair.cert, pair.key)


def test_subjects_issuers_and_validity(certs: CertFiles) -> None:
    ca, other_ca = load(certs.ca_cert), load(certs.other_ca_cert)
    assert ca.subject != other_ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = load(certs.server_cert)
    assert common_name(server) == SERVER_HOSTNAME
    assert sans(server) == [SERVER_HOSTNAME, SERVER_IP]
    wrong = load(certs.wrong_host_cert)
    assert sans(wrong) == [WRONG_HOSTNAME]
    for pair, cn, issuer in [
        (certs.client_app, "app", ca),
        (certs.client_md5user, "md5user", ca),
        (certs.client_nobody, "nobody", ca),
        (certs.client_app_badca, "app", other_ca),
        (certs.client_app_expired, "app", ca),
    ]:
        cert = load(pair.cert)
        assert common_name(cert) == cn
        assert cert.issuer == issuer.subject
        cert.verify_directly_issued_by(issuer)
    now = datetime.datetime.now(datetime.UTC)
    for pair in all_pairs(certs).values():
        cert = load(pair.cert)
        assert cert.signature_hash_algorithm is not None
        assert cert.signature_hash_algorithm.name == "sha256"
        if pair != certs.client_app_expired:
            assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert load(certs.client_app_expired_cert).not_valid_after_utc < now


async def handshake(server: CertPair, client_ctx: ssl.SSLContext, server_hostname: str) -> None:
    """A TLS handshake with an in-process server presenting ``server``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert, server.key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(serve, SERVER_IP, 0, ssl=server_ctx)
    port = listener.sockets[0].getsockname()[1]
    try:
        _, writer = await asyncio.open_connection(
            SERVER_IP, port, ssl=client_ctx, server_hostname=server_hostname
        )
        writer.close()
        await writer.wait_closed()
    finally:
        listener.close()
        await listener.wait_closed()


async def test_wrong_host_cert_fails_hostname_check_only(certs: CertFiles) -> None:
    verify_full = client_ssl_context(certs.ca_cert)
    await handshake(certs.wrong_host, verify_full, WRONG_HOSTNAME)
    await handshake(certs.server, verify_full, SERVER_HOSTNAME)
    await handshake(certs.wrong_host, client_ssl_context(certs.ca_cert, check_hostname=False),
                    SERVER_HOSTNAME)  # fmt: skip
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await handshake(certs.wrong_host, verify_full, SERVER_HOSTNAME)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        await handshake(certs.server, client_ssl_context(certs.other_ca_cert), SERVER_HOSTNAME)


# -- the TLS cluster -------------------------------------------------------------------


def test_tls_cluster_config(pg_tls: PgCluster, pg: PgCluster, certs: CertFiles) -> None:
    assert pg_tls.port != pg.port
    assert pg_tls.psql("SHOW ssl") == "on"
    assert pg_tls.psql("SHOW ssl_ca_file") == "ca.crt"
    assert (pg_tls.datadir / "pg_hba.conf").read_text() == TLS_ONLY_HBA
    assert (pg.datadir / "pg_hba.conf").read_text() == DEFAULT_HBA
    assert pg.psql("SHOW ssl") == "off"
    key = (pg_tls.datadir / TLS_KEY_FILE).stat()
    assert stat.S_IMODE(key.st_mode) == 0o600
    if os.geteuid() == 0:
        assert key.st_uid == pwd.getpwnam("postgres").pw_uid
    roles = "SELECT string_agg(rolname, ' ' ORDER BY rolname) FROM pg_roles WHERE rolcanlogin"
    assert pg_tls.psql(roles) == pg.psql(roles)
    assert pg_tls.psql(f"SELECT datdba::regrole FROM pg_database WHERE datname = '{APP_DB}'") == (
        APP_USER
    )


@pytest.mark.parametrize(
    ("sslmode", "host", "root"),
    [
        ("require", SERVER_IP, None),
        ("verify-ca", SERVER_IP, "ca"),
        ("verify-full", SERVER_HOSTNAME, "ca"),
        ("verify-full", SERVER_IP, "ca"),  # the IP address SAN
    ],
)
def test_psycopg_tls(
    pg_tls: PgCluster, certs: CertFiles, sslmode: str, host: str, root: str | None
) -> None:
    cafile = certs.ca_cert if root else None
    conninfo = libpq_conninfo(pg_tls, host, **libpq_ssl_params(sslmode, cafile))
    user, on, version, client_dn = psycopg_status(conninfo)
    assert (user, on, client_dn) == (APP_USER, True, None)
    assert version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize(
    ("host", "root", "message"),
    [
        (SERVER_HOSTNAME, "other", "certificate verify failed"),
        (WRONG_HOSTNAME, "ca", "does not match host name"),
    ],
)
def test_psycopg_verify_full_refusals(
    pg_tls: PgCluster, certs: CertFiles, host: str, root: str, message: str
) -> None:
    cafile = certs.ca_cert if root == "ca" else certs.other_ca_cert
    conninfo = libpq_conninfo(pg_tls, host, **libpq_ssl_params("verify-full", cafile))
    with pytest.raises(psycopg.OperationalError, match=message):
        psycopg.connect(conninfo)


def test_psycopg_plain_tcp_is_rejected(pg_tls: PgCluster) -> None:
    conninfo = libpq_conninfo(pg_tls, SERVER_IP, sslmode="disable")
    with pytest.raises(psycopg.OperationalError, match=r"rejects connection .* no encryption"):
        psycopg.connect(conninfo)


@pytest.mark.parametrize(
    ("sslmode", "host"),
    [("require", SERVER_IP), ("verify-full", SERVER_HOSTNAME), ("verify-full", SERVER_IP)],
)
def test_psql_tls(pg_tls: PgCluster, certs: CertFiles, sslmode: str, host: str) -> None:
    cafile = certs.ca_cert if sslmode != "require" else None
    conninfo = libpq_conninfo(pg_tls, host, password=None, **libpq_ssl_params(sslmode, cafile))
    out = subprocess.run(
        [find_client_tool("psql"), "-X", "-A", "-t", "-d", conninfo, "-c",
         f"SELECT current_user, ssl FROM ({SSL_STATUS}) s"],
        env=tool_env(APP_PASSWORD), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == f"{APP_USER}|t"


def test_psql_plain_tcp_is_rejected(pg_tls: PgCluster) -> None:
    conninfo = libpq_conninfo(pg_tls, SERVER_IP, password=None, sslmode="disable")
    out = subprocess.run(
        [find_client_tool("psql"), "-X", "-A", "-t", "-d", conninfo, "-c", "SELECT 1"],
        env=tool_env(APP_PASSWORD), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "no encryption" in out.stderr


@pytest.mark.parametrize(
    ("host", "verify"),
    [(SERVER_IP, None), (SERVER_HOSTNAME, "full"), (SERVER_IP, "full"), (SERVER_IP, "ca")],
)
async def test_asyncpg_tls(
    pg_tls: PgCluster, certs: CertFiles, host: str, verify: str | None
) -> None:
    ctx = client_ssl_context(certs.ca_cert if verify else None, check_hostname=verify == "full")
    conn = await asyncpg.connect(
        host=host, port=pg_tls.port, user=APP_USER, password=APP_PASSWORD, database=APP_DB,
        ssl=ctx, timeout=15,
    )  # fmt: skip
    try:
        row = await conn.fetchrow(SSL_STATUS)
        assert row is not None
        assert (row["ssl"], row["client_dn"]) == (True, None)
        assert await conn.fetchval("SELECT current_user") == APP_USER
    finally:
        await conn.close()


async def test_asyncpg_verify_full_other_ca_fails(pg_tls: PgCluster, certs: CertFiles) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(
            host=SERVER_HOSTNAME, port=pg_tls.port, user=APP_USER, password=APP_PASSWORD,
            database=APP_DB, ssl=client_ssl_context(certs.other_ca_cert), timeout=15,
        )  # fmt: skip


async def test_asyncpg_plain_tcp_is_rejected(pg_tls: PgCluster) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(pg_tls.dsn(), ssl=False, timeout=15)


# -- client certificates ---------------------------------------------------------------


def test_client_cert_is_presented_and_verified(pg_tls: PgCluster, certs: CertFiles) -> None:
    """pg_tls verifies any client certificate against the CA; auth stays SCRAM."""
    params = libpq_ssl_params("verify-full", certs.ca_cert, certs.client_app)
    status = psycopg_status(libpq_conninfo(pg_tls, SERVER_HOSTNAME, **params))
    assert status[:2] == (APP_USER, True)
    assert status[3] == "/O=pgmux tests/CN=app"


@pytest.mark.parametrize(
    ("client", "message"),
    [("client_app_badca", "unknown ca"), ("client_app_expired", "certificate expired")],
)
def test_bad_client_certs_fail_the_handshake(
    pg_tls: PgCluster, certs: CertFiles, client: str, message: str
) -> None:
    params = libpq_ssl_params("verify-full", certs.ca_cert, all_pairs(certs)[client])
    with pytest.raises(psycopg.OperationalError, match=message):
        psycopg.connect(libpq_conninfo(pg_tls, SERVER_HOSTNAME, **params))


@pytest.fixture(scope="module")
def pg_cert(certs: CertFiles) -> Iterator[PgCluster]:
    """A cluster where TCP logins are by client certificate alone (``hba=``)."""
    cluster = PgCluster.create(tls=certs, hba=CERT_HBA)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.mark.parametrize(
    ("client", "user"), [("client_app", APP_USER), ("client_md5user", MD5_USER)]
)
def test_cert_auth_logs_in_as_the_cn(
    pg_cert: PgCluster, certs: CertFiles, client: str, user: str
) -> None:
    params = libpq_ssl_params("verify-full", certs.ca_cert, all_pairs(certs)[client])
    status = psycopg_status(libpq_conninfo(pg_cert, SERVER_HOSTNAME, user=user, password=None,
                                           **params))  # fmt: skip
    assert status[:2] == (user, True)


@pytest.mark.parametrize(
    ("client", "user", "message"),
    [
        (None, APP_USER, "connection requires a valid client certificate"),
        ("client_app", MD5_USER, "certificate authentication failed"),
        ("client_nobody", "nobody", 'role "nobody" does not exist'),
    ],
)
def test_cert_auth_refusals(
    pg_cert: PgCluster, certs: CertFiles, client: str | None, user: str, message: str
) -> None:
    pair = all_pairs(certs)[client] if client else None
    params = libpq_ssl_params("verify-full", certs.ca_cert, pair)
    with pytest.raises(psycopg.OperationalError, match=message):
        psycopg.connect(libpq_conninfo(pg_cert, SERVER_HOSTNAME, user=user, **params))


async def test_asyncpg_client_cert(pg_cert: PgCluster, certs: CertFiles) -> None:
    ctx = client_ssl_context(certs.ca_cert, certs.client_app)
    conn = await asyncpg.connect(
        host=SERVER_HOSTNAME, port=pg_cert.port, user=APP_USER, database=APP_DB, ssl=ctx,
        timeout=15,
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
    finally:
        await conn.close()


# -- the extra roles -------------------------------------------------------------------


async def test_passthru_logs_in(pg: PgCluster) -> None:
    conn = await asyncpg.connect(pg.dsn(PASSTHRU_USER, PASSTHRU_PASSWORD), timeout=15)
    try:
        assert await conn.fetchval("SELECT current_user") == PASSTHRU_USER
        assert await conn.fetchval("SELECT current_database()") == APP_DB
    finally:
        await conn.close()
    owned = pg.psql(
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner"
        f" WHERE r.rolname = '{PASSTHRU_USER}'"
    )
    assert owned == "0"
    assert (
        pg.psql(
            f"SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles"
            f" WHERE rolname = '{PASSTHRU_USER}'"
        )
        == "f"
    )


async def test_passthru_logs_in_over_tls(pg_tls: PgCluster, certs: CertFiles) -> None:
    conn = await asyncpg.connect(
        pg_tls.dsn(PASSTHRU_USER, PASSTHRU_PASSWORD), ssl=client_ssl_context(certs.ca_cert),
        timeout=15,
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT current_user") == PASSTHRU_USER
    finally:
        await conn.close()


async def test_expired_is_refused(pg: PgCluster) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg.dsn(EXPIRED_USER, EXPIRED_PASSWORD), timeout=15)
    log = pg.logfile.read_text()
    assert f'User "{EXPIRED_USER}" has an expired password' in log


def test_expired_is_refused_psycopg(pg: PgCluster) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(EXPIRED_USER, EXPIRED_PASSWORD, connect_timeout=15))


async def auth_conn(pg: PgCluster) -> asyncpg.Connection:
    return await asyncpg.connect(pg.dsn(AUTH_USER, AUTH_PASSWORD), timeout=15)


async def test_auth_function_returns_scram_secret(pg: PgCluster) -> None:
    stored = pg.psql(
        f"SELECT rolpassword FROM pg_authid WHERE rolname = '{PASSTHRU_USER}'", dbname="postgres"
    )
    conn = await auth_conn(pg)
    try:
        rows = await conn.fetch(f"SELECT * FROM {AUTH_FUNCTION}($1)", PASSTHRU_USER)
        assert [tuple(r) for r in rows] == [(PASSTHRU_USER, stored)]
        assert stored.startswith("SCRAM-SHA-256$4096:")
        assert await conn.fetchrow(AUTH_QUERY, PASSTHRU_USER) == rows[0]
        assert [tuple(r) for r in await conn.fetch(AUTH_QUERY, EXPIRED_USER)] == [
            (EXPIRED_USER, None)
        ]
        assert await conn.fetch(AUTH_QUERY, "no_such_role") == []
        app_row = await conn.fetchrow(AUTH_QUERY, APP_USER)
        assert app_row is not None and app_row["passwd"].startswith("SCRAM-SHA-256$")
        md5_row = await conn.fetchrow(AUTH_QUERY, MD5_USER)
        assert md5_row is not None and md5_row["passwd"].startswith("md5")
    finally:
        await conn.close()


async def test_auth_user_cannot_read_pg_authid(pg: PgCluster) -> None:
    conn = await auth_conn(pg)
    try:
        for sql in ("SELECT * FROM pg_authid", "SELECT passwd FROM pg_shadow"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(sql)
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = $1",
                                   AUTH_USER) is False  # fmt: skip
    finally:
        await conn.close()


async def test_only_auth_user_may_call_the_function(pg: PgCluster) -> None:
    conn = await asyncpg.connect(pg.dsn(), timeout=15)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.fetch(AUTH_QUERY, APP_USER)
    finally:
        await conn.close()


def test_md5user_cannot_log_in_to_pg_tls(pg_tls: PgCluster, certs: CertFiles) -> None:
    """TLS_ONLY_HBA asks for SCRAM, and md5user's password is stored as md5."""
    conninfo = libpq_conninfo(
        pg_tls, SERVER_HOSTNAME, user=MD5_USER, password=MD5_PASSWORD,
        **libpq_ssl_params("verify-full", certs.ca_cert),
    )  # fmt: skip
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(conninfo)
