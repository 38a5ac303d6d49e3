"""Tasks a component starts in its owner's task group while it is open, and cancels when it
closes: the handshakes of a TLS listener, the Storage Commitment reports on their way. Structured
concurrency without a group of their own: they live and fail inside the listener's."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class GroupTasks:
    """Tasks of a task group while it is open (`open`), cancelled when it closes (`close`)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def open(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def close(self) -> None:
        self._group = None
        for task in self._tasks:
            task.cancel()

    def start(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run `work` in the group; False (and it is dropped) once closed."""
        group = self._group
        if group is None:
            work.close()
            return False
        task = group.create_task(work, name=self._name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True
