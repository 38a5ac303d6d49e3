"""What adapters hand to the pipeline: immutable records, natural keys and the envelope around them.

Records are plain frozen dataclasses, free of any protocol library, so that `storage.writer` can
turn them into rows without knowing where they came from.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Final


class Protocol(enum.StrEnum):
    MQTT = "mqtt"
    HL7 = "hl7"
    DICOM = "dicom"


NATIONAL_ID_SYSTEM: Final = "CIN"
"""The identifier system of the Moroccan national id card number (CNIE), whatever the protocol:
a patient's records from MQTT, HL7 and DICOM meet on it."""
NATIONAL_ID_AUTHORITIES: Final = frozenset({"CIN", "MA-CIN", "CNIE"})
"""Assigning authorities (HL7 CX-4) and Issuer of Patient ID values (DICOM), upper-cased, that
mean the national id: they are all stored under `NATIONAL_ID_SYSTEM`."""


@dataclass(frozen=True, slots=True)
class PatientRef:
    """One identifier of a patient: `system` is a short name (`CIN`) or a URI, `value` its value."""

    system: str
    value: str


@dataclass(frozen=True, slots=True)
class Sample:
    """One numeric measurement: LOINC `code`, UCUM `unit`, device time `t`."""

    t: datetime
    code: str
    value: float
    unit: str


@dataclass(frozen=True, slots=True)
class WaveformSegment:
    """A run of samples at a fixed rate, stored as one segment rather than one row per point."""

    t0: datetime
    code: str
    fs: float
    unit: str
    values: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class VitalsMessage:
    """A validated MQTT vitals payload (contract v1) from one unit."""

    unit_id: str
    seq: int
    sent_at: datetime | None
    device_id: str
    device_kind: str
    patient: PatientRef
    samples: tuple[Sample, ...]
    waveforms: tuple[WaveformSegment, ...] = ()


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Input we refused, kept with its reason; `raw` is the whole input (64 KiB are kept)."""

    protocol: Protocol
    source: str
    reason: str
    detail: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class MqttKey:
    """Natural key of a unit message: a replay of the same seq is the same message."""

    unit_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class DeadLetterKey:
    """Key of input that has no natural key of its own (not parseable): its bytes' digest."""

    protocol: Protocol
    source: str
    sha256: bytes


@dataclass(frozen=True, slots=True)
class Hl7Key:
    """Natural key of an HL7 v2 message: MSH-3 and MSH-4 as sent, and MSH-10."""

    sending_application: str
    sending_facility: str
    control_id: str


@dataclass(frozen=True, slots=True)
class RawMessage:
    """An HL7 message as received, kept with its key for audit and replay."""

    message_type: str  # MSH-9 as ``ORU^R01``
    version: str
    charset: str
    sent_at: datetime | None  # MSH-7
    raw: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class PatientName:
    """One person name (HL7 XPN): text kept exactly as sent, Arabic or French."""

    family: str | None = None
    given: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()
    use: str | None = None  # FHIR name use: official, usual, maiden, nickname...


@dataclass(frozen=True, slots=True)
class PatientDemographics:
    """A patient as one PID segment describes it: every identifier (linked to one patient),
    names, birth date and sex. `authoritative` (ADT) replaces stored demographics; otherwise
    (ORU) they only fill what is missing."""

    identifiers: tuple[PatientRef, ...]
    names: tuple[PatientName, ...] = ()
    birth_date: date | None = None
    gender: str | None = None  # FHIR: male, female, other, unknown
    authoritative: bool = False


@dataclass(frozen=True, slots=True)
class CodedValue:
    """A code from a CE/CWE: `system` as the sender names it (``LN`` is LOINC)."""

    system: str
    code: str
    display: str = ""


@dataclass(frozen=True, slots=True)
class LabObservation:
    """One OBX: a numeric, text or coded value with unit, range, flags, time and status."""

    set_id: int
    value_type: str  # NM, SN, ST, TX, FT, CE, CWE
    code: CodedValue
    numeric: float | None = None
    comparator: str | None = None  # SN: <, <=, >, >=
    text: str | None = None
    coded: CodedValue | None = None
    unit: str = ""
    reference_range: str = ""
    reference_low: float | None = None
    reference_high: float | None = None
    abnormal_flags: tuple[str, ...] = ()
    status: str = ""  # OBX-11: F final, P preliminary, C corrected...
    observed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LabReport:
    """One OBR with its observations; `patient` names the identifiers of its PID."""

    patient: tuple[PatientRef, ...]
    placer_id: str
    filler_id: str
    service: CodedValue
    observed_at: datetime | None = None  # OBR-7
    issued_at: datetime | None = None  # OBR-22
    status: str = ""  # OBR-25
    observations: tuple[LabObservation, ...] = ()


@dataclass(frozen=True, slots=True)
class PatientMerge:
    """ADT^A40: the prior patient (MRG identifiers) is merged into the survivor (PID)."""

    survivor: tuple[PatientRef, ...]
    prior: tuple[PatientRef, ...]


@dataclass(frozen=True, slots=True)
class DicomKey:
    """Natural key of a DICOM instance: its SOP Instance UID."""

    sop_instance_uid: str


@dataclass(frozen=True, slots=True)
class DicomInstance:
    """One received DICOM instance: its index entry, the file already fsynced under a generated
    name (`file_path`, relative to the storage folder), and the patient it names (identifiers
    seen together in one header are linked to one patient). Text is decoded per its Specific
    Character Set; `sha256` is the digest of the stored file."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    file_path: str
    size: int
    sha256: bytes
    calling_ae: str
    patient: tuple[PatientRef, ...] = ()
    patient_name: str = ""  # (0010,0010) decoded, with its ^ and = separators
    patient_names: tuple[PatientName, ...] = ()  # its non-empty component groups
    patient_birth_date: date | None = None
    patient_sex: str = ""
    dicom_patient_id: str = ""
    issuer_of_patient_id: str = ""
    charset: str = ""
    study_date: date | None = None
    study_time: time | None = None
    study_started: datetime | None = None  # only when the header gives a UTC offset
    study_description: str = ""
    study_id: str = ""
    accession_number: str = ""
    referring_physician: str = ""
    series_number: int | None = None
    series_description: str = ""
    modality: str = ""
    body_part: str = ""
    instance_number: int | None = None
    content_date: date | None = None


Record = (
    VitalsMessage
    | DeadLetter
    | RawMessage
    | PatientDemographics
    | LabReport
    | PatientMerge
    | DicomInstance
)
Key = MqttKey | DeadLetterKey | Hl7Key | DicomKey


class OutcomeKind(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an envelope ended, known only after COMMIT.

    `reason` is set for REJECTED; `watermark` is, for MQTT, the unit's highest seq with every
    earlier seq handled, as committed in the same transaction.
    """

    kind: OutcomeKind
    reason: str | None = None
    watermark: int | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """Records sharing one natural key, and the future the pipeline resolves after COMMIT.

    `source` names the sender (unit id, MSH-3/MSH-4, calling AE title) and `raw` keeps the input
    bytes so that a row the database refuses can still be dead-lettered with what was received.
    """

    protocol: Protocol
    key: Key
    records: tuple[Record, ...]
    received_at: datetime
    ack: asyncio.Future[Outcome] = field(repr=False)
    source: str = ""
    raw: bytes = field(default=b"", repr=False)
