"""`qantara dicom verify` against coreutils' `sha256sum` over the same files, same run.

A store is filled once: `--instances` CR instances of 0.53 MB (`dicom_store.make_files`) sent by
dcmtk `storescu` on 4 associations to a fresh `qantara serve`, which is then stopped. Then, in
`--rounds` rounds, with the store's pages dropped from the page cache before each (so that both
read from the disk, as a weekly check of a large store does):

- `sha256sum` over every file of the store, one process: the reference (the same reads and the
  same hash, without the index);
- `qantara dicom verify`: the rows read from the index, each file read and hashed in a thread,
  the comparison, its pages dropped afterwards.

Each line gives instances/s and MB/s of both (the command's whole run, and its walk alone, as its
summary line gives it), the ratio of the two whole rates (verify / sha256sum), and the
command's peak RSS.

    .venv/bin/python bench/dicom_verify.py [--instances 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_store import make_files, running_gateway, send  # noqa: E402

from gateway.local_services import drop_database, ensure_database  # noqa: E402


def drop_cached(files: list[Path]) -> None:
    """Let the kernel forget the files' pages (they are clean: written and synced)."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Seconds, peak RSS (MiB) and last line of output of `command`, which must succeed."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {proc.returncode}")
    lines = output.splitlines()
    return seconds, usage.ru_maxrss / 1024, lines[-1] if lines else ""


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    name = f"qantara_bench_{secrets.token_hex(4)}"
    dsn = await ensure_database(args.database, name)
    try:
        with tempfile.TemporaryDirectory(prefix="qantara-bench-") as tmp:
            work = Path(tmp)
            source = work / "source"
            source.mkdir()
            sent = make_files(source, args.instances)
            with running_gateway(work, dsn, "verify", []) as (_, port):
                await asyncio.to_thread(send, port, sent, "QANTARA", 4)
            store = work / "gateway-verify"
            stored = sorted(p for p in store.rglob("*.dcm") if p.parent.name != "tmp")
            size = sum(p.stat().st_size for p in stored)
            print(
                f"{len(stored)} instances, {size / 1e6:.1f} MB in the store, files cold each time"
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
            env |= {"QANTARA_DATABASE_URL": dsn, "QANTARA_DICOM_STORAGE": str(store)}
            verify = [sys.executable, "-m", "gateway.cli", "dicom", "verify"]
            ratios = []
            for round_ in range(1, args.rounds + 1):
                drop_cached(stored)
                reference, _, _ = timed(["sha256sum", *map(str, stored)])
                drop_cached(stored)
                seconds, rss, summary = timed(verify, env)
                own = float(re.search(r" in ([\d,.]+) s:", summary)[1].replace(",", ""))  # type: ignore[index]
                ratios.append(reference / seconds)
                n = len(stored)
                print(
                    f"round {round_}: sha256sum {n / reference:7.1f} instances/s "
                    f"({size / 1e6 / reference:6.1f} MB/s) | qantara dicom verify "
                    f"{n / seconds:7.1f} instances/s ({size / 1e6 / seconds:6.1f} MB/s; "
                    f"{n / own:.1f}/s without the command's start and connection), peak RSS "
                    f"{rss:.0f} MiB | ratio {reference / seconds:.2f} (its walk alone "
                    f"{reference / own:.2f})"
                )
            print(f"median ratio {statistics.median(ratios):.2f}")
    finally:
        await drop_database(args.database, name)


if __name__ == "__main__":
    asyncio.run(main())
