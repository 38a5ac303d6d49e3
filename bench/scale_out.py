"""Scale-out: how fast do 1 and 2 gateway replicas drain the same MQTT backlog, on this machine?

For each replica count N (default 1 then 2), on one fresh database and one private mosquitto:
N `qantara serve` processes (same `QANTARA_MQTT_SHARED_GROUP`, distinct client ids) create their
persistent sessions and stop; `--messages` payloads (bench/mqtt_ingest.py's realistic monitor
payloads, fresh unit ids per round) are queued in the broker, which spreads them over the
group's sessions; the N replicas start again and we time until `SELECT count(*) FROM
mqtt_message` for those units reaches the total. Rate = messages / (last commit - first receive).
Each replica's CPU (cores) and the machine's are measured over the drain, and each replica's share
of the stored messages is read from its `/metrics`.

Everything (PostgreSQL, mosquitto, the replicas, this script) shares this machine's cores, so the
figure is what a second replica buys when the box is not already saturated, not what it buys on
its own hardware. It prints figures; it asserts nothing.

    .venv/bin/python bench/scale_out.py [--messages 20000] [--replicas 1 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import asyncpg  # noqa: E402
from mqtt_ingest import (  # noqa: E402
    DEFAULT_SERVER_DSN,
    BenchError,
    CpuWindow,
    GatewayProcess,
    PayloadFactory,
    build_bodies,
    count_ledger,
    gateway_env,
    log,
    publish_backlog,
    stream,
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from gateway.local_services import PrivateMosquitto, drop_database, ensure_database  # noqa: E402


def stored_mqtt(metrics_text: str) -> float:
    """`qantara_messages_stored_total{protocol="mqtt"}` of one scrape."""
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if (
                sample.name == "qantara_messages_stored_total"
                and sample.labels.get("protocol") == "mqtt"
            ):
                return float(sample.value)
    return 0.0


@dataclass(frozen=True, slots=True)
class Round:
    replicas: int
    messages: int
    elapsed: float
    shares: list[float]
    replica_cores: list[float]
    machine_cores: float

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed

    @property
    def per_core(self) -> float:
        """Messages per second per core the replicas actually got: on a shared, saturated
        machine N processes get a bigger slice than one, and this separates the two effects."""
        cores = sum(self.replica_cores)
        return self.rate / cores if cores else 0.0


async def drain_round(
    replicas: int,
    conn: asyncpg.Connection,
    dsn: str,
    url: str,
    factory: PayloadFactory,
    args: argparse.Namespace,
    scratch: Path,
) -> Round:
    group = f"bench{secrets.token_hex(3)}"
    gateways = []
    for n in range(replicas):
        env = gateway_env(
            dsn,
            url,
            f"scale-{group}-{n}",
            scratch / f"r{replicas}-{n}",
            [f"QANTARA_MQTT_SHARED_GROUP={group}", *args.gateway_env],
        )
        gateways.append(GatewayProcess(env))
    try:
        for gw in gateways:  # sessions first, so the broker queues the backlog for the group
            await gw.start()
        for gw in gateways:
            await gw.wait_ready()
        for gw in gateways:
            await gw.terminate()
        prefix = f"S{replicas}{secrets.token_hex(2)}-"
        per_unit = args.messages // args.units
        bodies = build_bodies(factory, per_unit, datetime.now(UTC) - timedelta(hours=1), 1.0)
        messages = stream(prefix, factory, bodies)
        took = await publish_backlog(url, messages, args.publishers, args.inflight, args.timeout)
        log(f"{replicas} replica(s): {len(messages)} messages queued in {took:.1f} s")
        await asyncio.gather(*(gw.start() for gw in gateways))
        cpus = [CpuWindow(pid=gw.pid) for gw in gateways]
        for cpu in cpus:
            cpu.start()
        counted = 0
        async with asyncio.timeout(args.timeout):
            while counted < len(messages):
                for gw in gateways:
                    if not gw.running:
                        raise BenchError(f"a replica exited during the drain\n{gw.tail()}")
                counted = await count_ledger(conn, prefix)
                await asyncio.sleep(0.05)
        done = time.time()
        for cpu in cpus:
            cpu.stop()
        first = await conn.fetchval(
            """SELECT min(m.received_at) FROM mqtt_message m JOIN unit u ON u.id = m.unit_id
               WHERE u.name LIKE $1""",
            prefix + "%",
        )
        shares = [stored_mqtt(await gw.metrics()) for gw in gateways]
        return Round(
            replicas=replicas,
            messages=len(messages),
            elapsed=done - first.timestamp(),
            shares=shares,
            replica_cores=[c.process_cores or 0.0 for c in cpus],
            machine_cores=cpus[0].machine_cores,
        )
    finally:
        for gw in gateways:
            await gw.terminate()


async def bench(args: argparse.Namespace) -> int:
    mosquitto = PrivateMosquitto(
        max_queued_messages=max(200_000, 2 * args.messages), max_inflight_messages=0
    )
    name = f"qantara_bench_{secrets.token_hex(5)}"
    dsn = await ensure_database(args.postgres, name)
    results: list[Round] = []
    storage: dict[str, tuple[int, int]] = {}
    try:
        await mosquitto.start()
        conn = await asyncpg.connect(dsn)
        try:
            factory = PayloadFactory(args.units, args.samples, seed=7)
            with tempfile.TemporaryDirectory(prefix="qantara-scale-") as scratch:
                for replicas in args.replicas:
                    results.append(
                        await drain_round(
                            replicas, conn, dsn, mosquitto.url, factory, args, Path(scratch)
                        )
                    )
            storage = await row_bytes(conn)
        finally:
            await conn.close()
    finally:
        await mosquitto.cleanup()
        await drop_database(args.postgres, name)
    load = os.getloadavg()
    print(
        f"\nMQTT backlog drain, {args.units} units x {args.messages // args.units} messages,"
        f" {args.samples} samples each; {os.cpu_count()} cores shared by PostgreSQL, mosquitto,"
        f" the replicas and this script; load average after {load[0]:.2f}"
    )
    print(
        "replicas  msg/s    samples/s  elapsed  per-replica stored        replica cores"
        "  machine  msg/s per replica-core"
    )
    base = results[0].rate if results else 0.0
    for r in results:
        shares = " / ".join(f"{s:.0f}" for s in r.shares)
        cores = " / ".join(f"{c:.2f}" for c in r.replica_cores)
        print(
            f"{r.replicas:8d}  {r.rate:7.0f}  {r.rate * args.samples:9.0f}  {r.elapsed:6.1f}s"
            f"  {shares:24s}  {cores:13s}  {r.machine_cores:7.2f}  {r.per_core:6.0f}"
        )
    if len(results) > 1 and base:
        last, first = results[-1], results[0]
        print(f"speed-up {last.replicas} vs {first.replicas}: {last.rate / base:.2f}x")
    print("\non disk, per row, of what the replicas stored (heap + TOAST + indexes, VACUUMed):")
    for table, (rows, size) in storage.items():
        print(f"  {table:13s} {rows:8d} rows  {size / max(rows, 1):6.1f} bytes/row")
    return 0


async def row_bytes(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    """(rows, bytes with indexes) of the vital table (all partitions) and the MQTT ledger
    (not partitioned: `pg_partition_tree` returns nothing for it)."""
    await conn.execute("VACUUM ANALYZE vital, mqtt_message")
    result = {}
    for table in ("vital", "mqtt_message"):
        rows = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608 - fixed names
        size = await conn.fetchval(
            """SELECT coalesce(
                   (SELECT sum(pg_total_relation_size(relid))
                    FROM pg_partition_tree($1::regclass)),
                   pg_total_relation_size($1::regclass))""",
            table,
        )
        result[table] = (int(rows), int(size or 0))
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--messages", type=int, default=20_000)
    add("--units", type=int, default=100)
    add("--samples", type=int, default=5, help="samples per message (5)")
    add("--replicas", type=int, nargs="+", default=[1, 2])
    add("--publishers", type=int, default=4, help="publishing connections")
    add("--inflight", type=int, default=200, help="unacknowledged publishes per connection")
    add("--timeout", type=float, default=300.0, help="bound on each phase, seconds")
    add("--postgres", default=DEFAULT_SERVER_DSN)
    add("--gateway-env", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(bench(args))
    except BenchError as exc:
        print(f"scale_out: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
