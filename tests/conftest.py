"""Shared fixtures: a PostgreSQL cluster per session, pgmux subprocesses per test.

``tests/`` has no ``__init__.py``, so pytest puts this directory on ``sys.path`` when it
loads this file, and the helpers import as ``support.pgcluster`` / ``support.pgmux``.

- ``pg``: the session's ``PgCluster`` (roles app/secret, md5user/md5secret, postgres,
  passthru/ptsecret, expired/expsecret, authuser/authsecret: see ``support.pgcluster``).
- ``certs``: the session's ``CertFiles`` (``support.certs``) in a directory under /tmp.
- ``pg_tls``: a second session ``PgCluster`` with TLS on (``certs``' server certificate,
  ``certs.ca_cert`` as ssl_ca_file) whose pg_hba.conf is ``TLS_ONLY_HBA``: over TCP only
  TLS connections with SCRAM get in. Same roles as ``pg``. Started on first use only.
- ``workdir``: a fresh directory under /tmp, removed after the test.
- ``pgmux_factory``: ``start(overrides=None) -> PgmuxProcess``; each one gets its own
  sub-directory of ``workdir`` and is stopped after the test.
- ``pgmux``: one pgmux with the default config; ``pool1``: one with a pool of 1.
- ``su``: a superuser connection to PostgreSQL itself (not through pgmux).
- ``console``: ``await console(pgmux)`` opens an admin console session (psycopg), closed
  after the test (``support.admin``).

When a test fails, the log of every pgmux it started is added to the failure report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from support.admin import Admin, Console
from support.certs import CertFiles, make_certs
from support.helpers import Su, connect_psycopg, superuser
from support.pgbouncer import ADMIN_PASSWORD, ADMIN_USER
from support.pgcluster import TLS_ONLY_HBA, PgCluster, free_port
from support.pgmux import PgmuxFactory, PgmuxProcess, deep_merge, default_config

# Per-test list of the pgmux processes a test started, for the failure report.
_STARTED = pytest.StashKey[list[PgmuxProcess]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    started: list[PgmuxProcess] = item.stash.get(_STARTED, [])
    if report.failed:
        for n, pgmux in enumerate(started, start=1):
            text = pgmux.log_tail() if pgmux.log_path.exists() else "(log already removed)"
            report.sections.append((f"pgmux #{n} log: {pgmux.log_path} {pgmux!r}", text))
    return report


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    cluster = PgCluster.create()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def certs() -> Iterator[CertFiles]:
    path = Path(tempfile.mkdtemp(prefix="pgmux-certs-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield make_certs(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_tls(certs: CertFiles) -> Iterator[PgCluster]:
    cluster = PgCluster.create(tls=certs, hba=TLS_ONLY_HBA)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgmux-test-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pgmux_factory(
    pg: PgCluster, workdir: Path, request: pytest.FixtureRequest
) -> Iterator[PgmuxFactory]:
    started: list[PgmuxProcess] = []
    request.node.stash[_STARTED] = started

    def start(overrides: Mapping[str, Any] | None = None) -> PgmuxProcess:
        config = deep_merge(default_config(pg, free_port()), overrides)
        pgmux = PgmuxProcess.start(config, workdir / f"pgmux-{len(started) + 1}")
        started.append(pgmux)
        return pgmux

    yield start
    with contextlib.ExitStack() as stopping:  # stops every one even if one stop() raises
        for pgmux in started:
            stopping.callback(pgmux.stop)


@pytest.fixture
def pgmux(pgmux_factory: PgmuxFactory) -> PgmuxProcess:
    return pgmux_factory()


@pytest.fixture
def pool1(pgmux_factory: PgmuxFactory) -> PgmuxProcess:
    """pgmux with one server connection: whatever one client leaves behind, the next meets."""
    return pgmux_factory({"default_pool_size": 1})


@pytest.fixture
async def su(pg: PgCluster) -> AsyncIterator[Su]:
    conn = await superuser(pg)
    yield conn
    await conn.close()


@pytest.fixture
async def console() -> AsyncIterator[Console]:
    opened: list[Admin] = []

    async def connect(
        pgmux: PgmuxProcess, user: str = ADMIN_USER, password: str = ADMIN_PASSWORD
    ) -> Admin:
        conn = await connect_psycopg(pgmux, user, password, "pgbouncer")
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        await conn.close()
