"""The association the gateway opens to a C-MOVE destination, as its requestor, on the event loop.

`destination(address, ...)` connects to the destination's address
(`QANTARA_DICOM_MOVE_DESTINATIONS`), calls its AE title as `QANTARA_DICOM_AE_TITLE`, proposes one
presentation context per (SOP class, transfer syntax) the instances need, each with that one
transfer syntax (the instances go as they were stored: no transcoding), at most 128 (PS3.8
9.3.2.2: odd context IDs 1 to 255), and yields the `Link` once accepted. Connect, request and
answer are bounded by the ACSE timeout; a refused connection, a reject or a timeout raise
`Unreachable`. On the way out it releases (waiting the ACSE timeout at most for the reply), or
aborts if the block failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

from dicom.association import (
    AssociationAccepted,
    AssociationRejected,
    ReleaseReplied,
    Requestor,
    State,
)
from dicom.config import AeAddress, DicomSettings
from dicom.link import TIMED_OUT, Link
from dicom.negotiation import our_user_information
from dicom.pdu import AssociateRequest, ProposedContext

MAX_CONTEXTS: Final = 128


class Unreachable(Exception):
    """The destination could not be associated with; the message says why (no patient data)."""


def proposed_contexts(pairs: Sequence[tuple[str, str]]) -> tuple[ProposedContext, ...]:
    """One context per distinct (SOP class, transfer syntax), in order, at most 128."""
    distinct = list(dict.fromkeys(pairs))[:MAX_CONTEXTS]
    return tuple(
        ProposedContext(2 * n + 1, sop_class, (syntax,))
        for n, (sop_class, syntax) in enumerate(distinct)
    )


@asynccontextmanager
async def destination(
    address: AeAddress, pairs: Sequence[tuple[str, str]], settings: DicomSettings
) -> AsyncIterator[Link[Requestor]]:
    requestor = Requestor(settings.max_pdu)
    request = AssociateRequest(
        called_ae=address.ae_title,
        calling_ae=settings.ae_title,
        contexts=proposed_contexts(pairs),
        user_information=our_user_information(settings.max_pdu),
    )
    link = Link(requestor, high_water=2 * settings.max_pdu, send_timeout=settings.dimse_timeout)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(settings.acse_timeout):
            await loop.create_connection(lambda: link, address.host, address.port)
    except (OSError, TimeoutError) as exc:
        raise Unreachable(f"cannot connect: {type(exc).__name__}") from exc
    try:
        await link.send(requestor.associate(request))
        answer = await link.next_event(settings.acse_timeout)
        if isinstance(answer, AssociationRejected):
            raise Unreachable("association rejected")
        if not isinstance(answer, AssociationAccepted):
            raise Unreachable("no answer" if answer == TIMED_OUT else "association ended")
    except BaseException:
        link.close(requestor.abort() if requestor.state is State.ESTABLISHED else b"")
        raise
    released = False
    try:
        yield link
        released = await _release(link, requestor, settings.acse_timeout)
    finally:
        if not released:
            link.close(requestor.abort() if requestor.state is not State.CLOSED else b"")


async def _release(link: Link[Requestor], requestor: Requestor, within: float) -> bool:
    """A-RELEASE-RQ, then wait for the reply (other events skipped); True once released."""
    if requestor.state is not State.ESTABLISHED or link.closed:
        return False
    try:
        await link.send(requestor.release())
    except TimeoutError:  # the destination does not read
        return False
    while True:
        event = await link.next_event(within)
        if isinstance(event, ReleaseReplied):
            link.close()
            return True
        if isinstance(event, str) or requestor.state in (State.CLOSED, State.ERROR):
            return False
