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
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Protocol

from ingest.errors import StorageUnavailable
from storage.params import Params
from storage.pool import is_transient

if TYPE_CHECKING:
    from storage.dicom_queries import ImagingStudyRecord


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
    excluded: tuple[tuple[datetime | None, datetime | None], ...] = ()
    """Ranges [start, end) left out (FHIR `ne`)."""
    descending: bool = False
    """Newest first: `(time, id)` descending."""


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
    device_id: int
    device_kind: str
    device_ident: str

    @property
    def position(self) -> VitalPosition:
        return VitalPosition(self.time, self.id)


async def run(db: Executor, method: str, sql: str, *args: object) -> Any:
    """`db.fetch`, `fetchrow` or `execute` (`method`) of `sql`; a database that cannot answer
    becomes `StorageUnavailable`."""
    try:
        return await getattr(db, method)(sql, *args)
    except Exception as exc:
        if is_transient(exc):
            raise StorageUnavailable(type(exc).__name__) from exc
        raise


async def fetch(db: Executor, sql: str, *args: object) -> list[Any]:
    """Run a query; a database that cannot answer becomes `StorageUnavailable`."""
    return list(await run(db, "fetch", sql, *args))


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
    rows = await fetch(
        db,
        f"""SELECT DISTINCT coalesce(p.replaced_by, p.id) AS id
            FROM patient_identifier pi JOIN patient p ON p.id = pi.patient_id
            WHERE {where}
            ORDER BY 1 LIMIT {MAX_IDENTIFIER_MATCHES}""",  # noqa: S608 - fixed fragments only
        *args,
    )
    return [r["id"] for r in rows]


def patient_group_sql(ids_param: str) -> str:
    """The statement of `patient_group` over the `bigint[]` parameter `ids_param` (`$1`), as a
    fragment that other statements embed (`storage.tokens.lookup_token_and_group`)."""
    return f"""WITH survivor AS (
               SELECT DISTINCT coalesce(replaced_by, id) AS id
               FROM patient WHERE id = ANY({ids_param}::bigint[]))
           SELECT s.id FROM survivor s
           UNION
           SELECT p.id FROM patient p JOIN survivor s ON p.replaced_by = s.id
           ORDER BY 1"""  # noqa: S608 - a parameter placeholder, never input text


async def patient_group(db: Executor, patient_ids: Sequence[int]) -> list[int]:
    """The patients whose vitals belong to `patient_ids`: their survivors and all they replaced."""
    if not patient_ids:
        return []
    rows = await fetch(db, patient_group_sql("$1"), list(patient_ids))
    return [r["id"] for r in rows]


