"""The file I/O pool: one thread while it keeps up, more only when a call waits.

Stuck calls (a FIFO, a hung filesystem) and their bounds are tested with the hostile
files in test_hostile_input.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from standins.agents import poll_async
from taskfiles import io_pool

# Long enough that thread scheduling on a busy machine does not start a thread the test
# does not expect; short enough that a missing one fails well within the calls' timeout.
GROW_AFTER = 0.3


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh pool for this test; the worker's own is put back afterwards."""
    monkeypatch.setattr(io_pool, "_pool", None)


def serving() -> int:
    assert io_pool._pool is not None
    return io_pool._pool.serving


def hold(started: threading.Event, release: threading.Event) -> int:
    """A call that is stuck until released, as a read of a hung filesystem is."""
    started.set()
    release.wait(30)
    return threading.get_ident()


async def _one_serving() -> bool:
    return serving() == 1


async def test_one_thread_serves_a_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    # No timing in play: a call would have to wait 30 s unstarted to add a thread.
    monkeypatch.setattr(io_pool, "GROW_AFTER_SECONDS", 30.0)
    threads = await asyncio.gather(*(io_pool.run_file_io(threading.get_ident)
                                     for _ in range(200)))
    assert len(set(threads)) == 1
    assert threading.get_ident() not in threads
    assert serving() == 1


async def test_a_call_behind_a_stuck_one_gets_a_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io_pool, "GROW_AFTER_SECONDS", GROW_AFTER)
    started, release = threading.Event(), threading.Event()
    try:
        stuck = asyncio.create_task(io_pool.run_file_io(hold, started, release, timeout=30))
        assert await asyncio.to_thread(started.wait, 10)
        # Without a second thread this call would wait for the stuck one and fail at 3 s.
        assert await io_pool.run_file_io(sum, [1, 2], timeout=3) == 3
        assert serving() == 2
    finally:
        release.set()
    await stuck


async def test_threads_beyond_the_first_leave_when_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io_pool, "GROW_AFTER_SECONDS", GROW_AFTER)
    monkeypatch.setattr(io_pool, "IDLE_THREAD_SECONDS", 0.2)
    started, release = threading.Event(), threading.Event()
    try:
        stuck = asyncio.create_task(io_pool.run_file_io(hold, started, release, timeout=30))
        assert await asyncio.to_thread(started.wait, 10)
        second = await io_pool.run_file_io(threading.get_ident, timeout=3)
        assert serving() == 2
    finally:
        release.set()
    first = await stuck
    await poll_async(_one_serving, 10, "the second thread to leave")
    # The one left still serves: no thread was started for this call.
    assert await io_pool.run_file_io(threading.get_ident, timeout=3) in {first, second}
    assert serving() == 1


async def test_a_short_timeout_still_asks_for_a_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A call whose whole timeout is shorter than the growth delay asks for a thread
    halfway through it, rather than fail because the one thread is stuck."""
    monkeypatch.setattr(io_pool, "GROW_AFTER_SECONDS", 30.0)
    started, release = threading.Event(), threading.Event()
    try:
        stuck = asyncio.create_task(io_pool.run_file_io(hold, started, release, timeout=60))
        assert await asyncio.to_thread(started.wait, 10)
        asked = time.monotonic()
        assert await io_pool.run_file_io(sum, [7], timeout=6) == 7
        assert time.monotonic() - asked < 5  # served after about 3 s, not at the deadline
    finally:
        release.set()
    await stuck
