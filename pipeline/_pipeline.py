"""``Pipeline``: the definition (:mod:`._definition`) that runs itself (:mod:`._run`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._definition import PipelineDefinition
from ._report import RunReport
from ._run import run, run_async

__all__ = ["Pipeline"]


@dataclass(frozen=True)
class Pipeline(PipelineDefinition):
    """A source, stages in order, and the run's settings; checked when made, run by :meth:`run`.

    Attributes:
        source: Where items come from.
        stages: The stages, in order.
        name: The pipeline's name; it prefixes run ids.
        databases: Shared databases by name, each with its one cap.
        queue_size: Default bound of the queue in front of each stage.
        grace_period: Seconds in-flight items get to finish after SIGINT or SIGTERM.
        max_failures: Failed items allowed before the run's exit status is 1.
        report_dir: Where each run writes ``<run_id>/report.json`` and its dead letters;
            ``None`` writes nothing unless a ``report_path`` is given to :meth:`run`.
        progress_interval: Seconds between progress log lines when not on a terminal.
        ledger: Where each item's state is recorded, so a rerun of the same run id resumes:
            ``True`` for ``<report_dir>/ledger.sqlite``, a path, a :class:`LedgerStore`
            (for example a MySQL table shared by several workers), or ``False`` for none.
        circuit_breaker: Stop the run when one stage fails this many items in a row with the
            same error (a database down, a full disk); ``0`` turns it off.
        memory_budget: Bytes the items in flight may hold (``"512MiB"``, ``"1GiB"`` or a
            number); the source is read only while under it. ``None`` for no budget.
    """

    async def run_async(self, **kwargs: Any) -> RunReport:
        """Run the pipeline on the running event loop (see :func:`pipeline.run_async`)."""
        return await run_async(self, **kwargs)

    def run(self, **kwargs: Any) -> RunReport:
        """Run the pipeline to completion in a new event loop (see :func:`pipeline.run`)."""
        return run(self, **kwargs)
