"""TLS towards clients: pgmux serving TLS (SSLRequest and PostgreSQL 17's direct TLS) to
real clients (psql 15, psycopg with its bundled libpq, asyncpg, hand-made sockets).

pgmux presents ``certs.server`` (CN/SAN localhost, SAN 127.0.0.1) unless a test says
otherwise, and sits in front of the session's plain cluster ``pg``. Covered: every
client_tls_sslmode, client certificates (verify-ca, verify-full, auth_type = cert),
SCRAM-SHA-256-PLUS, direct TLS with ALPN, malformed and stalled handshakes, big
transfers, cancel, protocol limits and ``--check`` of the TLS keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from support.certs import (
    SERVER_HOSTNAME,
    SERVER_IP,
    CertFiles,
    CertPair,
    client_ssl_context,
    libpq_ssl_params,
    pgmux_client_tls,
)
from support.helpers import (
    Su,
    connect_asyncpg,
    postgres_error,
    run_psql_conninfo,
    vm_rss_kib,
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
)
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge, default_config, run_check
from support.wire import (
    ALPN_POSTGRESQL,
    AUTH_OK,
    SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
    RawClient,
    ServerError,
    gssenc_request,
    parse_fields,
    query,
    ssl_request,
    startup_packet,
)

LIBPQ_VERSION = psycopg.pq.version()
MB = 1024 * 1024

# -- helpers -----------------------------------------------------------------------------


def conninfo(
    pgmux: PgmuxProcess,
    *,
    sslmode: str = "require",
    host: str = SERVER_IP,
    user: str = APP_USER,
    password: str | None = APP_PASSWORD,
    cafile: Path | None = None,
    client: CertPair | None = None,
    **extra: str,
) -> str:
    """A libpq conninfo for pgmux under the name ``host`` (always at 127.0.0.1)."""
    params: dict[str, Any] = {
        "host": host,
        "hostaddr": SERVER_IP,
        "port": pgmux.port,
        "user": user,
        "dbname": APP_DB,
        "connect_timeout": 15,
        **libpq_ssl_params(sslmode, cafile, client),
        **extra,
    }
    if password is not None:
        params["password"] = password
    return make_conninfo(**params)


def psycopg_login(info: str) -> tuple[str, bool]:
    """(current_user, TLS in use?) of a psycopg connection made with ``info``."""
    with psycopg.connect(info, autocommit=True, prepare_threshold=None) as conn:
        row = conn.execute("SELECT current_user").fetchone()
        assert row is not None
        return str(row[0]), bool(conn.pgconn.ssl_in_use)


def psycopg_refused(info: str) -> str:
    """The error message of a psycopg connection attempt that must fail."""
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(info, prepare_threshold=None).close()
    return str(caught.value)


async def raw_tls(
    pgmux: PgmuxProcess,
    context: ssl.SSLContext | None = None,
    server_hostname: str = SERVER_HOSTNAME,
) -> RawClient:
    """A RawClient after SSLRequest, 'S' and the TLS handshake (no verification by default)."""
    raw = await RawClient.open(pgmux.host, pgmux.port)
    try:
        answer = await raw.request_tls(context or client_ssl_context(None), server_hostname)
    except BaseException:
        raw.abort()
        raise
    assert answer == b"S"
    return raw


def direct_tls_context(
    cafile: Path | None = None,
    client: CertPair | None = None,
    alpn: list[str] | None = None,
) -> ssl.SSLContext:
    """A client context for direct TLS; ALPN "postgresql" unless ``alpn`` says otherwise."""
    ctx = client_ssl_context(cafile, client)
    protocols = [ALPN_POSTGRESQL] if alpn is None else alpn
    if protocols:
        ctx.set_alpn_protocols(protocols)
    return ctx


async def raw_refusal(raw: RawClient, user: str = APP_USER, password: str = "") -> dict[str, str]:
    """Log in with ``raw`` expecting an ErrorResponse; its fields."""
    with pytest.raises(ServerError) as caught:
        await raw.login(user, password, APP_DB)
    return caught.value.fields


async def read_reply_or_eof(raw: RawClient, timeout: float = 10) -> tuple[bytes, bytes] | None:
    """The next message, or None when the peer closes (cleanly, by reset or TLS alert)."""
    try:
        return await raw.read_message(timeout)
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        return None


async def wait_closed(raw: RawClient, timeout: float = 10) -> bytes:
    """Everything until the peer closes; TLS errors and resets count as a close."""
    chunks = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await raw.reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def assert_serving(pgmux: PgmuxProcess, **kwargs: Any) -> None:
    """pgmux still logs clients in and answers (asyncpg; TLS without verification)."""
    kwargs.setdefault("ssl", client_ssl_context(None))
    conn = await connect_asyncpg(pgmux, **kwargs)
    try:
        assert await conn.fetchval("SELECT 41 + 1") == 42
    finally:
        await conn.close()


def asyncpg_ssl_object(conn: asyncpg.Connection) -> ssl.SSLObject | None:
    obj: ssl.SSLObject | None = conn._transport.get_extra_info("ssl_object")  # type: ignore[attr-defined]
    return obj


def client_hello() -> bytes:
    """The first flight of a TLS client: a ClientHello record, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = direct_tls_context()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=SERVER_HOSTNAME)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16
    return hello


@pytest.fixture
def tls_prefer(pgmux_factory: PgmuxFactory, certs: CertFiles) -> PgmuxProcess:
    return pgmux_factory(pgmux_client_tls(certs, "prefer"))


@pytest.fixture
def tls_require(pgmux_factory: PgmuxFactory, certs: CertFiles) -> PgmuxProcess:
    return pgmux_factory(pgmux_client_tls(certs, "require"))


# -- prefer: TLS for those who ask, plain for the rest ---------------------------------


@pytest.mark.parametrize(
    ("sslmode", "tls"),
    [("require", True), ("prefer", True), ("allow", False), ("disable", False)],
)
def test_prefer_psycopg(tls_prefer: PgmuxProcess, sslmode: str, tls: bool) -> None:
    assert psycopg_login(conninfo(tls_prefer, sslmode=sslmode)) == (APP_USER, tls)


