"""The queries behind the read API: patients by identifier or id, vitals by patient and time.

Vitals are read with keyset paging on `(time, id)` through the `vital (patient_id, time, id)`
index, one index range per patient (a LATERAL join over the patient ids, so a merged patient's
rows come in order too), never with OFFSET. Time bounds and the cursor's time become plain
`time >= $n` / `time < $n` conditions so that PostgreSQL prunes the weekly partitions (or
TimescaleDB chunks). Every statement is a constant shape with numbered parameters; optional
conditions are chosen from a fixed set, never built from input text.

A merged patient (`replaced_by` set) resolves to its survivor; the survivor's vitals include the
rows recorded under every patient it replaced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol

from ingest.errors import StorageUnavailable
from storage.pool import is_transient


class Executor(Protocol):
    """What an `asyncpg.Pool` and an `asyncpg.Connection` both offer."""

    async def fetch(self, query: str, *args: object) -> list[Any]: ...

    async def fetchrow(self, query: str, *args: object) -> Any: ...

    async def execute(self, query: str, *args: object) -> str: ...


MAX_IDENTIFIER_MATCHES = 10_000
"""Bound on the survivors one identifier search returns (a value shared by many systems)."""


@dataclass(frozen=True, slots=True)
class StoredIdentifier:
    """An identifier as stored: `system` is a short name (`CIN`) or a URI."""

    system: str
    value: str


@dataclass(frozen=True, slots=True)
class PersonName:
    """One entry of `patient.names`."""

    use: str | None = None
    text: str | None = None
    family: str | None = None
    given: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PatientRecord:
    id: int
    names: tuple[PersonName, ...]
    gender: str | None
    birth_date: date | None
    replaced_by: int | None
    identifiers: tuple[StoredIdentifier, ...]
    replaces: tuple[int, ...]
    """Patients merged into this one (their `replaced_by` is this id)."""


@dataclass(frozen=True, slots=True)
class Concept:
    id: int
    system: str
    code: str
    unit: str


@dataclass(frozen=True, slots=True)
class CodeCriterion:
    """`system|code` of a search: None matches any system or any code."""

    system: str | None
    code: str | None


@dataclass(frozen=True, slots=True)
class VitalPosition:
    """A row's place in the `(time, id)` order: what a paging cursor carries."""

    time: datetime
    id: int


