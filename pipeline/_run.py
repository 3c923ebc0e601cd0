"""The run: a source feeding bounded queues, each stage a pool of workers under its own cap.

Shape of a run::

    source --feed--> [queue 0] --stage 0 workers--> [queue 1] --stage 1 workers--> ... --> done

* Each queue is bounded, so the source is read no faster than the slowest stage drains.
* :mod:`._feed` reads the source; :mod:`._stage` runs each stage; :mod:`._tickets` ends every item
  exactly once; this module opens and closes what they use, around one TaskGroup.
* Resources are opened in order (ledger, source, stages) on one exit stack and closed in reverse,
  even when the run fails. The ledger outlives the flow: its last flush follows the report.
* Stopping: a signal, the circuit breaker, or a stage whose slots are all held by calls that
  never return stops the reading; what is in flight gets the grace period, then is cancelled
  and reported unfinished. A second signal cancels at once.
* The report's status counts the whole run id: failures left from earlier attempts count
  against ``max_failures`` (``run_totals``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._adaptive import Auto
from ._batch import BatchStageRun
from ._budget import MemoryBudget, return_freed_memory
from ._contract import (
    Batch,
    Context,
    SharedResources,
    describe,
    is_factory,
    shards_source,
    stage_kind,
    workload,
)
from ._definition import LedgerStore, PipelineDefinition, for_shard
from ._exceptions import ConfigError, PipelineError, ResourceError
from ._feed import Feeder
from ._html import write_run_page
from ._ledger import BufferedLedger, RunLedger, ShardedLedger, open_sqlite_ledger
from ._limiter import CapacityLimiter
from ._logs import run_id_context
from ._progress import RunSnapshot, open_progress
from ._report import DeadLetterWriter, ItemCounts, RunReport, find_bottleneck, utc_now
from ._shard import Shard, check_parallel
from ._stage import StageRun
from ._threads import installed, open_executor, shutdown
from ._tickets import Tally
from ._timeline import Timeline, open_sampler

__all__ = ["Run", "default_run_id", "run", "run_async", "run_directory"]

log = logging.getLogger("pipeline")


def run_directory(report_dir: Path, run_id: str, shard: Shard | None) -> Path:
    """Where a run (or one shard of it: ``<run id>/shard-K-of-N``) writes its report and dead
    letters; the shards of a run may share a disk."""
    if shard is None or shard.count == 1:
        return report_dir / run_id
    return report_dir / run_id / f"shard-{shard.index}-of-{shard.count}"


def default_run_id(name: str) -> str:
    """The default run id names the night (``<name>-YYYY-MM-DD``): a rerun the same day resumes it."""
    return f"{name}-{time.strftime('%Y-%m-%d')}"


async def run_async(
    pipeline: PipelineDefinition,
    *,
    run_id: str | None = None,
    limit: int | None = None,
    report_path: Path | None = None,
    progress: bool | None = None,
    handle_signals: bool = False,
    retry_failed: bool = False,
    only_failed: bool = False,
    shard: Shard | None = None,
    parallel: int | None = None,
    page: bool = True,
) -> RunReport:
    """Run ``pipeline`` on the running event loop and return its report.

    Args:
        pipeline: What to run.
        run_id: The run's id; defaults to the pipeline's name and today's date, so a rerun
            the same day resumes it (see the ledger).
        limit: Read at most this many items from the source.
        report_path: Also write the report JSON here.
        progress: Show live progress; ``None`` shows it when stderr is a terminal.
        handle_signals: Install SIGINT/SIGTERM handlers for a graceful stop.
        retry_failed: On a rerun of ``run_id``, take the items that failed again too.
        only_failed: On a rerun of ``run_id``, take only the items that failed (``pipeline
            retry``); refused if the ledger has none.
        shard: Run only this shard of the run (``--shard K/N``): the items it owns, under the
            same run id and ledger as the other shards. ``None`` runs them all.
        parallel: How many shards of the run run at once (default: all of them); each takes
            its share of every database's ``concurrency`` and every stage's ``rate``.
        page: Draw ``report.html`` beside ``report.json`` (matplotlib: a second or two);
            ``False`` leaves it to ``pipeline report RUN_DIR`` (shards on Dask do).

    Raises:
        PipelineError: The run failed (a config error, the source, a resource). Any error that
            ends a run carries the run's report, when one was made, as its ``report``
            attribute; the report is written to the run directory either way.
    """
    runner = Run(
        pipeline,
        run_id=run_id,
        limit=limit,
        report_path=report_path,
        progress=progress,
        retry_failed=retry_failed,
        only_failed=only_failed,
        shard=shard,
        parallel=parallel,
    )
    with run_id_context(runner.run_id):  # the run's log records carry its id
        return await runner.run(handle_signals=handle_signals, page=page)


def run(pipeline: PipelineDefinition, **kwargs: Any) -> RunReport:
    """Run ``pipeline`` to completion in a new event loop (see :func:`run_async`); signals are
    handled unless ``handle_signals=False``."""
    kwargs.setdefault("handle_signals", True)
    return asyncio.run(run_async(pipeline, **kwargs))


class Run:
    """One run of a pipeline: made and driven by :func:`run_async`."""

    def __init__(
        self,
        pipeline: PipelineDefinition,
        *,
        run_id: str | None = None,
        limit: int | None = None,
        report_path: Path | None = None,
        progress: bool | None = None,
        retry_failed: bool = False,
        only_failed: bool = False,
        shard: Shard | None = None,
        parallel: int | None = None,
    ):
        if limit is not None and limit < 0:
            raise ConfigError(f"--limit must be >= 0, got {limit!r}")
        if shard is None and parallel is not None:
            raise ConfigError("--parallel says how many shards run at once; give --shard K/N too")
        self.shard = shard
        if shard is not None:
            pipeline = for_shard(pipeline, shard, check_parallel(shard, parallel))
            if shard.count > 1 and pipeline.ledger_path is not None:
                raise ConfigError(
                    f"the ledger {pipeline.ledger_path} is an SQLite file, on one machine: the "
                    f"{shard.count} shards of a run, on several machines, would each keep their own. "
                    'Set ledger = { use = "stages.db:mysql_ledger", database = "..." } on a database '
                    "every shard reaches, or ledger = false to run shards without resume",
                    location="pipeline.ledger",
                )
        self.pipeline = pipeline
        self.run_id = run_id or default_run_id(pipeline.name)
        self.retry_failed = retry_failed or only_failed
        self.only_failed = only_failed
        self.limit = limit
        self.report_path = report_path
        self.progress = progress
        self.run_dir = (
            run_directory(pipeline.report_dir, self.run_id, shard)
            if pipeline.report_dir is not None
            else None
        )
        dead_path = (
            self.run_dir / "dead_letters.jsonl"
            if self.run_dir is not None
            else (report_path.with_suffix(".dead_letters.jsonl") if report_path else None)
        )
        budget = pipeline.memory_budget
        self.budget = MemoryBudget(budget) if isinstance(budget, int) else None
        if self.budget is not None:
            return_freed_memory()
        self.tally = Tally(DeadLetterWriter(dead_path, self.run_id), self.budget)
        # One limiter per database, shared by every stage that touches it.
        self._databases = {name: db.handle(name) for name, db in pipeline.databases.items()}
        self.stages: list[StageRun] = []
        self.ledger: RunLedger | None = None
        self.started = time.perf_counter()
        self._stop_signal: int | None = None
        self._stop_error: str | None = None
        self._grace_expired = False
        self._flow_task: asyncio.Task[None] | None = None
        # Stages behind a factory only show their kind once opened: count them as threads.
        self.executor = open_executor(
            sum(
                s.max_concurrency
                for s in pipeline.stages
                if is_factory(s.fn) or stage_kind(s.fn) in ("thread", "thread-gen")
            ),
            pipeline.name,
        )
        self.queues: list[asyncio.Queue[Any]] = [
            asyncio.Queue(maxsize=s.queue_size or pipeline.queue_size) for s in pipeline.stages
        ]
        self.feeder = Feeder(
            pipeline.source,
            self.queues[0],
            self.tally,
            executor=self.executor,
            limit=limit,
            only_failed=only_failed,
            retry_failed=self.retry_failed,
            shard=None if shard is None or shards_source(pipeline.source.fn) else shard,
        )
        # Sampled for report.html, which only a run with a run directory writes.
        self.timeline = (
            Timeline([s.name for s in pipeline.stages], [q.maxsize for q in self.queues])
            if self.run_dir is not None
            else None
        )

    # -- the run -------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False, page: bool = True) -> RunReport:
        """Open everything, run the flow, close everything, and return the report."""
        self._check_paths()
        loop = asyncio.get_running_loop()
        started_at = utc_now()
        self.started = time.perf_counter()
        installed_signals: list[signal.Signals] = []
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.request_stop, sig)
                installed_signals.append(sig)
        # The ledger outlives the flow: its last flush follows the report. A pluggable one may
        # use the shared resources (a database pool), which then close after it.
        outer = contextlib.AsyncExitStack()
        try:
            try:
                with installed(loop, self.executor):
                    error = await self._flow_and_close(outer, started_at)
            finally:
                for sig in installed_signals:
                    loop.remove_signal_handler(sig)
            report = await self._finish(started_at, error)
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
        if self.run_dir is not None:
            # matplotlib takes a second or two to import and draw: off the loop.
            await asyncio.to_thread(
                write_run_page,
                self.run_dir,
                self.timeline,
                self.pipeline,
                report.status == "interrupted",
                page,
            )
        if error is not None:
            error.report = report  # type: ignore[attr-defined]
            raise error
        return report

    async def _flow_and_close(self, outer: contextlib.AsyncExitStack, started_at: str) -> Exception | None:
        """Open the ledger (on ``outer``), the source and the stages, run the flow, close the
        source and stages and join the threads. Returns the error that ended the run, if any."""
        shared = SharedResources()
        error: Exception | None = None
        flusher: asyncio.Task[None] | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                pluggable = isinstance(self.pipeline.ledger, LedgerStore)
                # Closed after every stage's own resources (and, with a pluggable ledger, after it).
                (outer if pluggable else stack).push_async_exit(shared.stack)
                self.ledger = self.tally.ledger = ledger = await self._open_ledger(outer, shared)
                if ledger is not None:
                    await self._start_ledger(ledger, started_at)
                    flusher = asyncio.create_task(_flush_periodically(ledger), name="pipeline-ledger")
                source = await self._open_source(stack, shared)
                await self._open_stages(stack, shared)
                await stack.enter_async_context(
                    open_progress(self.snapshot, show=self.progress, interval=self.pipeline.progress_interval)
                )
                if self.timeline is not None:
                    await stack.enter_async_context(open_sampler(self.snapshot, self.timeline))
                # The flow runs in its own task so that the end of the grace period can cancel
                # it without cancelling the clean-up that follows.
                # Only a rerun of a run id pays for ledger lookups: one batch per source batch.
                resuming = ledger if ledger is not None and ledger.resuming else None
                self._flow_task = asyncio.create_task(self._flow(source, resuming), name="pipeline-flow")
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
            self.tally.dead.close()
            await shutdown(self.executor, max(self.pipeline.grace_period, 1.0))
        return error

    async def _flow(self, source: Any, resuming: RunLedger | None) -> None:
        async with asyncio.TaskGroup() as tg:
            for stage in self.stages:
                stage.start(tg)
            tg.create_task(self.feeder.feed(source, resuming), name="pipeline-source")

    async def _finish(self, started_at: str, error: BaseException | None) -> RunReport:
        """The ledger's last write, the report, and the run's end in the ledger. A failure of the
        ledger goes into the report, not only the log."""
        ledger = self.ledger
        totals: dict[str, int] | None = None
        ledger_error: str | None = None
        if ledger is not None:
            try:
                await ledger.flush()
                counts = await ledger.counts()
                totals = {state: counts.get(state, 0) for state in ("done", "failed", "skipped")}
            except Exception as exc:
                ledger_error = _ledger_message(exc)
        report = self._report(started_at, error, totals)
        if ledger is not None and ledger_error is None:
            try:
                await ledger.finish_run(report.status, self._new_watermark(report))
            except Exception as exc:
                ledger_error = _ledger_message(exc)
        if ledger_error is not None:
            log.error("%s", ledger_error)
            report = dataclasses.replace(report, ledger_error=ledger_error)
        lost = ledger.rejected_message() if isinstance(ledger, BufferedLedger) else None
        if lost is not None:
            log.error("%s", lost)
            joined = lost if report.ledger_error is None else f"{report.ledger_error}; {lost}"
            report = dataclasses.replace(report, ledger_error=joined)
        return report

    # -- opening -------------------------------------------------------------------------

    def _check_paths(self) -> None:
        """Refuse, before anything is created, a report directory or ledger file that cannot be
        written: a run that cannot leave its report or its ledger must not start."""
        p = self.pipeline
        for path, key, fix in (
            (p.report_dir, "pipeline.report_dir", "choose a writable directory"),
            (
                p.ledger_path.parent if p.ledger_path else None,
                "pipeline.ledger",
                "choose a writable path, or false",
            ),
            (self.report_path.parent if self.report_path else None, "--report", "choose a writable path"),
        ):
            problem = _unwritable(path) if path is not None else None
            if problem is not None:
                raise ConfigError(f"{path} {problem}; {fix}", location=key)

    async def _open_ledger(
        self, stack: contextlib.AsyncExitStack, shared: SharedResources
    ) -> RunLedger | None:
        spec = self.pipeline.ledger
        if isinstance(spec, LedgerStore):
            ctx = self._context("ledger", None, shared)
            ledger = await _open(stack, spec.fn(ctx, **spec.options), "the ledger")
            if not isinstance(ledger, RunLedger):
                raise ConfigError(
                    f"ledger factory {describe(spec.fn)} yielded {ledger!r}, which is not a RunLedger; "
                    "yield an object with the methods pipeline.RunLedger lists"
                )
            if self.shard is not None and self.shard.count > 1 and not isinstance(ledger, ShardedLedger):
                raise ConfigError(
                    f"ledger {describe(spec.fn)} cannot keep the shards of a run apart (it is no "
                    "pipeline.ShardedLedger); use stages.db:mysql_ledger, or run without --shard"
                )
            return ledger
        path = self.pipeline.ledger_path
        if path is None:
            return None
        return await stack.enter_async_context(
            open_sqlite_ledger(path, pipeline=self.pipeline.name, run_id=self.run_id)
        )

    async def _start_ledger(self, ledger: RunLedger, started_at: str) -> None:
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
        queues = self.queues
        for i, spec in enumerate(p.stages):
            limiter = CapacityLimiter(spec.initial_concurrency, name=f"stage {spec.name!r}")
            fn: Callable[..., Any] = spec.fn
            ctx: Context | None = None
            if is_factory(fn):
                # The stage's run exists only once its callable does: pause through the list.
                ctx = self._context(
                    spec.name,
                    limiter,
                    shared,
                    functools.partial(self._pause, i),
                    spec.max_concurrency,
                    timeout=spec.timeout,
                    batch=spec.batching,
                )
                fn = await _open(stack, spec.fn(ctx, **spec.options), f"stage {spec.name!r}")
                if not callable(fn):
                    raise ConfigError(
                        f"stage {spec.name!r}: factory {describe(spec.fn)} yielded {fn!r}, "
                        "which is not callable; yield the per-item stage function"
                    )
                kind = stage_kind(fn)
                spec.check_kind(kind)
            else:
                kind = stage_kind(fn)
                if spec.options:
                    fn = functools.partial(fn, **spec.options)
            stage = (BatchStageRun if spec.batching else StageRun)(
                spec,
                fn,
                kind,
                limiter,
                queues[i],
                queues[i + 1] if i + 1 < len(queues) else None,
                tally=self.tally,
                executor=self.executor.lane(spec.name, limiter),
                circuit_breaker=p.circuit_breaker,
                on_trip=self._trip,
                on_stuck=self._fail_run,
                started=self.started,
                estimate=ctx.estimate if ctx is not None else None,
            )
            if ctx is not None and ctx.ceiling is not None and stage.auto is not None:
                stage.auto = _clamp(stage.auto, ctx.ceiling)
                if limiter.total > (stage.auto.max or 1):
                    limiter.total = stage.auto.max or 1
            self.stages.append(stage)
        for i, stage in enumerate(self.stages):
            stage.always_target = next((s for s in self.stages[i + 1 :] if s.spec.always), None)

    def _pause(self, index: int, seconds: float) -> None:
        if index < len(self.stages):
            self.stages[index].pause(seconds)

    def _context(
        self,
        stage: str,
        limiter: CapacityLimiter | None,
        shared: SharedResources,
        pause: Callable[[float], None] | None = None,
        max_concurrency: int | None = None,
        *,
        timeout: float | None = None,
        batch: Batch | None = None,
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
            timeout=timeout,
            batch=batch,
            shard=self.shard,
        )

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
            len(self.tally.open),
            self.pipeline.grace_period,
        )
        self._stop_reading()

    def _trip(self, stage: str, error: BaseException, streak: int) -> None:
        """The circuit breaker: a stage failed ``streak`` items in a row with the same error."""
        self._fail_run(
            f"circuit breaker: stage {stage!r} failed {streak} items in a row with the same error "
            f"({type(error).__name__}: {error}); the run stopped rather than dead-letter the whole "
            "batch. Fix the cause (a database down, a full disk, a wrong URL base), then rerun: "
            "done items are not redone"
        )

    def _fail_run(self, message: str) -> None:
        """Stop reading, and end the run as failed for ``message`` (the first reason wins)."""
        if self._stop_error is None:
            self._stop_error = message
            log.error("%s", message)
            self._stop_reading()

    def _stop_reading(self) -> None:
        """Read no more items; what is in flight gets the grace period, then is cancelled."""
        if self.feeder.stopping:
            return
        self.feeder.stop()
        asyncio.get_running_loop().call_later(self.pipeline.grace_period, self._expire_grace)

    def _expire_grace(self) -> None:
        if self._flow_task is not None and not self._flow_task.done() and not self._grace_expired:
            self._grace_expired = True
            log.warning("grace period over: cancelling %d unfinished items", len(self.tally.open))
            self._flow_task.cancel()

    # -- reporting -----------------------------------------------------------------------

    def snapshot(self) -> RunSnapshot:
        """The run's figures now, for progress."""
        tally = self.tally
        return RunSnapshot(
            pipeline=self.pipeline.name,
            run_id=self.run_id,
            elapsed_s=time.perf_counter() - self.started,
            read=tally.read,
            done=tally.done,
            failed=tally.failed,
            in_flight=len(tally.open),
            stages=tuple(s.snapshot() for s in self.stages),
        )

    def _report(
        self, started_at: str, error: BaseException | None, totals: dict[str, int] | None
    ) -> RunReport:
        wall = time.perf_counter() - self.started
        tally, feeder = self.tally, self.feeder
        stages = [s.report(wall) for s in self.stages]
        limit = self.pipeline.max_failures
        # Failures of earlier attempts of this run id count too: a rerun that left them alone
        # (no --retry-failed) must not report a good night.
        failed = max(tally.failed, totals["failed"] if totals is not None else 0)
        if error is not None or self._stop_error is not None:
            status, code = "failed", 1
        elif self._stop_signal is not None:
            status, code = "interrupted", 128 + self._stop_signal
        elif failed > limit:
            status, code = "failed", 1
        else:
            status, code = "ok", 0
        message = None
        if error is not None:
            message = f"{type(error).__name__}: {error}"
        elif self._stop_error is not None:
            message = self._stop_error
        elif status == "failed" and tally.failed > limit:
            message = f"{tally.failed} items failed, more than max_failures = {limit}; see {tally.dead.path}"
        elif status == "failed":
            message = (
                f"run {self.run_id!r} has {failed} failed items in all ({tally.failed} in this attempt, "
                f"the others left from earlier ones), more than max_failures = {limit}; replay them "
                f"with `pipeline retry CONFIG --run-id {self.run_id}` or rerun with --retry-failed"
            )
        cpu = {s.name for s in self.stages if workload(s.spec.fn) == "cpu"}
        return RunReport(
            pipeline=self.pipeline.name,
            run_id=self.run_id,
            status=status,
            exit_code=code,
            wall_s=round(wall, 4),
            items=ItemCounts(tally.read, tally.ok, tally.failed, tally.skipped, len(tally.open)),
            stages=stages,
            bottleneck=find_bottleneck(stages, cpu),
            unfinished_keys=sorted(tally.open, key=repr),
            error=message,
            dead_letters=str(tally.dead.path) if tally.dead.count and tally.dead.path else None,
            started_at=started_at,
            already_done=feeder.already_done,
            not_retried=feeder.not_retried,
            abandoned_threads=self.executor.abandoned,
            run_totals=totals,
            memory=self._memory(),
            shard=None if self.shard is None else str(self.shard),
        )

    def _memory(self) -> dict[str, int]:
        """The process's peak RSS, and with a budget what the items were charged at most."""
        # ru_maxrss is in KiB on Linux (bytes on macOS, where this undercounts nothing).
        out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.budget is not None:
            out["budget_bytes"] = self.budget.total
            out["peak_charged_bytes"] = self.budget.peak
        return out

    def _new_watermark(self, report: RunReport) -> str | None:
        """The watermark to remember: only after a run in which every item read ended well.

        Advancing past a failed row would hide it from every later incremental run.
        """
        if self.feeder.watermark is None:
            return None
        failed = max(report.items.failed, (report.run_totals or {}).get("failed", 0))
        if failed or report.items.unfinished:
            log.warning(
                "watermark not advanced: %d items failed and %d are unfinished; the next run reads "
                "the same changes again (or replay them with `pipeline retry`)",
                failed,
                report.items.unfinished,
            )
            return None
        return str(self.feeder.watermark)


def _unwritable(directory: Path) -> str | None:
    """Why files cannot be made in ``directory`` (creating it if need be), or ``None``."""
    path = directory.absolute()
    while not path.exists():
        if path.is_symlink():
            return f"cannot be created: {path} is a dangling symbolic link"
        path = path.parent
    if not path.is_dir():
        return f"cannot be created: {path} is a file, not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"is not writable: {path} does not let this user ({os.geteuid()}) create files"
    return None


def _ledger_message(exc: Exception) -> str:
    # The work is done; unrecorded items are only done again by a rerun.
    return (
        f"the ledger could not record the end of the run ({type(exc).__name__}: {exc}); "
        "a rerun of this run id redoes the items it lost"
    )


def _unwrap(exc: Exception) -> Exception:
    """A TaskGroup wraps errors in a group; the operator wants the one that happened."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


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


async def _flush_periodically(ledger: RunLedger) -> None:
    """Flush the ledger every ``flush_interval`` seconds until cancelled; a failed flush keeps its
    records for the next one (a database failover must not stop the run)."""
    while True:
        await asyncio.sleep(ledger.flush_interval)
        try:
            await ledger.flush()
        except Exception as exc:
            log.warning("the ledger could not write (%s: %s); will try again", type(exc).__name__, exc)
