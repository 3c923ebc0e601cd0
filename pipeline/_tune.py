"""``pipeline tune``: choose a stage's cap by measuring the real pipeline on a sample.

For the tuned stage, the pipeline is cut after that stage (so nothing downstream runs again:
no writes, no rows) and run on the first ``limit`` items once per candidate cap: coarse
(1, 2, 4, ... up to the maximum), then fine around the best coarse cap. Each step records:

* throughput (items out of the stage per second) and the error and 429 (``Overloaded``) rates
  per attempt;
* p50 and p99 of one attempt, from the run report;
* event-loop lag (how late a 10 ms ticker wakes) and the process's RSS;
* a Little's-law check: throughput x mean call time (timed inside the stage callable) against
  the mean number of slots held (sampled from the stage's limiter). When slots are held much
  longer than calls take (> 25% apart), items queue somewhere the stage's latency does not show:
  the thread pool, the event loop, a connection pool. That is *hidden queueing*.

A step where most attempts fail measures nothing: the origin is down, the URL base or the
credentials are wrong. Tune stops there (:class:`TuneFailed`, exit 1) with the first errors and
their likely cause, rather than spend every item's retries on each cap of the sweep.

The recommendation is the smallest cap reaching 95% of the peak throughput among the steps
within the latency and error limits. :func:`write_recommendation` puts it into the TOML file
with tomlkit, leaving comments and layout alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import re
import resource
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._contract import Context, is_factory, stage_kind, workload
from ._definition import Stage
from ._exceptions import ConfigError, Overloaded, PipelineError
from ._logs import notice
from ._pipeline import Pipeline
from ._report import RunReport

__all__ = [
    "TuneFailed",
    "TuneResult",
    "TuneStep",
    "add_arguments",
    "main",
    "tune",
    "write_recommendation",
]

LITTLE_TOLERANCE = 0.25
"""Relative mismatch between throughput x latency and the measured in-flight count that is
flagged as hidden queueing."""

_TICK = 0.01

FAIL_FAST_ATTEMPTS = 5
"""A step stops as soon as this many attempts have been made and more than half failed."""

_FIRST_ERRORS = 3


class TuneFailed(PipelineError):
    """A tuning step where most attempts failed: there is no cap to measure until the cause is fixed.

    Attributes:
        stage: The stage whose attempts failed.
        concurrency: Its cap in that step (``None``: the run at the configured caps that finds
            the bottleneck).
        attempts: Attempts made before the step stopped.
        failed: How many of them failed.
        errors: The first distinct errors, as ``Type: message``.
    """

    def __init__(
        self, stage: str, concurrency: int | None, attempts: int, failed: int, errors: Sequence[BaseException]
    ) -> None:
        self.stage, self.concurrency, self.attempts, self.failed = stage, concurrency, attempts, failed
        self.errors = [f"{type(e).__name__}: {e}" for e in errors]
        where = (
            f"at concurrency {concurrency}"
            if concurrency is not None
            else "in the run at the configured caps that finds the bottleneck"
        )
        cause = next(filter(None, map(diagnose, errors)), None)
        first = "".join(f"\n  {e}" for e in self.errors)
        super().__init__(
            f"stopped: {failed} of {attempts} attempts of stage {stage!r} failed {where}."
            f"{f' Likely cause: {cause}' if cause else ''}\nFirst errors:{first}\n"
            "A cap cannot be measured while most attempts fail: fix the cause, then tune again."
        )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and exceptions among their args (requests wraps so)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 20:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [x for x in (e.__cause__, e.__context__, *e.args) if isinstance(x, BaseException)]
    return seen


_URL_HOST = re.compile(r"[a-z][a-z0-9+.-]*://(?:[^@/\s]*@)?(\[[0-9a-fA-F:.]+\]|[^/\s:'\")]+)(:\d+)?")
_HOST_PORT = re.compile(r"host='([^']+)', port=(\d+)")


def diagnose(exc: BaseException) -> str | None:
    """The likely cause of a failed attempt, from the OS error at the bottom of its chain:
    ``connection refused to 127.0.0.1:43269: is the origin up?``; ``None`` if none is known."""
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain)
    found = _URL_HOST.search(text)
    if found:
        to = f" to {found.group(1)}{found.group(2) or ''}"
    else:
        pair = _HOST_PORT.search(text)
        to = f" to {pair.group(1)}:{pair.group(2)}" if pair else ""
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return f"connection refused{to}: is the origin up?"
        if isinstance(e, socket.gaierror):
            return f"the host name{to.replace(' to', ' in', 1)} does not resolve: check the URL and DNS"
        if isinstance(e, ConnectionResetError):
            return f"connection reset{to}: the origin or a proxy closes connections"
        if isinstance(e, PermissionError):
            return f"permission denied ({e}): check the paths and the user the job runs as"
        if isinstance(e, TimeoutError) and not isinstance(e, PipelineError):
            return f"timed out{to}: is the origin reachable, and not overloaded?"
    return None


@dataclass(frozen=True)
class TuneStep:
    """One measured cap.

    Attributes:
        concurrency: The cap the stage ran with.
        items: Items that came out of the stage.
        wall_s: Seconds the run took.
        throughput: Items out of the stage per second.
        p50_s: Median attempt latency (run report).
        p99_s: 99th percentile attempt latency (run report).
        error_rate: Failed attempts per attempt (any error).
        overloaded_rate: Attempts that raised ``Overloaded`` (429, 503, too many connections).
        loop_lag_ms: 99th percentile of how late a 10 ms ticker woke.
        rss_mb: The most resident memory seen during the step.
        in_flight: Mean slots held, sampled from the stage's limiter.
        littles: Attempts per second x mean call time: what ``in_flight`` should be.
        hidden_queueing: ``littles`` and ``in_flight`` are more than 25% apart.
    """

    concurrency: int
    items: int
    wall_s: float
    throughput: float
    p50_s: float | None
    p99_s: float | None
    error_rate: float
    overloaded_rate: float
    loop_lag_ms: float
    rss_mb: float
    in_flight: float
    littles: float
    hidden_queueing: bool

    def within(self, *, max_p99: float | None, max_error_rate: float, max_overloaded_rate: float) -> bool:
        """Whether this step respects the latency and error limits."""
        if max_p99 is not None and (self.p99_s is None or self.p99_s > max_p99):
            return False
        return self.error_rate <= max_error_rate and self.overloaded_rate <= max_overloaded_rate


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found for one stage.

    Attributes:
        stage: The stage's name.
        stage_index: Its position in the pipeline (and in the config's ``[[stages]]``).
        steps: Every measured cap, in increasing order.
        recommended: The smallest cap reaching 95% of the peak within the limits.
        peak_throughput: The best throughput within the limits.
        reason: One sentence on why.
    """

    stage: str
    stage_index: int
    steps: list[TuneStep] = field(default_factory=list)
    recommended: int = 1
    peak_throughput: float = 0.0
    reason: str = ""


