"""HL7 v2 acknowledgements, built without I/O: which codes to send, and the ACK bytes for each.

`build_ack` answers a message whose header we could read: sender and receiver swapped, the same
delimiters and MSH-18 charset, MSA-2 echoing MSH-10, and an ERR segment for errors (v2.5 layout,
plus ERR-1 and MSA-3 for v2.3/v2.4 senders). `build_fallback_ack` answers bytes that had no
readable header. `acks_to_send` holds the original/enhanced mode rules (MSH-15, MSH-16).
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from hl7.er7 import SUPPORTED_VERSIONS, Encoding, MessageHeader
from ingest.errors import InputError

HL7_ERROR_TABLE = "HL70357"
FALLBACK_VERSION = "2.5"
_PRE_25_VERSIONS = frozenset({"2.1", "2.2", "2.3", "2.3.1", "2.4"})
_NO_MESSAGE_STRUCTURE = frozenset({"2.1", "2.2", "2.3"})


class AckCode(enum.StrEnum):
    """HL7 table 0008: MSA-1."""

    APPLICATION_ACCEPT = "AA"
    APPLICATION_ERROR = "AE"
    APPLICATION_REJECT = "AR"
    COMMIT_ACCEPT = "CA"
    COMMIT_ERROR = "CE"
    COMMIT_REJECT = "CR"

    @property
    def is_success(self) -> bool:
        return self in (AckCode.APPLICATION_ACCEPT, AckCode.COMMIT_ACCEPT)


class ErrorCode(enum.IntEnum):
    """HL7 table 0357: message error condition codes (ERR-3)."""

    MESSAGE_ACCEPTED = 0
    SEGMENT_SEQUENCE_ERROR = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE_ERROR = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT_CODE = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION_ID = 203
    UNKNOWN_KEY_IDENTIFIER = 204
    DUPLICATE_KEY_IDENTIFIER = 205
    APPLICATION_RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def text(self) -> str:
        """The table's description, as written in ERR-3.2."""
        return _ERROR_TEXTS[self]


_ERROR_TEXTS = {
    ErrorCode.MESSAGE_ACCEPTED: "Message accepted",
    ErrorCode.SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE_ERROR: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION_ID: "Unsupported version id",
    ErrorCode.UNKNOWN_KEY_IDENTIFIER: "Unknown key identifier",
    ErrorCode.DUPLICATE_KEY_IDENTIFIER: "Duplicate key identifier",
    ErrorCode.APPLICATION_RECORD_LOCKED: "Application record locked",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}


class Severity(enum.StrEnum):
    """HL7 table 0516: ERR-4."""

    ERROR = "E"
    WARNING = "W"
    INFORMATION = "I"


@dataclass(frozen=True, slots=True)
class ErrorLocation:
    """Where the error is (ERR-2): segment id, its sequence among its kind, field and below."""

    segment: str
    sequence: int = 1
    field: int | None = None
    repetition: int | None = None
    component: int | None = None
    subcomponent: int | None = None

    def parts(self) -> list[str]:
        values = (
            self.segment,
            self.sequence,
            self.field,
            self.repetition,
            self.component,
            self.subcomponent,
        )
        return _trim(["" if v is None else str(v) for v in values])


@dataclass(frozen=True, slots=True)
class AckError:
    """One error to report in an ERR segment. `message` (ERR-8) must not carry patient data."""

    code: ErrorCode
    message: str = ""
    location: ErrorLocation | None = None
    severity: Severity = Severity.ERROR


class Outcome(enum.Enum):
    """What happened to a message, as the acknowledgement rules need it."""

    COMMITTED = "committed"  # stored now, or already stored (a resend)
    CONTENT_ERROR = "content-error"  # readable but wrong: AE / CE
    REJECTED = "rejected"  # unsupported version, processing id, or unreadable: AR / CR
    NOT_COMMITTED = "not-committed"  # storage unavailable: no ACK, the sender resends


_ORIGINAL_CODES = {
    Outcome.COMMITTED: AckCode.APPLICATION_ACCEPT,
    Outcome.CONTENT_ERROR: AckCode.APPLICATION_ERROR,
    Outcome.REJECTED: AckCode.APPLICATION_REJECT,
}
_ACCEPT_CODES = {
    Outcome.COMMITTED: AckCode.COMMIT_ACCEPT,
    Outcome.CONTENT_ERROR: AckCode.COMMIT_ERROR,
    Outcome.REJECTED: AckCode.COMMIT_REJECT,
}


