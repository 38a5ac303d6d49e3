"""Vital signs of simulated patients and the v1 MQTT payload that carries them.

`PatientVitals` keeps one patient's current values and lets them drift (a mean-reverting random
walk around a baseline set by age, sex and conditions). `ConsultationStream` plays a unit's day:
a patient comes in, is weighed, has their temperature (and, if diabetic or by chance, glucose)
taken, then stays on the multiparameter monitor for a while, with the odd ECG strip; then the
next patient. `encode_payload` turns one reading into the v1 JSON contract of DESIGN.md (MQTT).
"""

from __future__ import annotations

import enum
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from simulators.population import Condition, Patient, Sex

__all__ = [
    "ConsultationStream",
    "Device",
    "DeviceKind",
    "PatientVitals",
    "Reading",
    "Sample",
    "Waveform",
    "ecg_lead_ii",
    "encode_payload",
    "equip_unit",
    "rfc3339",
    "utc_now",
]

PAYLOAD_VERSION = 1

# alias -> UCUM unit, as the gateway's code table expects them
UNITS: dict[str, str] = {
    "hr": "/min",
    "spo2": "%",
    "sbp": "mm[Hg]",
    "dbp": "mm[Hg]",
    "temp": "Cel",
    "rr": "/min",
    "glucose": "mg/dL",
    "weight": "kg",
}


class DeviceKind(enum.StrEnum):
    MONITOR = "multiparameter-monitor"
    GLUCOMETER = "glucometer"
    SCALE = "scale"
    THERMOMETER = "thermometer"
    ECG = "ecg"


_DEVICE_ID_PREFIX: dict[DeviceKind, str] = {
    DeviceKind.MONITOR: "MON",
    DeviceKind.GLUCOMETER: "GLU",
    DeviceKind.SCALE: "SCL",
    DeviceKind.THERMOMETER: "THM",
    DeviceKind.ECG: "ECG",
}


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    kind: DeviceKind


@dataclass(frozen=True, slots=True)
class Sample:
    t: datetime
    code: str
    value: int | float
    unit: str


@dataclass(frozen=True, slots=True)
class Waveform:
    t0: datetime
    code: str
    fs: int
    unit: str
    values: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Reading:
    """What one device reported about one patient: the content of one v1 message."""

    device: Device
    patient_cin: str
    samples: tuple[Sample, ...]
    waveforms: tuple[Waveform, ...] = ()


