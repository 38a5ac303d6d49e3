"""A region's worth of senders against one gateway: `qantara simulate fleet`.

In one `asyncio.TaskGroup`: `units` mobile units (`simulators.unit.UnitAgent`: SQLite outbox,
QoS 1, replay above the gateway's ack watermark, flaky links), `labs` lab analyzers (ORU^R01 over
MLLP, one message at a time per connection, resend on a broken connection) and `modalities`
radiology modalities (C-STORE of CR, DX, US, CT studies, one association per study). They send for
`duration` seconds at realistic rates, then the units drain their outboxes (bounded by
`drain_timeout`). A progress line shows sent and acknowledged counts while it runs; the summary
says what was sent, acknowledged, lost and duplicated.

Lost and duplicated are read from the gateway's database when `database_url` is given: every
unit seq generated in this run must be in the MQTT ledger, every acknowledged HL7 message must be
stored with exactly one lab report, every DICOM instance answered 0x0000 must be indexed once,
and the vital rows of the run must equal the samples the ledger says were stored. Without a
database they come from the acknowledgements alone (a sender that is not acknowledged counts as
lost; duplicates cannot be seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import random
import re
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Final

import asyncpg
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from simulators.association_outcome import associate
from simulators.lab import LabConfig, LabReport, run_lab
from simulators.modality import SOP_CLASSES, study_datasets
from simulators.outbox import Outbox
from simulators.population import REGIONS, Population, plan_fleet
from simulators.unit import BrokerAddress, LinkPolicy, UnitAgent
from simulators.vitals import ConsultationStream, equip_unit

__all__ = ["FleetConfig", "FleetReport", "Integrity", "run_fleet"]

_PREFIX = re.compile(r"[A-Za-z0-9_.-]*")
PANEL_SIZE = 150
MODALITY_ROTATION = ("CR", "DX", "US", "CT", "CR")  # 5 modalities: two CR rooms in a region
CHARSETS = ("ISO_IR 100", "ISO_IR 127", "ISO_IR 192")
DICOM_SUCCESS = 0x0000


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """Everything `qantara simulate fleet` takes. Rates are per sender."""

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    host: str = "127.0.0.1"  # MLLP and DICOM
    mllp_port: int = 2575
    dicom_port: int = 11112
    called_ae: str = "QANTARA"
    units: int = 100
    labs: int = 10
    modalities: int = 5
    duration: float = 60.0
    unit_rate: float = 1.0  # messages per second per unit hub (each a reading of one device)
    flaky: float = 0.01  # probability per second that a unit's link drops (1 to 20 s)
    lab_rate: float = 0.2  # ORU^R01 per second per analyzer (12 a minute)
    study_interval: float = 60.0  # seconds between two studies of one modality
    database_url: str | None = None
    state_dir: Path = field(default_factory=lambda: Path("var/simulator/fleet"))
    seed: int = 1
    resend_after: float = 10.0
    drain_timeout: float = 120.0
    unit_prefix: str = "UMMC-"
    progress_every: float = 2.0
    quiet: bool = False

    def __post_init__(self) -> None:
        if min(self.units, self.labs, self.modalities) < 0:
            raise ValueError("units, labs and modalities must be >= 0")
        if self.units + self.labs + self.modalities == 0:
            raise ValueError("a fleet needs at least one sender")
        if self.duration <= 0 or self.drain_timeout < 0:
            raise ValueError("duration must be > 0 and drain_timeout >= 0")
        if min(self.unit_rate, self.lab_rate, self.study_interval, self.resend_after) <= 0:
            raise ValueError("rates, study_interval and resend_after must be > 0")
        if not 0.0 <= self.flaky <= 1.0:
            raise ValueError("flaky is a probability per second, between 0 and 1")
        if self.progress_every <= 0:
            raise ValueError("progress_every must be > 0")
        if not _PREFIX.fullmatch(self.unit_prefix):
            raise ValueError("unit_prefix may hold only letters, digits, '_', '.', '-'")
        BrokerAddress.parse(self.mqtt_url)


@dataclass(frozen=True, slots=True)
class Integrity:
    """What the gateway's database says about this run (None: not checked)."""

    lost: int
    duplicated: int
    detail: str


