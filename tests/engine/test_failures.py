"""Tests for how items fail: retries, dead letters, skips, fan-out, misuse, source and factory errors."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import (
    ConfigError,
    Context,
    Database,
    DatabaseHandle,
    Pipeline,
    ResourceError,
    Retry,
    RetryAfter,
    Skip,
    Source,
    SourceError,
    Stage,
    StageMisuse,
    TransientError,
    factory,
)
from pipeline._run import Run
from pipeline.testing import memory_source, run_stages_async


def fast_retry(attempts: int, on: tuple[type[BaseException], ...] = ()) -> Retry:
    """A retry policy without waits, so retry tests take no time."""
    return Retry(attempts=attempts, backoff=0.0, jitter=0.0, on=on)


def items(n: int) -> list[dict[str, Any]]:
    return [{"id": k} for k in range(1, n + 1)]


def assert_counts_add_up(report: Any) -> None:
    c = report.items
    assert c.read == c.ok + c.failed + c.skipped + c.unfinished


# -- retries --------------------------------------------------------------------------------


async def test_transient_error_is_retried_then_ok_and_counted() -> None:
    """A TransientError is retried; the item ends ok and every extra attempt is in ``retries``."""
    calls: dict[int, int] = {}

    async def flaky(item: dict[str, Any]) -> dict[str, Any]:
        calls[item["id"]] = calls.get(item["id"], 0) + 1
        if calls[item["id"]] < 3:
            raise TransientError("try again")
        return item

    result = await run_stages_async(items(4), Stage(flaky, retry=fast_retry(3)))
    assert result.report.items.ok == 4
    assert result.dead_letters == []
    assert calls == {1: 3, 2: 3, 3: 3, 4: 3}
    assert result.report.stages[0].retries == 8


async def test_permanent_error_is_not_retried() -> None:
    """An exception outside the retry list fails the item after one attempt."""
    calls = 0

    def broken(item: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise ValueError(f"bad row {item['id']}")

    result = await run_stages_async(items(1), Stage(broken, retry=fast_retry(5)))
    assert calls == 1
    assert result.report.stages[0].retries == 0
    assert [(d["error_type"], d["attempts"]) for d in result.dead_letters] == [("ValueError", 1)]


async def test_dead_letter_records_every_attempt() -> None:
    """An item that fails every attempt is dead-lettered with the number of attempts made."""

    async def always(item: dict[str, Any]) -> dict[str, Any]:
        raise TransientError("still down")

    result = await run_stages_async(items(2), Stage(always, retry=fast_retry(3)))
    assert [d["attempts"] for d in result.dead_letters] == [3, 3]
    assert result.report.stages[0].retries == 4
    assert result.report.items.failed == 2


async def test_custom_retry_on() -> None:
    """Retry(on=(KeyError,)) retries KeyError in addition to the defaults."""
    calls = 0

    def lookup(item: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("not yet")
        return item

    retry = fast_retry(2, on=(KeyError,))
    result = await run_stages_async(items(1), Stage(lookup, retry=retry))
    assert calls == 2
    assert result.report.items.ok == 1
    assert result.report.stages[0].retries == 1


async def test_retry_after_pauses_the_whole_stage() -> None:
    """RetryAfter(d) stops every worker of the stage from starting an attempt for d seconds."""
    loop = asyncio.get_running_loop()
    delay = 0.2
    raised_at: list[float] = []
    starts: list[tuple[int, float]] = []

    async def limited(item: dict[str, Any]) -> dict[str, Any]:
        starts.append((item["id"], loop.time()))
        if item["id"] == 1 and not raised_at:
            raised_at.append(loop.time())
            raise RetryAfter(delay)
        return item

    result = await run_stages_async(items(6), Stage(limited, concurrency=2, retry=fast_retry(2)))
    assert result.report.items.ok == 6
    assert result.report.stages[0].retries == 1
    t0 = raised_at[0]
    later = [t for _, t in starts if t > t0]
    assert len(later) >= 5  # the retry of item 1 and items 3..6 all waited for the pause
    clock_slack = 0.01
    assert min(later) >= t0 + delay - clock_slack


async def test_the_pause_gate_opens_when_the_pause_ends() -> None:
    """After a RetryAfter pause ends, the stage's gate is open again: later items go straight
    to their attempt (the gate once stayed shut in effect, sending every item the slow way)."""
    paused_during: list[bool] = []
    run: Run | None = None

    async def limited(item: dict[str, Any]) -> dict[str, Any]:
        assert run is not None
        paused_during.append(run.stages[0].paused)
        if item["id"] == 1 and len(paused_during) == 1:
            raise RetryAfter(0.01)
        return item

    p = Pipeline(
        source=memory_source(items(50)),
        stages=[Stage(limited, retry=fast_retry(2))],
        report_dir=None,
        ledger=False,
    )
    run = Run(p, progress=False)
    report = await run.run()
    assert report.items.ok == 50
    assert paused_during[0] is False
    assert paused_during[1:] == [False] * 50  # the retry of item 1 and every later item: open
    assert not run.stages[0].paused


# -- dead letters and skips -----------------------------------------------------------------


async def test_dead_letter_record_fields(tmp_path: Path) -> None:
    """Each dead letter is one JSON line with run_id, key, stage, error_type, message, attempts, time."""

    def picky(item: dict[str, Any]) -> dict[str, Any]:
        if item["id"] == 2:
            raise ValueError("two is not allowed")
        return item

    p = Pipeline(memory_source(items(3)), [Stage(picky, name="check")], max_failures=5, report_dir=tmp_path)
    report = await p.run_async(run_id="r1", progress=False)
    lines = (tmp_path / "r1" / "dead_letters.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == {"run_id", "key", "stage", "error_type", "message", "attempts", "time"}
    assert record["run_id"] == "r1"
    assert record["key"] == 2
    assert record["stage"] == "check"
    assert record["error_type"] == "ValueError"
    assert record["message"] == "two is not allowed"
    assert record["attempts"] == 1
    assert datetime.datetime.fromisoformat(record["time"]).tzinfo is not None
    assert report.dead_letters == str(tmp_path / "r1" / "dead_letters.jsonl")
    assert report.status == "ok"


async def test_skip_ends_item_as_skipped() -> None:
    """Raising Skip ends the item as skipped: not passed on, not dead-lettered, counted once."""

    async def odd_only(item: dict[str, Any]) -> dict[str, Any]:
        if item["id"] % 2 == 0:
            raise Skip("even")
        return item

    result = await run_stages_async(items(6), Stage(odd_only))
    assert [o["id"] for o in result.outputs] == [1, 3, 5]
    assert result.dead_letters == []
    assert (result.report.items.ok, result.report.items.skipped) == (3, 3)
    assert result.report.stages[0].skipped == 3
    assert_counts_add_up(result.report)


# -- fan-out --------------------------------------------------------------------------------


async def agen_split(item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    for part in range(item["id"] - 1):  # item 1 -> none, 2 -> one, 3 -> two ...
        yield {**item, "part": part}


def gen_split(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for part in range(item["id"] - 1):
        yield {**item, "part": part}


@pytest.mark.parametrize("split", [agen_split, gen_split], ids=["async-gen", "thread-gen"])
async def test_fan_out_children_share_the_parent_ticket(split: Callable[..., Any]) -> None:
    """Fan-out: every child reaches the next stage; each source item ends exactly once; zero = skipped."""
    result = await run_stages_async(items(4), Stage(split, concurrency=2))
    children = sorted((o["id"], o["part"]) for o in result.outputs)
    assert children == [(2, 0), (3, 0), (3, 1), (4, 0), (4, 1), (4, 2)]
    c = result.report.items
    assert (c.read, c.ok, c.failed, c.skipped, c.unfinished) == (4, 3, 0, 1, 0)
    assert result.report.stages[0].kind == ("async-gen" if split is agen_split else "thread-gen")


@pytest.mark.parametrize("split", [agen_split, gen_split], ids=["async-gen", "thread-gen"])
async def test_failed_child_fails_its_parent_once(split: Callable[..., Any]) -> None:
    """A child failing downstream fails its source item once, even if its siblings succeed."""

    async def reject_part_one(item: dict[str, Any]) -> dict[str, Any]:
        if item["part"] == 1:
            raise ValueError("part one is bad")
        return item

    result = await run_stages_async(items(4), Stage(split), Stage(reject_part_one))
    c = result.report.items
    # 1: no children (skipped); 2: one good child (ok); 3 and 4: a bad child each (failed).
    assert (c.read, c.ok, c.failed, c.skipped, c.unfinished) == (4, 1, 2, 1, 0)
    assert sorted(d["key"] for d in result.dead_letters) == [3, 4]
    assert result.report.stages[1].failed == 2
    assert result.report.stages[1].ok == 4


async def test_fan_out_generator_error_fails_parent() -> None:
    """A generator stage raising midway fails its source item; children yielded before are dropped."""

    async def half(item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {**item, "part": 0}
        if item["id"] == 2:
            raise ValueError("broke after one child")
        yield {**item, "part": 1}

    result = await run_stages_async(items(2), Stage(half, retry=Retry(attempts=1)))
    assert sorted((o["id"], o["part"]) for o in result.outputs) == [(1, 0), (1, 1)]
    assert [d["key"] for d in result.dead_letters] == [2]
    assert_counts_add_up(result.report)


async def test_source_row_without_key_fails_alone() -> None:
    """A source row missing the key field is dead-lettered at the source; the others run on."""
    rows: list[dict[str, Any]] = [{"id": 1}, {"name": "no key"}, {"id": 3}]
    result = await run_stages_async(rows, Stage(_identity))
    assert [o["id"] for o in result.outputs] == [1, 3]
    assert len(result.dead_letters) == 1
    record = result.dead_letters[0]
    assert (record["stage"], record["key"]) == ("source", None)
    assert "'id'" in record["message"]
    c = result.report.items
    assert (c.read, c.ok, c.failed) == (3, 2, 1)


async def test_every_item_ends_once_across_a_mixed_run() -> None:
    """Over ok, skipped, failed and fanned-out items, read == ok + failed + skipped, nothing unfinished."""

    async def sort(item: dict[str, Any]) -> dict[str, Any]:
        if item["id"] % 5 == 0:
            raise Skip()
        if item["id"] % 7 == 0:
            raise ValueError("seven")
        return item

    def dup(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield item
        yield dict(item)

    result = await run_stages_async(items(100), Stage(sort, concurrency=3), Stage(dup, concurrency=2))
    c = result.report.items
    assert c.skipped == 20
    assert c.failed == 14 - 2  # 35 and 70 are skipped first
    assert c.ok == 100 - 20 - 12
    assert c.unfinished == 0
    assert_counts_add_up(result.report)
    assert len(result.outputs) == 2 * c.ok


async def _identity(item: dict[str, Any]) -> dict[str, Any]:
    return item


# -- thread-stage misuse --------------------------------------------------------------------


def test_async_fn_declared_thread_is_refused() -> None:
    """Stage(async_fn, kind="thread") is refused at definition with a ConfigError."""
    with pytest.raises(ConfigError, match=r"kind = \"thread\".*coroutine function"):
        Stage(_identity, kind="thread")


def test_plain_fn_declared_async_is_refused() -> None:
    """Stage(def_fn, kind="async") is refused: it would block the event loop."""

    def blocking(item: dict[str, Any]) -> dict[str, Any]:
        return item

    with pytest.raises(ConfigError, match="block the event loop"):
        Stage(blocking, kind="async")


async def test_plain_def_returning_coroutine_is_misuse() -> None:
    """A plain def returning a coroutine fails with StageMisuse naming the stage; no never-awaited warning."""

    def sneaky(item: dict[str, Any]) -> Any:
        return _identity(item)

    # filterwarnings=error turns a "coroutine ... was never awaited" RuntimeWarning into a failure;
    # gc.collect() makes a leaked coroutine's warning fire inside this test.
    result = await run_stages_async(items(2), Stage(sneaky, name="sneaky", retry=Retry(attempts=1)))
    gc.collect()
    assert result.report.items.failed == 2
    record = result.dead_letters[0]
    assert record["error_type"] == f"{StageMisuse.__module__}.StageMisuse"
    assert "'sneaky'" in record["message"]
    assert "async def" in record["message"]


async def test_stage_returning_none_fails_clearly() -> None:
    """A stage that forgets to return the item fails it with StageMisuse saying what to return."""

    def forgetful(item: dict[str, Any]) -> None:
        item["seen"] = True

    result = await run_stages_async(items(1), Stage(forgetful, retry=Retry(attempts=1)))
    assert result.outputs == []
    record = result.dead_letters[0]
    assert record["error_type"].endswith("StageMisuse")
    assert "returned NoneType" in record["message"]
    assert "return the item" in record["message"]


# -- source errors and factories -------------------------------------------------------------


def failing_source() -> Iterator[dict[str, Any]]:
    yield {"id": 1}
    raise OSError("disk gone")


async def failing_async_source() -> AsyncIterator[dict[str, Any]]:
    yield {"id": 1}
    raise OSError("disk gone")


@pytest.mark.parametrize("source", [failing_source, failing_async_source], ids=["sync", "async"])
async def test_source_error_fails_the_run(source: Callable[..., Any], tmp_path: Path) -> None:
    """A source that raises makes run_async raise SourceError, and the report says failed."""
    p = Pipeline(Source(source), [Stage(_identity)], report_dir=None)
    with pytest.raises(SourceError, match="disk gone"):
        await p.run_async(report_path=tmp_path / "r.json", progress=False)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "failed"
    assert report["exit_code"] == 1
    assert "disk gone" in report["error"]


def test_source_yielding_non_dicts_fails_the_run() -> None:
    """A source yielding something other than dicts fails the run with SourceError."""
    p = Pipeline(Source(lambda: iter([1, 2])), [Stage(_identity)], report_dir=None)
    with pytest.raises(SourceError, match="expected a dict"):
        asyncio.run(p.run_async(progress=False))


class Lifecycle:
    """A factory stage that logs open, items and close, to check their order."""

    def __init__(self, fail_open: bool = False):
        self.events: list[str] = []
        self.fail_open = fail_open

    def factory(self) -> Callable[..., Any]:
        events, fail_open = self.events, self.fail_open

        @factory
        @contextlib.asynccontextmanager
        async def tracked(ctx: Context, *, label: str = "x") -> AsyncIterator[Callable[..., Any]]:
            events.append(f"open {ctx.stage} {label}")
            if fail_open:
                raise RuntimeError("factory bug")

            async def stage(item: dict[str, Any]) -> dict[str, Any]:
                events.append(f"item {item['id']}")
                return item

            try:
                yield stage
            finally:
                events.append("close")

        return tracked


async def test_factory_opened_before_first_item_and_closed_after_last() -> None:
    """A factory is entered once, before the first item, with its options, and exited after the last."""
    life = Lifecycle()
    result = await run_stages_async(items(3), Stage(life.factory(), name="t", options={"label": "L"}))
    assert result.report.items.ok == 3
    assert life.events[0] == "open t L"
    assert life.events[-1] == "close"
    assert sorted(life.events[1:-1]) == ["item 1", "item 2", "item 3"]


async def test_factory_closed_when_run_fails() -> None:
    """A stage's factory is exited even when the run fails (here: the source raises)."""
    life = Lifecycle()
    p = Pipeline(Source(failing_source), [Stage(life.factory())], report_dir=None)
    with pytest.raises(SourceError):
        await p.run_async(progress=False)
    assert life.events[0].startswith("open")
    assert life.events[-1] == "close"


