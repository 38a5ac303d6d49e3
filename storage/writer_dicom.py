"""The DICOM part of a batch: study, series and instance index rows, inside the batch's transaction.

Called by `storage.writer.BatchWriter` with the positions of the envelopes keyed by `DicomKey`
(every one of them, including repeats of a key inside the batch). The SOP Instance UID is the
natural key: a UID already indexed (or indexed earlier in the same batch) is a duplicate; when its
SHA-256 differs from the first copy's, the outcome carries `reason="content-conflict"` and a
`dicom_conflict` row records it. The first copy is always the one kept.

Patients: the identifiers of one header (PatientID with its issuer, the national id from Other
Patient IDs) are linked to one patient, the one that already carries any of them, else a new
one. Names, birth date and sex fill a patient's demographics only where they are still empty:
HL7 ADT stays the authority.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

import asyncpg

from ingest.records import DicomInstance, DicomKey, Envelope, Outcome, OutcomeKind, PatientRef

CONFLICT: Final = "content-conflict"
"""`Outcome.reason` of a duplicate whose content differs from the first copy's."""

_GENDERS: Final = {"M": "male", "F": "female", "O": "other"}


def instance_of(env: Envelope) -> DicomInstance | None:
    for record in env.records:
        if isinstance(record, DicomInstance):
            return record
    return None


async def write_dicom(
    conn: asyncpg.Connection, batch: Sequence[Envelope], indexes: Sequence[int]
) -> dict[int, Outcome]:
    """Index the instances at `indexes` of `batch`; one outcome per index."""
    outcomes: dict[int, Outcome] = {}
    firsts: dict[str, int] = {}
    for i in indexes:
        key = batch[i].key
        assert isinstance(key, DicomKey)  # noqa: S101 - callers filter on the key type
        if instance_of(batch[i]) is None:
            outcomes[i] = Outcome(OutcomeKind.REJECTED, reason="no-instance")
            continue
        firsts.setdefault(key.sop_instance_uid, i)
    if not firsts:
        return outcomes

    known = {
        r["sop_instance_uid"]: bytes(r["sha256"])
        for r in await conn.fetch(
            "SELECT sop_instance_uid, sha256 FROM dicom_instance"
            " WHERE sop_instance_uid = ANY($1::text[])",
            sorted(firsts),
        )
    }
    fresh = [i for uid, i in sorted(firsts.items()) if uid not in known]
    if fresh:
        inserted = await _insert(conn, batch, fresh)
        raced = [i for i in fresh if _uid(batch[i]) not in inserted]
        if raced:  # another replica indexed them between our SELECT and INSERT
            for r in await conn.fetch(
                "SELECT sop_instance_uid, sha256 FROM dicom_instance"
                " WHERE sop_instance_uid = ANY($1::text[])",
                [_uid(batch[i]) for i in raced],
            ):
                known[r["sop_instance_uid"]] = bytes(r["sha256"])
        for i in fresh:
            if _uid(batch[i]) in inserted:
                outcomes[i] = Outcome(OutcomeKind.STORED)
                known[_uid(batch[i])] = _instance(batch[i]).sha256

    conflicts: list[DicomInstance] = []
    for i in indexes:
        if i in outcomes:
            continue
        instance = _instance(batch[i])
        if known.get(instance.sop_instance_uid) == instance.sha256:
            outcomes[i] = Outcome(OutcomeKind.DUPLICATE)
        else:
            outcomes[i] = Outcome(OutcomeKind.DUPLICATE, reason=CONFLICT)
            conflicts.append(instance)
    if conflicts:
        received = {id(_instance(batch[i])): batch[i].received_at for i in indexes}
        await conn.executemany(
            """INSERT INTO dicom_conflict (sop_instance_uid, sha256, size, calling_ae, received_at)
               VALUES ($1, $2, $3, $4, $5)""",
            [
                (c.sop_instance_uid, c.sha256, c.size, c.calling_ae, received[id(c)])
                for c in conflicts
            ],
        )
    return outcomes


def _instance(env: Envelope) -> DicomInstance:
    instance = instance_of(env)
    assert instance is not None  # noqa: S101 - envelopes without one were answered first
    return instance


def _uid(env: Envelope) -> str:
    return _instance(env).sop_instance_uid