@dataclass(frozen=True, slots=True)
class FleetReport:
    units: int
    labs: int
    modalities: int
    unit_messages: int  # generated in this run
    unit_acked: int  # covered by the gateway's watermark
    unit_resent: int
    link_drops: int
    hl7_sent: int
    hl7_acked: int  # AA or CA
    hl7_codes: dict[str, int]
    dicom_sent: int
    dicom_acked: int  # status 0x0000
    dicom_statuses: dict[str, int]
    drained: bool
    elapsed_s: float
    integrity: Integrity | None

    @property
    def sent(self) -> int:
        return self.unit_messages + self.hl7_sent + self.dicom_sent

    @property
    def acked(self) -> int:
        return self.unit_acked + self.hl7_acked + self.dicom_acked

    @property
    def lost(self) -> int:
        if self.integrity is not None:
            return self.integrity.lost
        return self.sent - self.acked

    @property
    def duplicated(self) -> int | None:
        return self.integrity.duplicated if self.integrity is not None else None

    @property
    def ok(self) -> bool:
        return self.drained and self.lost == 0 and not self.duplicated and self.sent == self.acked

    def summary(self) -> str:
        dup = "n/a (no --database-url)" if self.duplicated is None else str(self.duplicated)
        source = "database" if self.integrity is not None else "acks"
        return (
            f"fleet: {self.units} units, {self.labs} labs, {self.modalities} modalities in"
            f" {self.elapsed_s:.0f}s; sent {self.sent} acked {self.acked}"
            f" (mqtt {self.unit_messages}/{self.unit_acked} resent {self.unit_resent}"
            f" link drops {self.link_drops}; hl7 {self.hl7_sent}/{self.hl7_acked};"
            f" dicom {self.dicom_sent}/{self.dicom_acked});"
            f" lost={self.lost} duplicated={dup} (from the {source})"
            f" drained={'yes' if self.drained else 'no'}"
        )


@dataclass(slots=True)
class _DicomSender:
    modality: str
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    stored_uids: list[str] = field(default_factory=list)


async def run_fleet(cfg: FleetConfig) -> FleetReport:
    """Run the fleet for `cfg.duration`, drain the units, check, report."""
    loop = asyncio.get_running_loop()
    run_tag = f"{datetime.now(UTC):%Y%m%d%H%M%S}{secrets.token_hex(2)}"
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    started_wall = datetime.now(UTC)
    started = loop.time()
    today = datetime.now(UTC).date()
    with contextlib.ExitStack() as stack:
        outboxes: list[Outbox] = []
        agents = _unit_agents(cfg, today, stack, outboxes)
        first_seqs = {a.unit_id: box.next_seq for a, box in zip(agents, outboxes, strict=True)}
        labs = _lab_configs(cfg, run_tag)
        lab_reports: list[LabReport] = []
        dicom = [
            _DicomSender(MODALITY_ROTATION[i % len(MODALITY_ROTATION)])
            for i in range(cfg.modalities)
        ]
        sending_over = threading.Event()  # tells the modality threads to stop on an error
        units_stop = asyncio.Event()
        drained = True

        async def units_then_drain() -> None:
            nonlocal drained
            async with asyncio.TaskGroup() as units_group:
                tasks = [units_group.create_task(a.run(units_stop)) for a in agents]
                await _all_set(a.generation_done for a in agents)
                try:
                    async with asyncio.timeout(cfg.drain_timeout):
                        await _all_set(a.drained for a in agents)
                except TimeoutError:
                    drained = False
                units_stop.set()
                _, late = await asyncio.wait(tasks, timeout=10) if tasks else (set(), set())
                for task in late:
                    task.cancel()

        async def one_lab(lab: LabConfig) -> None:
            lab_reports.append(await run_lab(lab))

        async def modalities() -> None:
            deadline = time.monotonic() + cfg.duration
            await asyncio.gather(
                *(
                    asyncio.to_thread(_send_studies, cfg, n, sender, deadline, sending_over)
                    for n, sender in enumerate(dicom)
                )
            )

        try:
            async with asyncio.TaskGroup() as group:
                progress = None
                if not cfg.quiet:
                    progress = group.create_task(
                        _progress(cfg, agents, labs, dicom, started, cfg.progress_every)
                    )
                senders = [
                    group.create_task(units_then_drain()),
                    *(group.create_task(one_lab(lab)) for lab in labs),
                    group.create_task(modalities()),
                ]
                await asyncio.wait(senders)
                if progress is not None:
                    progress.cancel()
        finally:
            sending_over.set()
        if not cfg.quiet:
            sys.stderr.write("\n")
        unit_stats = [a.stats() for a in agents]
        last_seqs = {a.unit_id: box.next_seq - 1 for a, box in zip(agents, outboxes, strict=True)}

    hl7_acked = _acked_controls(labs)
    integrity = None
    if cfg.database_url is not None:
        integrity = await check_database(
            cfg.database_url,
            seqs={u: (first_seqs[u], last_seqs[u]) for u in first_seqs},
            since=started_wall,
            hl7_acked=hl7_acked,
            dicom_uids=[uid for sender in dicom for uid in sender.stored_uids],
        )
    hl7_codes: Counter[str] = Counter()
    for report in lab_reports:
        hl7_codes.update(report.codes)
    dicom_statuses: Counter[str] = Counter()
    for sender in dicom:
        dicom_statuses.update(sender.statuses)
    return FleetReport(
        units=len(agents),
        labs=len(labs),
        modalities=len(dicom),
        unit_messages=sum(s.generated for s in unit_stats),
        unit_acked=sum(s.acked for s in unit_stats),
        unit_resent=sum(s.resent for s in unit_stats),
        link_drops=sum(s.link_drops for s in unit_stats),
        hl7_sent=sum(r.sent for r in lab_reports),
        hl7_acked=hl7_codes["AA"] + hl7_codes["CA"],
        hl7_codes=dict(hl7_codes),
        dicom_sent=sum(s.sent for s in dicom),
        dicom_acked=sum(len(s.stored_uids) for s in dicom),
        dicom_statuses=dict(dicom_statuses),
        drained=drained,
        elapsed_s=loop.time() - started,
        integrity=integrity,
    )


