"""The spool file a C-STORE dataset is received into: batches in order, digest on the way, and
writeback started early (`dicom.writeback`) so that the final fsync finds little to do, and the
pages of a durable file dropped from the page cache."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import shutil
import sys
from pathlib import Path

import pytest

from dicom import spool, writeback
from dicom.config import StoreLimits
from dicom.spool import SpoolFile


def test_batches_are_written_in_order_with_the_digest_of_all_of_them(tmp_path: Path) -> None:
    parts = [os.urandom(n) for n in (1, 70_000, 0, 300_000, 5)]
    file = SpoolFile(tmp_path)
    file.open()
    file.add(parts[0])
    file.add(memoryview(parts[1]))
    file.write(file.take())
    for part in parts[2:]:
        file.add(bytearray(part))
    file.write(file.take())
    digest, size, fd = file.finish()
    os.close(fd)
    whole = b"".join(parts)
    assert file.path.read_bytes() == whole
    assert (digest, size) == (hashlib.sha256(whole).digest(), len(whole))
    assert spool.pending() == 0


def test_discarded_spool_file_is_removed(tmp_path: Path) -> None:
    file = SpoolFile(tmp_path)
    file.open()
    file.add(b"partial")
    file.write(file.take())
    file.discard()
    assert not file.path.exists()
    assert spool.pending() == 0


def test_a_batch_that_would_leave_less_than_the_reserve_free_is_refused_unwritten(
    tmp_path: Path,
) -> None:
    free = shutil.disk_usage(tmp_path).free
    # More than this file system has:
    file = SpoolFile(tmp_path, StoreLimits(reserve=free + (1 << 40)))
    file.open()
    file.add(b"x" * 4096)
    with pytest.raises(spool.StoreFull) as refused:
        file.write(file.take())
    assert refused.value.errno == errno.ENOSPC
    assert file.path.stat().st_size == 0
    file.discard()
    assert spool.pending() == 0


def test_a_batch_that_leaves_the_reserve_free_is_written(tmp_path: Path) -> None:
    file = SpoolFile(tmp_path, StoreLimits(reserve=1))
    file.open()
    file.add(b"x" * 4096)
    file.write(file.take())
    file.discard()


def test_no_spool_file_is_made_while_the_store_s_mount_check_file_is_missing(
    tmp_path: Path,
) -> None:
    check = tmp_path / ".volume"
    file = SpoolFile(tmp_path, StoreLimits(mount_check=check))
    with pytest.raises(spool.StoreNotMounted):
        file.open()
    assert list(tmp_path.iterdir()) == []
    check.touch()
    mounted = SpoolFile(tmp_path, StoreLimits(mount_check=check))
    mounted.open()
    mounted.discard()
    assert spool.pending() == 0


def test_a_spool_file_begun_before_the_volume_went_is_not_finished(tmp_path: Path) -> None:
    check = tmp_path / ".volume"
    check.touch()
    file = SpoolFile(tmp_path, StoreLimits(mount_check=check))
    file.open()  # one C-STORE ahead, the volume still there
    file.add(b"x" * 4096)
    file.write(file.take())
    check.unlink()
    with pytest.raises(spool.StoreNotMounted):
        file.finish()
    file.discard()
    assert spool.pending() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_of_written_pages_is_started_on_linux(tmp_path: Path) -> None:
    assert writeback.AVAILABLE
    with open(tmp_path / "f", "wb") as f:
        f.write(os.urandom(256 << 10))
        f.flush()
        assert writeback.start_writeback(f.fileno(), 0, 256 << 10)


def test_writeback_starts_once_per_mebibyte_written_not_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int) -> bool:
        started.append((offset, length))
        return True

    monkeypatch.setattr(spool, "start_writeback", record)
    small, large = SpoolFile(tmp_path), SpoolFile(tmp_path)
    for file, batches in ((small, 8), (large, 40)):  # 0.5 MiB, 2.5 MiB in 64 KiB batches
        file.open()
        for _ in range(batches):
            file.add(bytes(64 << 10))
            file.write(file.take())
        os.close(file.finish()[2])
    every = spool.WRITEBACK_EVERY
    assert started == [(0, every), (every, every)]  # none for the small file, nor the tail


def _resident(path: Path) -> list[bool]:
    """Which of the file's pages are in the page cache: mincore(2) over a mapping of it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    size = path.stat().st_size
    vector = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(address, size, vector) == 0, ctypes.get_errno()
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return [bool(byte & 1) for byte in vector]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and fadvise as on Linux")
def test_a_durable_file_leaves_the_page_cache(tmp_path: Path) -> None:
    """On a disk-backed folder (tmpfs keeps its pages whatever the hint)."""
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
        assert sum(_resident(path)) == 256
        writeback.drop_cached(f.fileno())
    assert sum(_resident(path)) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and fadvise as on Linux")
def test_a_large_file_leaves_the_page_cache_behind_its_writes(tmp_path: Path) -> None:
    """Once twice `DROP_BEHIND` is written, what lies further back than `DROP_BEHIND` and is on
    disk goes (here all of it was fsynced through another descriptor first)."""
    file = SpoolFile(tmp_path)
    file.open()
    mebibyte = [os.urandom(1 << 20)]
    for _ in range((2 * spool.DROP_BEHIND >> 20) - 1):
        file.write(mebibyte)
    with open(file.path, "rb") as other:
        os.fsync(other.fileno())
    assert all(_resident(file.path))
    file.write(mebibyte)
    resident = _resident(file.path)
    behind = spool.DROP_BEHIND // mmap.PAGESIZE
    assert not any(resident[:behind])
    assert all(resident[behind:])
    file.discard()


def test_dropping_the_cache_is_a_hint_that_never_raises(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        closed = os.dup(f.fileno())
    os.close(closed)
    writeback.drop_cached(closed)  # EBADF: no exception


def test_writeback_is_a_hint_that_never_raises(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        assert not writeback.start_writeback(f.fileno(), 0, 0)  # nothing to write
        closed = os.dup(f.fileno())
    os.close(closed)
    assert not writeback.start_writeback(closed, 0, 4096)  # EBADF: False, no exception
