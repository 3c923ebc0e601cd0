"""``pipeline status``: a run's state across its shards, read from the ledger, as a table or JSON.

An operator watching a night of N pods asks the one place every shard writes to: the ledger.
For each shard its state (pending, running, done, failed), its done/failed/skipped counts and
the last time the ledger heard of it; then the run's totals. ``--json`` prints
:meth:`pipeline.RunStatus.to_dict`.
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from ._contract import Context, SharedResources, describe
from ._definition import LedgerStore, PipelineDefinition
from ._exceptions import ConfigError
from ._ledger import ShardedLedger, SqliteLedger
from ._runstate import RunStatus

__all__ = ["read_status", "render_status"]


async def read_status(pipeline: PipelineDefinition, run_id: str) -> RunStatus | None:
    """The run's status from the pipeline's ledger; ``None`` if the ledger never saw the run id.

    Raises:
        ConfigError: The pipeline keeps no ledger, or its ledger cannot report a status.
    """
    spec = pipeline.ledger
    if isinstance(spec, LedgerStore):
        shared = SharedResources()
        databases = {name: db.handle(name) for name, db in pipeline.databases.items()}
        ctx = Context(
            pipeline=pipeline.name,
            run_id=run_id,
            stage="ledger",
            limiter=None,
            databases=databases,
            shared=shared,
        )
        async with shared.stack, contextlib.AsyncExitStack() as stack:
            ledger: Any = await stack.enter_async_context(spec.fn(ctx, **spec.options))
            if not isinstance(ledger, ShardedLedger):
                raise ConfigError(
                    f"ledger {describe(spec.fn)} cannot tell a run's status (it is no "
                    "pipeline.ShardedLedger); its runs can be followed in their reports only",
                    location="pipeline.ledger",
                )
            return await ledger.run_status()
    path = pipeline.ledger_path
    if path is None:
        raise ConfigError(
            "the pipeline keeps no ledger (ledger = false), so no run has a status; set a ledger",
            location="pipeline.ledger",
        )
    if not path.exists():
        return None
    file = SqliteLedger(path, pipeline=pipeline.name, run_id=run_id)
    try:
        return await file.run_status()
    finally:
        file.close()


def render_status(status: RunStatus, *, as_json: bool) -> str:
    """The status as ``pipeline status`` prints it: JSON, or a table and the run's totals."""
    if as_json:
        return json.dumps(status.to_dict(), indent=2)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {status.run_id}: {status.state}", title_justify="left")
    for column in ("shard", "state", "done", "failed", "skipped", "last update"):
        table.add_column(column, justify="right" if column in ("done", "failed", "skipped") else "left")
    for s in status.shards:
        table.add_row(s.shard, s.state, str(s.done), str(s.failed), str(s.skipped), s.updated_at or "-")
    items = status.items
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(table)
    console.print(
        f"{len(status.shards)} shards, {sum(s.state == 'done' for s in status.shards)} done; items: "
        f"{items['done']} done, {items['failed']} failed, {items['skipped']} skipped"
    )
    return console.export_text().rstrip("\n")
