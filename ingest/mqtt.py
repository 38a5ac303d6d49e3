"""The MQTT vitals adapter: broker messages in, envelopes to the pipeline, PUBACK after COMMIT.

For each `units/{unit}/vitals` message: validate (sans-IO, `ingest.mqtt_payload`), submit one
envelope (vitals, or a dead letter with its reason), and when the envelope's future resolves
(stored, duplicate or rejected: all durable) send the PUBACK and publish the unit's retained
`units/{unit}/ack` watermark. Reading stops while the pipeline's queue is full (backpressure).
`units/{unit}/status` (retained, last will `{"online": false}`) feeds the unit gauges.
Broker loss: reconnect with backoff; the broker redelivers what was not acknowledged.

Once a vitals message is committed (stored for the first time), its delivery delay, receive time
minus the payload's `sent_at`, sets the unit's backlog age and feeds the fleet's histogram; a
`sent_at` later than the receipt (the unit's clock is ahead) counts as 0, and as clock skew beyond
`clock_skew_tolerance`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from datetime import UTC, datetime, timedelta

from ingest.errors import InputError
from ingest.mqtt_payload import PayloadLimits, extract_seq, parse_vitals, unit_from_topic
from ingest.mqtt_session import (
    PUBLISH_SLICE,
    MqttError,
    MqttSettings,
    Received,
    Session,
    connect,
)
from ingest.pipeline import GroupCommitPipeline, PipelineClosed
from ingest.records import (
    DeadLetter,
    DeadLetterKey,
    Envelope,
    Key,
    MqttKey,
    Outcome,
    OutcomeKind,
    Protocol,
    Record,
    VitalsMessage,
)
from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)

STATUS_TOPIC = "units/+/status"
ACK_TOPIC = "units/+/ack"
_RECONNECT_MAX = 30.0
# A unit's `sent_at` after our receipt by more than this is counted as clock skew (the gateway's
# own clock and the broker's transit make a few seconds normal).
CLOCK_SKEW_TOLERANCE = timedelta(seconds=60)


class UnitGauges:
    """Per-unit series (last seen, online, backlog age, clock skew), capped so that label
    cardinality stays bounded: a unit beyond the cap gets no series at all."""

    def __init__(self, metrics: Metrics, cap: int) -> None:
        self._metrics = metrics
        self._cap = cap
        self._units: set[str] = set()

    def _tracked(self, unit: str) -> bool:
        if unit in self._units:
            return True
        if len(self._units) >= self._cap:
            return False
        self._units.add(unit)
        self._metrics.units_tracked.set(len(self._units))
        return True

    def seen(self, unit: str) -> None:
        if self._tracked(unit):
            self._metrics.unit_last_seen.labels(unit).set(time.time())

    def online(self, unit: str, online: bool) -> None:
        if self._tracked(unit):
            self._metrics.unit_online.labels(unit).set(1 if online else 0)

    def backlog(self, unit: str, age: float, *, skewed: bool) -> None:
        """The delivery delay of the unit's latest committed message (clamped at 0)."""
        if self._tracked(unit):
            self._metrics.unit_backlog_age.labels(unit).set(age)
            skew = self._metrics.unit_clock_skew.labels(unit)  # at 0 first: `increase()` sees 1
            if skewed:
                skew.inc()


