"""DICOMweb: QIDO-RS searches and WADO-RS retrieve over instances stored through C-STORE."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from dicom import status
from tests.dicom_support import RunningDicom, charset_file, renumbered, running_dicom, store
from tests.hl7_support import new_id
from tests.http_support import AppFactory, TokenFactory

STUDY_UID, SERIES_UID, SOP_UID, MODALITIES = "0020000D", "0020000E", "00080018", "00080061"


@pytest.fixture(scope="module")
async def scp(
    api_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningDicom]:
    async with running_dicom(api_dsn, tmp_path_factory.mktemp("dicomweb")) as running:
        yield running


@pytest.fixture
def web(make_client: AppFactory, scp: RunningDicom) -> httpx.AsyncClient:
    return make_client(dicom_storage=scp.root)


def _dataset(patient_id: str, modality: str, study_date: str, study: str | None = None) -> Dataset:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path)
    suffix = str(int(secrets.token_hex(6), 16))
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.31.{suffix}"
    ds.StudyInstanceUID = study or f"1.2.826.0.1.3680043.10.32.{suffix}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.33.{suffix}"
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
async def studies(scp: RunningDicom) -> tuple[str, list[Dataset]]:
    """A CIN with a CT study (2026-11-20, two series) and an MR study (2026-11-27)."""
    cin = new_id()
    ct = _dataset(cin, "CT", "20261120")
    ct_second = _dataset(cin, "CT", "20261120", study=str(ct.StudyInstanceUID))
    mr = _dataset(cin, "MR", "20261127")
    codes = await asyncio.to_thread(store, scp.port, [ct, ct_second, mr])
    assert codes == [status.SUCCESS] * 3
    return cin, [ct, ct_second, mr]


def _values(items: list[dict[str, Any]], tag: str) -> list[Any]:
    return [item[tag]["Value"][0] for item in items]


async def _json(
    client: httpx.AsyncClient, headers: dict[str, str], path: str, params: Any = None
) -> list[dict[str, Any]]:
    response = await client.get(path, params=params, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    body: list[dict[str, Any]] = response.json()
    for item in body:
        for tag, element in item.items():
            assert re.fullmatch(r"[0-9A-F]{8}", tag)
            assert "vr" in element
    return body


async def test_qido_finds_studies_by_patient_id_in_dicom_json(
    web: httpx.AsyncClient, reader: dict[str, str], studies: tuple[str, list[Dataset]]
) -> None:
    cin, (ct, _, mr) = studies
    found = await _json(web, reader, "/dicomweb/studies", {"PatientID": cin})
    assert _values(found, STUDY_UID) == [ct.StudyInstanceUID, mr.StudyInstanceUID]
    assert found[0][MODALITIES]["Value"] == ["CT"]
    assert found[0]["00201206"]["Value"] == [2]
    assert found[0]["00100020"]["Value"] == [cin]


@pytest.mark.parametrize("name", ["chrArab.dcm", "chrFren.dcm", "chrX1.dcm", "chrH31.dcm"])
async def test_qido_gives_the_patient_name_exactly_in_its_groups(
    web: httpx.AsyncClient, reader: dict[str, str], scp: RunningDicom, name: str
) -> None:
    original = str(charset_file(name).PatientName)
    ds = renumbered(charset_file(name))
    ds.PatientID = new_id()
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    [found] = await _json(web, reader, "/dicomweb/studies", {"PatientID": str(ds.PatientID)})
    [groups] = found["00100010"]["Value"]
    parts = [groups.get(group, "") for group in ("Alphabetic", "Ideographic", "Phonetic")]
    assert "=".join(parts).rstrip("=") == original


@pytest.mark.parametrize(
    ("params", "modalities"),
    [
        ({"ModalitiesInStudy": "MR"}, ["MR"]),
        ({"StudyDate": "20261120"}, ["CT"]),
        ({"StudyDate": "20261121-"}, ["MR"]),
        ({"StudyDate": "-20261126"}, ["CT"]),
        ({"StudyDate": "20261101-20261130"}, ["CT", "MR"]),
        ({"limit": "1"}, ["CT"]),
        ({"limit": "1", "offset": "1"}, ["MR"]),
        ({"offset": "2"}, []),
    ],
)
async def test_qido_filters_by_modality_and_date_and_pages_by_limit_and_offset(
    web: httpx.AsyncClient,
    reader: dict[str, str],
    studies: tuple[str, list[Dataset]],
    params: dict[str, str],
    modalities: list[str],
) -> None:
    cin, _ = studies
    found = await _json(web, reader, "/dicomweb/studies", {"PatientID": cin, **params})
    assert [item[MODALITIES]["Value"][0] for item in found] == modalities


async def test_qido_lists_series_and_instances_of_a_study(
    web: httpx.AsyncClient, reader: dict[str, str], studies: tuple[str, list[Dataset]]
) -> None:
    _, (ct, ct_second, _) = studies
    base = f"/dicomweb/studies/{ct.StudyInstanceUID}"
    series = await _json(web, reader, f"{base}/series")
    assert _values(series, SERIES_UID) == [ct.SeriesInstanceUID, ct_second.SeriesInstanceUID]
    instances = await _json(web, reader, f"{base}/series/{ct.SeriesInstanceUID}/instances")
    assert _values(instances, SOP_UID) == [ct.SOPInstanceUID]


def _single_part(response: httpx.Response) -> tuple[dict[str, str], bytes]:
    media = response.headers["content-type"]
    assert media.startswith('multipart/related; type="application/dicom"')
    boundary = media.rsplit("boundary=", 1)[1].encode()
    body = response.content
    assert body.startswith(b"--" + boundary + b"\r\n")
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    inner = body[len(boundary) + 4 : -(len(boundary) + 8)]
    head, _, part = inner.partition(b"\r\n\r\n")
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(":") for line in head.decode().split("\r\n"))
    )
    return headers, part


async def test_wado_retrieve_returns_the_stored_file_in_its_transfer_syntax(
    web: httpx.AsyncClient,
    reader: dict[str, str],
    studies: tuple[str, list[Dataset]],
    scp: RunningDicom,
) -> None:
    _, (ct, _, _) = studies
    url = (
        f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
        f"/instances/{ct.SOPInstanceUID}"
    )
    response = await web.get(
        url, headers={**reader, "Accept": 'multipart/related; type="application/dicom"'}
    )
    assert response.status_code == 200, response.text
    headers, part = _single_part(response)
    row = await scp.pool.fetchrow(
        "SELECT sha256, size, transfer_syntax FROM dicom_instance WHERE sop_instance_uid = $1",
        str(ct.SOPInstanceUID),
    )
    assert hashlib.sha256(part).digest() == row["sha256"]
    assert headers["content-type"] == f"application/dicom; transfer-syntax={row['transfer_syntax']}"
    parsed = dcmread(DicomBytesIO(part))
    assert parsed.SOPInstanceUID == ct.SOPInstanceUID
    assert parsed.file_meta.TransferSyntaxUID == row["transfer_syntax"]


async def test_wado_retrieve_in_another_transfer_syntax_is_406(
    web: httpx.AsyncClient, reader: dict[str, str], studies: tuple[str, list[Dataset]]
) -> None:
    _, (ct, _, _) = studies
    url = (
        f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
        f"/instances/{ct.SOPInstanceUID}"
    )
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    response = await web.get(url, headers={**reader, "Accept": accept})
    assert response.status_code == 406


async def test_wado_metadata_is_the_instance_in_dicom_json(
    web: httpx.AsyncClient, reader: dict[str, str], studies: tuple[str, list[Dataset]]
) -> None:
    _, (ct, _, _) = studies
    url = (
        f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
        f"/instances/{ct.SOPInstanceUID}/metadata"
    )
    [item] = await _json(web, reader, url)
    assert item[SOP_UID]["Value"] == [ct.SOPInstanceUID]
    assert "BulkDataURI" in item["7FE00010"]


@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb/studies/1.2.3.999999/series",
        "/dicomweb/studies/1.2.3.999999/series/1.2.3/instances",
        "/dicomweb/studies/1.2.3.999999/series/1.2.3/instances/1.2.3",
    ],
)
async def test_unknown_study_series_or_instance_is_404(
    web: httpx.AsyncClient, reader: dict[str, str], path: str
) -> None:
    assert (await web.get(path, headers=reader)).status_code == 404


@pytest.mark.parametrize(
    "params",
    [{"limit": "x"}, {"offset": "-1"}, {"StudyDate": "2026-11-20"}, {"ModalitiesInStudy": "c t"}],
)
async def test_bad_qido_parameter_is_a_400(
    web: httpx.AsyncClient, reader: dict[str, str], params: dict[str, str]
) -> None:
    response = await web.get("/dicomweb/studies", params=params, headers=reader)
    assert response.status_code == 400
    assert f"'{next(iter(params))}'" in response.json()["issue"][0]["diagnostics"]


async def test_dicomweb_needs_the_imaging_scope(
    web: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    assert (await web.get("/dicomweb/studies")).status_code == 401
    token = await make_token("system/Observation.read")
    response = await web.get("/dicomweb/studies", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    imaging = await make_token("system/ImagingStudy.read")
    response = await web.get("/dicomweb/studies", headers={"Authorization": f"Bearer {imaging}"})
    assert response.status_code == 200


async def test_wado_retrieve_is_audited_with_the_patient(
    web: httpx.AsyncClient,
    api_pool: asyncpg.Pool,
    make_token: TokenFactory,
    studies: tuple[str, list[Dataset]],
) -> None:
    _, (ct, _, _) = studies
    token = await make_token("system/ImagingStudy.read")
    url = (
        f"/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
        f"/instances/{ct.SOPInstanceUID}"
    )
    assert (await web.get(url, headers={"Authorization": f"Bearer {token}"})).status_code == 200
    row = await api_pool.fetchrow(
        """SELECT a.* FROM api_audit a JOIN api_token t ON t.name = a.token_name
           WHERE t.token_hash = sha256($1::text::bytea) ORDER BY a.id DESC LIMIT 1""",
        token,
    )
    patient = await api_pool.fetchval(
        "SELECT patient_id FROM dicom_study WHERE study_uid = $1", str(ct.StudyInstanceUID)
    )
    assert row["action"] == "read"
    assert list(row["patient_ids"]) == [patient]
    assert str(ct.StudyInstanceUID) not in row["query_shape"]
