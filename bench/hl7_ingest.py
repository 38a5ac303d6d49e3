"""HL7 ingest benchmark: ORU^R01 (10 OBX) over MLLP, end to end, against parse-only references.

What it measures, in one run on this machine:

1. end to end: `qantara serve` (a subprocess, its own fresh database) receives ORU^R01 with 10
   OBX each over 4 concurrent connections with pipelining (up to `--window` messages in flight
   per connection); the rate counts a message once its AA is back, i.e. once committed;
2. latency: message → AA at a steady 200 msg/s (4 connections), p50/p99;
3. references, parse only, on the same messages: python-hl7 (`hl7.parse`) in a virtual
   environment of its own under /tmp (our package is named `hl7` too, so it runs in a
   subprocess of that environment, created here with `python -m venv` and `pip install hl7`),
   hl7apy (`parse_message`, which validates as it builds its tree) and our own tokenizer.

It also prints the CPU time per message of the gateway and of its PostgreSQL backends during
the throughput run, the share of the machine that was busy (other work on a shared machine moves
the wall-clock rates of both sides), and python-hl7's CPU time per message beside it.

Run: `.venv/bin/python bench/hl7_ingest.py [--messages 20000]`. Database: the server named by
`QANTARA_BENCH_DATABASE_URL` (default postgresql://postgres@127.0.0.1:5432/postgres); a database
is created for the run and dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proc_stats import proc_cpu_seconds, system_cpu  # noqa: E402

from gateway.local_services import drop_database, ensure_database, free_port  # noqa: E402
from hl7.er7 import parse_message  # noqa: E402
from simulators.lab import CHARSET_CODECS, LabConfig, build_oru, population  # noqa: E402

START, END = b"\x0b", b"\x1c\x0d"
REFERENCE_VENV = Path("/tmp/qantara-bench-hl7")
LISTENING = re.compile(r"listening mllp=\S+:(\d+)")
REFERENCE_SCRIPT = """
import json, sys, time
import hl7
texts = json.load(open(sys.argv[1], encoding="utf-8"))
for t in texts[:200]:
    hl7.parse(t)
best = 0.0
cpu = float("inf")
for _ in range(3):
    started, cpu_started = time.perf_counter(), time.process_time()
    for t in texts:
        hl7.parse(t)
    best = max(best, len(texts) / (time.perf_counter() - started))
    cpu = min(cpu, (time.process_time() - cpu_started) / len(texts))
print(json.dumps({"rate": best, "cpu": cpu, "version": getattr(hl7, "__version__", "?")}))
"""


def make_messages(count: int, seed: int) -> list[bytes]:
    """ORU^R01 CBC panels (10 OBX), Arabic/French/Latin names in their charsets."""
    config = LabConfig(seed=seed, control_prefix=f"B{secrets.token_hex(3)}-")
    people = population(seed, 2000)
    rng = random.Random(seed)
    return [build_oru(i * 3, people[rng.randrange(len(people))], config, rng) for i in range(count)]


def texts_of(messages: list[bytes]) -> list[str]:
    return [m.decode(CHARSET_CODECS[parse_message(m).encoding.charset]) for m in messages]


def reference_python_hl7(texts: list[str]) -> tuple[float, float, str]:
    """python-hl7's best parse rate (msg/s), its CPU seconds per message, its version."""
    python = REFERENCE_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(REFERENCE_VENV)], check=True)
    probe = subprocess.run(  # from /tmp: our checkout's `hl7` package would answer the import
        [str(python), "-c", "import hl7.client"], capture_output=True, check=False, cwd="/tmp"
    )
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "hl7"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(texts, f, ensure_ascii=False)
        path = f.name
    try:
        out = subprocess.run(
            [str(python), "-c", REFERENCE_SCRIPT, path],
            capture_output=True,
            text=True,
            check=True,
            cwd="/tmp",  # not our checkout: its `hl7` package must not shadow python-hl7
        )
    finally:
        os.unlink(path)
    result = json.loads(out.stdout)
    return float(result["rate"]), float(result["cpu"]), str(result["version"])


def reference_hl7apy(texts: list[str], seconds: float = 5.0) -> float:
    from hl7apy.parser import parse_message as hl7apy_parse

    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds and done < len(texts):
        hl7apy_parse(texts[done])
        done += 1
    return done / (time.perf_counter() - started)


def our_tokenizer(messages: list[bytes]) -> float:
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        for m in messages:
            parse_message(m)
        best = max(best, len(messages) / (time.perf_counter() - started))
    return best


