"""Fixtures and helpers of the HTTP/FHIR tests; conftest.py re-exports the fixtures.

The API tests get a database of their own (created on the server of `postgres_server_dsn`,
migrated, dropped at the end). Data goes in through `storage.writer.BatchWriter`, as it does in
production; each test uses identifiers and unit names of its own, so tests need no cleanup.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient

from gateway.auth import issue_token
from gateway.http import ApiSettings, create_app
from gateway.local_services import drop_database, ensure_database
from ingest.records import Envelope, MqttKey, PatientRef, Protocol, Sample, VitalsMessage
from monitoring.metrics import Metrics
from storage.migrations import apply_migrations
from storage.writer import BatchWriter

BASE_URL = "http://qantara.test"
CIN_URI = "https://qantara.ma/fhir/sid/cin"
_MODELS: dict[str, Any] = {
    "AuditEvent": AuditEvent,
    "Bundle": Bundle,
    "Device": Device,
    "DiagnosticReport": DiagnosticReport,
    "ImagingStudy": ImagingStudy,
    "Observation": Observation,
    "OperationOutcome": OperationOutcome,
    "Patient": Patient,
}
_seq = itertools.count(1)


def validate_fhir(body: dict[str, Any]) -> None:
    """Validate a resource (and a Bundle's entries) against the fhir.resources R4B models."""
    model = _MODELS[body["resourceType"]]
    model.model_validate(body)
    for entry in body.get("entry", []):
        validate_fhir(entry["resource"])


def new_cin() -> str:
    return "T" + secrets.token_hex(5).upper()


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@dataclass(slots=True)
class VitalsFeed:
    """Writes vitals messages through the production writer, one unit per feed."""

    writer: BatchWriter
    unit: str
    device: str = "MON-17"
    kind: str = "multiparameter-monitor"

    async def send(
        self, patient: PatientRef, samples: Sequence[tuple[str, str, float, str]]
    ) -> None:
        """One message with samples `(time, code, value, unit)`."""
        message = VitalsMessage(
            unit_id=self.unit,
            seq=next(_seq),
            sent_at=None,
            device_id=self.device,
            device_kind=self.kind,
            patient=patient,
            samples=tuple(Sample(at(t), code, value, unit) for t, code, value, unit in samples),
        )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        envelope = Envelope(
            protocol=Protocol.MQTT,
            key=MqttKey(self.unit, message.seq),
            records=(message,),
            received_at=datetime.now(UTC),
            ack=future,
            source=self.unit,
        )
        outcomes = await self.writer.write([envelope])
        assert [o.kind for o in outcomes] == ["stored"]


@pytest.fixture(scope="session")
async def api_dsn(postgres_server_dsn: str) -> AsyncIterator[str]:
    """A migrated database of the API tests' own."""
    dbname = f"qantara_test_{secrets.token_hex(6)}"
    dsn = await ensure_database(postgres_server_dsn, dbname)
    conn = await asyncpg.connect(dsn)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    try:
        yield dsn
    finally:
        await drop_database(postgres_server_dsn, dbname)


@pytest.fixture(scope="session")
async def api_pool(api_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(api_dsn, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
def feed(api_pool: asyncpg.Pool) -> VitalsFeed:
    return VitalsFeed(BatchWriter(api_pool), unit=f"unit-{secrets.token_hex(4)}")


@pytest.fixture
def readiness_checks() -> dict[str, bool]:
    """The checks `/readyz` reports; tests flip them."""
    return {"database": True, "mqtt": True}


AppFactory = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def make_client(
    api_pool: asyncpg.Pool, readiness_checks: dict[str, bool]
) -> AsyncIterator[AppFactory]:
    """Factory of clients of an app over the test database (`api=` for other limits)."""
    clients: list[httpx.AsyncClient] = []

    def make(
        api: ApiSettings | None = None,
        metrics: Metrics | None = None,
        dicom_storage: Path | None = None,
    ) -> httpx.AsyncClient:
        app = create_app(
            pool=api_pool,
            metrics=metrics or Metrics(),
            readiness=lambda: dict(readiness_checks),
            api=api or ApiSettings(),
            dicom_storage=dicom_storage,
        )
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.aclose()


@pytest.fixture
def client(make_client: AppFactory) -> httpx.AsyncClient:
    return make_client()


TokenFactory = Callable[..., Awaitable[str]]


@pytest.fixture
def make_token(api_pool: asyncpg.Pool) -> TokenFactory:
    """`await make_token("system/*.read")` → a new bearer token with those scopes."""

    async def make(*scopes: str) -> str:
        return await issue_token(api_pool, f"test-{secrets.token_hex(6)}", list(scopes))

    return make


@pytest.fixture
async def reader(make_token: TokenFactory) -> dict[str, str]:
    """Headers of a token that may read everything."""
    return {"Authorization": f"Bearer {await make_token('system/*.read')}"}
