"""C-GET: the instances an identifier names come back on the same association as C-STORE
sub-operations, byte for byte as stored, with Pending counts and a final status (PS3.4 C.4.3)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom import status
from dicom.config import DicomSettings
from dicom.filemeta import dataset_offset
from dicom.identifier import decode_identifier
from tests.dicom_support import (
    PATIENT_ROOT_GET,
    RunningDicom,
    c_get,
    instance_row,
    query,
    running_dicom,
    store,
)
from tests.test_dicom_store import fresh

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
async def scp(
    module_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningDicom]:
    settings = DicomSettings(retrieve_aes=frozenset({"VIEWER"}))
    async with running_dicom(module_dsn, tmp_path_factory.mktemp("dicom-get"), settings) as running:
        yield running


def study(count: int, name: str = "CT_small.dcm") -> list[Dataset]:
    """`count` instances of one new study and series, under one new patient."""
    first = fresh(name)
    first.PatientID = f"GET-{first.SOPInstanceUID[-8:]}"
    instances = [first]
    for n in range(1, count):
        other = fresh(name)
        other.StudyInstanceUID = first.StudyInstanceUID
        other.SeriesInstanceUID = first.SeriesInstanceUID
        other.PatientID = first.PatientID
        other.InstanceNumber = n + 1
        instances.append(other)
    return instances


async def stored_study(port: int, count: int) -> list[Dataset]:
    """`count` instances of a new study (`study`), each stored with 0x0000."""
    instances = study(count)
    assert await asyncio.to_thread(store, port, instances) == [status.SUCCESS] * count
    return instances


def study_query(instances: list[Dataset]) -> Dataset:
    """The STUDY-level identifier of the study of `instances`."""
    return query("STUDY", StudyInstanceUID=instances[0].StudyInstanceUID)


def contexts(instances: list[Dataset]) -> set[tuple[str, str]]:
    return {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in instances}


async def stored_dataset(scp: RunningDicom, uid: str) -> bytes:
    row = await instance_row(scp.pool, uid)
    data: bytes = (scp.root / row["file_path"]).read_bytes()
    return data[dataset_offset(data[:4096]) :]


async def test_study_level_get_sends_every_instance_as_stored_with_pending_counts(
    scp: RunningDicom,
) -> None:
    instances = await stored_study(scp.port, 3)
    identifier = study_query(instances)

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts(instances))

    assert set(got.datasets) == {str(ds.SOPInstanceUID) for ds in instances}
    for ds in instances:
        syntax, data = got.datasets[str(ds.SOPInstanceUID)]
        assert syntax == str(ds.file_meta.TransferSyntaxUID)
        assert data == await stored_dataset(scp, str(ds.SOPInstanceUID))
    assert [r["NumberOfRemainingSuboperations"] for r in got.responses[:-1]] == [2, 1]
    assert got.final["Status"] == status.SUCCESS
    assert got.final["NumberOfCompletedSuboperations"] == 3
    assert got.final["NumberOfFailedSuboperations"] == 0


async def test_patient_level_get_of_the_patient_root_model_sends_the_patients_instances(
    scp: RunningDicom,
) -> None:
    instances = await stored_study(scp.port, 2)
    identifier = query("PATIENT", PatientID=instances[0].PatientID)

    got = await asyncio.to_thread(
        c_get, scp.port, identifier, contexts(instances), PATIENT_ROOT_GET
    )

    assert set(got.datasets) == {str(ds.SOPInstanceUID) for ds in instances}
    assert got.final["Status"] == status.SUCCESS


async def test_image_level_get_sends_only_the_listed_instances(scp: RunningDicom) -> None:
    instances = await stored_study(scp.port, 4)
    wanted = [str(instances[1].SOPInstanceUID), str(instances[3].SOPInstanceUID)]
    identifier = query(
        "IMAGE",
        StudyInstanceUID=instances[0].StudyInstanceUID,
        SeriesInstanceUID=instances[0].SeriesInstanceUID,
        SOPInstanceUID=wanted,
    )

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts(instances))

    assert sorted(got.datasets) == sorted(wanted)
    assert got.final["NumberOfCompletedSuboperations"] == 2


async def test_get_matching_nothing_is_a_success_with_no_sub_operations(scp: RunningDicom) -> None:
    identifier = query("STUDY", StudyInstanceUID="1.2.826.0.1.3680043.10.99.404")

    got = await asyncio.to_thread(c_get, scp.port, identifier, {(CT, EXPLICIT)})

    assert got.datasets == {}
    assert got.responses == [
        {
            "Status": status.SUCCESS,
            "NumberOfRemainingSuboperations": None,
            "NumberOfCompletedSuboperations": 0,
            "NumberOfFailedSuboperations": 0,
            "NumberOfWarningSuboperations": 0,
        }
    ]


async def test_an_instance_goes_in_the_other_little_endian_syntax_when_only_that_is_offered(
    scp: RunningDicom,
) -> None:
    [ds] = study(1)  # stored in explicit VR little endian
    await asyncio.to_thread(store, scp.port, [ds])
    identifier = query("STUDY", StudyInstanceUID=ds.StudyInstanceUID)

    got = await asyncio.to_thread(c_get, scp.port, identifier, {(CT, IMPLICIT)})

    assert got.final["Status"] == status.SUCCESS
    syntax, data = got.datasets[str(ds.SOPInstanceUID)]
    assert syntax == IMPLICIT
    received = decode_identifier(data, IMPLICIT)
    assert received.PixelData == ds.PixelData
    assert received.PatientName == ds.PatientName
    assert received.SOPInstanceUID == ds.SOPInstanceUID


async def test_a_compressed_instance_without_a_context_in_its_syntax_fails_and_is_listed(
    scp: RunningDicom,
) -> None:
    compressed = study(2, "JPEG2000.dcm")  # never transcoded
    await asyncio.to_thread(store, scp.port, compressed)
    identifier = query("STUDY", StudyInstanceUID=compressed[0].StudyInstanceUID)
    sop_class = str(compressed[0].SOPClassUID)

    got = await asyncio.to_thread(
        c_get, scp.port, identifier, {(sop_class, EXPLICIT), (sop_class, IMPLICIT)}
    )

    assert got.datasets == {}
    assert got.final["Status"] == status.GET_SUB_OPERATIONS_FAILED
    assert got.final["NumberOfFailedSuboperations"] == 2
    assert sorted(got.failed_uids()) == sorted(str(ds.SOPInstanceUID) for ds in compressed)


async def test_without_the_scp_role_no_instance_is_sent(scp: RunningDicom) -> None:
    instances = await stored_study(scp.port, 1)
    identifier = study_query(instances)

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts(instances), scp_role=False)

    assert got.datasets == {}
    assert got.final["Status"] == status.GET_SUB_OPERATIONS_FAILED


async def test_some_instances_sent_and_some_not_gives_warning_b000(scp: RunningDicom) -> None:
    explicit = study(1)
    implicit = fresh("MR_small_implicit.dcm")
    implicit.StudyInstanceUID = explicit[0].StudyInstanceUID
    await asyncio.to_thread(store, scp.port, [*explicit, implicit])
    identifier = query("STUDY", StudyInstanceUID=explicit[0].StudyInstanceUID)

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts([implicit]))

    assert list(got.datasets) == [str(implicit.SOPInstanceUID)]
    assert got.final["Status"] == status.GET_SOME_FAILED
    assert got.final["NumberOfCompletedSuboperations"] == 1
    assert got.final["NumberOfFailedSuboperations"] == 1
    assert got.failed_uids() == [str(explicit[0].SOPInstanceUID)]


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "image_dfl.dcm"]
)
async def test_an_instance_comes_back_in_the_transfer_syntax_it_was_stored_in(
    scp: RunningDicom, name: str
) -> None:
    ds = fresh(name)
    await asyncio.to_thread(store, scp.port, [ds])
    identifier = query(
        "IMAGE", StudyInstanceUID=ds.StudyInstanceUID, SOPInstanceUID=ds.SOPInstanceUID
    )

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts([ds]))

    syntax, data = got.datasets[str(ds.SOPInstanceUID)]
    assert syntax == str(ds.file_meta.TransferSyntaxUID)
    assert data == await stored_dataset(scp, str(ds.SOPInstanceUID))


@pytest.mark.parametrize(
    ("answer", "final", "counted"),
    [
        (0xA700, status.GET_SUB_OPERATIONS_FAILED, "NumberOfFailedSuboperations"),
        (0xB000, status.GET_SOME_FAILED, "NumberOfWarningSuboperations"),
    ],
)
async def test_the_peers_store_status_is_counted_as_failure_or_warning(
    scp: RunningDicom, answer: int, final: int, counted: str
) -> None:
    instances = await stored_study(scp.port, 2)
    identifier = study_query(instances)

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts(instances), answer=answer)

    assert got.final["Status"] == final
    assert got.final[counted] == 2


async def test_a_stored_file_gone_from_disk_fails_its_sub_operation_only(
    scp: RunningDicom,
) -> None:
    instances = await stored_study(scp.port, 3)
    gone = str(instances[1].SOPInstanceUID)
    row = await instance_row(scp.pool, gone)
    (scp.root / row["file_path"]).unlink()
    identifier = study_query(instances)

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts(instances))

    assert gone not in got.datasets
    assert len(got.datasets) == 2
    assert got.final["Status"] == status.GET_SOME_FAILED
    assert got.failed_uids() == [gone]


async def test_c_cancel_stops_before_the_next_sub_operation_with_status_fe00(
    scp: RunningDicom,
) -> None:
    instances = await stored_study(scp.port, 6)
    identifier = study_query(instances)

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts(instances), cancel_after=1)

    assert got.final["Status"] == 0xFE00
    sent = got.final["NumberOfCompletedSuboperations"]
    assert sent is not None
    assert 1 <= sent < 6
    assert got.final["NumberOfRemainingSuboperations"] == 6 - sent
    assert len(got.failed_uids()) == 6 - sent


async def test_an_instance_larger_than_a_read_is_sent_whole(scp: RunningDicom) -> None:
    [big] = study(1)
    big.Rows, big.Columns, big.BitsAllocated, big.BitsStored, big.HighBit = 1536, 2048, 8, 8, 7
    big.PixelRepresentation = 0
    big.PixelData = bytes(range(256)) * (1536 * 2048 // 256)  # 3 MiB: several reads and PDUs
    await asyncio.to_thread(store, scp.port, [big])
    identifier = query("STUDY", StudyInstanceUID=big.StudyInstanceUID)

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts([big]))

    _, data = got.datasets[str(big.SOPInstanceUID)]
    assert len(data) > 3 << 20
    assert data == await stored_dataset(scp, str(big.SOPInstanceUID))


@pytest.mark.parametrize(
    ("identifier", "model"),
    [
        (query("STUDY"), "study"),  # no Study Instance UID
        (query("PATIENT", PatientID="X"), "study"),  # no patient level in the Study Root model
        (query("STUDY", StudyInstanceUID="../../etc/passwd"), "study"),
        (query("SERIES", StudyInstanceUID=["1.2.3", "1.2.4"], SeriesInstanceUID="1.2.5"), "study"),
        (query("FRAME", StudyInstanceUID="1.2.3"), "study"),
    ],
    ids=["no-level-key", "level-outside-model", "not-a-uid", "two-values-above", "unknown-level"],
)
async def test_identifier_that_names_nothing_retrievable_gets_a900(
    scp: RunningDicom, identifier: Dataset, model: str
) -> None:
    got = await asyncio.to_thread(c_get, scp.port, identifier, {(CT, EXPLICIT)})

    assert got.datasets == {}
    assert got.final["Status"] == status.GET_IDENTIFIER_INVALID


async def test_sub_operations_and_bytes_are_counted(scp: RunningDicom) -> None:
    instances = await stored_study(scp.port, 2)
    before = scp.metrics.dicom_retrieved.labels("completed")._value.get()
    bytes_before = scp.metrics.dicom_retrieved_bytes._value.get()
    identifier = study_query(instances)

    got = await asyncio.to_thread(c_get, scp.port, identifier, contexts(instances))

    assert scp.metrics.dicom_retrieved.labels("completed")._value.get() == before + 2
    sent = sum(len(data) for _, data in got.datasets.values())
    assert scp.metrics.dicom_retrieved_bytes._value.get() == bytes_before + sent


async def test_the_listener_stores_again_after_a_get(scp: RunningDicom, tmp_path: Path) -> None:
    instances = await stored_study(scp.port, 1)
    identifier = study_query(instances)
    await asyncio.to_thread(c_get, scp.port, identifier, contexts(instances))

    assert await asyncio.to_thread(store, scp.port, study(1)) == [status.SUCCESS]


@pytest.mark.skipif(shutil.which("getscu") is None, reason="dcmtk not installed (make system-deps)")
async def test_dcmtk_getscu_retrieves_every_instance_of_a_study(
    scp: RunningDicom, tmp_path: Path
) -> None:
    instances = await stored_study(scp.port, 2)
    command = [
        "getscu", "-S", "-aet", "VIEWER", "-aec", "QANTARA", "-od", str(tmp_path),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={instances[0].StudyInstanceUID}",
        "127.0.0.1", str(scp.port),
    ]  # fmt: skip

    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=60)

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    received = await asyncio.to_thread(lambda: [dcmread(p) for p in tmp_path.iterdir()])
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(
        str(ds.SOPInstanceUID) for ds in instances
    )
    sent = {str(ds.SOPInstanceUID): ds for ds in instances}
    for ds in received:  # getscu writes what it decoded: equal elements, not equal bytes
        assert ds.PixelData == sent[str(ds.SOPInstanceUID)].PixelData
        assert ds.PatientName == sent[str(ds.SOPInstanceUID)].PatientName


async def test_a_get_is_audited_before_its_sub_operations_with_ae_title_and_patient(
    scp: RunningDicom,
) -> None:
    instances = await stored_study(scp.port, 2)
    patient = await study_patient(scp, instances)
    identifier = study_query(instances)

    await asyncio.to_thread(c_get, scp.port, identifier, contexts(instances))

    *_, begun, ended = await audit_rows(scp, patient)  # the module's listener: earlier rows too
    assert (begun["token_name"], begun["query_shape"], begun["status"]) == (
        "VIEWER",
        "C-GET STUDY, 2 instance(s)",
        status.PENDING,
    )
    assert list(begun["patient_ids"]) == [patient]
    assert (ended["action"], ended["status"], ended["outcome"]) == ("transferred", 0, "0")
    assert ended["query_shape"] == "C-GET STUDY: 2 completed, 0 warning, 0 failed, 0 cancelled"
    assert list(ended["patient_ids"]) == [patient]


async def study_patient(scp: RunningDicom, instances: list[Dataset]) -> int:
    """The index's patient of the study `instances` belong to."""
    return int(
        await scp.pool.fetchval(
            "SELECT patient_id FROM dicom_study WHERE study_uid = $1",
            instances[0].StudyInstanceUID,
        )
    )


