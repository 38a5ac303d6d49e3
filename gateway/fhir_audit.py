"""Audit rows as FHIR R4 `AuditEvent` resources, and the query shape an audit row records.

One AuditEvent per row: type `rest` with the interaction as subtype, action `R` for a read and `E`
for a search or operation, the token's name as the requesting agent (`agent.who.display`), each
patient whose data was returned as an entity (`what` = `Patient/{id}`, role patient), and the
query's shape (parameter names, never values) as a query entity. A row of the DICOM listener,
written before the first instance or match goes, has a DICOM type: "Begin Transferring DICOM
Instances" (DCM 110102) for a C-GET or C-MOVE, "Query" (DCM 110112) for a C-FIND, and the row of
a C-GET's or C-MOVE's end "DICOM Instances Transferred" (DCM 110104), action `E` as IHE ATNA has
them; the calling AE title is the agent, the DICOM status in `outcomeDesc`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Final

from gateway.fhir_outcome import JsonObject
from gateway.fhir_resources import instant
from storage.audit import AuditRecord

AUDIT_ID_PREFIX: Final = "a-"
_DATE_PREFIXES: Final = frozenset({"eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"})
_DATE_PARAMETERS: Final = frozenset({"date", "birthdate", "started"})
_ACTION: Final = {"read": "R", "search-type": "E", "operation": "E"}
_OUTCOME_TEXT: Final = {"0": "success", "4": "refused", "8": "failed", "12": "failed"}
_REST: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "RESTful Operation",
}
_DICOM_TRANSFER: Final = {
    "system": "http://dicom.nema.org/resources/ontology/DCM",
    "code": "110102",
    "display": "Begin Transferring DICOM Instances",
}
_DICOM_TYPES: Final = {
    "read": _DICOM_TRANSFER,  # C-GET, C-MOVE
    "search-type": {  # C-FIND
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110112",
        "display": "Query",
    },
    "transferred": {  # the end of a C-GET or C-MOVE
        "system": "http://dicom.nema.org/resources/ontology/DCM",
        "code": "110104",
        "display": "DICOM Instances Transferred",
    },
}
_DICOM_OUTCOME_TEXT: Final = {
    "0": "success",
    "4": "minor failure",
    "8": "serious failure",
    "12": "major failure",
}


def query_shape(method: str, route: str, params: Sequence[tuple[str, str]]) -> str:
    """`GET /fhir/Observation?patient&date=ge&date=lt`: names (and date prefixes), no values."""
    names = []
    for name, value in params:
        safe = "".join(
            c if c.isascii() and c.isprintable() and c not in "&=?" else "?" for c in name[:40]
        )
        if name in _DATE_PARAMETERS and value[:2] in _DATE_PREFIXES:
            safe += "=" + value[:2]
        names.append(safe)
    return f"{method} {route}" + ("?" + "&".join(names) if names else "")


def audit_event_resource(record: AuditRecord) -> JsonObject:
    entities: list[JsonObject] = [
        {
            "what": {"reference": f"Patient/{patient_id}"},
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                "code": "1",
                "display": "Person",
            },
            "role": {
                "system": "http://terminology.hl7.org/CodeSystem/object-role",
                "code": "1",
                "display": "Patient",
            },
        }
        for patient_id in record.patient_ids
    ]
    entities.append(
        {
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                "code": "2",
                "display": "System Object",
            },
            "role": {
                "system": "http://terminology.hl7.org/CodeSystem/object-role",
                "code": "24",
                "display": "Query",
            },
            "name": record.resource_type,
            "description": record.query_shape,
            "query": base64.b64encode(record.query_shape.encode("utf-8")).decode("ascii"),
        }
    )
    outcome_text = _OUTCOME_TEXT.get(record.outcome, "failed")
    kind: JsonObject
    if record.protocol == "dicom":
        kind = {"type": _DICOM_TYPES.get(record.action, _DICOM_TRANSFER), "action": "E"}
        dicom_text = _DICOM_OUTCOME_TEXT.get(record.outcome, "failed")
        outcome = f"DICOM 0x{record.status:04X} ({dicom_text})"
    else:
        kind = {
            "type": _REST,
            "subtype": [
                {"system": "http://hl7.org/fhir/restful-interaction", "code": record.action}
            ],
            "action": _ACTION.get(record.action, "E"),
        }
        outcome = f"HTTP {record.status} ({outcome_text})"
    return {
        "resourceType": "AuditEvent",
        "id": f"{AUDIT_ID_PREFIX}{record.id}",
        **kind,
        "recorded": instant(record.recorded_at),
        "outcome": record.outcome,
        "outcomeDesc": outcome,
        "agent": [
            {
                "who": {"display": record.token_name},
                "requestor": True,
            }
        ],
        "source": {"observer": {"display": "qantara"}},
        "entity": entities,
    }
