"""The HTTP listener over TLS (`gateway.https`): uvicorn serves behind the gateway's own
handshake, which tells its failures and takes renewed certificates on reload. An ASGI app
that answers with the request's scheme stands for the API; httpx and raw sockets are the
clients. The whole gateway over HTTPS is in test_tls.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.https import https_protocol
from ingest.group_tasks import GroupTasks
from ingest.tls import ListenerTls, listener_tls, server_context
from monitoring.metrics import Metrics
from tests.services_support import wait_until
from tests.tls_support import Pki, distrustful_context, issue_server_certificate, pki

__all__ = ["pki"]  # fixture, used by name

pytestmark = pytest.mark.timeout(60)


async def scheme_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request with the scheme uvicorn gave it."""
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["scheme"].encode()})


@dataclass
class RunningHttps:
    port: int
    tls: ListenerTls
    handshakes: GroupTasks
    metrics: Metrics

    def failures(self, reason: str) -> float:
        labels = {"listener": "http", "reason": reason}
        return self.metrics.sample("qantara_tls_handshake_failures_total", labels) or 0.0


@asynccontextmanager
async def running_https(
    cert: Path, key: Path, *, within: float = 5.0
) -> AsyncIterator[RunningHttps]:
    """uvicorn with `https_protocol` on a free port, its handshakes in a task group of ours."""
    tls = listener_tls("http", lambda: server_context(cert, key, None), "QANTARA_HTTP_TLS_*")
    assert tls is not None
    metrics = Metrics()
    handshakes = GroupTasks("http-tls-handshake")
    config = uvicorn.Config(
        scheme_app,
        host="127.0.0.1",
        port=0,
        http=https_protocol(tls, handshakes, metrics, within=within),
        log_config=None,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    async with asyncio.TaskGroup() as group:
        handshakes.open(group)
        serving = group.create_task(server.serve())
        await wait_until(lambda: server.started, timeout=10, message="uvicorn did not start")
        port = int(server.servers[0].sockets[0].getsockname()[1])
        try:
            yield RunningHttps(port, tls, handshakes, metrics)
        finally:
            server.should_exit = True
            handshakes.close()
            async with asyncio.timeout(10):
                await serving


@pytest.fixture
async def https(pki: Pki) -> AsyncIterator[RunningHttps]:
    async with running_https(pki.server_cert, pki.server_key) as running:
        yield running


def trusting(pki: Pki) -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=ssl.create_default_context(cafile=pki.ca), timeout=5.0)


def handshake(port: int, context: ssl.SSLContext) -> bytes:
    """A TLS handshake with the listener; the DER of the certificate it presented."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def served_certificate(port: int) -> bytes:
    """The DER of the certificate the listener presents (not verified)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return handshake(port, context)


def copied_server_pair(pki: Pki, folder: Path) -> tuple[Path, Path]:
    """The test server's certificate and key copied into `folder`, for a test to replace."""
    cert, key = folder / "http.crt", folder / "http.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    return cert, key


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


async def test_a_request_over_tls_is_served_as_https(https: RunningHttps, pki: Pki) -> None:
    async with trusting(pki) as client:
        response = await client.get(f"https://127.0.0.1:{https.port}/")
    assert (response.status_code, response.text) == (200, "https")


