"""C-GET and C-MOVE, sans-IO: what an identifier asks for, and how the sub-operations are counted
and answered (PS3.4 C.4.2, C.4.3; PS3.7 9.1.3, 9.1.4).

`retrieve_keys(identifier, model)` reads the unique keys of a decoded identifier (hierarchical
retrieve, C.4.3.1.3.1): the retrieve level's own key is required (PatientID at PATIENT, Study,
Series or SOP Instance UIDs below: one or more values), the keys above it are optional, one value
each, and narrow the match. Anything else in the identifier is ignored. A level outside the model,
a missing unique key, a UID that is not one: `RetrieveError` (0xA900).

`Progress` counts the C-STORE sub-operations as their responses come back (PS3.4 C.4.3.1.4:
0x0000 completed, 0xB000 family warning, anything else failed) and gives the C-GET-RSP counts and
the final status: success when every sub-operation completed (none at all included), 0xB000 when
some failed or had warnings, 0xA702 when all of them failed, Cancel after a C-CANCEL. The
identifier of a final response other than success lists the Failed SOP Instance UIDs (0008,0058)
(for Cancel, those not sent too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom import dimse, sop_classes, status
from dicom.metadata import valid_uid
from storage.dicom_queries import RetrieveKeys

_LEVEL_KEY: Final = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_UID_KEYS: Final = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_ORDER: Final = ("PATIENT", "STUDY", "SERIES", "IMAGE")


class RetrieveError(ValueError):
    """The identifier does not name what to retrieve (answered 0xA900 with this comment)."""


def retrieve_keys(identifier: Dataset, model: str) -> RetrieveKeys:
    """The unique keys of a C-GET or C-MOVE identifier of the information model `model`."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in _LEVEL_KEY:
        raise RetrieveError("unknown query/retrieve level")
    if level not in sop_classes.RETRIEVE_LEVELS[model]:
        raise RetrieveError("level not in this retrieve model")
    depth = _ORDER.index(level)
    values: dict[str, tuple[str, ...]] = {}
    for keyword in ("PatientID", *_UID_KEYS):
        found = _values(identifier, keyword)
        if keyword == _LEVEL_KEY[level]:
            if not found:
                raise RetrieveError(f"no {keyword}")
        elif len(found) > 1:
            raise RetrieveError(f"more than one {keyword} above the retrieve level")
        if keyword in _UID_KEYS and not all(valid_uid(uid) for uid in found):
            raise RetrieveError(f"{keyword} is not a UID")
        if keyword != "PatientID" and _ORDER.index(_level_of(keyword)) > depth:
            found = ()  # a key below the retrieve level: not a unique key of this request
        values[keyword] = found
    patient = values["PatientID"]
    return RetrieveKeys(
        level=level,
        patient_id=patient[0] if patient else "",
        study_uids=values["StudyInstanceUID"],
        series_uids=values["SeriesInstanceUID"],
        instance_uids=values["SOPInstanceUID"],
    )


def _level_of(keyword: str) -> str:
    return next(level for level, key in _LEVEL_KEY.items() if key == keyword)


def _values(identifier: Dataset, keyword: str) -> tuple[str, ...]:
    value = identifier.get(keyword)
    if value is None or value == "":
        return ()
    items = value if isinstance(value, MultiValue | list | tuple) else str(value).split("\\")
    return tuple(text for item in items if (text := str(item).strip()))


@dataclass(slots=True)
class Progress:
    """The sub-operations of one C-GET: `total` to send, the outcome of each as it comes."""

    total: int
    completed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failed_uids)

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.warning - self.failed

    def answered(self, sop_instance_uid: str, code: int | None) -> str:
        """Count a sub-operation from its C-STORE-RSP status; its metric label."""
        if code == status.SUCCESS:
            self.completed += 1
            return "completed"
        if code is not None and code >> 12 == 0xB:
            self.warning += 1
            return "warning"
        self.failed_uids.append(sop_instance_uid)
        return "failed"

    def not_sent(self, sop_instance_uid: str) -> str:
        """Count a sub-operation that failed before or without its C-STORE-RSP (no context
        for it, its file unreadable, the destination gone); its metric label."""
        self.failed_uids.append(sop_instance_uid)
        return "failed"

    def pending(self, request: dimse.Command) -> dimse.Command:
        counts = (self.remaining, self.completed, self.failed, self.warning)
        return dimse.retrieve_response(request, status.PENDING, counts)

    def final_status(self, cancelled: list[str]) -> int:
        """The last response's status: Cancel, Success, all failed (0xA702) or some (0xB000)."""
        if cancelled:
            return dimse.CANCEL
        if not self.failed_uids and not self.warning:
            return status.SUCCESS
        if self.failed_uids and not self.completed and not self.warning:
            return status.GET_SUB_OPERATIONS_FAILED
        return status.GET_SOME_FAILED

    def final(
        self, request: dimse.Command, cancelled: list[str]
    ) -> tuple[dimse.Command, Dataset | None]:
        """The last C-GET-RSP and its identifier (None on success). `cancelled`: the SOP
        Instance UIDs not sent because a C-CANCEL came (their number is the remaining count)."""
        failed = self.failed_uids
        code = self.final_status(cancelled)
        remaining = len(cancelled) if cancelled else None
        identifier: Dataset | None = None
        if failed or cancelled:
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = [*failed, *cancelled]
        counts = (remaining, self.completed, self.failed, self.warning)
        command = dimse.retrieve_response(request, code, counts, identifier=identifier is not None)
        return command, identifier
