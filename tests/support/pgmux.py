"""pgmux as a real subprocess for the tests, and the config helpers that go with it.

- ``default_config(pg, port)``: the baseline config every test starts from.
- ``deep_merge(base, overrides)``: a test's changes on top of it (``None`` deletes a key).
- ``to_toml(data)``: proxy.toml_out's TOML writer, re-exported for the tests.
- ``PgmuxProcess``: ``python -m proxy --config FILE`` started, waited for, signalled, stopped.
  With ``workers`` > 1 that process is a supervisor: ``start`` also waits until every
  worker is ready, ``worker_pids()`` finds them, and ``stop``/``kill`` leave none behind.
- ``run_check(config, workdir)``: ``python -m proxy --config FILE --check``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from proxy.toml_out import to_toml

from .pgcluster import APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER, PgCluster, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "proxy")
START_TIMEOUT = 15.0
LOG_TAIL_LINES = 200

Config = dict[str, Any]


class PgmuxError(RuntimeError):
    """pgmux did not behave as the harness expected (the message carries its log)."""


class PgmuxStartError(PgmuxError):
    """pgmux exited, or never accepted TCP connections, while starting."""


# -- config ----------------------------------------------------------------------------


def default_config(pg: PgCluster, port: int) -> Config:
    """The baseline config: pgmux on 127.0.0.1:``port`` in front of ``pg``'s ``app`` db."""
    metrics_port = free_port()
    while metrics_port == port:
        metrics_port = free_port()
    return {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "pool_mode": "transaction",
        "default_pool_size": 5,
        "max_client_conn": 1000,
        "query_wait_timeout": 10,
        "auth_type": "scram-sha-256",
        "admin_users": ["admin"],
        "metrics": {"listen_addr": "127.0.0.1", "listen_port": metrics_port},
        "databases": {APP_DB: {"host": pg.host, "port": pg.port, "dbname": APP_DB}},
        "users": {
            APP_USER: {"password": APP_PASSWORD},
            MD5_USER: {"password": MD5_PASSWORD},
        },
    }


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> Config:
    """A new dict: ``base`` with ``overrides`` merged in, table by table.

    A mapping merges into a mapping; any other value replaces; ``None`` deletes the key.
    Neither argument is modified. To replace a whole table rather than merge into it,
    delete it first: ``deep_merge(deep_merge(base, {"users": None}), {"users": {...}})``.
    """
    result: Config = {key: copy.deepcopy(value) for key, value in base.items()}
    for key, value in (overrides or {}).items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            current = result.get(key)
            result[key] = deep_merge(current if isinstance(current, Mapping) else {}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


# -- the process -----------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _connect_host(listen_addr: str) -> str:
    """Where to connect to reach a server listening on ``listen_addr``."""
    if listen_addr in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    if listen_addr == "::":
        return "::1"
    return listen_addr


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    kept = text.splitlines()[-lines:]
    skipped = len(text.splitlines()) - len(kept)
    head = f"[... {skipped} earlier lines ...]\n" if skipped else ""
    return head + "\n".join(kept)


def _conninfo_value(value: str) -> str:
    if value and not any(ch.isspace() or ch in "'\\" for ch in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PgmuxProcess:
    """One pgmux subprocess: ``python -m proxy --config WORKDIR/pgmux.toml``.

    Its stdout and stderr go to ``WORKDIR/pgmux.log``. Use ``start()`` to make one.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        config: Config,
        config_path: Path,
        log_path: Path,
    ) -> None:
        self.proc = proc
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        self.host = _connect_host(str(config.get("listen_addr", "127.0.0.1")))
        self.port = int(config["listen_port"])
        self.workers = int(config.get("workers", 1))

    @classmethod
    def start(
        cls,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        command: Sequence[str] | None = None,
        timeout: float = START_TIMEOUT,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        config_file: bool = True,
    ) -> PgmuxProcess:
        """Write the config, spawn pgmux, wait until its listen port accepts TCP.

        ``command`` replaces ``python -m proxy`` (``--config PATH`` is appended); the
        harness's own tests use it to run a stand-in. ``args`` go after it and ``env``
        is added to the environment. With ``config_file=False`` no ``--config`` is given:
        ``config`` then only tells the harness the port, which ``args`` or ``env`` must
        set. Raises ``PgmuxStartError``, with the log, if the process exits or does not
        listen within ``timeout`` seconds.
        """
        config = deep_merge(config, None)  # our own copy
        if "listen_port" not in config:
            raise ValueError("config has no listen_port")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "pgmux.toml"
        config_path.write_text(to_toml(config))
        log_path = workdir / "pgmux.log"
        argv = [*(command or DEFAULT_COMMAND)]
        if config_file:
            argv += ["--config", str(config_path)]
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [*argv, *args],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**_child_env(), **(env or {})},
            )
        pgmux = cls(proc, config, config_path, log_path)
        try:
            pgmux._wait_listening(timeout)
            if pgmux.workers > 1:
                pgmux._wait_workers_ready(timeout)
        except BaseException:
            pgmux.kill()
            raise
        return pgmux

    def _wait_listening(self, timeout: float) -> None:
        # The probe opens and closes a TCP connection without a startup packet.
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise PgmuxStartError(
                    f"pgmux exited with code {code} before listening on "
                    f"{self.host}:{self.port}; {self.log_path}:\n{_tail(self.log())}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=1),
            ):
                return
            if time.monotonic() >= deadline:
                raise PgmuxStartError(
                    f"pgmux did not listen on {self.host}:{self.port} within {timeout:g} s; "
                    f"{self.log_path}:\n{_tail(self.log())}"
                )
            time.sleep(0.05)

    def _wait_workers_ready(self, timeout: float) -> None:
        # The port answers once one worker listens; the supervisor says when all do.
        try:
            self.wait_for_log(f"all {self.workers} workers ready", timeout)
        except (TimeoutError, PgmuxError) as exc:
            raise PgmuxStartError(str(exc)) from None

    # -- inspection --------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def processes(self) -> dict[int, str]:
        """pid -> command line of every live process (zombies aside) started with this
        pgmux's config file: the supervisor and its workers, or the one process. ``ps``
        sees them even after their parent died, which ``/proc/PID/children`` would not."""
        out = subprocess.run(
            ["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True
        ).stdout
        marker = f"--config {self.config_path}"
        found = {}
        for line in out.splitlines():
            parts = line.split(None, 2)
            if len(parts) == 3 and marker in parts[2] and not parts[1].startswith("Z"):
                found[int(parts[0])] = parts[2]
        return found

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of the live workers (from their ``--worker I`` argument)."""
        workers = {}
        for pid, args in self.processes().items():
            match = re.search(r" --worker (\d+) ", args)
            if match:
                workers[int(match.group(1))] = pid
        return workers

    def log(self) -> str:
        """Everything pgmux has written to stdout and stderr so far."""
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log(), lines)

    def wait_for_log(self, substring: str, timeout: float = 5, *, since: int = 0) -> str:
        """Wait until the log holds ``substring``; return the whole line it is on.

        ``since`` is a character offset to search from, e.g. ``len(p.log())`` taken
        before the action whose log line is awaited. Raises ``TimeoutError`` on timeout
        and ``PgmuxError`` if pgmux exits without logging it; both carry the log tail.
        """
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # before reading: no line is missed
            text = self.log()
            found = text.find(substring, since)
            if found >= 0:
                end = text.find("\n", found)
                return text[text.rfind("\n", 0, found) + 1 : end if end >= 0 else len(text)]
            if exited:
                raise PgmuxError(
                    f"pgmux exited with code {self.proc.returncode} without logging "
                    f"{substring!r}; {self.log_path}:\n{_tail(text)}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"pgmux did not log {substring!r} within {timeout:g} s; "
                    f"{self.log_path}:\n{_tail(text)}"
                )
            time.sleep(0.05)

    # -- connecting --------------------------------------------------------------------

    def dsn(
        self,
        user: str = APP_USER,
        password: str = APP_PASSWORD,
        dbname: str = APP_DB,
        **params: str | int,
    ) -> str:
        """A ``postgresql://`` URL for pgmux; extra keyword arguments become the query."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        url = (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{host}:{self.port}/{quote(dbname, safe='')}"
        )
        if params:
            url += "?" + urlencode({key: str(value) for key, value in params.items()})
        return url

    def conninfo(
        self,
        user: str = APP_USER,
        password: str = APP_PASSWORD,
        dbname: str = APP_DB,
        **params: str | int,
    ) -> str:
        """A libpq ``key=value`` string for pgmux; extra keyword arguments are appended."""
        pairs: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "user": user,
            "password": password,
            "dbname": dbname,
            **params,
        }
        return " ".join(f"{key}={_conninfo_value(str(value))}" for key, value in pairs.items())

    # -- control -----------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Replace the config file atomically (then signal pgmux to reload, if it does)."""
        self.config = deep_merge(config, None)
        tmp = self.config_path.with_suffix(".toml.tmp")
        tmp.write_text(to_toml(self.config))
        os.replace(tmp, self.config_path)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; the exit code. Idempotent.

        With workers, the supervisor waits for them; any still alive after it (it was
        killed, or they hang) are waited for and then killed too."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.workers > 1:
            self._reap_workers(timeout)
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL and reap; the exit code (-9 unless it had already exited). With
        workers, they are killed too (after the supervisor, so none is restarted)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.workers > 1:
            self._reap_workers(0)
        return self.proc.returncode

    def _reap_workers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> PgmuxProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.proc.returncode}"
        return f"<PgmuxProcess pid={self.pid} {self.host}:{self.port} {state}>"


class PgmuxFactory(Protocol):
    """The ``pgmux_factory`` fixture: start one pgmux with overrides on the defaults."""

    def __call__(self, overrides: Mapping[str, Any] | None = None) -> PgmuxProcess: ...


def run_check(
    config: Mapping[str, Any] | str,
    workdir: Path,
    *,
    command: Sequence[str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """``python -m proxy --config PATH --check``; output captured, exit code not checked.

    ``config`` is a dict (written as TOML) or raw text (to test files that don't parse).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "check.toml"
    path.write_text(config if isinstance(config, str) else to_toml(config))
    return subprocess.run(
        [*(command or DEFAULT_COMMAND), "--config", str(path), "--check"],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=timeout,
        check=False,
    )
