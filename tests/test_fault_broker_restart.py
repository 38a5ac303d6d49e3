"""Fault: the MQTT broker restarts (SIGTERM, then start on the same port and persistence) while
units publish.

The gateway notices (`qantara_mqtt_connected` drops to 0), reconnects with its persistent
session (back to 1), the broker redelivers what the gateway had not acknowledged, the units
replay what the broker had not acknowledged, and every message is stored exactly once.
"""

from __future__ import annotations

import time

import asyncpg
import pytest

from gateway.local_services import drop_database, ensure_database
from tests.conftest import PrivateMosquittoFactory
from tests.gateway_process import (
    GatewayProcess,
    UnitPublisher,
    ledger_total,
    new_client_id,
    new_unit_id,
    running_fleet,
    stored_counts,
)
from tests.services_support import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.slow]

UNITS = 10
RATE = 50.0  # messages per second per unit
SEQS = 500  # 10 s of generation per unit
SAMPLES = 3
RESTART_AT = 0.3


@pytest.mark.timeout(300)
async def test_broker_restart_is_survived_with_every_message_stored_once(
    postgres_server_dsn: str, private_mosquitto: PrivateMosquittoFactory
) -> None:
    broker = await private_mosquitto()
    name = f"qantara_t_{new_client_id('b').replace('-', '_')}"
    dsn = await ensure_database(postgres_server_dsn, name)
    publishers = [
        UnitPublisher(
            new_unit_id("B"), broker.url, SEQS, samples=SAMPLES, rate=RATE, resend_after=30.0
        )
        for _ in range(UNITS)
    ]
    totals = {p.unit: p.total for p in publishers}
    messages = UNITS * SEQS
    started = time.monotonic()
    conn = await asyncpg.connect(dsn)
    try:
        async with GatewayProcess(
            database_url=dsn, mqtt_url=broker.url, client_id=new_client_id()
        ) as gateway:
            await gateway.wait_ready()
            async with running_fleet(publishers) as fleet:

                async def committed_enough() -> bool:
                    return await ledger_total(conn, totals) >= RESTART_AT * messages

                await wait_until(committed_enough, 60, interval=0.1)
                at_restart = await ledger_total(conn, totals)
                await broker.stop()
                stopped_at = time.monotonic()
                await gateway.wait_metric("qantara_mqtt_connected", {}, 0.0, timeout=15)
                await broker.start()
                await gateway.wait_metric("qantara_mqtt_connected", {}, 1.0, timeout=60)
                reconnected_after = time.monotonic() - stopped_at
                report = await fleet.wait(180)
        # The MQTT task reports the lost connection (WARNING) and reconnects: nothing to page.
        errors = [line for line in gateway.log_lines if " ERROR " in line]
        counts = await stored_counts(conn, totals)
    finally:
        await conn.close()
        await drop_database(postgres_server_dsn, name)

    lost = counts.lost(totals)
    print(  # noqa: T201 - the figures are the point of this test
        f"\n[broker restart] messages={messages} committed_at_restart={at_restart}"
        f" gateway_reconnected_after={reconnected_after:.1f}s lost={lost}"
        f" duplicate_vitals={counts.duplicate_vitals} {report.summary()}"
        f" total={time.monotonic() - started:.1f}s"
    )
    assert at_restart < messages, "the broker restarted after everything was committed"
    assert lost == 0
    assert counts.ledger == totals
    assert counts.vitals == messages * SAMPLES
    assert counts.duplicate_vitals == 0
    assert counts.watermarks == totals
    assert errors == []
