"""The code table: aliases to LOINC/UCUM, the LOINC check digit, displays, categories, waveforms."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest import codes
from ingest.codes import Coded

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

# Real LOINC codes, check digits as published.
KNOWN_LOINC = [
    "8867-4",
    "59408-5",
    "8480-6",
    "8462-4",
    "8310-5",
    "9279-1",
    "2339-0",
    "15074-8",
    "29463-7",
    "2708-6",
    "8302-2",
    "9843-4",
    "39156-5",
    "85353-1",
    "85354-9",
    "8478-0",
    "718-7",
    "2160-0",
    "4548-4",
    "2345-7",
]


def loinc_check_digit_as_documented(base: str) -> int:
    """LOINC's published steps, literally: odd positions from the right as a number, times 2,
    the even positions prepended, the digits summed, the difference to the next multiple of 10."""
    reversed_digits = base[::-1]
    odd = reversed_digits[0::2]
    even = reversed_digits[1::2]
    doubled = str(int(odd) * 2)
    total = sum(int(c) for c in even + doubled)
    return (10 - total % 10) % 10


@pytest.mark.parametrize(("alias", "loinc", "unit"), ALIAS_CODINGS)
def test_alias_without_unit_resolves_to_its_loinc_code_and_ucum_unit(
    alias: str, loinc: str, unit: str
) -> None:
    assert codes.resolve(alias, None) == Coded(loinc, unit)


@pytest.mark.parametrize(("alias", "loinc", "unit"), ALIAS_CODINGS)
def test_alias_with_its_own_unit_resolves_to_the_same_coding(
    alias: str, loinc: str, unit: str
) -> None:
    assert codes.resolve(alias, unit) == Coded(loinc, unit)


@pytest.mark.parametrize(("alias", "unit"), [("hr", "bpm"), ("temp", "[degF]"), ("weight", "g")])
def test_alias_with_another_unit_is_refused(alias: str, unit: str) -> None:
    with pytest.raises(codes.InvalidUnit):
        codes.resolve(alias, unit)


def test_glucose_without_unit_is_mass_concentration_in_mg_per_dl() -> None:
    assert codes.resolve("glucose", None) == Coded("2339-0", "mg/dL")


def test_glucose_in_mmol_per_l_keeps_the_glucose_code_and_its_unit() -> None:
    assert codes.resolve("glucose", "mmol/L") == Coded("2339-0", "mmol/L")


@pytest.mark.parametrize("unit", ["g/L", "mmol", "[iU]/L"])
def test_glucose_in_any_other_unit_is_refused(unit: str) -> None:
    with pytest.raises(codes.InvalidUnit):
        codes.resolve("glucose", unit)


@pytest.mark.parametrize("code", KNOWN_LOINC)
def test_published_loinc_codes_pass_the_check_digit(code: str) -> None:
    assert codes.is_loinc(code)


@pytest.mark.parametrize("code", KNOWN_LOINC)
def test_loinc_code_with_any_other_check_digit_fails(code: str) -> None:
    base, check = code.split("-")
    for digit in "0123456789".replace(check, ""):
        assert not codes.is_loinc(f"{base}-{digit}")


@given(st.text(alphabet="0123456789", min_size=1, max_size=7))
def test_loinc_check_digit_agrees_with_the_documented_procedure(base: str) -> None:
    assert codes.loinc_check_digit(base) == loinc_check_digit_as_documented(base)


@pytest.mark.parametrize(
    "code",
    ["", "-4", "8867", "8867-", "8867-44", "12345678-6", "88a7-4", "8867_4", " 8867-4", "٨٨٦٧-٤"],
)
def test_strings_not_shaped_like_loinc_are_not_loinc(code: str) -> None:
    assert not codes.is_loinc(code)


def test_loinc_check_digit_refuses_a_base_that_is_not_ascii_digits() -> None:
    with pytest.raises(ValueError, match="ASCII digits"):
        codes.loinc_check_digit("٨٨٦٧")


def test_loinc_code_keeps_the_unit_sent() -> None:
    assert codes.resolve("718-7", "g/dL") == Coded("718-7", "g/dL")


def test_loinc_code_without_unit_is_refused() -> None:
    with pytest.raises(codes.InvalidUnit):
        codes.resolve("718-7", None)


@pytest.mark.parametrize("code", ["heart-rate", "HR", "8867-5", "", "MDC_ECG_ELEC_POTL_II"])
def test_code_neither_alias_nor_loinc_is_unknown(code: str) -> None:
    with pytest.raises(codes.UnknownCode):
        codes.resolve(code, "/min")


@pytest.mark.parametrize(
    "unit", ["/min", "%", "mm[Hg]", "Cel", "mg/dL", "mmol/L", "10*3/uL", "{beats}/min", "1", "m2"]
)
def test_plausible_ucum_units_pass_the_sanity_check(unit: str) -> None:
    assert codes.is_ucum_unit(unit)


@pytest.mark.parametrize("unit", ["", "mm Hg", "°C", "mg\n", "a" * 33, 'mg"', "µg", "mg;dL"])
def test_implausible_units_fail_the_sanity_check(unit: str) -> None:
    assert not codes.is_ucum_unit(unit)


@pytest.mark.parametrize(("alias", "loinc", "unit"), ALIAS_CODINGS)
def test_every_alias_code_has_a_display(alias: str, loinc: str, unit: str) -> None:
    assert codes.display_for(loinc)


def test_heart_rate_display_is_the_loinc_short_name() -> None:
    assert codes.display_for("8867-4") == "Heart rate"


def test_unknown_code_has_no_display() -> None:
    assert codes.display_for("718-7") is None


@pytest.mark.parametrize(
    "code", ["8867-4", "59408-5", "8480-6", "8462-4", "8310-5", "9279-1", "29463-7"]
)
def test_vital_sign_codes_are_in_category_vital_signs(code: str) -> None:
    assert codes.category_for(code) == "vital-signs"


@pytest.mark.parametrize("code", ["2339-0", "15074-8", "718-7"])
def test_glucose_and_other_codes_are_in_category_laboratory(code: str) -> None:
    assert codes.category_for(code) == "laboratory"


def test_ecg_lead_ii_is_mdc_ecg_elec_potl_ii() -> None:
    channel = codes.waveform_for("ecg-ii")
    assert channel is not None
    assert (channel.mdc_ref, channel.mdc_code, channel.system) == (
        "MDC_ECG_ELEC_POTL_II",
        131330,
        "urn:iso:std:iso:11073:10101",
    )


@pytest.mark.parametrize(
    ("alias", "mdc_code"),
    [
        ("ecg-i", 131329),
        ("ecg-ii", 131330),
        ("ecg-iii", 131389),
        ("pleth", 150452),
        ("resp", 151780),
    ],
)
def test_each_waveform_alias_maps_to_its_mdc_code(alias: str, mdc_code: int) -> None:
    channel = codes.waveform_for(alias)
    assert channel is not None
    assert channel.mdc_code == mdc_code


def test_waveform_channel_is_found_again_by_its_stored_mdc_code() -> None:
    assert codes.waveform_by_mdc("131330") == codes.waveform_for("ecg-ii")


def test_unknown_waveform_alias_has_no_channel() -> None:
    assert codes.waveform_for("ecg-v7") is None


def test_code_tables_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        codes.ALIASES["hr"] = codes.ALIASES["rr"]  # type: ignore[index]
