"""Least privilege in PostgreSQL: owner, writer and reader roles, as an operator sets them up.

A throw-away admin user with CREATEROLE and no SUPERUSER (the admin of a managed PostgreSQL) owns
this module's database and runs `qantara db roles --create-logins`; migrations run through
`qantara migrate` as the migrate login; a real `qantara serve` ingests as the runtime login and
answers the API as the reader login. Role names are cluster-wide: every role here carries a random
prefix (QANTARA_DB_ROLE_PREFIX for the group roles) and all are dropped at the end.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit
from uuid import uuid4

import aiomqtt
import asyncpg
import httpx
import pytest

from gateway.auth import issue_token
from gateway.local_services import drop_database
from storage.audit import AuditEntry, record_access
from storage.ledger import LedgerPruning, prune_ledger
from storage.migrations import apply_migrations
from storage.roles import GroupRoles, create_group_roles, ensure_login
from storage.writer import ensure_partitions
from tests.gateway_process import (
    GatewayProcess,
    broker_address,
    new_client_id,
    new_unit_id,
    vitals_payload,
)
from tests.hl7_support import MllpClient, adt, control_id, encode, new_id
from tests.services_support import wait_until

ROOT = Path(__file__).resolve().parents[1]
PRIVILEGES = ROOT / "storage" / "sql" / "privileges.sql"


@dataclass(frozen=True, slots=True)
class Cluster:
    """The roles and URLs of this module's database."""

    prefix: str
    roles: GroupRoles
    admin: str
    migrator: str
    app: str
    api: str
    server_dsn: str
    dbname: str

    def url(self, user: str, dbname: str | None = None, password: str | None = None) -> str:
        parts = urlsplit(self.server_dsn)
        host = parts.hostname or "127.0.0.1"
        credentials = quote(user) + (f":{quote(password)}" if password else "")
        netloc = f"{credentials}@{host}:{parts.port or 5432}"
        return urlunsplit(parts._replace(netloc=netloc, path="/" + (dbname or self.dbname)))

    @property
    def superuser_url(self) -> str:
        parts = urlsplit(self.server_dsn)
        return urlunsplit(parts._replace(path="/" + self.dbname))

    def env(self, dbname: str | None = None) -> dict[str, str]:
        """What an operator sets: four URLs (passwords are ignored by trust auth) and the prefix."""
        return {
            "QANTARA_DB_ROLE_PREFIX": self.prefix,
            "QANTARA_ADMIN_DATABASE_URL": self.url(self.admin, dbname, "admin-secret"),
            "QANTARA_MIGRATE_DATABASE_URL": self.url(self.migrator, dbname, "migrate-secret"),
            "QANTARA_DATABASE_URL": self.url(self.app, dbname, "app-secret"),
            "QANTARA_API_DATABASE_URL": self.url(self.api, dbname, "api-secret"),
        }


