"""DICOM over TLS (PS3.15 B.1): the listener with a certificate speaks TLS only; with a client CA,
a modality must present a certificate that CA signed. pynetdicom is the peer."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom import status
from dicom.config import DicomSettings
from simulators.modality import ModalityConfig, run_modality
from tests.dicom_support import RunningDicom, charset_file, echo, renumbered, running_dicom, store
from tests.tls_support import Pki, client_context, pki

__all__ = ["pki"]  # a fixture, used by name

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def tls_scp(fresh_dsn: str, tmp_path: Path, pki: Pki) -> AsyncIterator[RunningDicom]:
    settings = DicomSettings(tls_cert=pki.server_cert, tls_key=pki.server_key, acse_timeout=5.0)
    async with running_dicom(fresh_dsn, tmp_path / "store", settings) as scp:
        yield scp


@pytest.fixture
async def mutual_scp(fresh_dsn: str, tmp_path: Path, pki: Pki) -> AsyncIterator[RunningDicom]:
    settings = DicomSettings(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca, acse_timeout=5.0
    )
    async with running_dicom(fresh_dsn, tmp_path / "store", settings) as scp:
        yield scp


def arabic_instance() -> Dataset:
    return renumbered(charset_file("chrArab.dcm"))


async def test_an_instance_sent_over_tls_is_stored_with_its_arabic_name(
    tls_scp: RunningDicom, pki: Pki
) -> None:
    ds = arabic_instance()
    context = client_context(pki, with_certificate=False)
    codes = await asyncio.to_thread(store, tls_scp.port, [ds], tls=context)
    assert codes == [status.SUCCESS]
    name = await tls_scp.pool.fetchval(
        "SELECT patient_name FROM dicom_study WHERE study_uid = $1", str(ds.StudyInstanceUID)
    )
    assert name == str(ds.PatientName)


async def test_a_plain_tcp_association_to_the_tls_listener_fails_and_the_listener_serves_on(
    tls_scp: RunningDicom, pki: Pki
) -> None:
    established, _ = await asyncio.to_thread(echo, tls_scp.port)
    assert not established
    context = client_context(pki, with_certificate=False)
    assert await asyncio.to_thread(echo, tls_scp.port, tls=context) == (True, status.SUCCESS)


async def test_mutual_tls_answers_a_modality_with_a_certificate_of_the_ca(
    mutual_scp: RunningDicom, pki: Pki
) -> None:
    context = client_context(pki, with_certificate=True)
    assert await asyncio.to_thread(echo, mutual_scp.port, tls=context) == (True, status.SUCCESS)


async def test_mutual_tls_drops_a_modality_without_a_certificate_before_any_association(
    mutual_scp: RunningDicom, pki: Pki
) -> None:
    context = client_context(pki, with_certificate=False)
    established, _ = await asyncio.to_thread(echo, mutual_scp.port, tls=context)
    assert not established
    assert mutual_scp.metrics.dicom_associations._value.get() == 0
    assert await asyncio.to_thread(
        echo, mutual_scp.port, tls=client_context(pki, with_certificate=True)
    ) == (True, status.SUCCESS)


async def test_a_peer_that_never_finishes_its_handshake_leaves_no_association_task(
    tls_scp: RunningDicom,
) -> None:
    with socket.create_connection(("127.0.0.1", tls_scp.port), timeout=10) as silent:
        await asyncio.sleep(0.3)
        assert tls_scp.server._tasks == set()
        # Closed by the handshake timeout (acse_timeout, 5 s); read in a thread, off the loop.
        assert await asyncio.to_thread(silent.recv, 1) == b""


async def test_the_modality_simulator_sends_over_mutual_tls(
    mutual_scp: RunningDicom, pki: Pki
) -> None:
    config = ModalityConfig(
        host="127.0.0.1",
        port=mutual_scp.port,
        modality="DX",
        studies=2,
        quiet=True,
        tls_ca=pki.ca,
        tls_cert=pki.client_cert,
        tls_key=pki.client_key,
    )
    report = await asyncio.to_thread(run_modality, config)
    assert (report.refused, report.failed, report.sent) == (False, 0, 4)
    assert await mutual_scp.pool.fetchval("SELECT count(*) FROM dicom_instance") == 4


async def test_the_modality_simulator_without_its_certificate_is_refused(
    mutual_scp: RunningDicom, pki: Pki
) -> None:
    config = ModalityConfig(
        host="127.0.0.1", port=mutual_scp.port, studies=1, quiet=True, tls_ca=pki.ca
    )
    report = await asyncio.to_thread(run_modality, config)
    assert report.refused
    assert report.sent == 0
