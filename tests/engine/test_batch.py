"""Batched stages: gathering, flushing, one result per item, isolation, and every item ended once.

Flushes are shown without timing: a partial batch that can only have been flushed by
``max_wait`` (the source waits for the stage's own event before it goes on), or only by the end
of input (``max_wait`` an hour, which pytest-timeout would catch).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline import Batch, ConfigError, Pipeline, Retry, Skip, Source, Stage, TransientError
from pipeline._run import Run
from pipeline.testing import run_stages_async
from tests.engine.cli import cli_env

Item = dict[str, Any]
HOUR = 3600.0


def items(n: int) -> list[Item]:
    return [{"id": i} for i in range(n)]


class Recorder:
    """A batched stage, async or thread, that records each call's ids; ``fail`` decides per item:
    return an exception instance for it, raise for the whole batch (``raise_if``), or pass."""

    def __init__(
        self,
        *,
        raise_if: Callable[[Item], bool] = lambda item: False,
        instead: Callable[[Item], Any] = lambda item: None,
    ):
        self.calls: list[list[int]] = []
        self._raise_if = raise_if
        self._instead = instead
        self._lock = threading.Lock()

    def _run(self, batch: list[Item]) -> list[Any]:
        with self._lock:
            self.calls.append([item["id"] for item in batch])
        for item in batch:
            if self._raise_if(item):
                raise ValueError(f"item {item['id']} is bad")
        return [self._instead(item) or {**item, "seen": True} for item in batch]

    def stage(self, kind: str, **kwargs: Any) -> Stage:
        if kind == "async":

            @pipeline.batched(size=4, max_wait=0.01)
            async def batch_async(batch: list[Item]) -> list[Any]:
                return self._run(batch)

            return Stage(batch_async, name="b", **kwargs)

        @pipeline.batched(size=4, max_wait=0.01)
        def batch_thread(batch: list[Item]) -> list[Any]:
            return self._run(batch)

        return Stage(batch_thread, name="b", **kwargs)


KINDS = pytest.mark.parametrize("kind", ["async", "thread"])


@KINDS
async def test_a_batched_stage_gets_lists_of_at_most_size_and_every_item_once(kind: str) -> None:
    """Every item is handed over exactly once, in calls of at most ``size``; each ends ok once."""
    rec = Recorder()
    result = await run_stages_async(items(23), rec.stage(kind, concurrency=2))
    assert all(1 <= len(call) <= 4 for call in rec.calls)
    assert sorted(i for call in rec.calls for i in call) == list(range(23))
    assert sorted(item["id"] for item in result.outputs) == list(range(23))
    assert all(item["seen"] for item in result.outputs)
    assert result.report.items.ok == 23
    stage = result.report.stages[0]
    assert stage.kind == kind
    assert stage.ok == 23
    assert stage.batch is not None
    assert stage.batch["calls"] == len(rec.calls)
    assert stage.batch["isolated"] == 0


async def test_a_partial_batch_is_flushed_after_max_wait() -> None:
    """Two items and then nothing: the stage gets them together, before the source goes on."""
    called = asyncio.Event()
    calls: list[list[int]] = []

    async def rows() -> AsyncIterator[Item]:
        yield {"id": 0}
        yield {"id": 1}
        await called.wait()  # only max_wait can flush the first two now
        yield {"id": 2}

    @pipeline.batched(size=100, max_wait=0.01)
    async def gather(batch: list[Item]) -> list[Item]:
        calls.append([item["id"] for item in batch])
        called.set()
        return batch

    report = await Pipeline(
        Source(rows), [Stage(gather)], report_dir=None, ledger=False, queue_size=8
    ).run_async(progress=False)
    assert calls == [[0, 1], [2]]
    assert report.items.ok == 3


async def test_the_end_of_input_flushes_a_partial_batch_at_once() -> None:
    """With max_wait an hour, the last items still go as soon as the input ends."""
    calls: list[int] = []

    @pipeline.batched(size=100, max_wait=HOUR)
    async def gather(batch: list[Item]) -> list[Item]:
        calls.append(len(batch))
        return batch

    result = await run_stages_async(items(5), Stage(gather), queue_size=100)
    assert calls == [5]
    assert result.report.items.ok == 5


@KINDS
async def test_a_batch_that_raises_runs_its_items_alone_so_only_the_culprit_fails(kind: str) -> None:
    """With retry attempts = 1, a bad item fails alone with its own reason; the rest of its batch
    succeeds; the isolation is not a retry (attempts 1, retries 0)."""
    rec = Recorder(raise_if=lambda item: item["id"] == 5)
    result = await run_stages_async(items(12), rec.stage(kind, retry=Retry(attempts=1)), queue_size=16)
    counts = result.report.items
    assert (counts.ok, counts.failed, counts.skipped, counts.unfinished) == (11, 1, 0, 0)
    assert [(d["key"], d["error_type"], d["message"], d["attempts"]) for d in result.dead_letters] == [
        (5, "ValueError", "item 5 is bad", 1)
    ]
    culprit_batch = next(call for call in rec.calls if 5 in call and len(call) > 1)
    alone = [call for call in rec.calls if len(call) == 1]
    assert sorted(c[0] for c in alone) == sorted(culprit_batch)  # each of its items once, alone
    stage = result.report.stages[0]
    assert (stage.ok, stage.failed, stage.retries) == (11, 1, 0)
    assert stage.batch is not None
    assert stage.batch["isolated"] == len(culprit_batch)


async def test_an_exception_in_place_of_an_item_ends_only_that_item() -> None:
    """Skip in an item's place skips it with its reason; an error instance fails it, unretried if
    it is not retryable; the others of the batch go on, with no call of an item alone."""

    def instead(item: Item) -> Any:
        if item["id"] == 1:
            return Skip("one is not wanted")
        if item["id"] == 2:
            return KeyError("two has no size")
        return None

    rec = Recorder(instead=instead)
    result = await run_stages_async(items(4), rec.stage("async"), queue_size=8)
    counts = result.report.items
    assert (counts.ok, counts.failed, counts.skipped) == (2, 1, 1)
    assert [(d["key"], d["error_type"]) for d in result.dead_letters] == [(2, "KeyError")]
    assert sorted(item["id"] for item in result.outputs) == [0, 3]
    assert sorted(i for call in rec.calls for i in call) == [0, 1, 2, 3]  # none run again
    assert result.report.stages[0].batch is not None
    assert result.report.stages[0].batch["isolated"] == 0


async def test_a_retryable_error_in_place_of_an_item_retries_that_item_alone() -> None:
    """A TransientError for one item: that item alone is tried again, and then succeeds."""
    failed_once: set[int] = set()

    def instead(item: Item) -> Any:
        if item["id"] == 2 and 2 not in failed_once:
            failed_once.add(2)
            return TransientError("try two again")
        return None

    rec = Recorder(instead=instead)
    stage = rec.stage("async", retry=Retry(attempts=3, backoff=0, jitter=0))
    result = await run_stages_async(items(4), stage, queue_size=8)
    assert result.report.items.ok == 4
    with_two = [call for call in rec.calls if 2 in call]
    assert len(with_two) == 2
    assert with_two[1] == [2]  # the retry: item 2 alone
    assert result.report.stages[0].retries == 1


async def test_skipped_and_failed_items_of_a_batch_reach_an_always_stage() -> None:
    """An always stage after a batched one gets its skipped and failed items, with the reasons."""
    seen: dict[int, tuple[str | None, str | None]] = {}

    def instead(item: Item) -> Any:
        return {1: Skip("not wanted"), 2: ValueError("bad")}.get(item["id"])

    async def record(item: Item) -> Item:
        seen[item["id"]] = (item.get("status"), item.get("error"))
        return item

    rec = Recorder(instead=instead)
    result = await run_stages_async(
        items(3), rec.stage("async", retry=Retry(attempts=1)), Stage(record, always=True)
    )
    assert seen == {0: (None, None), 1: ("skipped", "not wanted"), 2: ("failed", "ValueError: bad")}
    assert (result.report.items.ok, result.report.items.failed, result.report.items.skipped) == (1, 1, 1)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda batch: batch[:-1], "results for a batch of"),
        (lambda batch: {"not": "a list"}, "is batched but returned dict"),
    ],
    ids=["too-few", "not-a-list"],
)
async def test_breaking_the_batch_contract_fails_every_item_of_the_batch(
    returned: Callable[[list[Item]], Any], message: str
) -> None:
    """A wrong-length or non-list return is a StageMisuse for each item of that batch, and its
    items are not run again (the call may have had side effects)."""
    calls: list[int] = []

    @pipeline.batched(size=3, max_wait=HOUR)
    async def broken(batch: list[Item]) -> Any:
        calls.append(len(batch))
        return returned(batch)

    result = await run_stages_async(items(3), Stage(broken, retry=Retry(attempts=1)), queue_size=8)
    assert calls == [3]
    assert result.report.items.failed == 3
    assert {d["error_type"] for d in result.dead_letters} == {"pipeline.StageMisuse"}
    assert all(message in d["message"] for d in result.dead_letters)


async def test_the_cap_counts_batches_in_flight() -> None:
    """concurrency = 2: two calls run at once (each waits for the other), never a third."""
    inside = 0
    most = 0
    both = asyncio.Event()

    @pipeline.batched(size=2, max_wait=0)
    async def overlap(batch: list[Item]) -> list[Item]:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        if inside == 2:
            both.set()
        await both.wait()  # with a cap of one batch, this never returns
        inside -= 1
        return batch

    result = await run_stages_async(items(20), Stage(overlap, concurrency=2), queue_size=20)
    assert result.report.items.ok == 20
    assert most == 2
    assert result.report.stages[0].max_in_flight == 2


async def test_a_weighed_batched_stage_charges_every_item_of_the_call() -> None:
    """Under a memory budget, what @weighs declares is held for every item of a batch at once."""
    sizes: list[int] = []

    @pipeline.batched(size=8, max_wait=0.01)
    @pipeline.weighs(lambda item: 1_000_000)
    async def heavy(batch: list[Item]) -> list[Item]:
        sizes.append(len(batch))
        return batch

    report = await Pipeline(
        Source(lambda: iter(items(40))),
        [Stage(heavy)],
        report_dir=None,
        ledger=False,
        memory_budget="1GiB",
    ).run_async(progress=False)
    assert report.items.ok == 40
    assert report.memory["peak_charged_bytes"] >= 1_000_000 * max(sizes)


async def test_a_rerun_takes_only_the_failed_item_of_a_batch(tmp_path: Path) -> None:
    """Resume: a rerun of the run id with retry_failed hands the batched stage only what failed."""
    broken = {"on": True}
    rec = Recorder(raise_if=lambda item: broken["on"] and item["id"] == 3)

    def define() -> Pipeline:
        return Pipeline(
            Source(lambda: iter(items(6))),
            [rec.stage("async", retry=Retry(attempts=1))],
            name="resume",
            report_dir=tmp_path,
            max_failures=10,
        )

    first = await define().run_async(run_id="night", progress=False)
    assert (first.items.ok, first.items.failed) == (5, 1)
    broken["on"] = False
    rec.calls.clear()
    second = await define().run_async(run_id="night", progress=False, retry_failed=True)
    assert rec.calls == [[3]]
    assert (second.items.read, second.items.ok, second.already_done) == (1, 1, 5)


async def test_a_stop_flushes_the_partial_batch_and_loses_nothing() -> None:
    """SIGTERM's path (request_stop): reading stops, the partial batch is flushed at once (not
    after its hour of max_wait), every item read ends ok, none unfinished."""
    all_read = asyncio.Event()
    calls: list[list[int]] = []

    async def rows() -> AsyncIterator[Item]:
        for i in range(5):
            yield {"id": i}
        all_read.set()
        await asyncio.Event().wait()  # the source never ends by itself
        yield {"id": 99}  # pragma: no cover

    @pipeline.batched(size=100, max_wait=HOUR)
    async def gather(batch: list[Item]) -> list[Item]:
        calls.append([item["id"] for item in batch])
        return batch

    runner = Run(
        Pipeline(Source(rows), [Stage(gather)], report_dir=None, ledger=False, grace_period=HOUR),
        progress=False,
    )
    task = asyncio.create_task(runner.run())
    await all_read.wait()
    runner.request_stop(signal.SIGTERM)
    report = await task
    assert report.status == "interrupted"
    assert calls == [[0, 1, 2, 3, 4]]
    assert (report.items.read, report.items.ok, report.items.unfinished) == (5, 5, 0)


async def test_a_batched_stage_with_an_adaptive_cap_runs_every_item() -> None:
    """concurrency = "auto" on a batched stage: its controller samples calls; every item ends ok."""
    rec = Recorder()
    result = await run_stages_async(items(50), rec.stage("async", concurrency=pipeline.Auto()))
    assert result.report.items.ok == 50


# -- definition ----------------------------------------------------------------------------


async def _one(item: Item) -> Item:
    return item


def test_batch_on_a_callable_that_takes_one_item_is_refused() -> None:
    """Only a callable marked @pipeline.batched takes lists: the message names the fix."""
    with pytest.raises(ConfigError, match=r"takes one item; mark it @pipeline.batched"):
        Stage(_one, batch=Batch(size=10))


def test_batch_false_on_a_plain_batched_callable_is_refused() -> None:
    """A plain @batched callable takes lists, so batch = false cannot hand it one item."""

    @pipeline.batched()
    async def takes_lists(batch: list[Item]) -> list[Item]:
        return batch

    with pytest.raises(ConfigError, match=r"batch = \{ size = 1 \}"):
        Stage(takes_lists, batch=False)


def test_a_batched_generator_is_refused() -> None:
    """A generator cannot return one result per item."""

    @pipeline.batched()
    async def fan(batch: list[Item]) -> AsyncIterator[Item]:
        for item in batch:
            yield item

    with pytest.raises(ConfigError, match="generator, which cannot be batched"):
        Stage(fan)


@pytest.mark.parametrize(
    ("size", "max_wait", "key"), [(0, 0.5, "batch.size"), (10, -1, "batch.max_wait"), (True, 1, "batch.size")]
)
def test_batch_bounds_are_checked(size: Any, max_wait: Any, key: str) -> None:
    """Batch(size >= 1, max_wait >= 0), with the key in the error."""
    with pytest.raises(ConfigError) as info:
        Batch(size=size, max_wait=max_wait)
    assert info.value.location == key


def test_batch_survives_a_rename_of_the_stage() -> None:
    """The definition settles batch (False stays False) so renaming a duplicate keeps it."""

    @pipeline.batched(size=7)
    @pipeline.factory
    def opener(ctx: pipeline.Context) -> Any:
        raise AssertionError("not opened")

    p = Pipeline(
        Source(lambda: iter(())),
        [Stage(opener, batch=False), Stage(opener)],
        report_dir=None,
    )
    assert [s.name for s in p.stages] == ["opener", "opener-2"]
    assert [s.batching for s in p.stages] == [None, Batch(size=7)]


# -- config.toml ---------------------------------------------------------------------------

RECORD = """
[databases.catalog]
dsn = "sqlite:///never-opened.db"