async def test_plain_http_on_the_tls_port_is_counted_as_protocol_and_the_listener_serves_on(
    https: RunningHttps, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingest.tls")
    async with httpx.AsyncClient(timeout=5.0) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(f"http://127.0.0.1:{https.port}/")
    await wait_until(lambda: https.failures("protocol") == 1, timeout=10)
    assert "http TLS handshake from 127.0.0.1:" in caplog.text
    async with trusting(pki) as client:
        assert (await client.get(f"https://127.0.0.1:{https.port}/")).text == "https"


async def test_a_client_that_does_not_trust_the_certificate_is_counted_as_peer_refused(
    https: RunningHttps, pki: Pki
) -> None:
    # A blocking socket: its failed verification sends the alert (httpx closes without one).
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(handshake, https.port, distrustful_context(pki))
    await wait_until(lambda: https.failures("peer_refused") == 1, timeout=10)


async def test_a_client_silent_past_the_handshake_time_is_counted_as_timeout(pki: Pki) -> None:
    async with running_https(pki.server_cert, pki.server_key, within=0.5) as https:
        reader, writer = await asyncio.open_connection("127.0.0.1", https.port)
        try:
            await wait_until(lambda: https.failures("timeout") == 1, timeout=10)
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed by the listener
        finally:
            writer.close()


async def test_a_reload_serves_the_renewed_certificate_to_the_connections_that_follow(
    pki: Pki, tmp_path: Path
) -> None:
    cert, key = copied_server_pair(pki, tmp_path)
    renewed_cert, renewed_key = issue_server_certificate(pki, "renewed")
    async with running_https(cert, key) as https:
        assert await asyncio.to_thread(served_certificate, https.port) == der_of(pki.server_cert)
        cert.write_bytes(renewed_cert.read_bytes())
        key.write_bytes(renewed_key.read_bytes())
        assert await asyncio.to_thread(served_certificate, https.port) == der_of(pki.server_cert)
        assert https.tls.reload()
        assert await asyncio.to_thread(served_certificate, https.port) == der_of(renewed_cert)
        async with trusting(pki) as client:
            assert (await client.get(f"https://127.0.0.1:{https.port}/")).text == "https"


async def test_a_key_that_does_not_match_is_not_reloaded_and_the_listener_serves_on(
    pki: Pki, tmp_path: Path
) -> None:
    cert, key = copied_server_pair(pki, tmp_path)
    renewed_cert, _ = issue_server_certificate(pki, "half-renewed")
    async with running_https(cert, key) as https:
        cert.write_bytes(renewed_cert.read_bytes())  # the new certificate, the old key
        assert not https.tls.reload()
        assert await asyncio.to_thread(served_certificate, https.port) == der_of(pki.server_cert)
        async with trusting(pki) as client:
            assert (await client.get(f"https://127.0.0.1:{https.port}/")).text == "https"


async def test_stopping_cancels_the_handshakes_in_progress(pki: Pki) -> None:
    handshakes: Callable[[], int]
    async with running_https(pki.server_cert, pki.server_key, within=30.0) as https:
        handshakes = https.handshakes.__len__
        reader, writer = await asyncio.open_connection("127.0.0.1", https.port)
        await wait_until(lambda: handshakes() == 1, timeout=10)
    assert handshakes() == 0
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


def request_with_the_handshake_s_end(port: int, context: ssl.SSLContext) -> bytes:
    """A TLS client whose last handshake message and first request leave in one write (as
    they often do), over memory BIOs; the listener's answer, up to its last (empty) chunk."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                received = raw.recv(65536)
                if not received:
                    raise ConnectionError("closed during the handshake") from None
                incoming.write(received)
        tls.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        raw.sendall(outgoing.read())  # the client's Finished and the request, together
        answer = b""
        while not answer.endswith(b"\r\n0\r\n\r\n") and (received := raw.recv(65536)):
            incoming.write(received)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                while chunk := tls.read(65536):
                    answer += chunk
        return answer


async def test_a_request_sent_with_the_end_of_the_handshake_is_served(
    https: RunningHttps, pki: Pki
) -> None:
    # asyncio's TLS layer hands such a request to the protocol before `start_tls` returns:
    # uvicorn then answered with a transport it had not been given (2026-11-29, httpx clients
    # got "Server disconnected" one time in two).
    context = ssl.create_default_context(cafile=pki.ca)
    answer = await asyncio.to_thread(request_with_the_handshake_s_end, https.port, context)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"\r\n5\r\nhttps\r\n" in answer
