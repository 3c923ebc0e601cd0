"""Hard ceilings: an adaptive stage never goes above the pool of the database it uses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from pipeline import Auto, CapacityLimiter, Context, Database, Pipeline, Source, Stage, factory
from pipeline.testing import memory_source, open_context

from ..waiting import Notes

CEILING = 6
"""The database's concurrency. Not a power of two, so slow start (1, 2, 4, 8) must be cut
short by the ceiling to land on it."""

SERVICE_S = 0.005
"""What one call of the stage takes: the database's answer time, not a way to order events.
It keeps latency flat (loop overhead is a small part of it), so the controller sees headroom
and pushes the limit up at every update where all slots are in use."""

CALL_BUDGET = 20_000
"""Calls after which a wait gives up and fails (about 80 controller updates at 6 in flight):
a clear failure instead of a pytest-timeout when the controller stops moving the cap."""


class Calls(Notes):
    """The calls a stage started and the largest cap they saw, for a test to wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.max_limit = 0
        self.max_in_flight = 0
        self.limiter: CapacityLimiter | None = None

    def note(self, limiter: CapacityLimiter) -> None:
        """Count one call, made while ``limiter`` is held."""
        self.limiter = limiter
        self.max_limit = max(self.max_limit, limiter.total)
        self.max_in_flight = max(self.max_in_flight, limiter.borrowed)
        self.notify()

    def __repr__(self) -> str:
        return f"Calls(count={self.count}, limit={self.limit})"

    @property
    def limit(self) -> int:
        """The stage's cap now (0 before the first call)."""
        return self.limiter.total if self.limiter is not None else 0


def uses_db(calls: Calls) -> Callable[..., Any]:
    """A stage factory that asks for the ``catalog`` database and tells ``calls`` of each call."""

    @factory
    @contextlib.asynccontextmanager
    async def open_stage(ctx: Context) -> AsyncIterator[Callable[..., Any]]:
        ctx.database("catalog")
        limiter = ctx.limiter
        assert limiter is not None

        async def stage(item: dict[str, Any]) -> dict[str, Any]:
            calls.note(limiter)
            await asyncio.sleep(SERVICE_S)
            return item

        yield stage

    return open_stage


def pipeline(source: Source, calls: Calls, auto: Auto) -> Pipeline:
    return Pipeline(
        source,
        [Stage(uses_db(calls), name="uses_db", concurrency=auto)],
        databases={"catalog": Database(dsn="sqlite:///unused.db", concurrency=CEILING)},
        report_dir=None,
    )


async def test_auto_stage_using_a_database_starts_at_most_at_its_concurrency() -> None:
    """A factory that asks ctx.database() declares the database's concurrency as its ceiling:
    an auto stage whose initial cap is above it starts at the ceiling instead."""
    calls = Calls()
    p = pipeline(memory_source({"id": i} for i in range(20)), calls, Auto(min=1, max=64, initial=8))
    report = await p.run_async(progress=False)
    assert report.items.ok == 20
    assert report.stages[0].limit_trace[0] == (0.0, CEILING)


async def test_auto_stage_using_a_database_never_grows_past_its_concurrency() -> None:
    """Under a load that would take the limit past the ceiling (flat latency, every slot in
    use), the controller raises the cap up to the ceiling and, update after update, no further.

    The cap starts at 1 and the test waits until the controller has raised it to the ceiling
    (2, 4, then 8 cut to 6). Then, five times, the test lowers the cap by one and waits for
    the controller to set it again: each time is one more update, made with the stage still
    under load, whose value the test sees. The source runs until the test is done.
    """
    calls = Calls()
    stop = asyncio.Event()

    async def source() -> AsyncIterator[dict[str, Any]]:
        i = 0
        while not stop.is_set():
            yield {"id": i}
            i += 1

    p = pipeline(Source(source), calls, Auto(min=1, max=64, initial=1))
    running = asyncio.create_task(p.run_async(progress=False))
    try:
        await calls.until(lambda: calls.limit >= CEILING, running, give_up_after=CALL_BUDGET)
        assert calls.limit == CEILING
        for _ in range(5):
            assert calls.limiter is not None
            calls.limiter.total = CEILING - 1
            await calls.until(lambda: calls.limit >= CEILING, running, give_up_after=CALL_BUDGET)
            assert calls.limit == CEILING
    finally:
        stop.set()  # the source ends, the run drains, even when the test failed
        report = await running
    stage = report.stages[0]
    trace = stage.limit_trace
    assert report.items.ok == report.items.read
    # The controller set the cap to the ceiling at least 6 times (once on the way up, once
    # after each lowering), and never above it.
    assert sum(1 for _, limit in trace if limit == CEILING) >= 6, trace
    assert all(limit <= CEILING for _, limit in trace), trace
    assert calls.max_limit <= CEILING
    assert calls.max_in_flight <= CEILING
    assert stage.max_in_flight <= CEILING


async def test_cap_at_lowers_the_ceiling_only() -> None:
    """cap_at keeps the lowest ceiling declared."""
    async with open_context() as ctx:
        ctx.cap_at(10)
        ctx.cap_at(4)
        ctx.cap_at(7)
        assert ctx.ceiling == 4
