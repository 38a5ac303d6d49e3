"""Storage Commitment reports on an association of the modality's own (PS3.4 J.3.3).

Many modalities release the association right after the N-ACTION-RSP and wait for the report on
a port of their own: those named in `QANTARA_DICOM_REPORT_ADDRESSES` (`AE=host:port`). The
gateway then opens an association to that address, calling it by its AE title, with the Storage
Commitment Push Model context and the SCP role for itself (SCP/SCU Role Selection: the
association's requestor performs the N-EVENT-REPORT), sends the report and releases.

The report is committed to the database (`dicom_commitment_report`, through a `ReportQueue`)
before the N-ACTION is answered Success, and delivered from there by `Reports.run`, a task of the
listener's group: at once, then again after `RETRY_DELAYS` while the modality is unreachable or
answers with a failure. A restart, or the replica's death, loses no report: any replica claims
the due ones (a lease per attempt, `storage.commitment_reports`). At most `MAX_WAITING` reports
wait (all replicas together), `MAX_WAITING_PER_MODALITY` for one AE title; beyond, the N-ACTION
is answered 0x0213 and the modality asks again.
Each report is counted in `qantara_dicom_commitment_reports_total{outcome}` by the replica that
settled it. Until 2026-11-30 the reports waited in the answering replica's memory, and a restart
dropped them.

The outgoing association is our own (`dicom.outbound`, a `dicom.association.Requestor` on the
event loop), as for a C-MOVE's destination: no thread, and a stop cancels an attempt in flight
at once. Until 2026-11-29 it was pynetdicom's, blocking in threads of its own, which could hold
the process's exit for about 30 s.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Final, Protocol

from pydicom.dataset import Dataset

from dicom import dimse, sop_classes, status
from dicom.commitment import CommitmentReport
from dicom.config import AeAddress
from dicom.identifier import IdentifierError, decode_identifier, encode_identifier
from dicom.outbound import Unreachable, open_association
from dicom.pdu import AssociateAccept, ProposedContext, RoleSelection
from ingest.group_tasks import GroupTasks
from monitoring.metrics import Metrics
from storage.commitment_reports import Backlog, QueuedReport

logger = logging.getLogger(__name__)

RETRY_DELAYS: Final = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0)
"""Seconds before each new attempt: a mobile unit whose 2G/3G link dropped gets its report when
it is back within about 3 hours 45 minutes (until 2026-11-29: 13 minutes, shorter than the
units' usual gaps in coverage); later, it asks again. The attempts are counted in the database:
a restart does not begin the schedule again."""
MAX_WAITING: Final = 10_000
"""Reports waiting in the database, all replicas together; a request beyond is refused."""
MAX_WAITING_PER_MODALITY: Final = 1000
"""Reports waiting for one AE title: a modality whose port never answers (a wrong address, a
unit off the road) and that keeps asking cannot take the whole queue from the others."""
MAX_IN_FLIGHT: Final = 16
"""Attempts one replica makes at a time."""
POLL_SECONDS: Final = 5.0
"""How often the queue is looked at when nothing wakes the delivery earlier (another replica's
reports, a lease that ran out)."""
STEPS_PER_ATTEMPT: Final = 6
"""An attempt's bound in steps of the report timeout (connect, associate, send, answer,
release, and one to spare); its lease is that and `LEASE_MARGIN` more."""
LEASE_MARGIN: Final = 30.0
_STORED_SYNTAX: Final = sop_classes.EXPLICIT_VR_LITTLE_ENDIAN
_CLASS: Final = sop_classes.STORAGE_COMMITMENT
_SYNTAXES: Final = (sop_classes.EXPLICIT_VR_LITTLE_ENDIAN, sop_classes.IMPLICIT_VR_LITTLE_ENDIAN)
_ROLE: Final = RoleSelection(_CLASS, scu=False, scp=True)
"""We ask for the SCP role: the Storage Commitment SCP is the one that sends the report."""


async def send_report(
    address: AeAddress,
    calling_ae: str,
    event_type: int,
    information: Dataset,
    step_timeout: float,
    max_pdu: int,
    tls: ssl.SSLContext | None = None,
) -> int | None:
    """One attempt: the N-EVENT-REPORT-RSP's status, or None when there was no association
    (unreachable, rejected, the SCP role refused) or no answer. Each step within
    `step_timeout`."""
    contexts = (ProposedContext(1, sop_classes.STORAGE_COMMITMENT, _SYNTAXES),)
    try:
        async with open_association(
            address,
            contexts,
            calling_ae=calling_ae,
            max_pdu=max_pdu,
            step_timeout=step_timeout,
            send_timeout=step_timeout,
            roles=(_ROLE,),
            tls=tls,
        ) as link:
            requestor = link.endpoint
            accepted = [(ts, requestor.accepted_context(_CLASS, ts)) for ts in _SYNTAXES]
            taken = [(syntax, context) for syntax, context in accepted if context is not None]
            if not taken or not _scp_granted(requestor.answer):
                logger.info(
                    "DICOM storage commitment report: %s refused the context or the role",
                    address.ae_title,
                )
                return None
            [(syntax, context), *_] = taken
            message_id = link.next_message_id()
            notice = dimse.event_report_request(
                message_id, _CLASS, sop_classes.STORAGE_COMMITMENT_INSTANCE, event_type
            )
            encoded = encode_identifier(information, syntax)
            await link.send(requestor.send_message(context, notice, encoded))
            answer = await link.response(dimse.N_EVENT_REPORT_RSP, message_id, step_timeout)
            return answer.status if isinstance(answer, dimse.Command) else None
    except Unreachable as exc:
        logger.info("DICOM storage commitment report: %s", exc)
        return None


def _scp_granted(answer: AssociateAccept | None) -> bool:
    """The modality let us take the SCP role of Storage Commitment (PS3.7 D.3.3.4): no answer
    item means the default roles, where the requestor is the SCU."""
    return answer is not None and any(
        role.sop_class == _CLASS and role.scp for role in answer.user_information.roles
    )


class ReportQueue(Protocol):
    """Where reports wait (`storage.commitment_reports.CommitmentReportQueue`); each method
    raises `StorageUnavailable` when the database cannot answer."""

    async def queue(
        self, ae_title: str, event_type: int, information: bytes, limit: int, per_ae: int
    ) -> bool: ...

    async def claim(self, limit: int, lease: float) -> list[QueuedReport]: ...

    async def retry(self, report_id: int, delay: float) -> None: ...

    async def release(self, report_ids: list[int]) -> None: ...

    async def remove(self, report_id: int) -> None: ...

    async def backlog(self) -> Backlog: ...


class Reports:
    """The reports on their way to the modalities' own ports: `queue` one, `run` delivers them
    (a task of the listener's group, with `open`); `close` cancels the attempts in flight and
    `release` hands their reports back to the queue."""

    def __init__(
        self,
        queue: ReportQueue,
        addresses: Callable[[str], AeAddress | None],
        calling_ae: str,
        timeout: float,
        max_pdu: int,
        metrics: Metrics,
        tls: Callable[[], ssl.SSLContext | None] = lambda: None,
    ) -> None:
        self._queue = queue
        self._addresses = addresses
        self._calling_ae = calling_ae
        self._timeout = timeout
        self._attempt_limit = STEPS_PER_ATTEMPT * timeout
        self._max_pdu = max_pdu
        self._tls = tls
        self._metrics = metrics
        self._deliveries = GroupTasks("dicom-commitment-report")
        self._in_flight: set[int] = set()  # claimed, and not yet settled
        self._wake = asyncio.Event()
        self._waiting = 0
        self._queue_down = False
        metrics.dicom_commitment_reports_pending.set_function(lambda: self._waiting)

    def open(self, group: asyncio.TaskGroup) -> None:
        self._deliveries.open(group)

    def close(self) -> None:
        """Cancel the attempts in flight (their associations are aborted)."""
        self._deliveries.close()

    async def release(self) -> None:
        """After `close`: the reports whose attempts were cancelled are due again at once, for
        whichever replica runs next, instead of when their lease would end."""
        abandoned = sorted(self._in_flight)
        self._in_flight.clear()
        if not abandoned:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._queue.release(abandoned)
        except Exception as exc:  # noqa: BLE001 - a stop goes on: the leases end on their own
            logger.warning(
                "DICOM storage commitment: %d report(s) in flight stay leased (%s)",
                len(abandoned),
                type(exc).__name__,
            )

    async def queue(self, ae_title: str, report: CommitmentReport) -> bool:
        """Commit `report` for `ae_title`'s own port; False when `MAX_WAITING` reports already
        wait, or `MAX_WAITING_PER_MODALITY` for it. Raises `StorageUnavailable`."""
        information = encode_identifier(report.information, _STORED_SYNTAX)
        queued = await self._queue.queue(
            ae_title, report.event_type, information, MAX_WAITING, MAX_WAITING_PER_MODALITY
        )
        if queued:
            self._wake.set()
        return queued

    async def run(self) -> None:
        """Claim the due reports and start their attempts, then wait for a new report, an
        attempt's end or the next due time (at most `POLL_SECONDS`). Never raises but for
        cancellation."""
        lease = self._attempt_limit + LEASE_MARGIN
        while True:
            self._wake.clear()
            wait = POLL_SECONDS
            try:
                free = MAX_IN_FLIGHT - len(self._deliveries)
                for report in await self._queue.claim(free, lease) if free > 0 else []:
                    self._in_flight.add(report.id)  # until settled; `release` if never
                    self._deliveries.start(self._attempt(report))
                backlog = await self._queue.backlog()
            except Exception as exc:  # noqa: BLE001 - the listener must outlive any of it
                self._down(exc)
            else:
                self._up()
                self._waiting = backlog.waiting
                if backlog.next_in is not None and len(self._deliveries) < MAX_IN_FLIGHT:
                    wait = min(wait, max(backlog.next_in, 0.05))
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _down(self, exc: Exception) -> None:
        if not self._queue_down:
            logger.warning(
                "DICOM storage commitment: the report queue cannot be read (%s); reports wait",
                type(exc).__name__,
            )
        self._queue_down = True

    def _up(self) -> None:
        if self._queue_down:
            logger.info("DICOM storage commitment: the report queue is readable again")
        self._queue_down = False

    async def _attempt(self, report: QueuedReport) -> None:
        """One attempt, then the row removed or its next attempt set. Never raises but for
        cancellation (a task of the listener's group)."""
        try:
            await self._settle(report)
        except Exception as exc:  # noqa: BLE001 - the row's lease brings it back
            logger.warning(
                "DICOM storage commitment report for %s: its outcome was not recorded (%s);"
                " it is tried again when its lease ends",
                report.ae_title,
                type(exc).__name__,
            )
        # Not reached when cancelled (a stop), even before the task's first step: the report
        # stays in flight for `release`.
        self._in_flight.discard(report.id)
        self._wake.set()

    async def _settle(self, report: QueuedReport) -> None:
        address = self._addresses(report.ae_title)
        if address is None:
            logger.warning(
                "DICOM storage commitment report for %s dropped: no longer in"
                " QANTARA_DICOM_REPORT_ADDRESSES",
                report.ae_title,
            )
            await self._queue.remove(report.id)
            self._metrics.dicom_commitment_reports.labels("dropped").inc()
            return
        try:
            information = decode_identifier(report.information, _STORED_SYNTAX)
        except IdentifierError:
            logger.error(
                "DICOM storage commitment report for %s dropped: unreadable", address.ae_title
            )
            await self._queue.remove(report.id)
            self._metrics.dicom_commitment_reports.labels("dropped").inc()
            return
        code = await self._send(address, report.event_type, information)
        if code == status.SUCCESS:
            logger.info(
                "DICOM storage commitment report taken by %s at %s:%d (attempt %d)",
                address.ae_title,
                address.host,
                address.port,
                report.attempt,
            )
            self._metrics.dicom_commitment_reports.labels("delivered").inc()
            await self._queue.remove(report.id)
            return
        what = "no association" if code is None else f"answered 0x{code:04X}"
        logger.warning(
            "DICOM storage commitment report to %s at %s:%d not taken (%s, attempt %d)",
            address.ae_title,
            address.host,
            address.port,
            what,
            report.attempt,
        )
        if report.attempt > len(RETRY_DELAYS):
            self._metrics.dicom_commitment_reports.labels("undelivered").inc()
            await self._queue.remove(report.id)
        else:
            await self._queue.retry(report.id, RETRY_DELAYS[report.attempt - 1])

    async def _send(self, address: AeAddress, event_type: int, information: Dataset) -> int | None:
        try:
            async with asyncio.timeout(self._attempt_limit):
                return await send_report(
                    address,
                    self._calling_ae,
                    event_type,
                    information,
                    self._timeout,
                    self._max_pdu,
                    self._tls(),
                )
        except (OSError, TimeoutError) as exc:  # the connection failed under the report
            logger.info("DICOM storage commitment report: %s", type(exc).__name__)
            return None
