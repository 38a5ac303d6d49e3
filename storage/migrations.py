"""Plain SQL migrations (`storage/sql/NNNN_name.sql`), applied in order under an advisory lock.

Replicas may start together: the lock makes one of them apply what is pending while the others
wait, then find nothing left to do. Each file runs in its own transaction with its record row.
An applied file whose text changed is refused: migrations are append-only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

logger = logging.getLogger(__name__)

# pg_advisory_lock key: "qantara" in ASCII, as an int8.
MIGRATION_LOCK_KEY = 0x71616E74617261
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """The database's migration history does not match the files of this release."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def available_migrations() -> list[Migration]:
    """The migrations shipped with this package, in version order."""
    found = []
    for entry in resources.files("storage").joinpath("sql").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


async def apply_migrations(conn: asyncpg.Connection) -> list[Migration]:
    """Apply pending migrations; return those applied now (empty when up to date)."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migration (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migration")
        applied = {r["version"]: r["checksum"] for r in rows}
        known = available_migrations()
        known_versions = {m.version for m in known}
        unknown = sorted(set(applied) - known_versions)
        if unknown:
            raise MigrationError(
                f"the database has migrations this release does not know: {unknown}; "
                "run a newer qantara"
            )
        done: list[Migration] = []
        for migration in known:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after "
                        "it was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migration (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            logger.info("applied migration %04d_%s", migration.version, migration.name)
            done.append(migration)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def pending_migrations(conn: asyncpg.Connection) -> list[Migration]:
    """Migrations not yet applied (all of them on an empty database)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migration') IS NOT NULL")
    applied: set[int] = set()
    if exists:
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migration")}
    return [m for m in available_migrations() if m.version not in applied]
