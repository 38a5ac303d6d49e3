"""`GET /fhir/ImagingStudy?patient=`: the DICOM index as FHIR R4 ImagingStudy resources.

One resource per study: its Study Instance UID as identifier (`urn:dicom:uid`), the patient, the
start (an instant when the header gave a UTC offset, else the study date), modalities, series with
their instance counts. Keyset paging on the study id with the shared cursor format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import Interaction, authenticate, authorize
from gateway.fhir_bundle import page_url, searchset
from gateway.fhir_outcome import JsonObject
from gateway.fhir_paging import CursorPosition, decode_cursor, encode_cursor
from gateway.fhir_search import (
    CURSOR_PARAMETER,
    SearchParameterError,
    parse_count,
    parse_patient_references,
    parse_summary,
)
from storage.dicom_queries import (
    ImagingStudyRecord,
    count_imaging_studies,
    search_imaging_studies,
)
from storage.queries import patient_group

DICOM_MODALITY_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"
_PARAMETERS: Final = frozenset({"patient", "_count", "_summary", CURSOR_PARAMETER, "_format"})


class _FhirJson(Response):
    media_type = "application/fhir+json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def imaging_study_resource(record: ImagingStudyRecord) -> JsonObject:
    resource: JsonObject = {
        "resourceType": "ImagingStudy",
        "id": f"s-{record.id}",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{record.study_uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{record.subject_id}"},
        "numberOfSeries": len(record.series),
        "numberOfInstances": record.instances,
    }
    if record.modalities:
        resource["modality"] = [
            {"system": DICOM_MODALITY_SYSTEM, "code": m} for m in record.modalities
        ]
    if record.started is not None:
        resource["started"] = record.started.isoformat().replace("+00:00", "Z")
    elif record.study_date is not None:
        resource["started"] = record.study_date.isoformat()
    if record.description:
        resource["description"] = record.description
    series = []
    for s in record.series:
        entry: JsonObject = {"uid": s.uid, "numberOfInstances": s.instances}
        if s.number is not None:
            entry["number"] = s.number
        if s.modality:
            entry["modality"] = {"system": DICOM_MODALITY_SYSTEM, "code": s.modality}
        if s.description:
            entry["description"] = s.description
        if s.body_part:
            entry["bodySite"] = {"display": s.body_part}
        series.append(entry)
    if series:
        resource["series"] = series
    return resource


def imaging_study_endpoint(
    pool: asyncpg.Pool, *, default_count: int, max_count: int, base_url: str | None
) -> Callable[[Request], Awaitable[Response]]:
    async def search(request: Request) -> Response:
        grant = await authenticate(pool, request.headers.get("authorization"))
        authorize(grant, "ImagingStudy", Interaction.SEARCH)
        params = request.query_params.multi_items()
        found: dict[str, str] = {}
        for name, value in params:
            if name not in _PARAMETERS:
                raise SearchParameterError(name[:40], "not a supported search parameter")
            if name in found:
                raise SearchParameterError(name, "given more than once")
            found[name] = value
        if "patient" not in found:
            raise SearchParameterError("patient", "patient is required")
        patients = parse_patient_references("patient", found["patient"])
        count = (
            parse_count("_count", found["_count"], max_count)
            if "_count" in found
            else default_count
        )
        summary = parse_summary("_summary", found["_summary"]) if "_summary" in found else False
        digest = hashlib.sha256(repr(("ImagingStudy", patients)).encode()).digest()
        cursor = found.get(CURSOR_PARAMETER)
        after = decode_cursor(cursor, digest, timed=False) if cursor is not None else None
        group = await patient_group(pool, patients)
        base = (base_url or str(request.base_url)).rstrip("/") + "/fhir"
        self_url = page_url(f"{base}/ImagingStudy", params, cursor)
        total = await count_imaging_studies(pool, group)
        if summary or count == 0:
            return _FhirJson(_bundle([], base, total, self_url, None))
        rows = await search_imaging_studies(pool, group, after.id if after else None, count + 1)
        page = rows[:count]
        next_url = None
        if len(rows) > count:
            token = encode_cursor(digest, CursorPosition(None, page[-1].id))
            next_url = page_url(f"{base}/ImagingStudy", params, token)
        resources = [imaging_study_resource(r) for r in page]
        return _FhirJson(_bundle(resources, base, total, self_url, next_url))

    return search


def _bundle(
    resources: Sequence[JsonObject], base: str, total: int, self_url: str, next_url: str | None
) -> JsonObject:
    return searchset(
        resources=resources, resource_base=base, total=total, self_url=self_url, next_url=next_url
    )
