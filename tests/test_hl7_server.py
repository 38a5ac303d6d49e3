"""The MLLP server on port 0 with a real database: raw sockets in, acknowledgements out."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from hl7.er7 import parse_message
from hl7.server import MllpServer, MllpSettings
from hl7.validation import validate_structure
from ingest.pipeline import GroupCommitPipeline, PipelineSettings
from monitoring.metrics import Metrics
from simulators.lab import LabConfig, run_lab
from storage.migrations import apply_migrations
from storage.writer import BatchWriter
from tests.hl7_support import (
    Ack,
    MllpClient,
    adt,
    control_id,
    encode,
    frame,
    new_id,
    oru,
)
from tests.services_support import wait_until
from tests.tls_support import Pki, client_context, deployed, pki, stranger_context

CHU = "CHU-RABAT"


@pytest.fixture(scope="module")
async def pool(postgres_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(postgres_dsn, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await apply_migrations(conn)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(scope="module")
async def pipeline(pool: asyncpg.Pool, metrics: Metrics) -> AsyncIterator[GroupCommitPipeline]:
    pipeline = GroupCommitPipeline(BatchWriter(pool), PipelineSettings(), metrics)
    task = asyncio.create_task(pipeline.run())
    yield pipeline
    await pipeline.close()
    await asyncio.wait_for(task, 10)


ServerFactory = Callable[..., "asyncio.Future[MllpServer]"]


@pytest.fixture
async def start_server(
    pipeline: GroupCommitPipeline, metrics: Metrics
) -> AsyncIterator[Callable[..., object]]:
    servers: list[tuple[MllpServer, asyncio.Task[None]]] = []

    async def start(**overrides: object) -> MllpServer:
        settings = dataclasses.replace(MllpSettings(port=0), **overrides)  # type: ignore[arg-type]
        server = MllpServer(settings, pipeline, metrics)
        task = asyncio.create_task(server.run())
        await asyncio.wait_for(server.listening.wait(), 5)
        servers.append((server, task))
        return server

    yield start
    for server, task in servers:
        server.stop()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def server(start_server: Callable[..., object]) -> MllpServer:
    started = await start_server()  # type: ignore[misc]
    assert isinstance(started, MllpServer)
    return started


def connect(server: MllpServer) -> MllpClient:
    assert server.port is not None
    return MllpClient("127.0.0.1", server.port)


async def count(pool: asyncpg.Pool, sql: str, *args: object) -> int:
    return int(await pool.fetchval(sql, *args))


async def observations_of(pool: asyncpg.Pool, control: str) -> int:
    return await count(
        pool,
        """SELECT count(*) FROM lab_observation o JOIN lab_report r ON r.id = o.report_id
           JOIN hl7_message m ON m.id = r.message_id WHERE m.control_id = $1""",
        control,
    )


async def test_oru_gets_aa_echoing_msh10_once_committed(
    server: MllpServer, pool: asyncpg.Pool
) -> None:
    control = control_id()
    async with connect(server) as client:
        ack = await client.request(encode(oru(control, f"{new_id()}^^^CIN^NI")))
    assert (ack.code, ack.acknowledged) == ("AA", control)
    assert await observations_of(pool, control) == 5


async def test_resend_of_committed_message_gets_aa_and_stores_nothing(
    server: MllpServer, pool: asyncpg.Pool, metrics: Metrics
) -> None:
    control = control_id()
    message = encode(oru(control, f"{new_id()}^^^CIN^NI"))
    before = metrics.sample("qantara_messages_duplicate_total", {"protocol": "hl7"}) or 0
    async with connect(server) as client:
        first = await client.request(message)
        again = await client.request(message)
    assert [first.code, again.code] == ["AA", "AA"]
    assert await observations_of(pool, control) == 5
    assert await count(pool, "SELECT count(*) FROM hl7_message WHERE control_id = $1", control) == 1
    assert metrics.sample("qantara_messages_duplicate_total", {"protocol": "hl7"}) == before + 1


async def dead_letter_reasons(pool: asyncpg.Pool, control: str) -> list[str]:
    """The reasons of the HL7 dead letters whose bytes hold the control id `control`."""
    rows = await pool.fetch(
        "SELECT reason FROM dead_letter WHERE protocol = 'hl7' AND raw LIKE $1",
        b"%" + control.encode() + b"%",
    )
    return [row["reason"] for row in rows]


async def test_non_numeric_nm_value_gets_ae_with_err_at_obx_5_and_a_dead_letter(
    server: MllpServer, pool: asyncpg.Pool
) -> None:
    control = control_id()
    bad = ["OBX|1|NM|718-7^Hemoglobin^LN||high|g/dL|12.0-16.0|H|||F"]
    async with connect(server) as client:
        ack = await client.request(encode(oru(control, f"{new_id()}^^^CIN^NI", obx=bad)))
    assert (ack.code, ack.acknowledged, ack.error_code) == ("AE", control, "102")
    assert b"OBX^1^5" in ack.raw
    assert await dead_letter_reasons(pool, control) == ["obx-value-not-numeric"]
    assert await count(pool, "SELECT count(*) FROM hl7_message WHERE control_id = $1", control) == 0


async def test_oru_without_pid_gets_ae_required_field_missing(server: MllpServer) -> None:
    control = control_id()
    async with connect(server) as client:
        ack = await client.request(encode(oru(control, "", include_pid=False)))
    assert (ack.code, ack.error_code) == ("AE", "101")


async def test_unsupported_version_gets_ar(server: MllpServer) -> None:
    control = control_id()
    async with connect(server) as client:
        ack = await client.request(encode(oru(control, f"{new_id()}^^^CIN^NI", version="9.9")))
    assert (ack.code, ack.acknowledged, ack.error_code) == ("AR", control, "203")


async def test_unsupported_processing_id_gets_ar(server: MllpServer) -> None:
    control = control_id()
    text = oru(control, f"{new_id()}^^^CIN^NI").replace("|P|2.5.1", "|T|2.5.1", 1)
    async with connect(server) as client:
        ack = await client.request(encode(text))
    assert (ack.code, ack.error_code) == ("AR", "202")


async def test_enhanced_mode_gets_ca_after_commit(server: MllpServer, pool: asyncpg.Pool) -> None:
    control = control_id()
    text = oru(control, f"{new_id()}^^^CIN^NI", accept_ack="AL", app_ack="NE")
    async with connect(server) as client:
        ack = await client.request(encode(text))
    assert (ack.code, ack.acknowledged) == ("CA", control)
    assert await observations_of(pool, control) == 5


async def test_frame_split_into_small_writes_gets_one_aa(server: MllpServer) -> None:
    control = control_id()
    data = frame(encode(oru(control, f"{new_id()}^^^CIN^NI")))
    async with connect(server) as client:
        for i in range(0, len(data), 7):
            await client.write(data[i : i + 7])
        ack = await client.read_ack()
    assert (ack.code, ack.acknowledged) == ("AA", control)


async def test_pipelined_messages_are_answered_in_order(server: MllpServer) -> None:
    controls = [control_id() for _ in range(50)]
    good = [encode(oru(c, f"{new_id()}^^^CIN^NI")) for c in controls]
    good[10] = encode(oru(controls[10], f"{new_id()}^^^CIN^NI", version="9.9"))
    async with connect(server) as client:
        await client.write(b"".join(frame(m) for m in good))
        acks = [await client.read_ack() for _ in controls]
    assert [a.acknowledged for a in acks] == controls
    assert [a.code for a in acks] == ["AA"] * 10 + ["AR"] + ["AA"] * 39


async def test_oversize_message_closes_its_connection_while_another_gets_aa(
    start_server: Callable[..., object],
) -> None:
    server = await start_server(max_message_bytes=4096)  # type: ignore[misc]
    assert isinstance(server, MllpServer)
    big_control = control_id()
    filler = [f"OBX|{i}|ST|8251-1^Comment^LN||{'x' * 200}||||||F" for i in range(1, 40)]
    big = encode(oru(big_control, f"{new_id()}^^^CIN^NI", obx=filler))
    async with connect(server) as victim, connect(server) as other:
        await victim.send(big)
        ack = await victim.read_ack()
        assert (ack.code, ack.acknowledged) == ("AR", big_control)
        assert await victim.at_eof()
        control = control_id()
        fine = await other.request(encode(oru(control, f"{new_id()}^^^CIN^NI")))
    assert (fine.code, fine.acknowledged) == ("AA", control)


async def test_ack_of_an_arabic_8859_6_message_uses_its_charset(
    server: MllpServer, pool: asyncpg.Pool
) -> None:
    control = control_id()
    cin = new_id()
    text = adt(control, "A01", f"{cin}^^^CIN^NI", "بنعلي^فاطمة", charset="8859/6")
    async with connect(server) as client:
        await client.send(encode(text, "8859/6"))
        ack = await client.read_ack(charset="8859/6")
    assert (ack.code, ack.charset) == ("AA", "8859/6")
    names = await pool.fetchval(
        """SELECT p.names::text FROM patient p JOIN patient_identifier i ON i.patient_id = p.id
           WHERE i.system = 'CIN' AND i.value = $1""",
        cin,
    )
    assert "بنعلي" in names
    assert "فاطمة" in names


async def test_identifiers_of_one_pid_link_to_one_patient(
    server: MllpServer, pool: asyncpg.Pool
) -> None:
    cin, mrn = new_id(), new_id("M")
    async with connect(server) as client:
        ack = await client.request(encode(oru(control_id(), f"{mrn}^^^{CHU}^MR~{cin}^^^CIN^NI")))
    assert ack.code == "AA"
    rows = await pool.fetch(
        "SELECT system, patient_id FROM patient_identifier WHERE value = ANY($1::text[])",
        [cin, mrn],
    )
    assert {r["system"] for r in rows} == {"CIN", CHU}
    assert len({r["patient_id"] for r in rows}) == 1


async def test_idle_connection_is_closed(start_server: Callable[..., object]) -> None:
    server = await start_server(idle_timeout=0.2)  # type: ignore[misc]
    assert isinstance(server, MllpServer)
    async with connect(server) as client:
        assert await client.at_eof(timeout=5)


async def test_connection_beyond_the_maximum_gets_ar_for_its_message_and_is_closed(
    start_server: Callable[..., object], pool: asyncpg.Pool
) -> None:
    server = await start_server(max_connections=1)  # type: ignore[misc]
    assert isinstance(server, MllpServer)
    async with connect(server) as first:
        ack = await first.request(encode(oru(control_id(), f"{new_id()}^^^CIN^NI")))
        assert ack.code == "AA"
        control = control_id()
        async with connect(server) as second:
            refused = await second.request(encode(oru(control, f"{new_id()}^^^CIN^NI")))
            assert (refused.code, refused.acknowledged, refused.error_code) == (
                "AR",
                control,
                "207",
            )
            assert "too many connections" in refused.error_text
            assert await second.at_eof(timeout=5)
    assert await count(pool, "SELECT count(*) FROM hl7_message WHERE control_id = $1", control) == 0


async def test_silent_connection_beyond_the_maximum_is_closed_after_the_refusal_wait(
    start_server: Callable[..., object],
) -> None:
    server = await start_server(max_connections=1, refusal_wait=0.2)  # type: ignore[misc]
    assert isinstance(server, MllpServer)
    async with connect(server) as first:
        assert (await first.request(encode(oru(control_id(), f"{new_id()}^^^CIN^NI")))).code == "AA"
        async with connect(server) as second:
            assert await second.at_eof(timeout=5)
            assert await second.read_frame(timeout=1) is None


async def test_junk_before_a_frame_gets_a_fallback_ar_and_closes(server: MllpServer) -> None:
    async with connect(server) as client:
        await client.write(b"GET / HTTP/1.1\r\n\r\n")
        ack = await client.read_ack()
        assert (ack.code, ack.acknowledged) == ("AR", "")
        assert await client.at_eof()


async def test_metrics_count_connections_and_ack_latency(
    server: MllpServer, metrics: Metrics
) -> None:
    before = metrics.sample("qantara_hl7_ack_latency_seconds_count", {"code": "AA"}) or 0
    async with connect(server) as client:
        await client.request(encode(oru(control_id(), f"{new_id()}^^^CIN^NI")))
        assert metrics.sample("qantara_mllp_connections") == 1
    assert metrics.sample("qantara_hl7_ack_latency_seconds_count", {"code": "AA"}) == before + 1


# --- TLS (certificates from tests.tls_support) ------------------------------------------------

__all__ = ["deployed", "pki"]  # fixtures, used by name


async def test_tls_listener_answers_aa_to_a_client_that_verifies_its_certificate(
    start_server: Callable[..., object], pki: Pki, pool: asyncpg.Pool
) -> None:
    server = await start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)  # type: ignore[misc]
    assert isinstance(server, MllpServer)
    assert server.port is not None
    control = control_id()
    context = client_context(pki, with_certificate=False)
    async with MllpClient("127.0.0.1", server.port, ssl_context=context) as client:
        ack = await client.request(encode(oru(control, f"{new_id()}^^^CIN^NI")))
    assert (ack.code, ack.acknowledged) == ("AA", control)
    assert await observations_of(pool, control) == 5


async def test_tls_listener_requiring_client_certificates_answers_a_client_with_one(
    start_server: Callable[..., object], pki: Pki
) -> None:
    server = await start_server(  # type: ignore[misc]
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    assert isinstance(server, MllpServer)
    assert server.port is not None
    control = control_id()
    context = client_context(pki, with_certificate=True)
    async with MllpClient("127.0.0.1", server.port, ssl_context=context) as client:
        ack = await client.request(encode(oru(control, f"{new_id()}^^^CIN^NI")))
    assert (ack.code, ack.acknowledged) == ("AA", control)


async def test_tls_listener_requiring_client_certificates_drops_a_client_without_one(
    start_server: Callable[..., object], pki: Pki, pool: asyncpg.Pool
) -> None:
    server = await start_server(  # type: ignore[misc]
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    assert isinstance(server, MllpServer)
    assert server.port is not None
    control = control_id()
    context = client_context(pki, with_certificate=False)
    answer: bytes | None = b"?"
    try:  # TLS 1.3: the client finishes its handshake before the server checks it
        async with MllpClient("127.0.0.1", server.port, ssl_context=context) as client:
            await client.send(encode(oru(control, f"{new_id()}^^^CIN^NI")))
            answer = await client.read_frame(timeout=5)
    except (ssl.SSLError, ConnectionError):
        answer = None
    assert answer is None
    assert await count(pool, "SELECT count(*) FROM hl7_message WHERE control_id = $1", control) == 0


async def bound_server(start_server: Callable[..., object], pki: Pki) -> MllpServer:
    """Mutual TLS; MSH-4.1 must be the client certificate's commonName ("client")."""
    server = await start_server(  # type: ignore[misc]
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        tls_facility_from_cn=True,
    )
    assert isinstance(server, MllpServer)
    return server


