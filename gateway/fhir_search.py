"""FHIR search parameters: text in, typed criteria out, or `SearchParameterError` (HTTP 400).

Pure functions, no I/O: every parser takes the parameter's name (for the error message) and its
raw value, and either returns a value or raises `SearchParameterError`, whatever the input.
Error messages name the parameter and the problem, never echo the value (it may be an identifier).

Dates follow FHIR's implicit ranges: `2026-11` is the month [2026-11-01, 2026-12-01), an instant
given to the second is that second. Dates without a time are taken in UTC. A time needs a zone
(`Z` or `±hh:mm`); a `+` decoded as a space from a query string is read back as `+`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Final

from ingest.errors import InputError

MAX_PARAMETER_LENGTH: Final = 2048
MAX_ALTERNATIVES: Final = 100
"""Most comma-separated values one parameter may carry."""

END_OF_TIME: Final = datetime.max.replace(tzinfo=UTC)

OBSERVATION_CATEGORY_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/observation-category"
_OBSERVATION_CATEGORIES: Final = frozenset(
    {
        "social-history",
        "vital-signs",
        "imaging",
        "laboratory",
        "procedure",
        "survey",
        "exam",
        "therapy",
        "activity",
    }
)


class SearchParameterError(InputError):
    """A search parameter is malformed or not supported; answered with 400 and its name."""

    def __init__(self, parameter: str, detail: str) -> None:
        super().__init__("invalid-search-parameter", f"parameter '{parameter}': {detail}")
        self.parameter = parameter


@dataclass(frozen=True, slots=True)
class Token:
    """A FHIR token `[system|]code`.

    `system` None: no `|` (any system); `""`: `|code` (no system). `code` None: `system|` (any).
    """

    system: str | None
    code: str | None


@dataclass(frozen=True, slots=True)
class TimeRange:
    """Instants in [start, end); None is unbounded on that side."""

    start: datetime | None = None
    end: datetime | None = None

    def intersect(self, other: TimeRange) -> TimeRange:
        starts = [t for t in (self.start, other.start) if t is not None]
        ends = [t for t in (self.end, other.end) if t is not None]
        return TimeRange(max(starts) if starts else None, min(ends) if ends else None)

    @property
    def empty(self) -> bool:
        return self.start is not None and self.end is not None and self.start >= self.end


# --- text ------------------------------------------------------------------------------------


def _check_text(parameter: str, raw: str) -> None:
    if len(raw) > MAX_PARAMETER_LENGTH:
        raise SearchParameterError(parameter, f"longer than {MAX_PARAMETER_LENGTH} characters")
    for char in raw:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise SearchParameterError(parameter, "contains a control character")


def _split_unescaped(text: str, separator: str) -> list[str]:
    """Split on `separator` unless escaped; FHIR escapes are `\\,` `\\|` `\\$` `\\\\`."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\([\\,|$])", r"\1", text)


def _alternatives(parameter: str, raw: str) -> list[str]:
    _check_text(parameter, raw)
    values = _split_unescaped(raw, ",")
    if len(values) > MAX_ALTERNATIVES:
        raise SearchParameterError(parameter, f"more than {MAX_ALTERNATIVES} values")
    return values


# --- tokens ------------------------------------------------------------------------------------


def parse_token(parameter: str, raw: str) -> Token:
    """One token `[system|]code` (no comma list)."""
    _check_text(parameter, raw)
    parts = _split_unescaped(raw, "|")
    if len(parts) == 1:
        code = _unescape(parts[0])
        if not code:
            raise SearchParameterError(parameter, "empty value")
        return Token(None, code)
    if len(parts) != 2:
        raise SearchParameterError(parameter, "expected [system|]code with one '|'")
    system, code = (_unescape(p) for p in parts)
    if not system and not code:
        raise SearchParameterError(parameter, "empty value")
    return Token(system, code or None)


def parse_tokens(parameter: str, raw: str) -> tuple[Token, ...]:
    """A comma-separated list of tokens (any of them matches)."""
    return tuple(parse_token(parameter, value) for value in _alternatives(parameter, raw))


def parse_identifier(parameter: str, raw: str) -> Token:
    """An identifier `SYSTEM|VALUE` or a bare `VALUE`: a value is required, a system is not."""
    token = parse_token(parameter, raw)
    if token.code is None:
        raise SearchParameterError(parameter, "expected SYSTEM|VALUE or VALUE")
    if token.system == "":
        raise SearchParameterError(parameter, "an identifier system cannot be empty")
    return token


def parse_identifiers(parameter: str, raw: str) -> tuple[Token, ...]:
    return tuple(parse_identifier(parameter, value) for value in _alternatives(parameter, raw))


# --- references and categories ----------------------------------------------------------------

_NUMERIC_ID = re.compile(r"[0-9]{1,18}", re.ASCII)


def parse_patient_reference(parameter: str, raw: str) -> int:
    """`Patient/{id}` or `{id}`, where our patient ids are positive integers."""
    _check_text(parameter, raw)
    value = raw.removeprefix("Patient/")
    if not _NUMERIC_ID.fullmatch(value) or int(value) == 0:
        raise SearchParameterError(parameter, "expected Patient/{id} or {id} with a numeric id")
    return int(value)


