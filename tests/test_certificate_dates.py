"""A certificate's end of validity and a CRL's next update, read from their DER
(`ingest.certificate_dates`)."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.certificate_dates import CertificateError, next_update, not_after, validity_end
from tests.tls_support import make_secrets

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl_date(command: str, pem: Path, field: str) -> datetime:
    """What `openssl COMMAND -noout -FIELD` reads of `pem`, e.g. x509's enddate."""
    out = subprocess.run(
        ["openssl", command, "-in", str(pem), "-noout", f"-{field}", "-dateopt", "iso_8601"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    value = out.strip().split("=", 1)[1]
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def openssl_end(pem: Path) -> datetime:
    return openssl_date("x509", pem, "enddate")


def self_signed(folder: Path, name: str, days: int) -> Path:
    pem = folder / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(folder / f"{name}.key"), "-out", str(pem), "-days", str(days),
         "-subj", f"/CN={name}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return pem


@needs_openssl
def test_the_end_of_validity_is_the_one_openssl_reads(tmp_path: Path) -> None:
    pem = self_signed(tmp_path, "gateway", 397)
    assert not_after(pem) == openssl_end(pem)


@needs_openssl
def test_a_chain_file_gives_its_first_certificate_the_leaf(tmp_path: Path) -> None:
    leaf, issuer = self_signed(tmp_path, "leaf", 30), self_signed(tmp_path, "issuer", 3650)
    chain = tmp_path / "chain.pem"
    chain.write_text(leaf.read_text() + issuer.read_text())
    assert not_after(chain) == openssl_end(leaf)


@needs_openssl
def test_a_certificate_after_2049_has_a_generalized_time(tmp_path: Path) -> None:
    pem = self_signed(tmp_path, "far", 40 * 366)
    assert not_after(pem) == openssl_end(pem)
    assert not_after(pem).year >= 2066


def der(tag: int, content: bytes) -> bytes:
    assert len(content) < 128
    return bytes([tag, len(content)]) + content


def v1_certificate(not_before: bytes, not_after: bytes) -> bytes:
    """A DER certificate skeleton without a version field, as v1 certificates are."""
    validity = der(0x30, der(0x17, not_before) + der(0x17, not_after))
    tbs = der(0x30, der(0x02, b"\x01") + der(0x30, b"") + der(0x30, b"") + validity)
    return der(0x30, tbs + der(0x30, b"") + der(0x03, b"\x00"))


def test_a_two_digit_year_from_50_is_in_the_1900s() -> None:
    ends = validity_end(v1_certificate(b"490101000000Z", b"500101120000Z"))
    assert ends == datetime(1950, 1, 1, 12, tzinfo=UTC)


def test_a_two_digit_year_below_50_is_in_the_2000s() -> None:
    ends = validity_end(v1_certificate(b"260101000000Z", b"491231235959Z"))
    assert ends == datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC)


def test_a_file_without_a_certificate_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "only.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CertificateError):
        not_after(key)


def test_truncated_der_is_refused() -> None:
    whole = v1_certificate(b"260101000000Z", b"270101000000Z")
    with pytest.raises(CertificateError):
        validity_end(whole[: len(whole) // 2])


def test_a_crl_s_next_update_is_the_one_openssl_reads(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    make_secrets(secrets, SENDERS="CR-UNIT-07")
    make_secrets(secrets, REVOKE="CR-UNIT-07")
    crl = secrets / "crl.pem"
    expected = openssl_date("crl", crl, "nextupdate")
    assert next_update(crl) == expected


def test_a_certificate_file_is_not_a_crl(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="no PEM X509 CRL"):
        next_update(self_signed(tmp_path, "leaf", 30))


def test_a_file_with_bytes_outside_ascii_is_not_a_pem(tmp_path: Path) -> None:
    binary = tmp_path / "gateway.der"
    binary.write_bytes(b"\x30\x82\xff\xfe-----BEGIN CERTIFICATE-----")
    with pytest.raises(CertificateError, match="not a PEM file"):
        not_after(binary)


def test_a_time_that_is_not_ascii_is_refused() -> None:
    with pytest.raises(CertificateError, match="not ASCII"):
        validity_end(v1_certificate(b"260101000000Z", b"27010100000\xffZ"))
