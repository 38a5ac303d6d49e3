"""One association as a sans-IO state machine (PS3.8 §9.2): `Acceptor`, the listener's side, and
`Requestor`, the side of an association the gateway opens itself (a C-MOVE's, to its
destination); `Endpoint` is what both share once the association is established.

Bytes go in with `receive_data` (`b""`: the peer closed); `next_event()` returns the next event
or None when more bytes are needed (or while the listener decides on the association request).
The listener answers with `accept`/`reject`, `send_message`, `release_reply`, `abort`: each
returns the bytes to write. A requestor starts with `associate` and ends with `release`; it sees
`AssociationAccepted` or `AssociationRejected` first and `ReleaseReplied` last. Events:

- `AssociationRequested`: decide with `dicom.negotiation`, then `accept(...)` or `reject(...)`;
- `CommandReceived`: a whole DIMSE command set, with its presentation context's syntaxes;
- `DatasetFragment` (a memoryview of the received PDU: write it, don't keep it) then
  `DatasetComplete`, when the command announced a dataset;
- `ReleaseRequested` (answer `release_reply()`), `Aborted` (the peer's A-ABORT),
  `ConnectionClosed` (end of stream), `ProtocolError` (its `reply` is the A-ABORT or
  A-ASSOCIATE-RJ to send before closing).

Malformed or unexpected input never raises: it becomes a `ProtocolError` and the machine stays
in `State.ERROR`. The buffer never holds more than one PDU (`dicom.pdu.PduReader`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum, auto

from dicom import pdu
from dicom.dimse import MAX_COMMAND_LENGTH, Command, DimseError, decode_command, encode_command
from dicom.pdu import (
    Abort,
    AbortReason,
    AbortSource,
    AssociateAccept,
    AssociateReject,
    AssociateRequest,
    ContextResult,
    PduError,
)


class State(Enum):
    AWAITING_REQUEST = auto()
    AWAITING_DECISION = auto()
    AWAITING_ANSWER = auto()  # a requestor's A-ASSOCIATE-RQ sent
    ESTABLISHED = auto()
    RELEASING = auto()  # a requestor's A-RELEASE-RQ sent
    CLOSED = auto()  # released, rejected or aborted
    ERROR = auto()


@dataclass(frozen=True, slots=True)
class AssociationRequested:
    request: AssociateRequest


@dataclass(frozen=True, slots=True)
class AssociationAccepted:
    answer: AssociateAccept


@dataclass(frozen=True, slots=True)
class AssociationRejected:
    answer: AssociateReject


@dataclass(frozen=True, slots=True)
class ReleaseReplied:
    pass


@dataclass(frozen=True, slots=True)
class CommandReceived:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    command: Command


@dataclass(frozen=True, slots=True)
class DatasetFragment:
    context_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class DatasetComplete:
    context_id: int


@dataclass(frozen=True, slots=True)
class ReleaseRequested:
    pass


@dataclass(frozen=True, slots=True)
class Aborted:
    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    pass


@dataclass(frozen=True, slots=True)
class ProtocolError:
    detail: str
    reply: bytes


Event = (
    AssociationRequested
    | AssociationAccepted
    | AssociationRejected
    | ReleaseReplied
    | CommandReceived
    | DatasetFragment
    | DatasetComplete
    | ReleaseRequested
    | Aborted
    | ConnectionClosed
    | ProtocolError
)


@dataclass(frozen=True, slots=True)
class _Context:
    abstract_syntax: str
    transfer_syntax: str


class Endpoint:
    """What both sides share: PDUs in and DIMSE messages out of them, messages sent, A-ABORT.
    `max_pdu`: the maximum length we advertise (P-DATA-TF PDUs above it are refused)."""

    _abort_source = AbortSource.SERVICE_PROVIDER

    def __init__(self, max_pdu: int) -> None:
        self._reader = pdu.PduReader(max_pdu)
        self._state = State.AWAITING_REQUEST
        self._events: deque[Event] = deque()
        self._eof = False
        self._contexts: dict[int, _Context] = {}
        self._peer_max = 0
        self._command = bytearray()
        self._command_context: int | None = None
        self._dataset_context: int | None = None
        self.request: AssociateRequest | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def in_message(self) -> bool:
        """Part of a PDU or of a DIMSE message is received, not the rest (the DIMSE timeout)."""
        partial = self._command_context is not None or self._dataset_context is not None
        return partial or self._reader.partial

    @property
    def buffered(self) -> int:
        """Bytes received and not yet made into events."""
        return self._reader.buffered

    @property
    def peer_max_length(self) -> int:
        return self._peer_max

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self._eof = True
        elif self._state not in (State.CLOSED, State.ERROR):
            self._reader.feed(data)

    def next_event(self) -> Event | None:
        while not self._events:
            if self._state in (State.CLOSED, State.ERROR):
                return None
            if self._state is State.AWAITING_DECISION:
                return None
            try:
                unit = self._reader.next_pdu()
            except PduError as error:
                return self._fail(error.detail, self._reply_for(error))
            if unit is None:
                if self._eof:
                    self._state = State.CLOSED
                    return ConnectionClosed()
                return None
            if isinstance(unit, Abort):
                self._state = State.CLOSED
                self._events.append(Aborted(unit.source, unit.reason))
            else:
                self._handle(unit)
        return self._events.popleft()

    def accepted_context(self, abstract_syntax: str, transfer_syntax: str) -> int | None:
        """An accepted presentation context of `abstract_syntax` in `transfer_syntax`, else
        None."""
        for context_id, context in self._contexts.items():
            if context.abstract_syntax == abstract_syntax and (
                context.transfer_syntax == transfer_syntax
            ):
                return context_id
        return None

    # --- messages out -----------------------------------------------------------------------

    def send_message(
        self, context_id: int, command: Command, dataset: bytes | None = None
    ) -> bytes:
        """The P-DATA-TF PDUs of a DIMSE message, within the peer's maximum length."""
        pdus = pdu.message_pdus(context_id, encode_command(command), dataset, self._peer_max)
        return b"".join(pdus)

    def send_fragment(self, context_id: int, data: bytes | memoryview, last: bool) -> bytes:
        """A piece of a dataset being sent after its command (`send_message` without a
        dataset); `last` for its final piece."""
        pdus = pdu.fragment_pdus(context_id, data, self._peer_max, is_command=False, last=last)
        return b"".join(pdus)

    def abort(self, reason: AbortReason = AbortReason.NOT_SPECIFIED) -> bytes:
        self._state = State.CLOSED
        return pdu.encode(Abort(self._abort_source, reason))

    # --- incoming PDUs ----------------------------------------------------------------------

    def _handle(self, unit: pdu.Pdu) -> None:
        """A PDU other than A-ABORT."""
        raise NotImplementedError

    def _established(
        self, request: AssociateRequest, answer: AssociateAccept, peer_max: int
    ) -> None:
        """The accepted contexts are known, and the peer's maximum length."""
        self._peer_max = peer_max
        proposed = {c.context_id: c.abstract_syntax for c in request.contexts}
        for context in answer.contexts:
            if context.result is ContextResult.ACCEPTANCE and context.context_id in proposed:
                self._contexts[context.context_id] = _Context(
                    proposed[context.context_id], context.transfer_syntax
                )
        self._state = State.ESTABLISHED

    def _p_data(self, unit: pdu.PDataTF) -> None:
        for pdv in unit.pdvs:
            if not self._pdv(pdv):
                return

    def _pdv(self, pdv: pdu.Pdv) -> bool:
        context = self._contexts.get(pdv.context_id)
        if context is None:
            return self._invalid("PDV on a presentation context not accepted")
        if pdv.is_command:
            if self._dataset_context is not None:
                return self._invalid("command fragment inside a dataset")
            if self._command_context not in (None, pdv.context_id):
                return self._invalid("command fragments on two presentation contexts")
            self._command_context = pdv.context_id
            self._command += pdv.data
            if len(self._command) > MAX_COMMAND_LENGTH:
                return self._invalid("command set too long")
            if not pdv.is_last:
                return True
            try:
                command = decode_command(self._command)
            except DimseError as exc:
                return self._invalid(str(exc))
            self._command = bytearray()
            self._command_context = None
            if command.has_dataset:
                self._dataset_context = pdv.context_id
            syntaxes = (context.abstract_syntax, context.transfer_syntax)
            self._events.append(CommandReceived(pdv.context_id, *syntaxes, command))
            return True
        if self._dataset_context != pdv.context_id:
            return self._invalid("dataset fragment without its command")
        self._events.append(DatasetFragment(pdv.context_id, pdv.data))
        if pdv.is_last:
            self._dataset_context = None
            self._events.append(DatasetComplete(pdv.context_id))
        return True

    def _unexpected(self, unit: pdu.Pdu) -> None:
        reply = Abort(self._abort_source, AbortReason.UNEXPECTED_PDU)
        self._events.append(self._fail(f"unexpected {type(unit).__name__}", pdu.encode(reply)))

    def _invalid(self, detail: str) -> bool:
        reply = Abort(self._abort_source, AbortReason.INVALID_PARAMETER)
        self._events.append(self._fail(detail, pdu.encode(reply)))
        return False

    def _reply_for(self, error: PduError) -> bytes:
        if isinstance(error.reply, AssociateReject) and self._state is not State.AWAITING_REQUEST:
            return pdu.encode(Abort(self._abort_source, AbortReason.UNEXPECTED_PDU))
        return pdu.encode(error.reply)

    def _fail(self, detail: str, reply: bytes) -> ProtocolError:
        self._state = State.ERROR
        self._command = bytearray()
        self._command_context = self._dataset_context = None
        return ProtocolError(detail, reply)


