"""MLLP framing as a sans-IO state machine: bytes in, events out, no sockets, no clock.

A frame is ``0x0B payload 0x1C 0x0D``. `MllpFramer.receive_data` takes whatever a read returned
(several frames, a frame cut anywhere, ``b""`` for end of stream) and returns the events it
completed. A bad peer raises `FramingError` and leaves the framer in `MllpState.ERROR`. The
buffer is bounded inside the core: it never holds more than ``max_message_bytes`` payload bytes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NoReturn

from ingest.errors import InputError

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_START = 0x0B
_CR = 0x0D
_FS = b"\x1c"
# Between frames only whitespace may appear; anything else before a start block is junk.
_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")


class FramingError(InputError):
    """The peer broke MLLP framing; the connection cannot be resynchronised and must be closed."""


class MllpState(enum.Enum):
    """Where the framer is: between frames, inside a payload, just after 0x1C, or finished."""

    IDLE = "idle"
    IN_FRAME = "in-frame"
    END_BLOCK = "end-block"
    CLOSED = "closed"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Message:
    """One complete MLLP payload (an ER7 message, still bytes)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer ended the stream cleanly, between frames."""


MllpEvent = Message | ConnectionClosed


class MllpFramer:
    """Turns a byte stream into `Message` events and payloads into frames.

    Messages completed in the same chunk before a framing error are returned first; the error is
    then raised by the next call (check `state` or `pending_error` to close without waiting).
    """

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        self.max_message_bytes = max_message_bytes
        self._state = MllpState.IDLE
        self._partial = bytearray()
        self._complete = b""
        self._error: FramingError | None = None

    @property
    def state(self) -> MllpState:
        return self._state

    @property
    def pending_error(self) -> FramingError | None:
        """The error that put the framer in ERROR, if any."""
        return self._error

    @property
    def buffered_bytes(self) -> int:
        """Payload bytes held for a frame not yet complete (at most ``max_message_bytes``)."""
        return len(self._partial) + len(self._complete)

    def frame(self, payload: bytes) -> bytes:
        """Wrap one payload in MLLP start and end blocks."""
        if START_BLOCK in payload or _FS in payload:
            raise ValueError("an MLLP payload cannot contain 0x0B or 0x1C")
        return START_BLOCK + payload + END_BLOCK

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[MllpEvent]:
        """Feed bytes from the peer (``b""`` at end of stream); return the completed events."""
        if self._error is not None:
            raise FramingError(self._error.reason, self._error.detail)
        if self._state is MllpState.CLOSED:
            if data:
                self._fail("mllp-data-after-close", "bytes received after end of stream")
            return []
        if not data:
            if self._state is not MllpState.IDLE:
                self._fail("mllp-truncated-frame", "end of stream inside a frame")
            self._state = MllpState.CLOSED
            return [ConnectionClosed()]
        if not isinstance(data, bytes):
            data = bytes(data)  # a bytearray or memoryview from the shell: payloads stay immutable
        events: list[MllpEvent] = []
        try:
            self._consume(data, events)
        except FramingError:
            if not events:
                raise
        return events

    def _consume(self, data: bytes, events: list[MllpEvent]) -> None:
        i = 0
        n = len(data)
        limit = self.max_message_bytes
        while i < n:
            state = self._state
            if state is MllpState.IDLE:
                match = _NOT_WHITESPACE.search(data, i)
                if match is None:
                    return
                j = match.start()
                if data[j] != _START:
                    self._fail("mllp-junk-before-start", f"byte 0x{data[j]:02x} outside a frame")
                self._state = MllpState.IN_FRAME
                i = j + 1
            elif state is MllpState.IN_FRAME:
                k = data.find(_FS, i)
                stop = n if k < 0 else k
                if data.find(START_BLOCK, i, stop) >= 0:
                    self._fail("mllp-start-inside-frame", "0x0B inside a frame")
                size = len(self._partial) + stop - i
                if size > limit:
                    self._fail(
                        "mllp-message-too-large", f"message exceeds {limit} bytes (at least {size})"
                    )
                if k < 0:
                    self._partial += data[i:]
                    return
                if self._partial:
                    self._partial += data[i:k]
                    self._complete = bytes(self._partial)
                    self._partial.clear()
                else:
                    self._complete = data[i:k]
                self._state = MllpState.END_BLOCK
                i = k + 1
            else:  # END_BLOCK: the byte after 0x1C must be 0x0D
                if data[i] != _CR:
                    self._fail("mllp-bad-end-block", f"0x1c followed by 0x{data[i]:02x}")
                events.append(Message(self._complete))
                self._complete = b""
                self._state = MllpState.IDLE
                i += 1

    def _fail(self, reason: str, detail: str) -> NoReturn:
        error = FramingError(reason, detail)
        self._error = error
        self._state = MllpState.ERROR
        self._partial = bytearray()
        self._complete = b""
        raise error
