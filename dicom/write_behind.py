"""An association's spool files on its file queue: created one C-STORE ahead, written behind
the transfer, settled in order.

The listener receives a C-STORE dataset on the event loop and hands it over by batches of
`SPOOL_BATCH` bytes to a `WriteBehind`, whose steps (the file's create, each batch's write, the
settle that names and fsyncs it) run one after the other on the association's `SerialQueue`,
never on the loop: on ext4 a create or a write to the page cache can wait for the journal while
other associations fsync. `Spools` keeps the next dataset's file ready, created while the sender
reads the answer to this one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from dicom.config import NO_LIMITS, StoreLimits
from dicom.serial_queue import SerialQueue
from dicom.spool import Chunk, SpoolFile

_T = TypeVar("_T")

SPOOL_BATCH: Final = 1 << 20
"""Received bytes held (by reference) before they are handed to the association's file queue as
one batch: one `writev` (`WriteBehind`). A dataset smaller than this is written in one piece by
its settle, once complete. Each batch wakes the file thread, which then wants the GIL while the
event loop is busy with the transfer: with 1 MiB instead of 64 KiB, a cycle was 0.976 and 0.968
times as long (0.5 MB instances, one association, blocks of 25 instances alternated inside one
gateway, two runs, 2026-11-28)."""
SPOOL_BACKLOG: Final = 1 << 20
"""Bytes handed to the file queue and not yet written beyond which the receiving waits (and the
socket's reading with it): what an association holds in memory stays bounded (a batch being
gathered, the one being written and at most this much more: about 3 MiB)."""


class Spools:
    """An association's spool files, each created on the association's file queue one C-STORE
    ahead: on ext4 a create right after fsyncs waits about a millisecond for the journal, so the
    next dataset's file is created once this one's answer has gone out, while the sender reads
    it and sends the next command, not when the next dataset arrives. Not while the index row
    commits: the create then competed with the database call for the GIL and the journal (one
    association: 76 against 85 stores/s). Not before the answer either: waking the file thread
    costs the event loop about 0.1 ms on a VM, and the answer waited for it (1.047 and 1.021
    times the stores a second, two series of 14 alternated rounds, 2026-11-28)."""

    def __init__(self, folder: Path, queue: SerialQueue, limits: StoreLimits = NO_LIMITS) -> None:
        self._folder = folder
        self._queue = queue
        self._limits = limits
        self._next: WriteBehind | None = None

    def prepare(self) -> None:
        if self._next is None:
            self._next = self._new()

    def take(self) -> WriteBehind:
        """The next spool file, its creation maybe still running."""
        taken, self._next = self._next or self._new(), None
        return taken

    def _new(self) -> WriteBehind:
        return WriteBehind(SpoolFile(self._folder, self._limits), self._queue)

    def close(self) -> concurrent.futures.Future[None] | None:
        """The association ends: remove the file prepared for a C-STORE that did not come; the
        removal's future (None when nothing was prepared or it ran at once)."""
        prepared, self._next = self._next, None
        return prepared.discard() if prepared is not None else None

    async def release(self, within: float) -> None:
        """The peer asks for a release: `close`, and wait until the file is gone (at most
        `within` seconds), so that a released association has left no spool file."""
        removed = self.close()
        if removed is not None:
            # asyncio.wait, not wait_for: a timeout must not cancel the removal itself.
            await asyncio.wait([asyncio.wrap_future(removed)], timeout=within)


class WriteBehind:
    """A spool file's steps on its association's file queue, in order: the create, each batch as
    it is handed over, then the settle. The event loop does not wait for a batch to be written
    before it receives the next one (a create or a write to the page cache can wait for the ext4
    journal); it has hashed the batch already (`SpoolFile.add`). Beyond `SPOOL_BACKLOG` bytes
    handed over and not yet written, `write` waits. The first step that fails is kept
    (`failed`); the steps after it do nothing, and the settle reports it."""

    def __init__(self, spool: SpoolFile, queue: SerialQueue) -> None:
        self.spool = spool
        self._queue = queue
        self.failed: OSError | None = None
        self._unwritten: deque[tuple[concurrent.futures.Future[None], int]] = deque()
        self._unwritten_bytes = 0
        queue.submit(self._step, spool.open)

    def _step(self, function: Callable[..., None], *args: object) -> None:
        """On the queue: a file step, unless one failed before."""
        if self.failed is not None:
            return
        try:
            function(*args)
        except OSError as exc:
            self.failed = exc

    async def write(self, batch: list[Chunk]) -> None:
        """Queue `batch`; wait while too much is queued and not yet written."""
        size = sum(len(chunk) for chunk in batch)
        written = self._queue.submit(self._step, self.spool.write, batch)
        self._unwritten.append((written, size))
        self._unwritten_bytes += size
        while self._unwritten and (
            self._unwritten[0][0].done() or self._unwritten_bytes > SPOOL_BACKLOG
        ):
            oldest, oldest_size = self._unwritten[0]
            if not oldest.done():  # else no wrapper: it would wake the loop up for nothing
                # Shielded: the step runs on whatever happens to this task (the file stays
                # open under it until the discard queued behind it).
                await asyncio.shield(asyncio.wrap_future(oldest))
            oldest.result()
            self._unwritten.popleft()
            self._unwritten_bytes -= oldest_size

    async def settle(self, function: Callable[..., _T], *args: object) -> _T:
        """Run `function(*args)` on the queue after the steps queued before it; shielded, so
        that the file is settled (or removed) even when this task is cancelled."""
        return await asyncio.shield(asyncio.wrap_future(self._queue.submit(function, *args)))

    def discard(self) -> concurrent.futures.Future[None] | None:
        """Remove the spool file once the steps queued before are done; the removal's future
        (None when it ran at once)."""
        try:
            return self._queue.submit(self.spool.discard)
        except RuntimeError:  # the listener's threads are gone: nothing runs on the file
            self.spool.discard()
            return None
