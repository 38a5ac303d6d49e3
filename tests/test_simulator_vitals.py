"""Simulated readings and the v1 MQTT payload they travel in (DESIGN.md, MQTT)."""

from __future__ import annotations

import functools
import json
import random
import re
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from simulators.population import REGIONS, Condition, Population
from simulators.vitals import (
    UNITS,
    ConsultationStream,
    DeviceKind,
    PatientVitals,
    encode_payload,
    equip_unit,
    rfc3339,
)

TODAY = date(2025, 5, 21)
RFC3339_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")
ALIASES = {"hr", "spo2", "sbp", "dbp", "temp", "rr", "glucose", "weight"}
KINDS = {"multiparameter-monitor", "glucometer", "scale", "thermometer", "ecg"}


def _stream(seed: int = 4, *, waveforms: bool = False) -> ConsultationStream:
    rng = random.Random(seed)
    panel = Population(TODAY).panel(rng, REGIONS[0].provinces[1], 50)
    return ConsultationStream(
        equip_unit(rng),
        functools.partial(rng.choice, panel),
        rng,
        today=TODAY,
        waveforms=waveforms,
    )


def _messages(count: int, *, waveforms: bool = False) -> list[dict[str, Any]]:
    stream = _stream(waveforms=waveforms)
    start = datetime(2025, 5, 21, 9, 0, tzinfo=UTC)
    out = []
    for seq in range(1, count + 1):
        now = start + timedelta(seconds=seq)
        out.append(json.loads(encode_payload(seq, now, stream.next_reading(now))))
    return out


def test_payload_has_exactly_the_v1_keys_and_types() -> None:
    for seq, body in enumerate(_messages(300), start=1):
        assert set(body) == {"v", "seq", "sent_at", "device", "patient", "samples"}
        assert body["v"] == 1
        assert body["seq"] == seq
        assert isinstance(body["sent_at"], str)
        assert RFC3339_Z.fullmatch(body["sent_at"])
        device = body["device"]
        assert isinstance(device, dict)
        assert set(device) == {"id", "kind"}
        assert device["kind"] in KINDS
        assert re.fullmatch(r"[A-Z]{3}-\d+", device["id"])
        patient = body["patient"]
        assert isinstance(patient, dict)
        assert patient["system"] == "CIN"
        assert re.fullmatch(r"[A-Z]{1,2}\d{5,6}", patient["value"])


def test_samples_use_aliases_ucum_units_and_utc_times() -> None:
    for body in _messages(300):
        samples = body["samples"]
        assert isinstance(samples, list)
        assert samples
        for sample in samples:
            assert set(sample) == {"t", "code", "value", "unit"}
            assert sample["code"] in ALIASES
            assert sample["unit"] == UNITS[sample["code"]]
            assert isinstance(sample["value"], int | float)
            assert not isinstance(sample["value"], bool)
            assert RFC3339_Z.fullmatch(sample["t"])


def test_every_device_kind_reports_in_a_session() -> None:
    kinds = {body["device"]["kind"] for body in _messages(1500)}
    assert kinds == KINDS


def test_payload_is_compact_utf8_json() -> None:
    now = datetime(2025, 5, 21, 9, 0, tzinfo=UTC)
    payload = encode_payload(1, now, _stream().next_reading(now))
    assert b" " not in payload
    assert payload.decode("utf-8")


def test_waveforms_only_when_asked_and_in_contract_shape() -> None:
    assert all("waveforms" not in body for body in _messages(300))
    strips = [body["waveforms"] for body in _messages(600, waveforms=True) if "waveforms" in body]
    assert strips
    for waveforms in strips:
        (strip,) = waveforms
        assert strip["code"] == "ecg-ii"
        assert strip["fs"] == 250
        assert strip["unit"] == "mV"
        assert len(strip["values"]) == 250
        assert RFC3339_Z.fullmatch(strip["t0"])


def test_rfc3339_converts_to_utc_with_z_and_refuses_naive_times() -> None:
    casablanca = timezone(timedelta(hours=1))
    assert rfc3339(datetime(2025, 5, 21, 11, 0, 0, 250000, tzinfo=casablanca)) == (
        "2025-05-21T10:00:00.250Z"
    )
    with pytest.raises(ValueError, match="naive"):
        rfc3339(datetime(2025, 5, 21, 10, 0))  # noqa: DTZ001


def test_vitals_stay_in_physiological_ranges_while_drifting() -> None:
    rng = random.Random(12)
    population = Population(TODAY)
    for _ in range(40):
        vitals = PatientVitals(population.patient(rng, REGIONS[1].provinces[2]), rng, TODAY)
        for _ in range(600):
            vitals.step(1.0)
            assert 35 <= vitals.value("hr") <= 210
            assert 70 <= vitals.value("spo2") <= 100
            assert vitals.value("dbp") < vitals.value("sbp")
            assert 35.0 <= vitals.value("temp") <= 41.5
            assert 40 <= vitals.value("glucose") <= 500


def test_diabetic_patients_run_higher_glucose() -> None:
    rng = random.Random(21)
    population = Population(TODAY)
    province = REGIONS[0].provinces[0]
    diabetic: list[int | float] = []
    other: list[int | float] = []
    for _ in range(3000):
        patient = population.patient(rng, province)
        glucose = PatientVitals(patient, rng, TODAY).value("glucose")
        (diabetic if Condition.DIABETES in patient.conditions else other).append(glucose)
    assert diabetic
    assert sum(diabetic) / len(diabetic) > sum(other) / len(other) + 50


def test_same_seed_gives_the_same_readings() -> None:
    assert _messages(200) == _messages(200)


def test_monitor_readings_carry_heart_rate_spo2_and_respiration() -> None:
    for body in _messages(400):
        if body["device"]["kind"] == DeviceKind.MONITOR.value:
            codes = {s["code"] for s in body["samples"]}
            assert {"hr", "spo2", "rr"} <= codes
