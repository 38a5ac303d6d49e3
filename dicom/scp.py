"""The DICOM listener: Verification, Storage of every storage SOP class, Patient/Study Root C-FIND.

Our own DICOM upper layer on the gateway's event loop: `asyncio` accepts the connections, each
association is one task in the server's `TaskGroup`, the protocol is the sans-IO core (`dicom.pdu`,
`dicom.dimse`, `dicom.association`; the policy in `dicom.negotiation`), the socket side is
`dicom.link`. A C-STORE dataset is hashed as its fragments come off the wire and written to a file
in the store's temp folder by batches of a MiB on the association's file queue
(`dicom.serial_queue`, `dicom.spool`: never more than a few MiB of it in memory, never copied, never
read twice), after a Part 10 header (`dicom.filemeta`). Then, queued behind them and in worker
threads: the file is linked to its content-derived name by `FileStore.commit`, its header parsed
without pixel data by `read_metadata` while the file and, each in a worker, its new folders are
fsynced; only then is its index row handed to the group-commit pipeline. The status goes back after
COMMIT:

- stored, or the same bytes again: 0x0000;
- the same SOP Instance UID with other content: 0xB006, the first copy kept, a conflict counted;
- refused content (unparseable, truncated, missing or invalid UIDs): 0xC000 family + dead letter;
- database unavailable or disk full: 0xA700, no temp file left and no index row (a complete
  file under its final name may stay: a resend reuses it, else the orphan sweep removes it);
- a command without Affected SOP Class/Instance UID: 0xC001 (its response names `0`), the
  association goes on.

Associations over `max_associations` get an A-ASSOCIATE-RJ (transient, local limit exceeded);
timeouts: `acse_timeout` until the request, `dimse_timeout` inside a message, `network_timeout`
between messages (then A-ABORT). Malformed input gets an A-ABORT or A-ASSOCIATE-RJ with its PS3.8
reason and never takes down the listener or another association.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from pathlib import Path
from typing import Final, TypeVar

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom import dimse, sop_classes, status
from dicom.association import (
    Aborted,
    Acceptor,
    AssociationRequested,
    CommandReceived,
    ConnectionClosed,
    DatasetComplete,
    DatasetFragment,
    Event,
    ProtocolError,
    ReleaseRequested,
    State,
)
from dicom.config import DicomSettings
from dicom.filemeta import file_meta
from dicom.filestore import FileStore, StagedFile, StoredFile, fsync_dir
from dicom.identifier import MAX_IDENTIFIER, IdentifierError, decode_identifier, encode_identifier
from dicom.link import TIMED_OUT, Link
from dicom.metadata import DicomInputError, InstanceMetadata, read_metadata
from dicom.negotiation import gateway_policy, limit_reached, negotiate
from dicom.pdu import AssociateReject
from dicom.serial_queue import SerialQueue
from dicom.spool import Chunk, SpoolFile
from dicom.writeback import drop_cached
from ingest.errors import StorageUnavailable
from ingest.pipeline import GroupCommitPipeline, PipelineClosed
from ingest.records import (
    DeadLetter,
    DeadLetterKey,
    DicomInstance,
    DicomKey,
    Envelope,
    Outcome,
    OutcomeKind,
    Protocol,
    Record,
)
from monitoring.metrics import Metrics
from monitoring.thread_names import name_native_thread
from storage.dicom_queries import LEVELS, FindMatch, FindRequest, FindRequestError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
DEAD_LETTER_PREFIX: Final = 64 * 1024
CONFLICT_REASON: Final = "content-conflict"  # storage.writer_dicom.CONFLICT
STOP_GRACE_SECONDS: Final = 5.0
SLOW_OPEN_SECONDS: Final = 5.0  # a store open slower than this is logged (the disk stalls)
RELEASE_CLEANUP_SECONDS: Final = 5.0
"""At most this long, the A-RELEASE-RP waits for the association's prepared spool file to go."""
ORPHAN_BATCH: Final = 1000
ORPHAN_SCAN_SHARE: Final = 0.25
"""The start-up scan for orphans works at most this share of its time, a top-level shard folder
at a time (`DicomServer._scan`)."""
PLACEHOLDER_UID: Final = "0"
"""Stands for an Affected SOP UID a C-STORE command lacked; never indexed (refused)."""
SPOOL_BATCH: Final = 1 << 20
"""Received bytes held (by reference) before they are handed to the association's file queue as
one batch: one `writev` (`_WriteBehind`). A dataset smaller than this is written in one piece by
its settle, once complete. Each batch wakes the file thread, which then wants the GIL while the
event loop is busy with the transfer: with 1 MiB instead of 64 KiB, a cycle was 0.976 and 0.968
times as long (0.5 MB instances, one association, blocks of 25 instances alternated inside one
gateway, two runs, 2026-11-28)."""
SPOOL_BACKLOG: Final = 1 << 20
"""Bytes handed to the file queue and not yet written beyond which the receiving waits (and the
socket's reading with it): what an association holds in memory stays bounded (a batch being
gathered, the one being written and at most this much more: about 3 MiB)."""
REJECT_REASONS: Final = ("unparseable", "missing-uid", "invalid-uid", "uid-mismatch")
CONFLICT_COMMENT: Final = "instance already stored with other content; first copy kept"

