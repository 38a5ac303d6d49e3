"""The one code table: sample aliases to LOINC/UCUM, LOINC displays and categories, waveform codes.

Units send either a LOINC code (`8867-4`, check digit verified) with a UCUM unit, or a short alias
(`hr`, `spo2`, ...) that this table maps to a LOINC code and its UCUM unit. Waveform channels are
named by a small alias table (`ecg-ii`, `pleth`, ...) mapped to ISO/IEEE 11073-10101 (MDC) codes.
The FHIR layer reads displays and categories from here too, so there is exactly one table.

Pure data and small functions: no I/O, no logging, no protocol library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Final

LOINC_SYSTEM: Final = "http://loinc.org"
UCUM_SYSTEM: Final = "http://unitsofmeasure.org"
MDC_SYSTEM: Final = "urn:iso:std:iso:11073:10101"

MAX_LOINC_LENGTH: Final = 9  # `^\d{1,7}-\d$`
MAX_UCUM_LENGTH: Final = 32

# The characters UCUM case-sensitive unit expressions are made of (letters, digits, `.` `/` `*`
# `^` `%` `'` `+` `-` `_` brackets and `{annotations}`); no space, no control, nothing non-ASCII.
_UCUM_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789./*^%'+-_[](){}"
)
_DIGITS: Final = frozenset("0123456789")


class Category(enum.StrEnum):
    """FHIR `Observation.category` codes (system `observation-category`) that we assign."""

    VITAL_SIGNS = "vital-signs"
    LABORATORY = "laboratory"


@dataclass(frozen=True, slots=True)
class Coded:
    """A resolved measurement code: LOINC `code` and the UCUM `unit` its value is expressed in."""

    code: str
    unit: str


@dataclass(frozen=True, slots=True)
class Alias:
    """A short sample code a unit may send; `options[0]` applies when the sample has no unit."""

    name: str
    options: tuple[Coded, ...]

    def resolve(self, unit: str | None) -> Coded | None:
        """The coding for `unit` as sent (default when None), or None if this alias refuses it."""
        if unit is None:
            return self.options[0]
        for option in self.options:
            if option.unit == unit:
                return option
        return None


@dataclass(frozen=True, slots=True)
class WaveformCode:
    """A waveform channel: its alias, MDC reference id and numeric code, and its default unit."""

    alias: str
    mdc_ref: str
    mdc_code: int
    default_unit: str
    system: str = MDC_SYSTEM


def _alias(name: str, *options: tuple[str, str]) -> tuple[str, Alias]:
    return name, Alias(name, tuple(Coded(code, unit) for code, unit in options))


ALIASES: Final = MappingProxyType(
    dict(
        [
            _alias("hr", ("8867-4", "/min")),
            _alias("spo2", ("59408-5", "%")),
            _alias("sbp", ("8480-6", "mm[Hg]")),
            _alias("dbp", ("8462-4", "mm[Hg]")),
            _alias("temp", ("8310-5", "Cel")),
            _alias("rr", ("9279-1", "/min")),
            # The contract keeps glucometer readings under one code, 2339-0, in the unit the
            # device sent (mg/dL or mmol/L), so that one code search finds every reading; the
            # FHIR valueQuantity carries the unit. (LOINC's molar code would be 15074-8.)
            _alias("glucose", ("2339-0", "mg/dL"), ("2339-0", "mmol/L")),
            _alias("weight", ("29463-7", "kg")),
        ]
    )
)
"""Sample aliases a unit may send instead of a LOINC code."""

LOINC_DISPLAY: Final = MappingProxyType(
    {
        "8867-4": "Heart rate",
        "59408-5": "Oxygen saturation in Arterial blood by Pulse oximetry",
        "2708-6": "Oxygen saturation in Arterial blood",
        "8480-6": "Systolic blood pressure",
        "8462-4": "Diastolic blood pressure",
        "8478-0": "Mean blood pressure",
        "85354-9": "Blood pressure panel with all children optional",
        "8310-5": "Body temperature",
        "9279-1": "Respiratory rate",
        "2339-0": "Glucose [Mass/volume] in Blood",
        "15074-8": "Glucose [Moles/volume] in Blood",
        "29463-7": "Body weight",
        "8302-2": "Body height",
        "9843-4": "Head Occipital-frontal circumference",
        "39156-5": "Body mass index (BMI) [Ratio]",
        "85353-1": (
            "Vital signs, weight, height, head circumference, oxygen saturation and BMI panel"
        ),
    }
)
"""Display names for the LOINC codes we know (FHIR `Coding.display`)."""

VITAL_SIGNS_CODES: Final = frozenset(
    {
        "85353-1",  # vital signs panel
        "9279-1",  # respiratory rate
        "8867-4",  # heart rate
        "2708-6",  # oxygen saturation
        "59408-5",  # oxygen saturation by pulse oximetry
        "8310-5",  # body temperature
        "8302-2",  # body height
        "9843-4",  # head circumference
        "29463-7",  # body weight
        "39156-5",  # body mass index
        "85354-9",  # blood pressure panel
        "8480-6",  # systolic blood pressure
        "8462-4",  # diastolic blood pressure
        "8478-0",  # mean blood pressure
    }
)
"""The LOINC codes of the FHIR R4 vital-signs profiles: category `vital-signs`."""

WAVEFORMS: Final = MappingProxyType(
    {
        w.alias: w
        for w in (
            WaveformCode("ecg-i", "MDC_ECG_ELEC_POTL_I", 131329, "mV"),
            WaveformCode("ecg-ii", "MDC_ECG_ELEC_POTL_II", 131330, "mV"),
            WaveformCode("ecg-iii", "MDC_ECG_ELEC_POTL_III", 131389, "mV"),
            WaveformCode("pleth", "MDC_PULS_OXIM_PLETH", 150452, "1"),
            WaveformCode("resp", "MDC_IMPED_TTHOR", 151780, "1"),
        )
    }
)
"""Waveform channel aliases and their MDC codes."""


def loinc_check_digit(base: str) -> int:
    """The LOINC mod-10 check digit of the digits before the hyphen (`"8867"` → 4).

    LOINC's algorithm is Luhn's: from the rightmost digit, double every other digit (the
    rightmost first), sum the digits of every product and of the undoubled digits, and the check
    digit brings the sum up to the next multiple of ten.
    """
    if not base or not base.isascii() or not base.isdigit():
        raise ValueError("a LOINC code's base is one or more ASCII digits")
    total = 0
    for position, char in enumerate(reversed(base)):
        digit = ord(char) - 48
        if position % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return (10 - total % 10) % 10


def is_loinc(code: str) -> bool:
    """Whether `code` is shaped like a LOINC code (`^\\d{1,7}-\\d$`) and its check digit holds."""
    length = len(code)
    if length < 3 or length > MAX_LOINC_LENGTH or code[-2] != "-":
        return False
    base = code[:-2]
    check = code[-1]
    if check not in _DIGITS or not _DIGITS.issuperset(base):
        return False
    return loinc_check_digit(base) == ord(check) - 48


def is_ucum_unit(unit: str) -> bool:
    """A sanity check of a UCUM unit string: 1 to 32 characters from UCUM's alphabet.

    This is not a UCUM grammar check; it refuses what can never be a unit (spaces, controls,
    non-ASCII, quotes, very long strings) so that nothing odd reaches storage or FHIR.
    """
    return 0 < len(unit) <= MAX_UCUM_LENGTH and _UCUM_CHARS.issuperset(unit)


class UnknownCode(LookupError):
    """The sample code is neither a known alias nor a valid LOINC code."""


class InvalidUnit(ValueError):
    """The unit is missing, malformed, or not one this alias accepts."""


@lru_cache(maxsize=4096)
def resolve(code: str, unit: str | None) -> Coded:
    """Map a sample's `code` and `unit` as sent to a LOINC code and UCUM unit.

    An alias takes its table's unit (`glucose` also `mmol/L`) and refuses any other; a LOINC code
    keeps the unit sent, which must then be present and pass `is_ucum_unit`. Cached: units send
    the same few pairs all day.
    """
    alias = ALIASES.get(code)
    if alias is not None:
        coded = alias.resolve(unit)
        if coded is None:
            raise InvalidUnit(f"alias {code!r} does not accept this unit")
        return coded
    if not is_loinc(code):
        raise UnknownCode("code is neither a known alias nor a valid LOINC code")
    if unit is None:
        raise InvalidUnit("a LOINC code needs a UCUM unit")
    if not is_ucum_unit(unit):
        raise InvalidUnit("unit is not a plausible UCUM unit")
    return Coded(code, unit)


def display_for(code: str) -> str | None:
    """The display name of a LOINC code we know, else None."""
    return LOINC_DISPLAY.get(code)


def category_for(code: str) -> str:
    """`vital-signs` for the FHIR vital-signs codes, `laboratory` for anything else (glucose)."""
    return Category.VITAL_SIGNS if code in VITAL_SIGNS_CODES else Category.LABORATORY


def waveform_for(alias: str) -> WaveformCode | None:
    """The waveform channel named by `alias`, else None."""
    return WAVEFORMS.get(alias)


_WAVEFORMS_BY_MDC: Final = MappingProxyType({str(w.mdc_code): w for w in WAVEFORMS.values()})


def waveform_by_mdc(code: str) -> WaveformCode | None:
    """The waveform channel of an MDC numeric code as stored on a segment (`"131330"`)."""
    return _WAVEFORMS_BY_MDC.get(code)
