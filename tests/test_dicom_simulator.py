"""The modality simulator against the DICOM listener."""

from __future__ import annotations

import asyncio
import random
import warnings
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, evt
from pynetdicom.events import Event

from simulators.modality import CHARSETS, ModalityConfig, run_modality, study_datasets
from simulators.population import REGIONS, Population
from tests.dicom_support import running_dicom


@pytest.mark.parametrize("modality", ["CR", "US"])
async def test_simulated_studies_are_all_stored_with_their_names_in_three_charsets(
    fresh_dsn: str, tmp_path: Path, modality: str
) -> None:
    async with running_dicom(fresh_dsn, tmp_path / "store") as scp:
        config = ModalityConfig(
            host="127.0.0.1", port=scp.port, modality=modality, studies=3, quiet=True
        )
        report = await asyncio.to_thread(run_modality, config)
        rows = await scp.pool.fetch("SELECT patient_name, charset FROM dicom_study ORDER BY id")
        cins = await scp.pool.fetchval(
            "SELECT count(*) FROM patient_identifier WHERE system = 'CIN'"
        )
    assert report.failed == 0
    assert report.statuses["0x0000"] == report.sent > 0
    assert [r["charset"] for r in rows] == ["ISO_IR 100", "ISO_IR 127", "ISO_IR 192"]
    assert rows[0]["patient_name"].isascii() or "é" in rows[0]["patient_name"]
    assert any("\u0600" <= c <= "\u06ff" for c in rows[1]["patient_name"])
    assert any("\u0600" <= c <= "\u06ff" for c in rows[2]["patient_name"])
    assert cins == 3


@pytest.mark.parametrize("charset", CHARSETS)
def test_every_text_of_a_simulated_study_is_encodable_in_its_charset(charset: str) -> None:
    population = Population(date(2026, 11, 27))
    rng = random.Random(7)
    patients = [population.patient(rng, p) for region in REGIONS for p in region.provinces]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns when it substitutes a character
        for patient in patients:
            for ds in study_datasets(patient, "CR", charset, rng, datetime.now(UTC))[:1]:
                ds.save_as(DicomBytesIO(), enforce_file_format=True)


def test_an_association_the_gateway_aborts_is_reported_not_raised() -> None:
    stores = 0

    def abort_the_second(event: Event) -> int:
        nonlocal stores
        stores += 1
        if stores == 2:
            event.assoc.abort()
        return 0x0000

    ae = AE(ae_title="QANTARA")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, abort_the_second)]
    )
    try:
        port = server.server_address[1]
        report = run_modality(ModalityConfig(host="127.0.0.1", port=port, studies=4, quiet=True))
    finally:
        server.shutdown()
    assert report.aborted
    assert report.sent == 2
    assert report.statuses["0x0000"] == 1
    assert report.summary().endswith("association aborted")
