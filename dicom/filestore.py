"""The DICOM object store: files under names we generate, durable before they are indexed.

A received file is staged in `<root>/tmp/` under a random name (moved there when it is on the
same filesystem, copied otherwise), hashed and fsynced. Committing it renames it to
`<root>/<h[0:2]>/<h[2:4]>/<h>.dcm`, `h` being the SHA-256 of its bytes, and fsyncs the folder:
no UID or any other received string ever becomes part of a path. Only then is the index row
committed and the sender told 0x0000.

Content naming makes a resend of the same bytes land on the same name (no second file), and a
crash at any point leaves either a temp file (swept at the next start) or a complete, fsynced file
that the index does not name yet and that a resend will find again. Nothing half-written is ever
under a final name.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

CHUNK: Final = 1 << 20
TMP_DIR: Final = "tmp"
TMP_SUFFIX: Final = ".part"
STALE_TEMP_SECONDS: Final = 3600.0


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A received file in the temp folder, fsynced, with its digest and size."""

    path: Path
    sha256: bytes
    size: int


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file under its final name; `relative` is what the index stores."""

    relative: str
    sha256: bytes
    size: int


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Thread-safe: each call works on its own files (association threads call it)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.tmp = self.root / TMP_DIR

    def open(self, stale_after: float = STALE_TEMP_SECONDS) -> int:
        """Create the folders; remove temp files older than `stale_after` seconds (left by a
        crash; replicas sharing the store keep their recent ones). Returns how many went."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)
        removed = 0
        limit = time.time() - stale_after
        for entry in self.tmp.iterdir():
            if entry.name.endswith(TMP_SUFFIX) and entry.stat().st_mtime < limit:
                entry.unlink(missing_ok=True)
                removed += 1
        if removed:
            fsync_dir(self.tmp)
            logger.info("removed %d stale temp file(s) from the DICOM store", removed)
        return removed

    def path_of(self, relative: str) -> Path:
        """The absolute path of an indexed file (refuses anything outside the store)."""
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root) or path.parent == self.tmp:
            raise ValueError("not a path of this store")
        return path

    def stage(self, source: Path) -> StagedFile:
        """Move (or copy) `source` into the temp folder, hash it and fsync it.

        Raises OSError (disk full, I/O error); then nothing is left in the temp folder.
        """
        target = self.tmp / (secrets.token_hex(16) + TMP_SUFFIX)
        try:
            try:
                os.rename(source, target)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                with open(source, "rb") as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
            digest = hashlib.sha256()
            size = 0
            with open(target, "rb+") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(f.fileno())
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return StagedFile(target, digest.digest(), size)

    def stage_bytes(self, data: bytes) -> StagedFile:
        """Stage bytes held in memory (tests, and senders pynetdicom did not spool to disk)."""
        target = self.tmp / (secrets.token_hex(16) + TMP_SUFFIX)
        try:
            with open(target, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return StagedFile(target, hashlib.sha256(data).digest(), len(data))

    def commit(self, staged: StagedFile) -> StoredFile:
        """Give a staged file its final name and make the rename durable.

        The same bytes already stored: the staged copy is dropped, the stored one kept.
        Raises OSError; the staged file is then removed.
        """
        hexdigest = staged.sha256.hex()
        relative = f"{hexdigest[:2]}/{hexdigest[2:4]}/{hexdigest}.dcm"
        final = self.root / relative
        try:
            self._make_dirs(final.parent)
            if final.exists() and final.stat().st_size == staged.size:
                staged.path.unlink()
            else:
                os.replace(staged.path, final)
                fsync_dir(final.parent)
            # The temp folder is not fsynced: a temp name resurrected by a crash is swept.
        except BaseException:
            staged.path.unlink(missing_ok=True)
            raise
        return StoredFile(relative, staged.sha256, staged.size)

    def discard(self, staged: StagedFile) -> None:
        with _quiet():
            staged.path.unlink(missing_ok=True)

    def remove(self, stored: StoredFile) -> None:
        """Delete a stored file the index does not name (a conflicting second copy)."""
        with _quiet():
            path = self.path_of(stored.relative)
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        current = folder
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            fsync_dir(path.parent)


class _quiet:
    """Best-effort cleanup: an OSError is logged, never raised."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> bool:
        if kind is not None and issubclass(kind, OSError):
            logger.warning("DICOM store cleanup failed: %s", kind.__name__)
            return True
        return False
