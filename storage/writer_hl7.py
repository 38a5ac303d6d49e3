"""The HL7 part of a batch, inside the transaction `storage.writer.BatchWriter` opened.

1. The ledger: `hl7_message` rows inserted with ``ON CONFLICT DO NOTHING RETURNING``; a key that
   does not come back was committed before (a resend): DUPLICATE, nothing else is written for it.
2. Patients: the identifiers of each PID are resolved together (one patient per PID: the one a
   known identifier points to, national id first, else a new one) and every unknown identifier
   is linked to it. Bulk: one select, one insert of new patients, one of identifiers, and a
   re-select that is the truth when another replica raced us.
3. Demographics (ADT replaces, in MSH-7 order; ORU fills what is missing), merges (A40),
   then lab reports and observations with binary COPY (ids drawn from their sequences first).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from ingest.records import (
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

_REPORT_COLUMNS = (
    "id",
    "message_id",
    "patient_id",
    "placer_id",
    "filler_id",
    "service_system",
    "service_code",
    "service_display",
    "observed_at",
    "issued_at",
    "status",
    "received_at",
)
_OBSERVATION_COLUMNS = (
    "report_id",
    "patient_id",
    "set_id",
    "value_type",
    "code_system",
    "code",
    "code_display",
    "value_numeric",
    "comparator",
    "value_text",
    "value_code_system",
    "value_code",
    "value_display",
    "unit",
    "reference_range",
    "reference_low",
    "reference_high",
    "abnormal_flags",
    "status",
    "observed_at",
    "received_at",
)

Group = tuple[PatientRef, ...]


@dataclass(slots=True)
class _Fresh:
    """A message stored for the first time in this batch."""

    env: Envelope
    message_id: int
    raw: RawMessage


async def write_hl7(
    conn: asyncpg.Connection, batch: Sequence[Envelope], indexes: Sequence[int]
) -> list[Outcome]:
    """Write the HL7 envelopes `batch[i]` for i in `indexes` (distinct keys); their outcomes."""
    fresh_ids = await _insert_ledger(conn, batch, indexes)
    outcomes: list[Outcome] = []
    fresh: list[_Fresh] = []
    for i in indexes:
        env = batch[i]
        message_id = fresh_ids.get(_key(env))
        if message_id is None:
            outcomes.append(Outcome(OutcomeKind.DUPLICATE))
            continue
        outcomes.append(Outcome(OutcomeKind.STORED))
        raw = _raw_of(env)
        assert raw is not None  # noqa: S101 - the ledger insert needs it
        fresh.append(_Fresh(env, message_id, raw))
    if fresh:
        await _write_content(conn, fresh)
    return outcomes


def _key(env: Envelope) -> tuple[str, str, str]:
    key = env.key
    assert isinstance(key, Hl7Key)  # noqa: S101 - the caller filters on the key type
    return (key.sending_application, key.sending_facility, key.control_id)


def _raw_of(env: Envelope) -> RawMessage | None:
    for record in env.records:
        if isinstance(record, RawMessage):
            return record
    return None


async def _insert_ledger(
    conn: asyncpg.Connection, batch: Sequence[Envelope], indexes: Sequence[int]
) -> dict[tuple[str, str, str], int]:
    columns: tuple[list[object], ...] = tuple([] for _ in range(11))
    for i in indexes:
        env = batch[i]
        raw = _raw_of(env)
        if raw is None:
            raise ValueError("an HL7 envelope must carry its RawMessage")
        app, facility, control = _key(env)
        values = (
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
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    rows = await conn.fetch(
        """INSERT INTO hl7_message (sending_application, sending_facility, control_id,
                                    message_type, version, charset, sent_at, received_at,
                                    size, sha256, raw)
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                $6::text[], $7::timestamptz[], $8::timestamptz[], $9::int[],
                                $10::bytea[], $11::bytea[])
           ON CONFLICT (sending_application, sending_facility, control_id) DO NOTHING
           RETURNING id, sending_application, sending_facility, control_id""",
        *columns,
    )
    return {
        (r["sending_application"], r["sending_facility"], r["control_id"]): r["id"] for r in rows
    }


async def _write_content(conn: asyncpg.Connection, fresh: list[_Fresh]) -> None:
    groups: list[Group] = []
    for item in fresh:
        for record in item.env.records:
            if isinstance(record, PatientDemographics):
                groups.append(record.identifiers)
            elif isinstance(record, LabReport):
                groups.append(record.patient)
            elif isinstance(record, PatientMerge):
                groups.extend((record.survivor, record.prior))
    if not groups:
        return
    patients = await resolve_patient_groups(conn, groups)

    await _apply_demographics(conn, fresh, patients)
    await _apply_merges(conn, fresh, patients)
    await _insert_reports(conn, fresh, patients)


async def resolve_patient_groups(
    conn: asyncpg.Connection, groups: Sequence[Group]
) -> dict[Group, int]:
    """The patient id of each group of identifiers seen together, creating what is missing.

    A known identifier resolves to its surviving patient (merged patients to their survivor);
    the first identifier of a group that resolves decides (national id first, as mapped).
    """
    refs = sorted({(r.system, r.value) for g in groups for r in g})
    known = await _select(conn, refs)
    assigned: dict[tuple[str, str], int] = dict(known)  # new patients: -1, -2, ...
    new_count = 0
    links: list[tuple[str, str, int]] = []
    for group in groups:
        keys = [(r.system, r.value) for r in group]
        owner = next((assigned[k] for k in keys if k in assigned), None)
        if owner is None:
            new_count += 1
            owner = -new_count
        for k in keys:
            if k not in assigned:
                assigned[k] = owner
                links.append((k[0], k[1], owner))
    if links:
        new_ids: list[int] = []
        if new_count:
            rows = await conn.fetch(
                "INSERT INTO patient (names) SELECT '[]'::jsonb FROM generate_series(1, $1)"
                " RETURNING id",
                new_count,
            )
            new_ids = [r["id"] for r in rows]
        links.sort()
        await conn.execute(
            """INSERT INTO patient_identifier (system, value, patient_id)
               SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
               ON CONFLICT (system, value) DO NOTHING""",
            [k[0] for k in links],
            [k[1] for k in links],
            [owner if owner > 0 else new_ids[-owner - 1] for _, _, owner in links],
        )
        # Another replica may have linked some identifiers meanwhile: what is committed wins.
        known = await _select(conn, refs)
        used = set(known.values())
        orphans = [pid for pid in new_ids if pid not in used]
        if orphans:
            await conn.execute("DELETE FROM patient WHERE id = ANY($1::bigint[])", orphans)
    result: dict[Group, int] = {}
    for group in groups:
        result[group] = next(known[(r.system, r.value)] for r in group)
    return result


async def _select(
    conn: asyncpg.Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    rows = await conn.fetch(
        """SELECT pi.system, pi.value, coalesce(p.replaced_by, pi.patient_id) AS patient_id
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


