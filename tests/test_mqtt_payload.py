"""MQTT vitals payload contract v1: bytes in, a `VitalsMessage` or a precise `InputError` out."""

from __future__ import annotations

import contextlib
import json
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from ingest.codes import ALIASES, WAVEFORMS
from ingest.errors import InputError
from ingest.mqtt_payload import (
    MAX_SEQ,
    PayloadLimits,
    RejectReason,
    extract_seq,
    parse_rfc3339,
    parse_vitals,
    unit_from_topic,
)
from ingest.records import PatientRef, Sample, VitalsMessage, WaveformSegment

UNIT = "unit-07"
RECEIVED = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LIMITS = PayloadLimits()
PATIENT_VALUE = "AB123456"

ALIAS_CODINGS = [
    ("hr", "8867-4", "/min"),
    ("spo2", "59408-5", "%"),
    ("sbp", "8480-6", "mm[Hg]"),
    ("dbp", "8462-4", "mm[Hg]"),
    ("temp", "8310-5", "Cel"),
    ("rr", "9279-1", "/min"),
    ("glucose", "2339-0", "mg/dL"),
    ("weight", "29463-7", "kg"),
]


def sample(**fields: Any) -> dict[str, Any]:
    return {"t": "2025-03-01T11:59:00Z", "code": "8867-4", "value": 72, "unit": "/min"} | fields


def waveform(**fields: Any) -> dict[str, Any]:
    base = {"t0": "2025-03-01T11:59:00Z", "code": "ecg-ii", "fs": 250, "unit": "mV"}
    return base | {"values": [0.1, -0.2, 0.35]} | fields


def document(**fields: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "seq": 42,
        "sent_at": "2025-03-01T11:59:30Z",
        "device": {"id": "MON-17", "kind": "multiparameter-monitor"},
        "patient": {"system": "CIN", "value": PATIENT_VALUE},
        "samples": [sample()],
    } | fields


def without(doc: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != key}


def encode(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, allow_nan=True).encode()


def parse(payload: bytes | dict[str, Any], limits: PayloadLimits = LIMITS) -> VitalsMessage:
    raw = payload if isinstance(payload, bytes) else encode(payload)
    return parse_vitals(UNIT, raw, received_at=RECEIVED, limits=limits)


def rejection(payload: bytes | dict[str, Any], limits: PayloadLimits = LIMITS) -> InputError:
    with pytest.raises(InputError) as caught:
        parse(payload, limits)
    return caught.value


