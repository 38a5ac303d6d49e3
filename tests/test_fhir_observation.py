"""`/fhir/Observation`: vitals as Observations, searched by patient, code, category and date,
paged with keyset cursors."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import httpx
import pytest

from gateway.fhir_resources import lab_observation_resource
from gateway.http import ApiSettings, FhirResponse
from ingest.records import PatientRef
from storage import queries
from tests.http_support import AppFactory, VitalsFeed, at, new_cin, validate_fhir
from tests.services_support import ExplainingConnection

HR, SPO2, GLUCOSE = "8867-4", "59408-5", "2339-0"


async def _search(
    client: httpx.AsyncClient, headers: dict[str, str], params: Any, status: int = 200
) -> dict[str, Any]:
    response = await client.get("/fhir/Observation", params=params, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    validate_fhir(body)
    return body


def _codes(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["code"]["coding"][0]["code"] for e in bundle.get("entry", [])]


def _times(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["effectiveDateTime"] for e in bundle.get("entry", [])]


async def _patient_id(client: httpx.AsyncClient, headers: dict[str, str], cin: str) -> str:
    response = await client.get("/fhir/Patient", params={"identifier": cin}, headers=headers)
    return str(response.json()["entry"][0]["resource"]["id"])


@pytest.fixture
async def day(feed: VitalsFeed) -> PatientRef:
    """A patient with five samples on 2026-11-27 and one on 2026-12-01."""
    patient = PatientRef("CIN", new_cin())
    await feed.send(
        patient,
        [
            ("2026-11-27T08:00:00Z", HR, 72, "/min"),
            ("2026-11-27T08:00:00Z", SPO2, 97, "%"),
            ("2026-11-27T09:30:00Z", HR, 80, "/min"),
            ("2026-11-27T12:00:00+02:00", GLUCOSE, 110, "mg/dL"),
            ("2026-11-27T23:59:59.999999Z", HR, 65, "/min"),
        ],
    )
    await feed.send(patient, [("2026-12-01T00:00:00Z", HR, 70, "/min")])
    return patient


async def test_vital_maps_to_a_complete_observation(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    patient_id = await _patient_id(client, reader, day.value)
    bundle = await _search(client, reader, {"patient": f"Patient/{patient_id}", "_count": "1"})
    observation = bundle["entry"][0]["resource"]
    assert observation["id"].startswith("v-")
    assert observation["status"] == "final"
    assert observation["category"][0]["coding"][0]["code"] == "vital-signs"
    assert observation["code"]["coding"] == [
        {"system": "http://loinc.org", "code": HR, "display": "Heart rate"}
    ]
    assert observation["subject"] == {"reference": f"Patient/{patient_id}"}
    assert observation["effectiveDateTime"] == "2026-11-27T08:00:00Z"
    assert "issued" in observation
    assert observation["valueQuantity"] == {
        "value": 72,
        "unit": "/min",
        "system": "http://unitsofmeasure.org",
        "code": "/min",
    }
    assert observation["device"]["display"] == "multiparameter-monitor MON-17"
    assert observation["device"]["reference"].startswith("Device/d-")
    assert bundle["entry"][0]["fullUrl"].endswith(f"/fhir/Observation/{observation['id']}")


async def test_observation_device_is_a_reference_that_resolves_to_the_unit_device(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    patient_id = await _patient_id(client, reader, day.value)
    bundle = await _search(client, reader, {"patient": patient_id, "_count": "1"})
    reference = bundle["entry"][0]["resource"]["device"]["reference"]
    response = await client.get(f"/fhir/{reference}", headers=reader)
    assert response.status_code == 200
    device = response.json()
    validate_fhir(device)
    assert f"Device/{device['id']}" == reference
    assert device["identifier"][0]["value"] == "MON-17"
    assert device["type"] == {"text": "multiparameter-monitor"}


async def test_unknown_device_is_not_found(
    client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    for path in ("/fhir/Device/d-999999999", "/fhir/Device/42", "/fhir/Device/d-x"):
        response = await client.get(path, headers=reader)
        assert response.status_code == 404, path
        assert response.json()["resourceType"] == "OperationOutcome"


async def test_search_by_patient_reference_in_both_forms_gives_rows_in_time_order(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    patient_id = await _patient_id(client, reader, day.value)
    long_form = await _search(client, reader, {"patient": f"Patient/{patient_id}"})
    short_form = await _search(client, reader, {"patient": patient_id})
    assert long_form["total"] == short_form["total"] == 6
    assert _times(long_form) == _times(short_form)
    assert _times(long_form) == sorted(_times(long_form))


async def test_search_by_patient_identifier(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    bundle = await _search(client, reader, {"patient:identifier": f"CIN|{day.value}"})
    uri = await _search(
        client, reader, {"patient:identifier": f"https://qantara.ma/fhir/sid/cin|{day.value}"}
    )
    assert bundle["total"] == uri["total"] == 6


async def test_unknown_patient_gives_an_empty_bundle(
    client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    bundle = await _search(client, reader, {"patient": "Patient/999999999"})
    assert bundle["total"] == 0
    assert "entry" not in bundle


async def test_code_filter_with_and_without_system_and_comma_or(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    ident = f"CIN|{day.value}"
    hr = await _search(client, reader, {"patient:identifier": ident, "code": HR})
    assert _codes(hr) == [HR] * 4
    with_system = await _search(
        client, reader, {"patient:identifier": ident, "code": f"http://loinc.org|{HR}"}
    )
    assert with_system["total"] == 4
    either = await _search(
        client, reader, {"patient:identifier": ident, "code": f"{SPO2},{GLUCOSE}"}
    )
    assert sorted(_codes(either)) == sorted([SPO2, GLUCOSE])
    other_system = await _search(client, reader, {"patient:identifier": ident, "code": f"x|{HR}"})
    assert other_system["total"] == 0


async def test_category_filter_separates_vital_signs_from_laboratory(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    ident = f"CIN|{day.value}"
    lab = await _search(client, reader, {"patient:identifier": ident, "category": "laboratory"})
    assert _codes(lab) == [GLUCOSE]
    assert lab["entry"][0]["resource"]["category"][0]["coding"][0]["code"] == "laboratory"
    vitals = await _search(client, reader, {"patient:identifier": ident, "category": "vital-signs"})
    assert vitals["total"] == 5


@pytest.mark.parametrize(
    ("dates", "expected"),
    [
        (["2026-11-27"], 5),
        (["2026-11"], 5),
        (["2026"], 6),
        (["ge2026-11-27T09:30:00Z"], 4),
        (["gt2026-11-27T09:30:00Z"], 3),
        (["le2026-11-27T09:30:00Z"], 3),
        (["lt2026-11-27T09:30:00Z"], 2),
        (["eq2026-11-27T08:00:00Z"], 2),
        (["ge2026-11-27T10:00:00Z", "lt2026-11-27T12:00:00+01:00"], 1),
        (["gt2026-11-27"], 1),
        (["ge2026-11-28", "le2026-11-30"], 0),
        (["2026-11-27T23:59:59.999999Z"], 1),
    ],
)
async def test_date_prefixes_select_by_device_time(
    client: httpx.AsyncClient,
    reader: dict[str, str],
    day: PatientRef,
    dates: list[str],
    expected: int,
) -> None:
    params = [("patient:identifier", f"CIN|{day.value}")] + [("date", d) for d in dates]
    bundle = await _search(client, reader, params)
    assert bundle["total"] == expected
    assert len(bundle.get("entry", [])) == expected


async def test_summary_count_gives_the_total_and_no_entries(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    bundle = await _search(
        client, reader, {"patient:identifier": f"CIN|{day.value}", "_summary": "count"}
    )
    assert bundle["total"] == 6
    assert "entry" not in bundle
    assert [link["relation"] for link in bundle["link"]] == ["self"]


async def test_count_above_the_maximum_is_clamped(
    make_client: AppFactory, reader: dict[str, str], day: PatientRef
) -> None:
    client = make_client(api=ApiSettings(default_count=2, max_count=4))
    ident = f"CIN|{day.value}"
    default = await _search(client, reader, {"patient:identifier": ident})
    assert len(default["entry"]) == 2
    clamped = await _search(client, reader, {"patient:identifier": ident, "_count": "1000"})
    assert len(clamped["entry"]) == 4
    assert clamped["total"] == 6
    assert any(link["relation"] == "next" for link in clamped["link"])


async def test_paging_with_next_links_yields_every_row_exactly_once(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    patient = PatientRef("CIN", new_cin())
    # 23 rows, many sharing a timestamp, written in two messages (ids interleave with time).
    stamps = ["2026-11-27T08:00:00Z"] * 7 + ["2026-11-27T08:00:01Z"] * 5
    await feed.send(patient, [(t, HR, 60 + i, "/min") for i, t in enumerate(stamps)])
    later = ["2026-11-27T07:59:59Z"] * 3 + ["2026-11-27T08:00:00Z"] * 8
    await feed.send(patient, [(t, SPO2, 90 + i, "%") for i, t in enumerate(later)])
    url: str | None = "/fhir/Observation?" + str(
        httpx.QueryParams({"patient:identifier": f"CIN|{patient.value}", "_count": "4"})
    )
    seen: list[tuple[str, int]] = []
    pages = 0
    while url is not None:
        response = await client.get(url, headers=reader)
        assert response.status_code == 200
        bundle = response.json()
        validate_fhir(bundle)
        assert bundle["total"] == 23
        seen.extend(
            (e["resource"]["effectiveDateTime"], int(e["resource"]["id"][2:]))
            for e in bundle.get("entry", [])
        )
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        pages += 1
    assert pages == 6
    assert len(seen) == 23
    assert len(set(seen)) == 23
    assert seen == sorted(seen)


async def test_merged_patients_rows_are_found_through_the_survivor(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed, api_pool: asyncpg.Pool
) -> None:
    old, new = PatientRef("CIN", new_cin()), PatientRef("CIN", new_cin())
    await feed.send(old, [("2026-11-27T08:00:00Z", HR, 70, "/min")])
    await feed.send(new, [("2026-11-27T09:00:00Z", HR, 75, "/min")])
    old_id = await _patient_id(client, reader, old.value)
    new_id = await _patient_id(client, reader, new.value)
    # The merge itself arrives with HL7 ADT^A40 (not yet built).
    await api_pool.execute(
        "UPDATE patient SET replaced_by = $1 WHERE id = $2", int(new_id), int(old_id)
    )
    for params in (
        {"patient": new_id},
        {"patient": old_id},
        {"patient:identifier": f"CIN|{old.value}"},
    ):
        bundle = await _search(client, reader, params)
        assert bundle["total"] == 2
        subjects = {e["resource"]["subject"]["reference"] for e in bundle["entry"]}
        assert subjects == {f"Patient/{new_id}"}


async def test_observation_is_read_by_id(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    bundle = await _search(client, reader, {"patient:identifier": day.value, "_count": "1"})
    observation = bundle["entry"][0]["resource"]
    response = await client.get(f"/fhir/Observation/{observation['id']}", headers=reader)
    assert response.status_code == 200
    validate_fhir(response.json())
    assert response.json() == observation


@pytest.mark.parametrize("observation_id", ["v-999999999999", "999", "v-", "v-abc"])
async def test_unknown_observation_id_is_404(
    client: httpx.AsyncClient, reader: dict[str, str], observation_id: str
) -> None:
    response = await client.get(f"/fhir/Observation/{observation_id}", headers=reader)
    assert response.status_code == 404
    validate_fhir(response.json())


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"patient": "1", "date": "yesterday"}, "date"),
        ({"patient": "1", "date": "ge2026-11-27T10:00"}, "date"),
        ({"patient": "1", "_count": "-5"}, "_count"),
        ({"patient": "1", "_count": "ten"}, "_count"),
        ({"patient": "Patient/abc"}, "patient"),
        ({"patient": "Observation/1"}, "patient"),
        ({"code": HR}, "patient"),
        ({"patient": "1", "_cursor": "garbage"}, "_cursor"),
        ({"patient": "1", "_summary": "text"}, "_summary"),
        ({"patient": "1", "category": "astrology"}, "category"),
        ({"patient": "1", "code": "8867-4\x00"}, "code"),
    ],
)
async def test_bad_search_input_is_a_400_outcome_naming_the_parameter(
    client: httpx.AsyncClient, reader: dict[str, str], params: dict[str, str], parameter: str
) -> None:
    outcome = await _search(client, reader, params, status=400)
    issue = outcome["issue"][0]
    assert (issue["severity"], issue["code"]) == ("error", "invalid")
    assert f"'{parameter}'" in issue["diagnostics"]


async def test_tampered_cursor_is_a_400(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    params = {"patient:identifier": f"CIN|{day.value}", "_count": "2"}
    bundle = await _search(client, reader, params)
    next_url = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    cursor = httpx.URL(next_url).params["_cursor"]
    tampered = cursor[:-3] + ("AAA" if not cursor.endswith("AAA") else "BBB")
    outcome = await _search(client, reader, {**params, "_cursor": tampered}, status=400)
    assert "'_cursor'" in outcome["issue"][0]["diagnostics"]


async def test_cursor_reused_with_other_criteria_is_a_400(
    client: httpx.AsyncClient, reader: dict[str, str], day: PatientRef
) -> None:
    params = {"patient:identifier": f"CIN|{day.value}", "_count": "2"}
    bundle = await _search(client, reader, params)
    next_url = next(link["url"] for link in bundle["link"] if link["relation"] == "next")
    cursor = httpx.URL(next_url).params["_cursor"]
    other = {**params, "code": HR, "_cursor": cursor}
    await _search(client, reader, other, status=400)


async def test_search_with_date_bounds_reads_only_partitions_in_range(
    api_pool: asyncpg.Pool, feed: VitalsFeed
) -> None:
    patient = PatientRef("CIN", new_cin())
    await feed.send(patient, [("2026-11-25T08:00:00Z", HR, 72, "/min")])
    async with api_pool.acquire() as conn:
        await conn.execute("SELECT qantara_ensure_partitions('vital', '2026-10-01', '2027-01-31')")
        patient_ids = await queries.find_patients_by_identifier(conn, patient.value, None)
        query = queries.VitalQuery(
            tuple(patient_ids), None, at("2026-11-24T00:00:00Z"), at("2026-11-26T00:00:00Z")
        )
        explaining = ExplainingConnection(conn)
        rows = await queries.search_vital_observations(explaining, query, None, 10)
        assert await queries.count_vital_observations(explaining, query) == 1
    assert [r.value for r in rows] == [72]
    for plan in explaining.plans:
        scanned = set(re.findall(r" on (vital_\w+)", plan))
        assert scanned == {"vital_2026w48"}, plan


def test_a_reference_limit_that_is_not_a_number_is_left_out_not_written_as_null() -> None:
    record = queries.LabObservationRecord(
        id=1,
        report_id=2,
        subject_id=3,
        value_type="NM",
        code_system="LN",
        code="2345-7",
        code_display="Glucose",
        value_numeric=5.5,
        comparator=None,
        value_text=None,
        value_code_system=None,
        value_code=None,
        value_display=None,
        unit="mmol/L",
        reference_range="NaN-6.1",
        reference_low=float("nan"),
        reference_high=6.1,
        abnormal_flags=(),
        status="F",
        observed_at=at("2026-11-27T08:00:00Z"),
        received_at=at("2026-11-27T08:05:00Z"),
    )
    resource = lab_observation_resource(record)
    assert resource["referenceRange"] == [
        {
            "high": {
                "value": 6.1,
                "unit": "mmol/L",
                "system": "http://unitsofmeasure.org",
                "code": "mmol/L",
            },
            "text": "NaN-6.1",
        }
    ]
    assert b"null" not in FhirResponse(resource).body
    validate_fhir(resource)
