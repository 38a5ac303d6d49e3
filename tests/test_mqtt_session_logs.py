"""What paho, under the gateway's MQTT client, logs of a lost connection: INFO, since the MQTT
task says it at WARNING and reconnects; paho's other errors keep their level."""

from __future__ import annotations

import logging

import pytest

from ingest import mqtt_session

PAHO = mqtt_session._PAHO_LOG


def test_a_connection_the_broker_dropped_is_logged_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=PAHO.name)
    PAHO.error("failed to receive on socket: %s", ConnectionResetError(104, "reset"))
    [record] = caplog.records
    assert (record.levelname, record.getMessage()) == (
        "INFO",
        "failed to receive on socket: [Errno 104] reset",
    )


def test_it_is_not_logged_at_all_when_the_level_is_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=PAHO.name)
    PAHO.error("timeout on socket: %s", TimeoutError())
    assert caplog.records == []


def test_an_exception_in_a_callback_stays_an_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=PAHO.name)
    PAHO.error("Caught exception in on_message: %s", ValueError("bug"))
    [record] = caplog.records
    assert record.levelname == "ERROR"
