"""Liveness and readiness: named checks the HTTP `/readyz` endpoint reports.

`Readiness` holds named checks, each a callable returning a bool or a flag set by its owner (a
listener marks itself up once bound, the MQTT client while connected). Calling the instance
evaluates every check; a check that raises counts as not ready. It is what `gateway.http.create_app`
takes as `readiness`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from monitoring.metrics import Metrics

logger = logging.getLogger(__name__)

Check = Callable[[], bool]


class Readiness:
    """Named readiness checks; thread-safe (DICOM association threads may set flags)."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}
        self._flags: dict[str, bool] = {}
        self._lock = threading.Lock()

    def add_check(self, name: str, check: Check) -> None:
        """Register `check`, evaluated at each readiness probe."""
        with self._lock:
            if name in self._checks or name in self._flags:
                raise ValueError(f"readiness check {name!r} is already registered")
            self._checks[name] = check

    def set(self, name: str, ok: bool) -> None:
        """Set (or create) a flag check."""
        with self._lock:
            if name in self._checks:
                raise ValueError(f"readiness check {name!r} is a callable check")
            self._flags[name] = ok

    def __call__(self) -> dict[str, bool]:
        with self._lock:
            checks = dict(self._checks)
            result = dict(self._flags)
        for name, check in checks.items():
            try:
                result[name] = bool(check())
            except Exception:  # a failing check means "not ready", not a crash
                logger.warning("readiness check %s raised", name, exc_info=True)
                result[name] = False
        return dict(sorted(result.items()))


def is_ready(checks: Mapping[str, bool]) -> bool:
    """Ready when every check holds (vacuously so when there is none)."""
    return all(checks.values())


def metric_is_one(metrics: Metrics, name: str) -> Check:
    """A check holding while the gauge `name` (no labels) reads 1: `qantara_db_available`."""

    def check() -> bool:
        return metrics.sample(name) == 1.0

    return check


def record_readiness(metrics: Metrics, checks: Mapping[str, bool]) -> bool:
    """Publish one readiness evaluation as `qantara_ready` and `qantara_readiness_check{check}`.

    The gateway calls it at each `/readyz` probe and from its upkeep loop, so that Prometheus,
    which scrapes `/metrics` and not `/readyz`, can alert on a replica that is up but not ready.
    """
    ready = is_ready(checks)
    for name, ok in checks.items():
        metrics.readiness_check.labels(name).set(1 if ok else 0)
    metrics.ready.set(1 if ready else 0)
    return ready


def record_storage_usage(metrics: Metrics, path: Path, mount_check: Path | None = None) -> bool:
    """Set the DICOM store's free and total bytes from its file system; False if unreadable.
    With `mount_check` (`QANTARA_DICOM_STORAGE_CHECK_FILE`), also whether its volume is mounted:
    unmounted, the bytes are those of the disk beneath.

    Free is what an unprivileged process may still write (`statvfs` `f_bavail`), the figure
    that matters to the gateway's non-root user. Blocking: call it from a thread.
    """
    if mount_check is not None:
        metrics.storage_mounted(mount_check.exists())
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        logger.warning("cannot measure the DICOM store's file system: %s", exc.strerror)
        return False
    metrics.dicom_storage_free.set(usage.free)
    metrics.dicom_storage_total.set(usage.total)
    return True
