"""Simulated units against the real broker, the test playing the gateway.

The test subscribes to `units/+/vitals`, "commits" what it receives and publishes the retained
contiguous watermark on `units/{id}/ack`, as the gateway does. Each run uses its own unit prefix
and clears the retained topics it created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from simulators.fleet_units import UnitsConfig, UnitsReport, run_units
from simulators.outbox import Outbox
from simulators.unit import BrokerAddress

MQTT_URL = os.environ.get("QANTARA_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")


@dataclass
class PlayedGateway:
    """What the test's stand-in gateway saw, per unit."""

    prefix: str
    arrivals: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    committed: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    statuses: defaultdict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))
    units: set[str] = field(default_factory=set)
    lose_once: set[int] = field(default_factory=set)  # seqs to "lose" on first arrival

    def first_arrivals(self, unit: str) -> list[int]:
        seen: set[int] = set()
        order = []
        for seq in self.arrivals[unit]:
            if seq not in seen:
                seen.add(seq)
                order.append(seq)
        return order

    async def serve(self, client: aiomqtt.Client) -> None:
        received: defaultdict[str, set[int]] = defaultdict(set)
        lost: set[tuple[str, int]] = set()
        async for message in client.messages:
            _, unit, kind = message.topic.value.split("/")
            if not unit.startswith(self.prefix) or not isinstance(message.payload, bytes):
                continue  # another run's units, or a cleared retained topic
            self.units.add(unit)
            body = json.loads(message.payload)
            if kind == "status":
                self.statuses[unit].append(body["online"])
                continue
            seq = body["seq"]
            if (unit, seq) not in lost and seq in self.lose_once:
                lost.add((unit, seq))  # as if the broker had dropped it
                continue
            self.arrivals[unit].append(seq)
            received[unit].add(seq)
            watermark = self.committed[unit]
            while watermark + 1 in received[unit]:
                watermark += 1
            if watermark > self.committed[unit]:
                self.committed[unit] = watermark
                ack = json.dumps({"seq": watermark})
                await client.publish(f"units/{unit}/ack", ack, qos=1, retain=True)


@contextlib.asynccontextmanager
async def played_gateway(
    prefix: str, lose_once: frozenset[int] = frozenset()
) -> AsyncIterator[PlayedGateway]:
    broker = BrokerAddress.parse(MQTT_URL)
    gateway = PlayedGateway(prefix, lose_once=set(lose_once))
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=f"test-gateway-{prefix}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe("units/+/vitals", qos=1)
        await client.subscribe("units/+/status", qos=1)
        serving = asyncio.create_task(gateway.serve(client))
        try:
            yield gateway
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            for unit in gateway.units:
                for topic in ("ack", "status"):
                    await client.publish(f"units/{unit}/{topic}", b"", qos=1, retain=True)


def _config(tmp_path: Path, prefix: str, **overrides: object) -> UnitsConfig:
    settings: dict[str, object] = {
        "mqtt_url": MQTT_URL,
        "count": 2,
        "rate": 10.0,
        "duration": 3.0,
        "state_dir": tmp_path,
        "seed": 7,
        "resend_after": 2.0,
        "drain_timeout": 20.0,
        "unit_prefix": prefix,
        "quiet": True,
    }
    settings.update(overrides)
    return UnitsConfig(**settings)  # type: ignore[arg-type]


def _assert_all_delivered_in_order(
    report: UnitsReport, gateway: PlayedGateway, state_dir: Path
) -> None:
    assert report.drained
    assert report.pending == 0
    assert report.acked == report.generated
    for unit in report.per_unit:
        assert unit.generated > 0
        expected = list(range(1, unit.generated + 1))
        assert gateway.first_arrivals(unit.unit_id) == expected
        assert gateway.committed[unit.unit_id] == unit.generated
        assert unit.acked == unit.generated
        with Outbox(state_dir / f"{unit.unit_id}.sqlite3") as outbox:
            assert outbox.pending() == 0
            assert outbox.next_seq == unit.generated + 1


def _prefix() -> str:
    return f"T{secrets.token_hex(3)}-UMMC-"


async def test_two_units_deliver_every_message_in_seq_order_and_end_with_empty_outboxes(
    tmp_path: Path,
) -> None:
    prefix = _prefix()
    cfg = _config(tmp_path, prefix)
    async with asyncio.timeout(60), played_gateway(prefix) as gateway:
        report = await run_units(cfg)
    assert report.units == 2
    assert 2 * 25 <= report.generated <= 2 * 31  # 10/s for 3 s per unit
    _assert_all_delivered_in_order(report, gateway, tmp_path)
    for unit in report.per_unit:
        assert gateway.statuses[unit.unit_id][0] is True
        assert gateway.statuses[unit.unit_id][-1] is False  # said goodbye at the end


async def test_restarted_units_continue_their_numbering(tmp_path: Path) -> None:
    prefix = _prefix()
    cfg = _config(tmp_path, prefix, duration=1.0)
    async with asyncio.timeout(60), played_gateway(prefix) as gateway:
        first = await run_units(cfg)
        second = await run_units(cfg)
    assert first.drained
    assert second.drained
    for before, after in zip(first.per_unit, second.per_unit, strict=True):
        total = before.generated + after.generated
        assert gateway.first_arrivals(after.unit_id) == list(range(1, total + 1))
        assert after.watermark == total


async def test_message_lost_on_the_way_is_resent_once_the_watermark_stalls(
    tmp_path: Path,
) -> None:
    prefix = _prefix()
    cfg = _config(tmp_path, prefix, count=1, duration=2.0, resend_after=1.0)
    async with asyncio.timeout(60), played_gateway(prefix, lose_once=frozenset({3})) as gateway:
        report = await run_units(cfg)
    (unit,) = report.per_unit
    assert report.drained
    assert unit.resent >= 1
    assert sorted(set(gateway.arrivals[unit.unit_id])) == list(range(1, unit.generated + 1))
    assert gateway.committed[unit.unit_id] == unit.generated


@pytest.mark.slow
async def test_flaky_links_fire_the_will_and_replay_without_loss(tmp_path: Path) -> None:
    prefix = _prefix()
    cfg = _config(tmp_path, prefix, duration=5.0, flaky=0.4, outage_scale=0.05, resend_after=1.0)
    async with asyncio.timeout(90), played_gateway(prefix) as gateway:
        report = await run_units(cfg)
    assert report.link_drops >= 1
    assert report.connects >= report.units + 1
    _assert_all_delivered_in_order(report, gateway, tmp_path)
    for unit in report.per_unit:
        offline = gateway.statuses[unit.unit_id].count(False)
        assert offline >= unit.link_drops  # the broker published the will for each drop
