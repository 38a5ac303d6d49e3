"""The TLS side of a simulated sender (lab analyzer, modality): trust the gateway's CA, and for
mutual TLS present a certificate of our own, as a configured device does."""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext | None:
    """A client context that checks the gateway's certificate against `ca` (None: plain TCP),
    with `cert` and `key` presented when given."""
    if ca is None:
        return None
    context = ssl.create_default_context(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def pynetdicom_tls_args(
    host: str, ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for a DICOM simulator: the client context of `client_context`
    and the server name it checks (`host`), or None for plain TCP."""
    context = client_context(ca, cert, key)
    return None if context is None else (context, host)