async def _apply_demographics(
    conn: asyncpg.Connection, fresh: list[_Fresh], patients: dict[Group, int]
) -> None:
    # Per patient: the newest authoritative (ADT) demographics, and the first fill-in (ORU).
    replace: dict[int, tuple[PatientDemographics, datetime | None]] = {}
    fill: dict[int, PatientDemographics] = {}
    for item in fresh:
        stamp = item.raw.sent_at or item.env.received_at
        for record in item.env.records:
            if not isinstance(record, PatientDemographics):
                continue
            pid = patients[record.identifiers]
            if record.authoritative:
                current = replace.get(pid)
                if current is None or (current[1] is not None and stamp >= current[1]):
                    replace[pid] = (record, stamp)
            elif pid not in fill and (record.names or record.birth_date or record.gender):
                fill[pid] = record
    if replace:
        items = sorted(replace.items())
        await conn.execute(
            """UPDATE patient p SET names = u.names::jsonb, family = NULL, given = NULL,
                      birth_date = u.birth_date, gender = u.gender,
                      demographics_at = u.stamp, updated_at = now()
               FROM unnest($1::bigint[], $2::text[], $3::date[], $4::text[], $5::timestamptz[])
                    AS u(id, names, birth_date, gender, stamp)
               WHERE p.id = u.id
                 AND (p.demographics_at IS NULL OR p.demographics_at <= u.stamp)""",
            [pid for pid, _ in items],
            [_names_json(d.names) for _, (d, _) in items],
            [d.birth_date for _, (d, _) in items],
            [d.gender for _, (d, _) in items],
            [stamp for _, (_, stamp) in items],
        )
    if fill:
        items_fill = sorted(fill.items())
        await conn.execute(
            """UPDATE patient p SET
                   names = CASE WHEN p.names = '[]'::jsonb THEN u.names::jsonb ELSE p.names END,
                   birth_date = coalesce(p.birth_date, u.birth_date),
                   gender = coalesce(p.gender, u.gender),
                   updated_at = now()
               FROM unnest($1::bigint[], $2::text[], $3::date[], $4::text[])
                    AS u(id, names, birth_date, gender)
               WHERE p.id = u.id
                 AND (p.names = '[]'::jsonb OR p.birth_date IS NULL OR p.gender IS NULL)""",
            [pid for pid, _ in items_fill],
            [_names_json(d.names) for _, d in items_fill],
            [d.birth_date for _, d in items_fill],
            [d.gender for _, d in items_fill],
        )


