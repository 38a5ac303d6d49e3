"""What each `qantara` subcommand does, once its settings are loaded."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import TypedDict
from urllib.parse import unquote, urlsplit

import asyncpg
from prometheus_client import write_to_textfile

from dicom.filestore import FileStore
from dicom.reindex import (
    SETTLED,
    Reindexed,
    Reindexer,
    Result,
    content_names_in,
    submitting_to,
)
from dicom.verify import Summary as VerifySummary
from dicom.verify import Verifier, describe, summarize
from gateway import app
from gateway.auth import InvalidScope, issue_token
from gateway.local_services import (
    EmbeddedBroker,
    EmbeddedPostgres,
    PrivateMosquitto,
    broker_answers,
    find_mosquitto,
    free_port,
)
from gateway.settings import Settings
from ingest.errors import ConfigError, StorageUnavailable
from ingest.pipeline import GroupCommitPipeline
from monitoring.metrics import VERIFY_RESULTS, Metrics, VerifyMetrics
from storage import tokens
from storage.dicom_queries import file_of, files_to_verify, indexed_files
from storage.dicom_store_lock import reindexing
from storage.migrations import MigrationError, apply_migrations, pending_migrations
from storage.pool import PoolSettings, create_pool, is_transient
from storage.roles import GroupRoles, create_group_roles, ensure_login
from storage.writer import BatchWriter

logger = logging.getLogger(__name__)

LOCAL_READ_SCOPES = ("system/*.read",)


def _database_url(settings: Settings) -> str:
    if settings.database.url is None:
        raise ConfigError("QANTARA_DATABASE_URL: must be set (postgresql://...)")
    return settings.database.url


def _roles(settings: Settings) -> GroupRoles:
    return GroupRoles.with_prefix(settings.database.role_prefix)


@asynccontextmanager
async def _connection(
    settings: Settings, dsn: str | None = None
) -> AsyncIterator[asyncpg.Connection]:
    try:
        conn = await asyncpg.connect(dsn or _database_url(settings), timeout=10)
    except Exception as exc:
        if is_transient(exc):
            raise StorageUnavailable(f"cannot connect: {type(exc).__name__}") from exc
        raise
    try:
        yield conn
    finally:
        await conn.close()


async def serve(settings: Settings, *, migrate: bool) -> int:
    _database_url(settings)
    await app.run(settings, migrate=migrate)
    return 0


async def migrate(settings: Settings) -> int:
    _database_url(settings)
    async with _connection(settings, settings.database.migrate_dsn) as conn:
        done = await apply_migrations(conn, _roles(settings), grant=True)
    print(f"applied {len(done)} migration(s)")  # noqa: T201
    return 0


async def _migrated(settings: Settings) -> None:
    """Apply what is pending, as the migrate URL's user (tokens need the current schema)."""
    async with _connection(settings) as conn:
        if not await pending_migrations(conn):
            return
    async with _connection(settings, settings.database.migrate_dsn) as conn:
        await apply_migrations(conn, _roles(settings))


