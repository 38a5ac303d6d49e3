"""PostgreSQL roles of least privilege: who owns the schema, who writes, who reads.

Three group roles (NOLOGIN), named `<prefix>_owner`, `<prefix>_writer`, `<prefix>_reader`
(prefix `qantara` unless `QANTARA_DB_ROLE_PREFIX` says otherwise):

- owner: owns every table, sequence and function of the schema. Migrations run as a login role
  that is a member of it, under `SET ROLE`, so every object they create belongs to the group role
  and not to whoever happened to run them.
- writer: the gateway's runtime (ingest, partition upkeep, tokens); `storage/sql/privileges.sql`
  lists its grants table by table.
- reader: the HTTP API (searches, token lookup, audit trail).

`create_group_roles` needs CREATEROLE (the admin user of a managed PostgreSQL has it; no
SUPERUSER is needed) and the right to grant on the schema (the database owner has it). Role names
are cluster-wide, privileges per database: one set of roles may serve several databases.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import asyncpg

_PREFIX = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
SCRAM_ITERATIONS = 4096


class RoleError(Exception):
    """A role operation the connected user may not perform; the message says what to do."""


@dataclass(frozen=True, slots=True)
class GroupRoles:
    owner: str
    writer: str
    reader: str

    @classmethod
    def with_prefix(cls, prefix: str) -> GroupRoles:
        if not _PREFIX.match(prefix):
            raise ValueError(prefix)
        return cls(f"{prefix}_owner", f"{prefix}_writer", f"{prefix}_reader")

    @property
    def names(self) -> tuple[str, str, str]:
        return (self.owner, self.writer, self.reader)


@dataclass(frozen=True, slots=True)
class SetupReport:
    """What `create_group_roles` did."""

    created: tuple[str, ...]
    reassigned: tuple[str, ...]


def privileges_sql() -> str:
    """The grants of the writer and reader roles (storage/sql/privileges.sql)."""
    return resources.files("storage").joinpath("sql", "privileges.sql").read_text(encoding="utf-8")


async def roles_in_use(conn: asyncpg.Connection, roles: GroupRoles) -> bool:
    """True when this database was set up by `create_group_roles` (not merely the cluster).

    Role names are cluster-wide: another database of the cluster may use them while this one
    still runs with a single user. The owner role's CREATE on the schema is what marks this one.
    """
    found = await conn.fetchval(
        "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])", list(roles.names)
    )
    if int(found) != len(roles.names):
        return False
    return bool(
        await conn.fetchval(
            "SELECT has_schema_privilege($1, current_schema(), 'CREATE')", roles.owner
        )
    )


async def assume_owner(conn: asyncpg.Connection, roles: GroupRoles) -> bool:
    """`SET ROLE` to the owner role; False when the session's user is not a member of it."""
    try:
        await _execute_formatted(conn, "SET ROLE %I", roles.owner)
    except asyncpg.InsufficientPrivilegeError:
        return False
    return True


async def reset_role(conn: asyncpg.Connection) -> None:
    await conn.execute("RESET ROLE")


async def apply_privileges(conn: asyncpg.Connection, roles: GroupRoles) -> None:
    """Grant the writer and reader exactly what privileges.sql lists (run as the owner role)."""
    async with conn.transaction():
        for setting, value in (
            ("qantara.owner_role", roles.owner),
            ("qantara.writer_role", roles.writer),
            ("qantara.reader_role", roles.reader),
        ):
            await conn.execute("SELECT set_config($1, $2, true)", setting, value)
        await conn.execute(privileges_sql())


async def create_group_roles(conn: asyncpg.Connection, roles: GroupRoles) -> SetupReport:
    """Create the group roles if missing, hand them the schema, apply the grants. Idempotent.

    Existing objects of the schema (migrated before the roles existed) are given to the owner
    role. Runs as a user with CREATEROLE that owns the database (or a superuser).
    """
    try:
        async with conn.transaction():
            created = await _create_missing(conn, roles)
            await _grant_database_and_schema(conn, roles)
            reassigned = await _reassign_to_owner(conn, roles)
    except asyncpg.InsufficientPrivilegeError as exc:
        user = await conn.fetchval("SELECT current_user")
        raise RoleError(
            f"{exc} (as {user}: run `qantara db roles` as a user with CREATEROLE that owns "
            "the database, e.g. the admin user of a managed PostgreSQL)"
        ) from exc
    if not await assume_owner(conn, roles):
        raise RoleError(f"cannot SET ROLE {roles.owner}")
    try:
        await apply_privileges(conn, roles)
    finally:
        await reset_role(conn)
    return SetupReport(created=created, reassigned=reassigned)


async def _create_missing(conn: asyncpg.Connection, roles: GroupRoles) -> tuple[str, ...]:
    created = []
    for name in roles.names:
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name) is None:
            await _execute_formatted(
                conn, "CREATE ROLE %I NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE", name
            )
            created.append(name)
    superuser = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    member = await conn.fetchval("SELECT pg_has_role(current_user, $1, 'MEMBER')", roles.owner)
    if not superuser and not member:
        # CREATEROLE without SUPERUSER: to give objects to the owner role, and to SET ROLE to
        # it for the grants, this user must be a member of it.
        await _execute_formatted(conn, "GRANT %I TO CURRENT_USER", roles.owner)
    return tuple(created)


