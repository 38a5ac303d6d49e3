"""Calls that must run one at a time and in order, on the threads of a shared pool.

An association's file steps (create the spool file, write each batch, then settle it) must keep
their order, yet the event loop must not wait for one to end before it hands over the next: a
create, or a write to the page cache, can wait for the ext4 journal while other associations
fsync, and the loop serves every association. `SerialQueue.submit` appends a call
and returns its future at once; one pool thread at a time drains the queue, so a queue occupies
at most one thread of the pool, and only while it has work.

A drain that waits for other work on the same pool could starve it: give the queues their own
pool, with a thread for each queue that may be busy at once (one per association), and have the
steps they wait for (parse, fsyncs) run in another.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


class SerialQueue:
    """Runs submitted calls in submission order, never two at once, on `pool`'s threads."""

    def __init__(self, pool: concurrent.futures.Executor) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._calls: deque[tuple[concurrent.futures.Future[Any], Callable[[], Any]]] = deque()
        self._draining = False

    def submit(self, function: Callable[..., _T], *args: object) -> concurrent.futures.Future[_T]:
        """Queue `function(*args)`; its future. Raises RuntimeError when the pool is shut down
        and this queue was idle (nothing queued is then left behind)."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()
        with self._lock:
            self._calls.append((future, lambda: function(*args)))
            if self._draining:
                return future
            self._draining = True
        try:
            self._pool.submit(self._drain)
        except BaseException:
            with self._lock:
                self._calls.clear()
                self._draining = False
            raise
        return future

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    self._draining = False
                    return
                future, call = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for it
                future.set_exception(exc)
            else:
                future.set_result(result)
