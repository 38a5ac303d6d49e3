"""The HTTP API: health, readiness, Prometheus metrics and the FHIR R4 read API.

`create_app` builds a Starlette application that runs in the gateway's event loop (the lead
serves it with uvicorn, `access_log=False`: `access_log_middleware` logs each request instead,
with the route template and never the query string, ids or tokens).

Errors: expected exceptions map to `OperationOutcome` responses in `EXCEPTION_HANDLERS`, the one
mapping; anything else is caught at the request boundary (`_internal_error_boundary`), logged by
type and location only (its message may carry patient data) and answered with a 500 outcome.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import asyncpg
import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import Interaction, authenticate_with_group, authorize
from gateway.dicomweb import DicomWeb
from gateway.fhir_audit import audit_event_resource, query_shape
from gateway.fhir_bundle import page_url, searchset
from gateway.fhir_capability import capability_statement, openapi_document
from gateway.fhir_identifiers import stored_systems
from gateway.fhir_imaging import imaging_study_resource
from gateway.fhir_outcome import (
    FhirError,
    Forbidden,
    JsonObject,
    ResourceNotFound,
    operation_outcome,
)
from gateway.fhir_paging import CursorCodec, CursorPosition
from gateway.fhir_resources import (
    UNIT_SYSTEM_PREFIX,
    device_resource,
    diagnostic_report_resource,
    lab_observation_resource,
    observation_resource,
    parse_device_id,
    parse_lab_observation_id,
    parse_lab_report_id,
    parse_observation_id,
    parse_patient_id,
    patient_resource,
)
from gateway.fhir_search import (
    AUDIT_PARAMETERS,
    DEVICE_PARAMETERS,
    IMAGING_PARAMETERS,
    LASTN_PARAMETERS,
    OBSERVATION_PARAMETERS,
    PATIENT_PARAMETERS,
    REPORT_PARAMETERS,
    DateFilter,
    Paging,
    PatientCriterion,
    SearchParameterError,
    Token,
    parse_audit_search,
    parse_device_search,
    parse_imaging_search,
    parse_lastn_search,
    parse_observation_search,
    parse_patient_references,
    parse_patient_search,
    parse_report_search,
    strict_handling,
)
from ingest.codes import category_for
from ingest.errors import InputError, StorageUnavailable
from monitoring.health import is_ready
from monitoring.metrics import Metrics
from storage.audit import (
    OUTCOME_MINOR_FAILURE,
    OUTCOME_SUCCESS,
    AuditEntry,
    AuditQuery,
    count_access,
    record_access,
    search_access,
)
from storage.pool import is_transient
from storage.queries import (
    CodeCriterion,
    Executor,
    ImagingQuery,
    LabObservationRecord,
    LabQuery,
    PatientQuery,
    ReportQuery,
    VitalPosition,
    VitalQuery,
    VitalRecord,
    count_devices,
    count_lab_reports,
    count_observations,
    count_patients,
    count_studies,
    find_concepts,
    find_patients_by_identifier,
    get_device,
    get_lab_observation,
    get_lab_report,
    get_patient,
    get_patients,
    get_vital,
    lastn_labs,
    lastn_vitals,
    patient_group,
    search_devices,
    search_lab_observations,
    search_lab_reports,
    search_patient_ids,
    search_studies,
    search_vital_observations,
)
from storage.tokens import TokenGrant

logger = logging.getLogger(__name__)


class _HasId(Protocol):
    @property
    def id(self) -> int: ...


_Keyed = TypeVar("_Keyed", bound=_HasId)
"""A row of a search kept in id order (`_FhirApi._id_page`)."""
access_logger = logging.getLogger("gateway.http.access")

FHIR_JSON: Final = "application/fhir+json"
RETRY_AFTER_SECONDS: Final = 5


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Limits of the FHIR API. `base_url` (e.g. `https://qantara.example/`) is the public root
    used in Bundle links and fullUrls; None takes it from each request. `cursor_secret` signs
    paging cursors: replicas behind one load balancer must share it; None draws a random one per
    process (cursors then die with the process)."""

    default_count: int = 50
    max_count: int = 1000
    base_url: str | None = None
    cursor_secret: bytes | None = None

    def __post_init__(self) -> None:
        if self.max_count < 1:
            raise ValueError("max_count must be at least 1")
        if not 1 <= self.default_count <= self.max_count:
            raise ValueError("default_count must be between 1 and max_count")


