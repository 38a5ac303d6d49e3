"""The elements of a Part 10 file, walked without decoding them. Sans-IO: a buffer in (bytes,
memoryview or a read-only mmap of the file), positions and raw values out.

`read_metadata` needs two dozen values of a header and the assurance that the dataset ends where
the file ends (a transfer cut short is refused). pydicom's reader builds a Python object per
element and reads the file through a buffered reader that asks the kernel for its position
dozens of times per file, each time letting go of the GIL; in the listener, beside a thread
that fsyncs and an event loop that receives, that parse cost 2 ms of CPU per 0.5 MB instance.
`walk_file` unpacks only element headers, keeps the values asked for (slices of the buffer),
jumps over the others (pixel data included) by their lengths, and walks encapsulated pixel data
and sequences of undefined length item by item to their delimiters. `walk_items` does the same in
the items of a sequence's value that `walk_file` kept (Other Patient IDs).

It reads what the listener writes, and clean files only: explicit or implicit VR little endian
after an explicit little endian group 0002. Anything else (big endian, deflate, tags out of
order, an unknown VR, a length past the end, bytes left after the last element, no `DICM`)
raises `HeaderError`, and the caller reads the file with pydicom instead, which then decides
what it can parse and what is refused.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from dicom.sop_classes import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)

Buffer = bytes | bytearray | memoryview | mmap.mmap
"""What `struct.unpack_from` reads and slicing copies from."""

UNDEFINED: Final = 0xFFFFFFFF
PREFIX: Final = 132  # preamble and "DICM"
TRANSFER_SYNTAX: Final = 0x00020010
ITEM: Final = 0xFFFEE000
ITEM_END: Final = 0xFFFEE00D
SEQUENCE_END: Final = 0xFFFEE0DD
MAX_DEPTH: Final = 16

_TAG: Final = struct.Struct("<HH")
_IMPLICIT: Final = struct.Struct("<HHI")
_EXPLICIT_SHORT: Final = struct.Struct("<HH2sH")
_LONG_LENGTH: Final = struct.Struct("<I")
_LONG_VRS: Final = frozenset(
    b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split()
)  # PS3.5 7.1.2: two reserved bytes, then a 4-byte length
_SHORT_VRS: Final = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
_UNSUPPORTED: Final = frozenset({EXPLICIT_VR_BIG_ENDIAN, DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN})


class HeaderError(Exception):
    """Not a file `walk_file` reads; read it with pydicom instead."""


@dataclass(frozen=True, slots=True)
class RawElement:
    """An element as found: its VR (None in implicit VR), its length as written (`UNDEFINED`
    for a sequence closed by a delimiter), where its value starts and its value's bytes (for
    an undefined length, up to and including the sequence delimiter)."""

    tag: int
    vr: str | None
    length: int
    offset: int
    value: bytes


@dataclass(frozen=True, slots=True)
class WalkedFile:
    transfer_syntax: str
    implicit: bool
    elements: dict[int, RawElement]
    """The top-level elements asked for that the dataset holds."""


def walk_file(data: Buffer, wanted: Collection[int]) -> WalkedFile:
    """Walk a whole Part 10 file; keep the top-level elements whose tags are in `wanted`."""
    end = len(data)
    if end < PREFIX or bytes(data[128:PREFIX]) != b"DICM":
        raise HeaderError("no Part 10 prefix")
    position = PREFIX
    transfer_syntax: str | None = None
    while position + 4 <= end and _TAG.unpack_from(data, position)[0] == 0x0002:
        tag, vr, length, start = _header(data, position, end, implicit=False)
        position = _skip(data, start, end, False, vr, length, 0)
        if tag == TRANSFER_SYNTAX:
            transfer_syntax = (
                bytes(data[start:position]).rstrip(b"\x00 ").decode("ascii", "replace")
            )
    if transfer_syntax is None or transfer_syntax in _UNSUPPORTED:
        raise HeaderError("transfer syntax not walked here")
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    if position >= end:
        raise HeaderError("no dataset after the file meta")
    found: dict[int, RawElement] = {}
    previous = 0x0002FFFF
    while position < end:
        tag, vr, length, start = _header(data, position, end, implicit)
        if tag <= previous or tag >> 16 == 0xFFFE:
            raise HeaderError("tags out of order")
        previous = tag
        position = _skip(data, start, end, implicit, vr, length, 0)
        if tag in wanted:
            found[tag] = RawElement(tag, vr, length, start, bytes(data[start:position]))
    return WalkedFile(transfer_syntax, implicit, found)


def walk_items(
    value: Buffer, implicit: bool, wanted: Collection[int]
) -> list[dict[int, RawElement]]:
    """The items of a sequence's value as `walk_file` keeps it (defined length, or up to and
    including its delimiter), each as its elements whose tags are in `wanted` (offsets within
    `value`). Raises `HeaderError` for anything but items, or items not walked to their end."""
    items: list[dict[int, RawElement]] = []
    position, end = 0, len(value)
    while position < end:
        if position + 8 > end:
            raise HeaderError("item header cut")
        group, number, length = _IMPLICIT.unpack_from(value, position)
        position += 8
        if group << 16 | number == SEQUENCE_END:
            if position != end:
                raise HeaderError("bytes after the sequence delimiter")
            break
        if group << 16 | number != ITEM:
            raise HeaderError("not an item")
        if length == UNDEFINED:
            found, position = _item_elements(value, position, end, implicit, wanted, True)
        elif position + length > end:
            raise HeaderError("item past the end")
        else:
            found, position = _item_elements(
                value, position, position + length, implicit, wanted, False
            )
        items.append(found)
    return items


def _item_elements(
    data: Buffer, position: int, end: int, implicit: bool, wanted: Collection[int], delimited: bool
) -> tuple[dict[int, RawElement], int]:
    """The wanted elements of one item and the position after it: `end` for a defined length,
    after its item delimiter for an undefined one."""
    found: dict[int, RawElement] = {}
    previous = -1
    while delimited or position < end:
        if position + 8 > end:
            raise HeaderError("item not closed")
        group, number = _TAG.unpack_from(data, position)
        tag = group << 16 | number
        if tag == ITEM_END and delimited:
            return found, position + 8
        if group == 0xFFFE or tag <= previous:
            raise HeaderError("tags out of order")
        previous = tag
        _, vr, length, start = _header(data, position, end, implicit)
        position = _skip(data, start, end, implicit, vr, length, 1)
        if tag in wanted:
            found[tag] = RawElement(tag, vr, length, start, bytes(data[start:position]))
    return found, position


def _header(
    data: Buffer, position: int, end: int, implicit: bool
) -> tuple[int, str | None, int, int]:
    """Tag, VR (None in implicit VR), length and value position of the element at `position`."""
    if position + 8 > end:
        raise HeaderError("element header cut")
    if implicit:
        group, number, length = _IMPLICIT.unpack_from(data, position)
        return group << 16 | number, None, length, position + 8
    group, number, code, length = _EXPLICIT_SHORT.unpack_from(data, position)
    if code in _SHORT_VRS:
        return group << 16 | number, code.decode("ascii"), length, position + 8
    if code not in _LONG_VRS:
        raise HeaderError("unknown VR")
    if position + 12 > end:
        raise HeaderError("element header cut")
    (length,) = _LONG_LENGTH.unpack_from(data, position + 8)
    return group << 16 | number, code.decode("ascii"), length, position + 12


def _skip(
    data: Buffer, start: int, end: int, implicit: bool, vr: str | None, length: int, depth: int
) -> int:
    """Where the value starting at `start` ends."""
    if length == UNDEFINED:
        if vr not in (None, "SQ", "UN", "OB", "OW"):
            raise HeaderError("undefined length for this VR")
        return _items(data, start, end, implicit, depth)
    after = start + length
    if after > end:
        raise HeaderError("value past the end")
    return after


def _items(data: Buffer, position: int, end: int, implicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length value (a sequence, or encapsulated pixel data)
    up to and including its sequence delimiter; returns the position after it."""
    if depth > MAX_DEPTH:
        raise HeaderError("sequences nested too deep")
    while True:
        if position + 8 > end:
            raise HeaderError("sequence not closed")
        group, number, length = _IMPLICIT.unpack_from(data, position)
        tag = group << 16 | number
        position += 8
        if tag == SEQUENCE_END:
            return position
        if tag != ITEM:
            raise HeaderError("not an item")
        if length != UNDEFINED:
            position += length
            if position > end:
                raise HeaderError("item past the end")
        else:
            position = _item_dataset(data, position, end, implicit, depth + 1)


def _item_dataset(data: Buffer, position: int, end: int, implicit: bool, depth: int) -> int:
    """Skip the elements of an undefined-length item, up to and including its delimiter."""
    while True:
        if position + 8 > end:
            raise HeaderError("item not closed")
        group, number = _TAG.unpack_from(data, position)
        if group << 16 | number == ITEM_END:
            return position + 8
        _, vr, length, start = _header(data, position, end, implicit)
        position = _skip(data, start, end, implicit, vr, length, depth)
