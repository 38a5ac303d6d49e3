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
from typing import cast

import asyncpg

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
    demographics: tuple[list[object], ...] = field(default_factory=lambda: _columns(6))
    merges: tuple[list[object], ...] = field(default_factory=lambda: _columns(2))
    reports: tuple[list[object], ...] = field(default_factory=lambda: _columns(9))
    observations: tuple[list[object], ...] = field(default_factory=lambda: _columns(18))
    flags: tuple[list[object], ...] = field(default_factory=lambda: _columns(2))
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
                _append(
                    self.demographics,
                    (
                        self._group(record.identifiers),
                        record.authoritative,
                        _names_json(record.names),
                        record.birth_date,
                        record.gender,
                        stamp,
                    ),
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
            coded = obs.coded
            _append(
                self.observations,
                (
                    number,
                    obs.set_id,
                    obs.value_type,
                    obs.code.system,
                    obs.code.code,
                    obs.code.display,
                    obs.numeric,
                    obs.comparator,
                    obs.text,
                    coded.system if coded else None,
                    coded.code if coded else None,
                    coded.display if coded else None,
                    obs.unit,
                    obs.reference_range,
                    obs.reference_low,
                    obs.reference_high,
                    obs.status,
                    obs.observed_at or report.observed_at,
                ),
            )
            position = len(self.observations[0])
            for flag in obs.abnormal_flags:
                _append(self.flags, (position, flag))

    async def resolve(self, conn: asyncpg.Connection) -> None:
        """Which new patients to create and which identifiers to link to whom.

        A known identifier resolves to its surviving patient; in each group the first that
        resolves (known, or linked by an earlier group of the batch) decides, else the group
        gets a new patient (-1, -2... until `hl7_write_batch` creates them). A new patient is
        created with what the batch's first ORU about them says (ORU fills what is missing,
        and at creation everything is).
        """
        if not self.groups:
            return
        refs = sorted({(r.system, r.value) for group in self.groups for r in group})
        assigned: dict[tuple[str, str], int] = await _known(conn, refs)
        owners: list[int] = []
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
        first: dict[int, tuple[object, object, object]] = {}
        groups, authoritative, names, birth_dates, genders, _ = self.demographics
        for g, adt, name, birth, gender in zip(
            groups, authoritative, names, birth_dates, genders, strict=True
        ):
            owner = owners[cast(int, g) - 1]
            if owner < 0 and not adt and owner not in first and (name != "[]" or birth or gender):
                first[owner] = (name, birth, gender)
        for number in range(1, created + 1):
            _append(self.new_patients, first.get(-number, ("[]", None, None)))

    def arguments(self) -> list[object]:
        return [
            *self.messages,
            *self.new_patients,
            *self.links,
            self.group_message,
            [group[0].system for group in self.groups],
            [group[0].value for group in self.groups],
            *self.demographics,
            *self.merges,
            *self.reports,
            *self.observations,
            *self.flags,
        ]


async def _known(
    conn: asyncpg.Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """The surviving patient of each stored identifier among `keys`."""
    rows = await conn.fetch(
        """SELECT pi.system, pi.value, coalesce(p.replaced_by, p.id) AS patient_id
           FROM unnest($1::text[], $2::text[]) AS k(system, value)
           JOIN patient_identifier pi USING (system, value)
           JOIN patient p ON p.id = pi.patient_id""",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(r["system"], r["value"]): r["patient_id"] for r in rows}


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
