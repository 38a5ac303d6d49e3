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


@dataclass(frozen=True, slots=True)
class DateFilter:
    """Repeated date parameters: inside `range` and outside every `excluded` range (`ne`)."""

    range: TimeRange = TimeRange()
    excluded: tuple[TimeRange, ...] = ()

    @property
    def empty(self) -> bool:
        return self.range.empty


def parse_date_filter(parameter: str, raws: Sequence[str]) -> DateFilter:
    """Repeated date parameters with any prefix of `eq ne gt lt ge le sa eb`; all must hold."""
    result = TimeRange()
    excluded: list[TimeRange] = []
    for raw in raws:
        if raw.startswith("ne"):
            _check_text(parameter, raw)
            low, high = _date_range(parameter, raw[2:].replace(" ", "+"))
            excluded.append(TimeRange(low, high))
        else:
            result = result.intersect(parse_date(parameter, raw))
    return DateFilter(result, tuple(excluded))


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
COMMON_PARAMETERS: Final = frozenset({"_count", "_summary", "_format", CURSOR_PARAMETER})
"""Parameters every search accepts."""

PATIENT_PARAMETERS: Final = frozenset(
    {"identifier", "name", "birthdate", "gender", "_id"} | COMMON_PARAMETERS
)
OBSERVATION_PARAMETERS: Final = frozenset(
    {
        "patient",
        "patient:identifier",
        "subject",
        "subject:identifier",
        "code",
        "category",
        "date",
        "_sort",
        "_elements",
    }
    | COMMON_PARAMETERS
)
LASTN_PARAMETERS: Final = frozenset(
    {"patient", "patient:identifier", "subject", "subject:identifier", "code", "category", "max"}
    | {"_format", "_elements"}
)
REPORT_PARAMETERS: Final = frozenset(
    {"patient", "patient:identifier", "subject", "subject:identifier", "code", "date"}
    | COMMON_PARAMETERS
)
IMAGING_PARAMETERS: Final = frozenset(
    {
        "patient",
        "patient:identifier",
        "subject",
        "subject:identifier",
        "started",
        "modality",
        "identifier",
    }
    | COMMON_PARAMETERS
)
DEVICE_PARAMETERS: Final = frozenset({"identifier"} | COMMON_PARAMETERS)
AUDIT_PARAMETERS: Final = frozenset(
    {"patient", "patient:identifier", "date", "agent"} | COMMON_PARAMETERS
)
GENDERS: Final = frozenset({"male", "female", "other", "unknown"})
MAX_LASTN: Final = 100


def strict_handling(prefer: str | None) -> bool:
    """Whether a `Prefer` header asks for `handling=strict` (default: lenient)."""
    if not prefer:
        return False
    for part in prefer.split(","):
        for token in part.split(";"):
            name, _, value = token.strip().partition("=")
            if name.strip().lower() == "handling" and value.strip().strip('"').lower() == "strict":
                return True
    return False


@dataclass(frozen=True, slots=True)
class PatientCriterion:
    """Whose data: patients by id, or surviving patients by identifier (exactly one is set)."""

    ids: tuple[int, ...] | None
    identifiers: tuple[Token, ...] | None


@dataclass(frozen=True, slots=True)
class Paging:
    count: int
    summary_count: bool
    cursor: str | None


@dataclass(frozen=True, slots=True)
class ObservationSearch:
    patient: PatientCriterion
    codes: tuple[Token, ...] | None
    categories: frozenset[str] | None
    dates: DateFilter
    descending: bool
    elements: tuple[str, ...] | None
    paging: Paging

    def digest(self) -> bytes:
        """What a cursor is bound to: the criteria and the order, not the page size."""
        return _digest(
            "Observation",
            self.patient,
            self.codes,
            sorted(self.categories) if self.categories is not None else None,
            self.dates,
            self.descending,
        )


@dataclass(frozen=True, slots=True)
class LastnSearch:
    patient: PatientCriterion
    codes: tuple[Token, ...] | None
    categories: frozenset[str] | None
    max: int
    elements: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class PatientSearch:
    identifiers: tuple[Token, ...] | None
    names: tuple[str, ...] | None
    birthdate: DateFilter | None
    genders: frozenset[str] | None
    ids: tuple[int, ...] | None
    paging: Paging

    def digest(self) -> bytes:
        return _digest(
            "Patient",
            self.identifiers,
            self.names,
            self.birthdate,
            sorted(self.genders) if self.genders is not None else None,
            self.ids,
        )


