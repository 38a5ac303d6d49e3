"""Rows to FHIR R4 JSON resources: Patient from `PatientRecord`, Observation from `VitalRecord`.

Pure functions building plain JSON objects; text (Arabic and French names, identifiers) is
passed through untouched. Displays and categories come from `ingest.codes`, the one code table.
"""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, datetime
from typing import Final

from gateway.fhir_identifiers import system_uri
from gateway.fhir_outcome import JsonObject
from gateway.fhir_search import OBSERVATION_CATEGORY_SYSTEM
from ingest.codes import UCUM_SYSTEM, category_for, display_for
from storage.queries import (
    DeviceRecord,
    LabObservationRecord,
    LabReportRecord,
    PatientRecord,
    PersonName,
    VitalRecord,
)

VITAL_ID_PREFIX: Final = "v-"
DEVICE_ID_PREFIX: Final = "d-"
DEVICE_REFERENCE_PREFIX: Final = f"Device/{DEVICE_ID_PREFIX}"
_VITAL_ID = re.compile(r"v-([0-9]{1,18})", re.ASCII)
_PATIENT_ID = re.compile(r"[0-9]{1,18}", re.ASCII)
_CATEGORY_DISPLAY: Final = {"vital-signs": "Vital Signs", "laboratory": "Laboratory"}
_NAME_USES: Final = frozenset(
    {"usual", "official", "temp", "nickname", "anonymous", "old", "maiden"}
)


def instant(value: datetime) -> str:
    """An RFC 3339 instant in UTC (`...Z`), microseconds when present."""
    if value.tzinfo is not UTC:  # asyncpg's timestamptz values are in UTC already
        value = value.astimezone(UTC)
    return value.isoformat().replace("+00:00", "Z")


def observation_id(vital_id: int) -> str:
    return f"{VITAL_ID_PREFIX}{vital_id}"


def parse_observation_id(text: str) -> int | None:
    """The vital id behind an Observation id `v-<n>`, or None when it is not one of ours."""
    match = _VITAL_ID.fullmatch(text)
    return int(match.group(1)) if match else None


def parse_patient_id(text: str) -> int | None:
    """The numeric patient id behind a Patient id, or None when it is not one of ours."""
    return int(text) if _PATIENT_ID.fullmatch(text) else None


def _name(name: PersonName) -> JsonObject:
    result: JsonObject = {}
    if name.use in _NAME_USES:
        result["use"] = name.use
    if name.text:
        result["text"] = name.text
    if name.family:
        result["family"] = name.family
    if name.given:
        result["given"] = list(name.given)
    if name.prefix:
        result["prefix"] = list(name.prefix)
    if name.suffix:
        result["suffix"] = list(name.suffix)
    return result


def patient_resource(record: PatientRecord) -> JsonObject:
    resource: JsonObject = {"resourceType": "Patient", "id": str(record.id)}
    if record.identifiers:
        resource["identifier"] = [
            {"system": system_uri(i.system), "value": i.value} for i in record.identifiers
        ]
    if record.replaced_by is not None:
        resource["active"] = False
    if record.names:
        resource["name"] = [_name(n) for n in record.names]
    if record.gender:
        resource["gender"] = record.gender
    if record.birth_date is not None:
        resource["birthDate"] = record.birth_date.isoformat()
    links = []
    if record.replaced_by is not None:
        links.append(
            {"other": {"reference": f"Patient/{record.replaced_by}"}, "type": "replaced-by"}
        )
    links.extend(
        {"other": {"reference": f"Patient/{merged}"}, "type": "replaces"}
        for merged in record.replaces
    )
    if links:
        resource["link"] = links
    return resource


@functools.lru_cache(maxsize=1024)
def _vital_concept(system: str, code: str) -> tuple[list[JsonObject], JsonObject]:
    """The `category` and `code` elements of a vital's concept: built once per concept (a page
    of 50 Observations has a handful), shared by the resources; nothing mutates them."""
    category = category_for(code)
    coding: JsonObject = {"system": system, "code": code}
    display = display_for(code)
    if display:
        coding["display"] = display
    categories: list[JsonObject] = [
        {
            "coding": [
                {
                    "system": OBSERVATION_CATEGORY_SYSTEM,
                    "code": str(category),
                    "display": _CATEGORY_DISPLAY.get(category, str(category)),
                }
            ]
        }
    ]
    return categories, {"coding": [coding]}


