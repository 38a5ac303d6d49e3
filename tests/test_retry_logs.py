"""A library's retries while the database is away are logged in one line each, not with a
traceback every try; its other failures keep their traceback."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import asyncpg
import pytest

from gateway import retry_logs
from gateway.redacted_logs import RedactingFormatter


@pytest.fixture
def pool_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """asyncpg's pool logger with the gateway's filter, written to a buffer as the gateway's."""
    logger = logging.getLogger("asyncpg.pool")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    before = list(logger.filters)
    retry_logs.install()
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = before


def log_failure(logger: logging.Logger, exc: Exception) -> None:
    try:
        raise exc
    except Exception:
        logger.warning("Failed to restore the pool connection floor; retrying", exc_info=True)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
    ],
)
def test_a_retry_while_the_database_is_away_is_one_line(
    pool_log: tuple[logging.Logger, io.StringIO], exc: Exception
) -> None:
    logger, stream = pool_log
    log_failure(logger, exc)
    assert stream.getvalue().splitlines() == [
        "WARNING asyncpg.pool: Failed to restore the pool connection floor; retrying "
        f"({type(exc).__name__})"
    ]


def test_a_failure_that_is_not_the_database_away_keeps_its_traceback(
    pool_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = pool_log
    log_failure(logger, ValueError("a bug"))
    lines = stream.getvalue().splitlines()
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1].startswith("ValueError (message withheld")
