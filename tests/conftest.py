"""Session fixtures: one per real resource (PostgreSQL, MQTT broker), no mocks.

Where each comes from (DESIGN.md, Testing): the service named by `QANTARA_TEST_DATABASE_URL` /
`QANTARA_TEST_MQTT_URL`, else the local one (PostgreSQL on 127.0.0.1:5432, Mosquitto on
127.0.0.1:1883), else one this session starts (pgserver's PostgreSQL, or a private cluster from
the system binaries; a private mosquitto, or amqtt in-process).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import socket
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
from pynetdicom.transport import AssociationSocket

from gateway.local_services import (
    EmbeddedBroker,
    EmbeddedPostgres,
    LocalServiceError,
    PrivateMosquitto,
    PrivatePostgres,
    broker_answers,
    drop_database,
    ensure_database,
    find_mosquitto,
    find_postgres_bin_dir,
    postgres_answers,
)
from tests.services_support import wait_until as _wait_until

logger = logging.getLogger(__name__)

LOCAL_POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_MQTT_URL = "mqtt://127.0.0.1:1883"

PrivatePostgresFactory = Callable[[], Awaitable[PrivatePostgres]]
PrivateMosquittoFactory = Callable[[], Awaitable[PrivateMosquitto]]


@pytest.fixture(scope="session")
async def postgres_server_dsn() -> AsyncIterator[str]:
    """DSN of a PostgreSQL server (its `postgres` database) on which tests may create databases."""
    configured = os.environ.get("QANTARA_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    if await postgres_answers(LOCAL_POSTGRES_DSN):
        yield LOCAL_POSTGRES_DSN
        return
    embedded = EmbeddedPostgres()
    try:
        await asyncio.to_thread(embedded.start)
    except LocalServiceError:
        logger.warning("pgserver failed; using a private cluster", exc_info=True)
    else:
        try:
            yield embedded.dsn
        finally:
            await asyncio.to_thread(embedded.stop)
        return
    async with PrivatePostgres() as private:
        yield private.dsn()


@asynccontextmanager
async def _fresh_database(server_dsn: str, prefix: str) -> AsyncIterator[str]:
    """A new database on `server_dsn`, dropped afterwards (its sessions terminated)."""
    dbname = f"{prefix}_{secrets.token_hex(6)}"
    dsn = await ensure_database(server_dsn, dbname)
    try:
        yield dsn
    finally:
        await drop_database(server_dsn, dbname)


@pytest.fixture(scope="session")
async def postgres_dsn(postgres_server_dsn: str) -> AsyncIterator[str]:
    """A fresh database for this test run, dropped at the end."""
    async with _fresh_database(postgres_server_dsn, "qantara_test") as dsn:
        yield dsn


@pytest.fixture(scope="module")
async def module_dsn(postgres_server_dsn: str) -> AsyncIterator[str]:
    """A fresh database of the test module's own (state it must not share), dropped after it."""
    async with _fresh_database(postgres_server_dsn, "qantara_mod") as dsn:
        yield dsn


@pytest.fixture
async def fresh_dsn(postgres_server_dsn: str) -> AsyncIterator[str]:
    """A fresh database of the test's own (fault tests restart gateways on it), dropped after."""
    async with _fresh_database(postgres_server_dsn, "qantara_fn") as dsn:
        yield dsn


@pytest.fixture(scope="session")
async def mqtt_url() -> AsyncIterator[str]:
    """URL (`mqtt://host:port`) of an MQTT broker that accepts anonymous clients."""
    configured = os.environ.get("QANTARA_TEST_MQTT_URL")
    if configured:
        yield configured
        return
    if await broker_answers(LOCAL_MQTT_URL):
        yield LOCAL_MQTT_URL
        return
    if find_mosquitto() is not None:
        async with PrivateMosquitto() as mosquitto:
            yield mosquitto.url
        return
    async with EmbeddedBroker() as url:
        yield url


@pytest.fixture
async def private_postgres() -> AsyncIterator[PrivatePostgresFactory]:
    """Factory of started throw-away clusters the test may stop, kill and restart."""
    try:
        await asyncio.to_thread(find_postgres_bin_dir)
    except LocalServiceError as exc:
        pytest.skip(f"needs the PostgreSQL server binaries: {exc}")
    started: list[PrivatePostgres] = []

    async def start() -> PrivatePostgres:
        server = PrivatePostgres()
        started.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.cleanup()


@pytest.fixture
async def private_mosquitto() -> AsyncIterator[PrivateMosquittoFactory]:
    """Factory of started private mosquitto brokers the test may stop, kill and restart."""
    if find_mosquitto() is None:
        pytest.skip("needs the mosquitto binary")
    started: list[PrivateMosquitto] = []

    async def start() -> PrivateMosquitto:
        broker = PrivateMosquitto()
        started.append(broker)
        await broker.start()
        return broker

    try:
        yield start
    finally:
        for broker in started:
            await broker.cleanup()


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[None]]:
    """`tests.services_support.wait_until`, for tests that prefer a fixture to an import."""
    return _wait_until


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fault tests SIGKILL the peers of their own clients (gateway, broker, database).

    Such a client leaves its socket to the garbage collector, which may run in the middle of
    the test and turn the socket's ResourceWarning into a failure that says nothing about the
    gateway (seen once in test_fault_gateway_kill, laddr only: the peer was gone). In fault
    tests that warning is ignored; everywhere else an unclosed socket stays an error.
    """
    for item in items:
        if item.get_closest_marker("fault") is not None:
            item.add_marker(pytest.mark.filterwarnings("ignore::ResourceWarning"))


@pytest.fixture(autouse=True)
def _collect_what_a_fault_test_killed(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a fault test, finalise here the sockets of the peers it killed.

    A client whose peer was SIGKILLed leaves its socket to the garbage collector; collected
    later, its ResourceWarning would fail whichever test happened to be running. Only fault
    tests get this: everywhere else an unclosed socket stays an error.
    """
    yield
    if request.node.get_closest_marker("fault") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def _shutdown_then_close(self: AssociationSocket) -> None:
    sock = self.socket
    if sock is None:
        return
    with contextlib.suppress(OSError):  # the peer is gone: the socket still needs closing
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture(autouse=True, scope="session")
def _pynetdicom_closes_its_sockets() -> Iterator[None]:
    """pynetdicom (our test modality) shuts its socket down and closes it in one `try`: when the
    peer has died or reset the connection, `shutdown` raises and the socket is never closed. It
    is then left to the garbage collector, whose ResourceWarning can land in any later test or
    at interpreter exit (pytest then exits 1 after every test passed: seen 1 run in 4 and 1 in
    6 of test_fault_dicom_kill.py with test_dicom_cleanup.py). Close it in any case."""
    patch = pytest.MonkeyPatch()
    patch.setattr(AssociationSocket, "_shutdown_socket", _shutdown_then_close)
    yield
    patch.undo()


# Fixtures of the HTTP/FHIR tests (their own migrated database, app clients, tokens).
from tests.http_support import (  # noqa: E402
    api_dsn,
    api_pool,
    client,
    feed,
    make_client,
    make_token,
    reader,
    readiness_checks,
)

__all__ = [
    "api_dsn",
    "api_pool",
    "client",
    "feed",
    "make_client",
    "make_token",
    "reader",
    "readiness_checks",
]
