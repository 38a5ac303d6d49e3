"""An association the gateway opens itself, as its requestor, on the event loop: to a C-MOVE
destination, or to a modality's own port for its Storage Commitment report.

`open_association(address, contexts, ...)` connects to `address` (an `AeAddress` of
`QANTARA_DICOM_MOVE_DESTINATIONS` or `QANTARA_DICOM_REPORT_ADDRESSES`; over TLS with `tls`, the
client context of `QANTARA_DICOM_OUTBOUND_TLS_*`, when the address is `tls://`, the peer's
certificate and host name checked), calls its AE title as ours,
proposes `contexts` (and the role selection items `roles`), and yields the `Link` once accepted.
Connect, request and answer are each bounded by `step_timeout`; a refused connection, a reject or
no answer raise `Unreachable`. On the way out it releases (waiting `step_timeout` at most for the
reply), or aborts if the block failed or was cancelled. `proposed_contexts` gives a C-MOVE's: one
per (SOP class, transfer syntax) its instances need, each with that one transfer syntax (they go
as they were stored: no transcoding), at most 128 (PS3.8 9.3.2.2: odd context IDs 1 to 255).
"""

from __future__ import annotations

import asyncio
import ssl
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
from dicom.config import AeAddress
from dicom.link import TIMED_OUT, Link
from dicom.negotiation import our_user_information
from dicom.pdu import AssociateRequest, ProposedContext, RoleSelection
from dicom.syntax_conversion import alternatives

MAX_CONTEXTS: Final = 128


class Unreachable(Exception):
    """The peer could not be associated with; the message says why (no patient data)."""


def proposed_contexts(pairs: Sequence[tuple[str, str]]) -> tuple[ProposedContext, ...]:
    """One context per distinct (SOP class, transfer syntax), each with that one syntax, in
    order, at most 128: first the stored syntaxes, then for an uncompressed little-endian one
    the other, which the instance converts to (`dicom.syntax_conversion`) if the destination
    does not take its own. Separate contexts, so that a destination that takes both accepts
    both, and the instance goes as stored."""
    stored = list(dict.fromkeys(pairs))
    fallbacks = [(c, ts) for c, syntax in stored for ts in alternatives(syntax, 0)[1:]]
    distinct = list(dict.fromkeys([*stored, *fallbacks]))[:MAX_CONTEXTS]
    return tuple(
        ProposedContext(2 * n + 1, sop_class, (syntax,))
        for n, (sop_class, syntax) in enumerate(distinct)
    )


@asynccontextmanager
async def open_association(
    address: AeAddress,
    contexts: tuple[ProposedContext, ...],
    *,
    calling_ae: str,
    max_pdu: int,
    step_timeout: float,
    send_timeout: float,
    roles: tuple[RoleSelection, ...] = (),
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Link[Requestor]]:
    requestor = Requestor(max_pdu)
    request = AssociateRequest(
        called_ae=address.ae_title,
        calling_ae=calling_ae,
        contexts=contexts,
        user_information=our_user_information(max_pdu, roles),
    )
    link = Link(requestor, high_water=2 * max_pdu, send_timeout=send_timeout)
    loop = asyncio.get_running_loop()
    if address.tls and tls is None:
        raise Unreachable("a tls:// address and no QANTARA_DICOM_OUTBOUND_TLS_CA")
    context = tls if address.tls else None
    try:
        async with asyncio.timeout(step_timeout):
            await loop.create_connection(
                lambda: link,
                address.host,
                address.port,
                ssl=context,
                server_hostname=address.host if context is not None else None,
            )
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        raise Unreachable(f"cannot connect: {type(exc).__name__}") from exc
    try:
        await link.send(requestor.associate(request))
        answer = await link.next_event(step_timeout)
        if isinstance(answer, AssociationRejected):
            raise Unreachable("association rejected")
        if not isinstance(answer, AssociationAccepted):
            raise Unreachable("no answer" if answer == TIMED_OUT else "association ended")
    except TimeoutError as exc:  # Link.send: the peer does not read
        link.close(requestor.abort())
        raise Unreachable("the peer does not read") from exc
    except BaseException:
        link.close(requestor.abort() if requestor.state is State.ESTABLISHED else b"")
        raise
    released = False
    try:
        yield link
        released = await _release(link, requestor, step_timeout)
    finally:
        if not released:
            link.close(requestor.abort() if requestor.state is not State.CLOSED else b"")


async def _release(link: Link[Requestor], requestor: Requestor, within: float) -> bool:
    """A-RELEASE-RQ, then wait for the reply (other events skipped); True once released."""
    if requestor.state is not State.ESTABLISHED or link.closed:
        return False
    try:
        await link.send(requestor.release())
    except TimeoutError:  # the peer does not read
        return False
    while True:
        event = await link.next_event(within)
        if isinstance(event, ReleaseReplied):
            link.close()
            return True
        if isinstance(event, str) or requestor.state in (State.CLOSED, State.ERROR):
            return False
