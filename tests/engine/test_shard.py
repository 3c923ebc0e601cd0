"""Shards: the partition (disjoint, complete, the same in every process), the spelling of
``--shard``, the cap split, and a sharded run of a source the engine filters."""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import pipeline
from pipeline import ConfigError, Context, Database, Pipeline, Shard, Source, Stage, encode_key
from pipeline._definition import for_shard
from pipeline._shard import cap_share

KEYS: list[Any] = [*range(-50, 2000), *(f"sku-{i}" for i in range(500)), "ключ", "", None, 1.5, [1, 2]]


def test_shards_are_disjoint_and_complete() -> None:
    """For every N up to 9, each key (ints, text, non-ASCII, odd ones) is owned by exactly one shard."""
    for count in range(1, 10):
        shards = [Shard(i, count) for i in range(count)]
        for key in KEYS:
            owners = [s.index for s in shards if s.owns(encode_key(key))]
            assert len(owners) == 1, (key, count, owners)


def test_every_shard_gets_a_fair_part() -> None:
    """crc32 spreads 10 000 integer keys over 4 shards within 5% of a quarter each."""
    sizes = [sum(Shard(i, 4).owns(encode_key(k)) for k in range(10_000)) for i in range(4)]
    assert sum(sizes) == 10_000
    assert all(2375 <= n <= 2625 for n in sizes), sizes


def test_the_partition_is_the_same_in_another_process() -> None:
    """The owner of a key does not depend on the process (crc32, never the salted hash())."""
    keys = ["a", "b", "sku-1", 42]
    here = [[Shard(i, 3).owns(encode_key(k)) for i in range(3)] for k in keys]
    code = (
        "import json, pipeline; print(json.dumps([[pipeline.Shard(i, 3).owns(pipeline.encode_key(k)) "
        f"for i in range(3)] for k in {keys!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(here).replace("True", "true").replace("False", "false")


def test_encode_key_fast_path_matches_json() -> None:
    """An int key encodes as json.dumps does (the fast path must not change the stored layout)."""
    import json

    for key in (0, -1, 42, 10**30):
        assert encode_key(key) == json.dumps(key)
    assert encode_key(True) == "true"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("0/4", {}, Shard(0, 4)),
        (" 3/4 ", {}, Shard(3, 4)),
        ("auto/4", {"JOB_COMPLETION_INDEX": "2"}, Shard(2, 4)),
        ("AUTO/4", {"SLURM_ARRAY_TASK_ID": "3"}, Shard(3, 4)),
        (
            "auto/4",
            {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"},
            Shard(3, 4),
        ),
        ("auto/4", {"JOB_COMPLETION_INDEX": "1", "SLURM_ARRAY_TASK_ID": "3"}, Shard(1, 4)),
    ],
)
def test_parse(text: str, env: dict[str, str], expected: Shard) -> None:
    """``K/N`` and ``auto/N`` (Kubernetes first, then Slurm from its array's first index) parse."""
    assert Shard.parse(text, env) == expected
    assert str(expected) == f"{expected.index}/{expected.count}"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("4/4", {}, "shard index 4 is not between 0 and 3"),
        ("1", {}, "is not of the form K/N"),
        ("x/4", {}, "'x' is not a shard number"),
        ("0/0", {}, "is not of the form K/N"),
        ("auto/4", {}, "neither is set"),
        ("auto/4", {"JOB_COMPLETION_INDEX": "7"}, "gives shard 7, not between 0 and 3"),
        ("auto/4", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "8"}, "SLURM_ARRAY_TASK_COUNT=8"),
        ("auto/4", {"JOB_COMPLETION_INDEX": "one"}, "is not a number"),
    ],
)
def test_parse_refuses(text: str, env: dict[str, str], message: str) -> None:
    """A bad ``--shard`` is a config error naming the value and the fix."""
    with pytest.raises(ConfigError, match=message) as info:
        Shard.parse(text, env)
    assert info.value.location == "--shard"


def test_cap_split_adds_up() -> None:
    """For every cap and P <= cap: shards 0..P-1 hold exactly the cap, and no P shards of a run
    of N (any P of them, as a scheduler may start them in any order) hold more."""
    for cap, parallel, count in itertools.product(range(1, 13), range(1, 7), (6, 9)):
        if parallel > cap:
            continue
        shares = [cap_share(cap, parallel, Shard(i, count), what="x") for i in range(count)]
        assert min(shares) == cap // parallel
        assert sum(shares[:parallel]) == cap
        assert max(sum(c) for c in itertools.combinations(shares, parallel)) == cap


