"""The PDUs of the DICOM upper layer (PS3.8 §9.3), sans-IO: bytes in, PDUs out, and back.

`PduReader(max_pdu)` is fed bytes (`feed`) and yields whole PDUs (`next_pdu`); the buffer never
holds more than one PDU and the last chunk: a header announcing a PDU longer than the limit is
refused before its body arrives. Malformed input raises `PduError`, which carries the PDU to
answer with: an A-ASSOCIATE-RJ for an association request we cannot read, an A-ABORT (source
service-provider, with the PS3.8 reason) for anything else. Nothing here knows about sockets,
clocks, files or the negotiation policy (`dicom.negotiation`).

P-DATA-TF values (`Pdv.data`) are memoryviews of the received PDU: a dataset fragment goes to its
file without a copy.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

ASSOCIATE_RQ: Final = 0x01
ASSOCIATE_AC: Final = 0x02
ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
RELEASE_RQ: Final = 0x05
RELEASE_RP: Final = 0x06
ABORT: Final = 0x07

HEADER: Final = 6
APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"
MAX_ASSOCIATE_LENGTH: Final = 1 << 20
"""The longest A-ASSOCIATE-RQ and other non-data PDU we read (the max length bounds P-DATA)."""

_ITEM_APPLICATION_CONTEXT: Final = 0x10
_ITEM_CONTEXT_RQ: Final = 0x20
_ITEM_CONTEXT_AC: Final = 0x21
_ITEM_ABSTRACT_SYNTAX: Final = 0x30
_ITEM_TRANSFER_SYNTAX: Final = 0x40
_ITEM_USER_INFORMATION: Final = 0x50
_SUB_MAX_LENGTH: Final = 0x51
_SUB_IMPLEMENTATION_CLASS: Final = 0x52
_SUB_ASYNC_WINDOW: Final = 0x53
_SUB_ROLE_SELECTION: Final = 0x54
_SUB_IMPLEMENTATION_VERSION: Final = 0x55
_SUB_USER_IDENTITY_RQ: Final = 0x58
_SUB_USER_IDENTITY_AC: Final = 0x59

_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
_PDU_HEADER: Final = struct.Struct(">BxI")
_ITEM_HEADER: Final = struct.Struct(">BxH")


class AbortSource(IntEnum):
    SERVICE_USER = 0
    SERVICE_PROVIDER = 2


class AbortReason(IntEnum):
    """PS3.8 Table 9-26, service-provider source."""

    NOT_SPECIFIED = 0
    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    UNRECOGNIZED_PARAMETER = 4
    UNEXPECTED_PARAMETER = 5
    INVALID_PARAMETER = 6


class RejectResult(IntEnum):
    PERMANENT = 1
    TRANSIENT = 2


class RejectSource(IntEnum):
    SERVICE_USER = 1
    ACSE = 2  # service-provider, ACSE related function
    PRESENTATION = 3  # service-provider, presentation related function


# PS3.8 Table 9-21: the reject reason's meaning depends on its source.
REJECT_NO_REASON: Final = 1  # service-user or ACSE
REJECT_APPLICATION_CONTEXT: Final = 2  # service-user: application context name not supported
REJECT_CALLING_AE: Final = 3  # service-user: calling AE title not recognized
REJECT_CALLED_AE: Final = 7  # service-user: called AE title not recognized
REJECT_PROTOCOL_VERSION: Final = 2  # ACSE: protocol version not supported
REJECT_CONGESTION: Final = 1  # presentation: temporary congestion
REJECT_LOCAL_LIMIT: Final = 2  # presentation: local limit exceeded


class ContextResult(IntEnum):
    ACCEPTANCE = 0
    USER_REJECTION = 1
    NO_REASON = 2
    ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
    TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


# --- PDUs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ContextAnswer:
    context_id: int
    result: ContextResult
    transfer_syntax: str = ""


@dataclass(frozen=True, slots=True)
class RoleSelection:
    sop_class: str
    scu: bool
    scp: bool


@dataclass(frozen=True, slots=True)
class UserIdentity:
    """Received and ignored (we answer no server response): PS3.7 D.3.3.7."""

    kind: int
    positive_response_requested: bool
    primary: bytes
    secondary: bytes = b""


@dataclass(frozen=True, slots=True)
class UserInformation:
    max_length: int = 0  # 0: no limit
    implementation_class_uid: str = ""
    implementation_version: str = ""
    async_window: tuple[int, int] | None = None  # (max invoked, max performed)
    roles: tuple[RoleSelection, ...] = ()
    user_identity: UserIdentity | None = None


@dataclass(frozen=True, slots=True)
class AssociateRequest:
    called_ae: str
    calling_ae: str
    contexts: tuple[ProposedContext, ...]
    user_information: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True, slots=True)
class AssociateAccept:
    called_ae: str
    calling_ae: str
    contexts: tuple[ContextAnswer, ...]
    user_information: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True, slots=True)
class AssociateReject:
    result: RejectResult
    source: RejectSource
    reason: int


@dataclass(frozen=True, slots=True)
class Pdv:
    context_id: int
    is_command: bool
    is_last: bool
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class PDataTF:
    pdvs: tuple[Pdv, ...]


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    pass


@dataclass(frozen=True, slots=True)
class ReleaseReply:
    pass


@dataclass(frozen=True, slots=True)
class Abort:
    source: int = AbortSource.SERVICE_PROVIDER
    reason: int = AbortReason.NOT_SPECIFIED


Pdu = (
    AssociateRequest
    | AssociateAccept
    | AssociateReject
    | PDataTF
    | ReleaseRequest
    | ReleaseReply
    | Abort
)


class PduError(Exception):
    """Input we cannot take; `reply` is the PDU to send before closing."""

    def __init__(self, reply: Abort | AssociateReject, detail: str) -> None:
        super().__init__(detail)
        self.reply = reply
        self.detail = detail


def _abort(reason: AbortReason, detail: str) -> PduError:
    return PduError(Abort(AbortSource.SERVICE_PROVIDER, reason), detail)


def _unreadable_request(detail: str) -> PduError:
    return PduError(
        AssociateReject(RejectResult.PERMANENT, RejectSource.ACSE, REJECT_NO_REASON), detail
    )


# --- reading ----------------------------------------------------------------------------------


class PduReader:
    """Cuts a byte stream into PDUs. `max_pdu`: the longest P-DATA-TF we advertised.

    Received chunks are kept as they are; a PDU inside one chunk is a view of it (no copy), one
    spanning chunks is joined once."""

    def __init__(self, max_pdu: int, max_other: int = MAX_ASSOCIATE_LENGTH) -> None:
        self._max_pdu = max_pdu
        self._max_other = max_other
        self._chunks: deque[memoryview] = deque()
        self._size = 0

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def partial(self) -> bool:
        """Part of a PDU is buffered."""
        return self._size > 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            # Kept by reference: only immutable bytes (a caller may reuse its buffer).
            self._chunks.append(memoryview(data if isinstance(data, bytes) else bytes(data)))
            self._size += len(data)

    def next_pdu(self) -> Pdu | None:
        """The next whole PDU, or None while more bytes are needed. Raises `PduError`."""
        if self._size < HEADER:
            return None
        first = self._chunks[0]
        head = first if len(first) >= HEADER else self._join(HEADER)
        kind, length = _PDU_HEADER.unpack_from(head)
        if not ASSOCIATE_RQ <= kind <= ABORT:
            raise _abort(AbortReason.UNRECOGNIZED_PDU, f"unknown PDU type 0x{kind:02x}")
        limit = self._max_pdu if kind == P_DATA_TF else self._max_other
        if length > limit:
            raise _abort(AbortReason.INVALID_PARAMETER, f"PDU of {length} bytes over {limit}")
        end = HEADER + length
        if self._size < end:
            return None
        return decode_body(kind, self._take(end)[HEADER:])

    def _join(self, n: int) -> memoryview:
        """The first `n` buffered bytes as one chunk (joined in place when they span chunks)."""
        first = self._chunks[0]
        if len(first) >= n:
            return first
        parts: list[memoryview] = []
        size = 0
        while size < n:
            chunk = self._chunks.popleft()
            parts.append(chunk)
            size += len(chunk)
        joined = memoryview(b"".join(parts))
        self._chunks.appendleft(joined)
        return joined

    def _take(self, n: int) -> memoryview:
        chunk = self._join(n)
        if len(chunk) == n:
            self._chunks.popleft()
        else:
            self._chunks[0] = chunk[n:]
        self._size -= n
        return chunk[:n]


def decode(data: bytes) -> Pdu:
    """One whole PDU (tests, and `PduReader`)."""
    if len(data) < HEADER:
        raise _abort(AbortReason.INVALID_PARAMETER, "short PDU")
    kind, length = _PDU_HEADER.unpack_from(data)
    if len(data) != HEADER + length:
        raise _abort(AbortReason.INVALID_PARAMETER, "PDU length does not match")
    if not ASSOCIATE_RQ <= kind <= ABORT:
        raise _abort(AbortReason.UNRECOGNIZED_PDU, f"unknown PDU type 0x{kind:02x}")
    return decode_body(kind, data[HEADER:])


def decode_body(kind: int, body: bytes | memoryview) -> Pdu:
    if kind == P_DATA_TF:
        return _decode_p_data(body)
    body = bytes(body)
    if kind == ASSOCIATE_RQ:
        return _decode_request(body)
    if kind == ASSOCIATE_AC:
        return _decode_accept(body)
    if len(body) != 4:
        raise _abort(AbortReason.INVALID_PARAMETER, f"PDU 0x{kind:02x} of {len(body)} bytes")
    if kind == RELEASE_RQ:
        return ReleaseRequest()
    if kind == RELEASE_RP:
        return ReleaseReply()
    if kind == ASSOCIATE_RJ:
        result = RejectResult(body[1]) if body[1] in (1, 2) else RejectResult.PERMANENT
        source = RejectSource(body[2]) if body[2] in (1, 2, 3) else RejectSource.ACSE
        return AssociateReject(result, source, body[3])
    return Abort(body[2], body[3])


def _decode_p_data(body: bytes | memoryview) -> PDataTF:
    view = memoryview(body)
    pdvs: list[Pdv] = []
    offset = 0
    end = len(body)
    while offset < end:
        if end - offset < 6:
            raise _abort(AbortReason.INVALID_PARAMETER, "PDV item header cut")
        (length,) = _U32.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise _abort(AbortReason.INVALID_PARAMETER, "PDV item length out of the PDU")
        context_id = body[offset + 4]
        control = body[offset + 5]
        if context_id % 2 == 0:
            raise _abort(AbortReason.INVALID_PARAMETER, "even presentation context id")
        pdvs.append(
            Pdv(
                context_id,
                bool(control & 1),
                bool(control & 2),
                view[offset + 6 : offset + 4 + length],
            )
        )
        offset += 4 + length
    if not pdvs:
        raise _abort(AbortReason.INVALID_PARAMETER, "P-DATA-TF without PDV")
    return PDataTF(tuple(pdvs))


def _items(body: bytes, start: int, error: PduError) -> list[tuple[int, bytes]]:
    """(type, value) of the items from `start` (2-byte lengths)."""
    items: list[tuple[int, bytes]] = []
    offset = start
    while offset < len(body):
        if len(body) - offset < 4:
            raise error
        kind, length = _ITEM_HEADER.unpack_from(body, offset)
        if offset + 4 + length > len(body):
            raise error
        items.append((kind, body[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return items


def _text(value: bytes) -> str:
    """A UID or AE title: latin-1 never fails; padding (NUL, spaces) removed."""
    return value.decode("latin-1").strip(" \x00")


def _fixed_part(body: bytes, error: PduError) -> tuple[int, str, str]:
    if len(body) < 68:
        raise error
    (version,) = _U16.unpack_from(body, 0)
    return version, _text(body[4:20]), _text(body[20:36])


def _decode_request(body: bytes) -> AssociateRequest:
    error = _unreadable_request("A-ASSOCIATE-RQ cannot be read")
    version, called, calling = _fixed_part(body, error)
    if not version & 1:
        raise PduError(
            AssociateReject(
                RejectResult.PERMANENT,
                RejectSource.ACSE,
                REJECT_PROTOCOL_VERSION,
            ),
            f"protocol version 0x{version:04x}",
        )
    context_name = ""
    contexts: list[ProposedContext] = []
    user = UserInformation()
    for kind, value in _items(body, 68, error):
        if kind == _ITEM_APPLICATION_CONTEXT:
            context_name = _text(value)
        elif kind == _ITEM_CONTEXT_RQ:
            contexts.append(_proposed_context(value, error))
        elif kind == _ITEM_USER_INFORMATION:
            user = _user_information(value, error)
        else:
            raise error
    if not context_name or not contexts:
        raise error
    return AssociateRequest(called, calling, tuple(contexts), user, context_name, version)


def _proposed_context(value: bytes, error: PduError) -> ProposedContext:
    if len(value) < 4:
        raise error
    abstract = ""
    syntaxes: list[str] = []
    for kind, sub in _items(value, 4, error):
        if kind == _ITEM_ABSTRACT_SYNTAX:
            abstract = _text(sub)
        elif kind == _ITEM_TRANSFER_SYNTAX:
            syntaxes.append(_text(sub))
        else:
            raise error
    return ProposedContext(value[0], abstract, tuple(syntaxes))


def _decode_accept(body: bytes) -> AssociateAccept:
    error = _abort(AbortReason.INVALID_PARAMETER, "A-ASSOCIATE-AC cannot be read")
    version, called, calling = _fixed_part(body, error)
    context_name = ""
    answers: list[ContextAnswer] = []
    user = UserInformation()
    for kind, value in _items(body, 68, error):
        if kind == _ITEM_APPLICATION_CONTEXT:
            context_name = _text(value)
        elif kind == _ITEM_CONTEXT_AC:
            if len(value) < 4 or value[2] > 4:
                raise error
            syntaxes = [
                _text(sub) for k, sub in _items(value, 4, error) if k == _ITEM_TRANSFER_SYNTAX
            ]
            answers.append(ContextAnswer(value[0], ContextResult(value[2]), (syntaxes or [""])[0]))
        elif kind == _ITEM_USER_INFORMATION:
            user = _user_information(value, error)
        else:
            raise error
    return AssociateAccept(called, calling, tuple(answers), user, context_name, version)


def _user_information(value: bytes, error: PduError) -> UserInformation:
    max_length = 0
    class_uid = version = ""
    window: tuple[int, int] | None = None
    roles: list[RoleSelection] = []
    identity: UserIdentity | None = None
    for kind, sub in _items(value, 0, error):
        if kind == _SUB_MAX_LENGTH:
            if len(sub) != 4:
                raise error
            (max_length,) = _U32.unpack(sub)
        elif kind == _SUB_IMPLEMENTATION_CLASS:
            class_uid = _text(sub)
        elif kind == _SUB_IMPLEMENTATION_VERSION:
            version = _text(sub)
        elif kind == _SUB_ASYNC_WINDOW:
            if len(sub) != 4:
                raise error
            window = (_U16.unpack_from(sub, 0)[0], _U16.unpack_from(sub, 2)[0])
        elif kind == _SUB_ROLE_SELECTION:
            if len(sub) < 2:
                raise error
            (n,) = _U16.unpack_from(sub, 0)
            if len(sub) != 2 + n + 2:
                raise error
            roles.append(RoleSelection(_text(sub[2 : 2 + n]), bool(sub[2 + n]), bool(sub[3 + n])))
        elif kind == _SUB_USER_IDENTITY_RQ:
            identity = _user_identity(sub, error)
        # Extended negotiation (0x56, 0x57), a server response (0x59), others: ignored.
    return UserInformation(max_length, class_uid, version, window, tuple(roles), identity)


def _user_identity(sub: bytes, error: PduError) -> UserIdentity:
    if len(sub) < 4:
        raise error
    (n,) = _U16.unpack_from(sub, 2)
    if len(sub) < 4 + n + 2:
        raise error
    primary = sub[4 : 4 + n]
    (m,) = _U16.unpack_from(sub, 4 + n)
    if len(sub) != 4 + n + 2 + m:
        raise error
    return UserIdentity(sub[0], bool(sub[1]), primary, sub[6 + n :])


# --- writing ----------------------------------------------------------------------------------


def encode(pdu: Pdu) -> bytes:
    if isinstance(pdu, PDataTF):
        return encode_p_data(pdu.pdvs)
    if isinstance(pdu, AssociateRequest | AssociateAccept):
        return _encode_association(pdu)
    if isinstance(pdu, AssociateReject):
        return _pdu(ASSOCIATE_RJ, bytes((0, pdu.result, pdu.source, pdu.reason)))
    if isinstance(pdu, ReleaseRequest):
        return _pdu(RELEASE_RQ, bytes(4))
    if isinstance(pdu, ReleaseReply):
        return _pdu(RELEASE_RP, bytes(4))
    return _pdu(ABORT, bytes((0, 0, pdu.source, pdu.reason)))


def encode_p_data(pdvs: tuple[Pdv, ...] | list[Pdv]) -> bytes:
    parts: list[bytes | memoryview] = []
    total = 0
    for pdv in pdvs:
        control = (1 if pdv.is_command else 0) | (2 if pdv.is_last else 0)
        parts.append(_U32.pack(len(pdv.data) + 2) + bytes((pdv.context_id, control)))
        parts.append(pdv.data)
        total += 6 + len(pdv.data)
    return _PDU_HEADER.pack(P_DATA_TF, total) + b"".join(parts)


def message_pdus(
    context_id: int, command: bytes, dataset: bytes | None, max_length: int
) -> list[bytes]:
    """The P-DATA-TF PDUs of one DIMSE message, each within the peer's `max_length` (0: none)."""
    pdus = fragment_pdus(context_id, command, max_length, is_command=True, last=True)
    if dataset is not None:
        pdus += fragment_pdus(context_id, dataset, max_length, is_command=False, last=True)
    return pdus