def qantara(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


async def _run(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(qantara, *args, env=env)


async def _create_database(server_dsn: str, dbname: str, owner: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{dbname}" OWNER "{owner}"')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def cluster(postgres_server_dsn: str) -> AsyncIterator[Cluster]:
    prefix = f"qt{secrets.token_hex(4)}"
    setup = Cluster(
        prefix=prefix,
        roles=GroupRoles.with_prefix(prefix),
        admin=f"{prefix}_admin",
        migrator=f"{prefix}_migrate",
        app=f"{prefix}_app",
        api=f"{prefix}_api",
        server_dsn=postgres_server_dsn,
        dbname=f"qantara_test_{prefix}",
    )
    conn = await asyncpg.connect(postgres_server_dsn)
    try:
        await conn.execute(f'CREATE ROLE "{setup.admin}" LOGIN CREATEROLE NOSUPERUSER')
    finally:
        await conn.close()
    await _create_database(postgres_server_dsn, setup.dbname, setup.admin)
    try:
        roles = await _run("db", "roles", "--create-logins", env=setup.env())
        assert roles.returncode == 0, roles.stdout + roles.stderr
        migrated = await _run("migrate", env=setup.env())
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        yield setup
    finally:
        await drop_database(postgres_server_dsn, setup.dbname)
        for suffix in ("_legacy", "_pending", "_serve", "_single"):
            await drop_database(postgres_server_dsn, setup.dbname + suffix)
        conn = await asyncpg.connect(postgres_server_dsn)
        try:
            for name in (
                setup.migrator,
                setup.app,
                setup.api,
                *setup.roles.names,
                setup.admin,
            ):
                await conn.execute(f'DROP ROLE IF EXISTS "{name}"')
        finally:
            await conn.close()


@asynccontextmanager
async def _connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def as_app(cluster: Cluster) -> AsyncIterator[asyncpg.Connection]:
    async with _connected(cluster.url(cluster.app)) as conn:
        yield conn


@pytest.fixture
async def as_api(cluster: Cluster) -> AsyncIterator[asyncpg.Connection]:
    async with _connected(cluster.url(cluster.api)) as conn:
        yield conn


@pytest.fixture
async def as_superuser(cluster: Cluster) -> AsyncIterator[asyncpg.Connection]:
    async with _connected(cluster.superuser_url) as conn:
        yield conn


@pytest.fixture(scope="module")
async def gateway(cluster: Cluster, mqtt_url: str) -> AsyncIterator[GatewayProcess]:
    """`qantara serve` as the runtime login (ingest) and the reader login (API); no migrate URL."""
    env = cluster.env()
    del env["QANTARA_MIGRATE_DATABASE_URL"], env["QANTARA_ADMIN_DATABASE_URL"]
    process = GatewayProcess(
        database_url=env.pop("QANTARA_DATABASE_URL"),
        mqtt_url=mqtt_url,
        client_id=new_client_id(),
        env=env,
    )
    async with process:
        await process.wait_ready()
        yield process
        refused = [line for line in process.log_lines if "permission denied" in line]
    # Background work too (partition upkeep, DICOM sweeps, readiness) ran as these roles.
    assert not refused, "\n".join(refused)


def _port(gateway: GatewayProcess, listener: str) -> int:
    pattern = re.compile(rf"listening {listener}=\S+:(\d+)")
    for line in gateway.log_lines:
        if match := pattern.search(line):
            return int(match.group(1))
    raise AssertionError(f"no 'listening {listener}=' line\n{gateway.log_tail()}")


def _privileges_tables() -> set[str]:
    text = PRIVILEGES.read_text(encoding="utf-8")
    block = text.split("FOR item IN", 1)[1].split("LOOP", 1)[0]
    return set(re.findall(r"\('([a-z0-9_]+)',", block))


# --- setting up -------------------------------------------------------------------------------


async def test_db_roles_creates_nologin_group_roles_as_an_admin_without_superuser(
    cluster: Cluster, as_superuser: asyncpg.Connection
) -> None:
    rows = await as_superuser.fetch(
        "SELECT rolname, rolcanlogin, rolsuper FROM pg_roles WHERE rolname = ANY($1::text[])",
        [*cluster.roles.names, cluster.admin],
    )
    found = {r["rolname"]: (r["rolcanlogin"], r["rolsuper"]) for r in rows}
    assert found[cluster.admin] == (True, False)
    assert {name: found[name] for name in cluster.roles.names} == {
        name: (False, False) for name in cluster.roles.names
    }


async def test_create_logins_makes_each_url_user_a_member_of_its_group_only(
    cluster: Cluster, as_superuser: asyncpg.Connection
) -> None:
    rows = await as_superuser.fetch(
        """SELECT m.rolname AS login, g.rolname AS grp
           FROM pg_auth_members a JOIN pg_roles m ON m.oid = a.member
           JOIN pg_roles g ON g.oid = a.roleid
           WHERE m.rolname = ANY($1::text[])""",
        [cluster.migrator, cluster.app, cluster.api],
    )
    groups = {(r["login"], r["grp"]) for r in rows}
    assert groups == {
        (cluster.migrator, cluster.roles.owner),
        (cluster.app, cluster.roles.writer),
        (cluster.api, cluster.roles.reader),
    }


async def test_create_logins_stores_a_scram_verifier_never_the_password(
    cluster: Cluster, as_superuser: asyncpg.Connection
) -> None:
    stored = await as_superuser.fetchval(
        "SELECT rolpassword FROM pg_authid WHERE rolname = $1", cluster.app
    )
    assert stored.startswith("SCRAM-SHA-256$4096:")
    assert "app-secret" not in stored


async def test_rotating_a_password_replaces_the_verifier(
    cluster: Cluster, as_superuser: asyncpg.Connection
) -> None:
    before = await as_superuser.fetchval(
        "SELECT rolpassword FROM pg_authid WHERE rolname = $1", cluster.api
    )
    admin = await asyncpg.connect(cluster.url(cluster.admin))
    try:
        result = await ensure_login(admin, cluster.api, "rotated-secret", [cluster.roles.reader])
    finally:
        await admin.close()
    after = await as_superuser.fetchval(
        "SELECT rolpassword FROM pg_authid WHERE rolname = $1", cluster.api
    )
    assert not result.created
    assert after.startswith("SCRAM-SHA-256$")
    assert after != before


async def test_db_roles_again_changes_nothing_and_says_so(cluster: Cluster) -> None:
    result = await _run("db", "roles", env=cluster.env())
    assert result.returncode == 0, result.stderr
    assert "created group role" not in result.stdout
    assert "CREATE ROLE" in result.stdout  # how to create the logins, without any password
    assert not re.search(r"(admin|migrate|app|api)-secret", result.stdout + result.stderr)


async def test_migrations_run_as_the_migrate_url_leave_every_object_owned_by_the_owner_role(
    as_superuser: asyncpg.Connection, cluster: Cluster
) -> None:
    owners = await as_superuser.fetch(
        """SELECT c.relname AS name, pg_get_userbyid(c.relowner) AS owner FROM pg_class c
           WHERE c.relnamespace = 'public'::regnamespace
           UNION ALL
           SELECT p.proname, pg_get_userbyid(p.proowner) FROM pg_proc p
           WHERE p.pronamespace = 'public'::regnamespace"""
    )
    assert len(owners) > 40
    assert {r["owner"] for r in owners} == {cluster.roles.owner}, [
        (r["name"], r["owner"]) for r in owners if r["owner"] != cluster.roles.owner
    ]


async def test_every_table_of_the_schema_is_listed_in_privileges_sql(
    as_superuser: asyncpg.Connection,
) -> None:
    tables = await as_superuser.fetch(
        """SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace
           AND relkind IN ('r', 'p') AND NOT relispartition"""
    )
    assert {r["relname"] for r in tables} == _privileges_tables()


async def test_db_roles_gives_objects_migrated_before_the_roles_to_the_owner_role(
    cluster: Cluster,
) -> None:
    dbname = cluster.dbname + "_legacy"
    await _create_database(cluster.server_dsn, dbname, cluster.admin)
    try:
        conn = await asyncpg.connect(cluster.url(cluster.admin, dbname))
        try:
            await apply_migrations(conn)  # as before roles: everything owned by the admin
            report = await create_group_roles(conn, cluster.roles)
            owners = await conn.fetch(
                """SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class
                   WHERE relnamespace = 'public'::regnamespace"""
            )
        finally:
            await conn.close()
    finally:
        await drop_database(cluster.server_dsn, dbname)
    assert "vital_default" in report.reassigned
    assert [r["owner"] for r in owners] == [cluster.roles.owner]


async def test_a_database_without_db_roles_migrates_as_its_single_user_as_before(
    cluster: Cluster,
) -> None:
    dbname = cluster.dbname + "_single"
    await _create_database(cluster.server_dsn, dbname, cluster.admin)
    try:
        conn = await asyncpg.connect(cluster.url(cluster.admin, dbname))
        try:
            # The roles exist in the cluster (this module's database uses them), not here.
            done = await apply_migrations(conn, cluster.roles, grant=True)
            owners = await conn.fetch(
                """SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class
                   WHERE relnamespace = 'public'::regnamespace"""
            )
        finally:
            await conn.close()
    finally:
        await drop_database(cluster.server_dsn, dbname)
    assert done
    assert [r["owner"] for r in owners] == [cluster.admin]


# --- the runtime role (writer) ----------------------------------------------------------------


async def test_serve_as_the_runtime_role_ingests_mqtt_vitals(
    gateway: GatewayProcess, mqtt_url: str, as_superuser: asyncpg.Connection
) -> None:
    unit = new_unit_id()
    host, port = broker_address(mqtt_url)
    t0 = datetime.now(UTC) - timedelta(hours=1)
    async with aiomqtt.Client(host, port, identifier=new_client_id("unit"), timeout=10) as client:
        for seq in (1, 2, 1):  # and a redelivery: the ledger's duplicate path
            payload = vitals_payload(unit, seq, cin=new_unit_id("CIN"), base_time=t0)
            await client.publish(f"units/{unit}/vitals", payload, qos=1, timeout=10)

    async def watermark_reached() -> bool:
        ack = await as_superuser.fetchval("SELECT ack_seq FROM unit WHERE name = $1", unit)
        return bool(ack == 2)

    try:
        await wait_until(watermark_reached, 30)
    except AssertionError:
        raise AssertionError(gateway.log_tail()) from None
    vitals = await as_superuser.fetchval(
        """SELECT count(*) FROM vital v JOIN device d ON d.id = v.device_id
           JOIN unit u ON u.id = d.unit_id WHERE u.name = $1""",
        unit,
    )
    assert vitals == 6


async def test_serve_as_the_runtime_role_dead_letters_a_bad_payload(
    gateway: GatewayProcess, mqtt_url: str, as_superuser: asyncpg.Connection
) -> None:
    unit = new_unit_id()
    host, port = broker_address(mqtt_url)
    async with aiomqtt.Client(host, port, identifier=new_client_id("unit"), timeout=10) as client:
        await client.publish(f"units/{unit}/vitals", b"{not json", qos=1, timeout=10)

    async def dead_lettered() -> bool:
        found = await as_superuser.fetchval(
            "SELECT count(*) FROM dead_letter WHERE source = $1", unit
        )
        return bool(found)

    try:
        await wait_until(dead_lettered, 30)
    except AssertionError:
        raise AssertionError(gateway.log_tail()) from None


async def test_serve_as_the_runtime_role_stores_hl7_results(
    gateway: GatewayProcess, as_superuser: asyncpg.Connection
) -> None:
    before = await as_superuser.fetchval("SELECT count(*) FROM lab_observation")
    result = await _run(
        "simulate",
        "lab",
        "--count",
        "3",
        "--resend",  # the ledger's duplicate path too
        "--rate",
        "0",
        "--quiet",
        "--port",
        str(_port(gateway, "mllp")),
        "--host",
        "127.0.0.1",
        "--seed",
        str(secrets.randbelow(10**6)),
        env={},
    )
    assert result.returncode == 0, result.stdout + result.stderr + gateway.log_tail()
    assert "AA 6" in result.stdout, result.stdout + gateway.log_tail()
    assert await as_superuser.fetchval("SELECT count(*) FROM lab_observation") > before


async def test_serve_as_the_runtime_role_applies_adt_updates_and_merges(
    gateway: GatewayProcess, as_superuser: asyncpg.Connection
) -> None:
    survivor, prior = new_id("CIN"), new_id("MRN")
    messages = [
        adt(control_id(), "A04", f"{survivor}^^^CIN^NI", "Benali^Fatima"),
        adt(control_id(), "A04", f"{prior}^^^CHU-RABAT^MR", "Benali^Fatma"),
        adt(control_id(), "A08", f"{survivor}^^^CIN^NI", "Benali^Fatima Zahra"),
        adt(
            control_id(),
            "A40",
            f"{survivor}^^^CIN^NI",
            "Benali^Fatima Zahra",
            mrg=f"{prior}^^^CHU-RABAT^MR",
        ),
    ]
    async with MllpClient("127.0.0.1", _port(gateway, "mllp")) as client:
        codes = [(await client.request(encode(text))).code for text in messages]
    merged = await as_superuser.fetchval(
        """SELECT p.replaced_by IS NOT NULL FROM patient_identifier i
           JOIN patient p ON p.id = i.patient_id WHERE i.system = 'CHU-RABAT' AND i.value = $1""",
        prior,
    )
    assert codes == ["AA"] * 4, gateway.log_tail()
    assert merged


async def test_serve_as_the_runtime_role_indexes_dicom_instances(
    gateway: GatewayProcess, as_superuser: asyncpg.Connection
) -> None:
    before = await as_superuser.fetchval("SELECT count(*) FROM dicom_instance")
    result = await _run(
        "simulate",
        "modality",
        "--studies",
        "1",
        "--quiet",
        "--port",
        str(_port(gateway, "dicom")),
        "--host",
        "127.0.0.1",
        "--seed",
        str(secrets.randbelow(10**6)),
        env={},
    )
    assert result.returncode == 0, result.stdout + result.stderr + gateway.log_tail()
    assert await as_superuser.fetchval("SELECT count(*) FROM dicom_instance") > before


async def test_runtime_role_creates_next_weeks_partition_and_moves_rows_out_of_the_default(
    cluster: Cluster, as_app: asyncpg.Connection, as_superuser: asyncpg.Connection
) -> None:
    when = datetime.now(UTC) + timedelta(days=400)  # beyond the partitions made ahead
    week = when - timedelta(days=when.weekday())
    await as_app.execute(
        """INSERT INTO vital (patient_id, time, received_at, concept_id, device_id, value)
           VALUES (1, $1, now(), 1, 1, 42)""",
        when,
    )
    pool = await asyncpg.create_pool(cluster.url(cluster.app), min_size=1, max_size=1)
    try:
        created = await ensure_partitions(pool, week, week + timedelta(days=7))
    finally:
        await pool.close()
    partition = await as_superuser.fetchrow(
        """SELECT c.relname, pg_get_userbyid(c.relowner) AS owner
           FROM vital v JOIN pg_class c ON c.oid = v.tableoid WHERE v.time = $1""",
        when,
    )
    assert created >= 1
    assert partition is not None
    assert partition["relname"] != "vital_default"
    assert partition["owner"] == cluster.roles.owner


async def test_runtime_role_prunes_the_mqtt_ledger_below_a_units_watermark(
    cluster: Cluster, as_app: asyncpg.Connection
) -> None:
    unit_id = await as_app.fetchval(
        "INSERT INTO unit (name, ack_seq) VALUES ($1, 30) RETURNING id", f"prune-{uuid4().hex}"
    )
    await as_app.execute(
        """INSERT INTO mqtt_message (unit_id, seq, received_at, outcome)
           SELECT $1, s, now(), 'stored' FROM generate_series(1, 40) s""",
        unit_id,
    )
    pool = await asyncpg.create_pool(cluster.url(cluster.app), min_size=1, max_size=1)
    try:
        deleted = await prune_ledger(pool, LedgerPruning(keep_seqs=10, pause=0.0))
    finally:
        await pool.close()
    left = await as_app.fetchval("SELECT min(seq) FROM mqtt_message WHERE unit_id = $1", unit_id)
    assert deleted >= 20
    assert left == 21


async def test_runtime_role_cannot_use_the_partition_function_on_another_table(
    as_app: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_app.fetchval("SELECT qantara_ensure_partitions('patient'::regclass, now(), now())")


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE vital",
        "ALTER TABLE patient ADD COLUMN intruder text",
        "TRUNCATE mqtt_message",
        "CREATE TABLE intruder (id int)",
        "CREATE INDEX intruder ON patient (family)",
        "DELETE FROM hl7_message",
        "UPDATE schema_migration SET name = 'x'",
        "SELECT token_name, patient_ids FROM api_audit",  # it writes C-GET rows, never reads
        "UPDATE api_audit SET status = 0",
        "DELETE FROM api_audit",
        "SELECT raw FROM dead_letter",
        "SELECT raw FROM hl7_message",
        "SELECT token_hash FROM api_token",
        "UPDATE api_token SET scopes = '{system/*.read}'",
        "SELECT count(*) FROM vital",
        "DELETE FROM vital",
        "CREATE TABLE vital_2099w01 PARTITION OF vital"
        " FOR VALUES FROM ('2099-01-05') TO ('2099-01-12')",
    ],
)
async def test_runtime_role_is_refused(as_app: asyncpg.Connection, statement: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_app.execute(statement)


async def test_runtime_role_writes_the_audit_row_of_a_dicom_retrieve(
    as_app: asyncpg.Connection,
) -> None:
    row_id = await record_access(
        as_app,
        AuditEntry(
            "VIEWER", "read", "ImagingStudy", "C-GET STUDY, 1 instance(s)", (), "0", 0xFF00, "dicom"
        ),
    )
    assert row_id > 0


async def test_token_commands_run_as_the_runtime_role(cluster: Cluster) -> None:
    env = {
        "QANTARA_DB_ROLE_PREFIX": cluster.prefix,
        "QANTARA_DATABASE_URL": cluster.url(cluster.app),
    }
    name = f"cli-{secrets.token_hex(4)}"
    created = await _run("token", "create", "--name", name, "--scope", "system/*.read", env=env)
    revoked = await _run("token", "revoke", name, env=env)
    listed = await _run("token", "list", env=env)
    assert created.returncode == 0, created.stderr
    assert revoked.returncode == 0, revoked.stderr
    assert f"{name}\trevoked" in listed.stdout, listed.stderr


# --- the API role (reader) --------------------------------------------------------------------


@pytest.fixture(scope="module")
async def read_token(cluster: Cluster) -> tuple[str, str]:
    """A `system/*.read` token, created as `qantara token create` does (the runtime login)."""
    name = f"roles-{secrets.token_hex(4)}"
    conn = await asyncpg.connect(cluster.url(cluster.app))
    try:
        token = await issue_token(conn, name, ["system/*.read", "system/AuditEvent.read"])
    finally:
        await conn.close()
    return name, token


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient?identifier=CIN|NOBODY",
        "/fhir/Patient?name=benali",
        "/fhir/Observation?patient=Patient/1&_count=5",
        "/fhir/Observation?patient=Patient/1&category=laboratory",
        "/fhir/DiagnosticReport?patient=Patient/1",
        "/fhir/ImagingStudy?patient=Patient/1",
        "/fhir/AuditEvent?_count=5",
        "/dicomweb/studies?PatientID=NOBODY",
    ],
)
async def test_reader_role_answers_the_api_and_writes_the_audit_trail(
    gateway: GatewayProcess,
    read_token: tuple[str, str],
    as_superuser: asyncpg.Connection,
    path: str,
) -> None:
    name, token = read_token
    before = await as_superuser.fetchval(
        "SELECT count(*) FROM api_audit WHERE token_name = $1", name
    )
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as client:
        response = await client.get(path, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text + gateway.log_tail()
    after = await as_superuser.fetchval(
        "SELECT count(*) FROM api_audit WHERE token_name = $1", name
    )
    assert after > before


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO vital (patient_id, time, received_at, concept_id, device_id, value)"
        " VALUES (1, now(), now(), 1, 1, 1)",
        "UPDATE patient SET family = 'x'",
        "DELETE FROM patient_identifier",
        "UPDATE api_audit SET status = 0",
        "DELETE FROM api_audit",
        "TRUNCATE api_audit",
        "UPDATE api_token SET revoked_at = now()",
        "INSERT INTO api_token (name, token_hash, scopes) VALUES ('x', '\\x00', '{}')",
        "SELECT raw FROM hl7_message",
        "SELECT raw FROM dead_letter",
        "SELECT count(*) FROM mqtt_message",
        "SELECT qantara_ensure_partitions('vital'::regclass, now(), now())",
        "CREATE TABLE intruder (id int)",
        "DROP TABLE api_audit",
    ],
)
async def test_reader_role_is_refused(as_api: asyncpg.Connection, statement: str) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_api.execute(statement)


