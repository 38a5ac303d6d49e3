"""DIMSE command sets (PS3.7 §9, §E), sans-IO: group 0000, always implicit VR little endian.

`decode_command(data)` reads a command set into a `Command` (raises `DimseError` on malformed
input); `encode_command(command)` writes one, its group length first. Builders give the responses
the listener sends: C-ECHO-RSP, C-STORE-RSP, C-FIND-RSP (pending, success, cancel, failures with
an Error Comment), and for Storage Commitment the N-ACTION-RSP and the N-EVENT-REPORT-RQ the
listener sends as a request of its own. Identifiers and datasets are not touched here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

C_STORE_RQ: Final = 0x0001
C_STORE_RSP: Final = 0x8001
C_GET_RQ: Final = 0x0010
C_GET_RSP: Final = 0x8010
C_MOVE_RQ: Final = 0x0021
C_MOVE_RSP: Final = 0x8021
C_FIND_RQ: Final = 0x0020
C_FIND_RSP: Final = 0x8020
C_ECHO_RQ: Final = 0x0030
C_ECHO_RSP: Final = 0x8030
C_CANCEL_RQ: Final = 0x0FFF
N_EVENT_REPORT_RQ: Final = 0x0100
N_EVENT_REPORT_RSP: Final = 0x8100
N_ACTION_RQ: Final = 0x0130
N_ACTION_RSP: Final = 0x8130
RESPONSE_BIT: Final = 0x8000

NO_DATASET: Final = 0x0101
HAS_DATASET: Final = 0x0000  # any other value means a dataset follows

UNRECOGNIZED_OPERATION: Final = 0x0211
CANCEL: Final = 0xFE00
MAX_COMMAND_LENGTH: Final = 64 * 1024
ERROR_COMMENT_MAX: Final = 64

_GROUP_LENGTH: Final = 0x0000_0000
_AFFECTED_SOP_CLASS: Final = 0x0000_0002
_REQUESTED_SOP_CLASS: Final = 0x0000_0003
_COMMAND_FIELD: Final = 0x0000_0100
_MESSAGE_ID: Final = 0x0000_0110
_RESPONDED_TO: Final = 0x0000_0120
_MOVE_DESTINATION: Final = 0x0000_0600
_PRIORITY: Final = 0x0000_0700
_DATASET_TYPE: Final = 0x0000_0800
_STATUS: Final = 0x0000_0900
_ERROR_COMMENT: Final = 0x0000_0902
_AFFECTED_SOP_INSTANCE: Final = 0x0000_1000
_REQUESTED_SOP_INSTANCE: Final = 0x0000_1001
_EVENT_TYPE: Final = 0x0000_1002
_ACTION_TYPE: Final = 0x0000_1008
_REMAINING: Final = 0x0000_1020
_COMPLETED: Final = 0x0000_1021
_FAILED: Final = 0x0000_1022
_WARNING: Final = 0x0000_1023
_MOVE_ORIGINATOR_AE: Final = 0x0000_1030
_MOVE_ORIGINATOR_ID: Final = 0x0000_1031
_US: Final = frozenset(
    {
        _COMMAND_FIELD,
        _MESSAGE_ID,
        _RESPONDED_TO,
        _PRIORITY,
        _DATASET_TYPE,
        _STATUS,
        _EVENT_TYPE,
        _ACTION_TYPE,
        _REMAINING,
        _COMPLETED,
        _FAILED,
        _WARNING,
        _MOVE_ORIGINATOR_ID,
    }
)
_UI: Final = frozenset(
    {_AFFECTED_SOP_CLASS, _REQUESTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE, _REQUESTED_SOP_INSTANCE}
)
_ELEMENT: Final = struct.Struct("<HHI")
_US_VALUE: Final = struct.Struct("<H")
_UL_VALUE: Final = struct.Struct("<I")


class DimseError(Exception):
    """A command set we cannot read."""


@dataclass(frozen=True, slots=True)
class Command:
    """The elements of a command set the listener uses; `None`: absent."""

    command_field: int
    message_id: int | None = None
    responded_to: int | None = None
    affected_sop_class: str | None = None
    affected_sop_instance: str | None = None
    requested_sop_class: str | None = None
    priority: int | None = None
    dataset_type: int = NO_DATASET
    status: int | None = None
    error_comment: str | None = None
    requested_sop_instance: str | None = None
    event_type: int | None = None
    action_type: int | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    move_destination: str | None = None
    move_originator_ae: str | None = None
    move_originator_id: int | None = None

    @property
    def has_dataset(self) -> bool:
        return self.dataset_type != NO_DATASET

    @property
    def is_request(self) -> bool:
        return not self.command_field & RESPONSE_BIT


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Read a command set (implicit VR little endian). Unknown elements are skipped."""
    raw = bytes(data)
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 8:
            raise DimseError("command element header cut")
        group, element, length = _ELEMENT.unpack_from(raw, offset)
        if group != 0:
            raise DimseError("command set element outside group 0000")
        offset += 8
        if length > len(raw) - offset:
            raise DimseError("command element value out of the command set")
        values[element] = raw[offset : offset + length]
        offset += length
    if _COMMAND_FIELD not in values:
        raise DimseError("no Command Field")
    return Command(
        command_field=_us(values, _COMMAND_FIELD) or 0,
        message_id=_us(values, _MESSAGE_ID),
        responded_to=_us(values, _RESPONDED_TO),
        affected_sop_class=_ui(values, _AFFECTED_SOP_CLASS),
        affected_sop_instance=_ui(values, _AFFECTED_SOP_INSTANCE),
        requested_sop_class=_ui(values, _REQUESTED_SOP_CLASS),
        priority=_us(values, _PRIORITY),
        dataset_type=_dataset_type(values),
        status=_us(values, _STATUS),
        error_comment=_text(values, _ERROR_COMMENT),
        requested_sop_instance=_ui(values, _REQUESTED_SOP_INSTANCE),
        event_type=_us(values, _EVENT_TYPE),
        action_type=_us(values, _ACTION_TYPE),
        remaining=_us(values, _REMAINING),
        completed=_us(values, _COMPLETED),
        failed=_us(values, _FAILED),
        warning=_us(values, _WARNING),
        move_destination=_text(values, _MOVE_DESTINATION),
        move_originator_ae=_text(values, _MOVE_ORIGINATOR_AE),
        move_originator_id=_us(values, _MOVE_ORIGINATOR_ID),
    )