class MqttVitalsAdapter:
    def __init__(
        self,
        settings: MqttSettings,
        pipeline: GroupCommitPipeline,
        metrics: Metrics,
        *,
        clock_skew_tolerance: timedelta = CLOCK_SKEW_TOLERANCE,
    ) -> None:
        self._settings = settings
        self._skew_tolerance = clock_skew_tolerance.total_seconds()
        self._pipeline = pipeline
        self._metrics = metrics
        self._limits = PayloadLimits(
            max_payload_bytes=settings.max_payload,
            max_future=settings.max_future,
            max_past=settings.max_past,
        )
        self._units = UnitGauges(metrics, settings.unit_metrics_max)
        self._session: Session | None = None
        self._generation = 0
        self._watermarks: dict[str, int] = {}
        self._published: dict[str, int] = {}
        self._stale: set[str] = set()  # units whose retained ack another replica set lower
        self._watermark_changed = asyncio.Event()
        self._stopping = False
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Stay connected until cancelled or `stop()`; reconnect with backoff."""
        delay = 0.5
        while not self._stopping:
            self._generation += 1
            try:
                async with connect(self._settings, self._generation) as session:
                    delay = 0.5
                    await self._serve(session)
            except* MqttError as group:
                # A loss while reading arrives from inside _serve's TaskGroup, wrapped in a group.
                logger.warning(
                    "MQTT connection lost or refused (%s); retrying", group.exceptions[0]
                )
            finally:
                self._session = None
                self.connected.clear()
                self._metrics.mqtt_connected.set(0)
            if self._stopping:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    def stop(self) -> None:
        """Stop reading new messages; the caller then drains the pipeline and cancels `run`."""
        self._stopping = True

    async def _serve(self, session: Session) -> None:
        self._session = session
        self.connected.set()
        self._metrics.mqtt_connected.set(1)
        # Publish the watermarks learnt before a reconnect, then follow new ones.
        self._published.clear()
        self._watermark_changed.set()
        async with asyncio.TaskGroup() as group:
            publisher = group.create_task(self._publish_watermarks(session))
            # A resumed session delivers its queued messages before the SUBACKs: consume them
            # while subscribing, or a full read window would hide the SUBACK forever.
            reader = group.create_task(self._read(session))
            try:
                await session.subscribe(self._settings.vitals_subscription)
                await session.subscribe(STATUS_TOPIC)
                if self._settings.shared_group:
                    # Replicas race to publish a unit's retained ack: the one that knows the
                    # higher watermark watches the topic and publishes it again when another
                    # replica's older value lands last (see _on_ack_seen).
                    await session.subscribe(ACK_TOPIC)
                logger.info(
                    "MQTT connected to %s:%d as %s, subscribed to %s",
                    self._settings.host,
                    self._settings.port,
                    self._settings.client_id,
                    self._settings.vitals_subscription,
                )
                await reader
            finally:
                publisher.cancel()
                reader.cancel()

    async def _read(self, session: Session) -> None:
        async for message in session.messages():
            if self._stopping:
                # Left unacknowledged for the next session; the connection stays up so the
                # PUBACKs of what the pipeline is still committing go out.
                continue
            await self._handle(session, message)

    async def _handle(self, session: Session, message: Received) -> None:
        topic = message.topic
        if topic.endswith("/status"):
            self._on_status(message)
            session.ack(message)
            return
        if topic.endswith("/ack"):
            self._on_ack_seen(message)
            session.ack(message)
            return
        received_at = datetime.now(UTC)
        self._metrics.received.labels(Protocol.MQTT.value).inc()
        envelope = self._envelope(message, received_at)
        try:
            await self._pipeline.submit(envelope)
        except PipelineClosed:
            session.release(message)
            return  # not acknowledged: the broker keeps it for the next session
        envelope.ack.add_done_callback(lambda future: self._resolved(future, message, envelope))

    def _envelope(self, message: Received, received_at: datetime) -> Envelope:
        loop = asyncio.get_running_loop()
        payload = message.payload
        key: Key
        records: tuple[Record, ...]
        try:
            unit = unit_from_topic(message.topic)
        except InputError as exc:
            source = "?"
            key = DeadLetterKey(Protocol.MQTT, source, hashlib.sha256(payload).digest())
            records = (_letter(source, exc, payload),)
        else:
            source = unit
            self._units.seen(unit)
            try:
                vitals = parse_vitals(unit, payload, received_at=received_at, limits=self._limits)
            except InputError as exc:
                seq = extract_seq(
                    payload, unit_id=unit, max_payload_bytes=self._limits.max_payload_bytes
                )
                key = (
                    MqttKey(unit, seq)
                    if seq is not None
                    else DeadLetterKey(Protocol.MQTT, unit, hashlib.sha256(payload).digest())
                )
                records = (_letter(unit, exc, payload),)
                logger.info("MQTT message from unit %s rejected: %s", unit, exc.reason)
            else:
                key = MqttKey(unit, vitals.seq)
                records = (vitals,)
        return Envelope(
            protocol=Protocol.MQTT,
            key=key,
            records=records,
            received_at=received_at,
            ack=loop.create_future(),
            source=source,
            raw=payload,
        )

    def _resolved(
        self, future: asyncio.Future[Outcome], message: Received, envelope: Envelope
    ) -> None:
        session = self._session
        if future.cancelled() or future.exception() is not None:
            if session is not None:
                session.release(message)
            return  # not durable: no PUBACK, the broker redelivers
        outcome = future.result()
        if outcome.kind is OutcomeKind.STORED:
            self._delivered(envelope)
        if session is not None:
            session.ack(message)
        if outcome.watermark is not None:
            try:
                unit = unit_from_topic(message.topic)
            except InputError:
                return
            if outcome.watermark > self._watermarks.get(unit, 0):
                self._watermarks[unit] = outcome.watermark
                self._watermark_changed.set()

    def _delivered(self, envelope: Envelope) -> None:
        """Backlog age and delivery delay of a committed vitals message with a `sent_at`."""
        vitals = next((r for r in envelope.records if isinstance(r, VitalsMessage)), None)
        if vitals is None or vitals.sent_at is None:
            return
        delay = (envelope.received_at - vitals.sent_at).total_seconds()
        skewed = delay < -self._skew_tolerance
        if not skewed:  # a clock far ahead says nothing about the delay
            self._metrics.mqtt_delivery_delay.observe(max(0.0, delay))
        self._units.backlog(vitals.unit_id, max(0.0, delay), skewed=skewed)

    async def _publish_watermarks(self, session: Session) -> None:
        while True:
            await self._watermark_changed.wait()
            self._watermark_changed.clear()
            changed = [
                (unit, seq)
                for unit, seq in self._watermarks.items()
                if self._published.get(unit) != seq or unit in self._stale
            ]
            # Taken now: an older value seen while these are in flight asks for one more round.
            self._stale.clear()
            # Concurrently, in bounded slices: one PUBACK round trip per slice, not per unit.
            for start in range(0, len(changed), PUBLISH_SLICE):
                part = changed[start : start + PUBLISH_SLICE]
                await asyncio.gather(
                    *(
                        session.publish(
                            f"units/{unit}/ack", json.dumps({"seq": seq}).encode(), retain=True
                        )
                        for unit, seq in part
                    )
                )
                for unit, seq in part:
                    self._published[unit] = seq

    def _on_ack_seen(self, message: Received) -> None:
        """Another replica's ack may be older than ours and have arrived last: restore ours.

        Two replicas commit a unit's batches one after the other (the unit row lock), so the
        later commit knows the higher watermark, but their PUBLISHes of the retained ack travel
        on different connections and can reach the broker in the other order. Watermarks only
        grow, so the highest known one wins after at most one more publish per live replica.
        """
        parts = message.topic.split("/")
        if len(parts) != 3 or parts[1] not in self._watermarks or not message.payload:
            return  # an empty retained payload is a deliberate clear: leave it
        try:
            body = json.loads(message.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        seen = body.get("seq") if isinstance(body, dict) else None
        if isinstance(seen, int) and seen < self._watermarks[parts[1]]:
            self._stale.add(parts[1])
            self._watermark_changed.set()

    def _on_status(self, message: Received) -> None:
        parts = message.topic.split("/")
        if len(parts) != 3:
            return
        try:
            unit = unit_from_topic(f"units/{parts[1]}/vitals")
            status = json.loads(message.payload.decode("utf-8")) if message.payload else {}
        except (InputError, UnicodeDecodeError, json.JSONDecodeError):
            return
        online = isinstance(status, dict) and status.get("online") is True
        self._units.online(unit, online)
        if online and not message.retain:
            self._units.seen(unit)


def _letter(source: str, exc: InputError, payload: bytes) -> DeadLetter:
    return DeadLetter(
        protocol=Protocol.MQTT, source=source, reason=exc.reason, detail=exc.detail, raw=payload
    )
