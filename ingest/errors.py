"""The error tree every edge maps to its own answer (HL7 AE/AR, DICOM status, HTTP 400...).

`InputError` is the sender's fault: its `reason` is a short slug used as a metric label and stored
with the dead letter; `detail` is a human sentence for logs and error bodies and must never carry
patient data. `StorageUnavailable` is ours and transient: nothing is acknowledged while it holds.
"""

from __future__ import annotations

import os


class QantaraError(Exception):
    """Base of every error Qantara raises on purpose."""


class InputError(QantaraError):
    """Bad input from a sender; answered precisely, never fatal to a listener."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StorageUnavailable(QantaraError):
    """The database cannot commit right now; retry later, acknowledge nothing meanwhile."""


class ConfigError(QantaraError):
    """A setting has a bad value; the message names the variable and what is wrong."""


class ListenerError(QantaraError):
    """A listener cannot take its port (in use, not permitted): the gateway stops at start."""

    def __init__(self, listener: str, host: str, port: int, why: str) -> None:
        super().__init__(f"{listener} on {host}:{port}: {why}")
        self.listener = listener

    @classmethod
    def binding(cls, listener: str, host: str, port: int, exc: OSError) -> ListenerError:
        # A name that does not resolve is a socket.gaierror, whose errno (EAI_*) is not one
        # os.strerror knows: its own strerror says it ("Name or service not known").
        why = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
        return cls(listener, host, port, why)
