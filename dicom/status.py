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

REASON_STATUS: Final = {
    "unparseable": CANNOT_UNDERSTAND,
    "missing-uid": MISSING_UID,
    "invalid-uid": INVALID_UID,
    "uid-mismatch": DATASET_MISMATCH,
}
"""Rejection reason slug (metric label, dead letter reason) → status of the C-STORE response."""


def for_reason(reason: str | None) -> int:
    return REASON_STATUS.get(reason or "", REFUSED)
