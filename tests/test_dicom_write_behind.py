"""`dicom.write_behind`: an association's spool files, written behind the transfer in order, on its
file queue, with what is held in memory bounded."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom.serial_queue import SerialQueue
from dicom.spool import SpoolFile
from dicom.write_behind import SPOOL_BACKLOG, Spools, WriteBehind

WITHIN = 10.0  # seconds any single wait of these tests may take


@pytest.fixture
def queue() -> Iterator[SerialQueue]:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        yield SerialQueue(pool)


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def finished(writer: WriteBehind) -> bytes:
    """`settle`'s usual last step in the listener: the spool file's digest, on the queue."""
    digest, _, fd = writer.spool.finish()
    os.close(fd)
    return digest


async def test_batches_are_written_in_the_order_handed_over(
    tmp_path: Path, queue: SerialQueue
) -> None:
    writer = WriteBehind(SpoolFile(tmp_path), queue)
    parts = [b"first ", b"second ", b"third"]
    for part in parts:
        writer.spool.add(part)
        await asyncio.wait_for(writer.write(writer.spool.take()), WITHIN)
    await asyncio.wait_for(writer.settle(finished, writer), WITHIN)
    assert writer.failed is None
    assert writer.spool.path.read_bytes() == b"".join(parts)


async def test_a_failed_step_is_kept_and_the_steps_after_it_do_nothing(
    tmp_path: Path, queue: SerialQueue
) -> None:
    writer = WriteBehind(SpoolFile(tmp_path / "missing"), queue)  # the create fails
    for _ in range(2):  # the second hand-over collects the first one's step
        writer.spool.add(b"data")
        await asyncio.wait_for(writer.write(writer.spool.take()), WITHIN)
        await asyncio.wait_for(writer.settle(lambda: None), WITHIN)
    assert isinstance(writer.failed, FileNotFoundError)
    assert not (tmp_path / "missing").exists()


async def test_handing_over_waits_while_the_backlog_is_beyond_its_bound(
    tmp_path: Path, queue: SerialQueue
) -> None:
    writer = WriteBehind(SpoolFile(tmp_path), queue)
    gate = threading.Event()
    queue.submit(gate.wait, WITHIN)  # the disk is stuck: nothing queued after this runs
    half = bytes(SPOOL_BACKLOG // 2 + 1)
    writer.spool.add(half)
    await asyncio.wait_for(writer.write(writer.spool.take()), WITHIN)  # within the bound
    writer.spool.add(half)
    beyond = asyncio.ensure_future(writer.write(writer.spool.take()))
    await asyncio.sleep(0.1)
    assert not beyond.done()
    gate.set()
    await asyncio.wait_for(beyond, WITHIN)
    await asyncio.wait_for(writer.settle(finished, writer), WITHIN)
    assert writer.spool.path.stat().st_size == 2 * len(half)


async def test_discard_removes_the_file_once_the_steps_before_it_are_done(
    tmp_path: Path, queue: SerialQueue
) -> None:
    writer = WriteBehind(SpoolFile(tmp_path), queue)
    writer.spool.add(b"partial")
    await asyncio.wait_for(writer.write(writer.spool.take()), WITHIN)
    removed = writer.discard()
    assert removed is not None
    await asyncio.wait_for(asyncio.wrap_future(removed), WITHIN)
    assert names(tmp_path) == []


async def test_the_next_file_is_prepared_once_and_taken_by_the_next_store(
    tmp_path: Path, queue: SerialQueue
) -> None:
    spools = Spools(tmp_path, queue)
    spools.prepare()
    spools.prepare()  # already prepared: no second file
    taken = spools.take()
    await asyncio.wait_for(taken.settle(lambda: None), WITHIN)
    assert names(tmp_path) == [taken.spool.path.name]
    await asyncio.wait_for(spools.release(WITHIN), WITHIN)  # nothing prepared: nothing to wait for
    assert taken.spool.path.exists()  # the taken file is its store's, not the release's
    removed = taken.discard()
    assert removed is not None
    await asyncio.wait_for(asyncio.wrap_future(removed), WITHIN)


async def test_release_removes_the_file_prepared_for_a_store_that_did_not_come(
    tmp_path: Path, queue: SerialQueue
) -> None:
    spools = Spools(tmp_path, queue)
    spools.prepare()
    await asyncio.wait_for(spools.release(WITHIN), WITHIN)
    assert names(tmp_path) == []
