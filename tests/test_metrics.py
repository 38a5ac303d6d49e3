"""The metrics exposition: Prometheus-valid names, no patient data in labels."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from ingest.mqtt import UnitGauges
from monitoring.metrics import PROTOCOLS, Metrics

DESIGN_METRICS = (
    "qantara_messages_received_total",
    "qantara_messages_stored_total",
    "qantara_messages_rejected_total",
    "qantara_messages_duplicate_total",
    "qantara_ingest_latency_seconds",
    "qantara_db_commit_seconds",
    "qantara_pipeline_pending",
    "qantara_mllp_connections",
    "qantara_dicom_associations",
    "qantara_mqtt_connected",
    "qantara_unit_last_seen_timestamp_seconds",
)


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_every_metric_of_the_design_is_exposed() -> None:
    metrics = Metrics()
    metrics.rejected.labels("mqtt", "not-json").inc()
    metrics.unit_last_seen.labels("UMMC-FM-001").set(1.0)
    text = exposition(metrics)
    for name in DESIGN_METRICS:
        assert f"# TYPE {name} " in text, name


def test_protocol_series_exist_at_zero_before_any_message() -> None:
    metrics = Metrics()
    for protocol in PROTOCOLS:
        assert metrics.sample("qantara_messages_stored_total", {"protocol": protocol}) == 0


def test_exposition_passes_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    metrics = Metrics()
    metrics.init_reasons("mqtt", ["not-json", "unknown-code"])
    metrics.ingest_latency.labels("mqtt").observe(0.01)
    metrics.unit_last_seen.labels("UMMC-FM-001").set(1.0)
    metrics.unit_backlog_age.labels("UMMC-FM-001").set(3600.0)
    metrics.unit_clock_skew.labels("UMMC-FM-001").inc()
    metrics.mqtt_delivery_delay.observe(3600.0)
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition(metrics).encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_a_unit_past_the_cap_gets_no_backlog_age_or_clock_skew_series() -> None:
    metrics = Metrics()
    units = UnitGauges(metrics, cap=1)
    units.backlog("UMMC-FM-001", 5.0, skewed=False)
    units.backlog("UMMC-FM-002", 0.0, skewed=True)
    assert metrics.sample("qantara_unit_backlog_age_seconds", {"unit": "UMMC-FM-001"}) == 5.0
    assert metrics.sample("qantara_unit_clock_skew_total", {"unit": "UMMC-FM-001"}) == 0
    assert metrics.sample("qantara_unit_backlog_age_seconds", {"unit": "UMMC-FM-002"}) is None
    assert metrics.sample("qantara_unit_clock_skew_total", {"unit": "UMMC-FM-002"}) is None
    assert metrics.sample("qantara_units_tracked") == 1
