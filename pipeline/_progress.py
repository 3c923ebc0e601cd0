"""Progress while a run goes on, and the summary table after it.

On a terminal: a live rich table (items done and failed, rate, each stage's in-flight count
and queue depth). Without one, as under cron: a plain log line every ``progress_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._report import RunReport

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["RunSnapshot", "StageSnapshot", "open_progress", "print_summary"]

log = logging.getLogger("pipeline")


@dataclass(frozen=True, slots=True)
class StageSnapshot:
    """One stage's figures at one moment of a run."""

    name: str
    kind: str
    in_flight: int
    cap: int
    queued: int
    ok: int
    failed: int
    retries: int
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class RunSnapshot:
    """A run's figures at one moment: what progress shows, taken by the run when asked."""

    pipeline: str
    run_id: str
    elapsed_s: float
    read: int
    done: int
    failed: int
    in_flight: int
    stages: tuple[StageSnapshot, ...]

    @property
    def rate(self) -> float:
        """Items ended per second since the start."""
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _table(snap: RunSnapshot) -> Table:
    from rich.table import Table

    table = Table(
        title=f"{snap.pipeline} [{snap.run_id}]  read {snap.read}  done {snap.done}  "
        f"failed {snap.failed}  in flight {snap.in_flight}  {snap.rate:,.1f} items/s",
        title_justify="left",
    )
    for column in ("stage", "kind", "in flight", "cap", "queued", "ok", "failed", "retries"):
        table.add_column(column, justify="left" if column in ("stage", "kind") else "right")
    for stage in snap.stages:
        table.add_row(
            stage.name,
            stage.kind,
            str(stage.in_flight),
            str(stage.cap),
            str(stage.queued),
            str(stage.ok),
            str(stage.failed),
            str(stage.retries),
        )
    return table


def _log_line(snap: RunSnapshot) -> str:
    stages = " ".join(f"{s.name}={s.in_flight}/{s.cap}+q{s.queued}" for s in snap.stages)
    return (
        f"progress: read={snap.read} done={snap.done} failed={snap.failed} in_flight={snap.in_flight} "
        f"rate={snap.rate:.1f}/s {stages}"
    )


@contextlib.asynccontextmanager
async def open_progress(
    snapshot: Callable[[], RunSnapshot], *, show: bool | None, interval: float
) -> AsyncIterator[None]:
    """Show progress for the duration of the block.

    Args:
        snapshot: Returns the run's figures now.
        show: A live table on stderr; ``None`` shows it when stderr is a terminal. Otherwise a
            log line every ``interval`` seconds.
        interval: Seconds between log lines.
    """
    if show is None:
        show = sys.stderr.isatty()
    if show:
        from rich.console import Console
        from rich.live import Live

        with Live(_table(snapshot()), console=Console(stderr=True), refresh_per_second=4) as live:
            try:
                async with running(_refresh(live, snapshot)):
                    yield
            finally:
                live.update(_table(snapshot()))
        return
    async with running(_log_periodically(snapshot, interval)):
        yield


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``coro`` as a task for the duration of the block, then cancel it and wait."""
    task = asyncio.create_task(coro)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _refresh(live: Any, snapshot: Callable[[], RunSnapshot]) -> None:
    while True:
        await asyncio.sleep(0.25)
        live.update(_table(snapshot()))


def _figures(snap: RunSnapshot) -> dict[str, Any]:
    """A progress line's figures, as fields of its log record (``--log-format json`` shows them)."""
    return {
        "read": snap.read,
        "done": snap.done,
        "failed": snap.failed,
        "in_flight": snap.in_flight,
        "rate": round(snap.rate, 2),
        "elapsed_s": round(snap.elapsed_s, 3),
        "stages": [
            {"name": s.name, "in_flight": s.in_flight, "cap": s.cap, "queued": s.queued} for s in snap.stages
        ],
    }


async def _log_periodically(snapshot: Callable[[], RunSnapshot], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        snap = snapshot()
        log.info("%s", _log_line(snap), extra={"progress": _figures(snap)})


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
    totals = report.run_totals
    if totals is not None and (report.already_done or report.not_retried):
        console.print(
            f"run {report.run_id} in all (earlier attempts included): done {totals['done']}, "
            f"failed {totals['failed']}, skipped {totals['skipped']}"
        )
