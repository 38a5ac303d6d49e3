"""The lock between the DICOM listeners' orphan sweeps and `qantara dicom reindex`.

Both act on the store's files that no index row names: a sweep removes the ones its listener
answered without success (`dicom.orphan_sweep`), a reindex reads such files and commits the rows
that name them (`dicom.reindex`). Run together, a sweep could move a file aside, find it still
unindexed, and remove it just as the reindex commits its row: a row naming no file. So they
exclude each other through one PostgreSQL advisory lock, which covers every replica sharing the
database:
- each sweep round holds it shared, for its transaction: the sweeps of several replicas go on
  together; a round that finds a reindex holding it is skipped (its files wait for the next);
- a reindex holds it exclusively for its whole run, on a connection of its own: it waits for the
  rounds in progress (seconds), and refuses to start beside another reindex.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final

import asyncpg

from ingest.errors import StorageUnavailable
from storage.dicom_queries import indexed_files
from storage.pool import is_transient

STORE_LOCK_KEY: Final = 0x716E7444
"""The advisory lock's key ('qntD' as a 32-bit integer)."""
REINDEX_WAIT_SECONDS: Final = 30.0
"""How long a reindex waits for the sweeps in progress before it says the store is busy."""
_POLL_SECONDS: Final = 0.2


class StoreBusy(Exception):
    """Another reindex holds the store's lock (or sweeps held it longer than a reindex waits)."""


IndexCheck = Callable[[list[str]], Awaitable[set[str]]]
"""Which of these relative file names the index names (`dicom_queries.indexed_files`)."""


@asynccontextmanager
async def sweeping(pool: asyncpg.Pool) -> AsyncIterator[IndexCheck | None]:
    """A sweep round's hold on the lock, shared and not waited for: the index check to make
    under it, on the lock's own connection (a pool of two is not emptied by a round), until the
    block ends; None when a reindex holds the lock. A database that cannot answer is
    `StorageUnavailable`."""
    in_block = False  # what the block raises is its own, passed on as it is
    try:
        async with pool.acquire() as conn, conn.transaction():
            held = await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock_shared($1)", STORE_LOCK_KEY
            )
            in_block = True
            yield (lambda names: indexed_files(conn, names)) if held else None
            in_block = False
    except Exception as exc:
        if in_block or not is_transient(exc):
            raise
        raise StorageUnavailable(f"store lock: {type(exc).__name__}") from exc


@asynccontextmanager
async def reindexing(
    conn: asyncpg.Connection, wait: float = REINDEX_WAIT_SECONDS
) -> AsyncIterator[None]:
    """Hold the lock exclusively on `conn` (a connection of the reindex's own, not a pool's:
    closing it releases the lock whatever happens) for the block; `StoreBusy` when it is not
    free within `wait` seconds."""
    deadline = time.monotonic() + wait
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", STORE_LOCK_KEY):
        if time.monotonic() >= deadline:
            raise StoreBusy(
                "another `qantara dicom reindex` is running against this database "
                f"(or its listeners' orphan sweeps did not let go within {wait:.0f} s)"
            )
        await asyncio.sleep(_POLL_SECONDS)
    try:
        yield
    finally:
        await _unlock(conn)


async def _unlock(conn: asyncpg.Connection) -> None:
    """Let go of the lock; with the database gone, so is the lock (and what the block raised
    is what to report, not this)."""
    if conn.is_closed():
        return
    try:
        await conn.execute("SELECT pg_advisory_unlock($1)", STORE_LOCK_KEY)
    except Exception as exc:
        if not is_transient(exc):
            raise
