"""Helpers for tests that talk to real services (no mocks): bounded waiting, query plans."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg


async def wait_until(
    predicate: Callable[[], Awaitable[bool] | bool],
    timeout: float,  # noqa: ASYNC109 - the helper's contract: a bounded wait
    interval: float = 0.05,
    message: str = "",
) -> None:
    """Poll `predicate` (sync or async) until it is true; AssertionError after `timeout` s.

    An async predicate that hangs is cut off at the deadline too.
    """
    deadline = time.monotonic() + timeout
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    except TimeoutError:
        raise AssertionError(message or f"condition not met within {timeout} s") from None


class ExplainingConnection:
    """A real connection that records each query and its plan (EXPLAIN with the same args)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.plans: list[str] = []

    async def fetch(self, query: str, *args: object) -> list[Any]:
        plan = await self._conn.fetch("EXPLAIN " + query, *args)
        self.plans.append("\n".join(r[0] for r in plan))
        return list(await self._conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: object) -> Any:
        rows = await self.fetch(query, *args)
        return rows[0] if rows else None

    async def execute(self, query: str, *args: object) -> str:
        raise NotImplementedError("explained queries only read")
