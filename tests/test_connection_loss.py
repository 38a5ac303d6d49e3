"""A database going away mid-operation is reported once at WARNING, not as loop ERRORs."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from storage import connection_loss


async def test_a_cut_operation_and_the_reset_after_it_are_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    connection_loss.install(loop)
    try:
        with caplog.at_level(logging.WARNING):
            cut = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle")
            loop.call_exception_handler(
                {"message": "Future exception was never retrieved", "exception": cut}
            )
            loop.call_exception_handler(
                {"message": "Resetting connection with an active transaction <conn>"}
            )
    finally:
        loop.set_exception_handler(previous)
    levels = [(r.name, r.levelname) for r in caplog.records]
    assert levels == [("storage.connection_loss", "WARNING")] * 2


async def test_any_other_loop_report_stays_an_error(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    connection_loss.install(loop)
    try:
        with caplog.at_level(logging.WARNING):
            loop.call_exception_handler(
                {"message": "Task exception was never retrieved", "exception": ValueError("x")}
            )
    finally:
        loop.set_exception_handler(previous)
    assert [r.levelname for r in caplog.records] == ["ERROR"]
