"""Storage Commitment Push Model (PS3.4 Annex J): a modality asks whether the gateway holds the
instances it sent, and gets the answer as an N-EVENT-REPORT on the same association.

The request and report logic (`dicom.commitment`) is tested on datasets; the listener with
pynetdicom as the modality, its report handler bound to the association or listening on a port
of its own, where the reports wait in the database (`dicom_commitment_report`) until taken."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom import dimse, sop_classes, status
from dicom.commitment import (
    ALL_COMMITTED,
    SOME_FAILED,
    CommitmentError,
    CommitmentRequest,
    Reference,
    read_request,
    report,
)
from dicom.commitment_delivery import MAX_WAITING, MAX_WAITING_PER_MODALITY, RETRY_DELAYS
from dicom.config import AeAddress, DicomSettings
from dicom.identifier import encode_identifier
from dicom.sop_classes import EXPLICIT_VR_LITTLE_ENDIAN as EXPLICIT_LE
from storage.commitment_reports import CommitmentReportQueue
from tests.conftest import PrivatePostgresFactory
from tests.dicom_support import SCP_AE, RunningDicom, charset_file, echo, renumbered, running_dicom
from tests.dicom_support import store as c_store
from tests.gateway_process import GatewayProcess
from tests.services_support import wait_until
from tests.tls_support import Pki, pki

__all__ = ["pki"]  # a fixture, used by name

pytestmark = pytest.mark.timeout(120)

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def information(transaction: str, *references: tuple[str, str]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


# --- the request and the report, on datasets ------------------------------------------------------


def test_a_request_reads_its_transaction_and_references_in_order() -> None:
    request = read_request(information("1.2.3", (CR, "1.2.3.2"), (CT, "1.2.3.1")))
    assert request == CommitmentRequest(
        "1.2.3", (Reference(CR, "1.2.3.2"), Reference(CT, "1.2.3.1"))
    )
    assert request.instance_uids == ["1.2.3.1", "1.2.3.2"]


def test_a_request_without_a_transaction_uid_is_an_invalid_argument() -> None:
    ds = information("1.2.3", (CR, "1.2.3.1"))
    del ds.TransactionUID
    with pytest.raises(CommitmentError) as raised:
        read_request(ds)
    assert raised.value.status == status.INVALID_ARGUMENT_VALUE


def test_a_request_without_references_is_an_invalid_argument() -> None:
    with pytest.raises(CommitmentError, match="Referenced SOP Sequence"):
        read_request(information("1.2.3"))


def test_a_reference_whose_uid_is_not_one_is_an_invalid_argument() -> None:
    with pytest.raises(CommitmentError, match="valid SOP Class and Instance UIDs"):
        read_request(information("1.2.3", (CR, "../../etc/passwd")))


def test_the_report_commits_what_the_index_holds_and_gives_a_reason_for_the_rest() -> None:
    request = read_request(information("1.2.3", (CR, "1.2.3.1"), (CR, "1.2.3.2"), (CR, "1.2.3.3")))
    result = report(request, {"1.2.3.1": CR, "1.2.3.3": CT})
    assert result.event_type == SOME_FAILED
    info = result.information
    assert info.TransactionUID == "1.2.3"
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == ["1.2.3.1"]
    failed = [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in info.FailedSOPSequence]
    assert failed == [
        ("1.2.3.2", status.NO_SUCH_OBJECT_INSTANCE),
        ("1.2.3.3", status.CLASS_INSTANCE_CONFLICT),
    ]
    assert (result.committed, result.failed) == (
        1,
        {status.NO_SUCH_OBJECT_INSTANCE: 1, status.CLASS_INSTANCE_CONFLICT: 1},
    )


def test_a_report_without_failures_is_event_type_1_and_has_no_failed_sequence() -> None:
    result = report(read_request(information("1.2.3", (CR, "1.2.3.1"))), {"1.2.3.1": CR})
    assert result.event_type == ALL_COMMITTED
    assert "FailedSOPSequence" not in result.information


# --- the DIMSE messages ------------------------------------------------------------------------


N_ACTION = dimse.Command(
    dimse.N_ACTION_RQ,
    message_id=7,
    requested_sop_class=sop_classes.STORAGE_COMMITMENT,
    requested_sop_instance=sop_classes.STORAGE_COMMITMENT_INSTANCE,
    dataset_type=dimse.HAS_DATASET,
    action_type=1,
)
"""A modality's request for storage commitment, its Action Information to follow."""


