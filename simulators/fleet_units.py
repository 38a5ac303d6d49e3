"""A fleet of simulated mobile units: `qantara simulate units --count N --rate R --duration S`.

`run_units(UnitsConfig)` runs N `UnitAgent`s in one task group. Each generates R messages per
second for S seconds (into its outbox, link or no link), then the fleet drains: it keeps
forwarding until every outbox is empty (all covered by the gateway's ack watermark) or
`drain_timeout` expires. The returned `UnitsReport` says what was generated, published
(resends included), acknowledged and left pending.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from simulators.outbox import Outbox
from simulators.population import Population, plan_fleet
from simulators.unit import BrokerAddress, LinkPolicy, UnitAgent, UnitStats
from simulators.vitals import ConsultationStream, equip_unit

__all__ = ["UnitsConfig", "UnitsReport", "run_units"]

_UNIT_PREFIX = re.compile(r"[A-Za-z0-9_.-]*")
PANEL_SIZE = 150  # people one unit sees again and again in its province


@dataclass(frozen=True, slots=True)
class UnitsConfig:
    """Everything `qantara simulate units` takes; field names match its long options."""

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    count: int = 1
    rate: float = 1.0  # messages per second per unit
    duration: float = 60.0  # seconds of generation
    flaky: float = 0.0  # probability per second that a unit's link drops
    state_dir: Path = field(default_factory=lambda: Path("var/simulator/units"))
    seed: int = 0
    resend_after: float = 10.0
    drain_timeout: float = 60.0
    unit_prefix: str = "UMMC-"
    quiet: bool = False
    outage_scale: float = 1.0  # a dropped link stays down 1-20 s times this
    max_inflight: int = 100  # publishes awaiting PUBACK, per unit
    mqtt_protocol: str = "5"  # or "3.1.1"
    waveforms: bool = False  # add a one-second ECG lead II strip to ECG readings
    progress_every: float = 5.0
    stop_timeout: float = 10.0  # after the drain, how long units get to say goodbye

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("count must be >= 1")
        if self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.duration < 0 or self.drain_timeout < 0:
            raise ValueError("duration and drain_timeout must be >= 0")
        if not 0.0 <= self.flaky <= 1.0:
            raise ValueError("flaky is a probability per second, between 0 and 1")
        if self.resend_after <= 0 or self.outage_scale <= 0 or self.progress_every <= 0:
            raise ValueError("resend_after, outage_scale and progress_every must be > 0")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if not _UNIT_PREFIX.fullmatch(self.unit_prefix):
            raise ValueError("unit_prefix may hold only letters, digits, '_', '.', '-'")
        BrokerAddress.parse(self.mqtt_url, self.mqtt_protocol)  # fail early on a bad URL

    @staticmethod
    def add_arguments(
        parser: argparse.ArgumentParser, *, mqtt_url: str = "mqtt://127.0.0.1:1883"
    ) -> None:
        """Add the options of `qantara simulate units` (`mqtt_url`: the settings' default)."""
        defaults = UnitsConfig(mqtt_url=mqtt_url)
        add = parser.add_argument
        add("--mqtt-url", default=defaults.mqtt_url, help="mqtt://host:port or mqtts://")
        add("--count", type=int, default=defaults.count, help="number of units")
        add("--rate", type=float, default=defaults.rate, help="messages per second per unit")
        add("--duration", type=float, default=defaults.duration, help="seconds of generation")
        add("--flaky", type=float, default=defaults.flaky, help="link drop probability per s")
        add("--state-dir", type=Path, default=defaults.state_dir, help="outbox files")
        add("--seed", type=int, default=defaults.seed)
        add("--resend-after", type=float, default=defaults.resend_after)
        add("--drain-timeout", type=float, default=defaults.drain_timeout)
        add("--unit-prefix", default=defaults.unit_prefix)
        add("--outage-scale", type=float, default=defaults.outage_scale)
        add("--max-inflight", type=int, default=defaults.max_inflight)
        add("--mqtt-protocol", choices=("5", "3.1.1"), default=defaults.mqtt_protocol)
        add("--waveforms", action="store_true", help="ECG strips in ECG readings")
        add("--quiet", action="store_true", help="no progress lines on stderr")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> UnitsConfig:
        return cls(
            mqtt_url=args.mqtt_url,
            count=args.count,
            rate=args.rate,
            duration=args.duration,
            flaky=args.flaky,
            state_dir=Path(args.state_dir),
            seed=args.seed,
            resend_after=args.resend_after,
            drain_timeout=args.drain_timeout,
            unit_prefix=args.unit_prefix,
            quiet=args.quiet,
            outage_scale=args.outage_scale,
            max_inflight=args.max_inflight,
            mqtt_protocol=args.mqtt_protocol,
            waveforms=args.waveforms,
        )


@dataclass(frozen=True, slots=True)
class UnitsReport:
    units: int
    generated: int
    published: int  # broker-acknowledged publishes, resends included
    resent: int
    acked: int  # generated messages covered by the gateway's watermark
    pending: int  # left in the outboxes at the end
    link_drops: int
    connects: int
    drained: bool  # every outbox emptied before drain_timeout
    elapsed_s: float
    per_unit: tuple[UnitStats, ...]

    @classmethod
    def collect(cls, stats: Sequence[UnitStats], *, drained: bool, elapsed_s: float) -> UnitsReport:
        return cls(
            units=len(stats),
            generated=sum(s.generated for s in stats),
            published=sum(s.published for s in stats),
            resent=sum(s.resent for s in stats),
            acked=sum(s.acked for s in stats),
            pending=sum(s.pending for s in stats),
            link_drops=sum(s.link_drops for s in stats),
            connects=sum(s.connects for s in stats),
            drained=drained,
            elapsed_s=elapsed_s,
            per_unit=tuple(stats),
        )

    def summary(self) -> str:
        return (
            f"units={self.units} generated={self.generated} published={self.published}"
            f" resent={self.resent} acked={self.acked} pending={self.pending}"
            f" link_drops={self.link_drops} connects={self.connects}"
            f" drained={'yes' if self.drained else 'no'} elapsed={self.elapsed_s:.1f}s"
        )


async def run_units(cfg: UnitsConfig) -> UnitsReport:
    """Run the fleet: generate for `cfg.duration`, drain, stop, report."""
    broker = BrokerAddress.parse(cfg.mqtt_url, cfg.mqtt_protocol)
    policy = LinkPolicy(
        resend_after=cfg.resend_after,
        max_inflight=cfg.max_inflight,
        flaky=cfg.flaky,
        outage_min=1.0 * cfg.outage_scale,
        outage_max=20.0 * cfg.outage_scale,
    )
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    today = datetime.now(UTC).date()
    population = Population(today)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with contextlib.ExitStack() as stack:
        agents: list[UnitAgent] = []
        for deployment in plan_fleet(cfg.count, cfg.unit_prefix):
            # seeded by the unit's place in the fleet, not its prefix: same people every run
            local_id = deployment.unit_id.removeprefix(cfg.unit_prefix)
            rng = random.Random(f"{cfg.seed}:{local_id}")
            panel = population.panel(rng, deployment.province, PANEL_SIZE)
            stream = ConsultationStream(
                equip_unit(rng),
                functools.partial(rng.choice, panel),
                rng,
                today=today,
                waveforms=cfg.waveforms,
            )
            outbox = stack.enter_context(Outbox(cfg.state_dir / f"{deployment.unit_id}.sqlite3"))
            agents.append(
                UnitAgent(
                    deployment.unit_id,
                    broker=broker,
                    outbox=outbox,
                    stream=stream,
                    rate=cfg.rate,
                    duration=cfg.duration,
                    policy=policy,
                    rng=random.Random(f"{cfg.seed}:{local_id}:link"),
                )
            )
        stop = asyncio.Event()
        drained = False
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(a.run(stop), name=f"unit {a.unit_id}") for a in agents]
            progress = None
            if not cfg.quiet:
                progress = tg.create_task(_show_progress(agents, started, cfg.progress_every))
            await _all_set(a.generation_done for a in agents)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.drain_timeout):
                    await _all_set(a.drained for a in agents)
                drained = True
            stop.set()
            _, late = await asyncio.wait(tasks, timeout=cfg.stop_timeout)
            for task in late:  # e.g. stuck connecting to a dead broker
                task.cancel()
            if progress is not None:
                progress.cancel()
        report = UnitsReport.collect(
            [a.stats() for a in agents], drained=drained, elapsed_s=loop.time() - started
        )
    if not cfg.quiet:
        _say(f"[units] done: {report.summary()}")
    return report


async def _all_set(events: Iterable[asyncio.Event]) -> None:
    await asyncio.gather(*(event.wait() for event in events))


async def _show_progress(agents: Sequence[UnitAgent], started: float, every: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        stats = [a.stats() for a in agents]
        report = UnitsReport.collect(stats, drained=False, elapsed_s=loop.time() - started)
        online = sum(s.online for s in stats)
        _say(
            f"[units] {report.elapsed_s:6.0f}s online {online}/{report.units}"
            f" generated {report.generated} published {report.published}"
            f" (resent {report.resent}) acked {report.acked} pending {report.pending}"
            f" drops {report.link_drops}"
        )


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
