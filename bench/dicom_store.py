"""C-STORE throughput: dcmtk `storescp` (reference) vs `qantara serve` (fsync + index), same run.

200 CR instances of 0.5 MB (simulators.modality), sent by dcmtk `storescu` on one association and
on 4 concurrent ones; `TCP_NODELAY=1` for dcmtk as modalities are configured. The gateway runs as
a subprocess with a fresh database; its peak RSS (VmHWM) is read from /proc.

    .venv/bin/python bench/dicom_store.py [--instances 200] [--database postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.local_services import drop_database, ensure_database, free_port  # noqa: E402
from simulators.modality import study_datasets  # noqa: E402
from simulators.population import REGIONS, Population  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def make_files(folder: Path, count: int) -> list[Path]:
    rng = random.Random(7)
    population = Population(datetime.now(UTC).date())
    files: list[Path] = []
    while len(files) < count:
        patient = population.patient(rng, REGIONS[0].provinces[0])
        for ds in study_datasets(patient, "CR", "ISO_IR 192", rng, datetime.now(UTC)):
            path = folder / f"{len(files):04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files[:count]


def send(port: int, files: list[Path], ae: str, streams: int) -> float:
    chunks = [files[i::streams] for i in range(streams)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", ae, "-aet", "BENCH", "127.0.0.1", str(port), *map(str, chunk)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for chunk in chunks
    ]
    for proc in procs:
        if proc.wait(timeout=600) != 0:
            raise RuntimeError("storescu failed")
    return time.perf_counter() - started


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def peak_rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else float("nan")


def bench_storescp(files: list[Path], work: Path, streams: int) -> float:
    out = work / f"storescp-{streams}"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            "storescp",
            "-aet",
            "STORESCP",
            "-od",
            str(out),
            "--fork" if streams > 1 else "-v",
            str(port),
        ],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        return send(port, files, "STORESCP", streams)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_gateway(files: list[Path], work: Path, dsn: str, streams: int) -> tuple[float, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
    env.update(
        {
            "QANTARA_DATABASE_URL": dsn,
            "QANTARA_MQTT_URL": "mqtt://127.0.0.1:1883",
            "QANTARA_HTTP_PORT": "0",
            "QANTARA_MLLP_PORT": "0",
            "QANTARA_DICOM_PORT": str(port),
            "QANTARA_DICOM_STORAGE": str(work / f"gateway-{streams}"),
            "QANTARA_LOG_LEVEL": "WARNING",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        seconds = send(port, files, "QANTARA", streams)
        return seconds, peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        raise SystemExit("needs dcmtk (storescu, storescp)")
    with tempfile.TemporaryDirectory(prefix="qantara-bench-") as tmp:
        work = Path(tmp)
        source = work / "source"
        source.mkdir()
        files = make_files(source, args.instances)
        size = sum(f.stat().st_size for f in files) / len(files) / 1e6
        print(f"{len(files)} CR instances of {size:.2f} MB, storescu sender, TCP_NODELAY=1")
        for streams in (1, 4):
            name = f"qantara_bench_{secrets.token_hex(4)}"
            dsn = await ensure_database(args.database, name)
            try:
                reference = bench_storescp(files, work, streams)
                gateway, rss = await asyncio.to_thread(bench_gateway, files, work, dsn, streams)
            finally:
                await drop_database(args.database, name)
            ref_rate, gw_rate = len(files) / reference, len(files) / gateway
            print(
                f"{streams} association(s): dcmtk storescp {ref_rate:7.1f}/s | "
                f"qantara (fsync + index) {gw_rate:7.1f}/s | ratio {gw_rate / ref_rate:.2f} | "
                f"gateway peak RSS {rss:.0f} MiB"
            )


if __name__ == "__main__":
    asyncio.run(main())