def fragment_pdus(
    context_id: int,
    data: bytes | memoryview,
    max_length: int,
    *,
    is_command: bool,
    last: bool,
) -> list[bytes]:
    """`data` as P-DATA-TF PDUs of one PDV each within the peer's `max_length` (0: none); the
    last PDV carries the last-fragment bit when `last` (a dataset sent piece by piece: only its
    final piece is `last`)."""
    if not len(data) and not last:
        return []
    fragment = max(max_length - 6 if max_length else 1 << 24, 1)
    view = memoryview(data)
    pdus: list[bytes] = []
    for start in range(0, max(len(data), 1), fragment):
        final = last and start + fragment >= len(data)
        pdv = Pdv(context_id, is_command, final, view[start : start + fragment])
        pdus.append(encode_p_data((pdv,)))
    return pdus


def _pdu(kind: int, body: bytes) -> bytes:
    return _PDU_HEADER.pack(kind, len(body)) + body


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM_HEADER.pack(kind, len(value)) + value


def _uid(text: str) -> bytes:
    return text.encode("latin-1")


def _ae(title: str) -> bytes:
    return title.encode("latin-1")[:16].ljust(16, b" ")


def _encode_association(pdu: AssociateRequest | AssociateAccept) -> bytes:
    parts = [
        _U16.pack(pdu.protocol_version),
        b"\x00\x00",
        _ae(pdu.called_ae),
        _ae(pdu.calling_ae),
        bytes(32),
        _item(_ITEM_APPLICATION_CONTEXT, _uid(pdu.application_context)),
    ]
    if isinstance(pdu, AssociateRequest):
        kind = ASSOCIATE_RQ
        for proposed in pdu.contexts:
            subs = _item(_ITEM_ABSTRACT_SYNTAX, _uid(proposed.abstract_syntax)) + b"".join(
                _item(_ITEM_TRANSFER_SYNTAX, _uid(ts)) for ts in proposed.transfer_syntaxes
            )
            parts.append(_item(_ITEM_CONTEXT_RQ, bytes((proposed.context_id, 0, 0, 0)) + subs))
    else:
        kind = ASSOCIATE_AC
        for answer in pdu.contexts:
            head = bytes((answer.context_id, 0, answer.result, 0))
            parts.append(
                _item(
                    _ITEM_CONTEXT_AC,
                    head + _item(_ITEM_TRANSFER_SYNTAX, _uid(answer.transfer_syntax)),
                )
            )
    parts.append(_item(_ITEM_USER_INFORMATION, _encode_user(pdu.user_information, kind)))
    return _pdu(kind, b"".join(parts))


