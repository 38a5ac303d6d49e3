"""DICOM status codes the SCP answers with (PS3.4 Annex B for Storage, C for Query/Retrieve).

Every handler returns one of these; the mapping from our outcomes and errors to a status lives in
`dicom.scp` (Verification, Storage) and `dicom.find_scp` (C-FIND), and nowhere else.
"""

from __future__ import annotations

from typing import Final

SUCCESS: Final = 0x0000
PENDING: Final = 0xFF00

# Storage warnings (B000 family).
ELEMENTS_DISCARDED: Final = 0xB006
"""An instance with this SOP Instance UID is already stored with other content: the first copy is
kept and the received one discarded."""

# Storage failures.
OUT_OF_RESOURCES: Final = 0xA700
"""The database cannot commit or the disk cannot take the file: retry later; nothing was kept."""
DATASET_MISMATCH: Final = 0xA900
"""The dataset's SOP Class or SOP Instance UID is not the one of the C-STORE command."""
CANNOT_UNDERSTAND: Final = 0xC000
"""The dataset cannot be parsed."""
MISSING_UID: Final = 0xC001
"""A required UID (SOP Instance, SOP Class, Study or Series Instance UID) is absent."""
INVALID_UID: Final = 0xC002
"""A UID is not a valid DICOM UID (digits and dots, at most 64 characters)."""
REFUSED: Final = 0xC003
"""The input was refused for its content (dead-lettered) for another reason."""
PROCESSING_FAILURE: Final = 0xC211
"""Our own failure."""

# Query/Retrieve C-FIND failures.
FIND_OUT_OF_RESOURCES: Final = 0xA700
FIND_IDENTIFIER_INVALID: Final = 0xA900
FIND_UNABLE_TO_PROCESS: Final = 0xC000

# Query/Retrieve C-GET and C-MOVE (PS3.4 C.4.3.1.4, C.4.2.1.5), final statuses of their
# responses:
MOVE_DESTINATION_UNKNOWN: Final = 0xA801
"""The C-MOVE's Move Destination is not one of QANTARA_DICOM_MOVE_DESTINATIONS."""
GET_TOO_MANY_MATCHES: Final = 0xA701
"""Out of resources, unable to calculate the number of matches: more than the bound, or the index
cannot be read now."""
GET_SUB_OPERATIONS_FAILED: Final = 0xA702
"""Out of resources, unable to perform sub-operations: every C-STORE sub-operation failed."""
GET_IDENTIFIER_INVALID: Final = 0xA900
"""The identifier does not match the SOP Class: no level, a level outside the model, a unique key
missing or not a UID."""
GET_SOME_FAILED: Final = 0xB000
"""Sub-operations complete, one or more failures or warnings."""

# Storage Commitment (PS3.4 J.3.2.1.1.2, N-ACTION; PS3.7 C). Statuses of the N-ACTION-RSP:
INVALID_ARGUMENT_VALUE: Final = 0x0115
"""The Action Information cannot be read: no Transaction UID, no Referenced SOP Sequence, a UID
that is not one."""
INVALID_OBJECT_INSTANCE: Final = 0x0117
"""The Requested SOP Instance is not the Storage Commitment Push Model's well-known instance."""
NO_SUCH_ACTION: Final = 0x0123
"""An Action Type ID other than 1 (Request Storage Commitment)."""
RESOURCE_LIMITATION: Final = 0x0213
"""The index cannot be read now (the database unavailable): ask again later."""
# Failure Reasons (0008,1197) of the instances the N-EVENT-REPORT lists as not committed:
NO_SUCH_OBJECT_INSTANCE: Final = 0x0112
"""No instance with this SOP Instance UID is stored."""
CLASS_INSTANCE_CONFLICT: Final = 0x0119
"""An instance with this SOP Instance UID is stored, with another SOP Class."""

REASON_STATUS: Final = {
    "unparseable": CANNOT_UNDERSTAND,
    "missing-uid": MISSING_UID,
    "invalid-uid": INVALID_UID,
    "uid-mismatch": DATASET_MISMATCH,
}
"""Rejection reason slug (metric label, dead letter reason) → status of the C-STORE response."""


def for_reason(reason: str | None) -> int:
    return REASON_STATUS.get(reason or "", REFUSED)
