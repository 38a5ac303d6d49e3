"""Page cache hints for the files the listener writes: start writing a file's new pages to disk
while the rest of it still arrives; drop the pages of a file once it is durable.

A C-STORE answers 0x0000 only after the file's fsync. Left to itself, the kernel writes the
received gigabyte at that fsync, all at once: the fsync then lasts as long as the whole transfer
to disk. Linux's `sync_file_range(SYNC_FILE_RANGE_WRITE)` queues the pages of a range for
writeback and returns without waiting, so each MiB the spool writes (`spool.WRITEBACK_EVERY`)
goes to disk while the next ones arrive, and the final fsync finds only the tail and the journal
left. The queueing is not free (the calling thread submits the I/O), and it is paid while the
dataset arrives: a 0.5 MB instance has none and is written out by its fsync. It is a hint: it
neither makes anything durable nor reports write errors (the fsync does both), so a platform
without it, or a call that fails, changes nothing but speed. Called from the spool's worker
threads; ctypes releases the GIL during the call.

Once a file is fsynced and its header parsed, nothing reads it soon (a viewer's retrieval, if
any, comes later), yet Linux keeps its pages cached until memory runs short: a stream of images
would fill the page cache with cold pixel data and push out what PostgreSQL and the rest of the
machine read. `drop_cached` (`POSIX_FADV_DONTNEED`) frees them at once, and the next instance's
writes reuse them. On the benchmark's virtual machine, whose freed memory goes back to the host
(free page reporting), a write into memory the guest had not touched lately took up to ten
times longer (0.13 against 1.45 ms per 0.5 MB once the cache passed 1.2 GB): without the drop,
the gateway's file threads spent 2.3 to 2.9 ms per instance instead of 1.2 to 1.7 ms, and four
associations stored 218-237 instead of 251-280 instances/s.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable
from typing import Final

SYNC_FILE_RANGE_WRITE: Final = 2  # <linux/fs.h>

_SyncFileRange = Callable[[int, int, int, int], int]


def _load() -> _SyncFileRange | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range: Final = _load()
AVAILABLE: Final = _sync_file_range is not None


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Queue the dirty pages of `length` bytes at `offset` of `fd` for writing to disk, without
    waiting; True when the kernel took the hint (best effort: never raises)."""
    if _sync_file_range is None or length <= 0:
        return False
    return _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Let the kernel drop the cached pages of `length` bytes at `offset` of `fd`'s file (0: to
    its end). Only clean pages go: call it once the file is fsynced, or on a range whose
    writeback was started long enough ago (pages still dirty or being written stay, and the
    call does not wait for them). Best effort: never raises, and never consumes a write error
    the file's fsync must report (no wait on writeback, unlike `sync_file_range` with
    `SYNC_FILE_RANGE_WAIT_*`)."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: no posix_fadvise here
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
