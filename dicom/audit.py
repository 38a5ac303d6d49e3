"""The audit rows of the DICOM listener's reads of patient data (C-FIND, C-GET, C-MOVE), in the
read API's audit trail (`storage.audit`, protocol "dicom"): written and committed before the first
match or instance goes. The agent is the calling AE title; the shape names the operation, its
level and counts, never a UID or a value of the identifier."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from dicom import status
from storage.audit import OUTCOME_SUCCESS, AuditEntry

Auditor = Callable[[AuditEntry], Awaitable[object]]
"""Writes and commits an audit row (`storage.audit.record_access`)."""


def read_entry(calling: str, action: str, shape: str, patients: Iterable[int]) -> AuditEntry:
    """The row of one read: `action` `search-type` (C-FIND) or `read` (C-GET, C-MOVE); its
    status is Pending, since it is written before the data goes."""
    return AuditEntry(
        token_name=calling,
        action=action,
        resource_type="ImagingStudy",
        query_shape=shape,
        patient_ids=tuple(sorted(set(patients))),
        outcome=OUTCOME_SUCCESS,
        status=status.PENDING,
        protocol="dicom",
    )
