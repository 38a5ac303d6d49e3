"""The one place that owns the MQTT session and paho's manual acknowledgement.

aiomqtt 2.5 lets paho send PUBACK as soon as a PUBLISH is read, before anything is durable, and
drops messages from a full queue after they were acknowledged. Here paho's manual ack is switched
on before CONNECT and the PUBACK of a message is sent by `ack()` only after its envelope is
committed. The incoming queue is left unbounded on purpose: the broker never has more than
Receive Maximum (MQTT 5) or its max_inflight_messages (3.1.1) unacknowledged messages in flight to
us, so that bound is the real one and nothing is ever dropped after an acknowledgement.

A message carries the generation of the connection it came on: a packet id is only meaningful on
its own connection, so acknowledgements for a connection that has since dropped are skipped (the
broker redelivers those messages on the new one and they are acknowledged as duplicates then).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MqttError = aiomqtt.MqttError


@dataclass(frozen=True, slots=True)
class MqttSettings:
    url: str
    client_id: str
    shared_group: str | None
    max_payload: int
    receive_maximum: int
    session_expiry: int
    protocol: int  # 5 or 4 (3.1.1)
    username: str | None
    password: str | None
    ca_file: str | None
    max_future: timedelta
    max_past: timedelta
    unit_metrics_max: int

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def vitals_subscription(self) -> str:
        topic = "units/+/vitals"
        return f"$share/{self.shared_group}/{topic}" if self.shared_group else topic


@dataclass(frozen=True, slots=True)
class Received:
    """One PUBLISH from the broker, detached from aiomqtt's types."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int


class Session:
    """A connected MQTT session with acknowledgements under our control."""

    def __init__(self, client: aiomqtt.Client, generation: int) -> None:
        self._client = client
        self.generation = generation
        self._open = True

    async def subscribe(self, topic: str) -> None:
        await self._client.subscribe(topic, qos=1)

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        await self._client.publish(topic, payload, qos=1, retain=retain)

    async def messages(self) -> AsyncIterator[Received]:
        async for message in self._client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes) else str(payload or "").encode()
            yield Received(
                topic=message.topic.value,
                payload=data,
                qos=message.qos,
                retain=message.retain,
                mid=message.mid,
                generation=self.generation,
            )

    def ack(self, message: Received) -> bool:
        """Send the PUBACK of a message now; False when its connection is gone."""
        if not self._open or message.generation != self.generation or message.qos == 0:
            return False
        self._client._client.ack(message.mid, message.qos)
        return True

    def close(self) -> None:
        self._open = False


@asynccontextmanager
async def connect(settings: MqttSettings, generation: int) -> AsyncIterator[Session]:
    """Connect with a persistent session (fixed client id, clean start off, session expiry)."""
    properties: Properties | None = None
    protocol = (
        aiomqtt.ProtocolVersion.V5 if settings.protocol == 5 else aiomqtt.ProtocolVersion.V311
    )
    if settings.protocol == 5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = settings.session_expiry
        properties.ReceiveMaximum = settings.receive_maximum
    tls_context: ssl.SSLContext | None = None
    if settings.tls:
        tls_context = ssl.create_default_context(cafile=settings.ca_file)
    client = aiomqtt.Client(
        settings.host,
        settings.port,
        identifier=settings.client_id,
        username=settings.username,
        password=settings.password,
        protocol=protocol,
        clean_session=False if settings.protocol != 5 else None,
        clean_start=False,
        properties=properties,
        keepalive=30,
        timeout=10,
        tls_context=tls_context,
        max_queued_incoming_messages=0,  # unbounded: the broker's in-flight window bounds it
    )
    client._client.manual_ack_set(True)
    async with client:
        session = Session(client, generation)
        try:
            yield session
        finally:
            session.close()
