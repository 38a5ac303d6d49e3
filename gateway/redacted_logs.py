"""Tracebacks and event-loop reports without exception messages.

An exception's message often quotes the data that raised it: PostgreSQL's `Key (system,
value)=(CIN, AB123456) already exists`, `invalid literal for int(): 'EL HASSANI'`, a decoder's
view of a name. The gateway logs call sites by hand without such messages, but a traceback
(`logger.exception`, asyncio's reports) would print them. `RedactingFormatter` renders every
traceback as its frames and exception types only, so that no log line carries what an exception
message may hold, whichever library raised it; `install` does the same for what the event loop
reports (whose default text includes the repr of the failed task, message and all).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

WITHHELD = "message withheld: it may quote patient data"
_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class RedactingFormatter(logging.Formatter):
    """A `logging.Formatter` whose tracebacks name frames and exception types, never messages."""

    def format(self, record: logging.LogRecord) -> str:
        # `logging.Formatter.format` reuses `record.exc_text` when another handler has already
        # rendered the traceback, message and all: render it again, here, without.
        cached, record.exc_text = record.exc_text, None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached

    def formatException(self, ei: _ExcInfo) -> str:
        return redacted_traceback(ei[1]) if ei[1] is not None else ""


def redacted_traceback(exc: BaseException) -> str:
    """The traceback of `exc` and of its causes and contexts, outermost last, as Python prints
    it but with `Type (message withheld...)` in place of each `Type: message` line."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    lines: list[str] = []
    for error, link in reversed(chain):
        lines.append("Traceback (most recent call last):\n")
        lines.extend(traceback.format_list(traceback.extract_tb(error.__traceback__)))
        lines.append(f"{_qualified(type(error))} ({WITHHELD})\n")
        if link:
            lines.append(link)
    return "".join(lines).rstrip("\n")


def _qualified(kind: type[BaseException]) -> str:
    module = kind.__module__
    return (
        kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"
    )


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Log what `loop` reports (an exception nobody retrieved, a callback that raised) as its
    message, the task or callback it concerns by name, and the redacted traceback."""

    def report(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        about = [
            f"{key}: {_name(context[key])}"
            for key in ("task", "future", "handle")
            if key in context
        ]
        logger.error(
            "%s%s",
            context.get("message", "event loop report"),
            "".join(f"\n{line}" for line in about),
            exc_info=exception if isinstance(exception, BaseException) else None,
        )

    loop.set_exception_handler(report)


def _name(value: object) -> str:
    """What a loop report concerns, named without its repr (which holds the exception)."""
    if isinstance(value, asyncio.Task):
        coro = value.get_coro()
        return f"task {value.get_name()} ({getattr(coro, '__qualname__', type(coro).__name__)})"
    if isinstance(value, asyncio.Handle):
        callback = getattr(value, "_callback", None)
        return f"callback {getattr(callback, '__qualname__', type(callback).__name__)}"
    return type(value).__name__
