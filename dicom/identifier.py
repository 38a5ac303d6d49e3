"""C-FIND identifiers: bytes in a presentation context's transfer syntax ↔ pydicom datasets.

Identifiers are small (a few keys): they are held in memory, decoded and encoded with pydicom in
implicit/explicit little endian, explicit big endian or deflated explicit little endian
(`dicom.sop_classes.DEFAULT_SYNTAXES`, what Verification and C-FIND contexts accept).
"""

from __future__ import annotations

import zlib
from io import BytesIO
from typing import Final

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from dicom.sop_classes import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

MAX_IDENTIFIER: Final = 1 << 20


class IdentifierError(Exception):
    """An identifier that cannot be decoded."""


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    implicit, little = _encoding(transfer_syntax)
    try:
        if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(data, MAX_IDENTIFIER)
        ds = read_dataset(BytesIO(data), implicit, little)
        for _ in ds:  # decode every element now: errors surface here, not later
            pass
    except Exception as exc:  # pydicom raises many kinds of errors on malformed input
        raise IdentifierError(type(exc).__name__) from exc
    return ds


def encode_identifier(ds: Dataset, transfer_syntax: str) -> bytes:
    implicit, little = _encoding(transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = implicit
    buffer.is_little_endian = little
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return data


def _encoding(transfer_syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian)."""
    return (
        transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
        transfer_syntax != EXPLICIT_VR_BIG_ENDIAN,
    )
