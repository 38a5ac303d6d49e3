"""The HTTP API: health, readiness, Prometheus metrics and the FHIR R4 read API.

`create_app` builds a Starlette application that runs in the gateway's event loop (the lead
serves it with uvicorn, `access_log=False`: `access_log_middleware` logs each request instead,
with the route template and never the query string, ids or tokens).

Errors: expected exceptions map to `OperationOutcome` responses in `EXCEPTION_HANDLERS`, the one
mapping; anything else is caught at the request boundary (`_internal_error_boundary`), logged by
type and location only (its message may carry patient data) and answered with a 500 outcome.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import Interaction, authenticate, authorize
from gateway.fhir_bundle import page_url, searchset
from gateway.fhir_identifiers import stored_systems
from gateway.fhir_imaging import imaging_study_endpoint
from gateway.fhir_outcome import FhirError, JsonObject, ResourceNotFound, operation_outcome
from gateway.fhir_paging import CursorPosition, decode_cursor, encode_cursor
from gateway.fhir_resources import (
    diagnostic_report_resource,
    lab_observation_resource,
    observation_resource,
    parse_lab_observation_id,
    parse_lab_report_id,
    parse_observation_id,
    parse_patient_id,
    patient_resource,
)
from gateway.fhir_search import (
    CURSOR_PARAMETER,
    ObservationSearch,
    SearchParameterError,
    Token,
    parse_count,
    parse_identifiers,
    parse_observation_search,
    parse_patient_references,
    parse_patient_search,
    parse_summary,
)
from ingest.codes import category_for
from ingest.errors import InputError, StorageUnavailable
from monitoring.health import is_ready
from monitoring.metrics import Metrics
from storage.queries import (
    CodeCriterion,
    LabObservationRecord,
    LabQuery,
    VitalPosition,
    VitalQuery,
    VitalRecord,
    count_lab_observations,
    count_lab_reports,
    count_vital_observations,
    find_concepts,
    find_patients_by_identifier,
    get_lab_observation,
    get_lab_report,
    get_patient,
    get_patients,
    get_vital,
    patient_group,
    search_lab_observations,
    search_lab_reports,
    search_vital_observations,
)

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("gateway.http.access")

FHIR_JSON: Final = "application/fhir+json"
RETRY_AFTER_SECONDS: Final = 5


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Limits of the FHIR API. `base_url` (e.g. `https://qantara.example/`) is the public root
    used in Bundle links and fullUrls; None takes it from each request."""

    default_count: int = 50
    max_count: int = 1000
    base_url: str | None = None

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError("max_count must be at least 1")
        if not 1 <= self.default_count <= self.max_count:
            raise ValueError("default_count must be between 1 and max_count")


class FhirResponse(Response):
    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")


# --- errors ------------------------------------------------------------------------------------


def _outcome_response(
    status: int, code: str, diagnostics: str, headers: Mapping[str, str] | None = None
) -> Response:
    return FhirResponse(operation_outcome(code, diagnostics), status_code=status, headers=headers)


def _input_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InputError)  # noqa: S101 - registered for InputError only
    return _outcome_response(400, "invalid", exc.detail)


def _fhir_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FhirError)  # noqa: S101 - registered for FhirError only
    return _outcome_response(exc.status, exc.code, exc.diagnostics, exc.headers)


