"""Where a C-STORE dataset goes while it arrives: a file in the store's temp folder, hashed on
the way.

`SpoolFile(folder)` names `<storage>/tmp/<random>.part` (the final step is a link, never a copy);
`open()` creates it, in a worker like every other file step: on ext4 a create right after other
files' and folders' fsyncs waits about a millisecond for the journal (measured here), and the
listener receives the first fragments meanwhile. The association hands it each fragment as it comes
off the wire (`add`), which feeds SHA-256 from it at once, in the caller's thread (the event loop:
`hashlib` lets go of the GIL while it hashes, but the loop waits for it); the fragment is then kept,
by reference, until `take()` hands the batch to `write`, which writes them with one `writev` and,
once `WRITEBACK_EVERY` bytes have been written since it last did, has the kernel start writing them
to disk (`dicom.writeback`), so that the final fsync of a large instance finds little left; what
lies more than `DROP_BEHIND` behind the bytes written and is already on disk leaves the page cache
(a 1 GB instance does not stay cached in full). The listener has a worker write a batch every MiB
(`dicom.write_behind.SPOOL_BATCH`), one at a time, and the last one in the worker that then fsyncs,
so that no write (which on ext4 can wait for the journal) holds up the event loop. The hashing moved
from that worker to `add` on 2026-11-28: the worker got neither the GIL nor a CPU while the event
loop and the sender were busy with the transfer, so it hashed the whole instance after the last byte
(0.45 ms of a 3.4 ms cycle, one association, a 2-vCPU VM with SHA extensions); hashed as it arrives,
an instance's cycle was 0.966 and 0.969 times as long (blocks of 25 instances alternated inside one
gateway, two runs). `finish()` gives digest, size and a descriptor for the fsync; `discard()`
removes an unfinished transfer's file (the association ended mid-dataset, or the disk failed). Temp
files of a process that died are swept by `FileStore.open` and `FileStore.sweep_temp`.

The store's `StoreLimits` are checked on the way, in the worker. Each `write` first checks the
room left on the store's file system (`fstatvfs`, about a microsecond): a batch that would leave
less than the `reserve` free raises `StoreFull` (an `OSError` with ENOSPC), as the kernel itself
would at the last byte. The listener answers 0xA700 then as for a full disk, while the reserve
stays for what shares the file system (PostgreSQL's WAL, the logs): a flood of images must not
stop the vitals and the lab results. The last batch of a dataset may take the free space below
the reserve by at most its size (`SPOOL_BATCH`, 1 MiB) per association; a batch is checked
whole, not byte by byte. With a `mount_check` file, `open` and `finish` check that it exists (a
`stat` each): without it the store's volume is taken for unmounted (`StoreNotMounted`), and
nothing is written, nor any folder made, in the folder beneath (a file opened one C-STORE ahead,
before the volume went, is refused at its `finish`).

`pending()` counts the spool files open in this process (tests check none is left behind).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from dicom.config import NO_LIMITS, StoreLimits
from dicom.filestore import TMP_SUFFIX
from dicom.writeback import drop_cached, start_writeback

logger = logging.getLogger(__name__)

IOV_MAX: Final = 512
DROP_BEHIND: Final = 8 << 20
"""How far behind the bytes written a spool file's pages are let go (`SpoolFile.write`)."""
WRITEBACK_EVERY: Final = 1 << 20
"""Bytes written between two starts of writeback (`SpoolFile.write`). Each start submits the
pages' I/O in the calling thread, while the dataset still arrives and the event loop and the
sender want the same two CPUs: started every 64 KiB batch, it cost 0.2-0.4 ms of the file
thread per 0.5 MB instance and the bench stored 6 % (one association) and 10 % (four) fewer
instances a second than with one start per MiB, where a 0.5 MB instance has none and its fsync
writes it whole, once the transfer is over (2026-11-28)."""
Chunk = bytes | bytearray | memoryview

_lock = threading.Lock()
_open = 0


class StoreNotMounted(OSError):
    """The store's mount check file is missing: its volume is not there."""

    def __init__(self, mount_check: Path) -> None:
        super().__init__(errno.ENOENT, f"{mount_check} is missing")
        self.mount_check = mount_check


class StoreFull(OSError):
    """A write would leave less free space on the store's file system than its reserve."""

    def __init__(self, reserve: int) -> None:
        super().__init__(errno.ENOSPC, f"free space would fall below {reserve} bytes")
        self.reserve = reserve


