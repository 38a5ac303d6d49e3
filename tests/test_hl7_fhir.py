"""HL7 in over MLLP, FHIR out: lab Observations, DiagnosticReports, Patients from ADT, merges."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from hl7.server import MllpServer, MllpSettings
from ingest.pipeline import GroupCommitPipeline, PipelineSettings
from ingest.records import PatientRef
from monitoring.metrics import Metrics
from storage.writer import BatchWriter
from tests.hl7_support import MllpClient, adt, control_id, encode, new_id, oru
from tests.http_support import CIN_URI, VitalsFeed, validate_fhir


@pytest.fixture(scope="module")
async def mllp(api_pool: asyncpg.Pool) -> AsyncIterator[MllpServer]:
    metrics = Metrics()
    pipeline = GroupCommitPipeline(BatchWriter(api_pool), PipelineSettings(), metrics)
    pipeline_task = asyncio.create_task(pipeline.run())
    server = MllpServer(MllpSettings(port=0), pipeline, metrics)
    server_task = asyncio.create_task(server.run())
    await asyncio.wait_for(server.listening.wait(), 5)
    yield server
    server.stop()
    await asyncio.wait_for(server_task, 10)
    await pipeline.close()
    await asyncio.wait_for(pipeline_task, 10)


async def send(server: MllpServer, *messages: bytes) -> list[str]:
    assert server.port is not None
    async with MllpClient("127.0.0.1", server.port) as client:
        return [(await client.request(m)).code for m in messages]


async def search(
    client: httpx.AsyncClient, headers: dict[str, str], path: str, **params: str
) -> dict[str, Any]:
    response = await client.get(f"/fhir/{path}", params=params, headers=headers)
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    return bundle


async def test_lab_results_are_laboratory_observations_with_values_ranges_and_flags(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    cin = new_id()
    assert await send(mllp, encode(oru(control_id(), f"{cin}^^^CIN^NI"))) == ["AA"]
    bundle = await search(client, reader, "Observation", **{"patient:identifier": f"CIN|{cin}"})
    validate_fhir(bundle)
    assert bundle["total"] == 5
    by_code = {e["resource"]["code"]["coding"][0]["code"]: e["resource"] for e in bundle["entry"]}
    hb = by_code["718-7"]
    assert hb["category"][0]["coding"][0]["code"] == "laboratory"
    assert hb["valueQuantity"]["value"] == 13.2
    assert hb["valueQuantity"]["unit"] == "g/dL"
    assert hb["referenceRange"][0]["low"]["value"] == 12.0
    assert hb["referenceRange"][0]["high"]["value"] == 16.0
    assert by_code["6690-2"]["interpretation"][0]["coding"][0]["code"] == "H"
    assert by_code["8251-1"]["valueString"] == "Prélèvement hémolysé"
    assert by_code["882-1"]["valueCodeableConcept"]["coding"][0]["code"] == "A+"
    assert by_code["2160-0"]["valueQuantity"]["comparator"] == "<"


async def test_lab_observations_are_found_by_category_laboratory_and_code(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    cin = new_id()
    await send(mllp, encode(oru(control_id(), f"{cin}^^^CIN^NI")))
    params = {
        "patient:identifier": f"CIN|{cin}",
        "category": "laboratory",
        "code": "http://loinc.org|718-7",
    }
    bundle = await search(client, reader, "Observation", **params)
    assert bundle["total"] == 1
    assert bundle["entry"][0]["resource"]["valueQuantity"]["value"] == 13.2
    vitals_only = await search(
        client,
        reader,
        "Observation",
        **{"patient:identifier": f"CIN|{cin}"},
        category="vital-signs",
    )
    assert vitals_only["total"] == 0


async def test_labs_and_vitals_of_one_cin_meet_on_one_patient_and_page_together(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str], feed: VitalsFeed
) -> None:
    cin = new_id()
    await feed.send(PatientRef("CIN", cin), [("2026-11-27T08:30:00Z", "8867-4", 72, "/min")])
    await send(mllp, encode(oru(control_id(), f"{cin}^^^CIN^NI")))
    patients = await search(client, reader, "Patient", identifier=f"CIN|{cin}")
    assert patients["total"] == 1
    seen: list[str] = []
    params = {"patient:identifier": f"CIN|{cin}", "_count": "2"}
    bundle = await search(client, reader, "Observation", **params)
    assert bundle["total"] == 6
    while True:
        seen += [e["resource"]["id"] for e in bundle.get("entry", [])]
        links = {link["relation"]: link["url"] for link in bundle["link"]}
        if "next" not in links:
            break
        response = await client.get(links["next"], headers=reader)
        bundle = response.json()
    assert len(seen) == len(set(seen)) == 6


async def test_diagnostic_report_lists_its_results(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    cin = new_id()
    await send(mllp, encode(oru(control_id(), f"{cin}^^^CIN^NI")))
    [patient] = (await search(client, reader, "Patient", identifier=f"CIN|{cin}"))["entry"]
    bundle = await search(
        client, reader, "DiagnosticReport", patient=f"Patient/{patient['resource']['id']}"
    )
    assert bundle["total"] == 1
    report = bundle["entry"][0]["resource"]
    DiagnosticReport.model_validate(report)
    assert report["status"] == "final"
    assert report["code"]["coding"][0]["code"] == "58410-2"
    assert len(report["result"]) == 5
    first = await client.get(f"/fhir/{report['result'][0]['reference']}", headers=reader)
    assert first.status_code == 200
    assert first.json()["code"]["coding"][0]["code"] == "718-7"


async def test_arabic_and_french_names_from_adt_are_intact_through_fhir(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    cin = new_id()
    names = "Benali^Fatima Zahra^^^^^L~بنعلي^فاطمة الزهراء"
    acks = await send(
        mllp,
        encode(adt(control_id(), "A01", f"{cin}^^^CIN^NI", names, sex="F")),
        encode(
            adt(control_id(), "A08", f"{cin}^^^CIN^NI", "Lefèvre^Hélène", charset="8859/1"),
            "8859/1",
        ),
    )
    assert acks == ["AA", "AA"]
    bundle = await search(client, reader, "Patient", identifier=f"CIN|{cin}")
    validate_fhir(bundle)
    patient = bundle["entry"][0]["resource"]
    assert patient["name"] == [{"family": "Lefèvre", "given": ["Hélène"]}]
    assert patient["gender"] == "female"
    assert patient["birthDate"] == "1980-02-14"

    other = new_id()
    await send(mllp, encode(adt(control_id(), "A01", f"{other}^^^CIN^NI", names)))
    patient = (await search(client, reader, "Patient", identifier=f"CIN|{other}"))["entry"][0][
        "resource"
    ]
    assert patient["name"] == [
        {"use": "official", "family": "Benali", "given": ["Fatima Zahra"]},
        {"family": "بنعلي", "given": ["فاطمة الزهراء"]},
    ]


async def test_a40_merge_makes_the_old_identifier_find_the_survivor(
    mllp: MllpServer, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    cin, old_mrn = new_id(), new_id("M")
    await send(
        mllp,
        encode(adt(control_id(), "A01", f"{cin}^^^CIN^NI", "Benali^Fatima")),
        encode(oru(control_id(), f"{old_mrn}^^^CHU-RABAT^MR")),
    )
    before = await search(client, reader, "Patient", identifier=f"CHU-RABAT|{old_mrn}")
    prior_id = before["entry"][0]["resource"]["id"]
    merge = adt(
        control_id(), "A40", f"{cin}^^^CIN^NI", "Benali^Fatima", mrg=f"{old_mrn}^^^CHU-RABAT^MR"
    )
    assert await send(mllp, encode(merge)) == ["AA"]
    survivor = (await search(client, reader, "Patient", identifier=f"CIN|{cin}"))["entry"][0][
        "resource"
    ]
    by_old = await search(client, reader, "Patient", identifier=f"CHU-RABAT|{old_mrn}")
    assert [e["resource"]["id"] for e in by_old["entry"]] == [survivor["id"]]
    assert {"other": {"reference": f"Patient/{prior_id}"}, "type": "replaces"} in survivor["link"]
    prior = (await client.get(f"/fhir/Patient/{prior_id}", headers=reader)).json()
    assert prior["link"] == [
        {"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}
    ]
    labs = await search(client, reader, "Observation", **{"patient:identifier": f"CIN|{cin}"})
    assert labs["total"] == 5
    assert CIN_URI in {i["system"] for i in survivor["identifier"]}
