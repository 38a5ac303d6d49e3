"""Test support: `qantara serve` as a real subprocess, units that publish like real hubs, and the
database and broker readings the MQTT tests assert on.

- `GatewayProcess`: starts `python -m gateway.cli serve` with the given database, broker and
  client id (HTTP, MLLP and DICOM on port 0, DICOM files in a temp dir), keeps its log lines
  (bounded), parses the `listening http=` line, and offers `kill()` (SIGKILL), `terminate()`
  (SIGTERM, bounded wait), `start()` again (a restart with the same client id resumes the
  persistent MQTT session), `wait_ready()`, `readyz_status()` and `metrics()`. As an async
  context manager it always cleans up its process.
- `UnitPublisher`: a unit hub with an outbox of seqs 1..total. It publishes QoS 1 whatever is above
  the gateway's retained watermark (`units/{unit}/ack`): everything on a new connection, a seq
  again when `resend_after` seconds pass without the watermark covering it. Mosquitto keeps at
  most `max_queued_messages` for an offline session and drops the rest, so only this outbox makes
  "no loss" a property of the whole chain.
- `AckWatcher`: follows the retained watermarks of some units, with the history of values.
- `stored_counts()`: what the database holds for some units (ledger, vitals, watermarks).

Every wait is bounded; nothing here mocks anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiomqtt
import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.services_support import wait_until

_LISTENING_DICOM = re.compile(r"listening dicom=\S+:(\d+)")

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening http=(?P<host>\S+):(?P<port>\d+)\s*$")
LINE_LIMIT = 1 << 20  # bytes of one log line we accept from the child

# Samples per message built by `vitals_payload`: alias code, UCUM unit, value at seq 0.
SAMPLE_CODES: tuple[tuple[str, str, float], ...] = (
    ("hr", "/min", 72.0),
    ("spo2", "%", 97.0),
    ("temp", "Cel", 36.8),
    ("rr", "/min", 16.0),
)


class GatewayExited(RuntimeError):
    """The gateway process ended (or never said it was listening) when it should be running."""


def broker_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def new_unit_id(prefix: str = "T") -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


def new_client_id(prefix: str = "qantara-test") -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


# --- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """One scrape of `/metrics`, parsed by prometheus_client's own parser."""

    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> MetricsSnapshot:
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return cls(samples)

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def get(self, name: str, **labels: str) -> float:
        """The value of a series that must exist."""
        value = self.value(name, **labels)
        if value is None:
            raise AssertionError(f"no series {name}{labels} in /metrics")
        return value


# --- the gateway process ----------------------------------------------------------------------


