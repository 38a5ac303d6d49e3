"""Fault: PostgreSQL stops for 20 s while units publish.

Principle 1: no PUBACK without a commit. While the database is down the gateway holds every
acknowledgement, so the retained `units/{unit}/ack` watermarks stay where they were and
`/readyz` answers 503; the broker's session (and the units' outboxes) are the buffer. Once
PostgreSQL is back, readiness returns and every message is stored exactly once.

The database is a private cluster (the only kind a test may stop); the broker is a private
mosquitto, so the messages held during the outage sit in a queue of known size (100,000) and no
other test run's traffic mixes with them. The units would resend above the watermark after
60 s; none may be needed, since nothing held back was acknowledged.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from gateway.local_services import ensure_database
from tests.conftest import PrivateMosquittoFactory, PrivatePostgresFactory
from tests.gateway_process import (
    AckWatcher,
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
RATE = 20.0  # messages per second per unit
SEQS = 600  # 30 s of generation per unit
SAMPLES = 3
OUTAGE = 20.0  # seconds PostgreSQL stays down
SETTLE = 1.0  # after the stop, for watermarks of commits that finished just before it


@pytest.mark.timeout(300)
async def test_database_down_withholds_acks_until_it_is_back_and_loses_nothing(
    private_postgres: PrivatePostgresFactory, private_mosquitto: PrivateMosquittoFactory
) -> None:
    postgres = await private_postgres()
    broker = await private_mosquitto()
    dsn = await ensure_database(postgres.dsn(), "qantara")
    publishers = [
        UnitPublisher(
            new_unit_id("D"), broker.url, SEQS, samples=SAMPLES, rate=RATE, resend_after=60.0
        )
        for _ in range(UNITS)
    ]
    totals = {p.unit: p.total for p in publishers}
    messages = UNITS * SEQS
    started = time.monotonic()
    async with (
        GatewayProcess(database_url=dsn, mqtt_url=broker.url, client_id=new_client_id()) as gw,
        AckWatcher(broker.url, totals) as acks,
    ):
        await gw.wait_ready()
        async with running_fleet(publishers) as fleet:
            conn = await asyncpg.connect(dsn)
            try:

                async def flowing() -> bool:
                    return await ledger_total(conn, totals) >= UNITS * RATE * 3

                await wait_until(flowing, 60, interval=0.1)
            finally:
                await conn.close()

            await postgres.stop("fast")
            stopped_at = time.monotonic()
            await gw.wait_readyz(503, timeout=15)
            not_ready_after = time.monotonic() - stopped_at
            await asyncio.sleep(max(0.0, stopped_at + SETTLE - time.monotonic()))
            held = dict(acks.latest)
            held_at = time.monotonic()
            generated_during = fleet.report().first_sends
            while (now := time.monotonic()) < stopped_at + OUTAGE:
                assert await gw.readyz_status() == 503, "ready while the database is down"
                assert acks.latest == held, "a watermark advanced while the database was down"
                await asyncio.sleep(min(1.0, stopped_at + OUTAGE - now))
            generated_during = fleet.report().first_sends - generated_during
            advances = [(unit, seq) for t, unit, seq in acks.history if t > held_at]

            await postgres.start()
            outage = time.monotonic() - stopped_at
            await gw.wait_ready(timeout=30)
            ready_after = time.monotonic() - stopped_at - outage
            report = await fleet.wait(180)
        # The watermark topic is published after the PUBACKs that end the fleet's wait, and
        # this watcher is another client: give its last messages a bounded moment to arrive.
        for unit in totals:
            await acks.wait_for(unit, SEQS, timeout=15)
        assert all(acks.seq(unit) == SEQS for unit in totals)
        warnings, errors = gw.log_lines_at("WARNING"), gw.log_lines_at("ERROR")
        error_excerpt = gw.log_excerpt("ERROR")

    conn = await asyncpg.connect(dsn)
    try:
        counts = await stored_counts(conn, totals)
    finally:
        await conn.close()
    lost = counts.lost(totals)
    print(  # noqa: T201 - the figures are the point of this test
        f"\n[database down] messages={messages} outage={outage:.1f}s"
        f" not_ready_after={not_ready_after:.1f}s ready_again_after={ready_after:.1f}s"
        f" published_during_outage={generated_during} watermark_advances_during_outage="
        f"{len(advances)} lost={lost} duplicate_vitals={counts.duplicate_vitals}"
        f" log_warnings={len(warnings)} {report.summary()}"
        f" total={time.monotonic() - started:.1f}s"
    )
    # Unavailable is not refused: no batch may be dead-lettered as storage-refused.
    assert errors == [], error_excerpt
    assert advances == []
    assert generated_during > 0, "nothing was published during the outage"
    assert report.resends == 0, "the broker lost messages the gateway had acknowledged"
    assert lost == 0
    assert counts.ledger == totals
    assert counts.vitals == messages * SAMPLES
    assert counts.duplicate_vitals == 0
    assert counts.watermarks == totals