async def send_as_facility(server: MllpServer, pki: Pki, control: str, facility: str) -> Ack:
    """One ORU with MSH-4 `facility`, over TLS with the client certificate (CN "client")."""
    assert server.port is not None
    context = client_context(pki, with_certificate=True)
    async with MllpClient("127.0.0.1", server.port, ssl_context=context) as client:
        return await client.request(encode(oru(control, f"{new_id()}^^^CIN^NI", facility=facility)))


async def test_a_sender_writing_as_its_certificate_s_facility_gets_aa(
    start_server: Callable[..., object], pki: Pki
) -> None:
    control = control_id()
    ack = await send_as_facility(await bound_server(start_server, pki), pki, control, "client")
    assert (ack.code, ack.acknowledged) == ("AA", control)


async def test_a_sender_writing_as_another_facility_than_its_certificate_s_gets_ar_at_msh_4(
    start_server: Callable[..., object], pki: Pki, pool: asyncpg.Pool
) -> None:
    control = control_id()
    ack = await send_as_facility(await bound_server(start_server, pki), pki, control, CHU)
    assert (ack.code, ack.acknowledged, ack.error_code) == ("AR", control, "207")
    assert b"MSH^1^4" in ack.raw
    assert "sending facility" in ack.error_text
    assert await dead_letter_reasons(pool, control) == ["facility-not-certified"]
    assert await count(pool, "SELECT count(*) FROM hl7_message WHERE control_id = $1", control) == 0


