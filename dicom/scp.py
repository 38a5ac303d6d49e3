"""The DICOM listener: Verification, Storage of every storage SOP class, Patient/Study Root C-FIND.

pynetdicom runs each association in its own thread (bounded by `max_associations`). Handlers do
their file work in that thread and reach the event loop only through `run_coroutine_threadsafe`.
A C-STORE is received straight to a file in the store's temp folder, hashed while it arrives
(`dicom.spool`: the dataset is never held in memory, never copied, never read twice), parsed
without pixel data by `read_metadata`, linked to its content-derived name by `FileStore.commit`,
fsynced with its folders (`make_durable`; the data fsync starts while the header is parsed), and
only then is its index row handed to the group-commit pipeline. The status goes back after COMMIT:

- stored, or the same bytes again: 0x0000;
- the same SOP Instance UID with other content: 0xB006, the first copy kept, a conflict counted;
- refused content (unparseable, truncated, missing or invalid UIDs): 0xC000 family + dead letter;
- database unavailable or disk full: 0xA700, no temp file left and no index row (a complete
  file under its final name may stay: a resend reuses it, else the orphan sweep removes it);
- a command without Affected SOP Class/Instance UID: 0xC001 (`dicom.spool` keeps pynetdicom
  from dropping the association over it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE

from dicom import spool, status
from dicom.config import DicomSettings
from dicom.filestore import FileStore, StagedFile, StoredFile, fsync_and_close
from dicom.metadata import DicomInputError, InstanceMetadata, read_metadata
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
from storage.dicom_queries import LEVELS, FindMatch, FindRequest, FindRequestError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
DEAD_LETTER_PREFIX: Final = 64 * 1024
CONFLICT_REASON: Final = "content-conflict"  # storage.writer_dicom.CONFLICT
STOP_GRACE_SECONDS: Final = 5.0
ORPHAN_BATCH: Final = 1000
VERIFICATION: Final = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
REJECT_REASONS: Final = ("unparseable", "missing-uid", "invalid-uid", "uid-mismatch")

Finder = Callable[[FindRequest], Awaitable[list[FindMatch]]]
Indexed = Callable[[list[str]], Awaitable[set[str]]]
"""Which of these relative file names the index names (`storage.dicom_queries.indexed_files`)."""

# Receive C-STORE datasets straight to a temp file; never log identifiers of requests.
_config.STORE_RECV_CHUNKED_DATASET = True
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
logging.getLogger("pynetdicom").setLevel(logging.WARNING)


class DicomServer:
    """One pynetdicom AE serving on `bind:port`; `start()` in the loop, `stop()` at shutdown."""

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
    ) -> None:
        self._settings = settings
        self._bind = bind
        self._pipeline = pipeline
        self._store = store
        self._finder = finder
        self._indexed = indexed
        self._metrics = metrics
        self._sweeper: asyncio.Task[None] | None = None
        # Fsyncs of received files, started while the header is parsed (one per association).
        self._fsyncs: concurrent.futures.ThreadPoolExecutor | None = None
        self._suspects: set[str] = set()  # final files answered without success: maybe orphans
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ae: AE | None = None
        self._server: Any = None
        self._counted: set[int] = set()
        self._lock = threading.Lock()
        self.port: int | None = None

    @property
    def store_root(self) -> Path:
        return self._store.root

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> int:
        """Open the store, bind and serve in pynetdicom's threads; returns the bound port."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._store.open)
        self._metrics.init_reasons("dicom", [*REJECT_REASONS, "storage-refused"])
        s = self._settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        if s.allowed_aes:
            ae.require_calling_aet = sorted(s.allowed_aes)
        ae.add_supported_context(VERIFICATION)
        syntaxes = list(AllTransferSyntaxes)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, syntaxes)
        for model in (PATIENT_ROOT_FIND, STUDY_ROOT_FIND):
            ae.add_supported_context(model)
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_RELEASED, self._on_ended),
        ]
        self._ae = ae
        self._fsyncs = concurrent.futures.ThreadPoolExecutor(
            s.max_associations, thread_name_prefix="dicom-fsync"
        )
        spool.install()
        spool.register(ae, self._store.tmp)
        self._server = await asyncio.to_thread(
            ae.start_server, (self._bind, s.port), block=False, evt_handlers=handlers
        )
        self.port = int(self._server.server_address[1])
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="dicom-sweep")
        return self.port

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop accepting; let running associations finish for `grace` seconds, then abort."""
        if self._ae is None or self._server is None:
            return
        ae, server = self._ae, self._server
        self._server = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

        def shutdown() -> None:
            server.shutdown()
            deadline = time.monotonic() + grace
            while ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            ae.shutdown()

        await asyncio.to_thread(shutdown)
        spool.unregister(ae)
        if self._fsyncs is not None:
            self._fsyncs.shutdown(wait=True)
            self._fsyncs = None

    # --- association bookkeeping (pynetdicom threads) -----------------------------------------

    def _on_established(self, event: evt.Event) -> None:
        with self._lock:
            self._counted.add(id(event.assoc))
            self._metrics.dicom_associations.set(len(self._counted))

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            self._counted.discard(id(event.assoc))
            self._metrics.dicom_associations.set(len(self._counted))
        self._on_ended(event)

    def _on_ended(self, event: evt.Event) -> None:
        """Released, aborted or closed: remove what an unfinished transfer left in the spool."""
        if removed := spool.discard_unclaimed(event.assoc):
            logger.info("DICOM association ended: %d unfinished dataset(s) removed", removed)

    # --- services (pynetdicom threads) -------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        started = time.perf_counter()
        received_at = datetime.now(UTC)
        self._metrics.received.labels("dicom").inc()
        try:
            staged, complete, syncing = self._stage(event)
        except OSError as exc:
            return self._unavailable("disk", f"staging failed: {type(exc).__name__}")
        try:
            return self._store_staged(event, staged, complete, syncing, started, received_at)
        finally:
            if syncing is not None:
                concurrent.futures.wait([syncing])  # its descriptor is closed by then

    def _store_staged(
        self,
        event: evt.Event,
        staged: StagedFile,
        complete: bool,
        syncing: concurrent.futures.Future[None] | None,
        started: float,
        received_at: datetime,
    ) -> int | Dataset:
        calling = _calling_ae(event)
        request = cast(C_STORE, event.request)
        try:
            meta = read_metadata(
                staged.path,
                calling_ae=calling,
                command_sop_instance_uid=_text(request.AffectedSOPInstanceUID) if complete else "",
                command_sop_class_uid=_text(request.AffectedSOPClassUID) if complete else "",
            )
        except DicomInputError as exc:
            return self._refuse(staged, calling, received_at, exc)
        except OSError as exc:
            self._store.discard(staged)
            return self._unavailable("disk", f"reading failed: {type(exc).__name__}")
        try:
            stored = self._store.commit(staged, durable=False)
        except OSError as exc:
            return self._unavailable("disk", f"rename failed: {type(exc).__name__}")
        instance = _instance(meta, stored, calling)
        # The file and its folders are durable before the index row is submitted: a committed
        # row never names a file a power loss could take back. (The data fsync itself started
        # before the header was parsed.)
        try:
            if syncing is not None and not stored.synced:
                syncing.result()
                stored = replace(stored, synced=True)
            self._store.make_durable(stored)
        except OSError as exc:
            self._suspect(stored)
            return self._unavailable("disk", f"fsync failed: {type(exc).__name__}")
        pending = self._start_submit(
            DicomKey(meta.sop_instance_uid),
            (instance,),
            received_at,
            calling,
            f"dicom instance file={stored.relative}".encode(),
        )
        try:
            outcome = self._wait(pending, self._settings.store_timeout)
        except StorageUnavailable as exc:
            # The complete file stays under its content name: a resend finds it again; if none
            # comes, the orphan sweep removes it.
            self._suspect(stored)
            return self._unavailable("database", str(exc))
        answer = self._answer(outcome, stored)
        self._metrics.dicom_store_seconds.observe(time.perf_counter() - started)
        return answer

    def _stage(
        self, event: evt.Event
    ) -> tuple[StagedFile, bool, concurrent.futures.Future[None] | None]:
        """The received dataset in the store's temp folder; whether its command was complete
        (a SOP UID it lacked was filled in by `dicom.spool`); the fsync of its data, started."""
        try:
            path = event.dataset_path
        except AttributeError:
            return self._store.stage_bytes(event.encoded_dataset(include_meta=True)), True, None
        received = spool.claim(path)
        if received is None:  # not spooled by us (another AE's factory): move and hash it
            return self._store.stage(path), True, None
        sha256, size = received.finish()
        staged = self._store.adopt(received.path, sha256, size)
        syncing = None
        if not staged.durable and self._fsyncs is not None:
            fd = os.dup(received.fileno())
            try:
                syncing = self._fsyncs.submit(fsync_and_close, fd)
            except RuntimeError:  # stopping: commit() fsyncs it itself
                os.close(fd)
        return staged, not received.command_incomplete, syncing

    def _suspect(self, stored: StoredFile) -> None:
        with self._lock:
            self._suspects.add(stored.relative)

    def _answer(self, outcome: Outcome, stored: StoredFile) -> int | Dataset:
        if outcome.kind is OutcomeKind.STORED:
            self._metrics.dicom_stored_bytes.inc(stored.size)
            return status.SUCCESS
        if outcome.kind is OutcomeKind.DUPLICATE:
            if outcome.reason != CONFLICT_REASON:
                return status.SUCCESS
            self._metrics.dicom_conflicts.inc()
            self._store.remove(stored)
            logger.warning("DICOM conflict: a stored SOP Instance UID came with other content")
            answer = Dataset()
            answer.Status = status.ELEMENTS_DISCARDED
            answer.ErrorComment = "instance already stored with other content; first copy kept"
            return answer
        return status.for_reason(outcome.reason)

    def _refuse(
        self, staged: StagedFile, calling: str, received_at: datetime, error: DicomInputError
    ) -> int:
        logger.info("DICOM C-STORE from %s refused: %s", calling, error.reason)
        try:
            with open(staged.path, "rb") as f:
                prefix = f.read(DEAD_LETTER_PREFIX)
        except OSError:
            prefix = b""
        finally:
            self._store.discard(staged)
        letter = DeadLetter(
            protocol=Protocol.DICOM,
            source=calling,
            reason=error.reason,
            detail=error.detail,
            raw=prefix,
        )
        try:
            self._submit(
                DeadLetterKey(Protocol.DICOM, calling, staged.sha256),
                (letter,),
                received_at,
                calling,
                prefix,
            )
        except StorageUnavailable as exc:
            return self._unavailable("database", str(exc))
        return status.for_reason(error.reason)

    def _unavailable(self, cause: str, detail: str) -> int:
        logger.warning("DICOM C-STORE answered 0xA700 (%s): %s", cause, detail)
        self._metrics.dicom_unavailable.labels(cause).inc()
        return status.OUT_OF_RESOURCES

    # --- files no index row names (the event loop) -----------------------------------------

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
            candidates = await asyncio.to_thread(
                self._store.orphans, s.orphan_age, s.orphan_lookback
            )
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
                    with self._lock:
                        due = sorted(self._suspects)
                        self._suspects.clear()
                    ready, later = await asyncio.to_thread(self._split_by_age, due, limit)
                    with self._lock:
                        self._suspects.update(later)
                    await self.sweep_orphans(ready)
                    await asyncio.to_thread(self._store.sweep_temp)
            except StorageUnavailable:
                logger.info("DICOM orphan sweep postponed: database unavailable")
            except OSError as exc:
                logger.warning("DICOM orphan sweep failed: %s", type(exc).__name__)
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

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        try:
            identifier = event.identifier
            level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
            criteria = tuple(
                (element.keyword, _criterion(element.value))
                for element in identifier
                if element.keyword and element.keyword != "QueryRetrieveLevel"
            )
            keywords = [k for k, _ in criteria]
        except Exception:  # noqa: BLE001 - a malformed identifier: answer, don't crash the thread
            logger.info("DICOM C-FIND identifier cannot be decoded")
            yield status.FIND_IDENTIFIER_INVALID, None
            return
        if level not in LEVELS:
            yield status.FIND_IDENTIFIER_INVALID, None
            return
        request = FindRequest(level, criteria, self._settings.max_find_results)
        try:
            matches = self._call(self._finder(request), self._settings.store_timeout)
        except FindRequestError:
            yield status.FIND_IDENTIFIER_INVALID, None
            return
        except StorageUnavailable:
            yield status.FIND_OUT_OF_RESOURCES, None
            return
        for match in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield status.PENDING, _match_dataset(level, keywords, match)
        yield status.SUCCESS, None

    # --- the bridge to the event loop -------------------------------------------------------

    def _submit(
        self,
        key: DicomKey | DeadLetterKey,
        records: tuple[Record, ...],
        received_at: datetime,
        calling: str,
        raw: bytes,
    ) -> Outcome:
        pending = self._start_submit(key, records, received_at, calling, raw)
        return self._wait(pending, self._settings.store_timeout)

    def _start_submit(
        self,
        key: DicomKey | DeadLetterKey,
        records: tuple[Record, ...],
        received_at: datetime,
        calling: str,
        raw: bytes,
    ) -> concurrent.futures.Future[Outcome]:
        """Hand an envelope to the pipeline from this thread; wait for it with `_wait`."""

        async def submit() -> Outcome:
            loop = asyncio.get_running_loop()
            envelope = Envelope(
                protocol=Protocol.DICOM,
                key=key,
                records=records,
                received_at=received_at,
                ack=loop.create_future(),
                source=calling,
                raw=raw,
            )
            try:
                await self._pipeline.submit(envelope)
            except PipelineClosed as exc:
                raise StorageUnavailable("gateway stopping") from exc
            return await envelope.ack

        return self._start(submit())

    def _call(self, coroutine: Awaitable[_T], timeout: float) -> _T:
        """Run `coroutine` in the gateway's loop and wait for it from this thread."""
        return self._wait(self._start(coroutine), timeout)

    def _start(self, coroutine: Awaitable[_T]) -> concurrent.futures.Future[_T]:
        """Schedule `coroutine` in the gateway's loop; a loop that is gone gives a future that
        raises `StorageUnavailable`."""
        loop = self._loop
        wrapper = _as_coroutine(coroutine)
        failed: concurrent.futures.Future[_T] = concurrent.futures.Future()
        if loop is None or loop.is_closed():
            wrapper.close()
            failed.set_exception(StorageUnavailable("gateway not running"))
            return failed
        try:
            return asyncio.run_coroutine_threadsafe(wrapper, loop)
        except RuntimeError:
            wrapper.close()
            failed.set_exception(StorageUnavailable("gateway stopping"))
            return failed

    def _wait(self, future: concurrent.futures.Future[_T], timeout: float) -> _T:
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise StorageUnavailable(f"no commit within {timeout:.0f}s") from exc
        except concurrent.futures.CancelledError as exc:
            raise StorageUnavailable("gateway stopping") from exc


async def _as_coroutine(awaitable: Awaitable[_T]) -> _T:
    return await awaitable


def _calling_ae(event: evt.Event) -> str:
    title = event.assoc.requestor.ae_title
    if isinstance(title, bytes):
        title = title.decode("ascii", "replace")
    return str(title).strip()[:16]


def _text(value: object) -> str | None:
    return None if value is None else str(value)


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
