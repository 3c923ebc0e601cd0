"""Tests for CapacityLimiter: the cap holds, resizing wakes or waits, cancellation passes slots on."""

from __future__ import annotations

import asyncio

import pytest

from pipeline import CapacityLimiter, LimiterStatistics


async def settle() -> None:
    """Let every ready task run until none is left ready (no timing involved)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def hold(limiter: CapacityLimiter, entered: list[int], gate: asyncio.Event) -> None:
    async with limiter:
        entered.append(limiter.borrowed)
        await gate.wait()


async def test_never_exceeds_total() -> None:
    """With more tasks than slots, at most ``total`` hold a slot at any moment."""
    limiter = CapacityLimiter(3)
    gate = asyncio.Event()
    entered: list[int] = []
    async with asyncio.TaskGroup() as tg:
        for _ in range(10):
            tg.create_task(hold(limiter, entered, gate))
        await settle()
        assert limiter.borrowed == 3
        assert limiter.statistics().waiting == 7
        gate.set()
    assert len(entered) == 10
    assert max(entered) <= 3
    assert limiter.statistics().max_borrowed == 3
    assert limiter.borrowed == 0


async def test_growing_wakes_waiters_at_once() -> None:
    """Raising ``total`` grants the new slots to waiters without any release."""
    limiter = CapacityLimiter(1)
    await limiter.acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    await settle()
    assert not any(w.done() for w in waiters)
    limiter.total = 3
    assert limiter.borrowed == 3  # granted synchronously by the setter
    await settle()
    assert [w.done() for w in waiters] == [True, True, False]
    limiter.total = 4
    await waiters[2]
    assert limiter.statistics() == LimiterStatistics(borrowed=4, total=4, waiting=0, max_borrowed=4)


async def test_shrinking_does_not_preempt_holders() -> None:
    """Lowering ``total`` keeps current holders; a new holder enters only below the new total."""
    limiter = CapacityLimiter(4)
    for _ in range(4):
        await limiter.acquire()
    limiter.total = 2
    assert limiter.borrowed == 4
    assert not limiter.acquire_nowait()
    waiter = asyncio.create_task(limiter.acquire())
    limiter.release()  # 3 held, still >= 2
    await settle()
    assert not waiter.done()
    limiter.release()  # 2 held, still >= 2
    await settle()
    assert not waiter.done()
    limiter.release()  # 1 held: the waiter gets the second slot
    await settle()
    assert waiter.done()
    assert limiter.borrowed == 2


async def test_waiter_cancelled_after_grant_passes_slot_on() -> None:
    """A waiter granted a slot by release() and cancelled before it runs hands the slot to the next."""
    limiter = CapacityLimiter(1)
    await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    second = asyncio.create_task(limiter.acquire())
    await settle()
    limiter.release()  # grants `first` (its future is resolved) but `first` has not run yet
    assert limiter.borrowed == 1
    first.cancel()
    await settle()
    assert first.cancelled()
    assert second.done()
    assert second.exception() is None
    assert limiter.borrowed == 1
    assert limiter.statistics().waiting == 0
    limiter.release()
    assert limiter.borrowed == 0


async def test_cancelled_queued_waiter_is_removed() -> None:
    """A waiter cancelled while still queued leaves the queue and never takes a slot."""
    limiter = CapacityLimiter(1)
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    assert limiter.statistics().waiting == 1
    waiter.cancel()
    await settle()
    assert waiter.cancelled()
    assert limiter.statistics().waiting == 0
    assert len(limiter._waiters) == 0
    limiter.release()
    assert limiter.borrowed == 0
    assert limiter.acquire_nowait()


async def test_statistics_snapshot() -> None:
    """statistics() reports borrowed, total, waiting and the high-water mark."""
    limiter = CapacityLimiter(2, name="db")
    assert limiter.statistics() == LimiterStatistics(borrowed=0, total=2, waiting=0, max_borrowed=0)
    await limiter.acquire()
    await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    assert limiter.statistics() == LimiterStatistics(borrowed=2, total=2, waiting=1, max_borrowed=2)
    limiter.release()
    await waiter
    limiter.release()
    limiter.release()
    assert limiter.statistics() == LimiterStatistics(borrowed=0, total=2, waiting=0, max_borrowed=2)
    assert "db" in repr(limiter)


async def test_fifo_no_barging() -> None:
    """A released slot goes to the oldest waiter, not to a newcomer calling acquire_nowait()."""
    limiter = CapacityLimiter(1)
    await limiter.acquire()
    order: list[int] = []

    async def take(n: int) -> None:
        await limiter.acquire()
        order.append(n)
        limiter.release()

    tasks = [asyncio.create_task(take(n)) for n in range(3)]
    await settle()
    limiter.release()
    assert not limiter.acquire_nowait()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]


def test_release_without_acquire_is_refused() -> None:
    """release() more times than acquire() raises rather than corrupting the count."""
    limiter = CapacityLimiter(1)
    with pytest.raises(RuntimeError, match="more times than acquire"):
        limiter.release()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_total_must_be_positive_integer(bad: object) -> None:
    """A total below 1 or not an int is refused, at creation and on resize."""
    with pytest.raises(ValueError, match="total must be an integer >= 1"):
        CapacityLimiter(bad)  # type: ignore[arg-type]
    limiter = CapacityLimiter(1)
    with pytest.raises(ValueError, match="total must be an integer >= 1"):
        limiter.total = bad  # type: ignore[assignment]
    assert limiter.total == 1
