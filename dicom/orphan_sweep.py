"""Files under a final name that no index row names: found, checked against the index; the
listener's own failures removed, the others kept and reported.

A complete file gets its content name before its index row commits (`dicom.filestore`), so a
file can end up with no row in two ways, which its bytes cannot tell apart:
- the listener answered without success (0xA700: the database was down) and the modality, never
  told 0x0000, sends the instance again. `OrphanSweep` knows these (`suspect`) and removes them
  once older than `orphan_age`, every `sweep_interval`. A file is first moved aside
  atomically, so a resend of the same bytes racing the check is never lost;
- the listener crashed between the link and the commit, or **the database was restored from a
  backup older than the store**: then every file stored since was acknowledged, and its modality
  may have deleted its own copy. The start-up scan (the files of the last `orphan_lookback`,
  paced, a top-level shard folder at a time) therefore removes nothing: it keeps what it finds,
  logs it, and reports how many still have no row (`qantara_dicom_unindexed_files`, checked
  again every `sweep_interval`) until `qantara dicom reindex` indexes them. A crash leaves at
  most one per association; more than `STARTUP_ORPHAN_LIMIT` is logged as an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final

from dicom.config import DicomSettings
from dicom.filestore import FileStore
from ingest.errors import StorageUnavailable
from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)

ORPHAN_BATCH: Final = 1000
STARTUP_ORPHAN_LIMIT: Final = 100
"""More unindexed files than this (or than twice the associations allowed) in the start-up scan
are not a crash's leftovers, a crash leaving one per association at most: the database was most
likely restored from a backup older than the store (logged as an error, not a warning)."""
ORPHAN_SCAN_SHARE: Final = 0.25
"""The start-up scan for orphans works at most this share of its time, a top-level shard folder
at a time (`OrphanSweep._scan`)."""
Indexed = Callable[[list[str]], Awaitable[set[str]]]
"""Which of these relative file names the index names (`storage.dicom_queries.indexed_files`)."""
Guard = Callable[[], AbstractAsyncContextManager[Indexed | None]]
"""A sweep round's hold on the store's lock against a reindex, yielding the index check to make
under it (on the lock's own connection), or None while a reindex holds the lock
(`storage.dicom_store_lock.sweeping`)."""


class OrphanSweep:
    """The listener's orphan sweeper; `run()` is its task in the listener's group."""

    def __init__(
        self,
        store: FileStore,
        indexed: Indexed | None,
        settings: DicomSettings,
        metrics: Metrics,
        guard: Guard | None = None,
    ) -> None:
        self._store = store
        self._indexed = indexed
        self._guard = guard
        self._settings = settings
        self._metrics = metrics
        self._suspects: set[str] = set()  # final files answered without success: maybe orphans
        self._kept: set[str] = set()  # found by the start-up scan with no row: left to a reindex

    def suspect(self, relative: str) -> None:
        """A final file the listener answered without success: checked once `orphan_age` old."""
        self._suspects.add(relative)

    async def sweep(self, candidates: list[str]) -> int:
        """Remove those of `candidates` (files the listener answered without success) that no
        index row names and that are older than `orphan_age`; returns how many went.

        Removing, not indexing: the file lacks what only the association knew (the calling AE
        title, which scopes a PatientID without issuer), and the sender, never told 0x0000,
        sends the instance again. The check is safe against a resend of the same bytes racing
        it: the file is first moved aside atomically; if what was moved is younger than
        `orphan_age` (a store just renamed its copy there) or the index names it by now, it is
        put back. It is safe against `qantara dicom reindex` too, which commits rows for such
        files: the round holds the store's lock (`guard`), and is skipped while a reindex does.
        Candidates a round did not settle (skipped, or the database gone) are checked again at
        the next.
        """
        if self._indexed is None:
            return 0
        # A file the start-up scan kept may be an acknowledged image; a failed resend of the
        # same bytes since does not make it removable.
        candidates = [relative for relative in candidates if relative not in self._kept]
        if not candidates:
            return 0
        try:
            async with (self._guard or self._unguarded)() as indexed:
                if indexed is None:
                    logger.info("DICOM orphan sweep skipped: `qantara dicom reindex` is running")
                    self._suspects.update(candidates)
                    return 0
                removed = await self._remove_unindexed(candidates, indexed)
        except BaseException:
            self._suspects.update(candidates)  # those still there are checked again
            raise
        if removed:
            logger.warning("removed %d DICOM file(s) that no index row names", removed)
            self._metrics.dicom_orphans_removed.inc(removed)
        return removed

    @asynccontextmanager
    async def _unguarded(self) -> AsyncIterator[Indexed | None]:
        """The guard of a listener with no reindex to fear (tests, a store of its own)."""
        yield self._indexed

    async def _remove_unindexed(self, candidates: list[str], indexed: Indexed) -> int:
        removed = 0
        for relative in await self._unindexed(candidates, indexed):
            aside = await asyncio.to_thread(
                self._store.quarantine, relative, self._settings.orphan_age
            )
            if aside is None:
                continue
            try:
                named = await indexed([relative])
            except BaseException:
                self._store.restore(aside, relative)  # not known to be an orphan: put back
                raise
            if named:
                await asyncio.to_thread(self._store.restore, aside, relative)
                continue
            await asyncio.to_thread(self._store.drop, aside, relative)
            removed += 1
        return removed

    async def scan(self) -> int:
        """The start-up scan: the store's files of the last `orphan_lookback` seconds, older
        than `orphan_age`, that no index row names. They are kept and reported, never removed
        (see the module's docstring); returns how many."""
        if self._indexed is None:
            return 0
        kept = await self._unindexed(await self._scan())
        self._kept = set(kept)
        self._metrics.dicom_unindexed_files.set(len(kept))
        if kept:
            limit = max(STARTUP_ORPHAN_LIMIT, 2 * self._settings.max_associations)
            logger.log(
                logging.ERROR if len(kept) > limit else logging.WARNING,
                "the DICOM store holds %d file(s) of the last %.0f h that no index row names: "
                "kept, not removed. A crash leaves at most one per association; more than %d "
                "mean the database was restored from an older backup, and these are images "
                "their modalities were told are safe: `qantara dicom reindex` indexes them",
                len(kept),
                self._settings.orphan_lookback / 3600,
                limit,
            )
        return len(kept)

    async def _recount_kept(self) -> None:
        """Drop from the kept files those indexed (a reindex) or gone since; report the rest."""
        if not self._kept or self._indexed is None:
            return
        still = await self._unindexed(sorted(self._kept))
        present = await asyncio.to_thread(self._present, still)
        self._kept = set(present)
        self._metrics.dicom_unindexed_files.set(len(self._kept))

    def _present(self, relatives: list[str]) -> list[str]:
        found = []
        for relative in relatives:
            try:
                if self._store.path_of(relative).is_file():
                    found.append(relative)
            except (OSError, ValueError):
                continue
        return found

    async def _unindexed(self, candidates: list[str], indexed: Indexed | None = None) -> list[str]:
        """Those of `candidates` no index row names, asked `ORPHAN_BATCH` at a time (of
        `indexed`, by default the listener's own check)."""
        check = indexed or self._indexed
        assert check is not None  # noqa: S101 - the callers checked
        unnamed: list[str] = []
        for start in range(0, len(candidates), ORPHAN_BATCH):
            chunk = candidates[start : start + ORPHAN_BATCH]
            named = await check(chunk)
            unnamed += (relative for relative in chunk if relative not in named)
        return unnamed

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
        """At start, scan the store for files no row names (kept); then, every
        `sweep_interval`, count those still unindexed, remove the files answered without
        success (after `orphan_age`) and stale temp files."""
        s = self._settings
        first = True
        while True:
            try:
                if first:
                    await self.scan()
                    first = False
                else:
                    await self._recount_kept()
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
