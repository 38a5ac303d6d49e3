"""Tokenized HL7 v2 messages to records, without I/O.

`map_message` turns an `Hl7Message` into the records the pipeline stores: always a `RawMessage`
(audit and replay); for ORU^R01 the patient of each PID and a `LabReport` per OBR with its OBX;
for ADT^A01/A04/A08/A28/A31 the patient's identifiers, names, birth date and sex; for ADT^A40 a
`PatientMerge` per PID/MRG pair. Any other type is kept raw only.

Content errors raise `MappingError` (an `InputError`) carrying the HL7 error code and location
for the AE's ERR segment; their text names segments and fields, never patient data.

Identifiers: every PID-3 repetition is kept with its assigning authority as the system; the
national id (authority ``CIN`` or type ``NI``) gets the system ``CIN``, the one the MQTT payload
uses, so that a person's lab results and vitals meet on one patient. An identifier without an
authority is scoped by the sending facility (MSH-4.1).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable
from datetime import date, datetime, timedelta, timezone, tzinfo

from hl7.ack import AckError, ErrorCode, ErrorLocation
from hl7.er7 import Encoding, Hl7Message, Repetition, Segment
from ingest.errors import InputError
from ingest.records import (
    NATIONAL_ID_AUTHORITIES,
    NATIONAL_ID_SYSTEM,
    CodedValue,
    LabObservation,
    LabReport,
    PatientDemographics,
    PatientMerge,
    PatientName,
    PatientRef,
    RawMessage,
    Record,
)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DEMOGRAPHIC_EVENTS = frozenset({"A01", "A04", "A08", "A28", "A31"})
MERGE_EVENT = "A40"

_NUMERIC_TYPES = frozenset({"NM"})
_CODED_TYPES = frozenset({"CE", "CWE", "CNE"})
_SEX = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}
_NAME_USES = {
    "L": "official",
    "D": "usual",
    "M": "maiden",
    "N": "nickname",
    "A": "usual",
    "S": "anonymous",
    "T": "temp",
    "B": "official",
}
_CODE_SYSTEMS = {"LN": LOINC, "LOINC": LOINC, "UCUM": UCUM, "SCT": "http://snomed.info/sct"}
_DTM = re.compile(
    r"(?P<year>\d{4})(?P<month>\d{2})?(?P<day>\d{2})?(?P<hour>\d{2})?(?P<minute>\d{2})?"
    r"(?P<second>\d{2})?(?:\.(?P<fraction>\d{1,6}))?(?P<zone>[+-]\d{4})?",
    re.ASCII,
)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_RANGE = re.compile(
    r"\s*(?P<low>[+-]?\d+(?:\.\d+)?)?\s*(?:-|\u2013|to)\s*(?P<high>[+-]?\d+(?:\.\d+)?)\s*$"
    r"|\s*(?P<op>[<>]=?)\s*(?P<bound>[+-]?\d+(?:\.\d+)?)\s*$",
    re.ASCII,
)


class MappingError(InputError):
    """A readable message whose content we cannot accept: answered with AE and an ERR."""

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        code: ErrorCode,
        location: ErrorLocation | None = None,
    ) -> None:
        super().__init__(reason, detail)
        self.code = code
        self.location = location

    def ack_error(self) -> AckError:
        return AckError(self.code, self.detail, self.location)


def message_type(message: Hl7Message) -> str:
    """MSH-9 as ``ORU^R01`` (type and trigger)."""
    header = message.header
    trigger = header.trigger_event
    return f"{header.message_type}^{trigger}" if trigger else header.message_type


def map_message(message: Hl7Message, tz: tzinfo) -> tuple[Record, ...]:
    """The records of one message; raises `MappingError` for content errors.

    `tz` is the zone of timestamps sent without an offset.
    """
    header = message.header
    raw = RawMessage(
        message_type=message_type(message),
        version=header.version,
        charset=message.encoding.charset,
        sent_at=_optional_time(header.segment, 7, tz),
        raw=message.raw,
    )
    kind, trigger = header.message_type, header.trigger_event
    facility = header.segment.value(4)
    if kind == "ORU" and trigger == "R01":
        return (raw, *_map_results(message, facility, tz))
    if kind == "ADT" and trigger in DEMOGRAPHIC_EVENTS:
        pid = _required_segment(message, "PID")
        return (raw, _demographics(pid, facility, 1, authoritative=True))
    if kind == "ADT" and trigger == MERGE_EVENT:
        return (raw, *_map_merges(message, facility))
    return (raw,)


# --- ORU^R01 ------------------------------------------------------------------------------------


def _map_results(message: Hl7Message, facility: str, tz: tzinfo) -> list[Record]:
    records: list[Record] = []
    reports: list[LabReport] = []
    patient: PatientDemographics | None = None
    report: LabReport | None = None
    observations: list[LabObservation] = []
    counts: dict[str, int] = {}

    def close_report() -> None:
        if report is not None:
            reports.append(dataclasses.replace(report, observations=tuple(observations)))

    for segment in message.all_segments:
        sid = segment.id
        counts[sid] = counts.get(sid, 0) + 1
        seq = counts[sid]
        if sid == "PID":
            close_report()
            report, observations = None, []
            patient = _demographics(segment, facility, seq, authoritative=False)
            records.append(patient)
        elif sid == "OBR":
            if patient is None:
                raise _missing_pid()
            close_report()
            observations = []
            report = _report_fields(segment, seq, patient.identifiers, tz)
        elif sid == "OBX":
            if report is None:
                if patient is None:
                    raise _missing_pid()
                raise MappingError(
                    "obx-without-obr",
                    f"OBX {seq} comes before any OBR",
                    code=ErrorCode.SEGMENT_SEQUENCE_ERROR,
                    location=ErrorLocation("OBX", seq),
                )
            observations.append(_observation(segment, seq, len(observations) + 1, tz))
    close_report()
    if patient is None:
        raise _missing_pid()
    if not reports:
        raise MappingError(
            "missing-obr",
            "an ORU^R01 needs at least one OBR segment",
            code=ErrorCode.REQUIRED_FIELD_MISSING,
            location=ErrorLocation("OBR", 1),
        )
    records.extend(reports)
    return records


def _missing_pid() -> MappingError:
    return MappingError(
        "missing-pid",
        "an ORU^R01 needs a PID segment before its results",
        code=ErrorCode.REQUIRED_FIELD_MISSING,
        location=ErrorLocation("PID", 1),
    )


def _report_fields(
    obr: Segment, seq: int, patient: tuple[PatientRef, ...], tz: tzinfo
) -> LabReport:
    service = _coded(obr.field(4).repetition(1))
    if not service.code and not service.display:
        raise MappingError(
            "missing-obr-4",
            f"OBR {seq}: OBR-4 universal service identifier is empty",
            code=ErrorCode.REQUIRED_FIELD_MISSING,
            location=ErrorLocation("OBR", seq, 4),
        )
    return LabReport(
        patient=patient,
        placer_id=obr.value(2),
        filler_id=obr.value(3),
        service=service,
        observed_at=_time_at(obr, 7, "OBR", seq, tz),
        issued_at=_time_at(obr, 22, "OBR", seq, tz),
        status=obr.value(25),
    )


def _parts(raw: str, enc: Encoding) -> list[str]:
    """The components of a field's first repetition (first subcomponent each), decoded.

    The hot path of OBX mapping: plain splits, unescaping only where an escape appears.
    """
    if enc.repetition in raw:
        raw = raw.partition(enc.repetition)[0]
    parts = raw.split(enc.component)
    sub, esc = enc.subcomponent, enc.escape
    for i, part in enumerate(parts):
        if sub in part:
            part = part.partition(sub)[0]
        if esc in part:
            part = enc.unescape(part)
        parts[i] = part
    return parts


def _first(raw: str, enc: Encoding) -> str:
    """The first component (first subcomponent) of a field's first repetition, decoded.

    `_parts(raw, enc)[0]` without building the list: most OBX fields are plain text.
    """
    if enc.repetition in raw:
        raw = raw.partition(enc.repetition)[0]
    if enc.component in raw:
        raw = raw.partition(enc.component)[0]
    if enc.subcomponent in raw:
        raw = raw.partition(enc.subcomponent)[0]
    if enc.escape in raw:
        return enc.unescape(raw)
    return raw


def _coded_parts(parts: list[str]) -> CodedValue:
    """CE/CWE from its components: identifier, text, system (else the alternate triple)."""
    parts = parts + [""] * (6 - len(parts)) if len(parts) < 6 else parts
    code, display, system = parts[0], parts[1], parts[2]
    if not code and not display:
        code, display, system = parts[3], parts[4], parts[5]
    return CodedValue(system=_CODE_SYSTEMS.get(system.upper(), system), code=code, display=display)


def _observation(obx: Segment, seq: int, position: int, tz: tzinfo) -> LabObservation:
    fields = obx.fields
    enc = obx.encoding
    if len(fields) < 15:
        fields = fields + ("",) * (15 - len(fields))
    value_type = _first(fields[2], enc).upper()
    code = _coded_parts(_parts(fields[3], enc))
    if not code.code and not code.display:
        raise MappingError(
            "missing-obx-3",
            f"OBX {seq}: OBX-3 observation identifier is empty",
            code=ErrorCode.REQUIRED_FIELD_MISSING,
            location=ErrorLocation("OBX", seq, 3),
        )
    set_id_text = fields[1]
    set_id = int(set_id_text) if set_id_text.isdigit() else position
    raw5 = fields[5]
    numeric: float | None = None
    comparator: str | None = None
    text: str | None = None
    coded: CodedValue | None = None
    if not raw5 or raw5 == '""':
        pass
    elif value_type in _NUMERIC_TYPES:
        numeric = _number(_first(raw5, enc).strip(), seq, value_type)
    elif value_type == "SN":
        numeric, comparator, text = _structured_numeric(obx.field(5).repetition(1), seq)
    elif value_type in _CODED_TYPES:
        coded = _coded_parts(_parts(raw5, enc))
    else:  # ST, TX, FT; DT, TS, ID, IS... kept as text (repetitions are lines)
        text = "\n".join(r.value for r in obx.field(5).repetitions)
    reference = _first(fields[7], enc).strip()
    low, high = _reference_bounds(reference)
    flags = fields[8]
    return LabObservation(
        set_id=set_id,
        value_type=value_type,
        code=code,
        numeric=numeric,
        comparator=comparator,
        text=text,
        coded=coded,
        unit=_first(fields[6], enc).strip(),
        reference_range=reference,
        reference_low=low,
        reference_high=high,
        abnormal_flags=(
            tuple(r.value for r in obx.field(8).repetitions if r.value)
            if enc.repetition in flags or enc.escape in flags
            else ((flags.partition(enc.component)[0],) if flags else ())
        ),
        status=_first(fields[11], enc),
        observed_at=_time_text(_first(fields[14], enc), "OBX", seq, 14, tz),
    )


def _number(text: str, seq: int, value_type: str) -> float:
    if _NUMBER.fullmatch(text):
        value = float(text)
        if math.isfinite(value):
            return value
    raise MappingError(
        "obx-value-not-numeric",
        f"OBX {seq}: OBX-5 is not a number but OBX-2 is {value_type}",
        code=ErrorCode.DATA_TYPE_ERROR,
        location=ErrorLocation("OBX", seq, 5),
    )


def _structured_numeric(rep: Repetition, seq: int) -> tuple[float, str | None, str | None]:
    """SN: comparator ^ num1 ^ separator/suffix ^ num2; a ratio or range is also kept as text."""
    comparator = rep.component(1).strip() or None
    first = rep.component(2).strip()
    separator = rep.component(3).strip()
    second = rep.component(4).strip()
    if comparator not in (None, "<", ">", "<=", ">=", "=", "<>"):
        raise MappingError(
            "obx-bad-structured-numeric",
            f"OBX {seq}: OBX-5.1 comparator is not one of < > <= >= = <>",
            code=ErrorCode.DATA_TYPE_ERROR,
            location=ErrorLocation("OBX", seq, 5, 1, 1),
        )
    value = _number(first, seq, "SN")
    text = None
    if separator or second:
        text = f"{comparator or ''}{first}{separator}{second}"
    return value, (None if comparator == "=" else comparator), text


@functools.lru_cache(maxsize=4096)
def _reference_bounds(text: str) -> tuple[float | None, float | None]:
    match = _RANGE.match(text) if text else None
    if match is None:
        return None, None
    if match.group("op"):
        bound = float(match.group("bound"))
        return (None, bound) if match.group("op").startswith("<") else (bound, None)
    low = match.group("low")
    return (float(low) if low is not None else None), float(match.group("high"))


def _coded(rep: Repetition) -> CodedValue:
    """CE/CWE: identifier ^ text ^ coding system (the alternate triple when the first is empty)."""
    code, display, system = rep.component(1), rep.component(2), rep.component(3)
    if not code and not display:
        code, display, system = rep.component(4), rep.component(5), rep.component(6)
    return CodedValue(system=_CODE_SYSTEMS.get(system.upper(), system), code=code, display=display)


# --- patients ------------------------------------------------------------------------------------


def _required_segment(message: Hl7Message, segment_id: str) -> Segment:
    segment = message.segment(segment_id)
    if segment is None:
        raise MappingError(
            f"missing-{segment_id.lower()}",
            f"a {message_type(message)} needs a {segment_id} segment",
            code=ErrorCode.REQUIRED_FIELD_MISSING,
            location=ErrorLocation(segment_id, 1),
        )
    return segment


def identifiers(
    reps: Iterable[Repetition], facility: str, where: ErrorLocation
) -> tuple[PatientRef, ...]:
    """Every identifier of a CX list, national ids under the system ``CIN``; duplicates once."""
    found: list[PatientRef] = []
    for rep in reps:
        value = rep.component(1).strip()
        if not value:
            continue
        authority = rep.component(4, 1).strip() or rep.component(4, 2).strip()
        kind = rep.component(5).strip().upper()
        if authority.upper() in NATIONAL_ID_AUTHORITIES or kind == "NI":
            system = NATIONAL_ID_SYSTEM
        else:
            system = authority or facility.strip() or "HL7"
        ref = PatientRef(system, value)
        if ref not in found:
            found.append(ref)
    if not found:
        raise MappingError(
            f"missing-{where.segment.lower()}-{where.field}",
            f"{where.segment}-{where.field} holds no identifier",
            code=ErrorCode.REQUIRED_FIELD_MISSING,
            location=where,
        )
    # The national id first: it is the identifier the patient is resolved by when ids disagree.
    found.sort(key=lambda r: r.system != NATIONAL_ID_SYSTEM)
    return tuple(found)


def _demographics(
    pid: Segment, facility: str, seq: int, *, authoritative: bool
) -> PatientDemographics:
    refs = identifiers(pid.field(3).repetitions, facility, ErrorLocation("PID", seq, 3))
    names = tuple(n for n in (_name(r) for r in pid.field(5).repetitions) if n is not None)
    return PatientDemographics(
        identifiers=refs,
        names=names,
        birth_date=_birth_date(pid, seq),
        gender=_SEX.get(pid.value(8).strip().upper()),
        authoritative=authoritative,
    )


def _name(rep: Repetition) -> PatientName | None:
    family = rep.component(1, 1).strip() or None
    given = tuple(g for g in (rep.component(2).strip(), rep.component(3).strip()) if g)
    if family is None and not given:
        return None
    suffix = tuple(s for s in (rep.component(4).strip(),) if s)
    prefix = tuple(p for p in (rep.component(5).strip(),) if p)
    return PatientName(
        family=family,
        given=given,
        prefix=prefix,
        suffix=suffix,
        use=_NAME_USES.get(rep.component(7).strip().upper()),
    )


def _birth_date(pid: Segment, seq: int) -> date | None:
    text = pid.value(7).strip()
    if not text:
        return None
    match = _DTM.fullmatch(text)
    try:
        if match is None or match.group("day") is None:
            raise ValueError(text)
        return date(int(text[0:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        raise MappingError(
            "bad-birth-date",
            f"PID {seq}: PID-7 is not a date (YYYYMMDD...)",
            code=ErrorCode.DATA_TYPE_ERROR,
            location=ErrorLocation("PID", seq, 7),
        ) from None


def _map_merges(message: Hl7Message, facility: str) -> list[Record]:
    merges: list[Record] = []
    survivor: tuple[PatientRef, ...] | None = None
    pid_seq = mrg_seq = 0
    for segment in message.all_segments:
        if segment.id == "PID":
            pid_seq += 1
            survivor = identifiers(
                segment.field(3).repetitions, facility, ErrorLocation("PID", pid_seq, 3)
            )
        elif segment.id == "MRG":
            mrg_seq += 1
            if survivor is None:
                raise _required_error("PID")
            prior = identifiers(
                segment.field(1).repetitions, facility, ErrorLocation("MRG", mrg_seq, 1)
            )
            merges.append(PatientMerge(survivor=survivor, prior=prior))
            survivor = None
    if not merges:
        raise _required_error("PID" if pid_seq == 0 else "MRG")
    return merges


def _required_error(segment_id: str) -> MappingError:
    return MappingError(
        f"missing-{segment_id.lower()}",
        f"an ADT^A40 needs a PID followed by an MRG segment (no {segment_id})",
        code=ErrorCode.REQUIRED_FIELD_MISSING,
        location=ErrorLocation(segment_id, 1),
    )


# --- time ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def parse_time(text: str, tz: tzinfo) -> datetime:
    """An HL7 DTM/TS (``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]``) as an aware datetime.

    Without an offset the time is local time of `tz`. Raises ValueError when malformed.
    """
    match = _DTM.fullmatch(text.strip())
    if match is None:
        raise ValueError(text)
    g = match.groupdict()
    fraction = g["fraction"] or ""
    zone: tzinfo = tz
    if g["zone"]:
        sign = -1 if g["zone"][0] == "-" else 1
        hours, minutes = int(g["zone"][1:3]), int(g["zone"][3:5])
        if hours > 23 or minutes > 59:
            raise ValueError(text)
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    return datetime(
        int(g["year"]),
        int(g["month"] or 1),
        int(g["day"] or 1),
        int(g["hour"] or 0),
        int(g["minute"] or 0),
        int(g["second"] or 0),
        int(fraction.ljust(6, "0")) if fraction else 0,
        tzinfo=zone,
    )


def _optional_time(segment: Segment, n: int, tz: tzinfo) -> datetime | None:
    """A header time we do not reject for: None when absent or malformed."""
    text = segment.value(n).strip()
    if not text:
        return None
    try:
        return parse_time(text, tz)
    except ValueError:
        return None


def _time_at(segment: Segment, n: int, segment_id: str, seq: int, tz: tzinfo) -> datetime | None:
    return _time_text(segment.value(n), segment_id, seq, n, tz)


def _time_text(text: str, segment_id: str, seq: int, n: int, tz: tzinfo) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    try:
        return parse_time(text, tz)
    except ValueError:
        raise MappingError(
            f"bad-{segment_id.lower()}-{n}",
            f"{segment_id} {seq}: {segment_id}-{n} is not an HL7 date/time",
            code=ErrorCode.DATA_TYPE_ERROR,
            location=ErrorLocation(segment_id, seq, n),
        ) from None
