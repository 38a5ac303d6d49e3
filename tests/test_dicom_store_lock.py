"""The store's lock between the listeners' orphan sweeps and `qantara dicom reindex`: a sweep
never removes a file while a reindex may be committing the row that names it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from dicom.config import DicomSettings
from dicom.filestore import FileStore
from dicom.orphan_sweep import OrphanSweep
from ingest.errors import StorageUnavailable
from monitoring.metrics import Metrics
from storage.dicom_queries import indexed_files
from storage.dicom_store_lock import StoreBusy, reindexing, sweeping
from storage.migrations import apply_migrations
from tests.services_support import wait_until
from tests.test_dicom_cleanup import HOUR, orphan


@pytest.fixture
async def pool(module_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(module_dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await apply_migrations(conn)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def reindex_running(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        async with reindexing(conn, wait=5.0):
            yield conn
    finally:
        await conn.close()


async def test_sweep_rounds_of_several_replicas_hold_the_lock_together(
    pool: asyncpg.Pool,
) -> None:
    async with sweeping(pool) as first, sweeping(pool) as second:
        assert first is not None
        assert second is not None


async def test_a_sweep_round_finds_the_lock_taken_while_a_reindex_runs(
    pool: asyncpg.Pool, module_dsn: str
) -> None:
    async with reindex_running(module_dsn), sweeping(pool) as held:
        assert not held
    async with sweeping(pool) as held:
        assert held


async def test_a_second_reindex_is_refused_as_busy(module_dsn: str) -> None:
    second = await asyncpg.connect(module_dsn)
    try:
        async with reindex_running(module_dsn):
            with pytest.raises(StoreBusy, match="another `qantara dicom reindex` is running"):
                async with reindexing(second, wait=0.5):
                    pass
        async with reindexing(second, wait=0.5):  # free again once the first has ended
            pass
    finally:
        await second.close()


async def test_a_reindex_waits_for_a_sweep_round_in_progress(
    pool: asyncpg.Pool, module_dsn: str
) -> None:
    order: list[str] = []

    async def reindex() -> None:
        async with reindex_running(module_dsn):
            order.append("reindex")

    async with sweeping(pool) as check:
        assert check is not None
        waiting = asyncio.create_task(reindex())
        await asyncio.sleep(0.5)
        order.append("sweep ended")
    await asyncio.wait_for(waiting, timeout=10)
    assert order == ["sweep ended", "reindex"]


# Rounds every 0.1 s; the start-up scan looks back one minute, so it does not keep (for a
# reindex) the hour-old files these tests make.
SETTINGS = DicomSettings(orphan_age=60.0, sweep_interval=0.1, orphan_lookback=60.0)


def opened(root: Path) -> FileStore:
    store = FileStore(root)
    store.open()
    return store


def sweeper(root: Path, pool: asyncpg.Pool) -> OrphanSweep:
    return OrphanSweep(
        opened(root),
        lambda names: indexed_files(pool, names),
        SETTINGS,
        Metrics(),
        lambda: sweeping(pool),
    )


async def test_files_answered_without_success_wait_for_the_reindex_then_go(
    pool: asyncpg.Pool, module_dsn: str, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    sweep = sweeper(root, pool)
    left = orphan(root, HOUR)
    sweep.suspect(str(left.relative_to(root)))
    async with asyncio.TaskGroup() as group:
        running = group.create_task(sweep.run())
        async with reindex_running(module_dsn):
            await asyncio.sleep(0.6)  # several rounds, each skipped
            assert left.exists()
        await wait_until(lambda: not left.exists(), timeout=10)
        running.cancel()


async def test_a_round_checks_the_index_on_its_lock_s_connection(
    module_dsn: str, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    async with asyncpg.create_pool(module_dsn, min_size=1, max_size=1) as pool:
        sweep = sweeper(root, pool)  # its own check would wait for the one connection
        left = orphan(root, HOUR)
        async with asyncio.timeout(10):
            assert await sweep.sweep([str(left.relative_to(root))]) == 1
    assert not left.exists()


async def test_a_file_moved_aside_goes_back_when_the_database_goes_during_its_check(
    module_dsn: str, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    pool = await asyncpg.create_pool(module_dsn, min_size=1, max_size=2)
    checks = 0

    async def indexed_until_the_database_goes(names: list[str]) -> set[str]:
        nonlocal checks
        checks += 1
        found = await indexed_files(pool, names)
        if checks == 1:
            await pool.close()  # before the second check, the one after the move aside
        return found

    sweep = OrphanSweep(opened(root), indexed_until_the_database_goes, SETTINGS, Metrics())
    left = orphan(root, HOUR)
    sweep.suspect(str(left.relative_to(root)))
    async with asyncio.TaskGroup() as group:
        running = group.create_task(sweep.run())
        await wait_until(lambda: checks == 2, timeout=10)  # failed: the pool closed
        assert left.exists()
        assert list((root / "tmp").iterdir()) == []
        pool = await asyncpg.create_pool(module_dsn, min_size=1, max_size=2)
        try:
            await wait_until(lambda: not left.exists(), timeout=10)  # a later round
        finally:
            running.cancel()
            await pool.close()


async def test_a_reindex_whose_database_went_reports_that_not_the_lost_unlock(
    module_dsn: str,
) -> None:
    conn = await asyncpg.connect(module_dsn)

    async def reindex_losing_its_database() -> None:
        async with reindexing(conn, wait=0):
            admin = await asyncpg.connect(module_dsn)
            try:
                pid = conn.get_server_pid()
                await admin.execute("SELECT pg_terminate_backend($1)", pid)
                await wait_until(lambda: _gone(admin, pid), timeout=10, interval=0.05)
            finally:
                await admin.close()
            raise StorageUnavailable("went away")  # what the reindex's commit would say

    try:
        with pytest.raises(StorageUnavailable, match="went away"):
            await reindex_losing_its_database()
    finally:
        await conn.close()


async def _gone(admin: asyncpg.Connection, pid: int) -> bool:
    return not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