def _wanted(condition: str, code: AckCode) -> bool:
    """HL7 table 0155 for one ack: AL always, NE never, ER on error, SU on success.

    In enhanced mode an empty or unknown condition counts as AL: a sender left waiting for an
    answer it asked for is worse than one receiving an answer it may ignore.
    """
    condition = condition.strip().upper()
    if condition == "NE":
        return False
    if condition == "ER":
        return not code.is_success
    if condition == "SU":
        return code.is_success
    return True


def acks_to_send(
    outcome: Outcome, accept_ack_type: str = "", application_ack_type: str = ""
) -> tuple[AckCode, ...]:
    """The acknowledgement codes to send, in order, for a message with this MSH-15/MSH-16.

    Original mode (both empty): one AA/AE/AR. Enhanced mode: the accept ack CA/CE/CR as MSH-15
    asks, then the application ack AA/AE/AR as MSH-16 asks. Nothing when not committed.
    """
    if outcome is Outcome.NOT_COMMITTED:
        return ()
    application = _ORIGINAL_CODES[outcome]
    if not accept_ack_type.strip() and not application_ack_type.strip():
        return (application,)
    accept = _ACCEPT_CODES[outcome]
    codes: list[AckCode] = []
    if _wanted(accept_ack_type, accept):
        codes.append(accept)
    if _wanted(application_ack_type, application):
        codes.append(application)
    return tuple(codes)


def check_acceptance(
    header: MessageHeader, *, processing_ids: Collection[str] = ("P",)
) -> AckError | None:
    """The reason to reject (AR) a message before reading its content, or None to go on.

    Rejects versions outside `SUPPORTED_VERSIONS` (203) and processing ids (MSH-11.1) outside
    `processing_ids` (202): training or debugging messages are not patient data.
    """
    if header.version not in SUPPORTED_VERSIONS:
        return AckError(
            ErrorCode.UNSUPPORTED_VERSION_ID,
            f"HL7 version {header.version!r} is not supported; use one of "
            + ", ".join(SUPPORTED_VERSIONS),
            ErrorLocation("MSH", 1, 12),
        )
    if header.processing_id not in processing_ids:
        return AckError(
            ErrorCode.UNSUPPORTED_PROCESSING_ID,
            f"processing id {header.processing_id!r} is not accepted here",
            ErrorLocation("MSH", 1, 11),
        )
    return None


def check_certified_facility(header: MessageHeader, certified: Collection[str]) -> AckError | None:
    """The reason to reject (AR) a message whose sending facility (MSH-4.1) is not a commonName
    of the client's TLS certificate (`certified`), or None. Identifiers without an assigning
    authority are scoped by MSH-4.1 and ADT merges act on them: a sender with a valid
    certificate must not write under another facility's name."""
    facility = header.segment.value(4).strip()
    if facility and facility in certified:
        return None
    return AckError(
        ErrorCode.APPLICATION_INTERNAL_ERROR,
        "the sending facility (MSH-4.1) is not the one named by the client's TLS certificate",
        ErrorLocation("MSH", 1, 4),
    )


_REASON_CODES = {
    "undecodable-text": ErrorCode.DATA_TYPE_ERROR,
    "bad-escape-sequence": ErrorCode.DATA_TYPE_ERROR,
    "unsupported-charset": ErrorCode.DATA_TYPE_ERROR,
    "bad-segment-id": ErrorCode.SEGMENT_SEQUENCE_ERROR,
}


def ack_error_for(error: InputError) -> AckError:
    """The ERR content for an `InputError` raised while reading a message.

    ``missing-msh-N`` becomes 101 at MSH-N; text and charset problems 102; unknown reasons 207.
    The ERR-8 text is the error's `detail`, which by contract carries no patient data.
    """
    reason = error.reason
    if reason.startswith("missing-msh-") and reason[12:].isdigit():
        location = ErrorLocation("MSH", 1, int(reason[12:]))
        return AckError(ErrorCode.REQUIRED_FIELD_MISSING, error.detail, location)
    if reason == "unsupported-charset":
        return AckError(ErrorCode.DATA_TYPE_ERROR, error.detail, ErrorLocation("MSH", 1, 18))
    code = _REASON_CODES.get(reason, ErrorCode.APPLICATION_INTERNAL_ERROR)
    return AckError(code, error.detail)


