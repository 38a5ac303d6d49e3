"""`DiagnosticReport?patient=&code=&date=` from HL7 ORU, `ImagingStudy?patient=&started=&modality=
&identifier=` from DICOM C-STORE."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom import status
from hl7.server import MllpServer, MllpSettings
from ingest.pipeline import GroupCommitPipeline, PipelineSettings
from monitoring.metrics import Metrics
from storage.migrations import available_migrations
from storage.writer import BatchWriter
from tests.dicom_support import RunningDicom, running_dicom, store
from tests.hl7_support import MllpClient, control_id, encode, new_id, oru
from tests.http_support import validate_fhir


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


@pytest.fixture(scope="module")
async def scp(
    api_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningDicom]:
    async with running_dicom(api_dsn, tmp_path_factory.mktemp("fhir-imaging")) as running:
        yield running


async def _get(
    client: httpx.AsyncClient, headers: dict[str, str], path: str, params: Any, status: int = 200
) -> dict[str, Any]:
    response = await client.get(path, params=params, headers=headers)
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    validate_fhir(body)
    return body


async def _patient_id(client: httpx.AsyncClient, headers: dict[str, str], value: str) -> str:
    found = await _get(client, headers, "/fhir/Patient", {"identifier": value})
    return str(found["entry"][0]["resource"]["id"])


@pytest.fixture(scope="module")
async def lab_patient(mllp: MllpServer) -> str:
    """A CIN with one CBC report observed 2026-11-27T09:00+01:00."""
    cin = new_id()
    assert mllp.port is not None
    async with MllpClient("127.0.0.1", mllp.port) as client:
        assert (await client.request(encode(oru(control_id(), f"{cin}^^^CIN^NI")))).code == "AA"
    return cin


@pytest.mark.parametrize(
    ("params", "total"),
    [
        ({}, 1),
        ({"code": "58410-2"}, 1),
        ({"code": "http://loinc.org|58410-2"}, 1),
        ({"code": "718-7,58410-2"}, 1),
        ({"code": "718-7"}, 0),
        ({"date": "2026-11-27"}, 1),
        ({"date": "ge2026-11-27T08:00:00Z"}, 1),
        ({"date": "gt2026-11-27T08:00:00Z"}, 0),
        ({"date": "ne2026-11"}, 0),
    ],
)
async def test_diagnostic_reports_are_searched_by_code_and_date(
    client: httpx.AsyncClient,
    reader: dict[str, str],
    lab_patient: str,
    params: dict[str, str],
    total: int,
) -> None:
    query = {"patient:identifier": f"CIN|{lab_patient}", **params}
    bundle = await _get(client, reader, "/fhir/DiagnosticReport", query)
    assert bundle["total"] == total


async def test_report_results_resolve_to_observations(
    client: httpx.AsyncClient, reader: dict[str, str], lab_patient: str
) -> None:
    query = {"patient:identifier": f"CIN|{lab_patient}"}
    report = (await _get(client, reader, "/fhir/DiagnosticReport", query))["entry"][0]["resource"]
    for result in report["result"]:
        response = await client.get(f"/fhir/{result['reference']}", headers=reader)
        assert response.status_code == 200
        validate_fhir(response.json())


def _study(patient_id: str, modality: str, study_date: str) -> Dataset:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path)
    suffix = str(int(secrets.token_hex(6), 16))
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.21.{suffix}"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.22.{suffix}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.23.{suffix}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "CIN"
    # The sample file's other ids are shared by every test that uses it: they would link this
    # study to the patients of those tests.
    del ds.OtherPatientIDsSequence
    ds.Modality = modality
    ds.StudyDate = study_date
    return ds


@pytest.fixture(scope="module")
async def imaged(scp: RunningDicom) -> tuple[str, list[Dataset]]:
    """A CIN with a CT study of 2026-11-20 and an MR study of 2026-11-27."""
    cin = new_id()
    datasets = [_study(cin, "CT", "20261120"), _study(cin, "MR", "20261127")]
    codes = await asyncio.to_thread(store, scp.port, datasets)
    assert codes == [status.SUCCESS, status.SUCCESS]
    return cin, datasets


@pytest.mark.parametrize(
    ("params", "modalities"),
    [
        ({}, ["CT", "MR"]),
        ({"modality": "MR"}, ["MR"]),
        ({"modality": "CT,MR"}, ["CT", "MR"]),
        ({"started": "2026-11-20"}, ["CT"]),
        ({"started": "ge2026-11-21"}, ["MR"]),
        ({"started": "ne2026-11-20"}, ["MR"]),
        ({"started": "2025"}, []),
    ],
)
async def test_imaging_studies_are_searched_by_start_and_modality(
    client: httpx.AsyncClient,
    reader: dict[str, str],
    imaged: tuple[str, list[Dataset]],
    params: dict[str, str],
    modalities: list[str],
) -> None:
    cin, _ = imaged
    query = {"patient:identifier": f"CIN|{cin}", **params}
    bundle = await _get(client, reader, "/fhir/ImagingStudy", query)
    found = [e["resource"]["modality"][0]["code"] for e in bundle.get("entry", [])]
    assert sorted(found) == modalities


async def test_imaging_study_is_found_by_its_study_uid(
    client: httpx.AsyncClient, reader: dict[str, str], imaged: tuple[str, list[Dataset]]
) -> None:
    _, datasets = imaged
    uid = str(datasets[1].StudyInstanceUID)
    bundle = await _get(
        client, reader, "/fhir/ImagingStudy", {"identifier": f"urn:dicom:uid|urn:oid:{uid}"}
    )
    assert bundle["total"] == 1
    assert bundle["entry"][0]["resource"]["identifier"][0]["value"] == f"urn:oid:{uid}"


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"modality": "ct scan"}, "modality"),
        ({"started": "yesterday"}, "started"),
        ({"identifier": "urn:dicom:uid|urn:oid:1..2"}, "identifier"),
    ],
)
async def test_bad_imaging_search_value_is_a_400_naming_it(
    client: httpx.AsyncClient, reader: dict[str, str], params: dict[str, str], parameter: str
) -> None:
    query = {"patient": "1", **params} if parameter != "identifier" else params
    outcome = await _get(client, reader, "/fhir/ImagingStudy", query, status=400)
    assert f"'{parameter}'" in outcome["issue"][0]["diagnostics"]


async def test_imaging_study_started_is_the_instant_with_an_offset_else_the_date(
    client: httpx.AsyncClient, reader: dict[str, str], scp: RunningDicom
) -> None:
    cin = new_id()
    timed = _study(cin, "CR", "20261120")
    timed.StudyTime = "093000"
    timed.TimezoneOffsetFromUTC = "+0100"
    dated = _study(cin, "US", "20261121")
    dated.StudyTime = "101500"  # no offset: a time of day in an unknown zone is no instant
    if "TimezoneOffsetFromUTC" in dated:
        del dated.TimezoneOffsetFromUTC
    codes = await asyncio.to_thread(store, scp.port, [timed, dated])
    assert codes == [status.SUCCESS, status.SUCCESS]
    bundle = await _get(client, reader, "/fhir/ImagingStudy", {"patient:identifier": f"CIN|{cin}"})
    started = {
        e["resource"]["modality"][0]["code"]: e["resource"]["started"] for e in bundle["entry"]
    }
    assert started == {"CR": "2026-11-20T08:30:00Z", "US": "2026-11-21"}
    counts = {
        (e["resource"]["numberOfSeries"], e["resource"]["numberOfInstances"])
        for e in bundle["entry"]
    }
    assert counts == {(1, 1)}


async def test_imaging_study_with_an_offset_but_no_time_started_on_its_date(
    client: httpx.AsyncClient, reader: dict[str, str], scp: RunningDicom
) -> None:
    cin = new_id()
    undated = _study(cin, "DX", "20261120")
    if "StudyTime" in undated:
        del undated.StudyTime
    undated.TimezoneOffsetFromUTC = "+0100"  # midnight there would be 2026-11-19 in UTC
    codes = await asyncio.to_thread(store, scp.port, [undated])
    assert codes == [status.SUCCESS]
    query = {"patient:identifier": f"CIN|{cin}", "started": "2026-11-20"}
    bundle = await _get(client, reader, "/fhir/ImagingStudy", query)
    assert [e["resource"]["started"] for e in bundle.get("entry", [])] == ["2026-11-20"]


async def test_migration_0016_takes_the_invented_instant_from_studies_stored_before(
    scp: RunningDicom,
) -> None:
    undated = _study(new_id(), "DX", "20261120")
    if "StudyTime" in undated:
        del undated.StudyTime
    timed = _study(new_id(), "CR", "20261120")
    timed.StudyTime, timed.TimezoneOffsetFromUTC = "093000", "+0100"
    assert await asyncio.to_thread(store, scp.port, [undated, timed]) == [status.SUCCESS] * 2
    uids = [str(undated.StudyInstanceUID), str(timed.StudyInstanceUID)]
    await scp.pool.execute(  # as the listener wrote it before the fix
        "UPDATE dicom_study SET started = '2026-11-19T23:00:00Z' WHERE study_uid = $1", uids[0]
    )
    (migration,) = [m for m in available_migrations() if m.version == 16]
    await scp.pool.execute(migration.sql)
    rows = await scp.pool.fetch(
        "SELECT study_uid, started FROM dicom_study WHERE study_uid = ANY($1::text[])", uids
    )
    started = {r["study_uid"]: r["started"] for r in rows}
    assert started[uids[0]] is None
    assert started[uids[1]] == datetime(2026, 11, 20, 8, 30, tzinfo=UTC)
