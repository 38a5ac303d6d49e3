"""C-GET and C-MOVE, Patient Root and Study Root, at the PATIENT, STUDY, SERIES and IMAGE levels:
the instances the identifier names, sent as C-STORE sub-operations, on the same association (C-GET)
or on one the gateway opens to the Move Destination (C-MOVE).

The identifier is read whole and its unique keys (`dicom.retrieve.retrieve_keys`) looked up in the
index (`storage.dicom_queries.retrievable`, at most `MAX_RETRIEVE` instances). A C-MOVE's
destination must be one of `QANTARA_DICOM_MOVE_DESTINATIONS` (else 0xA801, before any lookup):
the gateway never sends images to an address a request names. Before the first sub-operation, an
audit row (`storage.audit`, protocol "dicom") names the calling AE title, the patients, the level
and, for a C-MOVE, the destination, and is committed: no instance leaves without it.

Each instance goes as it was received (`dicom.stored_sender`): for a C-GET on a presentation
context the peer proposed for its SOP class and stored transfer syntax with the SCP role for that
class (role selection); for a C-MOVE on the context the destination accepted for that pair. With
none, an instance stored in one little-endian uncompressed syntax goes converted to the other if
a context takes it (`dicom.syntax_conversion`); else its sub-operation fails and the others go on.
After each sub-operation's C-STORE-RSP a Pending response gives the counts; a C-CANCEL-RQ stops
before the next one (Cancel, the UIDs not sent listed as failed). A file that cannot be opened,
read or converted fails its sub-operation before any byte of it is sent. A destination that
cannot be reached, or that goes away, fails the sub-operations left; the C-MOVE's own
association goes on. The database unavailable (the lookup or the audit row) or more matches than
the bound: 0xA701. On a C-GET's own association, a peer that does not answer a sub-operation
within the DIMSE timeout, or a read error in the middle of an instance, ends it with an A-ABORT.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dicom import dimse, sop_classes, status
from dicom.association import Acceptor, CommandReceived
from dicom.audit import Auditor, read_entry, transferred_entry
from dicom.config import AeAddress, DicomSettings
from dicom.identifier import MAX_IDENTIFIER, IdentifierError, decode_identifier, encode_identifier
from dicom.link import Ended, Link
from dicom.outbound import Unreachable, open_association, proposed_contexts
from dicom.retrieve import Progress, RetrieveError, retrieve_keys
from dicom.stored_sender import StoredFile, Unreadable, Work, send_stored
from dicom.syntax_conversion import alternatives
from ingest.errors import StorageUnavailable
from monitoring.metrics import Metrics
from storage.dicom_queries import FindRequestError, RetrievableInstance, RetrieveKeys

logger = logging.getLogger(__name__)

Locator = Callable[[RetrieveKeys, int], Awaitable[list[RetrievableInstance]]]
"""Looks the instances of a retrieve up in the index (`storage.dicom_queries.retrievable`)."""

MAX_RETRIEVE: Final = 10_000
"""Instances one C-GET or C-MOVE may name; beyond, 0xA701 (retrieve series by series)."""


@dataclass(frozen=True, slots=True)
class Retrieval:
    """What a retrieve needs of the listener: the index, the audit trail, the file workers and
    the store's folder."""

    locator: Locator
    auditor: Auditor
    work: Work
    store_root: Path
    outbound_tls: Callable[[], ssl.SSLContext | None] = lambda: None
    """The client context of the associations to `tls://` C-MOVE destinations, as of now
    (SIGHUP reads its files again)."""


@dataclass(frozen=True, slots=True)
class _Target:
    """Where the C-STOREs go: the link, how to find the context of a (SOP class, transfer
    syntax), and the originator fields of a C-MOVE's sub-operations."""

    link: Link[Any]
    context_for: Callable[[str, str], int | None]
    originator: tuple[str, int] | None = None


