"""The group-commit pipeline and the bulk writer, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from ingest.errors import StorageUnavailable
from ingest.pipeline import GroupCommitPipeline, PipelineSettings
from ingest.records import (
    DeadLetter,
    DeadLetterKey,
    DicomInstance,
    DicomKey,
    Envelope,
    MqttKey,
    Outcome,
    OutcomeKind,
    PatientRef,
    Protocol,
    Sample,
    VitalsMessage,
)
from monitoring.metrics import Metrics
from storage.ledger import LEDGER_LOCK_KEY, LedgerPruning, prune_ledger, run_ledger_pruning
from storage.migrations import apply_migrations
from storage.pool import PoolSettings, create_pool
from storage.writer import BatchWriter, ensure_partitions
from tests.services_support import wait_until


@pytest.fixture(scope="module")
async def pool(postgres_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await apply_migrations(conn)
    yield pool
    await pool.close()


def unit_name() -> str:
    return f"T-{uuid.uuid4().hex[:10]}"


def vitals(unit: str, seq: int, *, cin: str = "AB123456", device: str = "MON-1") -> VitalsMessage:
    t = datetime.now(UTC) - timedelta(seconds=seq)
    return VitalsMessage(
        unit_id=unit,
        seq=seq,
        sent_at=t,
        device_id=device,
        device_kind="multiparameter-monitor",
        patient=PatientRef("CIN", cin),
        samples=(
            Sample(t=t, code="8867-4", value=72.0 + seq, unit="/min"),
            Sample(t=t, code="59408-5", value=97.0, unit="%"),
        ),
    )


def envelope(message: VitalsMessage | DeadLetter, key: MqttKey | DeadLetterKey) -> Envelope:
    return Envelope(
        protocol=Protocol.MQTT,
        key=key,
        records=(message,),
        received_at=datetime.now(UTC),
        ack=asyncio.get_running_loop().create_future(),
        source=key.unit_id if isinstance(key, MqttKey) else key.source,
        raw=b"{}",
    )


def mqtt(unit: str, seq: int, **kwargs: str) -> Envelope:
    return envelope(vitals(unit, seq, **kwargs), MqttKey(unit, seq))


async def vital_count(pool: asyncpg.Pool, unit: str) -> int:
    return int(
        await pool.fetchval(
            """SELECT count(*) FROM vital v JOIN device d ON d.id = v.device_id
               JOIN unit u ON u.id = d.unit_id WHERE u.name = $1""",
            unit,
        )
    )


async def test_new_message_is_stored_with_a_row_per_sample(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    [outcome] = await BatchWriter(pool).write([mqtt(unit, 1)])
    assert outcome == Outcome(OutcomeKind.STORED, watermark=1)
    assert await vital_count(pool, unit) == 2


async def test_resend_of_committed_seq_is_duplicate_and_stores_nothing(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    writer = BatchWriter(pool)
    await writer.write([mqtt(unit, 1)])
    [outcome] = await writer.write([mqtt(unit, 1)])
    assert outcome.kind is OutcomeKind.DUPLICATE
    assert await vital_count(pool, unit) == 2


async def test_same_key_twice_in_one_batch_is_stored_once(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    outcomes = await BatchWriter(pool).write([mqtt(unit, 1), mqtt(unit, 1)])
    assert [o.kind for o in outcomes] == [OutcomeKind.STORED, OutcomeKind.DUPLICATE]
    assert await vital_count(pool, unit) == 2


async def test_watermark_waits_for_the_gap_then_jumps_over_the_run(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    writer = BatchWriter(pool)
    first = await writer.write([mqtt(unit, 1), mqtt(unit, 3), mqtt(unit, 4)])
    assert {o.watermark for o in first} == {1}
    [filled] = await writer.write([mqtt(unit, 2)])
    assert filled.watermark == 4


async def test_watermark_stays_zero_until_seq_one_arrives(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    [outcome] = await BatchWriter(pool).write([mqtt(unit, 5)])
    assert outcome.watermark == 0


async def test_rejected_message_with_a_seq_counts_toward_the_watermark(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    letter = DeadLetter(Protocol.MQTT, unit, "non-numeric-value", "samples[0].value", b"{...}")
    outcomes = await BatchWriter(pool).write([envelope(letter, MqttKey(unit, 1)), mqtt(unit, 2)])
    assert outcomes[0] == Outcome(OutcomeKind.REJECTED, reason="non-numeric-value", watermark=2)
    reasons = await pool.fetch("SELECT reason FROM dead_letter WHERE source = $1", unit)
    assert [r["reason"] for r in reasons] == ["non-numeric-value"]


async def test_unreadable_payload_replayed_is_dead_lettered_once(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    raw = b"\xff\xfe not json"
    key = DeadLetterKey(Protocol.MQTT, unit, hashlib.sha256(raw).digest())
    letter = DeadLetter(Protocol.MQTT, unit, "not-utf8", "payload is not UTF-8", raw)
    writer = BatchWriter(pool)
    for _ in range(2):
        [outcome] = await writer.write([envelope(letter, key)])
        assert outcome.kind is OutcomeKind.REJECTED
    count = await pool.fetchval("SELECT count(*) FROM dead_letter WHERE source = $1", unit)
    assert count == 1


async def test_identifiers_of_one_person_resolve_to_one_patient(pool: asyncpg.Pool) -> None:
    cin = f"ZZ{uuid.uuid4().int % 10**6:06d}"
    unit_a, unit_b = unit_name(), unit_name()
    await BatchWriter(pool).write([mqtt(unit_a, 1, cin=cin), mqtt(unit_b, 1, cin=cin)])
    patients = await pool.fetchval(
        "SELECT count(DISTINCT patient_id) FROM patient_identifier WHERE value = $1", cin
    )
    assert patients == 1


async def test_dictionary_ids_survive_a_rolled_back_batch(pool: asyncpg.Pool) -> None:
    """Ids learnt in a transaction that fails must not be cached as if committed."""
    unit = unit_name()
    writer = BatchWriter(pool)
    bad = mqtt(unit, 1, device="MON\x00")  # PostgreSQL text refuses NUL: the batch fails
    with pytest.raises(asyncpg.PostgresError):
        await writer.write([mqtt(unit, 2, cin="CC000001"), bad])
    [outcome] = await writer.write([mqtt(unit, 2, cin="CC000001")])
    assert outcome.kind is OutcomeKind.STORED


async def test_pipeline_resolves_futures_after_commit_in_submission_order(
    pool: asyncpg.Pool,
) -> None:
    unit = unit_name()
    pipeline = GroupCommitPipeline(BatchWriter(pool), PipelineSettings(), Metrics())
    runner = asyncio.create_task(pipeline.run())
    envelopes = [mqtt(unit, seq) for seq in range(1, 201)]
    order: list[int] = []
    for env in envelopes:
        key = env.key
        assert isinstance(key, MqttKey)
        env.ack.add_done_callback(functools.partial(_note_seq, order, key.seq))
        await pipeline.submit(env)
    async with asyncio.timeout(30):
        outcomes = await asyncio.gather(*(env.ack for env in envelopes))
    await pipeline.close()
    await asyncio.wait_for(runner, 10)
    assert {o.kind for o in outcomes} == {OutcomeKind.STORED}
    assert order == list(range(1, 201))
    assert outcomes[-1].watermark == 200
    assert await vital_count(pool, unit) == 400


async def test_refused_envelope_is_dead_lettered_and_the_rest_of_its_batch_stored(
    pool: asyncpg.Pool,
) -> None:
    unit = unit_name()
    metrics = Metrics()
    pipeline = GroupCommitPipeline(BatchWriter(pool), PipelineSettings(), metrics)
    envelopes = [mqtt(unit, 1), mqtt(unit, 2, device="BAD\x00"), mqtt(unit, 3)]
    for env in envelopes:
        await pipeline.submit(env)
    await pipeline.close()
    await asyncio.wait_for(pipeline.run(), 30)
    kinds = [env.ack.result().kind for env in envelopes]
    assert kinds == [OutcomeKind.STORED, OutcomeKind.REJECTED, OutcomeKind.STORED]
    assert envelopes[1].ack.result().reason == "storage-refused"
    assert envelopes[2].ack.result().watermark == 3
    assert (
        metrics.sample(
            "qantara_messages_rejected_total", {"protocol": "mqtt", "reason": "storage-refused"}
        )
        == 1
    )


async def test_a_refusal_is_logged_without_the_values_the_database_quoted(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    cin = f"LEAK{secrets.token_hex(4).upper()}"
    await pool.execute(QUOTING_TRIGGER)
    try:
        pipeline = GroupCommitPipeline(BatchWriter(pool), PipelineSettings(), Metrics())
        env = mqtt(unit_name(), 1, cin=cin)
        with caplog.at_level(logging.INFO):
            await pipeline.submit(env)
            await pipeline.close()
            await asyncio.wait_for(pipeline.run(), 30)
    finally:
        await pool.execute("DROP TRIGGER test_quote ON patient_identifier")
    assert env.ack.result().reason == "storage-refused"
    assert "(RaiseError, SQLSTATE P0001)" in caplog.text
    assert cin not in caplog.text


QUOTING_TRIGGER = """
CREATE OR REPLACE FUNCTION test_quote() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.value LIKE 'LEAK%' THEN
        RAISE EXCEPTION 'refused %', NEW.value USING DETAIL = 'Key (value)=(' || NEW.value || ')';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_quote BEFORE INSERT ON patient_identifier
    FOR EACH ROW EXECUTE FUNCTION test_quote();