@dataclass(frozen=True, slots=True)
class ReportSearch:
    patient: PatientCriterion
    codes: tuple[Token, ...] | None
    dates: DateFilter
    paging: Paging

    def digest(self) -> bytes:
        return _digest("DiagnosticReport", self.patient, self.codes, self.dates)


@dataclass(frozen=True, slots=True)
class ImagingSearch:
    patient: PatientCriterion | None
    started: DateFilter
    modalities: frozenset[str] | None
    study_uids: tuple[str, ...] | None
    paging: Paging

    def digest(self) -> bytes:
        return _digest(
            "ImagingStudy",
            self.patient,
            self.started,
            sorted(self.modalities) if self.modalities is not None else None,
            self.study_uids,
        )


@dataclass(frozen=True, slots=True)
class DeviceSearch:
    identifiers: tuple[Token, ...]
    paging: Paging

    def digest(self) -> bytes:
        return _digest("Device", self.identifiers)


@dataclass(frozen=True, slots=True)
class AuditSearch:
    patient: PatientCriterion | None
    dates: DateFilter
    agents: tuple[str, ...] | None
    paging: Paging

    def digest(self) -> bytes:
        return _digest("AuditEvent", self.patient, self.dates, self.agents)


def _digest(*criteria: object) -> bytes:
    return hashlib.sha256(repr(criteria).encode("utf-8", "backslashreplace")).digest()


def collect(
    params: Sequence[tuple[str, str]],
    allowed: frozenset[str],
    repeatable: frozenset[str] = frozenset(),
    *,
    strict: bool = False,
) -> dict[str, list[str]]:
    """Parameters by name. Unknown names are ignored (lenient handling) unless `strict`."""
    found: dict[str, list[str]] = {}
    for name, value in params:
        if name == "_format":
            if value not in _IGNORED_FORMATS:
                raise SearchParameterError(name, "only JSON is supported")
            continue
        if name not in allowed:
            if strict:
                raise SearchParameterError(_safe_name(name), "not a supported search parameter")
            continue
        values = found.setdefault(name, [])
        if values and name not in repeatable:
            raise SearchParameterError(_safe_name(name), "given more than once")
        values.append(value)
    return found


def _safe_name(name: str) -> str:
    """A parameter name fit to show back: short and printable."""
    cleaned = "".join(c if c.isprintable() else "?" for c in name[:40])
    return cleaned or "?"


def _one(found: dict[str, list[str]], name: str) -> str | None:
    values = found.get(name)
    return values[0] if values else None


def _paging(found: dict[str, list[str]], default_count: int, max_count: int) -> Paging:
    count = _one(found, "_count")
    summary = _one(found, "_summary")
    return Paging(
        count=parse_count("_count", count, max_count) if count is not None else default_count,
        summary_count=parse_summary("_summary", summary) if summary is not None else False,
        cursor=_one(found, CURSOR_PARAMETER),
    )


def _patient_criterion(found: dict[str, list[str]], *, required: bool) -> PatientCriterion | None:
    given = [
        name
        for name in ("patient", "patient:identifier", "subject", "subject:identifier")
        if name in found
    ]
    if not given:
        if required:
            raise SearchParameterError("patient", "patient or patient:identifier is required")
        return None
    if len(given) > 1:
        raise SearchParameterError(given[1], f"give one of patient or subject, not {given[0]} too")
    name = given[0]
    value = found[name][0]
    if name.endswith(":identifier"):
        return PatientCriterion(None, parse_identifiers(name, value))
    return PatientCriterion(parse_patient_references(name, value), None)


def parse_sort(parameter: str, raw: str) -> bool:
    """`_sort`: True for `-date` (newest first), False for `date`."""
    if raw == "date":
        return False
    if raw == "-date":
        return True
    raise SearchParameterError(parameter, "only 'date' and '-date' are supported")


_ELEMENT = re.compile(r"[a-z][A-Za-z0-9]{0,63}(\[x\])?", re.ASCII)