class Acceptor(Endpoint):
    """The listener's side: `accept` or `reject` the request; `release_reply` at the end."""

    def __init__(self, max_pdu: int) -> None:
        super().__init__(max_pdu)
        self._requestor_scp: frozenset[str] = frozenset()

    def accept(self, answer: AssociateAccept) -> bytes:
        if self._state is not State.AWAITING_DECISION or self.request is None:
            raise RuntimeError("no association request to accept")
        self._established(self.request, answer, self.request.user_information.max_length)
        self._requestor_scp = frozenset(r.sop_class for r in answer.user_information.roles if r.scp)
        return pdu.encode(answer)

    def reject(self, answer: AssociateReject) -> bytes:
        self._state = State.CLOSED
        return pdu.encode(answer)

    def storage_context(self, sop_class: str, transfer_syntax: str) -> int | None:
        """The accepted presentation context on which we may send the peer a C-STORE of
        `sop_class` in `transfer_syntax` (the peer took the SCP role for it, PS3.7 D.3.3.4),
        else None."""
        if sop_class not in self._requestor_scp:
            return None
        return self.accepted_context(sop_class, transfer_syntax)

    def release_reply(self) -> bytes:
        self._state = State.CLOSED
        return pdu.encode(pdu.ReleaseReply())

    def _handle(self, unit: pdu.Pdu) -> None:
        if self._state is State.AWAITING_REQUEST:
            if isinstance(unit, AssociateRequest):
                self.request = unit
                self._state = State.AWAITING_DECISION
                self._events.append(AssociationRequested(unit))
            else:
                self._unexpected(unit)
        elif isinstance(unit, pdu.PDataTF):
            self._p_data(unit)
        elif isinstance(unit, pdu.ReleaseRequest):
            if self.in_message:
                self._unexpected(unit)
            else:
                self._events.append(ReleaseRequested())
        else:
            self._unexpected(unit)


