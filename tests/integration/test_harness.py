"""Tests of the test harness itself, none of which needs the proxy.

The session's PostgreSQL answers every client the proxy tests use (asyncpg, psycopg 3,
psql; pgbench is there); the TOML writer and ``deep_merge`` round-trip through
``tomllib``; ``PgmuxProcess`` starts, signals, stops and reports on a small stand-in
server that takes the same ``--config`` argument as pgmux.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from support.pgcluster import (
    APP_DB,
    APP_PASSWORD,
    APP_USER,
    MD5_PASSWORD,
    MD5_USER,
    PgCluster,
    find_client_tool,
    free_port,
)
from support.pgmux import (
    PgmuxError,
    PgmuxProcess,
    PgmuxStartError,
    deep_merge,
    default_config,
    run_check,
    to_toml,
)

# -- the cluster -----------------------------------------------------------------------


def test_roles_have_the_expected_password_hashes(pg: PgCluster) -> None:
    out = pg.psql(
        "SELECT rolname || ' ' || split_part(rolpassword, '$', 1) FROM pg_authid"
        f" WHERE rolname IN ('{APP_USER}', '{MD5_USER}') ORDER BY rolname",
        dbname="postgres",
    )
    scram, md5 = out.splitlines()
    assert scram == f"{APP_USER} SCRAM-SHA-256"
    assert md5.startswith(f"{MD5_USER} md5")


async def test_asyncpg_scram_user(pg: PgCluster) -> None:
    conn = await asyncpg.connect(pg.dsn())
    try:
        assert await conn.fetchval("SELECT current_user") == APP_USER
        assert await conn.fetchval("SELECT current_database()") == APP_DB
        assert conn.get_server_version().major >= 15
    finally:
        await conn.close()


async def test_asyncpg_md5_user(pg: PgCluster) -> None:
    conn = await asyncpg.connect(pg.dsn(MD5_USER, MD5_PASSWORD))
    try:
        assert await conn.fetchval("SELECT current_user") == MD5_USER
    finally:
        await conn.close()


async def test_asyncpg_wrong_password_is_refused(pg: PgCluster) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg.dsn(password="wrong"))


async def test_psycopg_async(pg: PgCluster) -> None:
    async with await psycopg.AsyncConnection.connect(pg.dsn()) as conn:
        cur = await conn.execute("SELECT current_user, %s::int + 1", (41,))
        assert await cur.fetchone() == (APP_USER, 42)


def test_psycopg_sync(pg: PgCluster) -> None:
    with psycopg.connect(pg.dsn(MD5_USER, MD5_PASSWORD)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (MD5_USER,)


def test_psql_over_tcp(pg: PgCluster) -> None:
    out = subprocess.run(
        [find_client_tool("psql"), "-X", "-A", "-t", "-h", pg.host, "-p", str(pg.port),
         "-U", APP_USER, "-d", APP_DB, "-c", "SELECT current_user"],
        env={**os.environ, "PGPASSWORD": APP_PASSWORD},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == APP_USER


def test_pgbench_is_found() -> None:
    out = subprocess.run(
        [find_client_tool("pgbench"), "--version"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.startswith("pgbench (PostgreSQL)")


# -- config helpers --------------------------------------------------------------------


def test_default_config_shape(pg: PgCluster) -> None:
    config = default_config(pg, 6432)
    assert config["listen_port"] == 6432
    assert config["metrics"]["listen_port"] not in (6432, pg.port)
    assert config["databases"] == {APP_DB: {"host": pg.host, "port": pg.port, "dbname": APP_DB}}
    assert config["users"] == {
        APP_USER: {"password": APP_PASSWORD},
        MD5_USER: {"password": MD5_PASSWORD},
    }
    assert tomllib.loads(to_toml(config)) == config


def test_to_toml_round_trip() -> None:
    data: dict[str, Any] = {
        "name": 'quote " backslash \\ tab \t newline \n bell \x07 del \x7f é ✓',
        "count": -3,
        "ratio": 0.25,
        "big": 1e100,
        "small": 1e-07,
        "on": True,
        "off": False,
        "empty": "",
        "list": [1, 2, 3],
        "strings": ["a", "b c", ""],
        "nested_list": [[1, 2], ["x"]],
        "no_items": [],
        "databases": {
            "*": {"host": "127.0.0.1", "port": 5432},
            "a.b": {"dbname": "with.dot"},
            "app": {"host": "h", "options": {"deeper": {"x": 1}}},
        },
        "empty_table": {},
        "only_subtables": {"inner": {"k": "v"}},
        "key with space": {"ok": 1},
    }
    assert tomllib.loads(to_toml(data)) == data


def test_to_toml_quotes_keys_and_puts_scalars_first() -> None:
    text = to_toml({"users": {"a.b": {"password": "x"}}, "port": 1, "databases": {"*": {}}})
    assert text.splitlines()[0] == "port = 1"
    assert '[users."a.b"]' in text
    assert '[databases."*"]' in text


def test_to_toml_special_floats() -> None:
    parsed = tomllib.loads(to_toml({"a": math.inf, "b": -math.inf, "c": math.nan}))
    assert parsed["a"] == math.inf
    assert parsed["b"] == -math.inf
    assert math.isnan(parsed["c"])


@pytest.mark.parametrize("bad", [None, object(), {"x": [{"table": "in list"}]}])
def test_to_toml_rejects_unsupported_values(bad: object) -> None:
    with pytest.raises(TypeError):
        to_toml({"key": bad})


def test_deep_merge() -> None:
    base: dict[str, Any] = {
        "a": 1,
        "t": {"x": 1, "y": {"z": 2}, "keep": [1]},
        "gone": {"p": 1},
        "scalar_to_table": 5,
    }
    overrides: dict[str, Any] = {
        "a": 2,
        "t": {"y": {"z": None, "w": 3}, "x": None, "new": "n"},
        "gone": None,
        "missing": None,
        "scalar_to_table": {"k": "v", "drop": None},
        "table_added": {"q": 1},
    }
    merged = deep_merge(base, overrides)
    assert merged == {
        "a": 2,
        "t": {"y": {"w": 3}, "keep": [1], "new": "n"},
        "scalar_to_table": {"k": "v"},
        "table_added": {"q": 1},
    }
    assert base["t"] == {"x": 1, "y": {"z": 2}, "keep": [1]}  # inputs untouched
    merged["t"]["keep"].append(2)
    assert base["t"]["keep"] == [1]  # and not shared
    assert deep_merge(base, None) == base
    assert tomllib.loads(to_toml(merged)) == merged


# -- PgmuxProcess, driven with a stand-in for the proxy ---------------------------------

STAND_IN = '''\
"""Stand-in for `python -m proxy`: reads --config, listens, logs, obeys signals."""
import signal, socket, sys, time, tomllib

args = sys.argv[1:]
with open(args[args.index("--config") + 1], "rb") as f:
    cfg = tomllib.load(f)
if "--check" in args:
    print("config ok")
    sys.exit(0)
mode = cfg.get("stand_in_mode", "serve")
print("starting, mode", mode, file=sys.stderr)
if mode == "crash":
    print("fatal: cannot start")
    sys.exit(3)
if mode == "hang":
    time.sleep(60)
server = socket.create_server((cfg["listen_addr"], cfg["listen_port"]))
print("listening on", cfg["listen_port"])

def on_term(signum, frame):
    print("SIGTERM: shutting down")
    sys.exit(0)

signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore-term" else on_term)
signal.signal(signal.SIGHUP, lambda signum, frame: print("SIGHUP: reloading"))
while True:
    conn, _ = server.accept()
    conn.close()
'''


@pytest.fixture
def stand_in(workdir: Path) -> list[str]:
    path = workdir / "stand_in.py"
    path.write_text(STAND_IN)
    return [sys.executable, str(path)]


def stand_in_config(**extra: object) -> dict[str, Any]:
    return {"listen_addr": "127.0.0.1", "listen_port": free_port(), **extra}


def test_process_lifecycle(workdir: Path, stand_in: list[str]) -> None:
    config = stand_in_config(users={"a.b": {"password": "x"}})
    p = PgmuxProcess.start(config, workdir / "p", command=stand_in)
    try:
        assert p.running
        assert (p.host, p.port) == ("127.0.0.1", config["listen_port"])
        assert p.config == config
        assert p.config_path == workdir / "p" / "pgmux.toml"
        assert p.log_path == workdir / "p" / "pgmux.log"
        assert tomllib.loads(p.config_path.read_text()) == config
        assert "listening on" in p.wait_for_log("listening on")
        assert "starting, mode serve" in p.log()  # stderr goes to the log too
        mark = len(p.log())
        p.signal(signal.SIGHUP)
        assert p.wait_for_log("reloading", since=mark) == "SIGHUP: reloading"
    finally:
        code = p.stop()
    assert code == 0
    assert p.stop() == 0  # idempotent
    assert not p.running
    assert "SIGTERM: shutting down" in p.log()
    with pytest.raises(PgmuxError, match="without logging"):
        p.wait_for_log("never logged")


def test_wait_for_log_times_out_with_the_log(workdir: Path, stand_in: list[str]) -> None:
    with (
        PgmuxProcess.start(stand_in_config(), workdir, command=stand_in) as p,
        pytest.raises(TimeoutError, match=r"(?s)never logged.*listening on"),
    ):
        p.wait_for_log("never logged", timeout=0.2)
    assert not p.running


def test_start_failure_carries_the_log(workdir: Path, stand_in: list[str]) -> None:
    config = stand_in_config(stand_in_mode="crash")
    with pytest.raises(PgmuxStartError, match=r"(?s)exited with code 3.*fatal: cannot start"):
        PgmuxProcess.start(config, workdir, command=stand_in)


def test_start_timeout_kills_and_carries_the_log(workdir: Path, stand_in: list[str]) -> None:
    config = stand_in_config(stand_in_mode="hang")
    with pytest.raises(PgmuxStartError, match=r"(?s)did not listen.*starting, mode hang"):
        PgmuxProcess.start(config, workdir, command=stand_in, timeout=0.5)


def test_stop_escalates_to_sigkill(workdir: Path, stand_in: list[str]) -> None:
    p = PgmuxProcess.start(stand_in_config(stand_in_mode="ignore-term"), workdir, command=stand_in)
    try:
        p.wait_for_log("listening on")
        assert p.stop(timeout=0.3) == -signal.SIGKILL
    finally:
        p.kill()


def test_kill(workdir: Path, stand_in: list[str]) -> None:
    p = PgmuxProcess.start(stand_in_config(), workdir, command=stand_in)
    assert p.kill() == -signal.SIGKILL
    assert p.kill() == -signal.SIGKILL
    assert p.stop() == -signal.SIGKILL


def test_dsn_and_conninfo(workdir: Path, stand_in: list[str]) -> None:
    with PgmuxProcess.start(stand_in_config(), workdir, command=stand_in) as p:
        assert p.dsn() == f"postgresql://app:secret@127.0.0.1:{p.port}/app"
        assert p.dsn("u@x", "p/w d", "d b", sslmode="disable") == (
            f"postgresql://u%40x:p%2Fw%20d@127.0.0.1:{p.port}/d%20b?sslmode=disable"
        )
        assert p.conninfo() == f"host=127.0.0.1 port={p.port} user=app password=secret dbname=app"
        parsed = conninfo_to_dict(p.conninfo(password="it's a \\ secret", application_name="t"))
        assert parsed == {
            "host": "127.0.0.1",
            "port": str(p.port),
            "user": "app",
            "password": "it's a \\ secret",
            "dbname": "app",
            "application_name": "t",
        }


def test_write_config_replaces_the_file(workdir: Path, stand_in: list[str]) -> None:
    with PgmuxProcess.start(stand_in_config(), workdir, command=stand_in) as p:
        new = deep_merge(p.config, {"default_pool_size": 7})
        p.write_config(new)
        assert p.config == new
        assert tomllib.loads(p.config_path.read_text()) == new
        assert list(p.config_path.parent.glob("*.tmp")) == []


def test_run_check(workdir: Path, stand_in: list[str]) -> None:
    ok = run_check(stand_in_config(), workdir, command=stand_in)
    assert (ok.returncode, ok.stdout) == (0, "config ok\n")
    bad = run_check("listen_port = = 1\n", workdir, command=stand_in)
    assert bad.returncode != 0
    assert "TOMLDecodeError" in bad.stderr
    assert (workdir / "check.toml").read_text() == "listen_port = = 1\n"
