"""The archive's integrity check (`qantara dicom verify`): every indexed instance's file read
back and compared with what its index row recorded when the modality was told 0x0000.

Nothing on the store path reads a file again once it is acknowledged, and a C-GET, C-MOVE or
WADO-RS sends whatever is on disk. A file can still be lost or changed afterwards: a failing disk
or controller, a filesystem repaired after a crash, a restore of the files from a backup older
than the database, a mistaken `rm` or `rsync --delete`. The check finds those instances before a
clinician asks for them:

- `missing`: no file under the name the row gives;
- `size`: a file of another length than the row's;
- `corrupt`: the right length, other bytes (its SHA-256 is not the row's);
- `unreadable`: the file could not be read (an I/O error, permissions);
- `misnamed`: the row's path is not the content name of its SHA-256 in this store (an index
  edited by hand, or a store mounted elsewhere): nothing is read there.

A damaged instance heals when the modality, or another archive, sends the same instance again:
the same bytes get the same content name, and `FileStore.commit` puts the fresh, fsynced copy in
place of what was there (the index row stays as it was). The check itself changes nothing.

A damage is reported only if it is still there a moment later (`recheck_after`): a resend may be
replacing the file just then. Reading is paced (`rate`), so that a check of the whole archive
beside a running listener leaves it the disk, and each file's pages are dropped from the page
cache once read (`dicom.writeback.drop_cached`), so that it does not push out what PostgreSQL
and the listener keep there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from dicom.filestore import FileStore, content_name, digest_of
from storage.dicom_queries import IndexedFile

logger = logging.getLogger(__name__)

READ_SIZE: Final = 1 << 20
PAGE: Final = 500
"""Index rows read at a time."""
INTACT: Final = "intact"


class Damage(StrEnum):
    MISSING = "missing"
    SIZE = "size"
    CORRUPT = "corrupt"
    UNREADABLE = "unreadable"
    MISNAMED = "misnamed"


RESULTS: Final = (INTACT, *(d.value for d in Damage))
"""Every result of a check, in the order the summary gives them."""


@dataclass(frozen=True, slots=True)
class Finding:
    """A damaged instance: its row, what is wrong, and a detail without patient data."""

    file: IndexedFile
    damage: Damage
    detail: str


@dataclass(frozen=True, slots=True)
class Checked:
    """One file's check: its damage (None: intact) and the bytes read."""

    damage: Damage | None
    detail: str = ""
    read: int = 0


def check_file(store: FileStore, indexed: IndexedFile, buffer: bytearray) -> Checked:
    """Read `indexed`'s file from `store` and compare it with the row (blocking: in a thread)."""
    if indexed.file_path != content_name(indexed.sha256):
        return Checked(Damage.MISNAMED, "the path is not the content name of the row's SHA-256")
    try:
        path = store.path_of(indexed.file_path)
    except ValueError:
        return Checked(Damage.MISNAMED, "the path leads out of the store")
    except RuntimeError:  # Path.resolve on a symlink loop (Python 3.11)
        return Checked(Damage.UNREADABLE, "a symbolic link loop")
    except OSError as exc:
        return Checked(Damage.UNREADABLE, _reason(exc))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return Checked(Damage.MISSING, "no file")
    except OSError as exc:
        return Checked(Damage.UNREADABLE, _reason(exc))
    try:
        size = os.fstat(fd).st_size
        if size != indexed.size:
            return Checked(Damage.SIZE, f"{size} bytes, indexed {indexed.size}")
        sha256, read = digest_of(fd, buffer)
    except OSError as exc:
        return Checked(Damage.UNREADABLE, _reason(exc))
    finally:
        os.close(fd)
    if read != indexed.size:
        return Checked(Damage.SIZE, f"{read} bytes read, indexed {indexed.size}", read)
    if sha256 != indexed.sha256:
        return Checked(Damage.CORRUPT, "SHA-256 differs", read)
    return Checked(None, read=read)


def _reason(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or 'error'}"


class Pacer:
    """At most `rate` bytes a second on average since the start (0: no limit): how long to
    pause after each file (sans-IO: the caller gives the clock and sleeps)."""

    def __init__(self, rate: float, start: float) -> None:
        self._rate = rate
        self._start = start
        self._done = 0

    def pause_after(self, read: int, now: float) -> float:
        self._done += read
        if self._rate <= 0:
            return 0.0
        return max(0.0, self._start + self._done / self._rate - now)


