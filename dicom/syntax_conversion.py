"""The one transfer syntax conversion the gateway makes, when it sends an instance (C-GET, C-MOVE):
between implicit and explicit VR little endian, both uncompressed, so that nothing of the image
changes (PS3.5 A.1, A.2).

Instances are stored as received and sent as stored whenever the receiver takes their transfer
syntax. A workstation or PACS that proposes, or accepts, only the other little-endian syntax (many
accept Implicit VR Little Endian alone, the one every DICOM application must support) still gets
the instance: its dataset is decoded and encoded again with pydicom, in memory, so only up to
`MAX_CONVERTED` bytes. Compressed syntaxes, deflate and big endian are never converted: that
would be transcoding (a lossy step for some, a byte swap of pixel data for big endian).
"""

from __future__ import annotations

from typing import Final

from dicom.identifier import IdentifierError, decode_identifier, encode_identifier
from dicom.sop_classes import EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN

CONVERTIBLE: Final = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
MAX_CONVERTED: Final = 64 << 20
"""Largest stored file converted (decoded in memory, about three times its size at the peak)."""


class ConversionError(Exception):
    """The dataset could not be decoded or encoded again."""


def alternatives(stored: str, size: int) -> tuple[str, ...]:
    """The transfer syntaxes an instance stored in `stored`, `size` bytes, may be sent in: its
    own first, then the other little-endian one when it can be converted."""
    if stored in CONVERTIBLE and size <= MAX_CONVERTED:
        return (stored, *(ts for ts in CONVERTIBLE if ts != stored))
    return (stored,)


def convert(data: bytes, stored: str, wanted: str) -> bytes:
    """The dataset `data`, encoded in `stored`, encoded again in `wanted` (both in
    `CONVERTIBLE`). Blocking and CPU-bound: call it in a worker."""
    if stored not in CONVERTIBLE or wanted not in CONVERTIBLE:
        raise ConversionError("not between the uncompressed little-endian syntaxes")
    try:
        # The identifier codec is pydicom's dataset reader and writer for these syntaxes.
        return encode_identifier(decode_identifier(data, stored), wanted)
    except (IdentifierError, ValueError, TypeError, OSError, OverflowError) as exc:
        raise ConversionError(type(exc).__name__) from exc
