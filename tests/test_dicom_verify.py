"""`qantara dicom verify`: every indexed file read back and compared with its index row."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
import socket
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom.filestore import FileStore, content_name
from dicom.verify import (
    Checked,
    Damage,
    Finding,
    Pacer,
    Page,
    Row,
    Summary,
    Verifier,
    check_file,
)
from storage.dicom_queries import IndexedFile, file_of, files_to_verify
from tests.dicom_support import RunningDicom, instance_row, running_dicom, store
from tests.services_support import wait_until
from tests.test_cli import qantara
from tests.test_dicom_store import fresh

BUFFER = bytearray(64 * 1024)


def placed(root: Path, data: bytes, instance_id: int = 1) -> IndexedFile:
    """`data` under its content name in the store at `root`, and the row that names it."""
    sha = hashlib.sha256(data).digest()
    path = root / content_name(sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return IndexedFile(
        instance_id, f"1.2.3.{instance_id}", "1.2.3", content_name(sha), len(data), sha
    )


def checked(root: Path, indexed: IndexedFile) -> Checked:
    return check_file(FileStore(root), indexed, BUFFER)


# --- one file -----------------------------------------------------------------------------------


def test_a_file_as_indexed_is_intact_and_read_whole(tmp_path: Path) -> None:
    data = secrets.token_bytes(200_000)  # more than the buffer: read in several pieces
    result = checked(tmp_path, placed(tmp_path, data))
    assert result == Checked(None, read=len(data))


def test_a_file_that_is_gone_is_missing(tmp_path: Path) -> None:
    indexed = placed(tmp_path, b"DICM" * 100)
    (tmp_path / indexed.file_path).unlink()
    assert checked(tmp_path, indexed).damage is Damage.MISSING


def test_a_file_cut_short_is_of_the_wrong_size_and_not_read(tmp_path: Path) -> None:
    indexed = placed(tmp_path, b"DICM" * 100)
    os.truncate(tmp_path / indexed.file_path, 10)
    result = checked(tmp_path, indexed)
    assert (result.damage, result.detail, result.read) == (Damage.SIZE, "10 bytes, indexed 400", 0)


def test_a_file_with_one_byte_changed_is_corrupt(tmp_path: Path) -> None:
    indexed = placed(tmp_path, b"DICM" * 100)
    path = tmp_path / indexed.file_path
    data = bytearray(path.read_bytes())
    data[123] ^= 0x01
    path.write_bytes(bytes(data))
    result = checked(tmp_path, indexed)
    assert (result.damage, result.detail) == (Damage.CORRUPT, "SHA-256 differs")


def test_a_row_whose_path_is_not_its_content_name_is_misnamed_and_nothing_is_read(
    tmp_path: Path,
) -> None:
    indexed = placed(tmp_path, b"DICM" * 100)
    other = IndexedFile(1, "1.2.3.1", "1.2.3", "../../etc/passwd", indexed.size, indexed.sha256)
    result = checked(tmp_path, other)
    assert (result.damage, result.read) == (Damage.MISNAMED, 0)


def test_a_content_name_that_leads_out_of_the_store_is_misnamed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    indexed = placed(tmp_path / "elsewhere", b"DICM" * 100)
    link = root / indexed.file_path
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "elsewhere" / indexed.file_path)
    assert checked(root, indexed).damage is Damage.MISNAMED


def test_a_file_that_cannot_be_opened_is_unreadable(tmp_path: Path) -> None:
    indexed = placed(tmp_path, b"DICM" * 100)
    path = tmp_path / indexed.file_path
    path.unlink()
    path.symlink_to(path)  # a loop: no file can be opened there
    result = checked(tmp_path, indexed)
    assert result.damage is Damage.UNREADABLE
    assert result.detail


# --- pacing -------------------------------------------------------------------------------------


def test_without_a_rate_nothing_pauses() -> None:
    assert Pacer(0.0, start=100.0).pause_after(10**9, now=100.0) == 0.0


def test_a_rate_pauses_until_the_bytes_read_fit_it() -> None:
    pacer = Pacer(1_000_000.0, start=100.0)
    assert pacer.pause_after(500_000, now=100.1) == pytest.approx(0.4)
    assert pacer.pause_after(500_000, now=100.5) == pytest.approx(0.5)
    assert pacer.pause_after(0, now=102.0) == 0.0


# --- the walk over the index --------------------------------------------------------------------


def rows_from(files: list[IndexedFile]) -> tuple[Page, Row]:
    """`Verifier`'s two callbacks over a fixed list of rows."""

    async def page(after: int, limit: int) -> list[IndexedFile]:
        return [f for f in files if f.id > after][:limit]

    async def row(instance: int) -> IndexedFile | None:
        return next((f for f in files if f.id == instance), None)

    return page, row


