"""Progress while a run goes on, and the summary table after it.

On a terminal: a live rich table (items done and failed, rate, each stage's in-flight count
and queue depth). Without one, as under cron: a plain log line every ``progress_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ._report import RunReport
    from ._runner import Runner

__all__ = ["open_progress", "print_summary"]

log = logging.getLogger("pipeline")


def _snapshot(runner: Runner) -> tuple[float, int, int, int, int]:
    elapsed = time.perf_counter() - runner.started
    done = runner.ok + runner.failed + runner.skipped
    return elapsed, runner.read, done, runner.failed, runner.open_items


def _table(runner: Runner) -> Table:
    from rich.table import Table

    elapsed, read, done, failed, open_ = _snapshot(runner)
    rate = done / elapsed if elapsed > 0 else 0.0
    table = Table(
        title=f"{runner.pipeline.name} [{runner.run_id}]  read {read}  done {done}  "
        f"failed {failed}  in flight {open_}  {rate:,.1f} items/s",
        title_justify="left",
    )
    for column in ("stage", "kind", "in flight", "cap", "queued", "ok", "failed", "retries"):
        table.add_column(column, justify="left" if column in ("stage", "kind") else "right")
    for stage in runner.stages:
        stats = stage.stats
        table.add_row(
            stage.name,
            stage.kind,
            str(stage.limiter.borrowed),
            str(stage.limiter.total),
            str(stage.inq.qsize()),
            str(stats.ok),
            str(stats.failed),
            str(stats.retries),
        )
    return table


def _log_line(runner: Runner) -> str:
    elapsed, read, done, failed, open_ = _snapshot(runner)
    rate = done / elapsed if elapsed > 0 else 0.0
    stages = " ".join(
        f"{s.name}={s.limiter.borrowed}/{s.limiter.total}+q{s.inq.qsize()}" for s in runner.stages
    )
    return f"progress: read={read} done={done} failed={failed} in_flight={open_} rate={rate:.1f}/s {stages}"


@contextlib.asynccontextmanager
async def open_progress(runner: Runner) -> AsyncIterator[None]:
    """Show progress for the duration of the block."""
    show = runner.progress
    if show is None:
        show = sys.stderr.isatty()
    if show:
        from rich.console import Console
        from rich.live import Live

        with Live(_table(runner), console=Console(stderr=True), refresh_per_second=4) as live:
            try:
                async with _running(_refresh(live, runner)):
                    yield
            finally:
                live.update(_table(runner))
        return
    async with _running(_log_periodically(runner)):
        yield


@contextlib.asynccontextmanager
async def _running(coro: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``coro`` as a task for the duration of the block, then cancel it and wait."""
    task = asyncio.create_task(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _refresh(live: Any, runner: Runner) -> None:
    while True:
        await asyncio.sleep(0.25)
        live.update(_table(runner))


async def _log_periodically(runner: Runner) -> None:
    while True:
        await asyncio.sleep(runner.pipeline.progress_interval)
        log.info("%s", _log_line(runner))


def print_summary(report: RunReport, console: Console | None = None) -> None:
    """Print the per-stage summary table, naming the bottleneck stage."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        # Under cron there is no terminal to measure: use a width that fits the table.
        console = Console() if sys.stdout.isatty() else Console(width=150)
    items = report.items
    table = Table(
        title=(
            f"{report.pipeline} [{report.run_id}] {report.status} in {report.wall_s:.2f}s: "
            f"read {items.read}, ok {items.ok}, failed {items.failed}, skipped {items.skipped}, "
            f"unfinished {items.unfinished}"
        ),
        title_justify="left",
    )
    for column in (
        "stage",
        "kind",
        "cap",
        "ok",
        "failed",
        "skipped",
        "retries",
        "max in flight",
        "p50 ms",
        "p99 ms",
        "busy",
        "blocked s",
    ):
        table.add_column(column, justify="left" if column in ("stage", "kind") else "right")
    bottleneck = (report.bottleneck or {}).get("stage")
    for s in report.stages:
        p50, p99 = s.latency_s.get("p50"), s.latency_s.get("p99")
        table.add_row(
            f"{s.name} *" if s.name == bottleneck else s.name,
            s.kind,
            str(s.concurrency),
            str(s.ok),
            str(s.failed),
            str(s.skipped),
            str(s.retries),
            str(s.max_in_flight),
            "-" if p50 is None else f"{p50 * 1000:.1f}",
            "-" if p99 is None else f"{p99 * 1000:.1f}",
            f"{s.busy_ratio:.0%}",
            f"{s.blocked_s:.2f}",
        )
    console.print(table)
    if report.bottleneck:
        console.print(f"* bottleneck: {report.bottleneck['stage']}: {report.bottleneck['reason']}")
    if report.error:
        console.print(f"[bold red]error:[/] {report.error}")
    if report.ledger_error:
        console.print(f"[bold red]ledger:[/] {report.ledger_error}")
    if report.unfinished_keys:
        keys = ", ".join(map(repr, report.unfinished_keys[:20]))
        more = len(report.unfinished_keys) - 20
        console.print(f"unfinished: {keys}{f' and {more} more' if more > 0 else ''}")
    if report.dead_letters:
        console.print(f"dead letters: {report.dead_letters}")
