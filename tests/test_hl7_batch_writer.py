"""The HL7 part of a batch (`storage.writer_hl7`, `hl7_write_batch`), on a real PostgreSQL.

Several messages in one batch, as the group commit builds them under load: what they say about
one patient, merges, resends and two replicas racing on a new identifier.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from ingest.records import (
    CodedValue,
    Envelope,
    Hl7Key,
    LabObservation,
    LabReport,
    OutcomeKind,
    PatientDemographics,
    PatientMerge,
    PatientName,
    PatientRef,
    Protocol,
    RawMessage,
    Record,
)
from storage.migrations import apply_migrations
from storage.writer import BatchWriter

SENT = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def pool(module_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(module_dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await apply_migrations(conn)
    yield pool
    await pool.close()


def cin() -> PatientRef:
    return PatientRef("CIN", f"T{uuid.uuid4().hex[:8].upper()}")


def message(
    *records: Record, sent_at: datetime = SENT, control: str | None = None, kind: str = "ORU^R01"
) -> Envelope:
    raw = RawMessage(kind, "2.5.1", "UNICODE UTF-8", sent_at, b"MSH|^~\\&|...")
    return Envelope(
        protocol=Protocol.HL7,
        key=Hl7Key("LIS", "LAB", control or uuid.uuid4().hex),
        records=(raw, *records),
        received_at=datetime.now(UTC),
        ack=asyncio.get_running_loop().create_future(),
        source="LIS|LAB",
        raw=b"",
    )


def report(patient: tuple[PatientRef, ...], *flags: str) -> LabReport:
    return LabReport(
        patient=patient,
        placer_id="P1",
        filler_id="F1",
        service=CodedValue("LN", "58410-2", "CBC"),
        observed_at=SENT,
        observations=(
            LabObservation(
                1,
                "NM",
                CodedValue("LN", "718-7", "Hemoglobin"),
                numeric=13.5,
                unit="g/dL",
                abnormal_flags=flags,
            ),
        ),
    )


def adt(patient: tuple[PatientRef, ...], family: str) -> PatientDemographics:
    return PatientDemographics(patient, (PatientName(family=family),), authoritative=True)


async def patient_of(pool: asyncpg.Pool, ref: PatientRef) -> asyncpg.Record:
    return await pool.fetchrow(
        """SELECT p.* FROM patient_identifier pi JOIN patient p ON p.id = pi.patient_id
           WHERE pi.system = $1 AND pi.value = $2""",
        ref.system,
        ref.value,
    )


async def test_oru_of_a_new_patient_creates_them_with_the_pid_names_and_stores_the_results(
    pool: asyncpg.Pool,
) -> None:
    who = (cin(),)
    pid = PatientDemographics(
        who, (PatientName(family="بنعلي", given=("فاطمة",)),), date(1990, 1, 2), "female"
    )
    outcomes = await BatchWriter(pool).write([message(pid, report(who))])
    assert [o.kind for o in outcomes] == [OutcomeKind.STORED]
    row = await patient_of(pool, who[0])
    assert row["birth_date"] == date(1990, 1, 2)
    assert row["gender"] == "female"
    assert "بنعلي" in row["names"]
    count = await pool.fetchval(
        "SELECT count(*) FROM lab_observation WHERE patient_id = $1", row["id"]
    )
    assert count == 1


async def test_identifiers_shared_across_messages_of_a_batch_make_one_patient(
    pool: asyncpg.Pool,
) -> None:
    national, mrn, other = cin(), PatientRef("urn:mrn", uuid.uuid4().hex), cin()
    await BatchWriter(pool).write(
        [
            message(report((national,))),
            message(report((mrn, national))),
            message(report((other, mrn))),
        ]
    )
    ids = {(await patient_of(pool, ref))["id"] for ref in (national, mrn, other)}
    assert len(ids) == 1


async def test_the_newest_adt_of_a_batch_wins_whatever_its_place(pool: asyncpg.Pool) -> None:
    who = (cin(),)
    await BatchWriter(pool).write(
        [
            message(adt(who, "Newest"), sent_at=SENT + timedelta(hours=2), kind="ADT^A08"),
            message(adt(who, "Oldest"), sent_at=SENT, kind="ADT^A08"),
            message(adt(who, "Middle"), sent_at=SENT + timedelta(hours=1), kind="ADT^A08"),
        ]
    )
    assert "Newest" in (await patient_of(pool, who[0]))["names"]


async def test_an_oru_fills_only_what_an_adt_of_the_same_batch_left_missing(
    pool: asyncpg.Pool,
) -> None:
    who = (cin(),)
    fill = PatientDemographics(who, (PatientName(family="Oru"),), date(1980, 5, 6), "male")
    await BatchWriter(pool).write(
        [message(adt(who, "Adt"), kind="ADT^A04"), message(fill, report(who))]
    )
    row = await patient_of(pool, who[0])
    assert "Adt" in row["names"]
    assert "Oru" not in row["names"]
    assert row["birth_date"] == date(1980, 5, 6)
    assert row["gender"] == "male"


async def test_a_merge_and_a_result_of_the_prior_patient_in_one_batch(pool: asyncpg.Pool) -> None:
    survivor, prior = (cin(),), (cin(),)
    await BatchWriter(pool).write(
        [message(adt(survivor, "Survivor")), message(adt(prior, "Prior"))]
    )
    outcomes = await BatchWriter(pool).write(
        [
            message(PatientMerge(survivor, prior), kind="ADT^A40"),
            message(report(prior)),
        ]
    )
    assert [o.kind for o in outcomes] == [OutcomeKind.STORED, OutcomeKind.STORED]
    kept, merged = await patient_of(pool, survivor[0]), await patient_of(pool, prior[0])
    assert merged["replaced_by"] == kept["id"]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM patient_merge WHERE prior_id = $1 AND survivor_id = $2",
            merged["id"],
            kept["id"],
        )
        == 1
    )


async def test_a_resend_in_a_later_batch_is_a_duplicate_and_adds_nothing(
    pool: asyncpg.Pool,
) -> None:
    who = (cin(),)
    control = uuid.uuid4().hex
    writer = BatchWriter(pool)
    await writer.write([message(report(who), control=control)])
    again = await writer.write([message(report(who), control=control), message(report(who))])
    assert [o.kind for o in again] == [OutcomeKind.DUPLICATE, OutcomeKind.STORED]
    patient = (await patient_of(pool, who[0]))["id"]
    assert (
        await pool.fetchval("SELECT count(*) FROM lab_report WHERE patient_id = $1", patient) == 2
    )


async def test_abnormal_flags_keep_their_order_and_any_character(pool: asyncpg.Pool) -> None:
    who = (cin(),)
    await BatchWriter(pool).write([message(report(who, "H", "", "A\x1fB"))])
    patient = (await patient_of(pool, who[0]))["id"]
    flags = await pool.fetchval(
        "SELECT abnormal_flags FROM lab_observation WHERE patient_id = $1", patient
    )
    assert flags == ["H", "", "A\x1fB"]


async def test_two_replicas_creating_one_new_patient_at_once_end_with_one(
    pool: asyncpg.Pool,
) -> None:
    for _ in range(5):
        who = (cin(),)
        first, second = BatchWriter(pool), BatchWriter(pool)
        results = await asyncio.gather(
            first.write([message(report(who))]), second.write([message(report(who))])
        )
        assert all(o.kind is OutcomeKind.STORED for batch in results for o in batch)
        patient = (await patient_of(pool, who[0]))["id"]
        assert (
            await pool.fetchval("SELECT count(*) FROM lab_report WHERE patient_id = $1", patient)
            == 2
        )
        # no patient without an identifier was left behind by the loser of the race
        assert (
            await pool.fetchval(
                """SELECT count(*) FROM patient p WHERE p.created_at > now() - interval '1 minute'
               AND NOT EXISTS (SELECT 1 FROM patient_identifier pi WHERE pi.patient_id = p.id)"""
            )
            == 0
        )
