"""The run: a source feeding bounded queues, each stage a pool of workers under its own cap.

Shape of a run::

    source --feed--> [queue 0] --stage 0 workers--> [queue 1] --stage 1 workers--> ... --> done

* Each queue is bounded, so the source is read no faster than the slowest stage drains.
* Each stage has as many workers as its cap allows; a worker takes one item, takes a slot of the
  stage's :class:`CapacityLimiter`, runs one attempt, gives the slot back, and so on: exactly N
  items stay in flight while work remains (a pool, not batches of N).
* Every item the source yields gets a ticket; the ticket ends exactly once as ok, failed or
  skipped (fan-out children share their parent's ticket), or is reported unfinished after a
  graceful stop.
* All tasks live in one TaskGroup, so nothing is left pending and no exception goes unretrieved.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import logging
import os
import random
import signal
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from ._contract import Context, DatabaseHandle, Kind, SharedResources, is_factory, stage_kind
from ._definition import Auto, LedgerStore, Pipeline, Stage, _describe, parse_rate, workload
from ._exceptions import (
    ConfigError,
    PipelineError,
    ResourceError,
    RetryAfter,
    Skip,
    SourceError,
    StageMisuse,
    StageTimeout,
)
from ._ledger import RunLedger, open_sqlite_ledger
from ._limiter import CapacityLimiter
from ._report import DeadLetterWriter, ItemCounts, LatencyHistogram, RunReport, StageReport, utc_now

__all__ = ["Runner"]

log = logging.getLogger("pipeline")

_END: Final = object()
"""Sentinel closing a queue: every worker that sees it puts it back for its siblings."""

_THREAD_HEADROOM: Final = 4
"""Extra threads beyond the thread stages' caps: the source, getaddrinfo and user to_thread calls."""

_SOURCE_BATCH: Final = 256
"""Items pulled per thread hop from a plain (sync) source iterator."""


class _Ticket:
    """One source item's fate; fan-out children share it."""

    __slots__ = ("attempts", "error", "failed", "key", "ok", "pending", "skip", "stage")

    def __init__(self, key: object):
        self.key = key
        self.pending = 1
        self.ok = False
        self.failed = False
        self.skip = False  # skipped upstream, then recorded by an ``always`` stage
        self.attempts = 1
        self.stage: str | None = None
        self.error: str | None = None


class _Failed(Exception):
    def __init__(self, error: BaseException, attempts: int):
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