@pytest.mark.parametrize(("sslmode", "tls"), [("require", True), ("disable", False)])
def test_prefer_psql(tls_prefer: PgmuxProcess, sslmode: str, tls: bool) -> None:
    out = run_psql_conninfo(
        conninfo(tls_prefer, sslmode=sslmode, password=None),
        "-c", "\\conninfo", "-c", "SELECT current_user",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip().endswith(APP_USER)
    assert ("SSL connection (protocol: TLSv1.3" in out.stdout) is tls, out.stdout


async def test_prefer_asyncpg(tls_prefer: PgmuxProcess) -> None:
    for ssl_arg, tls in ((client_ssl_context(None), True), ("prefer", True), (False, False)):
        conn = await connect_asyncpg(tls_prefer, ssl=ssl_arg)
        try:
            assert await conn.fetchval("SELECT current_user") == APP_USER
            obj = asyncpg_ssl_object(conn)
            assert (obj is not None) is tls, ssl_arg
            if obj is not None:
                assert obj.version() in ("TLSv1.2", "TLSv1.3")
        finally:
            await conn.close()


async def test_prefer_pipelined_queries_over_tls(tls_prefer: PgmuxProcess) -> None:
    """Many small round trips and concurrent clients over TLS client connections."""

    async def worker(n: int) -> None:
        conn = await connect_asyncpg(tls_prefer, ssl=client_ssl_context(None))
        try:
            for i in range(50):
                assert await conn.fetchval("SELECT $1::int * 2", i + n) == 2 * (i + n)
            async with conn.transaction():
                await conn.execute("SET LOCAL application_name = 'tls'")
                assert await conn.fetchval("SHOW application_name") == "tls"
        finally:
            await conn.close()

    await asyncio.gather(*(worker(n) for n in range(20)))


# -- the client verifies pgmux --------------------------------------------------------


@pytest.mark.parametrize("host", [SERVER_HOSTNAME, SERVER_IP])
def test_client_verify_full(tls_prefer: PgmuxProcess, certs: CertFiles, host: str) -> None:
    info = conninfo(tls_prefer, sslmode="verify-full", host=host, cafile=certs.ca_cert)
    assert psycopg_login(info) == (APP_USER, True)
    out = run_psql_conninfo(
        conninfo(tls_prefer, sslmode="verify-full", host=host, cafile=certs.ca_cert,
                 password=None),
        "-c", "SELECT current_user",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == APP_USER


async def test_client_verify_full_asyncpg(tls_prefer: PgmuxProcess, certs: CertFiles) -> None:
    conn = await asyncpg.connect(
        host=SERVER_HOSTNAME, port=tls_prefer.port, user=APP_USER, password=APP_PASSWORD,
        database=APP_DB, ssl=client_ssl_context(certs.ca_cert), statement_cache_size=0,
        timeout=15,
    )  # fmt: skip
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
        assert asyncpg_ssl_object(conn) is not None
    finally:
        await conn.close()


def test_client_verify_full_other_ca_fails(tls_prefer: PgmuxProcess, certs: CertFiles) -> None:
    info = conninfo(tls_prefer, sslmode="verify-full", host=SERVER_HOSTNAME,
                    cafile=certs.other_ca_cert)  # fmt: skip
    assert "certificate verify failed" in psycopg_refused(info)


async def test_wrong_host_cert_fails_verify_full_only(
    pgmux_factory: PgmuxFactory, certs: CertFiles
) -> None:
    pgmux = pgmux_factory(pgmux_client_tls(certs, "prefer", server=certs.wrong_host))
    for host in (SERVER_HOSTNAME, SERVER_IP):
        info = conninfo(pgmux, sslmode="verify-full", host=host, cafile=certs.ca_cert)
        message = psycopg_refused(info)
        assert "does not match host name" in message, message
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await asyncpg.connect(
            host=SERVER_HOSTNAME, port=pgmux.port, user=APP_USER, password=APP_PASSWORD,
            database=APP_DB, ssl=client_ssl_context(certs.ca_cert), timeout=15,
        )  # fmt: skip
    # The chain itself is fine: verify-ca accepts it.
    info = conninfo(pgmux, sslmode="verify-ca", host=SERVER_HOSTNAME, cafile=certs.ca_cert)
    assert psycopg_login(info) == (APP_USER, True)
    await assert_serving(pgmux, ssl=client_ssl_context(certs.ca_cert, check_hostname=False))


# -- require: TLS or nothing (over TCP) -----------------------------------------------


async def test_require_refuses_plain_clients(tls_require: PgmuxProcess) -> None:
    message = psycopg_refused(conninfo(tls_require, sslmode="disable"))
    assert "TLS" in message and "client_tls_sslmode = require" in message, message

    with pytest.raises(asyncpg.PostgresError) as caught:
        await connect_asyncpg(tls_require, ssl=False)
    error = postgres_error(caught.value)
    assert error.sqlstate == "28000"
    assert "TLS" in error.message

    async with await RawClient.open(tls_require.host, tls_require.port) as raw:
        fields = await raw_refusal(raw, password=APP_PASSWORD)
        assert fields["C"] == "28000"
        assert fields["S"] == "FATAL"
        assert "client_tls_sslmode" in fields["M"]
        assert "sslmode=require" in fields.get("H", ""), fields
        assert await wait_closed(raw) == b""

    out = run_psql_conninfo(
        conninfo(tls_require, sslmode="disable", password=None), "-c", "SELECT 1"
    )
    assert out.returncode == 2
    assert "TLS" in out.stderr, out.stderr
    await assert_serving(tls_require)


async def test_require_tls_clients_work(tls_require: PgmuxProcess) -> None:
    for sslmode in ("require", "prefer"):
        assert psycopg_login(conninfo(tls_require, sslmode=sslmode)) == (APP_USER, True)
    # libpq's allow tries plain first and, refused, tries again with TLS.
    assert psycopg_login(conninfo(tls_require, sslmode="allow")) == (APP_USER, True)
    out = run_psql_conninfo(
        conninfo(tls_require, sslmode="require", password=None), "-c", "\\conninfo"
    )
    assert out.returncode == 0, out.stderr
    assert "SSL connection" in out.stdout
    await assert_serving(tls_require)
    async with await raw_tls(tls_require) as raw:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        assert (await raw.simple_query("SELECT 1")).rows == [["1"]]


async def test_require_exempts_the_unix_socket(
    pgmux_factory: PgmuxFactory, certs: CertFiles, workdir: Path
) -> None:
    """Like PostgreSQL's hostssl, the TLS requirement is for TCP; a unix socket cannot
    do TLS (SSLRequest is answered N there)."""
    sockdir = workdir / "sock"
    sockdir.mkdir()
    pgmux = pgmux_factory({**pgmux_client_tls(certs, "require"), "unix_socket_dir": str(sockdir)})
    info = make_conninfo(host=str(sockdir), port=pgmux.port, user=APP_USER,
                         password=APP_PASSWORD, dbname=APP_DB)  # fmt: skip
    assert psycopg_login(info) == (APP_USER, False)
    reader, writer = await asyncio.open_unix_connection(str(sockdir / f".s.PGSQL.{pgmux.port}"))
    async with RawClient(reader, writer) as raw:
        await raw.send(ssl_request())
        assert await raw.read_exactly(1) == b"N"
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)


# -- verify-ca: a client certificate signed by client_tls_ca_file -----------------------


@pytest.fixture
def tls_verify_ca(pgmux_factory: PgmuxFactory, certs: CertFiles) -> PgmuxProcess:
    return pgmux_factory(pgmux_client_tls(certs, "verify-ca", ca=certs.ca_cert))


@pytest.mark.parametrize("client", ["client_app", "client_nobody", "client_md5user"])
def test_verify_ca_accepts_signed_certs(
    tls_verify_ca: PgmuxProcess, certs: CertFiles, client: str
) -> None:
    """verify-ca checks the signature only; the CN need not be the user."""
    pair: CertPair = getattr(certs, client)
    info = conninfo(tls_verify_ca, sslmode="verify-full", host=SERVER_HOSTNAME,
                    cafile=certs.ca_cert, client=pair)  # fmt: skip
    assert psycopg_login(info) == (APP_USER, True)


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        (None, "peer did not return a certificate"),
        ("client_app_badca", "unable to get local issuer certificate"),
        ("client_app_expired", "certificate has expired"),
    ],
    ids=["no-cert", "badca", "expired"],
)
async def test_verify_ca_refuses_in_the_handshake(
    tls_verify_ca: PgmuxProcess, certs: CertFiles, client: str | None, reason: str
) -> None:
    pair: CertPair | None = getattr(certs, client) if client else None
    since = len(tls_verify_ca.log())
    info = conninfo(tls_verify_ca, sslmode="require", client=pair)
    message = psycopg_refused(info)
    assert "SSL" in message or "closed" in message, message
    line = tls_verify_ca.wait_for_log("TLS handshake failed", since=since)
    assert reason in line, line
    # The same with asyncpg, which must not get a session either.
    with pytest.raises((ssl.SSLError, ConnectionError, asyncpg.PostgresError, OSError)):
        conn = await connect_asyncpg(tls_verify_ca, ssl=client_ssl_context(None, pair))
        await conn.close()
    # Others are unaffected.
    await assert_serving(tls_verify_ca, ssl=client_ssl_context(None, certs.client_app))


