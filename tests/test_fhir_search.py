"""Search parameter parsers, cursors, identifiers and scopes: pure functions, no database."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth import Interaction, InvalidScope, allows, bearer_token, parse_scope
from gateway.fhir_identifiers import stored_systems, system_uri
from gateway.fhir_paging import CursorCodec, CursorPosition
from gateway.fhir_search import (
    END_OF_TIME,
    OBSERVATION_PARAMETERS,
    SearchParameterError,
    TimeRange,
    Token,
    parse_audit_search,
    parse_count,
    parse_date,
    parse_date_filter,
    parse_dates,
    parse_device_search,
    parse_elements,
    parse_genders,
    parse_identifier,
    parse_ids,
    parse_imaging_search,
    parse_lastn_search,
    parse_max,
    parse_modalities,
    parse_names,
    parse_observation_search,
    parse_patient_reference,
    parse_patient_search,
    parse_report_search,
    parse_sort,
    parse_study_uids,
    parse_token,
    strict_handling,
)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# --- dates ---


def test_month_without_prefix_is_the_whole_month() -> None:
    assert parse_date("date", "2026-11") == TimeRange(utc(2026, 11, 1), utc(2026, 12, 1))


def test_december_ends_at_the_next_new_year() -> None:
    assert parse_date("date", "2026-12").end == utc(2027, 1, 1)


def test_ge_a_day_starts_at_its_midnight_utc() -> None:
    assert parse_date("date", "ge2026-11-27") == TimeRange(utc(2026, 11, 27), None)


def test_gt_a_day_starts_after_that_day() -> None:
    assert parse_date("date", "gt2026-11-27") == TimeRange(utc(2026, 11, 28), None)


def test_le_a_year_ends_after_that_year() -> None:
    assert parse_date("date", "le2026") == TimeRange(None, utc(2027, 1, 1))


def test_lt_an_instant_ends_before_it() -> None:
    assert parse_date("date", "lt2026-11-27T10:00:00Z") == TimeRange(
        None, utc(2026, 11, 27, 10, 0, 0)
    )


def test_instant_with_offset_is_converted_to_utc() -> None:
    parsed = parse_date("date", "eq2026-11-27T10:00:00+01:00")
    assert parsed == TimeRange(utc(2026, 11, 27, 9, 0, 0), utc(2026, 11, 27, 9, 0, 1))


def test_plus_decoded_as_space_is_read_as_plus() -> None:
    assert parse_date("date", "ge2026-11-27T10:00:00 01:00").start == utc(2026, 11, 27, 9)


def test_fraction_of_a_second_sets_the_precision() -> None:
    parsed = parse_date("date", "2026-11-27T10:00:00.123Z")
    assert parsed.start == utc(2026, 11, 27, 10, 0, 0, 123000)
    assert parsed.end == utc(2026, 11, 27, 10, 0, 0, 124000)


def test_repeated_dates_intersect() -> None:
    parsed = parse_dates("date", ["ge2026-11-01", "lt2026-11-15"])
    assert parsed == TimeRange(utc(2026, 11, 1), utc(2026, 11, 15))


def test_year_9999_ends_at_the_end_of_time() -> None:
    assert parse_date("date", "9999").end == END_OF_TIME


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "yesterday",
        "2026-13",
        "2026-02-30",
        "2026-11-27T10:00",
        "2026-11-27T25:00Z",
        "2026-11-27T10:00:60Z",
        "0000-01-01",
        "ne2026-11-27",
        "ap2026",
        "2026-11-27T10:00:00+24:00",
        "٢٠٢٦",
        "0001-01-01T00:00:00+01:00",
        "2026-11-27T10:00:00Z\x00",
    ],
)
def test_malformed_or_unsupported_date_is_refused_naming_the_parameter(raw: str) -> None:
    with pytest.raises(SearchParameterError, match="'date'"):
        parse_date("date", raw)


# --- tokens and references ---


def test_token_without_bar_has_no_system() -> None:
    assert parse_token("code", "8867-4") == Token(None, "8867-4")


def test_token_with_system_keeps_both() -> None:
    assert parse_token("code", "http://loinc.org|8867-4") == Token("http://loinc.org", "8867-4")


def test_token_with_escaped_bar_keeps_it_in_the_value() -> None:
    assert parse_token("identifier", r"CIN|A\|B") == Token("CIN", "A|B")


def test_identifier_keeps_arabic_value_intact() -> None:
    assert parse_identifier("identifier", "CIN|أب١٢٣") == Token("CIN", "أب١٢٣")


@pytest.mark.parametrize("raw", ["", "|", "CIN|", "|AB1", "a|b|c", "CIN|AB\x01"])
def test_identifier_without_value_or_with_extra_bars_is_refused(raw: str) -> None:
    with pytest.raises(SearchParameterError, match="'identifier'"):
        parse_identifier("identifier", raw)


@pytest.mark.parametrize(("raw", "expected"), [("Patient/12", 12), ("12", 12)])
def test_patient_reference_takes_both_forms(raw: str, expected: int) -> None:
    assert parse_patient_reference("patient", raw) == expected


@pytest.mark.parametrize("raw", ["", "Patient/", "Patient/abc", "Observation/1", "0", "١٢"])
def test_bad_patient_reference_is_refused(raw: str) -> None:
    with pytest.raises(SearchParameterError, match="'patient'"):
        parse_patient_reference("patient", raw)


def test_count_above_the_maximum_is_clamped() -> None:
    assert parse_count("_count", "1000000000000000000000", 1000) == 1000


@pytest.mark.parametrize("raw", ["", "-1", "1.5", "ten", "\u0661\u0660"])
def test_count_that_is_not_a_non_negative_integer_is_refused(raw: str) -> None:
    with pytest.raises(SearchParameterError, match="'_count'"):
        parse_count("_count", raw, 1000)


def test_observation_search_without_patient_is_refused() -> None:
    with pytest.raises(SearchParameterError, match="'patient'"):
        parse_observation_search([("code", "8867-4")], default_count=50, max_count=1000)


def test_patient_and_subject_together_are_refused_naming_the_second() -> None:
    with pytest.raises(SearchParameterError, match="'subject'"):
        parse_observation_search(
            [("patient", "1"), ("subject", "Patient/1")], default_count=50, max_count=1000
        )


# --- properties ---

_PARSERS: list[Callable[[str], object]] = [
    lambda raw: parse_date("date", raw),
    lambda raw: parse_identifier("identifier", raw),
    lambda raw: parse_token("code", raw),
    lambda raw: parse_patient_reference("patient", raw),
    lambda raw: parse_count("_count", raw, 1000),
    lambda raw: parse_date_filter("date", [raw]),
    lambda raw: parse_names("name", raw),
    lambda raw: parse_genders("gender", raw),
    lambda raw: parse_ids("_id", raw),
    lambda raw: parse_max("max", raw),
    lambda raw: parse_modalities("modality", raw),
    lambda raw: parse_study_uids("identifier", raw),
    lambda raw: parse_elements("_elements", raw),
    lambda raw: parse_sort("_sort", raw),
]

_DATE_LIKE = st.from_regex(
    r"(eq|ne|gt|lt|ge|le|sa|eb|ap|xx)?[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}"
    r"(:[0-9]{2}(\.[0-9]{1,9})?)?(Z|[+ -][0-9]{2}:[0-9]{2})?)?)?)?",
    fullmatch=True,
)


@given(raw=st.text(max_size=80) | _DATE_LIKE)
def test_date_parser_returns_a_range_or_raises_search_parameter_error(raw: str) -> None:
    try:
        parsed = parse_date("date", raw)
    except SearchParameterError as exc:
        refused: str | None = exc.parameter
    else:
        refused = None
        for bound in (parsed.start, parsed.end):
            assert bound is None or bound.tzinfo is UTC
    assert refused in (None, "date")


@given(raw=st.text(max_size=80) | st.from_regex(r"[A-Za-z:/.]{0,20}\|[^|]{0,20}", fullmatch=True))
def test_identifier_parser_returns_a_value_or_raises_search_parameter_error(raw: str) -> None:
    try:
        token = parse_identifier("identifier", raw)
    except SearchParameterError as exc:
        refused: str | None = exc.parameter
    else:
        refused = None
        assert token.code
        assert token.system is None or token.system
    assert refused in (None, "identifier")


@given(raw=st.text(max_size=60), which=st.integers(0, len(_PARSERS) - 1))
def test_every_parser_returns_or_raises_only_search_parameter_error(raw: str, which: int) -> None:
    with contextlib.suppress(SearchParameterError):
        _PARSERS[which](raw)


@given(
    instant=st.datetimes(
        min_value=datetime(1900, 1, 1),  # noqa: DTZ001 - hypothesis wants naive bounds
        max_value=datetime(2200, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    )
)
def test_an_instant_always_falls_in_the_day_that_contains_it(instant: datetime) -> None:
    day = parse_date("date", instant.date().isoformat())
    exact = parse_date("date", instant.isoformat())
    assert day.start is not None
    assert day.end is not None
    assert day.start <= instant < day.end
    assert exact.start == instant


_NAMES = st.sampled_from(
    [
        *sorted(OBSERVATION_PARAMETERS | {"max", "name", "gender", "birthdate", "_id", "started"}),
        *("modality", "identifier", "agent", "x-unknown", "_format"),
    ]
)
_SEARCHES: list[Callable[..., object]] = [
    parse_observation_search,
    parse_patient_search,
    parse_report_search,
    parse_imaging_search,
    parse_device_search,
    parse_audit_search,
]


@given(
    params=st.lists(st.tuples(_NAMES, st.text(max_size=30) | _DATE_LIKE), max_size=6),
    which=st.integers(0, len(_SEARCHES) - 1),
    strict=st.booleans(),
)
def test_whole_search_parsers_return_or_raise_only_search_parameter_error(
    params: list[tuple[str, str]], which: int, strict: bool
) -> None:
    with contextlib.suppress(SearchParameterError):
        _SEARCHES[which](params, default_count=50, max_count=1000, strict=strict)


@given(params=st.lists(st.tuples(_NAMES, st.text(max_size=30)), max_size=6), strict=st.booleans())
def test_lastn_parser_returns_or_raises_only_search_parameter_error(
    params: list[tuple[str, str]], strict: bool
) -> None:
    with contextlib.suppress(SearchParameterError):
        parse_lastn_search(params, strict=strict)


@given(name=st.text(min_size=1, max_size=20).filter(lambda n: n not in OBSERVATION_PARAMETERS))
def test_unknown_parameter_is_ignored_leniently_and_refused_strictly(name: str) -> None:
    params = [("patient", "1"), (name, "x")]
    if name != "_format":
        lenient = parse_observation_search(params, default_count=50, max_count=1000)
        assert lenient.patient.ids == (1,)
        with pytest.raises(SearchParameterError, match="not a supported search parameter"):
            parse_observation_search(params, default_count=50, max_count=1000, strict=True)


@pytest.mark.parametrize(
    ("prefer", "strict"),
    [
        (None, False),
        ("handling=strict", True),
        ("return=minimal, handling=strict", True),
        ("handling=lenient", False),
        ('handling="strict"', True),
        ("respond-async", False),
    ],
)
def test_prefer_header_selects_strict_handling(prefer: str | None, strict: bool) -> None:
    assert strict_handling(prefer) is strict


@given(
    day=st.dates(min_value=datetime(1900, 1, 1).date(), max_value=datetime(2200, 1, 1).date())  # noqa: DTZ001
)
def test_ne_excludes_exactly_the_range_eq_selects(day: object) -> None:
    text = str(day)
    equal = parse_date_filter("date", [text])
    not_equal = parse_date_filter("date", ["ne" + text])
    assert not_equal.range == TimeRange()
    assert not_equal.excluded == (equal.range,)


def test_repeated_dates_intersect_and_collect_exclusions() -> None:
    found = parse_date_filter("date", ["ge2026-11", "lt2026-12", "ne2026-11-15"])
    assert found.range == TimeRange(utc(2026, 11, 1), utc(2026, 12, 1))
    assert found.excluded == (TimeRange(utc(2026, 11, 15), utc(2026, 11, 16)),)


def test_study_uid_takes_the_urn_oid_form_and_a_bare_uid() -> None:
    assert parse_study_uids("identifier", "urn:dicom:uid|urn:oid:1.2.3,1.2.4") == (
        "1.2.3",
        "1.2.4",
    )


# --- cursors ---

_DIGEST = bytes(range(32))
_CODEC = CursorCodec(b"a cursor secret of the tests....")
encode_cursor = _CODEC.encode
decode_cursor = _CODEC.decode


def test_cursor_round_trips_its_position() -> None:
    position = CursorPosition(utc(2026, 11, 27, 10, 0, 0, 123456), 42)
    assert decode_cursor(encode_cursor(_DIGEST, position), _DIGEST, timed=True) == position


@given(text=st.text(max_size=80))
def test_garbage_cursor_is_refused(text: str) -> None:
    with pytest.raises(SearchParameterError, match="'_cursor'"):
        decode_cursor(text, _DIGEST, timed=True)


def test_cursor_with_one_character_changed_is_refused() -> None:
    cursor = encode_cursor(_DIGEST, CursorPosition(utc(2026, 11, 27), 42))
    for i in range(len(cursor)):
        changed = cursor[:i] + ("A" if cursor[i] != "A" else "B") + cursor[i + 1 :]
        with pytest.raises(SearchParameterError, match="'_cursor'"):
            decode_cursor(changed, _DIGEST, timed=True)


def test_cursor_of_another_search_is_refused() -> None:
    cursor = encode_cursor(_DIGEST, CursorPosition(utc(2026, 11, 27), 42))
    with pytest.raises(SearchParameterError, match="another search"):
        decode_cursor(cursor, bytes(32), timed=True)


def test_cursor_signed_with_another_secret_is_refused() -> None:
    cursor = CursorCodec(b"the secret of another server...").encode(
        _DIGEST, CursorPosition(utc(2026, 11, 27), 42)
    )
    with pytest.raises(SearchParameterError, match="not a cursor of this server"):
        decode_cursor(cursor, _DIGEST, timed=True)


def test_replicas_sharing_a_secret_follow_each_others_cursors() -> None:
    position = CursorPosition(utc(2026, 11, 27), 42)
    secret = b"shared by every replica of a region"
    cursor = CursorCodec(secret).encode(_DIGEST, position)
    assert CursorCodec(secret).decode(cursor, _DIGEST, timed=True) == position


def test_short_cursor_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        CursorCodec(b"short")


# --- identifier systems ---


def test_cin_short_name_maps_to_its_uri() -> None:
    assert system_uri("CIN") == "https://qantara.ma/fhir/sid/cin"


def test_unknown_short_name_maps_to_a_qantara_urn() -> None:
    assert system_uri("MRN-CHU") == "urn:qantara:sid:MRN-CHU"


def test_search_system_accepts_short_name_or_uri() -> None:
    assert set(stored_systems("https://qantara.ma/fhir/sid/cin")) == set(stored_systems("CIN"))
    assert "MRN-CHU" in stored_systems("urn:qantara:sid:MRN-CHU")


# --- scopes ---


@pytest.mark.parametrize(
    ("scope", "resource", "interaction", "allowed"),
    [
        ("system/Observation.read", "Observation", Interaction.SEARCH, True),
        ("system/Observation.read", "Patient", Interaction.READ, False),
        ("system/*.read", "Patient", Interaction.READ, True),
        ("system/Observation.rs", "Observation", Interaction.SEARCH, True),
        ("system/Observation.r", "Observation", Interaction.SEARCH, False),
        ("system/*.cruds", "Patient", Interaction.SEARCH, True),
        ("system/Patient.write", "Patient", Interaction.READ, False),
        ("patient/Patient.read", "Patient", Interaction.READ, False),
    ],
)
def test_scope_grants(scope: str, resource: str, interaction: Interaction, allowed: bool) -> None:
    assert allows([scope], resource, interaction) is allowed


@pytest.mark.parametrize("scope", ["system/Observation.sr", "system/.read", "Observation.read"])
def test_malformed_scope_is_refused(scope: str) -> None:
    with pytest.raises(InvalidScope):
        parse_scope(scope)


def test_bearer_scheme_is_case_insensitive() -> None:
    assert bearer_token("bearer qtk_abc") == "qtk_abc"
    assert bearer_token("Basic dXNlcjpwYXNz") is None