class _Probe:
    """Counts and times attempts inside the stage callable, and samples its limiter.

    Once most of at least :data:`FAIL_FAST_ATTEMPTS` attempts have failed it sets ``failing``
    (from whichever thread made the attempt), so the step can stop.
    """

    def __init__(self, stage: str = "", concurrency: int | None = None) -> None:
        self.stage, self.concurrency = stage, concurrency
        self.lock = threading.Lock()
        self.attempts = 0
        self.errors = 0
        self.overloaded = 0
        self.call_s = 0.0
        self.limiter: Any = None
        self.first_errors: list[BaseException] = []
        self.failing = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def record(self, seconds: float, error: BaseException | None) -> None:
        with self.lock:
            self.attempts += 1
            self.call_s += seconds
            if error is not None:
                self.errors += 1
                if isinstance(error, Overloaded):
                    self.overloaded += 1
                if len(self.first_errors) < _FIRST_ERRORS and not any(
                    type(e) is type(error) and str(e) == str(error) for e in self.first_errors
                ):
                    self.first_errors.append(error)
            failing = self.mostly_failing(FAIL_FAST_ATTEMPTS)
        if failing and not self.failing.is_set():
            self._loop.call_soon_threadsafe(self.failing.set)

    def mostly_failing(self, at_least: int = 1) -> bool:
        """Whether at least ``at_least`` attempts were made and more than half of them failed."""
        return self.attempts >= at_least and 2 * self.errors > self.attempts

    def failed(self) -> TuneFailed:
        """The error that stops the tune, from what this probe saw."""
        with self.lock:
            return TuneFailed(self.stage, self.concurrency, self.attempts, self.errors, self.first_errors)