async def test_verify_ca_refuses_plain(tls_verify_ca: PgmuxProcess) -> None:
    async with await RawClient.open(tls_verify_ca.host, tls_verify_ca.port) as raw:
        fields = await raw_refusal(raw, password=APP_PASSWORD)
    assert fields["C"] == "28000"
    assert "client_tls_sslmode = verify-ca" in fields["M"]


# -- verify-full: and its CN is the user --------------------------------------------------


@pytest.fixture
def tls_verify_full(pgmux_factory: PgmuxFactory, certs: CertFiles) -> PgmuxProcess:
    return pgmux_factory(pgmux_client_tls(certs, "verify-full", ca=certs.ca_cert))


@pytest.mark.parametrize(
    ("user", "password", "client"),
    [(APP_USER, APP_PASSWORD, "client_app"), (MD5_USER, MD5_PASSWORD, "client_md5user")],
)
def test_verify_full_cn_is_the_user(
    tls_verify_full: PgmuxProcess, certs: CertFiles, user: str, password: str, client: str
) -> None:
    info = conninfo(tls_verify_full, user=user, password=password, client=getattr(certs, client))
    assert psycopg_login(info) == (user, True)


async def test_verify_full_cn_mismatch(tls_verify_full: PgmuxProcess, certs: CertFiles) -> None:
    info = conninfo(tls_verify_full, user=MD5_USER, password=MD5_PASSWORD, client=certs.client_app)
    assert "does not match" in psycopg_refused(info)
    ctx = client_ssl_context(None, certs.client_app)
    async with await raw_tls(tls_verify_full, ctx) as raw:
        fields = await raw_refusal(raw, MD5_USER, MD5_PASSWORD)
    assert fields["C"] == "28000"
    assert fields["M"] == (
        'certificate common name "app" does not match user "md5user" '
        "(client_tls_sslmode = verify-full)"
    )
    await assert_serving(tls_verify_full, ssl=ctx)


# -- auth_type = cert ----------------------------------------------------------------------


@pytest.fixture(params=["verify-ca", "prefer"])
def cert_auth(
    request: pytest.FixtureRequest, pgmux_factory: PgmuxFactory, certs: CertFiles
) -> PgmuxProcess:
    """auth_type = cert; client certificates required (verify-ca) or only asked for (prefer)."""
    mode: str = request.param
    return pgmux_factory({"auth_type": "cert", **pgmux_client_tls(certs, mode, ca=certs.ca_cert)})


async def test_cert_auth_logs_in_without_password(
    cert_auth: PgmuxProcess, certs: CertFiles
) -> None:
    info = conninfo(cert_auth, password=None, client=certs.client_app)
    assert psycopg_login(info) == (APP_USER, True)
    info = conninfo(cert_auth, user=MD5_USER, password=None, client=certs.client_md5user)
    assert psycopg_login(info) == (MD5_USER, True)
    # Nothing is asked: the first answer to the startup packet is AuthenticationOk.
    async with await raw_tls(cert_auth, client_ssl_context(None, certs.client_app)) as raw:
        await raw.send(startup_packet({"user": APP_USER, "database": APP_DB}))
        typ, body = await raw.read_message()
        assert (typ, int.from_bytes(body[:4], "big")) == (b"R", AUTH_OK)
        await raw.read_until(b"Z")
        assert (await raw.simple_query("SELECT current_user")).rows == [[APP_USER]]


async def test_cert_auth_wrong_user(cert_auth: PgmuxProcess, certs: CertFiles) -> None:
    info = conninfo(cert_auth, user=MD5_USER, password=None, client=certs.client_app)
    assert "certificate authentication failed" in psycopg_refused(info)
    async with await raw_tls(cert_auth, client_ssl_context(None, certs.client_app)) as raw:
        fields = await raw_refusal(raw, MD5_USER)
    assert fields["C"] == "28000"
    assert 'certificate authentication failed for user "md5user"' in fields["M"]


