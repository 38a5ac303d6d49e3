"""The TLS context of a listener that receives from equipment (MLLP, DICOM): one policy for both.

TLS 1.2 at least, the listener's certificate chain and key, and with a client CA, mutual TLS:
a peer must present a certificate that CA signed, or its handshake fails before any byte of
its protocol is read.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> ssl.SSLContext | None:
    """The server TLS context when a certificate is configured, else None (plain TCP)."""
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
