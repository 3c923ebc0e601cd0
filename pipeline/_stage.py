"""One stage at run time: a pool of workers under the stage's cap, and the one path of an attempt.

A worker takes an item from the stage's queue and runs one attempt: a rate token (if the stage
has a ``rate``), a slot of the stage's :class:`CapacityLimiter`, the call, its accounting, the
slot back. Then it hands the result on, or, if the attempt failed, asks :meth:`StageRun._recover`
whether to retry (tenacity), skip, fail or divert the item. A retried attempt is the same
attempt, so the first and the later ones cannot drift apart.

Exactly N items are in flight while work remains (a pool, not batches of N): there are as many
workers as the cap allows, and the pool grows when the cap is raised while running.

A pause (``RetryAfter``, :meth:`~pipeline.Context.pause`) closes a gate in front of the
attempts; a timer opens it again when the pause ends, so an unpaused stage pays one attribute
test per item.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final

from ._adaptive import Auto, Controller, make_controller
from ._budget import weigh
from ._contract import Kind, describe, estimate_of
from ._definition import Stage, parse_rate
from ._exceptions import RetryAfter, Skip, StageMisuse, StageTimeout
from ._limiter import CapacityLimiter
from ._progress import StageSnapshot
from ._report import LatencyHistogram, StageReport
from ._tickets import Tally, Ticket

__all__ = ["END", "StageRun"]

log = logging.getLogger("pipeline")

END: Final = object()
"""Sentinel closing a queue: every worker that sees it puts it back for its siblings."""

_ENDED: Final = object()
"""What :meth:`StageRun._recover` returns once it has ended the item (failed, skipped, diverted)."""


class _Failed(Exception):
    def __init__(self, error: Exception, attempts: int):
        self.error = error
        self.attempts = attempts


class _StageStats:
    __slots__ = ("blocked_s", "busy_s", "failed", "latency", "ok", "retries", "skipped")

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.skipped = 0
        self.retries = 0
        self.busy_s = 0.0
        self.blocked_s = 0.0
        self.latency = LatencyHistogram()


class StageRun:
    """A stage at run time: its callable, its queues, its workers and its statistics.

    Args:
        spec: The stage's definition.
        fn: The per-item callable (a factory's value, or ``spec.fn`` with its options bound).
        kind: How ``fn`` runs.
        limiter: The stage's cap.
        inq: The queue in front of the stage.
        outq: The queue of the next stage; ``None`` for the last stage.
        tally: Where items end.
        executor: The run's thread pool (thread stages run there).
        circuit_breaker: Failures in a row with the same error that trip the breaker; 0 for off.
        on_trip: Called with ``(stage, error, streak)`` when the breaker trips.
        on_stuck: Called with a message when every slot is held by abandoned calls.
        started: ``time.perf_counter()`` at the start of the run, for the limit trace.
        estimate: What an attempt allocates per item, as the stage's factory declared it
            (``ctx.weighs``); else what ``@pipeline.weighs`` on ``spec.fn`` says.
    """

    def __init__(
        self,
        spec: Stage,
        fn: Callable[..., Any],
        kind: Kind,
        limiter: CapacityLimiter,
        inq: asyncio.Queue[Any],
        outq: asyncio.Queue[Any] | None,
        *,
        tally: Tally,
        executor: concurrent.futures.Executor,
        circuit_breaker: int,
        on_trip: Callable[[str, BaseException, int], None],
        on_stuck: Callable[[str], None],
        started: float,
        estimate: Callable[[dict[str, Any]], int] | None = None,
    ):
        self.spec = spec
        self.name = spec.name
        self.fn = fn
        self.kind = kind
        self.limiter = limiter
        self.inq = inq
        self.outq = outq
        self.stats = _StageStats()
        self.workers = 0
        self.alive = 0
        self.auto: Auto | None = spec.auto
        self.always_target: StageRun | None = None
        """The next stage with ``always=True``: items that fail or are skipped here go on to it."""
        self.observe: Callable[[float, BaseException | None, int], None] | None = None
        """Set for adaptive stages: called after every attempt with (seconds, error, in_flight)."""
        self.limit_trace: list[tuple[float, int]] = []
        self._tally = tally
        self._executor = executor
        self._circuit_breaker = circuit_breaker
        self._on_trip = on_trip
        self._on_stuck = on_stuck
        self._stuck = False
        self.abandoned = 0
        """Thread calls that outlived their attempt and still hold their slot."""
        self.max_abandoned = 0
        self._started = started
        self._tg: asyncio.TaskGroup | None = None
        self._loop = asyncio.get_running_loop()
        self._timeout = spec.timeout
        self._max_attempts = spec.retry.attempts
        self._retryable = spec.retry.retryable
        self._fanout = kind in ("async-gen", "thread-gen")
        self._attempt = self._attempt_async if kind in ("async", "async-gen") else self._attempt_thread
        # With a memory budget: items are weighed when handed on, and a stage that declared
        # what its attempts allocate (@pipeline.weighs) holds that for the attempt's duration.
        self._weighed = tally.budget is not None
        self._estimate = (estimate or estimate_of(spec.fn)) if self._weighed else None
        self._capacity_s = 0.0
        self._capacity_mark = time.perf_counter()
        self._capacity_total = limiter.total
        self._rate: Any = None
        if spec.rate is not None:
            from aiolimiter import AsyncLimiter

            count, period = parse_rate(spec.rate)
            # aiolimiter's bucket holds a whole period: "300/s" would let 300 go at once. Keep
            # the rate but cap the burst at 0.1 s worth of attempts (at least one).
            burst = max(1.0, count * min(period, 0.1) / period)
            self._rate = AsyncLimiter(burst, burst * period / count)
        self._adapter: asyncio.Task[None] | None = None
        self._streak = 0
        self._streak_signature: tuple[Any, ...] | None = None
        self._gate: asyncio.Event | None = None  # set while paused; None when open
        self._paused_until = 0.0
        self._gate_timer: asyncio.TimerHandle | None = None
        self._gate_until = 0.0

    # -- workers -------------------------------------------------------------------------

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Start the stage's workers (and its controller, for ``concurrency = "auto"``) in ``tg``."""
        self._tg = tg
        for _ in range(self.limiter.total):
            self._spawn()
        if self.auto is not None:
            controller = make_controller(self.auto, self.limiter.total)
            self.observe = controller.observe
            self.limit_trace.append((0.0, self.limiter.total))
            self._adapter = tg.create_task(self._adapt(controller), name=f"pipeline-adapt-{self.name}")

    async def _adapt(self, controller: Controller) -> None:
        """Every ``controller.interval`` seconds, let the controller set the cap."""
        while True:
            await asyncio.sleep(controller.interval)
            new = controller.update(self._loop.time(), self.limiter.borrowed, self.limiter.total)
            if new != self.limiter.total:
                self.set_limit(new)

    def set_limit(self, total: int) -> None:
        """Resize the stage's cap, keeping busy_ratio and the limit trace right."""
        self.note_capacity()
        self.limiter.total = total
        self._capacity_total = total
        if self.auto is not None:
            self.limit_trace.append((round(time.perf_counter() - self._started, 3), total))

    def note_capacity(self) -> None:
        """Integrate cap x time, so busy_ratio stays right when the cap is resized."""
        now = time.perf_counter()
        self._capacity_s += self._capacity_total * (now - self._capacity_mark)
        self._capacity_mark = now
        self._capacity_total = self.limiter.total

    def _spawn(self) -> None:
        assert self._tg is not None
        self.workers += 1
        self.alive += 1
        self._tg.create_task(self._worker(), name=f"pipeline-stage-{self.name}-{self.workers}")

    async def _worker(self) -> None:
        inq, limiter, outq, stats = self.inq, self.limiter, self.outq, self.stats
        get, get_nowait = inq.get, inq.get_nowait
        attempt, settle, fanout = self._attempt, self._tally.settle, self._fanout
        # The common case (an async stage returning one item, no timeout, rate or budget) runs
        # its attempt inline: one coroutine frame fewer per item, ~0.5 us. It is the same attempt
        # as _attempt_async (the same slot, _record and _check), and a failure goes to the same
        # _recover as every other attempt's.
        inline = self.kind == "async" and self._timeout is None and self._rate is None
        inline = inline and self._estimate is None
        fn, record, perf = self.fn, self._record, time.perf_counter
        try:
            while True:
                try:
                    env = get_nowait()
                except asyncio.QueueEmpty:
                    env = await get()
                if env is END:
                    inq.put_nowait(END)
                    break
                # The cap was raised while running: grow the pool. (The limiter's slot, not its
                # property: this runs for every item, and the property call costs as much as the
                # rest of the check.)
                if self.workers < limiter._total:
                    self._spawn()
                item, ticket = env
                if self._gate is not None:
                    await self._wait_gate()
                try:
                    if inline:
                        if not limiter.acquire_nowait():
                            await limiter.acquire()
                        start = perf()
                        try:
                            result = await fn(item)
                        except BaseException as exc:
                            record(perf() - start, exc)
                            limiter.release()
                            raise
                        record(perf() - start, None)
                        limiter.release()
                        if type(result) is not dict:
                            self._check(result)
                    elif self._estimate is None:
                        result = await attempt(item)
                    else:
                        result = await self._holding(item, ticket)
                except Exception as exc:
                    result = await self._recover(item, ticket, exc)
                    if result is _ENDED:
                        continue
                # The item succeeded here, at the first attempt or a later one.
                stats.ok += 1
                self._streak = 0
                if self._weighed:
                    self._tally.reweigh(ticket, sum(map(weigh, result)) if fanout else weigh(result))
                if fanout:
                    await self._emit_children(result, ticket)
                elif outq is None:
                    settle(ticket, True)
                else:
                    try:
                        outq.put_nowait((result, ticket))
                    except asyncio.QueueFull:
                        await self._emit(result, ticket)
        finally:
            self.alive -= 1
        await self._worker_ended()

    async def _worker_ended(self) -> None:
        """A worker saw the end of its queue. Only reached on a normal end (not cancellation):
        the last worker closes the stage and the next queue."""
        if self.alive == 0:
            self.close()
            if self.outq is not None:
                await self.outq.put(END)

    def close(self) -> None:
        """Stop the stage's controller and pause timer (its workers end with their queue)."""
        if self._adapter is not None:
            self._adapter.cancel()
        if self._gate_timer is not None:
            self._gate_timer.cancel()
            self._gate_timer = None
        if self._gate is not None:
            gate, self._gate = self._gate, None
            gate.set()

    # -- one attempt ---------------------------------------------------------------------

    async def _attempt_async(self, item: dict[str, Any]) -> Any:
        """One attempt of an async stage, on the event loop."""
        limiter = self.limiter
        if self._rate is not None or not limiter.acquire_nowait():
            await self._take_slot()
        start = time.perf_counter()
        try:
            if self._timeout is None:
                result = await (self._collect(item) if self._fanout else self.fn(item))
            else:
                result = await self._within_timeout(self._collect(item) if self._fanout else self.fn(item))
        except BaseException as exc:
            self._record(time.perf_counter() - start, exc)
            limiter.release()
            raise
        self._record(time.perf_counter() - start, None)
        limiter.release()
        if self._fanout or type(result) is not dict:
            self._check(result)
        return result

    async def _holding(self, item: dict[str, Any], ticket: Ticket) -> Any:
        """One attempt, counting what the stage declared it allocates for ``item``."""
        assert self._estimate is not None
        try:
            held = max(0, int(self._estimate(item)))
        except Exception:  # an estimate is advice: a broken one must not fail the item
            held = 0
        self._tally.reweigh(ticket, ticket.weight, held)
        try:
            return await self._attempt(item)
        finally:
            self._tally.reweigh(ticket, ticket.weight, 0)

    async def _take_slot(self) -> None:
        """A rate token (if the stage has a ``rate``), then a slot of the stage's cap."""
        if self._rate is not None:
            await self._rate.acquire()
        if not self.limiter.acquire_nowait():
            await self.limiter.acquire()

    async def _collect(self, item: dict[str, Any]) -> list[Any]:
        return [child async for child in self.fn(item)]

    async def _attempt_thread(self, item: dict[str, Any]) -> Any:
        """One attempt of a thread stage, in the run's thread pool.

        asyncio.to_thread would do, but once the awaiting side is cancelled (timeout, stop) it
        cannot tell us when the thread really finishes. Submitting to the same executor (the
        loop's default, which to_thread uses) keeps the concurrent future, so the slot is
        released when the thread is done, never earlier: the cap holds even for abandoned calls.
        """
        limiter = self.limiter
        if self._rate is not None or not limiter.acquire_nowait():
            await self._take_slot()
        start = time.perf_counter()
        cfut = self._executor.submit(contextvars.copy_context().run, self._invoke_thread, item)
        released_later = False
        error: BaseException | None = None
        try:
            result = await self._within_timeout(
                asyncio.wrap_future(cfut), " (its thread runs on until the call returns, holding its slot)"
            )
        except BaseException as exc:
            error = exc
            if not cfut.done():
                released_later = True
                self._abandon(cfut)
            raise
        finally:
            self._record(time.perf_counter() - start, error)
            if not released_later:
                limiter.release()
        if self._fanout or type(result) is not dict:
            self._check(result)
        return result

    def _abandon(self, cfut: concurrent.futures.Future[Any]) -> None:
        """A thread call outlived its attempt (a timeout, a stop): it keeps its slot until its
        thread returns. If every slot of the stage is held that way for another full timeout,
        the stage cannot move again: say so, and stop the run, rather than wait for ever."""
        self.abandoned += 1
        self.max_abandoned = max(self.max_abandoned, self.abandoned)
        cfut.add_done_callback(functools.partial(_when_done, self._loop, self._returned))
        if self.abandoned >= self.limiter.total and self._timeout is not None:
            self._loop.call_later(self._timeout, self._check_stuck)

    def _returned(self) -> None:
        self.abandoned -= 1
        self.limiter.release()

    def _check_stuck(self) -> None:
        if self.abandoned >= self.limiter.total and not self._stuck:
            self._stuck = True
            self._on_stuck(
                f"stage {self.name!r}: all {self.limiter.total} slots are held by calls that timed out "
                f"and have not returned after another {self._timeout:g}s (a thread cannot be cancelled). "
                "The stage cannot take another item, so the run stopped: make the callable honour a "
                "deadline of its own (a socket timeout, a watchdog), or raise its timeout",
            )

    def _invoke_thread(self, item: dict[str, Any]) -> Any:
        if self._fanout:
            return list(self.fn(item))
        result = self.fn(item)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never leave a "coroutine was never awaited" behind
            raise StageMisuse(
                f"stage {self.name!r}: {describe(self.fn)} is a plain function but returned "
                f"{type(result).__name__}; make it `async def` so it runs on the event loop, "
                "or return the item",
                stage=self.name,
            )
        return result

    async def _within_timeout(self, awaitable: Any, note: str = "") -> Any:
        """Await one attempt under the stage's timeout, if it has one."""
        if self._timeout is None:
            return await awaitable
        try:
            async with asyncio.timeout(self._timeout):
                return await awaitable
        except TimeoutError as exc:
            raise StageTimeout(
                f"stage {self.name!r} timed out after {self._timeout:g}s{note}", stage=self.name
            ) from exc

    def _record(self, elapsed: float, error: BaseException | None) -> None:
        """Account one attempt; called while its slot is still held."""
        stats = self.stats
        stats.busy_s += elapsed
        stats.latency.add(elapsed)
        if self.observe is not None:
            self.observe(elapsed, error, self.limiter.borrowed)

    def _check(self, result: Any) -> None:
        if self._fanout:
            for child in result:
                if type(child) is not dict:
                    raise StageMisuse(
                        f"stage {self.name!r} yielded {type(child).__name__}, expected an item dict",
                        stage=self.name,
                    )
        elif type(result) is not dict:
            raise StageMisuse(
                f"stage {self.name!r} returned {type(result).__name__}, expected the item dict; "
                "return the item, or raise pipeline.Skip to skip it",
                stage=self.name,
            )

    # -- after a failed attempt ----------------------------------------------------------

    async def _recover(self, item: dict[str, Any], ticket: Ticket, error: Exception) -> Any:
        """An attempt failed with ``error``: retry the item, or end it here.

        Returns the result of a retry that succeeded, or ``_ENDED`` once the item was skipped,
        failed or diverted to an ``always`` stage.
        """
        attempts = 1
        if not isinstance(error, Skip) and isinstance(error, self._retryable):
            if isinstance(error, RetryAfter):
                self.pause(error.delay)
            if self._max_attempts > 1:
                try:
                    return await self._retry(item, error, ticket)
                except Skip as skip:
                    error = skip
                except _Failed as failed:
                    error, attempts = failed.error, failed.attempts
        if isinstance(error, Skip):
            await self._skip(item, ticket, error)
        else:
            await self._fail(item, ticket, error, attempts)
        return _ENDED

    async def _retry(self, item: dict[str, Any], first: BaseException, ticket: Ticket) -> Any:
        """Attempts 2.. under the retry policy. The first ran without tenacity: most items
        succeed first time, and a retry controller per item would dominate the per-item cost."""
        import tenacity  # deferred: only items that failed once pay for it

        retry = self.spec.retry
        attempts = 1
        self.stats.retries += 1
        await asyncio.sleep(min(retry.backoff, retry.max_backoff) + random.uniform(0, retry.jitter))
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self._max_attempts - 1),
            # Attempt k of this loop is attempt k+1 overall, so its wait starts one doubling on.
            wait=tenacity.wait_exponential(multiplier=retry.backoff * 2, max=retry.max_backoff)
            + tenacity.wait_random(0, retry.jitter),
            retry=tenacity.retry_if_exception_type(self._retryable)
            & tenacity.retry_if_not_exception_type(Skip),
            before_sleep=lambda state: self._note_retry(state.outcome.exception() if state.outcome else None),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if self._gate is not None:
                        await self._wait_gate()
                    if self._estimate is None:
                        result = await self._attempt(item)
                    else:
                        result = await self._holding(item, ticket)
                    ticket.attempts = max(ticket.attempts, attempts)
                    return result
        except Skip:
            raise
        except Exception as exc:
            raise _Failed(exc, attempts) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _note_retry(self, exc: BaseException | None) -> None:
        self.stats.retries += 1
        if isinstance(exc, RetryAfter):
            self.pause(exc.delay)

    async def _skip(self, item: dict[str, Any], ticket: Ticket, skip: Skip) -> None:
        self.stats.skipped += 1
        self._streak = 0
        if self.always_target is None:
            self._tally.settle(ticket, None)
        else:
            ticket.skip = True
            await self._divert(item, ticket, "skipped", str(skip) or None)

    async def _fail(self, item: dict[str, Any], ticket: Ticket, error: BaseException, attempts: int) -> None:
        self.stats.failed += 1
        target = self.always_target
        self._tally.fail(ticket, self.name, error, attempts, ends=target is None)
        self._note_failure(error)
        if target is not None:
            await self._divert(item, ticket, "failed", ticket.error)

    def _note_failure(self, error: BaseException) -> None:
        """Count failures in a row with the same error, for the circuit breaker."""
        limit = self._circuit_breaker
        if not limit:
            return
        cause = error.__cause__
        signature = (type(error), type(cause), getattr(error, "errno", None) or getattr(cause, "errno", None))
        if signature == self._streak_signature:
            self._streak += 1
        else:
            self._streak_signature, self._streak = signature, 1
        if self._streak >= limit:
            self._on_trip(self.name, error, self._streak)

    # -- handing items on ----------------------------------------------------------------

    async def _emit(self, item: dict[str, Any], ticket: Ticket) -> None:
        q = self.outq
        if q is None:
            self._tally.settle(ticket, True)
            return
        try:
            q.put_nowait((item, ticket))
        except asyncio.QueueFull:
            start = time.perf_counter()
            await q.put((item, ticket))
            self.stats.blocked_s += time.perf_counter() - start

    async def _emit_children(self, children: list[dict[str, Any]], ticket: Ticket) -> None:
        if not children:
            self._tally.settle(ticket, None)  # fanned out to nothing: skipped
            return
        ticket.pending += len(children) - 1
        for child in children:
            await self._emit(child, ticket)

    async def _divert(self, item: dict[str, Any], ticket: Ticket, status: str, error: str | None) -> None:
        """Send an item that failed or was skipped here on to the next ``always`` stage."""
        assert self.always_target is not None
        item = {**item, "status": status, "error": error, "failed_stage": self.name}
        await self.always_target.inq.put((item, ticket))

    # -- the pause gate ------------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """Whether the stage's gate is closed (a pause is in force)."""
        return self._gate is not None

    def pause(self, seconds: float) -> None:
        """Close the stage's gate: no worker starts an attempt for ``seconds``."""
        until = self._loop.time() + seconds
        if until <= self._paused_until:
            return
        self._paused_until = until
        log.info("stage %r paused for %.1fs", self.name, seconds)
        if self._gate is None:
            self._gate = asyncio.Event()
            self._gate_until = until
            self._gate_timer = self._loop.call_at(until, self._reopen)

    def _reopen(self) -> None:
        """The timer fired: open the gate, unless the pause was extended meanwhile."""
        if self._paused_until > self._gate_until:
            self._gate_until = self._paused_until
            self._gate_timer = self._loop.call_at(self._gate_until, self._reopen)
            return
        gate, self._gate, self._gate_timer = self._gate, None, None
        if gate is not None:
            gate.set()

    async def _wait_gate(self) -> None:
        while (gate := self._gate) is not None:
            await gate.wait()

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self) -> StageSnapshot:
        """The stage's figures right now, for progress."""
        stats = self.stats
        return StageSnapshot(
            name=self.name,
            kind=self.kind,
            in_flight=self.limiter.borrowed,
            cap=self.limiter.total,
            queued=self.inq.qsize(),
            ok=stats.ok,
            failed=stats.failed,
            retries=stats.retries,
            skipped=stats.skipped,
        )

    def report(self, wall_s: float) -> StageReport:
        """The stage's figures for the run report."""
        self.note_capacity()
        stats = self.stats
        hist = stats.latency
        capacity = self._capacity_s or (self.limiter.total * wall_s)
        return StageReport(
            name=self.name,
            kind=self.kind,
            concurrency=self.limiter.total,
            ok=stats.ok,
            failed=stats.failed,
            skipped=stats.skipped,
            retries=stats.retries,
            max_in_flight=self.limiter.statistics().max_borrowed,
            latency_s={f"p{q}": hist.percentile(q / 100) for q in (50, 95, 99)},
            busy_ratio=round(min(1.0, stats.busy_s / capacity), 4) if capacity > 0 else 0.0,
            blocked_s=round(stats.blocked_s, 4),
            limit_trace=list(self.limit_trace),
            abandoned_calls=self.max_abandoned,
        )


def _when_done(loop: asyncio.AbstractEventLoop, callback: Callable[[], None], _: object) -> None:
    """Run ``callback`` on the loop when an abandoned thread call returns (from that thread)."""
    with contextlib.suppress(RuntimeError):  # the run, and its loop, may be over by then
        loop.call_soon_threadsafe(callback)