def test_an_n_action_request_s_fields_are_read() -> None:
    assert dimse.decode_command(dimse.encode_command(N_ACTION)) == N_ACTION


def test_the_n_action_response_answers_for_the_requested_instance_and_action() -> None:
    response = dimse.decode_command(
        dimse.encode_command(dimse.action_response(N_ACTION, status.SUCCESS))
    )
    assert (response.command_field, response.responded_to, response.status) == (0x8130, 7, 0)
    assert response.affected_sop_class == sop_classes.STORAGE_COMMITMENT
    assert response.affected_sop_instance == sop_classes.STORAGE_COMMITMENT_INSTANCE
    assert response.action_type == 1


def test_the_event_report_request_s_elements_are_in_ascending_order() -> None:
    encoded = dimse.encode_command(
        dimse.event_report_request(
            3, sop_classes.STORAGE_COMMITMENT, sop_classes.STORAGE_COMMITMENT_INSTANCE, 2
        )
    )
    tags = []
    offset = 0
    while offset < len(encoded):
        element = int.from_bytes(encoded[offset + 2 : offset + 4], "little")
        length = int.from_bytes(encoded[offset + 4 : offset + 8], "little")
        tags.append(element)
        offset += 8 + length
    assert tags == sorted(tags)
    assert 0x1002 in tags  # Event Type ID


# --- the listener, pynetdicom as the modality ----------------------------------------------------


