"""The queries over the DICOM index: C-FIND matching at each level, and FHIR ImagingStudy reads.

C-FIND criteria arrive as (keyword, value) pairs; each known keyword maps to one fixed column
expression of its level and each value is a numbered parameter: single value, wildcard (`*`, `?`),
a list of UIDs (`\\`-separated) or a date range (`A-B`, `A-`, `-B`). Unknown keywords and
universal (empty) values match everything. Nothing of the request is ever spliced into SQL text.

Person names (PatientName, ReferringPhysicianName) match whatever their case and Latin accents,
as the standard allows for the PN VR and as Patient search in the FHIR API does (`qantara_fold`,
migration 0005): a modality that sends `BENANI^HELENE` is found by `Benani^Hélène*`. Arabic
script matches whatever its spelling variants (hamza forms of alef, alef maksura, teh marbuta,
harakat, tatweel: migration 0019), so `احمد` finds `أحمد`. PatientName, exact or with a trailing
wildcard, reads an index (migration 0014); the other keys compare exactly, as the standard has
it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any, Final

from storage.params import Params
from storage.queries import Executor, fetch

LEVELS: Final = ("PATIENT", "STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True, slots=True)
class FindRequest:
    level: str
    criteria: tuple[tuple[str, str], ...]
    limit: int


FindMatch = dict[str, Any]
"""keyword → value (str, int, date, time or list of str) of one C-FIND match; and under
`PATIENTS` the ids of the patients it names (the audit's, never sent)."""
PATIENTS: Final = "_patients"

_TEXT: Final = "text"
_DATE: Final = "date"
_UIDS: Final = "uid"
_NAME: Final = "name"

# keyword → (SQL expression, kind); the expressions use the aliases s (study), se (series), i.
# A `_NAME` key's expression is the stored folded name, compared with the folded value.
_PATIENT_KEYS: Final = {
    "PatientID": ("s.dicom_patient_id", _TEXT),
    "IssuerOfPatientID": ("s.issuer_of_patient_id", _TEXT),
    "PatientName": ("s.patient_name_folded", _NAME),
    "PatientBirthDate": ("s.patient_birth_date", _DATE),
    "PatientSex": ("s.patient_sex", _TEXT),
}
_STUDY_KEYS: Final = {
    **_PATIENT_KEYS,
    "StudyInstanceUID": ("s.study_uid", _UIDS),
    "StudyDate": ("s.study_date", _DATE),
    "AccessionNumber": ("s.accession_number", _TEXT),
    "StudyID": ("s.study_id", _TEXT),
    "StudyDescription": ("s.description", _TEXT),
    "ReferringPhysicianName": ("s.referring_physician_folded", _NAME),
}
_SERIES_KEYS: Final = {
    **_STUDY_KEYS,
    "SeriesInstanceUID": ("se.series_uid", _UIDS),
    "Modality": ("se.modality", _TEXT),
    "SeriesDescription": ("se.description", _TEXT),
    "BodyPartExamined": ("se.body_part", _TEXT),
}
_IMAGE_KEYS: Final = {
    **_SERIES_KEYS,
    "SOPInstanceUID": ("i.sop_instance_uid", _UIDS),
    "SOPClassUID": ("i.sop_class_uid", _UIDS),
}
_KEYS: Final = {
    "PATIENT": _PATIENT_KEYS,
    "STUDY": _STUDY_KEYS,
    "SERIES": _SERIES_KEYS,
    "IMAGE": _IMAGE_KEYS,
}

_SELECT: Final = {
    "PATIENT": """SELECT s.dicom_patient_id AS "PatientID",
                         s.issuer_of_patient_id AS "IssuerOfPatientID",
                         max(s.patient_name) AS "PatientName",
                         max(s.patient_birth_date) AS "PatientBirthDate",
                         max(s.patient_sex) AS "PatientSex",
                         count(*) AS "NumberOfPatientRelatedStudies",
                         array_remove(array_agg(DISTINCT s.patient_id), NULL) AS "_patients"
                  FROM dicom_study s WHERE {where}
                  GROUP BY 1, 2 ORDER BY 1, 2 LIMIT {limit}""",
    "STUDY": """SELECT s.dicom_patient_id AS "PatientID",
                       s.issuer_of_patient_id AS "IssuerOfPatientID",
                       s.patient_name AS "PatientName",
                       s.patient_birth_date AS "PatientBirthDate", s.patient_sex AS "PatientSex",
                       s.study_uid AS "StudyInstanceUID", s.study_date AS "StudyDate",
                       s.study_time AS "StudyTime", s.accession_number AS "AccessionNumber",
                       s.study_id AS "StudyID", s.description AS "StudyDescription",
                       s.referring_physician AS "ReferringPhysicianName",
                       (SELECT coalesce(array_agg(DISTINCT se.modality), '{{}}')
                          FROM dicom_series se WHERE se.study_id = s.id) AS "ModalitiesInStudy",
                       (SELECT count(*) FROM dicom_series se WHERE se.study_id = s.id)
                           AS "NumberOfStudyRelatedSeries",
                       (SELECT count(*) FROM dicom_series se
                          JOIN dicom_instance i ON i.series_id = se.id
                          WHERE se.study_id = s.id) AS "NumberOfStudyRelatedInstances",
                       array_remove(ARRAY[s.patient_id], NULL) AS "_patients"
                FROM dicom_study s WHERE {where} ORDER BY s.id LIMIT {limit}""",
    "SERIES": """SELECT s.dicom_patient_id AS "PatientID", s.study_uid AS "StudyInstanceUID",
                        se.series_uid AS "SeriesInstanceUID", se.modality AS "Modality",
                        se.series_number AS "SeriesNumber",
                        se.description AS "SeriesDescription",
                        se.body_part AS "BodyPartExamined",
                        (SELECT count(*) FROM dicom_instance i WHERE i.series_id = se.id)
                            AS "NumberOfSeriesRelatedInstances",
                        array_remove(ARRAY[s.patient_id], NULL) AS "_patients"
                 FROM dicom_series se JOIN dicom_study s ON s.id = se.study_id
                 WHERE {where} ORDER BY se.id LIMIT {limit}""",
    "IMAGE": """SELECT s.dicom_patient_id AS "PatientID", s.study_uid AS "StudyInstanceUID",
                       se.series_uid AS "SeriesInstanceUID", i.sop_instance_uid AS "SOPInstanceUID",
                       i.sop_class_uid AS "SOPClassUID", i.instance_number AS "InstanceNumber",
                       array_remove(ARRAY[s.patient_id], NULL) AS "_patients"
                FROM dicom_instance i JOIN dicom_series se ON se.id = i.series_id
                     JOIN dicom_study s ON s.id = se.study_id
                WHERE {where} ORDER BY i.id LIMIT {limit}""",
}


class FindRequestError(ValueError):
    """The query's level or a value is not usable (answered 0xA900 / 0xC000)."""


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _parse_date(text: str) -> date:
    text = text.strip().replace("-", "").replace(".", "")
    if len(text) != 8 or not text.isdigit():
        raise FindRequestError("a date must be YYYYMMDD")
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


def _conditions(request: FindRequest) -> tuple[str, list[object]]:
    keys = _KEYS[request.level]
    where: list[str] = []
    param = Params()

    for keyword, raw in request.criteria:
        value = raw.strip()
        if keyword not in keys or value in ("", "*"):
            continue
        column, kind = keys[keyword]
        if kind == _DATE:
            if "-" in value:
                low, _, high = value.partition("-")
                if low.strip():
                    where.append(f"{column} >= {param(_parse_date(low))}")
                if high.strip():
                    where.append(f"{column} <= {param(_parse_date(high))}")
            else:
                where.append(f"{column} = {param(_parse_date(value))}")
        elif kind == _UIDS and "\\" in value:
            where.append(f"{column} = ANY({param([v.strip() for v in value.split(chr(92))])})")
        else:
            wildcard = "*" in value or "?" in value
            operator, operand = ("LIKE", _like(value)) if wildcard else ("=", value)
            placeholder = param(operand)
            if kind == _NAME:  # the column holds the folded name
                placeholder = f"qantara_fold({placeholder})"
            where.append(f"{column} {operator} {placeholder}")
    return (" AND ".join(where) or "true"), param.values


async def find(db: Executor, request: FindRequest) -> list[FindMatch]:
    """The matches of a C-FIND at `request.level`, at most `request.limit` of them."""
    if request.level not in _SELECT:
        raise FindRequestError(f"unsupported query level {request.level!r}")
    where, values = _conditions(request)
    sql = _SELECT[request.level].format(where=where, limit=int(request.limit))
    rows = await fetch(db, sql, *values)
    return [dict(r) for r in rows]


# --- FHIR ImagingStudy ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeriesRecord:
    uid: str
    modality: str
    number: int | None
    description: str
    body_part: str
    instances: int


@dataclass(frozen=True, slots=True)
class ImagingStudyRecord:
    id: int
    subject_id: int
    study_uid: str
    started: datetime | None
    study_date: date | None
    study_time: time | None
    description: str
    accession_number: str
    series: tuple[SeriesRecord, ...]

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted({s.modality for s in self.series if s.modality}))

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)


