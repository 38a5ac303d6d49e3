"""The lab simulator sends a message answered AE 207 (the gateway's storage unavailable) again,
as an LIS's retry queue does; any other AE is final. Its peer here is a scripted MLLP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from hl7.ack import AckCode, AckError, ErrorCode, build_ack
from hl7.er7 import parse_message
from simulators.lab import LabConfig, run_lab

START, END = b"\x0b", b"\x1c\x0d"


@asynccontextmanager
async def answering(
    answers: Sequence[tuple[AckCode, ErrorCode | None]],
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """An MLLP server answering each message with the next of `answers` (the last repeats);
    yields its port and the messages it received."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        while chunk := await reader.read(65536):
            buffer += chunk
            while END in buffer:
                frame, buffer = buffer.split(END, 1)
                raw = frame[frame.index(START) + 1 :]
                received.append(raw)
                code, error = answers[min(len(received), len(answers)) - 1]
                ack = build_ack(
                    parse_message(raw).header,
                    code,
                    error=None if error is None else AckError(error, "scripted"),
                    now=datetime.now(UTC),
                    control_id=f"ACK{len(received)}",
                )
                writer.write(START + ack + END)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await server.wait_closed()


def one_message(port: int, ae_retry_for: float = 300.0) -> LabConfig:
    return LabConfig(port=port, count=1, rate=0, quiet=True, ae_retry_for=ae_retry_for)


async def test_a_message_answered_ae_207_is_sent_again_until_accepted() -> None:
    unavailable = (AckCode.APPLICATION_ERROR, ErrorCode.APPLICATION_INTERNAL_ERROR)
    script = [unavailable, unavailable, (AckCode.APPLICATION_ACCEPT, None)]
    async with answering(script) as (port, received):
        report = await asyncio.wait_for(run_lab(one_message(port)), 30)
    assert (report.codes["AA"], report.codes["AE"], report.resent_after_ae) == (1, 0, 2)
    assert len(set(received)) == 1  # the same message each time, MSH-10 and all


async def test_a_content_ae_is_final() -> None:
    script = [(AckCode.APPLICATION_ERROR, ErrorCode.DATA_TYPE_ERROR)]
    async with answering(script) as (port, received):
        report = await asyncio.wait_for(run_lab(one_message(port)), 30)
    assert (report.codes["AE"], report.resent_after_ae, len(received)) == (1, 0, 1)


async def test_ae_207_is_final_once_ae_retry_for_has_passed() -> None:
    script = [(AckCode.APPLICATION_ERROR, ErrorCode.APPLICATION_INTERNAL_ERROR)]
    async with answering(script) as (port, received):
        report = await asyncio.wait_for(run_lab(one_message(port, ae_retry_for=0.0)), 30)
    assert (report.codes["AE"], report.resent_after_ae, len(received)) == (1, 0, 1)
