"""Plain SQL migrations (`storage/sql/NNNN_name.sql`), applied in order under an advisory lock.

Replicas may start together: the lock makes one of them apply what is pending while the others
wait, then find nothing left to do. Each file runs in its own transaction with its record row.
An applied file whose text changed is refused: migrations are append-only.

Once the group roles of `storage/roles.py` exist, migrations run as the owner role (`SET ROLE`)
and the writer's and reader's grants (`storage/sql/privileges.sql`) are applied again after
them: a migration adds its tables, privileges.sql says who may touch them.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from storage.roles import GroupRoles, apply_privileges, assume_owner, reset_role, roles_in_use

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


async def apply_migrations(
    conn: asyncpg.Connection,
    roles: GroupRoles | None = None,
    *,
    grant: bool = False,
) -> list[Migration]:
    """Apply pending migrations; return those applied now (empty when up to date).

    With `roles` set up in this database (`roles_in_use`), migrations run under
    `SET ROLE roles.owner` (so the owner role owns what they create) and the grants of
    `storage/sql/privileges.sql` are applied again after any migration, or always with `grant`.
    A user that is not a member of the owner role may only find nothing pending (a runtime role
    at serve start): otherwise `MigrationError` says which migrations wait and how to apply them.
    Nothing is created when nothing is pending, so a role without DDL rights may call this.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    as_owner = False
    try:
        applied = await _applied(conn)
        known = available_migrations()
        _check_history(applied, known)
        pending = [m for m in known if m.version not in applied]
        if roles is not None and await roles_in_use(conn, roles):
            as_owner = await assume_owner(conn, roles)
            if not as_owner and pending:
                raise MigrationError(
                    f"{describe_pending(pending)} pending and the database user "
                    f"{await _session_user(conn)} may not apply them (not a member of "
                    f"{roles.owner}): run `qantara migrate` with QANTARA_MIGRATE_DATABASE_URL "
                    "(docs/operations.md, Database roles)"
                )
        if not pending and not (as_owner and grant):
            return []
        try:
            done = await _apply(conn, pending)
            if roles is not None and as_owner and (done or grant):
                await apply_privileges(conn, roles)
        except asyncpg.InsufficientPrivilegeError as exc:
            user = await _session_user(conn)
            raise MigrationError(
                f"{describe_pending(pending)} pending and the database user {user} "
                f"may not apply them ({exc}): run `qantara migrate` with "
                "QANTARA_MIGRATE_DATABASE_URL (docs/operations.md, Database roles)"
            ) from exc
        return done
    finally:
        if as_owner:
            await reset_role(conn)
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    """Version → checksum of the migrations the database has (none before the first)."""
    if not await conn.fetchval("SELECT to_regclass('schema_migration') IS NOT NULL"):
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migration")
    return {r["version"]: r["checksum"] for r in rows}


def _check_history(applied: dict[int, str], known: list[Migration]) -> None:
    unknown = sorted(set(applied) - {m.version for m in known})
    if unknown:
        raise MigrationError(
            f"the database has migrations this release does not know: {unknown}; "
            "run a newer qantara"
        )
    for migration in known:
        if migration.version in applied and applied[migration.version] != migration.checksum:
            raise MigrationError(
                f"migration {migration.version:04d}_{migration.name} was changed after "
                "it was applied; add a new migration instead"
            )


async def _apply(conn: asyncpg.Connection, pending: list[Migration]) -> list[Migration]:
    if pending:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migration (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
    done: list[Migration] = []
    for migration in pending:
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


def describe_pending(pending: list[Migration]) -> str:
    """`2 migration(s) (0008_x, 0009_y)`: for one-line errors."""
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending[:3])
    more = f" and {len(pending) - 3} more" if len(pending) > 3 else ""
    return f"{len(pending)} migration(s) ({names}{more})"


async def _session_user(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SELECT session_user"))


async def pending_migrations(conn: asyncpg.Connection) -> list[Migration]:
    """Migrations not yet applied (all of them on an empty database)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migration') IS NOT NULL")
    applied: set[int] = set()
    if exists:
        applied = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migration")}
    return [m for m in available_migrations() if m.version not in applied]