def test_cap_below_parallel_is_refused() -> None:
    """A cap smaller than the shards running at once is refused with the key and the fix."""
    with pytest.raises(ConfigError, match=r"databases.catalog.concurrency = 3 .* at least 4.*--parallel 3"):
        cap_share(3, 4, Shard(0, 8), what="databases.catalog.concurrency")


def _rows(count: int = 100) -> Iterator[dict[str, Any]]:
    for i in range(count):
        yield {"id": i}


def _stage(item: dict[str, Any]) -> dict[str, Any]:
    return item


def test_for_shard_splits_database_concurrency_and_rate() -> None:
    """A shard's copy of the pipeline has its share of each database's cap and stage's rate;
    the stage's own concurrency is the process's and stays."""
    p = Pipeline(
        source=Source(_rows),
        stages=[Stage(_stage, concurrency=8, rate="50/s")],
        databases={"catalog": Database("sqlite:///x.db", concurrency=5)},
        ledger=False,
        report_dir=None,
    )
    first, last = (for_shard(p, Shard(i, 4), 2) for i in (0, 3))
    assert (first.databases["catalog"].concurrency, last.databases["catalog"].concurrency) == (3, 2)
    assert first.stages[0].rate == "25/1s"
    assert first.stages[0].concurrency == 8
    assert for_shard(p, Shard(0, 4), 1) is p
    with pytest.raises(ConfigError, match=r"databases\.catalog\.concurrency = 5"):
        for_shard(p, Shard(0, 8), 6)


def test_run_of_every_shard_takes_every_item_once() -> None:
    """A source that does not filter itself: the engine keeps each shard's items, and the four
    shards' runs together take each item exactly once."""
    seen: list[int] = []

    def record(item: dict[str, Any]) -> dict[str, Any]:
        seen.append(item["id"])
        return item

    p = Pipeline(source=Source(_rows), stages=[Stage(record)], ledger=False, report_dir=None)
    reads = [
        pipeline.run(p, shard=Shard(i, 4), parallel=2, handle_signals=False).items.read for i in range(4)
    ]
    assert sorted(seen) == list(range(100))
    assert sum(reads) == 100
    assert all(reads)


def test_run_without_shard_is_unchanged() -> None:
    """``shard=None`` reads everything; ``parallel`` without a shard is refused."""
    p = Pipeline(source=Source(_rows), stages=[Stage(_stage)], ledger=False, report_dir=None)
    report = pipeline.run(p, handle_signals=False)
    assert report.items.read == 100
    assert report.shard is None
    with pytest.raises(ConfigError, match="give --shard K/N too"):
        pipeline.run(p, parallel=2, handle_signals=False)


def test_a_source_that_shards_itself_is_not_filtered_again() -> None:
    """A source marked ``shards_itself`` gets ``ctx.shard`` and the engine takes what it yields."""
    given: list[Shard | None] = []

    @pipeline.shards_itself
    @pipeline.factory
    @contextlib.asynccontextmanager
    async def mine(ctx: Context) -> AsyncIterator[Any]:
        given.append(ctx.shard)
        yield [{"id": i} for i in range(10)]  # all of them: the engine must not drop any

    p = Pipeline(source=Source(mine), stages=[Stage(_stage)], ledger=False, report_dir=None)
    report = pipeline.run(p, shard=Shard(1, 4), handle_signals=False)
    assert given == [Shard(1, 4)]
    assert report.items.read == 10
    assert report.shard == "1/4"


def test_shards_itself_needs_a_factory() -> None:
    """Marking a plain source is refused: it has no context to learn its shard from."""
    with pytest.raises(ConfigError, match=r"is not a @pipeline\.factory"):
        pipeline.shards_itself(_rows)


def test_a_shard_runs_with_its_share_of_the_database() -> None:
    """A database of concurrency 5, shards 2 at a time: inside shard 0 (below 5 % 2) a stage's
    handle has 3 slots, inside shard 1 it has 2, and the stage's ceiling follows."""
    seen: dict[int, tuple[int, int]] = {}

    def opener(index: int) -> Any:
        @pipeline.factory
        @contextlib.asynccontextmanager
        async def uses_db(ctx: Context) -> AsyncIterator[Any]:
            handle = ctx.database("catalog")
            seen[index] = (handle.limiter.total, ctx.ceiling or 0)
            yield _stage

        return uses_db

    for index in (0, 1):
        p = Pipeline(
            source=Source(_rows, options={"count": 3}),
            stages=[Stage(opener(index), concurrency=8)],
            databases={"catalog": Database("sqlite:///unused.db", concurrency=5)},
            ledger=False,
            report_dir=None,
        )
        pipeline.run(p, shard=Shard(index, 4), parallel=2, handle_signals=False)
    assert seen == {0: (3, 3), 1: (2, 2)}
