"""Specification of MQTT ingest end to end: units publish to a real broker, `qantara serve` runs as
a real process, and what it stored is read back from PostgreSQL.

One gateway serves the module (its own fresh database, so counts are isolated); every test uses
unit ids of its own and clears the retained topics it caused at the end. The gateway's persistent
MQTT session expires a minute after it disconnects, so test runs leave nothing queued behind on
the shared broker.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg
import pytest

from gateway.local_services import drop_database, ensure_database
from tests.gateway_process import (
    AckWatcher,
    GatewayProcess,
    MetricsSnapshot,
    broker_address,
    clear_retained,
    encode,
    new_client_id,
    new_unit_id,
    parse_ack,
    read_retained,
    rfc3339,
    stored_counts,
    vitals_body,
    vitals_payload,
)
from tests.services_support import wait_until

MAX_PAYLOAD = 4096  # small, so that payload-too-large is cheap to provoke
GATEWAY_ENV = {
    "QANTARA_MQTT_MAX_PAYLOAD": str(MAX_PAYLOAD),
    "QANTARA_MQTT_SESSION_EXPIRY": "60s",
}
WAIT = 30.0  # bound on any single wait for the gateway


@pytest.fixture(scope="module")
async def gateway(module_dsn: str, mqtt_url: str) -> AsyncIterator[GatewayProcess]:
    async with GatewayProcess(
        database_url=module_dsn, mqtt_url=mqtt_url, env=GATEWAY_ENV
    ) as process:
        await process.wait_ready()
        yield process


@pytest.fixture(scope="module")
async def db(gateway: GatewayProcess, module_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    """Read access to the gateway's database (its migrations are applied by then)."""
    pool = await asyncpg.create_pool(module_dsn, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


class Units:
    """Unit ids of one test; their retained ack and status topics are cleared at the end."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def new(self) -> str:
        unit = new_unit_id("T")
        self.ids.append(unit)
        return unit

    def retained_topics(self) -> list[str]:
        return [f"units/{u}/{leaf}" for u in self.ids for leaf in ("ack", "status")]


@pytest.fixture
async def units(mqtt_url: str) -> AsyncIterator[Units]:
    created = Units()
    try:
        yield created
    finally:
        await clear_retained(mqtt_url, created.retained_topics())


@contextlib.asynccontextmanager
async def unit_client(mqtt_url: str, **kwargs: Any) -> AsyncIterator[aiomqtt.Client]:
    host, port = broker_address(mqtt_url)
    async with aiomqtt.Client(
        host,
        port,
        identifier=new_client_id("unit"),
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=10,
        **kwargs,
    ) as client:
        yield client


async def publish(client: aiomqtt.Client, unit: str, payload: bytes) -> None:
    await client.publish(f"units/{unit}/vitals", payload, qos=1, timeout=10)


def base_time() -> datetime:
    return datetime.now(UTC) - timedelta(hours=1)


def cin() -> str:
    return f"ZT{secrets.token_hex(4).upper()}"


async def ledger_count(db: asyncpg.Pool, unit: str) -> int:
    count = await db.fetchval(
        "SELECT count(*) FROM mqtt_message m JOIN unit u ON u.id = m.unit_id WHERE u.name = $1",
        unit,
    )
    return int(count)


async def retained_ack(mqtt_url: str, unit: str) -> int | None:
    return parse_ack(await read_retained(mqtt_url, f"units/{unit}/ack"))


# --- storage -----------------------------------------------------------------------------------


async def test_messages_published_are_stored_exactly_once(
    gateway: GatewayProcess, db: asyncpg.Pool, mqtt_url: str, units: Units
) -> None:
    unit, patient, t0 = units.new(), cin(), base_time()
    async with AckWatcher(mqtt_url, [unit]) as acks, unit_client(mqtt_url) as client:
        for seq in range(1, 51):
            await publish(client, unit, vitals_payload(unit, seq, cin=patient, base_time=t0))
        await acks.wait_for(unit, 50, WAIT)

    async with db.acquire() as conn:
        counts = await stored_counts(conn, {unit: 50})
    assert counts.ledger == {unit: 50}
    assert counts.lost({unit: 50}) == 0
    assert counts.vitals == 150
    assert counts.duplicate_vitals == 0
    assert counts.watermarks == {unit: 50}


async def test_out_of_order_seqs_are_all_stored_and_the_watermark_waits_for_the_gap(
    gateway: GatewayProcess, db: asyncpg.Pool, mqtt_url: str, units: Units
) -> None:
    unit, patient, t0 = units.new(), cin(), base_time()
    async with AckWatcher(mqtt_url, [unit]) as acks, unit_client(mqtt_url) as client:
        for seq in (1, 2, 4, 5):
            await publish(client, unit, vitals_payload(unit, seq, cin=patient, base_time=t0))
        await wait_until(lambda: _eq(ledger_count(db, unit), 4), WAIT, interval=0.1)
        await acks.wait_for(unit, 2, WAIT)
        assert await retained_ack(mqtt_url, unit) == 2
        assert max(seq for _, u, seq in acks.history if u == unit) == 2

        await publish(client, unit, vitals_payload(unit, 3, cin=patient, base_time=t0))
        await acks.wait_for(unit, 5, WAIT)

    assert await retained_ack(mqtt_url, unit) == 5
    async with db.acquire() as conn:
        counts = await stored_counts(conn, {unit: 5})
    assert counts.ledger == {unit: 5}
    assert counts.vitals == 15
    assert counts.watermarks == {unit: 5}


async def test_exact_resend_of_a_committed_seq_is_acknowledged_and_stored_once(
    gateway: GatewayProcess, db: asyncpg.Pool, mqtt_url: str, units: Units
) -> None:
    unit, t0 = units.new(), base_time()
    payload = vitals_payload(unit, 1, cin=cin(), base_time=t0)
    async with AckWatcher(mqtt_url, [unit]) as acks, unit_client(mqtt_url) as client:
        await publish(client, unit, payload)
        await acks.wait_for(unit, 1, WAIT)
        before = (await gateway.metrics()).get("qantara_messages_duplicate_total", protocol="mqtt")

        await publish(client, unit, payload)

        async def duplicate_counted() -> bool:
            snapshot = await gateway.metrics()
            return snapshot.get("qantara_messages_duplicate_total", protocol="mqtt") > before

        await wait_until(duplicate_counted, WAIT, interval=0.1)

    async with db.acquire() as conn:
        counts = await stored_counts(conn, {unit: 1})
    assert counts.ledger == {unit: 1}
    assert counts.vitals == 3
    assert counts.duplicate_vitals == 0


# --- rejections ----------------------------------------------------------------------------------


def _with_sample(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    body["samples"][0].update(changes)
    return body


REJECTIONS: dict[str, Callable[[str, str, datetime], bytes]] = {
    "not-json": lambda unit, patient, t0: b'{"v":1,"seq":1,"samples":[',
    "unknown-version": lambda unit, patient, t0: encode(
        {**vitals_body(unit, 1, cin=patient, base_time=t0), "v": 2}
    ),
    "unknown-code": lambda unit, patient, t0: encode(
        _with_sample(vitals_body(unit, 1, cin=patient, base_time=t0), code="no-such-code")
    ),
    "non-numeric-value": lambda unit, patient, t0: encode(
        _with_sample(vitals_body(unit, 1, cin=patient, base_time=t0), value="72")
    ),
    "payload-too-large": lambda unit, patient, t0: encode(
        {**vitals_body(unit, 1, cin=patient, base_time=t0), "note": "x" * MAX_PAYLOAD}
    ),
    "unit-mismatch": lambda unit, patient, t0: encode(
        {**vitals_body(unit, 1, cin=patient, base_time=t0), "unit": "T-someone-else"}
    ),
}


@pytest.mark.parametrize("reason", sorted(REJECTIONS))
async def test_each_rejection_reason_reaches_a_dead_letter_and_its_metric(
    gateway: GatewayProcess, db: asyncpg.Pool, mqtt_url: str, units: Units, reason: str
) -> None:
    unit = units.new()
    payload = REJECTIONS[reason](unit, cin(), base_time())
    labels = {"protocol": "mqtt", "reason": reason}
    before = (await gateway.metrics()).get("qantara_messages_rejected_total", **labels)

    async with unit_client(mqtt_url) as client:
        await publish(client, unit, payload)

    async def dead_letter_reasons() -> list[str]:
        rows = await db.fetch(
            "SELECT reason FROM dead_letter WHERE protocol = 'mqtt' AND source = $1", unit
        )
        return [r["reason"] for r in rows]

    await wait_until(lambda: _eq(dead_letter_reasons(), [reason]), WAIT, interval=0.1)
    raw = await db.fetchval("SELECT raw FROM dead_letter WHERE source = $1", unit)
    assert bytes(raw) == payload
    after = (await gateway.metrics()).get("qantara_messages_rejected_total", **labels)
    assert after >= before + 1


async def test_a_rejected_message_with_a_seq_advances_the_watermark(
    gateway: GatewayProcess, db: asyncpg.Pool, mqtt_url: str, units: Units
) -> None:
    unit, patient, t0 = units.new(), cin(), base_time()
    bad = _with_sample(vitals_body(unit, 2, cin=patient, base_time=t0), code="no-such-code")
    async with AckWatcher(mqtt_url, [unit]) as acks, unit_client(mqtt_url) as client:
        await publish(client, unit, vitals_payload(unit, 1, cin=patient, base_time=t0))
        await publish(client, unit, encode(bad))
        await acks.wait_for(unit, 2, WAIT)
        await publish(client, unit, vitals_payload(unit, 3, cin=patient, base_time=t0))
        await acks.wait_for(unit, 3, WAIT)

    outcomes = await db.fetch(
        """SELECT m.seq, m.outcome FROM mqtt_message m JOIN unit u ON u.id = m.unit_id
           WHERE u.name = $1 ORDER BY m.seq""",
        unit,
    )
    assert [(r["seq"], r["outcome"]) for r in outcomes] == [
        (1, "stored"),
        (2, "rejected"),
        (3, "stored"),
    ]


# --- unit status, readiness ----------------------------------------------------------------------


async def test_the_unit_status_topic_drives_the_online_gauge_and_last_seen(
    gateway: GatewayProcess, mqtt_url: str, units: Units
) -> None:
    unit = units.new()
    status_topic = f"units/{unit}/status"
    online = {"unit": unit}
    will = aiomqtt.Will(status_topic, b'{"online":false}', qos=1, retain=True)
    before = time.time()
    with contextlib.suppress(aiomqtt.MqttError):
        async with unit_client(mqtt_url, will=will, keepalive=5) as client:
            await client.publish(status_topic, b'{"online":true}', qos=1, retain=True)
            await gateway.wait_metric("qantara_unit_online", online, 1.0, WAIT)
            seen = (await gateway.metrics()).get(
                "qantara_unit_last_seen_timestamp_seconds", unit=unit
            )
            assert before - 1 <= seen <= time.time() + 1

            # The radio link dies: no DISCONNECT, so the broker publishes the unit's last will.
            sock = client._client.socket()
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)
            await gateway.wait_metric("qantara_unit_online", online, 0.0, WAIT)

    assert await read_retained(mqtt_url, status_topic) == b'{"online":false}'


async def test_readyz_is_200_while_the_database_and_broker_are_connected(
    gateway: GatewayProcess,
) -> None:
    response = await gateway.get("/readyz")
    assert response.status_code == 200
    assert all(response.json()["checks"].values())
    assert (await gateway.metrics()).get("qantara_mqtt_connected") == 1.0


# --- backlog age ---------------------------------------------------------------------------------

DELAY = "qantara_mqtt_delivery_delay_seconds"


def sent_at(body: dict[str, Any], when: datetime) -> dict[str, Any]:
    """The body with `sent_at` and its samples' times set to `when`."""
    body["sent_at"] = rfc3339(when)
    for sample in body["samples"]:
        sample["t"] = rfc3339(when)
    return body


async def committed_once(
    gateway: GatewayProcess, mqtt_url: str, unit: str, body: dict[str, Any]
) -> tuple[MetricsSnapshot, MetricsSnapshot]:
    """Publish one message, wait for its ack (sent after the commit's metrics): before, after."""
    before = await gateway.metrics()
    async with AckWatcher(mqtt_url, [unit]) as acks, unit_client(mqtt_url) as client:
        await publish(client, unit, encode(body))
        await acks.wait_for(unit, body["seq"], WAIT)
    return before, await gateway.metrics()


def delay_buckets(snapshot: MetricsSnapshot) -> dict[float, float]:
    return {
        float(dict(labels)["le"]): value
        for (name, labels), value in snapshot.samples.items()
        if name == f"{DELAY}_bucket"
    }


async def test_a_replayed_message_sets_the_unit_backlog_age_to_its_age(
    gateway: GatewayProcess, mqtt_url: str, units: Units
) -> None:
    unit, thirty_hours = units.new(), 30 * 3600.0  # a unit back after more than a day away
    sent = datetime.now(UTC) - timedelta(seconds=thirty_hours)
    body = sent_at(vitals_body(unit, 1, cin=cin(), base_time=sent), sent)

    before, after = await committed_once(gateway, mqtt_url, unit, body)

    age = after.get("qantara_unit_backlog_age_seconds", unit=unit)
    assert thirty_hours <= age < thirty_hours + WAIT
    # The fleet's histogram counted it between 16 h and 2 days. (Units of other test runs on a
    # shared broker may be counted meanwhile too, but none sends data that old.)
    added = {le: count - delay_buckets(before)[le] for le, count in delay_buckets(after).items()}
    assert added[172800.0] - added[57600.0] == 1


async def test_a_live_message_brings_the_backlog_age_near_zero(
    gateway: GatewayProcess, mqtt_url: str, units: Units
) -> None:
    unit, patient = units.new(), cin()
    old = datetime.now(UTC) - timedelta(hours=5)
    await committed_once(
        gateway, mqtt_url, unit, sent_at(vitals_body(unit, 1, cin=patient, base_time=old), old)
    )
    now = datetime.now(UTC)
    _, after = await committed_once(
        gateway, mqtt_url, unit, sent_at(vitals_body(unit, 2, cin=patient, base_time=now), now)
    )

    # From 5 h to the publish-to-receipt time (bounded loosely: the machine may be busy).
    assert 0 <= after.get("qantara_unit_backlog_age_seconds", unit=unit) < WAIT


async def test_a_sent_at_in_the_future_clamps_the_age_to_zero_and_counts_clock_skew(
    gateway: GatewayProcess, mqtt_url: str, units: Units
) -> None:
    unit = units.new()
    ahead = datetime.now(UTC) + timedelta(minutes=10)
    body = sent_at(vitals_body(unit, 1, cin=cin(), base_time=ahead), ahead)

    _, after = await committed_once(gateway, mqtt_url, unit, body)

    assert after.get("qantara_unit_backlog_age_seconds", unit=unit) == 0
    assert after.get("qantara_unit_clock_skew_total", unit=unit) == 1


async def test_per_unit_series_stay_within_the_configured_cap(
    postgres_server_dsn: str, mqtt_url: str, units: Units
) -> None:
    cap, fleet = 2, [units.new() for _ in range(4)]
    name = f"qantara_t_{secrets.token_hex(6)}"
    dsn = await ensure_database(postgres_server_dsn, name)
    env = {**GATEWAY_ENV, "QANTARA_UNIT_METRICS_MAX": str(cap)}
    t0 = base_time()
    try:
        async with GatewayProcess(database_url=dsn, mqtt_url=mqtt_url, env=env) as capped:
            await capped.wait_ready()
            async with AckWatcher(mqtt_url, fleet) as acks, unit_client(mqtt_url) as client:
                for unit in fleet:
                    await publish(client, unit, vitals_payload(unit, 1, cin=cin(), base_time=t0))
                for unit in fleet:
                    await acks.wait_for(unit, 1, WAIT)
            snapshot = await capped.metrics()
    finally:
        await drop_database(postgres_server_dsn, name)

    def labelled(metric: str) -> set[str]:
        return {
            dict(labels)["unit"] for (name, labels), _ in snapshot.samples.items() if name == metric
        }

    # Retained statuses of other units on a shared broker may take slots too: whoever they
    # are, no more than `cap` units have series, and the ones past it have none.
    assert snapshot.get("qantara_units_tracked") == cap
    ages = labelled("qantara_unit_backlog_age_seconds")
    assert len(ages) <= cap
    assert ages <= labelled("qantara_unit_last_seen_timestamp_seconds")
    assert len(labelled("qantara_unit_last_seen_timestamp_seconds")) <= cap
    assert len(set(fleet) - ages) >= len(fleet) - cap


async def test_acknowledging_many_units_at_once_logs_no_warning(
    gateway: GatewayProcess, mqtt_url: str, units: Units
) -> None:
    # A fleet back in coverage: each unit's watermark is published, up to a slice of them in
    # flight together by design. aiomqtt warns above 10 pending publishes unless told the bound.
    fleet = [units.new() for _ in range(60)]
    t0 = base_time()
    seen = len(gateway.log_lines)
    async with AckWatcher(mqtt_url, fleet) as acks, unit_client(mqtt_url) as client:
        for unit in fleet:
            await client.publish(
                f"units/{unit}/vitals", vitals_payload(unit, 1, cin=cin(), base_time=t0), qos=0
            )
        for unit in fleet:
            await acks.wait_for(unit, 1, WAIT)
    warnings = [line for line in list(gateway.log_lines)[seen:] if " WARNING " in line]
    assert warnings == []


# --- privacy ---------------------------------------------------------------------------------


async def test_no_info_log_line_contains_patient_identifiers_or_names(
    gateway: GatewayProcess, db: asyncpg.Pool, mqtt_url: str, units: Units
) -> None:
    unit, t0 = units.new(), base_time()
    patient = cin()
    names = ("Fatima Zahra El Idrissi", "فاطمة الزهراء الإدريسي")
    bodies = [vitals_body(unit, seq, cin=patient, base_time=t0) for seq in (1, 2, 3)]
    for body in bodies:
        body["patient"]["name"] = {"fr": names[0], "ar": names[1]}
    _with_sample(bodies[1], code="no-such-code")  # a rejection is logged: with no identifier
    async with AckWatcher(mqtt_url, [unit]) as acks, unit_client(mqtt_url) as client:
        for body in bodies:
            await publish(client, unit, encode(body))
        await acks.wait_for(unit, 3, WAIT)

    lines = list(gateway.log_lines)
    assert any(unit in line and "unknown-code" in line for line in lines), "rejection not logged"
    for secret in (patient, *names):
        leaking = [line for line in lines if secret in line]
        assert leaking == [], f"{secret!r} appears in the gateway's log"


# --- scaling out ---------------------------------------------------------------------------------


async def test_shared_group_subscription_splits_messages_between_replicas(
    postgres_server_dsn: str, mqtt_url: str, units: Units
) -> None:
    name = f"qantara_t_{secrets.token_hex(6)}"
    dsn = await ensure_database(postgres_server_dsn, name)
    group = f"g-{secrets.token_hex(4)}"
    env = {**GATEWAY_ENV, "QANTARA_MQTT_SHARED_GROUP": group}
    fleet = [units.new() for _ in range(10)]
    per_unit, t0 = 20, base_time()
    try:
        async with (
            GatewayProcess(database_url=dsn, mqtt_url=mqtt_url, env=env) as first,
            GatewayProcess(database_url=dsn, mqtt_url=mqtt_url, env=env) as second,
        ):
            await first.wait_ready()
            await second.wait_ready()
            assert any(f"$share/{group}/units/+/vitals" in line for line in first.log_lines)
            before = [
                (await gw.metrics()).get("qantara_messages_duplicate_total", protocol="mqtt")
                for gw in (first, second)
            ]
            async with unit_client(mqtt_url) as client:
                for seq in range(1, per_unit + 1):
                    for unit in fleet:
                        payload = vitals_payload(unit, seq, cin=cin(), base_time=t0)
                        await publish(client, unit, payload)

            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
            try:
                async with pool.acquire() as conn:

                    async def all_stored() -> bool:
                        counts = await stored_counts(conn, dict.fromkeys(fleet, per_unit))
                        return counts.messages == len(fleet) * per_unit

                    await wait_until(all_stored, WAIT, interval=0.1)
                    counts = await stored_counts(conn, dict.fromkeys(fleet, per_unit))
            finally:
                await pool.close()

            snapshots = [await gw.metrics() for gw in (first, second)]
            seen_by = [
                {u for u in fleet if s.value("qantara_unit_last_seen_timestamp_seconds", unit=u)}
                for s in snapshots
            ]
            duplicates = sum(
                s.get("qantara_messages_duplicate_total", protocol="mqtt") - b
                for s, b in zip(snapshots, before, strict=True)
            )
    finally:
        await drop_database(postgres_server_dsn, name)

    assert counts.lost(dict.fromkeys(fleet, per_unit)) == 0
    assert counts.vitals == counts.distinct_vitals == len(fleet) * per_unit * 3
    # Each replica got a share of the units' messages, and not every message twice.
    assert seen_by[0], seen_by
    assert seen_by[1], seen_by
    assert seen_by[0] | seen_by[1] == set(fleet)
    assert duplicates < len(fleet) * per_unit / 2


async def _eq(value: Awaitable[object], expected: object) -> bool:
    return await value == expected