# --- start-up ---------------------------------------------------------------------------------


async def test_serve_as_the_runtime_role_refuses_to_start_on_pending_migrations(
    cluster: Cluster, mqtt_url: str
) -> None:
    dbname = cluster.dbname + "_pending"
    await _create_database(cluster.server_dsn, dbname, cluster.admin)
    env = {
        "QANTARA_DB_ROLE_PREFIX": cluster.prefix,
        "QANTARA_DATABASE_URL": cluster.url(cluster.app, dbname),
        "QANTARA_MQTT_URL": mqtt_url,
        "QANTARA_HTTP_PORT": "0",
        "QANTARA_MLLP_PORT": "0",
        "QANTARA_DICOM_PORT": "0",
    }
    try:
        result = await _run("serve", env=env)
    finally:
        await drop_database(cluster.server_dsn, dbname)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 4, result.stderr
    assert "pending" in last
    assert "QANTARA_MIGRATE_DATABASE_URL" in last
    assert "Traceback" not in result.stderr


async def test_serve_with_a_migrate_url_migrates_as_the_owner_role_then_runs_as_the_writer(
    cluster: Cluster, mqtt_url: str
) -> None:
    dbname = cluster.dbname + "_serve"
    await _create_database(cluster.server_dsn, dbname, cluster.admin)
    try:
        admin = await asyncpg.connect(cluster.url(cluster.admin, dbname))
        try:
            await create_group_roles(admin, cluster.roles)  # `qantara db roles` on an empty base
        finally:
            await admin.close()
        env = cluster.env(dbname)
        del env["QANTARA_ADMIN_DATABASE_URL"]
        async with GatewayProcess(
            database_url=env.pop("QANTARA_DATABASE_URL"), mqtt_url=mqtt_url, env=env
        ) as process:
            await process.wait_ready()
        conn = await asyncpg.connect(cluster.url(cluster.admin, dbname))
        try:
            owners = await conn.fetch(
                """SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class
                   WHERE relnamespace = 'public'::regnamespace"""
            )
            partitions = await conn.fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'vital'::regclass"
            )
        finally:
            await conn.close()
    finally:
        await drop_database(cluster.server_dsn, dbname)
    assert [r["owner"] for r in owners] == [cluster.roles.owner]
    assert partitions > 1  # made ahead at start by the writer, through the owner's function
