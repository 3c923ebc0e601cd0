"""Waiting on what a running pipeline does, never on time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class Notes:
    """Something a stage tells the test about, call after call: a test waits with :meth:`until`
    for the call after which its predicate holds."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """One more call; called on the loop."""
        self.count += 1
        self._changed.set()

    async def until(
        self, predicate: Callable[[], bool], run: asyncio.Task[Any], *, give_up_after: int | None = None
    ) -> None:
        """Wait for a call after which ``predicate()`` holds. Fail if ``run`` ends first, or when
        ``give_up_after`` more calls go by (a clear failure rather than a pytest timeout, when
        what the test waits for never comes)."""
        last = None if give_up_after is None else self.count + give_up_after
        while not predicate():
            assert last is None or self.count < last, f"gave up after {give_up_after} calls: {self!r}"
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait({waiter, run}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():
                waiter.cancel()
                raise AssertionError(f"the run ended while the test waited: {run.result()!r}")