async def test_the_lab_simulator_sends_over_mutual_tls_as_its_certificate_s_facility(
    start_server: Callable[..., object], pki: Pki
) -> None:
    server = await bound_server(start_server, pki)
    assert server.port is not None
    config = LabConfig(
        port=server.port,
        count=6,
        rate=0,
        control_prefix=f"{control_id()}-",
        quiet=True,
        facility="client",
        tls_ca=pki.ca,
        tls_cert=pki.client_cert,
        tls_key=pki.client_key,
    )
    report = await run_lab(config)
    assert (report.codes["AA"], report.unanswered, report.reconnects) == (6, 0, 0)


async def test_a_lab_system_with_a_revoked_certificate_is_refused_and_counted(
    start_server: Callable[..., object], deployed: Path, metrics: Metrics
) -> None:
    server = await start_server(  # type: ignore[misc]
        tls_cert=deployed / "gateway.crt",
        tls_key=deployed / "gateway.key",
        tls_client_ca=deployed / "ca.crt",
        tls_crl=deployed / "crl.pem",
    )
    assert isinstance(server, MllpServer)
    assert server.port is not None
    [revoked] = (deployed / "senders" / "revoked").glob("CR-UNIT-66-*.crt")
    before = handshake_failures(metrics, "certificate")
    config = LabConfig(
        port=server.port,
        count=1,
        rate=0,
        control_prefix=f"{control_id()}-",
        quiet=True,
        retry_timeout=0.5,
        tls_ca=deployed / "ca.crt",
        tls_cert=revoked,
        tls_key=revoked.with_suffix(".key"),
    )
    report = await run_lab(config)
    assert (report.codes["AA"], report.unanswered) == (0, 1)
    assert handshake_failures(metrics, "certificate") > before


