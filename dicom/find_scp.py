"""C-FIND, Patient Root and Study Root, at the PATIENT, STUDY, SERIES and IMAGE levels.

The identifier is read whole (at most `MAX_IDENTIFIER` bytes) and decoded in the presentation
context's transfer syntax; its keys become a `FindRequest` on the index
(`storage.dicom_queries`), at most `max_find_results` matches. Each match goes back as a Pending
response with the requested keys valued, in UTF-8 (ISO_IR 192), then Success, or Cancel once the
peer's C-CANCEL-RQ has arrived. Before the first match goes, an audit row (`storage.audit`,
protocol "dicom", action `search-type`) names the calling AE title, the level, the number of
matches and the patients they name, and is committed; a query that matches nothing writes none.
An identifier that does not decode, an unknown level, a level outside the query model or an
invalid matching key: 0xC000 family (identifier does not match SOP class); the database
unavailable (the query or the audit row): 0xA700.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from datetime import time as time_of_day

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom import dimse, sop_classes, status
from dicom.association import Acceptor, CommandReceived
from dicom.audit import Auditor, read_entry
from dicom.config import DicomSettings
from dicom.identifier import MAX_IDENTIFIER, IdentifierError, decode_identifier, encode_identifier
from dicom.link import Ended, Link
from ingest.errors import StorageUnavailable
from storage.audit import AuditEntry
from storage.dicom_queries import LEVELS, PATIENTS, FindMatch, FindRequest, FindRequestError

logger = logging.getLogger(__name__)

Finder = Callable[[FindRequest], Awaitable[list[FindMatch]]]
"""Runs a C-FIND request on the index (`storage.dicom_queries.find`)."""


async def answer_find(
    link: Link[Acceptor],
    event: CommandReceived,
    finder: Finder,
    auditor: Auditor,
    settings: DicomSettings,
    calling: str,
) -> Ended | None:
    """Receive a C-FIND identifier, query the index, stream the matches (Pending) and the final
    status; a C-CANCEL noted by the link ends the stream with Cancel. What ended the association
    while the identifier was read, else None."""
    command = event.command
    data, ended = await link.receive_whole(command, MAX_IDENTIFIER, settings.dimse_timeout)
    if ended is not None:
        return ended
    message_id = command.message_id or 0

    async def reply(code: int, identifier: bytes | None = None, comment: str | None = None) -> None:
        response = dimse.find_response(
            command, code, identifier=identifier is not None, error_comment=comment
        )
        await link.send(link.endpoint.send_message(event.context_id, response, identifier))

    try:
        if data is None:  # none, or longer than MAX_IDENTIFIER
            raise IdentifierError("no identifier")
        identifier = decode_identifier(data, event.transfer_syntax)
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        criteria = tuple(
            (element.keyword, _criterion(element.value))
            for element in identifier
            if element.keyword and element.keyword != "QueryRetrieveLevel"
        )
    except (IdentifierError, ValueError, TypeError, AttributeError, KeyError):
        logger.info("DICOM C-FIND identifier cannot be decoded")
        await reply(status.FIND_IDENTIFIER_INVALID, comment="identifier cannot be decoded")
        return None
    if level not in LEVELS:
        await reply(status.FIND_IDENTIFIER_INVALID, comment="unknown query/retrieve level")
        return None
    if level not in sop_classes.FIND_LEVELS[event.abstract_syntax]:
        await reply(status.FIND_IDENTIFIER_INVALID, comment="level not in this query model")
        return None
    keywords = [k for k, _ in criteria]
    request = FindRequest(level, criteria, settings.max_find_results)
    try:
        async with asyncio.timeout(settings.store_timeout):
            matches = await finder(request)
            if matches:
                await auditor(_audit_entry(calling, level, matches))
    except FindRequestError:
        await reply(status.FIND_IDENTIFIER_INVALID, comment="invalid matching key")
        return None
    except (StorageUnavailable, TimeoutError):
        await reply(status.FIND_OUT_OF_RESOURCES, comment="database unavailable")
        return None
    for match in matches:
        if link.cancelled(message_id):
            break
        encoded = encode_identifier(_match_dataset(level, keywords, match), event.transfer_syntax)
        await reply(status.PENDING, encoded)
    await reply(dimse.CANCEL if link.cancelled(message_id) else status.SUCCESS)
    return None


def _audit_entry(calling: str, level: str, matches: list[FindMatch]) -> AuditEntry:
    """The audit row written before the first match goes: the level, how many matches and which
    patients."""
    patients = (patient for match in matches for patient in match.get(PATIENTS) or ())
    return read_entry(calling, "search-type", f"C-FIND {level}, {len(matches)} match(es)", patients)


def _criterion(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _match_dataset(level: str, keywords: list[str], match: FindMatch) -> Dataset:
    """A C-FIND response identifier: the requested keys, valued from the match, in UTF-8."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for keyword in keywords:
        if keyword == "SpecificCharacterSet":
            continue
        value = match.get(keyword)
        try:
            setattr(ds, keyword, _dicom_value(value))
        except (ValueError, TypeError):
            setattr(ds, keyword, None)
    return ds


def _dicom_value(value: object) -> object:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.strftime("%Y%m%d%H%M%S")
    if isinstance(value, time_of_day):
        return value.strftime("%H%M%S")
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    if isinstance(value, list):
        return [str(v) for v in value if v] or None
    if isinstance(value, int):
        return str(value)
    return value
