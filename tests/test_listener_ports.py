"""A listener that cannot take its port ends `qantara serve` at start: one line, exit status 5,
within seconds, whichever listener it is and whatever the others were doing then. A DICOM store
that cannot be opened, TLS files that cannot be loaded end it the same way, as a configuration
error (exit status 2)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.gateway_process import ROOT, new_client_id

EXIT_CONFIG = 2
EXIT_LISTEN = 5
SETTING = {"http": "QANTARA_HTTP_PORT", "mllp": "QANTARA_MLLP_PORT", "dicom": "QANTARA_DICOM_PORT"}


@contextmanager
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 another process listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def serve(env: dict[str, str]) -> tuple[int | None, list[str]]:
    """`qantara serve` until it exits (at most 60 s, then killed): its status and log lines."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**base, **env},
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(60):
            output, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        output, _ = await proc.communicate()
    return proc.returncode, output.decode(errors="replace").splitlines()


def gateway_env(dsn: str, mqtt_url: str, store: Path) -> dict[str, str]:
    """A gateway's settings on this test's database, broker and DICOM store, every port 0."""
    return {
        "QANTARA_DATABASE_URL": dsn,
        "QANTARA_MQTT_URL": mqtt_url,
        "QANTARA_MQTT_CLIENT_ID": new_client_id(),
        "QANTARA_DICOM_STORAGE": str(store),
        **{setting: "0" for setting in SETTING.values()},
    }


@pytest.mark.parametrize("listener", ["http", "mllp", "dicom"])
async def test_a_port_in_use_ends_serve_at_start_with_one_line_and_status_5(
    listener: str, module_dsn: str, mqtt_url: str, tmp_path: Path
) -> None:
    env = gateway_env(module_dsn, mqtt_url, tmp_path / "dicom")
    with taken_port() as port:
        status, lines = await serve({**env, SETTING[listener]: str(port)})
    assert status == EXIT_LISTEN, "\n".join(lines[-30:])
    assert lines[-1].startswith(f"qantara: cannot listen: {listener} on 127.0.0.1:{port}: ")
    # Not the CLI's traceback of the error (a pool connection cut while it was being made may
    # still leave asyncpg's "Future exception was never retrieved" report in the log).
    assert not any("ListenerError" in line or "Exception Group" in line for line in lines)


async def test_a_dicom_store_that_cannot_be_made_ends_serve_at_start_with_one_line_and_status_2(
    module_dsn: str, mqtt_url: str, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    store = tmp_path / "a-file" / "dicom"
    status, lines = await serve(gateway_env(module_dsn, mqtt_url, store))
    assert status == EXIT_CONFIG, "\n".join(lines[-30:])
    assert lines[-1] == (
        f"qantara: configuration error: QANTARA_DICOM_STORAGE: cannot open the DICOM store "
        f"{store}: Not a directory"
    )
    assert not any("Traceback" in line or "Exception Group" in line for line in lines)


async def test_a_missing_mount_check_file_ends_serve_at_start_before_the_store_is_made(
    module_dsn: str, mqtt_url: str, tmp_path: Path
) -> None:
    store = tmp_path / "dicom"  # the mount point, its volume not mounted
    store.mkdir()
    env = gateway_env(module_dsn, mqtt_url, store)
    status, lines = await serve({**env, "QANTARA_DICOM_STORAGE_CHECK_FILE": ".volume"})
    assert status == EXIT_CONFIG, "\n".join(lines[-30:])
    assert lines[-1] == (
        f"qantara: configuration error: QANTARA_DICOM_STORAGE_CHECK_FILE: {store / '.volume'} "
        "does not exist: is the DICOM store's volume mounted?"
    )
    assert list(store.iterdir()) == []  # nothing written to the disk beneath


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (("QANTARA_HTTP_TLS_CERT", "QANTARA_HTTP_TLS_KEY"), "QANTARA_HTTP_TLS_CERT, _KEY"),
        (("QANTARA_MLLP_TLS_CERT", "QANTARA_MLLP_TLS_KEY"), "QANTARA_MLLP_TLS_*"),
        (("QANTARA_DICOM_TLS_CERT", "QANTARA_DICOM_TLS_KEY"), "QANTARA_DICOM_TLS_*"),
        (("QANTARA_MQTT_CA_FILE",), "QANTARA_MQTT_CA_FILE"),
    ],
    ids=["http", "mllp", "dicom", "mqtt"],
)
async def test_tls_files_that_are_no_pem_end_serve_at_start_with_one_line_and_status_2(
    settings: tuple[str, ...], named: str, module_dsn: str, mqtt_url: str, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    env = gateway_env(module_dsn, mqtt_url, tmp_path / "dicom")
    env |= {setting: str(garbage) for setting in settings}
    if named == "QANTARA_MQTT_CA_FILE":
        env["QANTARA_MQTT_URL"] = mqtt_url.replace("mqtt://", "mqtts://", 1)
    status, lines = await serve(env)
    assert status == EXIT_CONFIG, "\n".join(lines[-30:])
    assert lines[-1].startswith(f"qantara: configuration error: {named}: cannot be loaded (")
    assert not any("Traceback" in line or "Exception Group" in line for line in lines)
