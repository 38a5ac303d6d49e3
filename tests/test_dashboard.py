"""The Grafana dashboard: valid JSON, and every metric it queries is one the gateway exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitoring.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "monitoring" / "dashboard.json"
METRIC_NAME = re.compile(r"\bqantara_[a-z0-9_]+")
DATASOURCE_UID = "qantara-prometheus"  # monitoring/grafana/provisioning/datasources/

# Suffixes of the series Prometheus scrapes for each metric type.
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return document


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in document["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(document: dict[str, Any]) -> list[str]:
    found = [
        target["expr"]
        for panel in panels(document)
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in document["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append(query.get("query", ""))
    return found


def exposed_series_names() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        for suffix in SERIES_SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def test_dashboard_is_valid_json_with_panels_and_a_stable_uid() -> None:
    document = dashboard()
    assert document["uid"] == "qantara-gateway"
    assert document["title"]
    assert any(panel["type"] != "row" for panel in panels(document))


def test_every_metric_the_dashboard_queries_exists_in_the_registry() -> None:
    exposed = exposed_series_names()
    used = {name for expr in expressions(dashboard()) for name in METRIC_NAME.findall(expr)}
    assert used, "the dashboard queries no qantara_ metric"
    assert used - exposed == set()


def test_panel_ids_are_unique() -> None:
    ids = [panel["id"] for panel in panels(dashboard())]
    assert len(ids) == len(set(ids))


def test_every_query_uses_the_provisioned_prometheus_datasource() -> None:
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]


def test_the_dashboard_covers_the_operations_views() -> None:
    used = {name for expr in expressions(dashboard()) for name in METRIC_NAME.findall(expr)}
    assert {
        "qantara_messages_received_total",
        "qantara_messages_rejected_total",
        "qantara_ingest_latency_seconds_bucket",
        "qantara_db_commit_seconds_bucket",
        "qantara_pipeline_pending",
        "qantara_unit_last_seen_timestamp_seconds",
        "qantara_unit_backlog_age_seconds",
        "qantara_mqtt_delivery_delay_seconds_bucket",
        "qantara_db_available",
        "qantara_mqtt_connected",
        "qantara_mllp_connections",
        "qantara_dicom_associations",
    } <= used


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    grafana_variables = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "1h",
        "$instance": ".*",
        "$protocol": ".*",
    }
    rules = []
    for number, expr in enumerate(expressions(dashboard())):
        for variable, value in grafana_variables.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
