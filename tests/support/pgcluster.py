"""A throwaway PostgreSQL cluster for tests and benchmarks.

initdb + pg_ctl into a fresh temporary directory on a free port. When run as root the
server binaries run as the `postgres` OS user (PostgreSQL refuses to run as root), in a
directory that user owns. Roles made here are the fixed cast the tests rely on:

- ``postgres``: superuser, trust over the unix socket only.
- ``app`` / ``secret``: SCRAM-SHA-256, owns database ``app``.
- ``md5user`` / ``md5secret``: stored as an md5 hash, md5 in pg_hba.
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

SUPERUSER = "postgres"
APP_USER, APP_PASSWORD, APP_DB = "app", "secret", "app"
MD5_USER, MD5_PASSWORD = "md5user", "md5secret"


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
    def create(cls, extra_conf: dict[str, str] | None = None) -> PgCluster:
        base = Path(tempfile.mkdtemp(prefix="pgmux-pg-", dir="/tmp"))
        os.chmod(base, 0o700)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(base, pw.pw_uid, pw.pw_gid)
        cluster = cls(find_pg_bindir(), base, free_port(), extra_conf=dict(extra_conf or {}))
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
        conf.update(self.extra_conf)
        with open(self.datadir / "postgresql.conf", "a") as f:
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")
        (self.datadir / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {MD5_USER} 127.0.0.1/32 md5\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )

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

    def restart(self) -> None:
        self.stop()
        self.start()

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

    # -- access ----------------------------------------------------------------------

    def psql(self, sql: str, dbname: str = APP_DB, user: str = SUPERUSER) -> str:
        """Run SQL as the superuser over the unix socket; returns unaligned output."""
        out = self._run([
            find_client_tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", user, "-d", dbname,
            "-c", sql,
        ])  # fmt: skip
        return out.stdout.strip()

    def dsn(self, user: str = APP_USER, password: str = APP_PASSWORD, dbname: str = APP_DB) -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{dbname}"

    def superuser_kwargs(self, dbname: str = APP_DB) -> dict[str, object]:
        """asyncpg/psycopg keyword arguments for a superuser connection over the socket."""
        return {"host": str(self.socket_dir), "port": self.port, "user": SUPERUSER,
                "dbname": dbname}  # fmt: skip


@contextlib.contextmanager
def running_cluster(extra_conf: dict[str, str] | None = None) -> Iterator[PgCluster]:
    cluster = PgCluster.create(extra_conf)
    try:
        yield cluster
    finally:
        cluster.destroy()
