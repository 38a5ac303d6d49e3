"""The gateway process: every listener and the pipeline as tasks of one TaskGroup, one loop.

Start: pool, migrations (under an advisory lock, as the migrate URL's user, unless disabled;
`MigrationError` when some are pending and cannot be applied), partitions ahead, then the
pipeline, the MQTT adapter, the HTTP server and upkeep tasks. SIGTERM or SIGINT: stop reading
(MQTT) and accepting (HTTP), let the pipeline commit what it holds so its PUBACKs go out, then
close, all under `shutdown_timeout`; whatever is still running then is cancelled. SIGHUP: the
HTTP, MLLP and DICOM listeners read their TLS files again (a renewed certificate, a new CRL) for
the connections to come.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
from collections.abc import Callable, Coroutine, Mapping
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from prometheus_client import Gauge

from dicom.filestore import FileStore
from dicom.scp import DicomServer
from gateway import redacted_logs
from gateway.http import ApiSettings, create_app
from gateway.http_protocol import counted_in
from gateway.https import https_protocol
from gateway.settings import Settings
from hl7.server import REJECT_REASONS as HL7_REJECT_REASONS
from hl7.server import MllpServer
from ingest.certificate_dates import CertificateError, next_update, not_after
from ingest.errors import ConfigError, ListenerError, StorageUnavailable
from ingest.group_tasks import GroupTasks
from ingest.mqtt import MqttVitalsAdapter
from ingest.mqtt_payload import RejectReason
from ingest.pipeline import GroupCommitPipeline
from ingest.tls import listener_tls, server_context
from monitoring.health import record_readiness, record_storage_usage
from monitoring.metrics import Metrics
from storage import connection_loss
from storage.audit import record_access
from storage.commitment_reports import CommitmentReportQueue
from storage.dicom_queries import find as find_dicom
from storage.dicom_queries import held_instances
from storage.dicom_queries import indexed_files as dicom_indexed_files
from storage.dicom_queries import retrievable as retrievable_instances
from storage.dicom_store_lock import sweeping
from storage.ledger import LedgerPruning, run_ledger_pruning
from storage.migrations import (
    MigrationError,
    apply_migrations,
    describe_pending,
    pending_migrations,
)
from storage.pool import PoolSettings, create_pool, is_transient
from storage.roles import GroupRoles
from storage.writer import BatchWriter, ensure_partitions

logger = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL = 2.0
STORAGE_CHECK_INTERVAL = 30.0
PARTITION_INTERVAL = 6 * 3600.0
# Samples older than this land in the default partition (a replayed backlog of a long outage).
PARTITIONS_BEHIND = timedelta(days=28)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the gateway owns SIGTERM/SIGINT."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return

    def capture_signals(self) -> _NoSignals:  # type: ignore[override]
        return _NoSignals()


class _NoSignals:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@dataclass(slots=True)
class Gateway:
    """What a running gateway exposes to `up` and to tests: ports, readiness, metrics."""

    metrics: Metrics
    pool: asyncpg.Pool
    ports: dict[str, int] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


Extra = Callable[[Gateway], Coroutine[Any, Any, None]]


async def run(settings: Settings, *, migrate: bool = True, extras: tuple[Extra, ...] = ()) -> None:
    """Run the gateway until SIGTERM/SIGINT; `extras` run beside it (simulators of `up`)."""
    if settings.database.url is None:
        raise StorageUnavailable("no database: set QANTARA_DATABASE_URL (or use 'qantara up')")
    redacted_logs.install(asyncio.get_running_loop())  # the loop's reports, without messages
    connection_loss.install(asyncio.get_running_loop())  # lost connections: before the above
    async with AsyncExitStack() as stack:
        pool = await create_pool(
            PoolSettings(
                dsn=settings.database.url,
                max_size=settings.database.pool_size,
                statement_timeout_ms=settings.database.statement_timeout_ms,
            )
        )
        stack.push_async_callback(pool.close)
        # The read API has a pool of its own: a shorter statement timeout, and slow searches
        # cannot starve the ingest pipeline of connections.
        api_pool = await create_pool(
            PoolSettings(
                dsn=settings.database.api_dsn or settings.database.url,
                max_size=settings.http.pool_size,
                statement_timeout_ms=settings.http.statement_timeout_ms,
                application_name="qantara-api",
            )
        )
        stack.push_async_callback(api_pool.close)
        await _prepare_schema(pool, settings, migrate=migrate)
        await _ensure_partitions(pool, settings)

        metrics = Metrics()
        metrics.init_reasons("mqtt", [reason.value for reason in RejectReason])
        metrics.init_reasons("mqtt", ["storage-refused"])
        metrics.init_reasons("hl7", HL7_REJECT_REASONS)
        _tls_dates(settings, metrics)
        writer = BatchWriter(pool)
        pipeline = GroupCommitPipeline(writer, settings.pipeline, metrics)
        mqtt = MqttVitalsAdapter(settings.mqtt, pipeline, metrics)
        mllp = MllpServer(settings.mllp, pipeline, metrics)
        dicom = DicomServer(
            settings.dicom,
            bind=settings.bind,
            pipeline=pipeline,
            store=FileStore(settings.dicom.storage),
            finder=lambda request: find_dicom(pool, request),
            holder=lambda uids: held_instances(pool, uids),
            locator=lambda keys, limit: retrievable_instances(pool, keys, limit),
            auditor=lambda entry: record_access(pool, entry),
            reports=CommitmentReportQueue(pool),
            metrics=metrics,
            indexed=lambda paths: dicom_indexed_files(pool, paths),
            sweep_guard=lambda: sweeping(pool),
        )
        stack.push_async_callback(dicom.stop)
        gateway = Gateway(metrics=metrics, pool=pool)

        def readiness() -> dict[str, bool]:
            checks = {**_readiness(pipeline, mqtt, server, mllp), "dicom": dicom.listening}
            record_readiness(metrics, checks)  # /metrics shows what /readyz answers
            return checks

        # With a certificate, the handshakes are the gateway's own (`gateway.https`): told when
        # they fail, and the files read again on SIGHUP.
        http_tls = listener_tls(
            "http",
            lambda: server_context(settings.http.tls_cert, settings.http.tls_key, None),
            "QANTARA_HTTP_TLS_CERT, _KEY",
        )
        http_handshakes = GroupTasks("http-tls-handshake")
        server = _EmbeddedServer(
            uvicorn.Config(
                create_app(
                    pool=api_pool,
                    metrics=metrics,
                    readiness=readiness,
                    api=ApiSettings(
                        default_count=settings.http.default_count,
                        max_count=settings.http.max_count,
                        cursor_secret=settings.http.cursor_secret,
                    ),
                    dicom_storage=settings.dicom.storage,
                ),
                host=settings.bind,
                port=settings.http.port,
                # httptools (a C parser; the loop stays asyncio's: MQTT, MLLP, DICOM share it),
                # closing connections that send nothing (gateway.http_protocol).
                http=(
                    counted_in(metrics)
                    if http_tls is None
                    else https_protocol(http_tls, http_handshakes, metrics)
                ),
                limit_concurrency=settings.http.max_connections,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout / 2)),
            )
        )

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def reload_tls() -> None:
            logger.info("SIGHUP: reloading the TLS files of the HTTP, MLLP and DICOM listeners")
            taken = {
                "http": http_tls is not None and http_tls.reload(),
                "mllp": mllp.reload_tls(),
                "dicom": dicom.reload_tls(),
            }
            renewed = tuple(listener for listener, new in taken.items() if new)
            _tls_dates(settings, metrics, renewed)

        loop.add_signal_handler(signal.SIGHUP, reload_tls)
        stack.callback(_remove_signal_handlers, loop)

        _tune_garbage_collector()
        try:
            async with asyncio.TaskGroup() as group:
                pipeline_task = group.create_task(pipeline.run(), name="pipeline")
                mqtt_task = group.create_task(mqtt.run(), name="mqtt")
                http_handshakes.open(group)
                http_task = group.create_task(_serve_http(server, settings), name="http")
                mllp_task = group.create_task(mllp.run(), name="mllp")
                upkeep = group.create_task(
                    _upkeep(pool, pipeline, settings, readiness), name="upkeep"
                )
                ledger_pruning = group.create_task(
                    _prune_ledger(pool, settings), name="ledger-pruning"
                )
                await _start_dicom(dicom, gateway, settings)
                storage_watch = group.create_task(  # after start: the store's folder exists
                    _watch_storage(
                        metrics, settings.dicom.storage, settings.dicom.limits().mount_check
                    ),
                    name="storage-watch",
                )
                await _announce_mllp(mllp, gateway, settings)
                await _announce(server, gateway, settings)
                extra_tasks = [group.create_task(extra(gateway)) for extra in extras]

                await stop.wait()
                logger.info("stopping: no new input, draining the pipeline")
                mqtt.stop()
                mllp.stop()
                server.should_exit = True
                http_handshakes.close()
                await dicom.stop()  # running stores still commit: the pipeline drains after
                try:
                    async with asyncio.timeout(settings.shutdown_timeout):
                        await pipeline.close()
                        await pipeline_task
                        await http_task
                        await mllp_task
                        await asyncio.sleep(0.2)  # let the last PUBACKs leave the socket
                except TimeoutError:
                    logger.warning("shutdown timeout: cancelling what is left")
                for task in (
                    pipeline_task,
                    mqtt_task,
                    http_task,
                    mllp_task,
                    upkeep,
                    ledger_pruning,
                    storage_watch,
                    *extra_tasks,
                ):
                    task.cancel()
        except* (ListenerError, ConfigError) as group:
            # A port that cannot be taken, a DICOM store that cannot be opened: the gateway
            # ends at start, in one line (the CLI's).
            raise _first(group) from None
        logger.info("stopped")


async def _prepare_schema(pool: asyncpg.Pool, settings: Settings, *, migrate: bool) -> None:
    """Apply pending migrations (as the migrate URL's user), or refuse to run on an old schema.

    Without QANTARA_MIGRATE_DATABASE_URL the runtime URL's user tries, as before roles existed;
    a runtime role that may not (least privilege) gets through only when nothing is pending.
    """
    roles = GroupRoles.with_prefix(settings.database.role_prefix)
    if migrate:
        dsn = settings.database.migrate_dsn or settings.database.url
        assert dsn is not None  # noqa: S101 - run() checked the URL
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except Exception as exc:
            if is_transient(exc):
                raise StorageUnavailable(f"migrate: cannot connect: {type(exc).__name__}") from exc
            raise
        try:
            await apply_migrations(conn, roles)
        finally:
            await conn.close()
        return
    async with pool.acquire() as conn:
        pending = await pending_migrations(conn)
    if pending:
        raise MigrationError(
            f"{describe_pending(pending)} pending and serve was started with --no-migrate: "
            "run `qantara migrate` first"
        )


async def _prune_ledger(pool: asyncpg.Pool, settings: Settings) -> None:
    """The MQTT ledger pruning rounds (storage.ledger); an interval of 0 turns them off."""
    if settings.ledger_prune_interval <= 0:
        return
    pruning = LedgerPruning(keep_seqs=settings.ledger_keep, interval=settings.ledger_prune_interval)
    await run_ledger_pruning(pool, pruning)


def _tune_garbage_collector() -> None:
    """Fewer full collections on the hot path.

    Ingest allocates many short-lived objects (paho messages, envelopes); with the default
    threshold of 700 the collector took about a third of the CPU while draining a backlog.
    Objects alive after start-up are frozen out of future collections, and the young
    generation is collected every 50,000 allocations instead of 700.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _readiness(
    pipeline: GroupCommitPipeline,
    mqtt: MqttVitalsAdapter,
    server: uvicorn.Server,
    mllp: MllpServer,
) -> Mapping[str, bool]:
    return {
        "database": pipeline.available,
        "mqtt": mqtt.connected.is_set(),
        "http": server.started,
        "mllp": mllp.listening.is_set(),
    }


CERTIFICATE_WARNING_DAYS = 21
"""A listener's certificate that expires sooner is warned about at start (and alerted on)."""


def _tls_dates(
    settings: Settings, metrics: Metrics, listeners: tuple[str, ...] = ("http", "mllp", "dicom")
) -> None:
    """Set `qantara_tls_certificate_expiry_timestamp_seconds` for each of `listeners` with TLS
    from the certificate it presents, and `qantara_tls_crl_next_update_timestamp_seconds` from
    the CRL it checks; log both dates."""
    files = {
        "http": (settings.http.tls_cert, None),
        "mllp": (settings.mllp.tls_cert, settings.mllp.tls_crl),
        "dicom": (settings.dicom.tls_cert, settings.dicom.tls_crl),
    }
    for listener in listeners:
        cert, crl = files[listener]
        if cert is not None:
            gauge, what = metrics.tls_certificate_expiry, "certificate valid until"
            _tls_date(gauge, listener, what, functools.partial(not_after, cert))
        if crl is not None:
            gauge, what = metrics.tls_crl_next_update, "CRL to replace by"
            _tls_date(gauge, listener, what, functools.partial(next_update, crl))


def _tls_date(gauge: Gauge, listener: str, what: str, read: Callable[[], datetime]) -> None:
    """One date (a certificate's end, a CRL's next update) into `gauge` and the log: a warning
    when it is less than `CERTIFICATE_WARNING_DAYS` away."""
    try:
        when = read()
    except (OSError, CertificateError) as exc:
        logger.warning("%s TLS: %s: the date is unreadable (%s)", listener, what, exc)
        return
    gauge.labels(listener).set(when.timestamp())
    days = (when - datetime.now(UTC)).total_seconds() / 86400
    log = logger.warning if days < CERTIFICATE_WARNING_DAYS else logger.info
    log("%s TLS %s %s (%.0f days)", listener, what, when.isoformat(), days)


async def _announce(server: uvicorn.Server, gateway: Gateway, settings: Settings) -> None:
    """Wait for the HTTP socket, then log the chosen ports (port 0 picks a free one)."""
    async with asyncio.timeout(30):
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.02)
    sockets = [s for srv in server.servers for s in srv.sockets]
    gateway.ports["http"] = int(sockets[0].getsockname()[1])
    gateway.ready.set()
    if settings.http.tls_cert is not None:
        logger.info("HTTP listener speaks TLS only")
    logger.info("listening http=%s:%d", settings.bind, gateway.ports["http"])


