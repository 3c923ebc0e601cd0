"""A capacity limiter whose size can change while the run goes on.

``asyncio.Semaphore`` cannot be resized without reaching into ``_value``, so the engine has its
own: a count of borrowed slots, a total, and a FIFO of waiters. Slots are handed directly to
the oldest waiter on release (no barging), which is what makes "a waiter cancelled just after
being granted a slot passes the slot on" possible to guarantee.

Why not ``anyio.CapacityLimiter``, which is resizable and fair too (``make bench --only limiter``
measures both):

* Its ``acquire()`` always yields to the event loop, even for a free slot: about 18 us per
  acquire/release pair here, against 0.5 us. Every attempt takes one or two slots, and the
  engine's whole per-item budget is a few microseconds.
* Its tokens belong to a borrower (the task, by default): one task cannot hold two, and only
  the borrower may release. The engine gives back an abandoned thread call's slot from a loop
  callback when that thread finally returns, long after the task that took it has moved on.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from types import TracebackType

__all__ = ["CapacityLimiter", "LimiterStatistics"]


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a limiter.

    Attributes:
        borrowed: Slots held right now.
        total: The current cap.
        waiting: Tasks queued for a slot.
        max_borrowed: The most slots ever held at once.
    """

    borrowed: int
    total: int
    waiting: int
    max_borrowed: int


class CapacityLimiter:
    """At most ``total`` holders at once; ``total`` can be changed at any time.

    Growing the limit wakes waiters at once. Shrinking never preempts: current holders keep
    their slots, and new holders are admitted only once ``borrowed`` is below the new total.

    Use it as ``async with limiter:``, or pair :meth:`acquire` with :meth:`release`.

    Args:
        total: The initial cap, at least 1.
        name: Shown in error messages and statistics.
    """

    __slots__ = ("_borrowed", "_max_borrowed", "_name", "_total", "_waiters")

    def __init__(self, total: int, *, name: str = "limiter"):
        self._name = name
        self._total = self._check(total)
        self._borrowed = 0
        self._max_borrowed = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def _check(self, total: int) -> int:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"{self._name}: total must be an integer >= 1, got {total!r}")
        return total

    @property
    def name(self) -> str:
        """The limiter's name."""
        return self._name

    @property
    def total(self) -> int:
        """The current cap. Setting it resizes the limiter."""
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._total = self._check(value)
        self._wake()

    @property
    def borrowed(self) -> int:
        """Slots held right now."""
        return self._borrowed

    def statistics(self) -> LimiterStatistics:
        """Return a snapshot of the limiter's state."""
        return LimiterStatistics(
            borrowed=self._borrowed,
            total=self._total,
            waiting=sum(1 for w in self._waiters if not w.done()),
            max_borrowed=self._max_borrowed,
        )

    def _take(self) -> None:
        self._borrowed += 1
        if self._borrowed > self._max_borrowed:
            self._max_borrowed = self._borrowed

    def _wake(self) -> None:
        # A granted future already counts as borrowed, so a grant is never handed out twice.
        while self._waiters and self._borrowed < self._total:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)

    async def acquire(self) -> None:
        """Wait for a slot and take it."""
        if not self._waiters and self._borrowed < self._total:
            self._take()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Granted, then cancelled before we could use it: pass the slot on.
                self.release()
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free right now, without waiting.

        Returns:
            Whether a slot was taken.
        """
        if not self._waiters and self._borrowed < self._total:
            self._borrowed += 1
            if self._borrowed > self._max_borrowed:
                self._max_borrowed = self._borrowed
            return True
        return False

    def release(self) -> None:
        """Give back one slot."""
        if self._borrowed <= 0:
            raise RuntimeError(f"{self._name}: release() called more times than acquire()")
        self._borrowed -= 1
        if self._waiters:
            self._wake()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<CapacityLimiter {self._name!r} {self._borrowed}/{self._total}>"