def _storage_unavailable(request: Request, exc: Exception) -> Response:
    logger.warning(
        "database unavailable during %s %s: %s",
        request.method,
        _route_template(request.scope),
        type(exc.__cause__ or exc).__name__,
    )
    return _outcome_response(
        503,
        "transient",
        "the database is unavailable; retry later",
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
    return _outcome_response(exc.status_code, code, exc.detail, exc.headers)


EXCEPTION_HANDLERS: Final[Mapping[Any, Callable[[Request, Exception], Response]]] = {
    InputError: _input_error,
    FhirError: _fhir_error,
    StorageUnavailable: _storage_unavailable,
    HTTPException: _http_error,
}
"""Exception class → response; the one mapping of errors to HTTP answers."""


def _route_template(scope: Scope) -> str:
    """The matched route's path template (`/fhir/Patient/{id}`), `-` when no route matched."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "-"


def _internal_error_boundary(app: ASGIApp) -> ASGIApp:
    """Answer an unexpected exception with a 500 outcome, logged without its message."""

    async def boundary(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the per-request boundary: log, answer 500
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            # The message is left out on purpose: it may quote patient data from the database.
            logger.error(
                "unhandled %s at %s during %s %s",
                type(exc).__name__,
                where,
                scope.get("method", "?"),
                _route_template(scope),
            )
            if not started:
                response = _outcome_response(500, "exception", "internal error")
                await response(scope, receive, send)

    return boundary


def access_log_middleware(app: ASGIApp) -> ASGIApp:
    """Log one INFO line per request: method, route template, status, duration.

    Never the raw path, the query string or headers: those carry identifiers and tokens.
    """

    async def logged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await app(scope, receive, status_send)
        finally:
            access_logger.info(
                "%s %s %d %.1fms",
                scope.get("method", "?"),
                _route_template(scope),
                status or 500,
                (time.perf_counter() - started) * 1000,
            )

    return logged


# --- endpoints ---------------------------------------------------------------------------------


class _AsgiEndpoint:
    """Wraps an ASGI callable so that `Route` treats it as an app, not a request handler."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def _readyz(readiness: Callable[[], Mapping[str, bool]]) -> Callable[[Request], Response]:
    def readyz(request: Request) -> Response:
        checks = {name: bool(ok) for name, ok in readiness().items()}
        ready = is_ready(checks)
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    return readyz


class _FhirApi:
    """The FHIR endpoints over one pool."""

    def __init__(self, pool: asyncpg.Pool, api: ApiSettings) -> None:
        self._pool = pool
        self._api = api

    def _base(self, request: Request) -> str:
        root = self._api.base_url or str(request.base_url)
        return root.rstrip("/") + "/fhir"

    async def _grant(self, request: Request, resource_type: str, interaction: Interaction) -> None:
        grant = await authenticate(self._pool, request.headers.get("authorization"))
        authorize(grant, resource_type, interaction)

    async def read_patient(self, request: Request) -> Response:
        await self._grant(request, "Patient", Interaction.READ)
        patient_id = parse_patient_id(request.path_params["id"])
        record = await get_patient(self._pool, patient_id) if patient_id is not None else None
        if record is None:
            raise ResourceNotFound("no Patient with this id")
        return FhirResponse(patient_resource(record))

    async def search_patients(self, request: Request) -> Response:
        await self._grant(request, "Patient", Interaction.SEARCH)
        params = request.query_params.multi_items()
        search = parse_patient_search(
            params, default_count=self._api.default_count, max_count=self._api.max_count
        )
        after = (
            decode_cursor(search.cursor, search.digest(), timed=False)
            if search.cursor is not None
            else None
        )
        survivors = await self._patients_by_identifiers(search.identifiers)
        base = self._base(request)
        self_url = page_url(f"{base}/Patient", params, search.cursor)
        if search.summary_count or search.count == 0:
            return FhirResponse(self._bundle([], base, len(survivors), self_url, None))
        remaining = [p for p in survivors if after is None or p > after.id]
        page = remaining[: search.count]
        next_url = None
        if len(remaining) > search.count:
            cursor = encode_cursor(search.digest(), CursorPosition(None, page[-1]))
            next_url = page_url(f"{base}/Patient", params, cursor)
        records = await get_patients(self._pool, page)
        resources = [patient_resource(r) for r in records]
        return FhirResponse(self._bundle(resources, base, len(survivors), self_url, next_url))

    async def read_observation(self, request: Request) -> Response:
        await self._grant(request, "Observation", Interaction.READ)
        text = request.path_params["id"]
        lab_id = parse_lab_observation_id(text)
        if lab_id is not None:
            lab = await get_lab_observation(self._pool, lab_id)
            if lab is None:
                raise ResourceNotFound("no Observation with this id")
            return FhirResponse(lab_observation_resource(lab))
        vital_id = parse_observation_id(text)
        record = await get_vital(self._pool, vital_id) if vital_id is not None else None
        if record is None:
            raise ResourceNotFound("no Observation with this id")
        return FhirResponse(observation_resource(record))

    async def search_observations(self, request: Request) -> Response:
        await self._grant(request, "Observation", Interaction.SEARCH)
        params = request.query_params.multi_items()
        search = parse_observation_search(
            params, default_count=self._api.default_count, max_count=self._api.max_count
        )
        after = None
        if search.cursor is not None:
            position = decode_cursor(search.cursor, search.digest(), timed=True)
            assert position.time is not None  # noqa: S101 - timed cursors carry a time
            after = VitalPosition(position.time, position.id)
        query = await self._vital_query(search)
        # Lab results (HL7) share the category `laboratory` and the (time, id) order.
        labs = search.categories is None or "laboratory" in search.categories
        lab_query = LabQuery(
            patient_ids=query.patient_ids,
            codes=(
                tuple(CodeCriterion(t.system, t.code) for t in search.codes)
                if search.codes is not None
                else None
            ),
            start=query.start,
            end=query.end,
        )
        base = self._base(request)
        self_url = page_url(f"{base}/Observation", params, search.cursor)
        total = await count_vital_observations(self._pool, query)
        if labs:
            total += await count_lab_observations(self._pool, lab_query)
        if search.summary_count or search.count == 0:
            return FhirResponse(self._bundle([], base, total, self_url, None))
        rows: list[VitalRecord | LabObservationRecord] = []
        rows.extend(await search_vital_observations(self._pool, query, after, search.count + 1))
        if labs:
            rows.extend(
                await search_lab_observations(self._pool, lab_query, after, search.count + 1)
            )
        rows.sort(key=lambda r: (r.position.time, r.position.id))
        page = rows[: search.count]
        next_url = None
        if len(rows) > search.count:
            last = page[-1].position
            cursor = encode_cursor(search.digest(), CursorPosition(last.time, last.id))
            next_url = page_url(f"{base}/Observation", params, cursor)
        resources = [
            lab_observation_resource(r)
            if isinstance(r, LabObservationRecord)
            else observation_resource(r)
            for r in page
        ]
        return FhirResponse(self._bundle(resources, base, total, self_url, next_url))

    async def read_diagnostic_report(self, request: Request) -> Response:
        await self._grant(request, "DiagnosticReport", Interaction.READ)
        report_id = parse_lab_report_id(request.path_params["id"])
        record = await get_lab_report(self._pool, report_id) if report_id is not None else None
        if record is None:
            raise ResourceNotFound("no DiagnosticReport with this id")
        return FhirResponse(diagnostic_report_resource(record))

    async def search_diagnostic_reports(self, request: Request) -> Response:
        await self._grant(request, "DiagnosticReport", Interaction.SEARCH)
        params = request.query_params.multi_items()
        search = _parse_report_search(
            params, default_count=self._api.default_count, max_count=self._api.max_count
        )
        after = (
            decode_cursor(search.cursor, search.digest(), timed=False)
            if search.cursor is not None
            else None
        )
        if search.patient_ids is not None:
            patients = await patient_group(self._pool, search.patient_ids)
        else:
            assert search.patient_identifiers is not None  # noqa: S101 - one of the two is set
            survivors = await self._patients_by_identifiers(search.patient_identifiers)
            patients = await patient_group(self._pool, survivors)
        base = self._base(request)
        self_url = page_url(f"{base}/DiagnosticReport", params, search.cursor)
        total = await count_lab_reports(self._pool, patients)
        if search.summary_count or search.count == 0:
            return FhirResponse(self._bundle([], base, total, self_url, None))
        rows = await search_lab_reports(
            self._pool, patients, after.id if after is not None else None, search.count + 1
        )
        page = rows[: search.count]
        next_url = None
        if len(rows) > search.count:
            cursor = encode_cursor(search.digest(), CursorPosition(None, page[-1].id))
            next_url = page_url(f"{base}/DiagnosticReport", params, cursor)
        resources = [diagnostic_report_resource(r) for r in page]
        return FhirResponse(self._bundle(resources, base, total, self_url, next_url))

    @staticmethod
    def _bundle(
        resources: Sequence[JsonObject],
        base: str,
        total: int,
        self_url: str,
        next_url: str | None,
    ) -> JsonObject:
        return searchset(
            resources=resources,
            resource_base=base,
            total=total,
            self_url=self_url,
            next_url=next_url,
        )

    async def _patients_by_identifiers(self, identifiers: Sequence[Token]) -> list[int]:
        found: set[int] = set()
        for token in identifiers:
            assert token.code is not None  # noqa: S101 - parse_identifier requires a value
            systems = stored_systems(token.system) if token.system is not None else None
            found.update(await find_patients_by_identifier(self._pool, token.code, systems))
        return sorted(found)

    async def _vital_query(self, search: ObservationSearch) -> VitalQuery:
        if search.patient_ids is not None:
            patients = await patient_group(self._pool, search.patient_ids)
        else:
            assert search.patient_identifiers is not None  # noqa: S101 - one of the two is set
            survivors = await self._patients_by_identifiers(search.patient_identifiers)
            patients = await patient_group(self._pool, survivors)
        concept_ids: tuple[int, ...] | None = None
        if search.codes is not None or search.categories is not None:
            criteria = (
                [CodeCriterion(t.system, t.code) for t in search.codes]
                if search.codes is not None
                else None
            )
            concepts = await find_concepts(self._pool, criteria)
            if search.categories is not None:
                concepts = [c for c in concepts if category_for(c.code) in search.categories]
            concept_ids = tuple(c.id for c in concepts)
        return VitalQuery(
            patient_ids=tuple(patients),
            concept_ids=concept_ids,
            start=search.time.start,
            end=search.time.end,
        )


@dataclass(frozen=True, slots=True)
class _ReportSearch:
    patient_ids: tuple[int, ...] | None
    patient_identifiers: tuple[Token, ...] | None
    count: int
    summary_count: bool
    cursor: str | None

    def digest(self) -> bytes:
        criteria = repr(("DiagnosticReport", self.patient_ids, self.patient_identifiers))
        return hashlib.sha256(criteria.encode("utf-8", "backslashreplace")).digest()


_REPORT_PARAMETERS: Final = frozenset(
    {"patient", "patient:identifier", "_count", "_summary", CURSOR_PARAMETER}
)


def _parse_report_search(
    params: Sequence[tuple[str, str]], *, default_count: int, max_count: int
) -> _ReportSearch:
    """`GET /fhir/DiagnosticReport`: a patient (by reference or identifier) is required."""
    found: dict[str, str] = {}
    for name, value in params:
        if name == "_format" and value in ("json", "application/json", "application/fhir+json"):
            continue
        if name not in _REPORT_PARAMETERS:
            raise SearchParameterError(
                "".join(c if c.isprintable() else "?" for c in name[:40]) or "?",
                "not a supported search parameter",
            )
        if name in found:
            raise SearchParameterError(name, "given more than once")
        found[name] = value
    patient = found.get("patient")
    by_identifier = found.get("patient:identifier")
    if (patient is None) == (by_identifier is None):
        raise SearchParameterError("patient", "give patient or patient:identifier (one of them)")
    count = found.get("_count")
    summary = found.get("_summary")
    return _ReportSearch(
        patient_ids=parse_patient_references("patient", patient) if patient is not None else None,
        patient_identifiers=(
            parse_identifiers("patient:identifier", by_identifier)
            if by_identifier is not None
            else None
        ),
        count=parse_count("_count", count, max_count) if count is not None else default_count,
        summary_count=parse_summary("_summary", summary) if summary is not None else False,
        cursor=found.get(CURSOR_PARAMETER),
    )


def create_app(
    *,
    pool: asyncpg.Pool,
    metrics: Metrics,
    readiness: Callable[[], Mapping[str, bool]],
    api: ApiSettings,
) -> Starlette:
    """The HTTP application: `/healthz`, `/readyz`, `/metrics` (no token) and `/fhir/...`."""
    fhir = _FhirApi(pool, api)
    routes = [
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/readyz", _readyz(readiness), methods=["GET"]),
        Route(
            "/metrics",
            _AsgiEndpoint(make_asgi_app(registry=metrics.registry)),
            methods=["GET"],
        ),
        Route("/fhir/Patient", fhir.search_patients, methods=["GET"]),
        Route("/fhir/Patient/{id}", fhir.read_patient, methods=["GET"]),
        Route("/fhir/Observation", fhir.search_observations, methods=["GET"]),
        Route("/fhir/Observation/{id}", fhir.read_observation, methods=["GET"]),
        Route(
            "/fhir/ImagingStudy",
            imaging_study_endpoint(
                pool,
                default_count=api.default_count,
                max_count=api.max_count,
                base_url=api.base_url,
            ),
            methods=["GET"],
        ),
        Route("/fhir/DiagnosticReport", fhir.search_diagnostic_reports, methods=["GET"]),
        Route("/fhir/DiagnosticReport/{id}", fhir.read_diagnostic_report, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(access_log_middleware),
            Middleware(_internal_error_boundary),
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )


__all__ = [
    "EXCEPTION_HANDLERS",
    "ApiSettings",
    "FhirResponse",
    "access_log_middleware",
    "create_app",
]
