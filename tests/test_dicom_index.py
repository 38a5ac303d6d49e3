"""What the index makes of stored instances: decoded names, linked patients, C-FIND, ImagingStudy,
and 0xA700 while the database is down."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom import status
from dicom.config import DicomSettings
from storage.dicom_queries import FindRequest, find
from tests.conftest import PrivatePostgresFactory
from tests.dicom_support import (
    PATIENT_ROOT_FIND,
    STUDY_ROOT_FIND,
    RunningDicom,
    c_find,
    charset_file,
    instance_row,
    query,
    renumbered,
    running_dicom,
    store,
    stored_files,
    temp_files,
)
from tests.services_support import ExplainingConnection

CHARSET_FILES = [
    "chrArab.dcm",  # ISO_IR 127, Arabic
    "chrFren.dcm",  # ISO_IR 100, French
    "chrFrenMulti.dcm",  # ISO_IR 100 with several values
    "chrGerm.dcm",  # ISO_IR 100
    "chrX1.dcm",  # ISO_IR 192, UTF-8
    "chrH31.dcm",  # ISO 2022 IR 87, Japanese with escapes
]


@pytest.fixture(scope="module")
async def scp(
    api_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningDicom]:
    async with running_dicom(api_dsn, tmp_path_factory.mktemp("dicom-index")) as running:
        yield running


def ct(patient_id: str, **elements: object) -> Dataset:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = renumbered(dcmread(path))
    ds.PatientID = patient_id
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def other_ids(*pairs: tuple[str, str]) -> list[Dataset]:
    items = []
    for value, issuer in pairs:
        item = Dataset()
        item.PatientID = value
        item.IssuerOfPatientID = issuer
        items.append(item)
    return items


@pytest.mark.parametrize("name", CHARSET_FILES)
async def test_patient_name_is_decoded_exactly_into_the_index(scp: RunningDicom, name: str) -> None:
    original = str(charset_file(name).PatientName)
    ds = renumbered(charset_file(name))
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    assert row["patient_name"] == original
    assert row["charset"]


@pytest.mark.parametrize("name", CHARSET_FILES)
async def test_patient_name_comes_back_exactly_from_c_find(scp: RunningDicom, name: str) -> None:
    original = str(charset_file(name).PatientName)
    ds = renumbered(charset_file(name))
    ds.PatientID = f"CS-{secrets.token_hex(4)}"
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    found, final = await asyncio.to_thread(
        c_find,
        scp.port,
        query("STUDY", PatientID=str(ds.PatientID), PatientName="", StudyInstanceUID=""),
        STUDY_ROOT_FIND,
    )
    assert final == status.SUCCESS
    [match] = found
    assert str(match.PatientName) == original


async def test_arabic_name_reaches_fhir_patient_and_imaging_study(
    scp: RunningDicom, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    ds = renumbered(charset_file("chrArab.dcm"))
    cin = f"AR{secrets.randbelow(10**6):06d}"
    ds.PatientID = f"MRN-{secrets.token_hex(4)}"
    ds.IssuerOfPatientID = "CHU-RABAT"
    ds.OtherPatientIDsSequence = other_ids((cin, "CIN"))
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS

    found = await client.get("/fhir/Patient", params={"identifier": f"CIN|{cin}"}, headers=reader)
    assert found.status_code == 200
    [entry] = found.json()["entry"]
    patient = entry["resource"]
    assert patient["name"][0]["family"] == "قباني"
    assert patient["name"][0]["given"] == ["لنزار"]
    values = {i["value"] for i in patient["identifier"]}
    assert {cin, str(ds.PatientID)} <= values

    studies = await client.get(
        "/fhir/ImagingStudy", params={"patient": patient["id"]}, headers=reader
    )
    assert studies.status_code == 200
    body = studies.json()
    assert body["total"] == 1
    study = body["entry"][0]["resource"]
    assert study["identifier"][0]["value"] == f"urn:oid:{ds.StudyInstanceUID}"
    assert study["numberOfSeries"] == 1
    assert study["numberOfInstances"] == 1
    assert study["subject"] == {"reference": f"Patient/{patient['id']}"}


async def test_national_id_links_imaging_to_the_patient_of_vitals_and_labs(
    scp: RunningDicom,
) -> None:
    cin = f"LK{secrets.randbelow(10**6):06d}"
    known = await scp.pool.fetchval("INSERT INTO patient (names) VALUES ('[]'::jsonb) RETURNING id")
    await scp.pool.execute(
        "INSERT INTO patient_identifier (system, value, patient_id) VALUES ('CIN', $1, $2)",
        cin,
        known,
    )
    first = ct(f"MRN-{secrets.token_hex(3)}", IssuerOfPatientID="CHU-FES")
    first.OtherPatientIDsSequence = other_ids((cin, "CIN"))
    second = ct(str(first.PatientID), IssuerOfPatientID="CHU-FES", Modality="CR")
    codes = await asyncio.to_thread(store, scp.port, [first, second])
    assert codes == [status.SUCCESS, status.SUCCESS]
    linked = await scp.pool.fetch(
        "SELECT DISTINCT patient_id FROM dicom_study WHERE study_uid = ANY($1::text[])",
        [str(first.StudyInstanceUID), str(second.StudyInstanceUID)],
    )
    assert [r["patient_id"] for r in linked] == [known]
    mrn_owner = await scp.pool.fetchval(
        "SELECT patient_id FROM patient_identifier WHERE system = 'CHU-FES' AND value = $1",
        str(first.PatientID),
    )
    assert mrn_owner == known


async def patient_version(pool: asyncpg.Pool, system: str, value: str) -> asyncpg.Record:
    return await pool.fetchrow(
        """SELECT p.xmin::text AS version, p.birth_date, p.gender, p.family
           FROM patient p JOIN patient_identifier i ON i.patient_id = p.id
           WHERE i.system = $1 AND i.value = $2""",
        system,
        value,
    )


def own_patient(pid: str, **elements: object) -> Dataset:
    """CT_small as an image of a patient of its own (its Other Patient IDs are shared)."""
    ds = ct(pid, IssuerOfPatientID="CHU-OUJDA", **elements)
    del ds.OtherPatientIDsSequence
    return ds


async def test_a_new_patient_of_an_image_is_found_by_its_arabic_name(
    scp: RunningDicom, client: httpx.AsyncClient, reader: dict[str, str]
) -> None:
    ds = renumbered(charset_file("chrArab.dcm"))
    ds.PatientID = f"MRN-{secrets.token_hex(4)}"
    ds.IssuerOfPatientID = "CHU-FES"
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    mine = await client.get(
        "/fhir/Patient", params={"identifier": f"CHU-FES|{ds.PatientID}"}, headers=reader
    )
    [entry] = mine.json()["entry"]

    found = await client.get(
        "/fhir/Patient", params={"name": "قباني", "_count": "1000"}, headers=reader
    )
    assert found.status_code == 200
    assert entry["resource"]["id"] in {e["resource"]["id"] for e in found.json()["entry"]}


async def test_further_images_of_a_patient_leave_its_row_untouched(scp: RunningDicom) -> None:
    pid = f"MRN-{secrets.token_hex(3)}"
    first = own_patient(pid, PatientBirthDate="19800101", PatientSex="F")
    assert await asyncio.to_thread(store, scp.port, [first]) == [status.SUCCESS]
    before = await patient_version(scp.pool, "CHU-OUJDA", pid)
    later = [own_patient(pid, PatientBirthDate="19800101") for _ in "ab"]
    assert await asyncio.to_thread(store, scp.port, later) == [status.SUCCESS] * 2
    after = await patient_version(scp.pool, "CHU-OUJDA", pid)
    assert after == before  # not even a new row version


async def test_an_image_fills_what_its_patient_lacked(scp: RunningDicom) -> None:
    pid = f"MRN-{secrets.token_hex(3)}"
    first = own_patient(pid, PatientSex="")
    del first.PatientBirthDate
    assert await asyncio.to_thread(store, scp.port, [first]) == [status.SUCCESS]
    lacking = await patient_version(scp.pool, "CHU-OUJDA", pid)
    assert lacking["birth_date"] is None
    assert lacking["gender"] is None
    second = own_patient(pid, PatientBirthDate="19800101", PatientSex="F")
    assert await asyncio.to_thread(store, scp.port, [second]) == [status.SUCCESS]
    filled = await patient_version(scp.pool, "CHU-OUJDA", pid)
    assert str(filled["birth_date"]) == "1980-01-01"
    assert filled["gender"] == "female"
    assert filled["family"] == lacking["family"]


async def test_patient_id_without_issuer_is_scoped_to_the_calling_ae(scp: RunningDicom) -> None:
    ds = ct(f"LOCAL-{secrets.token_hex(3)}")
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    system = await scp.pool.fetchval(
        "SELECT system FROM patient_identifier WHERE value = $1", str(ds.PatientID)
    )
    assert system == "dicom-ae/MODALITY"


@pytest.fixture(scope="module")
async def indexed(scp: RunningDicom) -> list[Dataset]:
    """Two studies of one patient: a CT of two series (2 + 1 images) and a CR."""
    pid = f"FIND-{secrets.token_hex(3)}"
    a1 = ct(pid, PatientName="El Amrani^Fatima", StudyDate="20240301", AccessionNumber="ACC1")
    a2 = ct(pid, PatientName="El Amrani^Fatima", StudyDate="20240301", AccessionNumber="ACC1")
    a2.StudyInstanceUID, a2.SeriesInstanceUID = a1.StudyInstanceUID, a1.SeriesInstanceUID
    a3 = ct(pid, PatientName="El Amrani^Fatima", StudyDate="20240301", AccessionNumber="ACC1")
    a3.StudyInstanceUID = a1.StudyInstanceUID
    b1 = ct(pid, PatientName="El Amrani^Fatima", StudyDate="20240415", Modality="CR")
    datasets = [a1, a2, a3, b1]
    codes = await asyncio.to_thread(store, scp.port, datasets)
    assert codes == [status.SUCCESS] * 4
    return datasets


async def test_find_at_patient_level_matches_by_patient_id(
    scp: RunningDicom, indexed: list[Dataset]
) -> None:
    pid = str(indexed[0].PatientID)
    found, final = await asyncio.to_thread(
        c_find,
        scp.port,
        query("PATIENT", PatientID=pid, PatientName="", NumberOfPatientRelatedStudies=""),
        PATIENT_ROOT_FIND,
    )
    assert final == status.SUCCESS
    [match] = found
    assert match.PatientID == pid
    assert str(match.PatientName) == "El Amrani^Fatima"
    assert int(match.NumberOfPatientRelatedStudies) == 2


async def test_a_find_with_matches_is_audited_with_the_ae_title_level_and_patients(
    scp: RunningDicom, indexed: list[Dataset]
) -> None:
    pid = str(indexed[0].PatientID)
    patients = await scp.pool.fetchval(
        "SELECT array_agg(DISTINCT patient_id) FROM dicom_study WHERE dicom_patient_id = $1", pid
    )

    await asyncio.to_thread(
        c_find, scp.port, query("STUDY", PatientID=pid, StudyInstanceUID=""), STUDY_ROOT_FIND
    )

    row = await scp.pool.fetchrow(
        "SELECT * FROM api_audit WHERE protocol = 'dicom' ORDER BY id DESC LIMIT 1"
    )
    assert (row["token_name"], row["action"], row["query_shape"]) == (
        "VIEWER",
        "search-type",
        "C-FIND STUDY, 2 match(es)",
    )
    assert sorted(row["patient_ids"]) == sorted(patients)


async def test_a_find_without_matches_writes_no_audit_row(scp: RunningDicom) -> None:
    before = await scp.pool.fetchval("SELECT count(*) FROM api_audit")

    found, final = await asyncio.to_thread(
        c_find, scp.port, query("STUDY", PatientID="NOBODY-404"), STUDY_ROOT_FIND
    )

    assert (found, final) == ([], status.SUCCESS)
    assert await scp.pool.fetchval("SELECT count(*) FROM api_audit") == before


async def test_find_at_study_level_matches_dates_and_wildcards(
    scp: RunningDicom, indexed: list[Dataset]
) -> None:
    pid = str(indexed[0].PatientID)
    found, final = await asyncio.to_thread(
        c_find,
        scp.port,
        query(
            "STUDY",
            PatientID=pid,
            PatientName="El Amr*",
            StudyDate="20240401-20240430",
            StudyInstanceUID="",
            ModalitiesInStudy="",
        ),
        STUDY_ROOT_FIND,
    )
    assert final == status.SUCCESS
    [match] = found
    assert match.StudyInstanceUID == indexed[3].StudyInstanceUID
    assert list(match.ModalitiesInStudy) == ["CR"] or match.ModalitiesInStudy == "CR"


LATIN = "BENANI^HELENE"  # as a modality's worklist often has it
ARABIC = "أحمد^فاطمة"


@pytest.mark.parametrize(
    ("stored", "name"),
    [
        *((LATIN, name) for name in ("Benani^Hélène*", "benani^helene", "BENANI*", "ben?ni^h*")),
        # Bare alef for hamza or madda, heh for teh marbuta, short vowels (fatha, sukun) ignored.
        *((ARABIC, name) for name in ("احمد^فاطمه", ARABIC, "آحمد^فاطمة", "أَحْمَد*", "احمد*")),
    ],
)
async def test_find_matches_a_person_name_whatever_its_case_accents_and_arabic_variants(
    scp: RunningDicom, stored: str, name: str
) -> None:
    pid = f"CASE-{secrets.token_hex(3)}"
    sent = ct(pid, SpecificCharacterSet="ISO_IR 192", PatientName=stored)
    assert await asyncio.to_thread(store, scp.port, [sent]) == [status.SUCCESS]
    identifier = query("STUDY", PatientID=pid, PatientName=name, StudyInstanceUID="")
    identifier.SpecificCharacterSet = "ISO_IR 192"
    found, final = await asyncio.to_thread(c_find, scp.port, identifier, STUDY_ROOT_FIND)
    assert final == status.SUCCESS
    [match] = found
    assert str(match.PatientName) == stored  # answered as stored


async def test_find_by_person_name_does_not_match_another_name(scp: RunningDicom) -> None:
    pid = f"CASE-{secrets.token_hex(3)}"
    codes = await asyncio.to_thread(store, scp.port, [ct(pid, PatientName="BENANI^HELENE")])
    assert codes == [status.SUCCESS]
    identifier = query("STUDY", PatientID=pid, PatientName="Bennani*", StudyInstanceUID="")
    found, final = await asyncio.to_thread(c_find, scp.port, identifier, STUDY_ROOT_FIND)
    assert (found, final) == ([], status.SUCCESS)


@pytest.mark.parametrize("name", ["El Amr*", "El Amrani^Fatima", "العلوي*"])
async def test_find_by_patient_name_reads_an_index_not_every_study(
    scp: RunningDicom, indexed: list[Dataset], name: str
) -> None:
    async with scp.pool.acquire() as conn, conn.transaction():
        # The test database is small enough for a sequential scan to look cheaper: forbid it,
        # as an archive of millions of studies would.
        await conn.execute("SET LOCAL enable_seqscan = off")
        explaining = ExplainingConnection(conn)
        await find(explaining, FindRequest("STUDY", (("PatientName", name),), 10))
    [plan] = explaining.plans
    assert "dicom_study_patient_name_folded_idx" in plan, plan


async def test_find_at_series_level_counts_instances(
    scp: RunningDicom, indexed: list[Dataset]
) -> None:
    found, final = await asyncio.to_thread(
        c_find,
        scp.port,
        query(
            "SERIES",
            StudyInstanceUID=indexed[0].StudyInstanceUID,
            SeriesInstanceUID="",
            Modality="",
            NumberOfSeriesRelatedInstances="",
        ),
        STUDY_ROOT_FIND,
    )
    assert final == status.SUCCESS
    counts = sorted(int(m.NumberOfSeriesRelatedInstances) for m in found)
    assert counts == [1, 2]


async def test_find_at_image_level_matches_a_list_of_uids(
    scp: RunningDicom, indexed: list[Dataset]
) -> None:
    wanted = [str(indexed[0].SOPInstanceUID), str(indexed[3].SOPInstanceUID)]
    found, final = await asyncio.to_thread(
        c_find,
        scp.port,
        query("IMAGE", SOPInstanceUID=wanted, SOPClassUID=""),
        PATIENT_ROOT_FIND,
    )
    assert final == status.SUCCESS
    assert sorted(str(m.SOPInstanceUID) for m in found) == sorted(wanted)


async def test_find_with_an_unknown_level_is_refused(scp: RunningDicom) -> None:
    found, final = await asyncio.to_thread(
        c_find, scp.port, query("WARD", PatientID="x"), STUDY_ROOT_FIND
    )
    assert found == []
    assert final == status.FIND_IDENTIFIER_INVALID


async def test_database_down_answers_a700_and_a_resend_after_recovery_stores_once(
    private_postgres: PrivatePostgresFactory, tmp_path: Path
) -> None:
    server = await private_postgres()
    root = tmp_path / "store"
    settings = DicomSettings(store_timeout=3.0)
    async with running_dicom(server.dsn(), root, settings, pool_size=2) as scp:
        ds = ct("DOWN-1")
        await server.stop()
        [down] = await asyncio.to_thread(store, scp.port, [ds])
        assert down == status.OUT_OF_RESOURCES
        assert temp_files(scp.root) == []
        await server.start()
        async with asyncio.timeout(60):
            while True:
                [again] = await asyncio.to_thread(store, scp.port, [ds])
                if again != status.OUT_OF_RESOURCES:
                    break
        assert again == status.SUCCESS
        conn = await asyncpg.connect(server.dsn())
        try:
            rows = await conn.fetchval(
                "SELECT count(*) FROM dicom_instance WHERE sop_instance_uid = $1",
                str(ds.SOPInstanceUID),
            )
        finally:
            await conn.close()
        assert rows == 1
        assert len(stored_files(scp.root)) == 1


async def test_find_at_patient_level_in_the_study_root_model_is_refused(
    scp: RunningDicom, indexed: list[Dataset]
) -> None:
    found, final = await asyncio.to_thread(
        c_find, scp.port, query("PATIENT", PatientID=str(indexed[0].PatientID)), STUDY_ROOT_FIND
    )
    assert found == []
    assert final == status.FIND_IDENTIFIER_INVALID  # PS3.4 C.6.2: Study Root has no patient level


@pytest.mark.parametrize(
    ("model", "level", "expected"),
    [
        (PATIENT_ROOT_FIND, "STUDY", [0, 3]),  # the patient's two studies
        (PATIENT_ROOT_FIND, "SERIES", [0, 2]),  # the CT's two series
        (STUDY_ROOT_FIND, "IMAGE", [0, 1]),  # the first series' two images
    ],
)
async def test_find_answers_each_level_of_both_models(
    scp: RunningDicom, indexed: list[Dataset], model: str, level: str, expected: list[int]
) -> None:
    first = indexed[0]
    keys = {
        "STUDY": {"PatientID": str(first.PatientID), "StudyInstanceUID": ""},
        "SERIES": {"StudyInstanceUID": first.StudyInstanceUID, "SeriesInstanceUID": ""},
        "IMAGE": {"SeriesInstanceUID": first.SeriesInstanceUID, "SOPInstanceUID": ""},
    }[level]
    found, final = await asyncio.to_thread(c_find, scp.port, query(level, **keys), model)
    assert final == status.SUCCESS
    unique = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
    uids = sorted(str(match.get(unique[level])) for match in found)
    assert uids == sorted(str(indexed[i].get(unique[level])) for i in expected)
    assert all(match.QueryRetrieveLevel == level for match in found)