@dataclass
class Reports:
    """What the modality's N-EVENT-REPORT handler received."""

    received: list[tuple[int, Dataset]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    def handler(self, event: evt.Event) -> tuple[int, None]:
        assert isinstance(event.request, N_EVENT_REPORT)
        assert event.request.EventTypeID is not None
        self.received.append((int(event.request.EventTypeID), event.event_information))
        self.arrived.set()
        return 0x0000, None  # the N-EVENT-REPORT-RSP's status, no Event Reply


def request_commitment(
    port: int,
    info: Dataset | bytes,
    action_type: int = 1,
    *,
    wait: bool = True,
    instance: str = sop_classes.STORAGE_COMMITMENT_INSTANCE,
) -> tuple[int | None, Reports]:
    """N-ACTION on a Storage Commitment context; its status, and the reports that came on the
    association within 10 s (none when the status is not Success; `wait=False`: released at
    once, as a modality that takes its reports on a port of its own)."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(StorageCommitmentPushModel)
    reports = Reports()
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=SCP_AE,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)],
    )
    assert assoc.is_established
    try:
        answer, _ = assoc.send_n_action(
            info,  # type: ignore[arg-type]  # raw bytes are sent as they are
            action_type,
            StorageCommitmentPushModel,
            instance,
        )
        code = int(answer.Status) if "Status" in answer else None
        if code == status.SUCCESS and wait:
            reports.arrived.wait(10)
    finally:
        assoc.release()
    return code, reports


@pytest.fixture
async def scp(fresh_dsn: str, tmp_path: Path) -> AsyncIterator[RunningDicom]:
    async with running_dicom(fresh_dsn, tmp_path / "store") as running:
        yield running


def committed(scp: RunningDicom, result: str) -> float:
    labels = {"result": result}
    return scp.metrics.sample("qantara_dicom_commitment_instances_total", labels) or 0.0


async def test_a_modality_gets_on_the_same_association_the_report_of_what_it_stored(
    scp: RunningDicom,
) -> None:
    arabic, french = (
        renumbered(charset_file("chrArab.dcm")),
        renumbered(charset_file("chrFren.dcm")),
    )
    assert await asyncio.to_thread(c_store, scp.port, [arabic, french]) == [0, 0]
    never_sent = generate_uid()
    transaction = generate_uid()
    info = information(
        transaction,
        (str(arabic.SOPClassUID), str(arabic.SOPInstanceUID)),
        (str(french.SOPClassUID), str(french.SOPInstanceUID)),
        (CR, never_sent),
        (CT, str(arabic.SOPInstanceUID)),  # stored, but as another SOP Class
    )
    code, reports = await asyncio.to_thread(request_commitment, scp.port, info)
    assert code == status.SUCCESS
    [(event_type, report_info)] = reports.received
    assert event_type == SOME_FAILED
    assert report_info.TransactionUID == transaction
    assert [i.ReferencedSOPInstanceUID for i in report_info.ReferencedSOPSequence] == [
        arabic.SOPInstanceUID,
        french.SOPInstanceUID,
    ]
    assert [
        (i.ReferencedSOPInstanceUID, i.FailureReason) for i in report_info.FailedSOPSequence
    ] == [
        (never_sent, status.NO_SUCH_OBJECT_INSTANCE),
        (arabic.SOPInstanceUID, status.CLASS_INSTANCE_CONFLICT),
    ]
    assert (committed(scp, "committed"), committed(scp, "no_such_instance")) == (2, 1)
    assert committed(scp, "class_conflict") == 1


async def test_a_modality_whose_instances_are_all_held_gets_event_type_1(
    scp: RunningDicom, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom.commitment_scp")
    ds = renumbered(charset_file("chrFren.dcm"))
    assert await asyncio.to_thread(c_store, scp.port, [ds]) == [0]
    info = information(generate_uid(), (str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    code, reports = await asyncio.to_thread(request_commitment, scp.port, info)
    assert code == status.SUCCESS
    [(event_type, report_info)] = reports.received
    assert event_type == ALL_COMMITTED
    assert "FailedSOPSequence" not in report_info
    # The modality's N-EVENT-REPORT-RSP came back before its release.
    assert "storage commitment report 1 taken by MODALITY" in caplog.text


async def test_an_action_other_than_a_commitment_request_is_refused_and_the_listener_serves_on(
    scp: RunningDicom,
) -> None:
    info = information(generate_uid(), (CR, generate_uid()))
    code, reports = await asyncio.to_thread(request_commitment, scp.port, info, 2)
    assert (code, reports.received) == (status.NO_SUCH_ACTION, [])
    established, answered = await asyncio.to_thread(echo, scp.port)
    assert (established, answered) == (True, status.SUCCESS)


async def test_a_request_to_another_sop_instance_than_the_well_known_one_is_refused(
    scp: RunningDicom,
) -> None:
    info = information(generate_uid(), (CR, generate_uid()))
    code, reports = await asyncio.to_thread(
        request_commitment, scp.port, info, instance=generate_uid()
    )
    assert (code, reports.received) == (status.INVALID_OBJECT_INSTANCE, [])


async def test_action_information_without_references_is_an_invalid_argument_and_no_report(
    scp: RunningDicom,
) -> None:
    code, reports = await asyncio.to_thread(request_commitment, scp.port, information("1.2.3"))
    assert (code, reports.received) == (status.INVALID_ARGUMENT_VALUE, [])


async def test_the_database_down_answers_resource_limitation_and_a_request_after_recovery_commits(
    private_postgres: PrivatePostgresFactory, tmp_path: Path
) -> None:
    server = await private_postgres()
    settings = DicomSettings(store_timeout=3.0)
    async with running_dicom(server.dsn(), tmp_path / "store", settings, pool_size=2) as scp:
        ds = renumbered(charset_file("chrArab.dcm"))
        assert await asyncio.to_thread(c_store, scp.port, [ds]) == [status.SUCCESS]
        info = information(generate_uid(), (str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        await server.stop()
        code, reports = await asyncio.to_thread(request_commitment, scp.port, info)
        assert (code, reports.received) == (status.RESOURCE_LIMITATION, [])
        await server.start()
        async with asyncio.timeout(60):
            while (code := (await asyncio.to_thread(request_commitment, scp.port, info))[0]) != 0:
                assert code == status.RESOURCE_LIMITATION
                await asyncio.sleep(0.5)
        code, reports = await asyncio.to_thread(request_commitment, scp.port, info)
        assert [event_type for event_type, _ in reports.received] == [ALL_COMMITTED]


# --- reports on the modality's own port ----------------------------------------------------------


@dataclass
class ModalityPort:
    """A modality's own Storage Commitment SCU port (pynetdicom), taking reports."""

    port: int
    reports: Reports
    callers: list[str] = field(default_factory=list)
    server: ThreadedAssociationServer | None = None
    tls: ssl.SSLContext | None = None  # listens over TLS with this server context

    def listen(self) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)

        def handler(event: evt.Event) -> tuple[int, None]:
            self.callers.append(event.assoc.requestor.ae_title)
            return self.reports.handler(event)

        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self.tls,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, handler)],
        )

    def close(self) -> None:
        """Stop listening once the gateway's report associations have ended (a shutdown in the
        middle of a release leaves pynetdicom's socket to the garbage collector)."""
        if self.server is None:
            return
        deadline = time.monotonic() + 5.0
        while self.server.active_associations and time.monotonic() < deadline:
            time.sleep(0.02)
        self.server.shutdown()


