"""The listener's own upper layer on the wire: rejections, limits, timeouts and hostile bytes
(raw sockets speaking PDUs), and dcmtk's echoscu/storescu/findscu as peers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom import dimse, pdu, status
from dicom.config import DicomSettings
from dicom.identifier import encode_identifier
from dicom.pdu import (
    Abort,
    AbortReason,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ProposedContext,
    RejectResult,
    RejectSource,
    UserInformation,
)
from dicom.sop_classes import STUDY_ROOT_FIND, VERIFICATION
from tests.dicom_support import RunningDicom, associate_for, echo, instance_row, running_dicom
from tests.services_support import wait_until
from tests.test_dicom_store import fresh

IMPLICIT = "1.2.840.10008.1.2"
DCMTK = shutil.which("storescu") is not None


@pytest.fixture(scope="module")
async def scp(
    module_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningDicom]:
    async with running_dicom(module_dsn, tmp_path_factory.mktemp("dicom-listener")) as running:
        yield running


def echo_request(calling: str = "RAW") -> bytes:
    return pdu.encode(
        AssociateRequest(
            "QANTARA",
            calling,
            (ProposedContext(1, VERIFICATION, (IMPLICIT,)),),
            UserInformation(max_length=16384),
        )
    )


async def exchange(port: int, data: bytes) -> list[pdu.Pdu]:
    """Send `data`, then read PDUs until the listener closes the connection (10 s at most)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        pdus = pdu.PduReader(1 << 20)
        found: list[pdu.Pdu] = []
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                pdus.feed(chunk)
                while (unit := pdus.next_pdu()) is not None:
                    found.append(unit)
        return found
    finally:
        writer.close()


async def test_echo_over_a_raw_socket_is_answered_and_released(scp: RunningDicom) -> None:
    command = dimse.Command(dimse.C_ECHO_RQ, message_id=1, affected_sop_class=VERIFICATION)
    message = b"".join(pdu.message_pdus(1, dimse.encode_command(command), None, 16384))
    replies = await exchange(scp.port, echo_request() + message + pdu.encode(pdu.ReleaseRequest()))
    assert isinstance(replies[0], AssociateAccept)
    assert isinstance(replies[1], pdu.PDataTF)
    response = dimse.decode_command(replies[1].pdvs[0].data)
    assert (response.command_field, response.status) == (dimse.C_ECHO_RSP, status.SUCCESS)
    assert isinstance(replies[2], pdu.ReleaseReply)


async def test_c_cancel_sent_with_its_c_find_ends_it_with_status_fe00(scp: RunningDicom) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientID = "*"
    find = dimse.Command(
        dimse.C_FIND_RQ,
        message_id=5,
        affected_sop_class=STUDY_ROOT_FIND,
        priority=0,
        dataset_type=0,
    )
    cancel = dimse.Command(dimse.C_CANCEL_RQ, responded_to=5)
    association = pdu.encode(
        AssociateRequest(
            "QANTARA",
            "VIEWER",
            (ProposedContext(1, STUDY_ROOT_FIND, (IMPLICIT,)),),
            UserInformation(max_length=16384),
        )
    )
    stream = b"".join(
        [
            association,
            *pdu.message_pdus(
                1, dimse.encode_command(find), encode_identifier(identifier, IMPLICIT), 16384
            ),
            *pdu.message_pdus(1, dimse.encode_command(cancel), None, 16384),
            pdu.encode(pdu.ReleaseRequest()),
        ]
    )
    replies = await exchange(scp.port, stream)
    statuses = [
        dimse.decode_command(p.data).status
        for unit in replies
        if isinstance(unit, pdu.PDataTF)
        for p in unit.pdvs
        if p.is_command
    ]
    assert statuses[-1] == dimse.CANCEL
    assert isinstance(replies[-1], pdu.ReleaseReply)


async def test_association_over_the_limit_gets_a_transient_local_limit_reject(
    module_dsn: str, tmp_path: Path
) -> None:
    async with running_dicom(
        module_dsn, tmp_path / "store", DicomSettings(max_associations=1)
    ) as one:
        held = await asyncio.to_thread(associate_for, one.port, fresh())
        try:
            [reply] = await exchange(one.port, echo_request())
        finally:
            await asyncio.to_thread(held.release)
        assert reply == AssociateReject(
            RejectResult.TRANSIENT, RejectSource.PRESENTATION, pdu.REJECT_LOCAL_LIMIT
        )
        assert await asyncio.to_thread(echo, one.port) == (True, status.SUCCESS)


