"""The store's files that no index row names, indexed again (`qantara dicom reindex`): the way
back after the database was restored from a backup older than the store.

Every file stored after that backup was acknowledged to its modality (0x0000), which may have
deleted its own copy; the restored index does not name it, so the patient file cannot find it.
The listener's start-up scan keeps such files and reports them (`dicom.orphan_sweep`); this puts
them back in the index.

Each file older than `older_than` seconds (younger ones may be a store in progress) that no row
names is:
- hashed again: bytes that are not its content name are damaged, and left where they are;
- parsed as the listener parses a received file (`dicom.metadata.read_metadata`);
- indexed through the same pipeline (`storage.writer_dicom`): its patient linked by the same
  rules, received at the file's modification time.

A PatientID without an issuer belongs to its sender (`dicom-ae/<calling AE title>`), and the file
does not say which AE title sent it. The operator names it (`calling_ae`); without it such files
are skipped and listed, never guessed. Nothing is removed: a file that cannot be indexed is
reported with why.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Final

from dicom.filestore import FileStore, digest_of
from dicom.metadata import LOCAL_ID_PREFIX, DicomInputError, read_metadata
from ingest.pipeline import GroupCommitPipeline
from ingest.records import DicomInstance, DicomKey, Envelope, Outcome, OutcomeKind, Protocol

CHECK_BATCH: Final = 1000
COMMIT_TIMEOUT: Final = 60.0
READ_SIZE: Final = 1 << 20
CONFLICT_REASON: Final = "content-conflict"  # storage.writer_dicom.CONFLICT


class Result(StrEnum):
    INDEXED = "indexed"
    DUPLICATE = "duplicate"  # the same instance indexed meanwhile (a resend)
    CONFLICT = "conflict"  # its SOP Instance UID is indexed with other content
    NEEDS_AE = "needs-calling-ae"
    REFUSED = "refused"  # the header cannot be indexed (a cut file, missing UIDs...)
    DAMAGED = "damaged"  # its bytes are not its content name, or cannot be read


SETTLED: Final = frozenset({Result.INDEXED, Result.DUPLICATE})
"""Files the index names afterwards (or would, in a dry run)."""


@dataclass(frozen=True, slots=True)
class Reindexed:
    """One unindexed file and what became of it; `detail` has no patient data."""

    file_path: str
    result: Result
    detail: str = ""
    sop_instance_uid: str = ""


_CONTENT_NAME: Final = re.compile(r"\b[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}\.dcm\b")


def content_names_in(text: str) -> list[str]:
    """The content names (`ab/cd/<sha256>.dcm`) in `text`, in order: a list of files, or lines
    of this command's own output (the files of one sender, picked by the operator)."""
    return _CONTENT_NAME.findall(text)


Indexed = Callable[[list[str]], Awaitable[set[str]]]
"""Which of these relative file names the index names (`storage.dicom_queries.indexed_files`)."""
Submit = Callable[[DicomInstance, datetime], Awaitable[Outcome]]
"""Commit an instance's index row, received at that time; its outcome."""


def submitting_to(pipeline: GroupCommitPipeline, timeout: float = COMMIT_TIMEOUT) -> Submit:
    """`Submit` through the group-commit pipeline, as the listener commits an instance
    (`GroupCommitPipeline.committed`: no commit within `timeout` seconds is
    `StorageUnavailable`)."""

    async def submit(record: DicomInstance, received_at: datetime) -> Outcome:
        envelope = Envelope(
            protocol=Protocol.DICOM,
            key=DicomKey(record.sop_instance_uid),
            records=(record,),
            received_at=received_at,
            ack=asyncio.get_running_loop().create_future(),
            source=record.calling_ae,
        )
        return await pipeline.committed(envelope, timeout)

    return submit


@dataclass(frozen=True, slots=True)
class _Read:
    sha256: bytes
    size: int
    modified: datetime


def _read(path: Path) -> _Read:
    """The file's SHA-256, size and modification time (blocking: in a thread)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        sha256, size = digest_of(fd, bytearray(READ_SIZE))
        modified = datetime.fromtimestamp(os.fstat(fd).st_mtime, UTC)
    finally:
        os.close(fd)
    return _Read(sha256, size, modified)


class Reindexer:
    """Walks the store a top-level shard folder at a time; `submit` is None for a dry run."""

    def __init__(
        self,
        store: FileStore,
        indexed: Indexed,
        submit: Submit | None,
        *,
        calling_ae: str = "",
        older_than: float = 600.0,
    ) -> None:
        self._store = store
        self._indexed = indexed
        self._submit = submit
        self._calling_ae = calling_ae
        self._older_than = older_than

    async def run(
        self, report: Callable[[Reindexed], None], only: Sequence[str] | None = None
    ) -> Counter[str]:
        """Index every unindexed file, or those of `only` (relative content names: the files of
        one sender); `report` gets each one, and the counts by result."""
        counts: Counter[str] = Counter()
        if only is not None:
            await self._batch(sorted(set(only)), counts, report)
            return counts
        for top in sorted(await asyncio.to_thread(self._store.tops)):
            names = await asyncio.to_thread(self._store.orphans_in, top, self._older_than)
            await self._batch(sorted(names), counts, report)
        return counts

    async def _batch(
        self, names: list[str], counts: Counter[str], report: Callable[[Reindexed], None]
    ) -> None:
        for start in range(0, len(names), CHECK_BATCH):
            chunk = names[start : start + CHECK_BATCH]
            named = await self._indexed(chunk)
            for relative in chunk:
                if relative in named:
                    continue
                done = await self._one(relative)
                counts[done.result] += 1
                report(done)

    async def _one(self, relative: str) -> Reindexed:
        try:
            path = self._store.path_of(relative)
            read = await asyncio.to_thread(_read, path)
        except (OSError, ValueError, RuntimeError) as exc:
            return Reindexed(relative, Result.DAMAGED, f"cannot be read: {type(exc).__name__}")
        if Path(relative).stem != read.sha256.hex():
            return Reindexed(relative, Result.DAMAGED, "its SHA-256 is not its name")
        try:
            meta = await asyncio.to_thread(read_metadata, path, calling_ae=self._calling_ae)
        except DicomInputError as exc:
            return Reindexed(relative, Result.REFUSED, f"{exc.reason}: {exc}")
        except OSError as exc:
            return Reindexed(relative, Result.DAMAGED, f"cannot be read: {type(exc).__name__}")
        uid = meta.sop_instance_uid
        if not self._calling_ae and any(
            ref.system.startswith(LOCAL_ID_PREFIX) for ref in meta.patient
        ):
            detail = "a PatientID without issuer: whose it is depends on the sender's AE title"
            return Reindexed(relative, Result.NEEDS_AE, detail, uid)
        if self._submit is None:
            return Reindexed(relative, Result.INDEXED, "", uid)  # would be: a dry run
        record = meta.record(relative, read.size, read.sha256, self._calling_ae)
        outcome = await self._submit(record, read.modified)
        if outcome.kind is OutcomeKind.STORED:
            return Reindexed(relative, Result.INDEXED, "", uid)
        if outcome.kind is OutcomeKind.DUPLICATE and outcome.reason == CONFLICT_REASON:
            detail = "its SOP Instance UID is indexed with other content; this copy left unindexed"
            return Reindexed(relative, Result.CONFLICT, detail, uid)
        if outcome.kind is OutcomeKind.DUPLICATE:
            return Reindexed(relative, Result.DUPLICATE, "", uid)
        return Reindexed(
            relative, Result.REFUSED, f"the database refused it: {outcome.reason}", uid
        )