async def test_cert_auth_without_certificate(pgmux_factory: PgmuxFactory, certs: CertFiles) -> None:
    """With client_tls_sslmode = prefer a certificate is only asked for, so no-cert and
    plain TCP clients get as far as the login, which refuses them."""
    pgmux = pgmux_factory(
        {"auth_type": "cert", **pgmux_client_tls(certs, "prefer", ca=certs.ca_cert)}
    )
    async with await raw_tls(pgmux) as raw:  # TLS, no certificate
        fields = await raw_refusal(raw)
    assert fields["C"] == "28000"
    assert "no verified client certificate" in fields["M"]
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:  # plain TCP
        fields = await raw_refusal(raw)
    assert fields["C"] == "28000"
    assert "certificate authentication failed" in fields["M"]
    assert "certificate authentication failed" in psycopg_refused(
        conninfo(pgmux, sslmode="disable", password=None)
    )
    assert "certificate authentication failed" in psycopg_refused(
        conninfo(pgmux, sslmode="require", password=None)
    )
    await assert_serving(pgmux, password="", ssl=client_ssl_context(None, certs.client_app))


async def test_cert_auth_verify_ca_no_cert_plain(
    pgmux_factory: PgmuxFactory, certs: CertFiles
) -> None:
    pgmux = pgmux_factory(
        {"auth_type": "cert", **pgmux_client_tls(certs, "verify-ca", ca=certs.ca_cert)}
    )
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        fields = await raw_refusal(raw)
    assert fields["C"] == "28000"
    assert "TLS" in fields["M"]
    message = psycopg_refused(conninfo(pgmux, sslmode="require", password=None))
    assert "SSL" in message or "closed" in message, message


TLS_HBA = (
    "hostssl all md5user 127.0.0.1/32 cert\n"
    "hostssl all app 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n"
    "hostnossl all all 127.0.0.1/32 reject\n"
)


async def test_hba_hostssl_rules_over_tls(
    pgmux_factory: PgmuxFactory, certs: CertFiles, workdir: Path
) -> None:
    """auth_type = hba with real TLS connections: hostssl, hostnossl, cert, clientcert."""
    hba = workdir / "hba.conf"
    hba.write_text(TLS_HBA)
    pgmux = pgmux_factory(
        {
            "auth_type": "hba",
            "auth_hba_file": str(hba),
            **pgmux_client_tls(certs, "prefer", ca=certs.ca_cert),
        }
    )
    # scram + clientcert=verify-full: password and a certificate for the user.
    assert psycopg_login(conninfo(pgmux, client=certs.client_app)) == (APP_USER, True)
    info = conninfo(pgmux, user=MD5_USER, password=None, client=certs.client_md5user)
    assert psycopg_login(info) == (MD5_USER, True)  # cert: no password
    cases = [
        (client_ssl_context(None), APP_USER, "no verified client certificate"),
        (client_ssl_context(None, certs.client_md5user), APP_USER, 'certificate is for "md5user"'),
        (client_ssl_context(None, certs.client_app), MD5_USER, 'certificate is for "app"'),
    ]
    for ctx, user, message in cases:
        async with await raw_tls(pgmux, ctx) as raw:
            fields = await raw_refusal(raw, user, APP_PASSWORD)
        assert fields["C"] == "28000", fields
        assert message in fields["M"], fields
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        fields = await raw_refusal(raw, APP_USER, APP_PASSWORD)
    assert fields["C"] == "28000"
    assert fields["M"] == (
        'pg_hba.conf rejects connection for host "127.0.0.1", user "app", database "app", '
        "no encryption"
    )


# -- SCRAM-SHA-256-PLUS --------------------------------------------------------------------


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_channel_binding_require_libpq(
    tls_prefer: PgmuxProcess, certs: CertFiles, sslmode: str
) -> None:
    """libpq's channel_binding=require succeeds only if SCRAM-SHA-256-PLUS was offered,
    and the client verified pgmux's tls-server-end-point in the server's final message."""
    cafile = certs.ca_cert if sslmode == "verify-full" else None
    info = conninfo(tls_prefer, sslmode=sslmode, host=SERVER_HOSTNAME, cafile=cafile,
                    channel_binding="require")  # fmt: skip
    assert psycopg_login(info) == (APP_USER, True)
    out = run_psql_conninfo(
        conninfo(tls_prefer, sslmode=sslmode, host=SERVER_HOSTNAME, cafile=cafile,
                 password=None, channel_binding="require"),
        "-c", "SELECT current_user",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == APP_USER


def test_channel_binding_require_without_tls_fails(tls_prefer: PgmuxProcess) -> None:
    message = psycopg_refused(conninfo(tls_prefer, sslmode="disable", channel_binding="require"))
    assert "channel binding" in message, message


async def test_plus_offered_on_tls_only(tls_prefer: PgmuxProcess) -> None:
    async with await RawClient.open(tls_prefer.host, tls_prefer.port) as raw:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        assert raw.sasl_mechanisms == [SCRAM_SHA_256]
    async with await raw_tls(tls_prefer) as raw:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)  # plain SCRAM is still fine on TLS
        assert raw.sasl_mechanisms == [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
    async with await raw_tls(tls_prefer) as raw:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, channel_binding=True)
        assert raw.mechanism == SCRAM_SHA_256_PLUS
        assert (await raw.simple_query("SELECT current_user")).rows == [[APP_USER]]


async def test_plus_with_wrong_binding_data_fails(tls_prefer: PgmuxProcess) -> None:
    """A man in the middle terminating TLS hashes its own certificate: refused, and said
    so as PostgreSQL does (08P01 "SCRAM channel binding check failed"), not disguised
    as a wrong password."""
    async with await raw_tls(tls_prefer) as raw:
        with pytest.raises(ServerError) as caught:
            await raw.login(APP_USER, APP_PASSWORD, APP_DB, channel_binding=b"\x00" * 32)
    fields = caught.value.fields
    assert fields["C"] in ("08P01", "28P01"), fields  # refused, whatever else
    await assert_serving(tls_prefer)
    assert (fields["C"], "channel binding" in fields["M"]) == ("08P01", True), fields


