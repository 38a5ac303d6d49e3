"""The one place that owns the MQTT session and paho's manual acknowledgement.

aiomqtt 2.5 lets paho send PUBACK as soon as a PUBLISH is read, before anything is durable, and
drops messages from a full queue after they were acknowledged. Here paho's manual ack is switched
on before CONNECT and the PUBACK of a message is sent by `ack()` only after its envelope is
committed. aiomqtt's incoming queue is left unbounded (a bounded one drops messages) and the
bound is ours instead: once `window` messages are read and not yet acknowledged, the session stops
reading the socket, and reads again when half of them are acknowledged. TCP then keeps the rest
in the broker. Receive Maximum (MQTT 5) alone is not enough: Mosquitto 2.0 was measured sending
a new full window after each manual PUBACK, which grew the gateway's memory by the backlog.
While reading is paused past the keep-alive, paho drops the connection; the broker then
redelivers what was not acknowledged, and it is acknowledged as duplicate once committed.

A message carries the generation of the connection it came on: a packet id is only meaningful on
its own connection, so acknowledgements for a connection that has since dropped are skipped (the
broker redelivers those messages on the new one and they are acknowledged as duplicates then).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Final
from urllib.parse import urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest.errors import ConfigError
from ingest.tls import load_failure

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


class ConnectionLossIsInfo(logging.Filter):
    """paho logs a connection the broker dropped at ERROR (`failed to receive on socket: [Errno
    104] Connection reset by peer`); the MQTT task says it at WARNING and reconnects
    (`ingest.mqtt`). Such a line stays, at INFO; paho's other errors (an exception in a
    callback) keep their level."""

    CONNECTION_LOSS: Final = ("failed to receive on socket: %s", "timeout on socket: %s")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.CONNECTION_LOSS and record.levelno > logging.INFO:
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


_PAHO_LOG: Final = logging.getLogger(f"{__name__}.paho")
_PAHO_LOG.addFilter(ConnectionLossIsInfo())

PUBLISH_SLICE: Final = 256
"""The most PUBLISHes a caller has in flight at once (the watermarks of a fleet back in coverage,
`ingest.mqtt`): one PUBACK round trip per slice, not per unit."""


class _FlowControlledClient(aiomqtt.Client):
    """aiomqtt's client, with socket reading paused while too many messages await their ack.

    `_on_socket_open` repeats aiomqtt 2.5's own (a reader calling paho's `loop_read`) but keeps
    the reader so that it can be removed and added again.
    """

    def __init__(self, *args: object, window: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._window = window
        self._resume_below = max(1, window // 2)
        self._unacked = 0
        self._reader: Callable[[], None] | None = None
        self._fd = -1
        self._paused = False

    def _on_socket_open(self, client: paho.Client, userdata: object, sock: object) -> None:
        def read() -> None:
            try:
                while True:
                    client.loop_read()
                    pending = getattr(client._sock, "pending", None)  # TLS-buffered bytes
                    if pending is not None and pending() > 0 and not self._paused:
                        continue
                    break
            except Exception as exc:  # noqa: BLE001 - as aiomqtt: a read error ends the session
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            self._reader = read
            self._fd = sock.fileno()  # type: ignore[attr-defined]
            self._paused = False
            self._loop.add_reader(self._fd, read)
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(register)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        super()._on_message(client, userdata, message)
        if message.qos > 0:
            self._unacked += 1
            if self._unacked >= self._window and not self._paused and self._fd >= 0:
                self._paused = True
                self._loop.remove_reader(self._fd)

    def settled(self) -> None:
        """One message read earlier was acknowledged or given up: maybe read again."""
        self._unacked = max(0, self._unacked - 1)
        if self._paused and self._unacked <= self._resume_below and self._reader is not None:
            self._paused = False
            if self._client.socket() is not None:
                self._loop.add_reader(self._fd, self._reader)


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

    def __init__(self, client: _FlowControlledClient, generation: int) -> None:
        self._client = client
        self.generation = generation
        self._open = True

    async def subscribe(self, topic: str) -> None:
        await self._client.subscribe(topic, qos=1)
        _raise_if_cancelling()

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        await self._client.publish(topic, payload, qos=1, retain=retain)
        _raise_if_cancelling()

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
        self._client.settled()
        return True

    def release(self, message: Received) -> None:
        """A message that will not be acknowledged on this connection (the broker redelivers)."""
        if self._open and message.generation == self.generation and message.qos > 0:
            self._client.settled()

    def close(self) -> None:
        self._open = False


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """The context of `mqtts://`: the broker's certificate checked against `ca_file`, or the
    system's CAs without it. Raises ConfigError when the file cannot be loaded."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(f"QANTARA_MQTT_CA_FILE: cannot be loaded ({load_failure(exc)})") from exc


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
        tls_context = client_context(settings.ca_file)
    client = _FlowControlledClient(
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
        max_queued_incoming_messages=0,  # unbounded: the read pause is the bound (see above)
        logger=_PAHO_LOG,
        window=settings.receive_maximum,
    )
    client._client.manual_ack_set(True)
    # aiomqtt logs a warning for each call beyond 10 pending: a slice of publishes is by design.
    client.pending_calls_threshold = PUBLISH_SLICE + 10
    async with client:
        session = Session(client, generation)
        try:
            yield session
        finally:
            session.close()


def _raise_if_cancelling() -> None:
    """Raise the cancellation an aiomqtt call swallowed. aiomqtt waits for a SUBACK or PUBACK
    with `asyncio.wait_for`, which on Python 3.11 drops a cancel that arrives as the answer
    does (fixed in 3.12): the MQTT task then waited for its reader forever, and a gateway
    stopping at start (a listener's port in use) hung instead of exiting."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
