"""A lab analyzer / LIS sending ORU^R01 results over MLLP, the way real ones do.

Each connection sends one message, waits for its acknowledgement, then sends the next (no
pipelining), at a total rate shared by the connections. Messages are CBC, chemistry and HbA1c
panels for a deterministic population (from `seed`) with Arabic and French names, encoded in
UTF-8, ISO 8859-1 (French) or ISO 8859-6 (Arabic) as MSH-18 declares. A connection that breaks
(gateway restart) is re-opened with backoff and the unacknowledged message is sent again, as an
LIS does, until `retry_timeout` passes without progress. A message answered AE with ERR-3 207
(application internal error: what the gateway answers when its storage is unavailable) is sent
again with backoff for `ae_retry_for` seconds, as an LIS's retry queue does; any other AE is
final. `resend` replays every message once more at the end (each must be answered AA again, and
nothing stored twice).

The report counts acknowledgements by MSA-1; `ack_log` receives the MSH-10 of every message
answered AA or CA, one per line, flushed as they come (what the kill test checks against).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from hl7.er7 import Hl7Message, parse_message
from ingest.errors import InputError
from simulators.tls_client import client_context

START, END = b"\x0b", b"\x1c\x0d"
CHARSET_CODECS = {"UNICODE UTF-8": "utf-8", "8859/1": "iso8859-1", "8859/6": "iso8859-6"}

FRENCH_FAMILIES = ("Lefèvre", "Benoît", "Mercier", "Gauthier", "Dubois", "Chevalier", "Lemaître")
FRENCH_GIVEN = ("Hélène", "Noël", "Zoé", "Jérôme", "Amélie", "François", "Loïc", "Maëlle")
LATIN_MOROCCAN_FAMILIES = ("Benali", "El Amrani", "Ouazzani", "Tazi", "Bennani", "Alaoui")
LATIN_MOROCCAN_GIVEN = ("Fatima Zahra", "Mohammed", "Khadija", "Youssef", "Salma", "Hamza")
ARABIC_FAMILIES = ("بنعلي", "العمراني", "الوزاني", "التازي", "بناني", "العلوي")
ARABIC_GIVEN = ("فاطمة الزهراء", "محمد", "خديجة", "يوسف", "سلمى", "حمزة")

# (LOINC, display, UCUM unit, low, high, typical, spread, decimals)
Analyte = tuple[str, str, str, float, float, float, float, int]
PANELS: dict[str, tuple[str, str, tuple[Analyte, ...]]] = {
    "cbc": (
        "58410-2",
        "CBC panel - Blood by Automated count",
        (
            ("6690-2", "Leukocytes [#/volume] in Blood", "10*3/uL", 4.0, 10.0, 7.0, 2.5, 1),
            ("789-8", "Erythrocytes [#/volume] in Blood", "10*6/uL", 4.2, 5.4, 4.8, 0.5, 2),
            ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 12.0, 16.0, 13.8, 1.6, 1),
            ("4544-3", "Hematocrit [Volume Fraction] of Blood", "%", 36.0, 46.0, 41.0, 4.0, 1),
            ("787-2", "MCV [Entitic volume]", "fL", 80.0, 100.0, 89.0, 6.0, 1),
            ("785-6", "MCH [Entitic mass]", "pg", 27.0, 33.0, 30.0, 2.0, 1),
            ("786-4", "MCHC [Mass/volume]", "g/dL", 32.0, 36.0, 34.0, 1.0, 1),
            ("777-3", "Platelets [#/volume] in Blood", "10*3/uL", 150.0, 400.0, 260.0, 70.0, 0),
            ("770-8", "Neutrophils/100 leukocytes in Blood", "%", 40.0, 75.0, 58.0, 9.0, 1),
            ("736-9", "Lymphocytes/100 leukocytes in Blood", "%", 20.0, 45.0, 31.0, 8.0, 1),
        ),
    ),
    "chem": (
        "24323-8",
        "Comprehensive metabolic panel - Serum or Plasma",
        (
            ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70, 100, 92, 20, 0),
            (
                "2160-0",
                "Creatinine [Mass/volume] in Serum or Plasma",
                "mg/dL",
                0.6,
                1.2,
                0.9,
                0.3,
                2,
            ),
            ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL", 7, 20, 14, 5, 0),
            ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 136, 145, 140, 3, 0),
            (
                "2823-3",
                "Potassium [Moles/volume] in Serum or Plasma",
                "mmol/L",
                3.5,
                5.1,
                4.2,
                0.5,
                1,
            ),
            ("2075-0", "Chloride [Moles/volume] in Serum or Plasma", "mmol/L", 98, 107, 102, 3, 0),
            (
                "1742-6",
                "ALT [Enzymatic activity/volume] in Serum or Plasma",
                "U/L",
                7,
                56,
                28,
                15,
                0,
            ),
            (
                "1920-8",
                "AST [Enzymatic activity/volume] in Serum or Plasma",
                "U/L",
                10,
                40,
                24,
                10,
                0,
            ),
            ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 0, 200, 185, 35, 0),
            (
                "2571-8",
                "Triglyceride [Mass/volume] in Serum or Plasma",
                "mg/dL",
                0,
                150,
                130,
                50,
                0,
            ),
        ),
    ),
    "hba1c": (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        (("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.0, 5.6, 6.1, 1.4, 1),),
    ),
}


@dataclass(frozen=True, slots=True)
class LabConfig:
    host: str = "127.0.0.1"
    port: int = 2575
    count: int = 100
    rate: float = 10.0  # messages per second over all connections; 0: as fast as acked
    connections: int = 1
    resend: bool = False
    seed: int = 1
    patients: int = 500
    retry_timeout: float = 30.0
    ae_retry_for: float = 300.0  # an AE 207 (storage unavailable) is sent again this long
    ack_timeout: float = 60.0
    app: str = "QLAB-SIM"
    facility: str = "LABO-CENTRAL"
    control_prefix: str = ""
    ack_log: Path | None = None
    quiet: bool = False
    tls_ca: Path | None = None  # MLLP over TLS, the gateway's certificate checked against it
    tls_cert: Path | None = None  # with tls_key: our certificate, for mutual TLS
    tls_key: Path | None = None


@dataclass(slots=True)
class LabReport:
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    resent_after_ae: int = 0  # AE 207 (storage unavailable), then sent again
    unanswered: int = 0
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> str:
        rate = self.sent / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"lab: sent {self.sent} in {self.elapsed:.1f}s ({rate:.0f} msg/s); "
            f"AA {self.codes['AA']} CA {self.codes['CA']} AE {self.codes['AE']} "
            f"AR {self.codes['AR']} other {sum(self.codes.values()) - self._known()}; "
            f"unanswered {self.unanswered}; reconnects {self.reconnects}; "
            f"resent after AE {self.resent_after_ae}; "
            f"ack latency p50 {self.percentile(0.5) * 1000:.1f} ms "
            f"p99 {self.percentile(0.99) * 1000:.1f} ms"
        )

    def _known(self) -> int:
        return sum(self.codes[c] for c in ("AA", "CA", "AE", "AR"))


@dataclass(frozen=True, slots=True)
class _Patient:
    cin: str
    mrn: str
    family: str
    given: str
    birth: str
    sex: str
    charset: str


def population(seed: int, size: int) -> list[_Patient]:
    """A deterministic population: a third Arabic (8859/6), a third French (8859/1), a third
    Moroccan names in Latin and Arabic script (UTF-8)."""
    rng = random.Random(seed)
    people = []
    for i in range(size):
        kind = i % 3
        if kind == 0:
            family, given, charset = (
                rng.choice(ARABIC_FAMILIES),
                rng.choice(ARABIC_GIVEN),
                "8859/6",
            )
        elif kind == 1:
            family, given, charset = (
                rng.choice(FRENCH_FAMILIES),
                rng.choice(FRENCH_GIVEN),
                "8859/1",
            )
        else:
            family = rng.choice(LATIN_MOROCCAN_FAMILIES) + "~" + rng.choice(ARABIC_FAMILIES)
            given, charset = rng.choice(LATIN_MOROCCAN_GIVEN), "UNICODE UTF-8"
        letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
        birth = datetime(1940, 1, 1, tzinfo=UTC) + timedelta(days=rng.randrange(0, 80 * 365))
        people.append(
            _Patient(
                cin=f"{letters}{rng.randrange(100000, 999999)}",
                mrn=f"L{seed}-{i:06d}",
                family=family,
                given=given,
                birth=birth.strftime("%Y%m%d"),
                sex=rng.choice("MF"),
                charset=charset,
            )
        )
    return people


def _name_field(p: _Patient) -> str:
    if "~" in p.family:  # Latin name, then the Arabic script name as a second repetition
        latin, arabic = p.family.split("~")
        return f"{latin}^{p.given}^^^^^L~{arabic}^^^^^^"
    return f"{p.family}^{p.given}^^^^^L"


def build_oru(index: int, patient: _Patient, config: LabConfig, rng: random.Random) -> bytes:
    """One ORU^R01 (v2.5.1) for `patient`, encoded in the patient's charset."""
    panel = ("cbc", "chem", "hba1c")[index % 3]
    service, service_name, analytes = PANELS[panel]
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%d%H%M%S") + "+0000"
    collected = (now - timedelta(minutes=45)).strftime("%Y%m%d%H%M%S") + "+0000"
    control = f"{config.control_prefix}{config.seed}-{index:08d}"
    segments = [
        f"MSH|^~\\&|{config.app}|{config.facility}|QANTARA|MOH|{stamp}||ORU^R01^ORU_R01|"
        f"{control}|P|2.5.1||||||{patient.charset}",
        f"PID|1||{patient.cin}^^^CIN^NI~{patient.mrn}^^^{config.facility}^MR||"
        f"{_name_field(patient)}||{patient.birth}|{patient.sex}",
        f"OBR|1|ORD{index:08d}|LAB{index:08d}|{service}^{service_name}^LN|||{collected}"
        + "|" * 15
        + f"{stamp}|||F",
    ]
    for n, (code, display, unit, low, high, typical, spread, decimals) in enumerate(analytes, 1):
        value = max(0.0, rng.gauss(typical, spread / 2))
        flag = "L" if value < low else "H" if value > high else "N"
        text = f"{value:.{decimals}f}"
        segments.append(
            f"OBX|{n}|NM|{code}^{display}^LN||{text}|{unit}|{low:g}-{high:g}|{flag}|||F|||{collected}"
        )
    text = "\r".join(segments) + "\r"
    # Latin-1 patients get the French comment; Arabic ones a note in Arabic; UTF-8 both.
    return text.encode(CHARSET_CODECS[patient.charset])


