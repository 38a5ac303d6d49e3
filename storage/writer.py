"""The bulk writer: one batch of envelopes becomes one transaction.

Inside the transaction: dedup keys are inserted with `ON CONFLICT DO NOTHING RETURNING` (what
comes back is new, the rest are duplicates), dictionary ids (units, devices, concepts, patients)
are resolved in bulk, vitals go in with binary COPY, dead letters are kept, and each unit's
contiguous ack watermark is advanced. The outcomes are returned only once COMMIT has succeeded;
dictionary ids learnt in a transaction enter the in-memory caches only after its COMMIT. A batch
of DICOM instances only is a single statement (`storage.writer_dicom`), and a batch of HL7 messages
only a read and a single statement (`storage.writer_hl7`), run without BEGIN/COMMIT: PostgreSQL
commits the statement on its own before answering.

An MQTT `(unit, seq)` at or below the unit's committed watermark (`unit.ack_seq`, read under the
unit's row lock that this transaction holds until COMMIT) is a duplicate without a look at the
ledger: every seq up to the watermark is handled, and the watermark never goes down. So the ledger
rows at or below it are not needed for deduplication, and `storage.ledger` prunes them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import asyncpg

from ingest.errors import StorageUnavailable
from ingest.records import (
    DeadLetter,
    DeadLetterKey,
    DicomKey,
    Envelope,
    Hl7Key,
    MqttKey,
    Outcome,
    OutcomeKind,
    PatientRef,
    VitalsMessage,
)
from storage import writer_dicom, writer_hl7
from storage.pool import is_transient

_K = TypeVar("_K")

DEAD_LETTER_KEEP_BYTES = 64 * 1024
PING_TIMEOUT = 3.0
LOINC = "http://loinc.org"
MDC = "urn:iso:std:iso:11073:10101"

_VITAL_COLUMNS = ("patient_id", "time", "received_at", "concept_id", "device_id", "value")
_WAVEFORM_COLUMNS = (
    "patient_id",
    "t0",
    "received_at",
    "concept_id",
    "device_id",
    "fs",
    "unit",
    "samples",
)


@dataclass(slots=True)
class _Caches:
    """Dictionary ids known to be committed; bounded by the number of distinct entries."""

    units: dict[str, int] = field(default_factory=dict)
    devices: dict[tuple[int, str], int] = field(default_factory=dict)
    concepts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    patients: dict[tuple[str, str], int] = field(default_factory=dict)
    max_entries: int = 200_000

    def merge(self, other: _Caches) -> None:
        _merge_bounded(self.units, other.units, self.max_entries)
        _merge_bounded(self.devices, other.devices, self.max_entries)
        _merge_bounded(self.concepts, other.concepts, self.max_entries)
        _merge_bounded(self.patients, other.patients, self.max_entries)


def _merge_bounded(mine: dict[_K, int], theirs: dict[_K, int], limit: int) -> None:
    if len(mine) + len(theirs) > limit:
        mine.clear()  # crude but bounded; the database stays the truth
    mine.update(theirs)


def _one_write(batch: Sequence[Envelope]) -> bool:
    """Whether the whole batch is one write statement: DICOM instances only, or HL7 only."""
    return all(writer_dicom.single_statement(env) for env in batch) or all(
        writer_hl7.single_statement(env) for env in batch
    )


def concept_system(code: str) -> str:
    """LOINC codes look like `8867-4` (a check digit after a hyphen); waveforms carry MDC codes."""
    return LOINC if "-" in code else MDC


class BatchWriter:
    """Writes batches of envelopes to PostgreSQL through a pool; one transaction per batch."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._caches = _Caches()

    async def write(self, batch: Sequence[Envelope]) -> list[Outcome]:
        """Commit the batch and return one outcome per envelope, in order.

        Raises `StorageUnavailable` when the database cannot be reached (nothing committed);
        any other exception means the database refused the batch's content.
        """
        try:
            async with self._pool.acquire() as conn:
                pending = _Caches()
                if _one_write(batch):
                    # DICOM instances only, or HL7 messages only: one statement (after a read,
                    # for HL7), atomic on its own and committed when it returns; no BEGIN/COMMIT
                    # round trips.
                    outcomes = await self._write(conn, batch, pending)
                else:
                    async with conn.transaction():
                        outcomes = await self._write(conn, batch, pending)
        except Exception as exc:
            if is_transient(exc):
                raise StorageUnavailable(type(exc).__name__) from exc
            raise
        self._caches.merge(pending)
        return outcomes

    async def ping(self) -> None:
        """Raise `StorageUnavailable` unless the database answers."""
        try:
            async with asyncio.timeout(PING_TIMEOUT), self._pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except Exception as exc:
            if is_transient(exc):
                raise StorageUnavailable(type(exc).__name__) from exc
            raise

    async def _write(
        self, conn: asyncpg.Connection, batch: Sequence[Envelope], pending: _Caches
    ) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        first_of_key: dict[object, int] = {}
        for i, env in enumerate(batch):
            if env.key in first_of_key:
                outcomes[i] = Outcome(OutcomeKind.DUPLICATE)  # watermark filled in below
            else:
                first_of_key[env.key] = i
        firsts = sorted(first_of_key.values())

        mqtt = [i for i in firsts if isinstance(batch[i].key, MqttKey)]
        letters = [i for i in firsts if isinstance(batch[i].key, DeadLetterKey)]

        unit_ids: dict[str, int] = {}
        if mqtt:
            unit_ids, committed = await self._touch_units(
                conn, {_mqtt_key(batch[i]).unit_id for i in mqtt}
            )
            # At or below the committed watermark: handled before, whether or not its ledger
            # row is still there (pruned). Above it, the ledger decides.
            above = [
                i for i in mqtt if _mqtt_key(batch[i]).seq > committed[_mqtt_key(batch[i]).unit_id]
            ]
            new_keys = await self._insert_ledger(conn, batch, above, unit_ids) if above else set()
            fresh_vitals: list[int] = []
            for i in mqtt:
                key = _mqtt_key(batch[i])
                if (unit_ids[key.unit_id], key.seq) not in new_keys:
                    outcomes[i] = Outcome(OutcomeKind.DUPLICATE)
                    continue
                letter = _dead_letter_of(batch[i])
                if letter is not None:
                    outcomes[i] = Outcome(OutcomeKind.REJECTED, reason=letter.reason)
                else:
                    fresh_vitals.append(i)
                    outcomes[i] = Outcome(OutcomeKind.STORED)
            await self._insert_vitals(conn, batch, fresh_vitals, unit_ids, pending)

        hl7 = [i for i in firsts if isinstance(batch[i].key, Hl7Key)]
        if hl7:
            for i, hl7_outcome in zip(
                hl7, await writer_hl7.write_hl7(conn, batch, hl7), strict=True
            ):
                outcomes[i] = hl7_outcome

        dicom = [i for i, env in enumerate(batch) if isinstance(env.key, DicomKey)]
        if dicom:
            for i, dicom_outcome in (await writer_dicom.write_dicom(conn, batch, dicom)).items():
                outcomes[i] = dicom_outcome

        dead = [
            (i, letter)
            for i in firsts
            if (letter := _dead_letter_of(batch[i])) is not None
            and (outcomes[i] is None or outcomes[i].kind is OutcomeKind.REJECTED)  # type: ignore[union-attr]
        ]
        if dead:
            await self._insert_dead_letters(conn, batch, dead)
        for i in letters:
            letter = _dead_letter_of(batch[i])
            outcomes[i] = Outcome(
                OutcomeKind.REJECTED, reason=letter.reason if letter else "unreadable"
            )

        if unit_ids:
            watermarks = await self._advance_watermarks(conn, list(unit_ids.values()))
            by_name = {name: watermarks[uid] for name, uid in unit_ids.items()}
            for i, env in enumerate(batch):
                if isinstance(env.key, MqttKey):
                    current = outcomes[i]
                    assert current is not None  # noqa: S101 - every envelope has an outcome
                    outcomes[i] = Outcome(
                        current.kind, current.reason, by_name.get(env.key.unit_id)
                    )
        result: list[Outcome] = []
        for outcome in outcomes:
            assert outcome is not None  # noqa: S101 - every envelope has an outcome
            result.append(outcome)
        return result

    async def _touch_units(
        self, conn: asyncpg.Connection, names: set[str]
    ) -> tuple[dict[str, int], dict[str, int]]:
        """Lock the units' rows until COMMIT; their ids and committed watermarks, by name.

        The row lock serialises the batches of one unit across replicas, so the `ack_seq`
        returned (the latest committed version: `DO UPDATE` waits for a concurrent writer and
        returns its result) stays the unit's watermark until this transaction advances it.
        """
        # Sorted so that two replicas lock unit rows in the same order (no deadlock).
        rows = await conn.fetch(
            """INSERT INTO unit (name) SELECT unnest($1::text[])
               ON CONFLICT (name) DO UPDATE SET last_seen = now()
               RETURNING id, name, ack_seq""",
            sorted(names),
        )
        return {r["name"]: r["id"] for r in rows}, {r["name"]: r["ack_seq"] for r in rows}

    async def _insert_ledger(
        self,
        conn: asyncpg.Connection,
        batch: Sequence[Envelope],
        indexes: list[int],
        unit_ids: dict[str, int],
    ) -> set[tuple[int, int]]:
        units, seqs, received, sent, outcome, samples = [], [], [], [], [], []
        for i in indexes:
            env = batch[i]
            key = _mqtt_key(env)
            message = _vitals_of(env)
            units.append(unit_ids[key.unit_id])
            seqs.append(key.seq)
            received.append(env.received_at)
            sent.append(message.sent_at if message else None)
            outcome.append("stored" if message else "rejected")
            samples.append(len(message.samples) if message else 0)
        rows = await conn.fetch(
            """INSERT INTO mqtt_message (unit_id, seq, received_at, sent_at, outcome, samples)
               SELECT * FROM unnest($1::int[], $2::bigint[], $3::timestamptz[],
                                    $4::timestamptz[], $5::text[], $6::int[])
               ON CONFLICT (unit_id, seq) DO NOTHING
               RETURNING unit_id, seq""",
            units,
            seqs,
            received,
            sent,
            outcome,
            samples,
        )
        return {(r["unit_id"], r["seq"]) for r in rows}

    async def _insert_vitals(
        self,
        conn: asyncpg.Connection,
        batch: Sequence[Envelope],
        indexes: list[int],
        unit_ids: dict[str, int],
        pending: _Caches,
    ) -> None:
        if not indexes:
            return
        messages = [(batch[i], _vitals_of(batch[i])) for i in indexes]
        patients = await self._patient_ids(
            conn, {m.patient for _, m in messages if m is not None}, pending
        )
        devices = await self._device_ids(
            conn,
            {(unit_ids[m.unit_id], m.device_id, m.device_kind) for _, m in messages if m},
            pending,
        )
        concepts = await self._concept_ids(
            conn,
            {(concept_system(s.code), s.code, s.unit) for _, m in messages if m for s in m.samples}
            | {
                (concept_system(w.code), w.code, w.unit)
                for _, m in messages
                if m
                for w in m.waveforms
            },
            pending,
        )
        rows = []
        waves = []
        for env, message in messages:
            assert message is not None  # noqa: S101 - only vitals envelopes reach here
            patient = patients[(message.patient.system, message.patient.value)]
            device = devices[(unit_ids[message.unit_id], message.device_id)]
            for s in message.samples:
                concept = concepts[(concept_system(s.code), s.code, s.unit)]
                rows.append((patient, s.t, env.received_at, concept, device, s.value))
            for w in message.waveforms:
                concept = concepts[(concept_system(w.code), w.code, w.unit)]
                waves.append(
                    (patient, w.t0, env.received_at, concept, device, w.fs, w.unit, list(w.values))
                )
        if rows:
            await conn.copy_records_to_table("vital", records=rows, columns=_VITAL_COLUMNS)
        if waves:
            await conn.copy_records_to_table(
                "waveform_segment", records=waves, columns=_WAVEFORM_COLUMNS
            )

    async def _patient_ids(
        self, conn: asyncpg.Connection, refs: set[PatientRef], pending: _Caches
    ) -> dict[tuple[str, str], int]:
        found: dict[tuple[str, str], int] = {}
        missing: list[tuple[str, str]] = []
        for ref in refs:
            key = (ref.system, ref.value)
            cached = self._caches.patients.get(key) or pending.patients.get(key)
            if cached is None:
                missing.append(key)
            else:
                found[key] = cached
        if missing:
            missing.sort()
            known = await self._select_patients(conn, missing)
            found.update(known)
            still = [k for k in missing if k not in known]
            if still:
                new_ids = await conn.fetch(
                    "INSERT INTO patient (names) SELECT '[]'::jsonb FROM generate_series(1, $1)"
                    " RETURNING id",
                    len(still),
                )
                ids = [r["id"] for r in new_ids]
                await conn.execute(
                    """INSERT INTO patient_identifier (system, value, patient_id)
                       SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
                       ON CONFLICT (system, value) DO NOTHING""",
                    [k[0] for k in still],
                    [k[1] for k in still],
                    ids,
                )
                # Another replica may have created some of them meanwhile: take the committed
                # mapping and drop the patients we created for nothing.
                now_known = await self._select_patients(conn, still)
                found.update(now_known)
                orphans = [pid for pid in ids if pid not in set(now_known.values())]
                if orphans:
                    await conn.execute("DELETE FROM patient WHERE id = ANY($1::bigint[])", orphans)
            for key in missing:
                pending.patients[key] = found[key]
        return found

    @staticmethod
    async def _select_patients(
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

    async def _device_ids(
        self, conn: asyncpg.Connection, wanted: set[tuple[int, str, str]], pending: _Caches
    ) -> dict[tuple[int, str], int]:
        found: dict[tuple[int, str], int] = {}
        missing = []
        for unit_id, ident, kind in wanted:
            key = (unit_id, ident)
            cached = self._caches.devices.get(key) or pending.devices.get(key)
            if cached is None:
                missing.append((unit_id, ident, kind))
            else:
                found[key] = cached
        if missing:
            missing.sort()
            await conn.execute(
                """INSERT INTO device (unit_id, ident, kind)
                   SELECT * FROM unnest($1::int[], $2::text[], $3::text[])
                   ON CONFLICT (unit_id, ident) DO NOTHING""",
                [m[0] for m in missing],
                [m[1] for m in missing],
                [m[2] for m in missing],
            )
            rows = await conn.fetch(
                """SELECT d.id, d.unit_id, d.ident FROM device d
                   JOIN unnest($1::int[], $2::text[]) AS k(unit_id, ident)
                   USING (unit_id, ident)""",
                [m[0] for m in missing],
                [m[1] for m in missing],
            )
            for r in rows:
                found[(r["unit_id"], r["ident"])] = r["id"]
                pending.devices[(r["unit_id"], r["ident"])] = r["id"]
        return found

    async def _concept_ids(
        self, conn: asyncpg.Connection, wanted: set[tuple[str, str, str]], pending: _Caches
    ) -> dict[tuple[str, str, str], int]:
        found: dict[tuple[str, str, str], int] = {}
        missing = []
        for key in wanted:
            cached = self._caches.concepts.get(key) or pending.concepts.get(key)
            if cached is None:
                missing.append(key)
            else:
                found[key] = cached
        if missing:
            missing.sort()
            columns = ([m[0] for m in missing], [m[1] for m in missing], [m[2] for m in missing])
            await conn.execute(
                """INSERT INTO concept (system, code, unit)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
                   ON CONFLICT (system, code, unit) DO NOTHING""",
                *columns,
            )
            rows = await conn.fetch(
                """SELECT c.id, c.system, c.code, c.unit FROM concept c
                   JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(system, code, unit)
                   USING (system, code, unit)""",
                *columns,
            )
            for r in rows:
                key = (r["system"], r["code"], r["unit"])
                found[key] = r["id"]
                pending.concepts[key] = r["id"]
        return found

    @staticmethod
    async def _insert_dead_letters(
        conn: asyncpg.Connection,
        batch: Sequence[Envelope],
        dead: list[tuple[int, DeadLetter]],
    ) -> None:
        columns: tuple[list[object], ...] = ([], [], [], [], [], [], [], [])
        for i, letter in dead:
            values = (
                letter.protocol.value,
                letter.source,
                letter.reason,
                letter.detail,
                batch[i].received_at,
                len(letter.raw),
                hashlib.sha256(letter.raw).digest(),
                letter.raw[:DEAD_LETTER_KEEP_BYTES],
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        await conn.execute(
            """INSERT INTO dead_letter
                   (protocol, source, reason, detail, received_at, size, sha256, raw)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                    $5::timestamptz[], $6::int[], $7::bytea[], $8::bytea[])
               ON CONFLICT (protocol, source, sha256) DO NOTHING""",
            *columns,
        )

    @staticmethod
    async def _advance_watermarks(conn: asyncpg.Connection, unit_ids: list[int]) -> dict[int, int]:
        """Move each unit's ack_seq to the end of the run of handled seqs just above it."""
        rows = await conn.fetch(
            """UPDATE unit u SET ack_seq = coalesce((
                   SELECT min(m.seq) FROM mqtt_message m
                   WHERE m.unit_id = u.id AND m.seq > u.ack_seq
                     AND NOT EXISTS (SELECT 1 FROM mqtt_message n
                                     WHERE n.unit_id = m.unit_id AND n.seq = m.seq + 1)
               ), u.ack_seq)
               WHERE u.id = ANY($1::int[])
                 AND EXISTS (SELECT 1 FROM mqtt_message m
                             WHERE m.unit_id = u.id AND m.seq = u.ack_seq + 1)
               RETURNING u.id, u.ack_seq""",
            unit_ids,
        )
        result = {r["id"]: r["ack_seq"] for r in rows}
        rest = [uid for uid in unit_ids if uid not in result]
        if rest:
            for r in await conn.fetch(
                "SELECT id, ack_seq FROM unit WHERE id = ANY($1::int[])", rest
            ):
                result[r["id"]] = r["ack_seq"]
        return result


def _mqtt_key(env: Envelope) -> MqttKey:
    assert isinstance(env.key, MqttKey)  # noqa: S101 - callers filter on the key type
    return env.key


def _vitals_of(env: Envelope) -> VitalsMessage | None:
    for record in env.records:
        if isinstance(record, VitalsMessage):
            return record
    return None


def _dead_letter_of(env: Envelope) -> DeadLetter | None:
    for record in env.records:
        if isinstance(record, DeadLetter):
            return record
    return None


async def ensure_partitions(pool: asyncpg.Pool, start: datetime, end: datetime) -> int:
    """Create the weekly partitions of the time-series tables covering [start, end)."""
    created = 0
    async with pool.acquire() as conn:
        for table in ("vital", "waveform_segment"):
            created += await conn.fetchval(
                "SELECT qantara_ensure_partitions($1::regclass, $2, $3)", table, start, end
            )
    return int(created)