def stamp(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


# --- a valid payload ------------------------------------------------------------------------


def test_valid_payload_becomes_a_vitals_message() -> None:
    message = parse(document())
    assert message.unit_id == UNIT
    assert message.seq == 42
    assert message.sent_at == datetime(2025, 3, 1, 11, 59, 30, tzinfo=UTC)
    assert (message.device_id, message.device_kind) == ("MON-17", "multiparameter-monitor")
    assert message.patient == PatientRef("CIN", PATIENT_VALUE)
    assert message.samples == (
        Sample(datetime(2025, 3, 1, 11, 59, tzinfo=UTC), "8867-4", 72.0, "/min"),
    )
    assert message.waveforms == ()


@pytest.mark.parametrize(("alias", "loinc", "unit"), ALIAS_CODINGS)
def test_alias_sample_is_stored_under_its_loinc_code_and_ucum_unit(
    alias: str, loinc: str, unit: str
) -> None:
    message = parse(document(samples=[{"t": "2025-03-01T11:59:00Z", "code": alias, "value": 7}]))
    assert (message.samples[0].code, message.samples[0].unit) == (loinc, unit)


def test_every_alias_of_the_code_table_is_covered_here() -> None:
    assert sorted(ALIASES) == sorted(alias for alias, _, _ in ALIAS_CODINGS)


def test_glucose_in_mmol_per_l_is_kept_in_mmol_per_l() -> None:
    message = parse(document(samples=[sample(code="glucose", value=5.4, unit="mmol/L")]))
    assert (message.samples[0].code, message.samples[0].value, message.samples[0].unit) == (
        "2339-0",
        5.4,
        "mmol/L",
    )


def test_glucose_without_unit_is_read_as_mg_per_dl() -> None:
    message = parse(document(samples=[sample(code="glucose", value=97, unit=None)]))
    assert (message.samples[0].code, message.samples[0].unit) == ("2339-0", "mg/dL")


def test_glucose_in_another_unit_is_rejected_as_invalid_unit() -> None:
    error = rejection(document(samples=[sample(code="glucose", value=97, unit="g/L")]))
    assert error.reason == RejectReason.INVALID_UNIT


def test_loinc_code_keeps_the_ucum_unit_sent() -> None:
    message = parse(document(samples=[sample(code="718-7", value=13.2, unit="g/dL")]))
    assert (message.samples[0].code, message.samples[0].unit) == ("718-7", "g/dL")


def test_integer_value_is_returned_as_float() -> None:
    value = parse(document()).samples[0].value
    assert type(value) is float


def test_blood_pressure_arrives_as_two_samples() -> None:
    message = parse(
        document(
            samples=[
                sample(code="sbp", value=120, unit=None),
                sample(code="dbp", value=80, unit="mm[Hg]"),
            ]
        )
    )
    assert [(s.code, s.value) for s in message.samples] == [("8480-6", 120.0), ("8462-4", 80.0)]


def test_arabic_patient_system_and_value_survive_unchanged() -> None:
    patient = {"system": "الرقم الوطني", "value": "أحمد-١٢٣٤٥"}
    message = parse(document(patient=patient))
    assert message.patient == PatientRef("الرقم الوطني", "أحمد-١٢٣٤٥")


def test_french_device_kind_survives_unchanged() -> None:
    message = parse(document(device={"id": "GLU-3", "kind": "glucomètre"}))
    assert message.device_kind == "glucomètre"


def test_device_kind_defaults_to_unknown() -> None:
    assert parse(document(device={"id": "MON-17"})).device_kind == "unknown"


def test_sent_at_is_optional() -> None:
    assert parse(without(document(), "sent_at")).sent_at is None


def test_payload_naming_its_own_unit_is_accepted() -> None:
    assert parse(document(unit=UNIT)).unit_id == UNIT


def test_largest_seq_is_accepted() -> None:
    assert parse(document(seq=MAX_SEQ)).seq == MAX_SEQ


def test_times_with_an_offset_are_returned_as_the_same_instant_in_utc() -> None:
    t = parse(document(samples=[sample(t="2025-03-01T13:59:00.5+02:00")])).samples[0].t
    assert t == datetime(2025, 3, 1, 11, 59, 0, 500000, tzinfo=UTC)
    assert t.tzinfo is UTC


def test_lowercase_t_and_z_are_accepted_as_rfc_3339_allows() -> None:
    t = parse(document(samples=[sample(t="2025-03-01t11:59:00z")])).samples[0].t
    assert t == datetime(2025, 3, 1, 11, 59, tzinfo=UTC)


def test_sample_exactly_at_the_future_limit_is_accepted() -> None:
    edge = stamp(RECEIVED + LIMITS.max_future)
    assert parse(document(samples=[sample(t=edge)])).samples[0].t == RECEIVED + LIMITS.max_future


def test_sample_exactly_at_the_past_limit_is_accepted() -> None:
    edge = stamp(RECEIVED - LIMITS.max_past)
    assert parse(document(samples=[sample(t=edge)])).samples[0].t == RECEIVED - LIMITS.max_past


def test_waveform_is_returned_as_one_segment_with_its_mdc_code() -> None:
    message = parse(document(waveforms=[waveform()]))
    assert message.waveforms == (
        WaveformSegment(
            datetime(2025, 3, 1, 11, 59, tzinfo=UTC), "131330", 250.0, "mV", (0.1, -0.2, 0.35)
        ),
    )


def test_waveform_without_unit_takes_the_channel_default() -> None:
    message = parse(document(waveforms=[without(waveform(code="pleth"), "unit")]))
    assert message.waveforms[0].unit == "1"


def test_empty_samples_with_a_waveform_is_accepted() -> None:
    message = parse(document(samples=[], waveforms=[waveform()]))
    assert (len(message.samples), len(message.waveforms)) == (0, 1)


def test_naive_received_at_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_vitals(
            UNIT, encode(document()), received_at=RECEIVED.replace(tzinfo=None), limits=LIMITS
        )


# --- each rejection reason ------------------------------------------------------------------


def test_payload_over_limit_is_rejected_as_payload_too_large() -> None:
    payload = encode(document())
    error = rejection(payload, PayloadLimits(max_payload_bytes=len(payload) - 1))
    assert error.reason == RejectReason.PAYLOAD_TOO_LARGE


def test_payload_at_the_limit_is_accepted() -> None:
    payload = encode(document())
    assert parse(payload, PayloadLimits(max_payload_bytes=len(payload))).seq == 42


def test_payload_size_is_checked_before_anything_else() -> None:
    error = rejection(b"\xff" * 11, PayloadLimits(max_payload_bytes=10))
    assert error.reason == RejectReason.PAYLOAD_TOO_LARGE


def test_too_many_samples_is_rejected_as_payload_too_large() -> None:
    error = rejection(document(samples=[sample()] * 3), PayloadLimits(max_samples=2))
    assert error.reason == RejectReason.PAYLOAD_TOO_LARGE


def test_too_many_waveform_points_is_rejected_as_payload_too_large() -> None:
    doc = document(waveforms=[waveform(values=[0.0] * 3), waveform(values=[0.0] * 3)])
    error = rejection(doc, PayloadLimits(max_waveform_points=5))
    assert error.reason == RejectReason.PAYLOAD_TOO_LARGE


@pytest.mark.parametrize(
    "payload",
    [b'{"v":1,\xff}', b"\xc3\x28", b'{"a":"\xed\xa0\x80"}', b"\xe2\x82"],
    ids=["invalid-byte", "bad-continuation", "encoded-surrogate", "truncated"],
)
def test_payload_not_utf8_is_rejected_as_not_utf8(payload: bytes) -> None:
    assert rejection(payload).reason == RejectReason.NOT_UTF8


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"v=1", b"{'v': 1}", b'{"v":1,}', "\ufeff{}".encode(), b"{} {}"],
    ids=["empty", "truncated", "not-json", "single-quotes", "trailing-comma", "bom", "two-values"],
)
def test_payload_not_json_is_rejected_as_not_json(payload: bytes) -> None:
    assert rejection(payload).reason == RejectReason.NOT_JSON