def rfc3339(moment: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix: `2025-05-21T09:30:00.250Z`."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_payload(seq: int, sent_at: datetime, reading: Reading) -> bytes:
    """The v1 contract, compact UTF-8 JSON."""
    body: dict[str, object] = {
        "v": PAYLOAD_VERSION,
        "seq": seq,
        "sent_at": rfc3339(sent_at),
        "device": {"id": reading.device.id, "kind": reading.device.kind.value},
        "patient": {"system": "CIN", "value": reading.patient_cin},
        "samples": [
            {"t": rfc3339(s.t), "code": s.code, "value": s.value, "unit": s.unit}
            for s in reading.samples
        ],
    }
    if reading.waveforms:
        body["waveforms"] = [
            {
                "t0": rfc3339(w.t0),
                "code": w.code,
                "fs": w.fs,
                "unit": w.unit,
                "values": list(w.values),
            }
            for w in reading.waveforms
        ]
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def equip_unit(rng: random.Random) -> tuple[Device, ...]:
    """One of each device kind, with serial-like ids (`MON-1704`)."""
    return tuple(
        Device(id=f"{_DEVICE_ID_PREFIX[kind]}-{rng.randint(10, 9999)}", kind=kind)
        for kind in DeviceKind
    )


@dataclass(frozen=True, slots=True)
class _Drift:
    """Mean-reverting walk: `theta` per second towards the baseline, `sigma` per sqrt(second)."""

    theta: float
    sigma: float
    low: float
    high: float


_DRIFT: dict[str, _Drift] = {
    "hr": _Drift(theta=0.05, sigma=1.2, low=35, high=210),
    "spo2": _Drift(theta=0.1, sigma=0.35, low=70, high=100),
    "sbp": _Drift(theta=0.02, sigma=1.0, low=70, high=230),
    "dbp": _Drift(theta=0.02, sigma=0.6, low=40, high=140),
    "temp": _Drift(theta=0.01, sigma=0.02, low=35.0, high=41.5),
    "rr": _Drift(theta=0.05, sigma=0.4, low=8, high=70),
    "glucose": _Drift(theta=0.005, sigma=0.8, low=40, high=500),
    "weight": _Drift(theta=0.001, sigma=0.005, low=2.0, high=180.0),
}


def _baseline(patient: Patient, age: int, rng: random.Random) -> dict[str, float]:
    conditions = patient.conditions
    if age < 1:
        hr, rr, sbp, dbp = 130.0, 40.0, 80.0, 50.0
    elif age < 6:
        hr, rr, sbp, dbp = 105.0, 28.0, 95.0, 58.0
    elif age < 13:
        hr, rr, sbp, dbp = 88.0, 20.0, 105.0, 65.0
    else:
        hr, rr = 72.0, 15.0
        sbp = 112.0 + max(0, age - 35) * 0.55
        dbp = 72.0 + max(0, age - 35) * 0.2
    hr += rng.gauss(0, 6)
    sbp += rng.gauss(0, 8)
    dbp += rng.gauss(0, 5)
    spo2 = 97.5 - (1.0 if age >= 70 else 0.0) + rng.gauss(0, 0.6)
    temp = 36.8 + rng.gauss(0, 0.2)
    glucose = 95.0 + rng.gauss(0, 10)
    if Condition.HYPERTENSION in conditions:
        sbp += rng.uniform(18, 40)
        dbp += rng.uniform(8, 18)
    if Condition.DIABETES in conditions:
        glucose = rng.uniform(140, 260)
    if Condition.PREGNANCY in conditions:
        hr += 10
        sbp -= 4
        dbp -= 4
    if Condition.CHRONIC_LUNG in conditions:
        spo2 -= rng.uniform(3, 7)
        rr += 4
    if Condition.FEVER in conditions:
        temp = rng.uniform(38.0, 39.8)
        hr += (temp - 37.0) * 10
        rr += 3
    return {
        "hr": hr,
        "spo2": min(spo2, 99.5),
        "sbp": sbp,
        "dbp": min(dbp, sbp - 25),
        "temp": temp,
        "rr": rr,
        "glucose": glucose,
        "weight": _weight(patient, age, rng),
    }


def _weight(patient: Patient, age: int, rng: random.Random) -> float:
    if age < 1:
        kg = 3.5 + rng.uniform(0, 6)
    elif age < 13:
        kg = 8.0 + age * 2.6 + rng.gauss(0, 2)
    elif age < 18:
        kg = 40.0 + (age - 13) * 4 + rng.gauss(0, 5)
    elif patient.sex is Sex.FEMALE:
        kg = 68.0 + rng.gauss(0, 12)
    else:
        kg = 72.0 + rng.gauss(0, 11)
    if Condition.PREGNANCY in patient.conditions:
        kg += rng.uniform(3, 12)
    return max(kg, 2.5)


class PatientVitals:
    """One patient's current vital signs, drifting plausibly between readings."""

    def __init__(self, patient: Patient, rng: random.Random, today: date) -> None:
        self.patient = patient
        self._rng = rng
        self._mean = _baseline(patient, patient.age(today), rng)
        self._value = dict(self._mean)

    def step(self, seconds: float) -> None:
        dt = max(seconds, 0.0)
        for code, drift in _DRIFT.items():
            mean = self._mean[code]
            x = self._value[code]
            x += drift.theta * (mean - x) * dt + drift.sigma * math.sqrt(dt) * self._rng.gauss()
            self._value[code] = min(max(x, drift.low), drift.high)

    def value(self, code: str) -> int | float:
        """The current value as a device would display it (integers, one decimal)."""
        x = self._value[code]
        if code in ("temp", "weight"):
            return round(x, 1)
        if code == "spo2":
            return min(round(x), 100)
        if code == "dbp":
            return min(round(x), round(self._value["sbp"]) - 15)
        return round(x)

    def sample(self, code: str, t: datetime) -> Sample:
        return Sample(t=t, code=code, value=self.value(code), unit=UNITS[code])


def ecg_lead_ii(hr: float, t0: datetime, rng: random.Random, fs: int = 250) -> Waveform:
    """One second of a synthetic lead II (sum of Gaussian P, Q, R, S, T waves), in mV."""
    period = 60.0 / max(hr, 30.0)
    waves = ((0.2, 0.15, 0.025), (0.35, -0.12, 0.01), (0.4, 1.1, 0.012), (0.45, -0.25, 0.01))
    t_wave = (0.65, 0.3, 0.04)
    values: list[float] = []
    for index in range(fs):
        phase = (index / fs) % period / period
        mv = sum(a * math.exp(-(((phase - c) * period) ** 2) / (2 * w * w)) for c, a, w in waves)
        c, a, w = t_wave
        mv += a * math.exp(-(((phase - c) * period) ** 2) / (2 * w * w))
        mv += rng.gauss(0, 0.015)
        values.append(round(mv, 3))
    return Waveform(t0=t0, code="ecg-ii", fs=fs, unit="mV", values=tuple(values))


class ConsultationStream:
    """A unit's sequence of readings: one patient after another, device by device."""

    def __init__(
        self,
        devices: Sequence[Device],
        next_patient: Callable[[], Patient],
        rng: random.Random,
        *,
        today: date,
        waveforms: bool = False,
    ) -> None:
        self._devices = {device.kind: device for device in devices}
        self._next_patient = next_patient
        self._rng = rng
        self._today = today
        self._waveforms = waveforms
        self._vitals: PatientVitals | None = None
        self._plan: list[DeviceKind] = []
        self._last: datetime | None = None
        self._monitor_count = 0

    @property
    def patient(self) -> Patient | None:
        return None if self._vitals is None else self._vitals.patient

    def next_reading(self, now: datetime) -> Reading:
        if not self._plan:
            self._admit(now)
        vitals = self._vitals
        if vitals is None:  # _admit always sets it
            raise RuntimeError("no patient")
        if self._last is not None:
            vitals.step((now - self._last).total_seconds())
        self._last = now
        kind = self._plan.pop(0)
        device = self._devices[kind]
        # device clock: the measurement was taken a moment before the hub sent it
        t = now - timedelta(milliseconds=self._rng.randint(50, 1500))
        return Reading(
            device=device,
            patient_cin=vitals.patient.cin,
            samples=self._samples(kind, vitals, t),
            waveforms=self._strips(kind, vitals, t),
        )

    def _admit(self, now: datetime) -> None:
        rng = self._rng
        patient = self._next_patient()
        self._vitals = PatientVitals(patient, rng, self._today)
        self._last = now
        self._monitor_count = 0
        plan: list[DeviceKind] = []
        if rng.random() < 0.8:
            plan.append(DeviceKind.SCALE)
        if rng.random() < 0.9:
            plan.append(DeviceKind.THERMOMETER)
        if Condition.DIABETES in patient.conditions or rng.random() < 0.3:
            plan.append(DeviceKind.GLUCOMETER)
        for _ in range(rng.randint(15, 90)):
            plan.append(DeviceKind.ECG if rng.random() < 0.08 else DeviceKind.MONITOR)
        self._plan = [kind for kind in plan if kind in self._devices] or [DeviceKind.MONITOR]

    def _samples(self, kind: DeviceKind, vitals: PatientVitals, t: datetime) -> tuple[Sample, ...]:
        if kind is DeviceKind.SCALE:
            return (vitals.sample("weight", t),)
        if kind is DeviceKind.THERMOMETER:
            return (vitals.sample("temp", t),)
        if kind is DeviceKind.GLUCOMETER:
            return (vitals.sample("glucose", t),)
        if kind is DeviceKind.ECG:
            return (vitals.sample("hr", t),)
        codes = ["hr", "spo2", "rr"]
        if self._monitor_count % 10 == 0:  # cuff pressure every tenth monitor reading
            codes += ["sbp", "dbp"]
        self._monitor_count += 1
        return tuple(vitals.sample(code, t) for code in codes)

    def _strips(self, kind: DeviceKind, vitals: PatientVitals, t: datetime) -> tuple[Waveform, ...]:
        if kind is not DeviceKind.ECG or not self._waveforms:
            return ()
        return (ecg_lead_ii(float(vitals.value("hr")), t - timedelta(seconds=1), self._rng),)


def utc_now() -> datetime:
    return datetime.now(UTC)
