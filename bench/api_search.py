"""Read API benchmark: FHIR searches over 2 million Observations against the same SQL, bare.

What it measures, in one run on this machine:

1. load: `--patients` patients (default 20,000) with `--samples` vitals each (default 100: 2
   million rows), written through the pipeline's bulk path (`storage.writer.BatchWriter`), one
   `VitalsMessage` of `--samples` samples per patient, 100 messages per commit; then VACUUM ANALYZE;
2. API: a server subprocess (uvicorn with `gateway.http.create_app` over its own pool of 10, the
   production app, audit and all) answers `GET /fhir/Observation?patient=<id>&_count=50` and
   `GET /fhir/Observation/$lastn?patient=<id>&max=3` for random patients from `--clients` (8)
   concurrent httpx clients with keep-alive: p50/p95/p99 latency and throughput;
3. bare: the same statements the API runs for one request (token lookup, patient group, counts,
   keyset page of vitals and labs, audit insert; for `$lastn` the concept list and the per-code
   queries), through asyncpg from the same number of concurrent connections, with the same
   storage functions: the throughput the database gives without HTTP, JSON and FHIR mapping.

The ratio API / bare is the share of the database's throughput the HTTP layer keeps.
`--explain` prints EXPLAIN (ANALYZE, BUFFERS) of each statement of both searches (docs/api.md).

Run: `.venv/bin/python bench/api_search.py [--patients 20000] [--samples 100] [--requests 4000]`.
Database: the server named by `QANTARA_BENCH_DATABASE_URL` (default
postgresql://postgres@127.0.0.1:5432/postgres); a database is created for the run and dropped
after (`--keep` keeps it and prints its name; `--reuse NAME` benchmarks a kept one, no load).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from gateway.auth import issue_token  # noqa: E402
from gateway.local_services import drop_database, ensure_database, free_port  # noqa: E402
from ingest.records import (  # noqa: E402
    Envelope,
    MqttKey,
    PatientRef,
    Protocol,
    Sample,
    VitalsMessage,
)
from storage.audit import AuditEntry, record_access  # noqa: E402
from storage.migrations import apply_migrations  # noqa: E402
from storage.queries import (  # noqa: E402
    LabQuery,
    VitalQuery,
    count_lab_observations,
    count_vital_observations,
    find_concepts,
    lastn_labs,
    lastn_vitals,
    patient_group,
    search_lab_observations,
    search_vital_observations,
)
from storage.tokens import hash_token, lookup_token  # noqa: E402
from storage.writer import BatchWriter, ensure_partitions  # noqa: E402

SERVER_DSN = os.environ.get(
    "QANTARA_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BASE = datetime(2026, 11, 1, tzinfo=UTC)
CODES = (
    ("hr", "/min", 72.0),
    ("spo2", "%", 97.0),
    ("sbp", "mm[Hg]", 120.0),
    ("dbp", "mm[Hg]", 80.0),
    ("temp", "Cel", 37.0),
)
MESSAGES_PER_COMMIT = 100
UNITS = 100


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise RuntimeError(what)


# --- load ---------------------------------------------------------------------------------------


def _message(patient: int, samples: int, seq: int, rng: random.Random) -> Envelope:
    unit = f"bench-unit-{patient % UNITS:03d}"
    start = BASE + timedelta(minutes=rng.randrange(0, 60 * 24 * 14))
    values = []
    for i in range(samples):
        code, unit_text, typical = CODES[i % len(CODES)]
        t = start + timedelta(minutes=5 * (i // len(CODES)), seconds=i % len(CODES))
        values.append(Sample(t, code, typical + rng.uniform(-5, 5), unit_text))
    message = VitalsMessage(
        unit_id=unit,
        seq=seq,
        sent_at=None,
        device_id="MON-1",
        device_kind="multiparameter-monitor",
        patient=PatientRef("CIN", f"B{patient:07d}"),
        samples=tuple(values),
    )
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    return Envelope(
        protocol=Protocol.MQTT,
        key=MqttKey(unit, seq),
        records=(message,),
        received_at=datetime.now(UTC),
        ack=future,
        source=unit,
    )


async def load(pool: asyncpg.Pool, patients: int, samples: int) -> float:
    """Write the data set through BatchWriter; returns rows per second."""
    await ensure_partitions(pool, BASE - timedelta(days=7), BASE + timedelta(days=35))
    writer = BatchWriter(pool)
    rng = random.Random(7)
    started = time.perf_counter()
    for first in range(0, patients, MESSAGES_PER_COMMIT):
        batch = [
            _message(p, samples, p // UNITS + 1, rng)
            for p in range(first, min(first + MESSAGES_PER_COMMIT, patients))
        ]
        outcomes = await writer.write(batch)
        _check(all(o.kind == "stored" for o in outcomes), "a message was not stored")
        if first % 2000 == 0:
            print(f"  loaded {first + len(batch):>6} patients", flush=True)
    elapsed = time.perf_counter() - started
    async with pool.acquire() as conn:
        await conn.execute("VACUUM ANALYZE")
    return patients * samples / elapsed


# --- the server ---------------------------------------------------------------------------------


def serve(dsn: str, port: int) -> None:
    """Run the API app under uvicorn (the subprocess of the benchmark)."""
    import uvicorn

    from gateway.http import ApiSettings, create_app
    from monitoring.metrics import Metrics
    from storage.pool import PoolSettings, create_pool

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        pool = await create_pool(
            PoolSettings(dsn=dsn, max_size=10, statement_timeout_ms=5000, application_name="bench")
        )
        app = create_app(
            pool=pool,
            metrics=Metrics(),
            readiness=lambda: {"database": True},
            api=ApiSettings(cursor_secret=b"benchmark cursor secret........"),
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"
        )
        await uvicorn.Server(config).serve()

    asyncio.run(main())


# --- measuring ----------------------------------------------------------------------------------


def _summary(name: str, latencies: list[float], elapsed: float) -> dict[str, float]:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    result = {
        "rate": len(latencies) / elapsed,
        "p50": pct(0.50),
        "p95": pct(0.95),
        "p99": pct(0.99),
        "mean": statistics.fmean(ordered) * 1000,
    }
    print(
        f"  {name:<34} {result['rate']:>8.0f} req/s   p50 {result['p50']:6.1f} ms"
        f"   p95 {result['p95']:6.1f} ms   p99 {result['p99']:6.1f} ms",
        flush=True,
    )
    return result


async def _concurrently(
    clients: int, requests: int, one: Callable[[int, int], Awaitable[None]]
) -> tuple[list[float], float]:
    latencies: list[float] = []
    per_client = requests // clients

    async def worker(index: int) -> None:
        rng = random.Random(index)
        for _ in range(per_client):
            started = time.perf_counter()
            await one(index, rng.randrange(1 << 30))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    return latencies, time.perf_counter() - started


async def api_phase(
    port: int, token: str, patient_ids: list[int], clients: int, requests: int
) -> dict[str, dict[str, float]]:
    headers = {"Authorization": f"Bearer {token}"}
    sessions = [
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30)
        for _ in range(clients)
    ]
    results = {}
    try:
        for name, path in (
            ("Observation?patient=&_count=50", "/fhir/Observation?_count=50&patient="),
            ("Observation/$lastn?patient=&max=3", "/fhir/Observation/$lastn?max=3&patient="),
        ):

            async def one(index: int, pick: int, path: str = path) -> None:
                patient = patient_ids[pick % len(patient_ids)]
                response = await sessions[index].get(f"{path}{patient}")
                _check(response.status_code == 200, f"status {response.status_code}")

            await _concurrently(clients, clients * 20, one)  # warm up
            latencies, elapsed = await _concurrently(clients, requests, one)
            results[name] = _summary(f"API  {name}", latencies, elapsed)
    finally:
        for session in sessions:
            await session.aclose()
    return results


async def observation_sql(db: Any, token_hash: bytes, patient: int) -> None:
    """The statements of `GET /fhir/Observation?patient=<id>&_count=50`, in the API's order."""
    grant = await lookup_token(db, token_hash)
    _check(grant is not None, "token refused")
    assert grant is not None  # noqa: S101 - narrows the type after _check
    group = tuple(await patient_group(db, [patient]))
    query = VitalQuery(patient_ids=group)
    labs = LabQuery(patient_ids=group)
    await count_vital_observations(db, query)
    await count_lab_observations(db, labs)
    rows = await search_vital_observations(db, query, None, 51)
    await search_lab_observations(db, labs, None, 51)
    await record_access(
        db,
        AuditEntry(grant.name, "search-type", "Observation", "bench", (patient,), "0", 200),
    )
    _check(bool(rows), "no rows")


