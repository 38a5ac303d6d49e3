"""Storage Commitment reports on an association of the modality's own (PS3.4 J.3.3).

Many modalities release the association right after the N-ACTION-RSP and wait for the report on
a port of their own: those named in `QANTARA_DICOM_REPORT_ADDRESSES` (`AE=host:port`). The
gateway then opens an association to that address, calling it by its AE title, with the Storage
Commitment Push Model context and the SCP role for itself (SCP/SCU Role Selection: the
association's requestor performs the N-EVENT-REPORT), sends the report and releases.

`Reports` runs each delivery as a task of the listener's group: at once, then again after
`RETRY_DELAYS` while the modality is unreachable or answers with a failure; at most
`MAX_PENDING` at a time (beyond, a report is dropped with a warning: the modality keeps its
images and asks again). A delivery still pending when the gateway stops is dropped the same way.
Each report is counted in `qantara_dicom_commitment_reports_total{outcome}`.

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
from typing import Final

from dicom import dimse, sop_classes, status
from dicom.commitment import CommitmentReport
from dicom.config import AeAddress
from dicom.identifier import encode_identifier
from dicom.outbound import Unreachable, open_association
from dicom.pdu import AssociateAccept, ProposedContext, RoleSelection
from ingest.group_tasks import GroupTasks
from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)

RETRY_DELAYS: Final = (5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0)
"""Seconds before each new attempt: a mobile unit whose 2G/3G link dropped gets its report when
it is back within about 3 hours 45 minutes (until 2026-11-29: 13 minutes, shorter than the
units' usual gaps in coverage); later, it asks again. Pending reports are in memory: a restart
drops them."""
MAX_PENDING: Final = 1000
_CLASS: Final = sop_classes.STORAGE_COMMITMENT
_SYNTAXES: Final = (sop_classes.EXPLICIT_VR_LITTLE_ENDIAN, sop_classes.IMPLICIT_VR_LITTLE_ENDIAN)
_ROLE: Final = RoleSelection(_CLASS, scu=False, scp=True)
"""We ask for the SCP role: the Storage Commitment SCP is the one that sends the report."""


async def send_report(
    address: AeAddress,
    calling_ae: str,
    report: CommitmentReport,
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
                message_id, _CLASS, sop_classes.STORAGE_COMMITMENT_INSTANCE, report.event_type
            )
            information = encode_identifier(report.information, syntax)
            await link.send(requestor.send_message(context, notice, information))
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


class Reports:
    """The reports on their way to the modalities' own ports; `open` with the listener's task
    group, `close` when it stops (the pending ones are dropped)."""

    def __init__(
        self,
        calling_ae: str,
        timeout: float,
        max_pdu: int,
        metrics: Metrics,
        tls: Callable[[], ssl.SSLContext | None] = lambda: None,
    ) -> None:
        self._calling_ae = calling_ae
        self._timeout = timeout
        self._max_pdu = max_pdu
        self._tls = tls
        self._metrics = metrics
        self._deliveries = GroupTasks("dicom-commitment-report")
        metrics.dicom_commitment_reports_pending.set_function(lambda: len(self._deliveries))

    def open(self, group: asyncio.TaskGroup) -> None:
        self._deliveries.open(group)

    def close(self) -> None:
        """Drop the reports on their way: their tasks are cancelled, their associations
        aborted."""
        self._deliveries.close()

    def deliver(self, address: AeAddress, report: CommitmentReport) -> bool:
        """Start delivering `report` to `address`; False when it cannot be (stopping, or
        `MAX_PENDING` reports already on their way)."""
        if len(self._deliveries) >= MAX_PENDING:
            why = f"{MAX_PENDING} reports pending"
        elif self._deliveries.start(self._deliver(address, report)):
            return True
        else:
            why = "stopping"
        logger.warning("DICOM storage commitment report for %s dropped: %s", address.ae_title, why)
        self._metrics.dicom_commitment_reports.labels("dropped").inc()
        return False

    async def _deliver(self, address: AeAddress, report: CommitmentReport) -> None:
        """Attempts until the modality answers Success or the delays run out. Never raises but
        for cancellation: a task of the listener's group."""
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS), start=1):
            if delay:
                await asyncio.sleep(delay)
            try:
                code = await send_report(
                    address, self._calling_ae, report, self._timeout, self._max_pdu, self._tls()
                )
            except OSError as exc:  # the connection failed under the report: try again later
                logger.info("DICOM storage commitment report: %s", type(exc).__name__)
                code = None
            if code == status.SUCCESS:
                logger.info(
                    "DICOM storage commitment report taken by %s at %s:%d (attempt %d)",
                    address.ae_title,
                    address.host,
                    address.port,
                    attempt,
                )
                self._metrics.dicom_commitment_reports.labels("delivered").inc()
                return
            what = "no association" if code is None else f"answered 0x{code:04X}"
            logger.warning(
                "DICOM storage commitment report to %s at %s:%d not taken (%s, attempt %d)",
                address.ae_title,
                address.host,
                address.port,
                what,
                attempt,
            )
        self._metrics.dicom_commitment_reports.labels("undelivered").inc()
