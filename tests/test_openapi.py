"""`/openapi.json` describes the HTTP API, and schemathesis, fed with it, finds no 500.

The app runs under uvicorn on a free port in the test's event loop (its asyncpg pool lives
there); schemathesis sends its requests from a worker thread, bounded per operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Generator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings

from gateway.fhir_capability import openapi_document
from gateway.http import ApiSettings, create_app
from ingest.records import PatientRef
from monitoring.metrics import Metrics
from tests.http_support import VitalsFeed, new_cin
from tests.services_support import wait_until

MAX_EXAMPLES = 40


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers (the test process keeps its own)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _fuzz(base_url: str, headers: dict[str, str]) -> tuple[int, list[str]]:
    """Every operation of the document, MAX_EXAMPLES cases each: (requests sent, 5xx answers)."""
    schema = schemathesis.openapi.from_dict(openapi_document())
    failures: list[str] = []
    sent = 0
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]  # an Err raises, as it should

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy())
            def check(case: Any) -> None:
                nonlocal sent
                sent += 1
                response = case.call(base_url=base_url, session=session, headers=headers)
                if response.status_code >= 500:
                    failures.append(f"{response.status_code} {case.method} {case.formatted_path}")

            check()
    return sent, failures


async def test_openapi_document_is_served_and_names_every_route(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    for path in ("/fhir/Observation", "/fhir/Observation/$lastn", "/dicomweb/studies"):
        assert path in document["paths"]


@pytest.mark.slow
async def test_schemathesis_finds_no_server_error(
    api_pool: asyncpg.Pool,
    reader: dict[str, str],
    feed: VitalsFeed,
    tmp_path: Path,
) -> None:
    await feed.send(
        PatientRef("CIN", new_cin()),
        [("2026-11-27T10:00:00Z", "8867-4", 72, "/min"), ("2026-11-27T10:00:00Z", "hr", 1, "")],
    )
    app = create_app(
        pool=api_pool,
        metrics=Metrics(),
        readiness=lambda: {"database": True},
        api=ApiSettings(cursor_secret=secrets.token_bytes(32)),
        dicom_storage=tmp_path,
    )
    server = _QuietServer(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off"
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started, 10, message="uvicorn did not start")
        port = server.servers[0].sockets[0].getsockname()[1]
        async with asyncio.timeout(110):
            sent, failures = await asyncio.to_thread(_fuzz, f"http://127.0.0.1:{port}", reader)
    finally:
        server.should_exit = True
        await task
    assert failures == []
    assert sent >= len(openapi_document()["paths"]) * 5
