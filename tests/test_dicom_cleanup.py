"""What the DICOM store leaves behind: spool files of unfinished transfers, files no index row
names, and C-STORE commands a well-behaved SCU would not send."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dicom import spool, status
from dicom.config import DicomSettings
from dicom.filestore import FileStore
from dicom.orphan_sweep import STARTUP_ORPHAN_LIMIT
from tests.dicom_support import (
    RunningDicom,
    associate_for,
    echo,
    instance_row,
    running_dicom,
    send_raw_store,
    store,
    temp_files,
)
from tests.services_support import wait_until
from tests.test_dicom_filestore import commit
from tests.test_dicom_store import fresh, large

HOUR = 3600.0


@pytest.fixture(scope="module")
async def scp(
    module_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningDicom]:
    async with running_dicom(module_dsn, tmp_path_factory.mktemp("dicom-cleanup")) as running:
        yield running


def orphan(root: Path, age: float) -> Path:
    """A complete file under a final (content) name that no index row names, `age` seconds old."""
    name = secrets.token_hex(32)
    path = root / name[:2] / name[2:4] / f"{name}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_received_dataset_is_spooled_in_the_store_not_the_system_temp_folder(
    scp: RunningDicom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    ds = fresh()
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    assert list(system_tmp.iterdir()) == []
    assert temp_files(scp.root) == []
    assert spool.pending() == 0


async def test_a_released_association_has_removed_the_spool_file_it_prepared(
    scp: RunningDicom, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After each answer the association creates the next C-STORE's spool file; the release
    # reply must wait until that file is gone, however slow the file system is.
    remove = spool.SpoolFile.discard

    def slow_remove(self: spool.SpoolFile) -> None:
        time.sleep(0.3)
        remove(self)

    monkeypatch.setattr(spool.SpoolFile, "discard", slow_remove)
    [code] = await asyncio.to_thread(store, scp.port, [fresh()])
    assert code == status.SUCCESS
    assert temp_files(scp.root) == []
    assert spool.pending() == 0


async def test_transfer_aborted_mid_dataset_leaves_no_temp_file(scp: RunningDicom) -> None:
    ds = fresh("CT_small.dcm")  # command, then three dataset fragments of up to 16 KiB
    # The command and only the first fragment: MR_small would fit whole in two PDUs, and its
    # store could then complete before the abort arrived.
    _, assoc = await asyncio.to_thread(send_raw_store, scp.port, ds, pdus=2)
    assert assoc.is_aborted
    await wait_until(lambda: spool.pending() == 0 and not temp_files(scp.root), timeout=10)
    assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
    assert await asyncio.to_thread(echo, scp.port) == (True, status.SUCCESS)


async def test_transfer_aborted_after_batches_were_written_leaves_no_temp_file(
    scp: RunningDicom,
) -> None:
    ds = large(fresh(), rows=2048)  # 2 MiB of pixels: 129 fragments of up to 16 KiB
    # 1.5 MiB arrive: a 1 MiB spool batch has gone to a worker for writing when the abort comes.
    _, assoc = await asyncio.to_thread(send_raw_store, scp.port, ds, pdus=98)
    assert assoc.is_aborted
    await wait_until(lambda: spool.pending() == 0 and not temp_files(scp.root), timeout=10)
    assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
    assert await asyncio.to_thread(echo, scp.port) == (True, status.SUCCESS)


async def test_c_store_command_without_sop_instance_uid_gets_c001_and_the_association_goes_on(
    scp: RunningDicom,
) -> None:
    other = await asyncio.to_thread(associate_for, scp.port, fresh())  # open meanwhile
    try:
        ds = fresh()
        code, assoc = await asyncio.to_thread(send_raw_store, scp.port, ds, with_instance_uid=False)
        assert code == status.MISSING_UID
        assert assoc.is_released  # answered, then released normally: not aborted
        assert await instance_row(scp.pool, str(ds.SOPInstanceUID)) is None
        letters = await scp.pool.fetchval(
            "SELECT count(*) FROM dead_letter WHERE protocol = 'dicom' AND reason = 'missing-uid'"
        )
        assert letters >= 1
        assert temp_files(scp.root) == []
        second = fresh()
        answer = await asyncio.to_thread(other.send_c_store, second)
        assert int(answer.Status) == status.SUCCESS
    finally:
        await asyncio.to_thread(other.release)
    assert await asyncio.to_thread(echo, scp.port) == (True, status.SUCCESS)


async def test_orphan_sweep_removes_old_unindexed_files_and_keeps_the_rest(
    scp: RunningDicom,
) -> None:
    ds = fresh()
    [code] = await asyncio.to_thread(store, scp.port, [ds])
    assert code == status.SUCCESS
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    indexed = scp.root / row["file_path"]
    age(indexed, HOUR)  # old, but named by the index
    old = orphan(scp.root, HOUR)
    young = orphan(scp.root, 10.0)  # maybe a store between rename and commit
    names = [str(path.relative_to(scp.root)) for path in (indexed, old, young)]
    removed = await scp.server.sweep_orphans(names)  # answered without success, all three
    assert removed == 1
    assert not old.exists()
    assert indexed.exists()
    assert young.exists()
    assert temp_files(scp.root) == []
    assert (scp.metrics.sample("qantara_dicom_orphans_removed_total") or 0.0) >= 1


async def test_files_no_row_names_found_at_start_are_kept_and_counted(
    module_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A crash between link and commit, or a database restored from an older backup: the file
    # cannot tell which, and in the second case its modality was told it is safe.
    root = tmp_path / "store"
    left = orphan(root, HOUR)
    leftover_temp = root / "tmp" / f"{secrets.token_hex(16)}.part"
    leftover_temp.parent.mkdir(parents=True)
    leftover_temp.write_bytes(b"cut")
    age(leftover_temp, 2 * HOUR)
    async with running_dicom(module_dsn, root) as running:
        await wait_until(
            lambda: running.metrics.sample("qantara_dicom_unindexed_files") == 1, timeout=10
        )
    assert left.exists()
    assert not leftover_temp.exists()
    assert "qantara dicom reindex" in caplog.text


async def test_more_unindexed_files_than_a_crash_leaves_are_an_error_naming_a_restore(
    module_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    left = [orphan(root, HOUR) for _ in range(STARTUP_ORPHAN_LIMIT + 1)]
    async with running_dicom(module_dsn, root) as running:
        await wait_until(
            lambda: running.metrics.sample("qantara_dicom_unindexed_files") == len(left),
            timeout=30,
        )
    assert all(path.exists() for path in left)
    [record] = [r for r in caplog.records if "no index row names" in r.getMessage()]
    assert record.levelname == "ERROR"
    assert "restored" in record.getMessage()


async def test_the_unindexed_count_falls_as_kept_files_go(module_dsn: str, tmp_path: Path) -> None:
    root = tmp_path / "store"
    left = [orphan(root, HOUR) for _ in range(2)]
    settings = DicomSettings(sweep_interval=0.2)
    async with running_dicom(module_dsn, root, settings) as running:
        await wait_until(
            lambda: running.metrics.sample("qantara_dicom_unindexed_files") == 2, timeout=10
        )
        left[0].unlink()
        await wait_until(
            lambda: running.metrics.sample("qantara_dicom_unindexed_files") == 1, timeout=10
        )


async def test_a_kept_file_answered_without_success_again_is_still_kept(
    module_dsn: str, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    left = orphan(root, HOUR)
    async with running_dicom(module_dsn, root) as running:
        await wait_until(
            lambda: running.metrics.sample("qantara_dicom_unindexed_files") == 1, timeout=10
        )
        assert await running.server.sweep_orphans([str(left.relative_to(root))]) == 0
    assert left.exists()


async def test_start_up_scan_rests_three_times_as_long_as_it_works(
    module_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    for top in ("00", "01", "02", "03"):
        (root / top).mkdir(parents=True)
    scan = FileStore.orphans_in
    calls: list[tuple[float, float]] = []

    def slow_scan(store_: FileStore, *args: object) -> list[str]:
        began = time.monotonic()
        time.sleep(0.05)  # a top folder of a large store
        found = scan(store_, *args)  # type: ignore[arg-type]
        calls.append((began, time.monotonic()))
        return found

    monkeypatch.setattr(FileStore, "orphans_in", slow_scan)
    async with running_dicom(module_dsn, root):
        await wait_until(lambda: len(calls) == 4, timeout=10)
    for (began, ended), (next_began, _) in itertools.pairwise(calls):
        assert next_began - ended >= 0.9 * 3 * (ended - began)


async def test_stopping_does_not_wait_for_the_start_up_scan_to_end(
    module_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    for top in range(256):
        (root / f"{top:02x}").mkdir(parents=True)
    scan = FileStore.orphans_in
    scanned: list[str] = []

    def slow_scan(store_: FileStore, top: str, *args: object) -> list[str]:
        time.sleep(0.05)  # 256 of them: 13 s of work
        scanned.append(top)
        return scan(store_, top, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FileStore, "orphans_in", slow_scan)
    async with running_dicom(module_dsn, root):
        await wait_until(lambda: len(scanned) >= 2, timeout=10)
    at_stop = len(scanned)
    await asyncio.sleep(0.5)  # a scan going on in a thread would have done 10 folders more
    assert len(scanned) <= at_stop + 1  # the folder being scanned at the stop, at most


def test_quarantine_puts_back_a_file_a_store_has_just_placed(tmp_path: Path) -> None:
    store_ = FileStore(tmp_path)
    store_.open()
    fresh_copy = orphan(store_.root, 0.0)  # a resend of the same bytes has just renamed it there
    relative = str(fresh_copy.relative_to(store_.root))
    assert store_.quarantine(relative, older_than=600.0) is None
    assert fresh_copy.exists()
    stale = orphan(store_.root, HOUR)
    aside = store_.quarantine(str(stale.relative_to(store_.root)), older_than=600.0)
    assert aside is not None
    assert not stale.exists()
    store_.restore(aside, str(stale.relative_to(store_.root)))
    assert stale.exists()


def orphans(store: FileStore, older_than: float, newer_than: float | None = None) -> list[str]:
    """The whole store's candidates, a top-level folder at a time, as the listener's scan goes."""
    return [
        relative
        for top in store.tops()
        for relative in store.orphans_in(top, older_than, newer_than)
    ]


def test_orphan_scan_does_not_look_into_folders_unchanged_since_the_lookback(
    tmp_path: Path,
) -> None:
    store_ = FileStore(tmp_path)
    store_.open()
    inside = orphan(store_.root, HOUR)
    age(inside.parent, 3 * HOUR)  # as if nothing had been linked there for three hours
    assert orphans(store_, older_than=600.0, newer_than=2 * HOUR) == []
    assert orphans(store_, older_than=600.0) == [str(inside.relative_to(store_.root))]


def test_orphan_scan_finds_a_file_linked_into_an_old_folder(tmp_path: Path) -> None:
    store_ = FileStore(tmp_path)
    store_.open()
    neighbour = orphan(store_.root, 3 * HOUR)
    age(neighbour.parent, 3 * HOUR)
    stored = commit(store_, neighbour.parent.parent.name + neighbour.parent.name)
    linked = store_.root / stored.relative
    assert linked.parent == neighbour.parent
    age(linked, HOUR)
    assert orphans(store_, older_than=600.0, newer_than=2 * HOUR) == [stored.relative]


def test_orphan_candidates_are_final_names_only(tmp_path: Path) -> None:
    store_ = FileStore(tmp_path)
    store_.open()
    old = orphan(store_.root, HOUR)
    (store_.root / "notes.txt").write_text("not ours")
    (store_.root / "tmp" / "x.part").write_bytes(b"")
    found = orphans(store_, older_than=600.0, newer_than=2 * HOUR)
    assert found == [str(old.relative_to(store_.root))]
    assert orphans(store_, older_than=600.0, newer_than=60.0) == []