def messages(config: LabConfig) -> Iterator[tuple[str, bytes]]:
    """(MSH-10, bytes) of every message of a run, the same for the same seed."""
    people = population(config.seed, config.patients)
    rng = random.Random(config.seed * 7919 + 1)
    for i in range(config.count):
        patient = people[rng.randrange(len(people))]
        payload = build_oru(i, patient, config, rng)
        yield f"{config.control_prefix}{config.seed}-{i:08d}", payload


class _Link:
    """One MLLP connection that re-opens itself when the gateway goes away."""

    def __init__(self, config: LabConfig, report: LabReport) -> None:
        self._config = config
        self._report = report
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = b""
        self._tls = client_context(config.tls_ca, config.tls_cert, config.tls_key)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._reader = None
            self._buffer = b""

    async def request(self, payload: bytes) -> str | None:
        """Send until answered other than AE 207, for `ae_retry_for` at most (then that AE's
        code); the MSA-1 code, or None when `retry_timeout` passed without an answer."""
        give_up = time.monotonic() + self._config.ae_retry_for
        delay = 0.5
        while True:
            ack = await self._answer(payload)
            if ack is None:
                return None
            code = _msa_code(ack)
            if code != "AE" or not _storage_unavailable(ack) or time.monotonic() >= give_up:
                return code
            self._report.resent_after_ae += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _answer(self, payload: bytes) -> bytes | None:
        """Send until answered; the acknowledgement, or None when `retry_timeout` passed."""
        deadline = time.monotonic() + self._config.retry_timeout
        delay = 0.1
        while True:
            try:
                if self._writer is None or self._reader is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(
                            self._config.host, self._config.port, ssl=self._tls
                        ),
                        5,
                    )
                    self._reader, self._writer = reader, writer
                else:
                    reader, writer = self._reader, self._writer
                writer.write(START + payload + END)
                await writer.drain()
                async with asyncio.timeout(self._config.ack_timeout):
                    while END not in self._buffer:
                        chunk = await reader.read(65536)
                        if not chunk:
                            raise ConnectionResetError("closed by the gateway")
                        self._buffer += chunk
                end = self._buffer.index(END)
                ack = self._buffer[self._buffer.index(START) + 1 : end]
                self._buffer = self._buffer[end + 2 :]
                return ack
            except (OSError, TimeoutError):
                await self.close()
                if time.monotonic() > deadline:
                    return None
                self._report.reconnects += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


