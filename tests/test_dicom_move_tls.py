"""C-MOVE to a destination over TLS (`tls://` in QANTARA_DICOM_MOVE_DESTINATIONS): the gateway
checks the destination's certificate against QANTARA_DICOM_OUTBOUND_TLS_CA and presents its own
for mutual TLS; a destination whose certificate it does not trust gets nothing."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

from dicom import status
from dicom.config import AeAddress, DicomSettings
from ingest.errors import ConfigError
from tests.dicom_support import c_move, running_dicom, serving
from tests.test_dicom_get import stored_study, study_query
from tests.test_dicom_move import Workstation
from tests.tls_support import Pki, pki

__all__ = ["pki"]  # a fixture, used by name

pytestmark = pytest.mark.timeout(120)


@contextmanager
def tls_destination(cert: Path, key: Path, client_ca: Path) -> Iterator[Workstation]:
    """A storage SCP over TLS that demands a client certificate of `client_ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    ae = AE(ae_title="SECURE-PACS")
    for presentation in StoragePresentationContexts:
        assert presentation.abstract_syntax is not None
        ae.add_supported_context(presentation.abstract_syntax)
    station = Workstation(0)
    with serving(ae, [(evt.EVT_C_STORE, station.handle)], context) as port:
        station.port = port
        yield station


def settings(pki: Pki, port: int) -> DicomSettings:
    return DicomSettings(
        retrieve_aes=frozenset({"VIEWER"}),
        move_destinations=(AeAddress("SECURE-PACS", "127.0.0.1", port, tls=True),),
        outbound_tls_ca=pki.ca,
        outbound_tls_cert=pki.client_cert,
        outbound_tls_key=pki.client_key,
        acse_timeout=5.0,
    )


async def test_a_study_moved_over_mutual_tls_arrives(
    fresh_dsn: str, tmp_path: Path, pki: Pki
) -> None:
    with tls_destination(pki.server_cert, pki.server_key, pki.ca) as destination:
        async with running_dicom(fresh_dsn, tmp_path, settings(pki, destination.port)) as scp:
            instances = await stored_study(scp.port, 2)
            identifier = study_query(instances)
            moved = await asyncio.to_thread(c_move, scp.port, identifier, "SECURE-PACS")
    assert moved.final["Status"] == status.SUCCESS
    assert sorted(destination.received) == sorted(str(ds.SOPInstanceUID) for ds in instances)


async def test_a_destination_whose_certificate_we_do_not_trust_gets_nothing(
    fresh_dsn: str, tmp_path: Path, pki: Pki
) -> None:
    # The destination presents a certificate of the other CA (the stranger's).
    with tls_destination(pki.stranger_cert, pki.stranger_key, pki.ca) as destination:
        async with running_dicom(fresh_dsn, tmp_path, settings(pki, destination.port)) as scp:
            instances = await stored_study(scp.port, 1)
            identifier = study_query(instances)
            moved = await asyncio.to_thread(c_move, scp.port, identifier, "SECURE-PACS")
    assert moved.final["Status"] == status.GET_SUB_OPERATIONS_FAILED
    assert destination.received == {}


async def test_a_renewed_outbound_ca_is_taken_on_reload(
    fresh_dsn: str, tmp_path: Path, pki: Pki
) -> None:
    ca = tmp_path / "outbound-ca.pem"
    shutil.copy(pki.other_ca, ca)  # the wrong CA: the destination's certificate is refused
    with tls_destination(pki.server_cert, pki.server_key, pki.ca) as destination:
        trusting = replace(settings(pki, destination.port), outbound_tls_ca=ca)
        async with running_dicom(fresh_dsn, tmp_path / "store", trusting) as scp:
            instances = await stored_study(scp.port, 1)
            identifier = study_query(instances)
            refused = await asyncio.to_thread(c_move, scp.port, identifier, "SECURE-PACS")
            shutil.copy(pki.ca, ca)
            scp.server.reload_tls()  # what SIGHUP does
            moved = await asyncio.to_thread(c_move, scp.port, identifier, "SECURE-PACS")
    assert refused.final["Status"] == status.GET_SUB_OPERATIONS_FAILED
    assert moved.final["Status"] == status.SUCCESS
    assert list(destination.received) == [str(instances[0].SOPInstanceUID)]


async def test_an_outbound_ca_that_cannot_be_loaded_is_a_configuration_error(
    fresh_dsn: str, tmp_path: Path, pki: Pki
) -> None:
    garbage = tmp_path / "not-a-ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    broken = replace(settings(pki, 104), outbound_tls_ca=garbage)
    with pytest.raises(ConfigError, match="QANTARA_DICOM_OUTBOUND_TLS"):
        async with running_dicom(fresh_dsn, tmp_path / "store", broken):
            pass