def parse_elements(parameter: str, raw: str) -> tuple[str, ...]:
    """`_elements`: top-level element names, comma-separated."""
    names = []
    for value in _alternatives(parameter, raw):
        value = value.strip()
        if not _ELEMENT.fullmatch(value):
            raise SearchParameterError(parameter, "expected element names separated by commas")
        names.append(value)
    return tuple(names)


def parse_names(parameter: str, raw: str) -> tuple[str, ...]:
    """`name`: prefixes of any part of a name, comma = OR."""
    values = tuple(_unescape(v).strip() for v in _alternatives(parameter, raw))
    if any(not v for v in values):
        raise SearchParameterError(parameter, "empty value")
    return values


def parse_genders(parameter: str, raw: str) -> frozenset[str]:
    found = set()
    for token in (parse_token(parameter, value) for value in _alternatives(parameter, raw)):
        if token.system not in (None, "http://hl7.org/fhir/administrative-gender"):
            raise SearchParameterError(parameter, "unknown gender system")
        if token.code not in GENDERS:
            raise SearchParameterError(parameter, "expected male, female, other or unknown")
        found.add(token.code)
    return frozenset(found)


def parse_ids(parameter: str, raw: str) -> tuple[int, ...]:
    """`_id` of a Patient: numeric ids, comma = OR."""
    ids = []
    for value in _alternatives(parameter, raw):
        if not _NUMERIC_ID.fullmatch(value) or int(value) == 0:
            raise SearchParameterError(parameter, "expected a numeric id")
        ids.append(int(value))
    return tuple(ids)


def parse_max(parameter: str, raw: str) -> int:
    """`max` of `$lastn`: 1 to MAX_LASTN."""
    _check_text(parameter, raw)
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LASTN:
        raise SearchParameterError(parameter, f"expected an integer from 1 to {MAX_LASTN}")
    return int(raw)


_MODALITY = re.compile(r"[A-Z0-9]{1,16}", re.ASCII)
_DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*", re.ASCII)


def parse_modalities(parameter: str, raw: str) -> frozenset[str]:
    found = set()
    for token in (parse_token(parameter, value) for value in _alternatives(parameter, raw)):
        if token.system not in (None, "http://dicom.nema.org/resources/ontology/DCM"):
            raise SearchParameterError(parameter, "unknown modality system")
        if token.code is None or not _MODALITY.fullmatch(token.code):
            raise SearchParameterError(parameter, "expected a DICOM modality code (CT, MR...)")
        found.add(token.code)
    return frozenset(found)


def parse_study_uids(parameter: str, raw: str) -> tuple[str, ...]:
    """`identifier` of an ImagingStudy: `urn:dicom:uid|urn:oid:<UID>` or a bare UID."""
    uids = []
    for token in (parse_identifier(parameter, value) for value in _alternatives(parameter, raw)):
        if token.system not in (None, "urn:dicom:uid"):
            raise SearchParameterError(parameter, "studies are identified in urn:dicom:uid")
        assert token.code is not None  # noqa: S101 - parse_identifier requires a value
        uid = token.code.removeprefix("urn:oid:")
        if len(uid) > 64 or not _DICOM_UID.fullmatch(uid):
            raise SearchParameterError(parameter, "expected urn:oid:<DICOM UID>")
        uids.append(uid)
    return tuple(uids)


def _elements(found: dict[str, list[str]]) -> tuple[str, ...] | None:
    raw = _one(found, "_elements")
    return parse_elements("_elements", raw) if raw is not None else None


def parse_observation_search(
    params: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool = False,
) -> ObservationSearch:
    """`GET /fhir/Observation` parameters; a patient (by reference or identifier) is required."""
    found = collect(params, OBSERVATION_PARAMETERS, frozenset({"date"}), strict=strict)
    patient = _patient_criterion(found, required=True)
    assert patient is not None  # noqa: S101 - required
    code = _one(found, "code")
    category = _one(found, "category")
    sort = _one(found, "_sort")
    return ObservationSearch(
        patient=patient,
        codes=parse_tokens("code", code) if code is not None else None,
        categories=parse_categories("category", category) if category is not None else None,
        dates=parse_date_filter("date", found.get("date", [])),
        descending=parse_sort("_sort", sort) if sort is not None else False,
        elements=_elements(found),
        paging=_paging(found, default_count, max_count),
    )


