"""DICOMweb over the DICOM index: QIDO-RS searches and WADO-RS retrieve, in the DICOM JSON model.

- `GET /dicomweb/studies?PatientID=&StudyDate=&ModalitiesInStudy=&StudyInstanceUID=&limit=&offset=`
- `GET /dicomweb/studies/{study}/series`, `.../series/{series}/instances`
- `GET /dicomweb/studies/{study}/series/{series}/instances/{instance}`: the stored Part 10 file
  (our File Meta group, then the data set bytes exactly as received) as
  `multipart/related; type="application/dicom"`, in the transfer syntax it was received in.
- `.../instances/{instance}/metadata`: the instance's attributes as DICOM JSON, bulk data (pixel
  data and other large binary values) as a `BulkDataURI` naming the instance.

The scope `system/ImagingStudy.read` grants all of it; every answer is audited with the patients
it concerned (`gateway.http` runs these handlers in its authenticate → answer → audit shell).
pydicom reads the stored file for metadata only; nothing here speaks DIMSE.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any, Final

from pydicom import dcmread
from pydicom.dataelem import DataElement
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gateway.fhir_outcome import FhirError, ResourceNotFound
from gateway.fhir_search import SearchParameterError, collect
from storage.queries import (
    Executor,
    QidoInstance,
    QidoSeries,
    QidoStudy,
    StudyQuery,
    qido_instances,
    qido_series,
    qido_studies,
)

DICOM_JSON: Final = "application/dicom+json"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
MAX_OFFSET: Final = 100_000
CHUNK: Final = 1 << 20
STUDY_PARAMETERS: Final = frozenset(
    {
        "PatientID",
        "StudyDate",
        "ModalitiesInStudy",
        "StudyInstanceUID",
        "limit",
        "offset",
        "includefield",
        "fuzzymatching",
    }
)
LIST_PARAMETERS: Final = frozenset({"limit", "offset", "includefield"})
_UID = re.compile(r"[0-9]+(\.[0-9]+){0,63}", re.ASCII)
_MODALITY = re.compile(r"[A-Z0-9]{1,16}", re.ASCII)
_DA = re.compile(r"[0-9]{8}", re.ASCII)

JsonDataset = dict[str, Any]


class NotAcceptable(FhirError):
    status = 406
    code = "not-supported"


# --- DICOM JSON model ------------------------------------------------------------------------


def _element(vr: str, *values: Any) -> dict[str, Any]:
    kept = [v for v in values if v not in (None, "")]
    return {"vr": vr, "Value": kept} if kept else {"vr": vr}


def _da(value: date | None) -> str | None:
    return value.strftime("%Y%m%d") if value is not None else None


def _person_name(text: str) -> dict[str, Any]:
    if not text:
        return {"vr": "PN"}
    groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), text.split("="), strict=False))
    return {"vr": "PN", "Value": [{k: v for k, v in groups.items() if v}]}


def study_json(study: QidoStudy, base: str) -> JsonDataset:
    time = study.study_time.strftime("%H%M%S") if study.study_time is not None else None
    return {
        "00080020": _element("DA", _da(study.study_date)),
        "00080030": _element("TM", time),
        "00080050": _element("SH", study.accession_number),
        "00080061": _element("CS", *study.modalities),
        "00081030": _element("LO", study.description),
        "00081190": _element("UR", f"{base}/studies/{study.study_uid}"),
        "00100010": _person_name(study.patient_name),
        "00100020": _element("LO", study.dicom_patient_id),
        "00100030": _element("DA", _da(study.patient_birth_date)),
        "00100040": _element("CS", study.patient_sex),
        "0020000D": _element("UI", study.study_uid),
        "00200010": _element("SH", study.study_id),
        "00201206": _element("IS", study.series),
        "00201208": _element("IS", study.instances),
    }


def series_json(series: QidoSeries, base: str) -> JsonDataset:
    return {
        "00080060": _element("CS", series.modality),
        "0008103E": _element("LO", series.description),
        "00081190": _element("UR", f"{base}/studies/{series.study_uid}/series/{series.series_uid}"),
        "0020000D": _element("UI", series.study_uid),
        "0020000E": _element("UI", series.series_uid),
        "00200011": _element("IS", series.number),
        "00201209": _element("IS", series.instances),
    }


def instance_json(instance: QidoInstance, base: str) -> JsonDataset:
    return {
        "00080016": _element("UI", instance.sop_class_uid),
        "00080018": _element("UI", instance.sop_instance_uid),
        "00081190": _element("UR", _instance_url(base, instance)),
        "00083002": _element("UI", instance.transfer_syntax),
        "0020000D": _element("UI", instance.study_uid),
        "0020000E": _element("UI", instance.series_uid),
        "00200013": _element("IS", instance.number),
    }


def _instance_url(base: str, instance: QidoInstance) -> str:
    return (
        f"{base}/studies/{instance.study_uid}/series/{instance.series_uid}"
        f"/instances/{instance.sop_instance_uid}"
    )


# --- parameters ------------------------------------------------------------------------------


def _number(name: str, raw: str | None, default: int, high: int) -> int:
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or int(raw) > high:
        raise SearchParameterError(name, f"expected an integer from 0 to {high}")
    return int(raw)


def _uid(name: str, raw: str) -> str:
    if len(raw) > 64 or not _UID.fullmatch(raw):
        raise SearchParameterError(name, "expected a DICOM UID")
    return raw


def _date(name: str, raw: str) -> date:
    if not _DA.fullmatch(raw):
        raise SearchParameterError(name, "expected YYYYMMDD or YYYYMMDD-YYYYMMDD")
    try:
        return date(int(raw[:4]), int(raw[4:6]), int(raw[6:]))
    except ValueError as exc:
        raise SearchParameterError(name, "not a valid date") from exc


def parse_study_query(params: Sequence[tuple[str, str]], *, strict: bool = False) -> StudyQuery:
    """QIDO-RS study parameters; unknown ones ignored unless `strict`."""
    found = collect(params, STUDY_PARAMETERS, frozenset({"includefield"}), strict=strict)

    def one(name: str) -> str | None:
        values = found.get(name)
        return values[0] if values else None

    patient = one("PatientID")
    if patient is not None and (not patient or len(patient) > 64 or not patient.isprintable()):
        raise SearchParameterError("PatientID", "expected 1 to 64 printable characters")
    date_from = date_to = None
    study_date = one("StudyDate")
    if study_date is not None:
        low, dash, high = study_date.partition("-")
        if not dash:
            date_from = date_to = _date("StudyDate", low)
        else:
            if not low and not high:
                raise SearchParameterError("StudyDate", "a range needs at least one end")
            date_from = _date("StudyDate", low) if low else None
            date_to = _date("StudyDate", high) if high else None
    modality = one("ModalitiesInStudy")
    if modality is not None and not _MODALITY.fullmatch(modality):
        raise SearchParameterError("ModalitiesInStudy", "expected a modality code (CT, MR...)")
    uid = one("StudyInstanceUID")
    return StudyQuery(
        dicom_patient_id=patient,
        study_uid=_uid("StudyInstanceUID", uid) if uid is not None else None,
        date_from=date_from,
        date_to=date_to,
        modality=modality,
        limit=max(1, _number("limit", one("limit"), DEFAULT_LIMIT, MAX_LIMIT)),
        offset=_number("offset", one("offset"), 0, MAX_OFFSET),
    )


def _paging(params: Sequence[tuple[str, str]], strict: bool) -> tuple[int, int]:
    found = collect(params, LIST_PARAMETERS, frozenset({"includefield"}), strict=strict)
    limit = found.get("limit", [None])[0]
    offset = found.get("offset", [None])[0]
    return (
        max(1, _number("limit", limit, DEFAULT_LIMIT, MAX_LIMIT)),
        _number("offset", offset, 0, MAX_OFFSET),
    )


# --- responses -------------------------------------------------------------------------------


class DicomJsonResponse(Response):
    media_type = DICOM_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _wanted_syntax(accept: str | None) -> str | None:
    """The transfer syntax an `Accept` asks for; None for any (or no Accept)."""
    if not accept:
        return None
    for item in accept.split(","):
        media, *parameters = (p.strip() for p in item.split(";"))
        if media not in ("multipart/related", "*/*", "multipart/*"):
            continue
        values = dict(p.partition("=")[::2] for p in parameters)
        kind = values.get("type", '"application/dicom"').strip('"')
        if kind not in ("application/dicom", "*/*"):
            continue
        syntax = values.get("transfer-syntax", "*").strip('"')
        return None if syntax == "*" else syntax
    raise NotAcceptable('only multipart/related; type="application/dicom" is served')


async def _file_chunks(path: Path, head: bytes, tail: bytes) -> AsyncIterator[bytes]:
    yield head
    handle = await asyncio.to_thread(path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)
    yield tail


class DicomWeb:
    """The DICOMweb handlers over the request's connection (`db()`) and the DICOM store."""

    def __init__(self, db: Callable[[], Executor], storage: Path, base_url: str | None) -> None:
        self._db = db
        self._root = storage.resolve()
        self._base_url = base_url

    def _base(self, request: Request) -> str:
        root = self._base_url or str(request.base_url)
        return root.rstrip("/") + "/dicomweb"

    def _path(self, relative: str) -> Path:
        path = (self._root / relative).resolve()
        if not path.is_relative_to(self._root):
            raise ResourceNotFound("no such instance")
        return path

    async def studies(self, request: Request, strict: bool) -> tuple[Response, tuple[int, ...]]:
        query = parse_study_query(request.query_params.multi_items(), strict=strict)
        rows = await qido_studies(self._db(), query)
        base = self._base(request)
        patients = tuple(sorted({r.subject_id for r in rows if r.subject_id is not None}))
        return DicomJsonResponse([study_json(r, base) for r in rows]), patients

    async def series(self, request: Request, strict: bool) -> tuple[Response, tuple[int, ...]]:
        study = _uid("study", request.path_params["study"])
        limit, offset = _paging(request.query_params.multi_items(), strict)
        rows = await qido_series(self._db(), study, limit, offset)
        if rows is None:
            raise ResourceNotFound("no such study")
        base = self._base(request)
        patients = tuple(sorted({r.subject_id for r in rows if r.subject_id is not None}))
        return DicomJsonResponse([series_json(r, base) for r in rows]), patients

    async def instances(self, request: Request, strict: bool) -> tuple[Response, tuple[int, ...]]:
        rows = await self._instances(request, strict, None)
        base = self._base(request)
        patients = tuple(sorted({r.subject_id for r in rows if r.subject_id is not None}))
        return DicomJsonResponse([instance_json(r, base) for r in rows]), patients

    async def _instances(
        self, request: Request, strict: bool, sop: str | None
    ) -> list[QidoInstance]:
        study = _uid("study", request.path_params["study"])
        series = _uid("series", request.path_params["series"])
        limit, offset = _paging(request.query_params.multi_items(), strict)
        rows = await qido_instances(self._db(), study, series, sop, limit, offset)
        if rows is None:
            raise ResourceNotFound("no such series in this study")
        return rows

    async def _instance(self, request: Request, strict: bool) -> QidoInstance:
        sop = _uid("instance", request.path_params["instance"])
        rows = await self._instances(request, strict, sop)
        if not rows:
            raise ResourceNotFound("no such instance in this series")
        return rows[0]

    async def retrieve(self, request: Request, strict: bool) -> tuple[Response, tuple[int, ...]]:
        wanted = _wanted_syntax(request.headers.get("accept"))
        instance = await self._instance(request, strict)
        if wanted is not None and wanted != instance.transfer_syntax:
            raise NotAcceptable("the instance is served in the transfer syntax it was received in")
        path = self._path(instance.file_path)
        boundary = secrets.token_hex(16)
        head = (
            f"--{boundary}\r\n"
            f"Content-Type: application/dicom; transfer-syntax={instance.transfer_syntax}\r\n"
            f"Content-Length: {instance.size}\r\n\r\n"
        ).encode("ascii")
        tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        response = StreamingResponse(
            _file_chunks(path, head, tail),
            media_type=(f'multipart/related; type="application/dicom"; boundary={boundary}'),
            headers={"Content-Length": str(len(head) + instance.size + len(tail))},
        )
        patients = (instance.subject_id,) if instance.subject_id is not None else ()
        return response, patients

    async def metadata(self, request: Request, strict: bool) -> tuple[Response, tuple[int, ...]]:
        instance = await self._instance(request, strict)
        path = self._path(instance.file_path)
        url = _instance_url(self._base(request), instance)

        def read() -> JsonDataset:
            dataset = dcmread(path, stop_before_pixels=False)

            def bulk(element: DataElement) -> str:
                return url

            result: JsonDataset = dataset.to_json_dict(
                bulk_data_threshold=1024, bulk_data_element_handler=bulk
            )
            return result

        body = await asyncio.to_thread(read)
        patients = (instance.subject_id,) if instance.subject_id is not None else ()
        return DicomJsonResponse([body]), patients
