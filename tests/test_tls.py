"""TLS on the wires: the gateway's HTTPS listener and its mqtts:// session with CA verification.

The certificates come from `deploy/make_secrets.sh` (the same script `make certs` runs), and
the broker is a private Mosquitto with the production configuration (`tests.test_mqtt_acl`):
TLS only, no anonymous clients, per-unit ACLs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from ingest.certificate_dates import next_update, not_after
from tests.gateway_process import GatewayProcess
from tests.services_support import wait_until
from tests.test_mqtt_acl import GATEWAY, UNIT, Broker, _client, broker

__all__ = ["broker"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
async def gateway(broker: Broker, module_dsn: str) -> AsyncIterator[GatewayProcess]:
    secrets = broker.secrets
    process = GatewayProcess(
        database_url=module_dsn,
        mqtt_url=f"mqtts://127.0.0.1:{broker.port}",
        env={
            "QANTARA_MQTT_CA_FILE": str(secrets / "ca.crt"),
            "QANTARA_MQTT_USERNAME": GATEWAY,
            "QANTARA_MQTT_PASSWORD": broker.password(GATEWAY),
            "QANTARA_MQTT_SESSION_EXPIRY": "60",
            "QANTARA_HTTP_TLS_CERT": str(secrets / "gateway.crt"),
            "QANTARA_HTTP_TLS_KEY": str(secrets / "gateway.key"),
        },
        https_ca=secrets / "ca.crt",
    )
    async with process:
        yield process


def https(broker: Broker) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=str(broker.secrets / "ca.crt"))
    return httpx.AsyncClient(verify=context, timeout=5.0)


async def test_http_listener_answers_over_tls_with_its_certificate(
    gateway: GatewayProcess, broker: Broker
) -> None:
    async with https(broker) as client:
        response = await client.get(f"https://127.0.0.1:{gateway.port}/healthz")
    assert response.status_code == 200


async def test_metrics_give_when_the_http_certificate_expires(
    gateway: GatewayProcess, broker: Broker
) -> None:
    async with https(broker) as client:
        response = await client.get(f"https://127.0.0.1:{gateway.port}/metrics")
    [line] = [
        line
        for line in response.text.splitlines()
        if line.startswith('qantara_tls_certificate_expiry_timestamp_seconds{listener="http"}')
    ]
    expected = not_after(broker.secrets / "gateway.crt").timestamp()
    assert float(line.rsplit(" ", 1)[1]) == expected
    assert expected > datetime.now(UTC).timestamp()


async def test_http_listener_refuses_plain_http_and_counts_it(gateway: GatewayProcess) -> None:
    failures = {"listener": "http", "reason": "protocol"}
    before = (await gateway.metrics()).get("qantara_tls_handshake_failures_total", **failures)
    async with httpx.AsyncClient(timeout=5.0) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(f"http://127.0.0.1:{gateway.port}/healthz")
    await gateway.wait_metric("qantara_tls_handshake_failures_total", failures, before + 1)


async def test_gateway_session_over_mqtts_verifies_the_broker_and_stores_a_unit_s_vitals(
    gateway: GatewayProcess, broker: Broker, module_dsn: str
) -> None:
    async with https(broker) as client:

        async def ready() -> bool:
            response = await client.get(f"https://127.0.0.1:{gateway.port}/readyz")
            return response.status_code == 200

        await wait_until(ready, timeout=30, message="the gateway never became ready over mqtts")
    cin = f"TLS{uuid.uuid4().hex[:8].upper()}"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    payload = {
        "v": 1,
        "seq": 1,
        "sent_at": now,
        "device": {"id": "MON-TLS", "kind": "multiparameter-monitor"},
        "patient": {"system": "CIN", "value": cin},
        "samples": [{"t": now, "code": "hr", "value": 71, "unit": "/min"}],
    }
    unit = await asyncio.to_thread(_client, broker, UNIT, broker.password(UNIT), "tls-unit")
    try:
        code = await asyncio.to_thread(
            unit.publish, f"units/{UNIT}/vitals", json.dumps(payload).encode()
        )
        assert not code.is_failure
        conn = await asyncpg.connect(module_dsn)
        try:

            async def stored() -> bool:
                count = await conn.fetchval(
                    """SELECT count(*) FROM vital v
                       JOIN patient_identifier pi ON pi.patient_id = v.patient_id
                       WHERE pi.system = 'CIN' AND pi.value = $1""",
                    cin,
                )
                return bool(count == 1)

            await wait_until(stored, timeout=30, message="the vitals sent over TLS never landed")
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(unit.paho.disconnect)
        await asyncio.to_thread(unit.paho.loop_stop)


async def test_sighup_reloads_the_listeners_tls_files_and_the_gateway_serves_on(
    broker: Broker, module_dsn: str
) -> None:
    secrets = broker.secrets
    files = {
        "TLS_CERT": secrets / "gateway.crt",
        "TLS_KEY": secrets / "gateway.key",
        "TLS_CLIENT_CA": secrets / "ca.crt",
        "TLS_CRL": secrets / "crl.pem",
    }
    env = {
        f"QANTARA_{listener}_{name}": str(path)
        for listener in ("MLLP", "DICOM")
        for name, path in files.items()
    }
    env |= {
        "QANTARA_HTTP_TLS_CERT": str(secrets / "gateway.crt"),
        "QANTARA_HTTP_TLS_KEY": str(secrets / "gateway.key"),
        "QANTARA_MQTT_CA_FILE": str(secrets / "ca.crt"),
        "QANTARA_MQTT_USERNAME": GATEWAY,
        "QANTARA_MQTT_PASSWORD": broker.password(GATEWAY),
    }
    process = GatewayProcess(
        database_url=module_dsn,
        mqtt_url=f"mqtts://127.0.0.1:{broker.port}",
        env=env,
        https_ca=secrets / "ca.crt",
    )
    async with process:
        await process.wait_ready()
        assert process.pid is not None
        os.kill(process.pid, signal.SIGHUP)

        def reloaded() -> bool:
            log = "\n".join(process.log_lines)
            return all(f"{name} TLS files reloaded" in log for name in ("http", "mllp", "dicom"))

        await wait_until(reloaded, timeout=10, message="no reload in the log")
        assert process.running
        assert await process.readyz_status() == 200
        metrics = await process.metrics()
        crl = next_update(secrets / "crl.pem").timestamp()
        assert metrics.get("qantara_tls_crl_next_update_timestamp_seconds", listener="dicom") == crl
