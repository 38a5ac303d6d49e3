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

The outgoing association is pynetdicom's (blocking, in a thread), imported at the first report:
it was written when the listener's own upper layer was an acceptor only, and a report is one
short association now and then. (C-MOVE's association to its destination uses our own
`dicom.association.Requestor` since; moving the reports to it is left for later.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom import sop_classes, status
from dicom.commitment import CommitmentReport
from dicom.config import AeAddress
from ingest.group_tasks import GroupTasks
from monitoring.metrics import Metrics
from monitoring.thread_names import name_native_thread

logger = logging.getLogger(__name__)

RETRY_DELAYS: Final = (5.0, 30.0, 120.0, 600.0)
"""Seconds before each new attempt: a unit whose link dropped gets its report when it is back
within about 13 minutes; later, it asks again."""
MAX_PENDING: Final = 1000
SENDING_THREADS: Final = 4
"""Attempts in flight at once, in threads of their own: an unreachable modality holds one for
up to its timeouts, and must not hold up the loop's default executor."""


def send_report(
    address: AeAddress, calling_ae: str, report: CommitmentReport, timeout: float
) -> int | None:
    """One attempt, blocking: the N-EVENT-REPORT-RSP's status, or None when no association or
    no answer."""
    # Imported here: pynetdicom adds 7 MiB to a gateway that never reports this way.
    from pynetdicom import AE, build_role

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(
        sop_classes.STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    role = build_role(sop_classes.STORAGE_COMMITMENT, scp_role=True)
    assoc = ae.associate(address.host, address.port, ae_title=address.ae_title, ext_neg=[role])
    if not assoc.is_established:
        return None
    try:
        answer, _ = assoc.send_n_event_report(
            report.information,
            report.event_type,
            sop_classes.STORAGE_COMMITMENT,
            sop_classes.STORAGE_COMMITMENT_INSTANCE,
        )
        return int(answer.Status) if isinstance(answer, Dataset) and "Status" in answer else None
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()


class Reports:
    """The reports on their way to the modalities' own ports; `open` with the listener's task
    group, `close` when it stops (the pending ones are dropped)."""

    def __init__(self, calling_ae: str, timeout: float, metrics: Metrics) -> None:
        self._calling_ae = calling_ae
        self._timeout = timeout
        self._metrics = metrics
        self._deliveries = GroupTasks("dicom-commitment-report")
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None

    def open(self, group: asyncio.TaskGroup) -> None:
        self._deliveries.open(group)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            SENDING_THREADS, thread_name_prefix="dicom-report", initializer=name_native_thread
        )

    def close(self) -> None:
        self._deliveries.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)  # attempts end on timeouts
            self._threads = None

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
            threads = self._threads
            if threads is None:  # closed meanwhile
                return
            loop = asyncio.get_running_loop()
            try:
                code = await loop.run_in_executor(
                    threads, send_report, address, self._calling_ae, report, self._timeout
                )
            except Exception as exc:  # noqa: BLE001 - pynetdicom's errors: try again later
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
