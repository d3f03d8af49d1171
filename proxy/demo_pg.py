"""The demo's PostgreSQL side: a throwaway cluster, and a minimal wire-protocol client.

Used only by ``pgmux demo`` (demo.py); nothing else in the package imports it. The
client speaks just enough of the protocol for the demo (startup with trust, simple
Query, Terminate), so the demo needs no driver at runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import codes, messages

SUPERUSER = "postgres"
DEMO_USER = DEMO_DB = "app"
# PostgreSQL's default, set explicitly because the demo's arithmetic depends on it.
SUPERUSER_RESERVED = 3
_HEADER = struct.Struct("!BI")
_MAX_MESSAGE = 1 << 20  # the demo's replies are tiny; anything bigger is not PostgreSQL

INSTALL_HINT = (
    "install PostgreSQL's server package (Debian/Ubuntu: apt-get install postgresql; "
    "Fedora/RHEL: dnf install postgresql-server; macOS: brew install postgresql), or "
    "point --pg-bin (or $PGMUX_PG_BIN) at the directory holding initdb and postgres"
)


class DemoError(Exception):
    """Something the demo needs is missing or broke; the message says what to do."""


class ServerError(Exception):
    """An ErrorResponse from the server (or from pgmux)."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.sqlstate = fields.get(messages.FIELD_SQLSTATE, "?????")
        self.text = fields.get(messages.FIELD_MESSAGE, "")
        super().__init__(f"{self.sqlstate} {self.text}")


# -- finding the binaries -----------------------------------------------------------------


def _is_server_bindir(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in ("initdb", "postgres"))