class GatewayProcess:
    """`qantara serve` in a subprocess; see the module docstring."""

    def __init__(
        self,
        *,
        database_url: str,
        mqtt_url: str,
        client_id: str | None = None,
        env: Mapping[str, str] | None = None,
        # 90 s: once, on a VM whose fsyncs take 2 ms, a start stalled 30 s between the MQTT
        # session and the DICOM listener's bind (CI of 2026-11-28 23:52; cause not found).
        start_timeout: float = 90.0,
        stop_timeout: float = 30.0,
        max_log_lines: int = 20_000,
        https_ca: Path | None = None,
    ) -> None:
        """`https_ca`: the gateway's HTTP listener speaks TLS (`env` names its certificate),
        and this CA's certificate verifies it."""
        self.client_id = client_id or new_client_id()
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
        child_env.update(
            {
                "QANTARA_DATABASE_URL": database_url,
                "QANTARA_MQTT_URL": mqtt_url,
                "QANTARA_HTTP_PORT": "0",
                "QANTARA_MLLP_PORT": "0",  # the listeners this test does not use: free ports too
                "QANTARA_DICOM_PORT": "0",
                "QANTARA_MQTT_CLIENT_ID": self.client_id,
                "QANTARA_LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
            }
        )
        child_env.update(env or {})
        self._env = child_env
        self._https_ca = https_ca
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self.log_lines: deque[str] = deque(maxlen=max_log_lines)
        self.port: int | None = None
        self.starts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._scratch: Path | None = None  # DICOM storage of this gateway, removed by close()

    # lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise GatewayExited("the gateway is not listening")
        scheme = "http" if self._https_ca is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start the process and wait (bounded) for its `listening http=` line."""
        if self.running:
            raise RuntimeError("the gateway is already running")
        self.port = None
        if self._scratch is None and "QANTARA_DICOM_STORAGE" not in self._env:
            self._scratch = Path(tempfile.mkdtemp(prefix="qantara-gateway-"))
        env = dict(self._env)
        if self._scratch is not None:
            env["QANTARA_DICOM_STORAGE"] = str(self._scratch / "dicom")
        listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # a Ctrl-C at the terminal reaches pytest, not the gateway
            limit=LINE_LIMIT,
        )
        self._proc = proc
        self.starts += 1
        self._reader = asyncio.create_task(self._read(proc, listening), name="gateway log")
        try:
            async with asyncio.timeout(self._start_timeout):
                self.port = await listening
        except TimeoutError:
            listening.cancel()
            await self.kill()
            raise GatewayExited(
                f"no 'listening http=' line within {self._start_timeout} s\n{self.log_tail()}"
            ) from None
        except BaseException:
            listening.cancel()
            await self.kill()
            raise

    async def _read(self, proc: asyncio.subprocess.Process, listening: asyncio.Future[int]) -> None:
        stream = proc.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over LINE_LIMIT; the stream dropped it
                self.log_lines.append("<log line over the limit>")
                continue
            if not raw:
                break
            line = raw.decode("utf-8", errors="backslashreplace").rstrip("\n")
            self.log_lines.append(line)
            if not listening.done() and (match := LISTENING.search(line)):
                listening.set_result(int(match.group("port")))
        code = await proc.wait()
        if not listening.done():
            listening.set_exception(
                GatewayExited(f"the gateway exited with status {code}\n{self.log_tail()}")
            )

    async def _reaped(self) -> int | None:
        proc, reader = self._proc, self._reader
        code: int | None = None
        if proc is not None:
            async with asyncio.timeout(self._stop_timeout):
                code = await proc.wait()
        if reader is not None:
            async with asyncio.timeout(self._stop_timeout):
                await reader
        self._reader = None
        return code

    async def kill(self) -> None:
        """SIGKILL: no drain, no DISCONNECT, as a crash would."""
        if self._proc is None:
            return
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        await self._reaped()
        self.port = None

    async def terminate(self) -> int:
        """SIGTERM, then wait (bounded) for the drain and exit; returns the exit status."""
        if self._proc is None:
            raise RuntimeError("the gateway was never started")
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
        try:
            code = await self._reaped()
        except TimeoutError:
            await self.kill()
            raise AssertionError(
                f"the gateway did not stop within {self._stop_timeout} s of SIGTERM"
            ) from None
        self.port = None
        assert code is not None
        return code

    async def close(self) -> None:
        """Stop the process whatever its state (SIGTERM, then SIGKILL); never raises."""
        if self._proc is None:
            return
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                await self._reaped()
            except TimeoutError:
                await self.kill()
        else:
            with contextlib.suppress(TimeoutError):
                await self._reaped()
        self.port = None
        if self._scratch is not None:
            await asyncio.to_thread(shutil.rmtree, self._scratch, True)
            self._scratch = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # observation

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.log_lines)[-lines:])

    def dicom_port(self) -> int:
        """The DICOM listener's port, from the last start's `listening dicom=` line."""
        for line in reversed(self.log_lines):
            match = _LISTENING_DICOM.search(line)
            if match:
                return int(match.group(1))
        raise AssertionError("no 'listening dicom=' line")

    def log_lines_at(self, level: str) -> list[str]:
        """Log lines of one level (the format is `time LEVEL logger: message`)."""
        return [line for line in self.log_lines if f" {level} " in line]

    def log_excerpt(self, level: str, after: int = 40) -> str:
        """Each line of `level` with the `after` lines that follow it (its traceback)."""
        lines = list(self.log_lines)
        picked: list[str] = []
        for i, line in enumerate(lines):
            if f" {level} " in line:
                picked.extend(lines[i : i + 1 + after])
                picked.append("---")
        return "\n".join(picked)

    def _require_running(self) -> None:
        if not self.running:
            code = self._proc.returncode if self._proc is not None else None
            raise GatewayExited(f"the gateway is not running (status {code})\n{self.log_tail()}")

    async def get(self, path: str, timeout: float = 5.0) -> httpx.Response:  # noqa: ASYNC109
        self._require_running()
        verify: ssl.SSLContext | bool = True
        if self._https_ca is not None:
            verify = ssl.create_default_context(cafile=str(self._https_ca))
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, verify=verify
        ) as client:
            return await client.get(path)

    async def readyz_status(self) -> int | None:
        """The status of GET /readyz, or None when the request fails."""
        try:
            return (await self.get("/readyz", timeout=2.0)).status_code
        except httpx.HTTPError:
            return None

    async def wait_readyz(self, status: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        async def reached() -> bool:
            return await self.readyz_status() == status

        await wait_until(
            reached,
            timeout,
            interval=0.1,
            message=f"/readyz did not answer {status} within {timeout} s\n{self.log_tail()}",
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        await self.wait_readyz(200, timeout)

    async def metrics(self) -> MetricsSnapshot:
        response = await self.get("/metrics")
        response.raise_for_status()
        return MetricsSnapshot.parse(response.text)

    async def wait_metric(
        self,
        name: str,
        labels: Mapping[str, str],
        expected: float,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> None:
        async def reached() -> bool:
            try:
                snapshot = await self.metrics()
            except httpx.HTTPError:
                return False
            return snapshot.value(name, **labels) == expected

        await wait_until(
            reached,
            timeout,
            interval=0.1,
            message=f"{name}{dict(labels)} did not reach {expected} within {timeout} s",
        )


# --- payloads ---------------------------------------------------------------------------------


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def vitals_body(
    unit: str,
    seq: int,
    *,
    cin: str,
    base_time: datetime,
    samples: int = 3,
    device: str = "MON-1",
) -> dict[str, Any]:
    """A valid v1 payload (as a dict) with `samples` alias-coded samples at a time unique to
    (seq, code): so a duplicated vital row is visible as a repeated (device, concept, time)."""
    t = base_time + timedelta(seconds=seq)
    return {
        "v": 1,
        "seq": seq,
        "unit": unit,
        "sent_at": rfc3339(t),
        "device": {"id": device, "kind": "multiparameter-monitor"},
        "patient": {"system": "CIN", "value": cin},
        "samples": [
            {"t": rfc3339(t), "code": code, "value": base + (seq % 7), "unit": ucum}
            for code, ucum, base in SAMPLE_CODES[:samples]
        ],
    }


def encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def vitals_payload(
    unit: str,
    seq: int,
    *,
    cin: str,
    base_time: datetime,
    samples: int = 3,
    device: str = "MON-1",
) -> bytes:
    return encode(
        vitals_body(unit, seq, cin=cin, base_time=base_time, samples=samples, device=device)
    )


def parse_ack(payload: object) -> int | None:
    """The seq of a retained `{"seq": N}` watermark; None for an empty (cleared) payload."""
    if not isinstance(payload, bytes | bytearray) or not payload:
        return None
    body = json.loads(payload)
    seq = body.get("seq") if isinstance(body, dict) else None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


# --- broker helpers ---------------------------------------------------------------------------


async def clear_retained(mqtt_url: str, topics: Iterable[str]) -> None:
    """Publish an empty retained message on each topic (removes the retained value)."""
    topics = list(topics)
    if not topics:
        return
    host, port = broker_address(mqtt_url)
    async with asyncio.timeout(15):
        async with aiomqtt.Client(host, port, identifier=new_client_id("clear")) as client:
            for topic in topics:
                await client.publish(topic, b"", qos=1, retain=True)


async def read_retained(mqtt_url: str, topic: str, wait: float = 1.0) -> bytes | None:
    """The retained payload of a topic as a new subscriber sees it; None if none within `wait`."""
    host, port = broker_address(mqtt_url)
    async with aiomqtt.Client(host, port, identifier=new_client_id("reader")) as client:
        await client.subscribe(topic, qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                async for message in client.messages:
                    if message.retain and isinstance(message.payload, bytes):
                        return message.payload
    return None


class AckWatcher:
    """Follows `units/{unit}/ack` of the given units: latest seq and every value received."""

    def __init__(self, mqtt_url: str, units: Iterable[str]) -> None:
        self._mqtt_url = mqtt_url
        self.units = list(units)
        self.latest: dict[str, int] = {}
        self.history: list[tuple[float, str, int]] = []  # (monotonic time, unit, seq)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._follow(), name="ack watcher")
        async with asyncio.timeout(15):
            await self._subscribed.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        host, port = broker_address(self._mqtt_url)
        wanted = set(self.units)
        while True:  # survives a broker restart
            try:
                async with aiomqtt.Client(
                    host, port, identifier=new_client_id("acks"), timeout=10
                ) as client:
                    for unit in self.units:
                        await client.subscribe(f"units/{unit}/ack", qos=1)
                    self._subscribed.set()
                    async for message in client.messages:
                        unit = message.topic.value.split("/")[1]
                        seq = parse_ack(message.payload)
                        if unit in wanted and seq is not None:
                            self.history.append((time.monotonic(), unit, seq))
                            self.latest[unit] = max(seq, self.latest.get(unit, 0))
                            self._changed.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.5)

    def seq(self, unit: str) -> int:
        return self.latest.get(unit, 0)

    async def wait_for(self, unit: str, seq: int, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        await wait_until(
            lambda: self.seq(unit) >= seq,
            timeout,
            message=f"ack of {unit} stayed at {self.seq(unit)}, expected {seq}",
        )


# --- units that publish -----------------------------------------------------------------------


@dataclass(slots=True)
class PublisherStats:
    unit: str
    total: int
    first_sends: int = 0
    resends: int = 0
    connects: int = 0
    watermark: int = 0
    finished_at: float | None = None


class UnitPublisher:
    """One unit hub publishing seqs 1..total from an outbox (see the module docstring).

    `rate` (messages per second) paces generation; None generates everything at once, and the
    unit then publishes as fast as the broker acknowledges, `max_inflight` at a time.
    """

    def __init__(
        self,
        unit: str,
        mqtt_url: str,
        total: int,
        *,
        cin: str | None = None,
        samples: int = 3,
        rate: float | None = None,
        max_inflight: int = 100,
        resend_after: float = 20.0,
        base_time: datetime | None = None,
    ) -> None:
        self.unit = unit
        self.total = total
        self.cin = cin or f"TC{secrets.token_hex(4).upper()}"
        self.samples = samples
        self._host, self._port = broker_address(mqtt_url)
        self._rate = rate
        self._max_inflight = max_inflight
        self._resend_after = resend_after
        self._base_time = base_time or (datetime.now(UTC) - timedelta(hours=2))
        self._topic = f"units/{unit}/vitals"
        self._ack_topic = f"units/{unit}/ack"
        self._started: float | None = None
        self._cursor = 1  # next seq to send on this connection
        self._highest_sent = 0
        self._last_sent: dict[int, float] = {}
        self._resend_queue: deque[tuple[float, int]] = deque()
        self._wake = asyncio.Event()
        self.stats = PublisherStats(unit, total)

    @property
    def watermark(self) -> int:
        return self.stats.watermark

    @property
    def done(self) -> bool:
        return self.stats.watermark >= self.total

    def payload(self, seq: int) -> bytes:
        return vitals_payload(
            self.unit, seq, cin=self.cin, base_time=self._base_time, samples=self.samples
        )

    def _generated(self, now: float) -> int:
        if self._rate is None or self._started is None:
            return self.total
        return min(self.total, int((now - self._started) * self._rate) + 1)

    async def run(self) -> None:
        """Publish until the gateway's watermark covers every seq; reconnect on any link loss."""
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        backoff = 0.2
        while not self.done:
            try:
                await self._connection()
                backoff = 0.2
            except* (aiomqtt.MqttError, OSError):
                pass
            if self.done:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        self.stats.finished_at = loop.time()

    async def _connection(self) -> None:
        client = aiomqtt.Client(
            self._host,
            self._port,
            identifier=new_client_id(f"unit-{self.unit}"),
            protocol=aiomqtt.ProtocolVersion.V5,
            max_inflight_messages=self._max_inflight,
            keepalive=30,
            timeout=10,
        )
        client.pending_calls_threshold = self._max_inflight + 10
        async with client:
            self.stats.connects += 1
            await client.subscribe(self._ack_topic, qos=1)
            # A new connection replays everything above the watermark, in seq order.
            self._cursor = self.watermark + 1
            self._last_sent.clear()
            self._resend_queue.clear()
            async with asyncio.TaskGroup() as group:
                acks = group.create_task(self._follow_acks(client))
                await self._send(client, group)
                acks.cancel()

    async def _follow_acks(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            seq = parse_ack(message.payload)
            if seq is not None and seq > self.stats.watermark:
                self.stats.watermark = seq
                self._wake.set()

    async def _send(self, client: aiomqtt.Client, group: asyncio.TaskGroup) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._max_inflight)
        inflight: set[int] = set()
        while not self.done:
            self._wake.clear()
            now = loop.time()
            while self._resend_queue and self._resend_queue[0][0] + self._resend_after <= now:
                sent, seq = self._resend_queue.popleft()
                if seq <= self.watermark or seq in inflight or self._last_sent.get(seq) != sent:
                    continue
                await slots.acquire()
                self._launch(client, group, seq, slots, inflight)
            self._cursor = max(self._cursor, self.watermark + 1)
            generated = self._generated(now)
            while self._cursor <= generated and not self.done:
                await slots.acquire()
                seq = self._cursor
                self._cursor += 1
                if seq > self.watermark and seq not in inflight:
                    self._launch(client, group, seq, slots, inflight)
                else:
                    slots.release()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05 if self._cursor <= self.total else 0.5):
                    await self._wake.wait()

    def _launch(
        self,
        client: aiomqtt.Client,
        group: asyncio.TaskGroup,
        seq: int,
        slots: asyncio.Semaphore,
        inflight: set[int],
    ) -> None:
        sent = asyncio.get_running_loop().time()
        inflight.add(seq)
        self._last_sent[seq] = sent
        self._resend_queue.append((sent, seq))
        if seq <= self._highest_sent:
            self.stats.resends += 1
        else:
            self.stats.first_sends += 1
            self._highest_sent = seq
        group.create_task(self._publish(client, seq, slots, inflight))

    async def _publish(
        self, client: aiomqtt.Client, seq: int, slots: asyncio.Semaphore, inflight: set[int]
    ) -> None:
        try:
            await client.publish(self._topic, self.payload(seq), qos=1, timeout=30)
        except aiomqtt.MqttError:
            pass  # stays in the outbox: replayed on the next connection or after resend_after
        finally:
            inflight.discard(seq)
            slots.release()
            self._wake.set()