async def test_factory_raising_on_open_fails_the_run(tmp_path: Path) -> None:
    """A bug raised by a stage factory while opening fails the run as a ResourceError naming the
    stage (the original chained), nothing is processed, earlier factories are closed."""
    ok_life, bad_life = Lifecycle(), Lifecycle(fail_open=True)
    p = Pipeline(
        memory_source(items(3)),
        [Stage(ok_life.factory(), name="a"), Stage(bad_life.factory(), name="b")],
        report_dir=None,
    )
    with pytest.raises(ResourceError, match="stage 'b' could not open: RuntimeError: factory bug") as info:
        await p.run_async(report_path=tmp_path / "r.json", progress=False)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert ok_life.events == ["open a x", "close"]
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "failed"


async def test_one_limiter_per_database_shared_by_stages() -> None:
    """Every stage's ctx.database("x") gives the same handle and the one limiter of [databases.x]."""
    seen: list[DatabaseHandle] = []

    def uses_db(name: str) -> Callable[..., Any]:
        @factory
        @contextlib.asynccontextmanager
        async def open_db(ctx: Context) -> AsyncIterator[Callable[..., Any]]:
            seen.append(ctx.database(name))
            yield _identity

        return open_db

    dbs = {"x": Database("sqlite:///x.db", concurrency=3), "y": Database("sqlite:///y.db")}
    result = await run_stages_async(
        items(2),
        Stage(uses_db("x"), name="a"),
        Stage(uses_db("x"), name="b"),
        Stage(uses_db("y"), name="c"),
        databases=dbs,
    )
    assert result.report.items.ok == 2
    a, b, c = seen
    assert a.limiter is b.limiter
    assert a.limiter is not c.limiter
    assert (a.limiter.total, c.limiter.total) == (3, 4)
    assert a.dsn == "sqlite:///x.db"