@dataclass
class Summary:
    """What a run checked: instances by result (`RESULTS`), bytes read, the last instance id."""

    results: Counter[str] = field(default_factory=Counter)
    bytes_read: int = 0
    last_id: int = 0
    seconds: float = 0.0

    @property
    def checked(self) -> int:
        return sum(self.results.values())

    @property
    def damaged(self) -> int:
        return self.checked - self.results[INTACT]


Page = Callable[[int, int], Awaitable[list[IndexedFile]]]
"""The next rows after an instance id, at most so many (`storage.dicom_queries.files_to_verify`)."""
Row = Callable[[int], Awaitable[IndexedFile | None]]
"""An instance row as it is now (`storage.dicom_queries.file_of`)."""


class Verifier:
    """Walks the index in id order, a page of rows at a time, and reads each file in a thread."""

    def __init__(
        self,
        store: FileStore,
        page: Page,
        row: Row,
        *,
        rate: float = 0.0,
        recheck_after: float = 1.0,
        progress_every: float = 30.0,
        page_size: int = PAGE,
    ) -> None:
        self._store = store
        self._page = page
        self._row = row
        self._rate = rate
        self._recheck_after = recheck_after
        self._progress_every = progress_every
        self._page_size = page_size
        self._buffer = bytearray(READ_SIZE)
        self.summary = Summary()

    async def run(self, after_id: int, report: Callable[[Finding], None]) -> Summary:
        """Check every row after `after_id`; `report` gets each damage that stays. `summary`
        holds what was checked so far (for a run that stops midway)."""
        self.summary = summary = Summary(last_id=after_id)
        start = time.monotonic()
        pacer = Pacer(self._rate, start)
        logged = start
        while rows := await self._page(summary.last_id, self._page_size):
            checked = []
            for indexed in rows:  # a file at a time: a stop waits for one file's read at most
                result = await asyncio.to_thread(check_file, self._store, indexed, self._buffer)
                checked.append(result)
                if pause := pacer.pause_after(result.read, time.monotonic()):
                    await asyncio.sleep(pause)
            suspects = [f for f, c in zip(rows, checked, strict=True) if c.damage]
            confirmed = await self._recheck(suspects) if suspects else {}
            for indexed, first in zip(rows, checked, strict=True):
                summary.bytes_read += first.read
                if first.damage and indexed.id not in confirmed:
                    continue  # its row went meanwhile
                found = confirmed[indexed.id] if first.damage else None
                if found is None:
                    summary.results[INTACT] += 1  # or mended meanwhile (a resend)
                else:
                    summary.results[found.damage] += 1
                    report(found)
            summary.last_id = rows[-1].id
            now = time.monotonic()
            if now - logged >= self._progress_every:
                logged = now
                logger.info(
                    "verified %d instances (%d damaged, %.1f GB read); last instance id %d",
                    summary.checked,
                    summary.damaged,
                    summary.bytes_read / 1e9,
                    summary.last_id,
                )
        summary.seconds = time.monotonic() - start
        return summary

    async def _recheck(self, suspects: list[IndexedFile]) -> dict[int, Finding | None]:
        """Each suspect checked again after `recheck_after` seconds, from its row as it is then,
        by instance id: its damage, or None when it is intact now; a row gone meanwhile is left
        out (neither intact nor damaged)."""
        await asyncio.sleep(self._recheck_after)
        again: dict[int, Finding | None] = {}
        for suspect in suspects:
            now = await self._row(suspect.id)
            if now is None:
                continue
            checked = await asyncio.to_thread(check_file, self._store, now, self._buffer)
            again[suspect.id] = (
                None if checked.damage is None else Finding(now, checked.damage, checked.detail)
            )
        return again


def describe(finding: Finding) -> str:
    """One line for a damaged instance: the ids to ask a resend by, never patient data."""
    f = finding.file
    return (
        f"{finding.damage}: instance {f.id}, SOP Instance UID {f.sop_instance_uid}, study "
        f"{f.study_uid}, file {f.file_path}: {finding.detail}"
    )


def summarize(summary: Summary) -> str:
    """The run in one line: instances by result, bytes read, time, the last instance id."""
    results = ", ".join(
        f"{summary.results[result]:,} {result}"
        for result in RESULTS
        if summary.results[result] or result == INTACT
    )
    instances = "instance" if summary.checked == 1 else "instances"
    return (
        f"checked {summary.checked:,} {instances} ({summary.bytes_read / 1e9:.2f} GB) in "
        f"{summary.seconds:.1f} s: {results}; last instance id {summary.last_id}"
    )