@pytest.mark.parametrize("payload", [b"[]", b"42", b'"text"', b"null", b"true"])
def test_top_level_other_than_an_object_is_rejected_as_not_json(payload: bytes) -> None:
    assert rejection(payload).reason == RejectReason.NOT_JSON


def test_deeply_nested_json_is_rejected_as_not_json() -> None:
    assert rejection(b"[" * 100_000 + b"]" * 100_000).reason == RejectReason.NOT_JSON


def test_integer_too_long_to_convert_is_rejected_as_not_json() -> None:
    assert rejection(b'{"v": 1, "seq": ' + b"9" * 5000 + b"}").reason == RejectReason.NOT_JSON


@pytest.mark.parametrize("version", [2, 0, "1", 1.0, True, None, [1]])
def test_version_other_than_1_is_rejected_as_unknown_version(version: Any) -> None:
    assert rejection(document(v=version)).reason == RejectReason.UNKNOWN_VERSION


def test_missing_version_is_rejected_as_unknown_version() -> None:
    assert rejection(without(document(), "v")).reason == RejectReason.UNKNOWN_VERSION


@pytest.mark.parametrize("seq", [0, -1, MAX_SEQ + 1, 2**64, "42", 42.0, True, None, [42]])
def test_seq_not_an_integer_in_range_is_rejected_as_invalid_seq(seq: Any) -> None:
    assert rejection(document(seq=seq)).reason == RejectReason.INVALID_SEQ


def test_missing_seq_is_rejected_as_invalid_seq() -> None:
    assert rejection(without(document(), "seq")).reason == RejectReason.INVALID_SEQ


@pytest.mark.parametrize("unit", ["unit-08", "", None, 7, UNIT.upper()])
def test_payload_naming_another_unit_is_rejected_as_unit_mismatch(unit: Any) -> None:
    assert rejection(document(unit=unit)).reason == RejectReason.UNIT_MISMATCH


def test_missing_patient_is_rejected_as_missing_patient() -> None:
    assert rejection(without(document(), "patient")).reason == RejectReason.MISSING_PATIENT


@pytest.mark.parametrize(
    "patient",
    [
        None,
        "CIN:AB123456",
        ["CIN", "AB123456"],
        {"value": "AB123456"},
        {"system": "CIN"},
        {"system": "", "value": "AB123456"},
        {"system": "CIN", "value": ""},
        {"system": "CIN", "value": "   "},
        {"system": "CIN", "value": 123456},
        {"system": "CIN", "value": "A" * 65},
        {"system": "C" * 65, "value": "AB123456"},
        {"system": "CIN", "value": "AB\x00123"},
        {"system": "CIN", "value": "AB\n123"},
    ],
    ids=[
        "null",
        "string",
        "list",
        "no-system",
        "no-value",
        "empty-system",
        "empty-value",
        "blank-value",
        "number-value",
        "long-value",
        "long-system",
        "nul",
        "newline",
    ],
)
def test_patient_without_usable_system_and_value_is_rejected_as_missing_patient(
    patient: Any,
) -> None:
    assert rejection(document(patient=patient)).reason == RejectReason.MISSING_PATIENT


def test_patient_value_with_a_lone_surrogate_escape_is_rejected_as_missing_patient() -> None:
    payload = encode(document()).replace(PATIENT_VALUE.encode(), b"AB\\ud800")
    assert rejection(payload).reason == RejectReason.MISSING_PATIENT