async def indexed_files(db: Executor, file_paths: Sequence[str]) -> set[str]:
    """Which of these file locations (relative to the DICOM store) an instance row names."""
    rows = await fetch(
        db,
        "SELECT file_path FROM dicom_instance WHERE file_path = ANY($1::text[])",
        list(file_paths),
    )
    return {r["file_path"] for r in rows}


async def held_instances(db: Executor, sop_instance_uids: Sequence[str]) -> dict[str, str]:
    """The SOP Class UID of each of these SOP Instance UIDs the index names (Storage
    Commitment: an indexed instance's file is durable)."""
    rows = await fetch(
        db,
        "SELECT sop_instance_uid, sop_class_uid FROM dicom_instance"
        " WHERE sop_instance_uid = ANY($1::text[])",
        list(sop_instance_uids),
    )
    return {r["sop_instance_uid"]: r["sop_class_uid"] for r in rows}


# --- C-GET ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetrieveKeys:
    """The unique keys of a C-GET identifier (PS3.4 C.4.3.1.3.1, hierarchical): the patient's
    (Patient Root), then the UIDs down to the retrieve level; at the level itself a list of UIDs
    (one or more), above it one value. Empty: not given."""

    level: str
    patient_id: str = ""
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    instance_uids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RetrievableInstance:
    """An indexed instance to send: where its file lies (relative to the DICOM store), in which
    transfer syntax it was received, and the patient it belongs to (for the audit)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    file_path: str
    size: int
    patient: int | None


_RETRIEVE: Final = """SELECT i.sop_class_uid, i.sop_instance_uid, i.transfer_syntax, i.file_path,
                              i.size, s.patient_id
                       FROM dicom_instance i JOIN dicom_series se ON se.id = i.series_id
                            JOIN dicom_study s ON s.id = se.study_id
                       WHERE {where}
                       ORDER BY se.id, i.instance_number NULLS LAST, i.id
                       LIMIT {limit}"""


async def retrievable(db: Executor, keys: RetrieveKeys, limit: int) -> list[RetrievableInstance]:
    """The instances a C-GET with `keys` names, in the order they were indexed (by series, then
    instance number): at most `limit` + 1, so that the caller sees when there are more."""
    param = Params()
    where: list[str] = []
    for column, values in (
        ("s.study_uid", keys.study_uids),
        ("se.series_uid", keys.series_uids),
        ("i.sop_instance_uid", keys.instance_uids),
    ):
        if values:
            where.append(f"{column} = ANY({param(list(values), 'text[]')})")
    if keys.patient_id:
        where.append(f"s.dicom_patient_id = {param(keys.patient_id)}")
    if not where:
        raise FindRequestError("no unique key")
    sql = _RETRIEVE.format(where=" AND ".join(where), limit=int(limit) + 1)
    rows = await fetch(db, sql, *param.values)
    return [
        RetrievableInstance(
            r["sop_class_uid"],
            r["sop_instance_uid"],
            r["transfer_syntax"],
            r["file_path"],
            int(r["size"]),
            r["patient_id"],
        )
        for r in rows
    ]


# --- the archive's integrity check (`qantara dicom verify`) -----------------------------------


@dataclass(frozen=True, slots=True)
class IndexedFile:
    """What an instance row says of its file: where it lies (relative to the DICOM store), its
    size and SHA-256 when it was acknowledged; and the UIDs an operator asks a resend by."""

    id: int
    sop_instance_uid: str
    study_uid: str
    file_path: str
    size: int
    sha256: bytes


_INDEXED_FILES: Final = """SELECT i.id, i.sop_instance_uid, s.study_uid, i.file_path, i.size,
                                  i.sha256
                           FROM dicom_instance i JOIN dicom_series se ON se.id = i.series_id
                                JOIN dicom_study s ON s.id = se.study_id
                           WHERE {where}"""


def _indexed_file(row: Any) -> IndexedFile:
    return IndexedFile(
        int(row["id"]),
        row["sop_instance_uid"],
        row["study_uid"],
        row["file_path"],
        int(row["size"]),
        bytes(row["sha256"]),
    )


async def files_to_verify(
    db: Executor, after_id: int, since: datetime | None, limit: int
) -> list[IndexedFile]:
    """The next `limit` instance rows after the id `after_id`, in id order (a keyset page),
    received at `since` or later when given."""
    where = "i.id > $1 AND ($2::timestamptz IS NULL OR i.received_at >= $2) ORDER BY i.id LIMIT $3"
    rows = await fetch(db, _INDEXED_FILES.format(where=where), after_id, since, limit)
    return [_indexed_file(r) for r in rows]


async def file_of(db: Executor, instance_id: int) -> IndexedFile | None:
    """The instance row `instance_id` as it is now, or None when there is none."""
    rows = await fetch(db, _INDEXED_FILES.format(where="i.id = $1"), instance_id)
    return _indexed_file(rows[0]) if rows else None
