"""The DICOM object store: files under names we generate, durable before they are acknowledged.

A received file is in `<root>/tmp/` under a random name, written there by the listener through
`dicom.spool` (digest computed while it arrived). Committing it links it to
`<root>/<h[0:2]>/<h[2:4]>/<h>.dcm`, `h` being the SHA-256 of its bytes; the listener then
fsyncs the file and the folders whose entries changed (`StoredFile.folders`, each beside the
file's fsync in a worker of its own) and tells the store (`mark_durable`), before it submits the
index row. No UID or any other received string ever becomes part of a path. The sender is told
0x0000 only once the file and its name are durable and the index row is committed.

Content naming makes a resend of the same bytes land on the same name (no second file). A crash
of the process leaves a temp file (swept: `sweep_temp`) or a complete file under its final name
that the index may not name; a resend puts its own copy there again, and `orphans_in` +
`quarantine` let the listener remove those that stay unnamed (`dicom.orphan_sweep`).
A file is complete before it gets its final name, but its data reaches the disk only at
the listener's fsync: after a power loss (not a process crash), a final name that was never
acknowledged may hold a cut file; a resend replaces it with an fsynced copy, the sweep removes it
when no index row names it. An acknowledged file is never replaced by an unsynced one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dicom.writeback import drop_cached

logger = logging.getLogger(__name__)

TMP_DIR: Final = "tmp"
TMP_SUFFIX: Final = ".part"
STALE_TEMP_SECONDS: Final = 3600.0
ORPHAN_SUFFIX: Final = ".orphan"
_SHARD: Final = re.compile(r"[0-9a-f]{2}")
_NAME: Final = re.compile(r"[0-9a-f]{64}\.dcm")


@dataclass(frozen=True, slots=True)
class StagedFile:
    """A received file in the temp folder with its digest and size; `durable`: already fsynced."""

    path: Path
    sha256: bytes
    size: int
    durable: bool = True


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file under its final name; `relative` is what the index stores. `folders`: the folders
    whose entries changed and still need an fsync, `synced`: whether the file's data was (the
    caller fsyncs what is left, then calls `FileStore.mark_durable`)."""

    relative: str
    sha256: bytes
    size: int
    folders: tuple[Path, ...] = ()
    synced: bool = True  # the file's data is fsynced


def content_name(sha256: bytes) -> str:
    """Where the store keeps the file of these bytes, relative to its root: `ab/cd/abcd....dcm`,
    from the SHA-256 alone (what an index row's `file_path` holds)."""
    hexdigest = sha256.hex()
    return f"{hexdigest[:2]}/{hexdigest[2:4]}/{hexdigest}.dcm"