class _StageRun:
    """A stage at run time: its callable, its queues, its workers and its statistics."""

    def __init__(
        self,
        runner: Runner,
        spec: Stage,
        fn: Callable[..., Any],
        kind: Kind,
        limiter: CapacityLimiter,
        inq: asyncio.Queue[Any],
        outq: asyncio.Queue[Any] | None,
    ):
        self.runner = runner
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
        self._tg: asyncio.TaskGroup | None = None
        self._paused_until = 0.0
        self._timeout = spec.timeout
        self._max_attempts = spec.retry.attempts
        self._retryable = spec.retry.retryable
        self._fanout = kind in ("async-gen", "thread-gen")
        self._is_async = kind in ("async", "async-gen")
        self._loop = asyncio.get_running_loop()
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
        # Set for adaptive stages: called after every attempt with (seconds, error, in_flight).
        self.observe: Callable[[float, BaseException | None, int], None] | None = None
        self.limit_trace: list[tuple[float, int]] = []
        self._adapter: asyncio.Task[None] | None = None
        self._streak = 0
        self._streak_signature: tuple[Any, ...] | None = None
        self.auto = spec.auto
        # The next stage with always=True: items that fail or are skipped here go on to it.
        self.always_target: _StageRun | None = None

    # -- workers -------------------------------------------------------------------------

    def start(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        for _ in range(self.limiter.total):
            self._spawn()
        auto = self.auto
        if auto is not None:
            from ._adaptive import make_controller

            controller = make_controller(auto, self.limiter.total)
            self.observe = controller.observe
            self.limit_trace.append((0.0, self.limiter.total))
            self._adapter = tg.create_task(self._adapt(controller), name=f"pipeline-adapt-{self.name}")

    async def _adapt(self, controller: Any) -> None:
        """Every ``controller.interval`` seconds, let the controller set the cap."""
        while True:
            await asyncio.sleep(controller.interval)
            now = self._loop.time()
            new = controller.update(now, self.limiter.borrowed, self.limiter.total)
            if new != self.limiter.total:
                self.set_limit(new)

    def set_limit(self, total: int) -> None:
        """Resize the stage's cap, keeping busy_ratio and the limit trace right."""
        self.note_capacity()
        self.limiter.total = total
        self._capacity_total = total
        if self.auto is not None:
            self.limit_trace.append((round(time.perf_counter() - self.runner.started, 3), total))

    def _spawn(self) -> None:
        assert self._tg is not None
        self.workers += 1
        self.alive += 1
        self._tg.create_task(self._worker(), name=f"pipeline-stage-{self.name}-{self.workers}")

    async def _worker(self) -> None:
        inq, limiter = self.inq, self.limiter
        get, get_nowait = inq.get, inq.get_nowait
        # The common case (an async stage returning one item, no timeout, no rate) runs its
        # first attempt inline: five coroutine frames fewer per item. Anything unusual (an
        # exception, a pause) goes through the general path, which does the rest identically.
        simple = self.kind == "async" and self._timeout is None and self._rate is None
        fn, stats, perf = self.fn, self.stats, time.perf_counter
        outq, settle = self.outq, self.runner.settle
        add_latency = stats.latency.add
        try:
            while True:
                try:
                    env = get_nowait()
                except asyncio.QueueEmpty:
                    env = await get()
                if env is _END:
                    inq.put_nowait(_END)
                    break
                if self.workers < limiter.total:
                    self._spawn()  # the cap was raised while running: grow the pool
                if not simple or self._paused_until:
                    await self._process(env)
                    continue
                item, ticket = env
                if not limiter.acquire_nowait():
                    await limiter.acquire()
                start = perf()
                try:
                    result = await fn(item)
                except Exception as exc:
                    self._record(perf() - start, exc)
                    limiter.release()
                    await self._process(env, first_error=exc)
                    continue
                except BaseException as exc:
                    self._record(perf() - start, exc)
                    limiter.release()
                    raise
                elapsed = perf() - start
                stats.busy_s += elapsed
                add_latency(elapsed)
                if self.observe is not None:
                    self.observe(elapsed, None, limiter.borrowed)
                limiter.release()
                if type(result) is not dict:
                    try:
                        self._check(result)
                    except StageMisuse as exc:
                        await self._process(env, first_error=exc)
                        continue
                stats.ok += 1
                self._streak = 0
                if outq is None:
                    settle(ticket, True)
                else:
                    try:
                        outq.put_nowait((result, ticket))
                    except asyncio.QueueFull:
                        await self._emit(result, ticket)
        finally:
            self.alive -= 1
        # Only reached on a normal end (not cancellation): the last worker closes the next queue.
        if self.alive == 0:
            if self._adapter is not None:
                self._adapter.cancel()
            if self.outq is not None:
                await self.outq.put(_END)

    def note_capacity(self) -> None:
        """Integrate cap x time, so busy_ratio stays right when the cap is resized."""
        now = time.perf_counter()
        self._capacity_s += self._capacity_total * (now - self._capacity_mark)
        self._capacity_mark = now
        self._capacity_total = self.limiter.total

    # -- one item ------------------------------------------------------------------------

    async def _process(
        self, env: tuple[dict[str, Any], _Ticket], first_error: Exception | None = None
    ) -> None:
        """Run one item through the stage and send it on (or skip, fail, divert it).

        ``first_error`` is the error of a first attempt the caller already made.
        """
        item, ticket = env
        stats = self.stats
        try:
            result = await self._call(item, ticket, first_error)
        except Skip as skip:
            stats.skipped += 1
            self._streak = 0
            if self.always_target is None:
                self.runner.settle(ticket, None)
            else:
                ticket.skip = True
                await self._divert(item, ticket, "skipped", str(skip) or None)
            return
        except _Failed as failure:
            stats.failed += 1
            target = self.always_target
            self.runner.fail(ticket, self.name, failure.error, failure.attempts, ends=target is None)
            self._note_failure(failure.error)
            if target is not None:
                await self._divert(item, ticket, "failed", ticket.error)
            return
        stats.ok += 1
        self._streak = 0
        if self._fanout:
            if not result:
                self.runner.settle(ticket, None)  # fanned out to nothing: skipped
                return
            ticket.pending += len(result) - 1
            for child in result:
                await self._emit(child, ticket)
        else:
            await self._emit(result, ticket)

    async def _divert(self, item: dict[str, Any], ticket: _Ticket, status: str, error: str | None) -> None:
        """Send an item that failed or was skipped here on to the next ``always`` stage."""
        assert self.always_target is not None
        item = {**item, "status": status, "error": error, "failed_stage": self.name}
        await self.always_target.inq.put((item, ticket))

    def _note_failure(self, error: BaseException) -> None:
        """Count failures in a row with the same error, for the circuit breaker."""
        limit = self.runner.pipeline.circuit_breaker
        if not limit:
            return
        cause = error.__cause__
        signature = (type(error), type(cause), getattr(error, "errno", None) or getattr(cause, "errno", None))
        if signature == self._streak_signature:
            self._streak += 1
        else:
            self._streak_signature, self._streak = signature, 1
        if self._streak >= limit:
            self.runner.trip(self.name, error, self._streak)

    async def _emit(self, item: dict[str, Any], ticket: _Ticket) -> None:
        q = self.outq
        if q is None:
            self.runner.settle(ticket, True)
            return
        try:
            q.put_nowait((item, ticket))
        except asyncio.QueueFull:
            start = time.perf_counter()
            await q.put((item, ticket))
            self.stats.blocked_s += time.perf_counter() - start

    async def _call(self, item: dict[str, Any], ticket: _Ticket, first_error: Exception | None = None) -> Any:
        """Run attempts until one succeeds, the policy gives up, or a permanent error.

        The first attempt runs without tenacity: most items succeed first time, and building
        a retry controller per item would dominate the engine's per-item cost.
        """
        try:
            if first_error is not None:
                raise first_error
            return await self._attempt(item)
        except Skip:
            raise
        except self._retryable as exc:
            if isinstance(exc, RetryAfter):
                self.pause(exc.delay)
            if self._max_attempts == 1:
                raise _Failed(exc, 1) from exc
            first = exc
        except Exception as exc:
            raise _Failed(exc, 1) from exc
        return await self._retry(item, first, ticket)

    async def _retry(self, item: dict[str, Any], first: BaseException, ticket: _Ticket) -> Any:
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
            retry=tenacity.retry_if_exception_type(self._retryable),
            before_sleep=lambda state: self._note_retry(state.outcome.exception() if state.outcome else None),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    result = await self._attempt(item)
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

    def pause(self, seconds: float) -> None:
        """Close the stage's gate: no worker starts an attempt for ``seconds``."""
        until = self._loop.time() + seconds
        if until > self._paused_until:
            self._paused_until = until
            log.info("stage %r paused for %.1fs", self.name, seconds)

    async def _attempt(self, item: dict[str, Any]) -> Any:
        if self._paused_until:
            # The pause can be extended while we sleep, so look again after each sleep.
            while (delay := self._paused_until - self._loop.time()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(delay)
        if self._rate is not None:
            await self._rate.acquire()
        if self._is_async:
            return await self._attempt_async(item)
        return await self._attempt_thread(item)

    async def _attempt_async(self, item: dict[str, Any]) -> Any:
        limiter = self.limiter
        await limiter.acquire()
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            result = await self._within_timeout(self._invoke_async(item))
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._record(time.perf_counter() - start, error)
            limiter.release()
        return self._check(result)

    async def _within_timeout(self, awaitable: Awaitable[Any], note: str = "") -> Any:
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

    async def _invoke_async(self, item: dict[str, Any]) -> Any:
        if self._fanout:
            return [child async for child in self.fn(item)]
        return await self.fn(item)

    async def _attempt_thread(self, item: dict[str, Any]) -> Any:
        # asyncio.to_thread would do, but once the awaiting side is cancelled (timeout, stop)
        # it cannot tell us when the thread really finishes. Submitting to the same executor
        # (the loop's default, which to_thread uses) keeps the concurrent future, so the slot
        # is released when the thread is done, never earlier: the cap holds even for
        # abandoned calls.
        limiter = self.limiter
        await limiter.acquire()
        start = time.perf_counter()
        call = self._invoke_thread
        cfut = self.runner.executor.submit(contextvars.copy_context().run, call, item)
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
                cfut.add_done_callback(functools.partial(_release_from_thread, self._loop, limiter))
            raise
        finally:
            self._record(time.perf_counter() - start, error)
            if not released_later:
                limiter.release()
        return self._check(result)

    def _invoke_thread(self, item: dict[str, Any]) -> Any:
        if self._fanout:
            return list(self.fn(item))
        result = self.fn(item)
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never leave a "coroutine was never awaited" behind
            raise StageMisuse(
                f"stage {self.name!r}: {_describe(self.fn)} is a plain function but returned "
                f"{type(result).__name__}; make it `async def` so it runs on the event loop, "
                "or return the item",
                stage=self.name,
            )
        return result

    def _check(self, result: Any) -> Any:
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
        return result

    # -- reporting -----------------------------------------------------------------------

    def report(self, wall_s: float) -> StageReport:
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
        )


class Runner:
    """Runs one :class:`Pipeline` once. Made by :meth:`Pipeline.run_async`."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        run_id: str | None = None,
        limit: int | None = None,
        report_path: Path | None = None,
        progress: bool | None = None,
        retry_failed: bool = False,
        only_failed: bool = False,
    ):
        if limit is not None and limit < 0:
            raise ConfigError(f"--limit must be >= 0, got {limit!r}")
        self.pipeline = pipeline
        # The default run id names the night: a rerun the same day resumes it.
        self.run_id = run_id or f"{pipeline.name}-{time.strftime('%Y-%m-%d')}"
        self.retry_failed = retry_failed or only_failed
        self.only_failed = only_failed
        self.limit = limit
        self.report_path = report_path
        self.progress = progress
        run_dir = pipeline.report_dir / self.run_id if pipeline.report_dir is not None else None
        self.run_dir = run_dir
        self.dead = DeadLetterWriter(
            run_dir / "dead_letters.jsonl"
            if run_dir is not None
            else (report_path.with_suffix(".dead_letters.jsonl") if report_path else None),
            self.run_id,
        )
        # One limiter per database, shared by every stage that touches it.
        self._databases = {
            name: DatabaseHandle(
                name=name,
                dsn=db.dsn,
                limiter=CapacityLimiter(db.concurrency, name=f"database {name!r}"),
                options=db.options,
            )
            for name, db in pipeline.databases.items()
        }
        self.last_report: RunReport | None = None
        self.stages: list[_StageRun] = []
        self.queues: list[asyncio.Queue[Any]] = []
        self.read = 0
        self.ok = 0
        self.failed = 0
        self.skipped = 0
        self.already_done = 0
        self.not_retried = 0
        self.abandoned_threads = 0
        self.ledger: RunLedger | None = None
        self._watermark: Any = None
        self._in_flight_keys: dict[Any, _Ticket] = {}
        self._stop_signal: int | None = None
        self._stop_error: str | None = None
        self._stopping = asyncio.Event()
        self._grace_expired = False
        self._flow_task: asyncio.Task[None] | None = None
        self._feeding_source = False
        self._feeder: asyncio.Task[None] | None = None
        self.started = time.perf_counter()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._thread_count(), thread_name_prefix=f"pipeline-{pipeline.name}"
        )

    def _thread_count(self) -> int:
        # Stages behind a factory only show their kind once opened; threads are created
        # lazily, so counting them costs nothing if they turn out to be async.
        return (
            sum(
                s.max_concurrency
                for s in self.pipeline.stages
                if is_factory(s.fn) or stage_kind(s.fn) in ("thread", "thread-gen")
            )
            + _THREAD_HEADROOM
        )

    # -- accounting ----------------------------------------------------------------------

    @property
    def open_items(self) -> int:
        """Items read and not yet ended."""
        return len(self._in_flight_keys)

    def settle(self, ticket: _Ticket, ok: bool | None) -> None:
        """One branch of ``ticket`` ended: ok (True), skipped (None)."""
        if ok:
            ticket.ok = True
        ticket.pending -= 1
        if ticket.pending == 0:
            self._close(ticket)

    def fail(
        self, ticket: _Ticket, stage: str, error: BaseException, attempts: int, *, ends: bool = True
    ) -> None:
        """One branch of ``ticket`` failed in ``stage``: dead-letter it.

        With ``ends=False`` the branch goes on to an ``always`` stage, which ends it later.
        """
        self.dead.write(key=ticket.key, stage=stage, error=error, attempts=attempts)
        ticket.failed = True
        ticket.stage = stage
        ticket.error = f"{type(error).__name__}: {error}"
        ticket.attempts = max(ticket.attempts, attempts)
        if ends:
            ticket.pending -= 1
            if ticket.pending == 0:
                self._close(ticket)

    def _close(self, ticket: _Ticket) -> None:
        in_flight = self._in_flight_keys
        if in_flight.get(ticket.key) is ticket:  # a rejected duplicate never entered
            del in_flight[ticket.key]
        if ticket.failed:
            self.failed += 1
            state = "failed"
        elif ticket.ok and not ticket.skip:
            self.ok += 1
            state = "done"
        else:
            self.skipped += 1
            state = "skipped"
        if self.ledger is not None:
            self.ledger.record(ticket.key, state, ticket.attempts, ticket.stage, ticket.error)

    def trip(self, stage: str, error: BaseException, streak: int) -> None:
        """The circuit breaker: a stage failed ``streak`` items in a row with the same error."""
        if self._stop_error is None:
            self._stop_error = (
                f"circuit breaker: stage {stage!r} failed {streak} items in a row with the same error "
                f"({type(error).__name__}: {error}); the run stopped rather than dead-letter the whole "
                "batch. Fix the cause (a database down, a full disk, a wrong URL base), then rerun: "
                "done items are not redone"
            )
            log.error("%s", self._stop_error)
            self._stop_reading()

    # -- the run -------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> RunReport:
        """Open everything, run the flow, close everything, and return the report."""
        loop = asyncio.get_running_loop()
        loop.set_default_executor(self.executor)
        started_at = utc_now()
        self.started = time.perf_counter()
        error: BaseException | None = None
        installed: list[signal.Signals] = []
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop, sig)
                installed.append(sig)
        shared = SharedResources()
        # The ledger outlives the flow: its last flush follows the report. A pluggable one may
        # use the shared resources (a database pool), which then close after it.
        outer = contextlib.AsyncExitStack()
        try:
            report, error = await self._run(started_at, shared, outer, installed)
        except BaseException:
            await outer.aclose()
            raise
        try:
            await outer.aclose()
        except Exception as exc:
            log.error("closing the ledger failed: %s: %s", type(exc).__name__, exc)
            error = error or exc
        for path in (self.run_dir / "report.json" if self.run_dir else None, self.report_path):
            if path is not None:
                report.write(path)
        self.last_report = report
        if error is not None:
            raise error
        return report

    async def _run(
        self,
        started_at: str,
        shared: SharedResources,
        outer: contextlib.AsyncExitStack,
        installed: list[signal.Signals],
    ) -> tuple[RunReport, BaseException | None]:
        """The run up to its report and the ledger's last write; :meth:`run` closes the ledger."""
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        flusher: asyncio.Task[None] | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                pluggable = isinstance(self.pipeline.ledger, LedgerStore)
                # Closed after every stage's own resources (and, with a pluggable ledger, after it).
                (outer if pluggable else stack).push_async_exit(shared.stack)
                self.ledger = ledger = await self._open_ledger(outer, shared)
                if ledger is not None:
                    if self.only_failed or ledger.resuming:
                        counts = await ledger.counts()
                        if self.only_failed and not counts.get("failed"):
                            where = self.pipeline.ledger_path or "ledger"
                            raise ConfigError(
                                f"run {self.run_id!r} has no failed items in the ledger {where}; check "
                                "the run id (`pipeline deadletters CONFIG` lists runs with failures)"
                            )
                        if ledger.resuming:
                            log.info("resuming run %s: %s", self.run_id, counts)
                    await ledger.start_run(started_at)
                    flusher = asyncio.create_task(_flush_periodically(ledger), name="pipeline-ledger")
                source = await self._open_source(stack, shared)
                await self._open_stages(stack, shared)
                from ._progress import open_progress

                await stack.enter_async_context(open_progress(self))
                # The flow runs in its own task so that the end of the grace period can cancel
                # it without cancelling the clean-up that follows.
                self._flow_task = asyncio.create_task(self._flow(source), name="pipeline-flow")
                try:
                    await self._flow_task
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    if not self._grace_expired or (me is not None and me.cancelling()):
                        raise
        except Exception as exc:  # recorded in the report, then re-raised
            error = _unwrap(exc)
        finally:
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            for sig in installed:
                loop.remove_signal_handler(sig)
            self.dead.close()
            # A fresh default first: whatever happens next, asyncio.run never joins our threads.
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor())
            self.abandoned_threads = await _shutdown_executor(
                self.executor, max(self.pipeline.grace_period, 1.0)
            )
        report = self._report(started_at, error)
        if self.ledger is not None:
            try:
                await self.ledger.flush()
                await self.ledger.finish_run(report.status, self._new_watermark(report))
            except Exception as exc:
                # The work is done; unrecorded items are only done again by a rerun. Say so in
                # the report, not only in the log.
                message = (
                    f"the ledger could not record the end of the run ({type(exc).__name__}: {exc}); "
                    "a rerun of this run id redoes the items it lost"
                )
                log.error("%s", message)
                report = dataclasses.replace(report, ledger_error=message)
        return report, error

    async def _open_ledger(
        self, stack: contextlib.AsyncExitStack, shared: SharedResources
    ) -> RunLedger | None:
        spec = self.pipeline.ledger
        if isinstance(spec, LedgerStore):
            ctx = self._context("ledger", None, shared)
            ledger = await _open(stack, spec.fn(ctx, **spec.options), "the ledger")
            if not isinstance(ledger, RunLedger):
                raise ConfigError(
                    f"ledger factory {_describe(spec.fn)} yielded {ledger!r}, which is not a RunLedger; "
                    "yield an object with the methods pipeline.RunLedger lists"
                )
            return ledger
        path = self.pipeline.ledger_path
        if path is None:
            return None
        return await stack.enter_async_context(
            open_sqlite_ledger(path, pipeline=self.pipeline.name, run_id=self.run_id)
        )

    async def _open_source(self, stack: contextlib.AsyncExitStack, shared: SharedResources) -> Any:
        spec = self.pipeline.source
        options = dict(spec.options)
        if spec.watermark is not None and self.ledger is not None and not self.only_failed:
            # Incremental nights: only rows changed since the last successful run.
            since = await self.ledger.last_watermark()
            if since is not None:
                options["since"] = since
                log.info("incremental run: rows with %s > %s", spec.watermark, since)
        if is_factory(spec.fn):
            ctx = self._context("source", None, shared)
            return await _open(stack, spec.fn(ctx, **options), "the source")
        return spec.fn(**options)

    async def _open_stages(self, stack: contextlib.AsyncExitStack, shared: SharedResources) -> None:
        p = self.pipeline
        self.queues = [asyncio.Queue(maxsize=s.queue_size or p.queue_size) for s in p.stages]
        for i, spec in enumerate(p.stages):
            limiter = CapacityLimiter(spec.initial_concurrency, name=f"stage {spec.name!r}")
            fn: Callable[..., Any] = spec.fn
            pause_box: list[_StageRun] = []  # the stage's run exists only once its callable does

            def pause(seconds: float, box: list[_StageRun] = pause_box) -> None:
                box[0].pause(seconds)

            ctx: Context | None = None
            if is_factory(fn):
                ctx = self._context(spec.name, limiter, shared, pause, spec.max_concurrency)
                fn = await _open(stack, spec.fn(ctx, **spec.options), f"stage {spec.name!r}")
                if not callable(fn):
                    raise ConfigError(
                        f"stage {spec.name!r}: factory {_describe(spec.fn)} yielded {fn!r}, "
                        "which is not callable; yield the per-item stage function"
                    )
                kind = stage_kind(fn)
                spec.check_kind(kind)
            else:
                kind = stage_kind(fn)
                if spec.options:
                    fn = functools.partial(fn, **spec.options)
            outq = self.queues[i + 1] if i + 1 < len(self.queues) else None
            run = _StageRun(self, spec, fn, kind, limiter, self.queues[i], outq)
            if ctx is not None and ctx.ceiling is not None and run.auto is not None:
                run.auto = _clamp(run.auto, ctx.ceiling)
                if limiter.total > (run.auto.max or 1):
                    limiter.total = run.auto.max or 1
            pause_box.append(run)
            self.stages.append(run)
        for i, run in enumerate(self.stages):
            run.always_target = next((s for s in self.stages[i + 1 :] if s.spec.always), None)

    def _context(
        self,
        stage: str,
        limiter: CapacityLimiter | None,
        shared: SharedResources,
        pause: Callable[[float], None] | None = None,
        max_concurrency: int | None = None,
    ) -> Context:
        return Context(
            pipeline=self.pipeline.name,
            run_id=self.run_id,
            stage=stage,
            limiter=limiter,
            databases=self._databases,
            shared=shared,
            pause=pause,
            max_concurrency=max_concurrency,
        )

    async def _flow(self, source: Any) -> None:
        async with asyncio.TaskGroup() as tg:
            for stage in self.stages:
                stage.start(tg)
            self._feeder = tg.create_task(self._feed(source), name="pipeline-source")

    async def _feed(self, source: Any) -> None:
        q = self.queues[0]
        key_field = self.pipeline.source.key
        watermark = self.pipeline.source.watermark
        limit = self.limit
        stopping = self._stopping
        # Only a rerun of a run id pays for ledger lookups: one batch of them per source batch.
        ledger = self.ledger if self.ledger is not None and self.ledger.resuming else None
        states: list[str | None] | None = None
        in_flight = self._in_flight_keys
        reading = True
        async with contextlib.aclosing(self._batches(source)) as batches:
            async for batch in batches:
                if ledger is not None:
                    states = await ledger.states(
                        [row.get(key_field) if isinstance(row, dict) else None for row in batch]
                    )
                for i, row in enumerate(batch):
                    if type(row) is not dict and not isinstance(row, dict):
                        raise SourceError(
                            f"the source yielded {type(row).__name__}, expected a dict per item "
                            f"({_describe(self.pipeline.source.fn)})"
                        )
                    key = row.get(key_field)
                    if states is not None and self._already_ended(states[i]):
                        continue
                    ticket = _Ticket(key)
                    self.read += 1
                    try:  # the usual case, checked inline; _check_key explains the others
                        clean = key is not None and key != "" and key not in in_flight
                    except TypeError:
                        clean = False
                    if not clean:
                        problem = self._check_key(row, key_field, key, in_flight)
                        self.fail(ticket, "source", SourceError(problem or "bad key"), 1)
                    else:
                        in_flight[key] = ticket
                        if watermark is not None:
                            self._advance_watermark(row.get(watermark))
                        try:
                            q.put_nowait((row, ticket))
                        except asyncio.QueueFull:
                            await q.put((row, ticket))
                    if (limit is not None and self.read >= limit) or stopping.is_set():
                        reading = False
                        break
                if not reading:
                    break
        # Not in a finally: after an error the consumers are being cancelled, and a put into a
        # full queue would wait for them forever.
        self._feeder = None
        await q.put(_END)

    def _already_ended(self, state: str | None) -> bool:
        """On a rerun: whether an item whose recorded state is ``state`` is not taken again."""
        if self.only_failed:
            return state != "failed"
        if state == "failed" and not self.retry_failed:
            self.not_retried += 1
            return True
        if state in ("done", "skipped"):
            self.already_done += 1
            return True
        return False

    @staticmethod
    def _check_key(
        row: dict[str, Any], key_field: str, key: object, in_flight: dict[Any, _Ticket]
    ) -> str | None:
        """Why this row cannot go in, or ``None``."""
        if key_field not in row:
            return (
                f"the source row has no {key_field!r} field, which is the configured key; "
                f"its fields are {sorted(row)!r}"
            )
        if key is None or key == "":
            return f"the source row's key {key_field!r} is {key!r}; every item needs a key"
        try:
            duplicate = key in in_flight
        except TypeError:
            return f"the source row's key {key!r} is a {type(key).__name__}, which cannot be a key"
        if duplicate:
            return f"duplicate key {key!r}: an item with this key is already in flight in this run"
        return None

    def _new_watermark(self, report: RunReport) -> str | None:
        """The watermark to remember: only after a run in which every item read ended well.

        Advancing past a failed row would hide it from every later incremental run.
        """
        if self._watermark is None:
            return None
        if report.items.failed or report.items.unfinished:
            log.warning(
                "watermark not advanced: %d items failed and %d are unfinished; the next run reads "
                "the same changes again (or replay them with `pipeline retry`)",
                report.items.failed,
                report.items.unfinished,
            )
            return None
        return str(self._watermark)

    def _advance_watermark(self, value: Any) -> None:
        if value is None:
            return
        try:
            if self._watermark is None or value > self._watermark:
                self._watermark = value
        except TypeError:
            log.warning("watermark values of different types: %r and %r", self._watermark, value)

    async def _batches(self, source: Any) -> AsyncGenerator[Sequence[Any], None]:
        """Yield the source's rows in batches: one row at a time from an async iterator, and
        up to ``_SOURCE_BATCH`` per thread hop from a plain one (which may block)."""
        if self.limit == 0:
            return
        if hasattr(source, "__aiter__"):
            it = source.__aiter__()
            try:
                while True:
                    self._feeding_source = True
                    try:
                        row = await it.__anext__()
                    except StopAsyncIteration:
                        return
                    except asyncio.CancelledError:
                        if self._stopping.is_set() and not self._grace_expired:
                            asyncio.current_task().uncancel()  # type: ignore[union-attr]
                            return
                        raise
                    except Exception as exc:
                        raise SourceError(f"the source failed: {type(exc).__name__}: {exc}") from exc
                    finally:
                        self._feeding_source = False
                    yield (row,)
            finally:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    await aclose()
            return
        try:
            it = iter(source)
        except TypeError:
            raise SourceError(
                f"the source returned {type(source).__name__}, which is not iterable; return or yield dicts"
            ) from None
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = await loop.run_in_executor(self.executor, _take, it, _SOURCE_BATCH)
                yield batch
                if len(batch) < _SOURCE_BATCH:
                    return
        except Exception as exc:
            if isinstance(exc, PipelineError):
                raise
            raise SourceError(f"the source failed: {type(exc).__name__}: {exc}") from exc
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    # -- stopping ------------------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop reading the source; in-flight items get the grace period to finish.

        A second request cancels what is left at once.
        """
        if self._stop_signal is not None:
            log.warning("second stop request: cancelling in-flight items now")
            self._expire_grace()
            return
        self._stop_signal = signum
        log.warning(
            "received %s: no more items will be read; %d in flight get %gs to finish",
            signal.Signals(signum).name,
            len(self._in_flight_keys),
            self.pipeline.grace_period,
        )
        self._stop_reading()

    def _stop_reading(self) -> None:
        """Read no more items; what is in flight gets the grace period, then is cancelled."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        feeder = self._feeder
        if feeder is not None and self._feeding_source:
            feeder.cancel()  # waiting on the source: stop waiting. (Never while it holds a row.)
        asyncio.get_running_loop().call_later(self.pipeline.grace_period, self._expire_grace)

    def _expire_grace(self) -> None:
        if self._flow_task is not None and not self._flow_task.done() and not self._grace_expired:
            self._grace_expired = True
            log.warning("grace period over: cancelling %d unfinished items", len(self._in_flight_keys))
            self._flow_task.cancel()

    def _report(self, started_at: str, error: BaseException | None) -> RunReport:
        wall = time.perf_counter() - self.started
        unfinished = len(self._in_flight_keys)
        stages = [s.report(wall) for s in self.stages]
        if error is not None or self._stop_error is not None:
            status, code = "failed", 1
        elif self._stop_signal is not None:
            status, code = "interrupted", 128 + self._stop_signal
        elif self.failed > self.pipeline.max_failures:
            status, code = "failed", 1
        else:
            status, code = "ok", 0
        message = None
        if error is not None:
            message = f"{type(error).__name__}: {error}"
        elif self._stop_error is not None:
            message = self._stop_error
        elif status == "failed":
            message = (
                f"{self.failed} items failed, more than max_failures = {self.pipeline.max_failures}; "
                f"see {self.dead.path}"
            )
        return RunReport(
            pipeline=self.pipeline.name,
            run_id=self.run_id,
            status=status,
            exit_code=code,
            wall_s=round(wall, 4),
            items=ItemCounts(self.read, self.ok, self.failed, self.skipped, unfinished),
            stages=stages,
            bottleneck=_bottleneck(stages, {s.name for s in self.stages if workload(s.spec.fn) == "cpu"}),
            unfinished_keys=sorted(self._in_flight_keys, key=repr),
            error=message,
            dead_letters=str(self.dead.path) if self.dead.count and self.dead.path else None,
            started_at=started_at,
            already_done=self.already_done,
            not_retried=self.not_retried,
            abandoned_threads=self.abandoned_threads,
        )


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for row in it:
        out.append(row)
        if len(out) >= n:
            break
    return out


