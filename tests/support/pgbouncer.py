"""A real PgBouncer (Debian's ``/usr/sbin/pgbouncer``) in front of a ``PgCluster``, to
compare pgmux's admin console with the program it imitates.

``PgBouncerProcess.start(pg, workdir)`` writes ``pgbouncer.ini`` and ``userlist.txt``
into ``workdir`` (a directory of its own, owned by the ``postgres`` OS user when running
as root: PgBouncer refuses to run as root), starts PgBouncer in the foreground on a
free 127.0.0.1 port, and waits until it accepts connections. ``stop()`` (or the context
manager) ends it. The config:

- database ``app`` -> ``pg``'s ``app`` database over TCP, user ``app`` / ``secret``.
- ``admin_users = admin`` (password ``ADMIN_PASSWORD``), ``stats_users = watcher``
  (password ``WATCHER_PASSWORD``), md5 auth with plain passwords in the userlist.
- No unix socket (``unix_socket_dir`` empty); its stderr (the log) goes to
  ``workdir/pgbouncer.log``.

``find_pgbouncer()`` gives the binary, or None when it is not installed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

from .pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster, free_port

PGBOUNCER = "/usr/sbin/pgbouncer"
ADMIN_USER, ADMIN_PASSWORD = "admin", "adminpw"
WATCHER_USER, WATCHER_PASSWORD = "watcher", "watchpw"
START_TIMEOUT = 15.0


def find_pgbouncer() -> str | None:
    """The PgBouncer binary: /usr/sbin/pgbouncer, else one on PATH, else None."""
    if os.access(PGBOUNCER, os.X_OK):
        return PGBOUNCER
    return shutil.which("pgbouncer")


def _as_postgres() -> dict[str, object]:
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def chown_to_postgres(path: Path) -> None:
    """As root, give ``path`` to the postgres OS user, whom PgBouncer runs as."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


class PgBouncerProcess:
    """One PgBouncer subprocess; make it with ``start()``."""

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, port: int) -> None:
        self.proc = proc
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port

    @property
    def log_path(self) -> Path:
        return self.workdir / "pgbouncer.log"

    def log(self) -> str:
        """What it logged (in the foreground PgBouncer logs to stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @classmethod
    def start(
        cls,
        pg: PgCluster,
        workdir: Path,
        settings: Mapping[str, str] | None = None,
        *,
        binary: str | None = None,
        timeout: float = START_TIMEOUT,
    ) -> PgBouncerProcess:
        """Write the config into ``workdir`` and start PgBouncer; ``settings`` are extra
        ``[pgbouncer]`` lines. Raises RuntimeError (with the log) if it does not listen."""
        binary = binary or find_pgbouncer()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o755)
        chown_to_postgres(workdir)
        port = free_port()
        userlist = workdir / "userlist.txt"
        userlist.write_text(
            "".join(
                f"{_quote(user)} {_quote(password)}\n"
                for user, password in (
                    (APP_USER, APP_PASSWORD),
                    (ADMIN_USER, ADMIN_PASSWORD),
                    (WATCHER_USER, WATCHER_PASSWORD),
                )
            )
        )
        lines = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(port),
            "unix_socket_dir": "",
            "auth_type": "md5",
            "auth_file": str(userlist),
            "admin_users": ADMIN_USER,
            "stats_users": WATCHER_USER,
            "pool_mode": "transaction",
            "default_pool_size": "5",
            "pidfile": "",
            "ignore_startup_parameters": "extra_float_digits",
            **(settings or {}),
        }
        ini = workdir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{APP_DB} = host={pg.host} port={pg.port} dbname={APP_DB}"
            f" user={APP_USER} password={APP_PASSWORD}\n"
            "\n[pgbouncer]\n" + "".join(f"{key} = {value}\n" for key, value in lines.items())
        )
        for path in (userlist, ini):
            os.chmod(path, 0o644)
            chown_to_postgres(path)
        return cls.run(ini, port, binary=binary, timeout=timeout)

    @classmethod
    def run(
        cls, ini: Path, port: int, *, binary: str | None = None, timeout: float = START_TIMEOUT
    ) -> PgBouncerProcess:
        """Start PgBouncer on an ini file as it is (as postgres when root, in the ini's
        directory, logging to pgbouncer.log there) and wait until it listens on ``port``.
        Raises RuntimeError (with the log) if it does not."""
        binary = binary or find_pgbouncer()
        if binary is None:
            raise RuntimeError("pgbouncer is not installed (apt-get install pgbouncer)")
        workdir = ini.parent
        with open(workdir / "pgbouncer.log", "wb") as stderr:  # the child keeps its own fd
            proc = subprocess.Popen(  # type: ignore[call-overload]
                [binary, str(ini)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                **_as_postgres(),
            )
        bouncer = cls(proc, workdir, port)
        try:
            bouncer._wait_listening(timeout)
        except BaseException:
            bouncer.stop()
            raise
        return bouncer

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"pgbouncer exited with code {code}:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=1),
            ):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"pgbouncer did not listen within {timeout:g} s:\n{self.log()}")
            time.sleep(0.05)

    def conninfo(self, user: str = ADMIN_USER, password: str = ADMIN_PASSWORD,
                 dbname: str = "pgbouncer") -> str:  # fmt: skip
        """A libpq conninfo for PgBouncer (by default its admin console)."""
        return (
            f"host={self.host} port={self.port} user={user} password={password}"
            f" dbname={dbname} sslmode=disable connect_timeout=10"
        )

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM (SIGKILL after ``timeout`` s); the exit code. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def __enter__(self) -> PgBouncerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def running_pgbouncer(
    pg: PgCluster, workdir: Path, settings: Mapping[str, str] | None = None
) -> Iterator[PgBouncerProcess]:
    """A PgBouncer for the duration of the block."""
    bouncer = PgBouncerProcess.start(pg, workdir, settings)
    try:
        yield bouncer
    finally:
        bouncer.stop()
