"""C-MOVE: the instances an identifier names go to the Move Destination on an association the
gateway opens to its configured address, as stored, with the Move Originator fields; the counts
and the final status come back on the request's association (PS3.4 C.4.2)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

from dicom import status
from dicom.config import AeAddress, DicomSettings
from dicom.identifier import decode_identifier
from tests.dicom_support import (
    MOVE_MESSAGE_ID,
    SCP_AE,
    STUDY_ROOT_MOVE,
    RunningDicom,
    c_move,
    query,
    running_dicom,
    scu,
    serving,
    store,
)
from tests.test_dicom_get import stored_dataset, stored_study, study, study_query

pytestmark = pytest.mark.timeout(120)

IMPLICIT = "1.2.840.10008.1.2"


@dataclass
class Workstation:
    """A pynetdicom storage SCP standing for the destination: what it received, by SOP
    Instance UID (transfer syntax, dataset bytes, Move Originator AE title and Message ID)."""

    port: int
    answer: int = 0x0000
    abort_after: int | None = None  # aborts the association once it has taken this many
    delay: float = 0.0  # seconds before answering each C-STORE
    received: dict[str, tuple[str, bytes, str, int]] = field(default_factory=dict)
    taken: int = 0

    def handle(self, event: Any) -> int:
        request = event.request
        self.taken += 1
        time.sleep(self.delay)
        if self.abort_after is not None and self.taken >= self.abort_after:
            threading.Thread(target=event.assoc.abort).start()
            time.sleep(0.5)  # no answer to this one: the association is gone first
        self.received[str(request.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            request.DataSet.getvalue(),
            str(request.MoveOriginatorApplicationEntityTitle or "").strip(),
            int(request.MoveOriginatorMessageID or 0),
        )
        return self.answer


@contextmanager
def listening(ae_title: str, syntaxes: list[str] | None = None) -> Iterator[Workstation]:
    """A storage SCP taking every storage class in `syntaxes` (pynetdicom's uncompressed ones
    by default)."""
    ae = AE(ae_title=ae_title)
    for context in StoragePresentationContexts:
        assert context.abstract_syntax is not None
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    station = Workstation(0)
    with serving(ae, [(evt.EVT_C_STORE, station.handle)]) as port:
        station.port = port
        yield station


@pytest.fixture(scope="module")
def workstation() -> Iterator[Workstation]:
    with listening("WORKSTATION") as station:
        yield station


@pytest.fixture(scope="module")
def old_pacs() -> Iterator[Workstation]:
    with listening("OLD-PACS", [IMPLICIT]) as station:  # the one syntax every AE must take
        yield station


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
async def scp(
    module_dsn: str,
    tmp_path_factory: pytest.TempPathFactory,
    workstation: Workstation,
    old_pacs: Workstation,
) -> AsyncIterator[RunningDicom]:
    settings = DicomSettings(
        retrieve_aes=frozenset({"VIEWER"}),
        move_destinations=(
            AeAddress("WORKSTATION", "127.0.0.1", workstation.port),
            AeAddress("OLD-PACS", "127.0.0.1", old_pacs.port),
            AeAddress("NOWHERE", "127.0.0.1", closed_port()),
        ),
        acse_timeout=5.0,
    )
    async with running_dicom(
        module_dsn, tmp_path_factory.mktemp("dicom-move"), settings
    ) as running:
        yield running


async def test_a_study_moved_arrives_at_the_destination_as_stored_with_its_originator(
    scp: RunningDicom, workstation: Workstation
) -> None:
    instances = await stored_study(scp.port, 3)
    identifier = study_query(instances)

    moved = await asyncio.to_thread(c_move, scp.port, identifier, "WORKSTATION")

    assert moved.final["Status"] == status.SUCCESS
    assert moved.final["NumberOfCompletedSuboperations"] == 3
    assert [r["NumberOfRemainingSuboperations"] for r in moved.responses[:-1]] == [2, 1]
    for ds in instances:
        syntax, data, originator, message_id = workstation.received[str(ds.SOPInstanceUID)]
        assert syntax == str(ds.file_meta.TransferSyntaxUID)
        assert data == await stored_dataset(scp, str(ds.SOPInstanceUID))
        assert (originator, message_id) == ("VIEWER", MOVE_MESSAGE_ID)


async def test_a_destination_taking_only_implicit_vr_gets_the_instance_converted(
    scp: RunningDicom, old_pacs: Workstation
) -> None:
    [ds] = study(1)  # stored in explicit VR little endian
    await asyncio.to_thread(store, scp.port, [ds])
    identifier = query("STUDY", StudyInstanceUID=ds.StudyInstanceUID)

    moved = await asyncio.to_thread(c_move, scp.port, identifier, "OLD-PACS")

    assert moved.final["Status"] == status.SUCCESS
    syntax, data, _, _ = old_pacs.received[str(ds.SOPInstanceUID)]
    assert syntax == IMPLICIT
    received = decode_identifier(data, IMPLICIT)
    assert (received.PixelData, received.PatientName) == (ds.PixelData, ds.PatientName)


async def test_a_destination_not_configured_gets_a801_and_nothing_is_sent(
    scp: RunningDicom, workstation: Workstation
) -> None:
    instances = await stored_study(scp.port, 1)
    identifier = study_query(instances)

    moved = await asyncio.to_thread(c_move, scp.port, identifier, "ELSEWHERE")

    assert moved.final["Status"] == status.MOVE_DESTINATION_UNKNOWN
    assert str(instances[0].SOPInstanceUID) not in workstation.received


async def test_an_unreachable_destination_fails_every_sub_operation_with_a702(
    scp: RunningDicom,
) -> None:
    instances = await stored_study(scp.port, 2)
    identifier = study_query(instances)

    moved = await asyncio.to_thread(c_move, scp.port, identifier, "NOWHERE")

    assert moved.final["Status"] == status.GET_SUB_OPERATIONS_FAILED
    assert moved.final["NumberOfFailedSuboperations"] == 2
    assert sorted(moved.failed_uids()) == sorted(str(ds.SOPInstanceUID) for ds in instances)


async def test_an_instance_the_destination_cannot_take_in_its_syntax_fails_alone(
    scp: RunningDicom, workstation: Workstation
) -> None:
    plain = study(1)
    compressed = study(1, "JPEG2000.dcm")[0]  # the workstation takes uncompressed syntaxes only
    compressed.StudyInstanceUID = plain[0].StudyInstanceUID
    await asyncio.to_thread(store, scp.port, [*plain, compressed])
    identifier = query("STUDY", StudyInstanceUID=plain[0].StudyInstanceUID)

    moved = await asyncio.to_thread(c_move, scp.port, identifier, "WORKSTATION")

    assert moved.final["Status"] == status.GET_SOME_FAILED
    assert moved.failed_uids() == [str(compressed.SOPInstanceUID)]
    assert str(plain[0].SOPInstanceUID) in workstation.received


async def test_a_destination_that_goes_away_fails_the_sub_operations_left(
    scp: RunningDicom, workstation: Workstation
) -> None:
    instances = await stored_study(scp.port, 4)
    identifier = study_query(instances)
    workstation.taken, workstation.abort_after = 0, 2
    try:
        moved = await asyncio.to_thread(c_move, scp.port, identifier, "WORKSTATION")
    finally:
        workstation.abort_after = None

    assert moved.final["Status"] == status.GET_SOME_FAILED
    assert moved.final["NumberOfCompletedSuboperations"] == 1
    assert moved.final["NumberOfFailedSuboperations"] == 3
    assert len(moved.failed_uids()) == 3
    assert await asyncio.to_thread(store, scp.port, study(1)) == [status.SUCCESS]  # still serving


async def test_a_move_stops_when_its_requester_goes_away(
    scp: RunningDicom, workstation: Workstation
) -> None:
    instances = await stored_study(scp.port, 6)
    identifier = study_query(instances)

    def move_then_abort() -> None:
        ae = scu("VIEWER")
        ae.add_requested_context(STUDY_ROOT_MOVE)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title=SCP_AE)
        for answer, _ in assoc.send_c_move(identifier, "WORKSTATION", STUDY_ROOT_MOVE):
            if "Status" in answer:  # the first Pending: one instance moved
                assoc.abort()
                break

    workstation.delay = 0.2
    try:
        await asyncio.to_thread(move_then_abort)
        await asyncio.sleep(1.5)  # time for the rest, had the move gone on
    finally:
        workstation.delay = 0.0
    moved = [ds for ds in instances if str(ds.SOPInstanceUID) in workstation.received]
    assert 1 <= len(moved) < 6
    assert await asyncio.to_thread(store, scp.port, study(1)) == [status.SUCCESS]


async def test_c_cancel_stops_a_move_before_its_next_sub_operation(scp: RunningDicom) -> None:
    instances = await stored_study(scp.port, 6)
    identifier = study_query(instances)

    moved = await asyncio.to_thread(c_move, scp.port, identifier, "WORKSTATION", cancel_after=1)

    assert moved.final["Status"] == 0xFE00
    sent = moved.final["NumberOfCompletedSuboperations"]
    assert sent is not None
    assert 1 <= sent < 6
    assert len(moved.failed_uids()) == 6 - sent


async def test_a_move_is_audited_with_its_destination(scp: RunningDicom) -> None:
    instances = await stored_study(scp.port, 1)
    identifier = study_query(instances)

    await asyncio.to_thread(c_move, scp.port, identifier, "WORKSTATION")

    rows = await scp.pool.fetch(
        "SELECT query_shape, status FROM api_audit WHERE protocol = 'dicom' ORDER BY id DESC"
        " LIMIT 2"
    )
    assert [(row["query_shape"], row["status"]) for row in reversed(rows)] == [
        ("C-MOVE STUDY to WORKSTATION, 1 instance(s)", status.PENDING),
        ("C-MOVE STUDY to WORKSTATION: 1 completed, 0 warning, 0 failed, 0 cancelled", 0),
    ]


@pytest.mark.skipif(
    shutil.which("movescu") is None, reason="dcmtk not installed (make system-deps)"
)
async def test_dcmtk_movescu_moves_a_study_to_the_workstation(
    scp: RunningDicom, workstation: Workstation
) -> None:
    instances = await stored_study(scp.port, 2)
    command = [
        "movescu", "-S", "-aet", "VIEWER", "-aec", "QANTARA", "-aem", "WORKSTATION",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={instances[0].StudyInstanceUID}",
        "127.0.0.1", str(scp.port),
    ]  # fmt: skip

    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=60)

    assert done.returncode == 0, done.stderr.decode(errors="replace")
    for ds in instances:
        _, data, originator, _ = workstation.received[str(ds.SOPInstanceUID)]
        assert data == await stored_dataset(scp, str(ds.SOPInstanceUID))
        assert originator == "VIEWER"