async def db_roles(settings: Settings, *, create_logins: bool) -> int:
    """Create the group roles, hand them the schema, grant; optionally the login roles."""
    roles = _roles(settings)
    database = settings.database
    if database.admin_dsn is None:
        raise ConfigError(
            "QANTARA_ADMIN_DATABASE_URL: must be set (or QANTARA_MIGRATE_DATABASE_URL, or "
            "QANTARA_DATABASE_URL): a user with CREATEROLE that owns the database"
        )
    async with _connection(settings, database.admin_dsn) as conn:
        admin = str(await conn.fetchval("SELECT current_user"))
        report = await create_group_roles(conn, roles)
        for name in report.created:
            print(f"created group role {name}")  # noqa: T201
        if report.reassigned:
            print(f"gave {len(report.reassigned)} existing object(s) to {roles.owner}")  # noqa: T201
        print(  # noqa: T201
            f"group roles {', '.join(roles.names)} ready; grants of storage/sql/privileges.sql "
            "applied"
        )
        logins = _logins(settings, roles)
        if not create_logins:
            print(_login_instructions(logins, admin))  # noqa: T201
            return 0
        for login in logins:
            if login.url is None or login.user is None:
                continue
            if login.user == admin:
                print(f"login {login.user}: the admin user itself, left as it is")  # noqa: T201
                continue
            result = await ensure_login(conn, login.user, login.password, login.groups)
            state = "created" if result.created else "updated"
            groups = ", ".join(login.groups)
            print(f"login {login.user} ({login.setting}): {state}, member of {groups}")  # noqa: T201
            if result.superuser:
                print(  # noqa: T201
                    f"warning: {login.user} is a superuser, which overrides every grant: "
                    f"ALTER ROLE {login.user} NOSUPERUSER",
                    file=sys.stderr,
                )
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        )
        if owner in {
            login.user for login in logins if login.setting != "QANTARA_MIGRATE_DATABASE_URL"
        }:
            print(  # noqa: T201
                f"warning: {owner} owns the database (and so may create in schema public): "
                f"ALTER DATABASE ... OWNER TO {admin}",
                file=sys.stderr,
            )
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class _Login:
    setting: str
    url: str | None
    default_name: str
    groups: tuple[str, ...]

    @property
    def user(self) -> str | None:
        if self.url is None:
            return None
        name = urlsplit(self.url).username
        return unquote(name) if name else None

    @property
    def password(self) -> str | None:
        secret = urlsplit(self.url).password if self.url is not None else None
        return unquote(secret) if secret else None


def _logins(settings: Settings, roles: GroupRoles) -> list[_Login]:
    """The login roles the URLs name: migrate → owner, runtime → writer (+ reader), API → reader."""
    database = settings.database
    prefix = database.role_prefix
    runtime_groups = (roles.writer,) if database.api_url else (roles.writer, roles.reader)
    return [
        _Login(
            "QANTARA_MIGRATE_DATABASE_URL",
            database.migrate_url,
            f"{prefix}_migrate",
            (roles.owner,),
        ),
        _Login("QANTARA_DATABASE_URL", database.url, f"{prefix}_app", runtime_groups),
        _Login("QANTARA_API_DATABASE_URL", database.api_url, f"{prefix}_api", (roles.reader,)),
    ]


def _login_instructions(logins: list[_Login], admin: str) -> str:
    lines = [
        "Login roles: run `qantara db roles --create-logins` with the URLs set (user and password",
        "are taken from them), or as an administrator in psql, with passwords from",
        "deploy/secrets/compose.env (`make certs`); never commit them:",
    ]
    for login in logins:
        # A URL naming the admin itself (one URL for everything, today): a login of its own.
        name = login.user if login.user and login.user != admin else login.default_name
        groups = ", ".join(login.groups)
        lines.append(
            f"  CREATE ROLE {name} LOGIN PASSWORD :'password' IN ROLE {groups};  -- {login.setting}"
        )
    lines.append("Rotate a password: ALTER ROLE <name> PASSWORD ... (docs/operations.md).")
    return "\n".join(lines)


def _store_root(settings: Settings) -> Path:
    """The DICOM store's folder for the commands that read it (never created by them)."""
    root = settings.dicom.storage
    if not root.is_dir():
        raise ConfigError(f"QANTARA_DICOM_STORAGE: {root} is not a folder")
    # Unmounted, the volume's files would all be reported missing, or none found unindexed.
    settings.dicom.require_mounted()
    return root


async def dicom_verify(settings: Settings, args: argparse.Namespace) -> int:
    """`qantara dicom verify`: 0 when every indexed file is intact, 1 when some are damaged."""
    root = _store_root(settings)
    since: datetime | None = args.since
    scope = "partial" if since is not None or args.after_id else "all"
    async with _connection(settings) as conn:
        verifier = Verifier(
            FileStore(root),
            lambda after, limit: files_to_verify(conn, after, since, limit),
            lambda instance: file_of(conn, instance),
            rate=args.rate * 1e6,
        )
        try:
            summary = await verifier.run(args.after_id, lambda f: print(describe(f)))  # noqa: T201
        except (StorageUnavailable, asyncio.CancelledError):
            last = verifier.summary.last_id
            print(  # noqa: T201
                f"qantara: verification stopped after instance id {last}: resume with "
                f"--after-id {last}",
                file=sys.stderr,
            )
            raise
    print(summarize(summary))  # noqa: T201
    if args.textfile is not None:
        _write_verify_metrics(args.textfile, scope, summary)
    return 1 if summary.damaged else 0


