"""Tests for the flow of items: exact in-flight counts, bounded queues, slots always given back."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline import Pipeline, Retry, Source, Stage, StageTimeout
from pipeline._run import Run
from pipeline.testing import memory_source, run_stages_async
from tests.engine.helpers import LimiterSpy, next_or_fail, wait_until

CAP = 3
N_ITEMS = 9


class InFlight:
    """Counts items inside a stage and reports each start to the test's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.started: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    def enter(self, key: int) -> None:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            now = self.now
        self.loop.call_soon_threadsafe(self.started.put_nowait, (key, now))

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


async def check_pool(flight: InFlight, release: Any, run: asyncio.Task[Any]) -> None:
    """Drive the run one item at a time and check it behaves as a pool of exactly CAP."""
    first = [await next_or_fail(flight.started, run) for _ in range(CAP)]
    assert sorted(key for key, _ in first) == list(range(CAP))
    assert flight.now == CAP
    pending = [key for key, _ in first]
    for _ in range(N_ITEMS - CAP):
        # Finish the oldest only: the others stay blocked while the next item starts.
        release(pending.pop(0))
        key, now = await next_or_fail(flight.started, run)
        assert now == CAP
        assert flight.now == CAP
        pending.append(key)
    for key in pending:
        release(key)
    report = (await run).report
    assert flight.peak == CAP
    assert report.items.ok == N_ITEMS
    assert report.stages[0].max_in_flight == CAP


async def test_async_stage_is_a_pool_of_exactly_cap() -> None:
    """An async stage with cap N keeps exactly N items in flight under load, never more, as a pool."""
    flight = InFlight(asyncio.get_running_loop())
    gates = {k: asyncio.Event() for k in range(N_ITEMS)}

    async def work(item: dict[str, Any]) -> dict[str, Any]:
        flight.enter(item["id"])
        await gates[item["id"]].wait()
        flight.leave()
        return item

    run = asyncio.create_task(
        run_stages_async([{"id": k} for k in range(N_ITEMS)], Stage(work, concurrency=CAP))
    )
    await check_pool(flight, lambda k: gates[k].set(), run)


async def test_thread_stage_is_a_pool_of_exactly_cap() -> None:
    """A thread stage with cap N keeps exactly N items in flight under load, never more, as a pool."""
    flight = InFlight(asyncio.get_running_loop())
    gates = {k: threading.Event() for k in range(N_ITEMS)}

    def work(item: dict[str, Any]) -> dict[str, Any]:
        flight.enter(item["id"])
        gates[item["id"]].wait()
        flight.leave()
        return item

    run = asyncio.create_task(
        run_stages_async([{"id": k} for k in range(N_ITEMS)], Stage(work, concurrency=CAP))
    )
    try:
        await check_pool(flight, lambda k: gates[k].set(), run)
    finally:
        for gate in gates.values():
            gate.set()


async def test_queues_bound_how_far_the_source_is_read_ahead() -> None:
    """A 10^6-item source feeding a slow sink is read at most queues + caps + one batch ahead."""
    read = 0
    lead = 0
    done = 0

    def source() -> Iterator[dict[str, Any]]:
        nonlocal read
        for i in range(10**6):
            read += 1
            yield {"id": i}

    async def fast(item: dict[str, Any]) -> dict[str, Any]:
        return item

    async def slow_sink(item: dict[str, Any]) -> dict[str, Any]:
        nonlocal lead, done
        for _ in range(3):
            await asyncio.sleep(0)
        lead = max(lead, read - done)
        done += 1
        return item

    stages = [Stage(fast, concurrency=4, queue_size=16), Stage(slow_sink, concurrency=2, queue_size=8)]
    p = Pipeline(Source(source), stages, queue_size=8, report_dir=None)
    report = await p.run_async(limit=3000, progress=False)
    assert report.items.ok == 3000
    bound = (16 + 8) + (4 + 2) + 256
    assert lead <= bound, f"the source ran {lead} items ahead of the sink; bound {bound}"
    assert lead > 16 + 8  # the source did run ahead: the bound was tested, not idle


async def test_slot_released_after_exception() -> None:
    """A stage attempt that raises gives its slot back: the next items run in the same single slot."""

    async def boom(item: dict[str, Any]) -> dict[str, Any]:
        if item["id"] == 1:
            raise ValueError("bad item")
        return item

    spy = LimiterSpy(boom)
    result = await run_stages_async(
        [{"id": k} for k in range(1, 5)], Stage(spy.factory(), retry=Retry(attempts=1))
    )
    assert result.report.items.failed == 1
    assert result.report.items.ok == 3
    assert spy.limiter is not None
    assert spy.limiter.borrowed == 0