Finder = Callable[[FindRequest], Awaitable[list[FindMatch]]]
Indexed = Callable[[list[str]], Awaitable[set[str]]]
"""Which of these relative file names the index names (`storage.dicom_queries.indexed_files`)."""
Ended = Event | str
"""What ended an association while a handler was reading: an event, or `TIMED_OUT`."""


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    comment: str | None = None


class _DiskError(Exception):
    """A file step failed; `relative`: the final name left behind, if any (a suspect orphan)."""

    def __init__(self, step: str, cause: OSError, relative: str | None = None) -> None:
        super().__init__(f"{step} failed: {type(cause).__name__}")
        self.relative = relative


class _Refused(Exception):
    def __init__(self, error: DicomInputError, sha256: bytes, prefix: bytes) -> None:
        super().__init__(error.reason)
        self.error = error
        self.sha256 = sha256
        self.prefix = prefix


_RECEIVED: Final = _Answer(status.SUCCESS, "received")
"""`_spool`'s sentinel: the dataset is complete, not yet answered."""


class _Spools:
    """An association's spool files, each created on the association's file queue one C-STORE
    ahead: on ext4 a create right after fsyncs waits about a millisecond for the journal, so the
    next dataset's file is created once this one's answer has gone out, while the sender reads
    it and sends the next command, not when the next dataset arrives. Not while the index row
    commits: the create then competed with the database call for the GIL and the journal (one
    association: 76 against 85 stores/s). Not before the answer either: waking the file thread
    costs the event loop about 0.1 ms on a VM, and the answer waited for it (1.047 and 1.021
    times the stores a second, two series of 14 alternated rounds, 2026-11-28)."""

    def __init__(self, folder: Path, queue: SerialQueue) -> None:
        self._folder = folder
        self._queue = queue
        self._next: _WriteBehind | None = None

    def prepare(self) -> None:
        if self._next is None:
            self._next = self._new()

    def take(self) -> _WriteBehind:
        """The next spool file, its creation maybe still running."""
        taken, self._next = self._next or self._new(), None
        return taken

    def _new(self) -> _WriteBehind:
        return _WriteBehind(SpoolFile(self._folder), self._queue)

    def close(self) -> concurrent.futures.Future[None] | None:
        """The association ends: remove the file prepared for a C-STORE that did not come; the
        removal's future (None when nothing was prepared or it ran at once)."""
        prepared, self._next = self._next, None
        return prepared.discard() if prepared is not None else None

    async def release(self, within: float) -> None:
        """The peer asks for a release: `close`, and wait until the file is gone (at most
        `within` seconds), so that a released association has left no spool file."""
        removed = self.close()
        if removed is not None:
            # asyncio.wait, not wait_for: a timeout must not cancel the removal itself.
            await asyncio.wait([asyncio.wrap_future(removed)], timeout=within)


