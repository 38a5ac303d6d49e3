"""One connected mobile medical unit: the hub's MQTT client, its outbox and its vitals stream.

Offline first. Readings go into the outbox whether or not the link is up. While connected, the
unit publishes (QoS 1, at most `max_inflight` awaiting PUBACK) every outbox entry in seq order.
The gateway's contiguous commit watermark arrives on the retained `units/{id}/ack` topic and
prunes the outbox. A new connection replays everything above the watermark in seq order.

Resends on a live link: when the watermark has not moved for `resend_after` seconds and some
entry sent at least that long ago is still above it (a message the broker dropped, or one a dead
gateway replica's session held), every entry sent `resend_after` or more seconds ago is published
again, in seq order. A gateway that is slow but making progress gets no resends (they would only
add to its backlog), and a dead one gets them at a doubling interval (capped), not in a storm.

A flaky link is simulated by shutting the socket down under the client: no DISCONNECT packet,
so the broker publishes the will (`{"online":false}`, retained, on `units/{id}/status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import aiomqtt

from ingest.mqtt_session import ConnectionLossIsInfo
from simulators.outbox import Outbox
from simulators.vitals import ConsultationStream, encode_payload, utc_now

__all__ = ["BrokerAddress", "LinkPolicy", "UnitAgent", "UnitStats"]

log = logging.getLogger(__name__)
_MQTT_LOG = logging.getLogger(f"{__name__}.mqtt")
_MQTT_LOG.addFilter(ConnectionLossIsInfo())  # the link drops we cause are not errors

ONLINE = b'{"online":true}'
OFFLINE = b'{"online":false}'

_PROTOCOLS = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5

    @classmethod
    def parse(cls, url: str, protocol: str = "5") -> BrokerAddress:
        """`mqtt://[user[:password]@]host[:port]`, or `mqtts://` for TLS (default port 8883)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"unsupported MQTT URL scheme: {parts.scheme!r}")
        if protocol not in _PROTOCOLS:
            raise ValueError(f"unsupported MQTT protocol version: {protocol!r}")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            protocol=_PROTOCOLS[protocol],
        )


@dataclass(frozen=True, slots=True)
class LinkPolicy:
    """How a unit uses its link. Times in seconds."""

    resend_after: float = 10.0  # resend what the watermark has not covered for this long
    max_resend_doublings: int = 4  # a dead gateway gets resends at 10, 20, 40, 80, 160, 160 s...
    max_inflight: int = 100
    flaky: float = 0.0  # probability per second that the link drops
    outage_min: float = 1.0
    outage_max: float = 20.0
    publish_timeout: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 15.0
    keepalive: int = 30


@dataclass(frozen=True, slots=True)
class UnitStats:
    unit_id: str
    generated: int  # new messages created during this run
    published: int  # publishes the broker acknowledged, resends included
    resent: int  # of which resends (replay after reconnect, or resend_after expired)
    acked: int  # messages of this run covered by the gateway's watermark
    pending: int  # messages still in the outbox
    watermark: int
    connects: int
    link_drops: int  # simulated (flaky) drops
    connection_failures: int  # failed connects and lost connections
    online: bool


class _Stopped(Exception):
    """Raised inside a session's task group to end it cleanly."""


