"""Fault: two `qantara serve` replicas share the units' stream; one is SIGKILLed midway.

Principle 5 (stateless replicas): two gateways on one database and one broker, the same
`QANTARA_MQTT_SHARED_GROUP` (each subscribes through `$share/<group>/units/+/vitals`) and
distinct client ids. Ten units publish seqs 1..1000 each (10,000 messages, three samples each).
When about 40 % is committed, one replica dies with SIGKILL (no drain, no DISCONNECT) and is not
restarted: the survivor must carry the rest.

What the broker kept for the dead member is not ours to count on. Mosquitto 2.0 may keep sending
a share of the group's messages to a member whose session is offline but not expired, and the
messages in flight to it stay with that session until it returns or expires (here
`QANTARA_MQTT_SESSION_EXPIRY=5s`, then they are discarded). The units' outbox makes no loss a
property of the chain: a unit publishes again whatever stays above the gateway's retained ack
watermark for `RESEND_AFTER` seconds, and those resends reach the survivor.

At the end: every (unit, seq) is in the ledger once, the vital table holds exactly samples x
messages rows with no repeated (device, concept, time), every unit's watermark and its retained
`units/{unit}/ack` are at 1000.

A second test keeps both replicas alive with the units interleaving their seqs across them, and
no resends allowed: each unit's watermark must reach its last seq from the replicas' own commits
(the unit row lock taken first in each batch serialises two replicas' transactions on a unit, so
the last commit sees every earlier one).
"""

from __future__ import annotations

import contextlib
import json
import secrets
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
    read_retained,
    running_fleet,
    stored_counts,
)
from tests.services_support import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.slow]

UNITS = 10
SEQS = 1000
SAMPLES = 3
KILL_AT = 0.4
RATE = 60.0  # messages per second per unit: the stream lasts about 17 s
RESEND_AFTER = 5.0


def replica_env(group: str) -> dict[str, str]:
    return {
        "QANTARA_MQTT_SHARED_GROUP": group,
        "QANTARA_MQTT_SESSION_EXPIRY": "5s",
    }


async def stored_by(gateway: GatewayProcess) -> float:
    return (await gateway.metrics()).get("qantara_messages_stored_total", protocol="mqtt")


async def retained_acks(mqtt_url: str, units: list[str]) -> dict[str, int]:
    acks = {}
    for unit in units:
        raw = await read_retained(mqtt_url, f"units/{unit}/ack")
        acks[unit] = int(json.loads(raw)["seq"]) if raw else 0
    return acks


async def settled_acks(mqtt_url: str, totals: dict[str, int]) -> dict[str, int]:
    """The retained acks once they equal `totals`, or as they are after 10 s."""
    acks: dict[str, int] = {}

    async def complete() -> bool:
        acks.update(await retained_acks(mqtt_url, list(totals)))
        return acks == totals

    with contextlib.suppress(AssertionError):
        await wait_until(complete, 10.0, interval=0.5)
    return acks


@pytest.mark.timeout(300)
async def test_replica_killed_midway_survivor_stores_everything_exactly_once(
    fresh_dsn: str, private_mosquitto: PrivateMosquittoFactory
) -> None:
    broker = await private_mosquitto()
    env = replica_env(f"g{secrets.token_hex(3)}")
    publishers = [
        UnitPublisher(
            new_unit_id("R"),
            broker.url,
            SEQS,
            samples=SAMPLES,
            rate=RATE,
            resend_after=RESEND_AFTER,
        )
        for _ in range(UNITS)
    ]
    totals = {p.unit: p.total for p in publishers}
    messages = UNITS * SEQS
    started = time.monotonic()
    conn = await asyncpg.connect(fresh_dsn)
    try:
        async with (
            GatewayProcess(
                database_url=fresh_dsn,
                mqtt_url=broker.url,
                client_id=new_client_id("replica-a"),
                env=env,
            ) as victim,
            GatewayProcess(
                database_url=fresh_dsn,
                mqtt_url=broker.url,
                client_id=new_client_id("replica-b"),
                env=env,
            ) as survivor,
        ):
            await victim.wait_ready()
            await survivor.wait_ready()
            async with running_fleet(publishers) as fleet:

                async def committed_enough() -> bool:
                    return await ledger_total(conn, totals) >= KILL_AT * messages

                await wait_until(committed_enough, 120, interval=0.05)
                victim_stored = await stored_by(victim)
                survivor_before = await stored_by(survivor)
                await victim.kill()
                at_kill = await ledger_total(conn, totals)
                report = await fleet.wait(240)
            survivor_stored = await stored_by(survivor)
            survivor_dups = (await survivor.metrics()).get(
                "qantara_messages_duplicate_total", protocol="mqtt"
            )
            acks = await settled_acks(broker.url, totals)
            stopped = await survivor.terminate()
        counts = await stored_counts(conn, totals)
    finally:
        await conn.close()

    lost = counts.lost(totals)
    duplicated = counts.messages - (messages - lost) + counts.duplicate_vitals
    print(  # noqa: T201 - the figures are the point of this test
        f"\n[replicas kill] messages={messages} committed_at_kill={at_kill}"
        f" victim_stored~{victim_stored:.0f} survivor_stored={survivor_stored:.0f}"
        f" (before kill {survivor_before:.0f}) survivor_duplicates={survivor_dups:.0f}"
        f" lost={lost} duplicated={duplicated} vitals={counts.vitals}/{messages * SAMPLES}"
        f" {report.summary()} total={time.monotonic() - started:.1f}s"
    )
    assert stopped == 0
    assert 0 < at_kill < messages, "the replica was not killed midway"
    assert victim_stored > 0, "the shared group never gave the victim anything"
    assert survivor_stored >= messages - at_kill, "the survivor did not carry the rest"
    assert lost == 0
    assert counts.ledger == totals
    assert counts.vitals == messages * SAMPLES
    assert counts.duplicate_vitals == 0
    assert counts.watermarks == totals
    assert acks == totals
    assert all(p.watermark == SEQS for p in publishers)


@pytest.mark.timeout(300)
async def test_two_live_replicas_advance_every_watermark_to_the_end_without_resends(
    fresh_dsn: str, private_mosquitto: PrivateMosquittoFactory
) -> None:
    broker = await private_mosquitto()
    env = replica_env(f"g{secrets.token_hex(3)}")
    publishers = [
        UnitPublisher(new_unit_id("W"), broker.url, 500, samples=1, rate=100.0, resend_after=600.0)
        for _ in range(UNITS)
    ]
    totals = {p.unit: p.total for p in publishers}
    conn = await asyncpg.connect(fresh_dsn)
    try:
        async with (
            GatewayProcess(database_url=fresh_dsn, mqtt_url=broker.url, env=env) as first,
            GatewayProcess(database_url=fresh_dsn, mqtt_url=broker.url, env=env) as second,
        ):
            await first.wait_ready()
            await second.wait_ready()
            async with running_fleet(publishers) as fleet:
                report = await fleet.wait(120)
            shares = [await stored_by(gw) for gw in (first, second)]
            # The retained ack is the last value either replica published: it must be the end.
            acks = await settled_acks(broker.url, totals)
        counts = await stored_counts(conn, totals)
    finally:
        await conn.close()
    print(  # noqa: T201
        f"\n[replicas watermark] shares={shares} {report.summary()} watermarks ok="
        f"{counts.watermarks == totals} retained ok={acks == totals}"
    )
    assert min(shares) > 0, "one replica got nothing: the stream was not shared"
    assert report.resends == 0
    assert counts.watermarks == totals
    assert acks == totals
