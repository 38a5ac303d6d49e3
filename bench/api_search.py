"""Read API benchmark: FHIR searches over 2 million Observations against the same SQL, bare.

What it measures, in one run on this machine:

1. load: `--patients` patients (default 20,000) with `--samples` vitals each (default 100: 2
   million rows), written through the pipeline's bulk path (`storage.writer.BatchWriter`), one
   `VitalsMessage` of `--samples` samples per patient, 100 messages per commit; then VACUUM ANALYZE;
2. API: a server subprocess (uvicorn with httptools, as `gateway/app.py` configures it, serving
   `gateway.http.create_app` over its own pool of 10: the production app, token lookup, audit and
   all) answers `GET /fhir/Observation?patient=<id>&_count=50` and
   `GET /fhir/Observation/$lastn?patient=<id>&max=3` for random patients from `--clients` (8)
   concurrent keep-alive HTTP/1.1 clients (`--client lean`, a minimal one, by default; `httpx`
   costs the shared cores about as much CPU per request as the server does): p50/p95/p99
   latency, throughput, and the CPU per request of the server, the clients and the database's
   backends;
3. bare: the very statements the API runs for one request, with its choices (token lookup with
   the patient group, the two counts in one statement, the keyset page of each kind that has
   rows, the audit insert; for `$lastn` the token lookup, the per-code vitals and labs, the
   audit insert), through the same storage functions on as many dedicated asyncpg connections:
   the throughput the database gives without HTTP, JSON and FHIR mapping.

API and bare phases alternate for `--rounds` rounds, so that the other users of the machine
disturb both sides alike; the figures of each round and of all rounds together are printed.
The ratio API / bare is the share of the database's throughput the HTTP layer keeps.
`--explain` prints EXPLAIN ANALYZE of each statement of both searches on the benchmark's database,
then of the other searches (Patient, DiagnosticReport, AuditEvent, and both searches for a patient
with lab results) on a copy of it given names, birth dates, genders and lab reports through the
HL7 write path; it runs no benchmark (docs/api.md quotes the output).

Run: `.venv/bin/python bench/api_search.py [--patients 20000] [--samples 100] [--rounds 5]
[--requests 1000] [--client lean|httpx]`.
Database: the server named by `QANTARA_BENCH_DATABASE_URL` (default
postgresql://postgres@127.0.0.1:5432/postgres); a database is created for the run and dropped
after (`--keep` keeps it and prints its name; `--reuse NAME` benchmarks a kept one, no load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from proc_stats import proc_cpu_seconds  # noqa: E402

from gateway.auth import issue_token  # noqa: E402
from gateway.local_services import (  # noqa: E402
    database_dsn,
    drop_database,
    ensure_database,
    free_port,
)
from ingest.records import (  # noqa: E402
    CodedValue,
    DicomInstance,
    DicomKey,
    Envelope,
    Hl7Key,
    LabObservation,
    LabReport,
    MqttKey,
    PatientDemographics,
    PatientName,
    PatientRef,
    Protocol,
    RawMessage,
    Sample,
    VitalsMessage,
)
from storage.audit import (  # noqa: E402
    AuditEntry,
    AuditQuery,
    count_access,
    record_access,
    search_access,
)
from storage.migrations import apply_migrations  # noqa: E402
from storage.queries import (  # noqa: E402
    CodeCriterion,
    ImagingQuery,
    LabQuery,
    PatientQuery,
    ReportQuery,
    StudyQuery,
    VitalQuery,
    count_lab_reports,
    count_observations,
    count_patients,
    count_studies,
    get_patients,
    lastn_labs,
    lastn_vitals,
    patient_group,
    qido_studies,
    search_lab_observations,
    search_lab_reports,
    search_patient_ids,
    search_studies,
    search_vital_observations,
)
from storage.tokens import hash_token, lookup_token_and_group  # noqa: E402
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
LAB_CODES = (
    ("2345-7", "Glucose"),
    ("2160-0", "Creatinine"),
    ("2951-2", "Sodium"),
    ("2823-3", "Potassium"),
    ("3094-0", "Urea nitrogen"),
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
        config = uvicorn.Config(  # as gateway/app.py configures it
            app,
            host="127.0.0.1",
            port=port,
            http="httptools",
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        await uvicorn.Server(config).serve()

    asyncio.run(main())


# --- measuring ----------------------------------------------------------------------------------


Backends = Callable[[], Awaitable[list[int]]]
"""The process ids of the PostgreSQL backends connected to the benchmark's database."""