# --- the senders ------------------------------------------------------------------------------


def _unit_agents(
    cfg: FleetConfig, today: date, stack: contextlib.ExitStack, outboxes: list[Outbox]
) -> list[UnitAgent]:
    broker = BrokerAddress.parse(cfg.mqtt_url)
    policy = LinkPolicy(resend_after=cfg.resend_after, flaky=cfg.flaky)
    population = Population(today)
    agents = []
    for deployment in plan_fleet(cfg.units, cfg.unit_prefix):
        local_id = deployment.unit_id.removeprefix(cfg.unit_prefix)
        rng = random.Random(f"{cfg.seed}:{local_id}")
        panel = population.panel(rng, deployment.province, PANEL_SIZE)
        stream = ConsultationStream(
            equip_unit(rng), functools.partial(rng.choice, panel), rng, today=today
        )
        outbox = stack.enter_context(Outbox(cfg.state_dir / f"{deployment.unit_id}.sqlite3"))
        outboxes.append(outbox)
        agents.append(
            UnitAgent(
                deployment.unit_id,
                broker=broker,
                outbox=outbox,
                stream=stream,
                rate=cfg.unit_rate,
                duration=cfg.duration,
                policy=policy,
                rng=random.Random(f"{cfg.seed}:{local_id}:link"),
            )
        )
    return agents


def _lab_configs(cfg: FleetConfig, run_tag: str) -> list[LabConfig]:
    count = max(1, math.ceil(cfg.duration * cfg.lab_rate))
    return [
        LabConfig(
            host=cfg.host,
            port=cfg.mllp_port,
            count=count,
            rate=cfg.lab_rate,
            connections=1,
            seed=cfg.seed * 100 + n,
            app=f"QLAB-{n + 1:02d}",
            facility=f"LABO-{REGIONS[n % len(REGIONS)].code}",
            control_prefix=f"{run_tag}-",  # a new run is new messages, not resends
            ack_log=cfg.state_dir / f"lab-{n + 1:02d}-{run_tag}.acks",
            quiet=True,
        )
        for n in range(cfg.labs)
    ]