async def test_unknown_database_is_a_config_error() -> None:
    """ctx.database() of an unconfigured name raises ConfigError naming the stage and the fix."""

    @factory
    @contextlib.asynccontextmanager
    async def open_db(ctx: Context) -> AsyncIterator[Callable[..., Any]]:
        ctx.database("nope")
        yield _identity

    with pytest.raises(ConfigError, match=r"'nope'.*add a \[databases.nope\] table"):
        await run_stages_async(items(1), Stage(open_db, name="s"), databases={"x": Database("d")})


def test_thread_stage_runs_off_the_loop_thread() -> None:
    """A plain def stage runs in a worker thread, an async def on the loop's thread."""
    where: dict[str, str] = {}

    def blocking(item: dict[str, Any]) -> dict[str, Any]:
        where["thread"] = threading.current_thread().name
        return item

    async def on_loop(item: dict[str, Any]) -> dict[str, Any]:
        where["async"] = threading.current_thread().name
        return item

    asyncio.run(run_stages_async(items(1), Stage(blocking), Stage(on_loop)))
    assert where["thread"].startswith("pipeline-")
    assert where["async"] == threading.main_thread().name


async def test_a_stage_whose_slots_are_all_held_by_abandoned_calls_fails_the_run() -> None:
    """Thread calls that ignore their timeout keep their slots (the cap holds); once every slot
    is held so for another timeout, the run stops and says why instead of waiting for ever."""
    release = threading.Event()

    def never_returns(item: dict[str, Any]) -> dict[str, Any]:
        release.wait()
        return item

    p = Pipeline(
        source=memory_source(items(6)),
        stages=[Stage(never_returns, concurrency=2, timeout=0.05, retry=Retry(attempts=1))],
        report_dir=None,
        ledger=False,
        grace_period=0,
        max_failures=100,
    )
    try:
        report = await p.run_async(progress=False)
    finally:
        release.set()
    assert report.status == "failed"
    assert report.exit_code == 1
    assert report.error is not None
    assert "all 2 slots are held by calls that timed out" in report.error
    assert report.stages[0].abandoned_calls == 2
    c = report.items
    assert c.read == c.ok + c.failed + c.skipped + c.unfinished
    assert c.failed >= 2  # the two timed-out items, dead-lettered with StageTimeout
