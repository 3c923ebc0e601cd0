"""Shared helpers for the engine tests: condition waits and small stage factories."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pipeline import CapacityLimiter, Context, factory

T = TypeVar("T")


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate()`` holds (pytest-timeout bounds a hang).

    Used only to wait for engine-internal state that has no event of its own; what the
    tests assert never depends on how long this takes.
    """
    while not predicate():  # noqa: ASYNC110 - the state has no event to wait on
        await asyncio.sleep(0.001)


class LimiterSpy:
    """Wraps a stage callable in a factory that keeps the stage's own limiter for inspection."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.limiter: CapacityLimiter | None = None

    def factory(self) -> Callable[..., Any]:
        spy = self

        @factory
        @contextlib.asynccontextmanager
        async def open_stage(ctx: Context) -> AsyncIterator[Callable[..., Any]]:
            spy.limiter = ctx.limiter
            yield spy.fn

        open_stage.__name__ = getattr(self.fn, "__name__", "spied")
        return open_stage


async def next_or_fail(queue: asyncio.Queue[T], run: asyncio.Task[Any]) -> T:
    """The next value from ``queue``; if the run ends first, fail with what it returned or raised."""
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    raise AssertionError(f"the run ended while the test waited for a stage: {run.result()!r}")
