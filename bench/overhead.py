"""Engine overhead: items per second through three no-op stages, four workers each.

Variants, for an async chain and a thread chain:

* ``pipeline``: the engine, ``Pipeline(..., report_dir=None).run(progress=False)``;
* ``hand-written``: bounded ``asyncio.Queue`` s between stages, four worker tasks per stage, and
  for the thread chain ``asyncio.to_thread`` on the loop's default executor, written the plain way;
* peers where they install: aiostream (``pipe.map(..., task_limit=4)`` chained three times) for the
  async chain, pypeln (``pl.thread.map(..., workers=4, maxsize=64)``) for the thread chain.

Every variant times its whole run, event loop and thread pool start-up included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, cast

from bench._common import Series, log, rotate, timed

STAGES = 3
WORKERS = 4
QUEUE = 64

Item = dict[str, Any]


async def anoop(item: Item) -> Item:
    """The async no-op stage."""
    return item


def tnoop(item: Item) -> Item:
    """The thread no-op stage."""
    return item


def rows(n: int) -> Iterator[Item]:
    """The source: ``n`` small dicts, made as they are read."""
    return ({"id": i} for i in range(n))


# -- the engine -----------------------------------------------------------------------------


def run_engine(kind: str, n: int) -> int:
    """Run the no-op chain through the engine; return the items that came out ok."""
    return engine(kind, n)()


def engine(kind: str, n: int) -> Callable[[], int]:
    """Define the no-op chain; return what runs it (the definition, checked by pydantic, is
    made once per pipeline and is not part of the per-item cost being measured)."""
    from pipeline import Pipeline, Source, Stage

    fn = anoop if kind == "async" else tnoop
    pipe = Pipeline(
        Source(rows, options={"n": n}),
        [Stage(fn, name=f"noop{i}", concurrency=WORKERS) for i in range(STAGES)],
        queue_size=QUEUE,
        report_dir=None,
    )

    def run() -> int:
        report = pipe.run(progress=False, handle_signals=False)
        if report.items.ok != n:
            raise RuntimeError(f"the engine finished {report.items.ok} of {n} items: {report.error}")
        return n

    return run


# -- hand-written asyncio ---------------------------------------------------------------------


async def _hand(n: int, call: Callable[[Item], Any]) -> int:
    queues: list[asyncio.Queue[Item | None]] = [asyncio.Queue(QUEUE) for _ in range(STAGES)]
    done = 0

    async def feed() -> None:
        for item in rows(n):
            await queues[0].put(item)
        for _ in range(WORKERS):
            await queues[0].put(None)

    async def worker(i: int) -> None:
        nonlocal done
        inq = queues[i]
        outq = queues[i + 1] if i + 1 < STAGES else None
        while (item := await inq.get()) is not None:
            item = await call(item)
            if outq is None:
                done += 1
            else:
                await outq.put(item)

    async def stage(i: int) -> None:
        async with asyncio.TaskGroup() as tg:
            for _ in range(WORKERS):
                tg.create_task(worker(i))
        if i + 1 < STAGES:
            for _ in range(WORKERS):
                await queues[i + 1].put(None)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(feed())
        for i in range(STAGES):
            tg.create_task(stage(i))
    return done


def run_hand(kind: str, n: int) -> int:
    """The hand-written chain: bounded queues, four tasks per stage, ``to_thread`` for threads."""

    def in_thread(item: Item) -> Any:
        return asyncio.to_thread(tnoop, item)

    return asyncio.run(_hand(n, anoop if kind == "async" else in_thread))


# -- peers ------------------------------------------------------------------------------------


def run_pypeln(n: int) -> int:
    """pypeln's thread stages: ``pl.thread.map`` three times."""
    import pypeln as pl  # type: ignore[import-untyped]

    stage: Any = rows(n)
    for _ in range(STAGES):
        stage = pl.thread.map(tnoop, stage, workers=WORKERS, maxsize=QUEUE)
    return sum(1 for _ in stage)


def run_aiostream(n: int) -> int:
    """aiostream: ``pipe.map(..., task_limit=4)`` three times."""
    from aiostream import pipe, stream

    async def main() -> int:
        xs: Any = stream.iterate(rows(n))
        for _ in range(STAGES):
            xs = xs | pipe.map(cast(Any, anoop), task_limit=WORKERS)
        count = 0
        async with xs.stream() as streamer:
            async for _ in streamer:
                count += 1
        return count

    return asyncio.run(main())


def _peer(module: str) -> str:
    """Why a peer cannot run, or ``""`` when it imports."""
    try:
        __import__(module)
    except ModuleNotFoundError:
        return f"{module} is not installed: `make bench` installs it (pip install 'pipeline[bench]')"
    except Exception as exc:  # a peer that does not import on this Python: record it, go on
        return f"{module} does not import: {type(exc).__name__}: {exc}"
    return ""


def measure(*, reps: int, n_async: int, n_thread: int) -> dict[str, dict[str, Series]]:
    """Measure both chains, ``reps`` times each, the variants interleaved."""
    # Each variant is a factory of its run: what it builds up front is not timed.
    chains: dict[str, dict[str, tuple[Callable[[], Callable[[], int]], str]]] = {
        "async": {
            "pipeline": (lambda: engine("async", n_async), ""),
            "hand-written asyncio": (lambda: lambda: run_hand("async", n_async), ""),
            "aiostream": (lambda: lambda: run_aiostream(n_async), _peer("aiostream")),
        },
        "thread": {
            "pipeline": (lambda: engine("thread", n_thread), ""),
            "hand-written asyncio": (lambda: lambda: run_hand("thread", n_thread), ""),
            "pypeln threads": (lambda: lambda: run_pypeln(n_thread), _peer("pypeln")),
        },
    }
    out: dict[str, dict[str, Series]] = {}
    for chain, variants in chains.items():
        series = {name: Series(name, note=note) for name, (_, note) in variants.items()}
        runnable = [name for name in variants if not series[name].note]
        for name in runnable:  # warm-up: imports, thread start, code caches
            variants[name][0]()()
        for rep in range(reps):
            for name in rotate(runnable, rep):
                series[name].rates.append(timed(variants[name][0]()))
            log(
                f"  overhead {chain} rep {rep + 1}/{reps}: "
                + ", ".join(f"{s.name} {s.rates[-1]:,.0f}/s" for s in series.values() if s.rates)
            )
        out[chain] = series
    return out
