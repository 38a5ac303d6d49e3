"""The alert rules: valid for Prometheus, unit-tested with promtool, each with its runbook.

promtool comes with Debian's `prometheus` package, which `make test` installs (`system-deps`).
PyYAML is a dependency of amqtt, so it is installed with the gateway.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitoring.health import record_readiness, record_storage_usage
from monitoring.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitoring" / "alerts.yml"
RULE_TESTS = ROOT / "monitoring" / "alerts_test.yml"
RUNBOOKS = ROOT / "docs" / "runbooks"
PROMTOOL_TIMEOUT = 60.0

# Labels a summary or description may show: none of them can carry patient data.
ALLOWED_TEMPLATE_LABELS = {
    "job",
    "instance",
    "protocol",
    "reason",
    "check",
    "cause",
    "unit",
    "listener",
    "outcome",
    "scope",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
        cwd=ROOT,
    )


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_passes() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_issue_s_alerts_are_all_defined() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "QantaraGatewayDown",
        "QantaraGatewayNotReady",
        "QantaraDbCommitLatencyHigh",
        "QantaraPipelinePendingGrowing",
        "QantaraRejectionRateHigh",
        "QantaraDeadLettersGrowing",
        "QantaraUnitSilent",
        "QantaraUnitBacklogOld",
        "QantaraMqttDisconnected",
        "QantaraListenerDown",
        "QantaraDicomStorageLow",
    } <= names


def test_every_alert_links_its_runbook_page_which_exists() -> None:
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        assert url == f"docs/runbooks/{rule['alert']}.md", rule["alert"]
        assert (ROOT / url).is_file(), f"{url} is missing"


def test_every_alert_has_a_severity_summary_and_description() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_annotations_show_only_labels_without_patient_data() -> None:
    for rule in alert_rules():
        for text in rule["annotations"].values():
            shown = set(re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", text))
            assert shown <= ALLOWED_TEMPLATE_LABELS, (rule["alert"], shown)


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    document = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def test_every_alert_is_in_the_operations_guide_s_table() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| \[(Qantara[A-Za-z0-9]+)\]\(runbooks/", guide, re.MULTILINE))
    assert listed == {rule["alert"] for rule in alert_rules()}


def test_every_runbook_page_belongs_to_an_alert() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    pages = {page.stem for page in RUNBOOKS.glob("*.md")} - {"README"}
    assert pages == names


def test_readiness_evaluation_sets_the_ready_gauge_and_one_per_check() -> None:
    metrics = Metrics()
    assert metrics.sample("qantara_ready") == 0  # not ready until first evaluated
    assert record_readiness(metrics, {"database": True, "mqtt": True}) is True
    assert metrics.sample("qantara_ready") == 1
    assert record_readiness(metrics, {"database": True, "mqtt": False}) is False
    assert metrics.sample("qantara_ready") == 0
    assert metrics.sample("qantara_readiness_check", {"check": "mqtt"}) == 0
    assert metrics.sample("qantara_readiness_check", {"check": "database"}) == 1


def test_storage_usage_sets_free_and_total_bytes_of_the_store_s_file_system(
    tmp_path: Path,
) -> None:
    metrics = Metrics()
    assert record_storage_usage(metrics, tmp_path) is True
    usage = shutil.disk_usage(tmp_path)
    total = metrics.sample("qantara_dicom_storage_total_bytes")
    free = metrics.sample("qantara_dicom_storage_free_bytes")
    assert total == usage.total
    assert free is not None
    assert 0 < free <= usage.total


def test_storage_usage_says_whether_the_store_s_volume_is_mounted(tmp_path: Path) -> None:
    metrics = Metrics()
    check = tmp_path / ".volume"
    record_storage_usage(metrics, tmp_path)
    assert metrics.sample("qantara_dicom_storage_mounted") is None  # no check: not exported
    check.touch()
    record_storage_usage(metrics, tmp_path, check)
    assert metrics.sample("qantara_dicom_storage_mounted") == 1
    check.unlink()
    record_storage_usage(metrics, tmp_path, check)
    assert metrics.sample("qantara_dicom_storage_mounted") == 0


def test_storage_usage_of_a_missing_folder_leaves_the_gauges_alone(tmp_path: Path) -> None:
    metrics = Metrics()
    assert record_storage_usage(metrics, tmp_path / "missing") is False
    assert metrics.sample("qantara_dicom_storage_total_bytes") == 0