@dataclass(frozen=True, slots=True)
class VitalQuery:
    """Which vitals: of any of `patient_ids`, of any of `concept_ids` (None: any concept), with
    time in [start, end) (None: unbounded)."""

    patient_ids: tuple[int, ...]
    concept_ids: tuple[int, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class VitalRecord:
    id: int
    subject_id: int
    """The patient the row belongs to, resolved to the survivor when that patient was merged."""
    time: datetime
    received_at: datetime
    value: float
    system: str
    code: str
    unit: str
    device_kind: str
    device_ident: str

    @property
    def position(self) -> VitalPosition:
        return VitalPosition(self.time, self.id)


async def _fetch(db: Executor, sql: str, *args: object) -> list[Any]:
    """Run a query; a database that cannot answer becomes `StorageUnavailable`."""
    try:
        return list(await db.fetch(sql, *args))
    except Exception as exc:
        if is_transient(exc):
            raise StorageUnavailable(type(exc).__name__) from exc
        raise


# --- patients -------------------------------------------------------------------------------


async def find_patients_by_identifier(
    db: Executor, value: str, systems: Sequence[str] | None
) -> list[int]:
    """Ids of the surviving patients carrying identifier `value` in one of `systems`, ascending.

    `systems` None means any system. A merged patient's identifier resolves to its survivor.
    """
    if systems is None:
        where = "pi.value = $1"
        args: tuple[object, ...] = (value,)
    else:
        if not systems:
            return []
        where = "pi.system = ANY($2::text[]) AND pi.value = $1"
        args = (value, list(systems))
    rows = await _fetch(
        db,
        f"""SELECT DISTINCT coalesce(p.replaced_by, p.id) AS id
            FROM patient_identifier pi JOIN patient p ON p.id = pi.patient_id
            WHERE {where}
            ORDER BY 1 LIMIT {MAX_IDENTIFIER_MATCHES}""",  # noqa: S608 - fixed fragments only
        *args,
    )
    return [r["id"] for r in rows]


async def patient_group(db: Executor, patient_ids: Sequence[int]) -> list[int]:
    """The patients whose vitals belong to `patient_ids`: their survivors and all they replaced."""
    if not patient_ids:
        return []
    rows = await _fetch(
        db,
        """WITH survivor AS (
               SELECT DISTINCT coalesce(replaced_by, id) AS id
               FROM patient WHERE id = ANY($1::bigint[]))
           SELECT s.id FROM survivor s
           UNION
           SELECT p.id FROM patient p JOIN survivor s ON p.replaced_by = s.id
           ORDER BY 1""",
        list(patient_ids),
    )
    return [r["id"] for r in rows]


async def get_patients(db: Executor, patient_ids: Sequence[int]) -> list[PatientRecord]:
    """The patients with these ids, in the order given; unknown ids are left out."""
    if not patient_ids:
        return []
    rows = await _fetch(
        db,
        """SELECT p.id, p.names::text AS names, p.family, p.given, p.gender, p.birth_date,
                  p.replaced_by,
                  coalesce((SELECT array_agg(ARRAY[pi.system, pi.value]
                                             ORDER BY pi.first_seen, pi.system, pi.value)
                            FROM patient_identifier pi WHERE pi.patient_id = p.id),
                           '{}') AS identifiers,
                  coalesce((SELECT array_agg(m.id ORDER BY m.id)
                            FROM patient m WHERE m.replaced_by = p.id), '{}') AS replaces
           FROM patient p WHERE p.id = ANY($1::bigint[])""",
        list(patient_ids),
    )
    by_id = {r["id"]: _patient_record(r) for r in rows}
    return [by_id[i] for i in patient_ids if i in by_id]


async def get_patient(db: Executor, patient_id: int) -> PatientRecord | None:
    """The patient with this id (merged or not), or None."""
    found = await get_patients(db, [patient_id])
    return found[0] if found else None


def _patient_record(row: Any) -> PatientRecord:
    names = _parse_names(row["names"])
    if not names and (row["family"] or row["given"]):
        names = (PersonName(family=row["family"], given=tuple(row["given"] or ())),)
    return PatientRecord(
        id=row["id"],
        names=names,
        gender=row["gender"],
        birth_date=row["birth_date"],
        replaced_by=row["replaced_by"],
        identifiers=tuple(StoredIdentifier(s, v) for s, v in row["identifiers"]),
        replaces=tuple(row["replaces"]),
    )


def _parse_names(text: str | None) -> tuple[PersonName, ...]:
    """`patient.names` (a JSON list of {use, text, family, given, ...}); odd entries are skipped."""
    if not text:
        return ()
    data = json.loads(text)
    if not isinstance(data, list):
        return ()
    names = []
    for entry in data:
        if not isinstance(entry, dict):
            continue
        name = PersonName(
            use=_text(entry.get("use")),
            text=_text(entry.get("text")),
            family=_text(entry.get("family")),
            given=_texts(entry.get("given")),
            prefix=_texts(entry.get("prefix")),
            suffix=_texts(entry.get("suffix")),
        )
        if name.text or name.family or name.given:
            names.append(name)
    return tuple(names)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _texts(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str) and v.strip())


# --- concepts -------------------------------------------------------------------------------


async def find_concepts(db: Executor, criteria: Sequence[CodeCriterion] | None) -> list[Concept]:
    """Concepts matching any of `criteria` (all concepts when None); the table is a dictionary."""
    if criteria is None:
        rows = await _fetch(db, "SELECT id, system, code, unit FROM concept ORDER BY id")
    else:
        if not criteria:
            return []
        rows = await _fetch(
            db,
            """SELECT DISTINCT c.id, c.system, c.code, c.unit
               FROM concept c JOIN unnest($1::text[], $2::text[]) AS k(system, code)
                 ON (k.system IS NULL OR c.system = k.system)
                AND (k.code IS NULL OR c.code = k.code)
               ORDER BY c.id""",
            [c.system for c in criteria],
            [c.code for c in criteria],
        )
    return [Concept(r["id"], r["system"], r["code"], r["unit"]) for r in rows]


