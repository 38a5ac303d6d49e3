"""The audit trail of the read API: who read which patients' data, how, when, with what outcome.
The DICOM listener writes its C-GET rows here too (`protocol` "dicom": the agent is the calling AE
title, the status a DICOM one).

`record_access` writes one row and returns once it is committed (the pool runs it in its own
implicit transaction), so the HTTP layer can call it before sending a response: a response that
carried patient data always has its audit row. Rows hold the token's name, never the token; the
query's shape (parameter names and date prefixes), never its values.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from storage.params import Params
from storage.queries import Executor, run

OUTCOME_SUCCESS: Final = "0"
OUTCOME_MINOR_FAILURE: Final = "4"
OUTCOME_SERIOUS_FAILURE: Final = "8"
"""FHIR AuditEvent outcome codes (http://hl7.org/fhir/audit-event-outcome)."""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One access to record."""

    token_name: str
    action: str
    """The FHIR restful interaction: `read`, `search-type` or `operation`."""
    resource_type: str
    query_shape: str
    patient_ids: tuple[int, ...]
    outcome: str
    status: int
    protocol: str = "http"
    """`http` (the read API) or `dicom` (a C-GET)."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    recorded_at: datetime
    token_name: str
    action: str
    resource_type: str
    query_shape: str
    patient_ids: tuple[int, ...]
    outcome: str
    status: int
    protocol: str = "http"


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which rows: naming any of `patient_ids` (None: any), by any of the token names `agents`,
    recorded in [start, end)."""

    patient_ids: tuple[int, ...] | None = None
    agents: tuple[str, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None


async def record_access(db: Executor, entry: AuditEntry) -> int:
    """Write `entry`; returns its id once committed. Raises `StorageUnavailable`."""
    row = await run(
        db,
        "fetchrow",
        """INSERT INTO api_audit (token_name, action, resource_type, query_shape, patient_ids,
                                  outcome, status, protocol)
           VALUES ($1, $2, $3, $4, $5::bigint[], $6, $7, $8) RETURNING id""",
        entry.token_name,
        entry.action,
        entry.resource_type,
        entry.query_shape,
        sorted(set(entry.patient_ids)),
        entry.outcome,
        entry.status,
        entry.protocol,
    )
    return int(row["id"])


def _none(query: AuditQuery) -> bool:
    return (query.patient_ids is not None and not query.patient_ids) or (
        query.agents is not None and not query.agents
    )


def _conditions(query: AuditQuery, after_id: int | None, param: Params) -> list[str]:
    conditions = ["true"]
    if query.patient_ids is not None:
        conditions.append(f"patient_ids && {param(list(query.patient_ids), 'bigint[]')}")
    if query.agents is not None:
        conditions.append(f"token_name = ANY({param(list(query.agents), 'text[]')})")
    if query.start is not None:
        conditions.append(f"recorded_at >= {param(query.start, 'timestamptz')}")
    if query.end is not None:
        conditions.append(f"recorded_at < {param(query.end, 'timestamptz')}")
    if after_id is not None:
        conditions.append(f"id > {param(after_id, 'bigint')}")
    return conditions


async def search_access(
    db: Executor, query: AuditQuery, after_id: int | None, limit: int
) -> list[AuditRecord]:
    """Up to `limit` rows matching `query` with id above `after_id`, in id order."""
    if limit <= 0 or _none(query):
        return []
    params = Params()
    where = " AND ".join(_conditions(query, after_id, params))
    limit_param = params(limit)
    rows = await run(
        db,
        "fetch",
        f"""SELECT id, recorded_at, token_name, action, resource_type, query_shape, patient_ids,
                   outcome, status, protocol
            FROM api_audit WHERE {where} ORDER BY id LIMIT {limit_param}""",  # noqa: S608
        *params.values,
    )
    return [
        AuditRecord(
            id=r["id"],
            recorded_at=r["recorded_at"],
            token_name=r["token_name"],
            action=r["action"],
            resource_type=r["resource_type"],
            query_shape=r["query_shape"],
            patient_ids=tuple(r["patient_ids"]),
            outcome=r["outcome"],
            status=r["status"],
            protocol=r["protocol"],
        )
        for r in rows
    ]


async def count_access(db: Executor, query: AuditQuery) -> int:
    if _none(query):
        return 0
    params = Params()
    where = " AND ".join(_conditions(query, None, params))
    row = await run(
        db,
        "fetchrow",
        f"SELECT count(*) AS n FROM api_audit WHERE {where}",  # noqa: S608 - fixed fragments
        *params.values,
    )
    return int(row["n"])