class _WriteBehind:
    """A spool file's steps on its association's file queue, in order: the create, each batch as
    it is handed over, then the settle. The event loop does not wait for a batch to be written
    before it receives the next one (a create or a write to the page cache can wait for the ext4
    journal); it has hashed the batch already (`SpoolFile.add`). Beyond `SPOOL_BACKLOG` bytes
    handed over and not yet written, `write` waits. The first step that fails is kept
    (`failed`); the steps after it do nothing, and the settle reports it."""

    def __init__(self, spool: SpoolFile, queue: SerialQueue) -> None:
        self.spool = spool
        self._queue = queue
        self.failed: OSError | None = None
        self._unwritten: deque[tuple[concurrent.futures.Future[None], int]] = deque()
        self._unwritten_bytes = 0
        queue.submit(self._step, spool.open)

    def _step(self, function: Callable[..., None], *args: object) -> None:
        """On the queue: a file step, unless one failed before."""
        if self.failed is not None:
            return
        try:
            function(*args)
        except OSError as exc:
            self.failed = exc

    async def write(self, batch: list[Chunk]) -> None:
        """Queue `batch`; wait while too much is queued and not yet written."""
        size = sum(len(chunk) for chunk in batch)
        written = self._queue.submit(self._step, self.spool.write, batch)
        self._unwritten.append((written, size))
        self._unwritten_bytes += size
        while self._unwritten and (
            self._unwritten[0][0].done() or self._unwritten_bytes > SPOOL_BACKLOG
        ):
            oldest, oldest_size = self._unwritten[0]
            if not oldest.done():  # else no wrapper: it would wake the loop up for nothing
                # Shielded: the step runs on whatever happens to this task (the file stays
                # open under it until the discard queued behind it).
                await asyncio.shield(asyncio.wrap_future(oldest))
            oldest.result()
            self._unwritten.popleft()
            self._unwritten_bytes -= oldest_size

    async def settle(self, function: Callable[..., _T], *args: object) -> _T:
        """Run `function(*args)` on the queue after the steps queued before it; shielded, so
        that the file is settled (or removed) even when this task is cancelled."""
        return await asyncio.shield(asyncio.wrap_future(self._queue.submit(function, *args)))

    def discard(self) -> concurrent.futures.Future[None] | None:
        """Remove the spool file once the steps queued before are done; the removal's future
        (None when it ran at once)."""
        try:
            return self._queue.submit(self.spool.discard)
        except RuntimeError:  # the listener's threads are gone: nothing runs on the file
            self.spool.discard()
            return None


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
        metrics: Metrics,
        indexed: Indexed | None = None,
        file_threads: int | None = None,
    ) -> None:
        self._settings = settings
        self._file_threads = file_threads
        self._bind = bind
        self._pipeline = pipeline
        self._store = store
        self._finder = finder
        self._indexed = indexed
        self._metrics = metrics
        self._policy = gateway_policy(
            settings.ae_title, settings.max_pdu, settings.allowed_aes, settings.require_called_ae
        )
        self._listener: asyncio.Server | None = None
        self._runner: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._grace = STOP_GRACE_SECONDS
        # Blocking file work of every association, in two sets of threads so that no step ever
        # waits for another queued behind it: `_spoolers` run each association's file queue
        # (create, write, then the `_settle` of each C-STORE, one thread per busy queue);
        # `_workers` the steps a settle waits for and that wait for nothing (parse, fsync,
        # remove).
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._spoolers: concurrent.futures.ThreadPoolExecutor | None = None
        self._suspects: set[str] = set()  # final files answered without success: maybe orphans
        self._associations = 0
        self.port: int | None = None

    @property
    def store_root(self) -> Path:
        return self._store.root

    @property
    def listening(self) -> bool:
        return self._listener is not None

    async def start(self) -> int:
        """Open the store, bind and serve; returns the bound port."""
        opening = time.perf_counter()
        await asyncio.to_thread(self._store.open)
        if (took := time.perf_counter() - opening) > SLOW_OPEN_SECONDS:
            logger.warning("DICOM store took %.1f s to open (folder fsyncs, temp sweep)", took)
        self._metrics.init_reasons("dicom", [*REJECT_REASONS, "storage-refused"])
        self._metrics.dicom_associations.set(0)
        s = self._settings
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
        tls = s.ssl_context()
        self._listener = await loop.create_server(
            self._connect,
            self._bind,
            s.port,
            ssl=tls,
            ssl_handshake_timeout=s.acse_timeout if tls is not None else None,
        )
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop accepting; let running associations finish for `grace` seconds, then abort."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
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
        """The server's task group: the sweeper and one task per association."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            sweeper = group.create_task(self._sweep_forever(), name="dicom-sweep")
            ready.set()
            await self._stopping.wait()
            self._group = None
            sweeper.cancel()
            running = set(self._tasks)
            if running:
                _, late = await asyncio.wait(running, timeout=self._grace)
                for task in late:
                    task.cancel()

    def _connect(self) -> Link:
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

    def _begin(self, link: Link) -> None:
        """The association's task joins the group; refused while stopping."""
        group = self._group
        if group is None:
            link.refuse()
            return
        task = group.create_task(self._association(link), name="dicom-association")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one association --------------------------------------------------------------------

    async def _association(self, link: Link) -> None:
        s = self._settings
        counted = False
        try:
            event = await link.next_event(s.acse_timeout)
            if not isinstance(event, AssociationRequested):
                self._end(link, event)
                return
            calling = event.request.calling_ae[:16]
            answer = negotiate(event.request, self._policy)
            if isinstance(answer, AssociateReject):
                logger.info(
                    "DICOM association from %s rejected (source %d, reason %d)",
                    calling,
                    answer.source,
                    answer.reason,
                )
                link.close(link.acceptor.reject(answer))
                return
            if self._associations >= s.max_associations:
                logger.warning("DICOM association from %s rejected: local limit", calling)
                link.close(link.acceptor.reject(limit_reached()))
                return
            counted = True
            self._associations += 1
            self._metrics.dicom_associations.set(self._associations)
            await link.send(link.acceptor.accept(answer))
            link.pump()  # what arrived while we decided
            spools = _Spools(self._store.tmp, SerialQueue(_started(self._spoolers)))
            try:
                await self._serve(link, calling, spools)
            finally:
                spools.close()
        except asyncio.CancelledError:
            link.close(link.acceptor.abort())
            raise
        except TimeoutError:  # Link.send: the peer stopped reading
            logger.info("DICOM association aborted: the peer does not read")
            link.close(link.acceptor.abort())
        except Exception as exc:  # noqa: BLE001 - one association's failure must not end the others
            logger.error("DICOM association failed: %s", type(exc).__name__)
            link.close(link.acceptor.abort())
        finally:
            if counted:
                self._associations -= 1
                self._metrics.dicom_associations.set(self._associations)
            link.close()

    async def _serve(self, link: Link, calling: str, spools: _Spools) -> None:
        s = self._settings
        while True:
            busy = link.acceptor.in_message
            event = await link.next_event(s.dimse_timeout if busy else s.network_timeout)
            if isinstance(event, CommandReceived):
                ended = await self._command(link, event, calling, spools)
                if ended is not None:
                    self._end(link, ended)
                    return
            elif isinstance(event, ReleaseRequested):
                await spools.release(RELEASE_CLEANUP_SECONDS)
                link.close(link.acceptor.release_reply())
                return
            elif not isinstance(event, DatasetFragment | DatasetComplete):
                self._end(link, event)
                return

    def _end(self, link: Link, event: Ended) -> None:
        if isinstance(event, ProtocolError):
            logger.info("DICOM association aborted: %s", event.detail)
            link.close(event.reply)
        elif event == TIMED_OUT:
            logger.info("DICOM association timed out")
            # ARTIM before a request: just close (PS3.8 AA-2); an association: A-ABORT.
            established = link.acceptor.state is State.ESTABLISHED
            link.close(link.acceptor.abort() if established else b"")
        elif isinstance(event, Aborted | ConnectionClosed):
            link.close()
        else:
            link.close(link.acceptor.abort())

    async def _command(
        self, link: Link, event: CommandReceived, calling: str, spools: _Spools
    ) -> Ended | None:
        command = event.command
        field = command.command_field
        if not command.is_request or field == dimse.C_CANCEL_RQ:
            return await self._skip_dataset(link, command)  # noted by the link already
        if field == dimse.C_STORE_RQ and event.abstract_syntax in sop_classes.STORAGE:
            return await self._c_store(link, event, calling, spools)
        if field == dimse.C_FIND_RQ and event.abstract_syntax in sop_classes.FIND_MODELS:
            return await self._c_find(link, event)
        ended = await self._skip_dataset(link, command)
        if ended is not None:
            return ended
        if field == dimse.C_ECHO_RQ:
            answer = dimse.echo_response(command, status.SUCCESS)
        else:
            answer = dimse.unrecognized_response(command)
        await link.send(link.acceptor.send_message(event.context_id, answer))
        return None

    async def _receive_dataset(
        self, link: Link, sink: Callable[[bytes | memoryview], None]
    ) -> Ended | None:
        """Hand each fragment of the announced dataset to `sink`; None once it is complete."""
        while True:
            event = await link.next_event(self._settings.dimse_timeout)
            if isinstance(event, DatasetFragment):
                sink(event.data)
            elif isinstance(event, DatasetComplete):
                return None
            else:
                return event

    async def _skip_dataset(self, link: Link, command: dimse.Command) -> Ended | None:
        if not command.has_dataset:
            return None
        return await self._receive_dataset(link, lambda data: None)

    # --- C-STORE ------------------------------------------------------------------------------

    async def _c_store(
        self, link: Link, event: CommandReceived, calling: str, spools: _Spools
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
        await link.send(link.acceptor.send_message(event.context_id, response))
        spools.prepare()  # the next dataset's file, while the sender reads this answer
        return None

    async def _spool(
        self, link: Link, writer: _WriteBehind, event: CommandReceived
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
            return self._unavailable("disk", f"writing failed: {type(writer.failed).__name__}")
        return _RECEIVED

    async def _keep(
        self,
        writer: _WriteBehind,
        spools: _Spools,
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
                self._suspects.add(exc.relative)
            return self._unavailable("disk", str(exc))
        try:
            outcome = await self._commit(
                DicomKey(meta.sop_instance_uid),
                (_instance(meta, stored, calling),),
                received_at,
                calling,
                f"dicom instance file={stored.relative}".encode(),
            )
        except StorageUnavailable as exc:
            # The complete file stays under its content name: a resend finds it again; if none
            # comes, the orphan sweep removes it.
            self._suspects.add(stored.relative)
            return self._unavailable("database", str(exc))
        return await self._answer(outcome, stored)

    def _settle(
        self, writer: _WriteBehind, rest: list[Chunk], calling: str, command: dimse.Command
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
        self._suspects.add(stored.relative)
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

    def _unavailable(self, cause: str, detail: str) -> _Answer:
        logger.warning("DICOM C-STORE answered 0xA700 (%s): %s", cause, detail)
        self._metrics.dicom_unavailable.labels(cause).inc()
        return _Answer(status.OUT_OF_RESOURCES, f"{cause} unavailable")

    async def _commit(
        self,
        key: DicomKey | DeadLetterKey,
        records: tuple[Record, ...],
        received_at: datetime,
        calling: str,
        raw: bytes,
    ) -> Outcome:
        """Hand an envelope to the pipeline and wait for its COMMIT (`store_timeout`)."""
        timeout = self._settings.store_timeout
        envelope = Envelope(
            protocol=Protocol.DICOM,
            key=key,
            records=records,
            received_at=received_at,
            ack=asyncio.get_running_loop().create_future(),
            source=calling,
            raw=raw,
        )
        try:
            async with asyncio.timeout(timeout):
                try:
                    await self._pipeline.submit(envelope)
                except PipelineClosed as exc:
                    raise StorageUnavailable("gateway stopping") from exc
                return await envelope.ack
        except TimeoutError as exc:
            raise StorageUnavailable(f"no commit within {timeout:.0f}s") from exc

    def _work(self, function: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
        """Run blocking file work in the listener's worker threads."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._workers, functools.partial(function, *args))

    # --- C-FIND -------------------------------------------------------------------------------

    async def _c_find(self, link: Link, event: CommandReceived) -> Ended | None:
        command = event.command
        data = bytearray()
        too_long = False

        def collect(fragment: bytes | memoryview) -> None:
            nonlocal too_long
            if len(data) + len(fragment) > MAX_IDENTIFIER:
                too_long = True
            else:
                data.extend(fragment)

        ended = await self._receive_dataset(link, collect) if command.has_dataset else None
        if ended is not None:
            return ended
        message_id = command.message_id or 0

        async def reply(
            code: int, identifier: bytes | None = None, comment: str | None = None
        ) -> None:
            response = dimse.find_response(
                command, code, identifier=identifier is not None, error_comment=comment
            )
            await link.send(link.acceptor.send_message(event.context_id, response, identifier))

        try:
            if too_long or not command.has_dataset:
                raise IdentifierError("no identifier")
            identifier = decode_identifier(bytes(data), event.transfer_syntax)
            level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
            criteria = tuple(
                (element.keyword, _criterion(element.value))
                for element in identifier
                if element.keyword and element.keyword != "QueryRetrieveLevel"
            )
        except (IdentifierError, ValueError, TypeError, AttributeError, KeyError):
            logger.info("DICOM C-FIND identifier cannot be decoded")
            await reply(status.FIND_IDENTIFIER_INVALID, comment="identifier cannot be decoded")
            return None
        if level not in LEVELS:
            await reply(status.FIND_IDENTIFIER_INVALID, comment="unknown query/retrieve level")
            return None
        if level not in sop_classes.FIND_LEVELS[event.abstract_syntax]:
            await reply(status.FIND_IDENTIFIER_INVALID, comment="level not in this query model")
            return None
        keywords = [k for k, _ in criteria]
        request = FindRequest(level, criteria, self._settings.max_find_results)
        try:
            async with asyncio.timeout(self._settings.store_timeout):
                matches = await self._finder(request)
        except FindRequestError:
            await reply(status.FIND_IDENTIFIER_INVALID, comment="invalid matching key")
            return None
        except (StorageUnavailable, TimeoutError):
            await reply(status.FIND_OUT_OF_RESOURCES, comment="database unavailable")
            return None
        for match in matches:
            if link.cancelled(message_id):
                break
            encoded = encode_identifier(
                _match_dataset(level, keywords, match), event.transfer_syntax
            )
            await reply(status.PENDING, encoded)
        await reply(dimse.CANCEL if link.cancelled(message_id) else status.SUCCESS)
        return None

    # --- files no index row names -------------------------------------------------------------

    async def sweep_orphans(self, candidates: list[str] | None = None) -> int:
        """Remove complete files under a final name that no index row names and that are older
        than `orphan_age` (a crash between rename and commit, or 0xA700 from the database with
        no resend since). `candidates`: relative names to check; None scans the store for files
        of the last `orphan_lookback` seconds. Returns how many files went.

        Removing, not indexing: the file lacks what only the association knew (the calling AE
        title, which scopes a PatientID without issuer), and the sender, never told 0x0000,
        still holds the instance and sends it again. The check is safe against a resend of the
        same bytes racing it: the file is first moved aside atomically; if what was moved is
        younger than `orphan_age` (a store just renamed its copy there) or the index names it
        by now, it is put back.
        """
        if self._indexed is None:
            return 0
        s = self._settings
        if candidates is None:
            candidates = await self._scan()
        removed = 0
        for start in range(0, len(candidates), ORPHAN_BATCH):
            chunk = candidates[start : start + ORPHAN_BATCH]
            named = await self._indexed(chunk)
            for relative in chunk:
                if relative in named:
                    continue
                aside = await asyncio.to_thread(self._store.quarantine, relative, s.orphan_age)
                if aside is None:
                    continue
                if await self._indexed([relative]):
                    await asyncio.to_thread(self._store.restore, aside, relative)
                    continue
                await asyncio.to_thread(self._store.drop, aside, relative)
                removed += 1
        if removed:
            logger.warning("removed %d DICOM file(s) that no index row names", removed)
            self._metrics.dicom_orphans_removed.inc(removed)
        return removed

    async def _scan(self) -> list[str]:
        """The store's files of the last `orphan_lookback` seconds older than `orphan_age`, one
        top-level shard folder at a time in a thread, paced to `ORPHAN_SCAN_SHARE`.

        The scan holds the GIL between its system calls, beside the event loop: run at once, it
        halved the stores a second of a gateway restarted on a store with all its shard folders
        (0.75 s of CPU for 65,536 of them, empty; a `stat` more per recent file). In steps, a
        stop cancels it between two folders instead of waiting for a thread to finish."""
        s = self._settings
        found: list[str] = []
        for top in await asyncio.to_thread(self._store.tops):
            began = time.monotonic()
            found += await asyncio.to_thread(
                self._store.orphans_in, top, s.orphan_age, s.orphan_lookback
            )
            worked = time.monotonic() - began
            await asyncio.sleep(worked * (1.0 - ORPHAN_SCAN_SHARE) / ORPHAN_SCAN_SHARE)
        return found

    async def _sweep_forever(self) -> None:
        """At start, scan the store for orphans; then, every `sweep_interval`, check the files
        answered without success (after `orphan_age`) and remove stale temp files."""
        s = self._settings
        first = True
        while True:
            try:
                if first:
                    await self.sweep_orphans()
                    first = False
                else:
                    limit = time.time() - s.orphan_age
                    due = sorted(self._suspects)
                    self._suspects.clear()
                    ready, later = await asyncio.to_thread(self._split_by_age, due, limit)
                    self._suspects.update(later)
                    await self.sweep_orphans(ready)
                    await asyncio.to_thread(self._store.sweep_temp)
            except StorageUnavailable:
                logger.info("DICOM orphan sweep postponed: database unavailable")
            except OSError as exc:
                logger.warning("DICOM orphan sweep failed: %s", type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - the sweep must not end the listener's group
                logger.error("DICOM orphan sweep failed: %s", type(exc).__name__)
            await asyncio.sleep(s.sweep_interval)

    def _split_by_age(self, relatives: list[str], limit: float) -> tuple[list[str], list[str]]:
        ready: list[str] = []
        later: list[str] = []
        for relative in relatives:
            try:
                mtime = self._store.path_of(relative).stat().st_mtime
            except (OSError, ValueError):
                continue  # gone already
            (ready if mtime < limit else later).append(relative)
        return ready, later


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


def _criterion(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _instance(meta: InstanceMetadata, stored: StoredFile, calling: str) -> DicomInstance:
    return DicomInstance(
        sop_instance_uid=meta.sop_instance_uid,
        sop_class_uid=meta.sop_class_uid,
        study_uid=meta.study_uid,
        series_uid=meta.series_uid,
        transfer_syntax=meta.transfer_syntax,
        file_path=stored.relative,
        size=stored.size,
        sha256=stored.sha256,
        calling_ae=calling,
        patient=meta.patient,
        patient_name=meta.patient_name,
        patient_names=meta.patient_names,
        patient_birth_date=meta.patient_birth_date,
        patient_sex=meta.patient_sex,
        dicom_patient_id=meta.dicom_patient_id,
        issuer_of_patient_id=meta.issuer_of_patient_id,
        charset=meta.charset,
        study_date=meta.study_date,
        study_time=meta.study_time,
        study_started=meta.study_started,
        study_description=meta.study_description,
        study_id=meta.study_id,
        accession_number=meta.accession_number,
        referring_physician=meta.referring_physician,
        series_number=meta.series_number,
        series_description=meta.series_description,
        modality=meta.modality,
        body_part=meta.body_part,
        instance_number=meta.instance_number,
        content_date=meta.content_date,
    )


def _match_dataset(level: str, keywords: list[str], match: FindMatch) -> Dataset:
    """A C-FIND response identifier: the requested keys, valued from the match, in UTF-8."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for keyword in keywords:
        if keyword == "SpecificCharacterSet":
            continue
        value = match.get(keyword)
        try:
            setattr(ds, keyword, _dicom_value(value))
        except (ValueError, TypeError):
            setattr(ds, keyword, None)
    return ds


def _dicom_value(value: object) -> object:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.strftime("%Y%m%d%H%M%S")
    if isinstance(value, time_of_day):
        return value.strftime("%H%M%S")
    if isinstance(value, date):
        return value.strftime("%Y%m%d")
    if isinstance(value, list):
        return [str(v) for v in value if v] or None
    if isinstance(value, int):
        return str(value)
    return value
