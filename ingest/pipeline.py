"""The group-commit pipeline: the only road from every adapter to the database.

Adapters `submit()` envelopes; the bounded queue makes them wait when it is full (backpressure:
they stop reading). One writer task takes whatever accumulated while the previous commit was in
flight and commits it as one batch: no timers, so light load adds no latency and heavy load makes
big batches. Futures resolve only after COMMIT. While the database is unreachable the batch is
retried with backoff and nothing resolves; a batch the database refuses for its content is split
until the envelope at fault is found and dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol as TypingProtocol

from prometheus_client import Histogram

from ingest.errors import StorageUnavailable
from ingest.records import DeadLetter, Envelope, Outcome, OutcomeKind
from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)


class BatchStore(TypingProtocol):
    """What the pipeline needs of storage (implemented by `storage.writer.BatchWriter`)."""

    async def write(self, batch: Sequence[Envelope]) -> list[Outcome]: ...

    async def ping(self) -> None: ...


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    max_pending: int = 20_000
    max_batch: int = 5_000
    retry_initial: float = 0.1
    retry_max: float = 5.0


class PipelineClosed(Exception):
    """Submitted after `close()`; the adapter must not acknowledge."""


class GroupCommitPipeline:
    def __init__(self, store: BatchStore, settings: PipelineSettings, metrics: Metrics) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        # None is the end-of-input marker put by close().
        self._queue: asyncio.Queue[Envelope | None] = asyncio.Queue(settings.max_pending)
        self._closing = False
        self._available = False
        self._latency_children: dict[str, Histogram] = {}

    @property
    def available(self) -> bool:
        """False while commits fail for want of the database (readiness)."""
        return self._available

    def pending(self) -> int:
        return self._queue.qsize()

    async def submit(self, envelope: Envelope) -> None:
        """Queue an envelope; waits while the queue is full. Await `envelope.ack` for the end."""
        if self._closing:
            raise PipelineClosed
        self._metrics.pending.labels(envelope.protocol.value).inc()
        await self._queue.put(envelope)

    async def committed(self, envelope: Envelope, within: float) -> Outcome:
        """Submit `envelope` and wait for its outcome, at most `within` seconds in all;
        `StorageUnavailable` when the pipeline is closing or no commit came in time."""
        try:
            async with asyncio.timeout(within):
                try:
                    await self.submit(envelope)
                except PipelineClosed as exc:
                    raise StorageUnavailable("gateway stopping") from exc
                return await envelope.ack
        except TimeoutError as exc:
            raise StorageUnavailable(f"no commit within {within:.0f}s") from exc

    async def run(self) -> None:
        """The writer loop; returns once `close()` was called and what was queued is committed."""
        try:
            await self.check_database()
            ended = False
            while not ended:
                first = await self._queue.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < self._settings.max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                    if item is None:
                        ended = True
                        break
                    batch.append(item)
                await self._commit(batch)
        finally:
            self._fail_queued()

    async def close(self) -> None:
        """Stop accepting; `run()` commits what is already queued, then returns."""
        if not self._closing:
            self._closing = True
            await self._queue.put(None)

    async def check_database(self) -> None:
        """Ping the database and update `available` (readiness when no traffic flows)."""
        try:
            await self._store.ping()
        except StorageUnavailable:
            self._set_available(False)
        else:
            self._set_available(True)

    def _set_available(self, available: bool) -> None:
        if available != self._available:
            if available:
                logger.info("database available")
            else:
                logger.warning("database unavailable: holding acknowledgements")
        self._available = available
        self._metrics.db_available.set(1 if available else 0)

    async def _commit(self, batch: list[Envelope]) -> None:
        delay = self._settings.retry_initial
        while True:
            started = time.perf_counter()
            try:
                outcomes = await self._store.write(batch)
            except StorageUnavailable:
                outcomes = None
            except Exception as exc:  # noqa: BLE001 - refused content, or a failure in disguise
                if not await self._database_answers():
                    outcomes = None  # the database went away mid-batch: not the data's fault
                else:
                    self._metrics.db_errors.labels("refused").inc()
                    if len(batch) > 1:
                        middle = len(batch) // 2
                        await self._commit(batch[:middle])
                        await self._commit(batch[middle:])
                        return
                    outcomes = await self._dead_letter(batch[0], exc)
            if outcomes is None:
                self._metrics.db_errors.labels("unavailable").inc()
                self._set_available(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._settings.retry_max)
                continue
            self._set_available(True)
            if outcomes:  # empty: the envelope was failed without an outcome
                self._metrics.db_commit.observe(time.perf_counter() - started)
                self._metrics.batch_size.observe(len(batch))
                self._resolve(batch, outcomes)
            return

    async def _database_answers(self) -> bool:
        try:
            await self._store.ping()
        except StorageUnavailable:
            return False
        return True

    async def _dead_letter(self, env: Envelope, cause: Exception) -> list[Outcome] | None:
        """Keep a refused envelope as a dead letter; None when the database went away.

        The log names the error by its class and SQLSTATE only: PostgreSQL's message and detail
        quote the values at fault (`Key (system, value)=(CIN, AB123456) already exists`, a birth
        date that is not one), and patient data never goes into the log."""
        logger.error(
            "database refused %s envelope from %s (%s); dead-lettering it",
            env.protocol.value,
            env.source or "?",
            _error_name(cause),
        )
        letter = DeadLetter(
            protocol=env.protocol,
            source=env.source,
            reason="storage-refused",
            detail="the database refused the records built from this input",
            raw=env.raw,
        )
        replacement = Envelope(
            protocol=env.protocol,
            key=env.key,
            records=(letter,),
            received_at=env.received_at,
            ack=env.ack,
            source=env.source,
            raw=env.raw,
        )
        try:
            return await self._store.write([replacement])
        except StorageUnavailable:
            return None
        except Exception as exc:  # noqa: BLE001 - not even the dead letter: acknowledge nothing
            logger.error(
                "dead letter for a refused %s envelope failed (%s)",
                env.protocol.value,
                _error_name(exc),
            )
            self._metrics.pending.labels(env.protocol.value).dec()
            if not env.ack.done():
                env.ack.set_exception(StorageUnavailable("refused and not dead-lettered"))
            return []

    def _resolve(self, batch: Sequence[Envelope], outcomes: Sequence[Outcome]) -> None:
        """Resolve the futures in order; metrics are counted once per batch, not per envelope."""
        now = datetime.now(UTC)
        settled: Counter[str] = Counter()
        stored: Counter[str] = Counter()
        duplicate: Counter[str] = Counter()
        rejected: Counter[tuple[str, str]] = Counter()
        for env, outcome in zip(batch, outcomes, strict=True):
            protocol = env.protocol.value
            settled[protocol] += 1
            if outcome.kind is OutcomeKind.STORED:
                stored[protocol] += 1
                self._latency(protocol).observe(max(0.0, (now - env.received_at).total_seconds()))
            elif outcome.kind is OutcomeKind.DUPLICATE:
                duplicate[protocol] += 1
            else:
                rejected[(protocol, outcome.reason or "unknown")] += 1
            if not env.ack.done():
                env.ack.set_result(outcome)
        for protocol, count in settled.items():
            self._metrics.pending.labels(protocol).dec(count)
        for protocol, count in stored.items():
            self._metrics.stored.labels(protocol).inc(count)
        for protocol, count in duplicate.items():
            self._metrics.duplicate.labels(protocol).inc(count)
        for (protocol, reason), count in rejected.items():
            self._metrics.rejected.labels(protocol, reason).inc(count)

    def _latency(self, protocol: str) -> Histogram:
        child = self._latency_children.get(protocol)
        if child is None:
            child = self._latency_children[protocol] = self._metrics.ingest_latency.labels(protocol)
        return child

    def _fail_queued(self) -> None:
        """On exit, envelopes never committed get `StorageUnavailable`: nobody acknowledges."""
        while True:
            try:
                env = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if env is None:
                continue
            self._metrics.pending.labels(env.protocol.value).dec()
            if not env.ack.done():
                env.ack.set_exception(StorageUnavailable("gateway stopping"))


def _error_name(exc: Exception) -> str:
    """A database error as the log may show it: its class and SQLSTATE, never its message or
    detail, which quote the values at fault (`_dead_letter`)."""
    return f"{type(exc).__name__}, SQLSTATE {getattr(exc, 'sqlstate', None) or '-'}"
