"""A ledger that fails at the end of a run: the run's outcome stands, and the report says so."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from pipeline import Context, LedgerStore, Pipeline, Stage, factory
from pipeline._ledger import SqliteLedger
from pipeline.testing import memory_source


class _FullDiskLedger(SqliteLedger):
    """The default ledger, on a disk that fills up just as the run ends."""

    async def finish_run(self, status: str, watermark: str | None) -> None:
        raise OSError(28, "No space left on device")


def _ledger_in(directory: Path) -> LedgerStore:
    @factory
    @contextlib.asynccontextmanager
    async def full_disk_ledger(ctx: Context) -> AsyncIterator[SqliteLedger]:
        ledger = _FullDiskLedger(directory / "ledger.sqlite", pipeline=ctx.pipeline, run_id=ctx.run_id)
        try:
            yield ledger
        finally:
            ledger.close()

    return LedgerStore(full_disk_ledger)


async def _ok(item: dict[str, object]) -> dict[str, object]:
    return item


async def test_a_failed_last_ledger_write_is_in_the_report_not_only_the_log(tmp_path: Path) -> None:
    """The items still end ok and the status stays ok, and report.ledger_error says what failed."""
    p = Pipeline(
        memory_source({"id": i} for i in range(5)),
        [Stage(_ok)],
        report_dir=tmp_path,
        ledger=_ledger_in(tmp_path),
    )
    report = await p.run_async(run_id="r1", progress=False)
    assert report.status == "ok"
    assert report.items.ok == 5
    assert report.ledger_error is not None
    assert "No space left on device" in report.ledger_error
