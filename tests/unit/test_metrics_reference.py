"""docs/metrics.md against the code: rendered from the families /metrics exports, every
family described (and nothing else), and the PgBouncer columns it names real ones."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin_show import SHOW_COMMANDS
from proxy.metrics import MetricsServer
from proxy.metrics_doc import (
    DATABASES,
    DESCRIPTIONS,
    GROUPS,
    POOL_COUNTERS,
    POOL_GAUGES,
    exposed_name,
    family_labels,
    render,
    sample_families,
    sample_snapshot,
)
from proxy.snapshot import Snapshot

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "metrics.md"
REGENERATE = "python -m proxy.metrics_doc > docs/metrics.md"

# pgbouncer_exporter names these differently from pgmux_ -> pgbouncer_.
EXPORTER_RENAMED = {"pgmux_max_client_connections": "pgbouncer_config_max_client_connections"}
SHOW_COLUMNS = re.compile(r"^SHOW (\w+) ((?:`\w+`(?:, )?)+)$")


@pytest.fixture(scope="module")
def families() -> list[Metric]:
    return sample_families()


def test_the_reference_is_up_to_date() -> None:
    assert REFERENCE.is_file(), f"docs/metrics.md is missing: run {REGENERATE}"
    assert REFERENCE.read_text() == render(), (
        f"docs/metrics.md differs from what proxy/metrics.py exports: run {REGENERATE}"
    )


def test_every_family_is_described(families: list[Metric]) -> None:
    exported = [exposed_name(family) for family in families]
    assert len(exported) == len(set(exported)), "a family is exported twice"
    missing = sorted(set(exported) - set(DESCRIPTIONS))
    extra = sorted(set(DESCRIPTIONS) - set(exported))
    assert not missing, f"describe these in proxy/metrics_doc.py DESCRIPTIONS: {missing}"
    assert not extra, f"DESCRIPTIONS describes families pgmux does not export: {extra}"
    assert {doc.group for doc in DESCRIPTIONS.values()} == set(GROUPS)


def test_the_sample_shows_every_label(families: list[Metric]) -> None:
    """Labels are read from samples, so every family needs one; the sample snapshot
    must be rich enough (extend sample_families when a new family has none)."""
    for family in families:
        assert family.samples, f"{family.name} has no sample: extend sample_families()"
    labels = {exposed_name(f): family_labels(f) for f in families}
    assert labels["pgmux_up"] == []
    assert labels["pgmux_databases_pool_size"] == ["database"]
    assert labels["pgmux_pins_total"] == ["database", "user", "reason"]
    errors = ["database", "user", "origin", "sqlstate_class", "reason"]
    assert labels["pgmux_errors_total"] == errors
    assert labels["pgmux_pool_wait_seconds"] == ["database", "user"]


def test_the_names_are_what_a_scrape_shows(families: list[Metric]) -> None:
    """The documented names against a real /metrics answer for the same snapshot: a
    counter as _total, a histogram as _bucket, _sum and _count."""
    snapshot = sample_snapshot()

    async def source() -> Snapshot:
        return snapshot

    answer = asyncio.run(MetricsServer(source).respond("GET", "/metrics", {}))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    samples = {s.name for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    shown = set()
    for family in families:
        name = exposed_name(family)
        if family.type == "histogram":
            expected = {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            expected = {name}
        assert expected <= samples, f"{name}: a scrape shows {sorted(samples)}"
        shown |= expected
    assert samples == shown, f"exported but not documented: {sorted(samples - shown)}"


def test_pgbouncer_columns_exist() -> None:
    """Each SHOW POOLS / DATABASES / STATS column named is one pgmux's console has (it
    has PgBouncer's columns, in PgBouncer's order)."""
    checked = 0
    for name, doc in DESCRIPTIONS.items():
        found = SHOW_COLUMNS.match(doc.show)
        if found is None:
            continue
        command = found.group(1).lower()
        if command not in ("pools", "databases", "stats"):
            continue
        columns = {column for column, _ in SHOW_COMMANDS[command].columns}
        for column in re.findall(r"`(\w+)`", found.group(2)):
            assert column in columns, f"{name}: SHOW {command.upper()} has no column {column}"
            checked += 1
    assert checked >= 30


def test_exporter_names_follow_the_prefix() -> None:
    """pgmux_X is pgbouncer_exporter's pgbouncer_X, except the few it renames."""
    for name, doc in DESCRIPTIONS.items():
        if doc.group in (POOL_GAUGES, POOL_COUNTERS, DATABASES):
            assert doc.show, f"{name}: which SHOW column?"
        if doc.exporter:
            expected = EXPORTER_RENAMED.get(name, name.replace("pgmux_", "pgbouncer_", 1))
            assert doc.exporter == expected, name
