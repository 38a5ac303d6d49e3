"""Storage Commitment Push Model (PS3.4 Annex J), as the SCP, sans-IO: the Action Information of
an N-ACTION in, the Event Information of the N-EVENT-REPORT out.

A modality asks whether the gateway has taken responsibility for a list of instances (a
transaction); the answer names those it has and those it has not, and the modality may then
delete its own copies of the first. "Has" means what 0x0000 meant when the instance was stored:
the index names an instance with that SOP Instance UID and the same SOP Class, and the index row
is committed only once the file and its folder are fsynced. An instance never stored is
`NO_SUCH_OBJECT_INSTANCE`; one stored with another SOP Class, `CLASS_INSTANCE_CONFLICT`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom import status
from dicom.metadata import valid_uid

REQUEST_COMMITMENT: Final = 1
"""Action Type ID of a request for storage commitment (PS3.4 J.3.2.1.1)."""
ALL_COMMITTED: Final = 1
"""Event Type ID of a report without failures (PS3.4 J.3.3.1.1)."""
SOME_FAILED: Final = 2
"""Event Type ID of a report with failures."""
MAX_REFERENCES: Final = 10_000
"""References one request may carry: a CT study of a few thousand slices fits."""


class CommitmentError(Exception):
    """Action Information we cannot act on; `status` is the N-ACTION-RSP's."""

    def __init__(self, detail: str, code: int = status.INVALID_ARGUMENT_VALUE) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = code


@dataclass(frozen=True, slots=True)
class Reference:
    sop_class: str
    sop_instance: str


@dataclass(frozen=True, slots=True)
class CommitmentRequest:
    transaction_uid: str
    references: tuple[Reference, ...]

    @property
    def instance_uids(self) -> list[str]:
        return sorted({r.sop_instance for r in self.references})


@dataclass(frozen=True, slots=True)
class CommitmentReport:
    """The N-EVENT-REPORT's Event Type ID and Event Information."""

    event_type: int
    information: Dataset
    committed: int
    failed: dict[int, int]  # Failure Reason -> how many


def read_request(information: Dataset) -> CommitmentRequest:
    """The transaction an N-ACTION's Action Information asks about. Raises `CommitmentError`."""
    transaction = _uid(information, "TransactionUID")
    if not transaction:
        raise CommitmentError("no valid Transaction UID")
    items = information.get("ReferencedSOPSequence")
    if not isinstance(items, Sequence) or len(items) == 0:
        raise CommitmentError("no Referenced SOP Sequence")
    if len(items) > MAX_REFERENCES:
        raise CommitmentError(f"more than {MAX_REFERENCES} references")
    references = []
    for item in items:
        sop_class = _uid(item, "ReferencedSOPClassUID")
        sop_instance = _uid(item, "ReferencedSOPInstanceUID")
        if not sop_class or not sop_instance:
            raise CommitmentError("a reference without valid SOP Class and Instance UIDs")
        references.append(Reference(sop_class, sop_instance))
    return CommitmentRequest(transaction, tuple(references))


def report(request: CommitmentRequest, held: Mapping[str, str]) -> CommitmentReport:
    """The report of `request`, `held` giving the SOP Class of each instance the index names
    (by SOP Instance UID); references in the order they came."""
    committed: list[Reference] = []
    failures: list[tuple[Reference, int]] = []
    for reference in request.references:
        stored_class = held.get(reference.sop_instance)
        if stored_class is None:
            failures.append((reference, status.NO_SUCH_OBJECT_INSTANCE))
        elif stored_class != reference.sop_class:
            failures.append((reference, status.CLASS_INSTANCE_CONFLICT))
        else:
            committed.append(reference)
    information = Dataset()
    information.TransactionUID = request.transaction_uid
    if committed:
        information.ReferencedSOPSequence = [_item(reference) for reference in committed]
    if failures:
        items = []
        for reference, reason in failures:
            item = _item(reference)
            item.FailureReason = reason
            items.append(item)
        information.FailedSOPSequence = items
    counts: dict[int, int] = {}
    for _, reason in failures:
        counts[reason] = counts.get(reason, 0) + 1
    event_type = SOME_FAILED if failures else ALL_COMMITTED
    return CommitmentReport(event_type, information, len(committed), counts)


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID element's value when it is a valid UID, else ''."""
    value = str(ds.get(keyword, "") or "").strip()
    return value if valid_uid(value) else ""


def _item(reference: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.sop_class
    item.ReferencedSOPInstanceUID = reference.sop_instance
    return item