async def test_slot_released_after_timeout() -> None:
    """An async attempt that outlives Stage(timeout=...) fails with StageTimeout and frees its slot."""
    never = asyncio.Event()

    async def hang_on_one(item: dict[str, Any]) -> dict[str, Any]:
        if item["id"] == 1:
            await never.wait()
        return item

    spy = LimiterSpy(hang_on_one)
    result = await run_stages_async(
        [{"id": k} for k in range(1, 4)],
        Stage(spy.factory(), timeout=0.05, retry=Retry(attempts=1)),
    )
    assert [d["key"] for d in result.dead_letters] == [1]
    assert result.dead_letters[0]["error_type"] == f"{StageTimeout.__module__}.StageTimeout"
    assert result.report.items.ok == 2
    assert spy.limiter is not None
    assert spy.limiter.borrowed == 0


async def test_slot_released_on_graceful_stop_cancellation() -> None:
    """Items still running when the grace period ends are cancelled, reported unfinished, slots freed."""
    never = asyncio.Event()
    entered = asyncio.Queue[int]()

    async def hang(item: dict[str, Any]) -> dict[str, Any]:
        entered.put_nowait(item["id"])
        await never.wait()
        return item

    spy = LimiterSpy(hang)
    p = Pipeline(
        memory_source([{"id": k} for k in range(10)]),
        [Stage(spy.factory(), concurrency=2)],
        grace_period=0.05,
        report_dir=None,
    )
    runner = Run(p, progress=False)
    run = asyncio.create_task(runner.run())
    assert {await next_or_fail(entered, run), await next_or_fail(entered, run)} == {0, 1}
    runner.request_stop(signal.SIGTERM)
    report = await run
    assert report.status == "interrupted"
    assert report.exit_code == 143
    assert report.items.unfinished >= 2
    assert {0, 1} <= set(report.unfinished_keys)
    assert report.items.read == report.items.unfinished
    assert spy.limiter is not None
    assert spy.limiter.borrowed == 0


async def test_thread_timeout_keeps_slot_until_thread_returns() -> None:
    """A timed-out thread attempt holds its slot until its thread really returns, then frees it."""
    unblock = threading.Event()
    started: list[int] = []

    def stuck_on_one(item: dict[str, Any]) -> dict[str, Any]:
        started.append(item["id"])
        if item["id"] == 1:
            unblock.wait()
        return item

    spy = LimiterSpy(stuck_on_one)
    run = asyncio.create_task(
        run_stages_async(
            [{"id": 1}, {"id": 2}],
            # Long enough for the thread to have started under load: a call timed out while still
            # queued in the executor is cancelled and never runs, which is a different case.
            Stage(spy.factory(), concurrency=1, timeout=0.5, retry=Retry(attempts=1)),
        )
    )
    try:
        # Item 1 times out and the worker moves on to item 2: it queues for the slot,
        # which the abandoned thread still holds.
        await wait_until(
            lambda: run.done() or (spy.limiter is not None and spy.limiter.statistics().waiting == 1)
        )
        assert not run.done(), run.result()
        assert spy.limiter is not None
        assert spy.limiter.borrowed == 1
        assert started == [1]
    finally:
        unblock.set()
    result = await run
    assert started == [1, 2]
    assert [d["key"] for d in result.dead_letters] == [1]
    assert result.report.stages[0].max_in_flight == 1
    assert spy.limiter.borrowed == 0


def leftover_pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pipeline-")]


async def test_no_worker_threads_left_after_run() -> None:
    """After an in-process run with thread stages and a sync source, no pipeline- thread is alive."""

    def work(item: dict[str, Any]) -> dict[str, Any]:
        assert threading.current_thread().name.startswith("pipeline-")
        return item

    result = await run_stages_async([{"id": k} for k in range(50)], Stage(work, concurrency=4))
    assert result.report.items.ok == 50
    assert leftover_pipeline_threads() == []


@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_raised_cap_grows_the_pool(kind: str) -> None:
    """Raising a stage's limiter total mid-run grows its pool: that many items run at once."""
    flight = InFlight(asyncio.get_running_loop())
    agates = {k: asyncio.Event() for k in range(8)}
    tgates = {k: threading.Event() for k in range(8)}

    async def awork(item: dict[str, Any]) -> dict[str, Any]:
        flight.enter(item["id"])
        await agates[item["id"]].wait()
        flight.leave()
        return item

    def twork(item: dict[str, Any]) -> dict[str, Any]:
        flight.enter(item["id"])
        tgates[item["id"]].wait()
        flight.leave()
        return item

    def release(k: int) -> None:
        agates[k].set()
        tgates[k].set()

    spy = LimiterSpy(awork if kind == "async" else twork)
    run = asyncio.create_task(run_stages_async([{"id": k} for k in range(8)], Stage(spy.factory())))
    try:
        assert await next_or_fail(flight.started, run) == (0, 1)
        assert spy.limiter is not None
        spy.limiter.total = 3
        release(0)
        started = [await next_or_fail(flight.started, run) for _ in range(3)]
        assert sorted(k for k, _ in started) == [1, 2, 3]
        assert flight.now == 3
    finally:
        for k in range(8):
            release(k)
    result = await run
    assert result.report.items.ok == 8
    assert flight.peak == 3
