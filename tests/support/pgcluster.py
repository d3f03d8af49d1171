"""A throwaway PostgreSQL cluster for tests and benchmarks.

initdb + pg_ctl into a fresh temporary directory on a free port. When run as root the
server binaries run as the `postgres` OS user (PostgreSQL refuses to run as root), in a
directory that user owns. Roles made here are the fixed cast the tests rely on:

- ``postgres``: superuser, trust over the unix socket only.
- ``app`` / ``secret``: SCRAM-SHA-256, owns database ``app``.
- ``md5user`` / ``md5secret``: stored as an md5 hash, md5 in pg_hba.
- ``passthru`` / ``ptsecret``: SCRAM-SHA-256, owns nothing, may connect to ``app``.
- ``expired`` / ``expsecret``: SCRAM-SHA-256, ``VALID UNTIL '2000-01-01'``: PostgreSQL
  refuses its password.
- ``authuser`` / ``authsecret``: SCRAM-SHA-256, may only EXECUTE ``AUTH_FUNCTION``, a
  SECURITY DEFINER function in database ``app`` (owned by postgres) that returns
  ``(usename, passwd)`` from ``pg_authid`` for one login role, like ``pg_shadow``, with
  ``passwd`` NULL once the role's VALID UNTIL has passed: the auth_query target.

``PgCluster.create(tls=CertFiles)`` turns TLS on (the server certificate, key and CA are
copied into the data directory, owned by the server's OS user, the key mode 0600);
``hba=`` replaces the default pg_hba.conf (``DEFAULT_HBA``). ``PgCluster.standby_of(primary)``
makes a streaming standby of a primary created with ``hba=REPLICATION_HBA``
(pg_basebackup -R), and ``promote()`` turns a standby into a primary.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from .certs import CertFiles

SUPERUSER = "postgres"
APP_USER, APP_PASSWORD, APP_DB = "app", "secret", "app"
MD5_USER, MD5_PASSWORD = "md5user", "md5secret"
PASSTHRU_USER, PASSTHRU_PASSWORD = "passthru", "ptsecret"
EXPIRED_USER, EXPIRED_PASSWORD = "expired", "expsecret"
EXPIRED_VALID_UNTIL = "2000-01-01"
AUTH_USER, AUTH_PASSWORD = "authuser", "authsecret"
AUTH_FUNCTION = "public.pgmux_get_auth"
AUTH_QUERY = f"SELECT usename, passwd FROM {AUTH_FUNCTION}($1)"

DEFAULT_HBA = (
    "local all all trust\n"
    f"host all {MD5_USER} 127.0.0.1/32 md5\n"
    "host all all 127.0.0.1/32 scram-sha-256\n"
)
TLS_ONLY_HBA = (
    "local all all trust\n"
    "hostssl all all 127.0.0.1/32 scram-sha-256\n"
    "hostnossl all all 127.0.0.1/32 reject\n"
)
"""pg_hba.conf of the ``pg_tls`` fixture: over TCP only TLS connections get in, and only
with SCRAM (so ``md5user``, whose password is stored as md5, cannot log in there)."""
REPLICATION_HBA = DEFAULT_HBA + "local replication all trust\n"
"""pg_hba.conf of a primary that ``PgCluster.standby_of`` can copy: the superuser may
stream WAL over the unix socket."""

# Files ``tls=`` copies into the data directory, under these names.
TLS_CERT_FILE, TLS_KEY_FILE, TLS_CA_FILE = "server.crt", "server.key", "ca.crt"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_pg_bindir() -> Path:
    """The newest installed server bindir, or $PGMUX_PG_BIN."""
    env = os.environ.get("PGMUX_PG_BIN")
    if env:
        return Path(env)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise RuntimeError(
        "PostgreSQL server binaries not found: install postgresql (scripts/test does) "
        "or set PGMUX_PG_BIN to the directory holding initdb and pg_ctl"
    )


def find_client_tool(name: str) -> str:
    """psql / pgbench: from PATH, else beside the server binaries."""
    path = shutil.which(name)
    if path:
        return path
    candidate = find_pg_bindir() / name
    if candidate.exists():
        return str(candidate)
    raise RuntimeError(f"{name} not found: install the PostgreSQL client tools")


def _as_postgres_kwargs() -> dict[str, object]:
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@dataclass
class PgCluster:
    """A running PostgreSQL server owned by the test run."""

    bindir: Path
    base: Path
    port: int
    host: str = "127.0.0.1"
    extra_conf: dict[str, str] = field(default_factory=dict)
    tls: CertFiles | None = None
    hba: str | None = None

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base

    @property
    def logfile(self) -> Path:
        return self.base / "postgres.log"

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        extra_conf: dict[str, str] | None = None,
        *,
        tls: CertFiles | None = None,
        hba: str | None = None,
    ) -> PgCluster:
        """initdb, start and make the roles of a new cluster on a free port.

        ``tls``: serve TLS with ``tls.server_cert`` / ``tls.server_key`` and verify client
        certificates against ``tls.ca_cert`` (ssl_ca_file). ``hba``: the whole content of
        pg_hba.conf instead of ``DEFAULT_HBA``. ``extra_conf`` is applied last, so it can
        override the TLS settings.
        """
        base = Path(tempfile.mkdtemp(prefix="pgmux-pg-", dir="/tmp"))
        os.chmod(base, 0o700)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(base, pw.pw_uid, pw.pw_gid)
        cluster = cls(
            find_pg_bindir(), base, free_port(), extra_conf=dict(extra_conf or {}), tls=tls, hba=hba
        )
        try:
            cluster._initdb()
            cluster.start()
            cluster._make_roles()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _run(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(  # type: ignore[call-overload]
            list(args), capture_output=True, text=True, cwd=self.base, **_as_postgres_kwargs()
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed with exit code {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc  # type: ignore[no-any-return]

    def _initdb(self) -> None:
        self._run([
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", SUPERUSER,
            "-E", "UTF8", "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256",
        ])  # fmt: skip
        conf = {
            "port": str(self.port),
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "shared_buffers": "'128MB'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        if self.tls is not None:
            self._install_tls_files(self.tls)
            conf.update({
                "ssl": "on",
                "ssl_cert_file": f"'{TLS_CERT_FILE}'",
                "ssl_key_file": f"'{TLS_KEY_FILE}'",
                "ssl_ca_file": f"'{TLS_CA_FILE}'",
            })  # fmt: skip
        conf.update(self.extra_conf)
        with open(self.datadir / "postgresql.conf", "a") as f:
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")
        (self.datadir / "pg_hba.conf").write_text(DEFAULT_HBA if self.hba is None else self.hba)

    def _install_tls_files(self, tls: CertFiles) -> None:
        """Copy the server's certificate, key and CA into the data directory.

        PostgreSQL refuses a key file it does not own (or root) with group or world
        access, so each copy is owned by the server's OS user, the key mode 0600.
        """
        owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        for source, name, mode in (
            (tls.server_cert, TLS_CERT_FILE, 0o644),
            (tls.server_key, TLS_KEY_FILE, 0o600),
            (tls.ca_cert, TLS_CA_FILE, 0o644),
        ):
            target = self.datadir / name
            target.write_bytes(Path(source).read_bytes())
            os.chmod(target, mode)
            if owner is not None:
                os.chown(target, owner.pw_uid, owner.pw_gid)

    def start(self) -> None:
        self._run([
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
            "-w", "-t", "60", "start",
        ])  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(RuntimeError):
            self._run([
                str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop",
            ])  # fmt: skip

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m MODE``: stop (smart, fast or immediate), start again, and
        return once the server accepts connections."""
        self._run([
            str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
            "-m", mode, "-w", "-t", "60", "restart",
        ])  # fmt: skip

    @classmethod
    def standby_of(cls, primary: PgCluster) -> PgCluster:
        """A streaming standby of ``primary`` (``pg_basebackup -R``, so it follows the
        primary over its unix socket) on a free port, started and accepting read-only
        connections. The primary's pg_hba.conf must allow replication (REPLICATION_HBA)."""
        base = Path(tempfile.mkdtemp(prefix="pgmux-pg-standby-", dir="/tmp"))
        os.chmod(base, 0o700)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(base, pw.pw_uid, pw.pw_gid)
        standby = cls(primary.bindir, base, free_port(), extra_conf=dict(primary.extra_conf),
                      hba=primary.hba)  # fmt: skip
        try:
            standby._run([
                str(primary.bindir / "pg_basebackup"), "-D", str(standby.datadir),
                "-h", str(primary.socket_dir), "-p", str(primary.port), "-U", SUPERUSER,
                "-X", "stream", "-R", "-c", "fast",
            ])  # fmt: skip
            with open(standby.datadir / "postgresql.conf", "a") as f:  # later lines win
                f.write(f"port = {standby.port}\n")
                f.write(f"unix_socket_directories = '{standby.socket_dir}'\n")
            standby.start()
        except BaseException:
            standby.destroy()
            raise
        return standby

    @classmethod
    @contextlib.contextmanager
    def primary_and_standby(cls, setup_sql: str = "") -> Iterator[tuple[PgCluster, PgCluster]]:
        """A primary that allows replication, ``setup_sql`` run on it, and a streaming
        standby of it; both destroyed afterwards."""
        primary = cls.create(hba=REPLICATION_HBA)
        try:
            if setup_sql:
                primary.psql(setup_sql)
            standby = cls.standby_of(primary)
            try:
                yield primary, standby
            finally:
                standby.destroy()
        finally:
            primary.destroy()

    def promote(self) -> None:
        """``pg_ctl promote``: a standby becomes a primary; returns once it is one."""
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-w", "promote"])

    def destroy(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def _make_roles(self) -> None:
        self.psql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'", dbname="postgres")
        self.psql(f"CREATE DATABASE {APP_DB} OWNER {APP_USER}", dbname="postgres")
        self.psql(
            "SET password_encryption = 'md5';"
            f"CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}';",
            dbname="postgres",
        )
        self.psql(f"GRANT ALL ON SCHEMA public TO {MD5_USER};", dbname=APP_DB)
        self.psql(
            f"CREATE ROLE {PASSTHRU_USER} LOGIN PASSWORD '{PASSTHRU_PASSWORD}';"
            f"GRANT CONNECT ON DATABASE {APP_DB} TO {PASSTHRU_USER};"
            f"CREATE ROLE {EXPIRED_USER} LOGIN PASSWORD '{EXPIRED_PASSWORD}'"
            f" VALID UNTIL '{EXPIRED_VALID_UNTIL}';"
            f"CREATE ROLE {AUTH_USER} LOGIN PASSWORD '{AUTH_PASSWORD}';",
            dbname="postgres",
        )
        # The auth_query function, the way PgBouncer's docs do it: SECURITY DEFINER, owned
        # by the superuser, executable by AUTH_USER alone. Login roles only, as pg_shadow.
        self.psql(
            f"CREATE FUNCTION {AUTH_FUNCTION}(username text)"
            " RETURNS TABLE(usename name, passwd text)"
            " LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
            " AS $$"
            " SELECT a.rolname, CASE WHEN a.rolvaliduntil IS NULL OR a.rolvaliduntil >= now()"
            " THEN a.rolpassword END"
            " FROM pg_catalog.pg_authid a WHERE a.rolname = username AND a.rolcanlogin"
            " $$;"
            f"REVOKE ALL ON FUNCTION {AUTH_FUNCTION}(text) FROM PUBLIC;"
            f"GRANT EXECUTE ON FUNCTION {AUTH_FUNCTION}(text) TO {AUTH_USER};",
            dbname=APP_DB,
        )

    # -- access ----------------------------------------------------------------------

    def psql(self, sql: str, dbname: str = APP_DB, user: str = SUPERUSER) -> str:
        """Run SQL as the superuser over the unix socket; returns unaligned output."""
        out = self._run([
            find_client_tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", user, "-d", dbname,
            "-c", sql,
        ])  # fmt: skip
        return out.stdout.strip()

    def dsn(
        self,
        user: str = APP_USER,
        password: str = APP_PASSWORD,
        dbname: str = APP_DB,
        **params: str | int,
    ) -> str:
        """A ``postgresql://`` URL over TCP; extra keyword arguments become the query."""
        url = (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{self.host}:{self.port}/{quote(dbname, safe='')}"
        )
        if params:
            url += "?" + urlencode({key: str(value) for key, value in params.items()})
        return url

    def superuser_kwargs(self, dbname: str = APP_DB) -> dict[str, object]:
        """asyncpg/psycopg keyword arguments for a superuser connection over the socket."""
        return {"host": str(self.socket_dir), "port": self.port, "user": SUPERUSER,
                "dbname": dbname}  # fmt: skip


@contextlib.contextmanager
def running_cluster(
    extra_conf: dict[str, str] | None = None,
    *,
    tls: CertFiles | None = None,
    hba: str | None = None,
) -> Iterator[PgCluster]:
    cluster = PgCluster.create(extra_conf, tls=tls, hba=hba)
    try:
        yield cluster
    finally:
        cluster.destroy()
