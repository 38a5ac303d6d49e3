"""The audit trail: every read of patient data leaves a committed row, exposed as AuditEvent."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle

from gateway.auth import issue_token
from ingest.records import PatientRef
from tests.http_support import VitalsFeed, new_cin

HR = "8867-4"


async def _named_token(pool: asyncpg.Pool, *scopes: str) -> tuple[str, dict[str, str]]:
    name = f"audit-{secrets.token_hex(6)}"
    token = await issue_token(pool, name, list(scopes))
    return name, {"Authorization": f"Bearer {token}"}


async def _patient(feed: VitalsFeed, client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    cin = new_cin()
    await feed.send(PatientRef("CIN", cin), [("2026-11-27T10:00:00Z", HR, 72, "/min")])
    response = await client.get("/fhir/Patient", params={"identifier": cin}, headers=headers)
    return str(response.json()["entry"][0]["resource"]["id"])


async def _rows(pool: asyncpg.Pool, token_name: str) -> list[Any]:
    return list(
        await pool.fetch("SELECT * FROM api_audit WHERE token_name = $1 ORDER BY id", token_name)
    )


async def _events(
    client: httpx.AsyncClient, headers: dict[str, str], **params: str
) -> dict[str, Any]:
    response = await client.get("/fhir/AuditEvent", params=params, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    Bundle.model_validate(body)
    for entry in body.get("entry", []):
        AuditEvent.model_validate(entry["resource"])
    return body


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient/{id}",
        "/fhir/Patient?_id={id}",
        "/fhir/Observation?patient={id}",
        "/fhir/Observation/$lastn?patient={id}",
        "/fhir/DiagnosticReport?patient={id}",
        "/fhir/ImagingStudy?patient={id}",
    ],
)
async def test_every_patient_read_writes_an_audit_row_naming_token_and_patient(
    client: httpx.AsyncClient, api_pool: asyncpg.Pool, feed: VitalsFeed, path: str
) -> None:
    name, headers = await _named_token(api_pool, "system/*.read")
    patient_id = await _patient(feed, client, headers)
    before = len(await _rows(api_pool, name))
    response = await client.get(path.format(id=patient_id), headers=headers)
    assert response.status_code == 200
    rows = await _rows(api_pool, name)
    assert len(rows) == before + 1
    row = rows[-1]
    assert row["outcome"] == "0"
    assert row["status"] == 200
    if path.startswith(("/fhir/Patient", "/fhir/Observation")):
        assert list(row["patient_ids"]) == [int(patient_id)]


async def test_audit_row_keeps_the_query_shape_without_values(
    client: httpx.AsyncClient, api_pool: asyncpg.Pool, feed: VitalsFeed
) -> None:
    name, headers = await _named_token(api_pool, "system/*.read")
    cin = new_cin()
    await feed.send(PatientRef("CIN", cin), [("2026-11-27T10:00:00Z", HR, 72, "/min")])
    await client.get(
        "/fhir/Observation",
        params=[("patient:identifier", f"CIN|{cin}"), ("date", "ge2026-11-01"), ("code", HR)],
        headers=headers,
    )
    row = (await _rows(api_pool, name))[-1]
    assert row["query_shape"] == "GET /fhir/Observation?patient:identifier&date=ge&code"
    assert row["action"] == "search-type"
    assert row["resource_type"] == "Observation"
    assert cin not in row["query_shape"]


async def test_missing_scope_is_audited_as_a_refusal(
    client: httpx.AsyncClient, api_pool: asyncpg.Pool
) -> None:
    name, headers = await _named_token(api_pool, "system/Patient.read")
    response = await client.get("/fhir/Observation?patient=1", headers=headers)
    assert response.status_code == 403
    [row] = await _rows(api_pool, name)
    assert (row["outcome"], row["status"], list(row["patient_ids"])) == ("4", 403, [])


async def test_audit_event_search_by_patient_shows_the_token_name_and_success(
    client: httpx.AsyncClient, api_pool: asyncpg.Pool, feed: VitalsFeed
) -> None:
    name, headers = await _named_token(api_pool, "system/*.read")
    patient_id = await _patient(feed, client, headers)
    await client.get(f"/fhir/Observation?patient={patient_id}", headers=headers)
    _, auditor = await _named_token(api_pool, "system/AuditEvent.read")
    bundle = await _events(client, auditor, patient=f"Patient/{patient_id}", agent=name)
    assert bundle["total"] == 2  # the Patient search, then the Observation search
    event = bundle["entry"][-1]["resource"]
    assert event["agent"][0]["who"]["display"] == name
    assert event["agent"][0]["requestor"] is True
    assert event["outcome"] == "0"
    assert event["action"] == "E"
    patients = [e["what"]["reference"] for e in event["entity"] if "what" in e]
    assert patients == [f"Patient/{patient_id}"]


async def test_audit_event_search_by_patient_identifier_and_date(
    client: httpx.AsyncClient, api_pool: asyncpg.Pool, feed: VitalsFeed
) -> None:
    _, headers = await _named_token(api_pool, "system/*.read")
    cin = new_cin()
    await feed.send(PatientRef("CIN", cin), [("2026-11-27T10:00:00Z", HR, 72, "/min")])
    await client.get("/fhir/Patient", params={"identifier": cin}, headers=headers)
    _, auditor = await _named_token(api_pool, "system/AuditEvent.read")
    found = await _events(client, auditor, **{"patient:identifier": f"CIN|{cin}", "date": "ge2000"})
    assert found["total"] == 1
    none = await _events(client, auditor, **{"patient:identifier": f"CIN|{cin}", "date": "lt2000"})
    assert none["total"] == 0


async def test_audit_events_need_the_audit_scope(
    client: httpx.AsyncClient, api_pool: asyncpg.Pool
) -> None:
    _, headers = await _named_token(api_pool, "system/Observation.read")
    response = await client.get("/fhir/AuditEvent", headers=headers)
    assert response.status_code == 403


async def test_audit_events_page_without_gaps(
    client: httpx.AsyncClient, api_pool: asyncpg.Pool, feed: VitalsFeed
) -> None:
    name, headers = await _named_token(api_pool, "system/*.read")
    patient_id = await _patient(feed, client, headers)
    for _ in range(4):
        await client.get(f"/fhir/Patient/{patient_id}", headers=headers)
    _, auditor = await _named_token(api_pool, "system/AuditEvent.read")
    ids: list[str] = []
    url: str | None = f"/fhir/AuditEvent?agent={name}&_count=2"
    while url is not None:
        response = await client.get(url, headers=auditor)
        body = response.json()
        ids.extend(e["resource"]["id"] for e in body.get("entry", []))
        url = next((link["url"] for link in body["link"] if link["relation"] == "next"), None)
    assert len(ids) == 5
    assert len(set(ids)) == 5


async def test_tokens_and_patient_data_never_reach_the_logs_at_info(
    client: httpx.AsyncClient,
    api_pool: asyncpg.Pool,
    feed: VitalsFeed,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cin = new_cin()
    token = await issue_token(api_pool, f"audit-{secrets.token_hex(6)}", ["system/*.read"])
    headers = {"Authorization": f"Bearer {token}"}
    await feed.send(PatientRef("CIN", cin), [("2026-11-27T10:00:00Z", HR, 72, "/min")])
    with caplog.at_level(logging.INFO):
        await client.get("/fhir/Patient", params={"identifier": cin}, headers=headers)
        await client.get("/fhir/Observation", params={"patient:identifier": cin}, headers=headers)
        await client.get("/fhir/Patient", params={"name": "Benali"}, headers=headers)
        await client.get("/fhir/Observation", params={"patient": "x"}, headers=headers)
    # The test's own HTTP client (httpx) logs its URLs; the gateway's loggers are what we check.
    text = "\n".join(
        r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))
    )
    assert "/fhir/Observation" in text
    for secret in (token, token[4:20], cin, "Benali"):
        assert secret not in text


async def test_metrics_carry_no_patient_data(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    cin = new_cin()
    await feed.send(PatientRef("CIN", cin), [("2026-11-27T10:00:00Z", HR, 72, "/min")])
    await client.get("/fhir/Patient", params={"identifier": cin}, headers=reader)
    metrics = (await client.get("/metrics")).text
    assert cin not in metrics
    assert "Bearer" not in metrics