def find_bindir(explicit: str | None) -> Path:
    """--pg-bin, else $PGMUX_PG_BIN, else ``pg_config --bindir``, else the newest
    /usr/lib/postgresql/*/bin. Raises DemoError saying how to install them."""
    chosen = explicit or os.environ.get("PGMUX_PG_BIN")
    if chosen:
        if _is_server_bindir(Path(chosen)):
            return Path(chosen)
        source = "--pg-bin" if explicit else "$PGMUX_PG_BIN"
        raise DemoError(f"no initdb and postgres in {chosen} ({source}): {INSTALL_HINT}")
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    # Debian/Ubuntu keep each major version's server binaries off PATH.
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(
        (Path(p) for p in versions),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if _is_server_bindir(candidate):
            return candidate
    raise DemoError(
        f"PostgreSQL's server binaries (initdb, postgres) were not found: {INSTALL_HINT}"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the cluster --------------------------------------------------------------------------


def _run_as_server_user() -> dict[str, Any]:
    """Popen arguments that run a child as the OS user owning the cluster.

    PostgreSQL refuses to run as root, so as root the cluster belongs to ``postgres``.
    """
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise DemoError(
            "running as root, the demo runs PostgreSQL as the 'postgres' OS user "
            "(PostgreSQL refuses to run as root), and there is none: install the "
            "postgresql package (it creates that user) or run the demo as another user"
        ) from None
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@dataclass
class Cluster:
    """A PostgreSQL cluster in ``base``: data directory, unix socket and log.

    The postmaster is this process's child, in a session of its own, so a Ctrl-C at
    the terminal reaches the demo alone and the demo stops the server in order.
    """

    bindir: Path
    base: Path
    port: int
    max_connections: int
    name: str  # cluster_name: in every process title, so ps tells the demo's apart
    proc: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def logfile(self) -> Path:
        return self.base / "postgres.log"

    @property
    def socket_path(self) -> str:
        return str(self.base / f".s.PGSQL.{self.port}")

    def initdb(self) -> None:
        """Make the data directory: trust for the superuser over the unix socket only
        (its directory is 0700, so only its owner and root reach it), and for the
        unprivileged demo role over 127.0.0.1."""
        if len(self.socket_path.encode()) > 107:  # sun_path holds 108 bytes
            raise DemoError(
                f"the unix socket path {self.socket_path} is too long: set TMPDIR to a "
                "shorter directory"
            )
        as_owner = _run_as_server_user()
        self.base.mkdir(mode=0o700)
        if as_owner:
            os.chown(self.base, as_owner["user"], as_owner["group"])
        proc = subprocess.run(
            [
                str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", SUPERUSER,
                "-E", "UTF8", "--locale=C", "--no-sync", "--auth-local=trust",
                "--auth-host=reject",
            ],
            capture_output=True, text=True, cwd=self.base, stdin=subprocess.DEVNULL,
            start_new_session=True, check=False, **as_owner,
        )  # fmt: skip
        if proc.returncode != 0:
            raise DemoError(
                f"initdb failed (exit code {proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        conf = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": str(self.max_connections),
            "superuser_reserved_connections": str(SUPERUSER_RESERVED),
            "cluster_name": f"'{self.name}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
        }
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in conf.items())
        (self.datadir / "pg_hba.conf").write_text(
            f"local all {SUPERUSER} trust\nhost {DEMO_DB} {DEMO_USER} 127.0.0.1/32 trust\n"
        )

    def start(self) -> None:
        as_owner = _run_as_server_user()
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.datadir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.base, start_new_session=True, **as_owner,
            )  # fmt: skip
        if as_owner:
            os.chown(self.logfile, as_owner["user"], as_owner["group"])

    async def connect_superuser(self, timeout: float = 60) -> Connection:
        """The superuser's connection over the unix socket, once the server accepts it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise DemoError(f"PostgreSQL did not start; {self.logfile}:\n{self.log_tail()}")
            try:
                return await asyncio.wait_for(
                    Connection.open(SUPERUSER, "postgres", unix_path=self.socket_path), 5
                )
            except (OSError, ServerError, TimeoutError) as exc:
                # 57P03: "the database system is starting up"; no socket yet: OSError.
                if loop.time() > deadline:
                    raise DemoError(f"PostgreSQL did not accept connections: {exc}") from None
            await asyncio.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Immediate shutdown (SIGQUIT), SIGKILL after 10 s. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None


# -- the client ----------------------------------------------------------------------------


class Connection:
    """One protocol 3.0 session: startup (trust), simple Query, Terminate.

    Formats: https://www.postgresql.org/docs/current/protocol-message-formats.html
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._logged_in = False
        self.parameters: dict[str, str] = {}

    @classmethod
    async def open(
        cls,
        user: str,
        database: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
    ) -> Connection:
        """Connect and log in; raises ServerError if the login is refused."""
        if unix_path is not None:
            reader, writer = await asyncio.open_unix_connection(unix_path)
        else:
            reader, writer = await asyncio.open_connection(host, port)
        conn = cls(reader, writer)
        try:
            writer.write(
                messages.startup_message(
                    {"user": user, "database": database, "application_name": "pgmux demo"}
                )
            )
            await conn._read_until_ready()
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _read_message(self) -> tuple[int, bytes]:
        try:
            typ, length = _HEADER.unpack(await self._reader.readexactly(5))
            if not 4 <= length <= _MAX_MESSAGE:
                raise ConnectionError(f"invalid message length {length}")
            return typ, await self._reader.readexactly(length - 4)
        except asyncio.IncompleteReadError:
            raise ConnectionError("server closed the connection") from None

    async def _read_until_ready(self) -> list[list[bytes | None]]:
        """Read up to ReadyForQuery; the DataRows seen, or the first error raised."""
        rows: list[list[bytes | None]] = []
        error: ServerError | None = None
        while True:
            typ, body = await self._read_message()
            if typ == codes.B_READY_FOR_QUERY:
                self._logged_in = True
                if error is not None:
                    raise error
                return rows
            if typ == codes.B_DATA_ROW:
                rows.append(messages.parse_data_row(body))
            elif typ == codes.B_ERROR_RESPONSE:
                error = error or ServerError(messages.parse_fields(body))
                if not self._logged_in:
                    # An error during startup is FATAL: no ReadyForQuery follows.
                    raise error
            elif typ == codes.B_PARAMETER_STATUS:
                name, value = messages.parse_parameter_status(body)
                self.parameters[name] = value
            elif typ == codes.B_AUTHENTICATION:
                code, _ = messages.parse_authentication(body)
                if code != codes.AUTH_OK:
                    raise ConnectionError(f"server asked for authentication (code {code})")

    async def query(self, sql: str) -> list[list[bytes | None]]:
        self._writer.write(messages.query(sql))
        return await self._read_until_ready()

    def close(self) -> None:
        """Terminate, then close once it is sent."""
        self._writer.write(messages.TERMINATE)
        self._writer.close()

    def abort(self) -> None:
        self._writer.transport.abort()


def server_version(conn: Connection) -> str:
    """``15.4`` from the server_version ParameterStatus (without distribution suffixes)."""
    version = conn.parameters.get("server_version", "?")
    match = re.match(r"[0-9.]+", version)
    return match.group(0) if match else version
