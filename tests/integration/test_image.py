"""The container image, built and run for real with podman.

``deploy/docker/build-image`` builds the Dockerfile on a base image this module makes
itself (no image registry is reachable): Debian's minbase with python3 by debootstrap,
imported into podman and kept between runs as ``BASE_IMAGE``. Containers run with
``--network host`` against the session's PostgreSQL (``pg``) and are checked as a
person would: a query through them, the image's own HEALTHCHECK command, a non-root
process, and SIGTERM while a client holds a transaction (it may COMMIT; the container
then exits 0). The image built here and every container are removed afterwards.

Skipped, saying what is missing, where podman, runc or debootstrap are not installed or
containers cannot run; scripts/test installs all three.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support.pgcluster import APP_DB, APP_PASSWORD, APP_USER, PgCluster, free_port
from support.pgmux import REPO_ROOT, deep_merge, default_config, to_toml

pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]

# On these machines podman runs containers only with cgroupfs and runc, and with limits
# it can set without systemd; the build's RUN steps need the same.
PODMAN = ("podman", "--cgroup-manager=cgroupfs", "--runtime", "runc")
RUN_OPTIONS = (
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000", "--network", "host",
)  # fmt: skip
# Debian's suite whose python3 is the Python the wheels are built with (this venv's).
DEBIAN_SUITES = {(3, 11): "bookworm", (3, 13): "trixie"}
# Bump the suffix when the way the base is made changes, so a stale cache is not used.
BASE_IMAGE = "localhost/pgmux-test-base:{suite}-1"
IMAGE_CONFIG = "/etc/pgmux/pgmux.toml"
SHUTDOWN_TIMEOUT = 20  # pgmux's, in the containers here: the exit must come well before


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*PODMAN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc


# -- the base image and the image ----------------------------------------------------------


def _debian_mirror() -> str:
    """The host's Debian mirror (apt's deb822 sources, else sources.list)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for stanza in deb822.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if re.match(r"^\w[\w-]*:", line)
            )
            uris = fields.get("URIs", "").split()
            if uris and "security" not in uris[0] and "deb" in fields.get("Types", ""):
                return uris[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[-2]:
                return next(p for p in parts[1:] if "://" in p)
    return "http://deb.debian.org/debian"


def _make_base_image(name: str, suite: str) -> None:
    """debootstrap a minimal Debian with python3 and import it as ``name``."""
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap): no base image")
    if os.geteuid() != 0:
        pytest.skip("making the base image needs root (debootstrap)")
    with tempfile.TemporaryDirectory(prefix="pgmux-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        mirror = _debian_mirror()
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
             suite, str(rootfs), mirror],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(
                f"debootstrap {suite} from {mirror} failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        # What a container never reads: the .debs, apt lists, docs, manuals, translations.
        for junk in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                     "usr/share/locale", "usr/share/info"):  # fmt: skip
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [*PODMAN, "import", "-", name],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise AssertionError(f"podman import {name} failed:\n{imported.stderr}")