def free_space(fd: int) -> int:
    """Bytes an unprivileged process may still write on the file system of `fd` (as `df`)."""
    stats = os.fstatvfs(fd)
    return stats.f_bavail * stats.f_frsize


class SpoolFile:
    """One user at a time: `open` (in a worker; fragments may be added before), `add`, `take`,
    `write` while receiving, then `finish` or `discard` (`add` and `take` in one thread, the
    others in the worker, each after the `add`s of what it writes or finishes)."""

    def __init__(self, folder: Path, limits: StoreLimits = NO_LIMITS) -> None:
        self.path = folder / (secrets.token_hex(16) + TMP_SUFFIX)
        self._limits = limits
        self._fd: int | None = None
        self._ended = False  # finished or discarded
        self._digest = hashlib.sha256()
        self._size = 0
        self._written = 0
        self._started = 0  # bytes at the start of the file whose writeback was started
        self._dropped = 0  # bytes at the start of the file let go from the page cache
        self._batch: list[Chunk] = []
        self.batched = 0  # bytes added and not yet taken

    def open(self) -> None:
        """Create the file (blocking: call it in a worker). Raises OSError."""
        global _open
        if self._fd is not None or self._ended:
            raise ValueError("spool file already opened, finished or discarded")
        self._check_mounted()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with _lock:
            _open += 1

    @property
    def size(self) -> int:
        return self._size

    def add(self, data: Chunk) -> None:
        """Hash a fragment and keep it for the next batch."""
        self._digest.update(data)
        self._batch.append(data)
        self._size += len(data)
        self.batched += len(data)

    def take(self) -> list[Chunk]:
        """The fragments added since the last `take`, for `write`."""
        batch, self._batch = self._batch, []
        self.batched = 0
        return batch

    def write(self, batch: Sequence[Chunk]) -> None:
        """Write a batch to the page cache, start the writeback of every `WRITEBACK_EVERY` bytes
        written; let go of the pages far behind them (blocking: call it in a worker, one batch at
        a time, in the order taken). Raises OSError: `StoreFull` when the batch would leave
        less than the reserve free, and then nothing of it is written."""
        if self._fd is None:
            raise ValueError("spool file not open")
        views = [memoryview(b) for b in batch if len(b)]
        length = sum(view.nbytes for view in views)
        reserve = self._limits.reserve
        if reserve and free_space(self._fd) - length < reserve:
            raise StoreFull(reserve)
        _write_all(self._fd, views)
        self._written += length
        if self._written - self._started >= WRITEBACK_EVERY:  # the fsync will find less to do
            start_writeback(self._fd, self._started, self._written - self._started)
            self._started = self._written
        if self._written - self._dropped >= 2 * DROP_BEHIND:
            # Drop-behind: a large instance (a tomosynthesis, a whole-slide image) would otherwise
            # sit in the page cache in full until its fsync. Pages written back by now go; the
            # rest stay, for the drop after the fsync.
            end = self._written - DROP_BEHIND
            drop_cached(self._fd, self._dropped, end - self._dropped)
            self._dropped = end

    def finish(self) -> tuple[bytes, int, int]:
        """The SHA-256 and size of what was added, and a duplicate of the descriptor for the
        fsync (the caller closes it); the spool file itself is closed. Everything added must
        have been written. Raises `StoreNotMounted` when the mount check file is gone since the
        file was opened (it is then not taken into the store)."""
        if self._fd is None:
            raise ValueError("spool file not open")
        self._check_mounted()
        fd = os.dup(self._fd)
        self._close()
        return self._digest.digest(), self._size, fd

    def _check_mounted(self) -> None:
        check = self._limits.mount_check
        if check is not None and not check.exists():
            raise StoreNotMounted(check)

    def discard(self) -> None:
        """Close and remove an unfinished transfer's file, if it was created (best effort)."""
        self._batch = []
        self._close()
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            # The temp sweep removes it within the hour; the name is random, never patient data.
            logger.warning(
                "DICOM spool file %s not removed (%s): left to the temp sweep",
                self.path.name,
                exc.strerror or type(exc).__name__,
            )

    def _close(self) -> None:
        global _open
        self._ended = True
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with _lock:
            _open -= 1
        os.close(fd)


def _write_all(fd: int, views: list[memoryview]) -> None:
    """`writev` until every byte is written (a write may take less than it was given)."""
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def pending() -> int:
    """Spool files being written (not yet finished or discarded) in this process."""
    with _lock:
        return _open
