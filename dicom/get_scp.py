"""C-GET, Patient Root and Study Root, at the PATIENT, STUDY, SERIES and IMAGE levels: the
instances the identifier names, sent back on the same association as C-STORE sub-operations.

The identifier is read whole and its unique keys (`dicom.retrieve.retrieve_keys`) looked up in the
index (`storage.dicom_queries.retrievable`, at most `MAX_RETRIEVE` instances). Each instance goes
as it was received, never transcoded: on a presentation context the peer proposed for its SOP class
and its stored transfer syntax, with the SCP role for that class (role selection); with none, the
sub-operation fails and the others go on. Its file is read in the listener's file workers, a MiB at
a time, one read ahead of the send, and sent as P-DATA-TF within the peer's maximum length: a 1 GB
instance is never in memory. After each sub-operation's C-STORE-RSP a Pending C-GET-RSP gives the
counts; a C-CANCEL-RQ stops before the next one (Cancel, the UIDs not sent listed as failed). A file
that cannot be opened or is shorter than the index says fails its sub-operation before any byte of
it is sent; a read error in the middle of one aborts the association (a DIMSE message cannot be
cut). Before the first sub-operation, an audit row (`storage.audit`, protocol "dicom") names the
calling AE title, the patients and the level, and is committed: no instance leaves without it.
The database unavailable (the lookup or that row) or more matches than the bound: 0xA701; a peer
that does not answer a sub-operation within the DIMSE timeout: A-ABORT.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from dicom import dimse, status
from dicom.association import CommandReceived, DatasetComplete, DatasetFragment, ProtocolError
from dicom.config import DicomSettings
from dicom.filemeta import dataset_offset
from dicom.identifier import MAX_IDENTIFIER, IdentifierError, decode_identifier, encode_identifier
from dicom.link import Ended, Link
from dicom.retrieve import Progress, RetrieveError, retrieve_keys
from ingest.errors import StorageUnavailable
from monitoring.metrics import Metrics
from storage.audit import OUTCOME_SUCCESS, AuditEntry
from storage.dicom_queries import FindRequestError, RetrievableInstance, RetrieveKeys

logger = logging.getLogger(__name__)

Locator = Callable[[RetrieveKeys, int], Awaitable[list[RetrievableInstance]]]
"""Looks the instances of a C-GET up in the index (`storage.dicom_queries.retrievable`)."""
Auditor = Callable[[AuditEntry], Awaitable[object]]
"""Writes and commits an audit row (`storage.audit.record_access`)."""
Work = Callable[..., Awaitable[Any]]
"""Runs a blocking file step in the listener's file workers: `work(function, *args)`."""

MAX_RETRIEVE: Final = 10_000
"""Instances one C-GET may name; beyond, 0xA701 (retrieve series by series, or studies)."""
READ_CHUNK: Final = 1 << 20
_HEAD: Final = 4096  # holds the preamble and any File Meta Information the listener writes


class _Unreadable(Exception):
    """The instance's file cannot be sent (missing, unreadable, shorter than indexed)."""


async def answer_get(
    link: Link,
    event: CommandReceived,
    locator: Locator,
    auditor: Auditor,
    work: Work,
    store_root: Path,
    settings: DicomSettings,
    metrics: Metrics,
    calling: str,
) -> Ended | None:
    """Answer one C-GET-RQ; what ended the association meanwhile, else None."""
    command = event.command
    data, ended = await link.receive_whole(command, MAX_IDENTIFIER, settings.dimse_timeout)
    if ended is not None:
        return ended

    async def fail(code: int, comment: str) -> None:
        response = dimse.get_response(command, code, (None, 0, 0, 0), error_comment=comment)
        await link.send(link.acceptor.send_message(event.context_id, response))

    try:
        if data is None:  # none, or longer than MAX_IDENTIFIER
            raise RetrieveError("no identifier")
        keys = retrieve_keys(decode_identifier(data, event.transfer_syntax), event.abstract_syntax)
    except RetrieveError as exc:
        logger.info("DICOM C-GET from %s refused: %s", calling, exc)
        await fail(status.GET_IDENTIFIER_INVALID, str(exc))
        return None
    except (IdentifierError, ValueError, TypeError, AttributeError, KeyError):
        logger.info("DICOM C-GET from %s refused: identifier cannot be decoded", calling)
        await fail(status.GET_IDENTIFIER_INVALID, "identifier cannot be decoded")
        return None
    try:
        async with asyncio.timeout(settings.store_timeout):
            instances = await locator(keys, MAX_RETRIEVE)
            if 0 < len(instances) <= MAX_RETRIEVE:
                await auditor(_audit_entry(calling, keys, instances))
    except FindRequestError as exc:
        await fail(status.GET_IDENTIFIER_INVALID, str(exc))
        return None
    except (StorageUnavailable, TimeoutError):
        logger.warning("DICOM C-GET from %s: the index is unavailable", calling)
        await fail(status.GET_TOO_MANY_MATCHES, "index unavailable")
        return None
    if len(instances) > MAX_RETRIEVE:
        logger.info("DICOM C-GET from %s refused: more than %d instances", calling, MAX_RETRIEVE)
        await fail(status.GET_TOO_MANY_MATCHES, f"more than {MAX_RETRIEVE} instances match")
        return None
    return await _sub_operations(
        link, event, instances, work, store_root, settings, metrics, calling
    )