def handshake_failures(metrics: Metrics, reason: str) -> float:
    labels = {"listener": "mllp", "reason": reason}
    return metrics.sample("qantara_tls_handshake_failures_total", labels) or 0.0


async def test_tls_listener_counts_a_client_whose_certificate_another_ca_signed(
    start_server: Callable[..., object], pki: Pki, metrics: Metrics
) -> None:
    server = await start_server(  # type: ignore[misc]
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    )
    assert isinstance(server, MllpServer)
    assert server.port is not None
    before = handshake_failures(metrics, "certificate")
    try:
        async with MllpClient(
            "127.0.0.1", server.port, ssl_context=stranger_context(pki)
        ) as client:
            await client.send(encode(oru(control_id(), f"{new_id()}^^^CIN^NI")))
            await client.read_frame(timeout=5)
    except (ssl.SSLError, ConnectionError):
        pass
    await wait_until(lambda: handshake_failures(metrics, "certificate") == before + 1, timeout=10)


async def test_tls_listener_counts_plain_mllp_as_protocol_and_serves_on(
    start_server: Callable[..., object], pki: Pki, metrics: Metrics
) -> None:
    server = await start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)  # type: ignore[misc]
    assert isinstance(server, MllpServer)
    assert server.port is not None
    before = handshake_failures(metrics, "protocol")
    try:
        async with MllpClient("127.0.0.1", server.port) as client:
            await client.send(encode(oru(control_id(), f"{new_id()}^^^CIN^NI")))
            assert await client.read_frame(timeout=5) is None
    except ConnectionError:
        pass
    await wait_until(lambda: handshake_failures(metrics, "protocol") == before + 1, timeout=10)
    context = client_context(pki, with_certificate=False)
    async with MllpClient("127.0.0.1", server.port, ssl_context=context) as client:
        ack = await client.request(encode(oru(control_id(), f"{new_id()}^^^CIN^NI")))
    assert ack.code == "AA"