def _acked_controls(labs: Sequence[LabConfig]) -> list[tuple[str, str, str]]:
    """(MSH-3, MSH-4, MSH-10) of each message answered AA/CA; the ack logs are removed."""
    acked: list[tuple[str, str, str]] = []
    for lab in labs:
        assert lab.ack_log is not None  # noqa: S101 - set by _lab_configs
        acked.extend((lab.app, lab.facility, line) for line in _read_lines(lab.ack_log))
        lab.ack_log.unlink(missing_ok=True)
    return acked


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


RETRYABLE: Final = frozenset({"0xA700", "no answer", "not sent"})
"""Outcomes a modality's send queue retries with its next association: the gateway out of
resources (its database or disk away), an association lost before the answer."""


def _send_studies(
    cfg: FleetConfig, index: int, sender: _DicomSender, deadline: float, over: threading.Event
) -> None:
    """Blocking (a thread): one study every `study_interval` seconds until the deadline, through
    a send queue as modalities keep one: an instance answered 0xA700 or not answered, or a
    study that got no association, goes again with the next study's association, and once
    more at the end."""
    rng = random.Random(f"{cfg.seed}:modality:{index}")
    population = Population(datetime.now(UTC).date())
    region = REGIONS[index % len(REGIONS)]
    ae = AE(ae_title=f"SIM-{sender.modality}-{index + 1:02d}")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(SOP_CLASSES[sender.modality], [ExplicitVRLittleEndian])
    start = time.monotonic() + rng.uniform(0, min(cfg.study_interval, 5.0))
    study = 0
    queue: list[Dataset] = []
    last: dict[str, str] = {}  # SOP Instance UID -> its latest retryable outcome
    while True:
        due = start + study * cfg.study_interval
        if due >= deadline or over.wait(max(0.0, due - time.monotonic())):
            break
        patient = population.patient(rng, rng.choice(region.provinces))
        datasets = study_datasets(
            patient, sender.modality, CHARSETS[study % len(CHARSETS)], rng, datetime.now(UTC)
        )
        study += 1
        sender.sent += len(datasets)
        queue = _send_queue(ae, cfg, sender, [*queue, *datasets], last)
    if queue and not over.is_set():
        queue = _send_queue(ae, cfg, sender, queue, last)
    for ds in queue:
        sender.statuses[last[str(ds.SOPInstanceUID)]] += 1


def _send_queue(
    ae: AE, cfg: FleetConfig, sender: _DicomSender, queue: list[Dataset], last: dict[str, str]
) -> list[Dataset]:
    """Send `queue` on one association; the instances to send again. The others' final
    statuses are counted in `sender`."""
    assoc, no_association = associate(ae, cfg.host, cfg.dicom_port, ae_title=cfg.called_ae)
    if no_association is not None:
        last.update((str(ds.SOPInstanceUID), no_association) for ds in queue)
        return queue
    again: list[Dataset] = []
    try:
        for ds in queue:
            uid = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                last[uid] = "not sent"
                again.append(ds)
                continue
            answer = assoc.send_c_store(ds)
            code = int(answer.Status) if "Status" in answer else None
            outcome = "no answer" if code is None else f"0x{code:04X}"
            if outcome in RETRYABLE:
                last[uid] = outcome
                again.append(ds)
                continue
            sender.statuses[outcome] += 1
            if code == DICOM_SUCCESS:
                sender.stored_uids.append(uid)
    finally:
        if assoc.is_established:
            assoc.release()
    return again


# --- progress ---------------------------------------------------------------------------------


async def _progress(
    cfg: FleetConfig,
    agents: Sequence[UnitAgent],
    labs: Sequence[LabConfig],
    dicom: Sequence[_DicomSender],
    started: float,
    every: float,
) -> None:
    loop = asyncio.get_running_loop()
    live = sys.stderr.isatty()
    while True:
        await asyncio.sleep(every)
        stats = [a.stats() for a in agents]
        hl7_acked = sum(len(_read_lines(lab.ack_log)) for lab in labs if lab.ack_log)
        line = (
            f"[fleet] {loop.time() - started:5.0f}s/{cfg.duration:.0f}s"
            f" units online {sum(s.online for s in stats)}/{len(stats)}"
            f" mqtt sent {sum(s.generated for s in stats)} acked {sum(s.acked for s in stats)}"
            f" pending {sum(s.pending for s in stats)} drops {sum(s.link_drops for s in stats)}"
            f" | hl7 acked {hl7_acked}"
            f" | dicom sent {sum(d.sent for d in dicom)}"
            f" stored {sum(len(d.stored_uids) for d in dicom)}"
        )
        sys.stderr.write(f"\r{line}\x1b[K" if live else f"{line}\n")
        sys.stderr.flush()