def _audit_entry(
    calling: str, keys: RetrieveKeys, instances: list[RetrievableInstance]
) -> AuditEntry:
    """The audit row written before the first sub-operation: who, which patients, at which
    level and how many instances (no UID, no value of the identifier)."""
    return AuditEntry(
        token_name=calling,
        action="read",
        resource_type="ImagingStudy",
        query_shape=f"C-GET {keys.level}, {len(instances)} instance(s)",
        patient_ids=tuple(sorted({i.patient for i in instances if i.patient is not None})),
        outcome=OUTCOME_SUCCESS,
        status=status.PENDING,
        protocol="dicom",
    )


async def _sub_operations(
    link: Link,
    event: CommandReceived,
    instances: list[RetrievableInstance],
    work: Work,
    store_root: Path,
    settings: DicomSettings,
    metrics: Metrics,
    calling: str,
) -> Ended | None:
    command = event.command
    progress = Progress(len(instances))
    cancelled: list[str] = []
    for n, instance in enumerate(instances):
        if link.cancelled(command.message_id or 0):
            cancelled = [i.sop_instance_uid for i in instances[n:]]
            break
        uid = instance.sop_instance_uid
        context = link.acceptor.storage_context(instance.sop_class_uid, instance.transfer_syntax)
        if context is None:
            progress.not_sent(uid)
            metrics.dicom_retrieved.labels("failed").inc()
        else:
            message_id = link.next_message_id()
            request = dimse.store_request(
                message_id, instance.sop_class_uid, uid, command.priority or 0
            )
            try:
                await _send_file(
                    link, context, request, store_root / instance.file_path, work, metrics
                )
            except _Unreadable as exc:
                logger.warning("DICOM C-GET: a stored file cannot be sent: %s", exc)
                progress.not_sent(uid)
                metrics.dicom_retrieved.labels("failed").inc()
            else:
                answer = await _store_response(link, message_id, settings.dimse_timeout)
                if not isinstance(answer, dimse.Command):
                    return answer
                metrics.dicom_retrieved.labels(progress.answered(uid, answer.status)).inc()
        if n + 1 < len(instances):
            await link.send(link.acceptor.send_message(event.context_id, progress.pending(command)))
    metrics.dicom_retrieved.labels("cancelled").inc(len(cancelled))
    response, identifier = progress.final(command, cancelled)
    encoded = None if identifier is None else encode_identifier(identifier, event.transfer_syntax)
    await link.send(link.acceptor.send_message(event.context_id, response, encoded))
    logger.info(
        "DICOM C-GET from %s: %d instance(s), %d completed, %d warning, %d failed, %d cancelled",
        calling,
        len(instances),
        progress.completed,
        progress.warning,
        progress.failed,
        len(cancelled),
    )
    return None


async def _send_file(
    link: Link, context: int, request: dimse.Command, path: Path, work: Work, metrics: Metrics
) -> None:
    """The C-STORE-RQ and the dataset of the file at `path`, read one chunk ahead of the send.
    Raises `_Unreadable` before anything is sent; a read error after the command is sent raises
    `OSError` (the association can only be aborted)."""
    try:
        fd: int = await work(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _Unreadable(f"open failed: {type(exc).__name__}") from exc
    reading: asyncio.Future[bytes] | None = None
    try:
        try:
            head: bytes = await work(os.pread, fd, _HEAD, 0)
            size = os.fstat(fd).st_size
            position = dataset_offset(head)
        except (OSError, ValueError) as exc:
            raise _Unreadable(f"header unreadable: {type(exc).__name__}") from exc
        await link.send(link.acceptor.send_command(context, request))
        if position >= size:
            await link.send(link.acceptor.send_fragment(context, b"", last=True))
            return
        reading = asyncio.ensure_future(work(os.pread, fd, READ_CHUNK, position))
        while reading is not None:
            # Shielded: a cancelled association must not close the file under a running read.
            chunk = await asyncio.shield(reading)
            if not chunk:
                raise OSError("the file ended before its size")
            position += len(chunk)
            last = position >= size
            reading = (
                None if last else asyncio.ensure_future(work(os.pread, fd, READ_CHUNK, position))
            )
            await link.send(link.acceptor.send_fragment(context, chunk, last))
            metrics.dicom_retrieved_bytes.inc(len(chunk))
    finally:
        if reading is None or reading.done():
            os.close(fd)
        else:  # the read ahead is still running in a worker: close once it has ended
            reading.add_done_callback(lambda _: os.close(fd))


async def _store_response(link: Link, message_id: int, within: float) -> dimse.Command | Ended:
    """The peer's C-STORE-RSP to our request `message_id`, or what ended the association (a
    request of its own other than C-CANCEL breaks "one operation at a time": A-ABORT)."""
    while True:
        event = await link.next_event(within)
        if isinstance(event, DatasetFragment | DatasetComplete):
            continue
        if not isinstance(event, CommandReceived):
            return event
        received = event.command
        if received.command_field == dimse.C_STORE_RSP and received.responded_to == message_id:
            return received
        if received.command_field == dimse.C_CANCEL_RQ:
            continue  # noted by the link; the C-GET stops before its next sub-operation
        detail = "unexpected message during a C-GET sub-operation"
        return ProtocolError(detail, link.acceptor.abort())