async def test_plus_refusals_look_like_wrong_passwords(tls_prefer: PgmuxProcess) -> None:
    for user, password in ((APP_USER, "wrong"), ("nobody", APP_PASSWORD)):
        async with await raw_tls(tls_prefer) as raw:
            with pytest.raises(ServerError) as caught:
                await raw.login(user, password, APP_DB, channel_binding=True)
        assert caught.value.sqlstate == "28P01"
        assert caught.value.fields["M"] == f'password authentication failed for user "{user}"'


async def test_scram_downgrade_detected(tls_prefer: PgmuxProcess) -> None:
    """gs2 flag "y" says "I can bind, but you did not offer -PLUS": over TLS, where pgmux
    did offer it, someone stripped it (RFC 5802 section 6), so the login is refused."""
    # On a plain connection -PLUS is not offered, and "y" is the honest answer.
    async with await RawClient.open(tls_prefer.host, tls_prefer.port) as raw:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, gs2_flag="y")
    async with await raw_tls(tls_prefer) as raw:
        with pytest.raises(ServerError) as caught:
            await raw.login(APP_USER, APP_PASSWORD, APP_DB, gs2_flag="y")
    fields = caught.value.fields
    assert fields["C"] in ("08P01", "28P01"), fields  # refused, whatever else
    # PostgreSQL: 08P01 "SCRAM channel binding negotiation error".
    assert (fields["C"], "channel binding" in fields["M"]) == ("08P01", True), fields


async def test_asyncpg_scram_over_tls(tls_prefer: PgmuxProcess, certs: CertFiles) -> None:
    await assert_serving(tls_prefer, ssl=client_ssl_context(certs.ca_cert, check_hostname=False))


async def test_plus_with_scram_secret_passthrough(
    pgmux_factory: PgmuxFactory, certs: CertFiles, pg: PgCluster
) -> None:
    """pgmux holding only passthru's SCRAM secret logs in to PostgreSQL with the ClientKey
    recovered from the client's SCRAM-SHA-256-PLUS proof (binding data and all)."""
    secret = pg.psql(
        f"SELECT rolpassword FROM pg_authid WHERE rolname = '{PASSTHRU_USER}'", dbname="postgres"
    )
    assert secret.startswith("SCRAM-SHA-256$")
    pgmux = pgmux_factory(
        {**pgmux_client_tls(certs, "require"), "users": {PASSTHRU_USER: {"password": secret}}}
    )
    async with await raw_tls(pgmux) as raw:
        await raw.login(PASSTHRU_USER, PASSTHRU_PASSWORD, APP_DB, channel_binding=True)
        assert raw.mechanism == SCRAM_SHA_256_PLUS
        assert (await raw.simple_query("SELECT current_user")).rows == [[PASSTHRU_USER]]
    info = conninfo(pgmux, user=PASSTHRU_USER, password=PASSTHRU_PASSWORD,
                    channel_binding="require")  # fmt: skip
    assert psycopg_login(info) == (PASSTHRU_USER, True)


# -- direct TLS (PostgreSQL 17) -------------------------------------------------------------


