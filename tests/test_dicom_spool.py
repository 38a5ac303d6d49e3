"""The spool file a C-STORE dataset is received into: batches in order, digest on the way, and
writeback started early (`dicom.writeback`) so that the final fsync finds little to do."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from dicom import spool, writeback
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_of_written_pages_is_started_on_linux(tmp_path: Path) -> None:
    assert writeback.AVAILABLE
    with open(tmp_path / "f", "wb") as f:
        f.write(os.urandom(256 << 10))
        f.flush()
        assert writeback.start_writeback(f.fileno(), 0, 256 << 10)


def test_writeback_is_a_hint_that_never_raises(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        assert not writeback.start_writeback(f.fileno(), 0, 0)  # nothing to write
        closed = os.dup(f.fileno())
    os.close(closed)
    assert not writeback.start_writeback(closed, 0, 4096)  # EBADF: False, no exception
