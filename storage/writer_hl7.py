"""The HL7 part of a batch, inside the transaction `storage.writer.BatchWriter` opened.

1. The ledger: `hl7_message` rows inserted with ``ON CONFLICT DO NOTHING RETURNING``; a key that
   does not come back was committed before (a resend): DUPLICATE, nothing else is written for it.
2. Patients: the identifiers of each PID are resolved together (one patient per PID: the one a
   known identifier points to, national id first, else a new one) and every unknown identifier
   is linked to it. Bulk: one select, one insert of new patients, one of identifiers, and a
   re-select that is the truth when another replica raced us.
3. Demographics (ADT replaces, in MSH-7 order; ORU fills what is missing, and only patients
   the identifier select showed to miss something are updated), merges (A40), then lab reports
   and observations: one statement draws the report ids and inserts reports and observations
   for a small batch; a big batch inserts the reports, then copies the observations (binary COPY).

Round trips of a small batch of new ORU^R01 for known patients: ledger, patient select, reports
with observations (plus BEGIN and COMMIT around them); before, ten.
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
    gaps: dict[int, _Gaps] = {}
    patients = await resolve_patient_groups(conn, groups, gaps)

    await _apply_demographics(conn, fresh, patients, gaps)
    await _apply_merges(conn, fresh, patients)
    await _insert_reports(conn, fresh, patients)


async def resolve_patient_groups(
    conn: asyncpg.Connection, groups: Sequence[Group], gaps: dict[int, _Gaps] | None = None
) -> dict[Group, int]:
    """The patient id of each group of identifiers seen together, creating what is missing.

    A known identifier resolves to its surviving patient (merged patients to their survivor);
    the first identifier of a group that resolves decides (national id first, as mapped).
    `gaps`, when given, receives what each resolved patient lacks (names, birth date, sex).
    """
    refs = sorted({(r.system, r.value) for g in groups for r in g})
    if gaps is None:
        gaps = {}
    known = await _select(conn, refs, gaps)
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
        known = await _select(conn, refs, gaps)
        used = set(known.values())
        orphans = [pid for pid in new_ids if pid not in used]
        if orphans:
            await conn.execute("DELETE FROM patient WHERE id = ANY($1::bigint[])", orphans)
    result: dict[Group, int] = {}
    for group in groups:
        result[group] = next(known[(r.system, r.value)] for r in group)
    return result


@dataclass(frozen=True, slots=True)
class _Gaps:
    """What a stored patient lacks, as the identifier select saw it (ORU fills only these)."""

    names: bool
    birth_date: bool
    gender: bool


async def _select(
    conn: asyncpg.Connection, keys: list[tuple[str, str]], gaps: dict[int, _Gaps]
) -> dict[tuple[str, str], int]:
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
    for r in rows:
        gaps[r["patient_id"]] = _Gaps(r["no_names"], r["no_birth_date"], r["no_gender"])
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
    conn: asyncpg.Connection,
    fresh: list[_Fresh],
    patients: dict[Group, int],
    gaps: dict[int, _Gaps],
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
    # A fill-in that changes nothing is skipped (the common case: a known, complete patient);
    # an ADT of this batch may change what is missing, so those patients are always filled.
    fill = {pid: d for pid, d in fill.items() if pid in replace or _fills_a_gap(d, gaps.get(pid))}
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


def _fills_a_gap(record: PatientDemographics, gaps: _Gaps | None) -> bool:
    """Whether an ORU's demographics would change the patient (unknown gaps: assume so)."""
    if gaps is None:
        return bool(record.names or record.birth_date or record.gender)
    return bool(
        (gaps.names and record.names)
        or (gaps.birth_date and record.birth_date)
        or (gaps.gender and record.gender)
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


_REPORTS_CTE = """
WITH ids AS MATERIALIZED (
    SELECT n, nextval(pg_get_serial_sequence('lab_report', 'id')) AS id
    FROM generate_series(1, $1) AS n
), inserted AS (
    INSERT INTO lab_report (id, message_id, patient_id, placer_id, filler_id, service_system,
                            service_code, service_display, observed_at, issued_at, status,
                            received_at)
    SELECT ids.id, r.message_id, r.patient_id, r.placer_id, r.filler_id, r.service_system,
           r.service_code, r.service_display, r.observed_at, r.issued_at, r.status, r.received_at
    FROM unnest($2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::timestamptz[])
         WITH ORDINALITY AS r(message_id, patient_id, placer_id, filler_id, service_system,
                              service_code, service_display, observed_at, issued_at, status,
                              received_at, n)
    JOIN ids USING (n)
)
"""
# The reports, then their ids in the reports' order (for the COPY of the observations).
_REPORTS_SQL = _REPORTS_CTE + "SELECT id FROM ids ORDER BY n"  # noqa: S608 - constant SQL
# The reports and their observations in one statement; an observation names its report by
# position (n). OBX-8 flags travel joined by U+001F: NULL for none, '' for one empty flag.
_REPORTS_AND_OBSERVATIONS_SQL = (
    _REPORTS_CTE
    + """
INSERT INTO lab_observation (report_id, patient_id, set_id, value_type, code_system, code,
                             code_display, value_numeric, comparator, value_text,
                             value_code_system, value_code, value_display, unit, reference_range,
                             reference_low, reference_high, abnormal_flags, status, observed_at,
                             received_at)
SELECT ids.id, o.patient_id, o.set_id, o.value_type, o.code_system, o.code, o.code_display,
       o.value_numeric, o.comparator, o.value_text, o.value_code_system, o.value_code,
       o.value_display, o.unit, o.reference_range, o.reference_low, o.reference_high,
       CASE WHEN o.flags IS NULL THEN '{}'::text[]
            WHEN o.flags = '' THEN '{""}'::text[]
            ELSE string_to_array(o.flags, chr(31)) END,
       o.status, o.observed_at, o.received_at
FROM unnest($13::int[], $14::bigint[], $15::int[], $16::text[], $17::text[], $18::text[],
            $19::text[], $20::float8[], $21::text[], $22::text[], $23::text[], $24::text[],
            $25::text[], $26::text[], $27::text[], $28::float8[], $29::float8[], $30::text[],
            $31::text[], $32::timestamptz[], $33::timestamptz[])
     AS o(n, patient_id, set_id, value_type, code_system, code, code_display, value_numeric,
          comparator, value_text, value_code_system, value_code, value_display, unit,
          reference_range, reference_low, reference_high, flags, status, observed_at,
          received_at)
JOIN ids USING (n)
"""
)
_FLAG_SEPARATOR = "\x1f"
# Up to this many observations (about 20 ORU^R01 of 10 OBX: light load, where round trips are
# the latency) reports and observations go in one statement; beyond, binary COPY is cheaper.
SINGLE_STATEMENT_MAX_OBSERVATIONS = 200


async def _insert_reports(
    conn: asyncpg.Connection, fresh: list[_Fresh], patients: dict[Group, int]
) -> None:
    """Reports and observations: one statement for a small batch, else reports then COPY.

    A small batch (light load) saves the round trips; a big one is cheaper per row with binary
    COPY. An OBX-8 flag holding U+001F itself (only a \\X1F\\ escape can put it there) also
    takes the COPY way, since the one statement joins flags with that character.
    """
    reports = [
        (item, record)
        for item in fresh
        for record in item.env.records
        if isinstance(record, LabReport)
    ]
    if not reports:
        return
    report_columns: tuple[list[object], ...] = tuple([] for _ in range(11))
    obs_columns: tuple[list[object], ...] = tuple([] for _ in range(len(_OBSERVATION_COLUMNS)))
    flag_lists: list[list[str]] = []
    joinable = True
    for n, (item, report) in enumerate(reports, 1):
        patient_id = patients[report.patient]
        received = item.env.received_at
        report_values = (
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
        for column, report_value in zip(report_columns, report_values, strict=True):
            column.append(report_value)
        for obs in report.observations:
            coded = obs.coded
            flags = obs.abnormal_flags
            if any(_FLAG_SEPARATOR in f for f in flags):
                joinable = False
            flag_lists.append(list(flags))
            values: tuple[object, ...] = (
                n,
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
                _FLAG_SEPARATOR.join(flags) if flags else None,
                obs.status,
                obs.observed_at or report.observed_at,
                received,
            )
            for column, value in zip(obs_columns, values, strict=True):
                column.append(value)
    if joinable and len(flag_lists) <= SINGLE_STATEMENT_MAX_OBSERVATIONS:
        await conn.execute(
            _REPORTS_AND_OBSERVATIONS_SQL, len(reports), *report_columns, *obs_columns
        )
        return
    ids = [r["id"] for r in await conn.fetch(_REPORTS_SQL, len(reports), *report_columns)]
    rows: list[tuple[object, ...]] = []
    for i, row in enumerate(zip(*obs_columns, strict=True)):
        position = row[0]
        assert isinstance(position, int)  # noqa: S101 - the first column is the report's n
        rows.append((ids[position - 1], *row[1:17], flag_lists[i], *row[18:]))
    await conn.copy_records_to_table("lab_observation", records=rows, columns=_OBSERVATION_COLUMNS)