class Requestor(Endpoint):
    """The side of an association the gateway opens: `associate`, DIMSE messages, `release`."""

    _abort_source = AbortSource.SERVICE_USER

    def __init__(self, max_pdu: int) -> None:
        super().__init__(max_pdu)
        self.answer: AssociateAccept | None = None
        """The peer's A-ASSOCIATE-AC, once accepted (its role selection answers)."""

    def associate(self, request: AssociateRequest) -> bytes:
        if self._state is not State.AWAITING_REQUEST:
            raise RuntimeError("association already requested")
        self.request = request
        self._state = State.AWAITING_ANSWER
        return pdu.encode(request)

    def release(self) -> bytes:
        if self._state is not State.ESTABLISHED:
            raise RuntimeError("no association to release")
        self._state = State.RELEASING
        return pdu.encode(pdu.ReleaseRequest())

    def _handle(self, unit: pdu.Pdu) -> None:
        if self._state is State.AWAITING_ANSWER and self.request is not None:
            if isinstance(unit, AssociateAccept):
                self.answer = unit
                self._established(self.request, unit, unit.user_information.max_length)
                self._events.append(AssociationAccepted(unit))
            elif isinstance(unit, AssociateReject):
                self._state = State.CLOSED
                self._events.append(AssociationRejected(unit))
            else:
                self._unexpected(unit)
        elif isinstance(unit, pdu.PDataTF):
            self._p_data(unit)
        elif isinstance(unit, pdu.ReleaseReply) and self._state is State.RELEASING:
            self._state = State.CLOSED
            self._events.append(ReleaseReplied())
        else:
            self._unexpected(unit)