async def test_calling_ae_not_allowed_gets_a_permanent_user_reject(
    module_dsn: str, tmp_path: Path
) -> None:
    settings = DicomSettings(allowed_aes=frozenset({"CT01"}))
    async with running_dicom(module_dsn, tmp_path / "store", settings) as limited:
        [reply] = await exchange(limited.port, echo_request("INTRUDER"))
    assert reply == AssociateReject(
        RejectResult.PERMANENT, RejectSource.SERVICE_USER, pdu.REJECT_CALLING_AE
    )


async def test_refused_associations_are_counted_by_reason(module_dsn: str, tmp_path: Path) -> None:
    settings = DicomSettings(allowed_aes=frozenset({"CT01"}), max_associations=1)
    async with running_dicom(module_dsn, tmp_path / "store", settings) as limited:
        await exchange(limited.port, echo_request("INTRUDER"))
        held = await asyncio.to_thread(associate_for, limited.port, fresh(), "CT01")
        try:
            await exchange(limited.port, echo_request("CT01"))
        finally:
            await asyncio.to_thread(held.release)
        rejected = limited.metrics.dicom_associations_rejected
        counts = {
            reason: rejected.labels(reason)._value.get()
            for reason in ("calling_ae", "local_limit", "certificate")
        }
    assert counts == {"calling_ae": 1, "local_limit": 1, "certificate": 0}


async def test_garbage_gets_an_abort_and_the_listener_keeps_serving(scp: RunningDicom) -> None:
    [reply] = await exchange(scp.port, b"\x42" * 64)
    assert reply == Abort(2, AbortReason.UNRECOGNIZED_PDU)
    assert await asyncio.to_thread(echo, scp.port) == (True, status.SUCCESS)


async def test_p_data_before_the_association_gets_an_unexpected_pdu_abort(
    scp: RunningDicom,
) -> None:
    p_data = pdu.encode(pdu.PDataTF((pdu.Pdv(1, True, True, b"\x00" * 8),)))
    [reply] = await exchange(scp.port, p_data)
    assert reply == Abort(2, AbortReason.UNEXPECTED_PDU)


async def test_silent_connection_is_closed_after_the_acse_timeout(
    module_dsn: str, tmp_path: Path
) -> None:
    settings = DicomSettings(acse_timeout=0.3)
    async with running_dicom(module_dsn, tmp_path / "store", settings) as quick:
        reader, writer = await asyncio.open_connection("127.0.0.1", quick.port)
        try:
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        finally:
            writer.close()


async def test_association_count_returns_to_zero_after_release(scp: RunningDicom) -> None:
    assert await asyncio.to_thread(echo, scp.port) == (True, status.SUCCESS)
    assert scp.metrics.sample("qantara_dicom_associations") == 0


# --- dcmtk as the peer --------------------------------------------------------------------------


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.skipif(not DCMTK, reason="needs dcmtk")
async def test_dcmtk_echoscu_is_answered(scp: RunningDicom) -> None:
    done = await asyncio.to_thread(dcmtk, "echoscu", "-aec", "QANTARA", "127.0.0.1", str(scp.port))
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not DCMTK, reason="needs dcmtk")
async def test_dcmtk_storescu_instance_is_stored_and_found_with_findscu(
    scp: RunningDicom, tmp_path: Path
) -> None:
    ds = fresh()
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    done = await asyncio.to_thread(
        dcmtk, "storescu", "-aec", "QANTARA", "-aet", "DCMTK", "127.0.0.1", str(scp.port), str(path)
    )
    assert done.returncode == 0, done.stderr
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    assert row is not None
    found = await asyncio.to_thread(
        dcmtk,
        "findscu",
        "-v",
        "-S",
        "-aec",
        "QANTARA",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={ds.StudyInstanceUID}",
        "-k",
        "PatientID",
        "127.0.0.1",
        str(scp.port),
    )
    assert found.returncode == 0, found.stderr
    assert str(ds.StudyInstanceUID) in found.stdout + found.stderr


async def test_stop_aborts_an_association_still_open_after_the_grace(
    module_dsn: str, tmp_path: Path
) -> None:
    async with running_dicom(module_dsn, tmp_path / "store") as short:
        held = await asyncio.to_thread(associate_for, short.port, fresh())
        async with asyncio.timeout(5):
            await short.server.stop(grace=0.2)
        assert not short.server.listening
        await wait_until(lambda: not held.is_established, timeout=5)  # pynetdicom's reader
        assert held.is_aborted
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", short.port)
