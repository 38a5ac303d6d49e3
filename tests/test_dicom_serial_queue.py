"""`dicom.serial_queue.SerialQueue`: an association's file steps, in order, one at a time, on a
shared pool."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator

import pytest

from dicom.serial_queue import SerialQueue


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as executor:
        yield executor


def test_calls_run_in_submission_order_and_never_two_at_once(
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    queue = SerialQueue(pool)
    ran: list[int] = []
    running = 0
    overlapped = False
    lock = threading.Lock()

    def step(n: int) -> int:
        nonlocal running, overlapped
        with lock:
            running += 1
            overlapped = overlapped or running > 1
        time.sleep(0.0005)
        ran.append(n)
        with lock:
            running -= 1
        return n

    futures = [queue.submit(step, n) for n in range(200)]
    assert [f.result(timeout=10) for f in futures] == list(range(200))
    assert ran == list(range(200))
    assert not overlapped


def test_a_failing_call_fails_its_future_and_the_next_calls_still_run(
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    queue = SerialQueue(pool)

    def fail() -> None:
        raise OSError("disk full")

    failed = queue.submit(fail)
    after = queue.submit(lambda: "ran")
    with pytest.raises(OSError, match="disk full"):
        failed.result(timeout=5)
    assert after.result(timeout=5) == "ran"


def test_queues_share_one_thread_without_waiting_for_each_other_for_ever() -> None:
    """A queue holds a thread only while it has calls: two queues on a pool of one thread both
    finish, each in its own order."""
    with concurrent.futures.ThreadPoolExecutor(1) as single:
        first, second = SerialQueue(single), SerialQueue(single)
        ran: list[str] = []
        futures = []
        for n in range(50):
            futures.append(first.submit(ran.append, f"a{n}"))
            futures.append(second.submit(ran.append, f"b{n}"))
        concurrent.futures.wait(futures, timeout=10)
    assert all(f.done() for f in futures)
    assert [r for r in ran if r[0] == "a"] == [f"a{n}" for n in range(50)]
    assert [r for r in ran if r[0] == "b"] == [f"b{n}" for n in range(50)]


def test_an_idle_queue_on_a_pool_that_was_shut_down_refuses_at_once() -> None:
    executor = concurrent.futures.ThreadPoolExecutor(1)
    queue = SerialQueue(executor)
    assert queue.submit(lambda: 1).result(timeout=5) == 1
    executor.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        queue.submit(lambda: 2)
    with pytest.raises(RuntimeError):  # nothing was left queued behind the refusal
        queue.submit(lambda: 3)


def test_a_call_cancelled_before_it_ran_is_skipped(
    pool: concurrent.futures.ThreadPoolExecutor,
) -> None:
    queue = SerialQueue(pool)
    gate = threading.Event()
    ran: list[str] = []
    blocker = queue.submit(gate.wait, 5)
    skipped = queue.submit(ran.append, "cancelled")
    after = queue.submit(ran.append, "after")
    assert skipped.cancel()
    gate.set()
    blocker.result(timeout=5)
    after.result(timeout=5)
    assert ran == ["after"]
