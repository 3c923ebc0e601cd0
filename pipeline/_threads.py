"""The run's dedicated thread pool: sized from the thread stages' caps, installed as the loop's
default executor (``asyncio.to_thread`` always uses that one), joined at the end without
blocking the loop, and never for longer than a bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Final

__all__ = ["THREAD_HEADROOM", "Executor", "installed", "open_executor", "shutdown"]

log = logging.getLogger("pipeline")

THREAD_HEADROOM: Final = 4
"""Extra threads beyond the thread stages' caps: the source, getaddrinfo and user to_thread calls."""


class Executor(concurrent.futures.ThreadPoolExecutor):
    """The run's pool; :attr:`abandoned` counts the threads left inside a call when it closed."""

    abandoned = 0


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
    """A pool of ``threads`` (plus :data:`THREAD_HEADROOM`) named ``pipeline-<name>``.

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
        alive = [t for t in executor._threads if t.is_alive()]  # no public view of the threads
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