[source]
use = "{mod}:rows"

[[stages]]
use = "%s"
database = "catalog"
%s
"""


def _load(write_config: Callable[[str], Path], use: str, line: str) -> Pipeline:
    return pipeline.load_config(write_config(RECORD % (use, line)))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", Batch(size=200, max_wait=0.5)),
        ("batch = { size = 500 }", Batch(size=500, max_wait=0.5)),
        ("batch = { max_wait = 2 }", Batch(size=200, max_wait=2.0)),
        ("batch = false", None),
    ],
    ids=["default", "size-only", "max-wait-only", "off"],
)
def test_a_batch_table_overrides_the_stages_own_defaults_key_by_key(
    write_config: Callable[[str], Path], line: str, expected: Batch | None
) -> None:
    """write_results batches by default; the config's batch keys replace only what they name."""
    p = _load(write_config, "stages.db:write_results", line)
    assert p.stages[0].batching == expected


@pytest.mark.parametrize(
    ("use", "line", "location", "message"),
    [
        ("stages.db:write_results", "batch = { size = 0 }", "stages[0].batch", "batch.size must be >= 1"),
        ("stages.db:write_results", "batch = { max_wait = -1 }", "stages[0].batch", "max_wait must be >= 0"),
        ("stages.db:write_results", "batch = { sise = 10 }", "stages[0].batch", "unknown key 'sise'"),
        ("stages.db:write_results", "batch = true", "stages[0].batch", "must be a table such as"),
        ("{mod}:touch", "batch = { size = 10 }", "stages[0].batch", "takes one item; mark it @pipeline"),
    ],
    ids=["size-0", "negative-wait", "misspelt", "true", "unbatched-callable"],
)
def test_a_bad_batch_names_the_file_the_key_and_the_fix(
    write_config: Callable[[str], Path], use: str, line: str, location: str, message: str
) -> None:
    """Every mistake in batch is one ConfigError with the file and stages[i].batch, before any run."""
    with pytest.raises(ConfigError) as info:
        _load(write_config, use, line)
    assert info.value.file is not None
    assert info.value.file.endswith("config.toml")
    assert (info.value.location or "").startswith(location)
    assert message in info.value.message


