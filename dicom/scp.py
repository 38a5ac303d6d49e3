"""The DICOM listener: Verification, Storage of every storage SOP class, Patient/Study Root C-FIND,
C-GET and C-MOVE, Storage Commitment.

Our own DICOM upper layer on the gateway's event loop: `asyncio` accepts the connections, each
association is one task in the server's `TaskGroup`, the protocol is the sans-IO core (`dicom.pdu`,
`dicom.dimse`, `dicom.association`; the policy in `dicom.negotiation`), the socket side is
`dicom.link`. A C-STORE dataset is hashed as its fragments come off the wire and written to a file
in the store's temp folder by batches of a MiB on the association's file queue
(`dicom.write_behind`, `dicom.serial_queue`, `dicom.spool`: never more than a few MiB of it in
memory, never copied, never read twice), after a Part 10 header (`dicom.filemeta`). Then, queued
behind them and in worker threads: the file is linked to its content-derived name by
`FileStore.commit`, its header parsed without pixel data by `read_metadata` while the file and, each
in a worker, its new folders are fsynced; only then is its index row handed to the group-commit
pipeline. The status goes back after COMMIT:

- stored, or the same bytes again: 0x0000;
- the same SOP Instance UID with other content: 0xB006, the first copy kept, a conflict counted;
- refused content (unparseable, truncated, missing or invalid UIDs): 0xC000 family + dead letter;
- database unavailable or disk full: 0xA700, no temp file left and no index row (a complete
  file under its final name may stay: a resend reuses it, else the orphan sweep removes it);
- a command without Affected SOP Class/Instance UID: 0xC001 (its response names `0`), the
  association goes on.

C-FIND is `dicom.find_scp`, C-GET and C-MOVE `dicom.retrieve_scp`, Storage Commitment
`dicom.commitment_scp`; the files that no index row names (a crash between the link and the
commit, 0xA700 from the database) are `dicom.orphan_sweep`'s, a task in the server's group.

Associations over `max_associations` get an A-ASSOCIATE-RJ (transient, local limit exceeded);
timeouts: `acse_timeout` until the request, `dimse_timeout` inside a message, `network_timeout`
between messages (then A-ABORT). Malformed input gets an A-ABORT or A-ASSOCIATE-RJ with its PS3.8
reason and never takes down the listener or another association.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import logging
import os
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeVar

from dicom import dimse, sop_classes, status
from dicom.association import (
    Aborted,
    Acceptor,
    AssociationRequested,
    CommandReceived,
    ConnectionClosed,
    DatasetComplete,
    DatasetFragment,
    ProtocolError,
    ReleaseRequested,
    State,
)
from dicom.audit import Auditor
from dicom.commitment_delivery import ReportQueue, Reports
from dicom.commitment_scp import Holder, answer_commitment, report_answered
from dicom.config import DicomSettings
from dicom.filemeta import file_meta
from dicom.filestore import FileStore, StagedFile, StoredFile, fsync_dir
from dicom.find_scp import Finder, answer_find
from dicom.link import TIMED_OUT, Ended, Link
from dicom.metadata import DicomInputError, InstanceMetadata, read_metadata
from dicom.negotiation import Refused, gateway_policy, limit_reached, negotiate
from dicom.orphan_sweep import Guard, Indexed, OrphanSweep
from dicom.retrieve_scp import Locator, Retrieval, answer_retrieve, retrieves
from dicom.serial_queue import SerialQueue
from dicom.spool import Chunk, StoreFull, StoreNotMounted
from dicom.write_behind import SPOOL_BATCH, Spools, WriteBehind
from dicom.writeback import drop_cached
from ingest.errors import ConfigError, ListenerError, StorageUnavailable
from ingest.group_tasks import GroupTasks
from ingest.pipeline import GroupCommitPipeline
from ingest.records import (
    DeadLetter,
    DeadLetterKey,
    DicomKey,
    Envelope,
    Outcome,
    OutcomeKind,
    Protocol,
    Record,
)
from ingest.tls import ListenerTls, TlsIntake, listener_tls
from monitoring.metrics import Metrics
from monitoring.thread_names import name_native_thread

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
DEAD_LETTER_PREFIX: Final = 64 * 1024
CONFLICT_REASON: Final = "content-conflict"  # storage.writer_dicom.CONFLICT
STOP_GRACE_SECONDS: Final = 5.0
REPORT_TIMEOUT_SECONDS: Final = 10.0
"""Bound on each step of a Storage Commitment report on the modality's own association (connect,
associate, send, answer, release)."""
SLOW_OPEN_SECONDS: Final = 5.0  # a store open slower than this is logged (the disk stalls)
RELEASE_CLEANUP_SECONDS: Final = 5.0
"""At most this long, the A-RELEASE-RP waits for the association's prepared spool file to go."""
PLACEHOLDER_UID: Final = "0"
"""Stands for an Affected SOP UID a C-STORE command lacked; never indexed (refused)."""
REJECT_REASONS: Final = ("unparseable", "missing-uid", "invalid-uid", "uid-mismatch")
CONFLICT_COMMENT: Final = "instance already stored with other content; first copy kept"


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    comment: str | None = None


