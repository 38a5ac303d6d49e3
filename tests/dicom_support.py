"""Test support for the DICOM listener: a running SCP over a real database, and a pynetdicom SCU.

`running_dicom(dsn, root)` starts the pipeline and a `DicomServer` on port 0 in the test's loop
(migrations applied) and stops both at the end. The SCU helpers are blocking (pynetdicom's own
threads): tests call them through `asyncio.to_thread`, so the gateway's loop keeps committing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicom.config import DicomSettings
from dicom.filestore import FileStore
from dicom.scp import DicomServer
from ingest.pipeline import GroupCommitPipeline, PipelineSettings
from monitoring.metrics import Metrics
from storage.dicom_queries import find
from storage.migrations import apply_migrations
from storage.writer import BatchWriter

SCP_AE = "QANTARA"
VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


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
    dsn: str, root: Path, settings: DicomSettings | None = None, pool_size: int = 4
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
            metrics=metrics,
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


def echo(port: int, ae_title: str = "MODALITY") -> tuple[bool, int | None]:
    """(association accepted, C-ECHO status)."""
    ae = scu(ae_title)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    if not assoc.is_established:
        return False, None
    try:
        answer = assoc.send_c_echo()
        return True, int(answer.Status) if "Status" in answer else None
    finally:
        assoc.release()


def store(port: int, datasets: Sequence[Dataset], ae_title: str = "MODALITY") -> list[int | None]:
    """C-STORE each dataset (its own transfer syntax) on one association; their statuses."""
    ae = scu(ae_title)
    seen: set[tuple[str, str]] = set()
    for ds in datasets:
        pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if pair not in seen:
            seen.add(pair)
            ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AE)
    if not assoc.is_established:
        raise ConnectionError("association refused")
    statuses: list[int | None] = []
    try:
        for ds in datasets:
            answer = assoc.send_c_store(ds)
            statuses.append(int(answer.Status) if "Status" in answer else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


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