def test_patient_value_of_64_characters_is_accepted() -> None:
    assert parse(document(patient={"system": "CIN", "value": "A" * 64})).patient.value == "A" * 64


def test_missing_device_is_rejected_as_invalid_device() -> None:
    assert rejection(without(document(), "device")).reason == RejectReason.INVALID_DEVICE


@pytest.mark.parametrize(
    "device",
    [None, "MON-17", {"kind": "monitor"}, {"id": ""}, {"id": 17}, {"id": "MON-17", "kind": 3}],
    ids=["null", "string", "no-id", "empty-id", "number-id", "number-kind"],
)
def test_device_without_usable_id_is_rejected_as_invalid_device(device: Any) -> None:
    assert rejection(document(device=device)).reason == RejectReason.INVALID_DEVICE


def test_missing_samples_is_rejected_as_samples_not_list() -> None:
    assert rejection(without(document(), "samples")).reason == RejectReason.SAMPLES_NOT_LIST


@pytest.mark.parametrize("samples", [None, {"0": sample()}, "hr=72", 72])
def test_samples_other_than_a_list_is_rejected_as_samples_not_list(samples: Any) -> None:
    assert rejection(document(samples=samples)).reason == RejectReason.SAMPLES_NOT_LIST


def test_empty_samples_without_waveforms_is_rejected_as_no_samples() -> None:
    assert rejection(document(samples=[])).reason == RejectReason.NO_SAMPLES


def test_empty_samples_with_empty_waveforms_is_rejected_as_no_samples() -> None:
    assert rejection(document(samples=[], waveforms=[])).reason == RejectReason.NO_SAMPLES


@pytest.mark.parametrize("item", [None, 72, "hr", [72]])
def test_sample_not_an_object_is_rejected_as_invalid_sample(item: Any) -> None:
    assert rejection(document(samples=[item])).reason == RejectReason.INVALID_SAMPLE


@pytest.mark.parametrize("field", ["t", "code", "value"])
def test_sample_missing_a_required_field_is_rejected_as_invalid_sample(field: str) -> None:
    error = rejection(document(samples=[sample(), without(sample(), field)]))
    assert error.reason == RejectReason.INVALID_SAMPLE
    assert "samples[1]" in error.detail


@pytest.mark.parametrize(
    "value",
    ["72", True, False, None, [72], {"v": 72}, math.nan, math.inf, -math.inf, 10**400],
    ids=["string", "true", "false", "null", "list", "object", "nan", "inf", "-inf", "huge-int"],
)
def test_value_not_a_finite_number_is_rejected_as_non_numeric_value(value: Any) -> None:
    assert rejection(document(samples=[sample(value=value)])).reason == (
        RejectReason.NON_NUMERIC_VALUE
    )


def test_float_overflowing_to_infinity_is_rejected_as_non_numeric_value() -> None:
    payload = encode(document()).replace(b'"value": 72', b'"value": 1e400')
    assert rejection(payload).reason == RejectReason.NON_NUMERIC_VALUE


@pytest.mark.parametrize("code", ["pulse", "HR", "8867-5", "88670000-1", "", 8867, None, "ecg-ii"])
def test_code_neither_loinc_nor_alias_is_rejected_as_unknown_code(code: Any) -> None:
    assert rejection(document(samples=[sample(code=code)])).reason == RejectReason.UNKNOWN_CODE


@pytest.mark.parametrize(
    ("code", "unit"),
    [
        ("hr", "bpm"),
        ("temp", "[degF]"),
        ("8867-4", None),
        ("8867-4", "beats per minute"),
        ("8867-4", "x" * 33),
        ("8867-4", "°C"),
        ("8867-4", 60),
        ("hr", ["/min"]),
    ],
)
def test_unit_not_accepted_for_the_code_is_rejected_as_invalid_unit(code: str, unit: Any) -> None:
    error = rejection(document(samples=[sample(code=code, unit=unit)]))
    assert error.reason == RejectReason.INVALID_UNIT


@pytest.mark.parametrize(
    "t",
    [
        "2025-03-01T11:59:00",
        "2025-03-01",
        "2025-03-01T11:59Z",
        "2025-03-01 11:59:00Z",
        "20250301T115900Z",
        "2025-03-01T11:59:00+01",
        "2025-03-01T11:59:00+0100",
        "2025-03-01T11:59:00,5Z",
        "2025-03-01T11:59:00.Z",
        "2025-03-01T11:59:00+01:60",
        "2025-02-30T11:59:00Z",
        "2025-03-01T24:00:00Z",
        "٢٠٢٥-03-01T11:59:00Z",
        "0001-01-01T00:00:00+05:00",
        "yesterday",
        1740830340,
        None,
    ],
)
def test_sample_time_not_rfc_3339_with_offset_is_rejected_as_invalid_time(t: Any) -> None:
    assert rejection(document(samples=[sample(t=t)])).reason == RejectReason.INVALID_TIME