@dataclass(frozen=True)
class Image:
    name: str
    inspect: dict[str, Any]  # podman image inspect's Config
    healthcheck: list[str]  # the HEALTHCHECK's test: ["CMD", argv...]
    build_seconds: float


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    """The Dockerfile built by deploy/docker/build-image on the cached base image."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install podman runc)")
    suite = DEBIAN_SUITES.get(sys.version_info[:2])
    if suite is None:
        pytest.skip(
            f"no Debian suite has python3 {sys.version_info.major}.{sys.version_info.minor}"
            " (this venv's, which builds the wheels) for the base image"
        )
    base = BASE_IMAGE.format(suite=suite)
    try:
        exists = podman("image", "exists", base, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run podman here: {exc}")
    if not exists:
        _make_base_image(base, suite)
    probe = podman("run", "--rm", *RUN_OPTIONS, base, "python3", "-c", "pass", check=False)
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        pytest.skip(f"cannot run containers here: {lines[-1] if lines else probe.returncode}")

    name = f"localhost/pgmux-test:{uuid.uuid4().hex[:12]}"
    env = dict(os.environ, ENGINE=" ".join(PODMAN), PYTHON=sys.executable)
    started = time.monotonic()
    # --layers=false: no image is left behind for the build stage.
    build = subprocess.run(
        [str(REPO_ROOT / "deploy/docker/build-image"), "--tag", name, "--base", base,
         "--", *RUN_OPTIONS, "--layers=false"],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    build_seconds = time.monotonic() - started
    try:
        assert build.returncode == 0, f"build-image failed:\n{build.stdout}{build.stderr}"
        data = json.loads(podman("image", "inspect", name).stdout)[0]
        # podman shows the HEALTHCHECK beside Config (docker inside it).
        health = data.get("Healthcheck") or data["Config"].get("Healthcheck") or {}
        yield Image(name, data["Config"], health.get("Test", []), build_seconds)
    finally:
        podman("rmi", "--force", name, check=False)


# -- containers ---------------------------------------------------------------------------


@dataclass
class Container:
    name: str
    port: int

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(podman("inspect", self.name).stdout)[0]["State"]
        return state

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *argv, check=False, timeout=60)

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            if not self.state()["Running"] or time.monotonic() >= deadline:
                raise AssertionError(
                    f"container {self.name} is not listening on {self.port}:\n{self.logs()}"
                )
            time.sleep(0.1)

    def wait_for_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.logs():
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} did not log {text!r}:\n{self.logs()}")
            time.sleep(0.1)

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the container has stopped (at most ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while self.state()["Running"]:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} still runs after {timeout:g} s:\n{self.logs()}")
            time.sleep(0.1)
        code: int = self.state()["ExitCode"]
        return code


@pytest.fixture
def run_container(image: Image) -> Iterator[Any]:
    """``run(env, mounts=(), args=()) -> Container``, started detached and removed after."""
    names: list[str] = []

    def run(
        env: dict[str, str], port: int, mounts: tuple[str, ...] = (), args: tuple[str, ...] = ()
    ) -> Container:
        name = f"pgmux-test-{uuid.uuid4().hex[:12]}"
        names.append(name)
        options = [f"--env={key}={value}" for key, value in env.items()]
        options += [f"--volume={mount}" for mount in mounts]
        # No timer-driven health checks (they need systemd here); the tests run them.
        # --read-only: as Kubernetes' readOnlyRootFilesystem (podman keeps /tmp writable).
        podman("run", "--detach", f"--name={name}", *RUN_OPTIONS, "--health-interval=disable",
               "--read-only", *options, image.name, *args)  # fmt: skip
        container = Container(name, port)
        container.wait_listening()
        return container

    yield run
    for name in names:
        podman("rm", "--force", "--time=0", name, check=False)


def _config_file(pg: PgCluster, directory: Path, port: int, metrics_port: int) -> Path:
    config = deep_merge(
        default_config(pg, port),
        {"shutdown_timeout": SHUTDOWN_TIMEOUT, "metrics": {"listen_port": metrics_port}},
    )
    path = directory / "pgmux.toml"
    path.write_text(to_toml(config))
    path.chmod(0o644)  # the container's user is not root
    return path


@pytest.fixture
def confdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgmux-image-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _loopback_env(port: int, metrics_port: int) -> dict[str, str]:
    # --network host: keep pgmux on loopback, overriding the image's 0.0.0.0 (which also
    # shows the env vars win over the file). The healthcheck finds the port by the same
    # variable.
    return {
        "PGMUX_LISTEN_ADDR": "127.0.0.1",
        "PGMUX_LISTEN_PORT": str(port),
        "PGMUX_METRICS_LISTEN_ADDR": "127.0.0.1",
        "PGMUX_METRICS_LISTEN_PORT": str(metrics_port),
    }


async def _query(port: int) -> str:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user=APP_USER, password=APP_PASSWORD,
        database=APP_DB, statement_cache_size=0, timeout=15,
    )  # fmt: skip
    try:
        value: str = await conn.fetchval("SELECT current_user || '@' || current_database()")
        return value
    finally:
        await conn.close()


# -- the tests ----------------------------------------------------------------------------


def test_image_metadata(image: Image) -> None:
    config = image.inspect
    user = config.get("User", "")
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), f"USER must be a numeric non-root id: {user!r}"
    assert {"6432/tcp", "9127/tcp"} <= set(config.get("ExposedPorts", {}))
    assert config["Entrypoint"] == ["pgmux"], "exec form, so pgmux is PID 1 and gets SIGTERM"
    assert image.healthcheck, "no HEALTHCHECK (podman build needs --format docker)"
    assert image.healthcheck[0] == "CMD", "exec form: no shell in the check"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PGMUX_LISTEN_ADDR"] == "0.0.0.0"
    assert env["PGMUX_METRICS_LISTEN_ADDR"] == "0.0.0.0"
    print(f"image built in {image.build_seconds:.1f} s")  # shown with -s


async def test_config_file_query_health_and_graceful_stop(
    image: Image, run_container: Any, pg: PgCluster, confdir: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    path = _config_file(pg, confdir, port, metrics_port)
    # The directory, not the file: a replaced file shows through (the reload below).
    container = run_container(
        _loopback_env(port, metrics_port),
        port,
        mounts=(f"{confdir}:{Path(IMAGE_CONFIG).parent}:ro",),
        args=("--config", IMAGE_CONFIG),
    )
    assert await _query(port) == f"{APP_USER}@{APP_DB}"

    # SIGHUP reloads the mounted file.
    text = path.read_text()
    assert "default_pool_size = 5\n" in text
    replacement = confdir / "pgmux.toml.new"
    replacement.write_text(text.replace("default_pool_size = 5\n", "default_pool_size = 7\n"))
    replacement.chmod(0o644)
    os.replace(replacement, path)
    podman("kill", "--signal=HUP", container.name)
    container.wait_for_log("reloaded")
    assert "default_pool_size" in container.logs().split("reloaded", 1)[1]

    # The image's HEALTHCHECK, run by podman (its timers need systemd: the test runs it),
    # then its command by hand, with the other options.
    health = podman("healthcheck", "run", container.name, check=False)
    assert health.returncode == 0, f"unhealthy: {health.stdout}{health.stderr}"
    check = image.healthcheck[1:]
    health = container.exec(*check)
    assert health.returncode == 0, health.stderr
    ready = container.exec(*check, "--ready")
    assert ready.returncode == 0, ready.stderr
    wrong = container.exec(*check, "--url", f"http://127.0.0.1:{metrics_port}/nothing")
    assert wrong.returncode == 1
    assert "answered 404" in wrong.stderr

    uid = container.exec("id", "-u")
    assert uid.returncode == 0, uid.stderr
    assert int(uid.stdout) != 0, "pgmux runs as root in the container"
    top = container.exec("cat", "/proc/1/cmdline")
    assert "pgmux" in top.stdout, f"PID 1 is not pgmux: {top.stdout!r}"

    # SIGTERM while one client is inside a transaction and another is idle.
    table = f"image_drain_{uuid.uuid4().hex[:8]}"
    pg.psql(f"CREATE TABLE {table} (x int); ALTER TABLE {table} OWNER TO {APP_USER}")
    try:
        busy = await asyncpg.connect(
            host="127.0.0.1", port=port, user=APP_USER, password=APP_PASSWORD,
            database=APP_DB, statement_cache_size=0, timeout=15,
        )  # fmt: skip
        idle = await asyncpg.connect(
            host="127.0.0.1", port=port, user=APP_USER, password=APP_PASSWORD,
            database=APP_DB, statement_cache_size=0, timeout=15,
        )  # fmt: skip
        try:
            await busy.execute(f"BEGIN; INSERT INTO {table} VALUES (42)")
            podman("kill", "--signal=TERM", container.name)
            container.wait_for_log("shutting down")
            assert container.state()["Running"], "pgmux did not wait for the transaction"
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
                await idle.fetchval("SELECT 1")  # idle clients are let go at once
            await busy.execute(f"INSERT INTO {table} VALUES (43); COMMIT")
            committed = time.monotonic()
            code = container.wait_exit(SHUTDOWN_TIMEOUT)
            took = time.monotonic() - committed
        finally:
            await busy.close(timeout=5)
            idle.terminate()
        assert code == 0, container.logs()
        assert took < SHUTDOWN_TIMEOUT / 2, f"exit {took:.1f} s after the last COMMIT"
        assert pg.psql(f"SELECT string_agg(x::text, ',' ORDER BY x) FROM {table}") == "42,43"
        assert "pgmux stopped" in container.logs()
    finally:
        pg.psql(f"DROP TABLE IF EXISTS {table}")


async def test_env_only_upstream(image: Image, run_container: Any, pg: PgCluster) -> None:
    """No config file: PGMUX_UPSTREAM and PGMUX_<KEY> variables alone."""
    port, metrics_port = free_port(), free_port()
    env = _loopback_env(port, metrics_port)
    env["PGMUX_UPSTREAM"] = pg.dsn()
    env["PGMUX_DEFAULT_POOL_SIZE"] = "3"
    container = run_container(env, port)
    assert await _query(port) == f"{APP_USER}@{APP_DB}"
    check = container.exec("pgmux", "--check")
    assert check.returncode == 0, check.stderr
    assert "default_pool_size = 3" in check.stdout
    assert "secret" not in check.stdout, "--check shows the password"
    health = image.healthcheck[1:]
    for argv in (health, [*health, "--ready"]):
        result = container.exec(*argv)
        assert result.returncode == 0, result.stderr
    result = container.exec("pgmux", "healthcheck", "--url", "http://127.0.0.1:1/healthz")
    assert result.returncode == 1, "a check that cannot fail is no check"
    _check_example_app(f"postgres://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{port}/{APP_DB}")
    podman("stop", "--time=30", container.name, timeout=60)
    assert container.state()["ExitCode"] == 0, container.logs()


def _check_example_app(database_url: str) -> None:
    """deploy/example-app/app.py (run here, not in its image) answers through pgmux,
    and a few PostgreSQL backends serve its connection-per-request."""
    port = free_port()
    env = dict(os.environ, DATABASE_URL=database_url, PORT=str(port))
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    app = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "deploy/example-app/app.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with no_proxy.open(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                if app.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        pids = set()
        for _ in range(5):
            with no_proxy.open(f"http://127.0.0.1:{port}/", timeout=15) as response:
                answer = json.loads(response.read())
            assert (answer["user"], answer["database"]) == (APP_USER, APP_DB), answer
            pids.add(answer["backend_pid"])
        assert len(pids) <= 3, f"5 requests took {len(pids)} backends: no pooling?"
    finally:
        app.terminate()
        out, _ = app.communicate(timeout=10)
    assert app.returncode == 0, out
