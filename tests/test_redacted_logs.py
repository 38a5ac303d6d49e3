"""No log line carries an exception's message: tracebacks and loop reports name frames and types."""

from __future__ import annotations

import asyncio
import io
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from gateway import redacted_logs
from gateway.redacted_logs import RedactingFormatter

CIN = "AB123456"
NAME = "العلوي"


def _check_birth_date(value: str) -> None:
    raise ValueError(f"patient {NAME} ({CIN}): not a date: {value!r}")


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """What the `qantara` logger writes, through the gateway's formatter."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield text
    finally:
        root.removeHandler(handler)


def test_a_logged_traceback_names_its_frames_and_type_not_its_message(log: io.StringIO) -> None:
    try:
        _check_birth_date("1990" + "1345")  # not one literal: source lines are printed
    except ValueError:
        logging.getLogger("qantara.test").exception("mllp connection from %s failed", "peer")
    text = log.getvalue()
    assert "mllp connection from peer failed" in text
    assert "in _check_birth_date" in text
    assert f"ValueError ({redacted_logs.WITHHELD})" in text
    assert CIN not in text
    assert NAME not in text
    assert "19901345" not in text


def test_every_message_of_a_chain_of_exceptions_is_withheld(log: io.StringIO) -> None:
    try:
        try:
            _check_birth_date("x")
        except ValueError as exc:
            raise KeyError(CIN) from exc
    except KeyError:
        try:
            raise RuntimeError(NAME)
        except RuntimeError:
            logging.getLogger("qantara.test").exception("batch failed")
    text = log.getvalue()
    assert text.count("Traceback (most recent call last):") == 3
    assert "direct cause" in text
    assert "During handling" in text
    assert CIN not in text
    assert NAME not in text


async def test_a_task_exception_nobody_retrieved_is_reported_by_task_name_only(
    log: io.StringIO,
) -> None:
    async def index_study() -> None:
        _check_birth_date("19901345")

    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    task = loop.create_task(index_study(), name="dicom-index")
    with pytest.raises(ValueError, match=CIN):
        await asyncio.wait_for(asyncio.shield(task), 5)
    redacted_logs.install(loop)
    try:
        # What asyncio says when such a task is collected; its default text holds repr(task),
        # and with it the exception's message.
        loop.call_exception_handler(
            {
                "message": "Task exception was never retrieved",
                "exception": task.exception(),
                "future": task,
            }
        )
    finally:
        loop.set_exception_handler(previous)
    text = log.getvalue()
    assert "ERROR gateway.redacted_logs: Task exception was never retrieved" in text
    assert "future: task dicom-index (" in text
    assert "index_study" in text
    assert "in _check_birth_date" in text
    assert CIN not in text
    assert NAME not in text


def test_the_command_line_logs_tracebacks_without_their_messages() -> None:
    script = (
        "import logging\n"
        "from gateway.cli import _configure_logging\n"
        "_configure_logging('INFO')\n"
        "try:\n"
        f"    raise ValueError({CIN!r})\n"
        "except ValueError:\n"
        "    logging.getLogger('hl7.server').exception('mllp connection failed')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "mllp connection failed" in run.stderr
    assert f"ValueError ({redacted_logs.WITHHELD})" in run.stderr
    assert CIN not in run.stderr