async def test_every_row_is_checked_a_page_at_a_time_and_damage_reported_once(
    tmp_path: Path,
) -> None:
    files = [placed(tmp_path, f"instance {i}".encode() * 50, i) for i in range(1, 8)]
    (tmp_path / files[2].file_path).unlink()
    page, row = rows_from(files)
    found: list[Finding] = []
    verifier = Verifier(FileStore(tmp_path), page, row, recheck_after=0.0, page_size=3)
    summary = await verifier.run(0, found.append)
    assert [(f.file.id, f.damage) for f in found] == [(3, Damage.MISSING)]
    assert (summary.checked, summary.damaged, summary.last_id) == (7, 1, 7)
    assert summary.results == {"intact": 6, "missing": 1}


async def test_a_run_resumed_after_an_id_checks_only_the_rows_after_it(tmp_path: Path) -> None:
    files = [placed(tmp_path, f"instance {i}".encode() * 50, i) for i in range(1, 6)]
    page, row = rows_from(files)
    verifier = Verifier(FileStore(tmp_path), page, row)
    summary = await verifier.run(3, lambda f: None)
    assert (summary.checked, summary.last_id) == (2, 5)


async def test_a_file_mended_before_the_second_look_is_not_reported(tmp_path: Path) -> None:
    data = b"DICM" * 100
    indexed = placed(tmp_path, data)
    (tmp_path / indexed.file_path).unlink()

    async def page(after: int, limit: int) -> list[IndexedFile]:
        return [indexed] if after < indexed.id else []

    async def row(instance: int) -> IndexedFile | None:
        placed(tmp_path, data)  # a resend of the same bytes, during the pause
        return indexed

    found: list[Finding] = []
    summary = await Verifier(FileStore(tmp_path), page, row, recheck_after=0.0).run(0, found.append)
    assert found == []
    assert summary.results == {"intact": 1}


async def test_a_row_gone_before_the_second_look_is_neither_intact_nor_damaged(
    tmp_path: Path,
) -> None:
    indexed = placed(tmp_path, b"DICM" * 100)
    (tmp_path / indexed.file_path).unlink()

    async def page(after: int, limit: int) -> list[IndexedFile]:
        return [indexed] if after < indexed.id else []

    async def row(instance: int) -> IndexedFile | None:
        return None

    summary = await Verifier(FileStore(tmp_path), page, row, recheck_after=0.0).run(0, print)
    assert (summary.checked, summary.last_id) == (0, indexed.id)


# --- against the index of a running listener ----------------------------------------------------


@pytest.fixture
async def scp(fresh_dsn: str, tmp_path: Path) -> AsyncIterator[RunningDicom]:
    async with running_dicom(fresh_dsn, tmp_path / "store") as running:
        yield running


async def stored(scp: RunningDicom, count: int) -> list[IndexedFile]:
    datasets = [fresh() for _ in range(count)]
    statuses = await asyncio.to_thread(store, scp.port, datasets)
    assert statuses == [0] * count
    rows = [await instance_row(scp.pool, str(ds.SOPInstanceUID)) for ds in datasets]
    found = [await file_of(scp.pool, r["id"]) for r in rows]
    assert all(found)
    return [f for f in found if f is not None]


async def verify_index(scp: RunningDicom) -> tuple[list[Finding], Summary]:
    found: list[Finding] = []
    verifier = Verifier(
        FileStore(scp.root),
        lambda after, limit: files_to_verify(scp.pool, after, None, limit),
        lambda instance: file_of(scp.pool, instance),
        recheck_after=0.0,
    )
    return found, await verifier.run(0, found.append)


