"""Opaque keyset cursors for FHIR search paging.

A cursor carries the `(time, id)` of the last row of a page and a digest of the search criteria
it belongs to, with a checksum, base64url-encoded. A cursor that is garbage, was altered, or is
replayed with other criteria is refused with `SearchParameterError` (400). The checksum is not a
secret: a cursor only says where to resume within a search the caller may already run, so forging
one gains nothing that the criteria and the token's scopes do not already allow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from gateway.fhir_search import CURSOR_PARAMETER, SearchParameterError

_VERSION: Final = 1
_LAYOUT: Final = struct.Struct(">B8sqq")  # version, criteria digest, microseconds, row id
_CHECK_BYTES: Final = 8
_ENCODED_LENGTH: Final = len(
    base64.urlsafe_b64encode(bytes(_LAYOUT.size + _CHECK_BYTES)).rstrip(b"=")
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class CursorPosition:
    """Where the next page starts: strictly after `(time, id)`; `time` None for id-only order."""

    time: datetime | None
    id: int


def _check(payload: bytes) -> bytes:
    return hashlib.sha256(b"qantara-cursor\x00" + payload).digest()[:_CHECK_BYTES]


def encode_cursor(criteria_digest: bytes, position: CursorPosition) -> str:
    micros = 0
    if position.time is not None:
        micros = (position.time - _EPOCH) // timedelta(microseconds=1)
    payload = _LAYOUT.pack(_VERSION, criteria_digest[:8], micros, position.id)
    return base64.urlsafe_b64encode(payload + _check(payload)).rstrip(b"=").decode("ascii")


def decode_cursor(text: str, criteria_digest: bytes, *, timed: bool) -> CursorPosition:
    """The position in `text`, which must belong to the search with `criteria_digest`."""
    if len(text) != _ENCODED_LENGTH or not text.isascii():
        raise SearchParameterError(CURSOR_PARAMETER, "not a cursor of this server")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SearchParameterError(CURSOR_PARAMETER, "not a cursor of this server") from exc
    payload, check = raw[: _LAYOUT.size], raw[_LAYOUT.size :]
    if len(payload) != _LAYOUT.size or check != _check(payload):
        raise SearchParameterError(CURSOR_PARAMETER, "not a cursor of this server")
    version, digest, micros, row_id = _LAYOUT.unpack(payload)
    if version != _VERSION:
        raise SearchParameterError(CURSOR_PARAMETER, "cursor of an unsupported version")
    if digest != criteria_digest[:8]:
        raise SearchParameterError(CURSOR_PARAMETER, "cursor belongs to another search")
    if not timed:
        return CursorPosition(None, row_id)
    try:
        time = _EPOCH + timedelta(microseconds=micros)
    except OverflowError as exc:
        raise SearchParameterError(CURSOR_PARAMETER, "cursor out of range") from exc
    return CursorPosition(time, row_id)
