"""The DICOM listener against pynetdicom as the modality: echo, storage, duplicates, statuses."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import os
import resource
import shutil
import signal
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import _config

from dicom import spool, status
from dicom.config import DicomSettings
from tests.dicom_support import (
    SCP_AE,
    RunningDicom,
    echo,
    instance_row,
    renumbered,
    running_dicom,
    scu,
    sha256_of,
    store,
    store_answers,
    stored_files,
    temp_files,
)
from tests.services_support import wait_until

# pydicom's test files across SOP classes (CT, MR, secondary capture, RT, and what the mobile
# units' ECGs and ultrasound send, structured reports, segmentations) and transfer syntaxes.
TEST_FILES = [
    "CT_small.dcm",  # CT, explicit VR little endian
    "MR_small_implicit.dcm",  # MR, implicit VR little endian
    "MR_small_RLE.dcm",  # RLE lossless
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPEG2000.dcm",  # JPEG 2000
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPGExtended.dcm",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless, first-order prediction (1.2.840.10008.1.2.4.70)
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "image_dfl.dcm",  # deflated explicit VR little endian
    "rtplan.dcm",  # RT Plan, no pixel data
    "JPEGLSNearLossless_08.dcm",  # JPEG-LS near-lossless
    "waveform_ecg.dcm",  # 12-lead ECG waveform, no pixel data
    "examples_rgb_color.dcm",  # ultrasound, RGB
    "examples_ybr_color.dcm",  # ultrasound multi-frame, JPEG baseline
    "reportsi.dcm",  # Basic Text SR
    "test-SR.dcm",  # Comprehensive SR
    "rtdose_rle.dcm",  # RT Dose, multi-frame RLE
    "liver_1frame.dcm",  # Segmentation
    "liver_expb_1frame.dcm",  # Segmentation, explicit VR big endian (retired, still sent)
]


@pytest.fixture(scope="module")
async def scp(
    module_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningDicom]:
    async with running_dicom(module_dsn, tmp_path_factory.mktemp("dicom-store")) as running:
        yield running


def load_test_file(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None
    return dcmread(path)


def fresh(name: str = "CT_small.dcm") -> Dataset:
    """A test file under new UIDs, so that each test stores its own instance."""
    return renumbered(load_test_file(name))


async def test_echo_is_answered_with_success(scp: RunningDicom) -> None:
    accepted, code = await asyncio.to_thread(echo, scp.port)
    assert accepted
    assert code == status.SUCCESS


@pytest.mark.parametrize("name", TEST_FILES)
async def test_test_file_is_stored_as_received_and_indexed(scp: RunningDicom, name: str) -> None:
    ds = fresh(name)  # several files share UIDs (one image in several transfer syntaxes)
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    assert row is not None
    assert row["transfer_syntax"] == str(ds.file_meta.TransferSyntaxUID)
    assert row["sop_class_uid"] == str(ds.SOPClassUID)
    path = scp.root / row["file_path"]
    assert sha256_of(path) == bytes(row["sha256"])
    assert path.stat().st_size == row["size"]
    kept = dcmread(path)
    assert kept.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert kept.SOPInstanceUID == ds.SOPInstanceUID
    if "PixelData" in ds:
        assert kept.PixelData == ds.PixelData  # no transcoding


async def test_file_name_is_generated_from_content_not_from_uids(scp: RunningDicom) -> None:
    ds = fresh()
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    digest = bytes(row["sha256"]).hex()
    assert row["file_path"] == f"{digest[:2]}/{digest[2:4]}/{digest}.dcm"
    assert str(ds.SOPInstanceUID) not in row["file_path"]


async def test_same_instance_again_succeeds_without_a_second_file_or_row(
    scp: RunningDicom,
) -> None:
    ds = fresh()
    before = len(stored_files(scp.root))
    first = await asyncio.to_thread(store, scp.port, [ds])
    again = await asyncio.to_thread(store, scp.port, [ds, ds])
    assert first == [status.SUCCESS]
    assert again == [status.SUCCESS, status.SUCCESS]
    assert len(stored_files(scp.root)) == before + 1
    count = await scp.pool.fetchval(
        "SELECT count(*) FROM dicom_instance WHERE sop_instance_uid = $1", str(ds.SOPInstanceUID)
    )
    assert count == 1
    assert (scp.metrics.sample("qantara_messages_duplicate_total", {"protocol": "dicom"}) or 0) >= 2


async def test_same_uid_with_other_content_keeps_the_first_and_warns(scp: RunningDicom) -> None:
    ds = fresh()
    [first] = await asyncio.to_thread(store, scp.port, [ds])
    original = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    files_before = len(stored_files(scp.root))
    conflicts_before = scp.metrics.sample("qantara_dicom_conflicts_total") or 0.0
    ds.PatientName = "Other^Content"
    [second] = await asyncio.to_thread(store, scp.port, [ds])
    assert first == status.SUCCESS
    assert second == status.ELEMENTS_DISCARDED
    after = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    assert bytes(after["sha256"]) == bytes(original["sha256"])
    assert len(stored_files(scp.root)) == files_before
    assert scp.metrics.sample("qantara_dicom_conflicts_total") == conflicts_before + 1
    conflicts = await scp.pool.fetchval(
        "SELECT count(*) FROM dicom_conflict WHERE sop_instance_uid = $1", str(ds.SOPInstanceUID)
    )
    assert conflicts == 1


@pytest.mark.timeout(120)
async def test_one_file_thread_still_serves_concurrent_associations(
    module_dsn: str, tmp_path: Path
) -> None:
    """A file step never waits for another step queued behind it in the same threads: with
    more associations storing at once than file threads, they would all wait for ever."""
    async with running_dicom(module_dsn, tmp_path / "store", file_threads=1) as one:
        sends = [asyncio.to_thread(store, one.port, [fresh()]) for _ in range(3)]
        async with asyncio.timeout(60):
            statuses = await asyncio.gather(*sends)
    assert statuses == [[status.SUCCESS]] * 3


async def test_no_temp_file_is_left_after_stores(scp: RunningDicom) -> None:
    await asyncio.to_thread(store, scp.port, [fresh(), fresh("MR_small.dcm")])
    assert temp_files(scp.root) == []


async def test_calling_ae_not_in_the_allowed_list_is_rejected(
    module_dsn: str, tmp_path: Path
) -> None:
    settings = DicomSettings(allowed_aes=frozenset({"CT01"}))
    async with running_dicom(module_dsn, tmp_path / "store", settings) as limited:
        refused, _ = await asyncio.to_thread(echo, limited.port, "INTRUDER")
        allowed, code = await asyncio.to_thread(echo, limited.port, "CT01")
    assert not refused
    assert allowed
    assert code == status.SUCCESS


async def test_association_to_another_called_ae_is_rejected_when_required(
    module_dsn: str, tmp_path: Path
) -> None:
    settings = DicomSettings(ae_title=SCP_AE, require_called_ae=True)
    async with running_dicom(module_dsn, tmp_path / "store", settings) as strict:
        refused, _ = await asyncio.to_thread(echo, strict.port, "CT01", "ELSEWHERE")
        allowed, code = await asyncio.to_thread(echo, strict.port, "CT01", SCP_AE)
    assert not refused
    assert allowed
    assert code == status.SUCCESS


async def test_stored_bytes_and_latency_are_counted(scp: RunningDicom) -> None:
    before = scp.metrics.sample("qantara_dicom_stored_bytes_total") or 0.0
    count_before = scp.metrics.sample("qantara_dicom_store_seconds_count") or 0.0
    stored = {"protocol": "dicom"}
    stored_before = scp.metrics.sample("qantara_messages_stored_total", stored) or 0.0
    await asyncio.to_thread(store, scp.port, [fresh()])
    assert (scp.metrics.sample("qantara_dicom_stored_bytes_total") or 0.0) > before
    assert scp.metrics.sample("qantara_dicom_store_seconds_count") == count_before + 1
    assert scp.metrics.sample("qantara_messages_stored_total", stored) == stored_before + 1


async def test_each_c_store_request_is_counted_as_received(scp: RunningDicom) -> None:
    name, labels = "qantara_messages_received_total", {"protocol": "dicom"}
    before = scp.metrics.sample(name, labels) or 0.0
    await asyncio.to_thread(store, scp.port, [fresh(), fresh()])
    assert scp.metrics.sample(name, labels) == before + 2


async def test_nul_characters_in_text_values_are_left_out_and_the_instance_stored(
    scp: RunningDicom,
) -> None:
    ds = fresh()
    ds.StudyDescription = "CHEST\x00 PA"  # PostgreSQL keeps no NUL in text or jsonb
    ds.PatientName = "Benali\x00^Fatima"
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    study = await scp.pool.fetchrow(
        "SELECT description, patient_name FROM dicom_study WHERE study_uid = $1",
        str(ds.StudyInstanceUID),
    )
    assert study is not None
    assert (study["description"], study["patient_name"]) == ("CHEST PA", "Benali^Fatima")


async def test_a_file_whose_row_the_database_refuses_is_swept_away(
    module_dsn: str, tmp_path: Path
) -> None:
    settings = DicomSettings(orphan_age=0.5, sweep_interval=0.5)
    async with running_dicom(module_dsn, tmp_path / "store", settings) as quick:
        await quick.pool.execute(REFUSING_TRIGGER)
        try:
            ds = fresh()
            ds.StudyDescription = "REFUSE ME"
            [code] = await asyncio.to_thread(store, quick.port, [ds])
        finally:
            await quick.pool.execute("DROP TRIGGER test_refuse ON dicom_study")
        assert code == status.REFUSED
        letters = await quick.pool.fetchval(
            "SELECT count(*) FROM dead_letter WHERE protocol = 'dicom'"
            " AND reason = 'storage-refused' AND received_at > now() - interval '1 minute'"
        )
        assert letters >= 1
        await wait_until(lambda: not list(quick.root.rglob("*.dcm")), timeout=10)
        assert await instance_row(quick.pool, str(ds.SOPInstanceUID)) is None


REFUSING_TRIGGER = """
CREATE OR REPLACE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.description = 'REFUSE ME' THEN
        RAISE EXCEPTION 'refused by the test';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_refuse BEFORE INSERT ON dicom_study FOR EACH ROW EXECUTE FUNCTION test_refuse();