async def audit_rows(scp: RunningDicom, patient: int) -> list[asyncpg.Record]:
    """The DICOM audit rows naming `patient`, oldest first."""
    return list(
        await scp.pool.fetch(
            "SELECT * FROM api_audit WHERE $1 = ANY(patient_ids) AND protocol = 'dicom'"
            " ORDER BY id",
            patient,
        )
    )


async def test_a_get_whose_sub_operations_all_failed_ends_with_a_serious_failure_row(
    scp: RunningDicom,
) -> None:
    instances = await stored_study(scp.port, 2)
    patient = await study_patient(scp, instances)

    got = await asyncio.to_thread(
        c_get, scp.port, study_query(instances), contexts(instances), scp_role=False
    )

    assert got.final["Status"] == status.GET_SUB_OPERATIONS_FAILED
    *_, ended = await audit_rows(scp, patient)
    assert (ended["status"], ended["outcome"]) == (status.GET_SUB_OPERATIONS_FAILED, "8")
    assert ended["query_shape"] == "C-GET STUDY: 0 completed, 0 warning, 2 failed, 0 cancelled"


async def test_a_get_matching_nothing_writes_no_audit_row(scp: RunningDicom) -> None:
    before = await scp.pool.fetchval("SELECT count(*) FROM api_audit")
    identifier = query("STUDY", StudyInstanceUID="1.2.826.0.1.3680043.10.99.405")

    await asyncio.to_thread(c_get, scp.port, identifier, {(CT, EXPLICIT)})

    assert await scp.pool.fetchval("SELECT count(*) FROM api_audit") == before


@pytest.mark.parametrize("offered", [EXPLICIT, IMPLICIT], ids=["as-stored", "converted"])
async def test_a_stored_file_cut_short_fails_its_sub_operation_instead_of_going_truncated(
    scp: RunningDicom, offered: str
) -> None:
    [ds] = study(1)  # stored in explicit VR little endian
    await asyncio.to_thread(store, scp.port, [ds])
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    path = scp.root / row["file_path"]
    await asyncio.to_thread(os.truncate, path, row["size"] - 100)
    identifier = query("STUDY", StudyInstanceUID=ds.StudyInstanceUID)

    got = await asyncio.to_thread(c_get, scp.port, identifier, {(CT, offered)})

    assert got.datasets == {}
    assert got.failed_uids() == [str(ds.SOPInstanceUID)]
