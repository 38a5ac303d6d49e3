"""Opaque keyset cursors for FHIR search paging, signed with the server's secret.

A cursor carries the `(time, id)` of the last row of a page and a digest of the search criteria
it belongs to, with an HMAC-SHA256 tag under the server's cursor secret, base64url-encoded. A
cursor that is garbage, was altered or forged, or is replayed with other criteria is refused with
`SearchParameterError` (400). Replicas behind one load balancer must share the secret
(`QANTARA_API_CURSOR_SECRET`): a cursor issued by one is followed on another. Without the setting
each process draws a random secret, and its cursors die with it.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from gateway.fhir_search import CURSOR_PARAMETER, SearchParameterError

_VERSION: Final = 2
_LAYOUT: Final = struct.Struct(">B8sqq")  # version, criteria digest, microseconds, row id
_TAG_BYTES: Final = 20  # 25 + 20 bytes: base64 without padding bits
_ENCODED_LENGTH: Final = len(
    base64.urlsafe_b64encode(bytes(_LAYOUT.size + _TAG_BYTES)).rstrip(b"=")
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
MIN_SECRET_BYTES: Final = 16


@dataclass(frozen=True, slots=True)
class CursorPosition:
    """Where the next page starts: strictly after `(time, id)`; `time` None for id-only order."""

    time: datetime | None
    id: int


class CursorCodec:
    """Signs and checks cursors with one secret (random per process when None)."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes | None = None) -> None:
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a cursor secret needs at least {MIN_SECRET_BYTES} bytes")
        self._key = secret if secret is not None else secrets.token_bytes(32)

    def _tag(self, payload: bytes) -> bytes:
        return hmac.digest(self._key, b"qantara-cursor\x00" + payload, "sha256")[:_TAG_BYTES]

    def encode(self, criteria_digest: bytes, position: CursorPosition) -> str:
        micros = 0
        if position.time is not None:
            micros = (position.time - _EPOCH) // timedelta(microseconds=1)
        payload = _LAYOUT.pack(_VERSION, criteria_digest[:8], micros, position.id)
        return base64.urlsafe_b64encode(payload + self._tag(payload)).rstrip(b"=").decode("ascii")

    def decode(self, text: str, criteria_digest: bytes, *, timed: bool) -> CursorPosition:
        """The position in `text`, which must belong to the search with `criteria_digest`."""
        if len(text) != _ENCODED_LENGTH or not text.isascii():
            raise SearchParameterError(CURSOR_PARAMETER, "not a cursor of this server")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError) as exc:
            raise SearchParameterError(CURSOR_PARAMETER, "not a cursor of this server") from exc
        payload, tag = raw[: _LAYOUT.size], raw[_LAYOUT.size :]
        if len(payload) != _LAYOUT.size or not hmac.compare_digest(tag, self._tag(payload)):
            raise SearchParameterError(CURSOR_PARAMETER, "not a cursor of this server")
        version, digest, micros, row_id = _LAYOUT.unpack(payload)
        if version != _VERSION:
            raise SearchParameterError(CURSOR_PARAMETER, "cursor of an unsupported version")
        if not hmac.compare_digest(digest, criteria_digest[:8]):
            raise SearchParameterError(CURSOR_PARAMETER, "cursor belongs to another search")
        if not timed:
            return CursorPosition(None, row_id)
        try:
            time = _EPOCH + timedelta(microseconds=micros)
        except OverflowError as exc:
            raise SearchParameterError(CURSOR_PARAMETER, "cursor out of range") from exc
        return CursorPosition(time, row_id)