@pytest.mark.parametrize("plus", [False, True])
async def test_direct_tls_raw(tls_prefer: PgmuxProcess, certs: CertFiles, plus: bool) -> None:
    ctx = direct_tls_context(certs.ca_cert)
    async with await RawClient.open(
        tls_prefer.host, tls_prefer.port, ssl_context=ctx, server_hostname=SERVER_HOSTNAME
    ) as raw:
        assert raw.ssl_object is not None
        assert raw.ssl_object.selected_alpn_protocol() == ALPN_POSTGRESQL
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, channel_binding=plus)
        assert raw.mechanism == (SCRAM_SHA_256_PLUS if plus else SCRAM_SHA_256)
        result = await raw.simple_query("SELECT 1")
        assert (result.rows, result.tags, result.status) == ([["1"]], ["SELECT 1"], "I")


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "ssl-request"])
async def test_startup_in_the_same_flight_as_finished(
    tls_prefer: PgmuxProcess, direct: bool
) -> None:
    """TLS 1.3 lets a client send its StartupMessage in the same TCP segment as its
    Finished: pgmux must not lose the application data that completed the handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = direct_tls_context().wrap_bio(incoming, outgoing, server_hostname=SERVER_HOSTNAME)
    reader, writer = await asyncio.open_connection(tls_prefer.host, tls_prefer.port)
    try:
        if not direct:
            writer.write(ssl_request())
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"S"
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "pgmux closed during the handshake"
                incoming.write(data)
        obj.write(startup_packet({"user": APP_USER, "database": APP_DB}))
        writer.write(outgoing.read())  # Finished and the StartupMessage, one write
        plain = b""
        while len(plain) < 5:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "pgmux closed instead of answering the startup packet"
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                plain += obj.read(65536)
        assert plain[:1] == b"R", plain  # AuthenticationSASL: the startup packet was read
    finally:
        writer.transport.abort()


@pytest.mark.skipif(LIBPQ_VERSION < 170000, reason="libpq < 17 has no sslnegotiation=direct")
@pytest.mark.parametrize("mode", ["prefer", "require"])
def test_direct_tls_libpq(pgmux_factory: PgmuxFactory, certs: CertFiles, mode: str) -> None:
    pgmux = pgmux_factory(pgmux_client_tls(certs, mode))
    info = conninfo(pgmux, sslmode="verify-full", host=SERVER_HOSTNAME, cafile=certs.ca_cert,
                    sslnegotiation="direct", channel_binding="require")  # fmt: skip
    assert psycopg_login(info) == (APP_USER, True)


async def test_direct_tls_asyncpg(tls_prefer: PgmuxProcess, certs: CertFiles) -> None:
    # asyncpg sets ALPN on the contexts it makes itself (ssl="require"); a context given
    # to it is used as it is, so it needs ALPN "postgresql" set by the caller.
    for ssl_arg in ("require", direct_tls_context(certs.ca_cert)):
        conn = await connect_asyncpg(tls_prefer, ssl=ssl_arg, direct_tls=True)
        try:
            assert await conn.fetchval("SELECT current_user") == APP_USER
            obj = asyncpg_ssl_object(conn)
            assert obj is not None and obj.selected_alpn_protocol() == ALPN_POSTGRESQL
        finally:
            await conn.close()


@pytest.mark.parametrize("alpn", [[], ["http/1.1"]], ids=["no-alpn", "http"])
async def test_direct_tls_without_alpn_refused(tls_prefer: PgmuxProcess, alpn: list[str]) -> None:
    ctx = direct_tls_context(alpn=alpn)
    since = len(tls_prefer.log())
    try:
        raw = await RawClient.open(
            tls_prefer.host, tls_prefer.port, ssl_context=ctx, server_hostname=SERVER_HOSTNAME
        )
    except (ssl.SSLError, ConnectionError):
        pass  # refused in the handshake: as good
    else:
        async with raw:
            await raw.send(startup_packet({"user": APP_USER, "database": APP_DB}))
            reply = await read_reply_or_eof(raw)
            if reply is not None:
                typ, body = reply
                assert typ == b"E", reply
                fields = parse_fields(body)
                assert fields["C"] == "08P01"
                assert "ALPN" in fields["M"]
            assert await wait_closed(raw) == b""
    tls_prefer.wait_for_log("ALPN", since=since)
    await assert_serving(tls_prefer)


async def test_direct_tls_with_client_tls_disabled(pgmux: PgmuxProcess) -> None:
    since = len(pgmux.log())
    with pytest.raises((ssl.SSLError, ConnectionError)):
        raw = await RawClient.open(
            pgmux.host, pgmux.port, ssl_context=direct_tls_context(),
            server_hostname=SERVER_HOSTNAME,
        )  # fmt: skip
        async with raw:
            await raw.login(APP_USER, APP_PASSWORD, APP_DB)
    pgmux.wait_for_log("direct TLS connection refused", since=since)
    await assert_serving(pgmux, ssl=False)


# -- SSLRequest misuse, stalled and broken handshakes ------------------------------------------


async def test_ssl_request_with_unencrypted_data_refused(tls_prefer: PgmuxProcess) -> None:
    """CVE-2021-23214: bytes after SSLRequest in the same packet were not encrypted."""
    async with await RawClient.open(tls_prefer.host, tls_prefer.port) as raw:
        await raw.send(ssl_request() + startup_packet({"user": APP_USER, "database": APP_DB}))
        typ, body = await raw.read_message()
        assert typ == b"E"
        fields = parse_fields(body)
        assert fields["C"] == "08P01"
        assert "unencrypted" in fields["M"]
        assert await wait_closed(raw) == b""
    await assert_serving(tls_prefer)


async def test_ssl_request_inside_tls_refused(tls_prefer: PgmuxProcess) -> None:
    async with await raw_tls(tls_prefer) as raw:
        await raw.send(ssl_request())
        typ, body = await raw.read_message()
        assert typ == b"E"
        assert parse_fields(body)["C"] == "08P01"
    await assert_serving(tls_prefer)


@pytest.mark.parametrize("how", ["silent-after-S", "half-hello-after-S", "half-hello-direct"])
async def test_stalled_handshake_times_out(
    pgmux_factory: PgmuxFactory, certs: CertFiles, how: str
) -> None:
    pgmux = pgmux_factory({**pgmux_client_tls(certs, "prefer"), "client_login_timeout": 1})
    hello = client_hello()
    since = len(pgmux.log())
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        started = time.monotonic()
        if how == "half-hello-direct":
            await raw.send(hello[: len(hello) // 2])
        else:
            await raw.send(ssl_request())
            assert await raw.read_exactly(1) == b"S"
            if how == "half-hello-after-S":
                await raw.send(hello[: len(hello) // 2])
        # Others are served while this one stalls.
        await assert_serving(pgmux)
        assert psycopg_login(conninfo(pgmux)) == (APP_USER, True)
        await wait_closed(raw, timeout=5)
        took = time.monotonic() - started
    assert 0.8 <= took < 4, took
    pgmux.wait_for_log("client_login_timeout", since=since)
    await assert_serving(pgmux)


@pytest.mark.parametrize("how", ["after-S", "direct"])
async def test_garbage_handshake_closed_quickly(
    pgmux_factory: PgmuxFactory, certs: CertFiles, how: str
) -> None:
    pgmux = pgmux_factory(pgmux_client_tls(certs, "prefer"))  # client_login_timeout 60
    since = len(pgmux.log())
    async with await RawClient.open(pgmux.host, pgmux.port) as raw:
        started = time.monotonic()
        if how == "after-S":
            await raw.send(ssl_request())
            assert await raw.read_exactly(1) == b"S"
            await raw.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * 4)
        else:  # a TLS handshake record header, then nonsense
            await raw.send(b"\x16\x03\x01\x00\x40" + b"\xee" * 0x40)
        await wait_closed(raw, timeout=5)
        assert time.monotonic() - started < 2
    pgmux.wait_for_log("TLS handshake failed", since=since)
    await assert_serving(pgmux)


async def test_client_aborts_mid_handshake(tls_prefer: PgmuxProcess) -> None:
    """A client that disappears (RST) mid-handshake leaves nothing behind."""
    for _ in range(20):
        raw = await RawClient.open(tls_prefer.host, tls_prefer.port)
        await raw.send(ssl_request())
        assert await raw.read_exactly(1) == b"S"
        await raw.send(client_hello())
        raw.abort()
        await raw.close()
    await assert_serving(tls_prefer)
    assert tls_prefer.running


async def test_direct_tls_hello_in_pieces(tls_prefer: PgmuxProcess) -> None:
    """A direct-TLS ClientHello split across TCP segments (the first one a single byte)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = direct_tls_context().wrap_bio(incoming, outgoing, server_hostname=SERVER_HOSTNAME)
    reader, writer = await asyncio.open_connection(tls_prefer.host, tls_prefer.port)
    try:
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = outgoing.read()
        for piece in (hello[:1], hello[1:5], hello[5:40], hello[40:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "pgmux closed during the handshake"
            incoming.write(data)
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
        writer.write(outgoing.read())
        assert obj.selected_alpn_protocol() == ALPN_POSTGRESQL
        obj.write(startup_packet({"user": APP_USER, "database": APP_DB}))
        writer.write(outgoing.read())
        plain = b""
        while len(plain) < 5:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "pgmux closed instead of answering the startup packet"
            incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                plain += obj.read(65536)
        assert plain[:1] == b"R", plain
    finally:
        writer.transport.abort()


async def test_gssenc_then_ssl_request(tls_prefer: PgmuxProcess) -> None:
    """libpq with gssencmode=prefer asks for GSSAPI first; N, then SSLRequest, then TLS."""
    async with await RawClient.open(tls_prefer.host, tls_prefer.port) as raw:
        await raw.send(gssenc_request())
        assert await raw.read_exactly(1) == b"N"
        assert await raw.request_tls(client_ssl_context(None), SERVER_HOSTNAME) == b"S"
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, channel_binding=True)
        assert (await raw.simple_query("SELECT 3")).rows == [["3"]]


@pytest.mark.parametrize("how", ["close_notify", "reset"])
async def test_tls_client_leaves_mid_query(
    pgmux_factory: PgmuxFactory, certs: CertFiles, su: Su, how: str
) -> None:
    """A TLS client that goes away (TLS close_notify, or RST) in the middle of a query:
    the query is cancelled and the one server connection serves the next client."""
    pgmux = pgmux_factory({**pgmux_client_tls(certs, "require"), "default_pool_size": 1})
    raw = await raw_tls(pgmux)
    await raw.login(APP_USER, APP_PASSWORD, APP_DB)
    await raw.send(query("SELECT pg_sleep(30)"))
    await wait_until(lambda: _app_state(su, "active"), 5, what="pg_sleep running")
    if how == "reset":
        raw.abort()
    else:
        # asyncio sends close_notify and keeps TCP open until the peer answers with its
        # own close_notify (or for 30 s): the TLS close alone must be enough for pgmux.
        raw.writer.close()
    try:
        await wait_until(lambda: _app_state(su, "idle"), 5, what="server backend idle again")
    finally:
        raw.abort()
    conn = await connect_asyncpg(pgmux, ssl=client_ssl_context(None))
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 5) == 1
    finally:
        await conn.close()


