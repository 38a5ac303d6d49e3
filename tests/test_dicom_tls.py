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
from dicom.link import common_names
from simulators.modality import ModalityConfig, run_modality
from tests.dicom_support import RunningDicom, charset_file, echo, renumbered, running_dicom, store
from tests.tls_support import Pki, client_context, pki

__all__ = ["pki"]  # a fixture, used by name

pytestmark = pytest.mark.timeout(120)


def tls_settings(pki: Pki, *, mutual: bool = False, ae_from_cn: bool = False) -> DicomSettings:
    return DicomSettings(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca if mutual else None,
        tls_ae_from_cn=ae_from_cn,
        acse_timeout=5.0,
    )


@pytest.fixture
async def tls_scp(fresh_dsn: str, tmp_path: Path, pki: Pki) -> AsyncIterator[RunningDicom]:
    async with running_dicom(fresh_dsn, tmp_path / "store", tls_settings(pki)) as scp:
        yield scp


@pytest.fixture
async def mutual_scp(fresh_dsn: str, tmp_path: Path, pki: Pki) -> AsyncIterator[RunningDicom]:
    settings = tls_settings(pki, mutual=True)
    async with running_dicom(fresh_dsn, tmp_path / "store", settings) as scp:
        yield scp


@pytest.fixture
async def bound_scp(fresh_dsn: str, tmp_path: Path, pki: Pki) -> AsyncIterator[RunningDicom]:
    """Mutual TLS, and the calling AE title must be the certificate's commonName ("client")."""
    settings = tls_settings(pki, mutual=True, ae_from_cn=True)
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


async def test_a_modality_calling_as_its_certificate_s_common_name_is_answered(
    bound_scp: RunningDicom, pki: Pki
) -> None:
    context = client_context(pki, with_certificate=True)
    assert await asyncio.to_thread(echo, bound_scp.port, "client", tls=context) == (
        True,
        status.SUCCESS,
    )


async def test_a_modality_calling_as_another_ae_than_its_certificate_s_is_refused_and_counted(
    bound_scp: RunningDicom, pki: Pki
) -> None:
    context = client_context(pki, with_certificate=True)
    established, _ = await asyncio.to_thread(echo, bound_scp.port, "CT01", tls=context)
    assert not established
    rejected = bound_scp.metrics.dicom_associations_rejected.labels("certificate")
    assert rejected._value.get() == 1
    assert bound_scp.metrics.dicom_associations._value.get() == 0


def test_the_common_names_are_read_from_every_rdn_of_the_subject() -> None:
    certificate = {
        "subject": (
            (("countryName", "MA"),),
            (("organizationName", "CMMU Souss-Massa"),),
            (("commonName", "CR-UNIT-07"),),
            (("commonName", "CR07"),),
        )
    }
    assert common_names(certificate) == {"CR-UNIT-07", "CR07"}


def test_no_certificate_or_an_unverified_one_has_no_common_name() -> None:
    assert common_names(None) == frozenset()
    assert common_names({}) == frozenset()  # getpeercert() without a client CA
