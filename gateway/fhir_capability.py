"""What the HTTP API serves, declared once: the FHIR CapabilityStatement and the OpenAPI document.

`RESOURCES` lists each resource type with its interactions and search parameters; `/fhir/metadata`
and `/openapi.json` are both built from it, so they cannot drift from each other. Tests check that
each declared parameter is accepted by the parser of its search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from gateway.fhir_outcome import JsonObject
from gateway.fhir_search import CURSOR_PARAMETER, MAX_LASTN

FHIR_VERSION: Final = "4.3.0"
SOFTWARE: Final = "Qantara"
PUBLISHED: Final = "2026-11-27"


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    type: str
    """FHIR search parameter type: token, reference, date, string, number, special."""
    documentation: str


@dataclass(frozen=True, slots=True)
class ResourceCapability:
    type: str
    read: bool
    params: tuple[SearchParam, ...]
    scope: str
    operations: tuple[str, ...] = ()


_PATIENT_REF = SearchParam("patient", "reference", "Patient/{id} or {id}; comma = OR")
_PATIENT_IDENT = SearchParam(
    "patient:identifier", "token", "the patient's identifier, [system|]value"
)
_SUBJECT = SearchParam("subject", "reference", "Patient/{id} (same as patient)")
_SUBJECT_IDENT = SearchParam("subject:identifier", "token", "same as patient:identifier")
_WHOSE = (_PATIENT_REF, _PATIENT_IDENT, _SUBJECT, _SUBJECT_IDENT)

RESOURCES: Final = (
    ResourceCapability(
        "Patient",
        read=True,
        scope="system/Patient.read",
        params=(
            SearchParam("identifier", "token", "[system|]value; CIN or its URI as system"),
            SearchParam("name", "string", "prefix of any part of a name; case and accents ignored"),
            SearchParam("birthdate", "date", "with prefixes eq ne gt lt ge le sa eb"),
            SearchParam("gender", "token", "male | female | other | unknown"),
            SearchParam("_id", "token", "patient ids; comma = OR"),
        ),
    ),
    ResourceCapability(
        "Observation",
        read=True,
        scope="system/Observation.read",
        operations=("lastn",),
        params=(
            *_WHOSE,
            SearchParam("code", "token", "[system|]code; comma = OR"),
            SearchParam("category", "token", "vital-signs | laboratory"),
            SearchParam("date", "date", "with prefixes eq ne gt lt ge le sa eb; repeatable"),
            SearchParam("_sort", "special", "date | -date"),
            SearchParam("_elements", "special", "top-level elements to return"),
        ),
    ),
    ResourceCapability(
        "DiagnosticReport",
        read=True,
        scope="system/DiagnosticReport.read",
        params=(
            *_WHOSE,
            SearchParam("code", "token", "the ordered service, [system|]code; comma = OR"),
            SearchParam("date", "date", "effective date, with prefixes; repeatable"),
        ),
    ),
    ResourceCapability(
        "ImagingStudy",
        read=False,
        scope="system/ImagingStudy.read",
        params=(
            *_WHOSE,
            SearchParam("started", "date", "with prefixes; repeatable"),
            SearchParam("modality", "token", "DICOM modality (CT, MR...); comma = OR"),
            SearchParam("identifier", "token", "urn:dicom:uid|urn:oid:<Study Instance UID>"),
        ),
    ),
    ResourceCapability(
        "Device",
        read=True,
        scope="system/Device.read",
        params=(SearchParam("identifier", "token", "[urn:qantara:unit:<unit>|]<device id>"),),
    ),
    ResourceCapability(
        "AuditEvent",
        read=False,
        scope="system/AuditEvent.read",
        params=(
            _PATIENT_REF,
            _PATIENT_IDENT,
            SearchParam("date", "date", "when recorded, with prefixes; repeatable"),
            SearchParam("agent", "string", "the token name (agent.who.display)"),
        ),
    ),
)

COMMON: Final = (
    SearchParam("_count", "number", "page size (default 50, at most 1000)"),
    SearchParam("_summary", "token", "count: the total only"),
    SearchParam(CURSOR_PARAMETER, "special", "opaque, signed; taken from a next link"),
)


def capability_statement(base: str) -> JsonObject:
    """The server's CapabilityStatement (FHIR R4)."""
    resources = []
    for r in RESOURCES:
        interactions = [{"code": "search-type"}]
        if r.read:
            interactions.insert(0, {"code": "read"})
        entry: JsonObject = {
            "type": r.type,
            "interaction": interactions,
            "searchParam": [
                {"name": p.name, "type": p.type, "documentation": p.documentation}
                for p in (*r.params, *COMMON)
            ],
        }
        if r.operations:
            entry["operation"] = [
                {
                    "name": op,
                    "definition": f"http://hl7.org/fhir/OperationDefinition/{r.type}-{op}",
                }
                for op in r.operations
            ]
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": PUBLISHED,
        "kind": "instance",
        "software": {"name": SOFTWARE},
        "implementation": {"description": "Qantara read API", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "description": "Bearer tokens with system/<Type>.read scopes",
                },
                "resource": resources,
            }
        ],
    }


# --- OpenAPI -----------------------------------------------------------------------------------

_FHIR_JSON: Final = "application/fhir+json"
_DICOM_JSON: Final = "application/dicom+json"
_ERRORS: Final = {
    "400": "bad parameter (an OperationOutcome naming it)",
    "401": "no, unknown or revoked token",
    "403": "the token lacks the scope",
    "503": "database unavailable",
}


