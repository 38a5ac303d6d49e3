"""MQTT ingest benchmark: the gateway against a bare aiomqtt subscriber, in one run.

Figures (see bench/README.md for what each one means):

1. Reference: a bare aiomqtt subscriber (MQTT 5, persistent session, QoS 1, Receive Maximum
   65535) drains a backlog of N messages from the broker and json-decodes each: N / elapsed.
2. Gateway backlog drain: `qantara serve` (a subprocess) creates its persistent session and
   stops; the same N payloads (on fresh unit ids) are queued in the broker; the gateway starts
   again and we time until `SELECT count(*) FROM mqtt_message` for those units reaches N
   (committed and countable). Its RSS is sampled every 100 ms (/proc) and VmHWM read at the end.
   Ratio = gateway rate / reference rate.
3. Steady state: the gateway online, paced publishers send `--rate` msg/s for
   `--steady-seconds`; latency received -> committed from the gateway's histogram
   (`qantara_ingest_latency_seconds{protocol="mqtt"}`, delta over the phase) and, end to end,
   publish -> the retained `units/{unit}/ack` watermark covering that seq (an upper bound: it
   adds two broker hops and the watermark publication).

A private mosquitto (known queue limits) and a fresh database (`qantara_bench_<hex>`, dropped at
the end) are used unless `--mqtt-url` / `--keep-database` say otherwise. Every wait is bounded;
every process started here is stopped. It prints figures; it asserts nothing.

    .venv/bin/python bench/mqtt_ingest.py [--messages 50000] [--rate 1000] [--steady-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import aiomqtt
import asyncpg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from proc_stats import proc_cpu_seconds, proc_status_kib, system_cpu
from prometheus_client.parser import text_string_to_metric_families

from gateway.local_services import PrivateMosquitto, drop_database, ensure_database
from simulators.population import Population, plan_fleet
from simulators.vitals import (
    Device,
    DeviceKind,
    PatientVitals,
    Reading,
    Sample,
    encode_payload,
    equip_unit,
)

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening http=(?P<host>\S+):(?P<port>\d+)\s*$")
DEFAULT_SERVER_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
RSS_INTERVAL = 0.1
COUNT_INTERVAL = 0.05
MONITOR_CODES = ("hr", "spo2", "rr", "sbp", "dbp")
LATENCY_METRIC = "qantara_ingest_latency_seconds"

# Goals of the issue.
GOAL_RATIO = 0.7
GOAL_P99_S = 0.100
GOAL_RSS_MB = 250.0


# aiomqtt warns "There are N pending publish calls" beyond 10: that is the point here.
_QUIET = logging.getLogger("bench.mqtt")
_QUIET.setLevel(logging.ERROR)


class BenchError(RuntimeError):
    """The benchmark could not run to the end (a timeout, a process that died)."""


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- the message stream ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    unit: str
    seq: int
    topic: str
    payload: bytes


@dataclass(slots=True)
class _UnitState:
    monitor_id: str
    panel: list[str]  # CINs of the patients this unit sees
    vitals: list[PatientVitals]
    current: int = 0


class PayloadFactory:
    """Realistic v1 payloads: a hub batching its multiparameter monitor's readings.

    Each message carries `samples` samples (hr, spo2, rr, sbp, dbp, one round per second, the
    newest last), for the unit's current patient; a unit moves to the next patient of its panel
    every 30 messages. Payloads depend only on (unit index, seq, time), so the reference and the
    gateway get byte-identical payloads (only the unit id in the topic differs).
    """

    def __init__(self, units: int, samples: int, seed: int) -> None:
        self._rng = random.Random(seed)
        self._samples = samples
        today = datetime.now(UTC).date()
        population = Population(today)
        self._states: list[_UnitState] = []
        for deployment in plan_fleet(units, prefix=""):
            devices = {d.kind: d for d in equip_unit(self._rng)}
            panel = population.panel(self._rng, deployment.province, 8)
            self._states.append(
                _UnitState(
                    monitor_id=devices[DeviceKind.MONITOR].id,
                    panel=[p.cin for p in panel],
                    vitals=[PatientVitals(p, self._rng, today) for p in panel],
                )
            )
        self.unit_suffixes = [d.unit_id for d in plan_fleet(units, prefix="")]

    def payload(self, unit_index: int, seq: int, sent_at: datetime) -> bytes:
        state = self._states[unit_index]
        if seq > 1 and (seq - 1) % 30 == 0:
            state.current = (state.current + 1) % len(state.panel)
        vitals = state.vitals[state.current]
        rounds = math.ceil(self._samples / len(MONITOR_CODES))
        samples: list[Sample] = []
        for r in range(rounds):
            vitals.step(1.0)
            t = sent_at - timedelta(seconds=rounds - r, milliseconds=self._rng.randint(50, 900))
            samples.extend(vitals.sample(code, t) for code in MONITOR_CODES)
        reading = Reading(
            device=Device(id=state.monitor_id, kind=DeviceKind.MONITOR),
            patient_cin=state.panel[state.current],
            samples=tuple(samples[: self._samples]),
        )
        return encode_payload(seq, sent_at, reading)


def build_bodies(
    factory: PayloadFactory, per_unit: int, start: datetime, spacing: float
) -> list[list[bytes]]:
    """bodies[unit_index][seq - 1]; message seq of a unit is sent at start + seq * spacing."""
    units = len(factory.unit_suffixes)
    bodies: list[list[bytes]] = [[] for _ in range(units)]
    for seq in range(1, per_unit + 1):
        sent_at = start + timedelta(seconds=seq * spacing)
        for u in range(units):
            bodies[u].append(factory.payload(u, seq, sent_at))
    return bodies


def stream(prefix: str, factory: PayloadFactory, bodies: list[list[bytes]]) -> list[Message]:
    """The messages in fleet order (seq-major: every unit's seq 1, then every unit's seq 2...)."""
    names = [f"{prefix}{suffix}" for suffix in factory.unit_suffixes]
    per_unit = len(bodies[0])
    return [
        Message(names[u], seq, f"units/{names[u]}/vitals", bodies[u][seq - 1])
        for seq in range(1, per_unit + 1)
        for u in range(len(names))
    ]


# --- MQTT helpers ---------------------------------------------------------------------------------


def broker_host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def mqtt_client(
    url: str,
    identifier: str,
    *,
    persistent: bool = False,
    receive_maximum: int = 65535,
    session_expiry: int = 3600,
    max_inflight: int = 1000,
) -> aiomqtt.Client:
    host, port = broker_host_port(url)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.ReceiveMaximum = receive_maximum
    properties.SessionExpiryInterval = session_expiry if persistent else 0
    return aiomqtt.Client(
        host,
        port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=not persistent,
        properties=properties,
        keepalive=30,
        timeout=30,
        max_inflight_messages=max_inflight,
        max_queued_incoming_messages=0,
        logger=_QUIET,
    )


async def drop_session(url: str, identifier: str) -> None:
    """Connect with clean start and session expiry 0: the broker forgets the session."""
    async with asyncio.timeout(15), mqtt_client(url, identifier, persistent=False):
        pass


async def publish_backlog(
    url: str, messages: Sequence[Message], clients: int, inflight: int, time_limit: float
) -> float:
    """Publish QoS 1 from `clients` connections (a unit always on the same one), each with up to
    `inflight` unacknowledged; returns once the broker acknowledged all. Returns seconds."""
    groups: dict[int, list[Message]] = {}
    units: dict[str, int] = {}
    for m in messages:
        index = units.setdefault(m.unit, len(units) % clients)
        groups.setdefault(index, []).append(m)

    async def one(group: list[Message]) -> None:
        async with mqtt_client(url, f"bench-pub-{secrets.token_hex(4)}") as client:
            window = asyncio.Semaphore(inflight)
            async with asyncio.TaskGroup() as tasks:
                for m in group:
                    await window.acquire()
                    task = tasks.create_task(client.publish(m.topic, m.payload, qos=1))
                    task.add_done_callback(lambda _: window.release())

    started = time.perf_counter()
    async with asyncio.timeout(time_limit), asyncio.TaskGroup() as tasks:
        for group in groups.values():
            tasks.create_task(one(group))
    return time.perf_counter() - started


# --- /proc readings -------------------------------------------------------------------------------


@dataclass(slots=True)
class CpuWindow:
    """Machine CPU use (in cores) and one process's CPU between `start()` and `stop()`."""

    pid: int | None = None
    _sys: tuple[float, float] = (0.0, 0.0)
    _proc: float | None = None
    _t: float = 0.0
    machine_cores: float = 0.0
    process_cores: float | None = None

    def start(self) -> None:
        self._sys = system_cpu()
        self._proc = proc_cpu_seconds(self.pid) if self.pid else None
        self._t = time.perf_counter()

    def stop(self) -> None:
        busy, total = system_cpu()
        cores = os.cpu_count() or 1
        if total > self._sys[1]:
            self.machine_cores = (busy - self._sys[0]) / (total - self._sys[1]) * cores
        elapsed = time.perf_counter() - self._t
        if self.pid and self._proc is not None and elapsed > 0:
            now = proc_cpu_seconds(self.pid)
            if now is not None:
                self.process_cores = (now - self._proc) / elapsed


