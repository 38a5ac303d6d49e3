"""The Storage Commitment reports waiting for a modality's own port (`dicom_commitment_report`,
migration 0018): queued before the N-ACTION is answered, claimed by whichever replica delivers
them, removed once the modality took them or their last attempt failed.

A claim is a lease: it moves the row's `due_at` past the attempt (`lease` seconds), so no other
replica claims it meanwhile (`FOR UPDATE SKIP LOCKED` keeps two claims in the same instant
apart), and a replica that dies mid-attempt leaves the row due again when the lease ends. The
outcome then either removes the row or sets the time of its next attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from storage.queries import Executor, run

_QUEUE: Final = """
INSERT INTO dicom_commitment_report (ae_title, event_type, information)
SELECT $1, $2, $3
WHERE (SELECT count(*) FROM dicom_commitment_report) < $4
  AND (SELECT count(*) FROM dicom_commitment_report WHERE ae_title = $1) < $5
RETURNING id"""

_CLAIM: Final = """
UPDATE dicom_commitment_report r
SET attempts = r.attempts + 1, due_at = now() + make_interval(secs => $2)
FROM (SELECT id FROM dicom_commitment_report
      WHERE due_at <= now()
      ORDER BY due_at, id
      LIMIT $1
      FOR UPDATE SKIP LOCKED) due
WHERE r.id = due.id
RETURNING r.id, r.ae_title, r.event_type, r.information, r.attempts"""

_BACKLOG: Final = """
SELECT count(*) AS waiting,
       greatest(extract(epoch FROM min(due_at) - now()), 0)::float8 AS next_in
FROM dicom_commitment_report"""


@dataclass(frozen=True, slots=True)
class QueuedReport:
    """A claimed report: the modality's AE title, the N-EVENT-REPORT's Event Type ID and its
    Event Information (Explicit VR Little Endian), and which attempt this is (from 1)."""

    id: int
    ae_title: str
    event_type: int
    information: bytes
    attempt: int


@dataclass(frozen=True, slots=True)
class Backlog:
    """How many reports wait (all replicas'), and in how many seconds the next one is due
    (None: none waits)."""

    waiting: int
    next_in: float | None


class CommitmentReportQueue:
    """The table's statements, on a pool. Each raises `StorageUnavailable` when the database
    cannot answer."""

    def __init__(self, db: Executor) -> None:
        self._db = db

    async def queue(
        self, ae_title: str, event_type: int, information: bytes, limit: int, per_ae: int
    ) -> bool:
        """Add a report, due now; False (nothing added) when `limit` reports already wait, or
        `per_ae` for this AE title."""
        row = await run(
            self._db, "fetchrow", _QUEUE, ae_title, event_type, information, limit, per_ae
        )
        return row is not None

    async def claim(self, limit: int, lease: float) -> list[QueuedReport]:
        """Up to `limit` due reports, oldest first, each leased for `lease` seconds and its
        attempt counted."""
        rows = await run(self._db, "fetch", _CLAIM, limit, lease)
        return [
            QueuedReport(
                int(r["id"]),
                r["ae_title"],
                int(r["event_type"]),
                bytes(r["information"]),
                int(r["attempts"]),
            )
            for r in rows
        ]

    async def retry(self, report_id: int, delay: float) -> None:
        """The attempt failed: due again in `delay` seconds."""
        await run(
            self._db,
            "execute",
            "UPDATE dicom_commitment_report SET due_at = now() + make_interval(secs => $2)"
            " WHERE id = $1",
            report_id,
            delay,
        )

    async def release(self, report_ids: list[int]) -> None:
        """Attempts abandoned (the replica stops): due at once, for any replica."""
        await run(
            self._db,
            "execute",
            "UPDATE dicom_commitment_report SET due_at = now() WHERE id = ANY($1::bigint[])",
            report_ids,
        )

    async def remove(self, report_id: int) -> None:
        """Delivered, or given up."""
        await run(
            self._db, "execute", "DELETE FROM dicom_commitment_report WHERE id = $1", report_id
        )

    async def backlog(self) -> Backlog:
        row = await run(self._db, "fetchrow", _BACKLOG)
        waiting = int(row["waiting"])
        return Backlog(waiting, float(row["next_in"]) if waiting else None)