async def _apply_merges(
    conn: asyncpg.Connection, fresh: list[_Fresh], patients: dict[Group, int]
) -> None:
    for item in fresh:
        for record in item.env.records:
            if not isinstance(record, PatientMerge):
                continue
            # Resolve again: an earlier merge of this batch may have moved either side.
            survivor = await _survivor(conn, patients[record.survivor])
            prior = await _survivor(conn, patients[record.prior])
            if survivor == prior:
                continue
            await conn.execute(
                """UPDATE patient SET replaced_by = $1, updated_at = now()
                   WHERE id = $2 OR replaced_by = $2""",
                survivor,
                prior,
            )
            await conn.execute(
                "INSERT INTO patient_merge (prior_id, survivor_id, message_id) VALUES ($1, $2, $3)",
                prior,
                survivor,
                item.message_id,
            )


async def _survivor(conn: asyncpg.Connection, patient_id: int) -> int:
    value = await conn.fetchval(
        "SELECT coalesce(replaced_by, id) FROM patient WHERE id = $1", patient_id
    )
    return int(value)


async def _insert_reports(
    conn: asyncpg.Connection, fresh: list[_Fresh], patients: dict[Group, int]
) -> None:
    reports = [
        (item, record)
        for item in fresh
        for record in item.env.records
        if isinstance(record, LabReport)
    ]
    if not reports:
        return
    ids = [
        r["id"]
        for r in await conn.fetch(
            "SELECT nextval(pg_get_serial_sequence('lab_report', 'id')) AS id"
            " FROM generate_series(1, $1)",
            len(reports),
        )
    ]
    report_rows = []
    observation_rows = []
    for report_id, (item, report) in zip(ids, reports, strict=True):
        patient_id = patients[report.patient]
        received = item.env.received_at
        report_rows.append(
            (
                report_id,
                item.message_id,
                patient_id,
                report.placer_id,
                report.filler_id,
                report.service.system,
                report.service.code,
                report.service.display,
                report.observed_at,
                report.issued_at,
                report.status,
                received,
            )
        )
        for obs in report.observations:
            coded = obs.coded
            observation_rows.append(
                (
                    report_id,
                    patient_id,
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
                    list(obs.abnormal_flags),
                    obs.status,
                    obs.observed_at or report.observed_at,
                    received,
                )
            )
    await conn.copy_records_to_table("lab_report", records=report_rows, columns=_REPORT_COLUMNS)
    if observation_rows:
        await conn.copy_records_to_table(
            "lab_observation", records=observation_rows, columns=_OBSERVATION_COLUMNS
        )
