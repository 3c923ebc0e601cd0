"""Helpers for testing a custom stage: an in-memory source, a collecting sink, one call to run.

Example::

    from pipeline import Stage
    from pipeline.testing import run_stages

    def double(item):
        return {**item, "n": item["n"] * 2}

    result = run_stages([{"id": 1, "n": 2}], Stage(double))
    assert result.outputs == [{"id": 1, "n": 4}]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._contract import Context, DatabaseHandle, Item, SharedResources
from ._definition import Database, Source, Stage
from ._limiter import CapacityLimiter
from ._pipeline import Pipeline
from ._report import RunReport
from ._shard import Shard

__all__ = [
    "Collector",
    "Harness",
    "StageRun",
    "memory_source",
    "open_context",
    "run_stages",
    "run_stages_async",
]


def memory_source(items: Iterable[Item], *, key: str = "id") -> Source:
    """A source that yields copies of ``items``, in order."""
    rows = [dict(item) for item in items]

    def source() -> Iterable[Item]:
        return (dict(row) for row in rows)

    return Source(source, key=key)


class Collector:
    """A last stage that keeps every item reaching it, in arrival order."""

    def __init__(self) -> None:
        self.items: list[Item] = []

    async def __call__(self, item: Item) -> Item:
        self.items.append(item)
        return item

    def stage(self) -> Stage:
        """This collector as a stage named ``collect``."""
        return Stage(self, name="collect")


@dataclass(frozen=True)
class StageRun:
    """What :func:`run_stages` saw.

    Attributes:
        outputs: Items that came out of the last stage.
        dead_letters: The dead-letter records (dicts), in the order they were written.
        report: The run report.
    """

    outputs: list[Item]
    dead_letters: list[dict[str, Any]]
    report: RunReport


async def run_stages_async(
    items: Iterable[Item],
    *stages: Stage,
    key: str = "id",
    databases: Mapping[str, Database] | None = None,
    queue_size: int = 8,
    max_failures: int = 10**9,
) -> StageRun:
    """Run ``items`` through ``stages`` on the running loop and collect what comes out."""
    collector = Collector()
    chain: Sequence[Stage] = (*stages, collector.stage())
    with tempfile.TemporaryDirectory(prefix="pipeline-test-") as tmp:
        pipeline = Pipeline(
            source=memory_source(items, key=key),
            stages=chain,
            name="test",
            databases=dict(databases or {}),
            queue_size=queue_size,
            max_failures=max_failures,
            report_dir=Path(tmp),
        )
        report = await pipeline.run_async(run_id="test", progress=False)
        path = Path(tmp) / "test" / "dead_letters.jsonl"
        dead = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return StageRun(outputs=collector.items, dead_letters=dead, report=report)


def run_stages(items: Iterable[Item], *stages: Stage, **kwargs: Any) -> StageRun:
    """Run ``items`` through ``stages`` in a new event loop (see :func:`run_stages_async`)."""
    return asyncio.run(run_stages_async(items, *stages, **kwargs))


class Harness:
    """What a run gives its factories, for unit tests of a factory stage without a run.

    It holds the configured databases (each with the one limiter every stage using it shares,
    as in a run) and the run-scoped shared resources (``ctx.shared(...)``), which it closes on
    exit; :meth:`context` makes the :class:`~pipeline.Context` a stage's factory gets::

        async with Harness(databases={"catalog": Database("sqlite:///c.db")}) as h:
            async with read_rows(h.context("source"), database="catalog", query=q) as rows:
                ...

    Args:
        databases: ``[databases]`` entries, by name (more with :meth:`add_database`).
        concurrency: The default cap of the contexts' stages.
        pipeline: The pipeline's name.
        run_id: The run's id.
    """

    def __init__(
        self,
        *,
        databases: Mapping[str, Database] | None = None,
        concurrency: int = 1,
        pipeline: str = "test",
        run_id: str = "test",
    ):
        self.pipeline = pipeline
        self.run_id = run_id
        self.concurrency = concurrency
        self.databases: dict[str, DatabaseHandle] = {
            name: db.handle(name) for name, db in (databases or {}).items()
        }
        self._shared = SharedResources()

    def add_database(
        self, dsn: str, *, name: str = "catalog", concurrency: int = 4, **options: Any
    ) -> DatabaseHandle:
        """Configure one more database, as a ``[databases.<name>]`` table would; returns its handle."""
        handle = Database(dsn, concurrency=concurrency, options=options).handle(name)
        self.databases[name] = handle
        return handle

    def context(
        self, stage: str = "stage", *, concurrency: int | None = None, shard: Shard | None = None
    ) -> Context:
        """The Context the run hands ``stage``'s factory (the source's is ``"source"``); with
        ``shard``, the context of one shard's run (``ctx.shard``)."""
        cap = concurrency or self.concurrency
        return Context(
            pipeline=self.pipeline,
            run_id=self.run_id,
            stage=stage,
            limiter=CapacityLimiter(cap, name=f"stage {stage!r}"),
            databases=self.databases,
            shared=self._shared,
            shard=shard,
        )

    async def aclose(self) -> None:
        """Close the shared resources the contexts opened (connection pools, sessions)."""
        await self._shared.stack.aclose()

    async def __aenter__(self) -> Harness:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@contextlib.asynccontextmanager
async def open_context(
    *,
    stage: str = "stage",
    concurrency: int = 1,
    databases: Mapping[str, Database] | None = None,
    pipeline: str = "test",
    run_id: str = "test",
) -> AsyncIterator[Context]:
    """One :class:`~pipeline.Context`, as a run hands a factory, for unit-testing a factory stage.

    A one-stage :class:`Harness`: what the factory shares is closed when the block ends::

        async with open_context(stage="download", concurrency=4) as ctx:
            async with download(ctx, timeout=5) as fetch:
                item = await asyncio.to_thread(fetch, {"id": 1, "url": url})

    Args:
        stage: The stage's name.
        concurrency: The stage's cap (``ctx.limiter.total``).
        databases: ``[databases]`` entries, by name.
        pipeline: The pipeline's name.
        run_id: The run's id.
    """
    async with Harness(databases=databases, concurrency=concurrency, pipeline=pipeline, run_id=run_id) as h:
        yield h.context(stage)