async def _insert(
    conn: asyncpg.Connection, batch: Sequence[Envelope], fresh: list[int]
) -> set[str]:
    instances = [_instance(batch[i]) for i in fresh]
    patients: dict[tuple[PatientRef, ...], int] = {}
    for instance in instances:
        if instance.patient and instance.patient not in patients:
            patients[instance.patient] = await _link_patient(conn, instance)

    studies: dict[str, DicomInstance] = {}
    for instance in instances:
        studies.setdefault(instance.study_uid, instance)
    await conn.executemany(
        """INSERT INTO dicom_study
               (study_uid, patient_id, dicom_patient_id, issuer_of_patient_id, patient_name,
                patient_birth_date, patient_sex, study_date, study_time, started, study_id,
                accession_number, description, referring_physician, charset)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
           ON CONFLICT (study_uid) DO NOTHING""",
        [
            (
                s.study_uid,
                patients.get(s.patient),
                s.dicom_patient_id,
                s.issuer_of_patient_id,
                s.patient_name,
                s.patient_birth_date,
                s.patient_sex,
                s.study_date,
                s.study_time,
                s.study_started,
                s.study_id,
                s.accession_number,
                s.study_description,
                s.referring_physician,
                s.charset,
            )
            for _, s in sorted(studies.items())
        ],
    )
    study_ids = {
        r["study_uid"]: r["id"]
        for r in await conn.fetch(
            "SELECT id, study_uid FROM dicom_study WHERE study_uid = ANY($1::text[])",
            sorted(studies),
        )
    }

    series: dict[str, DicomInstance] = {}
    for instance in instances:
        series.setdefault(instance.series_uid, instance)
    await conn.executemany(
        """INSERT INTO dicom_series
               (study_id, series_uid, modality, series_number, description, body_part)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (series_uid) DO NOTHING""",
        [
            (
                study_ids[s.study_uid],
                s.series_uid,
                s.modality,
                s.series_number,
                s.series_description,
                s.body_part,
            )
            for _, s in sorted(series.items())
        ],
    )
    series_ids = {
        r["series_uid"]: r["id"]
        for r in await conn.fetch(
            "SELECT id, series_uid FROM dicom_series WHERE series_uid = ANY($1::text[])",
            sorted(series),
        )
    }

    columns: tuple[list[object], ...] = tuple([] for _ in range(11))
    for i, instance in zip(fresh, instances, strict=True):
        values = (
            series_ids[instance.series_uid],
            instance.sop_instance_uid,
            instance.sop_class_uid,
            instance.instance_number,
            instance.content_date,
            instance.transfer_syntax,
            instance.file_path,
            instance.size,
            instance.sha256,
            instance.calling_ae,
            batch[i].received_at,
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    rows = await conn.fetch(
        """INSERT INTO dicom_instance
               (series_id, sop_instance_uid, sop_class_uid, instance_number, content_date,
                transfer_syntax, file_path, size, sha256, calling_ae, received_at)
           SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::date[],
                                $6::text[], $7::text[], $8::bigint[], $9::bytea[], $10::text[],
                                $11::timestamptz[])
           ON CONFLICT (sop_instance_uid) DO NOTHING
           RETURNING sop_instance_uid""",
        *columns,
    )
    return {r["sop_instance_uid"] for r in rows}


async def _link_patient(conn: asyncpg.Connection, instance: DicomInstance) -> int:
    """The patient carrying any of the header's identifiers (a new one if none); every
    identifier of the header is linked to it, and empty demographics are filled."""
    refs = sorted({(r.system, r.value) for r in instance.patient})
    rows = await conn.fetch(
        """SELECT coalesce(p.replaced_by, p.id) AS id
           FROM unnest($1::text[], $2::text[]) AS k(system, value)
           JOIN patient_identifier pi USING (system, value)
           JOIN patient p ON p.id = pi.patient_id
           ORDER BY 1 LIMIT 1""",
        [r[0] for r in refs],
        [r[1] for r in refs],
    )
    if rows:
        patient_id = int(rows[0]["id"])
    else:
        patient_id = int(
            await conn.fetchval("INSERT INTO patient (names) VALUES ('[]'::jsonb) RETURNING id")
        )
    await conn.execute(
        """INSERT INTO patient_identifier (system, value, patient_id)
           SELECT s, v, $3 FROM unnest($1::text[], $2::text[]) AS k(s, v)
           ON CONFLICT (system, value) DO NOTHING""",
        [r[0] for r in refs],
        [r[1] for r in refs],
        patient_id,
    )
    names = [
        {
            k: v
            for k, v in (
                ("use", "official" if n == 0 else None),
                ("family", name.family),
                ("given", list(name.given) or None),
                ("prefix", list(name.prefix) or None),
                ("suffix", list(name.suffix) or None),
            )
            if v
        }
        for n, name in enumerate(instance.patient_names)
    ]
    first = instance.patient_names[0] if instance.patient_names else None
    await conn.execute(
        """UPDATE patient SET
               names = CASE WHEN names = '[]'::jsonb THEN $2::jsonb ELSE names END,
               family = coalesce(family, $3),
               given = coalesce(given, $4::text[]),
               birth_date = coalesce(birth_date, $5),
               gender = coalesce(gender, $6),
               updated_at = now()
           WHERE id = $1""",
        patient_id,
        json.dumps(names, ensure_ascii=False),
        first.family if first else None,
        list(first.given) if first and first.given else None,
        instance.patient_birth_date,
        _GENDERS.get(instance.patient_sex.upper()),
    )
    return patient_id