@dataclass(frozen=True, slots=True)
class FleetReport:
    units: int
    messages: int
    first_sends: int
    resends: int
    connects: int
    elapsed_s: float

    def summary(self) -> str:
        return (
            f"units={self.units} messages={self.messages} first_sends={self.first_sends}"
            f" resends={self.resends} connects={self.connects} elapsed={self.elapsed_s:.1f}s"
        )


@dataclass
class Fleet:
    """Several `UnitPublisher`s run as one background task; `wait()` bounds their drain."""

    publishers: list[UnitPublisher]
    started: float = 0.0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def units(self) -> list[str]:
        return [p.unit for p in self.publishers]

    @property
    def messages(self) -> int:
        return sum(p.total for p in self.publishers)

    @property
    def samples(self) -> int:
        return sum(p.total * p.samples for p in self.publishers)

    def acked(self) -> int:
        return sum(min(p.watermark, p.total) for p in self.publishers)

    def start(self) -> None:
        self.started = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="fleet")

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for publisher in self.publishers:
                group.create_task(publisher.run(), name=f"unit {publisher.unit}")

    async def wait(self, timeout: float) -> FleetReport:  # noqa: ASYNC109
        """Wait until every unit's outbox is covered by the watermark; AssertionError if not."""
        assert self._task is not None
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            pending = {p.unit: p.total - p.watermark for p in self.publishers if not p.done}
            raise AssertionError(
                f"units not drained within {timeout} s; unacknowledged per unit: {pending}"
            ) from None
        return self.report()

    def report(self) -> FleetReport:
        return FleetReport(
            units=len(self.publishers),
            messages=self.messages,
            first_sends=sum(p.stats.first_sends for p in self.publishers),
            resends=sum(p.stats.resends for p in self.publishers),
            connects=sum(p.stats.connects for p in self.publishers),
            elapsed_s=time.monotonic() - self.started,
        )

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@contextlib.asynccontextmanager
async def running_fleet(publishers: list[UnitPublisher]) -> AsyncIterator[Fleet]:
    fleet = Fleet(publishers)
    fleet.start()
    try:
        yield fleet
    finally:
        await fleet.close()


