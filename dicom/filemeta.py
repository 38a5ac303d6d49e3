"""The Part 10 header of a received instance: preamble, `DICM`, File Meta Information (group
0002, explicit VR little endian), PS3.10 §7.1. Sans-IO: bytes out.

The listener writes it before the dataset bytes as received, so that a stored file is a Part 10
file `read_metadata` and any viewer can open. Its content depends on the command's SOP Class and
Instance UIDs and on the accepted transfer syntax only: the same instance sent again gives the
same bytes, hence the same content name.
"""

from __future__ import annotations

import struct
from typing import Final

from dicom.negotiation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION

PREAMBLE: Final = bytes(128) + b"DICM"
_SHORT: Final = struct.Struct("<HH2sH")
_LONG: Final = struct.Struct("<HH2s2xI")
_MAX_SHORT: Final = 0xFFFF


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and group 0002 for an instance of `sop_class`/`sop_instance`."""
    body = b"".join(
        (
            _LONG.pack(0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
            _short(0x0002, "UI", _uid(sop_class)),
            _short(0x0003, "UI", _uid(sop_instance)),
            _short(0x0010, "UI", _uid(transfer_syntax)),
            _short(0x0012, "UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _short(0x0013, "SH", _padded(IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
        )
    )
    length = _SHORT.pack(0x0002, 0x0000, b"UL", 4) + struct.pack("<I", len(body))
    return PREAMBLE + length + body


def _short(element: int, vr: str, value: bytes) -> bytes:
    value = value[: _MAX_SHORT - 1]
    return _SHORT.pack(0x0002, element, vr.encode("ascii"), len(value)) + value


def _uid(text: str) -> bytes:
    return _padded(text.encode("latin-1", "replace"), b"\x00")


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad * (len(value) % 2)


def dataset_offset(head: bytes) -> int:
    """Where the dataset starts in a stored file whose first bytes are `head` (at least the
    preamble, the prefix and the File Meta Information Group Length, 144 bytes): after group
    0002, whose length that element gives. Raises ValueError for a file that is not Part 10
    with a group length (every file the listener writes has one)."""
    start = len(PREAMBLE)
    if len(head) < start + 12 or head[:start] != PREAMBLE:
        raise ValueError("not a Part 10 file")
    group, element, vr, length = _SHORT.unpack_from(head, start)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise ValueError("no File Meta Information Group Length")
    (group_length,) = struct.unpack_from("<I", head, start + 8)
    return start + 12 + int(group_length)
