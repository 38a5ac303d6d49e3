"""The production shape: docker-compose.yml, the Dockerfile, Prometheus' scrape configuration.

`docker compose config -q` validates the compose file where the Compose plugin (or the older
`docker-compose`) is installed; the structural tests below hold everywhere, with PyYAML (a
dependency of amqtt) only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS = ROOT / "monitoring" / "prometheus.yml"
SECRETS = "deploy/secrets/"
# What deploy/make_secrets.sh generates (checked by test_mqtt_acl.py, which runs it).
GENERATED = {"ca.crt", "broker.crt", "broker.key", "gateway.crt", "gateway.key", "passwd"}
GATEWAYS = ("gateway-1", "gateway-2")


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return document


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts.append((source[2:], target))
    return mounts


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def test_compose_config_validates_with_docker_compose() -> None:
    command = compose_command()
    if command is None:
        pytest.fail("no docker compose nor docker-compose: `make test` installs docker-compose")
    env = {
        **os.environ,
        "QANTARA_DB_PASSWORD": "test-only",
        "QANTARA_DB_ADMIN_PASSWORD": "test-only",
        "QANTARA_DB_API_PASSWORD": "test-only",
        "QANTARA_MQTT_PASSWORD": "test-only",
        "GRAFANA_ADMIN_PASSWORD": "test-only",
    }
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_production_services_are_all_there() -> None:
    assert {"db", "broker", *GATEWAYS, "prometheus", "grafana"} <= set(services())


def test_every_image_is_official_and_pinned_to_a_tag() -> None:
    official = ("timescale/timescaledb:", "eclipse-mosquitto:", "prom/prometheus:v", "grafana/")
    for name, service in services().items():
        if "build" not in service:
            image = service["image"]
            assert image.startswith(official), name
            assert not image.endswith(":latest"), name


def test_two_gateway_replicas_share_database_group_and_dicom_volume_with_own_client_ids() -> None:
    replicas = [services()[name] for name in GATEWAYS]
    environments = [replica["environment"] for replica in replicas]
    assert environments[0]["QANTARA_MQTT_CLIENT_ID"] != environments[1]["QANTARA_MQTT_CLIENT_ID"]
    for key in ("QANTARA_DATABASE_URL", "QANTARA_MQTT_SHARED_GROUP", "QANTARA_MQTT_URL"):
        assert environments[0][key] == environments[1][key], key
    assert environments[0]["QANTARA_MQTT_SHARED_GROUP"]
    assert environments[0]["QANTARA_MQTT_URL"].startswith("mqtts://")
    for replica, environment in zip(replicas, environments, strict=True):
        assert "dicom-data:/app/var/dicom" in replica["volumes"]
        assert environment["QANTARA_DICOM_STORAGE"] == "/app/var/dicom"
        assert environment["QANTARA_MQTT_CA_FILE"]


def test_replicas_publish_distinct_host_ports() -> None:
    published = [port for name in GATEWAYS for port in services()[name]["ports"]]
    hosts = [port.rsplit(":", 1)[0] for port in published]
    assert len(hosts) == len(set(hosts))


def test_broker_listens_with_tls_only_and_loads_password_file_and_acl() -> None:
    broker = services()["broker"]
    assert broker["ports"] == ["8883:8883"]
    targets = {target for _, target in bind_mounts(broker)}
    assert "/mosquitto/config/mosquitto.conf" in targets
    assert "/mosquitto/config/acl" in targets
    assert "/mosquitto/secrets/passwd" in targets
    config = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text(encoding="utf-8")
    assert re.findall(r"^listener (.*)$", config, re.MULTILINE) == ["8883"]
    assert re.search(r"^allow_anonymous false$", config, re.MULTILINE)
    assert re.search(r"^persistence true$", config, re.MULTILINE)
    for directive in ("cafile", "certfile", "keyfile", "password_file", "acl_file"):
        assert re.search(rf"^{directive} /mosquitto/", config, re.MULTILINE), directive


def test_acl_confines_units_to_their_subtree_and_gives_the_gateway_units_plus() -> None:
    acl = (ROOT / "deploy" / "mosquitto" / "acl").read_text(encoding="utf-8")
    lines = [line.strip() for line in acl.splitlines() if line.strip() and line[0] != "#"]
    assert "pattern readwrite units/%u/#" in lines
    assert "topic read units/+/vitals" in lines
    # readwrite: replicas read the retained acks to repair one another's (docs/scaling.md)
    assert "topic readwrite units/+/ack" in lines


def test_every_mounted_repository_file_exists_or_is_generated_by_make_certs() -> None:
    for name, service in services().items():
        for source, _ in bind_mounts(service):
            if source.startswith(SECRETS):
                assert source.removeprefix(SECRETS) in GENERATED, (name, source)
            else:
                assert (ROOT / source).exists(), (name, source)


def test_prometheus_loads_the_rules_and_grafana_the_dashboard_and_datasource() -> None:
    prometheus = {target: source for source, target in bind_mounts(services()["prometheus"])}
    assert prometheus["/etc/prometheus/alerts.yml"] == "monitoring/alerts.yml"
    assert prometheus["/etc/prometheus/prometheus.yml"] == "monitoring/prometheus.yml"
    grafana = {target: source for source, target in bind_mounts(services()["grafana"])}
    assert grafana["/etc/grafana/provisioning"] == "monitoring/grafana/provisioning"
    dashboards = yaml.safe_load(
        (ROOT / "monitoring/grafana/provisioning/dashboards/qantara.yml").read_text()
    )
    folder = dashboards["providers"][0]["options"]["path"]
    assert grafana[f"{folder}/dashboard.json"] == "monitoring/dashboard.json"
    datasources = yaml.safe_load(
        (ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def test_prometheus_scrapes_both_replicas_and_its_config_passes_promtool() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "qantara")
    targets = {target for group in job["static_configs"] for target in group["targets"]}
    assert targets == {f"{name}:8080" for name in GATEWAYS}
    assert config["rule_files"] == ["alerts.yml"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_secret_in_the_compose_file_and_every_variable_in_env_example() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    documented = set(re.findall(r"^([A-Z_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert used <= documented
    for name, service in services().items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if "PASSWORD" in key:
                assert str(value).startswith("${"), (name, key)
        if "QANTARA_DATABASE_URL" in environment:
            assert environment["QANTARA_DATABASE_URL"].startswith("postgresql://qantara:${")


def test_generated_secrets_are_git_ignored() -> None:
    ignore = (ROOT / "deploy" / "secrets" / ".gitignore").read_text().splitlines()
    assert "*" in ignore
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_dockerfile_is_slim_runs_as_non_root_and_checks_healthz() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    base = next(line for line in lines if line.startswith("FROM "))
    assert base.endswith("-slim")
    user = [line.split()[1] for line in lines if line.startswith("USER ")][-1]
    assert user.split(":")[0] not in ("root", "0")
    healthcheck = DOCKERFILE.read_text().split("HEALTHCHECK", 1)[1]
    assert "/healthz" in healthcheck.split("CMD [", 1)[1].split("]", 1)[0]
