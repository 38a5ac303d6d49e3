"""Specification of gateway.local_services: the services `qantara up` and the tests run locally."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import asyncpg
import pytest

from gateway.local_services import (
    EmbeddedBroker,
    EmbeddedPostgres,
    broker_answers,
    database_dsn,
    drop_database,
    ensure_database,
    free_port,
    postgres_answers,
)
from tests.conftest import PrivateMosquittoFactory, PrivatePostgresFactory
from tests.services_support import wait_until


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    return host, int(port)


@contextlib.asynccontextmanager
async def _tcp_server_that_never_speaks_mqtt() -> AsyncIterator[int]:
    """A TCP listener that answers anything with an HTTP error and hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def _retained_payload(url: str, topic: str) -> bytes:
    host, port = _host_port(url)
    async with aiomqtt.Client(host, port, identifier=f"reader-{secrets.token_hex(4)}") as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("no message")


# --- waiting --------------------------------------------------------------------------------------


async def test_wait_until_returns_once_an_async_predicate_holds() -> None:
    calls = 0

    async def third_time_lucky() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    await wait_until(third_time_lucky, timeout=2, interval=0.01)
    assert calls == 3


async def test_wait_until_raises_assertion_error_with_the_message_on_timeout() -> None:
    with pytest.raises(AssertionError, match="never true"):
        await wait_until(lambda: False, timeout=0.1, message="never true")


# --- probes ---------------------------------------------------------------------------------------


def test_free_port_can_be_bound_on_localhost() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_broker_answers_true_for_the_session_broker(mqtt_url: str) -> None:
    assert await broker_answers(mqtt_url)


async def test_broker_answers_false_for_a_closed_port() -> None:
    assert not await broker_answers(f"mqtt://127.0.0.1:{free_port()}", timeout=1.0)


async def test_broker_answers_false_for_a_tcp_server_that_is_not_mqtt() -> None:
    async with _tcp_server_that_never_speaks_mqtt() as port:
        assert not await broker_answers(f"mqtt://127.0.0.1:{port}", timeout=1.0)


async def test_postgres_answers_true_for_the_test_database(postgres_dsn: str) -> None:
    assert await postgres_answers(postgres_dsn)


async def test_postgres_answers_false_for_a_closed_port() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    assert not await postgres_answers(dsn, timeout=1.0)


# --- databases ------------------------------------------------------------------------------------


def test_database_dsn_keeps_the_unix_socket_query() -> None:
    server = "postgresql://postgres:@/postgres?host=/tmp/pg/data"
    assert database_dsn(server, "qantara") == "postgresql://postgres:@/qantara?host=/tmp/pg/data"


async def test_ensure_database_creates_it_once_and_returns_its_dsn(
    postgres_server_dsn: str,
) -> None:
    dbname = f"qantara_test_ensure_{secrets.token_hex(4)}"
    try:
        dsn = await ensure_database(postgres_server_dsn, dbname)
        assert await ensure_database(postgres_server_dsn, dbname) == dsn
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT current_database()") == dbname
        finally:
            await conn.close()
    finally:
        await drop_database(postgres_server_dsn, dbname)


async def test_drop_database_succeeds_while_a_session_is_connected(
    postgres_server_dsn: str,
) -> None:
    dbname = f"qantara_test_drop_{secrets.token_hex(4)}"
    dsn = await ensure_database(postgres_server_dsn, dbname)
    conn = await asyncpg.connect(dsn)
    try:
        await drop_database(postgres_server_dsn, dbname)
        assert not await postgres_answers(dsn)
    finally:
        with contextlib.suppress(asyncpg.InterfaceError, OSError):
            await conn.close(timeout=2)


# --- PostgreSQL -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_private_postgres_accepts_connections_once_started(
    private_postgres: PrivatePostgresFactory,
) -> None:
    server = await private_postgres()
    conn = await asyncpg.connect(server.dsn())
    try:
        assert await conn.fetchval("SHOW fsync") == "on"
    finally:
        await conn.close()


