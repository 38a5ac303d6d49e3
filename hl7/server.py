"""The MLLP listener: a thin asyncio shell around the sans-IO framer, tokenizer and ACK builder.

Per connection, one reader and one sender. The reader reads under `asyncio.timeout(idle)`, feeds
`MllpFramer`, and for each complete message: tokenizes it, checks version and processing id,
maps it to records, optionally validates its structure (strict senders, in a thread), and
submits an `Envelope` to the group-commit pipeline. Every message takes a slot of a bounded
window before it is read further: with `window` messages unanswered the reader stops reading
(backpressure reaches the sender through TCP). The sender writes the acknowledgements strictly
in the order the messages arrived, each once its outcome is known:

- committed (stored now, or a resend of a committed message): AA (CA/AA in enhanced mode);
- content error: AE with ERR; unsupported version or processing id, unreadable header: AR;
  rejected messages are dead letters, answered once the dead letter is committed;
- no commit within `ack_timeout` (database down): AE with ERR 207 "storage unavailable"; the
  message stays queued and is stored when the database returns, so the sender's resend of it
  is answered AA (a duplicate) and nothing is stored twice.

A message beyond `max_message_bytes` is answered AR when its MSH segment could be read (else a
fallback AR), then that connection alone is closed. Other framing errors close the connection
after a fallback AR. A connection beyond `max_connections` is not served: its first message is
answered AR ("too many connections", ERR 207) and it is closed. `except Exception` only at the
per-connection boundary.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo

from hl7.ack import (
    AckCode,
    AckError,
    ErrorCode,
    Outcome,
    ack_error_for,
    acks_to_send,
    build_ack,
    build_fallback_ack,
    check_acceptance,
    check_certified_facility,
)
from hl7.er7 import Er7Error, Hl7Message, MessageHeader, parse_message
from hl7.mapping import MappingError, map_message
from hl7.mllp import DEFAULT_MAX_MESSAGE_BYTES, FramingError, Message, MllpFramer
from hl7.validation import sender_is_strict, validate_structure
from ingest.errors import InputError, ListenerError, StorageUnavailable
from ingest.group_tasks import GroupTasks
from ingest.pipeline import GroupCommitPipeline, PipelineClosed
from ingest.records import (
    DeadLetter,
    DeadLetterKey,
    Envelope,
    Hl7Key,
    OutcomeKind,
    Protocol,
)
from ingest.records import Outcome as StoreOutcome
from ingest.tls import (
    ListenerTls,
    TlsIntake,
    common_names,
    listener_tls,
    server_context,
)
from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
TLS_HANDSHAKE_SECONDS = 30.0
"""A TLS client must finish its handshake within this (asyncio's own default is 60 s)."""
HEAD_BYTES = 8 * 1024  # what is kept of a frame's start, to answer an oversize message
MAX_REFUSING = 16  # refused connections answered at once; beyond, closed without an answer
TOO_MANY_CONNECTIONS = "too many connections to this gateway; retry later"
REJECT_REASONS = (
    "unsupported-version",
    "unsupported-processing-id",
    "hl7-structure",
    "mllp-message-too-large",
    "not-hl7",
    "unsupported-batch",
    "bad-encoding-characters",
    "unsupported-charset",
    "undecodable-text",
    "bad-escape-sequence",
    "bad-segment-id",
    "missing-msh-9",
    "missing-msh-10",
    "missing-pid",
    "missing-pid-3",
    "missing-obr",
    "obx-value-not-numeric",
    "storage-refused",
    "too-many-connections",
    "facility-not-certified",
)
Validator = Callable[[Hl7Message], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class MllpSettings:
    """Every limit of the MLLP listener (`gateway.settings` builds it from QANTARA_MLLP_*)."""

    host: str = "127.0.0.1"
    port: int = 2575
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    idle_timeout: float = 300.0
    max_connections: int = 256
    refusal_wait: float = 5.0  # beyond max_connections: how long the first message may take
    window: int = 64
    ack_timeout: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_crl: Path | None = None  # with tls_client_ca: the client certificates it revokes
    tls_facility_from_cn: bool = False  # MSH-4.1 must be a commonName of the client's certificate
    strict_senders: frozenset[str] = frozenset()
    timezone: str = "Africa/Casablanca"
    processing_ids: tuple[str, ...] = ("P",)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server TLS context when a certificate is configured, else None."""
        return server_context(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_crl)


@dataclass(slots=True)
class _Pending:
    """One received message waiting for its answer, in arrival order."""

    received: float  # perf_counter at the complete frame
    header: MessageHeader | None
    outcome: Outcome  # what the answer is, unless the commit says otherwise
    future: asyncio.Future[StoreOutcome] | None = None
    error: AckError | None = None
    control_id: str = ""
    close_after: bool = False
    answers: list[tuple[AckCode, bytes]] = field(default_factory=list)


class MllpServer:
    """The MLLP listener. `run()` serves until `stop()`; `port` is known once `listening` is set."""

    def __init__(
        self,
        settings: MllpSettings,
        pipeline: GroupCommitPipeline,
        metrics: Metrics,
        *,
        validator: Validator = validate_structure,
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._metrics = metrics
        self._validator = validator
        self._tz: tzinfo = ZoneInfo(settings.timezone)
        self._connections: set[_Connection] = set()
        self._handshakes = GroupTasks("mllp-tls-handshake")
        self._tls: ListenerTls | None = None
        self._refusing = 0
        self._stopping = asyncio.Event()
        self._ack_ids = itertools.count(1)
        self._ack_prefix = f"Q{int(time.time()):x}"
        self.listening = asyncio.Event()
        self.port: int | None = None

    @property
    def settings(self) -> MllpSettings:
        return self._settings

    @property
    def connections(self) -> int:
        return len(self._connections)

    def next_control_id(self) -> str:
        return f"{self._ack_prefix}-{next(self._ack_ids)}"

    async def run(self) -> None:
        """Listen until `stop()`, then let open connections answer what they received."""
        s = self._settings
        self._tls = listener_tls("mllp", s.ssl_context, "QANTARA_MLLP_TLS_*")
        backlog = min(1024, max(16, s.max_connections))
        async with asyncio.TaskGroup() as handshakes:
            self._handshakes.open(handshakes)
            try:
                if self._tls is None:
                    server = await asyncio.start_server(
                        self._handle, s.host, s.port, limit=READ_CHUNK, backlog=backlog
                    )
                else:
                    loop = asyncio.get_running_loop()
                    server = await loop.create_server(self._intake, s.host, s.port, backlog=backlog)
            except OSError as exc:
                raise ListenerError.binding("mllp", s.host, s.port, exc) from None
            self.port = int(server.sockets[0].getsockname()[1])
            self.listening.set()
            try:
                async with server:
                    await self._stopping.wait()
                    server.close()
                    self._handshakes.close()
                    for connection in list(self._connections):
                        connection.stop_reading()
                    while self._connections:
                        done = asyncio.Event()
                        for connection in list(self._connections):
                            connection.closed_callbacks.append(done.set)
                        await done.wait()
            finally:
                self._handshakes.close()
                self.listening.clear()

    def reload_tls(self) -> bool:
        """Read the TLS files again for the connections to come (SIGHUP); the open ones keep
        theirs. True when new files were taken."""
        return self._tls is not None and self._tls.reload()

    def _intake(self) -> TlsIntake:
        """A new connection to the TLS listener (protocol factory): its handshake runs in a task
        of the listener's group, then `_handle` gets the streams over TLS."""
        assert self._tls is not None  # noqa: S101 - the factory of the TLS listener only
        return TlsIntake(
            self._tls.context,
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(READ_CHUNK), self._handle),
            self._handshakes.start,
            listener="mllp",
            within=TLS_HANDSHAKE_SECONDS,
            metrics=self._metrics,
        )

    def stop(self) -> None:
        """Stop accepting and reading; connections still answer the messages they hold."""
        self._stopping.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        if self._stopping.is_set():
            writer.close()
            return
        if len(self._connections) >= self._settings.max_connections:
            logger.warning(
                "mllp connection from %s refused: %d connections open (the maximum)",
                peer,
                len(self._connections),
            )
            self._metrics.rejected.labels(Protocol.HL7.value, "too-many-connections").inc()
            try:
                if self._refusing < MAX_REFUSING:
                    self._refusing += 1
                    try:
                        await self._refuse(reader, writer)
                    finally:
                        self._refusing -= 1
            finally:
                writer.close()
            return
        connection = _Connection(self, reader, writer, peer)
        self._connections.add(connection)
        self._metrics.mllp_connections.inc()
        logger.debug("mllp connection from %s", peer)
        try:
            await connection.run()
        except Exception:  # the per-connection boundary: log, count, close this one only
            logger.exception("mllp connection from %s failed; closing it", peer)
            self._metrics.rejected.labels(Protocol.HL7.value, "internal").inc()
        finally:
            self._connections.discard(connection)
            self._metrics.mllp_connections.dec()
            writer.close()
            for callback in connection.closed_callbacks:
                callback()
            logger.debug("mllp connection from %s closed", peer)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the first message of a connection beyond the maximum with AR, stores nothing.

        The AR echoes MSH-10 (ERR 207, "too many connections"); the caller then closes. A peer
        that sends no frame within `refusal_wait` seconds is closed unanswered.
        """
        framer = MllpFramer(HEAD_BYTES)
        head = b""
        try:
            async with asyncio.timeout(self._settings.refusal_wait):
                while True:
                    data = await reader.read(READ_CHUNK)
                    if len(head) < HEAD_BYTES:
                        head += data[: HEAD_BYTES - len(head)]
                    try:
                        events = framer.receive_data(data)
                    except FramingError:
                        break  # beyond the head: answer from what the head shows
                    if events or not data:
                        break
        except (TimeoutError, ConnectionError, ssl.SSLError):
            return
        start = head.find(b"\x0b")
        if start < 0:
            return
        header = _header_of(head[start + 1 :])
        error = AckError(ErrorCode.APPLICATION_INTERNAL_ERROR, TOO_MANY_CONNECTIONS)
        now = datetime.now(UTC)
        if header is None:
            ack = build_fallback_ack(error, now=now, control_id=self.next_control_id())
        else:
            ack = build_ack(
                header,
                AckCode.APPLICATION_REJECT,
                error=error,
                now=now,
                control_id=self.next_control_id(),
            )
        try:
            writer.write(framer.frame(ack))
            async with asyncio.timeout(self._settings.refusal_wait):
                await writer.drain()
        except (TimeoutError, ConnectionError, ssl.SSLError):
            return

    # --- one message: bytes to a pending answer ---------------------------------------------

    async def accept(
        self, payload: bytes, received: float, certified: frozenset[str] = frozenset()
    ) -> _Pending:
        """Read one message and hand it to the pipeline; the answer is known after commit.
        `certified`: the commonNames of the client's verified TLS certificate."""
        received_at = datetime.now(UTC)
        self._metrics.received.labels(Protocol.HL7.value).inc()
        try:
            message = parse_message(payload)
        except Er7Error as exc:
            outcome = Outcome.REJECTED if exc.header is None else Outcome.CONTENT_ERROR
            return await self._reject(payload, received, received_at, exc.header, outcome, exc)
        except InputError as exc:  # an escape or charset problem below the header
            return await self._reject(payload, received, received_at, None, Outcome.REJECTED, exc)
        header = message.header
        refusal = check_acceptance(header, processing_ids=self._settings.processing_ids)
        if refusal is not None:
            reason = (
                "unsupported-version"
                if refusal.code is ErrorCode.UNSUPPORTED_VERSION_ID
                else "unsupported-processing-id"
            )
            error = InputError(reason, refusal.message)
            return await self._reject(
                payload, received, received_at, header, Outcome.REJECTED, error, refusal
            )
        if self._settings.tls_facility_from_cn:
            refusal = check_certified_facility(header, certified)
            if refusal is not None:
                error = InputError("facility-not-certified", refusal.message)
                return await self._reject(
                    payload, received, received_at, header, Outcome.REJECTED, error, refusal
                )
        try:
            records = map_message(message, self._tz)
        except MappingError as exc:
            return await self._reject(
                payload,
                received,
                received_at,
                header,
                Outcome.CONTENT_ERROR,
                exc,
                exc.ack_error(),
            )
        except InputError as exc:  # an escape sequence that does not decode, deep in a field
            return await self._reject(
                payload, received, received_at, header, Outcome.CONTENT_ERROR, exc
            )
        if sender_is_strict(message, self._settings.strict_senders):
            problem = await self._validator(message)
            if problem is not None:
                error = InputError("hl7-structure", problem)
                ack_error = AckError(ErrorCode.SEGMENT_SEQUENCE_ERROR, problem)
                return await self._reject(
                    payload,
                    received,
                    received_at,
                    header,
                    Outcome.CONTENT_ERROR,
                    error,
                    ack_error,
                )
        future: asyncio.Future[StoreOutcome] = asyncio.get_running_loop().create_future()
        envelope = Envelope(
            protocol=Protocol.HL7,
            key=Hl7Key(header.sending_application, header.sending_facility, header.control_id),
            records=records,
            received_at=received_at,
            ack=future,
            source=_source(header),
            raw=payload,
        )
        await self._pipeline.submit(envelope)
        return _Pending(received, header, Outcome.COMMITTED, future, control_id=header.control_id)

    async def _reject(
        self,
        payload: bytes,
        received: float,
        received_at: datetime,
        header: MessageHeader | None,
        outcome: Outcome,
        error: InputError,
        ack_error: AckError | None = None,
        *,
        close_after: bool = False,
    ) -> _Pending:
        """A dead letter for a refused message; the AE/AR goes out once it is committed."""
        source = _source(header) if header is not None else "unknown"
        control_id = header.control_id if header is not None else ""
        logger.info(
            "hl7 message %s from %s refused: %s",
            control_id or "-",
            source,
            error.reason,
        )
        letter = DeadLetter(Protocol.HL7, source, error.reason, error.detail, payload)
        future: asyncio.Future[StoreOutcome] = asyncio.get_running_loop().create_future()
        envelope = Envelope(
            protocol=Protocol.HL7,
            key=DeadLetterKey(Protocol.HL7, source, hashlib.sha256(payload).digest()),
            records=(letter,),
            received_at=received_at,
            ack=future,
            source=source,
            raw=payload,
        )
        try:
            await self._pipeline.submit(envelope)
        except PipelineClosed:
            future.cancel()
        return _Pending(
            received,
            header,
            outcome,
            future,
            ack_error or ack_error_for(error),
            control_id,
            close_after,
        )

    async def reject_oversize(self, head: bytes, received: float, error: FramingError) -> _Pending:
        """AR for a message beyond the size limit, echoing its MSH-10 when the head shows it."""
        header = _header_of(head)
        ack_error = AckError(ErrorCode.APPLICATION_INTERNAL_ERROR, error.detail)
        return await self._reject(
            head,
            received,
            datetime.now(UTC),
            header,
            Outcome.REJECTED,
            error,
            ack_error,
            close_after=True,
        )

    async def answer(self, pending: _Pending) -> list[tuple[AckCode, bytes]]:
        """The acknowledgements of one message, once its commit (or its timeout) is known."""
        outcome = pending.outcome
        error = pending.error
        if pending.future is not None:
            try:
                if pending.future.done():  # the usual case behind the oldest: no timer needed
                    stored = pending.future.result()
                else:
                    async with asyncio.timeout(self._settings.ack_timeout):
                        stored = await asyncio.shield(pending.future)
            except (TimeoutError, StorageUnavailable, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and not pending.future.cancelled():
                    raise
                if outcome is Outcome.COMMITTED:
                    outcome = Outcome.CONTENT_ERROR
                    error = AckError(
                        ErrorCode.APPLICATION_INTERNAL_ERROR,
                        "storage temporarily unavailable; the message was not accepted, resend it",
                    )
                    logger.warning(
                        "hl7 message %s not committed in time: AE (transient)",
                        pending.control_id,
                    )
            else:
                if outcome is Outcome.COMMITTED and stored.kind is OutcomeKind.REJECTED:
                    outcome = Outcome.CONTENT_ERROR
                    error = AckError(
                        ErrorCode.APPLICATION_INTERNAL_ERROR,
                        "the message could not be stored (refused by the database)",
                    )
        header = pending.header
        now = datetime.now(UTC)
        if header is None:
            fallback = error or AckError(ErrorCode.APPLICATION_INTERNAL_ERROR)
            ack = build_fallback_ack(fallback, now=now, control_id=self.next_control_id())
            return [(AckCode.APPLICATION_REJECT, ack)]
        codes = acks_to_send(outcome, header.accept_ack_type, header.application_ack_type)
        answers = []
        for code in codes:
            err = None if code.is_success else error
            ack = build_ack(header, code, error=err, now=now, control_id=self.next_control_id())
            answers.append((code, ack))
        return answers

    def observe(self, code: AckCode, received: float) -> None:
        self._metrics.hl7_ack_latency.labels(code.value).observe(time.perf_counter() - received)


class _Connection:
    """One MLLP connection: a reader task and a sender task sharing the ordered pending queue."""

    def __init__(
        self,
        server: MllpServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._peer = peer
        self._certified = common_names(writer.get_extra_info("peercert"))
        self._framer = MllpFramer(server.settings.max_message_bytes)
        self._pending: deque[_Pending] = deque()
        self._window = asyncio.Semaphore(server.settings.window)
        self._wake = asyncio.Event()
        self._reading_done = False
        self._in_read = False
        self._stop = False
        self._reader_task: asyncio.Task[None] | None = None
        self._head = bytearray()
        self._outstanding = 0  # received, not yet answered on the wire
        self.closed_callbacks: list[Callable[[], None]] = []

    def stop_reading(self) -> None:
        """Read no more; what was received is still answered."""
        self._stop = True
        if self._in_read and self._reader_task is not None:
            self._reader_task.cancel()

    async def run(self) -> None:
        reading = asyncio.create_task(self._read_loop())
        self._reader_task = reading
        sending = asyncio.create_task(self._send_loop(reading))
        try:
            await asyncio.wait([reading])
        finally:
            self._reading_done = True
            self._wake.set()
        try:
            await sending
        finally:
            if not reading.done():
                reading.cancel()
        if not reading.cancelled() and (exc := reading.exception()) is not None:
            raise exc

    # reading

    async def _read_loop(self) -> None:
        idle = self._server.settings.idle_timeout
        while not self._stop:
            try:
                self._in_read = True
                async with asyncio.timeout(idle):
                    data = await self._reader.read(READ_CHUNK)
            except TimeoutError:
                if self._outstanding:
                    continue  # the peer waits for our answers: not idle
                logger.info("mllp connection from %s idle for %.0fs: closing", self._peer, idle)
                return
            except asyncio.CancelledError:
                if self._stop:
                    return
                raise
            except (ConnectionError, ssl.SSLError) as exc:
                logger.info("mllp connection from %s lost: %s", self._peer, type(exc).__name__)
                return
            finally:
                self._in_read = False
            received = time.perf_counter()
            if data:
                self._track_head(data)
            try:
                events = self._framer.receive_data(data)
            except FramingError as exc:
                await self._framing_error(exc, received)
                return
            for event in events:
                if isinstance(event, Message):
                    await self._window.acquire()
                    self._push(await self._server.accept(event.payload, received, self._certified))
                else:  # ConnectionClosed: the peer is done sending
                    return
            if (error := self._framer.pending_error) is not None:
                await self._framing_error(error, received)
                return

    def _track_head(self, data: bytes) -> None:
        """Keep the first bytes of the frame being received (its MSH segment)."""
        start = data.rfind(b"\x0b")
        if start >= 0:
            self._head = bytearray(data[start + 1 : start + 1 + HEAD_BYTES])
        elif len(self._head) < HEAD_BYTES:
            self._head += data[: HEAD_BYTES - len(self._head)]

    async def _framing_error(self, error: FramingError, received: float) -> None:
        if error.reason == "mllp-truncated-frame":
            logger.info("mllp connection from %s closed inside a frame", self._peer)
            return
        logger.warning(
            "mllp connection from %s: %s (%s); closing it", self._peer, error.reason, error.detail
        )
        await self._window.acquire()
        if error.reason == "mllp-message-too-large":
            pending = await self._server.reject_oversize(bytes(self._head), received, error)
        else:
            pending = _Pending(
                received,
                None,
                Outcome.REJECTED,
                error=ack_error_for(error),
                close_after=True,
            )
            self._server._metrics.rejected.labels(Protocol.HL7.value, error.reason).inc()
        self._push(pending)

    def _push(self, pending: _Pending) -> None:
        self._outstanding += 1
        self._pending.append(pending)
        self._wake.set()

    # sending

    async def _send_loop(self, reading: asyncio.Task[None]) -> None:
        try:
            while True:
                if not self._pending:
                    if self._reading_done:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                frames: list[bytes] = []
                written: list[tuple[AckCode, float]] = []
                answered = 0
                close = False
                first = True
                # Wait for the oldest answer; those already known behind it go in the same write.
                while self._pending and (first or _ready(self._pending[0])):
                    first = False
                    pending = self._pending[0]
                    answers = await self._server.answer(pending)
                    self._pending.popleft()
                    frames += [self._framer.frame(ack) for _, ack in answers]
                    written += [(code, pending.received) for code, _ in answers]
                    answered += 1
                    if pending.close_after:
                        close = True
                        break
                if frames:
                    self._writer.write(b"".join(frames))
                    await self._writer.drain()
                self._outstanding -= answered
                for _ in range(answered):
                    self._window.release()
                for code, received in written:
                    self._server.observe(code, received)
                if close:
                    reading.cancel()
                    return
        except (ConnectionError, ssl.SSLError) as exc:
            logger.info(
                "mllp connection from %s lost while answering: %s", self._peer, type(exc).__name__
            )
            reading.cancel()


def _ready(pending: _Pending) -> bool:
    return pending.future is None or pending.future.done()


def _source(header: MessageHeader) -> str:
    """MSH-3.1/MSH-4.1: the sender as logs and dead letters name it."""
    seg = header.segment
    return f"{seg.value(3)}/{seg.value(4)}"


def _header_of(head: bytes) -> MessageHeader | None:
    """The header of a message from its first bytes, when its MSH segment is all there."""
    end = min((i for i in (head.find(b"\r"), head.find(b"\n")) if i >= 0), default=-1)
    if end < 0:
        return None
    try:
        return parse_message(head[:end]).header
    except InputError:
        return None


def _peer(writer: asyncio.StreamWriter) -> str:
    info = writer.get_extra_info("peername")
    if isinstance(info, tuple) and len(info) >= 2:
        return f"{info[0]}:{info[1]}"
    return "?"


def strict_senders(text: str) -> frozenset[str]:
    """`QANTARA_HL7_STRICT_SENDERS`: comma-separated MSH-3.1, MSH-4.1 or MSH-3.1/MSH-4.1."""
    return frozenset(part.strip() for part in text.split(",") if part.strip())
