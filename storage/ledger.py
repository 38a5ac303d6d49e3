"""Pruning of the MQTT dedup ledger (`mqtt_message`): off the hot path, in bounded batches.

The ledger keeps one row per `(unit, seq)` handled: about 4 million rows a day for 100 units at
one message every 2 s. A row at or below its unit's committed watermark (`unit.ack_seq`) is no
longer needed for deduplication: `storage.writer` treats any seq up to the watermark as a
duplicate without looking for its row, under the unit's row lock. Rows above the watermark are
what the watermark itself is computed from, and are never touched here.

Why this is safe with several replicas: the watermark only grows, and a writer reads it (under
the unit's row lock) no earlier than the committed value a pruning statement reads, so a row a
pruning statement may delete is at or below every watermark a writer can see from then on. Rows
a writer inserts are above its watermark, so a writer and the pruner never touch the same row.

The newest `keep_seqs` rows at or below each unit's watermark stay for inspection (the runbooks'
"what did we receive last" queries). One batch is one short transaction; replicas take turns
through a transaction-scoped advisory lock (a replica finding it taken skips the round).

The runtime role needs DELETE on `mqtt_message` (storage/sql/privileges.sql). Whoever counts
ledger rows to prove "no loss" (simulators/fleet.py, bench/) must count a seq at or below
`unit.ack_seq` as handled, or run with pruning off.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from storage.pool import is_transient

logger = logging.getLogger(__name__)

# pg_try_advisory_xact_lock key of the ledger pruning ('qntL' as a 32-bit integer).
LEDGER_LOCK_KEY = 0x716E744C

# Below its watermark a unit's ledger is dense (every seq from 1 is handled once) and pruning
# removes it from the bottom, so what is left there is one run: [lowest row, watermark]. Each
# unit's prunable range is found with one index probe, and deleted by primary-key range scans.
_PRUNABLE = """
SELECT u.id, low.seq AS first, u.ack_seq - $1 AS last
FROM unit u
CROSS JOIN LATERAL (SELECT min(seq) AS seq FROM mqtt_message WHERE unit_id = u.id) low
WHERE low.seq <= u.ack_seq - $1
ORDER BY u.id
"""
_DELETE_RANGE = "DELETE FROM mqtt_message WHERE unit_id = $1 AND seq BETWEEN $2 AND $3"


@dataclass(frozen=True, slots=True)
class LedgerPruning:
    """How the ledger is pruned: rows kept per unit below its watermark, batch size and pace."""

    keep_seqs: int = 10_000  # the newest rows at or below each unit's watermark that stay
    batch_rows: int = 5000  # rows deleted per transaction
    max_batches: int = 100  # per round: a large first backlog is worked off over several rounds
    interval: float = 600.0  # seconds between rounds; the first comes one interval after start
    pause: float = 0.1  # seconds between two batches of a round, to leave the hot path room


async def prune_ledger_batch(pool: asyncpg.Pool, pruning: LedgerPruning) -> int | None:
    """Delete up to `batch_rows` prunable rows in one transaction; how many, or None when
    another replica is pruning now."""
    deleted = 0
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LEDGER_LOCK_KEY):
            return None
        budget = pruning.batch_rows
        for unit in await conn.fetch(_PRUNABLE, pruning.keep_seqs):
            if budget <= 0:
                break
            first: int = unit["first"]
            last = min(int(unit["last"]), first + budget - 1)
            status = await conn.execute(_DELETE_RANGE, unit["id"], first, last)
            deleted += int(status.split()[-1])  # "DELETE <n>"
            budget -= last - first + 1
    return deleted


async def prune_ledger(pool: asyncpg.Pool, pruning: LedgerPruning) -> int:
    """One round: batches until nothing is left to prune (or `max_batches`); rows deleted."""
    deleted = 0
    for number in range(pruning.max_batches):
        if number:
            await asyncio.sleep(pruning.pause)
        rows = await prune_ledger_batch(pool, pruning)
        if not rows:  # None: another replica's turn
            break
        deleted += rows
    return deleted


async def run_ledger_pruning(pool: asyncpg.Pool, pruning: LedgerPruning) -> None:
    """Prune every `interval` seconds until cancelled; a failed round is logged and retried."""
    while True:
        await asyncio.sleep(pruning.interval)
        try:
            deleted = await prune_ledger(pool, pruning)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            # Transient (database away) or not, the next round tries again; nothing depends on it.
            logger.warning(
                "MQTT ledger pruning failed (%s%s); next round in %.0f s",
                type(exc).__name__,
                ", transient" if is_transient(exc) else "",
                pruning.interval,
            )
            continue
        if deleted:
            logger.info("pruned %d MQTT ledger rows at or below the units' watermarks", deleted)