class UnitAgent:
    """A unit hub: generates readings at `rate` per second for `duration` seconds into its
    outbox, and keeps forwarding the outbox to the broker until told to stop."""

    def __init__(
        self,
        unit_id: str,
        *,
        broker: BrokerAddress,
        outbox: Outbox,
        stream: ConsultationStream,
        rate: float,
        duration: float,
        policy: LinkPolicy,
        rng: random.Random,
    ) -> None:
        self.unit_id = unit_id
        self._broker = broker
        self._outbox = outbox
        self._stream = stream
        self._rate = rate
        self._duration = duration
        self._policy = policy
        self._rng = rng
        self._vitals_topic = f"units/{unit_id}/vitals"
        self._status_topic = f"units/{unit_id}/status"
        self._ack_topic = f"units/{unit_id}/ack"
        self.generation_done = asyncio.Event()
        self.drained = asyncio.Event()
        self._wake = asyncio.Event()
        self._first_seq = outbox.next_seq
        self._last_seq = self._first_seq - 1
        self._watermark = outbox.watermark
        self._highest_sent = 0
        self._last_progress = 0.0  # loop time the watermark last moved (or the link came up)
        self._stalls = 0  # resend rounds since the watermark last moved
        self._outage_until = 0.0
        self._online = False
        self._generated = 0
        self._published = 0
        self._resent = 0
        self._connects = 0
        self._link_drops = 0
        self._connection_failures = 0

    @property
    def online(self) -> bool:
        return self._online

    def stats(self) -> UnitStats:
        covered = min(self._watermark, self._last_seq) - self._first_seq + 1
        return UnitStats(
            unit_id=self.unit_id,
            generated=self._generated,
            published=self._published,
            resent=self._resent,
            acked=max(covered, 0),
            pending=self._outbox.pending(),
            watermark=self._watermark,
            connects=self._connects,
            link_drops=self._link_drops,
            connection_failures=self._connection_failures,
            online=self._online,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Generate for `duration`, forward until `stop` is set."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._generate())
            tg.create_task(self._keep_link(stop))

    # generation

    async def _generate(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + self._duration
        if self._rate > 0:
            first = start + self._rng.uniform(0, 1 / self._rate)  # spread units over a period
            count = 0
            while (due := first + count / self._rate) < end:
                # absolute schedule: no drift; if late, catch up without sleeping (but yield)
                await asyncio.sleep(max(due - loop.time(), 0))
                self._generate_one()
                count += 1
        self.generation_done.set()
        self._check_drained()

    def _generate_one(self) -> None:
        now = utc_now()
        reading = self._stream.next_reading(now)
        self._last_seq = self._outbox.append(
            lambda seq: encode_payload(seq, now, reading), now.timestamp()
        )
        self._generated += 1
        self._wake.set()

    def _check_drained(self) -> None:
        if self.generation_done.is_set() and self._outbox.pending() == 0:
            self.drained.set()

    # link

    async def _keep_link(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        policy = self._policy
        failures = 0
        while not stop.is_set():
            outage = self._outage_until - loop.time()
            if outage > 0:
                await _wait_or_timeout(stop, outage)
                continue
            connected = await self._session(stop)
            if stop.is_set():
                break
            if self._outage_until > loop.time():
                failures = 0  # simulated drop: the outage is the wait
                continue
            self._connection_failures += 1
            failures = 0 if connected else failures + 1
            delay = min(policy.backoff_max, policy.backoff_initial * 2**failures)
            await _wait_or_timeout(stop, delay * self._rng.uniform(0.5, 1.0))

    def _client(self) -> aiomqtt.Client:
        broker = self._broker
        client = aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=f"unit-{self.unit_id}",
            protocol=broker.protocol,
            username=broker.username,
            password=broker.password,
            tls_context=ssl.create_default_context() if broker.tls else None,
            will=aiomqtt.Will(self._status_topic, OFFLINE, qos=1, retain=True),
            keepalive=self._policy.keepalive,
            max_inflight_messages=self._policy.max_inflight,
            timeout=10,
            logger=_MQTT_LOG,  # paho's own messages ("failed to receive on socket" on a drop)
        )
        # we bound in-flight publishes ourselves; do not log a warning for each of them
        client.pending_calls_threshold = self._policy.max_inflight + 10
        return client

    async def _session(self, stop: asyncio.Event) -> bool:
        """One connection, until it breaks or `stop` is set. Returns whether it connected."""
        client = self._client()
        connected = False
        try:
            async with client:
                connected = True
                self._online = True
                self._connects += 1
                log.info("unit %s connected", self.unit_id)
                await client.subscribe(self._ack_topic, qos=1)
                await client.publish(self._status_topic, ONLINE, qos=1, retain=True)
                self._outbox.reset_sent()  # whatever was in flight on the last link is replayed
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._receive_acks(client))
                        tg.create_task(self._send(client, tg))
                        if self._policy.flaky > 0:
                            tg.create_task(self._break_link_now_and_then(client))
                        tg.create_task(_raise_when_set(stop))
                except* _Stopped:
                    await client.publish(self._status_topic, OFFLINE, qos=1, retain=True)
        except* (aiomqtt.MqttError, OSError) as group:
            log.info("unit %s link lost: %s", self.unit_id, _first_error(group))
        finally:
            self._online = False
        return connected

    async def _receive_acks(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if message.topic.matches(self._ack_topic):
                self._on_ack(message.payload)

    def _on_ack(self, payload: object) -> None:
        if not isinstance(payload, bytes | bytearray) or not payload:
            return  # an empty retained payload clears the topic
        try:
            body = json.loads(payload)
        except ValueError:
            log.warning("unit %s: unreadable ack ignored", self.unit_id)
            return
        seq = body.get("seq") if isinstance(body, dict) else None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            log.warning("unit %s: ack without a valid seq ignored", self.unit_id)
            return
        if seq <= self._watermark:
            return
        self._outbox.prune(seq)
        self._watermark = seq
        self._last_progress = asyncio.get_running_loop().time()
        self._stalls = 0
        self._wake.set()
        self._check_drained()

    async def _send(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        policy = self._policy
        loop = asyncio.get_running_loop()
        inflight: set[int] = set()
        tick = max(0.05, min(1.0, policy.resend_after / 4))
        self._last_progress = loop.time()
        self._stalls = 0
        resend_cutoff: float | None = None  # resend what was last sent at or before this
        while True:
            self._wake.clear()
            if loop.time() - self._last_progress >= self._stall_after():
                # the watermark has not moved for a while: if something sent long enough ago is
                # still not covered (dropped by the broker, held by a dead gateway replica),
                # resend it. A gateway that is slow but moving gets no resends to choke on.
                cutoff = time.time() - policy.resend_after
                oldest = self._outbox.oldest_sent()
                if oldest is not None and oldest <= cutoff:
                    resend_cutoff = cutoff
                    self._stalls += 1
                self._last_progress = loop.time()
            free = policy.max_inflight - len(inflight)
            if free > 0:
                candidates = self._outbox.due(resend_cutoff, limit=free + len(inflight))
                due = [(seq, payload) for seq, payload in candidates if seq not in inflight][:free]
                if due:
                    self._outbox.mark_sent([seq for seq, _ in due], time.time())
                    for seq, payload in due:
                        # tasks start in creation order and hand the message to paho before
                        # their first await: the wire order is seq order
                        inflight.add(seq)
                        resend = seq <= self._highest_sent
                        self._highest_sent = max(self._highest_sent, seq)
                        tg.create_task(self._publish(client, seq, payload, inflight, resend))
                    await asyncio.sleep(0)
                    continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()

    def _stall_after(self) -> float:
        """`resend_after`, doubled for each resend round that brought no progress (capped)."""
        policy = self._policy
        return policy.resend_after * (1 << min(self._stalls, policy.max_resend_doublings))

    async def _publish(
        self,
        client: aiomqtt.Client,
        seq: int,
        payload: bytes,
        inflight: set[int],
        resend: bool,
    ) -> None:
        try:
            await client.publish(
                self._vitals_topic, payload, qos=1, timeout=self._policy.publish_timeout
            )
        except aiomqtt.MqttError as exc:
            # stays in the outbox, resent after resend_after (or on the next connection)
            log.debug("unit %s: publish of seq %d failed: %s", self.unit_id, seq, exc)
        else:
            self._published += 1
            if resend:
                self._resent += 1
        finally:
            inflight.discard(seq)
            self._wake.set()

    async def _break_link_now_and_then(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        policy = self._policy
        while True:
            await asyncio.sleep(1.0)
            if self._rng.random() < policy.flaky:
                outage = self._rng.uniform(policy.outage_min, policy.outage_max)
                self._outage_until = loop.time() + outage
                self._link_drops += 1
                log.info("unit %s: link drops for %.1f s", self.unit_id, outage)
                _abort_connection(client)
                return  # the client notices the dead socket and ends the session


def _abort_connection(client: aiomqtt.Client) -> None:
    """Kill the TCP connection under paho, as a lost radio link would: no DISCONNECT packet."""
    sock = client._client.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


async def _raise_when_set(stop: asyncio.Event) -> None:
    await stop.wait()
    raise _Stopped


async def _wait_or_timeout(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _first_error(group: BaseExceptionGroup[BaseException]) -> str:
    leaves = list(_leaves(group))
    return str(leaves[0]) if leaves else str(group)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
