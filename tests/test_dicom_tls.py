"""DICOM over TLS (PS3.15 B.1): the listener with a certificate speaks TLS only; with a client CA,
a modality must present a certificate that CA signed. pynetdicom is the peer."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom import status
from dicom.config import DicomSettings
from ingest.tls import common_names
from simulators.modality import ModalityConfig, run_modality
from tests.dicom_support import RunningDicom, charset_file, echo, renumbered, running_dicom, store
from tests.services_support import wait_until
from tests.tls_support import (
    Pki,
    client_context,
    deployed,
    distrustful_context,
    make_secrets,
    pki,
    stranger_context,
)

__all__ = ["deployed", "pki"]  # fixtures, used by name

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
    assert handshake_failures(tls_scp, "timeout") == 1


async def test_stopping_the_listener_does_not_wait_for_a_handshake_in_progress(
    tls_scp: RunningDicom,
) -> None:
    with socket.create_connection(("127.0.0.1", tls_scp.port), timeout=10) as silent:
        await wait_until(lambda: len(tls_scp.server._handshakes) == 1, timeout=5)
        started = asyncio.get_running_loop().time()
        await tls_scp.server.stop()
        assert asyncio.get_running_loop().time() - started < 3.0  # the handshake's limit is 5 s
        assert await asyncio.to_thread(silent.recv, 1) == b""


def handshake_failures(scp: RunningDicom, reason: str) -> float:
    return scp.metrics.tls_handshake_failures.labels("dicom", reason)._value.get()  # type: ignore[no-any-return]


async def counted(scp: RunningDicom, reason: str) -> None:
    """The listener counts a failed handshake as it sees it: after the client may have."""
    await wait_until(lambda: handshake_failures(scp, reason) == 1, timeout=10, message=reason)


async def test_a_modality_without_a_certificate_is_counted_and_logged_with_its_address(
    mutual_scp: RunningDicom, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ingest.tls")
    context = client_context(pki, with_certificate=False)
    await asyncio.to_thread(echo, mutual_scp.port, tls=context)
    await counted(mutual_scp, "no_certificate")
    assert "dicom TLS handshake from 127.0.0.1:" in caplog.text
    assert "failed (no_certificate)" in caplog.text


async def test_a_certificate_of_another_ca_is_counted_with_the_verification_s_reason(
    mutual_scp: RunningDicom, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ingest.tls")
    established, _ = await asyncio.to_thread(echo, mutual_scp.port, tls=stranger_context(pki))
    assert not established
    await counted(mutual_scp, "certificate")
    assert "failed (certificate): unable to get local issuer certificate" in caplog.text
    assert mutual_scp.metrics.dicom_associations._value.get() == 0


async def test_a_modality_that_does_not_trust_our_certificate_is_counted_as_peer_refused(
    mutual_scp: RunningDicom, pki: Pki
) -> None:
    established, _ = await asyncio.to_thread(echo, mutual_scp.port, tls=distrustful_context(pki))
    assert not established
    await counted(mutual_scp, "peer_refused")


async def test_a_peer_that_hangs_up_before_its_handshake_is_counted_as_closed_at_once(
    tls_scp: RunningDicom,
) -> None:
    socket.create_connection(("127.0.0.1", tls_scp.port), timeout=10).close()
    await counted(tls_scp, "closed")  # within 10 s; a timeout would take the ACSE 5 s at least
    assert handshake_failures(tls_scp, "timeout") == 0
    await wait_until(lambda: len(tls_scp.server._handshakes) == 0, timeout=5)


async def test_plain_dicom_on_the_tls_port_is_counted_as_protocol(tls_scp: RunningDicom) -> None:
    established, _ = await asyncio.to_thread(echo, tls_scp.port)
    assert not established
    await counted(tls_scp, "protocol")


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
    assert report.summary() == "connection closed before the association was accepted"
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


def deployed_modality(
    secrets: Path, port: int, calling_ae: str, certificate: Path | None = None
) -> ModalityConfig:
    """A modality calling as `calling_ae` with CR-UNIT-07's certificate, or `certificate`
    (a .crt beside its .key)."""
    cert = certificate or secrets / "senders" / "CR-UNIT-07.crt"
    return ModalityConfig(
        host="127.0.0.1",
        port=port,
        calling_ae=calling_ae,
        studies=1,
        quiet=True,
        tls_ca=secrets / "ca.crt",
        tls_cert=cert,
        tls_key=cert.with_suffix(".key"),
    )


async def test_a_sender_certificate_of_make_secrets_binds_its_modality_s_ae_title(
    fresh_dsn: str, tmp_path: Path, deployed: Path
) -> None:
    settings = DicomSettings(
        tls_cert=deployed / "gateway.crt",
        tls_key=deployed / "gateway.key",
        tls_client_ca=deployed / "ca.crt",
        tls_ae_from_cn=True,
        acse_timeout=5.0,
    )
    async with running_dicom(fresh_dsn, tmp_path / "store", settings) as scp:
        own = await asyncio.to_thread(
            run_modality, deployed_modality(deployed, scp.port, "CR-UNIT-07")
        )
        other = await asyncio.to_thread(
            run_modality, deployed_modality(deployed, scp.port, "CR-UNIT-08")
        )
        stored = await scp.pool.fetchval("SELECT count(*) FROM dicom_instance")
    assert (own.refused, own.failed, own.sent) == (False, 0, 2)
    assert other.refused
    assert stored == 2


async def test_a_revoked_modality_certificate_is_refused_at_the_handshake_and_counted(
    fresh_dsn: str, tmp_path: Path, deployed: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ingest.tls")
    [revoked] = (deployed / "senders" / "revoked").glob("CR-UNIT-66-*.crt")
    async with running_dicom(fresh_dsn, tmp_path / "store", crl_settings(deployed)) as scp:
        refused = await asyncio.to_thread(
            run_modality, deployed_modality(deployed, scp.port, "CR-UNIT-66", revoked)
        )
        await counted(scp, "certificate")
        served = await asyncio.to_thread(
            run_modality, deployed_modality(deployed, scp.port, "CR-UNIT-07")
        )
    assert refused.refused
    assert "failed (certificate): certificate revoked" in caplog.text
    assert (served.refused, served.failed, served.sent) == (False, 0, 2)


def crl_settings(secrets: Path) -> DicomSettings:
    return DicomSettings(
        tls_cert=secrets / "gateway.crt",
        tls_key=secrets / "gateway.key",
        tls_client_ca=secrets / "ca.crt",
        tls_crl=secrets / "crl.pem",
        acse_timeout=5.0,
    )


async def test_a_revocation_applies_to_the_next_associations_once_the_tls_files_are_reloaded(
    fresh_dsn: str, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    make_secrets(secrets, SENDERS="CR-UNIT-07 CR-UNIT-66")
    stolen = secrets / "senders" / "CR-UNIT-66.crt"
    async with running_dicom(fresh_dsn, tmp_path / "store", crl_settings(secrets)) as scp:

        async def send(calling_ae: str, certificate: Path | None = None) -> bool:
            config = deployed_modality(secrets, scp.port, calling_ae, certificate)
            return not (await asyncio.to_thread(run_modality, config)).refused

        make_secrets(secrets, REVOKE="CR-UNIT-66")
        [revoked] = (secrets / "senders" / "revoked").glob("CR-UNIT-66-*.crt")
        assert not stolen.exists()
        assert await send("CR-UNIT-66", revoked)  # the listener still has the list of its start
        assert scp.server.reload_tls()
        assert not await send("CR-UNIT-66", revoked)
        assert await send("CR-UNIT-07")


async def test_tls_files_that_cannot_be_read_are_not_reloaded_and_the_listener_serves_on(
    fresh_dsn: str, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    make_secrets(secrets, SENDERS="CR-UNIT-07")
    async with running_dicom(fresh_dsn, tmp_path / "store", crl_settings(secrets)) as scp:
        (secrets / "crl.pem").write_text(
            "-----BEGIN X509 CRL-----\nnot one\n-----END X509 CRL-----\n"
        )
        assert not scp.server.reload_tls()
        report = await asyncio.to_thread(
            run_modality, deployed_modality(secrets, scp.port, "CR-UNIT-07")
        )
    assert (report.refused, report.failed, report.sent) == (False, 0, 2)