@pytest.mark.parametrize("sent_at", ["2025-03-01T11:59:30", "now", 0, None])
def test_sent_at_not_rfc_3339_with_offset_is_rejected_as_invalid_time(sent_at: Any) -> None:
    assert rejection(document(sent_at=sent_at)).reason == RejectReason.INVALID_TIME


def test_sample_beyond_the_future_limit_is_rejected_as_time_in_future() -> None:
    t = stamp(RECEIVED + LIMITS.max_future + timedelta(seconds=1))
    assert rejection(document(samples=[sample(t=t)])).reason == RejectReason.TIME_IN_FUTURE


def test_sample_beyond_the_past_limit_is_rejected_as_time_too_old() -> None:
    t = stamp(RECEIVED - LIMITS.max_past - timedelta(seconds=1))
    assert rejection(document(samples=[sample(t=t)])).reason == RejectReason.TIME_TOO_OLD


def test_future_limit_applies_to_the_instant_not_the_local_clock() -> None:
    local = (RECEIVED + timedelta(hours=23)).astimezone(timezone(timedelta(hours=5)))
    assert parse(document(samples=[sample(t=local.isoformat())])).samples[0].t == local


def test_waveforms_not_a_list_is_rejected_as_invalid_waveform() -> None:
    assert rejection(document(waveforms=waveform())).reason == RejectReason.INVALID_WAVEFORM


@pytest.mark.parametrize(
    "item",
    [
        "ecg-ii",
        waveform(code="ecg-v9"),
        waveform(code="8867-4"),
        without(waveform(), "code"),
        waveform(fs=0),
        waveform(fs=-250),
        waveform(fs=True),
        waveform(fs="250"),
        waveform(fs=1e9),
        without(waveform(), "fs"),
        waveform(unit="milli volt"),
        waveform(unit=1),
        waveform(values=[]),
        waveform(values="0.1,0.2"),
        waveform(values=[0.1, "0.2"]),
        waveform(values=[0.1, True]),
        waveform(values=[0.1, None]),
        waveform(values=[0.1, 10**400]),
        without(waveform(), "values"),
    ],
    ids=[
        "not-object",
        "unknown-channel",
        "loinc-code",
        "no-code",
        "zero-fs",
        "negative-fs",
        "bool-fs",
        "string-fs",
        "fs-over-limit",
        "no-fs",
        "bad-unit",
        "number-unit",
        "no-values",
        "string-values",
        "string-point",
        "bool-point",
        "null-point",
        "huge-point",
        "missing-values",
    ],
)
def test_malformed_waveform_is_rejected_as_invalid_waveform(item: Any) -> None:
    assert rejection(document(waveforms=[item])).reason == RejectReason.INVALID_WAVEFORM


def test_waveform_with_nan_point_is_rejected_as_invalid_waveform() -> None:
    assert rejection(document(waveforms=[waveform(values=[0.1, math.nan])])).reason == (
        RejectReason.INVALID_WAVEFORM
    )


def test_waveform_start_not_rfc_3339_is_rejected_as_invalid_time() -> None:
    error = rejection(document(waveforms=[waveform(t0="2025-03-01T11:59:00")]))
    assert error.reason == RejectReason.INVALID_TIME
    assert "waveforms[0].t0" in error.detail


def test_waveform_start_beyond_the_future_limit_is_rejected_as_time_in_future() -> None:
    t0 = stamp(RECEIVED + timedelta(days=2))
    assert rejection(document(waveforms=[waveform(t0=t0)])).reason == RejectReason.TIME_IN_FUTURE


# --- details, reasons ------------------------------------------------------------------------


def test_rejection_detail_names_the_sample_index_and_field() -> None:
    error = rejection(document(samples=[sample(), sample(), sample(value="high")]))
    assert error.detail == "samples[2].value is not a number"


@pytest.mark.parametrize(
    "patient",
    [
        {"system": "CIN", "value": "ZQ9981726354" * 6},
        {"system": "CIN", "value": "ZQ99817\x0026354"},
        {"system": "ZQ9981726354\n", "value": "AB123456"},
    ],
    ids=["too-long", "nul", "control-in-system"],
)
def test_detail_of_a_refused_patient_never_contains_the_identifier(patient: Any) -> None:
    error = rejection(document(patient=patient))
    assert "ZQ99817" not in error.detail
    assert "ZQ99817" not in str(error)