class FhirResponse(Response):
    """FHIR JSON: compact UTF-8, non-ASCII text as is (never `\\u` escaped), numbers in their
    shortest exact form. orjson writes the same bytes as `json.dumps(ensure_ascii=False,
    separators=(",", ":"))` except for exponents (`1e-5`, not `1e-05`: the same number). orjson
    would write NaN and infinities as null where `json` refused them: the mappers never produce
    them (a value that is not finite becomes a dataAbsentReason or is left out)."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


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


def access_log_middleware(app: ASGIApp, metrics: Metrics | None = None) -> ASGIApp:
    """Log one INFO line per request: method, route template, status, duration; and count it in
    `metrics` (`qantara_http_requests_total`, `qantara_http_request_seconds`).

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
            seconds = time.perf_counter() - started
            route = _route_template(scope)
            access_logger.info(
                "%s %s %d %.1fms", scope.get("method", "?"), route, status or 500, seconds * 1000
            )
            if metrics is not None:
                metrics.http_requests.labels(route, str(status or 500)).inc()
                metrics.http_request_seconds.labels(route).observe(seconds)

    return logged


# --- endpoints ---------------------------------------------------------------------------------


def _metrics(registry: CollectorRegistry) -> Callable[[Request], Response]:
    """The Prometheus exposition (text, or OpenMetrics when the scraper asks for it), with a
    Content-Length: prometheus_client's own ASGI app sends none, and uvicorn's httptools
    protocol then answers in chunked encoding even to an HTTP/1.0 request, which such a client
    (a load balancer's health check, a shell probe) cannot read."""

    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(registry), headers={"Content-Type": content_type})

    return metrics


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


@dataclass(frozen=True, slots=True)
class Served:
    """What a handler answers: the response, and the patients whose data it carries (audited)."""

    response: Response
    patient_ids: tuple[int, ...]


Handler = Callable[[Request, bool], Awaitable[Served]]
"""`(request, strict)` → `Served`; `strict` is the `Prefer: handling=strict` of the request."""

_SUBSETTED: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
}
_ALWAYS_KEPT: Final = frozenset({"resourceType", "id", "meta", "status", "code", "subject"})


def _patient_number(reference: object) -> int | None:
    if isinstance(reference, str) and reference.startswith("Patient/"):
        tail = reference[len("Patient/") :]
        if tail.isascii() and tail.isdigit():
            return int(tail)
    return None


def patients_in(body: JsonObject) -> tuple[int, ...]:
    """The patients whose data a resource or a Bundle's entries carry (ascending, distinct)."""
    if body.get("resourceType") == "Bundle":
        resources = [e["resource"] for e in body.get("entry", [])]
    else:
        resources = [body]
    found: set[int] = set()
    for resource in resources:
        if resource.get("resourceType") == "Patient":
            found.add(int(resource["id"]))
        subject = _patient_number(resource.get("subject", {}).get("reference"))
        if subject is not None:
            found.add(subject)
        for entity in resource.get("entity", []):
            what = _patient_number(entity.get("what", {}).get("reference"))
            if what is not None:
                found.add(what)
    return tuple(sorted(found))


