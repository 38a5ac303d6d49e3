"""What a modality or a query client writes out of the standard (a Patient ID over LO's 64
characters, a birth date as 1987-03-14, a sex as `female`) is stored or matched as it came, and
neither its values nor a warning about it reach the gateway's log: pydicom, left to itself,
warns for each such element it decodes (an IS value with the value itself), a line per element
per instance."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from pydicom import config
from pydicom.dataset import Dataset

from dicom import status
from tests.dicom_support import PATIENT_ROOT_FIND, c_find, store
from tests.gateway_process import GatewayProcess
from tests.test_dicom_store import fresh

pytestmark = pytest.mark.slow


def sloppy_instance(patient_id: str) -> Dataset:
    ds = fresh()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "الإدريسي^فاطمة الزهراء"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "1987-03-14"  # DA is YYYYMMDD
    ds.PatientSex = "female"  # CS is upper case
    ds.StudyDate = "14/03/2026"
    ds.OtherPatientIDsSequence = []
    return ds


@pytest.mark.timeout(120)
async def test_sloppy_patient_values_stored_or_queried_leave_nothing_in_the_log(
    fresh_dsn: str, mqtt_url: str
) -> None:
    patient_id = f"PID-{secrets.token_hex(4)}-" + "7" * 64  # over LO's 64 characters
    async with GatewayProcess(database_url=fresh_dsn, mqtt_url=mqtt_url) as gateway:
        port = gateway.dicom_port()
        with config.disable_value_validation():  # this side writes them as a sloppy sender
            ds = sloppy_instance(patient_id)
            query = Dataset()
            query.SpecificCharacterSet = "ISO_IR 192"
            query.QueryRetrieveLevel = "PATIENT"
            query.PatientID = patient_id
            query.PatientBirthDate = "1987-03-14"
            query.PatientSex = "female"
            query.PatientName = "الإدريسي*"
            assert await asyncio.to_thread(store, port, [ds]) == [status.SUCCESS]
            _, final = await asyncio.to_thread(c_find, port, query, PATIENT_ROOT_FIND)
        assert final is not None
    lines = list(gateway.log_lines)  # all of them: the gateway has stopped
    assert any("listening dicom=" in line for line in lines)
    assert [line for line in lines if "pydicom" in line or "Warning" in line] == []
    for secret in (patient_id, "1987-03-14", "female", "14/03/2026", "الإدريسي", "فاطمة"):
        leaking = [line for line in lines if secret in line]
        assert leaking == [], f"{secret!r} appears in the gateway's log"