_VALUE_ERROR: Final[JsonObject] = {
    "coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "error"}
    ]
}


def observation_resource(record: VitalRecord) -> JsonObject:
    categories, code = _vital_concept(record.system, record.code)
    resource: JsonObject = {
        "resourceType": "Observation",
        "id": f"{VITAL_ID_PREFIX}{record.id}",
        "status": "final",
        "category": categories,
        "code": code,
        "subject": {"reference": f"Patient/{record.subject_id}"},
        "effectiveDateTime": instant(record.time),
        "issued": instant(record.received_at),
    }
    if math.isfinite(record.value):
        if record.unit:
            resource["valueQuantity"] = {
                "value": record.value,
                "unit": record.unit,
                "system": UCUM_SYSTEM,
                "code": record.unit,
            }
        else:
            resource["valueQuantity"] = {"value": record.value}
    else:
        resource["dataAbsentReason"] = _VALUE_ERROR
    resource["device"] = {
        "reference": f"{DEVICE_REFERENCE_PREFIX}{record.device_id}",
        "display": f"{record.device_kind} {record.device_ident}",
    }
    return resource


# --- lab results (HL7 ORU) --------------------------------------------------------------------

LAB_OBSERVATION_ID_PREFIX: Final = "l-"
LAB_REPORT_ID_PREFIX: Final = "r-"
_LAB_OBSERVATION_ID = re.compile(r"l-([0-9]{1,18})", re.ASCII)
_LAB_REPORT_ID = re.compile(r"r-([0-9]{1,18})", re.ASCII)
INTERPRETATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_DIAGNOSTIC_SERVICE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"
_LOCAL_CODE_SYSTEM_PREFIX: Final = "urn:qantara:cs:"
# HL7 v2 table 0085 (OBX-11) and 0123 (OBR-25) → FHIR status.
_OBSERVATION_STATUS: Final = {
    "F": "final",
    "C": "corrected",
    "P": "preliminary",
    "R": "registered",
    "I": "registered",
    "S": "preliminary",
    "X": "cancelled",
    "D": "entered-in-error",
    "W": "entered-in-error",
    "U": "final",
}
_REPORT_STATUS: Final = {
    "F": "final",
    "C": "corrected",
    "P": "preliminary",
    "R": "partial",
    "S": "partial",
    "A": "partial",
    "I": "registered",
    "O": "registered",
    "X": "cancelled",
}
# HL7 v2 table 0078 (OBX-8) flags that are also v3 ObservationInterpretation codes.
_INTERPRETATIONS: Final = frozenset(
    {"L", "H", "LL", "HH", "N", "A", "AA", "<", ">", "S", "R", "I", "U", "D", "B", "W"}
)
_COMPARATORS: Final = frozenset({"<", "<=", ">=", ">"})


def lab_observation_id(observation_id: int) -> str:
    return f"{LAB_OBSERVATION_ID_PREFIX}{observation_id}"


def parse_lab_observation_id(text: str) -> int | None:
    """The lab observation id behind an Observation id `l-<n>`, or None."""
    match = _LAB_OBSERVATION_ID.fullmatch(text)
    return int(match.group(1)) if match else None


def lab_report_id(report_id: int) -> str:
    return f"{LAB_REPORT_ID_PREFIX}{report_id}"


def parse_lab_report_id(text: str) -> int | None:
    """The report id behind a DiagnosticReport id `r-<n>`, or None."""
    match = _LAB_REPORT_ID.fullmatch(text)
    return int(match.group(1)) if match else None


def _code_system(system: str) -> str:
    """A FHIR coding system: URIs as stored, HL7 short names (`L`, `99LAB`) as a Qantara URN."""
    return system if ":" in system else _LOCAL_CODE_SYSTEM_PREFIX + system


def _codeable(system: str | None, code: str | None, display: str | None) -> JsonObject:
    coding: JsonObject = {}
    if system:
        coding["system"] = _code_system(system)
    if code:
        coding["code"] = code
    if display:
        coding["display"] = display
    concept: JsonObject = {"coding": [coding]} if code else {}
    if display:
        concept["text"] = display
    return concept


def _quantity(value: float, unit: str) -> JsonObject:
    quantity: JsonObject = {"value": value}
    if unit:
        quantity.update({"unit": unit, "system": UCUM_SYSTEM, "code": unit})
    return quantity