async def lastn_sql(db: Any, token_hash: bytes, patient: int) -> None:
    """The statements of `GET /fhir/Observation/$lastn?patient=<id>&max=3`."""
    grant = await lookup_token(db, token_hash)
    _check(grant is not None, "token refused")
    assert grant is not None  # noqa: S101 - narrows the type after _check
    group = await patient_group(db, [patient])
    concepts = [c.id for c in await find_concepts(db, None)]
    rows = await lastn_vitals(db, group, concepts, 3)
    await lastn_labs(db, group, None, 3)
    await record_access(
        db, AuditEntry(grant.name, "operation", "Observation", "bench", (patient,), "0", 200)
    )
    _check(bool(rows), "no rows")


async def bare_phase(
    dsn: str, token: str, patient_ids: list[int], clients: int, requests: int
) -> dict[str, dict[str, float]]:
    token_hash = hash_token(token)
    connections = [await asyncpg.connect(dsn) for _ in range(clients)]
    results = {}
    try:
        for name, run in (
            ("Observation?patient=&_count=50", observation_sql),
            ("Observation/$lastn?patient=&max=3", lastn_sql),
        ):

            async def one(index: int, pick: int, run: Any = run) -> None:
                await run(connections[index], token_hash, patient_ids[pick % len(patient_ids)])

            await _concurrently(clients, clients * 20, one)
            latencies, elapsed = await _concurrently(clients, requests, one)
            results[name] = _summary(f"bare {name}", latencies, elapsed)
    finally:
        for conn in connections:
            await conn.close()
    return results