# --- vitals ---------------------------------------------------------------------------------

_VITAL_COLUMNS = """v.id, coalesce(p.replaced_by, v.patient_id) AS subject_id, v.time,
       v.received_at, v.value, c.system, c.code, c.unit, d.kind AS device_kind,
       d.ident AS device_ident"""

_VITAL_JOINS = """JOIN concept c ON c.id = v.concept_id
       JOIN device d ON d.id = v.device_id
       JOIN patient p ON p.id = v.patient_id"""


def _vital_conditions(
    query: VitalQuery, after: VitalPosition | None, patient_column: str, args: list[object]
) -> list[str]:
    """WHERE conditions on `vital` for `query`, appending their parameters to `args`.

    The patient condition compares with `patient_column` (a fixed column expression).
    """

    def param(value: object, cast: str) -> str:
        args.append(value)
        return f"${len(args)}::{cast}"

    conditions = [f"patient_id = {patient_column}"]
    if query.concept_ids is not None:
        conditions.append(f"concept_id = ANY({param(list(query.concept_ids), 'int[]')})")
    if query.start is not None:
        conditions.append(f"time >= {param(query.start, 'timestamptz')}")
    if query.end is not None:
        conditions.append(f"time < {param(query.end, 'timestamptz')}")
    if after is not None:
        after_time = param(after.time, "timestamptz")
        # The plain bound prunes partitions; the row comparison is the exact keyset position.
        conditions.append(f"time >= {after_time}")
        conditions.append(f"(time, id) > ({after_time}, {param(after.id, 'bigint')})")
    return conditions


async def search_vital_observations(
    db: Executor, query: VitalQuery, after: VitalPosition | None, limit: int
) -> list[VitalRecord]:
    """Up to `limit` vitals matching `query` after `after`, in `(time, id)` order."""
    if not query.patient_ids or limit <= 0 or _empty(query):
        return []
    args: list[object] = [list(query.patient_ids)]
    conditions = _vital_conditions(query, after, "k.patient_id", args)
    args.append(limit)
    limit_param = f"${len(args)}"
    sql = f"""SELECT {_VITAL_COLUMNS}
       FROM (SELECT r.* FROM unnest($1::bigint[]) AS k(patient_id)
             CROSS JOIN LATERAL (
                 SELECT id, patient_id, time, received_at, concept_id, device_id, value
                 FROM vital
                 WHERE {" AND ".join(conditions)}
                 ORDER BY time, id LIMIT {limit_param}) AS r
             ORDER BY r.time, r.id LIMIT {limit_param}) AS v
       {_VITAL_JOINS}
       ORDER BY v.time, v.id"""  # noqa: S608 - fixed fragments and numbered parameters only
    rows = await _fetch(db, sql, *args)
    return [_vital_record(r) for r in rows]


async def count_vital_observations(db: Executor, query: VitalQuery) -> int:
    """How many vitals match `query`."""
    if not query.patient_ids or _empty(query):
        return 0
    args: list[object] = [list(query.patient_ids)]
    conditions = _vital_conditions(query, None, "ANY($1::bigint[])", args)
    rows = await _fetch(
        db,
        f"SELECT count(*) AS n FROM vital WHERE {' AND '.join(conditions)}",  # noqa: S608
        *args,
    )
    return int(rows[0]["n"])


async def get_vital(db: Executor, vital_id: int) -> VitalRecord | None:
    """The vital with this id, or None."""
    rows = await _fetch(
        db,
        f"SELECT {_VITAL_COLUMNS} FROM vital v {_VITAL_JOINS} WHERE v.id = $1",  # noqa: S608
        vital_id,
    )
    return _vital_record(rows[0]) if rows else None


def _empty(query: VitalQuery) -> bool:
    if query.concept_ids is not None and not query.concept_ids:
        return True
    return query.start is not None and query.end is not None and query.start >= query.end


def _vital_record(row: Any) -> VitalRecord:
    return VitalRecord(
        id=row["id"],
        subject_id=row["subject_id"],
        time=row["time"],
        received_at=row["received_at"],
        value=row["value"],
        system=row["system"],
        code=row["code"],
        unit=row["unit"],
        device_kind=row["device_kind"],
        device_ident=row["device_ident"],
    )


