"""Hard ceilings: an adaptive stage never goes above the pool of the database it uses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from pipeline import Auto, Context, Database, Pipeline, Stage, factory
from pipeline.testing import memory_source


async def test_auto_stage_using_a_database_is_capped_at_its_concurrency() -> None:
    """A factory that asks ctx.database() declares the database's concurrency as its ceiling:
    the auto stage starts at and never exceeds it, whatever its own max."""
    seen: list[int] = []

    @factory
    @contextlib.asynccontextmanager
    async def uses_db(ctx: Context) -> AsyncIterator[Callable[..., Any]]:
        ctx.database("catalog")

        async def stage(item: dict[str, Any]) -> dict[str, Any]:
            assert ctx.limiter is not None
            seen.append(ctx.limiter.total)
            await asyncio.sleep(0)
            return item

        yield stage

    p = Pipeline(
        memory_source({"id": i} for i in range(200)),
        [Stage(uses_db, concurrency=Auto(min=1, max=64, initial=8))],
        databases={"catalog": Database(dsn="sqlite:///unused.db", concurrency=3)},
        report_dir=None,
    )
    report = await p.run_async(progress=False)
    assert report.items.ok == 200
    assert max(seen) <= 3
    assert report.stages[0].max_in_flight <= 3
    assert all(limit <= 3 for _, limit in report.stages[0].limit_trace)


async def test_cap_at_lowers_the_ceiling_only() -> None:
    """cap_at keeps the lowest ceiling declared."""
    from pipeline._contract import SharedResources

    ctx = Context(pipeline="p", run_id="r", stage="s", limiter=None, databases={}, shared=SharedResources())
    ctx.cap_at(10)
    ctx.cap_at(4)
    ctx.cap_at(7)
    assert ctx.ceiling == 4