class CpuMeter:
    """CPU used during a phase by the server, this process (the clients) and the PostgreSQL
    backends of the benchmark's database (not the other users' work on the shared server).

    Less noisy than throughput on a shared machine: someone else's burst takes cores away but
    adds little to these counts."""

    def __init__(self, server_pid: int | None, backends: Backends) -> None:
        self._server_pid = server_pid
        self._backends = backends
        self._start: dict[int, float] = {}
        self._server = 0.0
        self._clients = 0.0

    async def start(self) -> None:
        self._start = {pid: (proc_cpu_seconds(pid) or 0.0) for pid in await self._backends()}
        self._server = (
            (proc_cpu_seconds(self._server_pid) or 0.0) if self._server_pid is not None else 0.0
        )
        self._clients = time.process_time()

    async def stop(self, requests: int) -> float:
        """Print the CPU milliseconds per request; returns their sum."""
        server = (
            (proc_cpu_seconds(self._server_pid) or 0.0) - self._server if self._server_pid else 0.0
        )
        clients = time.process_time() - self._clients
        postgres = sum(
            (proc_cpu_seconds(pid) or 0.0) - self._start.get(pid, 0.0)
            for pid in await self._backends()
        )
        per = [x * 1000 / requests for x in (server, clients, postgres)]
        print(
            f"  {'':<34} CPU per request: server {per[0]:.2f} ms, clients {per[1]:.2f} ms,"
            f" PostgreSQL {per[2]:.2f} ms, total {sum(per):.2f} ms",
            flush=True,
        )
        return sum(per)


@dataclass
class Measured:
    latencies: list[float]
    elapsed: float
    cpu_ms: float
    """CPU milliseconds per request, all processes of the run."""

    def add(self, other: Measured) -> None:
        weight = len(self.latencies)
        self.cpu_ms = (self.cpu_ms * weight + other.cpu_ms * len(other.latencies)) / (
            weight + len(other.latencies)
        )
        self.latencies.extend(other.latencies)
        self.elapsed += other.elapsed

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed


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