"""


async def test_partition_created_later_takes_the_rows_of_the_default_partition(
    pool: asyncpg.Pool,
) -> None:
    unit = unit_name()
    long_ago = datetime(2020, 3, 4, 12, tzinfo=UTC)
    message = VitalsMessage(
        unit_id=unit,
        seq=1,
        sent_at=None,
        device_id="MON-1",
        device_kind="monitor",
        patient=PatientRef("CIN", "OLD00001"),
        samples=(Sample(t=long_ago, code="8867-4", value=60.0, unit="/min"),),
    )
    await BatchWriter(pool).write([envelope(message, MqttKey(unit, 1))])
    created = await ensure_partitions(pool, long_ago, long_ago + timedelta(days=1))
    assert created >= 1
    in_default = await pool.fetchval("SELECT count(*) FROM vital_default WHERE time = $1", long_ago)
    in_total = await pool.fetchval("SELECT count(*) FROM vital WHERE time = $1", long_ago)
    assert (in_default, in_total) == (0, 1)


async def test_unreachable_database_raises_storage_unavailable_and_holds_futures() -> None:
    # A pool pointing at a closed port: every acquire fails to connect.
    unreachable = await asyncpg.create_pool(
        "postgresql://postgres@127.0.0.1:1/postgres", min_size=0, max_size=1
    )
    writer = BatchWriter(unreachable)
    with pytest.raises(StorageUnavailable):
        await writer.write([mqtt(unit_name(), 1)])
    pipeline = GroupCommitPipeline(writer, PipelineSettings(retry_max=0.2), Metrics())
    runner = asyncio.create_task(pipeline.run())
    env = mqtt(unit_name(), 1)
    await pipeline.submit(env)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(env.ack), 0.5)
    assert not pipeline.available
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    await unreachable.close()


# --- the ledger: duplicates by watermark, pruning ------------------------------------------------

PRUNE_ALL = LedgerPruning(keep_seqs=0, batch_rows=3, pause=0.0)


async def ledger_seqs(pool: asyncpg.Pool, unit: str) -> list[int]:
    rows = await pool.fetch(
        """SELECT m.seq FROM mqtt_message m JOIN unit u ON u.id = m.unit_id
           WHERE u.name = $1 ORDER BY m.seq""",
        unit,
    )
    return [r["seq"] for r in rows]


async def test_replay_of_a_pruned_seq_is_a_duplicate_and_stores_nothing(
    pool: asyncpg.Pool,
) -> None:
    unit = unit_name()
    writer = BatchWriter(pool)
    await writer.write([mqtt(unit, seq) for seq in range(1, 6)])
    await prune_ledger(pool, PRUNE_ALL)
    assert await ledger_seqs(pool, unit) == []

    outcomes = await writer.write([mqtt(unit, 3), mqtt(unit, 5)])

    assert outcomes == [Outcome(OutcomeKind.DUPLICATE, watermark=5)] * 2
    assert await vital_count(pool, unit) == 10
    assert await ledger_seqs(pool, unit) == []  # not written back either


async def test_pruning_never_deletes_above_the_watermark(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    writer = BatchWriter(pool)
    await writer.write([mqtt(unit, seq) for seq in (1, 2, 3, 5, 6)])  # watermark 3: 4 is missing

    await prune_ledger(pool, PRUNE_ALL)

    assert await ledger_seqs(pool, unit) == [5, 6]
    [filled] = await writer.write([mqtt(unit, 4)])  # the run above the gap is still known
    assert filled == Outcome(OutcomeKind.STORED, watermark=6)


async def test_pruning_keeps_the_newest_rows_below_the_watermark(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    await BatchWriter(pool).write([mqtt(unit, seq) for seq in range(1, 11)])

    deleted = await prune_ledger(pool, LedgerPruning(keep_seqs=4, batch_rows=3, pause=0.0))

    assert deleted >= 6
    assert await ledger_seqs(pool, unit) == [7, 8, 9, 10]


async def test_the_pruning_task_prunes_each_interval_until_cancelled(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    await BatchWriter(pool).write([mqtt(unit, seq) for seq in range(1, 4)])
    pruning = LedgerPruning(keep_seqs=1, interval=0.05, pause=0.0)
    task = asyncio.create_task(run_ledger_pruning(pool, pruning))
    try:

        async def pruned() -> bool:
            return await ledger_seqs(pool, unit) == [3]

        await wait_until(pruned, 10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_replica_finding_another_pruning_skips_its_round(pool: asyncpg.Pool) -> None:
    unit = unit_name()
    await BatchWriter(pool).write([mqtt(unit, seq) for seq in range(1, 4)])
    async with pool.acquire() as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock($1)", LEDGER_LOCK_KEY)
        assert await prune_ledger(pool, PRUNE_ALL) == 0
    assert await ledger_seqs(pool, unit) == [1, 2, 3]


async def test_a_writer_waiting_on_the_unit_row_sees_the_watermark_committed_meanwhile(
    pool: asyncpg.Pool, postgres_dsn: str
) -> None:
    """Replica A holds the unit's row (its batch of seqs 4-5 in flight, their rows since pruned);
    replica B's replay of seq 4 waits, then must see A's committed watermark, not the old one."""
    unit = unit_name()
    await BatchWriter(pool).write([mqtt(unit, seq) for seq in range(1, 4)])
    other = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as replica_a:
            async with replica_a.transaction():
                await replica_a.execute(
                    """INSERT INTO unit (name) VALUES ($1)
                       ON CONFLICT (name) DO UPDATE SET last_seen = now()""",
                    unit,
                )
                await replica_a.execute("UPDATE unit SET ack_seq = 5 WHERE name = $1", unit)
                replay = asyncio.create_task(BatchWriter(other).write([mqtt(unit, 4)]))

                async def replay_waits_for_the_row_lock() -> bool:
                    waiting = await pool.fetchval(
                        """SELECT count(*) FROM pg_stat_activity
                           WHERE datname = current_database() AND wait_event_type = 'Lock'"""
                    )
                    return bool(waiting)

                await wait_until(replay_waits_for_the_row_lock, 10)
            async with asyncio.timeout(10):
                [outcome] = await replay
    finally:
        await other.close()

    assert outcome == Outcome(OutcomeKind.DUPLICATE, watermark=5)
    assert await ledger_seqs(pool, unit) == [1, 2, 3]
    assert await vital_count(pool, unit) == 6


async def test_two_replicas_writing_one_unit_while_pruning_store_every_seq_once(
    pool: asyncpg.Pool, postgres_dsn: str
) -> None:
    """Two writers (their own pools, as two replicas) get the same seqs in different batches,
    the second one late (redeliveries), while the ledger is pruned as hard as it can be."""
    unit, total = unit_name(), 300
    other = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=2)
    first, second = BatchWriter(pool), BatchWriter(other)
    seqs = list(range(1, total + 1))
    writing = True

    async def replica(writer: BatchWriter, order: list[int], size: int) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for start in range(0, len(order), size):
            outcomes += await writer.write([mqtt(unit, seq) for seq in order[start : start + size]])
        return outcomes

    async def pruner() -> None:
        while writing:
            await prune_ledger(pool, PRUNE_ALL)
            await asyncio.sleep(0)

    try:
        pruning = asyncio.create_task(pruner())
        ones, twos = await asyncio.gather(
            replica(first, seqs, 7), replica(second, seqs[::-1][:150] + seqs[:150], 11)
        )
        writing = False
        await pruning
    finally:
        await other.close()

    stored = [o for o in ones + twos if o.kind is OutcomeKind.STORED]
    assert len(stored) == total
    assert await vital_count(pool, unit) == 2 * total  # two samples a message, each once
    [replayed] = await first.write([mqtt(unit, 1)])
    assert replayed == Outcome(OutcomeKind.DUPLICATE, watermark=total)


def dicom(uid: str, sha256: bytes, *, series: str, patient: str) -> Envelope:
    instance = DicomInstance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_uid=f"{series}.0",
        series_uid=series,
        transfer_syntax="1.2.840.10008.1.2.1",
        file_path=f"{sha256[:1].hex()}/{sha256[1:2].hex()}/{sha256.hex()}.dcm",
        size=1000 + sha256[0],
        sha256=sha256,
        calling_ae="MODALITY",
        patient=(PatientRef("urn:test:dicom", patient),),
        dicom_patient_id=patient,
    )
    return Envelope(
        protocol=Protocol.DICOM,
        key=DicomKey(uid),
        records=(instance,),
        received_at=datetime.now(UTC),
        ack=asyncio.get_running_loop().create_future(),
        source="MODALITY",
        raw=b"",
    )


async def conflicts_under(pool: asyncpg.Pool, base: str) -> list[tuple[str, bytes, int]]:
    """The `dicom_conflict` rows of the UIDs under `base`, in the order they were recorded."""
    rows = await pool.fetch(
        """SELECT sop_instance_uid, sha256, size FROM dicom_conflict
           WHERE sop_instance_uid LIKE $1 ORDER BY id""",
        f"{base}.%",
    )
    return [(r["sop_instance_uid"], bytes(r["sha256"]), r["size"]) for r in rows]


async def indexed_under(pool: asyncpg.Pool, base: str) -> dict[str, bytes]:
    """The indexed SHA-256 of each UID under `base`."""
    rows = await pool.fetch(
        "SELECT sop_instance_uid, sha256 FROM dicom_instance WHERE sop_instance_uid LIKE $1",
        f"{base}.%",
    )
    return {r["sop_instance_uid"]: bytes(r["sha256"]) for r in rows}


async def assert_first_copies_kept(pool: asyncpg.Pool, base: str, digest: list[bytes]) -> None:
    """Where both DICOM batch tests below end: `{base}.1.1`, `.1.2` and `.1.3` indexed with
    their first bytes (`digest[0]`, `[1]`, `[2]`), the later `.1.2` with `digest[3]` and `.1.3`
    with `digest[4]` recorded as conflicts, in that order."""
    old_same, old_other, new = f"{base}.1.1", f"{base}.1.2", f"{base}.1.3"
    assert await conflicts_under(pool, base) == [
        (old_other, digest[3], 1000 + digest[3][0]),
        (new, digest[4], 1000 + digest[4][0]),
    ]
    assert await indexed_under(pool, base) == {
        old_same: digest[0],
        old_other: digest[1],
        new: digest[2],
    }


async def test_dicom_batch_indexes_the_first_copy_and_records_conflicts_in_batch_order(
    pool: asyncpg.Pool,
) -> None:
    """One statement for a batch of instances: repeats inside the batch and UIDs already
    indexed give duplicates, and a `dicom_conflict` row where the content differs."""
    base = f"1.2.826.0.1.3680043.10.99.{uuid.uuid4().int % 10**12}"
    series, patient = f"{base}.1", f"P-{uuid.uuid4().hex[:8]}"
    digest = [hashlib.sha256(bytes([n])).digest() for n in range(6)]
    writer = BatchWriter(pool)
    old_same, old_other = f"{base}.1.1", f"{base}.1.2"
    first = await writer.write(
        [
            dicom(old_same, digest[0], series=series, patient=patient),
            dicom(old_other, digest[1], series=series, patient=patient),
        ]
    )
    assert [o.kind for o in first] == [OutcomeKind.STORED, OutcomeKind.STORED]

    new = f"{base}.1.3"
    batch = [
        dicom(new, digest[2], series=series, patient=patient),
        dicom(old_other, digest[3], series=series, patient=patient),  # indexed, other bytes
        dicom(new, digest[2], series=series, patient=patient),  # repeat, same bytes
        dicom(old_same, digest[0], series=series, patient=patient),  # indexed, same bytes
        dicom(new, digest[4], series=series, patient=patient),  # repeat, other bytes
    ]
    outcomes = await writer.write(batch)
    assert outcomes == [
        Outcome(OutcomeKind.STORED),
        Outcome(OutcomeKind.DUPLICATE, reason="content-conflict"),
        Outcome(OutcomeKind.DUPLICATE),
        Outcome(OutcomeKind.DUPLICATE),
        Outcome(OutcomeKind.DUPLICATE, reason="content-conflict"),
    ]
    await assert_first_copies_kept(pool, base, digest)
    patients = await pool.fetchval(
        "SELECT count(DISTINCT patient_id) FROM dicom_study WHERE study_uid = $1", f"{series}.0"
    )
    assert patients == 1


async def test_dicom_instances_one_per_batch_give_the_outcomes_and_rows_of_one_batch(
    pool: asyncpg.Pool,
) -> None:
    """A one-instance batch takes its own path in `dicom_index_instances`: the same sequence
    as in the batch test above, one instance per batch, gives the same outcomes, conflict rows,
    index rows and single patient."""
    base = f"1.2.826.0.1.3680043.10.97.{uuid.uuid4().int % 10**12}"
    series, patient = f"{base}.1", f"P-{uuid.uuid4().hex[:8]}"
    digest = [hashlib.sha256(bytes([n])).digest() for n in range(6)]
    writer = BatchWriter(pool)
    old_same, old_other, new = f"{base}.1.1", f"{base}.1.2", f"{base}.1.3"
    sequence = [
        (old_same, digest[0]),
        (old_other, digest[1]),
        (new, digest[2]),
        (old_other, digest[3]),  # indexed, other bytes
        (new, digest[2]),  # indexed, same bytes
        (old_same, digest[0]),
        (new, digest[4]),  # indexed, other bytes
    ]
    outcomes = [
        outcome
        for uid, sha256 in sequence
        for outcome in await writer.write([dicom(uid, sha256, series=series, patient=patient)])
    ]
    assert outcomes == [
        Outcome(OutcomeKind.STORED),
        Outcome(OutcomeKind.STORED),
        Outcome(OutcomeKind.STORED),
        Outcome(OutcomeKind.DUPLICATE, reason="content-conflict"),
        Outcome(OutcomeKind.DUPLICATE),
        Outcome(OutcomeKind.DUPLICATE),
        Outcome(OutcomeKind.DUPLICATE, reason="content-conflict"),
    ]
    await assert_first_copies_kept(pool, base, digest)
    linked = await pool.fetch(
        """SELECT s.patient_id FROM dicom_study s JOIN patient_identifier pi
           ON pi.patient_id = s.patient_id AND pi.value = $2
           WHERE s.study_uid = $1""",
        f"{series}.0",
        patient,
    )
    assert len(linked) == 1


async def test_concurrent_one_instance_batches_of_a_new_series_share_its_study_and_series(
    pool: asyncpg.Pool,
) -> None:
    """Two associations store the first images of the same new series at once: both are
    stored, under one study and one series (the second insert finds the first's row)."""
    base = f"1.2.826.0.1.3680043.10.96.{uuid.uuid4().int % 10**12}"
    series, patient = f"{base}.1", f"P-{uuid.uuid4().hex[:8]}"
    writers = [BatchWriter(pool) for _ in range(8)]
    batches = [
        [
            dicom(
                f"{series}.{n}",
                hashlib.sha256(f"{base}{n}".encode()).digest(),
                series=series,
                patient=patient,
            )
        ]
        for n in range(len(writers))
    ]
    async with asyncio.timeout(30):
        results = await asyncio.gather(*(w.write(b) for w, b in zip(writers, batches, strict=True)))
    assert [o.kind for [o] in results] == [OutcomeKind.STORED] * len(writers)
    counts = await pool.fetchrow(
        """SELECT count(DISTINCT se.id) AS series, count(DISTINCT se.study_id) AS studies,
                  count(*) AS instances
           FROM dicom_instance d JOIN dicom_series se ON se.id = d.series_id
           WHERE d.sop_instance_uid LIKE $1""",
        f"{series}.%",
    )
    assert (counts["series"], counts["studies"], counts["instances"]) == (1, 1, len(writers))


async def test_dicom_batch_with_a_dead_letter_commits_both_or_nothing(pool: asyncpg.Pool) -> None:
    """A batch that is more than instances runs in one explicit transaction."""
    base = f"1.2.826.0.1.3680043.10.98.{uuid.uuid4().int % 10**12}"
    letter = DeadLetter(
        protocol=Protocol.DICOM, source="MODALITY", reason="unparseable", detail="", raw=b"x"
    )
    refused = Envelope(
        protocol=Protocol.DICOM,
        key=DeadLetterKey(Protocol.DICOM, "MODALITY", hashlib.sha256(base.encode()).digest()),
        records=(letter,),
        received_at=datetime.now(UTC),
        ack=asyncio.get_running_loop().create_future(),
        source="MODALITY",
        raw=b"x",
    )
    digest = hashlib.sha256(base.encode() + b"i").digest()
    outcomes = await BatchWriter(pool).write(
        [dicom(f"{base}.1", digest, series=f"{base}.0", patient="P-1"), refused]
    )
    assert [o.kind for o in outcomes] == [OutcomeKind.STORED, OutcomeKind.REJECTED]


async def test_gateway_pool_releases_without_a_reset_query_but_never_an_open_transaction(
    postgres_dsn: str,
) -> None:
    gateway_pool = await create_pool(PoolSettings(dsn=postgres_dsn, min_size=1, max_size=1))
    try:
        async with gateway_pool.acquire() as conn:
            assert conn.get_settings().application_name == "qantara"
            await conn.execute("BEGIN")
            await conn.execute("SELECT 1")
        async with gateway_pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SHOW statement_timeout") == "30s"
    finally:
        await gateway_pool.close()


def _note_seq(order: list[int], seq: int, _done: object) -> None:
    order.append(seq)