# --- what the database holds ------------------------------------------------------------------


async def check_database(
    database_url: str,
    *,
    seqs: dict[str, tuple[int, int]],
    since: datetime,
    hl7_acked: Sequence[tuple[str, str, str]],
    dicom_uids: Sequence[str],
) -> Integrity:
    """Lost and duplicated, from the gateway's tables (see the module docstring).

    The MQTT figures count the dedup ledger's rows, which the gateway prunes below each unit's
    watermark beyond its newest `QANTARA_MQTT_LEDGER_KEEP` (10,000): a run of more seqs per unit
    than that needs the gateway started with `QANTARA_MQTT_LEDGER_PRUNE_INTERVAL=0`.
    """
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        units = [u for u, (first, last) in seqs.items() if last >= first]
        row = await conn.fetchrow(
            """SELECT count(m.seq) AS ledger, coalesce(sum(m.samples), 0) AS samples
               FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS r(name, first, last)
               JOIN unit u ON u.name = r.name
               JOIN mqtt_message m ON m.unit_id = u.id AND m.seq BETWEEN r.first AND r.last""",
            units,
            [seqs[u][0] for u in units],
            [seqs[u][1] for u in units],
        )
        assert row is not None  # noqa: S101 - an aggregate returns one row
        expected = sum(last - first + 1 for first, last in seqs.values() if last >= first)
        mqtt_lost = expected - int(row["ledger"])
        # Vital rows received since the start, for these units, against the samples the ledger
        # says were stored: a replay stored twice shows up as extra rows.
        vitals = await conn.fetchval(
            """SELECT count(*) FROM vital v
               JOIN device d ON d.id = v.device_id JOIN unit u ON u.id = d.unit_id
               WHERE u.name = ANY($1::text[]) AND v.received_at >= $2""",
            units,
            since,
        )
        window_samples = await conn.fetchval(
            """SELECT coalesce(sum(m.samples), 0) FROM mqtt_message m
               JOIN unit u ON u.id = m.unit_id
               WHERE u.name = ANY($1::text[]) AND m.received_at >= $2
                 AND m.outcome = 'stored'""",
            units,
            since,
        )
        mqtt_dup = int(vitals) - int(window_samples)
        hl7 = await conn.fetchrow(
            """SELECT count(DISTINCT h.id) AS messages, count(r.id) AS reports
               FROM unnest($1::text[], $2::text[], $3::text[]) AS k(app, facility, control)
               JOIN hl7_message h ON h.sending_application = k.app
                    AND h.sending_facility = k.facility AND h.control_id = k.control
               LEFT JOIN lab_report r ON r.message_id = h.id""",
            [k[0] for k in hl7_acked],
            [k[1] for k in hl7_acked],
            [k[2] for k in hl7_acked],
        )
        assert hl7 is not None  # noqa: S101 - an aggregate returns one row
        hl7_lost = len(set(hl7_acked)) - int(hl7["messages"])
        hl7_dup = int(hl7["reports"]) - int(hl7["messages"])  # one OBR per simulated ORU
        dicom_found = await conn.fetchval(
            "SELECT count(*) FROM dicom_instance WHERE sop_instance_uid = ANY($1::text[])",
            list(dicom_uids),
        )
        dicom_lost = len(set(dicom_uids)) - int(dicom_found)
    finally:
        await conn.close()
    detail = (
        f"mqtt lost {mqtt_lost} dup {mqtt_dup} (ledger {row['ledger']}/{expected},"
        f" vital rows {vitals}/{window_samples}); hl7 lost {hl7_lost} dup {hl7_dup};"
        f" dicom lost {dicom_lost}"
    )
    return Integrity(
        lost=mqtt_lost + hl7_lost + dicom_lost,
        duplicated=max(mqtt_dup, 0) + max(hl7_dup, 0),
        detail=detail,
    )


# --- small helpers ----------------------------------------------------------------------------


async def _all_set(events: Iterable[asyncio.Event]) -> None:
    await asyncio.gather(*(event.wait() for event in events))
