"""`qantara simulate fleet` as a user runs it: a small fleet (units on flaky links, a lab
analyzer, a modality) against a real `qantara serve`, then lost and duplicated read back from the
gateway's database."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from gateway.local_services import drop_database, ensure_database
from simulators.fleet import FleetConfig, _DicomSender, _send_studies
from simulators.modality import SOP_CLASSES
from tests.conftest import PrivateMosquittoFactory
from tests.dicom_support import serving
from tests.gateway_process import ROOT, GatewayProcess, wait_listening

pytestmark = [pytest.mark.slow]

SUMMARY = re.compile(
    r"sent (?P<sent>\d+) acked (?P<acked>\d+) .*lost=(?P<lost>\d+) duplicated=(?P<dup>\d+)"
)


@pytest.fixture
async def fleet_dsn(postgres_server_dsn: str) -> AsyncIterator[str]:
    name = f"qantara_fl_{secrets.token_hex(6)}"
    dsn = await ensure_database(postgres_server_dsn, name)
    try:
        yield dsn
    finally:
        await drop_database(postgres_server_dsn, name)


def test_fleet_config_refuses_an_empty_fleet_and_a_bad_prefix() -> None:
    with pytest.raises(ValueError, match="at least one sender"):
        FleetConfig(units=0, labs=0, modalities=0)
    with pytest.raises(ValueError, match="unit_prefix"):
        FleetConfig(unit_prefix="a/b")


@pytest.mark.timeout(240)
async def test_small_fleet_is_stored_with_nothing_lost_or_duplicated(
    fleet_dsn: str, private_mosquitto: PrivateMosquittoFactory, tmp_path: Path
) -> None:
    # A private broker: a gateway on a shared one would also store other test runs' units.
    mqtt_url = (await private_mosquitto()).url
    env = {"QANTARA_MQTT_SESSION_EXPIRY": "60s"}
    prefix = f"TF{secrets.token_hex(3)}-"
    async with GatewayProcess(database_url=fleet_dsn, mqtt_url=mqtt_url, env=env) as gateway:
        await gateway.wait_ready()
        mllp = await wait_listening(gateway, "mllp")
        dicom = await wait_listening(gateway, "dicom")
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("QANTARA_")}
        child_env["QANTARA_MQTT_URL"] = mqtt_url
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "simulate",
            "fleet",
            *("--units", "5", "--labs", "1", "--modalities", "1", "--duration", "10"),
            *("--unit-rate", "2", "--flaky", "0.03", "--lab-rate", "1"),
            *("--study-interval", "4", "--drain-timeout", "90"),
            *("--mllp-port", str(mllp), "--dicom-port", str(dicom)),
            *("--database-url", fleet_dsn, "--state-dir", str(tmp_path / "fleet")),
            *("--prefix", prefix),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env,
            cwd=ROOT,
        )
        async with asyncio.timeout(200):
            out, err = await proc.communicate()
    stdout, stderr = out.decode(), err.decode()
    print(stdout)  # noqa: T201 - the summary is the figure of this test
    assert proc.returncode == 0, f"{stdout}\n{stderr[-3000:]}"
    assert "[fleet]" in stderr, "no progress line"
    match = SUMMARY.search(stdout)
    assert match is not None, stdout
    assert match["lost"] == "0"
    assert match["dup"] == "0"
    assert int(match["sent"]) == int(match["acked"]) > 0
    # Every sender reached the database: vitals, a lab report, an image.
    conn = await asyncpg.connect(fleet_dsn)
    try:
        # Only this fleet's units: the shared broker may carry other test runs' units too.
        counts = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM mqtt_message m JOIN unit u ON u.id = m.unit_id
                       WHERE u.name LIKE $1 || '%') AS mqtt,
                      (SELECT count(*) FROM vital v JOIN device d ON d.id = v.device_id
                       JOIN unit u ON u.id = d.unit_id WHERE u.name LIKE $1 || '%') AS vitals,
                      (SELECT count(*) FROM lab_report) AS reports,
                      (SELECT count(*) FROM dicom_instance) AS images""",
            prefix,
        )
    finally:
        await conn.close()
    assert counts is not None
    assert counts["mqtt"] == 5 * 2 * 10
    assert counts["vitals"] > 0
    assert counts["reports"] == 10
    assert counts["images"] > 0


def test_a_modality_sends_again_what_was_answered_out_of_resources() -> None:
    # The gateway answers 0xA700 while its database is away; a modality's send queue tries
    # those instances again with its next association, and each is counted once.
    answered: Counter[str] = Counter()

    def out_of_resources_first(event: Event) -> int:
        assert isinstance(event.request, C_STORE)
        uid = str(event.request.AffectedSOPInstanceUID)
        answered[uid] += 1
        return 0xA700 if answered[uid] == 1 else 0x0000

    ae = AE(ae_title="QANTARA")
    ae.add_supported_context(SOP_CLASSES["CR"], ExplicitVRLittleEndian)
    sender = _DicomSender("CR")
    with serving(ae, [(evt.EVT_C_STORE, out_of_resources_first)]) as port:
        cfg = FleetConfig(dicom_port=port, study_interval=0.5, units=0)
        _send_studies(cfg, 0, sender, time.monotonic() + 1.2, threading.Event())
    assert sender.sent > 0
    assert sender.statuses == Counter({"0x0000": sender.sent})
    assert len(set(sender.stored_uids)) == sender.sent
    assert set(answered.values()) == {2}
