"""The HTTP listener over TLS: uvicorn's protocol behind the handshake of the equipment listeners.

Given `ssl_certfile`, uvicorn makes a context of its own and hands it to `create_server(ssl=...)`.
A certificate renewed on disk was then served only after a restart, and a failed handshake went
unseen: asyncio drops it without a word (it logs only in debug mode), so the patient file
service turned away by an expired certificate, or a client sending plain HTTP to the HTTPS
port, left nothing in the gateway's log or metrics.

Here uvicorn listens on plain TCP and its protocol class is `https_protocol(...)`: each
connection is an `ingest.tls.TlsIntake`, as on the MLLP and DICOM listeners. The context is the
listener's `ListenerTls` (read again on SIGHUP, for the connections to come), a failure is logged
with the peer's address and counted in `qantara_tls_handshake_failures_total{listener="http"}`,
and once the handshake is over uvicorn's protocol (httptools, `gateway.http_protocol`) gets the
TLS transport. It finds the TLS context on that transport and serves the requests as `https`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.http_protocol import counted_in
from ingest.group_tasks import GroupTasks
from ingest.tls import ListenerTls, TlsIntake
from monitoring.metrics import Metrics

HANDSHAKE_SECONDS = 10.0
"""How long a client has to finish its TLS handshake with the HTTP listener."""


def https_protocol(
    tls: ListenerTls, handshakes: GroupTasks, metrics: Metrics, *, within: float = HANDSHAKE_SECONDS
) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (`Config(http=...)`, and no `ssl_*` there): each
    connection's handshake runs in `handshakes` with `tls`'s context of the moment, then
    httptools serves it. `handshakes` must be open while the server accepts."""

    protocol = counted_in(metrics)

    class HttpsIntake(TlsIntake):
        def __init__(self, **uvicorn_arguments: Any) -> None:  # config, server_state...
            super().__init__(
                tls.context,
                lambda: protocol(**uvicorn_arguments),
                handshakes.start,
                listener="http",
                within=within,
                metrics=metrics,
            )

    return HttpsIntake
