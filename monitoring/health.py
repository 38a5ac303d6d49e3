"""Liveness and readiness: named checks the HTTP `/readyz` endpoint reports.

`Readiness` holds named checks, each a callable returning a bool or a flag set by its owner (a
listener marks itself up once bound, the MQTT client while connected). Calling the instance
evaluates every check; a check that raises counts as not ready. It is what `gateway.http.create_app`
takes as `readiness`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

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