async def _announce_mllp(mllp: MllpServer, gateway: Gateway, settings: Settings) -> None:
    """Wait for the MLLP socket, then log its port (chosen by the system for port 0)."""
    async with asyncio.timeout(30):
        await mllp.listening.wait()
    assert mllp.port is not None  # noqa: S101 - set before `listening`
    gateway.ports["mllp"] = mllp.port
    logger.info("listening mllp=%s:%d", settings.bind, mllp.port)
    if settings.mllp.tls_cert is not None:
        logger.info(
            "mllp requires TLS (client certificates: %s)", settings.mllp.tls_client_ca is not None
        )


def _first(group: BaseExceptionGroup[ListenerError | ConfigError]) -> BaseException:
    """The first exception of a group, inside the groups nested in it (a listener's own)."""
    first: BaseException = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


async def _serve_http(server: uvicorn.Server, settings: Settings) -> None:
    """uvicorn's server, whose start-up failure (its port in use...) is a `ListenerError`.

    uvicorn logs why, then calls `sys.exit`: a SystemExit raised in a task leaves the event loop
    at once, every other task still pending, and the gateway neither served nor stopped."""
    try:
        await server.serve()
    except SystemExit:
        why = "could not start (the uvicorn.error line before says why)"
        raise ListenerError("http", settings.bind, settings.http.port, why) from None


