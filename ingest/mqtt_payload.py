"""Sans-IO validation of MQTT vitals payloads (contract v1): bytes in, a `VitalsMessage` out.

Every refusal raises `InputError(reason, detail)` where `reason` is a `RejectReason` (a metric
label and the dead letter's reason) and `detail` names the offending field and sample index but
never echoes a received value, so no patient identifier can reach a log line or an error body.

No asyncio, no logging, no MQTT library: the adapter owns the connection, this module owns the
contract. `extract_seq` lets the adapter key a dead letter by `(unit, seq)` when a payload is
otherwise invalid, and `unit_from_topic` checks the topic the broker delivered it on.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeGuard

from ingest import codes
from ingest.errors import InputError
from ingest.records import PatientRef, Sample, VitalsMessage, WaveformSegment

VITALS_TOPIC_FILTER: Final = "units/+/vitals"
PAYLOAD_VERSION: Final = 1
MAX_SEQ: Final = 2**63 - 1
MAX_IDENTIFIER_CHARS: Final = 64
DEFAULT_MAX_PAYLOAD_BYTES: Final = 256 * 1024

_UNIT_ID: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)
# C0 and C1 controls (PostgreSQL text refuses NUL) and lone surrogates (a JSON `\ud800` escape
# decodes to one, and it cannot be encoded back to UTF-8 for storage).
_FORBIDDEN_CHARS: Final = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_MISSING: Final[Any] = object()
_NUMBER_TYPES: Final = frozenset({int, float})
_fromisoformat: Final = datetime.fromisoformat


class RejectReason(enum.StrEnum):
    """Why a payload was refused: the `reason` of the `InputError`, a bounded metric label."""

    BAD_TOPIC = "bad-topic"
    PAYLOAD_TOO_LARGE = "payload-too-large"
    NOT_UTF8 = "not-utf8"
    NOT_JSON = "not-json"
    UNKNOWN_VERSION = "unknown-version"
    INVALID_SEQ = "invalid-seq"
    UNIT_MISMATCH = "unit-mismatch"
    MISSING_PATIENT = "missing-patient"
    INVALID_DEVICE = "invalid-device"
    SAMPLES_NOT_LIST = "samples-not-list"
    NO_SAMPLES = "no-samples"
    INVALID_SAMPLE = "invalid-sample"
    NON_NUMERIC_VALUE = "non-numeric-value"
    UNKNOWN_CODE = "unknown-code"
    INVALID_UNIT = "invalid-unit"
    INVALID_TIME = "invalid-time"
    TIME_IN_FUTURE = "time-in-future"
    TIME_TOO_OLD = "time-too-old"
    INVALID_WAVEFORM = "invalid-waveform"


@dataclass(frozen=True, slots=True)
class PayloadLimits:
    """Bounds on one payload; `gateway.settings` builds this once from configuration.

    `max_samples` and `max_waveform_points` (summed over the payload's waveforms) are refused as
    `payload-too-large`, like the byte limit: they are limits, not malformed content.
    """

    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_future: timedelta = timedelta(hours=24)
    max_past: timedelta = timedelta(days=365)
    max_samples: int = 10_000
    max_waveform_points: int = 100_000
    max_sample_rate_hz: float = 10_000.0


def unit_from_topic(topic: str) -> str:
    """The unit id of a `units/{unit_id}/vitals` topic; unit ids are 1-64 of `[A-Za-z0-9_.-]`."""
    parts = topic.split("/")
    if (
        len(parts) != 3
        or parts[0] != "units"
        or parts[2] != "vitals"
        or _UNIT_ID.fullmatch(parts[1]) is None
    ):
        raise InputError(
            RejectReason.BAD_TOPIC,
            "topic is not units/{unit_id}/vitals with a unit id of 1-64 characters [A-Za-z0-9_.-]",
        )
    return parts[1]


def parse_rfc3339(text: str) -> datetime | None:
    """An RFC 3339 date-time with an offset (`Z`/`z` or `±HH:MM`), in UTC; else None.

    `datetime.fromisoformat` does the parsing (in C), but it also takes ISO 8601 forms RFC 3339
    forbids (no seconds, basic format, any separator, `,` fractions, `+HH`/`+HHMM` offsets,
    minutes over 59 in the offset, naive times); a few positional checks refuse those first.
    No regex: this runs once per sample.
    """
    n = len(text)
    if n < 20 or n > 64 or not text.isascii():
        return None
    if text[4:17:3] != "--T::":  # the characters at 4, 7, 10, 13 and 16
        if text[4:17:3] != "--t::":
            return None
        text = text.upper()
    last = text[-1]
    if last == "Z":
        end = n - 1
    elif last == "z":
        end = n - 1
        text = text.upper()
    elif text[-6] in "+-" and text[-3] == ":" and text[-2] in "012345":
        end = n - 6
    else:
        return None
    if end != 19 and (end < 21 or text[19] != "." or not text[20:end].isdigit()):
        return None
    try:
        parsed = _fromisoformat(text)
        # One instant, one representation: and comparing aware datetimes of different tzinfo
        # objects costs 20 times more than comparing two in UTC.
        return parsed if parsed.tzinfo is UTC else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # out-of-range fields; UTC before year 1 or after 9999
        return None


def extract_seq(
    payload: bytes,
    *,
    unit_id: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> int | None:
    """Best effort: the payload's `seq` when it is a v1 JSON object with a valid one, else None.

    For keying the dead letter of a payload that `parse_vitals` refused after its seq was read,
    so a replay is deduplicated and the unit's watermark can pass it. None exactly when
    `parse_vitals` would refuse it before reading the seq (too large, not UTF-8 or JSON, unknown
    version, bad seq) or, given `unit_id`, when the payload names another unit: its seq then
    belongs to no sequence of this unit.
    """
    if len(payload) > max_payload_bytes:
        return None
    try:
        doc = _load(payload)
        _check_version(doc)
        seq = _seq(doc)
        if unit_id is not None:
            _check_unit(doc, unit_id)
    except InputError:
        return None
    return seq


def parse_vitals(
    unit_id: str, payload: bytes, *, received_at: datetime, limits: PayloadLimits
) -> VitalsMessage:
    """Validate one vitals payload from `unit_id` and return it with codes resolved to LOINC/UCUM.

    `received_at` must be timezone-aware: sample times are checked against it with
    `limits.max_future` and `limits.max_past`. Raises `InputError` with a `RejectReason`.
    """
    if received_at.tzinfo is None:
        raise ValueError("received_at must be timezone-aware")
    size = len(payload)
    if size > limits.max_payload_bytes:
        raise InputError(
            RejectReason.PAYLOAD_TOO_LARGE,
            f"payload is {size} bytes, limit {limits.max_payload_bytes}",
        )
    doc = _load(payload)
    _check_version(doc)
    seq = _seq(doc)
    _check_unit(doc, unit_id)
    patient = _patient(doc)
    device_id, device_kind = _device(doc)
    sent_at = _sent_at(doc)
    received_at = received_at.astimezone(UTC)
    earliest = received_at - limits.max_past
    latest = received_at + limits.max_future
    samples = _samples(doc, limits, earliest, latest)
    waveforms = _waveforms(doc, limits, earliest, latest)
    if not samples and not waveforms:
        raise InputError(RejectReason.NO_SAMPLES, "samples is empty and there are no waveforms")
    return VitalsMessage(
        unit_id=unit_id,
        seq=seq,
        sent_at=sent_at,
        device_id=device_id,
        device_kind=device_kind,
        patient=patient,
        samples=samples,
        waveforms=waveforms,
    )


def _load(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            RejectReason.NOT_UTF8, f"payload is not valid UTF-8 at byte {exc.start}"
        ) from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise InputError(RejectReason.NOT_JSON, "payload nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers over the 4300-digit limit
        where = f" at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        raise InputError(RejectReason.NOT_JSON, f"payload is not valid JSON{where}") from None
    if type(doc) is not dict:
        raise InputError(RejectReason.NOT_JSON, "payload's top level is not a JSON object")
    return doc


def _check_version(doc: dict[str, Any]) -> None:
    version = doc.get("v")
    if type(version) is not int or version != PAYLOAD_VERSION:
        raise InputError(RejectReason.UNKNOWN_VERSION, "v is missing or not 1")


def _seq(doc: dict[str, Any]) -> int:
    seq = doc.get("seq")
    if type(seq) is not int or seq < 1 or seq > MAX_SEQ:
        raise InputError(RejectReason.INVALID_SEQ, "seq is missing or not an integer in 1..2^63-1")
    return seq


def _check_unit(doc: dict[str, Any], unit_id: str) -> None:
    named = doc.get("unit", unit_id)
    if named != unit_id:
        raise InputError(RejectReason.UNIT_MISMATCH, "unit differs from the topic's unit id")


def _identifier_ok(value: object) -> TypeGuard[str]:
    return (
        type(value) is str
        and 0 < len(value) <= MAX_IDENTIFIER_CHARS
        and not value.isspace()
        and _FORBIDDEN_CHARS.search(value) is None
    )


def _patient(doc: dict[str, Any]) -> PatientRef:
    patient = doc.get("patient")
    if type(patient) is not dict:
        raise InputError(RejectReason.MISSING_PATIENT, "patient is missing or not an object")
    system = patient.get("system")
    if not _identifier_ok(system):
        raise _bad_patient_field("system")
    value = patient.get("value")
    if not _identifier_ok(value):
        raise _bad_patient_field("value")
    return PatientRef(system=system, value=value)


def _bad_patient_field(name: str) -> InputError:
    return InputError(
        RejectReason.MISSING_PATIENT,
        f"patient.{name} is missing, not a string, blank, over {MAX_IDENTIFIER_CHARS} characters"
        " or holds control characters",
    )


def _device(doc: dict[str, Any]) -> tuple[str, str]:
    device = doc.get("device")
    if type(device) is not dict:
        raise InputError(RejectReason.INVALID_DEVICE, "device is missing or not an object")
    device_id = device.get("id")
    if not _identifier_ok(device_id):
        raise InputError(
            RejectReason.INVALID_DEVICE,
            f"device.id is missing, not a string, blank, over {MAX_IDENTIFIER_CHARS} characters"
            " or holds control characters",
        )
    kind = device.get("kind", "unknown")
    if not _identifier_ok(kind):
        raise InputError(
            RejectReason.INVALID_DEVICE,
            f"device.kind is not a string, blank, over {MAX_IDENTIFIER_CHARS} characters"
            " or holds control characters",
        )
    return device_id, kind


def _sent_at(doc: dict[str, Any]) -> datetime | None:
    raw = doc.get("sent_at", _MISSING)
    if raw is _MISSING:
        return None
    sent_at = parse_rfc3339(raw) if type(raw) is str else None
    if sent_at is None:
        raise InputError(RejectReason.INVALID_TIME, "sent_at is not an RFC 3339 date-time")
    return sent_at


def _time(raw: object, where: str, earliest: datetime, latest: datetime) -> datetime:
    t = parse_rfc3339(raw) if type(raw) is str else None
    if t is None:
        raise _bad_time(where)
    if t > latest:
        raise _time_out_of_window(where, RejectReason.TIME_IN_FUTURE)
    if t < earliest:
        raise _time_out_of_window(where, RejectReason.TIME_TOO_OLD)
    return t


def _bad_time(where: str) -> InputError:
    return InputError(
        RejectReason.INVALID_TIME, f"{where} is not an RFC 3339 date-time with an offset"
    )


def _time_out_of_window(where: str, reason: RejectReason) -> InputError:
    if reason is RejectReason.TIME_IN_FUTURE:
        return InputError(reason, f"{where} is too far after receipt")
    return InputError(reason, f"{where} is too far before receipt")


def _samples(
    doc: dict[str, Any], limits: PayloadLimits, earliest: datetime, latest: datetime
) -> tuple[Sample, ...]:
    raw = doc.get("samples")
    if type(raw) is not list:
        raise InputError(RejectReason.SAMPLES_NOT_LIST, "samples is missing or not a list")
    if len(raw) > limits.max_samples:
        raise InputError(
            RejectReason.PAYLOAD_TOO_LARGE,
            f"samples has {len(raw)} items, limit {limits.max_samples}",
        )
    resolve = codes.resolve
    isfinite = math.isfinite
    out: list[Sample] = []
    append = out.append
    for i, item in enumerate(raw):
        if type(item) is not dict:
            raise InputError(RejectReason.INVALID_SAMPLE, f"samples[{i}] is not an object")
        try:
            t_raw = item["t"]
            code = item["code"]
            value = item["value"]
        except KeyError as exc:
            raise InputError(
                RejectReason.INVALID_SAMPLE, f"samples[{i}] has no {exc.args[0]!r}"
            ) from None
        kind = type(value)
        if kind is float:
            if not isfinite(value):
                raise InputError(
                    RejectReason.NON_NUMERIC_VALUE, f"samples[{i}].value is not finite"
                )
        elif kind is int:
            try:
                value = float(value)
            except OverflowError:
                raise InputError(
                    RejectReason.NON_NUMERIC_VALUE, f"samples[{i}].value is out of range"
                ) from None
        else:
            raise InputError(RejectReason.NON_NUMERIC_VALUE, f"samples[{i}].value is not a number")
        if type(code) is not str:
            raise InputError(RejectReason.UNKNOWN_CODE, f"samples[{i}].code is not a string")
        unit = item.get("unit")
        if unit is not None and type(unit) is not str:
            raise InputError(RejectReason.INVALID_UNIT, f"samples[{i}].unit is not a string")
        try:
            coded = resolve(code, unit)
        except codes.UnknownCode as exc:
            raise InputError(RejectReason.UNKNOWN_CODE, f"samples[{i}].code: {exc}") from None
        except codes.InvalidUnit as exc:
            raise InputError(RejectReason.INVALID_UNIT, f"samples[{i}].unit: {exc}") from None
        t = parse_rfc3339(t_raw) if type(t_raw) is str else None
        if t is None:
            raise _bad_time(f"samples[{i}].t")
        if t > latest:
            raise _time_out_of_window(f"samples[{i}].t", RejectReason.TIME_IN_FUTURE)
        if t < earliest:
            raise _time_out_of_window(f"samples[{i}].t", RejectReason.TIME_TOO_OLD)
        append(Sample(t, coded.code, value, coded.unit))
    return tuple(out)


def _waveforms(
    doc: dict[str, Any], limits: PayloadLimits, earliest: datetime, latest: datetime
) -> tuple[WaveformSegment, ...]:
    raw = doc.get("waveforms", _MISSING)
    if raw is _MISSING:
        return ()
    if type(raw) is not list:
        raise InputError(RejectReason.INVALID_WAVEFORM, "waveforms is not a list")
    budget = limits.max_waveform_points
    out: list[WaveformSegment] = []
    for j, item in enumerate(raw):
        where = f"waveforms[{j}]"
        if type(item) is not dict:
            raise InputError(RejectReason.INVALID_WAVEFORM, f"{where} is not an object")
        code = item.get("code")
        channel = codes.waveform_for(code) if type(code) is str else None
        if channel is None:
            raise InputError(
                RejectReason.INVALID_WAVEFORM, f"{where}.code is not a known waveform channel"
            )
        fs = item.get("fs")
        if not _is_number(fs) or not 0 < fs <= limits.max_sample_rate_hz:
            raise InputError(
                RejectReason.INVALID_WAVEFORM,
                f"{where}.fs is not a number in (0, {limits.max_sample_rate_hz:g}] Hz",
            )
        unit = item.get("unit")
        if unit is None:
            unit = channel.default_unit
        elif type(unit) is not str or not codes.is_ucum_unit(unit):
            raise InputError(
                RejectReason.INVALID_WAVEFORM, f"{where}.unit is not a plausible UCUM unit"
            )
        values = item.get("values")
        if type(values) is not list or not values:
            raise InputError(
                RejectReason.INVALID_WAVEFORM, f"{where}.values is missing, empty or not a list"
            )
        budget -= len(values)
        if budget < 0:
            raise InputError(
                RejectReason.PAYLOAD_TOO_LARGE,
                f"waveforms hold over {limits.max_waveform_points} points",
            )
        points = _points(values)
        if points is None:
            raise InputError(
                RejectReason.INVALID_WAVEFORM, f"{where}.values holds a value that is not a number"
            )
        t0 = _time(item.get("t0"), f"{where}.t0", earliest, latest)
        out.append(WaveformSegment(t0, str(channel.mdc_code), float(fs), unit, points))
    return tuple(out)


def _is_number(value: object) -> TypeGuard[int | float]:
    kind = type(value)
    return kind is int or kind is float


def _points(values: list[Any]) -> tuple[float, ...] | None:
    """The values as floats, or None if any is not a finite number (bools are not numbers)."""
    if not _NUMBER_TYPES.issuperset(map(type, values)):
        return None
    try:
        points = tuple(map(float, values))
    except OverflowError:
        return None
    if not all(map(math.isfinite, points)):
        return None
    return points
