"""``pgmux demo``: its own throwaway PostgreSQL, pgmux in front, the same clients both ways.

The demo runs as a subprocess (``python -m proxy.demo``) with TMPDIR pointing at the
test's ``workdir``, so its work directory lands there and must be gone afterwards. Its
processes (postmaster, backends, pgmux) all carry that directory's name in their
command line or title (PostgreSQL's ``cluster_name`` is set to it), so ``ps`` finds
leftovers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from support.helpers import wait_until_sync
from support.pgmux import REPO_ROOT

DEMO = (sys.executable, "-m", "proxy.demo")
WORKING_IN = re.compile(r"pgmux demo: working in (\S+)")


def _env(workdir: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(workdir), "PYTHONUNBUFFERED": "1"}


def _run_demo(workdir: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEMO, *args],
        cwd=REPO_ROOT,
        env=_env(workdir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _row(stdout: str, label: str) -> tuple[str, str]:
    """The (direct, through pgmux) cells of the table row starting with ``label``."""
    for line in stdout.splitlines():
        if line.startswith(label + "  "):
            direct, pooled = line.split()[-2:]
            return direct, pooled
    raise AssertionError(f"no {label!r} row in:\n{stdout}")


def _leftovers(name: str) -> list[str]:
    """Live processes whose command line names the demo's work directory."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "stat=,args="], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if name in line and not line.startswith("Z")]


def _assert_cleaned_up(workdir: Path, demo_dir: Path) -> None:
    assert demo_dir.parent == workdir
    assert not demo_dir.exists()
    assert list(workdir.glob("pgmux-demo-*")) == []
    # Backends notice their postmaster's exit on their own: give them a moment.
    wait_until_sync(lambda: not _leftovers(demo_dir.name), timeout=10, what="no demo processes")


def test_demo_direct_fails_pgmux_serves_all(workdir: Path) -> None:
    proc = _run_demo(workdir, "--clients", "120", "--max-connections", "20", "--pool-size", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert _row(out, "clients") == ("120", "120")
    direct_ok, pooled_ok = _row(out, "succeeded")
    direct_failed, pooled_failed = _row(out, "failed")
    assert (pooled_ok, pooled_failed) == ("120", "0")
    assert int(direct_failed) > 0 and int(direct_ok) + int(direct_failed) == 120
    # Every refusal is PostgreSQL's "too many clients" (or its superuser-slots variant).
    refusals = [line for line in out.splitlines() if line.startswith("  53300 ")]
    assert refusals, out
    assert sum(int(line.split()[-2]) for line in refusals) == int(direct_failed)
    direct_peak, pooled_peak = _row(out, "peak server connections")
    assert 1 <= int(pooled_peak) <= 8
    assert int(direct_peak) <= 20 - 1  # max_connections minus the sampler itself
    assert "pool of 8" in out
    # Progress went to stderr, a plain line per phase (stderr is not a terminal here).
    assert "direct to PostgreSQL: 120/120 done" in proc.stderr
    assert "through pgmux: 120/120 done, 0 failed" in proc.stderr
    match = WORKING_IN.search(proc.stderr)
    assert match, proc.stderr
    _assert_cleaned_up(workdir, Path(match.group(1)))


def test_demo_ctrl_c_cleans_up(workdir: Path) -> None:
    log = workdir / "demo.stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [*DEMO, "--clients", "100", "--queries", "100"],
            cwd=REPO_ROOT, env=_env(workdir), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        # Interrupt it at its busiest: pgmux relaying, PostgreSQL serving its pool.
        wait_until_sync(
            lambda: "through pgmux: 100 clients" in log.read_text(),
            timeout=60,
            what="the pgmux phase to start",
        )
        match = WORKING_IN.search(log.read_text())
        assert match
        demo_dir = Path(match.group(1))
        # What must be gone afterwards is there now: the detector sees it (pgmux's
        # server connections open as its first clients arrive, a moment after the
        # phase's line).
        backend = f"postgres: {demo_dir.name}: app app 127.0.0.1"
        running = wait_until_sync(
            lambda: "\n".join(found) if backend in "\n".join(found := _leftovers(demo_dir.name))
            else "",
            timeout=20,
            what="pgmux's server connections",
        )  # fmt: skip
        assert f"--config {demo_dir}/pgmux.toml" in running
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted; cleaning up" in log.read_text()
    _assert_cleaned_up(workdir, demo_dir)


def test_demo_without_postgresql_binaries(workdir: Path) -> None:
    proc = _run_demo(workdir, "--pg-bin", "/nonexistent", timeout=30)
    assert proc.returncode == 1
    assert "/nonexistent" in proc.stderr
    assert "apt-get install postgresql" in proc.stderr
    assert proc.stdout == ""
    assert list(workdir.iterdir()) == []


def test_demo_default_burst_through_pgmux(workdir: Path) -> None:
    """The default 500 clients, arriving before pgmux's pool has learned the server's
    parameters: every login waits for a server, then they are served one by one."""
    proc = _run_demo(
        workdir, "--clients", "500", "--queries", "1", "--query", "SELECT 1", "--timeout", "5"
    )
    assert _row(proc.stdout, "succeeded")[1] == "500", proc.stdout + proc.stderr
    assert proc.returncode == 0