async def _grant_database_and_schema(conn: asyncpg.Connection, roles: GroupRoles) -> None:
    database = await conn.fetchval("SELECT current_database()")
    schema = await conn.fetchval("SELECT current_schema()")
    await _execute_formatted(
        conn, "GRANT CONNECT ON DATABASE %I TO %I, %I, %I", database, *roles.names
    )
    # qantara_ensure_partitions (SECURITY DEFINER) moves rows through a temporary table.
    await _execute_formatted(conn, "GRANT TEMPORARY ON DATABASE %I TO %I", database, roles.owner)
    await _execute_formatted(conn, "GRANT USAGE, CREATE ON SCHEMA %I TO %I", schema, roles.owner)
    await _execute_formatted(
        conn, "GRANT USAGE ON SCHEMA %I TO %I, %I", schema, roles.writer, roles.reader
    )
    # PostgreSQL 15 no longer lets PUBLIC create in `public`; older clusters upgraded in place
    # still do: only the owner role creates objects here.
    await _execute_formatted(conn, "REVOKE CREATE ON SCHEMA %I FROM PUBLIC", schema)
    # Migration 0001 turns the time-series tables into hypertables where TimescaleDB is loaded;
    # the owner role may not create that (untrusted) extension itself, so the admin does it here.
    if await conn.fetchval(
        """SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
                  AND current_setting('shared_preload_libraries') LIKE '%timescaledb%'
                  AND NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"""
    ):
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")


_FOREIGN_OWNED = """
    SELECT c.oid::regclass::text AS name,
           CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' WHEN c.relkind = 'v' THEN 'VIEW'
                WHEN c.relkind = 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END AS kind
      FROM pg_class c
     WHERE c.relnamespace = current_schema()::regnamespace
       AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
       AND c.relowner <> $1::regrole
       -- not an extension's; identity and serial sequences follow their table
       AND NOT EXISTS (SELECT 1 FROM pg_depend d
                        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                          AND (d.deptype = 'e'
                               OR (c.relkind = 'S' AND d.deptype IN ('a', 'i'))))
    UNION ALL
    SELECT p.oid::regprocedure::text, CASE WHEN p.prokind = 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END
      FROM pg_proc p
     WHERE p.pronamespace = current_schema()::regnamespace
       AND p.proowner <> $1::regrole
       AND NOT EXISTS (SELECT 1 FROM pg_depend d
                        WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                          AND d.deptype = 'e')
    ORDER BY 1
"""


async def _reassign_to_owner(conn: asyncpg.Connection, roles: GroupRoles) -> tuple[str, ...]:
    """Give the owner role what the schema holds of other owners (a migration before roles)."""
    moved = []
    for row in await conn.fetch(_FOREIGN_OWNED, roles.owner):
        # `name` is already a quoted, qualified-if-needed identifier (regclass/regprocedure).
        statement = await conn.fetchval(
            "SELECT format('ALTER %s %s OWNER TO %I', $1::text, $2::text, $3::text)",
            row["kind"],
            row["name"],
            roles.owner,
        )
        await conn.execute(statement)
        moved.append(row["name"])
    return tuple(moved)


@dataclass(frozen=True, slots=True)
class LoginResult:
    name: str
    created: bool
    superuser: bool


async def ensure_login(
    conn: asyncpg.Connection, name: str, password: str | None, groups: Sequence[str]
) -> LoginResult:
    """Create (or update the password of) login role `name`, a member of `groups`. Idempotent.

    The password travels as a SCRAM-SHA-256 verifier computed here, never in clear text, so
    statement logging cannot reveal it.
    """
    row = await conn.fetchrow("SELECT rolsuper FROM pg_roles WHERE rolname = $1", name)
    try:
        async with conn.transaction():
            verb = "CREATE" if row is None else "ALTER"
            attributes = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE" if row is None else "LOGIN"
            if password is None:
                await _execute_formatted(conn, f"{verb} ROLE %I {attributes}", name)
            else:
                await _execute_formatted(
                    conn,
                    f"{verb} ROLE %I {attributes} PASSWORD %L",
                    name,
                    password_verifier(password),
                )
            for group in groups:
                await _execute_formatted(conn, "GRANT %I TO %I", group, name)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise RoleError(f"login role {name}: {exc}") from exc
    return LoginResult(
        name=name, created=row is None, superuser=bool(row is not None and row["rolsuper"])
    )


def password_verifier(password: str) -> str:
    """What `CREATE ROLE ... PASSWORD` stores for `password` (SCRAM-SHA-256, RFC 5802/7677).

    Non-ASCII passwords would need SASLprep: those are sent as they are and hashed by the server.
    """
    if not password.isascii():
        return password
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, SCRAM_ITERATIONS)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


async def _execute_formatted(conn: asyncpg.Connection, template: str, *args: str) -> None:
    """Run a utility statement with identifiers (%I) and literals (%L) quoted by the server."""
    statement = await conn.fetchval(
        "SELECT format($1::text, VARIADIC $2::text[])", template, list(args)
    )
    await conn.execute(statement)