# --- what the database holds ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredCounts:
    """Ledger rows, vital rows and watermarks of some units."""

    ledger: dict[str, int]  # unit -> rows in mqtt_message
    ledger_seqs_in_range: dict[str, int]  # unit -> distinct seqs within 1..total
    vitals: int  # rows in vital
    distinct_vitals: int  # distinct (device, concept, time): each sample once
    watermarks: dict[str, int]  # unit -> unit.ack_seq

    @property
    def messages(self) -> int:
        return sum(self.ledger.values())

    def lost(self, expected_per_unit: Mapping[str, int]) -> int:
        return sum(
            expected - self.ledger_seqs_in_range.get(unit, 0)
            for unit, expected in expected_per_unit.items()
        )

    @property
    def duplicate_vitals(self) -> int:
        return self.vitals - self.distinct_vitals


async def stored_counts(conn: asyncpg.Connection, totals: Mapping[str, int]) -> StoredCounts:
    units = list(totals)
    rows = await conn.fetch(
        """SELECT u.name, u.ack_seq,
                  count(m.seq) AS ledger,
                  count(DISTINCT m.seq) FILTER (
                      WHERE m.seq BETWEEN 1 AND (t.total)) AS in_range
           FROM unit u
           JOIN unnest($1::text[], $2::bigint[]) AS t(name, total) USING (name)
           LEFT JOIN mqtt_message m ON m.unit_id = u.id
           GROUP BY u.name, u.ack_seq""",
        units,
        [totals[u] for u in units],
    )
    vitals = await conn.fetchrow(
        """SELECT count(*) AS rows,
                  count(DISTINCT (v.device_id, v.concept_id, v.time)) AS distinct_rows
           FROM vital v JOIN device d ON d.id = v.device_id JOIN unit u ON u.id = d.unit_id
           WHERE u.name = ANY($1::text[])""",
        units,
    )
    assert vitals is not None
    return StoredCounts(
        ledger={r["name"]: r["ledger"] for r in rows},
        ledger_seqs_in_range={r["name"]: r["in_range"] for r in rows},
        vitals=vitals["rows"],
        distinct_vitals=vitals["distinct_rows"],
        watermarks={r["name"]: r["ack_seq"] for r in rows},
    )


async def ledger_total(conn: asyncpg.Connection, units: Iterable[str]) -> int:
    count = await conn.fetchval(
        """SELECT count(*) FROM mqtt_message m JOIN unit u ON u.id = m.unit_id
           WHERE u.name = ANY($1::text[])""",
        list(units),
    )
    return int(count)


# --- listeners --------------------------------------------------------------------------------


def listening_port(gateway: GatewayProcess, listener: str) -> int:
    """The port a running gateway logged for `listener` (`http`, `mllp`, `dicom`)."""
    pattern = re.compile(rf"listening {re.escape(listener)}=\S+:(\d+)")
    for line in reversed(gateway.log_lines):
        match = pattern.search(line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"no 'listening {listener}=' line in the gateway's log")


async def wait_listening(
    gateway: GatewayProcess,
    listener: str,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> int:
    """Wait (bounded) for the gateway's `listening {listener}=` line; its port."""
    needle = f"listening {listener}="
    await wait_until(
        lambda: any(needle in line for line in gateway.log_lines),
        timeout,
        message=f"no {needle!r} line within {timeout} s\n{gateway.log_tail()}",
    )
    return listening_port(gateway, listener)