def _subset(resource: JsonObject, elements: Sequence[str] | None) -> JsonObject:
    """`_elements`: the requested top-level elements and the mandatory ones, tagged SUBSETTED."""
    if elements is None:
        return resource
    wanted = set(elements) | _ALWAYS_KEPT
    choices = tuple(e.removesuffix("[x]") for e in elements)
    kept = {
        k: v
        for k, v in resource.items()
        if k in wanted or any(k.startswith(c) and k[len(c) : len(c) + 1].isupper() for c in choices)
    }
    meta = dict(kept.get("meta", {}))
    meta["tag"] = [*meta.get("tag", []), dict(_SUBSETTED)]
    kept["meta"] = meta
    return kept


def _ranges(dates: DateFilter) -> tuple[tuple[datetime | None, datetime | None], ...]:
    return tuple((r.start, r.end) for r in dates.excluded)


def _day_floor(value: datetime | None) -> date | None:
    return value.astimezone(UTC).date() if value is not None else None


def _day_ceiling(value: datetime | None) -> date | None:
    if value is None:
        return None
    utc = value.astimezone(UTC)
    if utc.time() == datetime.min.time() or utc.date() == date.max:
        return utc.date()
    return utc.date() + timedelta(days=1)


_REQUEST_DB: ContextVar[Executor] = ContextVar("qantara_request_db")
_PREFETCHED_GROUP: ContextVar[tuple[tuple[int, ...], tuple[int, ...]] | None] = ContextVar(
    "qantara_prefetched_group", default=None
)
"""`(patient ids, their group)` read with the request's token (`authenticate_with_group`)."""


def _named_patients(params: Sequence[tuple[str, str]]) -> tuple[int, ...]:
    """The ids of a lone `patient=` or `subject=` parameter; () when there is none, several, or a
    malformed one (the handler's parser reports those after authorization)."""
    values = [value for name, value in params if name in ("patient", "subject")]
    if len(values) != 1:
        return ()
    try:
        return parse_patient_references("patient", values[0])
    except InputError:
        return ()


def request_db() -> Executor:
    """The database connection of the request being answered (set by `_request_connection`)."""
    return _REQUEST_DB.get()