def _schema(param: SearchParam) -> dict[str, Any]:
    if param.type == "number":
        return {"type": "integer", "minimum": 0}
    return {"type": "string"}


def _responses(ok: str, media: str = _FHIR_JSON) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": ok, "content": {media: {"schema": {}}}}}
    for status, text in _ERRORS.items():
        responses[status] = {
            "description": text,
            "content": {_FHIR_JSON: {"schema": {"$ref": "#/components/schemas/Outcome"}}},
        }
    return responses


def _query(params: tuple[SearchParam, ...]) -> list[dict[str, Any]]:
    return [
        {
            "name": p.name,
            "in": "query",
            "required": False,
            "description": p.documentation,
            "schema": _schema(p),
        }
        for p in params
    ]


_PREFER: Final = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "handling=strict: unknown parameters are a 400 (default: ignored)",
    "schema": {"type": "string"},
}

_DICOMWEB_QUERY: Final = (
    SearchParam("PatientID", "string", "(0010,0020)"),
    SearchParam("StudyDate", "string", "YYYYMMDD or a range YYYYMMDD-YYYYMMDD"),
    SearchParam("ModalitiesInStudy", "string", "a modality (CT, MR...)"),
    SearchParam("limit", "number", "at most this many results"),
    SearchParam("offset", "number", "skip this many results"),
)


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.0 description of the HTTP API."""
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {"summary": "the process is alive", "responses": {"200": {"description": "ok"}}}
        },
        "/readyz": {
            "get": {
                "summary": "database, listeners and broker are ready",
                "responses": {
                    "200": {"description": "ready"},
                    "503": {"description": "not ready"},
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text format"}},
            }
        },
        "/fhir/metadata": {
            "get": {
                "summary": "CapabilityStatement (no token needed)",
                "responses": {
                    "200": {
                        "description": "CapabilityStatement",
                        "content": {_FHIR_JSON: {"schema": {}}},
                    }
                },
            }
        },
    }
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    for r in RESOURCES:
        paths[f"/fhir/{r.type}"] = {
            "get": {
                "summary": f"search {r.type} ({r.scope})",
                "security": secured,
                "parameters": [*_query((*r.params, *COMMON)), _PREFER],
                "responses": _responses("a searchset Bundle"),
            }
        }
        if r.read:
            paths[f"/fhir/{r.type}/{{id}}"] = {
                "get": {
                    "summary": f"read a {r.type} ({r.scope})",
                    "security": secured,
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        **_responses(r.type),
                        "404": {"description": "no such resource"},
                    },
                }
            }
    observation = next(r for r in RESOURCES if r.type == "Observation")
    paths["/fhir/Observation/$lastn"] = {
        "get": {
            "summary": "the newest observations of each code (system/Observation.read)",
            "security": secured,
            "parameters": [
                *_query(
                    (
                        *observation.params[:6],
                        SearchParam("max", "number", f"1 to {MAX_LASTN} per code (default 1)"),
                    )
                ),
                _PREFER,
            ],
            "responses": _responses("a searchset Bundle"),
        }
    }
    paths["/dicomweb/studies"] = {
        "get": {
            "summary": "QIDO-RS: search studies (system/ImagingStudy.read)",
            "security": secured,
            "parameters": [*_query(_DICOMWEB_QUERY), _PREFER],
            "responses": _responses("DICOM JSON", _DICOM_JSON),
        }
    }
    uid = {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)*$", "maxLength": 64}
    levels = {
        "study": "/dicomweb/studies/{study}",
        "series": "/dicomweb/studies/{study}/series/{series}",
        "instance": "/dicomweb/studies/{study}/series/{series}/instances/{instance}",
    }
    paging = _query(_DICOMWEB_QUERY[3:])

    def uids(*names: str) -> list[dict[str, Any]]:
        return [{"name": n, "in": "path", "required": True, "schema": uid} for n in names]

    for path, summary, names, params, ok, media in (
        (
            levels["study"] + "/series",
            "QIDO-RS: the series of a study",
            ("study",),
            paging,
            "DICOM JSON",
            _DICOM_JSON,
        ),
        (
            levels["series"] + "/instances",
            "QIDO-RS: the instances of a series",
            ("study", "series"),
            paging,
            "DICOM JSON",
            _DICOM_JSON,
        ),
        (
            levels["instance"],
            "WADO-RS: the instance as stored (its transfer syntax)",
            ("study", "series", "instance"),
            [],
            "the Part 10 file",
            "multipart/related",
        ),
        (
            levels["instance"] + "/metadata",
            "WADO-RS: the instance's attributes",
            ("study", "series", "instance"),
            [],
            "DICOM JSON",
            _DICOM_JSON,
        ),
    ):
        paths[path] = {
            "get": {
                "summary": f"{summary} (system/ImagingStudy.read)",
                "security": secured,
                "parameters": [*uids(*names), *params],
                "responses": {
                    **_responses(ok, media),
                    "404": {"description": "unknown study, series or instance"},
                    "406": {"description": "a transfer syntax other than the stored one"},
                },
            }
        }
    paths["/openapi.json"] = {
        "get": {
            "summary": "this document",
            "responses": {"200": {"description": "OpenAPI 3.0"}},
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "Qantara HTTP API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Outcome": {
                    "type": "object",
                    "required": ["resourceType", "issue"],
                    "properties": {
                        "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
                        "issue": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
        },
    }