class _Recorder:
    """An Executor that records each statement and its arguments, then runs it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements: list[tuple[str, tuple[object, ...]]] = []

    async def fetch(self, query: str, *args: object) -> list[Any]:
        self.statements.append((query, args))
        return list(await self.conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: object) -> Any:
        self.statements.append((query, args))
        return await self.conn.fetchrow(query, *args)

    async def execute(self, query: str, *args: object) -> str:
        self.statements.append((query, args))
        result: str = await self.conn.execute(query, *args)
        return result


async def explain(dsn: str, token: str, patient: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for name, run in (("Observation search", observation_sql), ("$lastn", lastn_sql)):
            recorder = _Recorder(conn)
            await run(recorder, hash_token(token), patient)
            print(f"\n### {name}\n")
            for sql, args in recorder.statements:
                if sql.lstrip().upper().startswith("INSERT"):
                    continue
                plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", *args)
                print(" ".join(sql.split())[:160] + " ...")
                print("\n".join("    " + r[0] for r in plan))
                print()
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> None:
    name = args.reuse or f"qantara_bench_api_{secrets.token_hex(4)}"
    dsn = await ensure_database(SERVER_DSN, name)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
    server: asyncio.subprocess.Process | None = None
    try:
        async with pool.acquire() as conn:
            await apply_migrations(conn)
        if args.reuse is None:
            print(f"loading {args.patients} patients x {args.samples} samples", flush=True)
            rate = await load(pool, args.patients, args.samples)
            print(f"  load through BatchWriter: {rate:,.0f} rows/s", flush=True)
        rows = await pool.fetchval("SELECT count(*) FROM vital")
        patient_ids = [r["id"] for r in await pool.fetch("SELECT id FROM patient ORDER BY id")]
        print(f"{rows:,} vitals, {len(patient_ids):,} patients", flush=True)
        token = await issue_token(pool, f"bench-{secrets.token_hex(4)}", ["system/*.read"])
        if args.explain:
            await explain(dsn, token, patient_ids[len(patient_ids) // 2])
        port = free_port()
        server = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", dsn, "--port", str(port), cwd=ROOT
        )
        async with httpx.AsyncClient() as probe:
            for _ in range(200):
                try:
                    if (await probe.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        print(f"{args.clients} concurrent clients, {args.requests} requests per search", flush=True)
        api = await api_phase(port, token, patient_ids, args.clients, args.requests)
        bare = await bare_phase(dsn, token, patient_ids, args.clients, args.requests)
        for search in api:
            ratio = api[search]["rate"] / bare[search]["rate"]
            print(f"  {search:<38} API/bare throughput {ratio:.2f}")
    finally:
        if server is not None:
            server.terminate()
            await asyncio.wait_for(server.wait(), 10)
        await pool.close()
        if args.keep or args.reuse:
            print(f"database kept: {name}")
        else:
            await drop_database(SERVER_DSN, name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", metavar="NAME")
    parser.add_argument("--serve", metavar="DSN", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        serve(arguments.serve, arguments.port)
    else:
        asyncio.run(main(arguments))