@asynccontextmanager
async def _request_connection(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """One pooled connection for all the statements of a request, released when it is answered.

    One acquire and release per request rather than per statement; the audit row and the reads
    share the connection. A database that cannot be reached is `StorageUnavailable`.
    """
    try:
        connection = await pool.acquire()
    except Exception as exc:
        if is_transient(exc) or isinstance(exc, OSError | TimeoutError):
            raise StorageUnavailable(type(exc).__name__) from exc
        raise
    token = _REQUEST_DB.set(connection)
    try:
        yield
    finally:
        _REQUEST_DB.reset(token)
        await pool.release(connection)


class _FhirApi:
    """The FHIR endpoints over one pool: authenticate, authorize, answer, audit."""

    def __init__(self, pool: asyncpg.Pool, api: ApiSettings) -> None:
        self._pool = pool
        self._api = api
        self._cursors = CursorCodec(api.cursor_secret)

    @property
    def _db(self) -> Executor:
        return request_db()

    def _base(self, request: Request) -> str:
        root = self._api.base_url or str(request.base_url)
        return root.rstrip("/") + "/fhir"

    # --- the shell every endpoint runs in ---

    def endpoint(
        self,
        resource_type: str,
        interaction: Interaction,
        action: str,
        handler: Handler,
        *,
        by_patient: bool = False,
    ) -> Callable[[Request], Awaitable[Response]]:
        """Bearer token → scope → handler → audit row committed → response.

        A refused scope is audited too (outcome 4); a missing or unknown token is not (there is
        no one to name) and an error before data is returned leaves no row. `by_patient`: the
        search takes `patient=`, whose patient group is read with the token (one round trip).
        """

        async def serve(request: Request) -> Response:
            async with _request_connection(self._pool):
                return await answer(request)

        async def answer(request: Request) -> Response:
            named = _named_patients(request.query_params.multi_items()) if by_patient else ()
            grant, group = await authenticate_with_group(
                self._db, request.headers.get("authorization"), named
            )
            try:
                authorize(grant, resource_type, interaction)
            except Forbidden:
                await self._audit(
                    request, grant, action, resource_type, (), OUTCOME_MINOR_FAILURE, 403
                )
                raise
            # Only now may the group read with the token serve the handler (`_whose`).
            prefetched = _PREFETCHED_GROUP.set((named, group) if named else None)
            try:
                served = await handler(request, strict_handling(request.headers.get("prefer")))
            finally:
                _PREFETCHED_GROUP.reset(prefetched)
            await self._audit(
                request,
                grant,
                action,
                resource_type,
                served.patient_ids,
                OUTCOME_SUCCESS,
                served.response.status_code,
            )
            return served.response

        return serve

    async def _audit(
        self,
        request: Request,
        grant: TokenGrant,
        action: str,
        resource_type: str,
        patient_ids: tuple[int, ...],
        outcome: str,
        status: int,
    ) -> None:
        await record_access(
            self._db,
            AuditEntry(
                token_name=grant.name,
                action=action,
                resource_type=resource_type,
                query_shape=query_shape(
                    request.method,
                    _route_template(request.scope),
                    request.query_params.multi_items(),
                ),
                patient_ids=patient_ids,
                outcome=outcome,
                status=status,
            ),
        )

    @staticmethod
    def _fhir(body: JsonObject, patients: tuple[int, ...] | None = None) -> Served:
        """`body` as the response; `patients` (ascending, distinct) when the handler knows them
        from its rows, else read from the body."""
        return Served(FhirResponse(body), patients if patients is not None else patients_in(body))

    def _bundle(
        self,
        request: Request,
        resources: Sequence[JsonObject],
        total: int,
        cursor: str | None,
        next_cursor: str | None,
        used: frozenset[str],
        patients: tuple[int, ...] | None = None,
    ) -> Served:
        """A searchset of `resources`; its links carry only the parameters in `used` (those the
        search understood: lenient handling ignores the others, and FHIR's self link shows
        what was actually applied)."""
        base = self._base(request)
        route = f"{base}{request.url.path.removeprefix('/fhir')}"
        params = [(k, v) for k, v in request.query_params.multi_items() if k in used]
        return self._fhir(
            searchset(
                resources=resources,
                resource_base=base,
                total=total,
                self_url=page_url(route, params, cursor),
                next_url=page_url(route, params, next_cursor) if next_cursor is not None else None,
            ),
            patients,
        )

    def _after_id(self, cursor: str | None, digest: bytes) -> int | None:
        if cursor is None:
            return None
        return self._cursors.decode(cursor, digest, timed=False).id

    def _next_id(self, digest: bytes, last_id: int) -> str:
        return self._cursors.encode(digest, CursorPosition(None, last_id))

    async def _id_page(
        self,
        request: Request,
        paging: Paging,
        digest: bytes,
        count: Callable[[], Awaitable[int]],
        fetch: Callable[[int | None, int], Awaitable[Sequence[_Keyed]]],
        resource: Callable[[_Keyed], JsonObject],
        used: frozenset[str],
    ) -> Served:
        """A searchset page of rows kept in id order: the cursor checked first, the total
        counted, then (unless only the count is asked for) one row more than the page is read,
        to know whether a next page exists."""
        after = self._after_id(paging.cursor, digest)
        total = await count()
        if paging.summary_count or paging.count == 0:
            return self._bundle(request, [], total, paging.cursor, None, used)
        rows = await fetch(after, paging.count + 1)
        page = rows[: paging.count]
        next_cursor = self._next_id(digest, page[-1].id) if len(rows) > paging.count else None
        resources = [resource(row) for row in page]
        return self._bundle(request, resources, total, paging.cursor, next_cursor, used)

    async def _patients_by_identifiers(self, identifiers: Sequence[Token]) -> list[int]:
        found: set[int] = set()
        for token in identifiers:
            assert token.code is not None  # noqa: S101 - parse_identifier requires a value
            systems = stored_systems(token.system) if token.system is not None else None
            found.update(await find_patients_by_identifier(self._db, token.code, systems))
        return sorted(found)

    async def _whose(self, criterion: PatientCriterion) -> list[int]:
        """The patients whose rows a criterion selects: survivors and all they replaced."""
        if criterion.ids is not None:
            prefetched = _PREFETCHED_GROUP.get()
            if prefetched is not None and prefetched[0] == criterion.ids:
                return list(prefetched[1])
            return await patient_group(self._db, criterion.ids)
        assert criterion.identifiers is not None  # noqa: S101 - one of the two is set
        survivors = await self._patients_by_identifiers(criterion.identifiers)
        return await patient_group(self._db, survivors)

    def _limits(self) -> dict[str, int]:
        return {"default_count": self._api.default_count, "max_count": self._api.max_count}

    # --- Patient ---

    async def read_patient(self, request: Request, strict: bool) -> Served:
        patient_id = parse_patient_id(request.path_params["id"])
        record = await get_patient(self._db, patient_id) if patient_id is not None else None
        if record is None:
            raise ResourceNotFound("no Patient with this id")
        return self._fhir(patient_resource(record))

    async def search_patients(self, request: Request, strict: bool) -> Served:
        search = parse_patient_search(
            request.query_params.multi_items(), strict=strict, **self._limits()
        )
        digest = search.digest()
        paging = search.paging
        after = self._after_id(paging.cursor, digest)
        survivors = None
        if search.identifiers is not None:
            survivors = tuple(await self._patients_by_identifiers(search.identifiers))
        birth = search.birthdate
        query = PatientQuery(
            ids=search.ids,
            survivor_ids=survivors,
            name_prefixes=search.names,
            birth_start=_day_floor(birth.range.start) if birth else None,
            birth_end=_day_ceiling(birth.range.end) if birth else None,
            birth_excluded=(
                tuple((_day_floor(r.start), _day_ceiling(r.end)) for r in birth.excluded)
                if birth
                else ()
            ),
            genders=tuple(sorted(search.genders)) if search.genders is not None else None,
        )
        total = await count_patients(self._db, query)
        if paging.summary_count or paging.count == 0:
            return self._bundle(request, [], total, paging.cursor, None, PATIENT_PARAMETERS)
        ids = await search_patient_ids(self._db, query, after, paging.count + 1)
        page = ids[: paging.count]
        next_cursor = self._next_id(digest, page[-1]) if len(ids) > paging.count else None
        records = await get_patients(self._db, page)
        resources = [patient_resource(r) for r in records]
        return self._bundle(
            request, resources, total, paging.cursor, next_cursor, PATIENT_PARAMETERS
        )

    # --- Observation ---

    async def read_observation(self, request: Request, strict: bool) -> Served:
        text = request.path_params["id"]
        lab_id = parse_lab_observation_id(text)
        if lab_id is not None:
            lab = await get_lab_observation(self._db, lab_id)
            if lab is None:
                raise ResourceNotFound("no Observation with this id")
            return self._fhir(lab_observation_resource(lab))
        vital_id = parse_observation_id(text)
        record = await get_vital(self._db, vital_id) if vital_id is not None else None
        if record is None:
            raise ResourceNotFound("no Observation with this id")
        return self._fhir(observation_resource(record))

    async def _concepts(
        self, codes: tuple[Token, ...] | None, categories: frozenset[str] | None
    ) -> tuple[int, ...] | None:
        """Concept ids for code and category criteria; None when neither is given."""
        if codes is None and categories is None:
            return None
        criteria = [CodeCriterion(t.system, t.code) for t in codes] if codes is not None else None
        concepts = await find_concepts(self._db, criteria)
        if categories is not None:
            concepts = [c for c in concepts if category_for(c.code) in categories]
        return tuple(c.id for c in concepts)

    async def search_observations(self, request: Request, strict: bool) -> Served:
        search = parse_observation_search(
            request.query_params.multi_items(), strict=strict, **self._limits()
        )
        digest = search.digest()
        paging = search.paging
        after = None
        if paging.cursor is not None:
            position = self._cursors.decode(paging.cursor, digest, timed=True)
            assert position.time is not None  # noqa: S101 - timed cursors carry a time
            after = VitalPosition(position.time, position.id)
        patients = tuple(await self._whose(search.patient))
        excluded = _ranges(search.dates)
        query = VitalQuery(
            patient_ids=patients,
            concept_ids=await self._concepts(search.codes, search.categories),
            start=search.dates.range.start,
            end=search.dates.range.end,
            excluded=excluded,
            descending=search.descending,
        )
        # Lab results (HL7) share the category `laboratory` and the (time, id) order.
        labs = search.categories is None or "laboratory" in search.categories
        lab_query = LabQuery(
            patient_ids=patients,
            codes=(
                tuple(CodeCriterion(t.system, t.code) for t in search.codes)
                if search.codes is not None
                else None
            ),
            start=search.dates.range.start,
            end=search.dates.range.end,
            excluded=excluded,
            descending=search.descending,
        )
        counts = await count_observations(self._db, query, lab_query if labs else None)
        total = counts.total
        if paging.summary_count or paging.count == 0:
            return self._bundle(request, [], total, paging.cursor, None, OBSERVATION_PARAMETERS)
        # A kind with no matching row at count time is not read: rows written since then may
        # appear or not (as on any page), and a page skips none that were there from the start.
        rows: list[VitalRecord | LabObservationRecord] = []
        if counts.vitals:
            rows.extend(await search_vital_observations(self._db, query, after, paging.count + 1))
        if counts.labs:
            rows.extend(await search_lab_observations(self._db, lab_query, after, paging.count + 1))
            if counts.vitals:  # each list comes in order; only a mix needs sorting
                rows.sort(key=lambda r: (r.position.time, r.position.id), reverse=search.descending)
        page = rows[: paging.count]
        next_cursor = None
        if len(rows) > paging.count:
            last = page[-1].position
            next_cursor = self._cursors.encode(digest, CursorPosition(last.time, last.id))
        resources = [_subset(_observation(r), search.elements) for r in page]
        return self._bundle(
            request,
            resources,
            total,
            paging.cursor,
            next_cursor,
            OBSERVATION_PARAMETERS,
            _subjects(page),
        )

    async def lastn(self, request: Request, strict: bool) -> Served:
        search = parse_lastn_search(request.query_params.multi_items(), strict=strict)
        patients = await self._whose(search.patient)
        concepts = await self._concepts(search.codes, search.categories)  # None: all of them
        rows: list[VitalRecord | LabObservationRecord] = []
        rows.extend(await lastn_vitals(self._db, patients, concepts, search.max))
        if search.categories is None or "laboratory" in search.categories:
            criteria = (
                [CodeCriterion(t.system, t.code) for t in search.codes]
                if search.codes is not None
                else None
            )
            rows.extend(await lastn_labs(self._db, patients, criteria, search.max))
        resources = [_subset(_observation(r), search.elements) for r in rows]
        return self._bundle(
            request, resources, len(resources), None, None, LASTN_PARAMETERS, _subjects(rows)
        )

    # --- DiagnosticReport ---

    async def read_diagnostic_report(self, request: Request, strict: bool) -> Served:
        report_id = parse_lab_report_id(request.path_params["id"])
        record = await get_lab_report(self._db, report_id) if report_id is not None else None
        if record is None:
            raise ResourceNotFound("no DiagnosticReport with this id")
        return self._fhir(diagnostic_report_resource(record))

    async def search_diagnostic_reports(self, request: Request, strict: bool) -> Served:
        search = parse_report_search(
            request.query_params.multi_items(), strict=strict, **self._limits()
        )
        query = ReportQuery(
            patient_ids=tuple(await self._whose(search.patient)),
            codes=(
                tuple(CodeCriterion(t.system, t.code) for t in search.codes)
                if search.codes is not None
                else None
            ),
            start=search.dates.range.start,
            end=search.dates.range.end,
            excluded=_ranges(search.dates),
        )
        return await self._id_page(
            request,
            search.paging,
            search.digest(),
            lambda: count_lab_reports(self._db, query),
            lambda after, limit: search_lab_reports(self._db, query, after, limit),
            diagnostic_report_resource,
            REPORT_PARAMETERS,
        )

    # --- ImagingStudy, Device ---

    async def search_imaging_studies(self, request: Request, strict: bool) -> Served:
        search = parse_imaging_search(
            request.query_params.multi_items(), strict=strict, **self._limits()
        )
        query = ImagingQuery(
            patient_ids=(
                tuple(await self._whose(search.patient)) if search.patient is not None else None
            ),
            study_uids=search.study_uids,
            start=search.started.range.start,
            end=search.started.range.end,
            excluded=_ranges(search.started),
            modalities=tuple(sorted(search.modalities)) if search.modalities is not None else None,
        )
        return await self._id_page(
            request,
            search.paging,
            search.digest(),
            lambda: count_studies(self._db, query),
            lambda after, limit: search_studies(self._db, query, after, limit),
            imaging_study_resource,
            IMAGING_PARAMETERS,
        )

    async def read_device(self, request: Request, strict: bool) -> Served:
        device_id = parse_device_id(request.path_params["id"])
        record = await get_device(self._db, device_id) if device_id is not None else None
        if record is None:
            raise ResourceNotFound("no Device with this id")
        return self._fhir(device_resource(record))

    async def search_devices(self, request: Request, strict: bool) -> Served:
        search = parse_device_search(
            request.query_params.multi_items(), strict=strict, **self._limits()
        )
        idents: list[tuple[str | None, str]] = []
        for token in search.identifiers:
            assert token.code is not None  # noqa: S101 - parse_identifier requires a value
            if token.system is None:
                idents.append((None, token.code))
            elif token.system.startswith(UNIT_SYSTEM_PREFIX):
                idents.append((token.system[len(UNIT_SYSTEM_PREFIX) :], token.code))
        return await self._id_page(
            request,
            search.paging,
            search.digest(),
            lambda: count_devices(self._db, idents),
            lambda after, limit: search_devices(self._db, idents, after, limit),
            device_resource,
            DEVICE_PARAMETERS,
        )

    # --- AuditEvent ---

    async def search_audit_events(self, request: Request, strict: bool) -> Served:
        search = parse_audit_search(
            request.query_params.multi_items(), strict=strict, **self._limits()
        )
        if search.dates.excluded:
            raise SearchParameterError("date", "prefix 'ne' is not supported for AuditEvent")
        query = AuditQuery(
            patient_ids=(
                tuple(await self._whose(search.patient)) if search.patient is not None else None
            ),
            agents=search.agents,
            start=search.dates.range.start,
            end=search.dates.range.end,
        )
        return await self._id_page(
            request,
            search.paging,
            search.digest(),
            lambda: count_access(self._db, query),
            lambda after, limit: search_access(self._db, query, after, limit),
            audit_event_resource,
            AUDIT_PARAMETERS,
        )

    # --- public documents ---

    async def metadata(self, request: Request) -> Response:
        return FhirResponse(capability_statement(self._base(request)))


def _served(
    handler: Callable[[Request, bool], Awaitable[tuple[Response, tuple[int, ...]]]],
) -> Handler:
    async def served(request: Request, strict: bool) -> Served:
        response, patients = await handler(request, strict)
        return Served(response, patients)

    return served


def _subjects(rows: Sequence[VitalRecord | LabObservationRecord]) -> tuple[int, ...]:
    """The patients whose data Observations of `rows` carry: what `patients_in` reads from them."""
    return tuple(sorted({r.subject_id for r in rows}))


def _observation(row: VitalRecord | LabObservationRecord) -> JsonObject:
    if isinstance(row, LabObservationRecord):
        return lab_observation_resource(row)
    return observation_resource(row)


async def _openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


def create_app(
    *,
    pool: asyncpg.Pool,
    metrics: Metrics,
    readiness: Callable[[], Mapping[str, bool]],
    api: ApiSettings,
    dicom_storage: Path | None = None,
) -> Starlette:
    """The HTTP application: `/healthz`, `/readyz`, `/metrics`, `/fhir/metadata`, `/openapi.json`
    (no token), `/fhir/...` and, given the DICOM store's folder, `/dicomweb/...` (bearer token,
    audited)."""
    fhir = _FhirApi(pool, api)
    read, search = Interaction.READ, Interaction.SEARCH

    def route(
        path: str,
        resource: str,
        interaction: Interaction,
        action: str,
        h: Handler,
        *,
        by_patient: bool = False,
    ) -> Route:
        endpoint = fhir.endpoint(resource, interaction, action, h, by_patient=by_patient)
        return Route(path, endpoint, methods=["GET"])

    routes = [
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/readyz", _readyz(readiness), methods=["GET"]),
        Route("/metrics", _metrics(metrics.registry), methods=["GET"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
        Route("/fhir/metadata", fhir.metadata, methods=["GET"]),
        route("/fhir/Patient", "Patient", search, "search-type", fhir.search_patients),
        route("/fhir/Patient/{id}", "Patient", read, "read", fhir.read_patient),
        route(
            "/fhir/Observation",
            "Observation",
            search,
            "search-type",
            fhir.search_observations,
            by_patient=True,
        ),
        route(
            "/fhir/Observation/$lastn",
            "Observation",
            search,
            "operation",
            fhir.lastn,
            by_patient=True,
        ),
        route("/fhir/Observation/{id}", "Observation", read, "read", fhir.read_observation),
        route(
            "/fhir/ImagingStudy",
            "ImagingStudy",
            search,
            "search-type",
            fhir.search_imaging_studies,
            by_patient=True,
        ),
        route(
            "/fhir/DiagnosticReport",
            "DiagnosticReport",
            search,
            "search-type",
            fhir.search_diagnostic_reports,
            by_patient=True,
        ),
        route(
            "/fhir/DiagnosticReport/{id}",
            "DiagnosticReport",
            read,
            "read",
            fhir.read_diagnostic_report,
        ),
        route("/fhir/Device", "Device", search, "search-type", fhir.search_devices),
        route("/fhir/Device/{id}", "Device", read, "read", fhir.read_device),
        route(
            "/fhir/AuditEvent",
            "AuditEvent",
            search,
            "search-type",
            fhir.search_audit_events,
            by_patient=True,
        ),
    ]
    if dicom_storage is not None:
        web = DicomWeb(request_db, dicom_storage, api.base_url)
        study = "/dicomweb/studies/{study}"
        instance = study + "/series/{series}/instances/{instance}"
        for path, action, handler in (
            ("/dicomweb/studies", "search-type", web.studies),
            (study + "/series", "search-type", web.series),
            (study + "/series/{series}/instances", "search-type", web.instances),
            (instance, "read", web.retrieve),
            (instance + "/metadata", "read", web.metadata),
        ):
            interaction = Interaction.READ if action == "read" else Interaction.SEARCH
            routes.append(route(path, "ImagingStudy", interaction, action, _served(handler)))
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(access_log_middleware, metrics=metrics),
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
