"""Files under a final name that no index row names: found, checked against the index, removed.

A complete file gets its content name before its index row commits (`dicom.filestore`): a crash
between the two, or a C-STORE answered 0xA700 because the database was down and never sent
again, leaves a file that nothing names. `OrphanSweep` removes them: at start it scans the store
for recent files (paced, a top-level shard folder at a time); then, every `sweep_interval`, it
checks the files the listener answered without success (`suspect`) once they are older than
`orphan_age`, and removes stale temp files. A file is first moved aside atomically, so that a
resend of the same bytes racing the check is never lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from dicom.config import DicomSettings
from dicom.filestore import FileStore
from ingest.errors import StorageUnavailable
from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)

ORPHAN_BATCH: Final = 1000
STARTUP_ORPHAN_LIMIT: Final = 100
"""More unindexed files than this (or than twice the associations allowed) in the start-up scan
are not a crash's leftovers: a crash leaves one per association at most. They are kept, not
removed, and reported: the database was likely restored from a backup older than the store, and
those files are instances the modalities were told are safe (`qantara dicom reindex`)."""
ORPHAN_SCAN_SHARE: Final = 0.25
"""The start-up scan for orphans works at most this share of its time, a top-level shard folder
at a time (`OrphanSweep._scan`)."""
Indexed = Callable[[list[str]], Awaitable[set[str]]]
"""Which of these relative file names the index names (`storage.dicom_queries.indexed_files`)."""


class OrphanSweep:
    """The listener's orphan sweeper; `run()` is its task in the listener's group."""

    def __init__(
        self,
        store: FileStore,
        indexed: Indexed | None,
        settings: DicomSettings,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._indexed = indexed
        self._settings = settings
        self._metrics = metrics
        self._suspects: set[str] = set()  # final files answered without success: maybe orphans

    def suspect(self, relative: str) -> None:
        """A final file the listener answered without success: checked once `orphan_age` old."""
        self._suspects.add(relative)

    async def sweep(self, candidates: list[str] | None = None) -> int:
        """Remove complete files under a final name that no index row names and that are older
        than `orphan_age` (a crash between rename and commit, or 0xA700 from the database with
        no resend since). `candidates`: relative names to check; None scans the store for files
        of the last `orphan_lookback` seconds. Returns how many files went.

        Removing, not indexing: the file lacks what only the association knew (the calling AE
        title, which scopes a PatientID without issuer), and the sender, never told 0x0000,
        still holds the instance and sends it again. That holds for what a crash leaves, not for
        the files of a database restored from an older backup, which were acknowledged: a
        start-up scan that finds more than `STARTUP_ORPHAN_LIMIT` removes none, reports them
        (`qantara_dicom_unindexed_files`) and leaves them to `qantara dicom reindex`.

        The check is safe against a resend of the same bytes racing it: the file is first moved
        aside atomically; if what was moved is younger than `orphan_age` (a store just renamed
        its copy there) or the index names it by now, it is put back.
        """
        if self._indexed is None:
            return 0
        s = self._settings
        scanned = candidates is None
        if candidates is None:
            candidates = await self._scan()
        unnamed: list[str] = []
        for start in range(0, len(candidates), ORPHAN_BATCH):
            chunk = candidates[start : start + ORPHAN_BATCH]
            named = await self._indexed(chunk)
            unnamed += (relative for relative in chunk if relative not in named)
        if scanned:
            limit = max(STARTUP_ORPHAN_LIMIT, 2 * s.max_associations)
            kept = len(unnamed) if len(unnamed) > limit else 0
            self._metrics.dicom_unindexed_files.set(kept)
            if kept:
                logger.error(
                    "the DICOM store holds %d files of the last %.0f h that no index row names, "
                    "more than a crash leaves (%d): kept, not removed. Was the database restored "
                    "from an older backup? `qantara dicom reindex` indexes them",
                    kept,
                    s.orphan_lookback / 3600,
                    limit,
                )
                return 0
        removed = 0
        for relative in unnamed:
            aside = await asyncio.to_thread(self._store.quarantine, relative, s.orphan_age)
            if aside is None:
                continue
            if await self._indexed([relative]):
                await asyncio.to_thread(self._store.restore, aside, relative)
                continue
            await asyncio.to_thread(self._store.drop, aside, relative)
            removed += 1
        if removed:
            logger.warning("removed %d DICOM file(s) that no index row names", removed)
            self._metrics.dicom_orphans_removed.inc(removed)
        return removed

    async def _scan(self) -> list[str]:
        """The store's files of the last `orphan_lookback` seconds older than `orphan_age`, one
        top-level shard folder at a time in a thread, paced to `ORPHAN_SCAN_SHARE`.

        The scan holds the GIL between its system calls, beside the event loop: run at once, it
        halved the stores a second of a gateway restarted on a store with all its shard folders
        (0.75 s of CPU for 65,536 of them, empty; a `stat` more per recent file). In steps, a
        stop cancels it between two folders instead of waiting for a thread to finish."""
        s = self._settings
        found: list[str] = []
        for top in await asyncio.to_thread(self._store.tops):
            began = time.monotonic()
            found += await asyncio.to_thread(
                self._store.orphans_in, top, s.orphan_age, s.orphan_lookback
            )
            worked = time.monotonic() - began
            await asyncio.sleep(worked * (1.0 - ORPHAN_SCAN_SHARE) / ORPHAN_SCAN_SHARE)
        return found

    async def run(self) -> None:
        """At start, scan the store for orphans; then, every `sweep_interval`, check the files
        answered without success (after `orphan_age`) and remove stale temp files."""
        s = self._settings
        first = True
        while True:
            try:
                if first:
                    await self.sweep()
                    first = False
                else:
                    limit = time.time() - s.orphan_age
                    due = sorted(self._suspects)
                    self._suspects.clear()
                    ready, later = await asyncio.to_thread(self._split_by_age, due, limit)
                    self._suspects.update(later)
                    await self.sweep(ready)
                    await asyncio.to_thread(self._store.sweep_temp)
            except StorageUnavailable:
                logger.info("DICOM orphan sweep postponed: database unavailable")
            except OSError as exc:
                logger.warning("DICOM orphan sweep failed: %s", type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - the sweep must not end the listener's group
                logger.error("DICOM orphan sweep failed: %s", type(exc).__name__)
            await asyncio.sleep(s.sweep_interval)

    def _split_by_age(self, relatives: list[str], limit: float) -> tuple[list[str], list[str]]:
        ready: list[str] = []
        later: list[str] = []
        for relative in relatives:
            try:
                mtime = self._store.path_of(relative).stat().st_mtime
            except (OSError, ValueError):
                continue  # gone already
            (ready if mtime < limit else later).append(relative)
        return ready, later
