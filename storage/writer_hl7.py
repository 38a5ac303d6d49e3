"""The HL7 part of a batch: one read, then one call of `hl7_write_batch` (migration 0010).

1. Which identifiers of the batch's PIDs (and MRGs) are known: one select, no transaction
   needed. Each group of identifiers seen together resolves to one patient: the one a known
   identifier points to (the first that resolves decides, national id first as mapped; merged
   patients to their survivor), else a new one; every unknown identifier is linked to it.
2. `hl7_write_batch` does the rest in one statement: the ledger (``ON CONFLICT DO NOTHING``; a
   key already there is a resend: DUPLICATE, nothing else written for it), the new patients and
   links (what another replica committed meanwhile wins), demographics (ADT replaces in MSH-7
   order; ORU fills what is missing), merges (A40) in batch order, then the lab reports and
   their observations.

A batch of HL7 messages only is thus a read and a statement PostgreSQL commits on its own; before
migration 0010 a small batch of ORU^R01 for new patients took nine round trips.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import orjson

from ingest.records import (
    DeadLetter,
    Envelope,
    Hl7Key,
    LabReport,
    Outcome,
    OutcomeKind,
    PatientDemographics,
    PatientMerge,
    PatientName,
    PatientRef,
    RawMessage,
)

Group = tuple[PatientRef, ...]


def single_statement(env: Envelope) -> bool:
    """True when `write_hl7` writes `env` in its one statement (a message, no dead letter): a
    batch of such envelopes only is atomic without an explicit transaction."""
    return isinstance(env.key, Hl7Key) and not any(
        isinstance(record, DeadLetter) for record in env.records
    )


async def write_hl7(
    conn: asyncpg.Connection, batch: Sequence[Envelope], indexes: Sequence[int]
) -> list[Outcome]:
    """Write the HL7 envelopes `batch[i]` for i in `indexes` (distinct keys); their outcomes."""
    call = _Call()
    for i in indexes:
        call.add_message(batch[i])
    await call.resolve(conn)
    arguments = call.arguments()
    fresh = await conn.fetchval(_call_of(len(arguments)), *arguments)
    return [
        Outcome(OutcomeKind.STORED if message_id is not None else OutcomeKind.DUPLICATE)
        for message_id in fresh
    ]


@functools.cache
def _call_of(count: int) -> str:
    placeholders = ", ".join(f"${n}" for n in range(1, count + 1))
    return f"SELECT hl7_write_batch({placeholders})"


def _key(env: Envelope) -> tuple[str, str, str]:
    key = env.key
    assert isinstance(key, Hl7Key)  # noqa: S101 - the caller filters on the key type
    return (key.sending_application, key.sending_facility, key.control_id)


def _raw_of(env: Envelope) -> RawMessage | None:
    for record in env.records:
        if isinstance(record, RawMessage):
            return record
    return None


def _columns(count: int) -> tuple[list[object], ...]:
    return tuple([] for _ in range(count))


def _append(columns: tuple[list[object], ...], values: tuple[object, ...]) -> None:
    for column, value in zip(columns, values, strict=True):
        column.append(value)


@dataclass(slots=True)
class _Call:
    """The arguments of one `hl7_write_batch` call, gathered message by message."""

    messages: tuple[list[object], ...] = field(default_factory=lambda: _columns(11))
    groups: list[Group] = field(default_factory=list)
    group_message: list[int] = field(default_factory=list)
    demographics: list[_Pid] = field(default_factory=list)
    group_owner: list[int] = field(default_factory=list)
    merges: tuple[list[object], ...] = field(default_factory=lambda: _columns(2))
    reports: tuple[list[object], ...] = field(default_factory=lambda: _columns(9))
    observations: list[dict[str, object]] = field(default_factory=list)
    new_patients: tuple[list[object], ...] = field(default_factory=lambda: _columns(3))
    links: tuple[list[object], ...] = field(default_factory=lambda: _columns(3))

    def add_message(self, env: Envelope) -> None:
        raw = _raw_of(env)
        if raw is None:
            raise ValueError("an HL7 envelope must carry its RawMessage")
        app, facility, control = _key(env)
        _append(
            self.messages,
            (
                app,
                facility,
                control,
                raw.message_type,
                raw.version,
                raw.charset,
                raw.sent_at,
                env.received_at,
                len(raw.raw),
                hashlib.sha256(raw.raw).digest(),
                raw.raw,
            ),
        )
        stamp = raw.sent_at or env.received_at
        for record in env.records:
            if isinstance(record, PatientDemographics):
                self.demographics.append(
                    _Pid(self._group(record.identifiers), record, _names_json(record.names), stamp)
                )
            elif isinstance(record, LabReport):
                self._add_report(record)
            elif isinstance(record, PatientMerge):
                _append(self.merges, (self._group(record.survivor), self._group(record.prior)))

    def _group(self, identifiers: Group) -> int:
        if not identifiers:
            raise ValueError("a patient of an HL7 message has no identifier")
        self.groups.append(identifiers)
        self.group_message.append(len(self.messages[0]))
        return len(self.groups)

    def _add_report(self, report: LabReport) -> None:
        _append(
            self.reports,
            (
                self._group(report.patient),
                report.placer_id,
                report.filler_id,
                report.service.system,
                report.service.code,
                report.service.display,
                report.observed_at,
                report.issued_at,
                report.status,
            ),
        )
        number = len(self.reports[0])
        for obs in report.observations:
            row: dict[str, object] = {
                "r": number,
                "s": obs.set_id,
                "value_type": obs.value_type,
                "code_system": obs.code.system,
                "code": obs.code.code,
                "code_display": obs.code.display,
                "unit": obs.unit,
                "ref_range": obs.reference_range,
                "status": obs.status,
            }
            if obs.numeric is not None:
                row["num"] = obs.numeric
            if obs.comparator is not None:
                row["comparator"] = obs.comparator
            if obs.text is not None:
                row["txt"] = obs.text
            if (coded := obs.coded) is not None:
                row["value_system"] = coded.system
                row["value_code"] = coded.code
                row["value_display"] = coded.display
            if obs.reference_low is not None:
                row["low"] = obs.reference_low
            if obs.reference_high is not None:
                row["high"] = obs.reference_high
            if obs.abnormal_flags:
                row["flags"] = obs.abnormal_flags
            if (observed := obs.observed_at or report.observed_at) is not None:
                row["observed_at"] = observed
            self.observations.append(row)

    async def resolve(self, conn: asyncpg.Connection) -> None:
        """Which new patients to create and which identifiers to link to whom.

        A known identifier resolves to its surviving patient; in each group the first that
        resolves (known, or linked by an earlier group of the batch) decides, else the group
        gets a new patient (-1, -2... until `hl7_write_batch` creates them). A new patient is
        created with what the batch's first ORU about them says (ORU fills what is missing,
        and at creation everything is); an ORU that can fill nothing is left out.
        """
        if not self.groups:
            return
        refs = sorted({(r.system, r.value) for group in self.groups for r in group})
        assigned, gaps = await _known(conn, refs)
        owners = self.group_owner
        created = 0
        for group in self.groups:
            keys = [(r.system, r.value) for r in group]
            owner = next((assigned[k] for k in keys if k in assigned), None)
            if owner is None:
                created += 1
                owner = -created
            owners.append(owner)
            for k in keys:
                if k not in assigned:
                    assigned[k] = owner
                    _append(self.links, (k[0], k[1], owner))
        replaced = {owners[pid.group - 1] for pid in self.demographics if pid.record.authoritative}
        first: dict[int, _Pid] = {}
        kept: list[_Pid] = []
        for pid in self.demographics:
            owner = owners[pid.group - 1]
            record = pid.record
            if record.authoritative or owner in replaced:
                kept.append(pid)  # an ADT of the batch may change what is missing
            elif owner < 0:
                if owner in first:
                    kept.append(pid)
                elif record.names or record.birth_date or record.gender:
                    first[owner] = pid
            elif _fills_a_gap(record, gaps.get(owner)):
                kept.append(pid)
        self.demographics = kept
        for number in range(1, created + 1):
            pid_of = first.get(-number)
            _append(
                self.new_patients,
                (pid_of.names, pid_of.record.birth_date, pid_of.record.gender)
                if pid_of
                else ("[]", None, None),
            )

    def arguments(self) -> list[object]:
        return [
            *self.messages,
            *self.new_patients,
            *self.links,
            self.group_message,
            self.group_owner,
            [group[0].system for group in self.groups],
            [group[0].value for group in self.groups],
            [pid.group for pid in self.demographics],
            [pid.record.authoritative for pid in self.demographics],
            [pid.names for pid in self.demographics],
            [pid.record.birth_date for pid in self.demographics],
            [pid.record.gender for pid in self.demographics],
            [pid.stamp for pid in self.demographics],
            *self.merges,
            *self.reports,
            orjson.dumps(self.observations).decode(),
        ]


@dataclass(frozen=True, slots=True)
class _Pid:
    """A PID's demographics in the call: its group, names as JSON, stamp (MSH-7 or arrival)."""

    group: int
    record: PatientDemographics
    names: str
    stamp: datetime


