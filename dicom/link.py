"""The asyncio transport of one association: bytes from the socket into its sans-IO endpoint (an
`Acceptor` for the listener's associations, a `Requestor` for those the gateway opens), its events
into a queue for the association's task, bytes back out with flow control.

`Link` is an `asyncio.Protocol`: `data_received` feeds the endpoint and queues the events it
yields, so the socket is read while the association's task writes a fragment or waits for a
commit. Backpressure: while the bytes received and not yet taken by the task (queued fragments,
and what the endpoint holds, e.g. while the association request is being decided) exceed
`high_water`, reading pauses. A write waits for the peer to read, at most `send_timeout`. A
C-CANCEL-RQ is noted as it arrives (`cancelled`), so that a C-FIND streaming its matches sees it
between two responses.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Final, Generic, TypeVar, cast

from dicom.association import (
    CommandReceived,
    ConnectionClosed,
    DatasetComplete,
    DatasetFragment,
    Endpoint,
    Event,
    ProtocolError,
)
from dicom.dimse import C_CANCEL_RQ, Command
from ingest.tls import common_names

E = TypeVar("E", bound=Endpoint)

TIMED_OUT: Final = "timed out"
Ended = Event | str
"""What ended an association while a handler was reading: an event, or `TIMED_OUT`."""
STUCK_WRITES: Final = 256 * 1024
"""Unsent bytes at close beyond which the connection is dropped rather than flushed."""


class Link(asyncio.Protocol, Generic[E]):
    """One connection; the association's task reads `next_event` and writes with `send`."""

    def __init__(
        self,
        endpoint: E,
        high_water: int,
        send_timeout: float,
        on_made: Callable[[Link[E]], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._on_made = on_made
        self._high_water = high_water
        self._send_timeout = send_timeout
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._queued_bytes = 0
        self._paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._transport: asyncio.Transport | None = None
        self._cancelled: set[int] = set()
        self._message_ids = itertools.count(1)
        self._refused = False
        self.closed = False
        self.certified_names: frozenset[str] = frozenset()
        """The subject commonNames of the peer's TLS certificate, verified by the handshake
        against the client CA; empty without TLS or without a client certificate."""

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # a stream server's transport
        self.certified_names = common_names(transport.get_extra_info("peercert"))
        if self._refused:
            self._transport.abort()
        elif self._on_made is not None:
            self._on_made(self)  # may refuse, which aborts

    def data_received(self, data: bytes) -> None:
        self.endpoint.receive_data(data)
        self.pump()

    def eof_received(self) -> bool:
        self.endpoint.receive_data(b"")
        self.pump()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self.endpoint.receive_data(b"")
        self.pump()
        self._events.put_nowait(ConnectionClosed())  # in case the endpoint had ended already

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- for the association's task ---------------------------------------------------------

    def pump(self) -> None:
        """Queue what the endpoint can tell now (after data, and after `accept`)."""
        while (event := self.endpoint.next_event()) is not None:
            if isinstance(event, DatasetFragment):
                self._queued_bytes += len(event.data)
            elif isinstance(event, CommandReceived) and event.command.command_field == C_CANCEL_RQ:
                self._cancelled.add(event.command.responded_to or 0)
            self._events.put_nowait(event)
        if self._backlog > self._high_water and not self._paused and self._transport:
            self._paused = True
            self._transport.pause_reading()

    @property
    def _backlog(self) -> int:
        return self._queued_bytes + self.endpoint.buffered

    async def next_event(self, within: float) -> Event | str:
        """The next event, or `TIMED_OUT` when none came within `within` seconds."""
        if self._events.empty():
            try:
                async with asyncio.timeout(within):
                    event = await self._events.get()
            except TimeoutError:
                return TIMED_OUT
        else:
            event = self._events.get_nowait()
        if isinstance(event, DatasetFragment):
            self._queued_bytes -= len(event.data)
        if self._paused and self._backlog <= self._high_water // 2 and self._transport:
            self._paused = False
            self._transport.resume_reading()
        return event

    async def receive_dataset(
        self, sink: Callable[[bytes | memoryview], None], within: float
    ) -> Ended | None:
        """Hand each fragment of the announced dataset to `sink`, waiting at most `within`
        seconds for each; None once it is complete, else what ended the association."""
        while True:
            event = await self.next_event(within)
            if isinstance(event, DatasetFragment):
                sink(event.data)
            elif isinstance(event, DatasetComplete):
                return None
            else:
                return event

    async def receive_whole(
        self, command: Command, limit: int, within: float
    ) -> tuple[bytes | None, Ended | None]:
        """The dataset `command` announces, held in memory (a C-FIND identifier, an N-ACTION's
        Action Information): its bytes, or None when there is none or it is longer than `limit`
        (read to its end and dropped); and what ended the association meanwhile, else None."""
        if not command.has_dataset:
            return None, None
        data = bytearray()
        too_long = False

        def collect(fragment: bytes | memoryview) -> None:
            nonlocal too_long
            if too_long or len(data) + len(fragment) > limit:
                too_long = True
            else:
                data.extend(fragment)

        ended = await self.receive_dataset(collect, within)
        return (None if too_long else bytes(data)), ended

    async def response(self, command_field: int, message_id: int, within: float) -> Command | Ended:
        """The peer's response `command_field` to our request `message_id`, waiting at most
        `within` seconds for each message, or what ended the association. A C-CANCEL-RQ
        meanwhile is noted (`cancelled`) and skipped; any other request breaks "one operation
        at a time" and ends it with an A-ABORT (a `ProtocolError`)."""
        while True:
            event = await self.next_event(within)
            if isinstance(event, DatasetFragment | DatasetComplete):
                continue
            if not isinstance(event, CommandReceived):
                return event
            received = event.command
            if received.command_field == command_field and received.responded_to == message_id:
                return received
            if received.command_field == C_CANCEL_RQ:
                continue
            return ProtocolError("unexpected message awaiting a response", self.endpoint.abort())

    def cancelled(self, message_id: int) -> bool:
        return message_id in self._cancelled

    def next_message_id(self) -> int:
        """The Message ID of the listener's next own request on this association (a Storage
        Commitment report): 1, 2... (a US: wraps after 65,535)."""
        return (next(self._message_ids) - 1) % 0xFFFF + 1

    async def send(self, data: bytes) -> None:
        """Write and wait while the peer does not read (flow control). Raises TimeoutError when
        it has not read for `send_timeout` seconds."""
        if self._transport is None or self.closed:
            return
        self._transport.write(data)
        if not self._writable.is_set():
            async with asyncio.timeout(self._send_timeout):
                await self._writable.wait()

    def close(self, last: bytes = b"") -> None:
        """Write `last` (an A-ABORT, A-RELEASE-RP...) and close once it is written."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if last:
                transport.write(last)
            if transport.get_write_buffer_size() > STUCK_WRITES:
                transport.abort()  # a peer that does not read would hold the socket open
            else:
                transport.close()

    def refuse(self) -> None:
        """The listener is stopping: drop the connection as soon as it is made."""
        self._refused = True
        if self._transport is not None:
            self._transport.abort()
