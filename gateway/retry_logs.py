"""What a library logs of its own retries while the database is away: one line each.

asyncpg's pool keeps its floor of connections (`min_size`) from a background task. While the
database is down, that task logs `Failed to restore the pool connection floor; retrying` at
WARNING with the whole traceback, at every try: in a minute's outage, with its backoff and the
gateway's two pools, 12 tracebacks of 17 lines. The gateway says it once, itself (`database
unavailable: holding acknowledgements`, `qantara_db_available`, /readyz). Such a record keeps
its level and message, and names the exception's type instead of its traceback. A failure that
is not the database being away (`storage.pool.is_transient`) keeps its traceback.
"""

from __future__ import annotations

import logging
from typing import Final

from storage.pool import is_transient

RETRYING_LOGGERS: Final = ("asyncpg.pool",)


class OneLineRetries(logging.Filter):
    """Drops the traceback of a record whose exception says the database is away."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_transient(exc):
            record.msg = f"{record.getMessage()} ({type(exc).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def install() -> None:
    for name in RETRYING_LOGGERS:
        logging.getLogger(name).addFilter(OneLineRetries())
