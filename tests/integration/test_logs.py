"""pgmux's own log lines, read from a real pgmux's log file while real clients act.

- the stats line every ``stats_period`` (rates per period) and ``log_stats = false``;
- "who holds the pool" once a queue has waited a second, with and without
  ``log_statement_text``;
- the ``idle_transaction_warn`` leak detector: said once, nothing done to the client;
- ``log_format = "json"``: every line one JSON object; ``log_pooler_errors = false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from support.helpers import connect_asyncpg, error_of, log_lines, wait_until
from support.pgmux import PgmuxFactory, PgmuxProcess

ADMIN_USER, ADMIN_PASSWORD = "admin", "adminpw"
WITH_ADMIN = {"users": {ADMIN_USER: {"password": ADMIN_PASSWORD}}}

STATS_LINE = re.compile(
    r"stats: (?P<xacts>\d+) xacts/s, (?P<queries>\d+) queries/s, (?P<cparses>\d+) client "
    r"parses/s, (?P<sparses>\d+) server parses/s, (?P<binds>\d+) binds/s, in (?P<bin>\d+) B/s, "
    r"out (?P<bout>\d+) B/s, xact (?P<xact_us>\d+) us, query (?P<query_us>\d+) us, "
    r"wait (?P<wait_us>\d+) us; clients (?P<clients>\d+) \((?P<waiting>\d+) waiting\), "
    r"servers (?P<active>\d+) active, (?P<idle>\d+) idle$"
)
QUEUE_LINE = 'pool "app/app" has a queue'
LEAK_LINE = "idle in a transaction for"


async def wait_for_log(pgmux: PgmuxProcess, text: str, timeout: float, since: int = 0) -> str:
    """``PgmuxProcess.wait_for_log`` off the event loop, so clients keep running."""
    return await asyncio.to_thread(pgmux.wait_for_log, text, timeout, since=since)


def stats_lines(pgmux: PgmuxProcess, since: int = 0) -> list[re.Match[str]]:
    found = []
    for line in log_lines(pgmux, since):
        if " stats: " in line:
            match = STATS_LINE.search(line)
            assert match is not None, f"stats line not in the documented format: {line}"
            assert " INFO pgmux.stats stats: " in line, line
            found.append(match)
    return found


def client_id(pgmux: PgmuxProcess, application_name: str) -> str:
    """The C-N id pgmux gave the client that logged in with this application_name."""
    pattern = re.compile(rf"(C-\d+) app@app \S+: login ok \(application_name={application_name},")
    ids = [m.group(1) for line in log_lines(pgmux) if (m := pattern.search(line))]
    assert len(ids) == 1, ids
    return ids[0]


@contextlib.asynccontextmanager
async def traffic(conn: asyncpg.Connection) -> AsyncIterator[list[int]]:
    """One transaction after another on ``conn`` while the block runs (count in [0])."""
    done = asyncio.Event()
    count = [0]

    async def run() -> None:
        while not done.is_set():
            assert await conn.fetchval("SELECT 1") == 1
            count[0] += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(run())
    try:
        yield count
    finally:
        done.set()
        await task


# -- the stats line ----------------------------------------------------------------------


async def test_stats_line_every_period(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({**WITH_ADMIN, "stats_period": 1})
    conn = await connect_asyncpg(pgmux)
    # A console session is no client of a pool: the line does not count it.
    admin = await connect_asyncpg(
        pgmux, user=ADMIN_USER, password=ADMIN_PASSWORD, database="pgbouncer"
    )
    try:
        async with traffic(conn) as count:

            def busy_line() -> re.Match[str] | None:
                return next((m for m in stats_lines(pgmux) if int(m["xacts"]) > 0), None)

            line = await wait_until(busy_line, 20, what="a stats line with traffic")
            assert line is not None
        assert count[0] > 0
        # One request per transaction: as many queries as transactions, both timed.
        assert int(line["queries"]) == int(line["xacts"]) > 0
        assert int(line["bin"]) > 0 and int(line["bout"]) > 0
        assert int(line["xact_us"]) > 0 and int(line["query_us"]) > 0
        assert int(line["cparses"]) == int(line["sparses"]) == int(line["binds"]) == 0
        assert (line["clients"], line["waiting"]) == ("1", "0")
        assert int(line["active"]) + int(line["idle"]) == 1  # one client, one server

        # Rates are per period, not since start: a quiet period says 0. The first line
        # after the traffic stopped may still cover some of it; the second cannot.
        since = len(pgmux.log())
        lines = await wait_until(
            lambda: stats_lines(pgmux, since)[1:], 20, what="two stats lines after the traffic"
        )
        quiet = lines[0]
        assert quiet["xacts"] == quiet["queries"] == quiet["bin"] == quiet["bout"] == "0"
        assert quiet["xact_us"] == quiet["query_us"] == "0"
        assert (quiet["clients"], quiet["active"], quiet["idle"]) == ("1", "0", "1")
    finally:
        await conn.close()
        await admin.close()


async def test_log_stats_false_logs_no_stats_line(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"stats_period": 1, "log_stats": False})
    conn = await connect_asyncpg(pgmux)
    try:
        async with traffic(conn) as count:
            await asyncio.sleep(3.5)  # three periods and more
        assert count[0] > 0
    finally:
        await conn.close()
    assert not [line for line in log_lines(pgmux) if "stats:" in line]
    assert not [line for line in log_lines(pgmux) if "pgmux.stats" in line]


# -- who holds the pool ------------------------------------------------------------------


@pytest.mark.parametrize("statement_text", [True, False], ids=["text", "no_text"])
async def test_queue_names_who_holds_the_pool(
    pgmux_factory: PgmuxFactory, statement_text: bool
) -> None:
    pgmux = pgmux_factory(
        {
            **WITH_ADMIN,
            "default_pool_size": 1,
            "query_wait_timeout": 30,
            "log_statement_text": statement_text,
        }
    )
    sql = "SELECT 'holder_probe_5521' AS marker"
    holder = await connect_asyncpg(pgmux, server_settings={"application_name": "billing_probe"})
    waiter = await connect_asyncpg(pgmux)
    admin = await connect_asyncpg(
        pgmux, user=ADMIN_USER, password=ADMIN_PASSWORD, database="pgbouncer"
    )
    waiting: asyncio.Task[object] | None = None
    try:
        await holder.execute("BEGIN")
        assert await holder.fetchval(sql) == "holder_probe_5521"
        rows = [r for r in await admin.fetch("SHOW CLIENTS") if r["user"] == "app"]
        mine = [r for r in rows if r["application_name"] == "billing_probe"]
        assert len(mine) == 1, rows
        ptr = mine[0]["ptr"]
        assert ptr == client_id(pgmux, "billing_probe")
        assert mine[0]["state"] == "idle in transaction"
        assert mine[0]["last_statement"] == (sql if statement_text else None)

        since = len(pgmux.log())
        queued_at = time.monotonic()
        waiting = asyncio.create_task(waiter.fetchval("SELECT 2"))
        line = await wait_for_log(pgmux, QUEUE_LINE, 15, since)
        assert time.monotonic() - queued_at >= 1.0  # QUEUE_LOG_AFTER
        assert " WARNING pgmux.janitor " in line, line
        oldest = re.search(r": 1 clients waiting \(the oldest for ([0-9.]+) s\), ", line)
        assert oldest is not None and float(oldest.group(1)) >= 1.0, line
        assert "1 of 1 server connections busy" in line, line
        holders = line.split("; holders: ", 1)[1]
        assert holders.startswith(f"{ptr} app@app "), line
        assert "application_name='billing_probe' idle in transaction for " in holders, line
        if statement_text:
            assert holders.endswith(f"last statement {sql!r}"), line
        else:
            assert holders.endswith("last statement (log_statement_text = false)"), line
            assert "holder_probe_5521" not in pgmux.log()

        # One line per queue (at most every 30 s), however long it lasts.
        await asyncio.sleep(1.5)
        assert not waiting.done()
        assert sum(QUEUE_LINE in ln for ln in log_lines(pgmux)) == 1
        await holder.execute("COMMIT")
        assert await asyncio.wait_for(waiting, 15) == 2
    finally:
        await holder.close()  # lets the waiter through, if it still waits
        if waiting is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(waiting, 15)
        await waiter.close()
        await admin.close()


# -- the leak detector -------------------------------------------------------------------


async def test_idle_transaction_warn_logs_once_and_does_nothing(
    pgmux_factory: PgmuxFactory,
) -> None:
    pgmux = pgmux_factory({"idle_transaction_warn": 1})
    sql = "SELECT 'leak_probe_8812' AS marker"
    leaky = await connect_asyncpg(pgmux, server_settings={"application_name": "leaky_probe"})
    idle = await connect_asyncpg(pgmux, server_settings={"application_name": "idle_probe"})
    try:
        assert await idle.fetchval("SELECT 1") == 1  # idle, but not in a transaction
        await leaky.execute("BEGIN")
        assert await leaky.fetchval(sql) == "leak_probe_8812"
        began = time.monotonic()
        cid = client_id(pgmux, "leaky_probe")
        line = await wait_for_log(pgmux, LEAK_LINE, 15)
        assert time.monotonic() - began >= 1.0
        assert " WARNING pgmux.janitor " in line, line
        assert f" {cid} app@app " in line, line
        assert "(idle_transaction_warn = 1 s), holding S-" in line, line
        assert "application_name='leaky_probe'" in line, line
        assert line.endswith(f"last statement {sql!r}"), line

        await asyncio.sleep(2.5)  # it stays idle in the transaction: no second line
        warned = [ln for ln in log_lines(pgmux) if LEAK_LINE in ln]
        assert len(warned) == 1, warned
        assert f"{client_id(pgmux, 'idle_probe')} app@app" not in warned[0]
        # Nothing was done to it: same transaction, and it commits.
        assert not leaky.is_closed()
        assert await leaky.fetchval("SELECT 'still here'") == "still here"
        await leaky.execute("COMMIT")
        assert await leaky.fetchval("SELECT 3") == 3
        assert f"{cid} app@app" not in "".join(
            ln for ln in log_lines(pgmux) if "closing" in ln or "FATAL" in ln
        )
    finally:
        await leaky.close()
        await idle.close()


# -- formats and switches ----------------------------------------------------------------

JSON_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.mark.parametrize("workers", [1, 2])
async def test_json_log_format(pgmux_factory: PgmuxFactory, workers: int) -> None:
    pgmux = pgmux_factory({"log_format": "json", "workers": workers})
    error = await error_of(connect_asyncpg(pgmux, database="no_such_db"))
    assert error.sqlstate == "3D000"
    conn = await connect_asyncpg(pgmux)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert (await error_of(conn.fetch("SELECT 1/0"))).sqlstate == "22012"
    finally:
        await conn.close()
    await wait_for_log(pgmux, "closing (client sent Terminate)", 15)
    assert pgmux.stop() == 0

    lines = [ln for ln in pgmux.log().splitlines() if ln.strip()]
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line, start to stop
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= set(entry), line
        assert set(entry) <= {"time", "level", "logger", "message", "worker", "exception"}, line
        assert JSON_TIME.fullmatch(entry["time"]), line
        assert entry["level"] in ("debug", "info", "warning", "error", "critical"), line
        assert entry["logger"].startswith("pgmux"), line
        if workers == 1:
            assert "worker" not in entry, line
        entries.append(entry)

    def one(text: str) -> dict[str, object]:
        found = [e for e in entries if text in str(e["message"])]
        assert len(found) == 1, (text, found)
        return found[0]

    listening = [e for e in entries if str(e["message"]).startswith("pgmux listening on")]
    assert len(listening) == workers
    fatal = one('FATAL 3D000: no such database: "no_such_db"')
    assert fatal["level"] == "warning" and fatal["logger"] == "pgmux.client"
    login = one("login ok")
    assert login["level"] == "info"
    if workers > 1:
        # Worker lines say which worker; the supervisor's have no worker.
        assert {e.get("worker") for e in listening} == {0, 1}
        assert login["worker"] in (0, 1)
        assert "worker" not in one("all 2 workers ready")


async def test_log_pooler_errors_false(pgmux_factory: PgmuxFactory) -> None:
    pgmux = pgmux_factory({"log_pooler_errors": False})
    error = await error_of(connect_asyncpg(pgmux, database="no_such_db"))
    # The client is told, as always ...
    assert error.sqlstate == "3D000"
    assert 'no such database: "no_such_db"' in error.args[0]
    # ... and once a later login is logged, the refusal would have been before it.
    conn = await connect_asyncpg(pgmux)
    try:
        await wait_for_log(pgmux, "login ok", 15)
    finally:
        await conn.close()
    log = pgmux.log()
    assert "3D000" not in log
    assert "FATAL" not in log
    assert "no_such_db" not in log


@pytest.mark.parametrize("session_state", ["pin", "error"])
async def test_log_statement_text_false_hides_statements_everywhere(
    pgmux_factory: PgmuxFactory, session_state: str
) -> None:
    """The README: false "hides statement text everywhere, in the console and in the log",
    so the pin line and the session_state = "error" refusal line leave it out too."""
    pgmux = pgmux_factory(
        {**WITH_ADMIN, "log_statement_text": False, "session_state": session_state}
    )
    probe = "secret_probe_3141"
    conn = await connect_asyncpg(pgmux)
    admin = await connect_asyncpg(
        pgmux, user=ADMIN_USER, password=ADMIN_PASSWORD, database="pgbouncer"
    )
    try:
        sql = f"SELECT pg_advisory_lock(3141) /* {probe} */"
        if session_state == "pin":
            await conn.execute(sql)
            await wait_for_log(pgmux, "pinned to S-", 15)
            pins = await admin.fetch("SHOW PINS")
            assert len(pins) == 1 and pins[0]["last_statement"] is None, pins
        else:
            assert (await error_of(conn.execute(sql))).sqlstate == "0A000"
            await wait_for_log(pgmux, "refused session advisory locks", 15)
        clients = [r for r in await admin.fetch("SHOW CLIENTS") if r["user"] == "app"]
        assert [r["last_statement"] for r in clients] == [None], clients
    finally:
        await conn.close()
        await admin.close()
    assert probe not in pgmux.log()
    assert "(log_statement_text = false)" in pgmux.log()
