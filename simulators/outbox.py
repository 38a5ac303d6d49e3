"""A unit's store-and-forward outbox: one SQLite file per unit, in WAL mode.

Messages get their `seq` in the same transaction that stores them, so numbering is
consecutive from 1 and survives restarts. The gateway's retained ack carries its contiguous
commit watermark; `prune(watermark)` forgets everything at or below it. Calls are synchronous
and small (one short transaction each); the simulator calls them from its event loop.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

__all__ = ["Outbox"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    last_sent REAL
);
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_seq INTEGER NOT NULL,
    watermark INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (id, next_seq, watermark) VALUES (1, 1, 0);
"""


class Outbox:
    """Persisted, seq-numbered messages of one unit awaiting the gateway's watermark."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        """Open (or create) the outbox at `path`.

        WAL with `synchronous=NORMAL` survives a crash of the process; `FULL` also survives a
        power cut, at the price of an fsync per message.
        """
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def next_seq(self) -> int:
        return self._meta()[0]

    @property
    def watermark(self) -> int:
        return self._meta()[1]

    def _meta(self) -> tuple[int, int]:
        row = self._db.execute("SELECT next_seq, watermark FROM meta WHERE id = 1").fetchone()
        return int(row[0]), int(row[1])

    def append(self, payload_builder: Callable[[int], bytes], now: float | None = None) -> int:
        """Store the payload built for the next seq; return that seq.

        `now` (epoch seconds, default the current time) is recorded as `created_at`.
        """
        created_at = time.time() if now is None else now
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            seq = int(db.execute("SELECT next_seq FROM meta WHERE id = 1").fetchone()[0])
            payload = payload_builder(seq)
            db.execute(
                "INSERT INTO outbox (seq, payload, created_at, last_sent) VALUES (?, ?, ?, NULL)",
                (seq, payload, created_at),
            )
            db.execute("UPDATE meta SET next_seq = ? WHERE id = 1", (seq + 1,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return seq

    def prune(self, watermark: int) -> int:
        """Forget every message with seq <= watermark; return how many were deleted.

        The watermark only moves forward. If it is at or beyond our next seq (this outbox was
        lost and recreated, but the gateway remembers), numbering jumps past it so that new
        messages are never mistaken for duplicates of committed ones.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = db.execute("DELETE FROM outbox WHERE seq <= ?", (watermark,)).rowcount
            db.execute(
                "UPDATE meta SET watermark = max(watermark, ?), next_seq = max(next_seq, ? + 1)"
                " WHERE id = 1",
                (watermark, watermark),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return int(deleted)

    def due_for_send(
        self, now: float, resend_after: float, limit: int | None = None
    ) -> list[tuple[int, bytes]]:
        """Messages above the watermark never sent, or last sent `resend_after` s ago or more.

        In seq order, at most `limit` of them.
        """
        return self.due(sent_before=now - resend_after, limit=limit)

    def due(self, sent_before: float | None, limit: int | None = None) -> list[tuple[int, bytes]]:
        """Messages above the watermark never sent, or last sent at or before `sent_before`
        (`None`: only never-sent ones). In seq order, at most `limit` of them."""
        # `last_sent <= NULL` is never true: with sent_before None only never-sent rows match
        rows = self._db.execute(
            "SELECT seq, payload FROM outbox"
            " WHERE seq > (SELECT watermark FROM meta WHERE id = 1)"
            " AND (last_sent IS NULL OR last_sent <= ?)"
            " ORDER BY seq LIMIT ?",
            (sent_before, -1 if limit is None else limit),
        ).fetchall()
        return [(int(seq), bytes(payload)) for seq, payload in rows]

    def mark_sent(self, seqs: Iterable[int], now: float) -> None:
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "UPDATE outbox SET last_sent = ? WHERE seq = ?", ((now, seq) for seq in seqs)
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def oldest_sent(self) -> float | None:
        """When the longest-waiting sent message (above the watermark) was last sent."""
        row = self._db.execute(
            "SELECT min(last_sent) FROM outbox"
            " WHERE seq > (SELECT watermark FROM meta WHERE id = 1)"
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def reset_sent(self) -> None:
        """Treat every stored message as never sent (a new connection replays them all)."""
        self._db.execute("UPDATE outbox SET last_sent = NULL WHERE last_sent IS NOT NULL")

    def pending(self) -> int:
        """How many messages still wait for the watermark."""
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])