@dataclass(frozen=True, slots=True)
class _Gaps:
    """What a stored patient lacks, as the identifier select saw it (ORU fills only these)."""

    names: bool
    birth_date: bool
    gender: bool


def _fills_a_gap(record: PatientDemographics, gaps: _Gaps | None) -> bool:
    """Whether an ORU's demographics would change the patient (unknown gaps: assume so)."""
    if gaps is None:
        return bool(record.names or record.birth_date or record.gender)
    return bool(
        (gaps.names and record.names)
        or (gaps.birth_date and record.birth_date)
        or (gaps.gender and record.gender)
    )


async def _known(
    conn: asyncpg.Connection, keys: list[tuple[str, str]]
) -> tuple[dict[tuple[str, str], int], dict[int, _Gaps]]:
    """The surviving patient of each stored identifier among `keys`, and what each lacks."""
    rows = await conn.fetch(
        """SELECT pi.system, pi.value, s.id AS patient_id, s.names = '[]'::jsonb AS no_names,
                  s.birth_date IS NULL AS no_birth_date, s.gender IS NULL AS no_gender
           FROM unnest($1::text[], $2::text[]) AS k(system, value)
           JOIN patient_identifier pi USING (system, value)
           JOIN patient p ON p.id = pi.patient_id
           JOIN patient s ON s.id = coalesce(p.replaced_by, p.id)""",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    gaps = {r["patient_id"]: _Gaps(r["no_names"], r["no_birth_date"], r["no_gender"]) for r in rows}
    return {(r["system"], r["value"]): r["patient_id"] for r in rows}, gaps


def _names_json(names: Sequence[PatientName]) -> str:
    entries = []
    for name in names:
        entry: dict[str, object] = {}
        if name.use:
            entry["use"] = name.use
        if name.family:
            entry["family"] = name.family
        if name.given:
            entry["given"] = list(name.given)
        if name.prefix:
            entry["prefix"] = list(name.prefix)
        if name.suffix:
            entry["suffix"] = list(name.suffix)
        entries.append(entry)
    return json.dumps(entries, ensure_ascii=False)