@pytest.mark.slow
async def test_private_postgres_refuses_connections_after_stop(
    private_postgres: PrivatePostgresFactory,
) -> None:
    server = await private_postgres()
    await server.stop()
    assert not await postgres_answers(server.dsn(), timeout=1.0)


@pytest.mark.slow
async def test_private_postgres_accepts_connections_again_after_restart(
    private_postgres: PrivatePostgresFactory,
) -> None:
    server = await private_postgres()
    await server.stop()
    async with asyncio.timeout(30):
        await server.start()
    assert await postgres_answers(server.dsn())


@pytest.mark.slow
async def test_private_postgres_keeps_committed_rows_across_kill_and_restart(
    private_postgres: PrivatePostgresFactory,
) -> None:
    server = await private_postgres()
    conn = await asyncpg.connect(server.dsn())
    try:
        await conn.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
    finally:
        await conn.close()
    await server.kill()
    assert not await postgres_answers(server.dsn(), timeout=1.0)
    async with asyncio.timeout(30):
        await server.start()
    conn = await asyncpg.connect(server.dsn())
    try:
        assert await conn.fetchval("SELECT v FROM t") == 42
    finally:
        await conn.close()


@pytest.mark.slow
async def test_embedded_postgres_answers_select_1() -> None:
    server = EmbeddedPostgres()
    await asyncio.to_thread(server.start)
    try:
        assert server.dsn.startswith("postgresql://")
        assert await postgres_answers(server.dsn, timeout=5.0)
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.slow
async def test_embedded_postgres_stop_removes_its_temporary_data(tmp_path: Path) -> None:
    server = EmbeddedPostgres()
    await asyncio.to_thread(server.start)
    dsn = server.dsn
    socket_dir = Path(dsn.rsplit("host=", 1)[1])
    await asyncio.to_thread(server.stop)
    assert not await asyncio.to_thread(socket_dir.exists)
    assert not await postgres_answers(dsn, timeout=1.0)


# --- MQTT brokers ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_private_mosquitto_answers_once_started(
    private_mosquitto: PrivateMosquittoFactory,
) -> None:
    broker = await private_mosquitto()
    assert await broker_answers(broker.url)


@pytest.mark.slow
async def test_private_mosquitto_stops_answering_when_killed(
    private_mosquitto: PrivateMosquittoFactory,
) -> None:
    broker = await private_mosquitto()
    await broker.kill()
    assert not await broker_answers(broker.url, timeout=1.0)


@pytest.mark.slow
async def test_private_mosquitto_keeps_retained_messages_across_restart(
    private_mosquitto: PrivateMosquittoFactory,
) -> None:
    broker = await private_mosquitto()
    host, port = _host_port(broker.url)
    async with aiomqtt.Client(host, port, identifier="writer") as client:
        await client.publish("units/u1/status", b'{"online":true}', qos=1, retain=True)
    await broker.restart()
    await wait_until(lambda: broker_answers(broker.url), 10, message="broker back")
    assert await _retained_payload(broker.url, "units/u1/status") == b'{"online":true}'


async def test_embedded_broker_answers_mqtt_connect() -> None:
    async with EmbeddedBroker() as url:
        assert await broker_answers(url)


async def test_embedded_broker_delivers_a_published_message() -> None:
    async with EmbeddedBroker() as url:
        host, port = _host_port(url)
        async with aiomqtt.Client(host, port, identifier="sub") as sub:
            await sub.subscribe("units/u1/vitals", qos=1)
            async with aiomqtt.Client(host, port, identifier="pub") as pub:
                await pub.publish("units/u1/vitals", b"{}", qos=1)
            async with asyncio.timeout(5):
                message = await anext(aiter(sub.messages))
        assert message.payload == b"{}"


async def test_embedded_broker_stops_answering_after_exit() -> None:
    async with EmbeddedBroker() as url:
        pass
    assert not await broker_answers(url, timeout=1.0)