class _DiskError(Exception):
    """A file step failed; `relative`: the final name left behind, if any (a suspect orphan)."""

    def __init__(self, step: str, cause: OSError, relative: str | None = None) -> None:
        super().__init__(f"{step} failed: {_why(cause)}")
        self.full = cause.errno in (errno.ENOSPC, errno.EDQUOT)  # the disk, or our quota
        self.relative = relative


def _why(cause: OSError) -> str:
    """What the system said of a failed file step, without the file's name: "No space left on
    device", the reserve of `QANTARA_DICOM_MIN_FREE_SPACE` reached, the volume away."""
    if isinstance(cause, StoreFull):
        return f"free space at the reserve (QANTARA_DICOM_MIN_FREE_SPACE, {cause.reserve} bytes)"
    if isinstance(cause, StoreNotMounted):
        return f"the store's volume is not mounted ({cause.mount_check} is missing)"
    if cause.errno is not None:
        return os.strerror(cause.errno)
    return type(cause).__name__


class _Refused(Exception):
    def __init__(self, error: DicomInputError, sha256: bytes, prefix: bytes) -> None:
        super().__init__(error.reason)
        self.error = error
        self.sha256 = sha256
        self.prefix = prefix


_RECEIVED: Final = _Answer(status.SUCCESS, "received")
"""`_spool`'s sentinel: the dataset is complete, not yet answered."""

_REFUSALS: Final = {
    "application_context": "not the DICOM application context",
    "calling_ae": "calling AE title not in QANTARA_DICOM_ALLOWED_AES",
    "certificate": "calling AE title not a commonName of its TLS certificate",
    "called_ae": "called AE title not ours",
    "local_limit": "local limit (QANTARA_DICOM_MAX_ASSOCIATIONS)",
}
"""What the log says of each `Refused.reason`."""