def _dataset_type(values: dict[int, bytes]) -> int:
    value = _us(values, _DATASET_TYPE)
    return NO_DATASET if value is None else value


def _us(values: dict[int, bytes], tag: int) -> int | None:
    value = values.get(tag)
    if value is None:
        return None
    if len(value) != 2:
        raise DimseError(f"(0000,{tag:04X}) is not a US value")
    return int(_US_VALUE.unpack(value)[0])


def _ui(values: dict[int, bytes], tag: int) -> str | None:
    value = values.get(tag)
    return None if value is None else value.decode("latin-1").rstrip("\x00 ")


def _text(values: dict[int, bytes], tag: int) -> str | None:
    value = values.get(tag)
    return None if value is None else value.decode("latin-1").strip()


def encode_command(command: Command) -> bytes:
    elements: list[tuple[int, bytes]] = []
    if command.affected_sop_class is not None:
        elements.append((_AFFECTED_SOP_CLASS, _pad_uid(command.affected_sop_class)))
    if command.requested_sop_class is not None:
        elements.append((_REQUESTED_SOP_CLASS, _pad_uid(command.requested_sop_class)))
    elements.append((_COMMAND_FIELD, _US_VALUE.pack(command.command_field)))
    if command.message_id is not None:
        elements.append((_MESSAGE_ID, _US_VALUE.pack(command.message_id)))
    if command.responded_to is not None:
        elements.append((_RESPONDED_TO, _US_VALUE.pack(command.responded_to)))
    if command.move_destination is not None:
        elements.append((_MOVE_DESTINATION, _ae(command.move_destination)))
    if command.priority is not None:
        elements.append((_PRIORITY, _US_VALUE.pack(command.priority)))
    elements.append((_DATASET_TYPE, _US_VALUE.pack(command.dataset_type)))
    if command.status is not None:
        elements.append((_STATUS, _US_VALUE.pack(command.status)))
    if command.error_comment is not None:
        comment = command.error_comment.encode("ascii", "replace")[:ERROR_COMMENT_MAX]
        elements.append((_ERROR_COMMENT, comment + b" " * (len(comment) % 2)))
    if command.affected_sop_instance is not None:
        elements.append((_AFFECTED_SOP_INSTANCE, _pad_uid(command.affected_sop_instance)))
    if command.requested_sop_instance is not None:
        elements.append((_REQUESTED_SOP_INSTANCE, _pad_uid(command.requested_sop_instance)))
    if command.event_type is not None:
        elements.append((_EVENT_TYPE, _US_VALUE.pack(command.event_type)))
    if command.action_type is not None:
        elements.append((_ACTION_TYPE, _US_VALUE.pack(command.action_type)))
    for tag, count in (
        (_REMAINING, command.remaining),
        (_COMPLETED, command.completed),
        (_FAILED, command.failed),
        (_WARNING, command.warning),
    ):
        if count is not None:
            elements.append((tag, _US_VALUE.pack(min(count, 0xFFFF))))
    if command.move_originator_ae is not None:
        elements.append((_MOVE_ORIGINATOR_AE, _ae(command.move_originator_ae)))
    if command.move_originator_id is not None:
        elements.append((_MOVE_ORIGINATOR_ID, _US_VALUE.pack(command.move_originator_id)))
    body = b"".join(_ELEMENT.pack(0, tag, len(value)) + value for tag, value in elements)
    return _ELEMENT.pack(0, _GROUP_LENGTH, 4) + _UL_VALUE.pack(len(body)) + body