async def backend_pids(dsn: str) -> list[int]:
    """The PostgreSQL backends serving the gateway's database (the bench's own excluded)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'"
        )
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]


async def wait_for_autovacuum(dsn: str, limit: float = 180.0) -> float:
    """Wait (bounded) until no autovacuum worker runs in the gateway's database; seconds waited.

    After the throughput run's 200,000 observation rows, the machine is still writing out what the
    burst left (the kernel flushes PostgreSQL's dirty pages; autovacuum may vacuum and analyze
    the new tables); the steady phase is measured once right after the burst and once after.
    """
    import asyncpg

    started = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        await asyncio.sleep(2.0)  # the launcher wakes every autovacuum_naptime (1 min max)
        while time.perf_counter() - started < limit:
            busy = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_type = 'autovacuum worker'"
            )
            if busy == 0:
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    return time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class CpuUse:
    gateway_us_per_message: float
    postgres_us_per_message: float
    machine_busy_cores: float


class CpuMeter:
    """CPU of the gateway, of its PostgreSQL backends and of the whole machine over a phase."""

    def __init__(self, gateway_pid: int, backends: list[int]) -> None:
        self._pids = [gateway_pid, *backends]
        self._start = [proc_cpu_seconds(p) or 0.0 for p in self._pids]
        self._system = system_cpu()

    def stop(self, messages: int) -> CpuUse:
        used = [
            (proc_cpu_seconds(p) or 0.0) - s for p, s in zip(self._pids, self._start, strict=True)
        ]
        busy, total = system_cpu()
        cores = os.cpu_count() or 1
        share = (busy - self._system[0]) / max(1.0, total - self._system[1])
        return CpuUse(used[0] / messages * 1e6, sum(used[1:]) / messages * 1e6, share * cores)


@asynccontextmanager
async def gateway(database_url: str, command: list[str]) -> AsyncIterator[tuple[int, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
    env.update(
        {
            "QANTARA_DATABASE_URL": database_url,
            "QANTARA_MLLP_PORT": str(port),
            "QANTARA_HTTP_PORT": "0",
            "QANTARA_DICOM_PORT": "0",
            "QANTARA_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    if proc.stderr is None:
        raise RuntimeError("no stderr pipe")
    print(f"gateway pid {proc.pid}", file=sys.stderr)
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):
            while True:
                line = (await proc.stderr.readline()).decode("utf-8", "replace")
                if not line:
                    tail = "".join(seen[-20:])
                    raise RuntimeError(f"the gateway exited before listening:\n{tail}")
                seen.append(line)
                if LISTENING.search(line):
                    break

        async def drain(stream: asyncio.StreamReader) -> None:
            while await stream.readline():
                pass

        drainer = asyncio.create_task(drain(proc.stderr))
        yield port, proc.pid
        drainer.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _connection(
    port: int,
    messages: list[bytes],
    window: int,
    schedule: list[float] | None,
    latencies: list[float],
    codes: dict[str, int],
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    slots = asyncio.Semaphore(window)
    sent_at: list[float] = []

    async def send() -> None:
        for i, m in enumerate(messages):
            await slots.acquire()
            if schedule is not None:
                delay = schedule[i] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent_at.append(time.perf_counter())
            writer.write(START + m + END)
            await writer.drain()

    async def receive() -> None:
        buffer = b""
        for i in range(len(messages)):
            while END not in buffer:
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError("the gateway closed the connection")
                buffer += chunk
            end = buffer.index(END)
            ack = buffer[buffer.index(START) + 1 : end]
            buffer = buffer[end + 2 :]
            latencies.append(time.perf_counter() - sent_at[i])
            code = ack.split(b"\rMSA|", 1)[1][:2].decode("ascii") if b"\rMSA|" in ack else "??"
            codes[code] = codes.get(code, 0) + 1
            slots.release()

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(send())
            group.create_task(receive())
    finally:
        writer.close()


async def end_to_end(
    port: int, messages: list[bytes], connections: int, window: int, rate: float | None
) -> tuple[float, list[float], dict[str, int]]:
    shares = [messages[i::connections] for i in range(connections)]
    latencies: list[float] = []
    codes: dict[str, int] = {}
    started = time.perf_counter()
    schedules: list[list[float] | None] = [None] * connections
    if rate is not None:
        schedules = [
            [started + (j * connections + i) / rate for j in range(len(share))]
            for i, share in enumerate(shares)
        ]
    async with asyncio.TaskGroup() as group:
        for share, schedule in zip(shares, schedules, strict=True):
            group.create_task(_connection(port, share, window, schedule, latencies, codes))
    return len(messages) / (time.perf_counter() - started), latencies, codes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--steady-rate", type=float, default=200.0)
    parser.add_argument("--steady-seconds", type=float, default=15.0)
    parser.add_argument(
        "--gateway-cmd",
        default=f"{sys.executable} -m gateway.cli serve",
        help="the command that runs the gateway (e.g. under a profiler)",
    )
    args = parser.parse_args()

    seed = secrets.randbelow(1_000_000)
    messages = make_messages(args.messages, seed)
    texts = texts_of(messages)
    obx = sum(1 for s in texts[0].split("\r") if s.startswith("OBX"))
    print(
        f"messages: {len(messages)} ORU^R01, {obx} OBX each, "
        f"{statistics.mean(len(m) for m in messages):.0f} bytes on average"
    )

    python_hl7, python_hl7_cpu, version = reference_python_hl7(texts)
    hl7apy_rate = reference_hl7apy(texts)
    tokenizer = our_tokenizer(messages)

    server_dsn = os.environ.get(
        "QANTARA_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    name = f"qantara_bench_hl7_{secrets.token_hex(4)}"
    dsn = await ensure_database(server_dsn, name)
    try:
        async with gateway(dsn, shlex.split(args.gateway_cmd)) as (port, pid):
            warm = make_messages(500, seed + 1)
            await end_to_end(port, warm, args.connections, args.window, None)
            meter = CpuMeter(pid, await backend_pids(dsn))
            rate, _, codes = await end_to_end(port, messages, args.connections, args.window, None)
            cpu = meter.stop(len(messages))
            runs: list[tuple[str, list[float], dict[str, int], CpuUse]] = []
            for phase, offset in (("right after the throughput run", 2), ("settled", 3)):
                if offset == 3:
                    waited = await wait_for_autovacuum(dsn)
                    phase = f"after autovacuum settled ({waited:.0f} s later)"
                steady = make_messages(int(args.steady_rate * args.steady_seconds), seed + offset)
                steady_meter = CpuMeter(pid, await backend_pids(dsn))
                _, latencies, steady_codes = await end_to_end(
                    port, steady, args.connections, args.window, args.steady_rate
                )
                runs.append((phase, latencies, steady_codes, steady_meter.stop(len(steady))))
    finally:
        await drop_database(server_dsn, name)

    print()
    print("| measure | rate (msg/s) | vs python-hl7 parse |")
    print("|---|---:|---:|")
    print(
        f"| Qantara end to end, message in -> AA out, committed "
        f"({args.connections} connections, pipelined) | {rate:,.0f} | {rate / python_hl7:.2f} x |"
    )
    print(f"| python-hl7 {version} parse only | {python_hl7:,.0f} | 1.00 x |")
    print(f"| hl7apy parse only | {hl7apy_rate:,.0f} | {hl7apy_rate / python_hl7:.3f} x |")
    print(
        f"| Qantara ER7 tokenizer parse only | {tokenizer:,.0f} | {tokenizer / python_hl7:.1f} x |"
    )
    print()
    print(f"acks (throughput run): {codes}")
    print(
        f"CPU (throughput run): gateway {cpu.gateway_us_per_message:.0f} us/msg, its PostgreSQL "
        f"backends {cpu.postgres_us_per_message:.0f} us/msg; whole machine "
        f"{cpu.machine_busy_cores:.2f} of {os.cpu_count()} cores busy"
    )
    ours = cpu.gateway_us_per_message + cpu.postgres_us_per_message
    print(
        f"CPU per message, load-independent: python-hl7 parse {python_hl7_cpu * 1e6:.0f} us; "
        f"Qantara gateway + PostgreSQL {ours:.0f} us "
        f"(python-hl7 / Qantara = {python_hl7_cpu * 1e6 / ours:.2f} x)"
    )
    for phase, latencies, steady_codes, steady_cpu in runs:
        print(
            f"steady {args.steady_rate:.0f} msg/s for {args.steady_seconds:.0f} s, {phase}: "
            f"message -> AA p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms; acks {steady_codes}; "
            f"gateway {steady_cpu.gateway_us_per_message:.0f} us/msg, PostgreSQL "
            f"{steady_cpu.postgres_us_per_message:.0f} us/msg; "
            f"machine {steady_cpu.machine_busy_cores:.2f} of {os.cpu_count()} cores busy"
        )


if __name__ == "__main__":
    asyncio.run(main())
