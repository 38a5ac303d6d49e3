"""`qantara dicom reindex`: after the database was restored from a backup older than the store,
the files no index row names are indexed again, their patients linked as on receipt."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from pydicom.dataset import Dataset

from dicom.config import DicomSettings
from dicom.filestore import FileStore, content_name
from dicom.reindex import Reindexed, Reindexer, Result, content_names_in, submitting_to
from gateway.local_services import drop_database, ensure_database
from ingest.pipeline import GroupCommitPipeline, PipelineSettings
from monitoring.metrics import Metrics
from storage.dicom_queries import indexed_files
from storage.dicom_store_lock import reindexing
from storage.migrations import apply_migrations
from storage.writer import BatchWriter
from tests.dicom_support import instance_row, running_dicom, store
from tests.services_support import wait_until
from tests.test_cli import qantara
from tests.test_dicom_store import fresh

ARABIC_NAME = "بنعلي^فاطمة"


def national(ds: Dataset, number: str = "AB123456") -> Dataset:
    """`ds` for a patient known by her national id card number: no calling AE needed."""
    ds.PatientID = number
    ds.IssuerOfPatientID = "CIN"
    del ds.OtherPatientIDsSequence  # the test file's has a bare number
    ds.PatientName = ARABIC_NAME
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


@dataclass
class Restored:
    """A store filled by a listener, and a database restored from before any of it."""

    root: Path
    pool: asyncpg.Pool
    dsn: str


@pytest.fixture
async def restored(
    fresh_dsn: str, postgres_server_dsn: str, tmp_path: Path
) -> AsyncIterator[Restored]:
    name = f"qantara_restored_{secrets.token_hex(4)}"
    dsn = await ensure_database(postgres_server_dsn, name)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn)
        yield Restored(tmp_path / "store", pool, dsn)
    finally:
        await pool.close()
        await drop_database(postgres_server_dsn, name)


async def received(fresh_dsn: str, root: Path, datasets: list[Dataset]) -> None:
    """The datasets stored by a listener on another database (the one that was lost)."""
    async with running_dicom(fresh_dsn, root) as scp:
        assert await asyncio.to_thread(store, scp.port, datasets) == [0] * len(datasets)


async def reindex(
    restored: Restored,
    calling_ae: str = "",
    dry_run: bool = False,
    older_than: float = 0.0,
    only: list[str] | None = None,
) -> list[Reindexed]:
    pipeline = GroupCommitPipeline(BatchWriter(restored.pool), PipelineSettings(), Metrics())
    done: list[Reindexed] = []
    reindexer = Reindexer(
        FileStore(restored.root),
        lambda names: indexed_files(restored.pool, names),
        None if dry_run else submitting_to(pipeline),
        calling_ae=calling_ae,
        older_than=older_than,
    )
    async with asyncio.timeout(60), asyncio.TaskGroup() as group:
        group.create_task(pipeline.run())
        try:
            await reindexer.run(done.append, only)
        finally:
            await pipeline.close()
    return done


async def test_files_no_row_names_are_indexed_with_their_patients_names_intact(
    restored: Restored, fresh_dsn: str
) -> None:
    datasets = [national(fresh()) for _ in range(3)]
    await received(fresh_dsn, restored.root, datasets)
    done = await reindex(restored)
    assert sorted(d.sop_instance_uid for d in done) == sorted(
        str(ds.SOPInstanceUID) for ds in datasets
    )
    assert {d.result for d in done} == {Result.INDEXED}
    for ds in datasets:
        row = await instance_row(restored.pool, str(ds.SOPInstanceUID))
        assert row is not None
        assert row["patient_name"] == ARABIC_NAME
        assert (restored.root / row["file_path"]).is_file()
        assert row["received_at"].timestamp() == pytest.approx(
            os.stat(restored.root / row["file_path"]).st_mtime, abs=1e-3
        )
    linked = await restored.pool.fetchval(
        "SELECT count(DISTINCT patient_id) FROM dicom_study WHERE patient_id IS NOT NULL"
    )
    assert linked == 1


async def test_a_second_run_finds_nothing_left_to_index(restored: Restored, fresh_dsn: str) -> None:
    await received(fresh_dsn, restored.root, [national(fresh())])
    assert [d.result for d in await reindex(restored)] == [Result.INDEXED]
    assert await reindex(restored) == []


async def test_a_patient_id_without_issuer_waits_for_the_sender_s_calling_ae(
    restored: Restored, fresh_dsn: str
) -> None:
    ds = fresh()  # PatientID, no issuer: a number that means something to its sender only
    await received(fresh_dsn, restored.root, [ds])
    assert [d.result for d in await reindex(restored)] == [Result.NEEDS_AE]
    assert await instance_row(restored.pool, str(ds.SOPInstanceUID)) is None
    assert [d.result for d in await reindex(restored, calling_ae="CR-UNIT-07")] == [Result.INDEXED]
    systems = await restored.pool.fetchval(
        "SELECT array_agg(system) FROM patient_identifier WHERE value = $1", str(ds.PatientID)
    )
    assert systems == ["dicom-ae/CR-UNIT-07"]


async def test_a_dry_run_commits_nothing(restored: Restored, fresh_dsn: str) -> None:
    ds = national(fresh())
    await received(fresh_dsn, restored.root, [ds])
    done = await reindex(restored, dry_run=True)
    assert [d.result for d in done] == [Result.INDEXED]
    assert await instance_row(restored.pool, str(ds.SOPInstanceUID)) is None


async def test_a_file_whose_bytes_are_not_its_name_is_left_and_reported_damaged(
    restored: Restored, fresh_dsn: str
) -> None:
    ds = national(fresh())
    await received(fresh_dsn, restored.root, [ds])
    (path,) = [p for p in restored.root.rglob("*.dcm") if p.parent.name != "tmp"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    done = await reindex(restored)
    assert [(d.result, d.detail) for d in done] == [(Result.DAMAGED, "its SHA-256 is not its name")]
    assert path.exists()


async def test_a_file_that_is_no_dicom_is_refused_and_kept(restored: Restored) -> None:
    data = b"\0" * 128 + b"DICM" + b"\x02\x00"  # a preamble, then nothing that parses
    path = restored.root / content_name(hashlib.sha256(data).digest())
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    done = await reindex(restored)
    assert [d.result for d in done] == [Result.REFUSED]
    assert path.exists()


async def test_files_younger_than_older_than_are_left_to_the_store_in_progress(
    restored: Restored, fresh_dsn: str
) -> None:
    await received(fresh_dsn, restored.root, [national(fresh())])
    assert await reindex(restored, older_than=3600.0) == []


# --- the command ---------------------------------------------------------------------------------


def reindex_command(restored: Restored, *args: str) -> tuple[int, list[str], str]:
    env = {"QANTARA_DATABASE_URL": restored.dsn, "QANTARA_DICOM_STORAGE": str(restored.root)}
    result = qantara("dicom", "reindex", "--older-than", "0", *args, env=env)
    return result.returncode, result.stdout.splitlines(), result.stderr


async def test_the_command_indexes_what_it_can_and_exits_0(
    restored: Restored, fresh_dsn: str
) -> None:
    await received(fresh_dsn, restored.root, [national(fresh()), national(fresh())])
    code, lines, stderr = await asyncio.to_thread(reindex_command, restored)
    assert code == 0, stderr
    assert lines == ["2 unindexed files: 2 indexed"]


async def test_the_command_lists_the_files_it_left_by_uid_and_exits_1(
    restored: Restored, fresh_dsn: str
) -> None:
    bare = fresh()
    bare.PatientName = ARABIC_NAME
    bare.SpecificCharacterSet = "ISO_IR 192"
    await received(fresh_dsn, restored.root, [national(fresh()), bare])
    code, lines, stderr = await asyncio.to_thread(reindex_command, restored)
    assert code == 1
    (row,) = [line for line in lines if line.startswith("needs-calling-ae: file ")]
    assert f", SOP Instance UID {bare.SOPInstanceUID}: a PatientID without issuer" in row
    assert lines[-1] == "2 unindexed files: 1 indexed, 1 needs-calling-ae"
    output = "\n".join(lines) + stderr
    assert "فاطمة" not in output
    assert str(bare.PatientID) not in output
    code, lines, _ = await asyncio.to_thread(reindex_command, restored, "--calling-ae", "CT-1")
    assert (code, lines) == (0, ["1 unindexed file: 1 indexed"])


async def test_the_command_s_dry_run_says_so_and_commits_nothing(
    restored: Restored, fresh_dsn: str
) -> None:
    ds = national(fresh())
    await received(fresh_dsn, restored.root, [ds])
    code, lines, _ = await asyncio.to_thread(reindex_command, restored, "--dry-run")
    assert code == 0
    assert lines[-1] == "1 unindexed file: 1 indexed (a dry run: nothing committed)"
    assert await instance_row(restored.pool, str(ds.SOPInstanceUID)) is None


async def test_the_command_beside_another_reindex_says_the_store_is_busy_and_exits_6(
    restored: Restored, fresh_dsn: str
) -> None:
    await received(fresh_dsn, restored.root, [national(fresh())])
    other = await asyncpg.connect(restored.dsn)
    try:
        async with reindexing(other, wait=0):
            code, lines, stderr = await asyncio.to_thread(reindex_command, restored, "--wait", "1")
    finally:
        await other.close()
    assert (code, lines) == (6, [])
    assert stderr.splitlines()[-1].startswith(
        "qantara: DICOM store busy: another `qantara dicom reindex` is running"
    )
    code, lines, _ = await asyncio.to_thread(reindex_command, restored, "--wait", "1")
    assert (code, lines) == (0, ["1 unindexed file: 1 indexed"])


@pytest.mark.parametrize("ae", ["", "A" * 17, "CR UNIT\x07"])
def test_the_command_refuses_a_calling_ae_that_is_no_ae_title(ae: str) -> None:
    result = qantara("dicom", "reindex", "--calling-ae", ae)
    assert result.returncode == 2
    assert "--calling-ae" in result.stderr


async def test_a_reindex_clears_what_the_listener_reported_unindexed(
    restored: Restored, fresh_dsn: str
) -> None:
    await received(fresh_dsn, restored.root, [national(fresh())])
    for path in restored.root.rglob("*.dcm"):
        then = os.stat(path).st_mtime - 3600  # older than the scan's orphan_age
        os.utime(path, (then, then))
    settings = DicomSettings(sweep_interval=0.2)
    async with running_dicom(restored.dsn, restored.root, settings) as scp:

        def unindexed() -> float | None:
            return scp.metrics.sample("qantara_dicom_unindexed_files")

        await wait_until(lambda: unindexed() == 1, timeout=10)
        reindexer = Reindexer(
            FileStore(restored.root),
            lambda names: indexed_files(scp.pool, names),
            submitting_to(scp.pipeline),
            older_than=0.0,
        )
        done = await reindexer.run(lambda _: None)
        assert done == {Result.INDEXED: 1}
        await wait_until(lambda: unindexed() == 0, timeout=10)


def test_content_names_are_found_in_a_list_or_in_the_command_s_own_lines() -> None:
    name = "ab/cd/" + "abcd" + "0" * 60 + ".dcm"
    other = "01/23/" + "0123" + "f" * 60 + ".dcm"
    text = (
        f"needs-calling-ae: file {name}, SOP Instance UID 1.2.3: a PatientID without issuer\n"
        f"{other}\n"
        "ab/cd/not-a-digest.dcm\n../../etc/passwd\n"
    )
    assert content_names_in(text) == [name, other]


async def test_only_the_files_named_take_the_calling_ae_given(
    restored: Restored, fresh_dsn: str
) -> None:
    first, second = fresh(), fresh()  # bare PatientIDs of two different senders
    await received(fresh_dsn, restored.root, [first, second])
    waiting = await reindex(restored)
    assert [d.result for d in waiting] == [Result.NEEDS_AE, Result.NEEDS_AE]
    (mine,) = [d.file_path for d in waiting if d.sop_instance_uid == str(first.SOPInstanceUID)]
    done = await reindex(restored, calling_ae="CT-1", only=[mine])
    assert [d.result for d in done] == [Result.INDEXED]
    assert await instance_row(restored.pool, str(first.SOPInstanceUID)) is not None
    assert await instance_row(restored.pool, str(second.SOPInstanceUID)) is None


async def test_the_command_indexes_one_sender_s_files_named_by_its_earlier_lines(
    restored: Restored, fresh_dsn: str, tmp_path: Path
) -> None:
    first, second = fresh(), fresh()
    await received(fresh_dsn, restored.root, [first, second])
    code, lines, _ = await asyncio.to_thread(reindex_command, restored)
    assert code == 1
    picked = tmp_path / "ct-1.txt"
    picked.write_text("\n".join(line for line in lines if str(first.SOPInstanceUID) in line))
    code, lines, stderr = await asyncio.to_thread(
        reindex_command, restored, "--calling-ae", "CT-1", "--files", str(picked)
    )
    assert (code, lines) == (0, ["1 unindexed file: 1 indexed"]), stderr
    code, lines, _ = await asyncio.to_thread(reindex_command, restored)
    assert (code, lines[-1]) == (1, "1 unindexed file: 1 needs-calling-ae")


def test_the_command_refuses_a_files_list_that_names_no_file(tmp_path: Path) -> None:
    empty = tmp_path / "none.txt"
    empty.write_text("nothing here\n")
    store = tmp_path / "store"
    store.mkdir()
    env = {"QANTARA_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    env["QANTARA_DICOM_STORAGE"] = str(store)
    result = qantara("dicom", "reindex", "--files", str(empty), env=env)
    assert result.returncode == 2
    assert "--files" in result.stderr
