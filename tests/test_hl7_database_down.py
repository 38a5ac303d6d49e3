"""Fault: PostgreSQL stops while a lab waits for its ACK.

Principle 1 for HL7: no AA without a commit. With the database down the server answers AE with
ERR 207 ("storage temporarily unavailable; resend") once `ack_timeout` has passed; the message
stays queued in the pipeline. After PostgreSQL is back, the sender's resend is answered AA and
the message is stored once, whether the queued copy or the resend committed it.

The database is a private cluster (the only kind a test may stop); the server, pipeline and
writer run in the test's event loop with short timeouts so that the test stays brief.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from gateway.local_services import ensure_database
from hl7.server import MllpServer, MllpSettings
from ingest.pipeline import GroupCommitPipeline, PipelineSettings
from monitoring.metrics import Metrics
from storage.migrations import apply_migrations
from storage.writer import BatchWriter
from tests.conftest import PrivatePostgresFactory
from tests.hl7_support import MllpClient, control_id, encode, new_id, oru

pytestmark = [pytest.mark.fault, pytest.mark.slow]

ACK_TIMEOUT = 1.0
RECOVERY = 60.0  # the bound on PostgreSQL's restart and the pipeline's reconnection


@asynccontextmanager
async def mllp_server(dsn: str) -> AsyncIterator[tuple[MllpServer, asyncpg.Pool]]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await apply_migrations(conn)
    metrics = Metrics()
    settings = PipelineSettings(retry_initial=0.05, retry_max=0.5)
    pipeline = GroupCommitPipeline(BatchWriter(pool), settings, metrics)
    server = MllpServer(MllpSettings(port=0, ack_timeout=ACK_TIMEOUT), pipeline, metrics)
    pipeline_task = asyncio.create_task(pipeline.run())
    server_task = asyncio.create_task(server.run())
    try:
        await asyncio.wait_for(server.listening.wait(), 5)
        yield server, pool
    finally:
        server.stop()
        await asyncio.wait_for(server_task, 10)
        await pipeline.close()
        await asyncio.wait_for(pipeline_task, 10)
        await pool.close()


@pytest.mark.timeout(180)
async def test_database_down_gets_ae_after_ack_timeout_and_resend_after_restart_gets_aa_once(
    private_postgres: PrivatePostgresFactory,
) -> None:
    postgres = await private_postgres()
    dsn = await ensure_database(postgres.dsn(), "qantara")
    async with mllp_server(dsn) as (server, pool):
        assert server.port is not None
        control = control_id()
        message = encode(oru(control, f"{new_id()}^^^CIN^NI"))
        async with MllpClient("127.0.0.1", server.port) as client:
            warm = await client.request(encode(oru(control_id(), f"{new_id()}^^^CIN^NI")))
            assert warm.code == "AA"

            await postgres.stop()
            sent = time.monotonic()
            ack = await client.request(message, timeout=ACK_TIMEOUT + 30)
            waited = time.monotonic() - sent
            assert (ack.code, ack.acknowledged, ack.error_code) == ("AE", control, "207")
            assert "storage temporarily unavailable" in ack.error_text
            assert waited >= ACK_TIMEOUT

            await postgres.start()
            codes: list[str] = []
            async with asyncio.timeout(RECOVERY):
                while not codes or codes[-1] != "AA":  # each AE comes after ACK_TIMEOUT
                    codes.append((await client.request(message, timeout=RECOVERY)).code)
            assert set(codes[:-1]) <= {"AE"}

        stored = await pool.fetchval(
            "SELECT count(*) FROM hl7_message WHERE control_id = $1", control
        )
        observations = await pool.fetchval(
            """SELECT count(*) FROM lab_observation o JOIN lab_report r ON r.id = o.report_id
               JOIN hl7_message m ON m.id = r.message_id WHERE m.control_id = $1""",
            control,
        )
    assert (stored, observations) == (1, 5)
