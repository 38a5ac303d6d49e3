"""Test support for the DICOM listener: a running SCP over a real database, and a pynetdicom SCU.

`running_dicom(dsn, root)` starts the pipeline and a `DicomServer` on port 0 in the test's loop
(migrations applied) and stops both at the end. The SCU helpers are blocking (pynetdicom's own
threads): tests call them through `asyncio.to_thread`, so the gateway's loop keeps committing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import asyncpg
from pydicom import dcmread
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF

from dicom.config import DicomSettings
from dicom.filestore import FileStore
from dicom.scp import DicomServer
from ingest.pipeline import GroupCommitPipeline, PipelineSettings
from monitoring.metrics import Metrics
from storage.audit import record_access
from storage.commitment_reports import CommitmentReportQueue
from storage.dicom_queries import find, held_instances, indexed_files, retrievable
from storage.dicom_store_lock import sweeping
from storage.migrations import apply_migrations
from storage.writer import BatchWriter

SCP_AE = "QANTARA"


@contextmanager
def serving(
    ae: AE, handlers: Sequence[Any] = (), ssl_context: ssl.SSLContext | None = None
) -> Iterator[int]:
    """`ae` as an SCP on a free port of 127.0.0.1, in pynetdicom's threads: its port, until
    the block ends."""
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, ssl_context=ssl_context, evt_handlers=list(handlers)
    )
    assert server is not None  # not blocking: the server is returned
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"


@dataclass
class RunningDicom:
    server: DicomServer
    pool: asyncpg.Pool
    metrics: Metrics
    root: Path
    pipeline: GroupCommitPipeline

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port


@asynccontextmanager
async def running_dicom(
    dsn: str,
    root: Path,
    settings: DicomSettings | None = None,
    pool_size: int = 4,
    file_threads: int | None = None,
) -> AsyncIterator[RunningDicom]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=pool_size)
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn)
        metrics = Metrics()
        pipeline = GroupCommitPipeline(
            BatchWriter(pool), PipelineSettings(retry_initial=0.05, retry_max=0.5), metrics
        )
        base = settings or DicomSettings()
        server = DicomServer(
            replace(base, port=0, storage=root, store_timeout=min(base.store_timeout, 20.0)),
            bind="127.0.0.1",
            pipeline=pipeline,
            store=FileStore(root),
            finder=lambda request: find(pool, request),
            holder=lambda uids: held_instances(pool, uids),
            locator=lambda keys, limit: retrievable(pool, keys, limit),
            auditor=lambda entry: record_access(pool, entry),
            reports=CommitmentReportQueue(pool),
            metrics=metrics,
            indexed=lambda paths: indexed_files(pool, paths),
            sweep_guard=lambda: sweeping(pool),
            file_threads=file_threads,
        )
        task = asyncio.create_task(pipeline.run())
        await server.start()
        try:
            yield RunningDicom(server, pool, metrics, server_root(server), pipeline)
        finally:
            await server.stop(grace=1.0)
            await pipeline.close()
            async with asyncio.timeout(30):
                await task
    finally:
        await pool.close()


def server_root(server: DicomServer) -> Path:
    return server.store_root


# --- SCU (blocking; call through asyncio.to_thread) -------------------------------------------


def scu(ae_title: str = "MODALITY") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    return ae


def echo(
    port: int,
    ae_title: str = "MODALITY",
    called: str = SCP_AE,
    tls: ssl.SSLContext | None = None,
) -> tuple[bool, int | None]:
    """(association accepted, C-ECHO status), calling as `ae_title` and calling `called`; over
    TLS with `tls` (the server's name checked as 127.0.0.1)."""
    ae = scu(ae_title)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=_tls_args(tls))
    if not assoc.is_established:
        return False, None
    try:
        answer = assoc.send_c_echo()
        return True, int(answer.Status) if "Status" in answer else None
    finally:
        assoc.release()


def _tls_args(tls: ssl.SSLContext | None) -> tuple[ssl.SSLContext, str] | None:
    return (tls, "127.0.0.1") if tls is not None else None


def store(
    port: int,
    datasets: Sequence[Dataset],
    ae_title: str = "MODALITY",
    tls: ssl.SSLContext | None = None,
) -> list[int | None]:
    """C-STORE each dataset (its own transfer syntax) on one association; their statuses."""
    answers = store_answers(port, datasets, ae_title, tls)
    return [int(answer.Status) if "Status" in answer else None for answer in answers]