class RssSampler:
    """VmRSS of a process every 100 ms, in a task; `peak_mib` is the largest sample."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            rss = proc_status_kib(self.pid, "VmRSS")
            if rss is None:
                return
            self.samples.append(rss)
            await asyncio.sleep(RSS_INTERVAL)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def peak_mib(self) -> float:
        return max(self.samples, default=0) / 1024


# --- the gateway as a subprocess ------------------------------------------------------------------


async def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:  # noqa: ASYNC109
    """A minimal HTTP/1.0 GET (the server closes the connection after the response)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


COMPLAINT = re.compile(r"(?:WARNING|ERROR|CRITICAL) \S+: .*")
MASKED = re.compile(r"[0-9a-fA-F]{6,}|\d+(?:\.\d+)?|(?<=unit )\S+")


class GatewayProcess:
    """`python -m gateway.cli serve` with our environment; stderr kept (bounded) and parsed."""

    def __init__(self, env: dict[str, str], argv: Sequence[str] | None = None) -> None:
        self._env = env
        self._argv = list(argv) if argv else [sys.executable, "-m", "gateway.cli", "serve"]
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.lines: deque[str] = deque(maxlen=200)
        # WARNING and ERROR lines of the whole run, by logger and message with numbers and
        # names masked: what an operator's log would fill with.
        self.complaints: Counter[str] = Counter()
        self.host = "127.0.0.1"
        self.port = 0
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BenchError("gateway not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, time_limit: float = 60.0) -> None:
        listening: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self.lines.clear()
        self.started_at = time.perf_counter()
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=self._env,
            cwd=ROOT,
            start_new_session=True,
            limit=1 << 20,
        )
        self._reader = asyncio.create_task(self._read(self._proc, listening))
        log(f"gateway started, pid {self._proc.pid}")
        try:
            async with asyncio.timeout(time_limit):
                self.host, self.port = await listening
        except TimeoutError:
            raise BenchError(
                f"gateway did not listen within {time_limit} s\n{self.tail()}"
            ) from None

    async def _read(
        self, proc: asyncio.subprocess.Process, listening: asyncio.Future[tuple[str, int]]
    ) -> None:
        assert proc.stderr is not None  # noqa: S101 - stderr=PIPE
        while True:
            try:
                raw = await proc.stderr.readline()
            except ValueError:  # a line over the limit: skip it
                continue
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if complaint := COMPLAINT.search(line):
                self.complaints[MASKED.sub("N", complaint[0])] += 1
            match = LISTENING.search(line)
            if match and not listening.done():
                host = match["host"] if match["host"] not in ("0.0.0.0", "") else "127.0.0.1"  # noqa: S104
                listening.set_result((host, int(match["port"])))
        if not listening.done():
            listening.set_exception(BenchError(f"gateway exited early\n{self.tail()}"))

    def tail(self, lines: int = 30) -> str:
        return "\n".join(list(self.lines)[-lines:])

    async def wait_ready(self, time_limit: float = 60.0) -> None:
        """Until /readyz answers 200 (database, MQTT and HTTP all up)."""
        try:
            async with asyncio.timeout(time_limit):
                while True:
                    if not self.running:
                        raise BenchError(f"gateway exited\n{self.tail()}")
                    with contextlib.suppress(OSError, TimeoutError, ValueError, IndexError):
                        status, _ = await http_get(self.host, self.port, "/readyz", 2.0)
                        if status == 200:
                            return
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise BenchError(f"gateway not ready within {time_limit} s\n{self.tail()}") from None

    async def metrics(self) -> str:
        status, body = await http_get(self.host, self.port, "/metrics", 10.0)
        if status != 200:
            raise BenchError(f"/metrics answered {status}")
        return body.decode()

    async def terminate(self, grace: float = 45.0) -> int | None:
        """SIGTERM (the gateway drains its pipeline), then SIGKILL after `grace` s."""
        proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    await proc.wait()
            except TimeoutError:
                log(f"gateway pid {proc.pid} ignored SIGTERM for {grace:.0f} s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, BenchError):
                async with asyncio.timeout(5):
                    await self._reader
            self._reader = None
        self._proc = None
        return proc.returncode


# --- statistics -----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in 0..1)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


Buckets = list[tuple[float, float]]  # (upper bound, cumulative count), sorted, last +Inf


def latency_buckets(metrics_text: str) -> Buckets:
    """The cumulative buckets of qantara_ingest_latency_seconds{protocol="mqtt"}."""
    buckets: Buckets = []
    for family in text_string_to_metric_families(metrics_text):
        if family.name != LATENCY_METRIC:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("protocol") == "mqtt":
                buckets.append((float(sample.labels["le"]), float(sample.value)))
    return sorted(buckets)


def sum_count(metrics_text: str, name: str) -> tuple[float, float]:
    """(_sum, _count) of an unlabelled histogram."""
    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name == name:
            for sample in family.samples:
                if sample.name == name + "_sum":
                    total = float(sample.value)
                elif sample.name == name + "_count":
                    count = float(sample.value)
    return total, count


@dataclass(frozen=True, slots=True)
class Batches:
    """Commits between two scrapes: how many, envelopes per batch, seconds per commit."""

    commits: float
    mean_envelopes: float
    mean_commit_s: float

    @classmethod
    def between(cls, before: str, after: str) -> Batches:
        env0, n0 = sum_count(before, "qantara_db_batch_envelopes")
        env1, n1 = sum_count(after, "qantara_db_batch_envelopes")
        sec0, c0 = sum_count(before, "qantara_db_commit_seconds")
        sec1, c1 = sum_count(after, "qantara_db_commit_seconds")
        commits = n1 - n0
        return cls(
            commits=commits,
            mean_envelopes=(env1 - env0) / commits if commits else math.nan,
            mean_commit_s=(sec1 - sec0) / (c1 - c0) if c1 > c0 else math.nan,
        )

    def describe(self) -> str:
        return (
            f"{self.commits:.0f} commits, {self.mean_envelopes:.0f} envelopes/batch, "
            f"{fmt_ms(self.mean_commit_s)}/commit"
        )


def bucket_delta(after: Buckets, before: Buckets) -> Buckets:
    previous = dict(before)
    return [(le, count - previous.get(le, 0.0)) for le, count in after]


def histogram_quantile(q: float, buckets: Buckets) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the largest finite bucket: its bound
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def share_below(bound: float, buckets: Buckets) -> float:
    """Fraction of observations <= bound (bound must be a bucket boundary)."""
    total = buckets[-1][1] if buckets else 0.0
    for le, count in buckets:
        if math.isclose(le, bound):
            return count / total if total else math.nan
    return math.nan


# --- phases ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        log(f"{name}: {value}")

    def print(self) -> None:
        width = max(len(name) for name, _ in self.rows)
        print()
        print("MQTT ingest benchmark")
        print("=" * (width + 30))
        for name, value in self.rows:
            print(f"{name.ljust(width)}  {value}")


@dataclass(slots=True)
class RefResult:
    rate: float
    rate_with_connect: float
    elapsed: float


async def run_reference(
    url: str, messages: Sequence[Message], args: argparse.Namespace
) -> RefResult:
    """Bare aiomqtt subscriber: session first, then the backlog, then drain + json.loads."""
    client_id = f"bench-ref-{secrets.token_hex(4)}"
    async with asyncio.timeout(15), mqtt_client(url, client_id, persistent=True) as client:
        await client.subscribe("units/+/vitals", qos=1)
    took = await publish_backlog(url, messages, args.publishers, args.inflight, args.timeout)
    log(f"reference: {len(messages)} messages queued in the broker in {took:.1f} s")
    n = len(messages)
    count = 0
    decoded_samples = 0
    first = 0.0
    connect_at = time.perf_counter()
    try:
        async with (
            asyncio.timeout(args.timeout),
            mqtt_client(url, client_id, persistent=True) as client,
        ):
            async for message in client.messages:
                if count == 0:
                    first = time.perf_counter()
                payload = message.payload
                assert isinstance(payload, bytes)  # noqa: S101 - aiomqtt gives bytes for binary
                body = json.loads(payload)
                decoded_samples += len(body["samples"])
                count += 1
                if count >= n:
                    break
    except TimeoutError:
        raise BenchError(f"reference received {count}/{n} in {args.timeout} s") from None
    done = time.perf_counter()
    await drop_session(url, client_id)
    return RefResult(
        rate=n / (done - first), rate_with_connect=n / (done - connect_at), elapsed=done - first
    )


@dataclass(slots=True)
class DrainResult:
    rate: float
    rate_from_start: float
    elapsed: float
    startup: float
    peak_rss_mib: float
    hwm_mib: float
    vitals: int
    cpu: CpuWindow
    batches: Batches


async def count_ledger(conn: asyncpg.Connection, prefix: str) -> int:
    return int(
        await conn.fetchval(
            """SELECT count(*) FROM mqtt_message m JOIN unit u ON u.id = m.unit_id
               WHERE u.name LIKE $1""",
            prefix + "%",
        )
    )


async def run_drain(
    gateway: GatewayProcess,
    conn: asyncpg.Connection,
    url: str,
    messages: Sequence[Message],
    prefix: str,
    args: argparse.Namespace,
) -> DrainResult:
    """Gateway session first, then the backlog while it is away, then start and time it."""
    await gateway.start()
    await gateway.wait_ready()
    await gateway.terminate()
    took = await publish_backlog(url, messages, args.publishers, args.inflight, args.timeout)
    log(f"gateway: {len(messages)} messages queued in the broker in {took:.1f} s")
    n = len(messages)
    await gateway.start()
    spawned_at = gateway.started_at
    rss = RssSampler(gateway.pid)
    rss.start()
    cpu = CpuWindow(pid=gateway.pid)
    cpu.start()
    counted = 0
    try:
        async with asyncio.timeout(args.timeout):
            while counted < n:
                if not gateway.running:
                    raise BenchError(
                        f"gateway exited ({gateway.returncode}) during the drain\n{gateway.tail()}"
                    )
                counted = await count_ledger(conn, prefix)
                if counted < n:
                    await asyncio.sleep(COUNT_INTERVAL)
    except TimeoutError:
        raise BenchError(f"gateway committed {counted}/{n} in {args.timeout} s") from None
    done_wall = time.time()
    done = time.perf_counter()
    cpu.stop()
    await rss.stop()
    hwm = proc_status_kib(gateway.pid, "VmHWM") or 0
    batches = Batches.between("", await gateway.metrics())
    row = await conn.fetchrow(
        """SELECT min(m.received_at) AS first, sum(m.samples) AS samples
           FROM mqtt_message m JOIN unit u ON u.id = m.unit_id WHERE u.name LIKE $1""",
        prefix + "%",
    )
    assert row is not None  # noqa: S101 - an aggregate always returns a row
    first_received: datetime = row["first"]
    elapsed = done_wall - first_received.timestamp()
    vitals = int(
        await conn.fetchval(
            """SELECT count(*) FROM vital v JOIN device d ON d.id = v.device_id
               JOIN unit u ON u.id = d.unit_id WHERE u.name LIKE $1""",
            prefix + "%",
        )
    )
    return DrainResult(
        rate=n / elapsed,
        rate_from_start=n / (done - spawned_at),
        elapsed=elapsed,
        startup=(done - spawned_at) - elapsed,
        peak_rss_mib=rss.peak_mib,
        hwm_mib=hwm / 1024,
        vitals=vitals,
        cpu=cpu,
        batches=batches,
    )


class AckWatch:
    """Publish times of (unit, seq) and the retained watermarks that cover them."""

    def __init__(self, units: Sequence[str], per_unit: int) -> None:
        self.published: dict[str, list[float]] = {u: [math.nan] * (per_unit + 1) for u in units}
        self.covered: dict[str, int] = dict.fromkeys(units, 0)
        self.latencies: list[float] = []
        self.per_unit = per_unit
        self.all_covered = asyncio.Event()
        self._remaining = len(units)

    def on_ack(self, unit: str, seq: int, now: float) -> None:
        times = self.published.get(unit)
        if times is None:
            return
        seq = min(seq, self.per_unit)
        for s in range(self.covered[unit] + 1, seq + 1):
            if not math.isnan(times[s]):
                self.latencies.append(now - times[s])
        if seq > self.covered[unit]:
            if seq == self.per_unit:
                self._remaining -= 1
                if self._remaining == 0:
                    self.all_covered.set()
            self.covered[unit] = seq

    async def follow(self, url: str, subscribed: asyncio.Event) -> None:
        async with mqtt_client(url, f"bench-acks-{secrets.token_hex(4)}") as client:
            await client.subscribe("units/+/ack", qos=0)
            subscribed.set()
            async for message in client.messages:
                now = time.perf_counter()
                parts = message.topic.value.split("/")
                payload = message.payload
                if len(parts) != 3 or not isinstance(payload, bytes):
                    continue
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    self.on_ack(parts[1], int(json.loads(payload)["seq"]), now)


@dataclass(slots=True)
class SteadyResult:
    published: int
    achieved_rate: float
    max_lag: float
    e2e: list[float]
    missing: int
    hist: Buckets
    db_wait: list[float]
    committed: int
    rss_end_mib: float
    cpu: CpuWindow
    batches: Batches


async def paced_publisher(
    url: str,
    schedule: Sequence[tuple[float, Message]],
    t0: float,
    watch: AckWatch,
    inflight: int,
) -> tuple[float, float]:
    """Publish each message at t0 + offset; returns (time of the last publish, max lag)."""
    max_lag = 0.0
    last = t0
    async with mqtt_client(url, f"bench-steady-{secrets.token_hex(4)}") as client:
        window = asyncio.Semaphore(inflight)
        async with asyncio.TaskGroup() as tasks:
            for offset, m in schedule:
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await window.acquire()
                now = time.perf_counter()
                max_lag = max(max_lag, now - (t0 + offset))
                watch.published[m.unit][m.seq] = now
                task = tasks.create_task(client.publish(m.topic, m.payload, qos=1))
                task.add_done_callback(lambda _: window.release())
                last = now
    return last, max_lag


async def run_steady(
    gateway: GatewayProcess,
    conn: asyncpg.Connection,
    url: str,
    factory: PayloadFactory,
    prefix: str,
    args: argparse.Namespace,
) -> SteadyResult:
    units = len(factory.unit_suffixes)
    per_unit = max(1, round(args.rate * args.steady_seconds / units))
    spacing = units / args.rate  # seconds between two messages of one unit
    lead = 3.0
    bodies = build_bodies(factory, per_unit, datetime.now(UTC) + timedelta(seconds=lead), spacing)
    messages = stream(prefix, factory, bodies)
    watch = AckWatch([m.unit for m in messages[:units]], per_unit)
    schedules: list[list[tuple[float, Message]]] = [[] for _ in range(args.publishers)]
    for k, m in enumerate(messages):
        schedules[(k % units) % args.publishers].append((k / args.rate, m))

    before_text = await gateway.metrics()
    before = latency_buckets(before_text)
    subscribed = asyncio.Event()
    follower = asyncio.create_task(watch.follow(url, subscribed))
    try:
        async with asyncio.timeout(15):
            await subscribed.wait()
        cpu = CpuWindow(pid=gateway.pid)
        cpu.start()
        t0 = time.perf_counter() + 0.5
        async with asyncio.timeout(args.steady_seconds * 3 + args.timeout):
            results = await asyncio.gather(
                *(paced_publisher(url, s, t0, watch, args.inflight) for s in schedules if s)
            )
        cpu.stop()
        last = max(r[0] for r in results)
        max_lag = max(r[1] for r in results)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await watch.all_covered.wait()
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await follower
    after_text = await gateway.metrics()
    after = latency_buckets(after_text)
    waits = await conn.fetch(
        """SELECT extract(epoch FROM m.committed_at - m.received_at)::float8 AS wait
           FROM mqtt_message m JOIN unit u ON u.id = m.unit_id WHERE u.name LIKE $1""",
        prefix + "%",
    )
    return SteadyResult(
        published=len(messages),
        achieved_rate=(len(messages) - 1) / (last - t0) if last > t0 else math.nan,
        max_lag=max_lag,
        e2e=sorted(watch.latencies),
        missing=len(messages) - len(watch.latencies),
        hist=bucket_delta(after, before),
        db_wait=sorted(max(0.0, r["wait"]) for r in waits),
        committed=len(waits),
        rss_end_mib=(proc_status_kib(gateway.pid, "VmRSS") or 0) / 1024,
        cpu=cpu,
        batches=Batches.between(before_text, after_text),
    )


# --- main -----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def broker(args: argparse.Namespace) -> AsyncIterator[str]:
    if args.mqtt_url:
        log(f"using the broker at {args.mqtt_url} (its queue limits must hold the backlog)")
        yield args.mqtt_url
        return
    mosquitto = PrivateMosquitto(
        max_queued_messages=max(200_000, 2 * args.messages), max_inflight_messages=0
    )
    try:
        await mosquitto.start()
        log(f"private mosquitto at {mosquitto.url}")
        yield mosquitto.url
    finally:
        await mosquitto.cleanup()


def gateway_env(
    database_url: str, mqtt_url: str, client_id: str, scratch: Path, extra: Sequence[str] = ()
) -> dict[str, str]:
    """The gateway's environment: ours without QANTARA_*, then the bench's settings (every
    listener on a free port, DICOM files in a scratch dir), then `--gateway-env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
    env.update(
        QANTARA_DATABASE_URL=database_url,
        QANTARA_MQTT_URL=mqtt_url,
        QANTARA_HTTP_PORT="0",
        QANTARA_MLLP_PORT="0",
        QANTARA_DICOM_PORT="0",
        QANTARA_DICOM_STORAGE=str(scratch / "dicom"),
        QANTARA_MQTT_CLIENT_ID=client_id,
        QANTARA_MQTT_SESSION_EXPIRY="1h",
        QANTARA_LOG_LEVEL="INFO",
    )
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def fmt_ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


async def bench(args: argparse.Namespace) -> int:
    report = Report()
    run_id = secrets.token_hex(3)
    units = args.units
    per_unit = max(1, args.messages // units)
    n = per_unit * units
    report.add("date / machine", f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs")
    log(f"building {n} payloads ({units} units x {per_unit} seqs, {args.samples} samples each)")
    factory = PayloadFactory(units, args.samples, args.seed)
    bodies = build_bodies(factory, per_unit, datetime.now(UTC) - timedelta(hours=1), 2.0)
    sizes = [len(b) for unit in bodies for b in unit]
    report.add(
        "stream",
        f"{n} messages, {units} units x {per_unit} seqs, {args.samples} samples/message, "
        f"payload mean {sum(sizes) / len(sizes):.0f} B",
    )

    dbname = f"qantara_bench_{secrets.token_hex(4)}"
    database_url = await ensure_database(args.database_url, dbname)
    log(f"database {dbname}")
    gateway: GatewayProcess | None = None
    conn: asyncpg.Connection | None = None
    scratch = Path(tempfile.mkdtemp(prefix="qantara-bench-"))
    verdicts: list[tuple[str, bool]] = []
    try:
        async with broker(args) as url:
            # 1. reference
            ref = await run_reference(url, stream(f"R{run_id}-", factory, bodies), args)
            report.add("reference: bare aiomqtt + json.loads", f"{ref.rate:,.0f} msg/s")
            report.add(
                "reference: incl. connect",
                f"{ref.rate_with_connect:,.0f} msg/s, {ref.elapsed:.2f} s first->last",
            )

            # 2. gateway backlog drain
            conn = await asyncpg.connect(database_url, timeout=10)
            gateway = GatewayProcess(
                gateway_env(
                    database_url, url, f"qantara-bench-{run_id}", scratch, args.gateway_env
                ),
                shlex.split(args.gateway_cmd) if args.gateway_cmd else None,
            )
            prefix = f"G{run_id}-"
            drain = await run_drain(
                gateway, conn, url, stream(prefix, factory, bodies), prefix, args
            )
            ratio = drain.rate / ref.rate
            report.add(
                "gateway: backlog drain (committed)",
                f"{drain.rate:,.0f} msg/s, {drain.elapsed:.2f} s first received->{n} counted",
            )
            report.add(
                "gateway: incl. process start",
                f"{drain.rate_from_start:,.0f} msg/s ({drain.startup:.2f} s start-up)",
            )
            report.add("gateway: vitals rows committed", f"{drain.vitals:,}")
            report.add("gateway: commits during drain", drain.batches.describe())
            report.add("ratio gateway / reference", f"{ratio:.2f} (goal >= {GOAL_RATIO})")
            report.add(
                "gateway: peak RSS during drain",
                f"{drain.peak_rss_mib:.0f} MiB sampled / {drain.hwm_mib:.0f} MiB VmHWM "
                f"(goal < {GOAL_RSS_MB:.0f} MB)",
            )
            report.add(
                "CPU during drain",
                f"gateway {drain.cpu.process_cores or 0:.2f} cores, "
                f"machine {drain.cpu.machine_cores:.2f} of {os.cpu_count()}",
            )
            peak_mb = max(drain.peak_rss_mib, drain.hwm_mib) * 1.048576
            verdicts.append((f"ratio {ratio:.2f} >= {GOAL_RATIO}", ratio >= GOAL_RATIO))
            verdicts.append(
                (f"peak RSS {peak_mb:.0f} MB < {GOAL_RSS_MB:.0f} MB", peak_mb < GOAL_RSS_MB)
            )

            # 3. steady state
            if args.steady_seconds > 0:
                steady = await run_steady(gateway, conn, url, factory, f"S{run_id}-", args)
                report.add(
                    "steady: offered load",
                    f"{steady.published} messages at {steady.achieved_rate:,.0f} msg/s achieved "
                    f"(target {args.rate:,.0f}), max publisher lag {fmt_ms(steady.max_lag)}",
                )
                report.add("steady: committed", f"{steady.committed}/{steady.published}")
                report.add("steady: commits", steady.batches.describe())
                h = steady.hist
                report.add(
                    "steady: received->committed (histogram)",
                    f"p50 {fmt_ms(histogram_quantile(0.5, h))}, "
                    f"p95 {fmt_ms(histogram_quantile(0.95, h))}, "
                    f"p99 {fmt_ms(histogram_quantile(0.99, h))}; "
                    f"{share_below(0.1, h) * 100:.2f}% <= 100 ms "
                    f"({h[-1][1] if h else 0:.0f} observations)",
                )
                e = steady.e2e
                report.add(
                    "steady: publish->ack watermark (e2e)",
                    f"p50 {fmt_ms(percentile(e, 0.5))}, p95 {fmt_ms(percentile(e, 0.95))}, "
                    f"p99 {fmt_ms(percentile(e, 0.99))}, max {fmt_ms(e[-1] if e else math.nan)}"
                    + (f"; {steady.missing} not covered" if steady.missing else ""),
                )
                w = steady.db_wait
                report.add(
                    "steady: received->txn start (db)",
                    f"p50 {fmt_ms(percentile(w, 0.5))}, p95 {fmt_ms(percentile(w, 0.95))}, "
                    f"p99 {fmt_ms(percentile(w, 0.99))}",
                )
                report.add(
                    "CPU during steady",
                    f"gateway {steady.cpu.process_cores or 0:.2f} cores, "
                    f"machine {steady.cpu.machine_cores:.2f} of {os.cpu_count()}; "
                    f"gateway RSS at end {steady.rss_end_mib:.0f} MiB",
                )
                p99 = histogram_quantile(0.99, h)
                verdicts.append(
                    (
                        f"p99 received->committed {fmt_ms(p99)} < {GOAL_P99_S * 1000:.0f} ms"
                        f" (histogram; e2e upper bound {fmt_ms(percentile(e, 0.99))})",
                        p99 < GOAL_P99_S,
                    )
                )
            code = await gateway.terminate()
            if code not in (0, None):
                log(f"gateway exited with {code}\n{gateway.tail()}")
    finally:
        if gateway is not None and gateway.running:
            await gateway.terminate()
        if conn is not None:
            await conn.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if args.keep_database:
            log(f"kept database {dbname}: {database_url}")
        else:
            await drop_database(args.database_url, dbname)
    report.print()
    print()
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="MQTT ingest: the gateway against a bare aiomqtt subscriber, same run."
    )
    parser.add_argument("--messages", type=int, default=50_000, help="backlog size (50000)")
    parser.add_argument("--units", type=int, default=100, help="units in every stream (100)")
    parser.add_argument("--samples", type=int, default=10, help="samples per message (10)")
    parser.add_argument("--rate", type=float, default=1000.0, help="steady msg/s (1000)")
    parser.add_argument(
        "--steady-seconds", type=float, default=20.0, help="steady phase length, 0 skips (20)"
    )
    parser.add_argument("--publishers", type=int, default=4, help="publishing MQTT connections (4)")
    parser.add_argument(
        "--inflight", type=int, default=500, help="unacknowledged publishes per connection (500)"
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_SERVER_DSN,
        help="PostgreSQL server on which a fresh qantara_bench_<hex> database is created "
        f"and dropped ({DEFAULT_SERVER_DSN})",
    )
    parser.add_argument(
        "--mqtt-url",
        help="use this broker instead of a private mosquitto (its max_queued_messages must "
        "exceed --messages)",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="QANTARA_X=VALUE",
        help="extra environment of the gateway, e.g. QANTARA_MQTT_RECEIVE_MAXIMUM=10000",
    )
    parser.add_argument(
        "--gateway-cmd",
        metavar="COMMAND",
        help="run the gateway with this command line instead of "
        "'<this python> -m gateway.cli serve' (profilers, wrappers)",
    )
    parser.add_argument("--keep-database", action="store_true", help="do not drop the database")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="bound of each phase, seconds (300)"
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed of the payloads")
    args = parser.parse_args(argv)
    if any(not item.startswith("QANTARA_") or "=" not in item for item in args.gateway_env):
        parser.error("--gateway-env takes QANTARA_NAME=VALUE")
    if args.messages < args.units or args.units < 1 or args.rate <= 0 or args.publishers < 1:
        parser.error("need --units >= 1, --messages >= --units, --rate > 0, --publishers >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(bench(args))
    except BenchError as exc:
        print(f"mqtt_ingest: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