def test_pipeline_stages_shows_a_batched_stage_as_such() -> None:
    """`pipeline stages` reads a plain @batched callable as a stage (not a helper) and says batched."""
    from pipeline._listing import describe_callable

    @pipeline.batched(size=10)
    async def score(batch: list[Item], *, scale: float = 1.0) -> list[Item]:
        """Score a batch."""
        return batch

    info = describe_callable("m:score", score)
    assert info.kind == "async (batched)"
    assert info.options == ("scale: float = 1.0",)


def test_the_run_page_settings_show_a_stages_batch() -> None:
    """report.html's settings say how each stage is batched (None when it is not)."""
    from pipeline._html import describe_settings

    @pipeline.batched(size=50, max_wait=0.25)
    async def lists(batch: list[Item]) -> list[Item]:
        return batch

    p = Pipeline(Source(lambda: iter(())), [Stage(lists), Stage(_one)], report_dir=None)
    assert [s["batch"] for s in describe_settings(p)["stages"]] == ["size 50, max_wait 0.25s", None]


SIGNAL_STAGES = """
import asyncio
import pathlib

import pipeline

HERE = pathlib.Path(__file__).parent


async def rows():
    for i in range(5):
        yield {"id": i}
    (HERE / "ready").write_text("ready")  # a FIFO: blocks until the test reads it
    await asyncio.Event().wait()  # the source never ends by itself


@pipeline.batched(size=100, max_wait=3600)
async def gather(items):
    with open(HERE / "calls.txt", "a") as calls:
        calls.write(",".join(str(item["id"]) for item in items) + "\\n")
    return items
"""

SIGNAL_CONFIG = """
[pipeline]
name = "sigbatch"
report_dir = "runs"
grace_period = 3600

[source]
use = "sigbatch:rows"

[[stages]]
use = "sigbatch:gather"
"""


def test_sigterm_flushes_the_partial_batch_of_a_real_run(tmp_path: Path) -> None:
    """`pipeline run` and a real SIGTERM: the partial batch (an hour of max_wait and grace left)
    is handed over at once, every item read ends ok, and the run exits 143."""
    (tmp_path / "sigbatch.py").write_text(SIGNAL_STAGES)
    (tmp_path / "config.toml").write_text(SIGNAL_CONFIG)
    os.mkfifo(tmp_path / "ready")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "config.toml", "--report", "r.json", "--no-progress"],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert (tmp_path / "ready").read_text() == "ready"  # blocks until the source has read 5
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "interrupted"
    assert report["items"] == {"read": 5, "ok": 5, "failed": 0, "skipped": 0, "unfinished": 0}
    assert (tmp_path / "calls.txt").read_text() == "0,1,2,3,4\n"
