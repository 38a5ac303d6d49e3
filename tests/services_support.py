"""Helpers for tests that talk to real services (no mocks): bounded waiting."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


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