@given(
    value=st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=8, max_size=12),
    breakage=st.sampled_from(["seq", "device", "code", "value", "unit", "t", "waveform"]),
)
def test_detail_of_any_rejection_never_contains_the_patient_value(
    value: str, breakage: str
) -> None:
    breakages: dict[str, dict[str, Any]] = {
        "seq": {"seq": value},
        "device": {"device": {"id": value * 9}},
        "code": {"samples": [sample(code=value)]},
        "value": {"samples": [sample(value=value)]},
        "unit": {"samples": [sample(unit=value + " x")]},
        "t": {"samples": [sample(t=value)]},
        "waveform": {"waveforms": [waveform(code=value)]},
    }
    doc = document(patient={"system": "CIN", "value": value}) | breakages[breakage]
    with pytest.raises(InputError) as caught:
        parse(doc)
    assert value not in caught.value.detail


def test_every_reason_is_a_lowercase_slug_usable_as_a_metric_label() -> None:
    for reason in RejectReason:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", reason.value)
        assert str(reason) == reason.value


def test_rejection_reason_compares_equal_to_its_slug() -> None:
    assert rejection(b"{").reason == "not-json"


# --- topic -----------------------------------------------------------------------------------


def test_unit_id_is_read_from_the_vitals_topic() -> None:
    assert unit_from_topic("units/amb_12.north-3/vitals") == "amb_12.north-3"


@pytest.mark.parametrize(
    "topic",
    [
        "units/u1/status",
        "units//vitals",
        "units/u1/vitals/extra",
        "/units/u1/vitals",
        "unit/u1/vitals",
        "units/u 1/vitals",
        "units/u+/vitals",
        "units/#/vitals",
        "units/وحدة/vitals",
        f"units/{'u' * 65}/vitals",
        "",
    ],
)
def test_topic_other_than_units_id_vitals_is_rejected_as_bad_topic(topic: str) -> None:
    with pytest.raises(InputError) as caught:
        unit_from_topic(topic)
    assert caught.value.reason == RejectReason.BAD_TOPIC


def test_unit_id_of_64_characters_is_accepted() -> None:
    assert unit_from_topic(f"units/{'u' * 64}/vitals") == "u" * 64


# --- extract_seq -----------------------------------------------------------------------------


def test_seq_is_extracted_from_a_payload_invalid_after_its_seq() -> None:
    assert extract_seq(encode(document(seq=77, samples="oops"))) == 77


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff",
        b"{",
        b"[1]",
        encode(document(v=2)),
        encode(document(seq=0)),
        encode(document(seq="77")),
        encode(document(seq=True)),
    ],
    ids=["not-utf8", "not-json", "not-object", "unknown-version", "zero", "string", "bool"],
)
def test_no_seq_is_extracted_when_the_payload_fails_before_its_seq(payload: bytes) -> None:
    assert extract_seq(payload) is None


def test_no_seq_is_extracted_from_a_payload_naming_another_unit() -> None:
    assert extract_seq(encode(document(unit="unit-99")), unit_id=UNIT) is None


def test_no_seq_is_extracted_from_a_payload_over_the_size_limit() -> None:
    payload = encode(document())
    assert extract_seq(payload, max_payload_bytes=len(payload) - 1) is None


# --- properties ------------------------------------------------------------------------------

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["v", "seq", "unit", "patient", "device", "samples", "t", "code"])
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@given(st.binary(max_size=512))
@example(b"[" * 50_000)
@example(b'{"v":1,"seq":1,"samples":[{"t":"0001-01-01T00:00:00+23:59"}]}')
def test_random_bytes_either_parse_or_raise_input_error(payload: bytes) -> None:
    with contextlib.suppress(InputError):
        parse(payload)


@given(ANY_JSON)
def test_random_json_either_parses_or_raises_input_error(doc: Any) -> None:
    with contextlib.suppress(InputError):
        parse(encode(doc))


@given(
    path=st.sampled_from(
        [
            ("v",),
            ("seq",),
            ("unit",),
            ("sent_at",),
            ("device",),
            ("device", "id"),
            ("device", "kind"),
            ("patient",),
            ("patient", "system"),
            ("patient", "value"),
            ("samples",),
            ("samples", 0),
            ("samples", 0, "t"),
            ("samples", 0, "code"),
            ("samples", 0, "value"),
            ("samples", 0, "unit"),
            ("waveforms",),
            ("waveforms", 0),
            ("waveforms", 0, "t0"),
            ("waveforms", 0, "code"),
            ("waveforms", 0, "fs"),
            ("waveforms", 0, "unit"),
            ("waveforms", 0, "values"),
            ("waveforms", 0, "values", 1),
        ]
    ),
    replacement=ANY_JSON,
)
def test_valid_payload_with_any_field_replaced_parses_or_raises_input_error(
    path: tuple[str | int, ...], replacement: Any
) -> None:
    doc: Any = document(waveforms=[waveform()])
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = replacement
    with contextlib.suppress(InputError):
        parse(doc)


