"""``concurrency = Auto()`` in a real pipeline against loopback servers with a known optimum.

Assertions stay well inside the benchmark's pass figures (``bench/adaptive.py``), since a test
machine may be busy: these check direction and order of magnitude, the bench the numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from pipeline import Auto, CapacityLimiter, Context, Item, Pipeline, Retry, RunReport, Source, Stage, factory

from .servers import KneeServer, fetch

RETRY = Retry(attempts=50, backoff=0.02, max_backoff=0.2, jitter=0.02)


class Answers:
    """The answers a stage got and the cap the last one saw, for a test to wait on."""

    def __init__(self) -> None:
        self.count = 0
        self.limit = 0
        self._changed = asyncio.Event()

    def note(self, limiter: CapacityLimiter) -> None:
        """Count one answer; called on the loop, so ``limiter`` is read where it is written."""
        self.count += 1
        self.limit = limiter.total
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], run: asyncio.Task[Any]) -> None:
        """Wait for an answer after which ``predicate()`` holds; fail if ``run`` ends first."""
        while not predicate():
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait({waiter, run}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                waiter.cancel()
                raise AssertionError(f"the run ended while the test waited: {run.result()!r}")


def watched(answers: Answers) -> Callable[..., Any]:
    """:func:`fetch`, telling ``answers`` of each answer and the stage's cap at that moment."""

    @factory
    @contextlib.asynccontextmanager
    async def fetch_watched(ctx: Context) -> AsyncIterator[Callable[[Item], Item]]:
        loop = asyncio.get_running_loop()
        limiter = ctx.limiter
        assert limiter is not None
        async with fetch(ctx) as get:

            def call(item: Item) -> Item:
                out = get(item)
                loop.call_soon_threadsafe(answers.note, limiter)
                return out

            yield call

    return fetch_watched


async def run(server: KneeServer, n: int, concurrency: int | Auto, rate: str | None = None) -> RunReport:
    url = server.url()

    def source() -> list[dict[str, object]]:
        return [{"id": i, "url": url} for i in range(n)]

    stage = Stage(fetch, name="fetch", concurrency=concurrency, retry=RETRY, timeout=10.0, rate=rate)
    pipeline = Pipeline(Source(source), [stage], name="adaptive-test", report_dir=None)
    return await pipeline.run_async(progress=False)


async def test_auto_approaches_the_best_fixed_cap_on_a_knee() -> None:
    """On a server whose knee is 8 in flight, auto gets at least 60% of the throughput of a fixed
    cap of 8 (the optimum), and its limit rises above the initial 4. (make bench shows the real
    figure, >= 90%; this run is short, so its ramp-up weighs more, and CI machines are noisy.)"""
    with KneeServer(base=0.02, knee=8, degrade=0.3) as server:
        fixed = await run(server, 300, 8)
    with KneeServer(base=0.02, knee=8, degrade=0.3) as server:
        auto = await run(server, 300, Auto(max=64))
    assert auto.items.ok == fixed.items.ok == 300
    assert 300 / auto.wall_s >= 0.6 * 300 / fixed.wall_s
    assert max(limit for _, limit in auto.stages[0].limit_trace) > 4


async def test_auto_backs_off_a_rate_wall() -> None:
    """Against a 429 wall at 200/s (20 ms answers: 4 in flight), auto starting at 16 cuts its
    limit after the 429s, and gets under half the 429s a fixed cap of 16 gets; every item ends ok."""
    with KneeServer(base=0.02, knee=1000, wall=200) as server:
        await run(server, 400, 16)
        fixed_share = server.rejected / (server.rejected + server.ok)
    with KneeServer(base=0.02, knee=1000, wall=200) as server:
        report = await run(server, 400, Auto(initial=16, max=64))
        share = server.rejected / (server.rejected + server.ok)
    trace = report.stages[0].limit_trace
    assert report.items.ok == 400
    assert share < fixed_share / 2
    assert trace[-1][1] < 16


async def test_rate_keeps_a_fixed_cap_off_the_wall() -> None:
    """With ``rate`` under the wall (and a burst under its bucket), no request gets a 429."""
    with KneeServer(base=0.01, knee=1000, wall=200, burst=20) as server:
        report = await run(server, 200, 16, rate="15/0.1s")
    assert report.items.ok == 200
    assert server.rejected == 0


async def test_auto_follows_capacity_down() -> None:
    """When the knee drops from 32 to 4 while the limit is above 16, the limit is at most 16
    once 200 more answers have come back.

    The test makes the shift itself, at the first answer that shows the limit above 16, and
    ends the source after a count of answers, so no step races the clock. Answers take 50 ms,
    not 20: at 20 ms, 32 in flight keep the client and server threads of a 2-core machine so
    busy that their own queueing looks like a knee near 16, and the limit may never pass it.
    """
    answers = Answers()
    stop = asyncio.Event()
    with KneeServer(base=0.05, knee=32, degrade=0.3) as server:
        url = server.url()

        async def source() -> AsyncIterator[dict[str, object]]:
            i = 0
            while not stop.is_set():
                yield {"id": i, "url": url}
                i += 1

        stage = Stage(watched(answers), name="fetch", concurrency=Auto(max=64), retry=RETRY, timeout=10.0)
        pipeline = Pipeline(Source(source), [stage], name="adaptive-test", report_dir=None)
        running = asyncio.create_task(pipeline.run_async(progress=False))
        try:
            await answers.until(lambda: answers.limit > 16 or answers.count >= 3000, running)
            assert answers.limit > 16, f"the limit never went above 16 in {answers.count} answers"
            shifted_at = answers.count
            server.shift(4)
            await answers.until(lambda: answers.count >= shifted_at + 200, running)
        finally:
            stop.set()  # the source ends, the run drains, even when the test failed
            report = await running
    trace = report.stages[0].limit_trace
    assert report.items.ok == report.items.read
    assert max(limit for _, limit in trace) > 16
    assert trace[-1][1] <= 16, f"limit trace after the shift: {trace}"