def parse_lastn_search(params: Sequence[tuple[str, str]], *, strict: bool = False) -> LastnSearch:
    """`GET /fhir/Observation/$lastn` parameters; `max` defaults to 1."""
    found = collect(params, LASTN_PARAMETERS, strict=strict)
    patient = _patient_criterion(found, required=True)
    assert patient is not None  # noqa: S101 - required
    code = _one(found, "code")
    category = _one(found, "category")
    most = _one(found, "max")
    return LastnSearch(
        patient=patient,
        codes=parse_tokens("code", code) if code is not None else None,
        categories=parse_categories("category", category) if category is not None else None,
        max=parse_max("max", most) if most is not None else 1,
        elements=_elements(found),
    )


def parse_patient_search(
    params: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool = False,
) -> PatientSearch:
    """`GET /fhir/Patient` parameters; at least one of identifier, name, birthdate, _id."""
    found = collect(params, PATIENT_PARAMETERS, frozenset({"birthdate"}), strict=strict)
    if not any(name in found for name in ("identifier", "name", "birthdate", "_id")):
        raise SearchParameterError(
            "identifier", "give identifier, name, birthdate or _id (gender alone is too wide)"
        )
    identifier = _one(found, "identifier")
    name = _one(found, "name")
    gender = _one(found, "gender")
    ids = _one(found, "_id")
    return PatientSearch(
        identifiers=parse_identifiers("identifier", identifier) if identifier is not None else None,
        names=parse_names("name", name) if name is not None else None,
        birthdate=(
            parse_date_filter("birthdate", found["birthdate"]) if "birthdate" in found else None
        ),
        genders=parse_genders("gender", gender) if gender is not None else None,
        ids=parse_ids("_id", ids) if ids is not None else None,
        paging=_paging(found, default_count, max_count),
    )


def parse_report_search(
    params: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool = False,
) -> ReportSearch:
    """`GET /fhir/DiagnosticReport`: a patient (by reference or identifier) is required."""
    found = collect(params, REPORT_PARAMETERS, frozenset({"date"}), strict=strict)
    patient = _patient_criterion(found, required=True)
    assert patient is not None  # noqa: S101 - required
    code = _one(found, "code")
    return ReportSearch(
        patient=patient,
        codes=parse_tokens("code", code) if code is not None else None,
        dates=parse_date_filter("date", found.get("date", [])),
        paging=_paging(found, default_count, max_count),
    )


def parse_imaging_search(
    params: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool = False,
) -> ImagingSearch:
    """`GET /fhir/ImagingStudy`: a patient or a study identifier is required."""
    found = collect(params, IMAGING_PARAMETERS, frozenset({"started"}), strict=strict)
    patient = _patient_criterion(found, required=False)
    identifier = _one(found, "identifier")
    if patient is None and identifier is None:
        raise SearchParameterError("patient", "patient or identifier is required")
    modality = _one(found, "modality")
    return ImagingSearch(
        patient=patient,
        started=parse_date_filter("started", found.get("started", [])),
        modalities=parse_modalities("modality", modality) if modality is not None else None,
        study_uids=parse_study_uids("identifier", identifier) if identifier is not None else None,
        paging=_paging(found, default_count, max_count),
    )


def parse_device_search(
    params: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool = False,
) -> DeviceSearch:
    found = collect(params, DEVICE_PARAMETERS, strict=strict)
    identifier = _one(found, "identifier")
    if identifier is None:
        raise SearchParameterError("identifier", "identifier is required")
    return DeviceSearch(
        identifiers=parse_identifiers("identifier", identifier),
        paging=_paging(found, default_count, max_count),
    )


def parse_audit_search(
    params: Sequence[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    strict: bool = False,
) -> AuditSearch:
    """`GET /fhir/AuditEvent`: by patient, date, agent (token name), any of them."""
    found = collect(params, AUDIT_PARAMETERS, frozenset({"date"}), strict=strict)
    patient = _patient_criterion(found, required=False)
    agent = _one(found, "agent")
    agents = None
    if agent is not None:
        agents = tuple(_unescape(v) for v in _alternatives("agent", agent))
        if any(not a for a in agents):
            raise SearchParameterError("agent", "empty value")
    return AuditSearch(
        patient=patient,
        dates=parse_date_filter("date", found.get("date", [])),
        agents=agents,
        paging=_paging(found, default_count, max_count),
    )
