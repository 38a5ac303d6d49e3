"""The production broker's access control, against a private Mosquitto running the repository's
own `deploy/mosquitto/mosquitto.conf` and `acl`, with the password file and certificates that
`deploy/make_secrets.sh` (`make certs`) generates.

Only the paths and the port of the configuration are rewritten for the test; TLS, the password
file, the ACL and persistence are the production ones. Clients speak MQTT 5 over TLS, verifying
the broker against the generated CA, so that a refusal comes back as a reason code (0x87).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.local_services import find_mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
ACL = ROOT / "deploy" / "mosquitto" / "acl"
MAKE_SECRETS = ROOT / "deploy" / "make_secrets.sh"
UNIT = "UMMC-FM-001"
OTHER_UNIT = "UMMC-FM-002"
GATEWAY = "qantara-gateway"
NOT_AUTHORIZED = 0x87
WAIT = 10.0  # seconds: every wait of this module is bounded by it
QUIET = 1.0  # seconds to wait for a message that must not come


@dataclass(slots=True)
class Broker:
    port: int
    secrets: Path
    log: Path

    def password(self, user: str) -> str:
        return (self.secrets / "passwords" / user).read_text().strip()


def _start_broker(base: Path) -> tuple[Broker, subprocess.Popen[bytes]]:
    secrets = base / "secrets"
    generated = subprocess.run(
        ["bash", str(MAKE_SECRETS), str(secrets)],
        env={**os.environ, "UNITS": f"{UNIT} {OTHER_UNIT}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    # As in the containers: the broker reads its files through a path it may traverse.
    secrets.chmod(0o755)
    data = base / "data"
    data.mkdir()
    port = free_port()
    text = CONFIG.read_text(encoding="utf-8")
    text = text.replace("/mosquitto/secrets/", f"{secrets}/")
    text = text.replace("/mosquitto/config/acl", str(ACL))
    text = text.replace("/mosquitto/data/", f"{data}/")
    assert "listener 8883\n" in text
    text = text.replace("listener 8883\n", f"listener {port} 127.0.0.1\n")
    config = base / "mosquitto.conf"
    config.write_text(text, encoding="utf-8")
    if os.geteuid() == 0:  # mosquitto drops root for its `mosquitto` user (else `nobody`)
        for name in ("mosquitto", "nobody"):
            try:
                account = pwd.getpwnam(name)
            except KeyError:
                continue
            os.chown(data, account.pw_uid, account.pw_gid)
            break
        base.chmod(0o755)
    binary = find_mosquitto()
    if binary is None:
        pytest.fail("mosquitto is missing: `make test` installs it (Debian package mosquitto)")
    log = base / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + WAIT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mosquitto exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mosquitto did not listen within {WAIT} s:\n{log.read_text()}")
            time.sleep(0.05)
    return Broker(port=port, secrets=secrets, log=log), proc


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    base = Path(tempfile.mkdtemp(prefix="qantara-acl-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        started, proc = _start_broker(base)
        yield started
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=WAIT)
        shutil.rmtree(base, ignore_errors=True)


@dataclass(slots=True)
class Client:
    """A paho MQTT 5 client over TLS whose callbacks feed bounded waits."""

    paho: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    connect_reason: list[ReasonCode] = field(default_factory=list)
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, predicate: object, what: str) -> None:
        assert callable(predicate)
        with self.changed:
            if not self.changed.wait_for(predicate, timeout=WAIT):
                raise AssertionError(f"no {what} within {WAIT} s")

    def subscribe(self, topic: str) -> ReasonCode:
        _, mid = self.paho.subscribe(topic, qos=1)
        assert mid is not None
        self.wait_for(lambda: mid in self.subacks, f"SUBACK for {topic}")
        return self.subacks[mid][0]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        self.wait_for(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def received(self, topic: str, payload: bytes) -> bool:
        with self.changed:
            return (topic, payload) in self.messages

    def wait_message(self, topic: str, payload: bytes) -> None:
        self.wait_for(lambda: (topic, payload) in self.messages, f"message on {topic}")


def _client(broker: Broker, user: str, password: str, client_id: str) -> Client:
    paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client = Client(paho=paho)
    paho.tls_set_context(ssl.create_default_context(cafile=str(broker.secrets / "ca.crt")))
    paho.username_pw_set(user, password)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        with client.changed:
            client.connect_reason.append(reason)
            client.changed.notify_all()

    def on_subscribe(
        _c: mqtt.Client, _u: object, mid: int, reasons: list[ReasonCode], _p: object
    ) -> None:
        with client.changed:
            client.subacks[mid] = reasons
            client.changed.notify_all()

    def on_publish(_c: mqtt.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        with client.changed:
            client.pubacks[mid] = reason
            client.changed.notify_all()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        with client.changed:
            client.messages.append((message.topic, bytes(message.payload)))
            client.changed.notify_all()

    paho.on_connect = on_connect
    paho.on_subscribe = on_subscribe
    paho.on_publish = on_publish
    paho.on_message = on_message
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    paho.connect("127.0.0.1", broker.port, keepalive=30, clean_start=True, properties=properties)
    paho.loop_start()
    client.wait_for(lambda: client.connect_reason, f"CONNACK for {user}")
    return client


@pytest.fixture
def clients(broker: Broker) -> Iterator[dict[str, Client]]:
    made: dict[str, Client] = {}
    try:
        for user in (GATEWAY, UNIT, OTHER_UNIT):
            made[user] = _client(broker, user, broker.password(user), f"test-{user}")
            assert not made[user].connect_reason[0].is_failure, made[user].connect_reason
        yield made
    finally:
        for client in made.values():
            client.paho.disconnect()
            client.paho.loop_stop()
            # loop_start's socket pair is closed only by paho's __del__; the callbacks make the
            # client a cycle, and a garbage collection that finalizes the sockets first warned
            # of them unclosed (an error under filterwarnings), in whichever test it ran.
            client.paho._reset_sockets()


def test_gateway_shared_subscription_receives_a_unit_s_vitals(
    clients: dict[str, Client],
) -> None:
    gateway, unit = clients[GATEWAY], clients[UNIT]
    assert not gateway.subscribe("$share/qantara/units/+/vitals").is_failure
    topic = f"units/{UNIT}/vitals"
    assert not unit.publish(topic, b'{"v":1,"seq":1}').is_failure
    gateway.wait_message(topic, b'{"v":1,"seq":1}')


def test_gateway_plain_subscription_to_every_unit_s_vitals_and_status_is_granted(
    clients: dict[str, Client],
) -> None:
    gateway = clients[GATEWAY]
    assert not gateway.subscribe("units/+/vitals").is_failure
    assert not gateway.subscribe("units/+/status").is_failure


def test_unit_cannot_publish_to_another_unit_s_vitals(clients: dict[str, Client]) -> None:
    gateway, unit = clients[GATEWAY], clients[UNIT]
    assert not gateway.subscribe("units/+/vitals").is_failure
    forged = f"units/{OTHER_UNIT}/vitals"
    reason = unit.publish(forged, b'{"v":1,"seq":99}')
    assert reason.value == NOT_AUTHORIZED
    # The broker must not deliver it either: an own publication after it arrives alone.
    own = f"units/{UNIT}/vitals"
    assert not unit.publish(own, b'{"v":1,"seq":2}').is_failure
    gateway.wait_message(own, b'{"v":1,"seq":2}')
    time.sleep(QUIET)  # bounded: proving an absence
    assert not gateway.received(forged, b'{"v":1,"seq":99}')


def test_unit_receives_nothing_of_another_unit_s_topics(clients: dict[str, Client]) -> None:
    # Mosquitto grants the subscription and enforces read access on each delivery.
    gateway, unit, other = clients[GATEWAY], clients[UNIT], clients[OTHER_UNIT]
    unit.subscribe(f"units/{OTHER_UNIT}/#")
    unit.subscribe("units/+/vitals")
    assert not gateway.subscribe("units/+/vitals").is_failure
    topic = f"units/{OTHER_UNIT}/vitals"
    assert not other.publish(topic, b'{"v":1,"seq":7}').is_failure
    gateway.wait_message(topic, b'{"v":1,"seq":7}')
    time.sleep(QUIET)  # bounded: proving an absence
    assert unit.messages == []


def test_unit_reads_the_ack_watermark_the_gateway_publishes_for_it(
    clients: dict[str, Client],
) -> None:
    gateway, unit = clients[GATEWAY], clients[UNIT]
    topic = f"units/{UNIT}/ack"
    assert not unit.subscribe(topic).is_failure
    assert not gateway.publish(topic, b'{"seq":1}', retain=True).is_failure
    unit.wait_message(topic, b'{"seq":1}')


def test_gateway_cannot_publish_vitals_in_a_unit_s_name(clients: dict[str, Client]) -> None:
    assert clients[GATEWAY].publish(f"units/{UNIT}/vitals", b"{}").value == NOT_AUTHORIZED


@pytest.mark.parametrize(
    ("user", "password"),
    [(UNIT, "not-the-password"), ("", ""), ("UMMC-XX-999", "guess")],
    ids=["wrong-password", "anonymous", "unknown-unit"],
)
def test_connection_without_valid_credentials_is_refused(
    broker: Broker, user: str, password: str
) -> None:
    client = _client(broker, user, password, f"test-refused-{user or 'anonymous'}")
    try:
        assert client.connect_reason[0].is_failure
    finally:
        client.paho.disconnect()
        client.paho.loop_stop()
