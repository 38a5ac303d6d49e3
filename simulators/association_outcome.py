"""Why a simulated DICOM peer got no association. pynetdicom marks a TCP connection that could
not be made and an A-ABORT from the peer alike (`is_aborted`), and its log line says only the
first; the person at the console needs to know whether the gateway is not listening, refused
this AE, or closed the connection (a TLS certificate it does not accept)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association


def associate(
    ae: AE, host: str, port: int, *, evt_handlers: Sequence[Any] = (), **kwargs: Any
) -> tuple[Association, str | None]:
    """`ae.associate(host, port, ...)`, and None when established, else why not in words."""
    opened = threading.Event()
    handlers = [*evt_handlers, (evt.EVT_CONN_OPEN, lambda event: opened.set())]
    assoc = ae.associate(host, port, evt_handlers=handlers, **kwargs)
    if assoc.is_established:
        return assoc, None
    return assoc, why_not(assoc, connected=opened.is_set(), address=f"{host}:{port}")


def why_not(assoc: Association, *, connected: bool, address: str) -> str:
    if not connected:
        return f"no connection to {address}"
    if assoc.is_rejected:
        return "association rejected"
    return "connection closed before the association was accepted"