# --- lab results (HL7 ORU) --------------------------------------------------------------------
#
# Lab observations page in the same `(time, id)` order as vitals so that one Observation search
# can merge both: a lab row's position is `(observed_at, -id)` (negative ids never meet a vital's).


@dataclass(frozen=True, slots=True)
class LabObservationRecord:
    id: int
    report_id: int
    subject_id: int
    value_type: str
    code_system: str
    code: str
    code_display: str
    value_numeric: float | None
    comparator: str | None
    value_text: str | None
    value_code_system: str | None
    value_code: str | None
    value_display: str | None
    unit: str
    reference_range: str
    reference_low: float | None
    reference_high: float | None
    abnormal_flags: tuple[str, ...]
    status: str
    observed_at: datetime
    received_at: datetime

    @property
    def position(self) -> VitalPosition:
        return VitalPosition(self.observed_at, -self.id)


@dataclass(frozen=True, slots=True)
class LabQuery:
    """Which lab observations: of any of `patient_ids`, matching any of `codes` (None: any),
    observed in [start, end)."""

    patient_ids: tuple[int, ...]
    codes: tuple[CodeCriterion, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True, slots=True)
class LabReportRecord:
    id: int
    subject_id: int
    placer_id: str
    filler_id: str
    service_system: str
    service_code: str
    service_display: str
    observed_at: datetime | None
    issued_at: datetime | None
    status: str
    received_at: datetime
    result_ids: tuple[int, ...]


_LAB_COLUMNS = """o.id, o.report_id, coalesce(p.replaced_by, o.patient_id) AS subject_id,
       o.value_type, o.code_system, o.code, o.code_display, o.value_numeric, o.comparator,
       o.value_text, o.value_code_system, o.value_code, o.value_display, o.unit,
       o.reference_range, o.reference_low, o.reference_high, o.abnormal_flags, o.status,
       coalesce(o.observed_at, o.received_at) AS observed_at, o.received_at"""


def _lab_conditions(query: LabQuery, after: VitalPosition | None, args: list[object]) -> list[str]:
    def param(value: object, cast: str) -> str:
        args.append(value)
        return f"${len(args)}::{cast}"

    conditions = [f"o.patient_id = ANY({param(list(query.patient_ids), 'bigint[]')})"]
    if query.codes is not None:
        systems = param([c.system for c in query.codes], "text[]")
        codes = param([c.code for c in query.codes], "text[]")
        conditions.append(
            f"""EXISTS (SELECT 1 FROM unnest({systems}, {codes}) AS k(system, code)
                       WHERE (k.system IS NULL OR o.code_system = k.system)
                         AND (k.code IS NULL OR o.code = k.code))"""  # noqa: S608
        )
    when = "coalesce(o.observed_at, o.received_at)"
    if query.start is not None:
        conditions.append(f"{when} >= {param(query.start, 'timestamptz')}")
    if query.end is not None:
        conditions.append(f"{when} < {param(query.end, 'timestamptz')}")
    if after is not None:
        conditions.append(
            f"({when}, -o.id) > ({param(after.time, 'timestamptz')}, {param(after.id, 'bigint')})"
        )
    return conditions


async def search_lab_observations(
    db: Executor, query: LabQuery, after: VitalPosition | None, limit: int
) -> list[LabObservationRecord]:
    """Up to `limit` lab observations matching `query` after `after`, in position order."""
    if not query.patient_ids or limit <= 0 or (query.codes is not None and not query.codes):
        return []
    args: list[object] = []
    conditions = _lab_conditions(query, after, args)
    args.append(limit)
    sql = f"""SELECT {_LAB_COLUMNS}
       FROM lab_observation o JOIN patient p ON p.id = o.patient_id
       WHERE {" AND ".join(conditions)}
       ORDER BY coalesce(o.observed_at, o.received_at), o.id DESC
       LIMIT ${len(args)}"""  # noqa: S608 - fixed fragments and numbered parameters only
    return [_lab_record(r) for r in await _fetch(db, sql, *args)]


