"""The DICOM listener: Verification, Storage of every storage SOP class, Patient/Study Root C-FIND.

pynetdicom runs each association in its own thread (bounded by `max_associations`). Handlers do
their file work in that thread and reach the event loop only through `_call`:
`run_coroutine_threadsafe(...).result(timeout)`. A C-STORE is received straight to a file
(`STORE_RECV_CHUNKED_DATASET`: the dataset is never held in memory), staged and fsynced by
`FileStore`, parsed without pixel data by `read_metadata`, renamed to its content-derived name,
then indexed through the group-commit pipeline; the status goes back only after COMMIT:

- stored, or the same bytes again: 0x0000;
- the same SOP Instance UID with other content: 0xB006, the first copy kept, a conflict counted;
- refused content (unparseable, truncated, missing or invalid UIDs): 0xC000 family + dead letter;
- database unavailable or disk full: 0xA700, no temp file left and no index row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, date, datetime
from datetime import time as time_of_day
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE

from dicom import status
from dicom.config import DicomSettings
from dicom.filestore import FileStore, StagedFile, StoredFile
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
VERIFICATION: Final = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
REJECT_REASONS: Final = ("unparseable", "missing-uid", "invalid-uid", "uid-mismatch")

Finder = Callable[[FindRequest], Awaitable[list[FindMatch]]]

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
    ) -> None:
        self._settings = settings
        self._bind = bind
        self._pipeline = pipeline
        self._store = store
        self._finder = finder
        self._metrics = metrics
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
        ]
        self._ae = ae
        self._server = await asyncio.to_thread(
            ae.start_server, (self._bind, s.port), block=False, evt_handlers=handlers
        )
        self.port = int(self._server.server_address[1])
        return self.port

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop accepting; let running associations finish for `grace` seconds, then abort."""
        if self._ae is None or self._server is None:
            return
        ae, server = self._ae, self._server
        self._server = None

        def shutdown() -> None:
            server.shutdown()
            deadline = time.monotonic() + grace
            while ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            ae.shutdown()

        await asyncio.to_thread(shutdown)

    # --- association bookkeeping (pynetdicom threads) -----------------------------------------

    def _on_established(self, event: evt.Event) -> None:
        with self._lock:
            self._counted.add(id(event.assoc))
            self._metrics.dicom_associations.set(len(self._counted))

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            self._counted.discard(id(event.assoc))
            self._metrics.dicom_associations.set(len(self._counted))

    # --- services (pynetdicom threads) -------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        started = time.perf_counter()
        received_at = datetime.now(UTC)
        self._metrics.received.labels("dicom").inc()
        calling = _calling_ae(event)
        request = cast(C_STORE, event.request)
        try:
            staged = self._stage(event)
        except OSError as exc:
            return self._unavailable("disk", f"staging failed: {type(exc).__name__}")
        try:
            meta = read_metadata(
                staged.path,
                calling_ae=calling,
                command_sop_instance_uid=_text(request.AffectedSOPInstanceUID),
                command_sop_class_uid=_text(request.AffectedSOPClassUID),
            )
        except DicomInputError as exc:
            return self._refuse(staged, calling, received_at, exc)
        except OSError as exc:
            self._store.discard(staged)
            return self._unavailable("disk", f"reading failed: {type(exc).__name__}")
        try:
            stored = self._store.commit(staged)
        except OSError as exc:
            return self._unavailable("disk", f"rename failed: {type(exc).__name__}")
        instance = _instance(meta, stored, calling)
        try:
            outcome = self._submit(
                DicomKey(meta.sop_instance_uid),
                (instance,),
                received_at,
                calling,
                f"dicom instance file={stored.relative}".encode(),
            )
        except StorageUnavailable as exc:
            # The complete file stays under its content name: a resend finds it again.
            return self._unavailable("database", str(exc))
        answer = self._answer(outcome, stored)
        self._metrics.dicom_store_seconds.observe(time.perf_counter() - started)
        return answer

    def _stage(self, event: evt.Event) -> StagedFile:
        try:
            path = event.dataset_path
        except AttributeError:
            return self._store.stage_bytes(event.encoded_dataset(include_meta=True))
        return self._store.stage(path)

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

        return self._call(submit(), self._settings.store_timeout)

    def _call(self, coroutine: Awaitable[_T], timeout: float) -> _T:
        """Run `coroutine` in the gateway's loop and wait for it from this thread."""
        loop = self._loop
        wrapper = _as_coroutine(coroutine)
        if loop is None or loop.is_closed():
            wrapper.close()
            raise StorageUnavailable("gateway not running")
        try:
            future = asyncio.run_coroutine_threadsafe(wrapper, loop)
        except RuntimeError as exc:
            wrapper.close()
            raise StorageUnavailable("gateway stopping") from exc
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