async def _app_state(su: Su, state: str) -> bool:
    cur = await su.execute(
        "SELECT state FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'",
        [APP_USER],
    )
    return [row[0] for row in await cur.fetchall()] == [state]


# -- bulk data over TLS --------------------------------------------------------------------


@pytest.fixture
def tls_copy_table(pg: PgCluster) -> str:
    pg.psql(
        "DROP TABLE IF EXISTS tls_copy_t; CREATE UNLOGGED TABLE tls_copy_t (id int, payload text);"
        f" ALTER TABLE tls_copy_t OWNER TO {APP_USER}"
    )
    return "tls_copy_t"


async def test_copy_out_and_in_20mb_over_tls(
    tls_require: PgmuxProcess, tls_copy_table: str, pg: PgCluster
) -> None:
    rows = 21_000
    sql_rows = f"SELECT i, repeat(md5(i::text), 32) FROM generate_series(1, {rows}) i"
    async with await psycopg.AsyncConnection.connect(
        conninfo(tls_require), autocommit=True, prepare_threshold=None
    ) as conn:
        assert conn.pgconn.ssl_in_use
        received = bytearray()
        async with conn.cursor() as cur:
            async with cur.copy(f"COPY ({sql_rows}) TO STDOUT") as copy:
                async for block in copy:
                    received += block
            assert cur.rowcount == rows
            expected_size = sum(len(str(i)) + 1 + 1024 + 1 for i in range(1, rows + 1))
            assert len(received) == expected_size > 20 * MB
            await cur.execute(
                f"SELECT md5(string_agg(i || E'\\t' || p || E'\\n', '' ORDER BY i))"
                f" FROM ({sql_rows}) s(i, p)"
            )
            row = await cur.fetchone()
            assert row is not None and row[0] == hashlib.md5(received).hexdigest()

            # And back in, 1 MB at a time.
            async with cur.copy(f"COPY {tls_copy_table} (id, payload) FROM STDIN") as copy:
                for start in range(0, len(received), MB):
                    await copy.write(received[start : start + MB])
            assert cur.rowcount == rows
    got = pg.psql(
        f"SELECT count(*), sum(length(payload)), count(DISTINCT id) FROM {tls_copy_table}"
    )
    assert got == f"{rows}|{rows * 1024}|{rows}"
    pg.psql(f"DROP TABLE {tls_copy_table}")


async def test_large_result_over_tls_asyncpg(tls_require: PgmuxProcess) -> None:
    conn = await connect_asyncpg(tls_require, ssl=client_ssl_context(None))
    try:
        assert asyncpg_ssl_object(conn) is not None
        rows = await conn.fetch(
            "SELECT i, repeat(md5(i::text), 32) AS p FROM generate_series(1, 20000) i"
        )
        assert len(rows) == 20_000
        assert sum(len(r["p"]) for r in rows) == 20_000 * 1024
        assert all(r["p"] == hashlib.md5(str(r["i"]).encode()).hexdigest() * 32 for r in rows)
        # A large parameter the other way.
        big = "z" * (8 * MB)
        assert await conn.fetchval("SELECT length($1::text)", big) == len(big)
    finally:
        await conn.close()


async def test_concurrent_bulk_over_tls(tls_require: PgmuxProcess) -> None:
    """Several TLS clients pulling big results through a small pool at once."""

    async def pull(n: int) -> int:
        conn = await connect_asyncpg(tls_require, ssl=client_ssl_context(None))
        try:
            total = 0
            for _ in range(3):
                rows = await conn.fetch(
                    "SELECT repeat('x', 1000) || $1::text AS p FROM generate_series(1, 2000)",
                    str(n),
                )
                total += sum(len(r["p"]) for r in rows)
            return total
        finally:
            await conn.close()

    totals = await asyncio.gather(*(pull(n) for n in range(10)))
    assert totals == [3 * 2000 * (1000 + len(str(n))) for n in range(10)]


async def test_slow_tls_reader_keeps_pgmux_rss_bounded(tls_require: PgmuxProcess) -> None:
    """Backpressure through the TLS layer: a client that stops reading a 100 MB result
    must make pgmux stop reading from PostgreSQL, not buffer the result."""
    async with await raw_tls(tls_require) as raw:
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)
        assert (await raw.simple_query("SELECT 1")).rows == [["1"]]
        baseline = vm_rss_kib(tls_require.pid)
        await raw.send(query("SELECT repeat('x', 10000) FROM generate_series(1, 10000)"))
        peak = baseline
        for _ in range(30):  # 3 s of not reading
            await asyncio.sleep(0.1)
            peak = max(peak, vm_rss_kib(tls_require.pid))
        total = rows = 0
        while True:
            typ, body = await raw.read_message()
            if typ == b"D":
                rows += 1
                total += len(body) - 6
            elif typ == b"Z":
                break
            else:
                assert typ in (b"T", b"C"), (typ, body[:200])
        assert (rows, total) == (10_000, 100_000_000)
    grown_mb = (peak - baseline) / 1024
    assert grown_mb < 40, f"pgmux grew {grown_mb:.0f} MB while the client did not read"


