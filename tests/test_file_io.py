"""The file I/O pool: one thread while it keeps up, more only when a call waits.

Stuck calls (a FIFO, a hung filesystem) and their bounds are tested with the hostile
files in test_hostile_input.py."""

from __future__ import annotations

import asyncio
import threading

import pytest

import file_io
from tests.standin import poll_async


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh pool for this test; the worker's own is put back afterwards."""
    monkeypatch.setattr(file_io, "_pool", None)


def serving() -> int:
    assert file_io._pool is not None
    return file_io._pool.serving


async def test_one_thread_serves_a_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    # No timing in play: a call would have to wait 30 s unstarted to add a thread.
    monkeypatch.setattr(file_io, "GROW_AFTER_SECONDS", 30.0)
    names = await asyncio.gather(*(file_io.run_file_io(lambda: threading.current_thread().name)
                                   for _ in range(200)))
    assert set(names) == {"file-io"}
    assert serving() == 1


async def test_a_call_behind_a_stuck_one_gets_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_io, "GROW_AFTER_SECONDS", 0.05)
    started, release = threading.Event(), threading.Event()
    try:
        stuck = asyncio.create_task(file_io.run_file_io(hold, started, release, timeout=30))
        await asyncio.to_thread(started.wait, 10)
        assert await file_io.run_file_io(sum, [1, 2], timeout=10) == 3
        assert serving() == 2
    finally:
        release.set()
    assert await stuck is True


async def test_threads_beyond_the_first_leave_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file_io, "GROW_AFTER_SECONDS", 0.05)
    started, release = threading.Event(), threading.Event()
    try:
        stuck = asyncio.create_task(file_io.run_file_io(hold, started, release, timeout=30))
        await asyncio.to_thread(started.wait, 10)
        assert await file_io.run_file_io(sum, [4], timeout=10) == 4
        assert serving() == 2
        monkeypatch.setattr(file_io, "IDLE_THREAD_SECONDS", 0.1)
    finally:
        release.set()
    await stuck
    await poll_async(_one_serving, 10, "the second thread to leave")
    assert await file_io.run_file_io(sum, [5], timeout=10) == 5


def hold(started: threading.Event, release: threading.Event) -> bool:
    """A call that is stuck until released, as a read of a hung filesystem is."""
    started.set()
    return release.wait(30)


async def _one_serving() -> bool:
    return serving() == 1