# --- strict validation through the server (hl7apy in a worker thread) ----------------------------


def misplaced_pv1(control: str, app: str) -> str:
    """An ORU our mapping accepts (PV1 ignored) that breaks ORU_R01's structure for hl7apy."""
    return oru(control, f"{new_id()}^^^CIN^NI", app=app) + "PV1|1|O\r"


async def test_strict_sender_gets_ae_with_hl7apy_text_for_a_structurally_invalid_message(
    start_server: Callable[..., object], pool: asyncpg.Pool
) -> None:
    server = await start_server(strict_senders=frozenset({"STRICTLAB"}))  # type: ignore[misc]
    assert isinstance(server, MllpServer)
    control = control_id()
    text = misplaced_pv1(control, "STRICTLAB")
    expected = await validate_structure(parse_message(encode(text)))
    assert expected is not None
    async with connect(server) as client:
        ack = await client.request(encode(text), timeout=30)
    assert (ack.code, ack.acknowledged, ack.error_text) == ("AE", control, expected)
    assert await count(pool, "SELECT count(*) FROM hl7_message WHERE control_id = $1", control) == 0


async def test_non_strict_sender_gets_aa_for_the_same_structurally_invalid_message(
    start_server: Callable[..., object], pool: asyncpg.Pool
) -> None:
    server = await start_server(strict_senders=frozenset({"STRICTLAB"}))  # type: ignore[misc]
    assert isinstance(server, MllpServer)
    control = control_id()
    async with connect(server) as client:
        ack = await client.request(encode(misplaced_pv1(control, "LAB")))
    assert (ack.code, ack.acknowledged) == ("AA", control)
    assert await observations_of(pool, control) == 5


