"""The audit rows of the DICOM listener's reads of patient data (C-FIND, C-GET, C-MOVE), in the
read API's audit trail (`storage.audit`, protocol "dicom"): written and committed before the first
match or instance goes; a C-GET's or C-MOVE's end has a row of its own, with its counts and final
status. The agent is the calling AE title; the shape names the operation, its level and counts,
never a UID or a value of the identifier."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from dicom import dimse, status
from storage.audit import (
    OUTCOME_MINOR_FAILURE,
    OUTCOME_SERIOUS_FAILURE,
    OUTCOME_SUCCESS,
    AuditEntry,
)

Auditor = Callable[[AuditEntry], Awaitable[object]]
"""Writes and commits an audit row (`storage.audit.record_access`)."""


def read_entry(calling: str, action: str, shape: str, patients: Iterable[int]) -> AuditEntry:
    """The row of one read: `action` `search-type` (C-FIND) or `read` (C-GET, C-MOVE); its
    status is Pending, since it is written before the data goes."""
    return _entry(calling, action, shape, patients, OUTCOME_SUCCESS, status.PENDING)


TRANSFERRED = "transferred"
"""The action of a transfer's end row (DCM 110104 "DICOM Instances Transferred")."""


def transferred_entry(calling: str, shape: str, patients: Iterable[int], code: int) -> AuditEntry:
    """The row of a C-GET's or C-MOVE's end: its final status `code`, and the outcome it means
    (success; minor failure for some failed or a cancel; serious failure for all failed)."""
    if code == status.SUCCESS:
        outcome = OUTCOME_SUCCESS
    elif code in (status.GET_SOME_FAILED, dimse.CANCEL):
        outcome = OUTCOME_MINOR_FAILURE
    else:
        outcome = OUTCOME_SERIOUS_FAILURE
    return _entry(calling, TRANSFERRED, shape, patients, outcome, code)


def _entry(
    calling: str, action: str, shape: str, patients: Iterable[int], outcome: str, code: int
) -> AuditEntry:
    return AuditEntry(
        token_name=calling,
        action=action,
        resource_type="ImagingStudy",
        query_shape=shape,
        patient_ids=tuple(sorted(set(patients))),
        outcome=outcome,
        status=code,
        protocol="dicom",
    )