def digest_of(fd: int, buffer: bytearray) -> tuple[bytes, int]:
    """The SHA-256 and length of what `fd` holds from its position on, read through `buffer`;
    the file's pages are then dropped from the page cache (a check reads cold files once).
    Raises OSError."""
    digest = hashlib.sha256()
    view = memoryview(buffer)
    size = 0
    while n := os.readv(fd, [view]):
        digest.update(view[:n])  # hashlib lets go of the GIL while it hashes
        size += n
    drop_cached(fd)
    return digest.digest(), size


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Thread-safe: each call works on its own files (the listener's worker threads call it)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.tmp = self.root / TMP_DIR
        # Shard folders known to be durable, both levels, as "ab" and "ab/cd": 5 MiB once a store
        # has all 65,536 leaves, where a set of Paths took 20 MiB.
        self._folders: set[str] = set()

    def open(self, stale_after: float = STALE_TEMP_SECONDS) -> int:
        """Create the folders; remove temp files older than `stale_after` seconds (left by a
        crash or an aborted transfer; replicas sharing the store keep their recent ones).
        Returns how many went."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._learn_folders()
        return self.sweep_temp(stale_after)

    def _learn_folders(self) -> None:
        """Make the shard folders already there durable and remember them as such.

        Each level is listed first, then its folder fsynced: every folder listed then has a
        durable entry (one that another replica creates meanwhile is not listed, and gets its
        fsyncs when it is used). Without this a restarted store fsynced a file's folder, its
        parent and the root the first time it used each of the 65,536 leaves again, which takes
        about 700,000 instances: two more fsyncs, each a flush of the device cache, for nearly
        every instance (with all leaves present, a cycle was 1.01-1.05 times as long with them:
        pairs of instances alternated in one gateway, 2026-11-28). A store of 65,536 leaves lists
        them and fsyncs 257 folders."""
        tops = _shards(self.root)
        fsync_dir(self.root)
        known: set[str] = set()
        for top in tops:
            leaves = _shards(self.root / top)
            fsync_dir(self.root / top)
            known.add(top)
            known.update(_leaf_key(top, leaf) for leaf in leaves)
        with _lock:
            self._folders |= known

    def sweep_temp(self, stale_after: float = STALE_TEMP_SECONDS) -> int:
        """Remove our temp files (`.part`, `.orphan`) older than `stale_after` seconds."""
        removed = 0
        limit = time.time() - stale_after
        for entry in os.scandir(self.tmp):
            if not entry.name.endswith((TMP_SUFFIX, ORPHAN_SUFFIX)):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < limit:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
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

    def commit(self, staged: StagedFile) -> StoredFile:
        """Give a staged file its final name.

        A new name is linked without waiting for the data's fsync (no-clobber); the caller then
        fsyncs the file (unless `synced`) and the folders whose entries changed, and submits the
        index row only after them. A name that already exists (the same
        bytes stored before, or a leftover) is replaced only by a copy whose data is fsynced
        first, so an acknowledged file is never swapped for one a power loss could cut. Either
        way the name then points at a fresh file (a new mtime), which `quarantine` relies on.
        Raises OSError; the staged file is then removed.
        """
        relative = content_name(staged.sha256)
        final = self.root / relative
        synced = staged.durable
        try:
            folders = (final.parent, *self._make_dirs(final.parent))
            try:
                os.link(staged.path, final)
            except FileExistsError:
                if not synced:
                    fsync_file(staged.path)
                    synced = True
                os.replace(staged.path, final)
            else:
                os.unlink(staged.path)
            # The temp folder is not fsynced: a temp name resurrected by a crash is swept.
        except BaseException:
            staged.path.unlink(missing_ok=True)
            raise
        return StoredFile(relative, staged.sha256, staged.size, folders, synced)

    def mark_durable(self, stored: StoredFile) -> None:
        """Remember the folders of a committed file that the caller has fsynced: a file stored
        there later needs fewer folder fsyncs."""
        if stored.folders:
            leaf = stored.folders[0]
            with _lock:
                self._folders.add(_leaf_key(leaf.parent.name, leaf.name))
                if len(stored.folders) > 2:
                    self._folders.add(leaf.parent.name)

    def exists(self, stored: StoredFile) -> bool:
        return (self.root / stored.relative).exists()

    def discard(self, staged: StagedFile) -> None:
        with _quiet():
            staged.path.unlink(missing_ok=True)

    def remove(self, stored: StoredFile) -> None:
        """Delete a stored file the index does not name (a conflicting second copy)."""
        with _quiet():
            path = self.path_of(stored.relative)
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)

    # --- files no index row names ------------------------------------------------------------

    def tops(self) -> list[str]:
        """The top-level shard folders (`aa`), the steps of a scan for orphans (`orphans_in`)."""
        return _shards(self.root)

    def orphans_in(self, top: str, older_than: float, newer_than: float | None = None) -> list[str]:
        """Relative names of the final files under the top-level shard folder `top` last modified
        more than `older_than` seconds ago (and less than `newer_than` seconds ago when given):
        candidates for an index lookup.

        With `newer_than`, a shard folder last modified before that window is skipped without a
        look at its files. A final name is only ever made by a link or a rename into its folder,
        after the file's last write, and each of those sets the folder's mtime: a file modified
        within the window sits in a folder modified within it. A store of a year holds millions
        of files; the start-up scan then stats the 65,536 folders, not every file (it runs in a
        thread beside the listener, and holds the GIL between system calls)."""
        now = time.time()
        upper = now - older_than
        lower = now - newer_than if newer_than is not None else 0.0
        found: list[str] = []
        for leaf in _shards(self.root / top):
            folder = self.root / top / leaf
            if lower and _mtime(folder) < lower:
                continue
            for entry in os.scandir(folder):
                if not _NAME.fullmatch(entry.name):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if lower <= mtime < upper:
                    found.append(f"{top}/{leaf}/{entry.name}")
        return found

    def quarantine(self, relative: str, older_than: float) -> Path | None:
        """Move a final file aside into the temp folder, atomically, and keep it there only if
        the file moved is still older than `older_than` seconds; a file a store has just
        (re)placed under that name is put back. Returns the aside path, or None."""
        final = self.path_of(relative)
        aside = self.tmp / (secrets.token_hex(16) + ORPHAN_SUFFIX)
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            return None
        if os.stat(aside).st_mtime >= time.time() - older_than:
            self.restore(aside, relative)
            return None
        return aside

    def restore(self, aside: Path, relative: str) -> None:
        """Put a quarantined file back (the same bytes: replacing a newer copy is harmless)."""
        final = self.path_of(relative)
        os.replace(aside, final)
        fsync_dir(final.parent)

    def drop(self, aside: Path, relative: str) -> None:
        """Delete a quarantined file for good and make its name's removal durable."""
        with _quiet():
            aside.unlink(missing_ok=True)
            fsync_dir(self.path_of(relative).parent)

    def _make_dirs(self, folder: Path) -> list[Path]:
        """Create the shard folders (`root/aa/bb`); returns the folders whose entries must be
        fsynced besides `folder` itself: the parent of each level not yet known to be durable
        (also when another store created it and may not have synced it yet)."""
        with _lock:
            known = (
                _leaf_key(folder.parent.name, folder.name) in self._folders,
                folder.parent.name in self._folders,
            )
        if known[0]:
            return []
        folder.mkdir(parents=True, exist_ok=True)
        return [folder.parent] if known[1] else [folder.parent, self.root]


def _shards(folder: Path) -> list[str]:
    """The names of the shard folders (`aa`) in `folder`."""
    return [
        entry.name
        for entry in os.scandir(folder)
        if entry.is_dir(follow_symlinks=False) and _SHARD.fullmatch(entry.name)
    ]


def _leaf_key(top: str, leaf: str) -> str:
    """How `FileStore._folders` names the leaf shard folder `root/<top>/<leaf>`."""
    return f"{top}/{leaf}"


def _mtime(folder: Path) -> float:
    try:
        return os.stat(folder, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return 0.0  # removed meanwhile: nothing to find there


_lock = threading.Lock()


class _quiet:
    """Best-effort cleanup: an OSError is logged, never raised."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> bool:
        if kind is not None and issubclass(kind, OSError):
            logger.warning("DICOM store cleanup failed: %s", kind.__name__)
            return True
        return False