async def dicom_reindex(settings: Settings, args: argparse.Namespace) -> int:
    """`qantara dicom reindex`: 0 when every unindexed file is in the index afterwards, else 1."""
    root = _store_root(settings)
    only = None
    if args.files is not None:
        with args.files:
            only = content_names_in(args.files.read())
        if not only:
            raise ConfigError(f"--files: {args.files.name} names no file (ab/cd/<sha256>.dcm)")
    pool = await create_pool(
        PoolSettings(dsn=_database_url(settings), max_size=2, application_name="reindex")
    )
    try:
        async with pool.acquire() as conn:
            if await pending_migrations(conn):
                raise MigrationError("pending migrations: run `qantara migrate` first")
        pipeline = GroupCommitPipeline(BatchWriter(pool), settings.pipeline, Metrics())
        reindexer = Reindexer(
            FileStore(root),
            lambda names: indexed_files(pool, names),
            None if args.dry_run else submitting_to(pipeline),
            calling_ae=args.calling_ae or "",
            older_than=args.older_than * 60,
        )
        # The store's lock, on a connection of its own, keeps the listeners' orphan sweeps
        # from removing a file this is indexing (a dry run commits nothing: no lock).
        lock = _store_lock(settings, wait=args.wait, dry_run=args.dry_run)
        async with lock, asyncio.TaskGroup() as group:
            group.create_task(pipeline.run())
            try:
                counts = await reindexer.run(_print_reindexed, only)
            finally:
                await pipeline.close()
    finally:
        await pool.close()
    print(_reindex_summary(counts, dry_run=args.dry_run))  # noqa: T201
    return 0 if sum(counts.values()) == sum(counts[r] for r in SETTLED) else 1


@asynccontextmanager
async def _store_lock(settings: Settings, *, wait: float, dry_run: bool) -> AsyncIterator[None]:
    if dry_run:
        yield
        return
    async with _connection(settings) as conn, reindexing(conn, wait):
        yield


def _print_reindexed(done: Reindexed) -> None:
    """One line per file not simply indexed: what it is (never patient data) and why."""
    if done.result is Result.INDEXED:
        return
    uid = f", SOP Instance UID {done.sop_instance_uid}" if done.sop_instance_uid else ""
    detail = f": {done.detail}" if done.detail else ""
    print(f"{done.result}: file {done.file_path}{uid}{detail}")  # noqa: T201


def _reindex_summary(counts: Counter[str], *, dry_run: bool) -> str:
    total = sum(counts.values())
    files = "file" if total == 1 else "files"
    parts = ", ".join(f"{counts[r]:,} {r}" for r in Result if counts[r]) or "nothing to do"
    note = " (a dry run: nothing committed)" if dry_run else ""
    return f"{total:,} unindexed {files}: {parts}{note}"


def _write_verify_metrics(path: Path, scope: str, summary: VerifySummary) -> None:
    metrics = VerifyMetrics(scope)
    for result in VERIFY_RESULTS:
        metrics.instances.labels(scope, result).set(summary.results[result])
    metrics.bytes_read.labels(scope).set(summary.bytes_read)
    metrics.duration.labels(scope).set(summary.seconds)
    metrics.completed.labels(scope).set(time.time())
    write_to_textfile(str(path), metrics.registry)


async def token_create(settings: Settings, name: str, scopes: list[str]) -> int:
    await _migrated(settings)
    async with _connection(settings) as conn:
        try:
            secret = await issue_token(conn, name, scopes)
        except (InvalidScope, tokens.TokenNameTaken) as exc:
            print(f"qantara: {exc}", file=sys.stderr)  # noqa: T201
            return 1
    print(f"token {name!r} created with scopes {' '.join(scopes)}; it is shown only once:")  # noqa: T201
    print(secret)  # noqa: T201
    return 0


