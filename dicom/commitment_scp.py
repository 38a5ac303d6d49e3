"""Storage Commitment Push Model on the listener: the N-ACTION answered, then the report sent as an
N-EVENT-REPORT-RQ on the same association (PS3.4 J.3.3: the SCP may do so while the association
is open; it needs no role selection), or, for a modality named in
`QANTARA_DICOM_REPORT_ADDRESSES`, on an association to its own port (`dicom.commitment_delivery`).

The Action Information is read whole (at most `MAX_IDENTIFIER` bytes) in the context's transfer
syntax, the index is asked which of the instances it names (`Holder`), and only then is the
N-ACTION answered: Success, then the report at once, so that a modality waiting for it on this
association gets it; or a failure and no report (`dicom.status`: the Action Information cannot
be read, an Action Type other than 1, a Requested SOP Instance other than the well-known one,
the index unavailable). For a modality with a port of its own, Success waits until the report is
committed to the queue it is delivered from; that queue unavailable or full is 0x0213 too.
On the same association, the modality's N-EVENT-REPORT-RSP comes back as any other message and
is logged and counted by the listener (`report_answered`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from dicom import dimse, sop_classes, status
from dicom.association import Acceptor, CommandReceived
from dicom.commitment import (
    REQUEST_COMMITMENT,
    CommitmentError,
    read_request,
    report,
)
from dicom.commitment_delivery import Reports
from dicom.config import DicomSettings
from dicom.identifier import MAX_IDENTIFIER, IdentifierError, decode_identifier, encode_identifier
from dicom.link import Ended, Link
from ingest.errors import StorageUnavailable
from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)

Holder = Callable[[Sequence[str]], Awaitable[dict[str, str]]]
"""SOP Instance UIDs → the SOP Class UID of those the index names
(`storage.dicom_queries.held_instances`)."""

_RESULTS = {
    status.NO_SUCH_OBJECT_INSTANCE: "no_such_instance",
    status.CLASS_INSTANCE_CONFLICT: "class_conflict",
}


async def answer_commitment(
    link: Link[Acceptor],
    event: CommandReceived,
    holder: Holder,
    settings: DicomSettings,
    metrics: Metrics,
    calling: str,
    reports: Reports,
) -> Ended | None:
    """Receive an N-ACTION's Action Information, answer it and send the report; what ended the
    association while the Action Information was read, else None."""
    command = event.command
    data, ended = await link.receive_whole(command, MAX_IDENTIFIER, settings.dimse_timeout)
    if ended is not None:
        return ended

    async def answer(code: int, comment: str | None = None) -> None:
        response = dimse.action_response(command, code, comment)
        await link.send(link.endpoint.send_message(event.context_id, response))

    try:
        if command.action_type != REQUEST_COMMITMENT:
            raise CommitmentError("Action Type ID is not 1", status.NO_SUCH_ACTION)
        if command.requested_sop_instance != sop_classes.STORAGE_COMMITMENT_INSTANCE:
            raise CommitmentError("not the well-known SOP Instance", status.INVALID_OBJECT_INSTANCE)
        if data is None:  # none, or longer than MAX_IDENTIFIER
            raise CommitmentError("no Action Information")
        try:
            information = decode_identifier(data, event.transfer_syntax)
        except IdentifierError as exc:
            raise CommitmentError("Action Information cannot be decoded") from exc
        request = read_request(information)
    except CommitmentError as exc:
        logger.info("DICOM storage commitment from %s refused: %s", calling, exc.detail)
        await answer(exc.status, exc.detail)
        return None
    try:
        async with asyncio.timeout(settings.store_timeout):
            held = await holder(request.instance_uids)
    except (StorageUnavailable, TimeoutError):
        logger.warning("DICOM storage commitment from %s: the index is unavailable", calling)
        await answer(status.RESOURCE_LIMITATION, "index unavailable")
        return None
    result = report(request, held)
    own = settings.report_address(calling) is not None
    if own:
        try:
            async with asyncio.timeout(settings.store_timeout):
                queued = await reports.queue(calling, result)
        except (StorageUnavailable, TimeoutError):
            logger.warning(
                "DICOM storage commitment from %s: the report queue is unavailable", calling
            )
            await answer(status.RESOURCE_LIMITATION, "report queue unavailable")
            return None
        if not queued:
            logger.warning(
                "DICOM storage commitment from %s refused: the report queue is full", calling
            )
            metrics.dicom_commitment_reports.labels("dropped").inc()
            await answer(status.RESOURCE_LIMITATION, "too many reports waiting")
            return None
    await answer(status.SUCCESS)
    metrics.dicom_commitments.labels("committed").inc(result.committed)
    for reason, count in result.failed.items():
        metrics.dicom_commitments.labels(_RESULTS[reason]).inc(count)
    if own:
        where = "report queued for its port"
    else:
        message_id = link.next_message_id()
        notice = dimse.event_report_request(
            message_id,
            sop_classes.STORAGE_COMMITMENT,
            sop_classes.STORAGE_COMMITMENT_INSTANCE,
            result.event_type,
        )
        information_bytes = encode_identifier(result.information, event.transfer_syntax)
        await link.send(link.endpoint.send_message(event.context_id, notice, information_bytes))
        where = f"report {message_id}"
    logger.info(
        "DICOM storage commitment for %s: %d of %d instance(s) committed (%s)",
        calling,
        result.committed,
        len(request.references),
        where,
    )
    return None


def report_answered(command: dimse.Command, calling: str, metrics: Metrics) -> None:
    """The modality's N-EVENT-REPORT-RSP to a report: logged (a failure as a warning) and
    counted."""
    code = command.status if command.status is not None else -1
    if code == status.SUCCESS:
        metrics.dicom_commitment_reports.labels("delivered").inc()
        logger.info("DICOM storage commitment report %s taken by %s", command.responded_to, calling)
    else:
        metrics.dicom_commitment_reports.labels("refused").inc()
        logger.warning(
            "DICOM storage commitment report %s answered 0x%04X by %s",
            command.responded_to,
            code,
            calling,
        )
