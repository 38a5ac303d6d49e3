"""Health, readiness, metrics, the access log and the internal-error boundary."""

from __future__ import annotations

import asyncio
import logging
import re

import asyncpg
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response

from gateway.http import ApiSettings, create_app
from monitoring.metrics import Metrics
from tests.gateway_process import GatewayProcess
from tests.http_support import BASE_URL, AppFactory, validate_fhir


async def test_healthz_answers_ok_without_a_token(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_200_when_every_check_holds(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": True, "mqtt": True}


async def test_readyz_is_503_and_names_the_failing_check(
    client: httpx.AsyncClient, readiness_checks: dict[str, bool]
) -> None:
    readiness_checks["mqtt"] = False
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": True, "mqtt": False}


async def test_metrics_text_parses_and_holds_the_gateway_metrics(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert "qantara_messages_received" in names
    assert "qantara_db_commit_seconds" in names


async def test_unknown_route_is_a_404_operation_outcome(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/Encounter")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/fhir+json")
    validate_fhir(response.json())


async def test_other_method_is_a_405_operation_outcome(
    client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    response = await client.post("/fhir/Observation", headers=reader)
    assert response.status_code == 405
    assert response.json()["issue"][0]["code"] == "not-supported"


async def test_access_log_has_route_template_status_and_no_query_or_id(
    client: httpx.AsyncClient, reader: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.http.access"):
        await client.get("/fhir/Patient/987654321", headers=reader)
        await client.get("/fhir/Patient?identifier=CIN|SECRET123", headers=reader)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.http.access"]
    assert lines[0].startswith("GET /fhir/Patient/{id} 404 ")
    assert lines[1].startswith("GET /fhir/Patient 200 ")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "987654321" not in text
    assert "SECRET123" not in text
    assert "Bearer" not in text
    assert "qtk_" not in text


async def test_each_request_is_counted_and_timed_by_route_template_and_status(
    make_client: AppFactory, reader: dict[str, str]
) -> None:
    metrics = Metrics()
    client = make_client(metrics=metrics)
    await client.get("/fhir/Patient/987654321", headers=reader)
    await client.get("/fhir/Patient/123456789", headers=reader)
    await client.get("/fhir/Patient?identifier=CIN|SECRET123")  # no token
    await client.get("/fhir/Encounter")

    def count(route: str, code: str) -> float | None:
        return metrics.sample("qantara_http_requests_total", {"route": route, "code": code})

    assert count("/fhir/Patient/{id}", "404") == 2
    assert count("/fhir/Patient", "401") == 1
    assert count("-", "404") == 1
    timed = {"route": "/fhir/Patient/{id}"}
    assert metrics.sample("qantara_http_request_seconds_count", timed) == 2
    exposition = generate_latest(metrics.registry).decode()
    assert "987654321" not in exposition
    assert "SECRET123" not in exposition


async def test_unexpected_exception_is_a_500_outcome_logged_without_its_message(
    api_pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(pool=api_pool, metrics=Metrics(), readiness=dict, api=ApiSettings())

    async def boom(request: Request) -> Response:
        raise RuntimeError("patient AB123456 Fatima")

    app.add_route("/boom", boom)
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.INFO):
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            response = await client.get("/boom")
    assert response.status_code == 500
    body = response.json()
    validate_fhir(body)
    assert body["issue"][0]["code"] == "exception"
    text = "\n".join(r.getMessage() for r in caplog.records) + response.text
    assert "AB123456" not in text
    assert "RuntimeError" in text
    assert all(r.exc_info is None for r in caplog.records)


async def test_database_unreachable_is_a_503_outcome_with_retry_after(api_dsn: str) -> None:
    pool = await asyncpg.create_pool(api_dsn, min_size=1, max_size=1)
    await pool.close()
    app = create_app(pool=pool, metrics=Metrics(), readiness=dict, api=ApiSettings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        response = await client.get(
            "/fhir/Observation?patient=1", headers={"Authorization": "Bearer qtk_" + "a" * 43}
        )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    outcome = response.json()
    validate_fhir(outcome)
    assert outcome["issue"][0]["code"] == "transient"


@pytest.mark.timeout(60)
async def test_metrics_answer_an_http_1_0_client_with_a_length_not_chunks(
    postgres_dsn: str, mqtt_url: str
) -> None:
    # Load balancers' health checks and shell probes speak HTTP/1.0: no chunked encoding.
    async with GatewayProcess(database_url=postgres_dsn, mqtt_url=mqtt_url) as gateway:
        await gateway.wait_ready()
        assert gateway.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: gateway\r\n\r\n")
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"\r\ncontent-length: (\d+)", head.lower())
    assert b"transfer-encoding" not in head.lower()
    assert length is not None
    assert int(length.group(1)) == len(body)
    assert b"qantara_messages_received_total" in body
