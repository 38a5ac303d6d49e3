"""Where pynetdicom writes a C-STORE dataset while it arrives: our temp folder, hashed on the way.

With `STORE_RECV_CHUNKED_DATASET` pynetdicom writes each received dataset to a file it opens with
`tempfile.NamedTemporaryFile` (system temp folder) and flushes after every fragment. `install()`
replaces that factory, for pynetdicom only, by `SpoolFile`: a file in the store's own temp
folder (`<storage>/tmp/<random>.part`, so the final step is a link, never a copy) that feeds
SHA-256 with every byte written (no second read for the digest) and writes each fragment
straight to the OS (pynetdicom's per-fragment `flush` becomes a no-op).

The folder is found from the receiving thread: pynetdicom decodes P-DATA in the association's
DUL thread, whose `assoc.ae` is the AE a `DicomServer` registered with `register()`. A dataset of
another AE (none registered) goes to the system temp folder as before.

Every spool file is tracked until a handler claims it; `discard_unclaimed(assoc)` removes those
an aborted or failed transfer left behind (called when the association ends). Temp files of a
process that died are swept by `FileStore.open` and `FileStore.sweep_temp`.

A C-STORE command without Affected SOP Class/Instance UID would make pynetdicom's reader thread
die while it opens the file; `_complete_command` gives it a placeholder so that the handler can
answer 0xC001 instead.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Final

import pynetdicom.dimse_messages

from dicom.filestore import TMP_SUFFIX

logger = logging.getLogger(__name__)

PLACEHOLDER_UID: Final = "0"
"""Stands for an Affected SOP UID the C-STORE command lacked; never indexed (refused)."""

_lock = threading.Lock()
_folders: dict[int, Path] = {}  # id(AE) -> spool folder
_open: dict[str, SpoolFile] = {}  # path -> spool file not yet claimed
_installed = False


class SpoolFile:
    """The file-like object pynetdicom writes a received dataset to (`write`, `file.flush`,
    `close`, `name`), hashing as it goes."""

    def __init__(self, folder: Path, owner: int) -> None:
        self.path = folder / (secrets.token_hex(16) + TMP_SUFFIX)
        self.name = str(self.path)
        self.owner = owner  # id() of the association
        self._digest = hashlib.sha256()
        self._size = 0
        self._file: IO[bytes] = open(self.path, "xb", buffering=0)  # noqa: SIM115 - closed by close()
        self.closed = False
        self.command_incomplete = False  # the command lacked a SOP UID (see _complete_command)

    @property
    def file(self) -> SpoolFile:
        """pynetdicom calls `.file.flush()` after every fragment: deferred to `finish()`."""
        return self

    def flush(self) -> None:
        return None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._digest.update(data)
        view = memoryview(data)
        while view:  # an unbuffered write may take less than it was given
            written = self._file.write(view)
            view = view[written or 0 :]
        self._size += len(data)
        return len(data)

    def finish(self) -> tuple[bytes, int]:
        """The SHA-256 and size of what was written (each write went straight to the OS; the
        data is not fsynced yet)."""
        return self._digest.digest(), self._size

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()


def install() -> None:
    """Make pynetdicom spool received datasets through `_open_spool` (idempotent)."""
    global _installed
    with _lock:
        if not _installed:
            pynetdicom.dimse_messages.NamedTemporaryFile = _open_spool  # type: ignore[attr-defined]
            _installed = True


def register(ae: object, folder: Path) -> None:
    """Datasets received by associations of `ae` are spooled in `folder`."""
    with _lock:
        _folders[id(ae)] = folder


def unregister(ae: object) -> None:
    with _lock:
        _folders.pop(id(ae), None)


def claim(path: Path | str) -> SpoolFile | None:
    """The spool file at `path`, now the handler's (None: not one of ours)."""
    with _lock:
        return _open.pop(str(path), None)


def discard_unclaimed(assoc: object) -> int:
    """Close and remove the spool files of `assoc` that no handler took (an aborted transfer,
    a command pynetdicom could not serve). Returns how many went."""
    owner = id(assoc)
    with _lock:
        mine = [s for s in _open.values() if s.owner == owner]
        for spool in mine:
            del _open[spool.name]
    for spool in mine:
        try:
            spool.close()
            spool.path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("DICOM spool cleanup failed: %s", type(exc).__name__)
    return len(mine)


def pending() -> int:
    """Spool files written or being written that no handler has taken yet."""
    with _lock:
        return len(_open)


def _open_spool(*args: Any, **kwargs: Any) -> Any:
    """Stands in for `tempfile.NamedTemporaryFile` inside `pynetdicom.dimse_messages`."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    ae = getattr(assoc, "ae", None)
    with _lock:
        folder = _folders.get(id(ae)) if ae is not None else None
    if folder is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    incomplete = _complete_command(assoc)
    spool = SpoolFile(folder, id(assoc))
    spool.command_incomplete = incomplete
    with _lock:
        _open[spool.name] = spool
    return spool


def _complete_command(assoc: object) -> bool:
    """Give an absent Affected SOP Class/Instance UID of the C-STORE command being decoded a
    placeholder: pynetdicom reads both right after opening the file and writes them into its File
    Meta, and an absent or empty one kills the association's reader thread (the peer would only
    see the association go). With the placeholder the request reaches the handler, which sees
    `SpoolFile.command_incomplete` and refuses it with 0xC001 (missing UID); the association
    goes on. Returns whether a UID was missing."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    command = getattr(message, "command_set", None)
    if command is None:
        return False
    missing = False
    for keyword in ("AffectedSOPClassUID", "AffectedSOPInstanceUID"):
        if not command.get(keyword):
            setattr(command, keyword, PLACEHOLDER_UID)
            missing = True
    return missing
