"""uvicorn's HTTP protocol (httptools) with two deadlines it lacks.

uvicorn times out a keep-alive connection only after a response (`timeout_keep_alive`, 5 s), and
gives a request's head no deadline: a client that connects and sends nothing, or sends its
request line and headers a byte at a time, holds its connection for as long as it likes. With
`QANTARA_HTTP_MAX_CONNECTIONS` (uvicorn's `limit_concurrency`), a few hundred such connections
would make the API answer 503 to everyone. Here:

- the keep-alive timer also starts when the connection is made (uvicorn itself stops it at the
  first byte received, as on a kept-alive connection);
- a request's line and headers must be complete within `head_seconds` of the connection, or of
  the previous response; otherwise the connection is closed.

Beyond `QANTARA_HTTP_MAX_CONNECTIONS`, uvicorn answers 503 with `Service Unavailable` in plain
text; here the answer is what every other error of the API is, an `OperationOutcome` (issue
`throttled`), with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import ClassVar, Final

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.fhir_outcome import operation_outcome
from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)

HEAD_SECONDS = 30.0
"""How long a request's line and headers may take to arrive."""
BUSY_RETRY_AFTER: Final = 1
_BUSY_BODY: Final = json.dumps(
    operation_outcome(
        "throttled",
        "the gateway is serving as many connections as it may (QANTARA_HTTP_MAX_CONNECTIONS);"
        " retry later",
    ),
    separators=(",", ":"),
).encode()


async def busy(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to a request beyond the bound: 503 and an OperationOutcome; the connection
    closes."""
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/fhir+json"),
                (b"content-length", str(len(_BUSY_BODY)).encode()),
                (b"retry-after", str(BUSY_RETRY_AFTER).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _BUSY_BODY, "more_body": False})


class HttpProtocol(HttpToolsProtocol):
    head_seconds: ClassVar[float] = HEAD_SECONDS
    metrics: ClassVar[Metrics | None] = None
    """Where a request refused beyond the bound is counted (`counted_in`)."""
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
        self._await_head()

    def on_headers_complete(self) -> None:
        self._stop_waiting_for_head()
        limit = self.limit_concurrency
        if limit is None or (len(self.connections) < limit and len(self.tasks) < limit):
            super().on_headers_complete()
            return
        # uvicorn would pick its plain-text answer: let it take `busy` as the application of
        # this one request instead.
        app, self.app, self.limit_concurrency = self.app, busy, None
        try:
            super().on_headers_complete()
        finally:
            self.app, self.limit_concurrency = app, limit
        logger.warning("HTTP request answered 503: %d connections or requests in progress", limit)
        if self.metrics is not None:
            self.metrics.http_requests.labels("-", "503").inc()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # armed by uvicorn: no request is pipelined
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting_for_head()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._stop_waiting_for_head()
        self._head_deadline = self.loop.call_later(
            self.head_seconds,
            self.timeout_keep_alive_handler,  # closes unless closing already
        )

    def _stop_waiting_for_head(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None


def counted_in(metrics: Metrics) -> type[HttpProtocol]:
    """The protocol class for uvicorn, counting the requests it refuses beyond the bound in
    `metrics` (those the application serves are counted by `gateway.http`)."""
    return type("CountedHttpProtocol", (HttpProtocol,), {"metrics": metrics})