def _instrument(fn: Callable[..., Any], probe: _Probe) -> Callable[..., Any]:
    """A factory that opens ``fn`` as the engine would, and yields a timed callable of its kind."""

    @contextlib.asynccontextmanager
    async def open_stage(ctx: Context, **opts: Any) -> AsyncIterator[Callable[..., Any]]:
        probe.limiter = ctx.limiter
        async with contextlib.AsyncExitStack() as stack:
            if is_factory(fn):
                inner = await stack.enter_async_context(fn(ctx, **opts))
            else:
                inner = functools.partial(fn, **opts) if opts else fn
            yield _timed(inner, probe)

    open_stage.__name__ = getattr(fn, "__name__", "stage")
    if workload(fn) == "cpu":
        open_stage.__pipeline_workload__ = "cpu"  # type: ignore[attr-defined]
    open_stage.__pipeline_factory__ = True  # type: ignore[attr-defined]
    return open_stage


def _timed(inner: Callable[..., Any], probe: _Probe) -> Callable[..., Any]:
    kind = stage_kind(inner)  # the engine's own reading, so the wrapper runs the same way
    if kind in ("async-gen", "thread-gen"):
        return inner  # fan-out stages: counted by the run report only
    if kind == "async":

        async def timed_async(item: dict[str, Any]) -> Any:
            start = time.perf_counter()
            error: BaseException | None = None
            try:
                return await inner(item)
            except BaseException as exc:
                error = exc
                raise
            finally:
                probe.record(time.perf_counter() - start, error)

        return timed_async

    def timed(item: dict[str, Any]) -> Any:
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return inner(item)
        except BaseException as exc:
            error = exc
            raise
        finally:
            probe.record(time.perf_counter() - start, error)

    return timed


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, in KiB on Linux


async def _ticker(probe: _Probe, lags: list[float], in_flight: list[int], rss: list[float]) -> None:
    loop = asyncio.get_running_loop()
    n = 0
    while True:
        start = loop.time()
        await asyncio.sleep(_TICK)
        lags.append(max(0.0, loop.time() - start - _TICK))
        if probe.limiter is not None:
            in_flight.append(probe.limiter.borrowed)
        n += 1
        if n % 10 == 1:
            rss.append(_rss_mb())


async def _watched(pipeline: Pipeline, probes: Sequence[_Probe], **run: Any) -> RunReport:
    """Run ``pipeline``; stop it and raise :class:`TuneFailed` as soon as one probe's stage is
    mostly failing, or when it ended so (a sample too small to stop early)."""
    task = asyncio.create_task(pipeline.run_async(progress=False, **run), name="pipeline-tune-run")
    watches = [asyncio.create_task(p.failing.wait()) for p in probes]
    try:
        await asyncio.wait([task, *watches], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in watches:
            w.cancel()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, PipelineError):
            await task
    for p in probes:
        if p.mostly_failing():
            raise p.failed()
    return task.result()


