"""Rows to FHIR R4 JSON resources: Patient from `PatientRecord`, Observation from `VitalRecord`.

Pure functions building plain JSON objects; text (Arabic and French names, identifiers) is
passed through untouched. Displays and categories come from `ingest.codes`, the one code table.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Final

from gateway.fhir_identifiers import system_uri
from gateway.fhir_outcome import JsonObject
from gateway.fhir_search import OBSERVATION_CATEGORY_SYSTEM
from ingest.codes import UCUM_SYSTEM, category_for, display_for
from storage.queries import PatientRecord, PersonName, VitalRecord

VITAL_ID_PREFIX: Final = "v-"
_VITAL_ID = re.compile(r"v-([0-9]{1,18})", re.ASCII)
_PATIENT_ID = re.compile(r"[0-9]{1,18}", re.ASCII)
_CATEGORY_DISPLAY: Final = {"vital-signs": "Vital Signs", "laboratory": "Laboratory"}
_NAME_USES: Final = frozenset(
    {"usual", "official", "temp", "nickname", "anonymous", "old", "maiden"}
)


def instant(value: datetime) -> str:
    """An RFC 3339 instant in UTC (`...Z`), microseconds when present."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


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


def observation_resource(record: VitalRecord) -> JsonObject:
    category = category_for(record.code)
    coding: JsonObject = {"system": record.system, "code": record.code}
    display = display_for(record.code)
    if display:
        coding["display"] = display
    resource: JsonObject = {
        "resourceType": "Observation",
        "id": observation_id(record.id),
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": OBSERVATION_CATEGORY_SYSTEM,
                        "code": str(category),
                        "display": _CATEGORY_DISPLAY.get(category, str(category)),
                    }
                ]
            }
        ],
        "code": {"coding": [coding]},
        "subject": {"reference": f"Patient/{record.subject_id}"},
        "effectiveDateTime": instant(record.time),
        "issued": instant(record.received_at),
    }
    if math.isfinite(record.value):
        quantity: JsonObject = {"value": record.value}
        if record.unit:
            quantity.update({"unit": record.unit, "system": UCUM_SYSTEM, "code": record.unit})
        resource["valueQuantity"] = quantity
    else:
        resource["dataAbsentReason"] = {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                    "code": "error",
                }
            ]
        }
    resource["device"] = {"display": f"{record.device_kind} {record.device_ident}"}
    return resource
