"""What asyncpg reports through the event loop when PostgreSQL goes away mid-operation.

When the database stops under a batch, asyncpg leaves two reports to the loop's exception
handler, which logs them at ERROR: the future of the operation the server cut ("Future exception
was never retrieved ... ConnectionDoesNotExistError") and, as the pool takes the connection back,
"Resetting connection with an active transaction". The pipeline has already said the same at
WARNING ("database unavailable: holding acknowledgements") and retries the batch; nothing is
lost. `install` logs these two at WARNING, in one line without the traceback, and hands every
other report to the handler that was there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

_RESET = "Resetting connection with an active transaction"


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Route the loop's reports of a lost database connection to `logger` at WARNING."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if connection_lost(context):
            logger.warning("database connection lost mid-operation (%s)", _what(context))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def connection_lost(context: dict[str, Any]) -> bool:
    """Whether a loop report is asyncpg's news of a connection the server closed."""
    exception = context.get("exception")
    if isinstance(exception, asyncpg.ConnectionDoesNotExistError):
        return True
    return exception is None and str(context.get("message", "")).startswith(_RESET)


def _what(context: dict[str, Any]) -> str:
    exception = context.get("exception")
    return type(exception).__name__ if exception is not None else "reset in a transaction"