@asynccontextmanager
async def modality_port(*, listening: bool = True) -> AsyncIterator[ModalityPort]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    modality = ModalityPort(port, Reports())
    if listening:
        modality.listen()
    try:
        yield modality
    finally:
        modality.close()


@asynccontextmanager
async def reporting_scp(
    dsn: str, root: Path, modality: ModalityPort
) -> AsyncIterator[RunningDicom]:
    settings = DicomSettings(report_addresses=(AeAddress("MODALITY", "127.0.0.1", modality.port),))
    async with running_dicom(dsn, root, settings) as scp:
        yield scp


def pending(scp: RunningDicom) -> float:
    return scp.metrics.sample("qantara_dicom_commitment_reports_pending", {}) or 0.0


def reported(scp: RunningDicom, outcome: str) -> float:
    labels = {"outcome": outcome}
    return scp.metrics.sample("qantara_dicom_commitment_reports_total", labels) or 0.0


async def test_a_modality_with_a_report_address_gets_its_report_there_from_our_ae(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with modality_port() as modality, reporting_scp(fresh_dsn, tmp_path, modality) as scp:
        ds = renumbered(charset_file("chrArab.dcm"))
        assert await asyncio.to_thread(c_store, scp.port, [ds]) == [status.SUCCESS]
        info = information(generate_uid(), (str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
        code, on_request = await asyncio.to_thread(request_commitment, scp.port, info, wait=False)
        assert (code, on_request.received) == (status.SUCCESS, [])
        assert await asyncio.to_thread(modality.reports.arrived.wait, 10)
        [(event_type, report_info)] = modality.reports.received
        assert (event_type, report_info.TransactionUID) == (ALL_COMMITTED, info.TransactionUID)
        assert modality.callers == ["QANTARA"]
        await wait_until(lambda: reported(scp, "delivered") == 1, timeout=5)


async def test_a_report_is_sent_again_until_the_modality_s_port_answers(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with (
        modality_port(listening=False) as modality,
        reporting_scp(fresh_dsn, tmp_path, modality) as scp,
    ):
        info = information(generate_uid(), (CR, generate_uid()))
        code, _ = await asyncio.to_thread(request_commitment, scp.port, info, wait=False)
        assert code == status.SUCCESS
        await asyncio.sleep(1.0)  # the first attempt has found nobody
        assert modality.reports.received == []
        assert pending(scp) == 1
        modality.listen()
        assert await asyncio.to_thread(modality.reports.arrived.wait, 20)  # the retry, 5 s on
        [(event_type, _)] = modality.reports.received
        assert event_type == SOME_FAILED
        await wait_until(lambda: reported(scp, "delivered") == 1, timeout=5)
        await wait_until(lambda: pending(scp) == 0, timeout=5)


async def test_a_stop_does_not_wait_for_a_report_a_silent_modality_port_holds(
    fresh_dsn: str, tmp_path: Path
) -> None:
    with socket.socket() as silent:  # takes the connection, never answers the association
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = int(silent.getsockname()[1])
        modality = ModalityPort(port, Reports())
        async with reporting_scp(fresh_dsn, tmp_path, modality) as scp:
            info = information(generate_uid(), (CR, generate_uid()))
            code, _ = await asyncio.to_thread(request_commitment, scp.port, info, wait=False)
            assert code == status.SUCCESS
            await asyncio.sleep(0.5)  # the attempt waits for the A-ASSOCIATE-AC
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 5.0  # not the 10 s of the attempt's step


async def test_a_modality_with_a_tls_address_gets_its_report_over_tls(
    fresh_dsn: str, tmp_path: Path, pki: Pki
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    modality = ModalityPort(port, Reports(), tls=server)
    modality.listen()
    settings = DicomSettings(
        report_addresses=(AeAddress("MODALITY", "127.0.0.1", port, tls=True),),
        outbound_tls_ca=pki.ca,
    )
    try:
        async with running_dicom(fresh_dsn, tmp_path, settings) as scp:
            info = information(generate_uid(), (CR, generate_uid()))
            code, _ = await asyncio.to_thread(request_commitment, scp.port, info, wait=False)
            assert code == status.SUCCESS
            assert await asyncio.to_thread(modality.reports.arrived.wait, 10)
            await wait_until(lambda: reported(scp, "delivered") == 1, timeout=5)
    finally:
        modality.close()


# --- the report queue (`dicom_commitment_report`): restarts, replicas, bounds --------------------


async def wait_for_many(pool: asyncpg.Pool, ae_title: str, count: int, spread: int = 1) -> None:
    """`count` reports for `ae_title` (or, with `spread`, for `spread` AE titles named after
    it), not due for a day."""
    await pool.execute(
        "INSERT INTO dicom_commitment_report (ae_title, event_type, information, due_at)"
        " SELECT $2 || CASE WHEN $3 > 1 THEN '-' || (n % $3) ELSE '' END, 2, '\\x00',"
        "        now() + interval '1 day'"
        " FROM generate_series(1, $1) AS n",
        count,
        ae_title,
        spread,
    )


async def first_attempt_failed(db: asyncpg.Pool | asyncpg.Connection) -> bool:
    """The one waiting report's first attempt is over and its retry set (due within 10 s), not
    still leased for the attempt (90 s)."""
    row = await db.fetchrow(
        "SELECT attempts, due_at < now() + interval '10 s' AS soon FROM dicom_commitment_report"
    )
    return row is not None and (row["attempts"], row["soon"]) == (1, True)


async def waiting_reports(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT ae_title, attempts, due_at <= now() AS due FROM dicom_commitment_report"
        )
    )


async def test_a_report_waiting_for_the_modality_s_port_survives_a_restart_of_the_gateway(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with modality_port(listening=False) as modality:
        async with reporting_scp(fresh_dsn, tmp_path, modality) as first:
            info = information(generate_uid(), (CR, generate_uid()))
            code, _ = await asyncio.to_thread(request_commitment, first.port, info, wait=False)
            assert code == status.SUCCESS
            await wait_until(lambda: reported(first, "delivered") == 0 and pending(first) == 1, 5)
            [row] = await waiting_reports(first.pool)
            assert (row["ae_title"], row["attempts"]) == ("MODALITY", 1)  # the first has failed
        modality.listen()
        async with reporting_scp(fresh_dsn, tmp_path, modality) as second:  # nothing in memory
            assert await asyncio.to_thread(modality.reports.arrived.wait, 20)  # at its retry
            [(event_type, report_info)] = modality.reports.received
            assert (event_type, report_info.TransactionUID) == (SOME_FAILED, info.TransactionUID)
            await wait_until(lambda: reported(second, "delivered") == 1, timeout=5)
            assert await waiting_reports(second.pool) == []


async def test_two_replicas_sharing_the_queue_deliver_each_report_once(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with (
        modality_port(listening=False) as modality,
        reporting_scp(fresh_dsn, tmp_path / "a", modality) as a,
        reporting_scp(fresh_dsn, tmp_path / "b", modality) as b,
    ):
        transactions = [generate_uid() for _ in range(12)]
        for number, transaction in enumerate(transactions):
            replica = (a, b)[number % 2]
            info = information(transaction, (CR, generate_uid()))
            code, _ = await asyncio.to_thread(request_commitment, replica.port, info, wait=False)
            assert code == status.SUCCESS
        modality.listen()  # every report is now due within 5 s, on both replicas
        await wait_until(lambda: len(modality.reports.received) >= 12, timeout=30)
        await asyncio.sleep(1.0)  # a second delivery of any of them would arrive meanwhile
        received = [str(info.TransactionUID) for _, info in modality.reports.received]
        assert sorted(received) == sorted(transactions)
        assert reported(a, "delivered") + reported(b, "delivered") == 12
        assert await waiting_reports(a.pool) == []


async def test_a_report_whose_last_attempt_fails_is_removed_and_counted_undelivered(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with (
        modality_port(listening=False) as modality,
        reporting_scp(fresh_dsn, tmp_path, modality) as scp,
    ):
        queue = CommitmentReportQueue(scp.pool)
        await scp.pool.execute(  # as if the attempts before had all failed
            "INSERT INTO dicom_commitment_report (ae_title, event_type, information, attempts)"
            " VALUES ('MODALITY', 2, $1, $2)",
            encode_identifier(information(generate_uid(), (CR, generate_uid())), EXPLICIT_LE),
            len(RETRY_DELAYS),
        )
        assert (await queue.backlog()).waiting == 1
        await wait_until(lambda: reported(scp, "undelivered") == 1, timeout=10)
        assert await waiting_reports(scp.pool) == []
        assert modality.reports.received == []


async def test_a_report_for_an_ae_title_no_longer_given_a_report_address_is_dropped(
    fresh_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="dicom.commitment_delivery")
    async with (
        modality_port() as modality,
        reporting_scp(fresh_dsn, tmp_path, modality) as scp,
    ):
        queue = CommitmentReportQueue(scp.pool)
        info = information(generate_uid(), (CR, generate_uid()))
        assert await queue.queue("RETIRED-US", 2, encode_identifier(info, EXPLICIT_LE), 10, 10)
        await wait_until(lambda: reported(scp, "dropped") == 1, timeout=10)
        assert await waiting_reports(scp.pool) == []
        assert "RETIRED-US dropped: no longer in QANTARA_DICOM_REPORT_ADDRESSES" in caplog.text
        assert modality.reports.received == []


async def test_a_full_queue_answers_resource_limitation_and_queues_nothing(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with (
        modality_port(listening=False) as modality,
        reporting_scp(fresh_dsn, tmp_path, modality) as scp,
    ):
        await wait_for_many(scp.pool, "US", MAX_WAITING, spread=100)  # other modalities
        info = information(generate_uid(), (CR, generate_uid()))
        code, _ = await asyncio.to_thread(request_commitment, scp.port, info, wait=False)
        assert code == status.RESOURCE_LIMITATION
        assert len(await waiting_reports(scp.pool)) == MAX_WAITING
        assert reported(scp, "dropped") == 1


async def test_a_modality_with_its_share_of_the_queue_waiting_is_refused_and_no_other_is(
    fresh_dsn: str, tmp_path: Path
) -> None:
    async with (
        modality_port(listening=False) as modality,
        reporting_scp(fresh_dsn, tmp_path, modality) as scp,
    ):
        await wait_for_many(scp.pool, "MODALITY", MAX_WAITING_PER_MODALITY)
        info = information(generate_uid(), (CR, generate_uid()))
        code, _ = await asyncio.to_thread(request_commitment, scp.port, info, wait=False)
        assert code == status.RESOURCE_LIMITATION
        encoded = encode_identifier(info, EXPLICIT_LE)
        queue = CommitmentReportQueue(scp.pool)
        assert await queue.queue("OTHER-US", 2, encoded, MAX_WAITING, MAX_WAITING_PER_MODALITY)


async def test_a_report_whose_attempt_a_stop_cut_short_is_due_again_at_once(
    fresh_dsn: str, tmp_path: Path
) -> None:
    with socket.socket() as silent:  # takes the connection, never answers the association
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        modality = ModalityPort(int(silent.getsockname()[1]), Reports())
        async with reporting_scp(fresh_dsn, tmp_path, modality) as scp:
            info = information(generate_uid(), (CR, generate_uid()))
            code, _ = await asyncio.to_thread(request_commitment, scp.port, info, wait=False)
            assert code == status.SUCCESS
            pool = scp.pool

            async def leased() -> bool:  # claimed: its attempt waits for the A-ASSOCIATE-AC
                return [(r["attempts"], r["due"]) for r in await waiting_reports(pool)] == [
                    (1, False)
                ]

            await wait_until(leased, timeout=10)  # its attempt started, or about to
            await scp.server.stop(grace=1.0)
            [released] = await waiting_reports(pool)
            assert (released["attempts"], released["due"]) == (1, True)


@pytest.mark.fault
@pytest.mark.slow
async def test_a_report_waiting_when_qantara_serve_is_sigkilled_is_delivered_after_a_restart(
    fresh_dsn: str, mqtt_url: str
) -> None:
    async with modality_port(listening=False) as modality:
        env = {"QANTARA_DICOM_REPORT_ADDRESSES": f"MODALITY=127.0.0.1:{modality.port}"}
        async with GatewayProcess(database_url=fresh_dsn, mqtt_url=mqtt_url, env=env) as gateway:
            info = information(generate_uid(), (CR, generate_uid()))
            port = gateway.dicom_port()
            code, _ = await asyncio.to_thread(request_commitment, port, info, wait=False)
            assert code == status.SUCCESS

            async def retry_set() -> bool:
                connection = await asyncpg.connect(fresh_dsn)
                try:
                    return await first_attempt_failed(connection)
                finally:
                    await connection.close()

            await wait_until(retry_set, timeout=10)  # killed between attempts, not during one
            await gateway.kill()
            modality.listen()
            await gateway.start()
            assert await asyncio.to_thread(modality.reports.arrived.wait, 30)
            [(event_type, report_info)] = modality.reports.received
            assert (event_type, report_info.TransactionUID) == (SOME_FAILED, info.TransactionUID)
            await wait_until(
                lambda: any("(attempt 2)" in line for line in gateway.log_lines), timeout=10
            )


async def test_a_report_waiting_while_the_database_is_down_is_delivered_once_it_is_back(
    private_postgres: PrivatePostgresFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dicom.commitment_delivery")
    server = await private_postgres()
    async with (
        modality_port(listening=False) as modality,
        reporting_scp(server.dsn(), tmp_path, modality) as scp,
    ):
        info = information(generate_uid(), (CR, generate_uid()))
        code, _ = await asyncio.to_thread(request_commitment, scp.port, info, wait=False)
        assert code == status.SUCCESS
        await wait_until(lambda: first_attempt_failed(scp.pool), timeout=10)
        hold = "UPDATE dicom_commitment_report SET due_at = now() + interval '1 hour'"
        await scp.pool.execute(hold)  # not tried again before the database is back, however slow
        await server.stop()
        modality.listen()
        await wait_until(lambda: "report queue cannot be read" in caplog.text, timeout=20)
        await server.start()
        await wait_until(lambda: "report queue is readable again" in caplog.text, timeout=30)
        assert modality.reports.received == []
        await scp.pool.execute("UPDATE dicom_commitment_report SET due_at = now()")
        assert await asyncio.to_thread(modality.reports.arrived.wait, 30)
        await wait_until(lambda: reported(scp, "delivered") == 1, timeout=10)
        assert len(modality.reports.received) == 1
