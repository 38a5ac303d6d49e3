"""`/fhir/Patient`: search by identifier (short system, URI, bare value), read by id, merges."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx

from ingest.records import PatientRef
from tests.http_support import CIN_URI, VitalsFeed, new_cin, validate_fhir

HR = "8867-4"


async def _patient(
    client: httpx.AsyncClient, headers: dict[str, str], identifier: str
) -> dict[str, Any]:
    response = await client.get("/fhir/Patient", params={"identifier": identifier}, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle: dict[str, Any] = response.json()
    validate_fhir(bundle)
    return bundle


async def _seed(feed: VitalsFeed, system: str, value: str) -> None:
    await feed.send(PatientRef(system, value), [("2026-11-27T10:00:00Z", HR, 72, "/min")])


async def test_patient_is_found_by_cin_short_system(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    cin = new_cin()
    await _seed(feed, "CIN", cin)
    bundle = await _patient(client, reader, f"CIN|{cin}")
    assert bundle["total"] == 1
    patient = bundle["entry"][0]["resource"]
    assert patient["identifier"] == [{"system": CIN_URI, "value": cin}]


async def test_patient_is_found_by_cin_uri_system(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    cin = new_cin()
    await _seed(feed, "CIN", cin)
    by_short = await _patient(client, reader, f"CIN|{cin}")
    by_uri = await _patient(client, reader, f"{CIN_URI}|{cin}")
    assert by_uri["total"] == 1
    assert by_uri["entry"][0]["resource"] == by_short["entry"][0]["resource"]


async def test_patient_is_found_by_bare_value(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    cin = new_cin()
    await _seed(feed, "CIN", cin)
    assert (await _patient(client, reader, cin))["total"] == 1


async def test_unknown_short_system_is_shown_as_a_qantara_urn(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    mrn = new_cin()
    await _seed(feed, "MRN-CHU-RABAT", mrn)
    bundle = await _patient(client, reader, f"urn:qantara:sid:MRN-CHU-RABAT|{mrn}")
    identifier = bundle["entry"][0]["resource"]["identifier"][0]
    assert identifier == {"system": "urn:qantara:sid:MRN-CHU-RABAT", "value": mrn}


async def test_identifier_in_another_system_does_not_match(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    cin = new_cin()
    await _seed(feed, "CIN", cin)
    bundle = await _patient(client, reader, f"MRN|{cin}")
    assert bundle["total"] == 0
    assert "entry" not in bundle


async def test_arabic_identifier_round_trips_byte_for_byte(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    value = "أب" + new_cin() + "١٢٣"
    await _seed(feed, "CIN", value)
    response = await client.get(
        "/fhir/Patient", params={"identifier": f"CIN|{value}"}, headers=reader
    )
    assert value.encode("utf-8") in response.content  # UTF-8, not \\u escapes
    assert response.json()["entry"][0]["resource"]["identifier"][0]["value"] == value


async def test_arabic_and_french_names_round_trip_intact(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed, api_pool: asyncpg.Pool
) -> None:
    cin = new_cin()
    await _seed(feed, "CIN", cin)
    patient_id = (await _patient(client, reader, cin))["entry"][0]["resource"]["id"]
    names = [
        {"use": "official", "text": "فاطمة الزهراء بنعلي", "family": "بنعلي", "given": ["فاطمة"]},
        {"use": "usual", "family": "Benali", "given": ["Fatima-Zahraé"]},
    ]
    # Demographics arrive with HL7 ADT (not yet built); the vitals writer creates the patient.
    await api_pool.execute(
        "UPDATE patient SET names = $1::jsonb, gender = 'female' WHERE id = $2",
        json.dumps(names, ensure_ascii=False),
        int(patient_id),
    )
    response = await client.get(f"/fhir/Patient/{patient_id}", headers=reader)
    assert response.status_code == 200
    patient = response.json()
    validate_fhir(patient)
    assert patient["name"] == names
    assert patient["gender"] == "female"


async def test_merged_patient_resolves_to_its_survivor_with_links(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed, api_pool: asyncpg.Pool
) -> None:
    old_cin, new_cin_ = new_cin(), new_cin()
    await _seed(feed, "CIN", old_cin)
    await _seed(feed, "CIN", new_cin_)
    old_id = (await _patient(client, reader, old_cin))["entry"][0]["resource"]["id"]
    survivor_id = (await _patient(client, reader, new_cin_))["entry"][0]["resource"]["id"]
    # The merge itself arrives with HL7 ADT^A40 (not yet built).
    await api_pool.execute(
        "UPDATE patient SET replaced_by = $1 WHERE id = $2", int(survivor_id), int(old_id)
    )
    bundle = await _patient(client, reader, f"CIN|{old_cin}")
    survivor = bundle["entry"][0]["resource"]
    assert survivor["id"] == survivor_id
    assert {"other": {"reference": f"Patient/{old_id}"}, "type": "replaces"} in survivor["link"]
    merged = (await client.get(f"/fhir/Patient/{old_id}", headers=reader)).json()
    validate_fhir(merged)
    assert merged["active"] is False
    assert merged["link"] == [
        {"other": {"reference": f"Patient/{survivor_id}"}, "type": "replaced-by"}
    ]


async def test_unknown_or_non_numeric_patient_id_is_404(
    client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    for patient_id in ("999999999999", "abc", "1e3"):
        response = await client.get(f"/fhir/Patient/{patient_id}", headers=reader)
        assert response.status_code == 404
        outcome = response.json()
        validate_fhir(outcome)
        assert outcome["issue"][0]["code"] == "not-found"


async def test_patient_search_without_identifier_is_400_naming_it(
    client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    response = await client.get("/fhir/Patient", headers=reader)
    assert response.status_code == 400
    outcome = response.json()
    validate_fhir(outcome)
    assert outcome["issue"][0]["code"] == "invalid"
    assert "identifier" in outcome["issue"][0]["diagnostics"]


async def test_patient_search_summary_count_gives_total_only(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    cin = new_cin()
    await _seed(feed, "CIN", cin)
    bundle = await _patient(client, reader, cin)
    response = await client.get(
        "/fhir/Patient", params={"identifier": cin, "_summary": "count"}, headers=reader
    )
    summary = response.json()
    validate_fhir(summary)
    assert summary["total"] == bundle["total"] == 1
    assert "entry" not in summary