async def _start_dicom(dicom: DicomServer, gateway: Gateway, settings: Settings) -> None:
    """Bind the DICOM listener, then log its port (chosen by the system for port 0)."""
    port = await dicom.start()
    gateway.ports["dicom"] = port
    logger.info("listening dicom=%s:%d", settings.bind, port)


async def _upkeep(
    pool: asyncpg.Pool,
    pipeline: GroupCommitPipeline,
    settings: Settings,
    readiness: Callable[[], Mapping[str, bool]],
) -> None:
    """Database health for readiness (and its gauges), and partitions created ahead."""
    last_partitions = asyncio.get_running_loop().time()
    while True:
        await asyncio.sleep(HEALTH_CHECK_INTERVAL)
        await pipeline.check_database()
        readiness()  # sets qantara_ready and qantara_readiness_check{check}
        loop_time = asyncio.get_running_loop().time()
        if loop_time - last_partitions > PARTITION_INTERVAL and pipeline.available:
            with suppress(StorageUnavailable, OSError, asyncpg.PostgresError):
                await _ensure_partitions(pool, settings)
                last_partitions = loop_time


async def _watch_storage(metrics: Metrics, path: Path, mount_check: Path | None) -> None:
    """The DICOM store's free and total bytes, and whether its volume is mounted (with a mount
    check file), measured now and every 30 s.

    In a thread and in its own task: a network file system may answer slowly, and must not hold
    the upkeep of readiness.
    """
    while True:
        await asyncio.to_thread(record_storage_usage, metrics, path, mount_check)
        await asyncio.sleep(STORAGE_CHECK_INTERVAL)


async def _ensure_partitions(pool: asyncpg.Pool, settings: Settings) -> None:
    now = datetime.now(UTC)
    created = await ensure_partitions(
        pool,
        now - PARTITIONS_BEHIND,
        now + settings.database.partitions_ahead,
    )
    if created:
        logger.info("created %d time partitions", created)


def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