@given(st.binary(min_size=1, max_size=8), st.integers(min_value=0))
def test_valid_payload_with_bytes_spliced_in_parses_or_raises_input_error(
    noise: bytes, position: int
) -> None:
    payload = encode(document(waveforms=[waveform()]))
    at = position % len(payload)
    with contextlib.suppress(InputError):
        parse(payload[:at] + noise + payload[at:])


OFFSETS_MINUTES = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59)


@st.composite
def rfc3339_times(draw: st.DrawFn) -> tuple[str, datetime]:
    """A time string inside the accepted window, and the instant it must parse to."""
    instant = draw(
        st.datetimes(
            min_value=(RECEIVED - LIMITS.max_past + timedelta(seconds=1)).replace(tzinfo=None),
            max_value=(RECEIVED + LIMITS.max_future - timedelta(seconds=1)).replace(tzinfo=None),
        )
    ).replace(tzinfo=UTC)
    minutes = draw(OFFSETS_MINUTES)
    local = instant.astimezone(timezone(timedelta(minutes=minutes)))
    digits = draw(st.integers(min_value=0, max_value=9))
    micro = f"{local.microsecond:06d}"
    fraction = "" if digits == 0 else "." + (micro + "0" * 3)[:digits]
    kept = int((fraction[1:] + "000000")[:6]) if fraction else 0
    if minutes == 0 and draw(st.booleans()):
        offset = draw(st.sampled_from(["Z", "z"]))
    else:
        sign = "-" if minutes < 0 else "+"
        offset = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    separator = draw(st.sampled_from(["T", "t"]))
    text = local.strftime(f"%Y-%m-%d{separator}%H:%M:%S") + fraction + offset
    return text, local.replace(microsecond=kept)


NUMBERS = st.integers(min_value=-(10**15), max_value=10**15) | st.floats(
    allow_nan=False, allow_infinity=False
)
CODES = st.sampled_from(
    [(alias, None) for alias in ALIASES]
    + [(alias, coded.unit) for alias, a in ALIASES.items() for coded in a.options]
    + [("718-7", "g/dL"), ("8867-4", "{beats}/min"), ("2160-0", "mg/dL")]
)


@st.composite
def valid_samples(draw: st.DrawFn) -> tuple[dict[str, Any], Sample]:
    text, instant = draw(rfc3339_times())
    code, unit = draw(CODES)
    value = draw(NUMBERS)
    item: dict[str, Any] = {"t": text, "code": code, "value": value}
    if unit is not None:
        item["unit"] = unit
    alias = ALIASES.get(code)
    coded = alias.resolve(unit) if alias is not None else None
    expected_code, expected_unit = (coded.code, coded.unit) if coded else (code, unit)
    assert expected_unit is not None
    return item, Sample(instant, expected_code, float(value), expected_unit)


IDENTIFIERS = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\x85"),
    min_size=1,
    max_size=64,
).filter(lambda s: not s.isspace())


@given(
    seq=st.integers(min_value=1, max_value=MAX_SEQ),
    system=IDENTIFIERS,
    value=IDENTIFIERS,
    device_id=IDENTIFIERS,
    pairs=st.lists(valid_samples(), min_size=1, max_size=20),
    sent_at=rfc3339_times(),
)
def test_valid_generated_payload_round_trips(
    seq: int,
    system: str,
    value: str,
    device_id: str,
    pairs: list[tuple[dict[str, Any], Sample]],
    sent_at: tuple[str, datetime],
) -> None:
    doc = document(
        seq=seq,
        sent_at=sent_at[0],
        patient={"system": system, "value": value},
        device={"id": device_id},
        samples=[item for item, _ in pairs],
    )
    message = parse(doc)
    assert message.seq == seq
    assert message.sent_at == sent_at[1]
    assert message.patient == PatientRef(system, value)
    assert message.device_id == device_id
    assert message.samples == tuple(expected for _, expected in pairs)


@given(
    points=st.lists(NUMBERS, min_size=1, max_size=200),
    fs=st.floats(min_value=0.001, max_value=LIMITS.max_sample_rate_hz),
    channel=st.sampled_from(sorted(WAVEFORMS)),
)
def test_valid_generated_waveform_round_trips(points: list[float], fs: float, channel: str) -> None:
    message = parse(document(waveforms=[waveform(code=channel, fs=fs, values=points)]))
    segment = message.waveforms[0]
    assert segment.code == str(WAVEFORMS[channel].mdc_code)
    assert segment.fs == fs
    assert segment.values == tuple(float(p) for p in points)


