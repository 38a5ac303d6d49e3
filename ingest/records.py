"""What adapters hand to the pipeline: immutable records, natural keys and the envelope around them.

Records are plain frozen dataclasses, free of any protocol library, so that `storage.writer` can
turn them into rows without knowing where they came from.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from datetime import datetime


class Protocol(enum.StrEnum):
    MQTT = "mqtt"
    HL7 = "hl7"
    DICOM = "dicom"


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


Record = VitalsMessage | DeadLetter
Key = MqttKey | DeadLetterKey


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
