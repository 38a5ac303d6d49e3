"""The listener's own timeouts end what a peer leaves hanging: an idle association after
`network_timeout`, a dataset that stops mid-transfer after `dimse_timeout`. (The ACSE timeout is
in test_dicom_listener.py.)"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from dicom import status
from dicom.config import DicomSettings
from tests.dicom_support import (
    associate_for,
    echo,
    instance_row,
    running_dicom,
    store_pdus,
    temp_files,
)
from tests.services_support import wait_until
from tests.test_dicom_store import fresh, large


def aborted_within(assoc: Any, seconds: float) -> bool:
    """Whether the listener aborted `assoc` within `seconds` (pynetdicom notices the A-ABORT)."""
    deadline = time.monotonic() + seconds
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(assoc.is_aborted)


async def test_an_idle_association_is_aborted_after_the_network_timeout(
    module_dsn: str, tmp_path: Path
) -> None:
    settings = DicomSettings(network_timeout=0.5)
    async with running_dicom(module_dsn, tmp_path / "store", settings) as quick:
        # Timed from before the association: the listener's idle clock starts at its last PDU,
        # after this, while `associate_for` returns to the loop only later (0.36 s of a 0.5 s
        # timeout measured after it on a loaded CI run).
        began = time.monotonic()
        assoc = await asyncio.to_thread(associate_for, quick.port, fresh())
        assert await asyncio.to_thread(aborted_within, assoc, 10.0)
        assert time.monotonic() - began >= 0.45
        assert quick.metrics.sample("qantara_dicom_associations") == 0


async def test_a_dataset_that_stops_mid_transfer_is_aborted_after_the_dimse_timeout(
    module_dsn: str, tmp_path: Path
) -> None:
    settings = DicomSettings(dimse_timeout=0.5, network_timeout=30.0)
    async with running_dicom(module_dsn, tmp_path / "store", settings) as quick:
        ds = large(fresh())  # 512 KiB: the command and 2 of its 33 PDUs are sent, then nothing
        assoc = await asyncio.to_thread(associate_for, quick.port, ds)
        for pdu in store_pdus(assoc.accepted_contexts[0].context_id, ds)[:3]:
            await asyncio.to_thread(assoc.dul.socket.send, pdu)
        assert await asyncio.to_thread(aborted_within, assoc, 10.0)
        await wait_until(lambda: not temp_files(quick.root), timeout=10)
        assert await instance_row(quick.pool, str(ds.SOPInstanceUID)) is None
        assert await asyncio.to_thread(echo, quick.port) == (True, status.SUCCESS)