async def answer_retrieve(
    link: Link[Acceptor],
    event: CommandReceived,
    retrieval: Retrieval,
    settings: DicomSettings,
    metrics: Metrics,
    calling: str,
) -> Ended | None:
    """Answer one C-GET-RQ or C-MOVE-RQ; what ended the association meanwhile, else None."""
    command = event.command
    operation = "C-MOVE" if command.command_field == dimse.C_MOVE_RQ else "C-GET"
    data, ended = await link.receive_whole(command, MAX_IDENTIFIER, settings.dimse_timeout)
    if ended is not None:
        return ended

    async def fail(code: int, comment: str) -> None:
        response = dimse.retrieve_response(command, code, (None, 0, 0, 0), error_comment=comment)
        await link.send(link.endpoint.send_message(event.context_id, response))

    try:
        if data is None:  # none, or longer than MAX_IDENTIFIER
            raise RetrieveError("no identifier")
        keys = retrieve_keys(decode_identifier(data, event.transfer_syntax), event.abstract_syntax)
    except RetrieveError as exc:
        logger.info("DICOM %s from %s refused: %s", operation, calling, exc)
        await fail(status.GET_IDENTIFIER_INVALID, str(exc))
        return None
    except (IdentifierError, ValueError, TypeError, AttributeError, KeyError):
        logger.info("DICOM %s from %s refused: identifier cannot be decoded", operation, calling)
        await fail(status.GET_IDENTIFIER_INVALID, "identifier cannot be decoded")
        return None
    address: AeAddress | None = None
    if operation == "C-MOVE":
        address = settings.move_destination((command.move_destination or "").strip())
        if address is None:
            logger.info("DICOM C-MOVE from %s refused: destination not configured", calling)
            await fail(status.MOVE_DESTINATION_UNKNOWN, "move destination unknown")
            return None
    to = f" to {address.ae_title}" if address is not None else ""
    what = f"{operation} {keys.level}{to}"  # the audit rows' shape: no UID, no value
    try:
        async with asyncio.timeout(settings.store_timeout):
            instances = await retrieval.locator(keys, MAX_RETRIEVE)
            if 0 < len(instances) <= MAX_RETRIEVE:
                shape = f"{what}, {len(instances)} instance(s)"
                await retrieval.auditor(read_entry(calling, "read", shape, _patients(instances)))
    except FindRequestError as exc:
        await fail(status.GET_IDENTIFIER_INVALID, str(exc))
        return None
    except (StorageUnavailable, TimeoutError):
        logger.warning("DICOM %s from %s: the index is unavailable", operation, calling)
        await fail(status.GET_TOO_MANY_MATCHES, "index unavailable")
        return None
    if len(instances) > MAX_RETRIEVE:
        logger.info("DICOM %s from %s refused: too many instances", operation, calling)
        await fail(status.GET_TOO_MANY_MATCHES, f"more than {MAX_RETRIEVE} instances match")
        return None
    progress = Progress(len(instances))

    async def record_end(cancelled: list[str] | None) -> None:
        if instances:  # committed before the final response, as the first row before the data
            patients = _patients(instances)
            await _record_end(retrieval, settings, calling, what, patients, progress, cancelled)

    try:
        ended, cancelled = await _transfer(
            link, event, instances, address, progress, retrieval, settings, metrics, calling
        )
    except Exception:
        await record_end(None)
        raise
    await record_end(None if ended is not None else cancelled)
    if ended is not None:
        return ended
    metrics.dicom_retrieved.labels("cancelled").inc(len(cancelled))
    response, identifier = progress.final(command, cancelled)
    encoded = None if identifier is None else encode_identifier(identifier, event.transfer_syntax)
    await link.send(link.endpoint.send_message(event.context_id, response, encoded))
    logger.info(
        "DICOM %s from %s%s: %d instance(s), %d completed, %d warning, %d failed, %d cancelled",
        operation,
        calling,
        f" to {address.ae_title}" if address else "",
        len(instances),
        progress.completed,
        progress.warning,
        progress.failed,
        len(cancelled),
    )
    return None


async def _transfer(
    link: Link[Acceptor],
    event: CommandReceived,
    instances: list[RetrievableInstance],
    address: AeAddress | None,
    progress: Progress,
    retrieval: Retrieval,
    settings: DicomSettings,
    metrics: Metrics,
    calling: str,
) -> tuple[Ended | None, list[str]]:
    """The sub-operations, on the requester's association (C-GET) or on one to `address`
    (C-MOVE): what ended the requester's association (None: it goes on), and the UIDs a
    C-CANCEL left unsent."""
    if address is None or not instances:
        target = _Target(link, link.endpoint.storage_context)
        return await _sub_operations(
            link, event, instances, target, progress, retrieval, settings, metrics
        )
    ended: Ended | None = None
    cancelled: list[str] = []
    pairs = [(i.sop_class_uid, i.transfer_syntax) for i in instances]
    try:
        async with open_association(
            address,
            proposed_contexts(pairs),
            calling_ae=settings.ae_title,
            max_pdu=settings.max_pdu,
            step_timeout=settings.acse_timeout,
            send_timeout=settings.dimse_timeout,
            tls=retrieval.outbound_tls(),
        ) as moving:
            originator = (calling, event.command.message_id or 0)
            target = _Target(moving, moving.endpoint.accepted_context, originator)
            ended, cancelled = await _sub_operations(
                link, event, instances, target, progress, retrieval, settings, metrics
            )
    except Unreachable as exc:
        logger.warning("DICOM C-MOVE to %s failed: %s", address.ae_title, exc)
    if ended is None and not cancelled:  # those not attempted: the destination unreachable or gone
        for instance in instances[progress.total - progress.remaining :]:
            metrics.dicom_retrieved.labels(progress.not_sent(instance.sop_instance_uid)).inc()
    return ended, cancelled