async def token_revoke(settings: Settings, name: str) -> int:
    async with _connection(settings) as conn:
        revoked = await tokens.revoke_token(conn, name)
    if not revoked:
        print(f"qantara: no active token named {name!r}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"token {name!r} revoked")  # noqa: T201
    return 0


async def token_list(settings: Settings) -> int:
    async with _connection(settings) as conn:
        for info in await tokens.list_tokens(conn):
            state = "revoked" if info.revoked_at else "active"
            print(f"{info.name}\t{state}\t{' '.join(info.scopes)}")  # noqa: T201
    return 0


async def simulate_units(settings: Settings, args: argparse.Namespace) -> int:
    from simulators.fleet_units import UnitsConfig, run_units

    report = await run_units(
        UnitsConfig(
            mqtt_url=settings.mqtt.url,
            count=args.count,
            rate=args.rate,
            duration=args.duration,
            flaky=args.flaky,
            state_dir=Path(args.state_dir),
            seed=args.seed,
            drain_timeout=args.drain_timeout,
            unit_prefix=args.prefix,
            quiet=args.quiet,
        )
    )
    print(report.summary())  # noqa: T201
    return 0 if report.pending == 0 else 1


async def simulate_lab(settings: Settings, args: argparse.Namespace) -> int:
    from simulators.lab import LabConfig, run_lab

    host = _gateway_host(args, settings)
    report = await run_lab(
        LabConfig(
            host=host,
            port=args.port if args.port is not None else settings.mllp.port,
            count=args.count,
            rate=args.rate,
            connections=args.connections,
            resend=args.resend,
            seed=args.seed,
            retry_timeout=args.retry_timeout,
            ae_retry_for=args.ae_retry_for,
            ack_log=Path(args.ack_log) if args.ack_log else None,
            quiet=args.quiet,
            facility=args.facility,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    )
    print(report.summary())  # noqa: T201
    return 0 if report.unanswered == 0 else 1


async def simulate_modality(settings: Settings, args: argparse.Namespace) -> int:
    from simulators.modality import ModalityConfig, run_modality

    report = await asyncio.to_thread(
        run_modality,
        ModalityConfig(
            **_dicom_peer(args, settings),
            modality=args.modality,
            studies=args.studies,
            rate=args.rate,
            seed=args.seed,
            commit=args.commit or args.report_port is not None,
            commit_wait=args.commit_wait,
            report_port=args.report_port,
        ),
    )
    print(report.summary())  # noqa: T201
    failed = report.refused or report.aborted or report.failed or report.uncommitted
    return 0 if not failed else 1


class _DicomPeer(TypedDict):
    host: str
    port: int
    called_ae: str
    calling_ae: str
    quiet: bool
    tls_ca: Path | None
    tls_cert: Path | None
    tls_key: Path | None


def _dicom_peer(args: argparse.Namespace, settings: Settings) -> _DicomPeer:
    """What the DICOM simulators share of their command line: where the gateway listens and
    who calls it, how (TLS), and whether to print progress."""
    return {
        "host": _gateway_host(args, settings),
        "port": args.port if args.port is not None else settings.dicom.port,
        "called_ae": settings.dicom.ae_title,
        "calling_ae": args.calling_ae,
        "quiet": args.quiet,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
    }


async def simulate_workstation(settings: Settings, args: argparse.Namespace) -> int:
    from simulators.workstation import WorkstationConfig, run_workstation

    report = await asyncio.to_thread(
        run_workstation,
        WorkstationConfig(
            **_dicom_peer(args, settings),
            patient_id=args.patient_id,
            study_date=args.study_date,
            limit=args.limit,
            move_to=args.move_to,
        ),
    )
    print(report.summary())  # noqa: T201
    return 0 if report.ok else 1


async def simulate_fleet(settings: Settings, args: argparse.Namespace) -> int:
    from simulators.fleet import FleetConfig, run_fleet

    host = _gateway_host(args, settings)
    report = await run_fleet(
        FleetConfig(
            mqtt_url=settings.mqtt.url,
            host=host,
            mllp_port=args.mllp_port if args.mllp_port is not None else settings.mllp.port,
            dicom_port=args.dicom_port if args.dicom_port is not None else settings.dicom.port,
            called_ae=settings.dicom.ae_title,
            units=args.units,
            labs=args.labs,
            modalities=args.modalities,
            duration=args.duration,
            unit_rate=args.unit_rate,
            flaky=args.flaky,
            lab_rate=args.lab_rate,
            study_interval=args.study_interval,
            database_url=args.database_url,
            state_dir=Path(args.state_dir),
            seed=args.seed,
            drain_timeout=args.drain_timeout,
            unit_prefix=args.prefix,
            quiet=args.quiet,
        )
    )
    if report.integrity is not None:
        print(f"database: {report.integrity.detail}")  # noqa: T201
    print(report.summary())  # noqa: T201
    return 0 if report.ok else 1


async def up(settings: Settings, *, simulate: int, rate: float, data_dir: str) -> int:
    """Everything on one machine; embedded services only where none is configured."""
    base = Path(data_dir)
    async with AsyncExitStack() as stack:
        database_url = settings.database.url
        if database_url is None:
            postgres = EmbeddedPostgres(base / "pgdata")
            await asyncio.to_thread(postgres.start)
            stack.callback(postgres.stop)
            database_url = postgres.dsn
            print(f"database: embedded PostgreSQL in {base / 'pgdata'}")  # noqa: T201
        mqtt = settings.mqtt
        if await broker_answers(mqtt.url):
            print(f"broker: {mqtt.url}")  # noqa: T201
        elif (binary := find_mosquitto()) is not None:
            broker = PrivateMosquitto(port=free_port())
            await broker.start()
            stack.push_async_callback(broker.stop)
            mqtt = dataclasses.replace(mqtt, url=broker.url)
            print(f"broker: private mosquitto ({binary}) at {broker.url}")  # noqa: T201
        else:
            embedded = EmbeddedBroker(free_port())
            url = await stack.enter_async_context(embedded)
            mqtt = dataclasses.replace(mqtt, url=url, protocol=4)
            print(f"broker: embedded Python broker (MQTT 3.1.1) at {url}")  # noqa: T201
        settings = dataclasses.replace(
            settings,
            mqtt=mqtt,
            database=dataclasses.replace(settings.database, url=database_url),
        )
        conn = await asyncpg.connect(settings.database.migrate_dsn or database_url, timeout=30)
        try:
            await apply_migrations(conn, _roles(settings))
        finally:
            await conn.close()
        conn = await asyncpg.connect(database_url, timeout=30)
        try:
            name = f"local-read-{free_port()}"
            secret = await issue_token(conn, name, list(LOCAL_READ_SCOPES))
        finally:
            await conn.close()

        async def announce(gateway: app.Gateway) -> None:
            host = settings.bind if settings.bind != "0.0.0.0" else "127.0.0.1"  # noqa: S104
            http = f"http://{host}:{gateway.ports['http']}"
            print(  # noqa: T201
                f"\nQantara is up.\n"
                f"  FHIR API     {http}/fhir/Patient?identifier=CIN|<value>\n"
                f"  metrics      {http}/metrics\n"
                f"  readiness    {http}/readyz\n"
                f"  MQTT broker  {settings.mqtt.url}  (publish to units/<id>/vitals)\n"
                f"  read token ({name}, scopes {' '.join(LOCAL_READ_SCOPES)}):\n{secret}\n",
                flush=True,
            )

        async def simulators(gateway: app.Gateway) -> None:
            from simulators.fleet_units import UnitsConfig, run_units

            await run_units(
                UnitsConfig(
                    mqtt_url=settings.mqtt.url,
                    count=simulate,
                    rate=rate,
                    duration=float("inf"),
                    flaky=0.0,
                    state_dir=base / "units",
                    seed=1,
                    drain_timeout=0.0,
                    unit_prefix="UMMC-",
                    quiet=True,
                )
            )

        extras: tuple[app.Extra, ...] = (announce,)
        if simulate > 0:
            extras = (*extras, simulators)
        await app.run(settings, migrate=False, extras=extras)
    return 0


def _gateway_host(args: argparse.Namespace, settings: Settings) -> str:
    """Where a simulator reaches the gateway: `--host`, else `QANTARA_BIND`, a wildcard listen
    address meaning this machine."""
    host: str = args.host or settings.bind
    return "127.0.0.1" if host == "0.0.0.0" else host  # noqa: S104 - a listen address