def lab_observation_resource(record: LabObservationRecord) -> JsonObject:
    resource: JsonObject = {
        "resourceType": "Observation",
        "id": lab_observation_id(record.id),
        "status": _OBSERVATION_STATUS.get(record.status.upper(), "unknown"),
        "category": [
            {
                "coding": [
                    {
                        "system": OBSERVATION_CATEGORY_SYSTEM,
                        "code": "laboratory",
                        "display": "Laboratory",
                    }
                ]
            }
        ],
        "code": _codeable(record.code_system, record.code, record.code_display),
        "subject": {"reference": f"Patient/{record.subject_id}"},
        "effectiveDateTime": instant(record.observed_at),
        "issued": instant(record.received_at),
        "derivedFrom": [{"reference": f"DiagnosticReport/{lab_report_id(record.report_id)}"}],
    }
    if record.value_numeric is not None and math.isfinite(record.value_numeric):
        quantity = _quantity(record.value_numeric, record.unit)
        if record.comparator in _COMPARATORS:
            quantity["comparator"] = record.comparator
        if record.value_text:  # a ratio or range (SN): the quantity is its first number
            resource["valueString"] = record.value_text
        else:
            resource["valueQuantity"] = quantity
    elif record.value_code or record.value_display:
        resource["valueCodeableConcept"] = _codeable(
            record.value_code_system, record.value_code, record.value_display
        )
    elif record.value_text:
        resource["valueString"] = record.value_text
    else:
        resource["dataAbsentReason"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                    "code": "unknown",
                }
            ]
        }
    flags = [f for f in record.abnormal_flags if f.upper() in _INTERPRETATIONS]
    if flags:
        resource["interpretation"] = [
            {"coding": [{"system": INTERPRETATION_SYSTEM, "code": f.upper()}]} for f in flags
        ]
    reference: JsonObject = {}
    if record.reference_low is not None and math.isfinite(record.reference_low):
        reference["low"] = _quantity(record.reference_low, record.unit)
    if record.reference_high is not None and math.isfinite(record.reference_high):
        reference["high"] = _quantity(record.reference_high, record.unit)
    if record.reference_range:
        reference["text"] = record.reference_range
    if reference:
        resource["referenceRange"] = [reference]
    return resource


def diagnostic_report_resource(record: LabReportRecord) -> JsonObject:
    resource: JsonObject = {
        "resourceType": "DiagnosticReport",
        "id": lab_report_id(record.id),
        "status": _REPORT_STATUS.get(record.status.upper(), "unknown"),
        "category": [
            {
                "coding": [
                    {
                        "system": _DIAGNOSTIC_SERVICE_SYSTEM,
                        "code": "LAB",
                        "display": "Laboratory",
                    }
                ]
            }
        ],
        "code": _codeable(record.service_system, record.service_code, record.service_display)
        or {"text": "laboratory report"},
        "subject": {"reference": f"Patient/{record.subject_id}"},
        "issued": instant(record.issued_at or record.received_at),
    }
    identifiers = []
    if record.placer_id:
        identifiers.append({"type": {"text": "placer"}, "value": record.placer_id})
    if record.filler_id:
        identifiers.append({"type": {"text": "filler"}, "value": record.filler_id})
    if identifiers:
        resource["identifier"] = identifiers
    if record.observed_at is not None:
        resource["effectiveDateTime"] = instant(record.observed_at)
    if record.result_ids:
        resource["result"] = [
            {"reference": f"Observation/{lab_observation_id(i)}"} for i in record.result_ids
        ]
    return resource


UNIT_SYSTEM_PREFIX: Final = "urn:qantara:unit:"
_DEVICE_ID = re.compile(r"d-([0-9]{1,18})", re.ASCII)


def parse_device_id(text: str) -> int | None:
    """The device id behind a Device id `d-<n>`, or None when it is not one of ours."""
    match = _DEVICE_ID.fullmatch(text)
    return int(match.group(1)) if match else None


def device_resource(record: DeviceRecord) -> JsonObject:
    """A unit's device: identified by its id within the unit (`urn:qantara:unit:<unit>`)."""
    return {
        "resourceType": "Device",
        "id": f"{DEVICE_ID_PREFIX}{record.id}",
        "identifier": [{"system": UNIT_SYSTEM_PREFIX + record.unit, "value": record.ident}],
        "status": "active",
        "deviceName": [{"name": record.ident, "type": "user-friendly-name"}],
        "type": {"text": record.kind},
    }