def _encode_user(user: UserInformation, kind: int) -> bytes:
    subs = [_item(_SUB_MAX_LENGTH, _U32.pack(user.max_length))]
    if user.implementation_class_uid:
        subs.append(_item(_SUB_IMPLEMENTATION_CLASS, _uid(user.implementation_class_uid)))
    if user.async_window is not None:
        subs.append(
            _item(
                _SUB_ASYNC_WINDOW, _U16.pack(user.async_window[0]) + _U16.pack(user.async_window[1])
            )
        )
    for role in user.roles:
        uid = _uid(role.sop_class)
        subs.append(
            _item(_SUB_ROLE_SELECTION, _U16.pack(len(uid)) + uid + bytes((role.scu, role.scp)))
        )
    if user.implementation_version:
        subs.append(_item(_SUB_IMPLEMENTATION_VERSION, _uid(user.implementation_version)))
    identity = user.user_identity
    if identity is not None and kind == ASSOCIATE_RQ:
        value = (
            bytes((identity.kind, identity.positive_response_requested))
            + _U16.pack(len(identity.primary))
            + identity.primary
            + _U16.pack(len(identity.secondary))
            + identity.secondary
        )
        subs.append(_item(_SUB_USER_IDENTITY_RQ, value))
    return b"".join(subs)
