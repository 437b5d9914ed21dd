"""File work of activities, off the event loop and bounded in time and in threads.

Agents can write everything the activities read, and a read can block in the kernel
(a FIFO opened the wrong way, a hung network filesystem). On asyncio's default
executor such a read would hold its thread forever, and asyncio.run joins that
executor at exit, so one planted file kept the worker from stopping. Here each call:

- runs on a thread of a small pool of our own, made of daemon threads that nothing
  joins at shutdown;
- waits at most FILE_IO_TIMEOUT_SECONDS (queueing included), then raises
  FileIoStalledError so the stage that asked fails with a clear message;
- leaves a stuck thread behind and puts a fresh one in its place, so at most
  MAX_FILE_IO_THREADS reads run at once. Past MAX_STUCK_THREADS still-stuck threads,
  new calls fail at once instead of piling up more.

One thread serves while it keeps up: file calls take a millisecond or two, and every
extra thread contending for the GIL costs the worker CPU (bench/README.md). A call not
started within GROW_AFTER_SECONDS (its thread is stuck or behind) starts another, up
to MAX_FILE_IO_THREADS, so a stuck read delays other pipelines by that much at most;
threads beyond the first leave after IDLE_THREAD_SECONDS without work.

The pool is created on first use, never at import.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from exceptions import FileIoStalledError

log = logging.getLogger(__name__)

T = TypeVar("T")

FILE_IO_TIMEOUT_SECONDS = 10.0
MAX_FILE_IO_THREADS = 8
MAX_STUCK_THREADS = 64
GROW_AFTER_SECONDS = 0.2
IDLE_THREAD_SECONDS = 30.0

_Work = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]


class _DaemonPool:
    """A thread pool whose threads are daemons and whose stuck threads are replaced."""

    def __init__(self, size: int, max_stuck: int) -> None:
        self._size = size
        self._max_stuck = max_stuck
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._serving = 0  # threads that take work from the queue
        self._abandoned: set[concurrent.futures.Future[Any]] = set()

    @property
    def stuck(self) -> int:
        return len(self._abandoned)

    @property
    def serving(self) -> int:
        return self._serving

    def submit(self, fn: Callable[..., Any],
               args: tuple[Any, ...]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if len(self._abandoned) >= self._max_stuck:
                raise FileIoStalledError(f"{len(self._abandoned)} file reads are still stuck; "
                                         f"refusing to start another")
            if self._serving == 0:
                self._spawn()
            self._work.put((future, fn, args))
        return future

    def relieve(self, future: concurrent.futures.Future[Any]) -> None:
        """`future` has waited a while without starting: add a thread."""
        with self._lock:
            if not (future.running() or future.done()) and self._serving < self._size:
                self._spawn()

    def abandon(self, future: concurrent.futures.Future[Any]) -> None:
        """The caller gave up on `future`: drop it if it never started, else let its
        thread go (it ends when the call returns) and start another in its place."""
        if future.cancel():
            return
        with self._lock:
            if future.done():
                return
            self._abandoned.add(future)
            self._serving -= 1
            if not self._work.empty() and self._serving < self._size:
                self._spawn()

    def _spawn(self) -> None:  # lock held
        threading.Thread(target=self._serve, name="file-io", daemon=True).start()
        self._serving += 1  # only once it runs: a failed start counts no thread

    def _serve(self) -> None:
        while True:
            try:
                future, fn, args = self._work.get(timeout=IDLE_THREAD_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._serving > 1:
                        self._serving -= 1
                        return
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as err:  # handed to the caller, as an executor does
                future.set_exception(err)
            else:
                future.set_result(result)
            with self._lock:
                if future in self._abandoned:
                    self._abandoned.discard(future)
                    return  # replaced while it was stuck: leave the pool


_pool: _DaemonPool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _DaemonPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = _DaemonPool(MAX_FILE_IO_THREADS, MAX_STUCK_THREADS)
        return _pool


def stuck_threads() -> int:
    """How many file calls are still running after their caller gave up on them."""
    return _pool.stuck if _pool is not None else 0


def _describe(fn: Callable[..., Any], args: tuple[Any, ...]) -> str:
    if isinstance(fn, functools.partial):
        args = (*fn.args, *args)
        fn = fn.func
    name = getattr(fn, "__name__", type(fn).__name__)
    path = next((arg for arg in args if hasattr(arg, "__fspath__")), None)
    return f"{name}({path})" if path is not None else name


async def run_file_io(fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
    """`fn(*args)` on the file I/O pool, with the caller's context (log fields, activity
    info); FileIoStalledError if it does not finish within `timeout` seconds
    (default FILE_IO_TIMEOUT_SECONDS). Cancelling the caller stops waiting at once."""
    limit = FILE_IO_TIMEOUT_SECONDS if timeout is None else timeout
    pool = _get_pool()
    context = contextvars.copy_context()
    future: concurrent.futures.Future[T] = pool.submit(context.run, (fn, *args))
    waiter = asyncio.wrap_future(future)
    first_wait = min(GROW_AFTER_SECONDS, limit / 2)
    try:
        done, _ = await asyncio.wait({waiter}, timeout=first_wait)
        if not done:
            pool.relieve(future)
            done, _ = await asyncio.wait({waiter}, timeout=limit - first_wait)
    except BaseException:  # cancelled, or no thread could be started: nobody will wait
        waiter.cancel()
        pool.abandon(future)
        raise
    if not done:
        waiter.cancel()
        pool.abandon(future)
        what = _describe(fn, args)
        log.warning("file_io_stalled", extra={"call": what, "timeout_seconds": limit,
                                              "stuck_threads": pool.stuck})
        raise FileIoStalledError(f"{what} did not finish within {limit:g}s (a FIFO, a hung "
                                 f"filesystem?); gave up on it")
    return waiter.result()