def parse_patient_references(parameter: str, raw: str) -> tuple[int, ...]:
    return tuple(
        parse_patient_reference(parameter, value) for value in _alternatives(parameter, raw)
    )


def parse_categories(parameter: str, raw: str) -> frozenset[str]:
    """Observation categories (`vital-signs`, `laboratory`, ...), with or without their system."""
    found = set()
    for token in (parse_token(parameter, value) for value in _alternatives(parameter, raw)):
        if token.system not in (None, OBSERVATION_CATEGORY_SYSTEM):
            raise SearchParameterError(parameter, "unknown category system")
        if token.code not in _OBSERVATION_CATEGORIES:
            raise SearchParameterError(parameter, "unknown observation category")
        found.add(token.code)
    return frozenset(found)


# --- numbers --------------------------------------------------------------------------------


def parse_count(parameter: str, raw: str, maximum: int) -> int:
    """A page size: a non-negative integer; a value above `maximum` is clamped to it."""
    _check_text(parameter, raw)
    if not raw or not raw.isascii() or not raw.isdigit():
        raise SearchParameterError(parameter, "expected a non-negative integer")
    return min(int(raw), maximum)


def parse_summary(parameter: str, raw: str) -> bool:
    """`_summary`: True for `count` (total only), False for `false`; others are not supported."""
    if raw == "count":
        return True
    if raw == "false":
        return False
    raise SearchParameterError(parameter, "only 'count' and 'false' are supported")


# --- dates ------------------------------------------------------------------------------------

_DATE = re.compile(
    r"(?P<year>[0-9]{4})"
    r"(?:-(?P<month>[0-9]{2})"
    r"(?:-(?P<day>[0-9]{2})"
    r"(?:T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})"
    r"(?::(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]{1,9}))?)?"
    r"(?P<zone>Z|[+-][0-9]{2}:[0-9]{2})?"
    r")?)?)?",
    re.ASCII,
)
_PREFIXES: Final = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
_SUPPORTED_PREFIXES: Final = frozenset({"eq", "gt", "lt", "ge", "le", "sa", "eb"})


def parse_date(parameter: str, raw: str) -> TimeRange:
    """A date parameter with an optional prefix, as the range of instants it selects."""
    _check_text(parameter, raw)
    prefix = "eq"
    value = raw
    if raw[:2] in _PREFIXES:
        prefix, value = raw[:2], raw[2:]
    if prefix not in _SUPPORTED_PREFIXES:
        raise SearchParameterError(parameter, f"prefix '{prefix}' is not supported")
    low, high = _date_range(parameter, value.replace(" ", "+"))
    if prefix == "eq":
        return TimeRange(low, high)
    if prefix == "ge":
        return TimeRange(low, None)
    if prefix in ("gt", "sa"):
        return TimeRange(high, None)
    if prefix == "le":
        return TimeRange(None, high)
    return TimeRange(None, low)  # lt, eb


def parse_dates(parameter: str, raws: Sequence[str]) -> TimeRange:
    """Repeated date parameters: all must hold (their ranges intersect)."""
    result = TimeRange()
    for raw in raws:
        result = result.intersect(parse_date(parameter, raw))
    return result


def _date_range(parameter: str, value: str) -> tuple[datetime, datetime]:
    """The implicit range [low, high) of a date, dateTime or instant at its given precision."""
    match = _DATE.fullmatch(value)
    if match is None:
        raise SearchParameterError(
            parameter, "expected [prefix]YYYY[-MM[-DD[Thh:mm[:ss[.fff]](Z|+hh:mm)]]]"
        )
    parts = match.groupdict()
    if parts["hour"] is not None and parts["zone"] is None:
        raise SearchParameterError(parameter, "a time needs a zone (Z or +hh:mm)")
    try:
        zone = _zone(parts["zone"])
        year = int(parts["year"])
        month = int(parts["month"] or 1)
        day = int(parts["day"] or 1)
        hour = int(parts["hour"] or 0)
        minute = int(parts["minute"] or 0)
        second = int(parts["second"] or 0)
        fraction = parts["fraction"] or ""
        micro = int(fraction[:6].ljust(6, "0")) if fraction else 0
        low = datetime(year, month, day, hour, minute, second, micro, tzinfo=zone)
    except ValueError as exc:
        raise SearchParameterError(parameter, "not a valid date or time") from exc
    try:
        high = _step(low, parts, fraction).astimezone(UTC)
    except (OverflowError, ValueError):  # past year 9999
        high = END_OF_TIME
    try:
        return low.astimezone(UTC), high
    except (OverflowError, ValueError) as exc:  # before year 1 once in UTC
        raise SearchParameterError(parameter, "date out of range") from exc


def _zone(text: str | None) -> timezone:
    if text is None or text == "Z":
        return UTC
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError("zone offset out of range")
    offset = timedelta(hours=hours, minutes=minutes)
    return timezone(-offset if text[0] == "-" else offset)


