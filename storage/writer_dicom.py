"""The DICOM part of a batch: study, series and instance index rows, in the batch's transaction.

Called by `storage.writer.BatchWriter` with the positions of the envelopes keyed by `DicomKey`
(every one of them, including repeats of a key inside the batch). The SOP Instance UID is the
natural key: a UID already indexed (or indexed earlier in the same batch) is a duplicate; when its
SHA-256 differs from the first copy's, the outcome carries `reason="content-conflict"` and a
`dicom_conflict` row records it. The first copy is always the one kept.

The statements run server-side in one call per batch, `dicom_index_instances` (migrations 0007
and 0009), conflict rows included: one statement, so that a batch of DICOM envelopes only needs
no BEGIN/COMMIT of its own (`BatchWriter.write`), since a single modality's association commits
one instance per batch. `single_statement` tells which envelopes this module indexes that way.

Patients: the identifiers of one header (PatientID with its issuer, the national id from Other
Patient IDs) are linked to one patient, the one that already carries any of them, else a new
one. Names, birth date and sex fill a patient's demographics only where they are still empty:
HL7 ADT stays the authority.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime, time
from typing import Final

import asyncpg

from ingest.records import DicomInstance, DicomKey, Envelope, Outcome, OutcomeKind

CONFLICT: Final = "content-conflict"
"""`Outcome.reason` of a duplicate whose content differs from the first copy's."""

_GENDERS: Final = {"M": "male", "F": "female", "O": "other"}


def instance_of(env: Envelope) -> DicomInstance | None:
    for record in env.records:
        if isinstance(record, DicomInstance):
            return record
    return None


def single_statement(env: Envelope) -> bool:
    """True when `write_dicom` handles `env` entirely in its one statement (an instance, no dead
    letter): a batch of such envelopes only is atomic without an explicit transaction."""
    records = env.records
    return (
        isinstance(env.key, DicomKey)
        and bool(records)
        and all(isinstance(record, DicomInstance) for record in records)
    )


async def write_dicom(
    conn: asyncpg.Connection, batch: Sequence[Envelope], indexes: Sequence[int]
) -> dict[int, Outcome]:
    """Index the instances at `indexes` of `batch`; one outcome per index. One statement."""
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

    known: dict[str, bytes] = {}
    for r in await conn.fetch(
        "SELECT uid, inserted, stored_sha256 FROM dicom_index_instances($1::jsonb)",
        json.dumps([_item(batch[i]) for i in indexes if i not in outcomes], ensure_ascii=False),
    ):
        known[r["uid"]] = bytes(r["stored_sha256"])
        if r["inserted"]:
            outcomes[firsts[r["uid"]]] = Outcome(OutcomeKind.STORED)

    # The function has recorded the conflicts (`dicom_conflict`), in batch order.
    for i in indexes:
        if i in outcomes:
            continue
        instance = _instance(batch[i])
        if known.get(instance.sop_instance_uid) == instance.sha256:
            outcomes[i] = Outcome(OutcomeKind.DUPLICATE)
        else:
            outcomes[i] = Outcome(OutcomeKind.DUPLICATE, reason=CONFLICT)
    return outcomes


def _instance(env: Envelope) -> DicomInstance:
    instance = instance_of(env)
    assert instance is not None  # noqa: S101 - envelopes without one were answered first
    return instance


def _item(env: Envelope) -> dict[str, object]:
    """One instance as `dicom_index_instances` (storage/sql/0009_dicom_index_lookups.sql) reads
    it."""
    i = _instance(env)
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
        for n, name in enumerate(i.patient_names)
    ]
    first = i.patient_names[0] if i.patient_names else None
    return {
        "uid": i.sop_instance_uid,
        "sop_class_uid": i.sop_class_uid,
        "study_uid": i.study_uid,
        "series_uid": i.series_uid,
        "transfer_syntax": i.transfer_syntax,
        "file_path": i.file_path,
        "size": i.size,
        "sha256": i.sha256.hex(),
        "calling_ae": i.calling_ae,
        "received_at": env.received_at.isoformat(),
        "refs": sorted([r.system, r.value] for r in set(i.patient)),
        "names": names,
        "family": first.family if first else None,
        "given": list(first.given) if first and first.given else None,
        "birth_date": _iso(i.patient_birth_date),
        "gender": _GENDERS.get(i.patient_sex.upper()),
        "patient_name": i.patient_name,
        "patient_sex": i.patient_sex,
        "dicom_patient_id": i.dicom_patient_id,
        "issuer_of_patient_id": i.issuer_of_patient_id,
        "charset": i.charset,
        "study_date": _iso(i.study_date),
        "study_time": _iso(i.study_time),
        "study_started": _iso(i.study_started),
        "study_id": i.study_id,
        "accession_number": i.accession_number,
        "study_description": i.study_description,
        "referring_physician": i.referring_physician,
        "series_number": i.series_number,
        "series_description": i.series_description,
        "modality": i.modality,
        "body_part": i.body_part,
        "instance_number": i.instance_number,
        "content_date": _iso(i.content_date),
    }


def _iso(value: date | time | datetime | None) -> str | None:
    return None if value is None else value.isoformat()
