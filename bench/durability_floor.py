"""What the steps a safe C-STORE must take before its 0x0000 cost on this machine, alone.

The issue's contract for one instance: write the file, fsync it, give it its name, fsync the
folder, commit the index row, and only then answer. With one association the sender waits for
each answer before it sends the next instance, so nothing of one instance overlaps the next:
every step after the last byte arrives adds to the time between two instances. dcmtk's
`storescp`, the reference of the goal, takes none of these steps (no fsync, no index).

`measure` runs the steps with nothing else around them (no network, no DICOM, no threads), on
the benchmark's own instances, one after the other, as the fastest conceivable receiver would:

- `write`: hash (SHA-256) and write the bytes in 64 KiB pieces, each piece's writeback started
  (`dicom.writeback`), so that the fsync after the last byte is as short as it can be (the
  gateway starts writeback only once per MiB, `spool.WRITEBACK_EVERY`: on a busy machine the
  starts cost more CPU during the transfer than they save at the fsync). A streaming receiver
  does this while the dataset arrives, so it need not add to the cycle;
- `fsync`: link the file under its final name, then fsync it (what is left of its data, and the
  journal commit that holds its name);
- `folder`: fsync the folder of the name;
- `commit`: INSERT one small row into PostgreSQL and COMMIT (`synchronous_commit` as the server
  has it), through asyncpg.

`fsync + folder + commit` is the floor of what a receiver honouring the contract adds to each
instance's cycle, however it is written. Added to dcmtk's own cycle (transfer and write), it
bounds the rate any such receiver could reach with one association in that run.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from dicom.writeback import start_writeback

PIECE = 64 << 10


@dataclass(frozen=True, slots=True)
class Floor:
    """Median milliseconds of each step per instance."""

    write: float
    fsync: float
    folder: float
    commit: float

    @property
    def after_transfer(self) -> float:
        """What a receiver must add after the last byte: fsync, folder fsync, commit (ms)."""
        return self.fsync + self.folder + self.commit

    def bound(self, reference_rate: float) -> float:
        """The highest rate (instances/s) of one association for a receiver that is as fast as
        the reference at everything but these steps."""
        return 1000.0 / (1000.0 / reference_rate + self.after_transfer)


async def measure(files: list[Path], folder: Path, dsn: str) -> Floor:
    """Take the steps for each of `files` in `folder` (created; the files stay there, for the
    caller to remove once nothing else is measured: see below), the rows in a table of the
    database at `dsn` (created, then dropped).

    On ext4 without a journal (the benchmark's VM of 2026-11-28, afternoon), an inode freed less
    than a minute ago is not handed out again: every file or folder created meanwhile in the
    same block group first skips past each of them (`recently_deleted` in the kernel's inode
    allocator). When this function removed its 400 files between two rounds, it slowed the next
    round's receivers: the gateway, which creates a file and up to two folders per instance,
    stored 0.934 times as many instances a second right after 400 removals (6 alternated
    rounds)."""
    tmp, final = folder / "tmp", folder / "final"
    tmp.mkdir(parents=True)
    final.mkdir()
    conn = await asyncpg.connect(dsn)
    steps: dict[str, list[float]] = {"write": [], "fsync": [], "folder": [], "commit": []}
    try:
        await conn.execute(
            "CREATE TABLE bench_floor (id bigserial PRIMARY KEY, path text, sha256 bytea)"
        )
        folder_fd = os.open(final, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i, source in enumerate(files):
                data = memoryview(source.read_bytes())
                started = time.perf_counter()
                digest = hashlib.sha256()
                temp = tmp / f"{i}.part"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    for offset in range(0, len(data), PIECE):
                        piece = data[offset : offset + PIECE]
                        digest.update(piece)
                        os.write(fd, piece)
                        start_writeback(fd, offset, len(piece))
                    written = time.perf_counter()
                    name = final / f"{digest.hexdigest()}-{i}.dcm"
                    os.link(temp, name)
                    os.unlink(temp)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                synced = time.perf_counter()
                os.fsync(folder_fd)
                folder_synced = time.perf_counter()
                await conn.execute(
                    "INSERT INTO bench_floor (path, sha256) VALUES ($1, $2)",
                    name.name,
                    digest.digest(),
                )
                committed = time.perf_counter()
                steps["write"].append(written - started)
                steps["fsync"].append(synced - written)
                steps["folder"].append(folder_synced - synced)
                steps["commit"].append(committed - folder_synced)
        finally:
            os.close(folder_fd)
        await conn.execute("DROP TABLE bench_floor")
    finally:
        await conn.close()
    return Floor(**{step: 1000 * statistics.median(times) for step, times in steps.items()})
