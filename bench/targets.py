"""The bench targets: PostgreSQL direct, pgmux and PgBouncer, each started, checked and
stopped by the bench; and the helpers that run client tools against them."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.procstat import proc_tree_cpu_seconds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.pgcluster import (  # noqa: E402
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    PgCluster,
    find_client_tool,
    free_port,
)

if TYPE_CHECKING:
    from support.certs import CertFiles


HOST = "127.0.0.1"


# -- small helpers ---------------------------------------------------------------------


def as_postgres_kwargs() -> dict[str, Any]:
    """Popen keyword arguments to run a child as the ``postgres`` OS user when we are root."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def file_tail(path: Path, lines: int = 20) -> str:
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


# libpq variables of the caller's environment that would change what pgbench measures.
CLIENT_ENV_DROPPED = frozenset((
    "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGHOST", "PGHOSTADDR",
    "PGSSLCERT", "PGSSLKEY", "PGSSLROOTCERT", "PGSSLCRL", "PGSSLCRLDIR", "PGSSLNEGOTIATION",
    "PGSSLMINPROTOCOLVERSION", "PGSSLMAXPROTOCOLVERSION",
))  # fmt: skip


def client_env(sslmode: str = "disable") -> dict[str, str]:
    """Environment for pgbench/psql: password, no GSS negotiation round trip, and no SSL
    either unless ``sslmode`` says so (``require``: TLS without certificate checks)."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV_DROPPED}
    env.update(PGPASSWORD=APP_PASSWORD, PGSSLMODE=sslmode, PGGSSENCMODE="disable",
               PGCONNECT_TIMEOUT="10")  # fmt: skip
    return env


def run_text(args: Sequence[str], timeout: float = 30) -> str:
    """stdout+stderr of a short command, or "" if it cannot run."""
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (proc.stdout + proc.stderr).strip()


def summarize_error(stderr: str, stdout: str = "") -> str:
    """A one-line reason for a failed pgbench/psql run, e.g. 'prepared statement "P_0" ...'."""
    lines = (stderr + "\n" + stdout).splitlines()
    for pattern in (r"(?:ERROR|FATAL|PANIC):\s+(.*)", r"error:\s+(.*)", r"(?i)(.*fail.*)"):
        for line in lines:
            m = re.search(pattern, line)
            if m and m.group(1).strip():
                return m.group(1).strip()
    return tail(stderr or stdout, 1).strip() or "no output"


def short(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# -- targets ---------------------------------------------------------------------------


class TargetError(RuntimeError):
    pass


class Target:
    """Something pgbench connects to. Subclasses start/stop a process in front of PG."""

    name = "?"

    def __init__(self, cluster: PgCluster, out: Path, pool_size: int,
                 certs: CertFiles | None = None,
                 max_client_conn: int = 10000) -> None:  # fmt: skip
        self.cluster = cluster
        self.out = out
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn  # poolers: enough for the idle-clients scenario
        self.certs = certs  # set: accept TLS clients with certs.server_cert / server_key
        self.port = cluster.port
        self.start_error: str | None = None
        self.events: list[str] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def exit_status(self) -> int | None:
        """None while running (or not a process), else the process exit code."""
        return None

    def pid(self) -> int | None:
        return None

    def log_tail(self) -> str:
        return ""

    def cpu_seconds(self) -> float | None:
        pid = self.pid()
        return proc_tree_cpu_seconds(pid) if pid else None

    def info(self) -> dict[str, Any]:
        return {"port": self.port, "start_error": self.start_error, "events": self.events,
                "max_client_conn": self.max_client_conn}  # fmt: skip

    def smoke(self, sslmode: str = "disable") -> None:
        """A real login + query, so a target that only accepts TCP counts as not started.

        With ``sslmode="require"`` the login goes over TLS (libpq refuses a server that
        answers the SSLRequest with "no").
        """
        args = [find_client_tool("psql"), "-X", "-q", "-A", "-t", "-h", HOST,
                "-p", str(self.port), "-U", APP_USER, "-d", APP_DB,
                "-c", "select count(*) from pgbench_branches"]  # fmt: skip
        what = "smoke query" if sslmode == "disable" else f"TLS smoke login (sslmode={sslmode})"
        try:
            proc = subprocess.run(args, capture_output=True, text=True,
                                  env=client_env(sslmode), timeout=30)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise TargetError(f"{what} through {self.name} timed out") from exc
        if proc.returncode != 0:
            raise TargetError(
                f"{what} through {self.name} failed: {summarize_error(proc.stderr, proc.stdout)}"
            )


class DirectTarget(Target):
    name = "direct"


class ProcessTarget(Target):
    """A pooler run in the foreground as our child; ready when its port accepts TCP."""

    start_timeout = 30.0

    def __init__(self, cluster: PgCluster, out: Path, pool_size: int,
                 certs: CertFiles | None = None,
                 max_client_conn: int = 10000) -> None:  # fmt: skip
        super().__init__(cluster, out, pool_size, certs, max_client_conn)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = free_port()

    def command(self) -> tuple[list[str], dict[str, Any]]:
        raise NotImplementedError

    @property
    def stdout_path(self) -> Path:
        return self.out / f"{self.name}.stdout.log"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        args, kwargs = self.command()
        with open(self.stdout_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         **kwargs)  # fmt: skip
        self.events.append(f"started pid {self.proc.pid} on port {self.port}")
        deadline = time.monotonic() + self.start_timeout
        while not port_open(self.port):
            code = self.proc.poll()
            if code is not None:
                last = tail(self.log_tail(), 1).strip()
                raise TargetError(
                    f"{self.name} exited with code {code} during startup"
                    + (f": {last}" if last else "")
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TargetError(f"{self.name} did not listen on port {self.port} "
                                  f"within {self.start_timeout:.0f}s")  # fmt: skip
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.events.append("did not stop on SIGTERM within 10s: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Leftover workers in the process group we created for it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.events.append(f"stopped, exit code {proc.returncode}")

    def exit_status(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def log_tail(self) -> str:
        return file_tail(self.stdout_path)


def pgmux_config_keys() -> set[str]:
    """Top-level keys of pgmux's Config dataclass, asked in a child; empty if unknown.

    The TLS fields (``client_tls`` / ``server_tls``, of type ``TLSConfig``) are flat keys in
    the file: ``client_tls_sslmode``, ``client_tls_key_file``, ... (one per TLSConfig field).
    """
    code = (
        "import dataclasses as d, proxy.config as c\n"
        "tls = getattr(c, 'TLSConfig', None)\n"
        "for f in d.fields(c.Config):\n"
        "    print(f.name)\n"
        "    if tls is not None and f.name in ('client_tls', 'server_tls'):\n"
        "        print(*(f'{f.name}_{g.name}' for g in d.fields(tls)))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(proc.stdout.split()) if proc.returncode == 0 else set()


def toml_str(value: object) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(str(value))


class PgmuxTarget(ProcessTarget):
    name = "pgmux"
    workers = 1  # pgmux's `workers`: processes sharing the port (set by run.py)

    @property
    def config_path(self) -> Path:
        return self.out / "pgmux.toml"

    def command(self) -> tuple[list[str], dict[str, Any]]:
        # Same footing as PgBouncer (no per-connection log lines) and no fixed metrics port,
        # but only with keys this pgmux version knows: unknown keys are config errors.
        known = pgmux_config_keys()
        extra = "".join(f"{key} = false\n" for key in ("log_connections", "log_disconnections")
                        if key in known)  # fmt: skip
        # Server connections stay plain, as PgBouncer's (server_tls_sslmode = disable there
        # too): pgmux's default "prefer" would put TLS under every pooled server connection
        # once the bench cluster has ssl = on, and change the relay comparison.
        if "server_tls_sslmode" in known:
            extra += 'server_tls_sslmode = "disable"\n'
        if self.certs is not None:
            client_keys = ("client_tls_sslmode", "client_tls_key_file", "client_tls_cert_file")
            if all(key in known for key in client_keys):
                # prefer: TLS for clients that ask (connect-tls), plain for the others.
                extra += (
                    'client_tls_sslmode = "prefer"\n'
                    f"client_tls_key_file = {toml_str(self.certs.server_key.resolve())}\n"
                    f"client_tls_cert_file = {toml_str(self.certs.server_cert.resolve())}\n"
                )
            else:
                self.events.append("config has no client_tls_* keys: no TLS for clients")
        if self.workers > 1:
            if "workers" not in known:
                raise RuntimeError("this pgmux has no `workers` setting")
            extra += f"workers = {self.workers}\n"
        if "metrics" in known:
            extra += f'\n[metrics]\nlisten_addr = "{HOST}"\nlisten_port = {free_port()}\n'
        self.config_path.write_text(
            f'listen_addr = "{HOST}"\n'
            f"listen_port = {self.port}\n"
            'pool_mode = "transaction"\n'
            f"default_pool_size = {self.pool_size}\n"
            f"max_client_conn = {self.max_client_conn}\n"
            "query_wait_timeout = 120\n"
            'auth_type = "scram-sha-256"\n'
            'admin_users = ["admin"]\n'
            f"{extra}"
            "\n"
            f"[databases.{APP_DB}]\n"
            f'host = "{HOST}"\n'
            f"port = {self.cluster.port}\n"
            f'dbname = "{APP_DB}"\n'
            f"pool_size = {self.pool_size}\n"
            "\n"
            f"[users.{APP_USER}]\n"
            f'password = "{APP_PASSWORD}"\n'
        )
        args = [sys.executable, "-m", "proxy", "--config", str(self.config_path)]
        return args, {"cwd": str(REPO)}

    def info(self) -> dict[str, Any]:
        return {**super().info(), "config": str(self.config_path), "workers": self.workers}


def pgbouncer_binary() -> str | None:
    env = os.environ.get("PGMUX_PGBOUNCER")
    if env:
        return env
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None


def pgbouncer_version(binary: str) -> tuple[str, tuple[int, ...]]:
    text = run_text([binary, "--version"])
    m = re.search(r"PgBouncer\s+(\d+(?:\.\d+)+)", text)
    if not m:
        return text.splitlines()[0] if text else "unknown", (0,)
    return m.group(1), tuple(int(x) for x in m.group(1).split("."))


class PgbouncerTarget(ProcessTarget):
    """PgBouncer in the foreground (no -d) as the postgres user; files in a /tmp dir it owns.

    auth_file holds either the plaintext password (``auth="plain"``) or the SCRAM secret
    from pg_authid (``auth="scram"``; PgBouncer then logs in to the server by SCRAM
    pass-through, using the keys from the client's own SCRAM exchange).

    With ``certs`` it accepts TLS clients (client_tls_sslmode = prefer) with its own copies
    of the server certificate and key in that dir, owned by postgres, the key mode 0600.
    Server connections are always plain (server_tls_sslmode = disable).
    """

    name = "pgbouncer"

    def __init__(self, cluster: PgCluster, out: Path, pool_size: int, binary: str,
                 auth: str, certs: CertFiles | None = None,
                 max_client_conn: int = 10000) -> None:  # fmt: skip
        super().__init__(cluster, out, pool_size, certs, max_client_conn)
        self.binary = binary
        self.auth = auth
        self.version, self.version_tuple = pgbouncer_version(binary)
        self.dir = Path(tempfile.mkdtemp(prefix="pgmux-bench-pgbouncer-", dir="/tmp"))
        os.chmod(self.dir, 0o700)
        self._chown(self.dir)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    @property
    def ini_path(self) -> Path:
        return self.dir / "pgbouncer.ini"

    @property
    def logfile(self) -> Path:
        return self.dir / "pgbouncer.log"

    def command(self) -> tuple[list[str], dict[str, Any]]:
        if self.auth == "scram":
            secret = self.cluster.psql(
                f"select rolpassword from pg_authid where rolname = '{APP_USER}'",
                dbname="postgres",
            )
        else:
            secret = APP_PASSWORD
        userlist = self.dir / "userlist.txt"
        userlist.write_text(f'"{APP_USER}" "{secret}"\n')
        os.chmod(userlist, 0o600)
        self._chown(userlist)
        extra = ""
        if self.version_tuple >= (1, 21):
            extra += "max_prepared_statements = 200\n"
        if self.certs is not None:
            key_file, cert_file = self.dir / "tls.key", self.dir / "tls.crt"
            for source, target, mode in (
                (self.certs.server_key, key_file, 0o600),
                (self.certs.server_cert, cert_file, 0o644),
            ):
                target.unlink(missing_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(fd, "wb") as f:
                    f.write(source.read_bytes())
                os.chmod(target, mode)
                self._chown(target)
            extra += (
                "client_tls_sslmode = prefer\n"
                f"client_tls_key_file = {key_file}\n"
                f"client_tls_cert_file = {cert_file}\n"
            )  # fmt: skip
        self.ini_path.write_text(
            "[databases]\n"
            f"{APP_DB} = host={HOST} port={self.cluster.port} dbname={APP_DB}\n"
            "\n"
            "[pgbouncer]\n"
            f"listen_addr = {HOST}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {userlist}\n"
            f"logfile = {self.logfile}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {self.max_client_conn}\n"
            "max_db_connections = 0\n"
            "query_wait_timeout = 120\n"
            "ignore_startup_parameters = extra_float_digits\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "stats_period = 60\n"
            "server_tls_sslmode = disable\n"
            f"{extra}"
        )
        self._chown(self.ini_path)
        shutil.copy(self.ini_path, self.out / "pgbouncer.ini")
        return [self.binary, str(self.ini_path)], {"cwd": str(self.dir), **as_postgres_kwargs()}

    def log_tail(self) -> str:
        return tail(file_tail(self.logfile) + "\n" + file_tail(self.stdout_path), 20)

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(OSError):
            shutil.copy(self.logfile, self.out / "pgbouncer.log")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "version": self.version, "binary": self.binary,
                "auth_file": self.auth}  # fmt: skip
