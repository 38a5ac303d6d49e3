"""The HTTP listener's bounds: at most `QANTARA_HTTP_MAX_CONNECTIONS` connections before a request
is answered 503 (uvicorn's `limit_concurrency`); a connection that sends nothing is closed after
uvicorn's keep-alive time, and one whose request head does not arrive in time is closed too
(`gateway.http_protocol`), so that silent or trickling clients cannot hold the listener's slots.
uvicorn runs in the test's loop with a one-route app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.http_protocol import HttpProtocol, counted_in
from gateway.settings import Settings
from monitoring.metrics import Metrics
from tests.services_support import wait_until

pytestmark = pytest.mark.timeout(60)


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)  # past QuickHead's deadline
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class QuickHead(HttpProtocol):
    head_seconds = 1.0


@asynccontextmanager
async def listening(
    max_connections: int, keep_alive: int = 1, protocol: type[HttpProtocol] = QuickHead
) -> AsyncIterator[int]:
    config = uvicorn.Config(
        ok_app,
        host="127.0.0.1",
        port=0,
        http=protocol,
        limit_concurrency=max_connections,
        timeout_keep_alive=keep_alive,
        log_config=None,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started, timeout=10, message="uvicorn did not start")
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await serving


@asynccontextmanager
async def silent_connections(
    port: int, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    """`count` connections that send nothing, closed on our side at the end."""
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    try:
        yield silent
    finally:
        for _, writer in silent:
            writer.close()


async def status_of(port: int) -> int:
    async with httpx.AsyncClient(timeout=5.0) as client:
        return (await client.get(f"http://127.0.0.1:{port}/")).status_code


def test_the_bound_is_a_setting_of_a_thousand_by_default() -> None:
    assert Settings.load({}).http.max_connections == 1000
    assert Settings.load({"QANTARA_HTTP_MAX_CONNECTIONS": "50"}).http.max_connections == 50


async def test_a_request_beyond_the_connections_bound_is_answered_503() -> None:
    async with listening(max_connections=2, keep_alive=30) as port, silent_connections(port, 2):
        assert await status_of(port) == 503


async def test_the_503_beyond_the_bound_is_an_operation_outcome_with_retry_after() -> None:
    async with (
        listening(max_connections=2, keep_alive=30) as port,
        silent_connections(port, 2),
        httpx.AsyncClient(timeout=5.0) as client,
    ):
        response = await client.get(f"http://127.0.0.1:{port}/fhir/Patient/1")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/fhir+json"
    assert response.headers["retry-after"] == "1"
    [issue] = response.json()["issue"]
    assert (issue["severity"], issue["code"]) == ("error", "throttled")
    assert "QANTARA_HTTP_MAX_CONNECTIONS" in issue["diagnostics"]


async def test_a_request_refused_beyond_the_bound_is_counted() -> None:
    metrics = Metrics()
    async with (
        listening(max_connections=2, keep_alive=30, protocol=counted_in(metrics)) as port,
        silent_connections(port, 2),
    ):
        assert await status_of(port) == 503
    assert metrics.sample("qantara_http_requests_total", {"route": "-", "code": "503"}) == 1


async def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_time() -> None:
    async with listening(max_connections=2, keep_alive=1) as port:
        started = time.monotonic()  # before the connection: the server's clock starts after
        async with silent_connections(port, 1) as [(reader, _)]:
            async with asyncio.timeout(10):
                assert await reader.read() == b""
        assert time.monotonic() - started >= 0.9


async def test_silent_connections_give_their_slots_back_to_requests() -> None:
    async with (
        listening(max_connections=2, keep_alive=1) as port,
        silent_connections(port, 2) as silent,
    ):
        assert await status_of(port) == 503
        for reader, _ in silent:
            async with asyncio.timeout(10):
                assert await reader.read() == b""
        assert await status_of(port) == 200


async def test_a_request_head_sent_a_byte_at_a_time_is_cut_off_at_its_deadline() -> None:
    async with listening(max_connections=10, keep_alive=30) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        try:
            for byte in head:  # 10 bytes a second: the head would take 13 s
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
                if reader.at_eof() or time.monotonic() - started > 5:
                    break
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        except ConnectionError:
            pass  # closed while we were still writing: the same verdict
        finally:
            writer.close()
        assert time.monotonic() - started < 5


async def test_a_kept_alive_connection_sending_its_requests_in_time_is_not_cut() -> None:
    async with (
        listening(max_connections=10, keep_alive=30) as port,
        httpx.AsyncClient(timeout=5.0) as client,
    ):
        for _ in range(3):  # 1.5 s in all: past one deadline from the connection's start
            assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
            await asyncio.sleep(0.5)


async def test_a_pipelined_request_served_past_the_head_deadline_still_gets_its_answer() -> None:
    async with listening(max_connections=10, keep_alive=30) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Both heads arrive at once; the second is answered 1.5 s after the first.
            writer.write(
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
                b"GET /slow HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            async with asyncio.timeout(10):
                answers = await reader.read()
        finally:
            writer.close()
        assert answers.count(b"HTTP/1.1 200 OK") == 2