def _msa_code(ack: bytes) -> str:
    message = _parsed(ack)
    return (message.get("MSA", 1) if message else "") or "unreadable"


def _storage_unavailable(ack: bytes) -> bool:
    """ERR-3 207: the gateway could not commit the message in time and asks for it again."""
    message = _parsed(ack)
    return message is not None and message.get("ERR", 3) == "207"


def _parsed(ack: bytes) -> Hl7Message | None:
    for charset in (None, "8859/1", "8859/6"):
        try:
            return parse_message(ack) if charset is None else parse_message(ack, charset)
        except InputError:
            continue
    return None


async def run_lab(config: LabConfig) -> LabReport:
    """Send `count` messages (twice with `resend`); the acknowledgement counts."""
    report = LabReport()
    work = list(messages(config))
    if config.resend:
        work += work
    queue: asyncio.Queue[tuple[int, str, bytes]] = asyncio.Queue()
    for i, (control, payload) in enumerate(work):
        queue.put_nowait((i, control, payload))
    log: TextIO | None = None
    if config.ack_log is not None:
        log = config.ack_log.open("a", encoding="utf-8")
    started = time.monotonic()

    async def worker() -> None:
        link = _Link(config, report)
        try:
            while True:
                try:
                    i, control, payload = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if config.rate > 0:
                    wait = started + i / config.rate - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                sent = time.perf_counter()
                code = await link.request(payload)
                report.sent += 1
                if code is None:
                    report.unanswered += 1
                    continue
                report.latencies.append(time.perf_counter() - sent)
                report.codes[code] += 1
                if log is not None and code in ("AA", "CA"):
                    log.write(control + "\n")
                    log.flush()
        finally:
            await link.close()

    async def progress() -> None:
        while True:
            await asyncio.sleep(5)
            print(report.summary(), flush=True)  # noqa: T201 - the simulator's console

    ticker = None if config.quiet else asyncio.create_task(progress())
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, config.connections)):
                group.create_task(worker())
    finally:
        if ticker is not None:
            ticker.cancel()
        if log is not None:
            log.close()
    report.elapsed = time.monotonic() - started
    return report
