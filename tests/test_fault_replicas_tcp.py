"""MLLP and DICOM behind a TCP load balancer: two replicas, a sender that lands on each in turn.

A TCP load balancer may send a sender's next connection to another replica, for instance a resend
after a lost ACK. Replicas keep no state of their own (principle 5): the deduplication keys, HL7
(MSH-3, MSH-4, MSH-10) and the DICOM SOP Instance UID, are unique in the shared database, so a
resend to the other replica is acknowledged again (AA, 0x0000) and stores nothing new. The test
plays the load balancer: the lab simulator's connections go to replica A, then the same messages
(same seed, same MSH-10) to replica B; one C-STORE goes to A, the same instance to B.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from datetime import UTC, datetime

import asyncpg
import pytest
from pydicom.dataset import Dataset

from simulators.lab import LabConfig, run_lab
from simulators.modality import study_datasets
from simulators.population import REGIONS, Population
from tests.conftest import PrivateMosquittoFactory
from tests.dicom_support import store
from tests.gateway_process import GatewayProcess, wait_listening

pytestmark = [pytest.mark.slow]

MESSAGES = 20


def one_instance() -> Dataset:
    rng = random.Random(7)
    patient = Population(datetime.now(UTC).date()).patient(rng, REGIONS[0].provinces[0])
    return study_datasets(patient, "CR", "ISO_IR 192", rng, datetime.now(UTC))[0]


@pytest.mark.timeout(180)
async def test_resend_to_the_other_replica_is_acknowledged_again_and_stored_once(
    fresh_dsn: str, private_mosquitto: PrivateMosquittoFactory
) -> None:
    mqtt_url = (await private_mosquitto()).url  # not the shared one: no other run's units
    env = {
        "QANTARA_MQTT_SHARED_GROUP": f"lb{secrets.token_hex(3)}",
        "QANTARA_MQTT_SESSION_EXPIRY": "60s",
    }
    async with (
        GatewayProcess(database_url=fresh_dsn, mqtt_url=mqtt_url, env=env) as a,
        GatewayProcess(database_url=fresh_dsn, mqtt_url=mqtt_url, env=env) as b,
    ):
        await a.wait_ready()
        await b.wait_ready()
        mllp = [await wait_listening(gw, "mllp") for gw in (a, b)]
        dicom = [await wait_listening(gw, "dicom") for gw in (a, b)]
        lab = LabConfig(port=mllp[0], count=MESSAGES, rate=0, connections=2, quiet=True)
        to_a = await run_lab(lab)
        to_b = await run_lab(LabConfig(port=mllp[1], count=MESSAGES, rate=0, quiet=True))
        instance = one_instance()
        statuses = [
            (await asyncio.to_thread(store, port, [instance], "LB-MODALITY"))[0] for port in dicom
        ]
        duplicates_on_b = (await b.metrics()).get(
            "qantara_messages_duplicate_total", protocol="hl7"
        )
    conn = await asyncpg.connect(fresh_dsn)
    try:
        counts = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM hl7_message) AS messages,
                      (SELECT count(*) FROM lab_report) AS reports,
                      (SELECT count(*) FROM dicom_instance WHERE sop_instance_uid = $1)
                          AS instances""",
            str(instance.SOPInstanceUID),
        )
    finally:
        await conn.close()
    assert counts is not None
    print(  # noqa: T201 - the figures of the test
        f"\n[replicas tcp] replica A: {to_a.summary()}\nreplica B (resend): {to_b.summary()}"
        f"\nhl7 rows {counts['messages']} reports {counts['reports']};"
        f" C-STORE statuses {statuses}, instance rows {counts['instances']}"
    )
    assert to_a.codes["AA"] == MESSAGES
    assert to_b.codes["AA"] == MESSAGES, "a resend to the other replica must get AA again"
    assert duplicates_on_b == MESSAGES
    assert counts["messages"] == counts["reports"] == MESSAGES
    assert statuses == [0x0000, 0x0000]
    assert counts["instances"] == 1