async def test_instances_stored_by_the_listener_are_found_intact(scp: RunningDicom) -> None:
    files = await stored(scp, 3)
    found, summary = await verify_index(scp)
    assert found == []
    assert summary.results == {"intact": 3}
    assert summary.bytes_read == sum(f.size for f in files)


async def test_a_resend_of_the_same_instance_puts_its_missing_file_back(scp: RunningDicom) -> None:
    ds = fresh()
    assert await asyncio.to_thread(store, scp.port, [ds]) == [0]
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    (scp.root / row["file_path"]).unlink()
    found, _ = await verify_index(scp)
    assert [f.damage for f in found] == [Damage.MISSING]
    assert await asyncio.to_thread(store, scp.port, [ds]) == [0]
    found, summary = await verify_index(scp)
    assert found == []
    assert summary.results == {"intact": 1}


async def test_a_resend_of_the_same_instance_replaces_its_corrupt_file(scp: RunningDicom) -> None:
    ds = fresh()
    assert await asyncio.to_thread(store, scp.port, [ds]) == [0]
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    path = scp.root / row["file_path"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    found, _ = await verify_index(scp)
    assert [f.damage for f in found] == [Damage.CORRUPT]
    assert await asyncio.to_thread(store, scp.port, [ds]) == [0]
    found, _ = await verify_index(scp)
    assert found == []


async def test_since_limits_the_check_to_instances_received_from_then(scp: RunningDicom) -> None:
    await stored(scp, 2)
    later = await scp.pool.fetchval(
        "SELECT max(received_at) + interval '1 second' FROM dicom_instance"
    )
    assert await files_to_verify(scp.pool, 0, later, 100) == []
    earlier = await scp.pool.fetchval("SELECT min(received_at) FROM dicom_instance")
    assert len(await files_to_verify(scp.pool, 0, earlier, 100)) == 2


# --- the command ---------------------------------------------------------------------------------


def verify_command(dsn: str, root: Path, *args: str) -> tuple[int, list[str], str]:
    env = {"QANTARA_DATABASE_URL": dsn, "QANTARA_DICOM_STORAGE": str(root)}
    result = qantara("dicom", "verify", *args, env=env)
    return result.returncode, result.stdout.splitlines(), result.stderr


async def test_the_command_exits_0_when_every_file_is_intact(
    scp: RunningDicom, fresh_dsn: str
) -> None:
    await stored(scp, 2)
    code, lines, stderr = await asyncio.to_thread(verify_command, fresh_dsn, scp.root)
    assert code == 0, stderr
    assert lines[-1].startswith("checked 2 instances (")
    assert ": 2 intact; last instance id " in lines[-1]


async def test_the_command_lists_each_damaged_instance_by_its_uids_and_exits_1(
    scp: RunningDicom, fresh_dsn: str
) -> None:
    files = await stored(scp, 3)
    (scp.root / files[1].file_path).unlink()
    code, lines, _ = await asyncio.to_thread(verify_command, fresh_dsn, scp.root)
    assert code == 1
    assert lines[0] == (
        f"missing: instance {files[1].id}, SOP Instance UID {files[1].sop_instance_uid}, study "
        f"{files[1].study_uid}, file {files[1].file_path}: no file"
    )
    assert ": 2 intact, 1 missing; " in lines[-1]


async def test_the_command_names_no_patient(scp: RunningDicom, fresh_dsn: str) -> None:
    ds = fresh()
    ds.PatientName = "بنعلي^فاطمة"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientID = "CIN-AB123456"
    assert await asyncio.to_thread(store, scp.port, [ds]) == [0]
    row = await instance_row(scp.pool, str(ds.SOPInstanceUID))
    (scp.root / row["file_path"]).unlink()
    code, lines, stderr = await asyncio.to_thread(verify_command, fresh_dsn, scp.root)
    assert code == 1
    output = "\n".join(lines) + stderr
    assert f"SOP Instance UID {ds.SOPInstanceUID}," in lines[0]
    assert "فاطمة" not in output
    assert "AB123456" not in output


async def test_the_command_writes_its_result_as_metrics_for_the_textfile_collector(
    scp: RunningDicom, fresh_dsn: str, tmp_path: Path
) -> None:
    files = await stored(scp, 2)
    os.truncate(scp.root / files[0].file_path, 100)
    textfile = tmp_path / "qantara_verify.prom"
    code, _, _ = await asyncio.to_thread(
        verify_command, fresh_dsn, scp.root, "--textfile", str(textfile)
    )
    assert code == 1
    samples = {
        (s.name, s.labels.get("result")): s.value
        for family in text_string_to_metric_families(textfile.read_text())
        for s in family.samples
    }
    assert samples[("qantara_dicom_verify_instances", "intact")] == 1
    assert samples[("qantara_dicom_verify_instances", "size")] == 1
    assert samples[("qantara_dicom_verify_instances", "corrupt")] == 0
    assert samples[("qantara_dicom_verify_completion_timestamp_seconds", None)] > 0
    assert all(
        s.labels["scope"] == "all"
        for family in text_string_to_metric_families(textfile.read_text())
        for s in family.samples
    )


async def test_the_command_with_since_or_after_id_reports_a_partial_scope(
    scp: RunningDicom, fresh_dsn: str, tmp_path: Path
) -> None:
    await stored(scp, 1)
    textfile = tmp_path / "recent.prom"
    code, lines, stderr = await asyncio.to_thread(
        verify_command, fresh_dsn, scp.root, "--since", "2d", "--textfile", str(textfile)
    )
    assert code == 0, stderr
    assert lines[-1].startswith("checked 1 instance (")
    assert 'scope="partial"' in textfile.read_text()


def test_the_command_refuses_a_store_folder_that_does_not_exist(
    fresh_dsn: str, tmp_path: Path
) -> None:
    code, _, stderr = verify_command(fresh_dsn, tmp_path / "nowhere")
    assert code == 2
    assert "QANTARA_DICOM_STORAGE" in stderr


def test_the_command_refuses_a_store_whose_volume_s_mount_check_file_is_missing(
    fresh_dsn: str, tmp_path: Path
) -> None:
    env = {
        "QANTARA_DATABASE_URL": fresh_dsn,
        "QANTARA_DICOM_STORAGE": str(tmp_path),  # the mount point, its volume not mounted
        "QANTARA_DICOM_STORAGE_CHECK_FILE": ".volume",
    }
    for command in ("verify", "reindex"):
        result = qantara("dicom", command, env=env)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"qantara: configuration error: QANTARA_DICOM_STORAGE_CHECK_FILE: "
            f"{tmp_path / '.volume'} does not exist: is the DICOM store's volume mounted?"
        )


