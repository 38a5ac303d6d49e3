"""uvicorn's HTTP protocol (httptools) with one change: a connection that sends nothing is closed.

uvicorn times out a keep-alive connection only after a response (`timeout_keep_alive`, 5 s): a
client that connects and never sends a request holds its connection for as long as it likes.
With `QANTARA_HTTP_MAX_CONNECTIONS` (uvicorn's `limit_concurrency`), a few hundred such
connections would make the API answer 503 to everyone. Here the same timer starts when the
connection is made, and uvicorn itself stops it at the first byte received, as it does on a
kept-alive connection.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