"""


HOSTILE_UIDS = [
    "../../../../etc/passwd",
    "1.2.840/../../x",
    "/tmp/qantara-hostile",
    "1." * 99 + "1",  # 199 characters
    "1." * 99 + "12",  # 200 characters
]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length")
@pytest.mark.parametrize("uid", HOSTILE_UIDS)
async def test_hostile_sop_instance_uid_is_refused_and_writes_nothing_outside_the_store(
    scp: RunningDicom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uid: str
) -> None:
    # pynetdicom's SCU would refuse to send an over-long UID: let it, as a hostile peer would.
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
    ds = fresh()
    ds.SOPInstanceUID = uid
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.INVALID_UID
    assert await instance_row(scp.pool, uid) is None
    assert not await asyncio.to_thread(Path("/tmp/qantara-hostile").exists)
    assert not await asyncio.to_thread((scp.root.parent / "passwd").exists)
    assert temp_files(scp.root) == []
    accepted, echoed = await asyncio.to_thread(echo, scp.port)
    assert (accepted, echoed) == (True, status.SUCCESS)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
async def test_hostile_study_uid_is_refused(scp: RunningDicom) -> None:
    ds = fresh()
    ds.StudyInstanceUID = "../../x"
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.INVALID_UID
    assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
async def test_missing_uid_is_refused_and_dead_lettered(scp: RunningDicom, keyword: str) -> None:
    ds = fresh()
    delattr(ds, keyword)
    before = scp.metrics.sample(
        "qantara_messages_rejected_total", {"protocol": "dicom", "reason": "missing-uid"}
    )
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.MISSING_UID
    assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
    assert await dicom_letters(scp, "missing-uid") >= 1
    after = scp.metrics.sample(
        "qantara_messages_rejected_total", {"protocol": "dicom", "reason": "missing-uid"}
    )
    assert after == (before or 0.0) + 1
    assert temp_files(scp.root) == []


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SOPClassUID"])
async def test_dataset_without_its_own_sop_uid_is_refused_and_dead_lettered(
    scp: RunningDicom, monkeypatch: pytest.MonkeyPatch, keyword: str
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as they are
    ds = fresh()  # the command still carries both UIDs (from the file meta)
    sent = copy.deepcopy(ds)
    delattr(sent, keyword)
    encoded = BytesIO()
    sent.save_as(encoded, enforce_file_format=True)
    letters = await dicom_letters(scp, "missing-uid")
    code = await asyncio.to_thread(store_raw, scp.port, ds, encoded.getvalue())
    assert code == status.MISSING_UID
    assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
    assert temp_files(scp.root) == []
    assert await dicom_letters(scp, "missing-uid") == letters + 1


@pytest.mark.parametrize("cut", [1, 100, 2000])
async def test_truncated_dataset_is_refused_and_leaves_nothing(
    scp: RunningDicom, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as cut
    ds = fresh()
    encoded = BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    whole = encoded.getvalue()
    truncated = whole[: len(whole) - cut]
    code = await asyncio.to_thread(store_raw, scp.port, ds, truncated)
    assert code in (status.CANNOT_UNDERSTAND, status.MISSING_UID)
    assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
    assert temp_files(scp.root) == []
    accepted, echoed = await asyncio.to_thread(echo, scp.port)
    assert (accepted, echoed) == (True, status.SUCCESS)


def large(ds: Dataset, trailing: bool = False, rows: int = 512) -> Dataset:
    """The image as `rows` x 512 16-bit: 512 KiB of pixels by default (the test files are a few
    KiB), written in one piece by the settle; from 1024 rows on (`SPOOL_BATCH`, 1 MiB) a batch is
    written while the rest arrives. Pixel Data is the last element unless `trailing` puts
    padding after it."""
    ds.Rows, ds.Columns = rows, 512
    ds.PixelData = bytes(range(256)) * (rows * 512 * 2 // 256)
    if not trailing and 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    if trailing:
        ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 64)
    return ds


@pytest.mark.parametrize("trailing", [False, True], ids=["pixel-data-last", "padding-after"])
async def test_large_image_is_stored_and_indexed_with_its_arabic_name(
    scp: RunningDicom, trailing: bool
) -> None:
    ds = large(fresh(), trailing)
    ds.SpecificCharacterSet = "ISO_IR 127"
    ds.PatientName = "قباني^لنزار"
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    assert row is not None
    assert row["patient_name"] == "قباني^لنزار"
    assert row["study_uid"] == str(ds.StudyInstanceUID)
    assert sha256_of(scp.root / row["file_path"]) == bytes(row["sha256"])


@pytest.mark.parametrize("cut", [1, 100, 300_000])
async def test_truncated_large_image_is_refused_and_leaves_nothing(
    scp: RunningDicom, monkeypatch: pytest.MonkeyPatch, cut: int
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes as cut
    ds = large(fresh())
    encoded = BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    whole = encoded.getvalue()
    rejected = {"protocol": "dicom", "reason": "unparseable"}
    before = scp.metrics.sample("qantara_messages_rejected_total", rejected) or 0.0
    letters = await dicom_letters(scp, "unparseable")
    code = await asyncio.to_thread(store_raw, scp.port, ds, whole[: len(whole) - cut])
    assert code == status.CANNOT_UNDERSTAND
    assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
    assert temp_files(scp.root) == []
    assert await dicom_letters(scp, "unparseable") == letters + 1
    assert scp.metrics.sample("qantara_messages_rejected_total", rejected) == before + 1


async def dicom_letters(scp: RunningDicom, reason: str) -> int:
    """The DICOM dead letters kept for `reason`."""
    count: int = await scp.pool.fetchval(
        "SELECT count(*) FROM dead_letter WHERE protocol = 'dicom' AND reason = $1", reason
    )
    return count


async def answered_a700_then_stored(
    scp: RunningDicom, ds: Dataset, fault: contextlib.AbstractContextManager[object]
) -> None:
    """Store `ds` while `fault` fails the disk: 0xA700, no row, one more disk 0xA700 counted, no
    temp file left; then the resend, with the disk back, is stored whole."""
    before = scp.metrics.sample("qantara_dicom_unavailable_total", {"cause": "disk"}) or 0.0
    with fault:
        [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.OUT_OF_RESOURCES
    assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
    after = scp.metrics.sample("qantara_dicom_unavailable_total", {"cause": "disk"})
    assert after == before + 1
    await wait_until(lambda: spool.pending() == 0 and not temp_files(scp.root), timeout=10)
    [again] = await asyncio.to_thread(store, scp.port, [ds])
    assert again == status.SUCCESS
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    assert sha256_of(scp.root / row["file_path"]) == bytes(row["sha256"])


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """The kernel refuses to grow a file beyond RLIMIT_FSIZE (EFBIG, SIGXFSZ ignored) as a full
    disk does (ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize(
    ("limit", "rows"),
    [(0, 2048), (128 * 1024, 2048), (128 * 1024, 512)],
    ids=["first-byte", "mid-transfer", "last-batch"],
)
async def test_disk_refusing_the_file_answers_a700_leaves_nothing_and_the_resend_is_stored(
    scp: RunningDicom, limit: int, rows: int
) -> None:
    # From the first byte, or in the middle of the file; in a batch written while the rest of
    # the dataset arrives (2 MiB), or in the one the settle writes (512 KiB).
    await answered_a700_then_stored(scp, large(fresh(), rows=rows), file_size_limit(limit))


async def test_a_file_whose_fsync_fails_is_answered_a700_not_indexed_and_the_resend_is_stored(
    scp: RunningDicom, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the folders' fsyncs go through
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    @contextlib.contextmanager
    def fsync_failing() -> Iterator[None]:
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", failing)
            yield

    await answered_a700_then_stored(scp, large(fresh()), fsync_failing())
    assert temp_files(scp.root) == []


async def test_a_store_that_would_take_the_reserved_free_space_is_answered_a700_disk_full(
    module_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # More free space kept than this file system has: every store would take some of it.
    reserve = shutil.disk_usage(tmp_path).total + 1
    async with running_dicom(module_dsn, tmp_path, DicomSettings(min_free_space=reserve)) as scp:
        ds = fresh()
        [answer] = await asyncio.to_thread(store_answers, scp.port, [ds])
        assert answer.Status == status.OUT_OF_RESOURCES
        assert answer.ErrorComment == "disk full"
        assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
        assert scp.metrics.sample("qantara_dicom_unavailable_total", {"cause": "disk"}) == 1
        assert scp.metrics.sample("qantara_dicom_storage_reserved_bytes") == reserve
        assert "free space at the reserve (QANTARA_DICOM_MIN_FREE_SPACE" in caplog.text
        assert "not more than its reserve" in caplog.text  # said at start already
        await wait_until(lambda: spool.pending() == 0 and not temp_files(scp.root), timeout=10)
        assert stored_files(scp.root) == []
        assert await asyncio.to_thread(echo, scp.port) == (True, status.SUCCESS)


async def test_a_store_already_within_its_reserve_at_start_says_so(
    module_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    usage = shutil.disk_usage(tmp_path)
    reserve = usage.free + (usage.total - usage.free) // 2  # more than is free, less than all
    async with running_dicom(module_dsn, tmp_path, DicomSettings(min_free_space=reserve)):
        pass
    assert "within its reserve" in caplog.text
    assert "(QANTARA_DICOM_MIN_FREE_SPACE): C-STOREs are answered 0xA700" in caplog.text


async def test_stores_are_answered_a700_while_the_store_s_mount_check_file_is_missing(
    module_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    check = tmp_path / ".volume"
    check.touch()
    settings = DicomSettings(storage_check_file=Path(".volume"))
    async with running_dicom(module_dsn, tmp_path, settings) as scp:
        check.unlink()  # the volume went away; the folder beneath stays
        ds = fresh()
        [answer] = await asyncio.to_thread(store_answers, scp.port, [ds])
        assert answer.Status == status.OUT_OF_RESOURCES
        assert answer.ErrorComment == "disk unavailable"
        assert "the store's volume is not mounted" in caplog.text
        assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
        assert temp_files(scp.root) == []
        check.touch()  # back
        [again] = await asyncio.to_thread(store, scp.port, [ds])
        assert again == status.SUCCESS


async def test_a_store_reaching_the_reserve_mid_transfer_is_refused_and_the_next_one_stored(
    module_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reserve = 1 << 30

    def free_space(fd: int) -> int:
        """A file system with 2.5 MiB left above the reserve, less what this file holds."""
        return reserve + (5 << 19) - os.fstat(fd).st_size

    monkeypatch.setattr(spool, "free_space", free_space)
    async with running_dicom(module_dsn, tmp_path, DicomSettings(min_free_space=reserve)) as scp:
        big, small = large(fresh(), rows=8192), fresh()  # 8 MiB, written by batches of 1 MiB
        answers = await asyncio.to_thread(store_answers, scp.port, [big, small])
        assert [answer.Status for answer in answers] == [status.OUT_OF_RESOURCES, status.SUCCESS]
        assert answers[0].ErrorComment == "disk full"
        assert await instance_row(scp.pool, str(big.SOPInstanceUID)) is None
        row = await instance_row(scp.pool, str(small.SOPInstanceUID))
        assert sha256_of(scp.root / row["file_path"]) == bytes(row["sha256"])
        await wait_until(lambda: spool.pending() == 0 and not temp_files(scp.root), timeout=10)
        assert stored_files(scp.root) == [scp.root / row["file_path"]]


def store_raw(port: int, ds: Dataset, part10: bytes) -> int | None:
    """C-STORE the dataset bytes of a Part 10 file as they are (cut or not), via a file."""
    with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
        f.write(part10)
        f.flush()
        ae = scu()
        ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", port, ae_title="QANTARA")
        assert assoc.is_established
        try:
            answer = assoc.send_c_store(Path(f.name))
            return int(answer.Status) if "Status" in answer else None
        finally:
            if assoc.is_established:
                assoc.release()
