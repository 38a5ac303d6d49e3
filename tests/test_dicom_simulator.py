"""The modality simulator against the DICOM listener."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import warnings
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicom.config import AeAddress, DicomSettings
from simulators.modality import CHARSETS, ModalityConfig, run_modality, study_datasets
from simulators.population import REGIONS, Population
from tests.dicom_support import running_dicom, serving
from tests.test_cli import qantara
from tests.test_dicom_move import listening


@pytest.mark.parametrize("modality", ["CR", "DX", "US", "CT"])
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
    with serving(ae, [(evt.EVT_C_STORE, abort_the_second)]) as port:
        report = run_modality(ModalityConfig(host="127.0.0.1", port=port, studies=4, quiet=True))
    assert report.aborted
    assert report.sent == 2
    assert report.statuses["0x0000"] == 1
    assert report.summary().endswith("association aborted")


def test_a_port_nobody_listens_on_is_reported_as_no_connection() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: the connection is refused
        report = run_modality(ModalityConfig(host="127.0.0.1", port=port, quiet=True))
    assert report.refused
    assert report.summary() == f"no connection to 127.0.0.1:{port}"


def test_an_association_the_gateway_rejects_is_reported_as_rejected() -> None:
    ae = AE(ae_title="QANTARA")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage
    ae.require_calling_aet = ["SOMEONE-ELSE"]
    with serving(ae) as port:
        report = run_modality(ModalityConfig(host="127.0.0.1", port=port, quiet=True))
    assert (report.summary(), report.sent) == ("association rejected", 0)


# The Type 1 and 2 elements of each IOD's mandatory image modules (PS3.3 A.2, A.26, A.59, A.3)
# beyond those every image has (Image Pixel, General Image, SOP Common).
MODULE_ELEMENTS = {
    "CR": ("ViewPosition", "BodyPartExamined", "PatientOrientation"),
    "DX": (
        "PresentationIntentType",
        "ImageType",
        "PixelIntensityRelationship",
        "PixelIntensityRelationshipSign",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "PresentationLUTShape",
        "LossyImageCompression",
        "BurnedInAnnotation",
        "DetectorType",
        "ImagerPixelSpacing",
        "ImageLaterality",
        "PatientOrientation",
        "WindowCenter",
        "WindowWidth",
    ),
    "US": ("ImageType",),
    "CT": (
        "PatientPosition",
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "ImageType",
        "RescaleIntercept",
        "RescaleSlope",
        "KVP",
        "AcquisitionNumber",
        "PixelSpacing",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "SliceThickness",
    ),
}
IMAGE_PIXEL = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)


def one_study(modality: str, charset: str) -> list[Dataset]:
    """The images of one simulated study, always of the same patient and pixels (seed 5)."""
    patient = Population(date(2026, 11, 27)).patient(random.Random(5), REGIONS[0].provinces[0])
    return study_datasets(patient, modality, charset, random.Random(5), datetime.now(UTC))


@pytest.mark.parametrize("modality", list(MODULE_ELEMENTS))
def test_simulated_images_carry_their_iods_image_modules(modality: str) -> None:
    images = one_study(modality, "ISO_IR 192")
    for ds in images:
        missing = [k for k in (*MODULE_ELEMENTS[modality], *IMAGE_PIXEL) if k not in ds]
        assert missing == []
        assert ds.HighBit == ds.BitsStored - 1 <= ds.BitsAllocated - 1
        frame = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
        assert len(ds.PixelData) == frame
    if modality == "CT":  # one frame of reference; slices stacked along the patient's axis
        assert len({str(ds.FrameOfReferenceUID) for ds in images}) == 1
        assert len({float(ds.ImagePositionPatient[2]) for ds in images}) == len(images)


def test_simulated_pixels_fit_in_the_bits_stored() -> None:
    for modality in MODULE_ELEMENTS:
        ds = one_study(modality, "ISO_IR 100")[0]
        width = ds.BitsAllocated // 8
        data = bytes(ds.PixelData)
        values = [int.from_bytes(data[i : i + width], "little") for i in range(0, len(data), width)]
        assert max(values) < 2**ds.BitsStored
        assert max(values) >= 2 ** (ds.BitsStored - 1)  # noise over the whole range, not zeros


IODS = {"CR": "CRImage", "DX": "DXImageForPresentation", "US": "USImage", "CT": "CTImage"}


def dciodvfy(path: Path) -> tuple[str, list[str]]:
    """The IOD dicom3tools' checker recognises in the file at `path`, and its errors and
    warnings."""
    checked = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (checked.stdout + checked.stderr).splitlines()
    return lines[0] if lines else "", [x for x in lines if x.startswith(("Error", "Warning"))]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools (make system-deps)")
@pytest.mark.parametrize("charset", CHARSETS)
@pytest.mark.parametrize("modality", list(MODULE_ELEMENTS))
def test_simulated_images_pass_the_dicom3tools_iod_checker(
    tmp_path: Path, modality: str, charset: str
) -> None:
    ds = one_study(modality, charset)[0]
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == (IODS[modality], [])  # the IOD it was meant to be, nothing amiss


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="needs dicom3tools (make system-deps)")
async def test_the_file_the_gateway_stores_passes_the_iod_checker_too(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with running_dicom(fresh_dsn, tmp_path / "store") as scp:
        config = ModalityConfig(
            host="127.0.0.1", port=scp.port, modality="DX", studies=1, quiet=True
        )
        report = await asyncio.to_thread(run_modality, config)
        paths = await scp.pool.fetch("SELECT file_path FROM dicom_instance")
        stored = [scp.root / r["file_path"] for r in paths]
    assert report.failed == 0
    assert len(stored) == 2
    for path in stored:  # our File Meta Information, then the dataset as the modality sent it
        assert dciodvfy(path) == (IODS["DX"], [])


async def test_the_rate_paces_the_sending(fresh_dsn: str, tmp_path: Path) -> None:
    async with running_dicom(fresh_dsn, tmp_path / "store") as scp:
        config = ModalityConfig(
            host="127.0.0.1", port=scp.port, modality="CR", studies=3, rate=4.0, quiet=True
        )
        report = await asyncio.to_thread(run_modality, config)
    assert report.sent == 6
    assert report.seconds >= 0.8 * (report.sent - 1) / config.rate  # 1.25 s; unpaced: ~0.1 s


async def test_the_command_sends_a_study_and_reports_its_statuses(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with running_dicom(fresh_dsn, tmp_path / "store") as scp:
        args = (
            "--studies",
            "1",
            "--modality",
            "DX",
            "--host",
            "127.0.0.1",
            "--port",
            str(scp.port),
        )
        result = await asyncio.to_thread(qantara, "simulate", "modality", *args)
        stored = await scp.pool.fetchval("SELECT count(*) FROM dicom_instance")
    assert result.returncode == 0, result.stderr
    assert "0x0000" in result.stdout + result.stderr
    assert stored == 2  # a DX study: two images


async def test_the_command_with_commit_gets_every_stored_instance_committed(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with running_dicom(fresh_dsn, tmp_path / "store") as scp:
        args = ("--studies", "2", "--host", "127.0.0.1", "--port", str(scp.port), "--commit")
        result = await asyncio.to_thread(qantara, "simulate", "modality", *args)
    assert result.returncode == 0, result.stderr
    assert "storage commitment 0x0000, 4 of 4 committed" in result.stdout


async def test_the_command_with_a_report_port_gets_the_report_there_after_releasing(
    fresh_dsn: str, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        report_port = int(probe.getsockname()[1])
    settings = DicomSettings(
        report_addresses=(AeAddress("SIM-MODALITY", "127.0.0.1", report_port),)
    )
    async with running_dicom(fresh_dsn, tmp_path / "store", settings) as scp:
        args = ["--studies", "1", "--host", "127.0.0.1", "--port", str(scp.port)]
        args += ["--report-port", str(report_port), "--quiet"]
        result = await asyncio.to_thread(qantara, "simulate", "modality", *args)
        delivered = {"outcome": "delivered"}
        taken = scp.metrics.sample("qantara_dicom_commitment_reports_total", delivered)
    assert result.returncode == 0, result.stderr
    assert "storage commitment 0x0000, 2 of 2 committed (report on our port)" in result.stdout
    assert taken == 1


async def test_the_workstation_finds_a_patients_studies_and_gets_every_instance(
    fresh_dsn: str, tmp_path: Path
) -> None:
    settings = DicomSettings(retrieve_aes=frozenset({"SIM-WORKSTATION"}))
    async with running_dicom(fresh_dsn, tmp_path / "store", settings) as scp:
        config = ModalityConfig(host="127.0.0.1", port=scp.port, modality="DX", quiet=True)
        sent = await asyncio.to_thread(run_modality, config)
        patient = await scp.pool.fetchval("SELECT dicom_patient_id FROM dicom_study LIMIT 1")
        args = ("--patient-id", patient, "--host", "127.0.0.1", "--port", str(scp.port), "--quiet")
        result = await asyncio.to_thread(qantara, "simulate", "workstation", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"found 1 study(ies); {sent.sent} instance(s) completed, 0 failed" in result.stdout
    assert f"received {sent.sent} instance(s)" in result.stdout


async def test_the_workstation_not_allowed_to_retrieve_exits_with_1(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with running_dicom(fresh_dsn, tmp_path / "store") as scp:  # nobody may retrieve
        config = ModalityConfig(host="127.0.0.1", port=scp.port, quiet=True)
        await asyncio.to_thread(run_modality, config)
        args = ("--study-date", "19000101-29991231", "--port", str(scp.port), "--quiet")
        result = await asyncio.to_thread(
            qantara, "simulate", "workstation", "--host", "127.0.0.1", *args
        )
    assert result.returncode == 1
    assert "retrieve refused at association: 1" in result.stdout


async def test_the_workstation_moves_a_days_studies_to_a_destination(
    fresh_dsn: str, tmp_path: Path
) -> None:
    with listening("RAD-WS-1") as destination:
        settings = DicomSettings(
            retrieve_aes=frozenset({"SIM-WORKSTATION"}),
            move_destinations=(AeAddress("RAD-WS-1", "127.0.0.1", destination.port),),
        )
        async with running_dicom(fresh_dsn, tmp_path / "store", settings) as scp:
            config = ModalityConfig(host="127.0.0.1", port=scp.port, studies=2, quiet=True)
            sent = await asyncio.to_thread(run_modality, config)
            today = datetime.now(UTC).strftime("%Y%m%d")
            args = ("--study-date", f"{today}-", "--move-to", "RAD-WS-1", "--quiet")
            result = await asyncio.to_thread(
                qantara, "simulate", "workstation", "--host", "127.0.0.1",
                "--port", str(scp.port), *args,
            )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "found 2 study(ies)" in result.stdout
    assert len(destination.received) == sent.sent


async def test_the_workstation_prints_no_patient_id_on_its_stderr(
    fresh_dsn: str, tmp_path: Path
) -> None:
    settings = DicomSettings(retrieve_aes=frozenset({"SIM-WORKSTATION"}))
    async with running_dicom(fresh_dsn, tmp_path / "store", settings) as scp:
        await asyncio.to_thread(
            run_modality, ModalityConfig(host="127.0.0.1", port=scp.port, quiet=True)
        )
        patient = await scp.pool.fetchval("SELECT dicom_patient_id FROM dicom_study LIMIT 1")
        args = ("--study-date", "19000101-", "--host", "127.0.0.1", "--port", str(scp.port))
        result = await asyncio.to_thread(qantara, "simulate", "workstation", "--quiet", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert patient not in result.stderr  # pynetdicom logs identifiers at INFO: kept at WARNING
