"""The memory budget: admission held while the items in flight hold too many bytes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pipeline import ConfigError, Context, Pipeline, RunReport, Stage, factory, weighs
from pipeline._budget import parse_size, weigh
from pipeline.testing import memory_source

MB = 10**6


class Peak:
    """A count that goes up and down, and the highest it reached."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def up(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)


class Alive(Peak):
    """Counts items that hold a body: from the stage that makes it to the stage that drops it."""

    async def grow(self, item: dict[str, Any]) -> dict[str, Any]:
        self.up()
        await asyncio.sleep(0)
        return {**item, "body": bytes(10 * MB)}

    async def drop(self, item: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        self.now -= 1
        return {"id": item["id"]}


class InFlight(Peak):
    """A stage body that counts its attempts in flight."""

    async def attempt(self, item: dict[str, Any]) -> dict[str, Any]:
        self.up()
        await asyncio.sleep(0)
        self.now -= 1
        return item


async def ten_items_in_25mb(stage: Stage) -> RunReport:
    """Run ten weightless items through ``stage`` under a 25 MB budget."""
    p = Pipeline(
        source=memory_source([{"id": i} for i in range(10)]),
        stages=[stage],
        report_dir=None,
        ledger=False,
        memory_budget="25MB",
    )
    return await p.run_async(progress=False)


def pipeline(alive: Alive, budget: str | None, count: int = 12) -> Pipeline:
    return Pipeline(
        source=memory_source([{"id": i} for i in range(count)]),
        stages=[Stage(alive.grow, concurrency=4), Stage(alive.drop, concurrency=4)],
        report_dir=None,
        ledger=False,
        memory_budget=budget,
    )


async def test_the_source_is_held_while_items_in_flight_fill_the_budget() -> None:
    """Items that grow to 10 MB under a 25 MB budget: never more than two hold a body at once
    (without the budget, the queues let many more in), and every item still ends ok."""
    unbounded = Alive()
    await pipeline(unbounded, None).run_async(progress=False)
    assert unbounded.peak > 2

    alive = Alive()
    report = await pipeline(alive, "25MB").run_async(progress=False)
    assert report.items.ok == 12
    assert alive.peak <= 2
    assert report.memory["budget_bytes"] == 25 * MB
    assert 10 * MB <= report.memory["peak_charged_bytes"] <= 25 * MB
    assert report.memory["peak_rss_bytes"] > 0


async def test_an_item_heavier_than_the_whole_budget_runs_alone() -> None:
    """A budget smaller than one item does not stop the run: each item runs, one at a time."""
    alive = Alive()
    report = await pipeline(alive, "5MB", count=4).run_async(progress=False)
    assert report.items.ok == 4
    assert alive.peak == 1


async def test_what_a_stage_declares_it_allocates_counts_while_it_runs() -> None:
    """A stage marked @weighs holds its estimate during the attempt: an item that weighs
    nothing but whose attempt declares 10 MB is charged for it, and admission waits on it."""
    attempts = InFlight()

    @weighs(lambda item: 10 * MB)
    async def decode(item: dict[str, Any]) -> dict[str, Any]:
        return await attempts.attempt(item)

    report = await ten_items_in_25mb(Stage(decode, concurrency=4))
    assert report.items.ok == 10
    assert attempts.peak <= 2
    assert report.memory["peak_charged_bytes"] <= 25 * MB


def test_sizes_parse_in_decimal_and_binary_units() -> None:
    """A budget is written with a unit, decimal or binary, or as a number of bytes."""
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5 GB") == 1_500_000_000
    assert parse_size(4096) == 4096


@pytest.mark.parametrize("bad", ["lots", "12 parsecs", "0MB", True, -1])
def test_a_bad_budget_is_a_config_error(bad: Any) -> None:
    """A budget that is not a positive size is refused when the pipeline is made."""
    with pytest.raises(ConfigError, match="memory_budget"):
        pipeline(Alive(), bad)


def test_weight_is_the_bytes_an_item_holds() -> None:
    """Bytes-like values count, one level into lists and dicts; other values do not."""
    item = {"id": 1, "body": b"x" * 10, "thumbs": [b"a" * 3, "text"], "meta": {"raw": bytearray(5)}}
    assert weigh(item) == 18


async def test_a_factory_declares_what_its_attempts_allocate() -> None:
    """A factory that calls ctx.weighs(...) is charged that much per attempt, as @weighs does."""
    attempts = InFlight()

    @factory
    @contextlib.asynccontextmanager
    async def fetch(ctx: Context, *, max_bytes: int) -> AsyncIterator[Callable[..., Any]]:
        ctx.weighs(lambda item: max_bytes)
        yield attempts.attempt

    report = await ten_items_in_25mb(Stage(fetch, concurrency=4, options={"max_bytes": 10 * MB}))
    assert report.items.ok == 10
    assert attempts.peak <= 2
