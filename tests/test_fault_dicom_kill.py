"""Fault: `qantara serve` is SIGKILLed during 100 C-STOREs, then restarted.

Principle 1 for DICOM: 0x0000 means the file is fsynced and its index row committed. A modality
sends 100 instances one by one; after about 30 successes the gateway dies with SIGKILL. After a
restart (same database, same storage folder) the modality resends what it has no 0x0000 for. At
the end every instance that ever got 0x0000 is indexed once, its file is where the index says
with the SHA-256 the index says, and no index row names a temp file.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from pathlib import Path

import asyncpg
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from tests.dicom_support import scu, sha256_of
from tests.gateway_process import GatewayProcess
from tests.services_support import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.slow]

INSTANCES = 100
KILL_AFTER = 30


def instances() -> list[Dataset]:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    result: list[Dataset] = []
    for _ in range(INSTANCES):
        ds = dcmread(path)
        suffix = str(int(secrets.token_hex(6), 16))
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.10.21.{suffix}"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.22.{suffix}"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.23.{suffix}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        result.append(ds)
    return result


def send(port: int, datasets: list[Dataset], acked: set[str], lock: threading.Lock) -> None:
    """Send each dataset; record the UIDs answered 0x0000; stop at the first broken link."""
    ae = scu("CT-KILL")
    ae.add_requested_context(str(datasets[0].SOPClassUID), ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="QANTARA")
    if not assoc.is_established:
        return
    try:
        for ds in datasets:
            answer = assoc.send_c_store(ds)
            if "Status" in answer and int(answer.Status) == 0:
                with lock:
                    acked.add(str(ds.SOPInstanceUID))
            if not assoc.is_established:
                return
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.timeout(180)
async def test_gateway_killed_during_stores_keeps_every_acknowledged_instance_once(
    fresh_dsn: str, mqtt_url: str, tmp_path: Path
) -> None:
    storage = tmp_path / "dicom"
    datasets = instances()
    acked: set[str] = set()
    lock = threading.Lock()
    env = {"QANTARA_DICOM_STORAGE": str(storage)}
    async with GatewayProcess(database_url=fresh_dsn, mqtt_url=mqtt_url, env=env) as gateway:
        port = gateway.dicom_port()
        sender = asyncio.create_task(asyncio.to_thread(send, port, datasets, acked, lock))

        async def enough() -> bool:
            with lock:
                return len(acked) >= KILL_AFTER

        await wait_until(enough, timeout=60)
        await gateway.kill()
        async with asyncio.timeout(60):
            await sender
        acked_before_kill = set(acked)
        assert KILL_AFTER <= len(acked_before_kill) < INSTANCES

        await gateway.start()
        port = gateway.dicom_port()
        missing = [ds for ds in datasets if str(ds.SOPInstanceUID) not in acked]
        await asyncio.to_thread(send, port, missing, acked, lock)
        assert len(acked) == INSTANCES

    conn = await asyncpg.connect(fresh_dsn)
    try:
        rows = await conn.fetch(
            "SELECT sop_instance_uid, file_path, sha256 FROM dicom_instance"
            " WHERE sop_instance_uid = ANY($1::text[])",
            [str(ds.SOPInstanceUID) for ds in datasets],
        )
    finally:
        await conn.close()
    uids = [r["sop_instance_uid"] for r in rows]
    assert len(uids) == len(set(uids)) == INSTANCES  # every one, none doubled
    for row in rows:
        assert not row["file_path"].startswith("tmp/")
        path = storage / row["file_path"]
        assert sha256_of(path) == bytes(row["sha256"])
        assert str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) == row["sop_instance_uid"]
