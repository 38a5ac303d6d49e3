"""Fault: `qantara serve` is SIGKILLed while the lab simulator sends 5,000 ORU^R01.

Principle 1 for HL7: an AA means committed. The simulator (4 connections, each waiting for its
ACK, as an LIS does) logs the MSH-10 of every message answered AA. At about 30 % the gateway
dies with SIGKILL; the simulator's connections break, it reconnects and resends the unanswered
message until the gateway is back (same MLLP port), then finishes. A second run resends all
5,000 messages. At the end every message that got AA is in the ledger exactly once, every one of
the 5,000 is stored once (one report each, ten or one observations each), and the resend run
was answered AA throughout without storing anything new.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import asyncpg
import pytest

from gateway.local_services import free_port
from simulators.lab import LabConfig, run_lab
from tests.gateway_process import GatewayProcess
from tests.services_support import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.slow]

TOTAL = 5_000
KILL_AT = 1_500


def acked(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


@pytest.mark.timeout(420)
async def test_every_aa_survives_kill_9_and_is_stored_exactly_once(
    fresh_dsn: str, mqtt_url: str, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "acked.txt"
    env = {"QANTARA_MLLP_PORT": str(port), "QANTARA_DICOM_PORT": "0"}
    config = LabConfig(
        port=port,
        count=TOTAL,
        rate=0,
        connections=4,
        seed=secrets.randbelow(1_000_000),
        retry_timeout=60,
        ack_log=log,
        quiet=True,
    )
    async with GatewayProcess(database_url=fresh_dsn, mqtt_url=mqtt_url, env=env) as gateway:
        sending = asyncio.create_task(run_lab(config))
        await wait_until(lambda: len(acked(log)) >= KILL_AT, timeout=120, message="AA before kill")
        await gateway.kill()
        acked_before_restart = set(acked(log))
        await gateway.start()
        async with asyncio.timeout(240):
            first = await sending
        assert first.unanswered == 0
        assert first.codes["AA"] == TOTAL
        assert first.reconnects > 0  # the kill did break connections mid-stream

        resend = await asyncio.wait_for(run_lab(config), 240)
        assert resend.codes["AA"] == TOTAL

    conn = await asyncpg.connect(fresh_dsn)
    try:
        stored = {
            r["control_id"]: r["n"]
            for r in await conn.fetch(
                """SELECT m.control_id, count(r.id) AS n FROM hl7_message m
                   LEFT JOIN lab_report r ON r.message_id = m.id
                   WHERE m.sending_application = 'QLAB-SIM' GROUP BY m.control_id"""
            )
        }
        observations = await conn.fetchval("SELECT count(*) FROM lab_observation")
    finally:
        await conn.close()
    assert acked_before_restart <= set(stored)
    assert set(acked(log)) == set(stored)
    assert len(stored) == TOTAL
    assert set(stored.values()) == {1}
    panels = [10, 10, 1]  # cbc, chem, hba1c by message index
    assert observations == sum(panels[i % 3] for i in range(TOTAL))
