"""A stored instance sent as a C-STORE sub-operation over an association (a C-GET's own, or a
C-MOVE's to its destination); its C-STORE-RSP is the caller's (`Link.response`).

`send_stored` writes the C-STORE-RQ, then the dataset: the bytes of the stored file after its
File Meta Information, unchanged (stored as received, sent as stored), read in the listener's file
workers a MiB at a time, one read ahead of the send, and cut into P-DATA-TF PDUs within the peer's
maximum length; a 1 GB instance is never in memory. Or, with a conversion
(`dicom.syntax_conversion`), read whole, walked to its end (`dicom.header.walk_file`), converted
and sent. A file that cannot be opened, whose header cannot be read, whose size is not the one
indexed, or that cannot be converted raises `Unreadable` before anything is sent; a read error
after the command is sent raises `OSError`: a DIMSE message cannot be cut, only its association
aborted.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dicom import dimse
from dicom.association import Endpoint
from dicom.filemeta import dataset_offset
from dicom.header import HeaderError, walk_file
from dicom.link import Link
from dicom.syntax_conversion import ConversionError, convert
from monitoring.metrics import Metrics

Work = Callable[..., Awaitable[Any]]
"""Runs a blocking file step in the listener's file workers: `work(function, *args)`."""

READ_CHUNK: Final = 1 << 20
_HEAD: Final = 4096  # holds the preamble and any File Meta Information the listener writes


class Unreadable(Exception):
    """The instance's file cannot be sent (missing, unreadable, not Part 10, not convertible);
    nothing was sent."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A stored instance's file, and its size as the index has it."""

    path: Path
    size: int


async def _converted(stored: StoredFile, conversion: tuple[str, str], work: Work) -> bytes:
    try:
        data: bytes = await work(_read_dataset, stored)
        converted: bytes = await work(convert, data, *conversion)
    except (OSError, ValueError, HeaderError) as exc:
        raise Unreadable(f"file unreadable: {type(exc).__name__}") from exc
    except ConversionError as exc:
        raise Unreadable(f"conversion failed: {exc}") from exc
    return converted


def _read_dataset(stored: StoredFile) -> bytes:
    """The dataset bytes of a stored file, whole, once its elements are walked to its end
    (blocking; a converted instance is small). pydicom, which converts, reads a value cut short
    without a word: the walk refuses it (`HeaderError`), as it does at store time."""
    data = stored.path.read_bytes()
    if len(data) != stored.size:
        raise ValueError("the size is not the one indexed")
    walk_file(data, ())
    return data[dataset_offset(data[:_HEAD]) :]


async def send_stored(
    link: Link[Any],
    context: int,
    request: dimse.Command,
    stored: StoredFile,
    work: Work,
    metrics: Metrics,
    conversion: tuple[str, str] | None = None,
) -> None:
    """Send `request` and the dataset of the file `stored` on `context`; with `conversion`
    (stored, wanted), encoded again in the wanted transfer syntax first
    (`dicom.syntax_conversion`)."""
    endpoint: Endpoint = link.endpoint
    path = stored.path
    if conversion is not None:
        data = await _converted(stored, conversion, work)
        await link.send(endpoint.send_message(context, request))
        view = memoryview(data)
        for start in range(0, max(len(data), 1), READ_CHUNK):
            last = start + READ_CHUNK >= len(data)
            await link.send(endpoint.send_fragment(context, view[start : start + READ_CHUNK], last))
        metrics.dicom_retrieved_bytes.inc(len(data))
        return
    try:
        fd: int = await work(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Unreadable(f"open failed: {type(exc).__name__}") from exc
    reading: asyncio.Future[bytes] | None = None
    try:
        try:
            head: bytes = await work(os.pread, fd, _HEAD, 0)
            size = os.fstat(fd).st_size
            position = dataset_offset(head)
        except (OSError, ValueError) as exc:
            raise Unreadable(f"header unreadable: {type(exc).__name__}") from exc
        if size != stored.size:
            raise Unreadable("its size is not the one indexed")
        await link.send(endpoint.send_message(context, request))
        if position >= size:
            await link.send(endpoint.send_fragment(context, b"", last=True))
            return
        reading = asyncio.ensure_future(work(os.pread, fd, READ_CHUNK, position))
        while reading is not None:
            # Shielded: a cancelled association must not close the file under a running read.
            chunk = await asyncio.shield(reading)
            if not chunk:
                raise OSError("the file ended before its size")
            position += len(chunk)
            last = position >= size
            reading = (
                None if last else asyncio.ensure_future(work(os.pread, fd, READ_CHUNK, position))
            )
            await link.send(endpoint.send_fragment(context, chunk, last))
            metrics.dicom_retrieved_bytes.inc(len(chunk))
    finally:
        if reading is None or reading.done():
            os.close(fd)
        else:  # the read ahead is still running in a worker: close once it has ended
            reading.add_done_callback(lambda _: os.close(fd))