def store_answers(
    port: int,
    datasets: Sequence[Dataset],
    ae_title: str = "MODALITY",
    tls: ssl.SSLContext | None = None,
) -> list[Dataset]:
    """C-STORE each dataset on one association; the status datasets of their answers (Status,
    Error Comment), empty where none came."""
    ae = scu(ae_title)
    seen: set[tuple[str, str]] = set()
    for ds in datasets:
        pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if pair not in seen:
            seen.add(pair)
            ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE, tls_args=_tls_args(tls))
    if not assoc.is_established:
        raise ConnectionError("association refused")
    answers: list[Dataset] = []
    try:
        for ds in datasets:
            answers.append(assoc.send_c_store(ds))
    finally:
        if assoc.is_established:
            assoc.release()
    return answers


def query(level: str, **keys: object) -> Dataset:
    """A C-FIND, C-GET or C-MOVE identifier at `level` with these keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def c_find(
    port: int, identifier: Dataset, model: str = STUDY_ROOT_FIND
) -> tuple[list[Dataset], int | None]:
    """The pending identifiers and the final status of one C-FIND."""
    ae = scu("VIEWER")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    if not assoc.is_established:
        raise ConnectionError("association refused")
    found: list[Dataset] = []
    final: int | None = None
    try:
        for answer, ident in assoc.send_c_find(identifier, model):
            if "Status" not in answer:
                continue
            code = int(answer.Status)
            if code in (0xFF00, 0xFF01) and ident is not None:
                found.append(ident)
            else:
                final = code
    finally:
        assoc.release()
    return found, final


@dataclass
class Retrieved:
    """What a C-GET brought back: each sub-operation's dataset bytes as received (by SOP
    Instance UID, with the transfer syntax of its context), the C-GET-RSPs in order (status and
    counts), and the final identifier."""

    datasets: dict[str, tuple[str, bytes]]
    responses: list[dict[str, int | None]]
    identifier: Dataset | None

    @property
    def final(self) -> dict[str, int | None]:
        return self.responses[-1]

    def failed_uids(self) -> list[str]:
        """The Failed SOP Instance UID List of the final identifier (one value or several)."""
        assert self.identifier is not None
        value = self.identifier.FailedSOPInstanceUIDList
        return [value] if isinstance(value, str) else [str(uid) for uid in value]


def c_get(
    port: int,
    identifier: Dataset,
    contexts: Iterable[tuple[str, str]],
    model: str = STUDY_ROOT_GET,
    *,
    answer: int = 0x0000,
    scp_role: bool = True,
    cancel_after: int | None = None,
) -> Retrieved:
    """One C-GET, calling as VIEWER with a storage context for each (SOP class, transfer
    syntax) and the SCP role for those classes (unless `scp_role` is False); each C-STORE
    sub-operation is answered `answer`; with `cancel_after`, a C-CANCEL follows that many
    Pending responses."""
    ae = scu("VIEWER")
    ae.add_requested_context(model)
    roles: list[Any] = []  # role selections, as `associate` takes them (`ext_neg`)
    classes: set[str] = set()
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
        if scp_role and sop_class not in classes:
            roles.append(build_role(sop_class, scp_role=True))
        classes.add(sop_class)
    datasets: dict[str, tuple[str, bytes]] = {}

    def received(event: Any) -> int:
        syntax = str(event.context.transfer_syntax)
        datasets[str(event.request.AffectedSOPInstanceUID)] = (
            syntax,
            event.request.DataSet.getvalue(),
        )
        return answer

    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=SCP_AE,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, received)],
    )
    if not assoc.is_established:
        raise ConnectionError("association refused")
    try:
        answers = assoc.send_c_get(identifier, model, msg_id=GET_MESSAGE_ID)
        responses, final = _retrieve_responses(assoc, answers, model, GET_MESSAGE_ID, cancel_after)
    finally:
        if assoc.is_established:
            assoc.release()
    return Retrieved(datasets, responses, final)


GET_MESSAGE_ID = 7
MOVE_MESSAGE_ID = 9
_COUNTS = (
    "Status",
    "NumberOfRemainingSuboperations",
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations",
)


def _retrieve_responses(
    assoc: Any,
    answers: Iterable[tuple[Dataset, Dataset | None]],
    model: str,
    message_id: int,
    cancel_after: int | None,
) -> tuple[list[dict[str, int | None]], Dataset | None]:
    """The status and counts of each C-GET-RSP or C-MOVE-RSP, and the last identifier; a
    C-CANCEL after `cancel_after` responses."""
    responses: list[dict[str, int | None]] = []
    final: Dataset | None = None
    for answer, ident in answers:
        if "Status" not in answer:
            continue
        responses.append({k: (int(answer[k].value) if k in answer else None) for k in _COUNTS})
        final = ident
        if cancel_after is not None and len(responses) == cancel_after:
            [context] = [c for c in assoc.accepted_contexts if c.abstract_syntax == model]
            assoc.send_c_cancel(message_id, context.context_id)
    return responses, final


def c_move(
    port: int, identifier: Dataset, destination: str, *, cancel_after: int | None = None
) -> Retrieved:
    """One C-MOVE from VIEWER (Study Root, Message ID `MOVE_MESSAGE_ID`) to `destination`: the
    responses and the last identifier (nothing comes back on this association)."""
    ae = scu("VIEWER")
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    if not assoc.is_established:
        raise ConnectionError("association refused")
    try:
        answers = assoc.send_c_move(
            identifier, destination, STUDY_ROOT_MOVE, msg_id=MOVE_MESSAGE_ID
        )
        responses, final = _retrieve_responses(
            assoc, answers, STUDY_ROOT_MOVE, MOVE_MESSAGE_ID, cancel_after
        )
    finally:
        if assoc.is_established:
            assoc.release()
    return Retrieved({}, responses, final)


def read(path: str | Path) -> Dataset:
    return dcmread(path)


# --- assertions on the store ------------------------------------------------------------------


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def stored_files(root: Path) -> list[Path]:
    return [p for p in files_under(root) if p.suffix == ".dcm" and p.parent.name != "tmp"]


def temp_files(root: Path) -> list[Path]:
    tmp = root / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def sha256_of(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


async def instance_row(pool: asyncpg.Pool, uid: str) -> Any:
    return await pool.fetchrow(
        """SELECT i.*, se.series_uid, se.modality, s.study_uid, s.patient_name, s.patient_id,
                  s.charset
           FROM dicom_instance i JOIN dicom_series se ON se.id = i.series_id
           JOIN dicom_study s ON s.id = se.study_id
           WHERE i.sop_instance_uid = $1""",
        uid,
    )


def paths_in(root: Path, names: Iterable[str]) -> list[Path]:
    return [root / n for n in names]


def outside(root: Path, base: Path) -> list[Path]:
    """Files under `base` (e.g. tmp_path) that are not under `root`."""
    found = []
    for dirpath, _, files in os.walk(base):
        for name in files:
            path = Path(dirpath) / name
            if not path.resolve().is_relative_to(root.resolve()):
                found.append(path)
    return found


# --- raw C-STORE requests a well-behaved SCU would not send -----------------------------------


def store_pdus(
    context_id: int, ds: Dataset, *, with_instance_uid: bool = True, max_pdu: int = 16384
) -> list[bytes]:
    """The P-DATA-TF PDUs of a C-STORE-RQ of `ds` (its own transfer syntax), encoded."""
    syntax = ds.file_meta.TransferSyntaxUID
    encoded = encode(ds, syntax.is_implicit_VR, syntax.is_little_endian)
    assert encoded is not None
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = ds.SOPClassUID
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 2
    primitive.DataSet = BytesIO(encoded)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    if not with_instance_uid:
        del message.command_set.AffectedSOPInstanceUID
    pdus = []
    for p_data in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        pdus.append(pdu.encode())
    return pdus


def associate_for(port: int, ds: Dataset, ae_title: str = "MODALITY") -> Any:
    """An established association with one context for `ds` (pynetdicom's Association)."""
    ae = scu(ae_title)
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    if not assoc.is_established:
        raise ConnectionError("association refused")
    return assoc


def send_raw_store(
    port: int, ds: Dataset, *, with_instance_uid: bool = True, pdus: int | None = None
) -> tuple[int | None, Any]:
    """Send the PDUs of a C-STORE-RQ by hand (all, or the first `pdus` and then A-ABORT).

    Returns the status of the C-STORE-RSP that came back (None: none within 10 s, or aborted)
    and the association, released or aborted."""
    assoc = associate_for(port, ds)
    answers: list[int] = []

    def on_recv(event: Any) -> None:
        command = event.message.command_set
        if "Status" in command:
            answers.append(int(command.Status))

    assoc.bind(evt.EVT_DIMSE_RECV, on_recv)
    encoded = store_pdus(
        assoc.accepted_contexts[0].context_id, ds, with_instance_uid=with_instance_uid
    )
    for pdu in encoded[:pdus]:
        assoc.dul.socket.send(pdu)
    if pdus is not None:
        assoc.abort()
        return None, assoc
    deadline = time.monotonic() + 10
    while not answers and assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.01)
    if assoc.is_established:
        assoc.release()
    return (answers[0] if answers else None), assoc


def renumbered(ds: Dataset) -> Dataset:
    """`ds` under new UIDs, so that a test stores an instance of its own."""
    suffix = str(int(secrets.token_hex(6), 16))
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.11.{suffix}"
    ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.12.{suffix}"
    ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.13.{suffix}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def charset_file(name: str) -> Dataset:
    """One of pydicom's character set files (`chrArab.dcm`...)."""
    [path] = get_charset_files(name)
    return dcmread(path)