@given(
    st.one_of(
        st.text(max_size=8),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=2),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    )
)
def test_generated_non_numeric_value_is_rejected_as_non_numeric_value(value: Any) -> None:
    error = rejection(document(samples=[sample(), sample(value=value)]))
    assert error.reason == RejectReason.NON_NUMERIC_VALUE


@given(st.integers(max_value=0) | st.integers(min_value=MAX_SEQ + 1))
def test_generated_out_of_range_seq_is_rejected_as_invalid_seq(seq: int) -> None:
    assert rejection(document(seq=seq)).reason == RejectReason.INVALID_SEQ


@given(st.text(max_size=12))
def test_generated_code_neither_alias_nor_loinc_is_rejected_as_unknown_code(code: str) -> None:
    assume(code not in ALIASES and not re.fullmatch(r"[0-9]{1,7}-[0-9]", code))
    assert rejection(document(samples=[sample(code=code)])).reason == RejectReason.UNKNOWN_CODE


@given(st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=3000)))
def test_generated_time_after_the_future_limit_is_rejected_as_time_in_future(
    beyond: timedelta,
) -> None:
    t = stamp(RECEIVED + LIMITS.max_future + beyond)
    assert rejection(document(samples=[sample(t=t)])).reason == RejectReason.TIME_IN_FUTURE


@given(st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=3000)))
def test_generated_time_before_the_past_limit_is_rejected_as_time_too_old(
    beyond: timedelta,
) -> None:
    t = stamp(RECEIVED - LIMITS.max_past - beyond)
    assert rejection(document(samples=[sample(t=t)])).reason == RejectReason.TIME_TOO_OLD


REFUSED_BEFORE_THE_SEQ_WAS_READ = {
    RejectReason.NOT_UTF8,
    RejectReason.NOT_JSON,
    RejectReason.UNKNOWN_VERSION,
    RejectReason.INVALID_SEQ,
    RejectReason.UNIT_MISMATCH,
}


def outcome_of(payload: bytes) -> VitalsMessage | InputError:
    try:
        return parse(payload)
    except InputError as error:
        return error


@given(st.binary(max_size=300) | ANY_JSON.map(encode) | st.just(encode(document(seq=9))))
def test_extract_seq_finds_the_seq_exactly_when_parsing_got_past_it(payload: bytes) -> None:
    outcome = outcome_of(payload)
    seq = extract_seq(payload, unit_id=UNIT)
    if isinstance(outcome, InputError):
        assert (seq is None) == (outcome.reason in REFUSED_BEFORE_THE_SEQ_WAS_READ)
    else:
        assert seq == outcome.seq


# --- the RFC 3339 reader against a regex oracle ----------------------------------------------

RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:([Zz])|([+-])(\d\d):(\d\d))",
    re.ASCII,
)


def rfc3339_oracle(text: str) -> datetime | None:
    match = RFC3339.fullmatch(text)
    if match is None or len(text) > 64:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, oh, om = match.groups()
    if not zulu and (int(oh) > 23 or int(om) > 59):
        return None
    offset = timedelta(0) if zulu else timedelta(hours=int(oh), minutes=int(om))
    micro = int((fraction or "").ljust(6, "0")[:6])
    try:
        local = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            micro,
            tzinfo=timezone(-offset if sign == "-" else offset),
        )
        return local.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


TIME_CHARS = "0123456789-:.+TtZz ,W"


@st.composite
def mutated_times(draw: st.DrawFn) -> str:
    text = draw(rfc3339_times())[0]
    if draw(st.booleans()):
        at = draw(st.integers(min_value=0, max_value=len(text) - 1))
        text = text[:at] + draw(st.sampled_from(TIME_CHARS)) + text[at + 1 :]
    if draw(st.booleans()):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:at] + draw(st.text(alphabet=TIME_CHARS, max_size=3)) + text[at:]
    return text


@given(mutated_times() | st.text(alphabet=TIME_CHARS, min_size=18, max_size=40))
@example("9999-12-31T23:59:59-00:01")
@example("0001-01-01T00:00:00+00:01")
@example("2025-03-01T11:59:00." + "1" * 44 + "Z")
@example("2025-03-01T11:59:00+23:59")
def test_rfc3339_reader_accepts_exactly_what_the_grammar_accepts(text: str) -> None:
    assert parse_rfc3339(text) == rfc3339_oracle(text)


@given(rfc3339_times())
def test_rfc3339_reader_returns_the_instant_in_utc(pair: tuple[str, datetime]) -> None:
    parsed = parse_rfc3339(pair[0])
    assert parsed == pair[1]
    assert parsed is not None
    assert parsed.tzinfo is UTC