class DicomServer:
    """The listener on `bind:port`; `start()` in the loop, `stop()` at shutdown."""

    def __init__(
        self,
        settings: DicomSettings,
        *,
        bind: str,
        pipeline: GroupCommitPipeline,
        store: FileStore,
        finder: Finder,
        holder: Holder,
        locator: Locator,
        auditor: Auditor,
        reports: ReportQueue,
        metrics: Metrics,
        indexed: Indexed | None = None,
        sweep_guard: Guard | None = None,
        file_threads: int | None = None,
    ) -> None:
        self._settings = settings
        self._limits = settings.limits()  # what each received file checks, the same for all
        self._file_threads = file_threads
        self._bind = bind
        self._pipeline = pipeline
        self._store = store
        self._finder = finder
        self._holder = holder
        self._outbound_tls = listener_tls(
            "DICOM outbound", settings.outbound_ssl_context, "QANTARA_DICOM_OUTBOUND_TLS_*"
        )
        self._reports = Reports(
            reports,
            settings.report_address,
            settings.ae_title,
            min(settings.acse_timeout, REPORT_TIMEOUT_SECONDS),
            settings.max_pdu,
            metrics,
            self._outbound_context,
        )
        self._orphans = OrphanSweep(store, indexed, settings, metrics, sweep_guard)
        self._retrieval = Retrieval(
            locator, auditor, self._work, store.root, self._outbound_context
        )
        self._metrics = metrics
        metrics.dicom_storage_reserved.set(settings.min_free_space)
        self._policy = gateway_policy(
            settings.ae_title,
            settings.max_pdu,
            settings.allowed_aes,
            settings.require_called_ae,
            settings.tls_ae_from_cn,
            settings.retrieve_aes,
            settings.query_aes,
        )
        self._listener: asyncio.Server | None = None
        self._runner: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshakes = GroupTasks("dicom-tls-handshake")
        self._tls: ListenerTls | None = None
        self._stopping = asyncio.Event()
        self._grace = STOP_GRACE_SECONDS
        # Blocking file work of every association, in two sets of threads so that no step ever
        # waits for another queued behind it: `_spoolers` run each association's file queue
        # (create, write, then the `_settle` of each C-STORE, one thread per busy queue);
        # `_workers` the steps a settle waits for and that wait for nothing (parse, fsync,
        # remove).
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._spoolers: concurrent.futures.ThreadPoolExecutor | None = None
        self._associations = 0
        self.port: int | None = None

    @property
    def store_root(self) -> Path:
        return self._store.root

    @property
    def listening(self) -> bool:
        return self._listener is not None

    async def start(self) -> int:
        """Open the store, bind and serve; returns the bound port. Raises ConfigError when the
        store's mount check file is missing or the store cannot be opened (its folder cannot be
        made, read or swept), ListenerError when the port cannot be bound."""
        opening = time.perf_counter()
        # Before the store opens: it would make its folders on the disk beneath.
        await asyncio.to_thread(self._settings.require_mounted)
        try:
            await asyncio.to_thread(self._store.open)
        except OSError as exc:
            raise ConfigError(
                f"QANTARA_DICOM_STORAGE: cannot open the DICOM store {self._store.root}: "
                f"{_why(exc)}"
            ) from exc
        if (took := time.perf_counter() - opening) > SLOW_OPEN_SECONDS:
            logger.warning("DICOM store took %.1f s to open (folder fsyncs, temp sweep)", took)
        await asyncio.to_thread(_warn_of_reserve, self._store.root, self._settings.min_free_space)
        s = self._settings
        self._tls = listener_tls("dicom", s.ssl_context, "QANTARA_DICOM_TLS_*")
        self._metrics.init_reasons("dicom", [*REJECT_REASONS, "storage-refused"])
        self._metrics.dicom_associations.set(0)
        self._workers = concurrent.futures.ThreadPoolExecutor(
            self._file_threads or min(32, 2 * s.max_associations + 2),
            thread_name_prefix="dicom-file",
            initializer=name_native_thread,
        )
        self._spoolers = concurrent.futures.ThreadPoolExecutor(
            self._file_threads or min(32, s.max_associations),
            thread_name_prefix="dicom-spool",
            initializer=name_native_thread,
        )
        self._stopping = asyncio.Event()
        ready = asyncio.Event()
        self._runner = asyncio.create_task(self._run(ready), name="dicom-listener")
        await ready.wait()
        loop = asyncio.get_running_loop()
        factory = self._connect if self._tls is None else self._connect_tls
        try:
            self._listener = await loop.create_server(factory, self._bind, s.port)
        except OSError as exc:
            await self._wind_down(0.0)  # nothing was accepted: nothing to wait for
            raise ListenerError.binding("dicom", self._bind, s.port, exc) from None
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop accepting; let running associations finish for `grace` seconds, then abort."""
        listener, self._listener = self._listener, None
        if listener is None and self._runner is None:
            return
        if listener is not None:
            listener.close()
        await self._wind_down(grace)  # also after a start cancelled before its listener

    async def _wind_down(self, grace: float) -> None:
        """End the task group (associations get `grace` seconds), then the thread pools."""
        self._grace = grace
        self._stopping.set()
        if self._runner is not None:
            await self._runner
            self._runner = None
        for pool in (self._spoolers, self._workers):  # settles wait for workers: first
            if pool is not None:
                await asyncio.to_thread(pool.shutdown, wait=True)
        self._spoolers = self._workers = None

    async def _run(self, ready: asyncio.Event) -> None:
        """The server's task group: the sweeper, the delivery of Storage Commitment reports
        and one task per association."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            self._handshakes.open(group)
            self._reports.open(group)
            sweeper = group.create_task(self._orphans.run(), name="dicom-sweep")
            reporter = group.create_task(self._reports.run(), name="dicom-commitment-reports")
            ready.set()
            await self._stopping.wait()
            self._group = None
            sweeper.cancel()
            reporter.cancel()
            self._handshakes.close()
            running = set(self._tasks)
            if running:
                _, late = await asyncio.wait(running, timeout=self._grace)
                for task in late:
                    task.cancel()
            self._reports.close()  # attempts in flight: their reports wait in the database
        await self._reports.release()

    def _connect(self) -> Link[Acceptor]:
        """A new connection (protocol factory). Its association's task starts once the
        connection is made: with TLS, after the handshake, so that a peer whose handshake fails
        leaves no task behind."""
        s = self._settings
        return Link(
            Acceptor(s.max_pdu),
            high_water=2 * s.max_pdu,
            send_timeout=s.dimse_timeout,
            on_made=self._begin,
        )

    def reload_tls(self) -> bool:
        """Read the TLS files again for the associations to come (SIGHUP), the listener's and
        the outbound ones; the open associations keep theirs. True when the listener took new
        files."""
        if self._outbound_tls is not None:
            self._outbound_tls.reload()
        return self._tls is not None and self._tls.reload()

    def _outbound_context(self) -> ssl.SSLContext | None:
        return None if self._outbound_tls is None else self._outbound_tls.context()

    def _connect_tls(self) -> TlsIntake:
        """A new connection to the TLS listener (protocol factory): its handshake runs in a task
        of the group, within the ACSE timeout; then `_connect`'s link gets the TLS transport."""
        assert self._tls is not None  # noqa: S101 - the factory of the TLS listener only
        return TlsIntake(
            self._tls.context,
            self._connect,
            self._handshakes.start,
            listener="dicom",
            within=self._settings.acse_timeout,
            metrics=self._metrics,
        )

    def _begin(self, link: Link[Acceptor]) -> None:
        """The association's task joins the group; refused while stopping."""
        group = self._group
        if group is None:
            link.refuse()
            return
        task = group.create_task(self._association(link), name="dicom-association")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one association --------------------------------------------------------------------

    async def _association(self, link: Link[Acceptor]) -> None:
        s = self._settings
        counted = False
        try:
            event = await link.next_event(s.acse_timeout)
            if not isinstance(event, AssociationRequested):
                self._end(link, event)
                return
            calling = event.request.calling_ae[:16]
            answer = negotiate(event.request, self._policy, link.certified_names)
            if self._associations >= s.max_associations and not isinstance(answer, Refused):
                answer = limit_reached()
            if isinstance(answer, Refused):
                log = logger.warning if answer.reason == "local_limit" else logger.info
                log("DICOM association from %s rejected: %s", calling, _REFUSALS[answer.reason])
                self._metrics.dicom_associations_rejected.labels(answer.reason).inc()
                link.close(link.endpoint.reject(answer.reject))
                return
            counted = True
            self._associations += 1
            self._metrics.dicom_associations.set(self._associations)
            await link.send(link.endpoint.accept(answer))
            link.pump()  # what arrived while we decided
            queue = SerialQueue(_started(self._spoolers))
            spools = Spools(self._store.tmp, queue, self._limits)
            try:
                await self._serve(link, calling, spools)
            finally:
                spools.close()
        except asyncio.CancelledError:
            link.close(link.endpoint.abort())
            raise
        except TimeoutError:  # Link.send: the peer stopped reading
            logger.info("DICOM association aborted: the peer does not read")
            link.close(link.endpoint.abort())
        except Exception as exc:  # noqa: BLE001 - one association's failure must not end the others
            logger.error("DICOM association failed: %s", type(exc).__name__)
            link.close(link.endpoint.abort())
        finally:
            if counted:
                self._associations -= 1
                self._metrics.dicom_associations.set(self._associations)
            link.close()

    async def _serve(self, link: Link[Acceptor], calling: str, spools: Spools) -> None:
        s = self._settings
        while True:
            busy = link.endpoint.in_message
            event = await link.next_event(s.dimse_timeout if busy else s.network_timeout)
            if isinstance(event, CommandReceived):
                ended = await self._command(link, event, calling, spools)
                if ended is not None:
                    self._end(link, ended)
                    return
            elif isinstance(event, ReleaseRequested):
                await spools.release(RELEASE_CLEANUP_SECONDS)
                link.close(link.endpoint.release_reply())
                return
            elif not isinstance(event, DatasetFragment | DatasetComplete):
                self._end(link, event)
                return

    def _end(self, link: Link[Acceptor], event: Ended) -> None:
        if isinstance(event, ProtocolError):
            logger.info("DICOM association aborted: %s", event.detail)
            link.close(event.reply)
        elif event == TIMED_OUT:
            logger.info("DICOM association timed out")
            # ARTIM before a request: just close (PS3.8 AA-2); an association: A-ABORT.
            established = link.endpoint.state is State.ESTABLISHED
            link.close(link.endpoint.abort() if established else b"")
        elif isinstance(event, Aborted | ConnectionClosed):
            link.close()
        else:
            link.close(link.endpoint.abort())

    async def _command(
        self, link: Link[Acceptor], event: CommandReceived, calling: str, spools: Spools
    ) -> Ended | None:
        command = event.command
        field = command.command_field
        if field == dimse.N_EVENT_REPORT_RSP:
            report_answered(command, calling, self._metrics)
        if not command.is_request or field == dimse.C_CANCEL_RQ:
            return await self._skip_dataset(link, command)  # noted by the link already
        if field == dimse.C_STORE_RQ and event.abstract_syntax in sop_classes.STORAGE:
            return await self._c_store(link, event, calling, spools)
        if field == dimse.C_FIND_RQ and event.abstract_syntax in sop_classes.FIND_MODELS:
            return await answer_find(
                link, event, self._finder, self._retrieval.auditor, self._settings, calling
            )
        if retrieves(command, event.abstract_syntax):
            return await answer_retrieve(
                link, event, self._retrieval, self._settings, self._metrics, calling
            )
        if field == dimse.N_ACTION_RQ and event.abstract_syntax == sop_classes.STORAGE_COMMITMENT:
            return await answer_commitment(
                link, event, self._holder, self._settings, self._metrics, calling, self._reports
            )
        ended = await self._skip_dataset(link, command)
        if ended is not None:
            return ended
        if field == dimse.C_ECHO_RQ:
            answer = dimse.echo_response(command, status.SUCCESS)
        else:
            answer = dimse.unrecognized_response(command)
        await link.send(link.endpoint.send_message(event.context_id, answer))
        return None

    async def _skip_dataset(self, link: Link[Acceptor], command: dimse.Command) -> Ended | None:
        if not command.has_dataset:
            return None
        return await link.receive_dataset(lambda data: None, self._settings.dimse_timeout)

    # --- C-STORE ------------------------------------------------------------------------------

    async def _c_store(
        self, link: Link[Acceptor], event: CommandReceived, calling: str, spools: Spools
    ) -> Ended | None:
        started = time.perf_counter()
        received_at = datetime.now(UTC)
        self._metrics.received.labels(Protocol.DICOM.value).inc()
        command = event.command
        if not command.has_dataset:
            answer = _Answer(status.CANNOT_UNDERSTAND, "C-STORE without a dataset")
        else:
            writer = spools.take()
            received = await self._spool(link, writer, event)
            if not isinstance(received, _Answer):
                return received
            answer = received
            if answer is _RECEIVED:
                answer = await self._keep(writer, spools, event, calling, received_at)
                self._metrics.dicom_store_seconds.observe(time.perf_counter() - started)
        response = dimse.store_response(command, answer.status, answer.comment, PLACEHOLDER_UID)
        await link.send(link.endpoint.send_message(event.context_id, response))
        spools.prepare()  # the next dataset's file, while the sender reads this answer
        return None

    async def _spool(
        self, link: Link[Acceptor], writer: WriteBehind, event: CommandReceived
    ) -> _Answer | Ended:
        """Receive the dataset into `writer`'s spool file after its Part 10 header, handing it a
        batch whenever `SPOOL_BATCH` bytes have arrived. `_RECEIVED`: all received, batches
        maybe still queued and the last one to write (by `_settle`, queued behind them); else the
        spool file is gone and this is the answer (0xA700) or what ended the association."""
        command = event.command
        spool = writer.spool
        spool.add(
            file_meta(
                command.affected_sop_class or PLACEHOLDER_UID,
                command.affected_sop_instance or PLACEHOLDER_UID,
                event.transfer_syntax,
            )
        )
        try:
            while True:
                received = await link.next_event(self._settings.dimse_timeout)
                if isinstance(received, DatasetFragment):
                    if writer.failed is not None:
                        continue  # read off the wire, then answered 0xA700
                    spool.add(received.data)
                    if spool.batched >= SPOOL_BATCH:
                        await writer.write(spool.take())
                elif isinstance(received, DatasetComplete):
                    break
                else:
                    writer.discard()
                    return received
        except BaseException:
            writer.discard()
            raise
        if writer.failed is not None:
            writer.discard()
            return self._disk_unavailable(_DiskError("writing", writer.failed))
        return _RECEIVED

    async def _keep(
        self,
        writer: WriteBehind,
        spools: Spools,
        event: CommandReceived,
        calling: str,
        received_at: datetime,
    ) -> _Answer:
        """Write, link, fsync, parse, index: the answer to a complete dataset."""
        try:
            meta, stored = await writer.settle(
                self._settle, writer, writer.spool.take(), calling, event.command
            )
        except _Refused as refused:
            return await self._refuse(
                refused.sha256, refused.prefix, calling, received_at, refused.error
            )
        except _DiskError as exc:
            if exc.relative is not None:
                self._orphans.suspect(exc.relative)
            return self._disk_unavailable(exc)
        try:
            outcome = await self._commit(
                DicomKey(meta.sop_instance_uid),
                (meta.record(stored.relative, stored.size, stored.sha256, calling),),
                received_at,
                calling,
                f"dicom instance file={stored.relative}".encode(),
            )
        except StorageUnavailable as exc:
            # The complete file stays under its content name: a resend finds it again; if none
            # comes, the orphan sweep removes it.
            self._orphans.suspect(stored.relative)
            return self._unavailable("database", str(exc))
        return await self._answer(outcome, stored)

    def _settle(
        self, writer: WriteBehind, rest: list[Chunk], calling: str, command: dimse.Command
    ) -> tuple[InstanceMetadata, StoredFile]:
        """On the association's file queue, after its batches: write the last one, give the file
        its content name, then fsync it while workers fsync the folders of its name and another
        parses its header; the page cache then drops it. Raises `_Refused` (the file is removed
        again) or `_DiskError`."""
        spool = writer.spool
        try:
            if writer.failed is not None:
                raise writer.failed
            spool.write(rest)
            sha256, size, fd = spool.finish()
        except OSError as exc:
            spool.discard()
            raise _DiskError("writing", exc) from exc
        staged = StagedFile(spool.path, sha256, size, durable=False)
        try:
            try:
                stored = self._store.commit(staged)
            except OSError as exc:
                raise _DiskError("rename", exc) from exc
            path = self._store.root / stored.relative
            complete = bool(command.affected_sop_class) and bool(command.affected_sop_instance)
            workers = _started(self._workers)
            # Each folder in a worker of its own, beside the file: on ext4 their fsyncs and the
            # file's wait for the same journal commit, and their cache flushes overlap instead
            # of following one another. Submitted before the parse: a worker needs the GIL to
            # reach its fsync, and the parse holds it for 0.2-0.5 ms (pure Python); behind it,
            # the folders' fsyncs started 0.25-0.45 ms after the file's instead of with it (the
            # cycle itself did not change measurably: 1.002 and 0.982, blocks of 25 alternated).
            folders = [workers.submit(fsync_dir, folder) for folder in stored.folders]
            parsing = workers.submit(
                read_metadata,
                path,
                calling_ae=calling,
                command_sop_instance_uid=command.affected_sop_instance if complete else "",
                command_sop_class_uid=command.affected_sop_class if complete else "",
            )
            return self._durable(stored, fd, folders, parsing.result), stored
        finally:
            os.close(fd)

    def _durable(
        self,
        stored: StoredFile,
        fd: int,
        folders: list[concurrent.futures.Future[None]],
        parsed: Callable[[], InstanceMetadata],
    ) -> InstanceMetadata:
        """`_settle`'s end: fsync the file (its folders' fsyncs run in workers), take the parse's
        result, then let the page cache drop the file (`drop_cached`): an answered instance is
        cold, and the next one's writes reuse those pages instead of growing the cache."""
        unsynced: OSError | None = None
        try:
            if not stored.synced:
                os.fsync(fd)  # not fdatasync: the new link goes in the same journal commit
        except OSError as exc:
            unsynced = exc
        for folder in folders:
            try:
                folder.result()
            except OSError as exc:
                unsynced = unsynced or exc
        if unsynced is None:
            self._store.mark_durable(stored)
        try:
            meta = parsed()
        except DicomInputError as exc:
            prefix = _prefix(self._store.root / stored.relative)
            self._store.remove(stored)  # refused bytes are refused again: no good copy there
            raise _Refused(exc, stored.sha256, prefix) from exc
        except OSError as exc:
            raise _DiskError("reading", exc, stored.relative) from exc
        if unsynced is not None:
            raise _DiskError("fsync", unsynced, stored.relative)
        drop_cached(fd)
        return meta

    async def _answer(self, outcome: Outcome, stored: StoredFile) -> _Answer:
        if outcome.kind is OutcomeKind.STORED:
            self._metrics.dicom_stored_bytes.inc(stored.size)
            return _Answer(status.SUCCESS)
        if outcome.kind is OutcomeKind.DUPLICATE:
            if outcome.reason != CONFLICT_REASON:
                return _Answer(status.SUCCESS)
            self._metrics.dicom_conflicts.inc()
            await self._work(self._store.remove, stored)
            logger.warning("DICOM conflict: a stored SOP Instance UID came with other content")
            return _Answer(status.ELEMENTS_DISCARDED, CONFLICT_COMMENT)
        # Refused by the database (dead-lettered): no row names the file, and the sender was not
        # told 0x0000. The sweep removes it once no store of the same bytes has named it.
        self._orphans.suspect(stored.relative)
        return _Answer(status.for_reason(outcome.reason), outcome.reason)

    async def _refuse(
        self,
        sha256: bytes,
        prefix: bytes,
        calling: str,
        received_at: datetime,
        error: DicomInputError,
    ) -> _Answer:
        logger.info("DICOM C-STORE from %s refused: %s", calling, error.reason)
        letter = DeadLetter(
            protocol=Protocol.DICOM,
            source=calling,
            reason=error.reason,
            detail=error.detail,
            raw=prefix,
        )
        try:
            await self._commit(
                DeadLetterKey(Protocol.DICOM, calling, sha256),
                (letter,),
                received_at,
                calling,
                prefix,
            )
        except StorageUnavailable as exc:
            return self._unavailable("database", str(exc))
        return _Answer(status.for_reason(error.reason), error.reason)

    def _unavailable(self, cause: str, detail: str, comment: str | None = None) -> _Answer:
        logger.warning("DICOM C-STORE answered 0xA700 (%s): %s", cause, detail)
        self._metrics.dicom_unavailable.labels(cause).inc()
        return _Answer(status.OUT_OF_RESOURCES, comment or f"{cause} unavailable")

    def _disk_unavailable(self, error: _DiskError) -> _Answer:
        """0xA700 for a failed file step; the Error Comment says "disk full" when it is (the
        kernel's ENOSPC, or the reserve reached), which a modality's operator can act on."""
        return self._unavailable("disk", str(error), "disk full" if error.full else None)

    async def _commit(
        self,
        key: DicomKey | DeadLetterKey,
        records: tuple[Record, ...],
        received_at: datetime,
        calling: str,
        raw: bytes,
    ) -> Outcome:
        """Hand an envelope to the pipeline and wait for its COMMIT (`store_timeout`)."""
        envelope = Envelope(
            protocol=Protocol.DICOM,
            key=key,
            records=records,
            received_at=received_at,
            ack=asyncio.get_running_loop().create_future(),
            source=calling,
            raw=raw,
        )
        return await self._pipeline.committed(envelope, self._settings.store_timeout)

    def _work(self, function: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        """Run blocking file work in the listener's worker threads."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._workers, functools.partial(function, *args))

    async def sweep_orphans(self, candidates: list[str]) -> int:
        """Remove those of `candidates` no index row names (`OrphanSweep.sweep`); how many went."""
        return await self._orphans.sweep(candidates)


def _warn_of_reserve(root: Path, reserve: int) -> None:
    """Say at start when the store's free space is already at its reserve: every C-STORE would
    be answered 0xA700 "disk full", with nothing else to tell why until the first one."""
    if not reserve:
        return
    usage = shutil.disk_usage(root)
    if usage.total <= reserve:
        logger.error(
            "DICOM store's file system holds %d MiB, not more than its reserve of %d MiB "
            "(QANTARA_DICOM_MIN_FREE_SPACE): every C-STORE is answered 0xA700",
            usage.total >> 20,
            reserve >> 20,
        )
    elif usage.free <= reserve:
        logger.warning(
            "DICOM store has %d MiB free, within its reserve of %d MiB "
            "(QANTARA_DICOM_MIN_FREE_SPACE): C-STOREs are answered 0xA700 until space is freed",
            usage.free >> 20,
            reserve >> 20,
        )


def _started(
    pool: concurrent.futures.ThreadPoolExecutor | None,
) -> concurrent.futures.ThreadPoolExecutor:
    """One of the listener's thread pools, which exist between `start` and `stop`."""
    if pool is None:
        raise RuntimeError("DICOM listener not started")
    return pool


def _prefix(path: Path) -> bytes:
    """The first bytes of a refused file, for its dead letter."""
    try:
        with open(path, "rb") as f:
            return f.read(DEAD_LETTER_PREFIX)
    except OSError:
        return b""