# -- cancel over TLS -----------------------------------------------------------------------


@pytest.mark.parametrize("negotiation", ["postgres", "direct"])
async def test_cancel_over_tls_psycopg(tls_require: PgmuxProcess, negotiation: str) -> None:
    """libpq >= 17 sends its CancelRequest the way it connected: TLS, maybe direct."""
    if negotiation == "direct" and LIBPQ_VERSION < 170000:
        pytest.skip("libpq < 17 has no sslnegotiation=direct")
    extra = {"sslnegotiation": "direct"} if negotiation == "direct" else {}
    since = len(tls_require.log())
    async with await psycopg.AsyncConnection.connect(
        conninfo(tls_require, **extra), autocommit=True, prepare_threshold=None
    ) as conn:
        running = asyncio.create_task(conn.execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await conn.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await running
        assert time.monotonic() - started < 5
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
    tls_require.wait_for_log("forwarding cancel request", since=since)


async def test_cancel_over_tls_asyncpg(tls_require: PgmuxProcess) -> None:
    conn = await connect_asyncpg(tls_require, ssl=client_ssl_context(None))
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        assert await conn.fetchval("SELECT 7") == 7
        assert time.monotonic() - started < 5
    finally:
        await conn.close()
    tls_require.wait_for_log("forwarding cancel request")


# -- TLS versions and --check ---------------------------------------------------------------


async def test_protocols_tls13_only(pgmux_factory: PgmuxFactory, certs: CertFiles) -> None:
    pgmux = pgmux_factory(pgmux_client_tls(certs, "prefer", client_tls_protocols="tlsv1.3"))
    old = client_ssl_context(None)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        async with await raw_tls(pgmux, old) as raw:
            await raw.login(APP_USER, APP_PASSWORD, APP_DB)
    message = psycopg_refused(conninfo(pgmux, ssl_max_protocol_version="TLSv1.2"))
    assert "SSL" in message, message
    async with await raw_tls(pgmux) as raw:
        assert raw.ssl_object is not None and raw.ssl_object.version() == "TLSv1.3"
        await raw.login(APP_USER, APP_PASSWORD, APP_DB)


async def test_protocols_tls12_only(pgmux_factory: PgmuxFactory, certs: CertFiles) -> None:
    pgmux = pgmux_factory(pgmux_client_tls(certs, "prefer", client_tls_protocols="tlsv1.2"))
    async with await raw_tls(pgmux) as raw:
        assert raw.ssl_object is not None and raw.ssl_object.version() == "TLSv1.2"
        await raw.login(APP_USER, APP_PASSWORD, APP_DB, channel_binding=True)
    assert psycopg_login(conninfo(pgmux, channel_binding="require")) == (APP_USER, True)
    message = psycopg_refused(conninfo(pgmux, ssl_min_protocol_version="TLSv1.3"))
    assert "SSL" in message, message


def _check_case(certs: CertFiles, workdir: Path, case: str) -> tuple[dict[str, Any], str]:
    """A config for ``--check`` and the key its error must name."""
    garbage = workdir / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    base = pgmux_client_tls(certs, "require", ca=certs.ca_cert)
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "bad-protocol": ({**base, "client_tls_protocols": "tlsv1.4"}, "client_tls_protocols"),
        "empty-protocols": ({**base, "client_tls_protocols": ","}, "client_tls_protocols"),
        "missing-key": (
            {**base, "client_tls_key_file": str(workdir / "nope.key")}, "client_tls_key_file"
        ),
        "unreadable-cert": ({**base, "client_tls_cert_file": str(garbage)}, "client_tls_cert_file"),
        "key-of-another-cert": (
            {**base, "client_tls_key_file": str(certs.wrong_host_key)}, "client_tls_key_file"
        ),
        "missing-ca": ({**base, "client_tls_ca_file": str(workdir / "nope.crt")},
                       "client_tls_ca_file"),
        "bad-ciphers": ({**base, "client_tls_ciphers": "NO-SUCH-CIPHER"}, "client_tls_ciphers"),
        "require-without-files": ({"client_tls_sslmode": "require"}, "client_tls_key_file"),
        "verify-ca-without-ca": (
            pgmux_client_tls(certs, "verify-ca"), "client_tls_ca_file"
        ),
        "key-without-cert": (
            {"client_tls_sslmode": "prefer", "client_tls_key_file": str(certs.server_key)},
            "client_tls_cert_file",
        ),
        "cert-auth-without-ca": (
            {"auth_type": "cert", **pgmux_client_tls(certs, "prefer")}, "client_tls_ca_file"
        ),
        "server-verify-without-ca": ({"server_tls_sslmode": "verify-full"}, "server_tls_ca_file"),
        "server-missing-ca": (
            {"server_tls_sslmode": "verify-ca", "server_tls_ca_file": str(workdir / "nope.crt")},
            "server_tls_ca_file",
        ),
        "server-bad-protocol": ({"server_tls_protocols": "sslv3"}, "server_tls_protocols"),
    }  # fmt: skip
    return cases[case]


CHECK_CASES = [
    "bad-protocol", "empty-protocols", "missing-key", "unreadable-cert", "key-of-another-cert",
    "missing-ca", "bad-ciphers", "require-without-files", "verify-ca-without-ca",
    "key-without-cert", "cert-auth-without-ca", "server-verify-without-ca", "server-missing-ca",
    "server-bad-protocol",
]  # fmt: skip


@pytest.mark.parametrize("case", CHECK_CASES)
def test_check_refuses_bad_tls_config(
    pg: PgCluster, certs: CertFiles, workdir: Path, case: str
) -> None:
    overrides, key = _check_case(certs, workdir, case)
    config = deep_merge(default_config(pg, 6432), overrides)
    proc = run_check(config, workdir)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "invalid configuration" in proc.stderr
    assert key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_accepts_good_tls_config(pg: PgCluster, certs: CertFiles, workdir: Path) -> None:
    config = deep_merge(
        default_config(pg, 6432),
        {
            **pgmux_client_tls(certs, "verify-full", ca=certs.ca_cert,
                               client_tls_protocols="tlsv1.2,tlsv1.3", client_tls_ciphers="fast"),
            "server_tls_sslmode": "verify-full",
            "server_tls_ca_file": str(certs.ca_cert),
        },
    )  # fmt: skip
    proc = run_check(config, workdir)
    assert proc.returncode == 0, proc.stderr
