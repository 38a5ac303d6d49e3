"""ER7 messages to records, sans I/O: every supported version and charset, made by the tests."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import TypeVar
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hl7.ack import ErrorCode
from hl7.er7 import parse_message
from hl7.mapping import MappingError, map_message, parse_time
from ingest.records import (
    CodedValue,
    LabReport,
    PatientDemographics,
    PatientMerge,
    PatientRef,
    RawMessage,
    Record,
)
from tests.hl7_support import adt, encode, oru

_R = TypeVar("_R")
CASABLANCA = ZoneInfo("Africa/Casablanca")
VERSIONS = ("2.3", "2.4", "2.5.1", "2.6")
CHARSETS = ("UNICODE UTF-8", "8859/1", "8859/6")
# Names each charset can carry: Arabic in 8859/6, French accents in 8859/1, both in UTF-8.
NAMES = {
    "UNICODE UTF-8": ("بنعلي^فاطمة الزهراء", "بنعلي", ("فاطمة الزهراء",)),
    "8859/1": ("Lefèvre^Hélène^Maëlle", "Lefèvre", ("Hélène", "Maëlle")),
    "8859/6": ("العلوي^محمد", "العلوي", ("محمد",)),
}


def records(text: str, charset: str = "UNICODE UTF-8") -> tuple[Record, ...]:
    return map_message(parse_message(encode(text, charset)), CASABLANCA)


def only(items: tuple[Record, ...], kind: type[_R]) -> list[_R]:
    return [r for r in items if isinstance(r, kind)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("charset", CHARSETS)
def test_oru_maps_to_patient_report_and_observations_in_every_version_and_charset(
    version: str, charset: str
) -> None:
    name, family, given_names = NAMES[charset]
    mapped = records(
        oru("C1", "AB123456^^^CIN^NI", name, version=version, charset=charset), charset
    )
    [raw] = only(mapped, RawMessage)
    [patient] = only(mapped, PatientDemographics)
    [report] = only(mapped, LabReport)
    assert (raw.message_type, raw.version, raw.charset) == ("ORU^R01", version, charset)
    assert patient.identifiers == (PatientRef("CIN", "AB123456"),)
    assert patient.names[0].family == family
    assert patient.names[0].given == given_names
    assert not patient.authoritative
    assert report.patient == patient.identifiers
    assert report.service == CodedValue("http://loinc.org", "58410-2", "CBC panel")
    assert [o.set_id for o in report.observations] == [1, 2, 3, 4, 5]


def test_nm_observation_keeps_value_unit_range_flags_status_and_local_time() -> None:
    [report] = only(records(oru("C1", "AB1^^^CIN^NI")), LabReport)
    hb = report.observations[0]
    assert (hb.value_type, hb.numeric, hb.unit) == ("NM", 13.2, "g/dL")
    assert (hb.reference_range, hb.reference_low, hb.reference_high) == ("12.0-16.0", 12.0, 16.0)
    assert (hb.abnormal_flags, hb.status) == (("N",), "F")
    assert hb.code == CodedValue("http://loinc.org", "718-7", "Hemoglobin")
    assert hb.observed_at == datetime(2026, 11, 27, 9, 5, tzinfo=CASABLANCA)


def test_report_times_with_an_offset_keep_it() -> None:
    [report] = only(records(oru("C1", "AB1^^^CIN^NI")), LabReport)
    assert report.observed_at == datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


def test_string_observation_keeps_french_text() -> None:
    [report] = only(records(oru("C1", "AB1^^^CIN^NI")), LabReport)
    assert report.observations[2].text == "Prélèvement hémolysé"


def test_coded_observation_keeps_code_and_display() -> None:
    [report] = only(records(oru("C1", "AB1^^^CIN^NI")), LabReport)
    assert report.observations[3].coded == CodedValue("L", "A+", "A Rh positive")


def test_structured_numeric_keeps_comparator() -> None:
    [report] = only(records(oru("C1", "AB1^^^CIN^NI")), LabReport)
    creat = report.observations[4]
    assert (creat.numeric, creat.comparator, creat.abnormal_flags) == (0.3, "<", ("L",))


def test_non_numeric_nm_value_is_a_data_type_error_at_obx_5() -> None:
    bad = ["OBX|1|NM|718-7^Hemoglobin^LN||13,2|g/dL"]
    with pytest.raises(MappingError) as caught:
        records(oru("C1", "AB1^^^CIN^NI", obx=bad))
    assert caught.value.reason == "obx-value-not-numeric"
    assert caught.value.code is ErrorCode.DATA_TYPE_ERROR
    assert caught.value.location is not None
    assert caught.value.location.parts() == ["OBX", "1", "5"]


def test_oru_without_pid_is_a_required_field_error() -> None:
    with pytest.raises(MappingError) as caught:
        records(oru("C1", "", include_pid=False))
    assert (caught.value.reason, caught.value.code) == (
        "missing-pid",
        ErrorCode.REQUIRED_FIELD_MISSING,
    )


def test_national_id_by_type_ni_maps_to_the_cin_system() -> None:
    [patient] = only(records(oru("C1", "AB1^^^MOH^NI")), PatientDemographics)
    assert patient.identifiers == (PatientRef("CIN", "AB1"),)


@pytest.mark.parametrize("authority", ["CIN", "MA-CIN", "cnie"])
def test_national_id_by_its_authority_maps_to_the_cin_system_as_in_dicom(authority: str) -> None:
    [patient] = only(records(oru("C1", f"AB1^^^{authority}")), PatientDemographics)
    assert patient.identifiers == (PatientRef("CIN", "AB1"),)


def test_every_pid3_identifier_is_kept_national_id_first() -> None:
    text = oru("C1", "MRN77^^^CHU-RABAT^MR~CNSS-9^^^CNSS^SS~AB1^^^CIN")
    [patient] = only(records(text), PatientDemographics)
    assert patient.identifiers == (
        PatientRef("CIN", "AB1"),
        PatientRef("CHU-RABAT", "MRN77"),
        PatientRef("CNSS", "CNSS-9"),
    )


def test_identifier_without_authority_is_scoped_by_the_sending_facility() -> None:
    [patient] = only(records(oru("C1", "MRN77")), PatientDemographics)
    assert patient.identifiers == (PatientRef("CHU-RABAT", "MRN77"),)


@pytest.mark.parametrize("event", ["A01", "A04", "A08", "A28", "A31"])
@pytest.mark.parametrize("version", VERSIONS)
def test_adt_events_map_to_authoritative_demographics(event: str, version: str) -> None:
    text = adt("C1", event, "AB1^^^CIN^NI", "Benali^Fatima~بنعلي^فاطمة", version=version, sex="F")
    [patient] = only(records(text), PatientDemographics)
    assert patient.authoritative
    assert [n.family for n in patient.names] == ["Benali", "بنعلي"]
    assert (patient.birth_date, patient.gender) == (date(1980, 2, 14), "female")


def test_adt_a40_maps_to_a_merge_of_mrg_into_pid() -> None:
    text = adt("C1", "A40", "AB1^^^CIN^NI", "Benali^Fatima", mrg="OLD9^^^CHU-RABAT^MR")
    [merge] = only(records(text), PatientMerge)
    assert merge == PatientMerge(
        survivor=(PatientRef("CIN", "AB1"),), prior=(PatientRef("CHU-RABAT", "OLD9"),)
    )


def test_other_message_types_map_to_the_raw_message_only() -> None:
    text = adt("C1", "A03", "AB1^^^CIN^NI", "Benali^Fatima")
    mapped = records(text)
    assert [type(r) for r in mapped] == [RawMessage]


def test_hl7_times_without_offset_are_local_to_the_configured_zone() -> None:
    assert parse_time("20260115083000", CASABLANCA) == datetime(
        2026, 1, 15, 8, 30, tzinfo=CASABLANCA
    )
    assert parse_time("202601150830-0500", CASABLANCA) == datetime(
        2026, 1, 15, 8, 30, tzinfo=timezone(-timedelta(hours=5))
    )
    assert parse_time("2026", CASABLANCA) == datetime(2026, 1, 1, tzinfo=CASABLANCA)


# The Arabic letters ISO 8859-6 carries (U+0621..U+063A, U+0641..U+064A).
_ARABIC = st.sampled_from([chr(c) for c in (*range(0x0621, 0x063B), *range(0x0641, 0x064B))])
_FRENCH = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzéèêëàâçîïôûüÉÈÀÇ"))


@given(
    family=st.text(_ARABIC, min_size=1, max_size=20),
    given_name=st.text(_ARABIC, min_size=1, max_size=20),
    charset=st.sampled_from(["UNICODE UTF-8", "8859/6"]),
)
def test_arabic_names_survive_mapping_in_every_arabic_charset(
    family: str, given_name: str, charset: str
) -> None:
    text = adt("C1", "A08", "AB1^^^CIN^NI", f"{family}^{given_name}", charset=charset)
    [patient] = only(records(text, charset), PatientDemographics)
    assert (patient.names[0].family, patient.names[0].given) == (family, (given_name,))


@given(
    family=st.text(_FRENCH, min_size=1, max_size=20),
    given_name=st.text(_FRENCH, min_size=1, max_size=20),
    charset=st.sampled_from(["UNICODE UTF-8", "8859/1"]),
)
def test_french_names_survive_mapping_in_every_latin_charset(
    family: str, given_name: str, charset: str
) -> None:
    text = adt("C1", "A08", "AB1^^^CIN^NI", f"{family}^{given_name}", charset=charset)
    [patient] = only(records(text, charset), PatientDemographics)
    assert (patient.names[0].family, patient.names[0].given) == (family, (given_name,))


@given(st.text(max_size=30))
def test_any_nm_value_is_either_a_number_or_a_mapping_error(value: str) -> None:
    value = value.replace("\r", "").replace("\n", "").replace("|", "").replace("\\", "")
    text = oru("C1", "AB1^^^CIN^NI", obx=[f"OBX|1|NM|718-7^Hb^LN||{value}|g/dL"])
    reason = None
    try:
        [report] = only(records(text), LabReport)
    except MappingError as exc:
        reason = exc.reason
    else:
        numeric = report.observations[0].numeric
        assert numeric is None or isinstance(numeric, float)
    assert reason in (None, "obx-value-not-numeric")