async def _record_end(
    retrieval: Retrieval,
    settings: DicomSettings,
    calling: str,
    what: str,
    patients: list[int],
    progress: Progress,
    cancelled: list[str] | None,
) -> None:
    """The audit row of the transfer's end (DCM 110104 "DICOM Instances Transferred"): the counts
    and the final status, or, `cancelled` None, that the requester's association ended first.
    Committed before the final response; a database unavailable then is logged, and the response
    goes: the row of its beginning was committed before the first instance went."""
    if cancelled is None:
        code = (
            status.GET_SOME_FAILED
            if progress.completed + progress.warning
            else status.GET_SUB_OPERATIONS_FAILED
        )
        how = ", the association ended"
        left = 0
    else:
        code = progress.final_status(cancelled)
        how = ""
        left = len(cancelled)
    shape = (
        f"{what}: {progress.completed} completed, {progress.warning} warning,"
        f" {progress.failed} failed, {left} cancelled{how}"
    )
    try:
        async with asyncio.timeout(settings.store_timeout):
            await retrieval.auditor(transferred_entry(calling, shape, patients, code))
    except (StorageUnavailable, TimeoutError):
        logger.warning("DICOM %s from %s: the audit row of its end was not written", what, calling)


def _patients(instances: list[RetrievableInstance]) -> list[int]:
    """The patients whose instances a retrieve sends (the audit rows')."""
    return [i.patient for i in instances if i.patient is not None]


async def _sub_operations(
    origin: Link[Acceptor],
    event: CommandReceived,
    instances: list[RetrievableInstance],
    target: _Target,
    progress: Progress,
    retrieval: Retrieval,
    settings: DicomSettings,
    metrics: Metrics,
) -> tuple[Ended | None, list[str]]:
    """Send the instances to `target`, counting them in `progress`, a Pending response to
    `origin` after each but the last. Returns what ended `origin` (None: it goes on) and the
    UIDs not sent because of a C-CANCEL. A C-MOVE's destination that goes away stops the loop:
    the instances not attempted are left for the caller to fail."""
    command = event.command
    own = target.link is origin
    for n, instance in enumerate(instances):
        if origin.cancelled(command.message_id or 0):
            return None, [i.sop_instance_uid for i in instances[n:]]
        if origin.closed and not own:  # the requester of a C-MOVE is gone: stop moving
            logger.info("DICOM C-MOVE: the requester went away; the move stops")
            return None, []
        uid = instance.sop_instance_uid
        context, conversion = _context(target, instance)
        if context is None:
            metrics.dicom_retrieved.labels(progress.not_sent(uid)).inc()
        else:
            message_id = target.link.next_message_id()
            request = dimse.store_request(
                message_id, instance.sop_class_uid, uid, command.priority or 0, target.originator
            )
            stored = StoredFile(retrieval.store_root / instance.file_path, instance.size)
            try:
                await send_stored(
                    target.link, context, request, stored, retrieval.work, metrics, conversion
                )
            except Unreadable as exc:
                logger.warning("DICOM retrieve: a stored file cannot be sent: %s", exc)
                metrics.dicom_retrieved.labels(progress.not_sent(uid)).inc()
            except (OSError, TimeoutError) as exc:
                if own:
                    raise
                logger.warning("DICOM C-MOVE: the destination stopped: %s", type(exc).__name__)
                metrics.dicom_retrieved.labels(progress.not_sent(uid)).inc()
                return None, []
            else:
                answer = await target.link.response(
                    dimse.C_STORE_RSP, message_id, settings.dimse_timeout
                )
                if not isinstance(answer, dimse.Command):
                    if own:
                        return answer, []
                    logger.warning("DICOM C-MOVE: the destination ended the association")
                    metrics.dicom_retrieved.labels(progress.not_sent(uid)).inc()
                    return None, []
                metrics.dicom_retrieved.labels(progress.answered(uid, answer.status)).inc()
        if n + 1 < len(instances):
            pending = progress.pending(command)
            await origin.send(origin.endpoint.send_message(event.context_id, pending))
    return None, []


def _context(
    target: _Target, instance: RetrievableInstance
) -> tuple[int | None, tuple[str, str] | None]:
    """The context to send `instance` on, and the conversion it needs (None: as stored): a
    context in its stored transfer syntax first, else one in a syntax it converts to."""
    stored = instance.transfer_syntax
    for syntax in alternatives(stored, instance.size):
        context = target.context_for(instance.sop_class_uid, syntax)
        if context is not None:
            return context, None if syntax == stored else (stored, syntax)
    return None, None


def retrieves(command: dimse.Command, abstract_syntax: str) -> bool:
    """A C-GET-RQ or C-MOVE-RQ on a context of its own information model."""
    if command.command_field == dimse.C_GET_RQ:
        return abstract_syntax in sop_classes.GET_MODELS
    if command.command_field == dimse.C_MOVE_RQ:
        return abstract_syntax in sop_classes.MOVE_MODELS
    return False
