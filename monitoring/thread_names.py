"""Give a Python thread its name in the operating system too.

CPython 3.11 names its threads for Python only: `top -H`, `ps -L` and /proc/<pid>/task/*/comm
show every thread of the gateway as `python`. `name_native_thread` (a `ThreadPoolExecutor`
initializer) copies the thread's Python name, cut to Linux's 15 bytes, so that an operator sees
which pool burns the CPU (`dicom-spool_0`, `dicom-file_3`) and `bench/dicom_store.py` can split
the gateway's CPU time by pool. Linux only (`prctl(PR_SET_NAME)`); elsewhere, or when the call
fails, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from typing import Final

PR_SET_NAME: Final = 15  # <linux/prctl.h>
NAME_BYTES: Final = 15  # TASK_COMM_LEN - 1

_Prctl = Callable[[int, bytes, int, int, int], int]


def _load() -> _Prctl | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.prctl
    except (OSError, AttributeError):
        return None
    function.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_ulong,
    )
    function.restype = ctypes.c_int
    return function


_prctl: Final = _load()


def name_native_thread() -> bool:
    """Name the calling thread in the OS after its Python name; True when the OS took it."""
    if _prctl is None:
        return False
    name = threading.current_thread().name.encode("utf-8", "replace")[:NAME_BYTES]
    return _prctl(PR_SET_NAME, name, 0, 0, 0) == 0