def _bottleneck(stages: list[StageReport], cpu_bound: set[str]) -> dict[str, Any] | None:
    """The stage that limited the run: the busiest one, with blocked time as tie-breaker."""
    if not stages:
        return None
    index, top = max(enumerate(stages), key=lambda p: (p[1].busy_ratio, -p[1].blocked_s))
    upstream_blocked = stages[index - 1].blocked_s if index > 0 else 0.0
    why = f"{top.busy_ratio:.0%} of its {top.concurrency} slots busy over the run"
    if upstream_blocked > 0:
        why += f"; the stage before it waited {upstream_blocked:.1f}s on its full queue"
    if top.busy_ratio < 0.5:
        advice = "no stage was saturated: the source, or the number of items, set the pace"
    elif top.name in cpu_bound and top.concurrency >= (os.cpu_count() or 1):
        advice = "it is CPU-bound and already at the core count: more cores help, a higher cap does not"
    else:
        advice = "raise its concurrency if what it calls can take more"
    return {"stage": top.name, "reason": f"{why}; {advice}", "busy_ratio": top.busy_ratio}


def _unwrap(exc: BaseException) -> BaseException:
    """A TaskGroup wraps errors in a group; the operator wants the one that happened."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _shutdown_executor(executor: concurrent.futures.ThreadPoolExecutor, wait_s: float) -> int:
    """Join every worker thread without blocking the loop, waiting at most ``wait_s`` seconds.

    A thread cannot be cancelled: one stuck in a call that never returns is left behind rather
    than hanging the run. Returns how many were left (the CLI then exits without joining them).
    """
    done = asyncio.get_running_loop().create_future()

    def join() -> None:
        try:
            executor.shutdown(wait=True, cancel_futures=True)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by then
                done.get_loop().call_soon_threadsafe(_set_result, done)

    threading.Thread(target=join, name="pipeline-executor-shutdown", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(done), wait_s)
    except TimeoutError:
        alive = [t for t in executor._threads if t.is_alive()]  # no public view of the threads
        log.error(
            "%d worker threads are still inside stage calls %.0fs after the run ended; they are "
            "abandoned (a thread cannot be cancelled): %s",
            len(alive),
            wait_s,
            ", ".join(t.name for t in alive),
        )
        return len(alive)
    return 0


def _clamp(auto: Auto, ceiling: int) -> Auto:
    """An adaptive stage's bounds under a hard ceiling (a pool size) its factory declared."""
    top = max(auto.min, min(auto.max or ceiling, ceiling))
    return dataclasses.replace(auto, max=top, initial=min(auto.initial or 1, top))


async def _open(stack: contextlib.AsyncExitStack, cm: Any, what: str) -> Any:
    """Enter a factory's context manager; a failure to open fails the run with who and why."""
    try:
        return await stack.enter_async_context(cm)
    except PipelineError:
        raise
    except Exception as exc:
        raise ResourceError(f"{what} could not open: {type(exc).__name__}: {exc}") from exc


def _release_from_thread(loop: asyncio.AbstractEventLoop, limiter: CapacityLimiter, _: object) -> None:
    """Give back the slot of an abandoned thread call, from that thread, when it returns."""
    with contextlib.suppress(RuntimeError):  # the run, and its loop, may be over by then
        loop.call_soon_threadsafe(limiter.release)


def _set_result(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _flush_periodically(ledger: RunLedger) -> None:
    """Flush the ledger every ``flush_interval`` seconds until cancelled; a failed flush keeps its
    records for the next one (a database failover must not stop the run)."""
    while True:
        await asyncio.sleep(ledger.flush_interval)
        try:
            await ledger.flush()
        except Exception as exc:
            log.warning("the ledger could not write (%s: %s); will try again", type(exc).__name__, exc)
