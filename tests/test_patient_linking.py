"""One patient across protocols: DICOM resolves a header whose identifiers disagree as HL7 does."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from pydicom.dataset import Dataset

from dicom import status
from tests.dicom_support import RunningDicom, running_dicom, store
from tests.test_dicom_index import other_ids
from tests.test_dicom_store import fresh


@pytest.fixture(scope="module")
async def scp(
    module_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningDicom]:
    async with running_dicom(module_dsn, tmp_path_factory.mktemp("linking")) as running:
        yield running


async def known_patient(scp: RunningDicom, system: str, value: str) -> int:
    patient: int = await scp.pool.fetchval(
        "INSERT INTO patient (names) VALUES ('[]'::jsonb) RETURNING id"
    )
    await scp.pool.execute(
        "INSERT INTO patient_identifier (system, value, patient_id) VALUES ($1, $2, $3)",
        system,
        value,
        patient,
    )
    return patient


async def study_patient(scp: RunningDicom, ds: Dataset) -> int:
    patient: int = await scp.pool.fetchval(
        "SELECT patient_id FROM dicom_study WHERE study_uid = $1", str(ds.StudyInstanceUID)
    )
    return patient


async def test_the_national_id_wins_when_the_header_ids_name_different_patients(
    scp: RunningDicom,
) -> None:
    mrn, cin = f"MRN-{secrets.token_hex(4)}", f"LK{secrets.randbelow(10**6):06d}"
    # The hospital number was given to another patient first (the lower id): a mix-up the
    # national id settles, as `hl7.mapping.identifiers` settles it for HL7.
    other = await known_patient(scp, "CHU-FES", mrn)
    right = await known_patient(scp, "CIN", cin)
    ds = fresh()
    ds.PatientID, ds.IssuerOfPatientID = mrn, "CHU-FES"
    ds.OtherPatientIDsSequence = other_ids((cin, "CIN"))
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    assert other < right
    assert await study_patient(scp, ds) == right


@pytest.mark.parametrize("issuer", ["MA-CIN", "CNIE"])
async def test_a_national_id_issuer_alias_links_to_the_patient_of_the_cin(
    scp: RunningDicom, issuer: str
) -> None:
    cin = f"LK{secrets.randbelow(10**6):06d}"
    known = await known_patient(scp, "CIN", cin)
    ds = fresh()
    ds.PatientID, ds.IssuerOfPatientID = f"MRN-{secrets.token_hex(4)}", "CHU-OUJDA"
    ds.OtherPatientIDsSequence = other_ids((cin, issuer))
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    assert await study_patient(scp, ds) == known