# --- what the writer stores ----------------------------------------------------------------------


async def test_oru_fills_only_the_demographics_a_known_patient_lacks(
    server: MllpServer, pool: asyncpg.Pool
) -> None:
    cin = new_id()
    async with connect(server) as client:
        known = adt(
            control_id(), "A28", f"{cin}^^^CIN^NI", "Alaoui^Karim", birth="19700101", sex=""
        )
        assert (await client.request(encode(known))).code == "AA"
        # The ORU's PID says Benali^Fatima, born 1980-02-14, F: only the sex is missing.
        assert (await client.request(encode(oru(control_id(), f"{cin}^^^CIN^NI")))).code == "AA"
    row = await pool.fetchrow(
        """SELECT p.names::text AS names, p.birth_date::text AS birth, p.gender
           FROM patient p JOIN patient_identifier i ON i.patient_id = p.id
           WHERE i.system = 'CIN' AND i.value = $1""",
        cin,
    )
    assert row is not None
    assert (row["birth"], row["gender"]) == ("1970-01-01", "female")
    assert "Alaoui" in row["names"]
    assert "Benali" not in row["names"]


async def test_abnormal_flags_are_stored_as_sent_also_one_holding_the_unit_separator(
    server: MllpServer, pool: asyncpg.Pool
) -> None:
    plain, odd = control_id(), control_id()
    obx_plain = ["OBX|1|NM|718-7^Hemoglobin^LN||17.2|g/dL|12.0-16.0|H~A|||F"]
    obx_odd = ["OBX|1|NM|718-7^Hemoglobin^LN||9.1|g/dL|12.0-16.0|L\\X1F\\X|||F"]
    async with connect(server) as client:
        for control, obx in ((plain, obx_plain), (odd, obx_odd)):
            ack = await client.request(encode(oru(control, f"{new_id()}^^^CIN^NI", obx=obx)))
            assert ack.code == "AA"
    rows = await pool.fetch(
        """SELECT m.control_id, o.abnormal_flags FROM lab_observation o
           JOIN lab_report r ON r.id = o.report_id JOIN hl7_message m ON m.id = r.message_id
           WHERE m.control_id = ANY($1::text[])""",
        [plain, odd],
    )
    flags = {r["control_id"]: r["abnormal_flags"] for r in rows}
    assert flags == {plain: ["H", "A"], odd: ["L\x1fX"]}
