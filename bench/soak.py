"""Soak: N minutes of a region's fleet against one gateway; is its memory and fd use flat?

`qantara serve` runs as a subprocess on a fresh database (`qantara_soak_<hex>`, dropped at the
end) and a private mosquitto; `simulators.fleet.run_fleet` sends for `--minutes` (100 units on
flaky links, 10 lab analyzers, 5 modalities by default) and checks lost/duplicated in the
database. Every `--sample-every` seconds the gateway's VmRSS (/proc/<pid>/status) and its open
file descriptors (entries of /proc/<pid>/fd) are sampled.

Verdict: after the warm-up (`--warmup-minutes`, default a fifth of the run, at least 1), the mean
of the last minute's samples must not exceed the mean of the first minute after warm-up by more
than 10 % (RSS and fds each): FLAT, else GROWING. It prints figures; it asserts nothing, and exits
1 when the verdict is GROWING or something was lost or duplicated.

    .venv/bin/python bench/soak.py [--minutes 10] [--units 100] [--unit-rate 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from mqtt_ingest import (  # noqa: E402
    BenchError,
    GatewayProcess,
    gateway_env,
    log,
)
from proc_stats import proc_status_kib  # noqa: E402

from gateway.local_services import PrivateMosquitto, drop_database, ensure_database  # noqa: E402
from simulators.fleet import FleetConfig, FleetReport, run_fleet  # noqa: E402

GROWTH_LIMIT = 0.10
LISTENING = re.compile(r"listening (?P<name>mllp|dicom)=\S+:(?P<port>\d+)")


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds since the fleet started
    rss_kib: int
    fds: int


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


async def sample_forever(pid: int, every: float, started: float, out: list[Sample]) -> None:
    while True:
        rss = proc_status_kib(pid, "VmRSS")
        fds = open_fds(pid)
        if rss is None or fds is None:
            return
        out.append(Sample(time.monotonic() - started, rss, fds))
        await asyncio.sleep(every)


@dataclass(frozen=True, slots=True)
class Verdict:
    rss_start_mib: float
    rss_end_mib: float
    rss_peak_mib: float
    fds_start: float
    fds_end: float
    fds_peak: int

    @property
    def rss_growth(self) -> float:
        return self.rss_end_mib / self.rss_start_mib - 1 if self.rss_start_mib else 0.0

    @property
    def fds_growth(self) -> float:
        return self.fds_end / self.fds_start - 1 if self.fds_start else 0.0

    @property
    def flat(self) -> bool:
        return self.rss_growth <= GROWTH_LIMIT and self.fds_growth <= GROWTH_LIMIT


def judge(samples: Sequence[Sample], warmup: float, total: float) -> Verdict:
    after = [s for s in samples if s.t >= warmup]
    if not after:
        raise BenchError("no sample after the warm-up: run longer than --warmup-minutes")
    first = [s for s in after if s.t < warmup + 60] or after[:1]
    last = [s for s in after if s.t >= total - 60] or after[-1:]
    return Verdict(
        rss_start_mib=statistics.fmean(s.rss_kib for s in first) / 1024,
        rss_end_mib=statistics.fmean(s.rss_kib for s in last) / 1024,
        rss_peak_mib=max(s.rss_kib for s in samples) / 1024,
        fds_start=statistics.fmean(s.fds for s in first),
        fds_end=statistics.fmean(s.fds for s in last),
        fds_peak=max(s.fds for s in samples),
    )


@contextlib.asynccontextmanager
async def database(args: argparse.Namespace) -> AsyncIterator[str]:
    name = f"qantara_soak_{secrets.token_hex(5)}"
    dsn = await ensure_database(args.postgres, name)
    try:
        yield dsn
    finally:
        if not args.keep_database:
            await drop_database(args.postgres, name)


def ports(gateway: GatewayProcess) -> dict[str, int]:
    found = {}
    for line in gateway.lines:
        if match := LISTENING.search(line):
            found[match["name"]] = int(match["port"])
    return found


async def soak(args: argparse.Namespace) -> int:
    seconds = args.minutes * 60
    warmup = (args.warmup_minutes if args.warmup_minutes is not None else args.minutes / 5) * 60
    warmup = max(60.0, warmup) if seconds > 120 else seconds / 3
    mosquitto = PrivateMosquitto(max_queued_messages=1_000_000)
    async with contextlib.AsyncExitStack() as stack:
        await mosquitto.start()
        stack.push_async_callback(mosquitto.cleanup)
        dsn = await stack.enter_async_context(database(args))
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qantara-soak-")))
        gateway = GatewayProcess(
            gateway_env(dsn, mosquitto.url, f"soak-{secrets.token_hex(3)}", scratch)
        )
        await gateway.start()
        stack.push_async_callback(gateway.terminate)
        await gateway.wait_ready()
        for _ in range(300):  # the listeners log their ports right before /readyz says 200
            if len(found := ports(gateway)) == 2:
                break
            await asyncio.sleep(0.1)
        else:
            raise BenchError(f"no mllp/dicom listening lines\n{gateway.tail()}")
        log(
            f"gateway pid {gateway.pid}: mllp {found['mllp']} dicom {found['dicom']};"
            f" fleet of {args.units} units ({args.unit_rate} msg/s each, flaky {args.flaky}),"
            f" {args.labs} labs, {args.modalities} modalities for {args.minutes} min"
        )
        samples: list[Sample] = []
        started = time.monotonic()
        sampler = asyncio.create_task(
            sample_forever(gateway.pid, args.sample_every, started, samples)
        )
        try:
            report: FleetReport = await run_fleet(
                FleetConfig(
                    mqtt_url=mosquitto.url,
                    mllp_port=found["mllp"],
                    dicom_port=found["dicom"],
                    units=args.units,
                    labs=args.labs,
                    modalities=args.modalities,
                    duration=seconds,
                    unit_rate=args.unit_rate,
                    flaky=args.flaky,
                    lab_rate=args.lab_rate,
                    study_interval=args.study_interval,
                    database_url=dsn,
                    state_dir=scratch / "fleet",
                    unit_prefix=f"SOAK{secrets.token_hex(2)}-",
                    progress_every=30.0,
                )
            )
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        hwm = (proc_status_kib(gateway.pid, "VmHWM") or 0) / 1024
        load = os.getloadavg()

    verdict = judge(samples, warmup, seconds)
    print("\nminute  rss MiB  fds")
    for minute in range(int(seconds // 60) + 1):
        in_minute = [s for s in samples if minute * 60 <= s.t < (minute + 1) * 60]
        if in_minute:
            rss = statistics.fmean(s.rss_kib for s in in_minute) / 1024
            fds = statistics.fmean(s.fds for s in in_minute)
            print(f"{minute:6d}  {rss:7.1f}  {fds:5.1f}")
    print(f"\n{report.summary()}")
    if report.integrity is not None:
        print(f"database: {report.integrity.detail}")
    print(
        f"samples {len(samples)} every {args.sample_every:.0f}s; warm-up {warmup / 60:.1f} min\n"
        f"RSS MiB: first minute after warm-up {verdict.rss_start_mib:.1f}, last minute"
        f" {verdict.rss_end_mib:.1f} ({verdict.rss_growth:+.1%}), peak {verdict.rss_peak_mib:.1f},"
        f" VmHWM {hwm:.1f}\n"
        f"open fds: {verdict.fds_start:.1f} -> {verdict.fds_end:.1f}"
        f" ({verdict.fds_growth:+.1%}), peak {verdict.fds_peak}\n"
        f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        f" on {os.cpu_count()} cores\n"
        f"verdict: {'FLAT' if verdict.flat else 'GROWING'} (limit +{GROWTH_LIMIT:.0%})"
    )
    complaints = sum(gateway.complaints.values())
    print(f"gateway log: {complaints} WARNING/ERROR line(s)")
    for message, count in gateway.complaints.most_common(10):
        print(f"  {count:6d}  {message[:160]}")
    return 0 if verdict.flat and report.ok else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="minutes of fleet load (10)")
    add("--warmup-minutes", type=float, default=None, help="(a fifth of the run, >= 1)")
    add("--sample-every", type=float, default=5.0, help="seconds between samples (5)")
    add("--units", type=int, default=100)
    add("--labs", type=int, default=10)
    add("--modalities", type=int, default=5)
    add("--unit-rate", type=float, default=1.0, help="messages/s per unit (1)")
    add("--flaky", type=float, default=0.01, help="link drop probability per second (0.01)")
    add("--lab-rate", type=float, default=0.2, help="ORU/s per analyzer (0.2)")
    add("--study-interval", type=float, default=60.0, help="seconds between studies (60)")
    add(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a server where the bench may create its database",
    )
    add("--keep-database", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(soak(args))
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
