"""`monitoring.thread_names`: the gateway's pool threads carry their names in the OS."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

from monitoring.thread_names import name_native_thread


def _native_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


def test_a_pool_thread_shows_its_python_name_to_the_os() -> None:
    with concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="dicom-spool", initializer=name_native_thread
    ) as pool:
        assert pool.submit(_native_name).result(timeout=5) == "dicom-spool_0"


def test_a_long_name_is_cut_to_the_fifteen_bytes_linux_keeps() -> None:
    def named() -> str:
        assert name_native_thread()
        return _native_name()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="a-rather-long-pool") as pool:
        assert pool.submit(named).result(timeout=5) == "a-rather-long-p"