def _step(low: datetime, parts: dict[str, str | None], fraction: str) -> datetime:
    """The start of the next interval at the precision the value was given with."""
    if fraction:
        return low + timedelta(microseconds=10 ** (6 - min(len(fraction), 6)))
    if parts["second"] is not None:
        return low + timedelta(seconds=1)
    if parts["minute"] is not None:
        return low + timedelta(minutes=1)
    if parts["day"] is not None:
        return low + timedelta(days=1)
    if parts["month"] is not None:
        if low.month == 12:
            return low.replace(year=low.year + 1, month=1)
        return low.replace(month=low.month + 1)
    return low.replace(year=low.year + 1)


# --- whole searches -----------------------------------------------------------------------------

CURSOR_PARAMETER: Final = "_cursor"
_IGNORED_FORMATS: Final = frozenset({"json", "application/json", "application/fhir+json"})


@dataclass(frozen=True, slots=True)
class ObservationSearch:
    patient_ids: tuple[int, ...] | None
    patient_identifiers: tuple[Token, ...] | None
    codes: tuple[Token, ...] | None
    categories: frozenset[str] | None
    time: TimeRange
    count: int
    summary_count: bool
    cursor: str | None

    def digest(self) -> bytes:
        """What a cursor is bound to: the criteria, not the page size nor the cursor."""
        return _digest(
            "Observation",
            self.patient_ids,
            self.patient_identifiers,
            self.codes,
            sorted(self.categories) if self.categories is not None else None,
            self.time,
        )


@dataclass(frozen=True, slots=True)
class PatientSearch:
    identifiers: tuple[Token, ...]
    count: int
    summary_count: bool
    cursor: str | None

    def digest(self) -> bytes:
        return _digest("Patient", self.identifiers)


def _digest(*criteria: object) -> bytes:
    return hashlib.sha256(repr(criteria).encode("utf-8", "backslashreplace")).digest()


def _collect(
    params: Sequence[tuple[str, str]], allowed: frozenset[str], repeatable: frozenset[str]
) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in params:
        if name == "_format":
            if value not in _IGNORED_FORMATS:
                raise SearchParameterError(name, "only JSON is supported")
            continue
        if name not in allowed:
            raise SearchParameterError(_safe_name(name), "not a supported search parameter")
        values = found.setdefault(name, [])
        if values and name not in repeatable:
            raise SearchParameterError(name, "given more than once")
        values.append(value)
    return found


def _safe_name(name: str) -> str:
    """A parameter name fit to show back: short and printable."""
    cleaned = "".join(c if c.isprintable() else "?" for c in name[:40])
    return cleaned or "?"


def _one(found: dict[str, list[str]], name: str) -> str | None:
    values = found.get(name)
    return values[0] if values else None


_OBSERVATION_PARAMETERS: Final = frozenset(
    {
        "patient",
        "patient:identifier",
        "code",
        "category",
        "date",
        "_count",
        "_summary",
        CURSOR_PARAMETER,
    }
)


def parse_observation_search(
    params: Sequence[tuple[str, str]], *, default_count: int, max_count: int
) -> ObservationSearch:
    """`GET /fhir/Observation` parameters; a patient (by reference or identifier) is required."""
    found = _collect(params, _OBSERVATION_PARAMETERS, frozenset({"date"}))
    patient = _one(found, "patient")
    by_identifier = _one(found, "patient:identifier")
    if patient is None and by_identifier is None:
        raise SearchParameterError("patient", "patient or patient:identifier is required")
    if patient is not None and by_identifier is not None:
        raise SearchParameterError("patient", "give patient or patient:identifier, not both")
    code = _one(found, "code")
    category = _one(found, "category")
    count = _one(found, "_count")
    summary = _one(found, "_summary")
    return ObservationSearch(
        patient_ids=parse_patient_references("patient", patient) if patient is not None else None,
        patient_identifiers=(
            parse_identifiers("patient:identifier", by_identifier)
            if by_identifier is not None
            else None
        ),
        codes=parse_tokens("code", code) if code is not None else None,
        categories=parse_categories("category", category) if category is not None else None,
        time=parse_dates("date", found.get("date", [])),
        count=parse_count("_count", count, max_count) if count is not None else default_count,
        summary_count=parse_summary("_summary", summary) if summary is not None else False,
        cursor=_one(found, CURSOR_PARAMETER),
    )


_PATIENT_PARAMETERS: Final = frozenset({"identifier", "_count", "_summary", CURSOR_PARAMETER})


def parse_patient_search(
    params: Sequence[tuple[str, str]], *, default_count: int, max_count: int
) -> PatientSearch:
    """`GET /fhir/Patient` parameters; an identifier is required."""
    found = _collect(params, _PATIENT_PARAMETERS, frozenset())
    identifier = _one(found, "identifier")
    if identifier is None:
        raise SearchParameterError("identifier", "identifier is required")
    count = _one(found, "_count")
    summary = _one(found, "_summary")
    return PatientSearch(
        identifiers=parse_identifiers("identifier", identifier),
        count=parse_count("_count", count, max_count) if count is not None else default_count,
        summary_count=parse_summary("_summary", summary) if summary is not None else False,
        cursor=_one(found, CURSOR_PARAMETER),
    )