def build_ack(
    header: MessageHeader,
    code: AckCode,
    *,
    error: AckError | None = None,
    now: datetime,
    control_id: str,
) -> bytes:
    """The ACK answering `header`'s message, encoded in that message's charset.

    `now` (timezone-aware) becomes MSH-7 and `control_id` MSH-10 of the ACK.
    """
    seg = header.segment
    version = header.version
    msg_type = ["ACK", header.trigger_event]
    if version not in _NO_MESSAGE_STRUCTURE:
        msg_type.append("ACK")
    return _render(
        header.encoding,
        receiving=(seg.raw(3), seg.raw(4)),
        sending=(seg.raw(5), seg.raw(6)),
        message_type=msg_type,
        processing_id=seg.raw(11),
        version=seg.raw(12),
        charset=seg.raw(18),
        acknowledged_id=seg.raw(10),
        pre_25=version in _PRE_25_VERSIONS,
        code=code,
        error=error,
        now=now,
        control_id=control_id,
    )


def build_fallback_ack(
    error: AckError,
    *,
    now: datetime,
    control_id: str,
    code: AckCode = AckCode.APPLICATION_REJECT,
) -> bytes:
    """An AR for bytes without a readable header: default delimiters, UTF-8, v2.5, empty MSA-2."""
    return _render(
        Encoding(),
        receiving=("", ""),
        sending=("", ""),
        message_type=["ACK", "", "ACK"],
        processing_id="P",
        version=FALLBACK_VERSION,
        charset="",
        acknowledged_id="",
        pre_25=False,
        code=code,
        error=error,
        now=now,
        control_id=control_id,
    )


def format_timestamp(now: datetime) -> str:
    """HL7 DTM with seconds and offset: ``YYYYMMDDHHMMSS+ZZZZ``."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("ACK timestamps need a timezone-aware datetime")
    return now.strftime("%Y%m%d%H%M%S%z")


def _render(
    enc: Encoding,
    *,
    receiving: tuple[str, str],
    sending: tuple[str, str],
    message_type: list[str],
    processing_id: str,
    version: str,
    charset: str,
    acknowledged_id: str,
    pre_25: bool,
    code: AckCode,
    error: AckError | None,
    now: datetime,
    control_id: str,
) -> bytes:
    def text(value: str) -> str:
        return enc.escape_text(_encodable(value, enc.codec))

    comp, sub = enc.component, enc.subcomponent
    msh = [
        "MSH",
        enc.characters,
        sending[0],  # MSH-3: we answer as the application the message was sent to
        sending[1],
        receiving[0],
        receiving[1],
        format_timestamp(now),
        "",
        comp.join(_trim([text(c) for c in message_type])),
        text(control_id),
        processing_id,
        version,
        "",
        "",
        "",
        "",
        "",
        charset,
    ]
    msa = ["MSA", str(code), acknowledged_id]
    segments = [msh, msa]
    if error is not None:
        if pre_25:
            msa.append(text(error.message))
        location = error.location.parts() if error.location is not None else []
        condition = [str(int(error.code)), error.code.text, HL7_ERROR_TABLE]
        err = ["ERR", "", comp.join(location), comp.join(condition), str(error.severity)]
        err += ["", "", "", text(error.message)]
        if pre_25:  # ERR-1 (ELD) is the only ERR field v2.3 and v2.4 readers know
            eld = [*[*location, "", "", ""][:3], sub.join(condition)]
            err[1] = comp.join(eld)
        segments.append(err)
    body = "".join(enc.field.join(_trim(s)) + "\r" for s in segments)
    return body.encode(enc.codec)


def _trim(values: list[str]) -> list[str]:
    """Drop trailing empty values, as ER7 writers do."""
    end = len(values)
    while end and not values[end - 1]:
        end -= 1
    return values[:end]


def _encodable(value: str, codec: str) -> str:
    """`value` with characters the charset cannot carry shown as ``?`` (our own texts only)."""
    try:
        value.encode(codec)
    except UnicodeEncodeError:
        return "".join(c if _fits(c, codec) else "?" for c in value)
    return value


def _fits(char: str, codec: str) -> bool:
    try:
        char.encode(codec)
    except UnicodeEncodeError:
        return False
    return True
