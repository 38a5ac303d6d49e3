"""FHIR search semantics over vitals: handling, signed cursors, date prefixes, sorting, paging,
`$lastn`, `_elements`, Device, CapabilityStatement."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.device import Device

from gateway.fhir_capability import RESOURCES
from gateway.http import ApiSettings
from ingest.records import PatientRef
from tests.http_support import AppFactory, VitalsFeed, new_cin, validate_fhir

HR, SPO2, GLUCOSE = "8867-4", "59408-5", "2339-0"


async def _get(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    path: str,
    params: Any = None,
    status: int = 200,
) -> dict[str, Any]:
    response = await client.get(path, params=params, headers=headers)
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    if body["resourceType"] != "CapabilityStatement":
        validate_fhir(body)
    return body


def _times(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["effectiveDateTime"] for e in bundle.get("entry", [])]


def _next(bundle: dict[str, Any]) -> str | None:
    return next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)


@pytest.fixture
async def hours(feed: VitalsFeed, client: httpx.AsyncClient, reader: dict[str, str]) -> str:
    """A patient (its id) with heart rates at 00:00..23:00 on 2026-11-27, SpO2 at 08:00 and
    glucose at 09:00 and 10:00."""
    patient = PatientRef("CIN", new_cin())
    samples = [(f"2026-11-27T{h:02}:00:00Z", HR, 60 + h, "/min") for h in range(24)]
    samples.append(("2026-11-27T08:00:00Z", SPO2, 97, "%"))
    samples.append(("2026-11-27T09:00:00Z", GLUCOSE, 100, "mg/dL"))
    samples.append(("2026-11-27T10:00:00Z", GLUCOSE, 110, "mg/dL"))
    await feed.send(patient, samples)
    found = await _get(client, reader, "/fhir/Patient", {"identifier": patient.value})
    return str(found["entry"][0]["resource"]["id"])


async def test_unknown_parameter_is_ignored_by_default(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    params = {"patient": hours, "value-quantity": "gt100"}
    bundle = await _get(client, reader, "/fhir/Observation", params)
    assert bundle["total"] == 27


async def test_self_link_of_a_lenient_search_carries_only_the_parameters_used(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    params = [
        ("patient", hours),
        ("value-quantity", "gt100"),
        ("code", HR),
        ("_count", "5"),
        ("_has:Patient", "x"),
    ]
    bundle = await _get(client, reader, "/fhir/Observation", params)
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    for url in links.values():
        assert "value-quantity" not in url
        assert "_has" not in url
    assert links["self"].endswith(f"/fhir/Observation?patient={hours}&code={HR}&_count=5")
    assert f"patient={hours}&code={HR}&_count=5&_cursor=" in links["next"]
    following = await _get(client, reader, links["next"])
    assert len(following["entry"]) == 5


async def test_self_link_of_lenient_lastn_and_patient_searches_drops_ignored_parameters(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    lastn = await _get(
        client, reader, "/fhir/Observation/$lastn", {"patient": hours, "bogus": "1", "max": "2"}
    )
    assert lastn["link"][0]["url"].endswith(f"/fhir/Observation/$lastn?patient={hours}&max=2")
    patients = await _get(client, reader, "/fhir/Patient", {"_id": hours, "unknown": "x"})
    assert patients["link"][0]["url"].endswith(f"/fhir/Patient?_id={hours}")


async def test_unknown_parameter_is_a_400_naming_it_under_strict_handling(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    headers = {**reader, "Prefer": "handling=strict"}
    params = {"patient": hours, "value-quantity": "gt100"}
    outcome = await _get(client, headers, "/fhir/Observation", params, status=400)
    assert "'value-quantity'" in outcome["issue"][0]["diagnostics"]


async def test_tampered_cursor_is_a_400(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    first = await _get(client, reader, "/fhir/Observation", {"patient": hours, "_count": "5"})
    url = _next(first)
    assert url is not None
    cursor = url.rsplit("_cursor=", 1)[1]
    tampered = cursor[:10] + ("A" if cursor[10] != "A" else "B") + cursor[11:]
    params = {"patient": hours, "_count": "5", "_cursor": tampered}
    outcome = await _get(client, reader, "/fhir/Observation", params, status=400)
    assert "'_cursor'" in outcome["issue"][0]["diagnostics"]


async def test_cursor_of_another_server_secret_is_a_400(
    make_client: AppFactory, reader: dict[str, str], hours: str
) -> None:
    one = make_client(ApiSettings(cursor_secret=b"secret of replica one....."))
    other = make_client(ApiSettings(cursor_secret=b"secret of replica two....."))
    shared = make_client(ApiSettings(cursor_secret=b"secret of replica one....."))
    first = await _get(one, reader, "/fhir/Observation", {"patient": hours, "_count": "5"})
    url = _next(first)
    assert url is not None
    await _get(other, reader, url, status=400)
    following = await _get(shared, reader, url)
    assert len(following["entry"]) == 5


@pytest.mark.parametrize(
    ("dates", "count"),
    [
        (["2026-11-27"], 27),
        (["2026-11"], 27),
        (["2026"], 27),
        (["2026-11-27T10:00:00Z"], 2),
        (["ne2026-11-27T10:00:00Z"], 25),
        (["ne2026-11-27T10:00Z", "ne2026-11-27T11:00Z"], 24),
        (["gt2026-11-27T22:00:00Z"], 1),
        (["ge2026-11-27T22:00:00Z"], 2),
        (["lt2026-11-27T01:00:00Z"], 1),
        (["le2026-11-27T01:00:00Z"], 2),
        (["sa2026-11-27T21:00:00Z"], 2),
        (["eb2026-11-27T02:00:00Z"], 2),
        (["ge2026-11-27T08:00:00Z", "lt2026-11-27T10:00:00Z"], 4),
        (["2026-11-28"], 0),
        (["ne2026-11"], 0),
    ],
)
async def test_date_prefixes_and_partial_dates_select_the_expected_count(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str, dates: list[str], count: int
) -> None:
    params = [("patient", hours), *(("date", d) for d in dates)]
    bundle = await _get(client, reader, "/fhir/Observation", params)
    assert bundle["total"] == count
    assert len(bundle.get("entry", [])) == count


async def test_sort_by_descending_date_gives_newest_first(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    params = {"patient": hours, "code": HR, "_sort": "-date", "_count": "3"}
    bundle = await _get(client, reader, "/fhir/Observation", params)
    assert _times(bundle) == [
        "2026-11-27T23:00:00Z",
        "2026-11-27T22:00:00Z",
        "2026-11-27T21:00:00Z",
    ]


@pytest.mark.parametrize("sort", ["date", "-date"])
async def test_paging_visits_every_row_once_in_order(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str, sort: str
) -> None:
    ids: list[str] = []
    times: list[str] = []
    url: str | None = f"/fhir/Observation?patient={hours}&_count=4&_sort={sort}"
    while url is not None:
        bundle = await _get(client, reader, url)
        assert bundle["total"] == 27
        ids.extend(e["resource"]["id"] for e in bundle.get("entry", []))
        times.extend(_times(bundle))
        url = _next(bundle)
    assert len(ids) == 27
    assert len(set(ids)) == 27
    assert times == sorted(times, reverse=sort == "-date")


async def test_comma_separated_codes_match_any_of_them(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    params = {"patient": hours, "code": f"{SPO2},http://loinc.org|{GLUCOSE}"}
    bundle = await _get(client, reader, "/fhir/Observation", params)
    assert bundle["total"] == 3


async def test_subject_is_the_same_as_patient(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    by_subject = await _get(client, reader, "/fhir/Observation", {"subject": f"Patient/{hours}"})
    by_patient = await _get(client, reader, "/fhir/Observation", {"patient": hours})
    assert by_subject["total"] == by_patient["total"] == 27


async def test_elements_keeps_the_requested_and_mandatory_elements_tagged_subsetted(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    params = {"patient": hours, "_count": "1", "_elements": "value[x]"}
    bundle = await _get(client, reader, "/fhir/Observation", params)
    observation = bundle["entry"][0]["resource"]
    assert "valueQuantity" in observation
    assert "effectiveDateTime" not in observation
    assert {"status", "code", "subject"} <= observation.keys()
    assert observation["meta"]["tag"][0]["code"] == "SUBSETTED"


async def test_lastn_gives_the_newest_n_of_each_code_newest_first(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    params = {"patient": hours, "max": "2"}
    bundle = await _get(client, reader, "/fhir/Observation/$lastn", params)
    by_code: dict[str, list[str]] = {}
    for entry in bundle["entry"]:
        resource = entry["resource"]
        by_code.setdefault(resource["code"]["coding"][0]["code"], []).append(
            resource["effectiveDateTime"]
        )
    assert by_code == {
        HR: ["2026-11-27T23:00:00Z", "2026-11-27T22:00:00Z"],
        SPO2: ["2026-11-27T08:00:00Z"],
        GLUCOSE: ["2026-11-27T10:00:00Z", "2026-11-27T09:00:00Z"],
    }


async def test_lastn_filters_by_category(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    params = {"patient": hours, "category": "laboratory", "max": "5"}
    bundle = await _get(client, reader, "/fhir/Observation/$lastn", params)
    assert [e["resource"]["code"]["coding"][0]["code"] for e in bundle["entry"]] == [
        GLUCOSE,
        GLUCOSE,
    ]


@pytest.mark.parametrize("value", ["0", "101", "x", "-1"])
async def test_lastn_with_a_bad_max_is_a_400_naming_it(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str, value: str
) -> None:
    params = {"patient": hours, "max": value}
    outcome = await _get(client, reader, "/fhir/Observation/$lastn", params, status=400)
    assert "'max'" in outcome["issue"][0]["diagnostics"]


async def test_device_is_found_by_its_identifier_within_its_unit(
    client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed, hours: str
) -> None:
    bundle = await _get(
        client, reader, "/fhir/Device", {"identifier": f"urn:qantara:unit:{feed.unit}|MON-17"}
    )
    assert bundle["total"] == 1
    device = bundle["entry"][0]["resource"]
    Device.model_validate(device)
    assert device["type"]["text"] == "multiparameter-monitor"


async def test_metadata_is_public_and_lists_every_resource_and_parameter(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    CapabilityStatement.model_validate(statement)
    served = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(served) == {r.type for r in RESOURCES}
    names = {p["name"] for p in served["Observation"]["searchParam"]}
    assert {"patient", "code", "date", "_sort", "_count"} <= names


async def test_every_declared_parameter_is_accepted_under_strict_handling(
    client: httpx.AsyncClient, reader: dict[str, str], hours: str
) -> None:
    statement = (await client.get("/fhir/metadata")).json()
    base = {
        "Patient": {"_id": hours},
        "Observation": {"patient": hours},
        "DiagnosticReport": {"patient": hours},
        "ImagingStudy": {"patient": hours},
        "Device": {"identifier": "MON-17"},
        "AuditEvent": {},
    }
    values = {
        "patient": hours,
        "patient:identifier": "CIN|x",
        "subject": f"Patient/{hours}",
        "subject:identifier": "CIN|x",
        "identifier": "x",
        "name": "x",
        "birthdate": "ge1900",
        "gender": "female",
        "_id": hours,
        "code": "x",
        "category": "laboratory",
        "date": "ge2026",
        "_sort": "-date",
        "_elements": "status",
        "started": "ge2026",
        "modality": "CT",
        "agent": "x",
        "_count": "1",
        "_summary": "count",
    }
    whose = {"patient", "patient:identifier", "subject", "subject:identifier"}
    strict = {**reader, "Prefer": "handling=strict"}
    for resource in statement["rest"][0]["resource"]:
        kind = resource["type"]
        for param in resource["searchParam"]:
            name = param["name"]
            if name == "_cursor":
                continue
            value = values[name]
            if kind == "ImagingStudy" and name == "identifier":
                value = "urn:dicom:uid|urn:oid:1.2.3"
            params = {name: value} if name in whose else {**base[kind], name: value}
            response = await client.get(f"/fhir/{kind}", params=params, headers=strict)
            assert response.status_code == 200, (kind, name, response.text)
            Bundle.model_validate(response.json())