async def measure(pipeline: Pipeline, index: int, concurrency: int, limit: int) -> TuneStep:
    """Run ``pipeline`` cut after stage ``index``, that stage at ``concurrency``, on ``limit`` items.

    Raises:
        TuneFailed: Most of the stage's attempts failed.
    """
    spec = pipeline.stages[index]
    probe = _Probe(spec.name, concurrency)
    stage = dataclasses.replace(spec, fn=_instrument(spec.fn, probe), concurrency=concurrency, name=spec.name)
    cut = dataclasses.replace(pipeline, stages=(*pipeline.stages[:index], stage), report_dir=None)
    lags: list[float] = []
    in_flight: list[int] = []
    rss: list[float] = [_rss_mb()]
    ticker = asyncio.create_task(_ticker(probe, lags, in_flight, rss), name="pipeline-tune-ticker")
    try:
        report = await _watched(cut, [probe], limit=limit, run_id=f"tune-{spec.name}-{concurrency}")
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    rep = report.stages[index]
    wall = max(report.wall_s, 1e-9)
    attempts = probe.attempts or (rep.ok + rep.failed + rep.retries)
    mean_call = probe.call_s / probe.attempts if probe.attempts else 0.0
    littles = attempts / wall * mean_call
    mean_in_flight = sum(in_flight) / len(in_flight) if in_flight else 0.0
    mismatch = abs(littles - mean_in_flight) / max(littles, mean_in_flight, 1e-9)
    lags.sort()
    return TuneStep(
        concurrency=concurrency,
        items=rep.ok,
        wall_s=round(wall, 4),
        throughput=round(rep.ok / wall, 2),
        p50_s=rep.latency_s.get("p50"),
        p99_s=rep.latency_s.get("p99"),
        error_rate=round(probe.errors / attempts, 4) if attempts else 0.0,
        overloaded_rate=round(probe.overloaded / attempts, 4) if attempts else 0.0,
        loop_lag_ms=round(1000 * lags[min(len(lags) - 1, int(0.99 * len(lags)))], 2) if lags else 0.0,
        rss_mb=round(max(rss), 1),
        in_flight=round(mean_in_flight, 2),
        littles=round(littles, 2),
        hidden_queueing=mean_in_flight >= 1 and littles >= 1 and mismatch > LITTLE_TOLERANCE,
    )


def _stage_index(pipeline: Pipeline, stage: str | int | None) -> int | None:
    if stage is None:
        return None
    names = [s.name for s in pipeline.stages]
    if isinstance(stage, int) or (isinstance(stage, str) and stage.isdigit()):
        i = int(stage)
        if not 0 <= i < len(names):
            raise ConfigError(f"--stage {stage!r} is out of range; the stages are 0..{len(names) - 1}")
        return i
    if stage not in names:
        raise ConfigError(f"--stage {stage!r} is not a stage of this pipeline; its stages are {names!r}")
    return names.index(stage)


def _coarse(top: int) -> list[int]:
    caps = [1]
    while caps[-1] * 2 <= top:
        caps.append(caps[-1] * 2)
    if caps[-1] != top:
        caps.append(top)
    return caps


