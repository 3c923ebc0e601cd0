"""The run's dedicated threads: one lane (a thread pool of its own) per thread stage, sized to
the stage's largest cap, plus a shared pool installed as the loop's default executor
(``asyncio.to_thread``, the source, name lookups). All of it is joined at the end without
blocking the loop, and never for longer than a bound.

Why a lane per stage, measured (``bench/image_account.py``, the nightly image batch on 2
cores): with one pool shared by every stage, a thumbnail lands on whichever of the ~24 threads
is free, so glibc's per-thread malloc arenas each in turn grow by a decoded image and give it
back; the next image there faults its pages in again. That was ~2,500 page faults and ~10 ms
of system CPU per item. With the thumbnail stage on its own two threads their arenas stay warm
(~300 faults per item). A lane also keeps a stage's calls apart from its neighbours' in a
thread dump (``pipeline-<run>-<stage>_<n>``). Keeping one pool and capping malloc at two arenas
(``M_ARENA_MAX``) was measured too: 2-4x the faults of the lanes, for about the same CPU per
item, and a process-wide setting (README, Performance).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

from ._limiter import CapacityLimiter

__all__ = ["THREAD_HEADROOM", "Executor", "installed", "open_executor", "shutdown"]

log = logging.getLogger("pipeline")

T = TypeVar("T")

THREAD_HEADROOM: Final = 4
"""Extra threads beyond the thread stages' caps: the source, getaddrinfo and user to_thread calls."""


class Executor(concurrent.futures.ThreadPoolExecutor):
    """The run's shared pool, and the owner of each stage's lane.

    :attr:`abandoned` counts the threads (of the pool and the lanes) left inside a call when it
    closed.
    """

    abandoned = 0

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._prefix = thread_name_prefix
        self._lanes: dict[str, concurrent.futures.ThreadPoolExecutor] = {}

    def lane(self, stage: str, limiter: CapacityLimiter) -> concurrent.futures.ThreadPoolExecutor:
        """The pool that runs stage ``stage``'s calls, and only those: as many threads as its cap.

        A call that outlives its attempt keeps its slot until its thread returns, so the stage
        never has more calls in its lane than ``limiter.total``; raising the cap while the run
        goes on (``concurrency = "auto"``, a factory's ``ctx.limiter``) lets the lane grow with
        it. Threads start on first use, so a lane for a factory that turns out async costs
        nothing.
        """
        if stage in self._lanes:
            raise ValueError(f"stage {stage!r} already has a lane")
        pool = self._lanes[stage] = _Lane(limiter, f"{self._prefix}-{stage}")
        return pool

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the lanes and the shared pool down; then, with ``wait``, join them all (a stuck
        lane does not keep the others from being told to stop)."""
        for pool in self._lanes.values():
            pool.shutdown(wait=False, cancel_futures=cancel_futures)
        super().shutdown(wait=False, cancel_futures=cancel_futures)
        if wait:
            for pool in self._lanes.values():
                pool.shutdown(wait=True)
            super().shutdown(wait=True)

    def alive(self) -> list[threading.Thread]:
        """The threads, of the pool and the lanes, that have not finished."""
        pools = [self, *self._lanes.values()]
        return [t for pool in pools for t in pool._threads if t.is_alive()]  # no public view


class _Lane(concurrent.futures.ThreadPoolExecutor):
    """One stage's threads: at most as many as the stage's cap has ever been."""

    def __init__(self, limiter: CapacityLimiter, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max(1, limiter.total), thread_name_prefix=thread_name_prefix)
        self._limiter = limiter

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        total = self._limiter.total
        if total > self._max_workers:
            # ThreadPoolExecutor reads it on each submit to decide whether to start a thread.
            self._max_workers = total
        return super().submit(fn, *args, **kwargs)


@contextlib.contextmanager
def installed(loop: asyncio.AbstractEventLoop, executor: Executor) -> Iterator[None]:
    """Make ``executor`` the loop's default for the block; a fresh default afterwards, so that
    ``asyncio.run`` never joins the run's threads (a stuck one would hang it)."""
    loop.set_default_executor(executor)
    try:
        yield
    finally:
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor())


def open_executor(threads: int, name: str) -> Executor:
    """A pool of ``threads`` (plus :data:`THREAD_HEADROOM`) named ``pipeline-<name>``; the stages'
    lanes (:meth:`Executor.lane`) are named ``pipeline-<name>-<stage>``.

    Threads are created lazily, so counting every stage that may turn out to be async costs
    nothing.
    """
    return Executor(max_workers=threads + THREAD_HEADROOM, thread_name_prefix=f"pipeline-{name}")


async def shutdown(executor: Executor, wait_s: float) -> int:
    """Join every worker thread without blocking the loop, waiting at most ``wait_s`` seconds.

    A thread cannot be cancelled: one stuck in a call that never returns is left behind rather
    than hanging the run. Returns how many were left (the CLI then exits without joining them).
    """
    done = asyncio.get_running_loop().create_future()

    def join() -> None:
        try:
            executor.shutdown(wait=True, cancel_futures=True)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                done.get_loop().call_soon_threadsafe(_set_result, done)

    threading.Thread(target=join, name="pipeline-executor-shutdown", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(done), wait_s)
    except TimeoutError:
        alive = executor.alive()
        log.error(
            "%d worker threads are still inside stage calls %.0fs after the run ended; they are "
            "abandoned (a thread cannot be cancelled): %s",
            len(alive),
            wait_s,
            ", ".join(t.name for t in alive),
        )
        executor.abandoned = len(alive)
    return executor.abandoned


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
