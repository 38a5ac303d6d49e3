"""Fault: `qantara serve` is SIGKILLed in the middle of a 20,000-message stream, then restarted.

Principle 1 says a PUBACK means committed. The proof: 20 units publish seqs 1..1000 each (QoS 1,
as fast as the broker takes them); at about 30 % committed the gateway dies with SIGKILL (no
drain, no DISCONNECT); it comes back with the same client id, so the broker's persistent session
redelivers whatever it had not acknowledged. At the end every (unit, seq) is in the ledger once
and the vital table holds exactly samples x messages rows.

The broker is a private mosquitto: its limits are known, and 20,000 messages do not flood the
shared broker other test runs use. Its session queue (max_queued_messages 100,000) never drops
while the gateway is down, so the recovery must be the broker's redelivery alone: the units keep
an outbox and would resend above the watermark after RESEND_AFTER seconds, as real hubs do, but
not one resend may be needed. A gateway that sent PUBACK before COMMIT (paho's automatic ack)
still ends with a complete ledger thanks to those resends (about 14,000 of them when tried), so
`resends == 0` is the assertion that proves principle 1.
"""

from __future__ import annotations

import time

import asyncpg
import pytest

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

UNITS = 20
SEQS = 1000
SAMPLES = 3
KILL_AT = 0.3
RESEND_AFTER = 60.0  # far above the whole run (about 10 s here)


@pytest.mark.timeout(300)
async def test_gateway_killed_mid_stream_loses_and_duplicates_nothing(
    module_dsn: str, private_mosquitto: PrivateMosquittoFactory
) -> None:
    broker = await private_mosquitto()
    publishers = [
        UnitPublisher(
            new_unit_id("K"), broker.url, SEQS, samples=SAMPLES, resend_after=RESEND_AFTER
        )
        for _ in range(UNITS)
    ]
    totals = {p.unit: p.total for p in publishers}
    messages = UNITS * SEQS
    started = time.monotonic()
    conn = await asyncpg.connect(module_dsn)
    try:
        async with GatewayProcess(
            database_url=module_dsn, mqtt_url=broker.url, client_id=new_client_id()
        ) as gateway:
            await gateway.wait_ready()
            async with running_fleet(publishers) as fleet:

                async def committed_enough() -> bool:
                    return await ledger_total(conn, totals) >= KILL_AT * messages

                await wait_until(committed_enough, 120, interval=0.05)
                await gateway.kill()
                at_kill = await ledger_total(conn, totals)
                killed_at = time.monotonic()

                # While the gateway is dead the units keep publishing into its broker session.
                sent_at_kill = fleet.report().first_sends
                await wait_until(
                    lambda: fleet.report().first_sends >= min(messages, sent_at_kill + 2000),
                    60,
                    message="units stopped publishing while the gateway was down",
                )
                await gateway.start()  # same client id: the persistent session resumes
                await gateway.wait_ready()
                restarted_at = time.monotonic()
                report = await fleet.wait(240)
            stopped = await gateway.terminate()
        counts = await stored_counts(conn, totals)
    finally:
        await conn.close()

    lost = counts.lost(totals)
    duplicated = counts.messages - (messages - lost) + counts.duplicate_vitals
    print(  # noqa: T201 - the figures are the point of this test
        f"\n[gateway kill] messages={messages} committed_at_kill={at_kill}"
        f" down={restarted_at - killed_at:.1f}s lost={lost} duplicated={duplicated}"
        f" vitals={counts.vitals}/{messages * SAMPLES} {report.summary()}"
        f" total={time.monotonic() - started:.1f}s"
    )
    assert stopped == 0
    assert at_kill < messages, "the gateway was killed after everything was committed"
    assert report.resends == 0, "the broker lost messages the gateway had acknowledged"
    assert lost == 0
    assert counts.ledger == totals
    assert counts.vitals == messages * SAMPLES
    assert counts.duplicate_vitals == 0
    assert counts.watermarks == totals
    assert all(p.watermark == SEQS for p in publishers)
