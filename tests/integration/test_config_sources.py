"""Running pgmux without a file, and the order its config sources win in, for real.

``--upstream``/PGMUX_UPSTREAM alone runs a proxy (the sidecar and serverless case);
PGMUX_<KEY> and ``--set`` override the file; ``--check`` prints the effective config
with passwords masked; a reload re-reads every source; workers get the sources without
a password in ps; systemd hears READY, RELOADING and STOPPING (sd_notify).
"""

from __future__ import annotations

import array
import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support.helpers import (
    Su,
    connect_asyncpg,
    counting_backends,
    error_of,
    run_psql,
    wait_until_sync,
)
from support.pgbouncer import ADMIN_PASSWORD, ADMIN_USER
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster, free_port
from support.pgmux import REPO_ROOT, PgmuxProcess, default_config, to_toml

from proxy.config import parse_config

PROXY = (sys.executable, "-m", "proxy")


def upstream_url(pg: PgCluster, password: str = APP_PASSWORD, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"postgres://{APP_USER}:{password}@127.0.0.1:{pg.port}/{APP_DB}" + (
        f"?{query}" if query else ""
    )


@pytest.fixture
def started(workdir: Path) -> Iterator[list[PgmuxProcess]]:
    processes: list[PgmuxProcess] = []
    yield processes
    for pgmux in processes:
        pgmux.stop()


def start_bare(
    started: list[PgmuxProcess],
    workdir: Path,
    *,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> PgmuxProcess:
    """pgmux with no config file: its port (and no metrics) from PGMUX_ variables."""
    port = free_port()
    env = {"PGMUX_LISTEN_PORT": str(port), "PGMUX_METRICS_ENABLED": "false", **(env or {})}
    pgmux = PgmuxProcess.start(
        {"listen_port": port},
        workdir / f"pgmux-{len(started) + 1}",
        args=args,
        env=env,
        config_file=False,
    )
    started.append(pgmux)
    return pgmux


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROXY, *args, "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=30,
        check=False,
    )


# -- --upstream ---------------------------------------------------------------------------


async def test_upstream_alone_runs_a_proxy_with_its_credentials(
    pg: PgCluster, workdir: Path, started: list[PgmuxProcess], su: Su
) -> None:
    pgmux = start_bare(
        started,
        workdir,
        args=("--set", "default_pool_size=2"),
        env={"PGMUX_UPSTREAM": upstream_url(pg)},
    )
    assert run_psql(pgmux, "-c", "SELECT 40 + 2").stdout.strip() == "42"
    error = await error_of(connect_asyncpg(pgmux, password="wrong"))
    assert error.sqlstate == "28P01"
    conns = [await connect_asyncpg(pgmux) for _ in range(8)]
    try:
        async with counting_backends(su) as samples:
            await asyncio.gather(*(c.execute("SELECT pg_sleep(0.2)") for c in conns))
        # --set default_pool_size=2 reached the pool: 8 clients, never more than 2 servers.
        assert max(samples) == 2
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    assert "no password" not in pgmux.log()


def test_upstream_url_without_password_means_trust_and_says_so(
    pg: PgCluster, workdir: Path, started: list[PgmuxProcess]
) -> None:
    # The suite's PostgreSQL wants a password from app, so the login to it fails; what
    # counts here is that pgmux let the client in without one and warned about it.
    pgmux = start_bare(
        started, workdir, args=("--upstream", f"postgres://{APP_USER}@127.0.0.1:{pg.port}/app")
    )
    line = pgmux.wait_for_log("has no password")
    assert 'auth_type = "trust"' in line and "WARNING" in line


def test_a_bad_upstream_url_is_refused_with_the_password_masked() -> None:
    result = check("--upstream", "mysql://app:hunter2@db/app")
    assert result.returncode == 1
    assert "must start with postgres://" in result.stderr
    assert "hunter2" not in result.stderr and "********" in result.stderr
    result = check("--upstream", "postgres://app:pw@db/app?poolsize=3")
    assert result.returncode == 1 and "unknown parameter 'poolsize'" in result.stderr
    result = check()
    assert result.returncode == 1 and "nothing to proxy" in result.stderr


# -- precedence ---------------------------------------------------------------------------


def test_the_sources_win_in_the_documented_order(pg: PgCluster, workdir: Path) -> None:
    path = workdir / "pgmux.toml"
    path.write_text(to_toml({**default_config(pg, free_port()), "default_pool_size": 3}))

    def effective(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        result = check("--config", str(path), *args, env=env)
        assert result.returncode == 0, result.stderr
        return tomllib.loads(result.stdout)

    assert effective()["default_pool_size"] == 3
    env = {"PGMUX_DEFAULT_POOL_SIZE": "4"}
    assert effective(env=env)["default_pool_size"] == 4
    assert effective("--set", "default_pool_size=5", env=env)["default_pool_size"] == 5
    # --upstream adds a database beside the file's, and overrides the same name's.
    shown = effective("--upstream", upstream_url(pg, pool_size="6"))
    assert shown["databases"]["app"]["pool_size"] == 6
    shown = effective("--upstream", f"postgres://other:pw@127.0.0.1:{pg.port}/otherdb")
    assert set(shown["databases"]) == {"app", "otherdb"}
    # Nested keys: [metrics] by variable, per-database by --set.
    shown = effective(
        "--set", "databases.app.pool_size=2", env={"PGMUX_METRICS_LISTEN_PORT": "9999"}
    )
    assert shown["metrics"]["listen_port"] == 9999
    assert shown["databases"]["app"]["pool_size"] == 2


def test_check_prints_the_effective_config_masked_and_loadable(
    pg: PgCluster, workdir: Path
) -> None:
    result = check(
        "--upstream",
        upstream_url(pg, password="s3cr%40t"),
        env={"PGMUX_QUERY_TIMEOUT": "30", "PGMUX_LOG_STATS": "off"},
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "s3cr" not in out and 'password = "********"' in out
    lines = {line.split("=")[0].strip(): line for line in out.splitlines() if "=" in line}
    assert lines["query_timeout"].endswith("# PGMUX_QUERY_TIMEOUT")
    assert lines["log_stats"].split("#")[0].strip() == "log_stats = false"
    assert lines["dbname"].endswith("# --upstream")
    assert "#" not in lines["listen_backlog"]  # a default has no origin
    # The output is a config pgmux accepts (every key, the password masked).
    config = parse_config(tomllib.loads(out), "printed")
    assert config.query_timeout == 30 and config.log_stats is False
    assert config.users[APP_USER].password == "********"
    assert config.databases[APP_DB].port == pg.port


def test_errors_name_the_variable_or_option_that_set_the_value(pg: PgCluster) -> None:
    url = upstream_url(pg)
    result = check("--upstream", url, env={"PGMUX_DEFAULT_POOL_SIZE": "0"})
    assert result.returncode == 1
    assert "default_pool_size: must be at least 1, got 0" in result.stderr
    assert "(set by PGMUX_DEFAULT_POOL_SIZE)" in result.stderr
    result = check("--upstream", url, env={"PGMUX_LOG_STATS": "maybe"})
    assert result.returncode == 1 and "PGMUX_LOG_STATS: log_stats: must be true or false" in (
        result.stderr
    )
    result = check("--upstream", url, "--set", "pool_mode=sessions")
    assert result.returncode == 1 and "(set by --set)" in result.stderr
    result = check("--upstream", url, "--set", "databases.app.poolsize=3")
    assert result.returncode == 1 and "no setting 'poolsize'" in result.stderr
    # An unknown PGMUX_ variable is named, not silently ignored.
    result = check("--upstream", url, env={"PGMUX_DEFAULT_POOLSIZE": "3"})
    assert result.returncode == 0
    assert "ignoring PGMUX_DEFAULT_POOLSIZE" in result.stderr


# -- reload and workers -------------------------------------------------------------------


async def test_reload_rereads_the_file_but_the_environment_still_wins(
    pg: PgCluster, workdir: Path, started: list[PgmuxProcess]
) -> None:
    config = {
        **default_config(pg, free_port()),
        "users": {ADMIN_USER: {"password": ADMIN_PASSWORD}},
    }
    pgmux = PgmuxProcess.start(config, workdir / "pgmux", env={"PGMUX_DEFAULT_POOL_SIZE": "2"})
    started.append(pgmux)
    admin = await asyncpg.connect(
        host=pgmux.host, port=pgmux.port, user=ADMIN_USER, password=ADMIN_PASSWORD,
        database="pgbouncer", statement_cache_size=0,
    )  # fmt: skip
    try:
        pgmux.write_config({**config, "default_pool_size": 7, "query_timeout": 5})
        since = len(pgmux.log())
        pgmux.signal(signal.SIGHUP)
        pgmux.wait_for_log("reloaded", since=since)
        rows = {r["key"]: r["value"] for r in await admin.fetch("SHOW CONFIG")}
        assert rows["default_pool_size"] == "2"  # PGMUX_DEFAULT_POOL_SIZE beats the file
        assert rows["query_timeout"] == "5"  # the file's change arrived
    finally:
        await admin.close()


async def test_workers_get_the_upstream_without_it_showing_in_ps(
    pg: PgCluster, workdir: Path, started: list[PgmuxProcess]
) -> None:
    password = APP_PASSWORD
    port = free_port()
    config = {"listen_port": port, "workers": 2, "metrics": {"enabled": False}}
    pgmux = PgmuxProcess.start(
        config, workdir / "pgmux", env={"PGMUX_UPSTREAM": upstream_url(pg, password)}
    )
    started.append(pgmux)
    workers = pgmux.worker_pids()
    assert len(workers) == 2
    for pid in workers.values():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert password not in cmdline and "--upstream" not in cmdline
    conns = [await connect_asyncpg(pgmux) for _ in range(6)]
    try:
        assert [await c.fetchval("SELECT 1") for c in conns] == [1] * 6
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    since = len(pgmux.log())
    pgmux.signal(signal.SIGHUP)
    for index in (0, 1):
        pgmux.wait_for_log(f"[worker {index}] reloaded", since=since)


# -- systemd ------------------------------------------------------------------------------


class NotifySocket:
    """A stand-in for systemd's $NOTIFY_SOCKET that records who sent what."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[int, str]] = []

    def receive(self) -> None:
        creds = struct.calcsize("3i")
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                return
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:creds])[0]
            self.messages.append((pid, data.decode()))

    def wait_for(self, field: str, timeout: float = 10) -> tuple[int, str]:
        def found() -> tuple[int, str] | None:
            self.receive()
            return next((m for m in self.messages if field in m[1].split("\n")), None)

        return wait_until_sync(found, timeout, what=f"{field} from pgmux")


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_hears_ready_reloading_and_stopping_from_the_main_pid(
    pg: PgCluster,
    workdir: Path,
    started: list[PgmuxProcess],
    workers: int,
    request: pytest.FixtureRequest,
) -> None:
    notify = NotifySocket(workdir / "notify.sock")
    request.addfinalizer(notify.sock.close)
    config = {**default_config(pg, free_port()), "workers": workers}
    pgmux = PgmuxProcess.start(config, workdir / "pgmux", env={"NOTIFY_SOCKET": str(notify.path)})
    started.append(pgmux)
    pid, text = notify.wait_for("READY=1")
    assert pid == pgmux.pid and "STATUS=" in text
    pgmux.signal(signal.SIGHUP)
    pid, text = notify.wait_for("RELOADING=1")
    assert pid == pgmux.pid and "MONOTONIC_USEC=" in text
    assert len([m for m in notify.messages if "READY=1" in m[1]]) >= 1
    pgmux.stop()
    notify.wait_for("STOPPING=1")
    notify.receive()
    # Only the unit's main process speaks: workers never got NOTIFY_SOCKET.
    assert {sender for sender, _ in notify.messages} == {pgmux.pid}
    ready = [m for m in notify.messages if "READY=1" in m[1].split("\n")]
    assert len(ready) == 2  # at start, and after the reload
