"""A test PKI made with the openssl CLI: a CA, a server certificate for 127.0.0.1 and a client
certificate, for the listeners' TLS tests (MLLP, DICOM); and a second CA, which the listeners do
not trust, with a client certificate of its own (a stranger)."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True, slots=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60
    )


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _issue(directory: Path, name: str, usage: str, ca: str = "ca") -> tuple[Path, Path]:
    """A P-256 key and a certificate for 127.0.0.1 signed by the test CA (`ca`.pem)."""
    key, csr, cert, ext = (directory / f"{name}.{x}" for x in ("key", "csr", "pem", "ext"))
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1\n"
    )
    _openssl(
        "req", "-new", *EC_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=directory
    )
    signing = ("-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "1")
    _openssl("x509", "-req", "-in", csr, *signing, "-out", cert, "-extfile", ext, cwd=directory)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make test certificates")
    directory = tmp_path_factory.mktemp("pki")
    ca_extensions = (
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for ca, name in (("ca", "Qantara test CA"), ("other-ca", "Another CA")):
        _openssl("req", "-x509", *EC_KEY, "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "1", "-subj", f"/CN={name}", *ca_extensions, cwd=directory)  # fmt: skip
    server_cert, server_key = _issue(directory, "server", "serverAuth")
    client_cert, client_key = _issue(directory, "client", "clientAuth")
    stranger_cert, stranger_key = _issue(directory, "stranger", "clientAuth", ca="other-ca")
    return Pki(
        directory / "ca.pem",
        server_cert,
        server_key,
        client_cert,
        client_key,
        directory / "other-ca.pem",
        stranger_cert,
        stranger_key,
    )


def issue_server_certificate(pki: Pki, name: str) -> tuple[Path, Path]:
    """Another server certificate for 127.0.0.1 from the test CA (a renewal): its certificate
    and key."""
    return _issue(pki.ca.parent, name, "serverAuth")


def client_context(pki: Pki, *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if with_certificate:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def stranger_context(pki: Pki) -> ssl.SSLContext:
    """A client that trusts the listener and presents a certificate of the other CA."""
    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(pki.stranger_cert, pki.stranger_key)
    return context


def distrustful_context(pki: Pki) -> ssl.SSLContext:
    """A client with a certificate of the test CA that trusts only the other CA: it refuses the
    listener's certificate (as a modality does once ours has expired or was replaced)."""
    context = ssl.create_default_context(cafile=pki.other_ca)
    context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


MAKE_SECRETS = Path(__file__).resolve().parent.parent / "deploy" / "make_secrets.sh"
"""The production secrets' script (`make certs`)."""


def make_secrets(secrets: Path, **variables: str) -> None:
    """Run `make certs`' script into `secrets` with `variables` (SENDERS=..., REVOKE=...); skip
    the test where its tools are missing."""
    if shutil.which("openssl") is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("needs openssl and mosquitto_passwd (make system-deps)")
    made = subprocess.run(
        ["bash", str(MAKE_SECRETS), str(secrets)],
        env={**os.environ, **variables},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The production secrets, with client certificates for the modalities CR-UNIT-07 and
    CR-UNIT-66, then CR-UNIT-66's revoked (a second run, as an operator would)."""
    secrets = tmp_path_factory.mktemp("deploy") / "secrets"
    make_secrets(secrets, SENDERS="CR-UNIT-07 CR-UNIT-66")
    make_secrets(secrets, REVOKE="CR-UNIT-66")
    return secrets
