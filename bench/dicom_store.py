"""C-STORE throughput: dcmtk `storescp` (reference) vs `qantara serve` (fsync + index), same run.

200 CR instances of 0.5 MB (simulators.modality), sent by dcmtk `storescu` on one association and
on 4 concurrent ones; `TCP_NODELAY=1` for dcmtk as modalities are configured. Four receivers,
one after the other, each a subprocess:

- dcmtk `storescp` writing to disk (no fsync): the reference of the goal (>= 0.3 x);
- a minimal pynetdicom SCP (chunked receive, the handler renames the file and fsyncs it): what
  the gateway's listener was built on before its own upper layer (`dicom/pdu.py`...), kept as a
  second reference;
- pynetdicom's own `storescp` app as shipped (`python -m pynetdicom storescp`, its default max
  PDU, no fsync): the issue's other yardstick, "twice pynetdicom's own app";
- `qantara serve` with a fresh database (fsync of file and folder, index committed before
  0x0000); its peak RSS (VmHWM) and CPU time are read from /proc, the CPU time also by thread
  group, in ms per instance: `main` (the event loop: network, DICOM protocol, SHA-256,
  database client), `dicom-spool` (each association's file queue: create and write the
  batches, link and fsync the file), `dicom-file` (parse, folder fsyncs). The kernel samples
  each thread's time on its own, so the groups add up to the total only roughly.

Once every round has run, the durability floor (`durability_floor.py`) is measured, once for
each one-association round: the fsync, folder fsync and COMMIT that any receiver honouring
"0x0000 only once the file and its index row are safe" must add after the last byte of each
instance, taken alone on the same instances; added to that round's dcmtk cycle, it bounds what
such a receiver could reach in that round, and the line prints that bound as a ratio to dcmtk.
It runs after the rounds, not between them, because it writes 0.2 GB and removes it: files
removed between rounds slowed the next round's creates (`durability_floor.measure` says why),
and keeping them grew the page cache that the next dcmtk round writes into.

The four run `--rounds` times in turn (3 by default), each round with fresh folders and
database, each after an `os.sync()` so that none pays for the writeback of what the one before
left dirty; a line per round, then the medians, the ratio of the medians, and the gateway's
median against dcmtk's fastest round. Nothing is removed until every round has run (outputs,
databases). On this shared virtual machine dcmtk's own rate moves between 360 and 2,100
instances/s from one run to the next, and on some VMs it drops to half for whole rounds once
the page cache has grown (bench/README.md, 2026-11-28 13:43): one round's ratio says more about
dcmtk's luck than about the gateway, and the ratio to its fastest round is the one that does
not flatter the gateway.

    .venv/bin/python bench/dicom_store.py [--instances 200] [--rounds 3]
        [--database postgresql://...] [--large-mb 1024]
        [--gateway-prefix "py-spy record -r 200 -f raw -o /tmp/gw.txt --"]

After them, one fresh gateway takes the instances and sends them back with one C-GET to dcmtk's
`getscu`; the line gives its rate against dcmtk's `storescu` sending the same files to
`storescp` (dcmtk sending, no fsync on either side), measured just before.

`--large-mb N` then sends one DX instance of N MiB of pixel data to dcmtk `storescp` and to the
gateway (one association each, fresh process each) and prints the time and peak RSS of both: the
gateway's must stay flat (dcmtk's `storescp` holds the dataset in memory before writing it). The
gateway then sends it back to dcmtk's `getscu` (C-GET), with its time and the gateway's peak RSS
after it, which must stay flat too.

`--gateway-prefix` runs the gateway under a profiler or another wrapper (split like a shell
line); the CPU and RSS figures are then those of the wrapper.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from durability_floor import Floor, measure  # noqa: E402
from proc_stats import proc_cpu_seconds, proc_status_kib, thread_cpu_seconds  # noqa: E402

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
    # What an earlier receiver left dirty in the page cache (dcmtk's storescp writes 0.2 GB
    # without an fsync) goes to disk now, not in the middle of this receiver's fsyncs.
    os.sync()
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
    ended = wait_exits(procs, timeout=600.0)
    if any(proc.wait() != 0 for proc in procs):
        raise RuntimeError("storescu failed")
    return ended - started


def wait_exits(procs: list[subprocess.Popen[bytes]], timeout: float) -> float:
    """`time.perf_counter()` when the last of `procs` has exited. `Popen.wait(timeout=...)`
    polls, sleeping up to 50 ms between looks: that rounded every run's time up to the next
    50 ms step (dcmtk's 0.32 s runs by up to 16 %); a pidfd is readable the moment its process
    exits."""
    deadline = time.monotonic() + timeout
    waiting = {os.pidfd_open(proc.pid): proc for proc in procs}
    try:
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(waiting)} sender(s) still running after {timeout:.0f} s")
            ready, _, _ = select.select(list(waiting), [], [], remaining)
            for fd in ready:
                os.close(fd)
                del waiting[fd]
        return time.perf_counter()
    finally:
        for fd in waiting:
            os.close(fd)


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
    kib = proc_status_kib(pid, "VmHWM")
    return kib / 1024 if kib is not None else float("nan")


@contextlib.contextmanager
def running_receiver(
    command: list[str], port: int, env: dict[str, str] | None = None, stop_within: float = 10.0
) -> Iterator[subprocess.Popen[bytes]]:
    """A receiver subprocess listening on `port` once this yields, stopped (SIGTERM) on the way
    out."""
    proc = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=stop_within)


@contextlib.contextmanager
def running_storescp(out: Path, streams: int) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """dcmtk `storescp` writing into `out` (one process per association when `streams` > 1);
    yields the process and its port."""
    out.mkdir()
    port = free_port()
    mode = "--fork" if streams > 1 else "-v"
    command = ["storescp", "-aet", "STORESCP", "-od", str(out), mode, str(port)]
    with running_receiver(command, port, DCMTK_ENV) as proc:
        yield proc, port


def bench_storescp(files: list[Path], work: Path, streams: int, tag: str) -> float:
    with running_storescp(work / f"storescp-{tag}", streams) as (_, port):
        return send(port, files, "STORESCP", streams)


def bench_pynetdicom(files: list[Path], work: Path, streams: int, tag: str) -> float:
    out = work / f"pynetdicom-{tag}"
    out.mkdir()
    port = free_port()
    with running_receiver(
        [sys.executable, __file__, "--pynetdicom-scp", str(port), str(out)], port
    ):
        return send(port, files, "BARE", streams)


def bench_pynetdicom_app(files: list[Path], work: Path, streams: int, tag: str) -> float:
    """pynetdicom's own `storescp` app as shipped (its default max PDU, no fsync): the issue's
    other yardstick, "twice pynetdicom's own app"."""
    out = work / f"pynetdicom-app-{tag}"
    out.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "pynetdicom", "storescp", str(port)]
    with running_receiver([*command, "-aet", "PYSTORESCP", "-od", str(out), "-q"], port):
        return send(port, files, "PYSTORESCP", streams)


def pynetdicom_scp(port: int, out: Path) -> None:
    """The minimal pynetdicom storage SCP: chunked receive, rename into `out`, fsync, 0x0000."""
    import signal

    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE, AllStoragePresentationContexts, _config, evt

    _config.STORE_RECV_CHUNKED_DATASET = True

    def on_store(event: evt.Event) -> int:
        target = out / secrets.token_hex(16)
        os.rename(event.dataset_path, target)
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0x0000

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for sigwait, in every thread
    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 1 << 20
    for context in AllStoragePresentationContexts:
        if context.abstract_syntax is not None:
            ae.add_supported_context(context.abstract_syntax, list(AllTransferSyntaxes))
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    signal.sigwait({signal.SIGTERM})
    if server is not None:
        server.shutdown()


@contextlib.contextmanager
def running_gateway(
    work: Path, dsn: str, tag: str, prefix: list[str], settings: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`qantara serve` on a free DICOM port, its store in `work`, with more `settings`; yields
    the process and port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
    env.update(
        {
            "QANTARA_DATABASE_URL": dsn,
            "QANTARA_MQTT_URL": "mqtt://127.0.0.1:1883",
            "QANTARA_HTTP_PORT": "0",
            "QANTARA_MLLP_PORT": "0",
            "QANTARA_DICOM_PORT": str(port),
            "QANTARA_DICOM_STORAGE": str(work / f"gateway-{tag}"),
            "QANTARA_LOG_LEVEL": "WARNING",
            # The default client id is per host: another gateway on this machine would take
            # the MQTT session over and over.
            "QANTARA_MQTT_CLIENT_ID": f"bench-dicom-{secrets.token_hex(4)}",
            **(settings or {}),
        }
    )
    command = [*prefix, sys.executable, "-m", "gateway.cli", "serve"]
    with running_receiver(command, port, env, stop_within=30.0) as proc:
        yield proc, port


def bench_gateway(
    files: list[Path], work: Path, dsn: str, streams: int, tag: str, prefix: list[str]
) -> tuple[float, float, float, dict[str, float]]:
    """Seconds, peak RSS (MiB), CPU seconds, and CPU seconds by thread group of the gateway."""
    with running_gateway(work, dsn, tag, prefix) as (proc, port):
        cpu = proc_cpu_seconds(proc.pid) or 0.0
        threads = thread_cpu_seconds(proc.pid)
        seconds = send(port, files, "QANTARA", streams)
        by_thread = {
            name: spent - threads.get(name, 0.0)
            for name, spent in thread_cpu_seconds(proc.pid).items()
        }
        used = (proc_cpu_seconds(proc.pid) or 0.0) - cpu
        return seconds, peak_rss_mib(proc.pid), used, by_thread


def thread_split(by_thread: dict[str, float], n: int) -> str:
    """`main 2.6, dicom-spool 4.6, ...` in ms per instance, the busiest first, tiny ones left."""
    parts = [
        f"{name} {1000 * spent / n:.1f}"
        for name, spent in sorted(by_thread.items(), key=lambda item: -item[1])
        if 1000 * spent / n >= 0.05
    ]
    return ", ".join(parts)


def floor_line(floor: Floor, reference_rate: float) -> str:
    """The round's durability floor (`durability_floor`) and the bound it sets."""
    bound = floor.bound(reference_rate)
    return (
        f"  durability floor, ms per instance: fsync {floor.fsync:.2f} + folder fsync "
        f"{floor.folder:.2f} + commit {floor.commit:.2f} = {floor.after_transfer:.2f} after the "
        f"last byte (hash + write {floor.write:.2f}, overlappable with the transfer) | bound with "
        f"one association: dcmtk's cycle {1000 / reference_rate:.2f} + "
        f"{floor.after_transfer:.2f} ms = {bound:.0f}/s = {bound / reference_rate:.2f} x dcmtk"
    )


MAX_LARGE_MIB = 65535 // 32  # 32 rows of 16,384 16-bit columns per MiB


def make_large(folder: Path, mebibytes: int) -> Path:
    """One DX instance whose 16-bit pixel data is `mebibytes` MiB (16,384 columns)."""
    rng = random.Random(11)
    patient = Population(datetime.now(UTC).date()).patient(rng, REGIONS[0].provinces[0])
    ds = study_datasets(patient, "DX", "ISO_IR 192", rng, datetime.now(UTC))[0]
    ds.Columns = 16384
    ds.Rows = mebibytes * 32  # 16,384 columns x 2 bytes x 32 rows = 1 MiB
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = bytes(ds.Rows * ds.Columns * 2)
    path = folder / "large.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def bench_large(
    path: Path, work: Path, dsn: str, prefix: list[str]
) -> tuple[float, float, float, float, float, float, float]:
    """One large instance to dcmtk `storescp` and to the gateway, one association each, then
    back from the gateway with a C-GET (dcmtk `getscu`): seconds and peak RSS (MiB) of each
    receiver, the gateway's peak RSS before the transfer, and the C-GET's seconds and the
    gateway's peak RSS after it."""
    with running_storescp(work / "storescp-large", 1) as (dcmtk, dcmtk_port):
        dcmtk_seconds = send(dcmtk_port, [path], "STORESCP", 1)
        dcmtk_rss = peak_rss_mib(dcmtk.pid)
    shutil.rmtree(work / "storescp-large")
    study = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    retrieving = {"QANTARA_DICOM_RETRIEVE_AES": "GETSCU"}
    with running_gateway(work, dsn, "large", prefix, retrieving) as (proc, port):
        before = peak_rss_mib(proc.pid)
        seconds = send(port, [path], "QANTARA", 1)
        stored_rss = peak_rss_mib(proc.pid)
        back = work / "getscu-large"
        back.mkdir()
        start = time.monotonic()
        subprocess.run(
            ["getscu", "-S", "-aet", "GETSCU", "-aec", "QANTARA", "-od", str(back),
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
             "127.0.0.1", str(port)],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        get_seconds = time.monotonic() - start
        got = sum(p.stat().st_size for p in back.iterdir())
        shutil.rmtree(back)
        if got < path.stat().st_size // 2:
            raise RuntimeError("getscu brought back less than the instance")
        return (
            dcmtk_seconds,
            dcmtk_rss,
            seconds,
            stored_rss,
            before,
            get_seconds,
            peak_rss_mib(proc.pid),
        )


def bench_retrieve(
    files: list[Path], work: Path, dsn: str, prefix: list[str]
) -> tuple[float, float]:
    """Seconds for dcmtk `storescu` to send `files` to dcmtk `storescp` (the reference: dcmtk
    sending), and for the gateway to send the same instances back with one C-GET to dcmtk
    `getscu` (the gateway sending, each file read from its store), one association each."""
    with running_storescp(work / "storescp-retrieve", 1) as (_, dcmtk_port):
        reference = send(dcmtk_port, files, "STORESCP", 1)
    shutil.rmtree(work / "storescp-retrieve")
    studies = sorted({str(dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files})
    retrieving = {"QANTARA_DICOM_RETRIEVE_AES": "GETSCU"}
    with running_gateway(work, dsn, "retrieve", prefix, retrieving) as (_, port):
        send(port, files, "QANTARA", 1)
        back = work / "getscu-retrieve"
        back.mkdir()
        os.sync()
        started = time.perf_counter()
        subprocess.run(
            ["getscu", "-S", "-aet", "GETSCU", "-aec", "QANTARA", "-od", str(back),
             "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + "\\".join(studies),
             "127.0.0.1", str(port)],
            check=True, capture_output=True, timeout=600, env=DCMTK_ENV,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        received = len(list(back.iterdir()))
        shutil.rmtree(back)
    if received != len(files):
        raise RuntimeError(f"getscu received {received} of {len(files)} instances")
    return reference, seconds


async def rounds(
    args: argparse.Namespace, files: list[Path], work: Path, databases: list[str]
) -> list[tuple[float, float]]:
    """The rounds of the four receivers, one then four associations; each round's database is
    appended to `databases` for the caller to drop. dcmtk's rate and the gateway's in each
    one-association round."""
    n = len(files)
    single: list[tuple[float, float]] = []
    for streams in (1, 4):
        rates: list[tuple[float, float, float, float]] = []
        for round_ in range(1, args.rounds + 1):
            tag = f"{streams}-{round_}"
            name = f"qantara_bench_{secrets.token_hex(4)}"
            dsn = await ensure_database(args.database, name)
            databases.append(name)
            load = os.getloadavg()[0]
            reference = bench_storescp(files, work, streams, tag)
            bare = await asyncio.to_thread(bench_pynetdicom, files, work, streams, tag)
            app = await asyncio.to_thread(bench_pynetdicom_app, files, work, streams, tag)
            gateway, rss, cpu, by_thread = await asyncio.to_thread(
                bench_gateway, files, work, dsn, streams, tag, shlex.split(args.gateway_prefix)
            )
            ref_rate, bare_rate, app_rate, gw_rate = (
                n / reference,
                n / bare,
                n / app,
                n / gateway,
            )
            rates.append((ref_rate, bare_rate, app_rate, gw_rate))
            print(
                f"{streams} association(s), round {round_}, load {load:.1f}: "
                f"dcmtk storescp {ref_rate:6.1f}/s | "
                f"bare pynetdicom + fsync {bare_rate:6.1f}/s | "
                f"pynetdicom storescp app {app_rate:6.1f}/s | "
                f"qantara (fsync + index) {gw_rate:6.1f}/s | "
                f"ratio {gw_rate / ref_rate:.2f} (of bare pynetdicom "
                f"{gw_rate / bare_rate:.2f}, of the app {gw_rate / app_rate:.2f}) | "
                f"gateway CPU {1000 * cpu / n:.1f} ms/instance "
                f"({thread_split(by_thread, n)}), peak RSS {rss:.0f} MiB"
            )
            if streams == 1:
                single.append((ref_rate, gw_rate))
        ref_med, bare_med, app_med, gw_med = (
            statistics.median(r[i] for r in rates) for i in range(4)
        )
        print(
            f"{streams} association(s), median of {len(rates)} rounds: "
            f"dcmtk storescp {ref_med:6.1f}/s | bare pynetdicom + fsync {bare_med:6.1f}/s | "
            f"pynetdicom storescp app {app_med:6.1f}/s | "
            f"qantara {gw_med:6.1f}/s | ratio of medians {gw_med / ref_med:.2f} "
            f"(of bare pynetdicom {gw_med / bare_med:.2f}, of the app "
            f"{gw_med / app_med:.2f}); against dcmtk's fastest round "
            f"{gw_med / max(r[0] for r in rates):.2f}"
        )
    return single


async def floors(
    args: argparse.Namespace, files: list[Path], work: Path, rates: list[tuple[float, float]]
) -> None:
    """The durability floor once for each one-association round (`rates`: dcmtk's and the
    gateway's), measured after every round, in a database of its own; its files are removed at
    the end. The gateway's rate against each round's bound says how much of what the machine
    allows it reaches: a figure that moves less from one machine to another than the ratio to
    dcmtk, which does not fsync."""
    name = f"qantara_bench_{secrets.token_hex(4)}"
    dsn = await ensure_database(args.database, name)
    folder = work / "floors"
    bounds: list[float] = []
    reached: list[float] = []
    try:
        for round_, (rate, gateway) in enumerate(rates, 1):
            floor = await measure(files, folder / str(round_), dsn)
            bound = floor.bound(rate)
            bounds.append(bound / rate)
            reached.append(gateway / bound)
            print(f"1 association, round {round_}:")
            print(floor_line(floor, rate) + f" | the gateway reached {reached[-1]:.2f} of it")
    finally:
        await drop_database(args.database, name)
        shutil.rmtree(folder, ignore_errors=True)
    print(
        f"  durability floor: no receiver that fsyncs and commits before 0x0000 could exceed "
        f"{statistics.median(bounds):.2f} x dcmtk with one association (median of the rounds' "
        f"bounds); the gateway reached {statistics.median(reached):.2f} of its round's bound "
        f"(median)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the four receivers per association count; medians are compared",
    )
    parser.add_argument("--database", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--gateway-prefix", default="", help="wrapper command for the gateway (a profiler...)"
    )
    parser.add_argument(
        "--large-mb",
        type=int,
        default=0,
        metavar="MIB",
        help="then one instance of MIB MiB to each receiver: peak RSS stays flat? (0: skip)",
    )
    parser.add_argument(
        "--pynetdicom-scp", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if not 0 <= args.large_mb <= MAX_LARGE_MIB:
        parser.error(f"--large-mb: 0 to {MAX_LARGE_MIB} (Rows is a 16-bit value)")
    if args.pynetdicom_scp:
        pynetdicom_scp(int(args.pynetdicom_scp[0]), Path(args.pynetdicom_scp[1]))
        return
    if shutil.which("storescu") is None:
        raise SystemExit("needs dcmtk (storescu, storescp)")
    with tempfile.TemporaryDirectory(prefix="qantara-bench-") as tmp:
        work = Path(tmp)
        source = work / "source"
        source.mkdir()
        files = make_files(source, args.instances)
        size = sum(f.stat().st_size for f in files) / len(files) / 1e6
        print(f"{len(files)} CR instances of {size:.2f} MB, storescu sender, TCP_NODELAY=1")
        # Nothing is removed between rounds (outputs, databases), and the floor is measured
        # after them: files removed in the middle slow the next round's creates
        # (`durability_floor.measure` says why).
        databases: list[str] = []
        try:
            single = await rounds(args, files, work, databases)
        finally:
            for name in databases:
                await drop_database(args.database, name)
        await floors(args, files, work, single)
        name = f"qantara_bench_{secrets.token_hex(4)}"
        dsn = await ensure_database(args.database, name)
        try:
            reference, retrieved = await asyncio.to_thread(
                bench_retrieve, files, work, dsn, shlex.split(args.gateway_prefix)
            )
        finally:
            await drop_database(args.database, name)
        n = len(files)
        print(
            f"C-GET of {n} instances back, one association: qantara to getscu "
            f"{n / retrieved:6.1f}/s | dcmtk storescu to storescp {n / reference:6.1f}/s | "
            f"ratio {reference / retrieved:.2f}"
        )
        if args.large_mb > 0:
            for path in files:
                path.unlink()  # room on the disk
            large = make_large(source, args.large_mb)
            mib = large.stat().st_size / 2**20
            name = f"qantara_bench_{secrets.token_hex(4)}"
            dsn = await ensure_database(args.database, name)
            try:
                (
                    dcmtk_s,
                    dcmtk_rss,
                    gw_s,
                    gw_rss,
                    gw_before,
                    get_s,
                    get_rss,
                ) = await asyncio.to_thread(
                    bench_large, large, work, dsn, shlex.split(args.gateway_prefix)
                )
            finally:
                await drop_database(args.database, name)
            print(
                f"one instance of {mib:,.0f} MiB: dcmtk storescp {dcmtk_s:.1f} s, peak RSS "
                f"{dcmtk_rss:,.0f} MiB | qantara {gw_s:.1f} s, peak RSS {gw_rss:,.0f} MiB "
                f"({gw_before:,.0f} MiB before it) | C-GET back to getscu {get_s:.1f} s, the "
                f"gateway's peak RSS then {get_rss:,.0f} MiB"
            )


if __name__ == "__main__":
    asyncio.run(main())