async def count_lab_observations(db: Executor, query: LabQuery) -> int:
    if not query.patient_ids or (query.codes is not None and not query.codes):
        return 0
    args: list[object] = []
    conditions = _lab_conditions(query, None, args)
    rows = await _fetch(
        db,
        f"SELECT count(*) AS n FROM lab_observation o WHERE {' AND '.join(conditions)}",  # noqa: S608
        *args,
    )
    return int(rows[0]["n"])


async def get_lab_observation(db: Executor, observation_id: int) -> LabObservationRecord | None:
    rows = await _fetch(
        db,
        f"""SELECT {_LAB_COLUMNS} FROM lab_observation o JOIN patient p ON p.id = o.patient_id
            WHERE o.id = $1""",  # noqa: S608 - fixed fragments only
        observation_id,
    )
    return _lab_record(rows[0]) if rows else None


def _lab_record(row: Any) -> LabObservationRecord:
    return LabObservationRecord(
        id=row["id"],
        report_id=row["report_id"],
        subject_id=row["subject_id"],
        value_type=row["value_type"],
        code_system=row["code_system"],
        code=row["code"],
        code_display=row["code_display"],
        value_numeric=row["value_numeric"],
        comparator=row["comparator"],
        value_text=row["value_text"],
        value_code_system=row["value_code_system"],
        value_code=row["value_code"],
        value_display=row["value_display"],
        unit=row["unit"],
        reference_range=row["reference_range"],
        reference_low=row["reference_low"],
        reference_high=row["reference_high"],
        abnormal_flags=tuple(row["abnormal_flags"]),
        status=row["status"],
        observed_at=row["observed_at"],
        received_at=row["received_at"],
    )


_REPORT_COLUMNS = """r.id, coalesce(p.replaced_by, r.patient_id) AS subject_id, r.placer_id,
       r.filler_id, r.service_system, r.service_code, r.service_display, r.observed_at,
       r.issued_at, r.status, r.received_at,
       coalesce((SELECT array_agg(o.id ORDER BY o.set_id, o.id) FROM lab_observation o
                 WHERE o.report_id = r.id), '{}') AS result_ids"""


async def search_lab_reports(
    db: Executor, patient_ids: Sequence[int], after_id: int | None, limit: int
) -> list[LabReportRecord]:
    """Up to `limit` reports of any of `patient_ids` with id above `after_id`, by id."""
    if not patient_ids or limit <= 0:
        return []
    rows = await _fetch(
        db,
        f"""SELECT {_REPORT_COLUMNS} FROM lab_report r JOIN patient p ON p.id = r.patient_id
            WHERE r.patient_id = ANY($1::bigint[]) AND r.id > $2
            ORDER BY r.id LIMIT $3""",  # noqa: S608 - fixed fragments only
        list(patient_ids),
        after_id or 0,
        limit,
    )
    return [_report_record(r) for r in rows]


async def count_lab_reports(db: Executor, patient_ids: Sequence[int]) -> int:
    if not patient_ids:
        return 0
    rows = await _fetch(
        db,
        "SELECT count(*) AS n FROM lab_report WHERE patient_id = ANY($1::bigint[])",
        list(patient_ids),
    )
    return int(rows[0]["n"])


async def get_lab_report(db: Executor, report_id: int) -> LabReportRecord | None:
    rows = await _fetch(
        db,
        f"""SELECT {_REPORT_COLUMNS} FROM lab_report r JOIN patient p ON p.id = r.patient_id
            WHERE r.id = $1""",  # noqa: S608 - fixed fragments only
        report_id,
    )
    return _report_record(rows[0]) if rows else None


def _report_record(row: Any) -> LabReportRecord:
    return LabReportRecord(
        id=row["id"],
        subject_id=row["subject_id"],
        placer_id=row["placer_id"],
        filler_id=row["filler_id"],
        service_system=row["service_system"],
        service_code=row["service_code"],
        service_display=row["service_display"],
        observed_at=row["observed_at"],
        issued_at=row["issued_at"],
        status=row["status"],
        received_at=row["received_at"],
        result_ids=tuple(row["result_ids"]),
    )
