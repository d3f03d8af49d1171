"""deploy/ against the code: every metric, label, reason and setting the Prometheus alerts
and the Grafana dashboard name is one pgmux has, and the files hold together.

The exported names come from a real /metrics answer, not a list: ``MetricsServer.respond``
renders a merged snapshot of an unstarted Registry (no listener, no HTTP server, no
PostgreSQL) whose pools, made through ``Registry.pool_for``, have counted a wait, a pin
and errors, so every family has samples with all its labels. Names are compared with the
exposition's sample names, so a histogram is only usable as ``_bucket``/``_sum``/``_count``
and a counter only with ``_total``.

PyYAML is not a dependency: the YAML files are read as text. A rule is the text from one
``- alert:`` to the next; its expression is the ``expr:`` line, or the block under
``expr: |``. When ``promtool`` is installed, it also checks the files and the dashboard's
PromQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import (
    Config,
    DatabaseConfig,
    MetricsConfig,
    UserConfig,
    config_items,
    parse_config,
)
from proxy.errors import ProxyError
from proxy.metrics import MetricsServer
from proxy.pool import Registry
from proxy.snapshot import Snapshot, merge, take

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "pgmux-alerts.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "pgmux-dashboard.json"

# Labels a selector or a grouping may name: pgmux's own, the histograms' le, and the two
# Prometheus adds to every scraped series.
ALLOWED_LABELS = {"database", "user", "reason", "sqlstate_class", "origin", "le"}
TARGET_LABELS = {"instance", "job"}
JOB = "pgmux"  # prometheus.yml's job_name; every alert selects it

METRIC = re.compile(r"(?<![\w:])pgmux_[a-z0-9_]+")
SELECTOR = re.compile(r"(?P<metric>[a-zA-Z_:][\w:]*)?\{(?P<body>[^{}]*)\}")
MATCHER = re.compile(
    r'\s*(?P<label>[a-zA-Z_]\w*)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*'
)
GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\((?P<labels>[^()]*)\)"
)


# -- what pgmux exports ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample name -> its label names, from a /metrics answer of a registry with pools."""

    async def scrape() -> bytes:
        config = parse_config({"databases": {"app": {"pool_size": 5}, "other": {}}})
        registry = Registry(config, asyncio.get_running_loop())
        for database, user in (("app", "alice"), ("other", "bob")):
            stats = registry.pool_for(config.databases[database], user, None).stats
            stats.count_wait(0.02)
            stats.count_pin("set")
            stats.count_error("42P01")
            stats.count_pooler_error("query_wait_timeout", "57014")
        registry.stats.count_pooler_error("authentication_failed", "28P01")  # no pool yet

        async def source() -> Snapshot:
            return merge([take(registry)])

        return await MetricsServer(source).respond("GET", "/metrics", {})

    head, _, body = asyncio.run(scrape()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_the_exposition_has_every_kind_of_family(exported: dict[str, set[str]]) -> None:
    """The fixture's scrape is rich enough to judge the files by: pool, database and
    instance families, histograms, and the labelled counters with samples."""
    assert exported["pgmux_up"] == set()
    assert exported["pgmux_databases_pool_size"] == {"database"}
    assert exported["pgmux_pools_client_active_connections"] == {"database", "user"}
    assert exported["pgmux_pool_wait_seconds_bucket"] == {"database", "user", "le"}
    assert exported["pgmux_pins_total"] == {"database", "user", "reason"}
    assert exported["pgmux_errors_total"] == {
        "database", "user", "origin", "sqlstate_class", "reason",
    }  # fmt: skip
    assert all(labels <= ALLOWED_LABELS | {"version"} for labels in exported.values())


# -- reading the files ---------------------------------------------------------------------


def _yaml_lines(path: Path) -> list[str]:
    """The file's lines, comment lines blanked (line numbers kept)."""
    return ["" if line.lstrip().startswith("#") else line for line in path.read_text().split("\n")]


def _alert_rules() -> list[tuple[str, str, str]]:
    """(alert name, its expression, the rest of its text) for every rule."""
    rules: list[tuple[str, str, str]] = []
    lines = _yaml_lines(ALERTS_YML)
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("- alert:")]
    for start, end in zip(starts, [*starts[1:], len(lines)], strict=True):
        chunk = lines[start:end]
        name = chunk[0].split(":", 1)[1].strip()
        expr_lines: list[str] = []
        rest: list[str] = []
        in_expr = -1  # the indentation of the expr key while reading its block
        for line in chunk:
            indent = len(line) - len(line.lstrip())
            if in_expr >= 0 and (not line.strip() or indent > in_expr):
                expr_lines.append(line.strip())
                continue
            in_expr = -1
            key, _, value = line.strip().partition(":")
            if key == "expr":
                if value.strip() in ("|", "|-", ">", ">-"):
                    in_expr = indent
                else:
                    expr_lines.append(value.strip())
            else:
                rest.append(line)
        rules.append((name, " ".join(filter(None, expr_lines)), "\n".join(rest)))
    return rules


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_JSON.read_text())
    return dashboard


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    dashboard = _dashboard()
    exprs = [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append((f"variable {variable['name']}", variable["definition"]))
    return exprs


def _all_exprs() -> list[tuple[str, str]]:
    alerts = [(f"alert {name}", expr) for name, expr, _ in _alert_rules()]
    return alerts + _dashboard_exprs()


def _expr_params() -> list[Any]:
    return [pytest.param(where, expr, id=where) for where, expr in _all_exprs()]


def _proxy_reasons() -> set[str]:
    found: set[str] = set()
    todo: list[type[ProxyError]] = [ProxyError]
    while todo:
        cls = todo.pop()
        found.add(cls.reason)
        todo.extend(cls.__subclasses__())
    return found


# -- metrics and labels --------------------------------------------------------------------


def test_expressions_were_found() -> None:
    """Guards the text parsing itself: an empty result would make every check pass."""
    rules = _alert_rules()
    assert len(rules) >= 8 and all(expr for _, expr, _ in rules)
    assert len(_dashboard_exprs()) >= 20
    assert all(METRIC.search(expr) or expr.startswith("up{") for _, expr in _all_exprs())


@pytest.mark.parametrize(("where", "expr"), _expr_params())
def test_every_metric_is_exported(exported: dict[str, set[str]], where: str, expr: str) -> None:
    unknown = sorted(set(METRIC.findall(expr)) - set(exported))
    assert not unknown, f"{where} uses metrics pgmux does not export: {unknown}"


@pytest.mark.parametrize(("where", "expr"), _expr_params())
def test_selectors_use_the_metrics_labels(
    exported: dict[str, set[str]], where: str, expr: str
) -> None:
    """Each selector names only labels its own metric has (a database family has no user),
    and groupings only labels pgmux or Prometheus put on series."""
    for found in SELECTOR.finditer(expr):
        body = found["body"]
        matchers = list(MATCHER.finditer(body))
        assert ",".join(m.group(0) for m in matchers) == body, f"{where}: unparsed {body!r}"
        labels = {m["label"] for m in matchers}
        metric = found["metric"]
        if metric is None or metric == "up":
            assert labels <= TARGET_LABELS, f"{where}: {labels} on {metric}"
        else:
            assert metric in exported, f"{where}: {metric}"
            extra = labels - exported[metric] - TARGET_LABELS
            assert not extra, f"{where}: {metric} has no label {sorted(extra)}"
    for grouping in GROUPING.finditer(expr):
        labels = {label.strip() for label in grouping["labels"].split(",") if label.strip()}
        extra = labels - ALLOWED_LABELS - TARGET_LABELS
        assert not extra, f"{where}: grouping by unknown labels {sorted(extra)}"


@pytest.mark.parametrize(("where", "expr"), _expr_params())
def test_label_values_are_real(where: str, expr: str) -> None:
    """origin is "pgmux" or "server"; a reason named in a matcher is one pgmux sends."""
    reasons = _proxy_reasons()
    for selector in SELECTOR.finditer(expr):
        for matcher in MATCHER.finditer(selector["body"]):
            value = matcher["value"]
            values = set(value.split("|")) if matcher["op"] in ("=~", "!~") else {value}
            if matcher["label"] == "origin":
                assert values <= {"pgmux", "server"}, where
            if matcher["label"] == "reason":
                assert values <= reasons, f"{where}: unknown reasons {sorted(values - reasons)}"


# -- the alert rules -----------------------------------------------------------------------


def test_alert_rules_are_complete() -> None:
    """Unique names; a severity, a summary and a description on each; every metric
    selector restricted to the scrape job of prometheus.yml."""
    rules = _alert_rules()
    names = [name for name, _, _ in rules]
    assert len(names) == len(set(names))
    for name, expr, rest in rules:
        assert re.search(r"^\s+severity: (critical|warning|info)$", rest, re.M), name
        for key in ("summary", "description"):
            assert re.search(rf"^\s+{key}: \S", rest, re.M), f"{name} has no {key}"
        for found in SELECTOR.finditer(expr):
            assert f'job="{JOB}"' in found["body"], f"{name}: {found.group(0)} lacks the job"


def test_alert_texts_name_real_settings(exported: dict[str, set[str]]) -> None:
    """Every snake_case word in the summaries and descriptions is a pgmux setting, a
    reason or a metric: the knob an alert tells you to turn exists."""
    settings = {item.key.rpartition(".")[2] for item in config_items()}
    for cls in (Config, DatabaseConfig, UserConfig, MetricsConfig):
        settings |= {f.name for f in dataclasses.fields(cls)}
    postgres = {"max_connections", "pg_hba"}  # PostgreSQL's setting, and pg_hba.conf
    known = settings | _proxy_reasons() | set(exported) | postgres
    for name, _, rest in _alert_rules():
        words = set(re.findall(r"(?<![\w.$])[a-z]+(?:_[a-z]+)+\b", rest))
        assert words <= known, f"{name} names unknown settings {sorted(words - known)}"


def test_the_alerts_cover_pooling_trouble() -> None:
    exprs = " ".join(expr for _, expr, _ in _alert_rules())
    for needed in (
        'up{job="pgmux"}',
        "absent(pgmux_up",
        "pgmux_pools_client_maxwait_seconds",
        "pgmux_pools_server_active_connections",
        "pgmux_pools_pool_size",
        "pgmux_max_client_connections",
        'origin="pgmux", reason="query_wait_timeout"',
        "pgmux_pools_client_idle_in_transaction_connections",
        "pgmux_paused",
    ):
        assert needed in exprs, needed


# -- prometheus.yml ------------------------------------------------------------------------


def test_scrape_config_matches_the_code() -> None:
    """The job is the alerts' job, targets use pgmux's default metrics port, and the rule
    files it loads exist next to it."""
    text = "\n".join(_yaml_lines(PROMETHEUS_YML))
    assert re.search(rf"^\s+- job_name: {JOB}$", text, re.M)
    assert re.search(r"^\s+scrape_interval: 15s$", text, re.M)
    targets = re.findall(r'^\s+- "([^"]+)"$', text, re.M)
    port = MetricsConfig().listen_port
    assert targets and all(t.endswith(f":{port}") for t in targets), targets
    block = re.search(r"^rule_files:\n((?:\s+- .+\n)+)", text, re.M)
    assert block is not None
    files = [line.strip()[2:].strip() for line in block.group(1).splitlines()]
    assert files == [ALERTS_YML.name]
    assert all((PROMETHEUS_YML.parent / name).is_file() for name in files)
    # The commented-out Kubernetes alternative is still there, with the same port.
    raw = PROMETHEUS_YML.read_text()
    assert "kubernetes_sd_configs" in raw and f'prometheus.io/port: "{port}"' in raw


# -- the dashboard -------------------------------------------------------------------------


def test_dashboard_panels() -> None:
    """Unique ids; every panel but a row queries the chosen data source; no two overlap."""
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["id"])
                assert other == panel["id"], f"panels {other} and {panel['id']} overlap"
        if panel["type"] == "row":
            assert not panel.get("targets")
            continue
        targets = panel.get("targets", [])
        assert any(t.get("expr", "").strip() for t in targets), f"{panel['title']}: no expr"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for owner in (panel, *targets):
            assert owner["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("database", "user"):
        definition = variables[name]["definition"]
        assert definition.startswith("label_values(pgmux_pools_client_active_connections")
        assert definition.endswith(f", {name})")
        # "All" must match the empty database and user of errors before a pool.
        assert variables[name]["allValue"] == ".*"
    used = {name for _, expr in _dashboard_exprs() for name in re.findall(r"\$(\w+)", expr)}
    assert used - {"__rate_interval"} <= set(variables), used


def test_dashboard_covers_the_pooling_questions() -> None:
    exprs = " ".join(expr for _, expr in _dashboard_exprs())
    for needed in (
        "pgmux_pools_client_waiting_connections",
        "pgmux_pools_server_used_connections",
        "pgmux_pools_server_login_connections",
        "rate(pgmux_stats_sql_transactions_pooled_total",
        "rate(pgmux_stats_queries_pooled_total",
        "rate(pgmux_stats_server_in_transaction_seconds_total",
        'sum by (sqlstate_class) (rate(pgmux_errors_total{job=~"$job"',
        "pgmux_prepared_statement_cache_misses_total",
        "pgmux_pins_total",
        "pgmux_pools_client_idle_in_transaction_connections",
    ):
        assert needed in exprs, needed
    for histogram in ("pool_wait", "transaction_duration", "query_duration"):
        for q in ("0.5", "0.99"):
            assert f"histogram_quantile({q}, sum by (database, user, le) " in exprs
            assert f"(rate(pgmux_{histogram}_seconds_bucket" in exprs


# -- promtool, when installed --------------------------------------------------------------


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_files(tmp_path: Path) -> None:
    """promtool parses the config, the rules, and every dashboard expression (as recording
    rules, with Grafana's variables filled in; JSON is YAML)."""
    for args in (["check", "config", str(PROMETHEUS_YML)], ["check", "rules", str(ALERTS_YML)]):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    rules = []
    for n, (_, expr) in enumerate(_dashboard_exprs()):
        if expr.startswith("label_values("):
            expr = expr[len("label_values(") : expr.rindex(",")]
        expr = expr.replace("$__rate_interval", "1m")
        rules.append({"record": f"dashboard:expr_{n}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