def _fine(best: int, measured: Sequence[int], top: int, points: int = 6) -> list[int]:
    below = max([c for c in measured if c < best], default=max(1, best // 2))
    above = min([c for c in measured if c > best], default=min(top, best * 2))
    step = max(1, (above - below) // (points + 1))
    out = [c for c in range(below + step, above, step) if c not in measured and 1 <= c <= top]
    return out[:points]


async def tune(
    pipeline: Pipeline,
    *,
    stage: str | int | None = None,
    limit: int = 200,
    max_concurrency: int | None = None,
    max_p99: float | None = None,
    max_error_rate: float = 0.01,
    max_overloaded_rate: float = 0.02,
    report: Callable[[TuneStep], None] | None = None,
) -> TuneResult:
    """Sweep one stage's cap on a sample and recommend one.

    Args:
        pipeline: The pipeline, as loaded from its config.
        stage: The stage's name or index; ``None`` tunes the bottleneck of a run at the
            configured caps.
        limit: Items per step (the first ``limit`` of the source).
        max_concurrency: The highest cap tried; defaults to the stage's ``Auto.max``, or 4x
            its fixed cap (at least 16).
        max_p99: Steps whose p99 is above this (seconds) are not recommended.
        max_error_rate: Steps with more failed attempts than this share are not recommended.
        max_overloaded_rate: Steps with more 429-type answers than this share are not recommended.
        report: Called with each step as it is measured (for live output).
    """
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1 for tune, got {limit!r}")
    index = _stage_index(pipeline, stage)
    if index is None:
        probes = [_Probe(s.name) for s in pipeline.stages]
        pairs = zip(pipeline.stages, probes, strict=True)
        watched = [dataclasses.replace(s, fn=_instrument(s.fn, p)) for s, p in pairs]
        first = await _watched(
            dataclasses.replace(pipeline, stages=watched, report_dir=None), probes, limit=limit
        )
        name = (first.bottleneck or {}).get("stage", pipeline.stages[-1].name)
        index = [s.name for s in pipeline.stages].index(name)
    spec: Stage = pipeline.stages[index]
    top = max_concurrency or (
        spec.auto.max if spec.auto and spec.auto.max else max(16, 4 * spec.max_concurrency)
    )
    steps: dict[int, TuneStep] = {}

    async def step(c: int) -> TuneStep:
        s = await measure(pipeline, index, c, limit)
        steps[c] = s
        if report is not None:
            report(s)
        return s

    def ok(s: TuneStep) -> bool:
        return s.within(
            max_p99=max_p99, max_error_rate=max_error_rate, max_overloaded_rate=max_overloaded_rate
        )

    worse = 0
    for c in _coarse(top):
        s = await step(c)
        best = max((x.throughput for x in steps.values() if ok(x)), default=0.0)
        # Past the peak for two steps, or over the limits: higher caps only get worse.
        worse = worse + 1 if (s.throughput < 0.8 * best or not ok(s)) else 0
        if worse >= 2:
            break
    good = [x for x in steps.values() if ok(x)]
    if good:
        # Refine around the knee (the smallest coarse cap near the peak), not the peak itself:
        # past the knee throughput is flat within noise, and the recommendation is the smallest
        # cap that gets there.
        peak = max(x.throughput for x in good)
        knee = min(x.concurrency for x in good if x.throughput >= 0.9 * peak)
        for c in _fine(knee, sorted(steps), top):
            await step(c)
    return _recommend(spec.name, index, steps, max_p99, max_error_rate, max_overloaded_rate)


def _recommend(
    name: str,
    index: int,
    steps: dict[int, TuneStep],
    max_p99: float | None,
    max_error_rate: float,
    max_overloaded_rate: float,
) -> TuneResult:
    ordered = [steps[c] for c in sorted(steps)]
    good = [
        s
        for s in ordered
        if s.within(max_p99=max_p99, max_error_rate=max_error_rate, max_overloaded_rate=max_overloaded_rate)
    ]
    if not good:
        return TuneResult(
            name,
            index,
            ordered,
            recommended=ordered[0].concurrency,
            reason="no cap met the latency and error limits; the smallest tried is recommended",
        )
    peak = max(s.throughput for s in good)
    pick = next(s for s in good if s.throughput >= 0.95 * peak)
    return TuneResult(
        name,
        index,
        ordered,
        recommended=pick.concurrency,
        peak_throughput=peak,
        reason=(
            f"the smallest cap reaching 95% of the peak ({pick.throughput:.1f} of {peak:.1f} items/s) "
            "within the latency and error limits"
        ),
    )


def print_result(result: TuneResult, console: Any = None) -> None:
    """Print a rich table of the steps and the recommendation."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or (Console() if sys.stdout.isatty() else Console(width=150))
    table = Table(title=f"tune: stage {result.stage!r} (stages[{result.stage_index}])")
    columns = ("cap", "items/s", "p50 ms", "p99 ms", "errors", "429", "loop lag ms", "RSS MB")
    for col in (*columns, "L=λW", "in flight"):
        table.add_column(col, justify="right")
    table.add_column("note")
    for s in result.steps:
        mark = "*" if s.concurrency == result.recommended else ""
        table.add_row(
            f"{s.concurrency}{mark}",
            f"{s.throughput:.1f}",
            "-" if s.p50_s is None else f"{1000 * s.p50_s:.1f}",
            "-" if s.p99_s is None else f"{1000 * s.p99_s:.1f}",
            f"{s.error_rate:.1%}",
            f"{s.overloaded_rate:.1%}",
            f"{s.loop_lag_ms:.1f}",
            f"{s.rss_mb:.0f}",
            f"{s.littles:.1f}",
            f"{s.in_flight:.1f}",
            "hidden queueing" if s.hidden_queueing else "",
        )
    console.print(table)
    console.print(f"recommended concurrency for {result.stage!r}: {result.recommended} ({result.reason})")


PLOT_EXTRA = "tune --plot needs matplotlib: pip install 'pipeline[plot]'"


def can_plot() -> bool:
    """Whether matplotlib (the ``plot`` extra) is installed."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_plot(results: Sequence[TuneResult], path: Path) -> None:
    """Write a PNG of throughput and p50/p99 latency against the cap, one panel per stage.

    Raises:
        ConfigError: matplotlib (the ``plot`` extra) is not installed.
    """
    if not can_plot():
        raise ConfigError(PLOT_EXTRA)
    import matplotlib  # deferred: only `tune --plot` pays for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(7, 3.6 * len(results)), squeeze=False)
    for ax, result in zip(axes[:, 0], results, strict=True):
        caps = [s.concurrency for s in result.steps]
        ax.plot(caps, [s.throughput for s in result.steps], "o-", color="tab:blue", label="items/s")
        ax.set_xlabel("concurrency")
        ax.set_ylabel("items/s", color="tab:blue")
        ax.axvline(result.recommended, color="gray", linestyle=":", label=f"recommended {result.recommended}")
        ax.set_title(f"stage {result.stage!r}")
        lat = ax.twinx()
        lat.plot(caps, [1000 * (s.p50_s or 0) for s in result.steps], "s--", color="tab:orange", label="p50")
        lat.plot(caps, [1000 * (s.p99_s or 0) for s in result.steps], "^--", color="tab:red", label="p99")
        lat.set_ylabel("latency, ms", color="tab:red")
        handles = ax.get_legend_handles_labels()[0] + lat.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="best", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_recommendation(config_path: str | Path, caps: Mapping[int, int]) -> None:
    """Set ``[[stages]][i].concurrency`` for each ``i: cap`` in the TOML file, keeping its comments
    and layout (tomlkit); an inline comment after the old value is kept too."""
    import tomlkit  # deferred: only `tune --write` pays for it

    path = Path(config_path)
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    stages = doc.get("stages")
    for index, cap in caps.items():
        if stages is None or not 0 <= index < len(stages):
            raise ConfigError(f"{path}: there is no stages[{index}] to write concurrency = {cap} into")
        table = stages[index]
        value = tomlkit.integer(cap)
        old = table.get("concurrency")
        trivia = getattr(old, "trivia", None)
        if trivia is not None and trivia.comment:
            value.trivia.comment_ws = trivia.comment_ws
            value.trivia.comment = trivia.comment
        table["concurrency"] = value
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``tune``'s arguments to ``parser`` (the ``pipeline tune`` sub-command)."""
    parser.add_argument("config", type=Path, help="the pipeline's config.toml")
    parser.add_argument("--stage", help="the stage to tune, by name or index (default: the bottleneck)")
    parser.add_argument("--limit", type=int, default=200, metavar="N", help="items per step (default 200)")
    parser.add_argument("--max", dest="max_concurrency", type=int, metavar="N", help="highest cap tried")
    parser.add_argument(
        "--max-p99", type=float, metavar="SECONDS", help="latency limit for the recommendation"
    )
    parser.add_argument("--write", action="store_true", help="write the recommendation into CONFIG")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        help="write the PNG plot here (default: <report_dir>/tune-<stage>.png)",
    )


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``pipeline tune CONFIG [--stage S] [--limit N] [--write] [--plot PATH]``; returns the exit code."""

    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="pipeline tune", description=__doc__.split("\n\n")[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    from ._config import load_config

    if args.plot is not None and not can_plot():
        notice(f"config error: {PLOT_EXTRA}", logging.ERROR)
        return 2
    try:
        pipeline = load_config(args.config)
        result = asyncio.run(
            tune(
                pipeline,
                stage=args.stage,
                limit=args.limit,
                max_concurrency=args.max_concurrency,
                max_p99=args.max_p99,
            )
        )
    except ConfigError as exc:
        notice(f"config error: {exc}", logging.ERROR)
        return 2
    except TuneFailed as exc:
        notice(f"tune {exc}", logging.ERROR)
        return 1
    print_result(result)
    plot = args.plot
    if plot is None and pipeline.report_dir is not None:
        if can_plot():
            plot = pipeline.report_dir / f"tune-{result.stage}.png"
        else:
            notice(f"no plot written: {PLOT_EXTRA}", logging.WARNING)
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        write_plot([result], plot)
        notice(f"plot: {plot}")
    if args.write:
        write_recommendation(args.config, {result.stage_index: result.recommended})
        print(f"wrote stages[{result.stage_index}].concurrency = {result.recommended} to {args.config}")
    return 0
