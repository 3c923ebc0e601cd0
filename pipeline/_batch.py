"""A batched stage at run time: items gathered into calls of up to ``size``, each ended on its own.

The workers of a batched stage take turns gathering (one gathers at a time, so a trickle fills
one batch rather than one per worker): up to ``size`` items from the stage's queue, fewer once
``max_wait`` seconds have passed since the first of them was taken, or at once when the queue
ends (a stop included: the partial batch is flushed, never dropped). The call takes one slot of
the stage's cap, so the cap counts batches in flight, and it is one attempt for the stage's
figures (latency, busy time, the adaptive controller's sample). Then every item ends on its own,
through the same paths as an item of an unbatched stage (:class:`~pipeline._stage.StageRun`):

* an item dict in its place goes on to the next stage;
* an exception instance in its place goes through the item's own recovery: ``Skip`` skips it, a
  retryable error retries it alone under the stage's retry policy, anything else fails it;
* when the call raises (or times out), every item of the batch runs again alone, as a list of
  one, concurrently under the cap: that isolates the item at fault and is not a retry (each
  item's attempts count from its run alone);
* a call that breaks the contract (not a list, or not one result per item) is a
  ``StageMisuse`` that fails every item of the batch: running them again could repeat side
  effects the call already had.

An unbatched stage never comes here: its hot path is :mod:`._stage`'s, unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ._budget import weigh
from ._exceptions import ConfigError, StageMisuse
from ._report import StageReport
from ._stage import _ENDED, END, StageRun
from ._tickets import Ticket

__all__ = ["BatchStageRun"]

log = logging.getLogger("pipeline")

Env = tuple[dict[str, Any], Ticket]


class BatchStageRun(StageRun):
    """A :class:`StageRun` whose callable takes lists of items (``Stage.batch``).

    Takes the same arguments as :class:`StageRun`; ``spec.batching`` must be set.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        batch = self.spec.batching
        assert batch is not None
        if self._fanout:
            raise ConfigError(
                f"stage {self.name!r}: its factory yielded a generator, which cannot be batched "
                "(a batched stage returns one result per item); yield a callable returning a list",
                location="batch",
            )
        self.size = batch.size
        self.max_wait = batch.max_wait
        # One call with a list: the async or the thread path (their parameter is passed on as is).
        self._call: Callable[[list[dict[str, Any]]], Awaitable[Any]] = self._attempt  # type: ignore[assignment]
        self._attempt = self._attempt_alone  # an item alone: retries and _holding come here
        self._gathering = asyncio.Lock()
        self._ended = False
        self.calls = 0
        """Calls with a gathered batch (not the runs of an item alone)."""
        self.gathered = 0
        """Items in those calls."""
        self.isolated = 0
        """Items run again alone because their batch raised."""

    # -- gathering -----------------------------------------------------------------------

    async def _worker(self) -> None:
        limiter = self.limiter
        try:
            while True:
                batch = await self._gather()
                if batch is None:
                    break
                if self.workers < limiter.total:
                    self._spawn()  # the cap was raised while running: grow the pool
                if self._gate is not None:
                    await self._wait_gate()
                await self._run_batch(batch)
        finally:
            self.alive -= 1
        await self._worker_ended()

    async def _gather(self) -> list[Env] | None:
        """The next batch, or ``None`` once the queue has ended."""
        inq, loop = self.inq, self._loop
        async with self._gathering:
            if self._ended:
                return None
            try:
                env = inq.get_nowait()
            except asyncio.QueueEmpty:
                env = await inq.get()
            if env is END:
                self._ended = True
                return None
            batch: list[Env] = [env]
            size = self.size
            deadline = loop.time() + self.max_wait
            while len(batch) < size:
                try:
                    env = inq.get_nowait()
                except asyncio.QueueEmpty:
                    if loop.time() >= deadline:
                        break
                    try:
                        async with asyncio.timeout_at(deadline):
                            env = await inq.get()
                    except TimeoutError:
                        break
                if env is END:
                    self._ended = True  # the siblings see it under the lock
                    break
                batch.append(env)
            return batch

    # -- one call, then each item ------------------------------------------------------------

    async def _run_batch(self, batch: list[Env]) -> None:
        items = [item for item, _ in batch]
        self.calls += 1
        self.gathered += len(batch)
        try:
            results = await (self._call(items) if self._estimate is None else self._holding_batch(batch))
            if type(results) is dict:  # the one type the attempt paths let through unchecked
                self._check(results)
        except StageMisuse as misuse:
            await self._fail_all(batch, misuse)
            return
        except Exception as exc:
            if len(batch) == 1:  # the call was the item alone: that was its first attempt
                await self._end_alone(*batch[0], exc)
            else:
                await self._isolate(batch, exc)
            return
        if len(results) != len(batch):
            await self._fail_all(
                batch,
                StageMisuse(
                    f"stage {self.name!r} returned {len(results)} results for a batch of {len(batch)} "
                    "items; return one result per item, in order (an exception instance in the place "
                    "of an item that fails or is skipped)",
                    stage=self.name,
                ),
            )
            return
        rest: list[tuple[dict[str, Any], Ticket, Any]] = []
        for (item, ticket), result in zip(batch, results, strict=True):
            if type(result) is dict:
                await self._deliver(result, ticket)
            else:
                rest.append((item, ticket, result))
        if not rest:
            return
        # After the good ones went on: a retry's backoff must not hold up the rest of the batch.
        ends = [(item, ticket, self._as_error(result)) for item, ticket, result in rest]
        if len(ends) == 1:
            await self._end_alone(*ends[0])
        else:
            async with asyncio.TaskGroup() as tg:
                for end in ends:
                    tg.create_task(self._end_alone(*end))

    def _as_error(self, result: Any) -> Exception:
        if isinstance(result, Exception):
            return result
        return StageMisuse(
            f"stage {self.name!r} returned {type(result).__name__} for an item of its batch, expected "
            "the item dict or an exception instance; return the item, or pipeline.Skip(reason) in "
            "its place to skip it",
            stage=self.name,
        )

    async def _end_alone(self, item: dict[str, Any], ticket: Ticket, error: Exception) -> None:
        """``error`` was the item's own outcome (its first attempt): recover it as any item's."""
        result = await self._recover(item, ticket, error)
        if result is not _ENDED:
            await self._deliver(result, ticket)

    async def _isolate(self, batch: list[Env], error: Exception) -> None:
        """The call raised for the batch: run each item alone, concurrently under the cap."""
        self.isolated += len(batch)
        log.info(
            "stage %r: a batch of %d raised %s: %s; running its items one by one",
            self.name,
            len(batch),
            type(error).__name__,
            error,
        )
        async with asyncio.TaskGroup() as tg:
            for item, ticket in batch:
                tg.create_task(self._alone(item, ticket))

    async def _alone(self, item: dict[str, Any], ticket: Ticket) -> None:
        if self._gate is not None:
            await self._wait_gate()
        try:
            result = await (self._attempt(item) if self._estimate is None else self._holding(item, ticket))
        except Exception as exc:
            result = await self._recover(item, ticket, exc)
            if result is _ENDED:
                return
        await self._deliver(result, ticket)

    async def _attempt_alone(self, item: dict[str, Any]) -> Any:
        """One attempt of one item: the callable with a list of one, unwrapped."""
        results = await self._call([item])
        if type(results) is dict:
            self._check(results)
        if len(results) != 1:
            raise StageMisuse(
                f"stage {self.name!r} returned {len(results)} results for a batch of 1 item; return "
                "one result per item, in order",
                stage=self.name,
            )
        result = results[0]
        if type(result) is dict:
            return result
        raise self._as_error(result)

    async def _holding_batch(self, batch: list[Env]) -> Any:
        """One call, counting what the stage declared it allocates for each item."""
        assert self._estimate is not None
        tally, estimate = self._tally, self._estimate
        for item, ticket in batch:
            try:
                held = max(0, int(estimate(item)))
            except Exception:  # an estimate is advice: a broken one must not fail the batch
                held = 0
            tally.reweigh(ticket, ticket.weight, held)
        try:
            return await self._call([item for item, _ in batch])
        finally:
            for _, ticket in batch:
                tally.reweigh(ticket, ticket.weight, 0)

    async def _deliver(self, result: dict[str, Any], ticket: Ticket) -> None:
        """The item succeeded here: count it and hand it on."""
        self.stats.ok += 1
        self._streak = 0
        if self._weighed:
            self._tally.reweigh(ticket, weigh(result))
        await self._emit(result, ticket)

    async def _fail_all(self, batch: list[Env], error: StageMisuse) -> None:
        for item, ticket in batch:
            await self._fail(item, ticket, error, 1)

    def _check(self, result: Any) -> None:
        if type(result) is not list and type(result) is not tuple:
            raise StageMisuse(
                f"stage {self.name!r} is batched but returned {type(result).__name__}; return a list "
                "with one result per item of the batch, in order",
                stage=self.name,
            )

    # -- reporting -----------------------------------------------------------------------

    def report(self, wall_s: float) -> StageReport:
        """The stage's figures, with its batching: calls, mean batch size, items isolated."""
        report = super().report(wall_s)
        return dataclasses.replace(
            report,
            batch={
                "size": self.size,
                "max_wait": self.max_wait,
                "calls": self.calls,
                "mean_size": round(self.gathered / self.calls, 2) if self.calls else 0.0,
                "isolated": self.isolated,
            },
        )