@pytest.mark.parametrize("since", ["yesterday", "7w", "2026-13-01"])
def test_the_command_refuses_a_since_it_cannot_read(since: str) -> None:
    result = qantara("dicom", "verify", "--since", since)
    assert result.returncode == 2
    assert "--since" in result.stderr


def test_the_command_without_a_database_exits_3(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code, _, stderr = verify_command(f"postgresql://postgres@127.0.0.1:{port}/none", tmp_path)
    assert code == 3
    assert "database unavailable" in stderr


async def test_an_interrupted_run_says_where_to_resume(scp: RunningDicom, fresh_dsn: str) -> None:
    await stored(scp, 1)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")},
        "QANTARA_DATABASE_URL": fresh_dsn,
        "QANTARA_DICOM_STORAGE": str(scp.root),
    }
    command = [sys.executable, "-m", "gateway.cli", "dicom", "verify", "--rate", "0.000001"]
    process = await asyncio.create_subprocess_exec(*command, env=env, stdout=PIPE, stderr=PIPE)
    try:

        async def walking() -> bool:  # its first page read: in the walk, soon in its pause
            return bool(
                await scp.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE '%ORDER BY i.id LIMIT%'"
                    " AND query NOT LIKE '%pg_stat_activity%'"
                )
            )

        await wait_until(walking, timeout=30, message="the command never read the index")
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130
    assert "resume with --after-id 0" in stderr.decode()
