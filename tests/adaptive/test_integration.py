"""``concurrency = Auto()`` in a real pipeline against loopback servers with a known optimum.

Every test here holds however fast or busy the machine is: each waits for answers (events), never
for time, and asserts only direction (the limit rose, the limit was cut, every item ended ok).
How far and how fast, which depends on the machine when measured in wall time, is tested in
virtual time in ``test_controllers.py`` (the same controllers against a simulated server of the
same shape) and measured by ``make bench``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pipeline import (
    Auto,
    CapacityLimiter,
    Context,
    Item,
    Overloaded,
    Pipeline,
    Retry,
    RunReport,
    Source,
    Stage,
    factory,
)

from ..waiting import Notes
from .servers import KneeServer, fetch

RETRY = Retry(attempts=50, backoff=0.02, max_backoff=0.2, jitter=0.02)


class Answers(Notes):
    """The answers a stage got (429s among them) and the cap the last one saw, for a test to
    wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.overloaded = 0
        self.limit = 0
        self.report: RunReport | None = None

    def note(self, limiter: CapacityLimiter, overloaded: bool) -> None:
        """Count one answer; called on the loop, so ``limiter`` is read where it is written."""
        self.overloaded += overloaded
        self.limit = limiter.total
        self.notify()


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
                overloaded = False
                try:
                    return get(item)
                except Overloaded:
                    overloaded = True
                    raise
                finally:
                    loop.call_soon_threadsafe(answers.note, limiter, overloaded)

            yield call

    return fetch_watched


@contextlib.asynccontextmanager
async def endless(
    server: KneeServer, answers: Answers, concurrency: Auto
) -> AsyncIterator[Callable[[Callable[[], bool]], Awaitable[None]]]:
    """Run a pipeline fetching from ``server`` for as long as the block lasts; yield a function
    that waits for an answer after which its predicate holds. The run's report, once the source
    has ended and the run has drained (even when the block failed), is in ``answers.report``."""
    stop = asyncio.Event()
    url = server.url()

    async def source() -> AsyncIterator[dict[str, object]]:
        i = 0
        while not stop.is_set():
            yield {"id": i, "url": url}
            i += 1

    stage = Stage(watched(answers), name="fetch", concurrency=concurrency, retry=RETRY, timeout=10.0)
    pipeline = Pipeline(Source(source), [stage], name="adaptive-test", report_dir=None)
    running = asyncio.create_task(pipeline.run_async(progress=False))

    async def until(predicate: Callable[[], bool]) -> None:
        await answers.until(predicate, running)

    try:
        yield until
    finally:
        stop.set()  # the source ends, the run drains, even when the test failed
        answers.report = await running


async def run(server: KneeServer, n: int, concurrency: int | Auto, rate: str | None = None) -> RunReport:
    url = server.url()

    def source() -> list[dict[str, object]]:
        return [{"id": i, "url": url} for i in range(n)]

    stage = Stage(fetch, name="fetch", concurrency=concurrency, retry=RETRY, timeout=10.0, rate=rate)
    pipeline = Pipeline(Source(source), [stage], name="adaptive-test", report_dir=None)
    return await pipeline.run_async(progress=False)


async def test_auto_raises_its_limit_below_a_knee() -> None:
    """On a server whose knee is 8 in flight, auto starting at 4 raises its limit above 4 (the
    latency does not grow, and every slot is in use); every item ends ok.

    The run ends at the first answer that shows a limit above 4 (or after 3000 answers, which
    fails), so nothing races the clock. How close auto comes to the best fixed cap's throughput
    is test_controllers.test_auto_approaches_the_best_fixed_cap_on_a_knee, in virtual time.
    """
    answers = Answers()
    with KneeServer(base=0.02, knee=8, degrade=0.3) as server:
        async with endless(server, answers, Auto(max=64)) as until:
            await until(lambda: answers.limit > 4 or answers.count >= 3000)
            assert answers.limit > 4, f"the limit never went above 4 in {answers.count} answers"
    report = answers.report
    assert report is not None
    assert report.items.ok == report.items.read
    assert max(limit for _, limit in report.stages[0].limit_trace) > 4


async def test_auto_cuts_its_limit_at_a_wall() -> None:
    """Against a server that answers 429 beyond 4 requests in flight, auto starting at 16 cuts
    its limit below 16 after the 429s, and ends below 16; every item ends ok.

    The wall counts requests in flight, not requests per second, so the 429s come however slow
    the client is. The run ends at the first answer that shows a cut limit (or after 3000
    answers, which fails). That auto gets under half the 429s a fixed cap of 16 gets against a
    rate wall is test_controllers.test_auto_backs_off_a_rate_wall, in virtual time.
    """
    answers = Answers()
    with KneeServer(base=0.02, knee=1000, wall_in_flight=4) as server:
        async with endless(server, answers, Auto(initial=16, max=64)) as until:
            await until(lambda: 0 < answers.limit < 16 or answers.count >= 3000)
            assert 0 < answers.limit < 16, f"the limit was not cut in {answers.count} answers"
            assert answers.overloaded > 0
            assert server.rejected > 0
    report = answers.report
    assert report is not None
    trace = report.stages[0].limit_trace
    assert report.items.ok == report.items.read
    assert trace[0][1] == 16
    assert trace[-1][1] < 16, f"limit trace: {trace}"


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
    with KneeServer(base=0.05, knee=32, degrade=0.3) as server:
        async with endless(server, answers, Auto(max=64)) as until:
            await until(lambda: answers.limit > 16 or answers.count >= 3000)
            assert answers.limit > 16, f"the limit never went above 16 in {answers.count} answers"
            shifted_at = answers.count
            server.shift(4)
            await until(lambda: answers.count >= shifted_at + 200)
    report = answers.report
    assert report is not None
    trace = report.stages[0].limit_trace
    assert report.items.ok == report.items.read
    assert max(limit for _, limit in trace) > 16
    assert trace[-1][1] <= 16, f"limit trace after the shift: {trace}"