async def get_patients(db: Executor, patient_ids: Sequence[int]) -> list[PatientRecord]:
    """The patients with these ids, in the order given; unknown ids are left out."""
    if not patient_ids:
        return []
    rows = await fetch(
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
        rows = await fetch(db, "SELECT id, system, code, unit FROM concept ORDER BY id")
    else:
        if not criteria:
            return []
        rows = await fetch(
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

# The fields of `VitalRecord`, in its order.
_VITAL_COLUMNS = """v.id, coalesce(p.replaced_by, v.patient_id) AS subject_id, v.time,
       v.received_at, v.value, c.system, c.code, c.unit, v.device_id, d.kind AS device_kind,
       d.ident AS device_ident"""

_VITAL_JOINS = """JOIN concept c ON c.id = v.concept_id
       JOIN device d ON d.id = v.device_id
       JOIN patient p ON p.id = v.patient_id"""


def _vital_conditions(
    query: VitalQuery, after: VitalPosition | None, patient_column: str, param: Params
) -> list[str]:
    """WHERE conditions on `vital` for `query`, adding their parameters to `param`.

    The patient condition compares with `patient_column` (a fixed column expression).
    """

    conditions = [f"patient_id = {patient_column}"]
    if query.concept_ids is not None:
        conditions.append(f"concept_id = ANY({param(list(query.concept_ids), 'int[]')})")
    if query.start is not None:
        conditions.append(f"time >= {param(query.start, 'timestamptz')}")
    if query.end is not None:
        conditions.append(f"time < {param(query.end, 'timestamptz')}")
    conditions.extend(_exclusions("time", query.excluded, param))
    if after is not None:
        after_time = param(after.time, "timestamptz")
        # The plain bound prunes partitions; the row comparison is the exact keyset position.
        if query.descending:
            conditions.append(f"time <= {after_time}")
            conditions.append(f"(time, id) < ({after_time}, {param(after.id, 'bigint')})")
        else:
            conditions.append(f"time >= {after_time}")
            conditions.append(f"(time, id) > ({after_time}, {param(after.id, 'bigint')})")
    return conditions


def _exclusions(
    column: str,
    excluded: Sequence[tuple[datetime | None, datetime | None]],
    param: Params,
) -> list[str]:
    """`NOT (column in [start, end))` for each excluded range."""
    conditions = []
    for start, end in excluded:
        inside = []
        if start is not None:
            inside.append(f"{column} >= {param(start, 'timestamptz')}")
        if end is not None:
            inside.append(f"{column} < {param(end, 'timestamptz')}")
        conditions.append(f"NOT ({' AND '.join(inside) or 'true'})")
    return conditions


async def search_vital_observations(
    db: Executor, query: VitalQuery, after: VitalPosition | None, limit: int
) -> list[VitalRecord]:
    """Up to `limit` vitals matching `query` after `after`, in `(time, id)` order."""
    if not query.patient_ids or limit <= 0 or _empty(query):
        return []
    params = Params(list(query.patient_ids))
    conditions = _vital_conditions(query, after, "k.patient_id", params)
    limit_param = params(limit)
    order = "DESC" if query.descending else "ASC"
    sql = f"""SELECT {_VITAL_COLUMNS}
       FROM (SELECT r.* FROM unnest($1::bigint[]) AS k(patient_id)
             CROSS JOIN LATERAL (
                 SELECT id, patient_id, time, received_at, concept_id, device_id, value
                 FROM vital
                 WHERE {" AND ".join(conditions)}
                 ORDER BY time {order}, id {order} LIMIT {limit_param}) AS r
             ORDER BY r.time {order}, r.id {order} LIMIT {limit_param}) AS v
       {_VITAL_JOINS}
       ORDER BY v.time {order}, v.id {order}"""  # noqa: S608 - fixed fragments, numbered parameters
    rows = await fetch(db, sql, *params.values)
    return [_vital_record(r) for r in rows]


async def count_vital_observations(db: Executor, query: VitalQuery) -> int:
    """How many vitals match `query`."""
    if not query.patient_ids or _empty(query):
        return 0
    params = Params(list(query.patient_ids))
    conditions = _vital_conditions(query, None, "ANY($1::bigint[])", params)
    rows = await fetch(
        db,
        f"SELECT count(*) AS n FROM vital WHERE {' AND '.join(conditions)}",  # noqa: S608
        *params.values,
    )
    return int(rows[0]["n"])


@dataclass(frozen=True, slots=True)
class ObservationCounts:
    vitals: int
    labs: int

    @property
    def total(self) -> int:
        return self.vitals + self.labs


async def count_observations(
    db: Executor, vitals: VitalQuery, labs: LabQuery | None
) -> ObservationCounts:
    """How many vitals match `vitals` and lab observations match `labs` (None: not asked), in
    one statement (one round trip instead of two)."""
    params = Params()
    parts = []
    if vitals.patient_ids and not _empty(vitals):
        params(list(vitals.patient_ids))
        conditions = _vital_conditions(vitals, None, "ANY($1::bigint[])", params)
        where = " AND ".join(conditions)
        parts.append(f"(SELECT count(*) FROM vital WHERE {where}) AS vitals")  # noqa: S608
    else:
        parts.append("0::bigint AS vitals")
    if labs is not None and not _no_labs(labs):
        conditions = _lab_conditions(labs, None, params)
        where = " AND ".join(conditions)
        parts.append(f"(SELECT count(*) FROM lab_observation o WHERE {where}) AS labs")  # noqa: S608
    else:
        parts.append("0::bigint AS labs")
    if not params.values:
        return ObservationCounts(0, 0)
    rows = await fetch(db, f"SELECT {', '.join(parts)}", *params.values)
    return ObservationCounts(int(rows[0]["vitals"]), int(rows[0]["labs"]))


async def get_vital(db: Executor, vital_id: int) -> VitalRecord | None:
    """The vital with this id, or None."""
    rows = await fetch(
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
    # `_VITAL_COLUMNS` lists the fields in order (a page builds 51 of these: by position is
    # a third of the cost of by name).
    return VitalRecord(*row)


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
    excluded: tuple[tuple[datetime | None, datetime | None], ...] = ()
    descending: bool = False


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


def _lab_conditions(query: LabQuery, after: VitalPosition | None, param: Params) -> list[str]:
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
    conditions.extend(_exclusions(when, query.excluded, param))
    if after is not None:
        compare = "<" if query.descending else ">"
        conditions.append(
            f"({when}, -o.id) {compare} "
            f"({param(after.time, 'timestamptz')}, {param(after.id, 'bigint')})"
        )
    return conditions


async def search_lab_observations(
    db: Executor, query: LabQuery, after: VitalPosition | None, limit: int
) -> list[LabObservationRecord]:
    """Up to `limit` lab observations matching `query` after `after`, in position order."""
    if limit <= 0 or _no_labs(query):
        return []
    params = Params()
    conditions = _lab_conditions(query, after, params)
    limit_param = params(limit)
    sql = f"""SELECT {_LAB_COLUMNS}
       FROM lab_observation o JOIN patient p ON p.id = o.patient_id
       WHERE {" AND ".join(conditions)}
       ORDER BY coalesce(o.observed_at, o.received_at) {"DESC" if query.descending else "ASC"},
                o.id {"ASC" if query.descending else "DESC"}
       LIMIT {limit_param}"""  # noqa: S608 - fixed fragments and numbered parameters only
    return [_lab_record(r) for r in await fetch(db, sql, *params.values)]


def _no_labs(query: LabQuery) -> bool:
    return not query.patient_ids or (query.codes is not None and not query.codes)


async def count_lab_observations(db: Executor, query: LabQuery) -> int:
    if _no_labs(query):
        return 0
    params = Params()
    conditions = _lab_conditions(query, None, params)
    rows = await fetch(
        db,
        f"SELECT count(*) AS n FROM lab_observation o WHERE {' AND '.join(conditions)}",  # noqa: S608
        *params.values,
    )
    return int(rows[0]["n"])


async def get_lab_observation(db: Executor, observation_id: int) -> LabObservationRecord | None:
    rows = await fetch(
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


@dataclass(frozen=True, slots=True)
class ReportQuery:
    """Which reports: of any of `patient_ids`, of any service `codes` (None: any), effective
    (observed, else received) in [start, end) and outside every `excluded` range."""

    patient_ids: tuple[int, ...]
    codes: tuple[CodeCriterion, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None
    excluded: tuple[tuple[datetime | None, datetime | None], ...] = ()


def _report_conditions(query: ReportQuery, after_id: int | None, param: Params) -> list[str]:
    conditions = [f"r.patient_id = ANY({param(list(query.patient_ids), 'bigint[]')})"]
    if query.codes is not None:
        systems = param([c.system for c in query.codes], "text[]")
        codes = param([c.code for c in query.codes], "text[]")
        conditions.append(
            f"""EXISTS (SELECT 1 FROM unnest({systems}, {codes}) AS k(system, code)
                       WHERE (k.system IS NULL OR r.service_system = k.system)
                         AND (k.code IS NULL OR r.service_code = k.code))"""  # noqa: S608
        )
    when = "coalesce(r.observed_at, r.received_at)"
    if query.start is not None:
        conditions.append(f"{when} >= {param(query.start, 'timestamptz')}")
    if query.end is not None:
        conditions.append(f"{when} < {param(query.end, 'timestamptz')}")
    conditions.extend(_exclusions(when, query.excluded, param))
    if after_id is not None:
        conditions.append(f"r.id > {param(after_id, 'bigint')}")
    return conditions


def _no_reports(query: ReportQuery) -> bool:
    return not query.patient_ids or (query.codes is not None and not query.codes)


async def search_lab_reports(
    db: Executor, query: ReportQuery, after_id: int | None, limit: int
) -> list[LabReportRecord]:
    """Up to `limit` reports matching `query` with id above `after_id`, by id."""
    if _no_reports(query) or limit <= 0:
        return []
    params = Params()
    conditions = _report_conditions(query, after_id, params)
    limit_param = params(limit)
    rows = await fetch(
        db,
        f"""SELECT {_REPORT_COLUMNS} FROM lab_report r JOIN patient p ON p.id = r.patient_id
            WHERE {" AND ".join(conditions)}
            ORDER BY r.id LIMIT {limit_param}""",  # noqa: S608 - fixed fragments only
        *params.values,
    )
    return [_report_record(r) for r in rows]


async def count_lab_reports(db: Executor, query: ReportQuery) -> int:
    if _no_reports(query):
        return 0
    params = Params()
    conditions = _report_conditions(query, None, params)
    rows = await fetch(
        db,
        f"SELECT count(*) AS n FROM lab_report r WHERE {' AND '.join(conditions)}",  # noqa: S608
        *params.values,
    )
    return int(rows[0]["n"])


async def get_lab_report(db: Executor, report_id: int) -> LabReportRecord | None:
    rows = await fetch(
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


# --- $lastn -------------------------------------------------------------------------------------


async def lastn_vitals(
    db: Executor, patient_ids: Sequence[int], concept_ids: Sequence[int] | None, most: int
) -> list[VitalRecord]:
    """The `most` newest vitals of each concept among `patient_ids`, by concept then newest first.

    `concept_ids` None means every concept of the dictionary (read in the same statement).
    One backward index range per (patient, concept) on `vital (patient_id, concept_id, time)`.
    """
    if not patient_ids or (concept_ids is not None and not concept_ids) or most <= 0:
        return []
    params = Params(list(patient_ids), most)
    if concept_ids is None:
        concepts = "(SELECT id AS concept_id FROM concept) AS q"
    else:
        params(list(concept_ids))
        concepts = "unnest($3::int[]) AS q(concept_id)"
    rows = await fetch(
        db,
        f"""SELECT {_VITAL_COLUMNS}
            FROM (SELECT r.*, row_number() OVER (PARTITION BY r.concept_id
                                                 ORDER BY r.time DESC, r.id DESC) AS rank
                  FROM unnest($1::bigint[]) AS k(patient_id)
                  CROSS JOIN {concepts}
                  CROSS JOIN LATERAL (
                      SELECT id, patient_id, time, received_at, concept_id, device_id, value
                      FROM vital
                      WHERE patient_id = k.patient_id AND concept_id = q.concept_id
                      ORDER BY time DESC, id DESC LIMIT $2) AS r) AS v
            {_VITAL_JOINS}
            WHERE v.rank <= $2
            ORDER BY c.system, c.code, c.unit, v.time DESC, v.id DESC""",  # noqa: S608
        *params.values,
    )
    return [_vital_record(r) for r in rows]


async def lastn_labs(
    db: Executor, patient_ids: Sequence[int], codes: Sequence[CodeCriterion] | None, most: int
) -> list[LabObservationRecord]:
    """The `most` newest lab observations of each code among `patient_ids`, newest first."""
    if not patient_ids or most <= 0 or (codes is not None and not codes):
        return []
    params = Params()
    conditions = _lab_conditions(
        LabQuery(tuple(patient_ids), tuple(codes) if codes else None), None, params
    )
    most_param = params(most)
    rows = await fetch(
        db,
        f"""SELECT * FROM (
                SELECT {_LAB_COLUMNS}, row_number() OVER (
                    PARTITION BY o.code_system, o.code
                    ORDER BY coalesce(o.observed_at, o.received_at) DESC, o.id ASC) AS rank
                FROM lab_observation o JOIN patient p ON p.id = o.patient_id
                WHERE {" AND ".join(conditions)}) AS ranked
            WHERE rank <= {most_param}
            ORDER BY code_system, code, observed_at DESC, id""",  # noqa: S608 - fixed fragments
        *params.values,
    )
    return [_lab_record(r) for r in rows]


# --- patient search -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PatientQuery:
    """Patients matching all given criteria. `ids` may name merged patients; the other criteria
    match surviving patients only. Name prefixes are folded in SQL (`qantara_fold`, one short
    statement first) exactly as the indexed name parts are."""

    ids: tuple[int, ...] | None = None
    survivor_ids: tuple[int, ...] | None = None
    name_prefixes: tuple[str, ...] | None = None
    birth_start: date | None = None
    birth_end: date | None = None
    birth_excluded: tuple[tuple[date | None, date | None], ...] = ()
    genders: tuple[str, ...] | None = None


def _patient_conditions(query: PatientQuery, after_id: int | None, param: Params) -> list[str]:
    conditions = []
    if query.ids is not None:
        conditions.append(f"p.id = ANY({param(list(query.ids), 'bigint[]')})")
    else:
        conditions.append("p.replaced_by IS NULL")
    if query.survivor_ids is not None:
        conditions.append(f"p.id = ANY({param(list(query.survivor_ids), 'bigint[]')})")
    if query.name_prefixes is not None:
        # Folded prefixes (`_fold_prefixes`) as plain bounds: each one an index range on the
        # name parts' primary key, whose selectivity the planner can estimate.
        ranges = " OR ".join(
            f"(n.part >= {param(prefix, 'text')} AND n.part < {param(prefix + _TOP, 'text')})"
            for prefix in query.name_prefixes
        )
        conditions.append(
            f"p.id IN (SELECT n.patient_id FROM patient_name_part n WHERE {ranges})"  # noqa: S608
        )
    if query.birth_start is not None:
        conditions.append(f"p.birth_date >= {param(query.birth_start, 'date')}")
    if query.birth_end is not None:
        conditions.append(f"p.birth_date < {param(query.birth_end, 'date')}")
    for start, end in query.birth_excluded:
        inside = []
        if start is not None:
            inside.append(f"p.birth_date >= {param(start, 'date')}")
        if end is not None:
            inside.append(f"p.birth_date < {param(end, 'date')}")
        conditions.append(f"p.birth_date IS NOT NULL AND NOT ({' AND '.join(inside) or 'true'})")
    if query.genders is not None:
        conditions.append(f"p.gender = ANY({param(list(query.genders), 'text[]')})")
    if after_id is not None:
        conditions.append(f"p.id > {param(after_id, 'bigint')}")
    return conditions


_TOP = chr(0x10FFFF)
"""Above every character: `[p, p + _TOP)` holds the strings starting with `p` (byte order)."""


async def _fold_prefixes(db: Executor, query: PatientQuery) -> PatientQuery:
    """`query` with its name prefixes folded as the indexed parts are (`qantara_fold`)."""
    if not query.name_prefixes:
        return query
    rows = await fetch(
        db,
        "SELECT array_agg(qantara_fold(v) ORDER BY o) AS folded "
        "FROM unnest($1::text[]) WITH ORDINALITY AS u(v, o)",
        list(query.name_prefixes),
    )
    return replace(query, name_prefixes=tuple(rows[0]["folded"]))


def _no_patients(query: PatientQuery) -> bool:
    return any(
        v is not None and not v
        for v in (query.ids, query.survivor_ids, query.name_prefixes, query.genders)
    )


async def search_patient_ids(
    db: Executor, query: PatientQuery, after_id: int | None, limit: int
) -> list[int]:
    """Up to `limit` ids of patients matching `query` above `after_id`, ascending."""
    if _no_patients(query) or limit <= 0:
        return []
    query = await _fold_prefixes(db, query)
    params = Params()
    conditions = _patient_conditions(query, after_id, params)
    limit_param = params(limit)
    rows = await fetch(
        db,
        f"""SELECT p.id FROM patient p WHERE {" AND ".join(conditions)}
            ORDER BY p.id LIMIT {limit_param}""",  # noqa: S608 - fixed fragments only
        *params.values,
    )
    return [r["id"] for r in rows]


async def count_patients(db: Executor, query: PatientQuery) -> int:
    if _no_patients(query):
        return 0
    query = await _fold_prefixes(db, query)
    params = Params()
    conditions = _patient_conditions(query, None, params)
    rows = await fetch(
        db,
        f"SELECT count(*) AS n FROM patient p WHERE {' AND '.join(conditions)}",  # noqa: S608
        *params.values,
    )
    return int(rows[0]["n"])


# --- devices ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: int
    unit: str
    ident: str
    kind: str


async def search_devices(
    db: Executor,
    idents: Sequence[tuple[str | None, str]],
    after_id: int | None,
    limit: int,
) -> list[DeviceRecord]:
    """Devices whose `(unit, ident)` match any of `idents` (unit None: any unit), by id."""
    if not idents or limit <= 0:
        return []
    rows = await fetch(
        db,
        """SELECT d.id, u.name AS unit, d.ident, d.kind
           FROM device d JOIN unit u ON u.id = d.unit_id
           WHERE EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS k(unit, ident)
                         WHERE d.ident = k.ident AND (k.unit IS NULL OR u.name = k.unit))
             AND d.id > $3
           ORDER BY d.id LIMIT $4""",
        [u for u, _ in idents],
        [i for _, i in idents],
        after_id or 0,
        limit,
    )
    return [DeviceRecord(r["id"], r["unit"], r["ident"], r["kind"]) for r in rows]


async def get_device(db: Executor, device_id: int) -> DeviceRecord | None:
    """The device with this id, or None."""
    rows = await fetch(
        db,
        """SELECT d.id, u.name AS unit, d.ident, d.kind
           FROM device d JOIN unit u ON u.id = d.unit_id WHERE d.id = $1""",
        device_id,
    )
    return (
        DeviceRecord(rows[0]["id"], rows[0]["unit"], rows[0]["ident"], rows[0]["kind"])
        if rows
        else None
    )


# --- imaging studies (FHIR ImagingStudy) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImagingQuery:
    """Studies of any of `patient_ids` (None: any patient), with any of `study_uids` (None: any),
    started in [start, end) outside every `excluded` range (the start is `started`, else the
    study date at 00:00 UTC), with a series of any of `modalities` (None: any)."""

    patient_ids: tuple[int, ...] | None = None
    study_uids: tuple[str, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None
    excluded: tuple[tuple[datetime | None, datetime | None], ...] = ()
    modalities: tuple[str, ...] | None = None


def _imaging_conditions(query: ImagingQuery, after_id: int | None, param: Params) -> list[str]:
    conditions = ["s.patient_id IS NOT NULL"]
    if query.patient_ids is not None:
        conditions.append(f"s.patient_id = ANY({param(list(query.patient_ids), 'bigint[]')})")
    if query.study_uids is not None:
        conditions.append(f"s.study_uid = ANY({param(list(query.study_uids), 'text[]')})")
    when = "coalesce(s.started, s.study_date::timestamp AT TIME ZONE 'UTC')"
    if query.start is not None:
        conditions.append(f"{when} >= {param(query.start, 'timestamptz')}")
    if query.end is not None:
        conditions.append(f"{when} < {param(query.end, 'timestamptz')}")
    conditions.extend(_exclusions(when, query.excluded, param))
    if query.modalities is not None:
        conditions.append(
            f"""EXISTS (SELECT 1 FROM dicom_series m WHERE m.study_id = s.id
                       AND m.modality = ANY({param(list(query.modalities), "text[]")}))"""  # noqa: S608
        )
    if after_id is not None:
        conditions.append(f"s.id > {param(after_id, 'bigint')}")
    return conditions


def _no_studies(query: ImagingQuery) -> bool:
    return any(
        v is not None and not v for v in (query.patient_ids, query.study_uids, query.modalities)
    )


async def search_studies(
    db: Executor, query: ImagingQuery, after_id: int | None, limit: int
) -> list[ImagingStudyRecord]:
    """Up to `limit` studies matching `query` with id above `after_id`, by id."""
    # dicom_queries imports this module (Executor): its record types are imported late.
    from storage.dicom_queries import ImagingStudyRecord, SeriesRecord

    if _no_studies(query) or limit <= 0:
        return []
    params = Params()
    conditions = _imaging_conditions(query, after_id, params)
    limit_param = params(limit)
    rows = await fetch(
        db,
        f"""SELECT s.id, coalesce(p.replaced_by, p.id) AS subject_id, s.study_uid, s.started,
                  s.study_date, s.study_time, s.description, s.accession_number,
                  coalesce((SELECT array_agg(ARRAY[se.series_uid, se.modality,
                                                   coalesce(se.series_number::text, ''),
                                                   se.description, se.body_part,
                                                   (SELECT count(*) FROM dicom_instance i
                                                     WHERE i.series_id = se.id)::text]
                                             ORDER BY se.series_number NULLS LAST, se.id)
                            FROM dicom_series se WHERE se.study_id = s.id), '{{}}') AS series
           FROM dicom_study s JOIN patient p ON p.id = s.patient_id
           WHERE {" AND ".join(conditions)}
           ORDER BY s.id LIMIT {limit_param}""",  # noqa: S608 - fixed fragments only
        *params.values,
    )
    return [
        ImagingStudyRecord(
            id=r["id"],
            subject_id=r["subject_id"],
            study_uid=r["study_uid"],
            started=r["started"],
            study_date=r["study_date"],
            study_time=r["study_time"],
            description=r["description"],
            accession_number=r["accession_number"],
            series=tuple(
                SeriesRecord(
                    uid=x[0],
                    modality=x[1],
                    number=int(x[2]) if x[2] else None,
                    description=x[3],
                    body_part=x[4],
                    instances=int(x[5]),
                )
                for x in r["series"]
            ),
        )
        for r in rows
    ]


async def count_studies(db: Executor, query: ImagingQuery) -> int:
    if _no_studies(query):
        return 0
    params = Params()
    conditions = _imaging_conditions(query, None, params)
    rows = await fetch(
        db,
        f"SELECT count(*) AS n FROM dicom_study s WHERE {' AND '.join(conditions)}",  # noqa: S608
        *params.values,
    )
    return int(rows[0]["n"])


async def count_devices(db: Executor, idents: Sequence[tuple[str | None, str]]) -> int:
    if not idents:
        return 0
    rows = await fetch(
        db,
        """SELECT count(*) AS n FROM device d JOIN unit u ON u.id = d.unit_id
           WHERE EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS k(unit, ident)
                         WHERE d.ident = k.ident AND (k.unit IS NULL OR u.name = k.unit))""",
        [u for u, _ in idents],
        [i for _, i in idents],
    )
    return int(rows[0]["n"])


# --- DICOMweb (QIDO-RS, WADO-RS) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StudyQuery:
    """QIDO-RS study criteria; None matches anything. Dates are inclusive."""

    dicom_patient_id: str | None = None
    study_uid: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    modality: str | None = None
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True, slots=True)
class QidoStudy:
    id: int
    subject_id: int | None
    study_uid: str
    dicom_patient_id: str
    patient_name: str
    patient_birth_date: date | None
    patient_sex: str
    study_date: date | None
    study_time: Any
    accession_number: str
    study_id: str
    description: str
    modalities: tuple[str, ...]
    series: int
    instances: int


@dataclass(frozen=True, slots=True)
class QidoSeries:
    study_uid: str
    subject_id: int | None
    series_uid: str
    modality: str
    number: int | None
    description: str
    instances: int


@dataclass(frozen=True, slots=True)
class QidoInstance:
    study_uid: str
    series_uid: str
    subject_id: int | None
    sop_instance_uid: str
    sop_class_uid: str
    number: int | None
    transfer_syntax: str
    file_path: str
    size: int


async def qido_studies(db: Executor, query: StudyQuery) -> list[QidoStudy]:
    """Studies matching `query`, by id, `limit` of them after skipping `offset`."""
    param = Params()
    conditions = ["true"]
    if query.dicom_patient_id is not None:
        conditions.append(f"s.dicom_patient_id = {param(query.dicom_patient_id, 'text')}")
    if query.study_uid is not None:
        conditions.append(f"s.study_uid = {param(query.study_uid, 'text')}")
    if query.date_from is not None:
        conditions.append(f"s.study_date >= {param(query.date_from, 'date')}")
    if query.date_to is not None:
        conditions.append(f"s.study_date <= {param(query.date_to, 'date')}")
    if query.modality is not None:
        conditions.append(
            f"""EXISTS (SELECT 1 FROM dicom_series m WHERE m.study_id = s.id
                       AND m.modality = {param(query.modality, "text")})"""  # noqa: S608
        )
    limit = param(query.limit, "int")
    offset = param(query.offset, "int")
    rows = await fetch(
        db,
        f"""SELECT s.id, coalesce(p.replaced_by, p.id) AS subject_id, s.study_uid,
                   s.dicom_patient_id, s.patient_name, s.patient_birth_date, s.patient_sex,
                   s.study_date, s.study_time, s.accession_number, s.study_id, s.description,
                   coalesce((SELECT array_agg(DISTINCT se.modality) FROM dicom_series se
                             WHERE se.study_id = s.id AND se.modality <> ''), '{{}}')
                       AS modalities,
                   (SELECT count(*) FROM dicom_series se WHERE se.study_id = s.id) AS series,
                   (SELECT count(*) FROM dicom_series se JOIN dicom_instance i
                       ON i.series_id = se.id WHERE se.study_id = s.id) AS instances
            FROM dicom_study s LEFT JOIN patient p ON p.id = s.patient_id
            WHERE {" AND ".join(conditions)}
            ORDER BY s.id LIMIT {limit} OFFSET {offset}""",  # noqa: S608 - fixed fragments
        *param.values,
    )
    return [
        QidoStudy(
            id=r["id"],
            subject_id=r["subject_id"],
            study_uid=r["study_uid"],
            dicom_patient_id=r["dicom_patient_id"],
            patient_name=r["patient_name"],
            patient_birth_date=r["patient_birth_date"],
            patient_sex=r["patient_sex"],
            study_date=r["study_date"],
            study_time=r["study_time"],
            accession_number=r["accession_number"],
            study_id=r["study_id"],
            description=r["description"],
            modalities=tuple(r["modalities"]),
            series=r["series"],
            instances=r["instances"],
        )
        for r in rows
    ]


async def qido_series(
    db: Executor, study_uid: str, limit: int, offset: int
) -> list[QidoSeries] | None:
    """The series of a study (None when the study is unknown), by id."""
    study = await fetch(
        db,
        """SELECT s.id, coalesce(p.replaced_by, p.id) AS subject_id
           FROM dicom_study s LEFT JOIN patient p ON p.id = s.patient_id
           WHERE s.study_uid = $1""",
        study_uid,
    )
    if not study:
        return None
    rows = await fetch(
        db,
        """SELECT se.series_uid, se.modality, se.series_number, se.description,
                  (SELECT count(*) FROM dicom_instance i WHERE i.series_id = se.id) AS instances
           FROM dicom_series se WHERE se.study_id = $1
           ORDER BY se.id LIMIT $2 OFFSET $3""",
        study[0]["id"],
        limit,
        offset,
    )
    return [
        QidoSeries(
            study_uid=study_uid,
            subject_id=study[0]["subject_id"],
            series_uid=r["series_uid"],
            modality=r["modality"],
            number=r["series_number"],
            description=r["description"],
            instances=r["instances"],
        )
        for r in rows
    ]


async def qido_instances(
    db: Executor,
    study_uid: str,
    series_uid: str,
    sop_instance_uid: str | None,
    limit: int,
    offset: int,
) -> list[QidoInstance] | None:
    """The instances of a series (None when the series is not in that study), by id."""
    series = await fetch(
        db,
        """SELECT se.id, coalesce(p.replaced_by, p.id) AS subject_id
           FROM dicom_series se JOIN dicom_study s ON s.id = se.study_id
                LEFT JOIN patient p ON p.id = s.patient_id
           WHERE s.study_uid = $1 AND se.series_uid = $2""",
        study_uid,
        series_uid,
    )
    if not series:
        return None
    rows = await fetch(
        db,
        """SELECT sop_instance_uid, sop_class_uid, instance_number, transfer_syntax, file_path,
                  size
           FROM dicom_instance
           WHERE series_id = $1 AND ($2::text IS NULL OR sop_instance_uid = $2::text)
           ORDER BY id LIMIT $3 OFFSET $4""",
        series[0]["id"],
        sop_instance_uid,
        limit,
        offset,
    )
    return [
        QidoInstance(
            study_uid=study_uid,
            series_uid=series_uid,
            subject_id=series[0]["subject_id"],
            sop_instance_uid=r["sop_instance_uid"],
            sop_class_uid=r["sop_class_uid"],
            number=r["instance_number"],
            transfer_syntax=r["transfer_syntax"],
            file_path=r["file_path"],
            size=r["size"],
        )
        for r in rows
    ]