class LeanClient:
    """A minimal HTTP/1.1 keep-alive client (one connection, one request at a time).

    The load generator shares the machine's two cores with the server and PostgreSQL: httpx
    spends about as much CPU per request as the server does (`--client httpx` shows it), which
    measures the client more than the API. This one writes the request line and headers and
    reads the status line, the headers and `Content-Length` bytes of body; anything else
    (chunked encoding, a closed connection) fails the run.
    """

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self._port = port
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = f"Host: 127.0.0.1:{port}\r\n{lines}\r\n".encode("ascii")
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection("127.0.0.1", self._port)
        reader, writer = self._streams
        writer.write(b"GET " + path.encode("ascii") + b" HTTP/1.1\r\n" + self._head)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        _check(length is not None, "response without Content-Length")
        assert length is not None  # noqa: S101 - narrows the type after _check
        return status, await reader.readexactly(length)

    async def aclose(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
            await self._streams[1].wait_closed()


class HttpxClient:
    """httpx with keep-alive (the load generator of the first runs)."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
        )

    async def get(self, path: str) -> tuple[int, bytes]:
        response = await self._client.get(path)
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self._client.aclose()


async def api_phase(
    port: int,
    server_pid: int,
    token: str,
    patient_ids: list[int],
    clients: int,
    requests: int,
    client_kind: str,
    backends: Backends,
) -> dict[str, Measured]:
    headers = {"Authorization": f"Bearer {token}"}
    make = LeanClient if client_kind == "lean" else HttpxClient
    sessions = [make(port, headers) for _ in range(clients)]
    results = {}
    try:
        # The same answer through both clients: a full Bundle of 50 (or 15) Observations.
        for path, entries in (
            (f"/fhir/Observation?_count=50&patient={patient_ids[0]}", 50),
            (f"/fhir/Observation/$lastn?max=3&patient={patient_ids[0]}", 15),
        ):
            status, body = await sessions[0].get(path)
            _check(status == 200 and len(json.loads(body)["entry"]) == entries, "bad answer")
        for name, path in (
            ("Observation?patient=&_count=50", "/fhir/Observation?_count=50&patient="),
            ("Observation/$lastn?patient=&max=3", "/fhir/Observation/$lastn?max=3&patient="),
        ):

            async def one(index: int, pick: int, path: str = path) -> None:
                patient = patient_ids[pick % len(patient_ids)]
                status, body = await sessions[index].get(f"{path}{patient}")
                _check(status == 200 and body.startswith(b'{"resourceType":"Bundle"'), "answer")

            await _concurrently(clients, clients * 20, one)  # warm up
            meter = CpuMeter(server_pid, backends)
            await meter.start()
            latencies, elapsed = await _concurrently(clients, requests, one)
            _summary(f"API  {name}", latencies, elapsed)
            results[name] = Measured(latencies, elapsed, await meter.stop(len(latencies)))
    finally:
        for session in sessions:
            await session.aclose()
    return results


async def observation_sql(db: Any, token_hash: bytes, patient: int) -> None:
    """The statements of `GET /fhir/Observation?patient=<id>&_count=50`, in the API's order and
    with its choices (a kind whose count is 0 is not read)."""
    grant, group = await lookup_token_and_group(db, token_hash, (patient,))
    _check(grant is not None, "token refused")
    assert grant is not None  # noqa: S101 - narrows the type after _check
    query = VitalQuery(patient_ids=group)
    labs = LabQuery(patient_ids=group)
    counts = await count_observations(db, query, labs)
    rows = await search_vital_observations(db, query, None, 51) if counts.vitals else []
    if counts.labs:
        await search_lab_observations(db, labs, None, 51)
    await record_access(
        db,
        AuditEntry(grant.name, "search-type", "Observation", "bench", (patient,), "0", 200),
    )
    _check(bool(rows), "no rows")


async def lastn_sql(db: Any, token_hash: bytes, patient: int) -> None:
    """The statements of `GET /fhir/Observation/$lastn?patient=<id>&max=3`."""
    grant, group = await lookup_token_and_group(db, token_hash, (patient,))
    _check(grant is not None, "token refused")
    assert grant is not None  # noqa: S101 - narrows the type after _check
    rows = await lastn_vitals(db, group, None, 3)
    await lastn_labs(db, group, None, 3)
    await record_access(
        db, AuditEntry(grant.name, "operation", "Observation", "bench", (patient,), "0", 200)
    )
    _check(bool(rows), "no rows")


async def bare_phase(
    dsn: str,
    token: str,
    patient_ids: list[int],
    clients: int,
    requests: int,
    backends: Backends,
) -> dict[str, Measured]:
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
            meter = CpuMeter(None, backends)
            await meter.start()
            latencies, elapsed = await _concurrently(clients, requests, one)
            _summary(f"bare {name}", latencies, elapsed)
            results[name] = Measured(latencies, elapsed, await meter.stop(len(latencies)))
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


_DIGEST = re.compile(r"'\\x[0-9a-f]+'::bytea")
Explained = Callable[[Any], Awaitable[object]]
"""Runs the statements of one search on the Executor it is given."""


async def _explain(conn: asyncpg.Connection, searches: list[tuple[str, Explained]]) -> None:
    """Run each search through a `_Recorder`, then print EXPLAIN ANALYZE of each statement."""
    for name, run in searches:
        recorder = _Recorder(conn)
        await run(recorder)
        print(f"\n### {name}\n")
        for sql, args in recorder.statements:
            if sql.lstrip().upper().startswith("INSERT"):
                continue
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, COSTS OFF) {sql}", *args)
            print(" ".join(sql.split())[:160] + " ...")
            for row in plan:
                # The token's digest is not for a document.
                print("    " + _DIGEST.sub("'\\\\x…'::bytea", row[0]))
            print()


async def explain(dsn: str, token: str, patient: int) -> None:
    """The plans of the benchmarked searches, on the benchmark's database."""
    token_hash = hash_token(token)
    conn = await asyncpg.connect(dsn)
    try:
        await _explain(
            conn,
            [
                ("Observation search", lambda db: observation_sql(db, token_hash, patient)),
                ("$lastn", lambda db: lastn_sql(db, token_hash, patient)),
            ],
        )
    finally:
        await conn.close()


def _lab_message(index: int, rng: random.Random) -> Envelope:
    """ADT-like demographics and two ORU reports of five results for bench patient `index`."""
    patient = PatientRef("CIN", f"B{index:07d}")
    observed = BASE + timedelta(minutes=rng.randrange(0, 60 * 24 * 14))
    reports = tuple(
        LabReport(
            patient=(patient,),
            placer_id=f"P{index}-{r}",
            filler_id=f"F{index}-{r}",
            service=CodedValue("LN", "24323-8", "Comprehensive metabolic panel"),
            observed_at=observed + timedelta(days=r),
            status="F",
            observations=tuple(
                LabObservation(
                    set_id=k + 1,
                    value_type="NM",
                    code=CodedValue("LN", code, display),
                    numeric=round(rng.uniform(1, 10), 2),
                    unit="mmol/L",
                    reference_range="1-10",
                    status="F",
                    observed_at=observed + timedelta(days=r),
                )
                for k, (code, display) in enumerate(LAB_CODES)
            ),
        )
        for r in range(2)
    )
    demographics = PatientDemographics(
        identifiers=(patient,),
        names=(PatientName(family=f"Benali{index}", given=("Amina",)),),
        birth_date=date(1940 + index % 70, 1 + index % 12, 1 + index % 28),
        gender=("female", "male")[index % 2],
        authoritative=True,
    )
    raw = RawMessage("ORU^R01", "2.5", "UNICODE UTF-8", None, f"bench {index}".encode())
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    return Envelope(
        protocol=Protocol.HL7,
        key=Hl7Key("BENCH-LIS", "BENCH", f"explain-{index}"),
        records=(raw, demographics, *reports),
        received_at=datetime.now(UTC),
        ack=future,
        source="BENCH-LIS|BENCH",
    )


MODALITIES = ("CR", "DX", "US", "CT")


def _imaging_message(index: int, instance: int, rng: random.Random) -> Envelope:
    """Instance `instance` of the one study of bench patient `index` (the DICOM index path)."""
    study_uid = f"1.2.826.0.1.3680043.10.1234.{index}"
    series_uid = f"{study_uid}.1"
    sop_uid = f"{series_uid}.{instance + 1}"
    study_date = (BASE - timedelta(days=rng.randrange(0, 365))).date()
    record = DicomInstance(
        sop_instance_uid=sop_uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax="1.2.840.10008.1.2.1",
        file_path=f"bench/{index}/{instance}.dcm",
        size=524_288,
        sha256=secrets.token_bytes(32),
        calling_ae="BENCH",
        patient=(PatientRef("CIN", f"B{index:07d}"),),
        patient_name=f"Benali{index}^Amina",
        dicom_patient_id=f"B{index:07d}",
        study_date=study_date,
        modality=MODALITIES[index % len(MODALITIES)],
        series_number=1,
        instance_number=instance + 1,
    )
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    return Envelope(
        protocol=Protocol.DICOM,
        key=DicomKey(sop_uid),
        records=(record,),
        received_at=datetime.now(UTC),
        ack=future,
        source="BENCH",
    )


async def explain_others(dsn: str, patients: int, patient: int) -> None:
    """The plans of the other searches, on `dsn` (a copy of the benchmark's database) after
    giving every patient a name, a birth date, a gender and two lab reports of five results
    through the HL7 write path, and one study of two instances through the DICOM index path."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        writer = BatchWriter(pool)
        rng = random.Random(11)
        for first in range(0, patients, 200):
            batch = [_lab_message(i, rng) for i in range(first, min(first + 200, patients))]
            outcomes = await writer.write(batch)
            _check(all(o.kind != "rejected" for o in outcomes), "a lab message was refused")
        for first in range(0, patients, 200):
            batch = [
                _imaging_message(i, k, rng)
                for i in range(first, min(first + 200, patients))
                for k in range(2)
            ]
            outcomes = await writer.write(batch)
            _check(all(o.kind != "rejected" for o in outcomes), "a DICOM instance was refused")
        async with pool.acquire() as conn:
            await conn.execute("VACUUM ANALYZE")
    finally:
        await pool.close()
    conn = await asyncpg.connect(dsn)
    try:
        token = await issue_token(conn, f"bench-{secrets.token_hex(4)}", ["system/*.read"])
        token_hash = hash_token(token)
        group = tuple(await patient_group(conn, [patient]))
        since = BASE - timedelta(days=30)
        by_name = PatientQuery(name_prefixes=("benali1234",))
        by_birth = PatientQuery(
            birth_start=date(1980, 1, 1), birth_end=date(1981, 1, 1), genders=("female",)
        )
        reports = ReportQuery(
            patient_ids=group, codes=(CodeCriterion("LN", "24323-8"),), start=since
        )
        audit = AuditQuery(patient_ids=group, start=since)
        imaging = ImagingQuery(patient_ids=group, start=since - timedelta(days=365))
        qido = StudyQuery(dicom_patient_id=f"B{patient:07d}", modality="CR")

        async def patients_by(db: Any, query: PatientQuery) -> None:
            await count_patients(db, query)
            await get_patients(db, await search_patient_ids(db, query, None, 51))

        async def report_search(db: Any) -> None:
            await count_lab_reports(db, reports)
            await search_lab_reports(db, reports, None, 51)

        async def audit_search(db: Any) -> None:
            await count_access(db, audit)
            await search_access(db, audit, None, 51)

        async def imaging_search(db: Any) -> None:
            await count_studies(db, imaging)
            await search_studies(db, imaging, None, 51)

        async def qido_search(db: Any) -> None:
            await qido_studies(db, qido)

        await _explain(
            conn,
            [
                (
                    "Observation search, a patient with lab results",
                    lambda db: observation_sql(db, token_hash, patient),
                ),
                (
                    "$lastn, a patient with lab results",
                    lambda db: lastn_sql(db, token_hash, patient),
                ),
                ("Patient?name=benali1234", lambda db: patients_by(db, by_name)),
                ("Patient?birthdate=1980&gender=female", lambda db: patients_by(db, by_birth)),
                ("DiagnosticReport?patient=&code=&date=ge", report_search),
                ("AuditEvent?patient=&date=ge", audit_search),
                ("ImagingStudy?patient=&started=ge", imaging_search),
                ("QIDO-RS /dicomweb/studies?PatientID=&ModalitiesInStudy=CR", qido_search),
            ],
        )
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

        async def backends() -> list[int]:
            rows = await pool.fetch(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return [r["pid"] for r in rows]

        if args.explain:
            await explain(dsn, token, patient_ids[len(patient_ids) // 2])
            await pool.close()
            copy = f"{name}_explain"
            await drop_database(SERVER_DSN, copy)
            admin = await asyncpg.connect(SERVER_DSN)
            try:  # a copy, so that the benchmark's data set stays vitals only
                await admin.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"')
            finally:
                await admin.close()
            try:
                await explain_others(
                    database_dsn(SERVER_DSN, copy),
                    len(patient_ids),
                    patient_ids[len(patient_ids) // 2],
                )
            finally:
                await drop_database(SERVER_DSN, copy)
            return
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
        print(
            f"{args.clients} concurrent clients ({args.client}),"
            f" {args.requests} requests per search",
            flush=True,
        )
        # API and bare alternate, round after round: the machine is shared, and a burst of
        # someone else's work then falls on both sides instead of on one.
        api_total: dict[str, Measured] = {}
        bare_total: dict[str, Measured] = {}
        ratios: dict[str, list[float]] = {}
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number} of {args.rounds}", flush=True)
            api = await api_phase(
                port,
                server.pid,
                token,
                patient_ids,
                args.clients,
                args.requests,
                args.client,
                backends,
            )
            bare = await bare_phase(dsn, token, patient_ids, args.clients, args.requests, backends)
            for search in api:
                ratio = api[search].rate / bare[search].rate
                ratios.setdefault(search, []).append(ratio)
                print(f"  {search:<38} API/bare throughput {ratio:.2f}", flush=True)
                api_total.setdefault(search, Measured([], 0.0, 0.0)).add(api[search])
                bare_total.setdefault(search, Measured([], 0.0, 0.0)).add(bare[search])
        print(f"all {args.rounds} rounds", flush=True)
        for search in api_total:
            _summary(f"API  {search}", api_total[search].latencies, api_total[search].elapsed)
            _summary(f"bare {search}", bare_total[search].latencies, bare_total[search].elapsed)
            overall = api_total[search].rate / bare_total[search].rate
            each = " ".join(f"{r:.2f}" for r in ratios[search])
            print(
                f"  {search:<38} API/bare throughput {overall:.2f}"
                f" (rounds: {each}; median {statistics.median(ratios[search]):.2f});"
                f" CPU per request bare/API {bare_total[search].cpu_ms:.2f}"
                f" / {api_total[search].cpu_ms:.2f} ms"
                f" = {bare_total[search].cpu_ms / api_total[search].cpu_ms:.2f}",
                flush=True,
            )
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
    parser.add_argument("--requests", type=int, default=1000, help="per search, phase and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--client",
        choices=("lean", "httpx"),
        default="lean",
        help="the API phase's HTTP client: a minimal keep-alive one (default) or httpx",
    )
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