def _ae(title: str) -> bytes:
    value = title.encode("ascii", "replace")[:16]
    return value + b" " * (len(value) % 2)


def _pad_uid(uid: str) -> bytes:
    value = uid.encode("latin-1", "replace")
    return value + b"\x00" * (len(value) % 2)


# --- responses --------------------------------------------------------------------------------


def echo_response(request: Command, status: int) -> Command:
    return Command(
        C_ECHO_RSP,
        responded_to=request.message_id or 0,
        affected_sop_class=request.affected_sop_class or "",
        status=status,
    )


def store_response(
    request: Command, status: int, error_comment: str | None = None, placeholder: str = "0"
) -> Command:
    """A C-STORE-RSP; a SOP UID the request lacked is answered as `placeholder`."""
    return Command(
        C_STORE_RSP,
        responded_to=request.message_id or 0,
        affected_sop_class=request.affected_sop_class or placeholder,
        affected_sop_instance=request.affected_sop_instance or placeholder,
        status=status,
        error_comment=error_comment,
    )


def find_response(
    request: Command, status: int, *, identifier: bool = False, error_comment: str | None = None
) -> Command:
    return Command(
        C_FIND_RSP,
        responded_to=request.message_id or 0,
        affected_sop_class=request.affected_sop_class or "",
        dataset_type=HAS_DATASET if identifier else NO_DATASET,
        status=status,
        error_comment=error_comment,
    )


def store_request(
    message_id: int,
    sop_class: str,
    sop_instance: str,
    priority: int,
    originator: tuple[str, int] | None = None,
) -> Command:
    """A C-STORE-RQ of the gateway's own (a C-GET or C-MOVE sub-operation); its dataset
    follows. `originator`: the AE title and Message ID of the C-MOVE it serves."""
    return Command(
        C_STORE_RQ,
        message_id=message_id,
        affected_sop_class=sop_class,
        affected_sop_instance=sop_instance,
        priority=priority,
        dataset_type=HAS_DATASET,
        move_originator_ae=originator[0] if originator else None,
        move_originator_id=originator[1] if originator else None,
    )


def retrieve_response(
    request: Command,
    status: int,
    counts: tuple[int | None, int, int, int],
    *,
    identifier: bool = False,
    error_comment: str | None = None,
) -> Command:
    """A C-GET-RSP or C-MOVE-RSP, after `request`'s kind; `counts`: remaining (None: absent,
    as in a final response), completed, failed and warning sub-operations (PS3.7 C.4.2.1,
    C.4.3.1; capped at 65,535: they are US)."""
    remaining, completed, failed, warning = counts
    return Command(
        request.command_field | RESPONSE_BIT,
        responded_to=request.message_id or 0,
        affected_sop_class=request.affected_sop_class or "",
        dataset_type=HAS_DATASET if identifier else NO_DATASET,
        status=status,
        error_comment=error_comment,
        remaining=remaining,
        completed=completed,
        failed=failed,
        warning=warning,
    )


def unrecognized_response(request: Command) -> Command:
    """The answer to a request of a service we do not provide on that context."""
    return Command(
        request.command_field | RESPONSE_BIT,
        responded_to=request.message_id or 0,
        affected_sop_class=request.affected_sop_class,
        status=UNRECOGNIZED_OPERATION,
    )


def action_response(request: Command, status: int, error_comment: str | None = None) -> Command:
    """An N-ACTION-RSP without an Action Reply (Storage Commitment has none)."""
    return Command(
        N_ACTION_RSP,
        responded_to=request.message_id or 0,
        affected_sop_class=request.requested_sop_class or "",
        affected_sop_instance=request.requested_sop_instance or "",
        status=status,
        error_comment=error_comment,
        action_type=request.action_type,
    )


def event_report_request(
    message_id: int, sop_class: str, sop_instance: str, event_type: int
) -> Command:
    """An N-EVENT-REPORT-RQ whose Event Information follows as a dataset."""
    return Command(
        N_EVENT_REPORT_RQ,
        message_id=message_id,
        affected_sop_class=sop_class,
        affected_sop_instance=sop_instance,
        dataset_type=HAS_DATASET,
        event_type=event_type,
    )
