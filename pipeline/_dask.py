"""The shards of one run as tasks on a Dask distributed cluster: ``pipeline run CONFIG --shards N
--dask ADDRESS`` (the ``dask`` extra).

* One task per shard, each running the whole pipeline for its shard in a worker (``run(...,
  shard=K/N)``), all under one run id and the one table ledger. The command waits for them all
  and exits with the run's combined status; :class:`ShardedReport` sums the shards' reports.
* A shard whose worker died is run again by Dask (``distributed.scheduler.allowed-failures``
  times at most); the ledger makes the rerun resume, so only what was in flight or not yet
  flushed is done again. A SQLite ledger file is refused: workers on other machines cannot
  share it.
* Caps stay global through leases of ``distributed.Semaphore``, taken in bulk when a shard opens
  and given back when it ends (an acquire is a round trip to the scheduler, ~1 ms; per item it
  would cost a thousand times the engine's own limiter): ``[databases.X] concurrency`` is a
  semaphore of that many leases, the shard's database limiter (and so its pool) is sized to the
  leases it holds; a stage's ``rate`` is divided by ``P``, the shards allowed to run at once,
  which each hold one lease of a semaphore of ``P``. Semaphores are taken in one order (by
  name), so shards waiting on each other cannot deadlock.
* A dead holder's leases return after ``distributed.scheduler.locks.lease-timeout`` (from this
  command's Dask config, handed to every shard so that holders refresh in time) plus the
  scheduler's ``lease-validation-interval``. A holder refreshes every fifth of the timeout from
  its worker's event loop; a stage call that holds the GIL longer than the timeout lets the
  leases lapse while the shard still uses them: the cap is overbooked until it ends.
* Signals: a shard runs in a worker thread, where no signal handler can be installed, and none
  is tried. A worker told to stop (SIGTERM: a preemption) starts closing, and Dask at once runs
  its shard again elsewhere; the shard sees its worker closing and stops as a signal would (no
  more reads, the grace period for what is in flight), so the rerun redoes little. A worker
  killed outright ends its shard with nothing drained; the ledger resumes the rerun either way.
* On Python 3.11 a shard stops its worker's task profiler (see :func:`_stop_task_profiler`):
  CPython 3.11 can deadlock the whole worker process inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._definition import PipelineDefinition, _with, parse_rate
from ._exceptions import ConfigError, PipelineError, ResourceError
from ._logs import run_id_context
from ._report import ItemCounts, RunReport
from ._run import Run, default_run_id
from ._shard import Shard, cap_share

if TYPE_CHECKING:
    from distributed import Client, Future, Semaphore

__all__ = ["Lease", "ShardOutcome", "ShardedReport", "check_dask_run", "run_on_dask", "run_shard"]

log = logging.getLogger("pipeline")

LEASE_TIMEOUT_KEY = "distributed.scheduler.locks.lease-timeout"
VALIDATION_KEY = "distributed.scheduler.locks.lease-validation-interval"
WATCH_INTERVAL = 0.2
"""Seconds between looks at the worker's status, to stop a shard once its worker is closing."""
PROFILER_STOP_TIMEOUT = 10.0
"""Seconds a shard waits for its worker's loop to stop the task profiler (Python 3.11)."""
SLOTS = "shards"
"""The lease key of the semaphore of ``P`` running shards, beside ``databases.<name>``."""


@dataclass(frozen=True)
class Lease:
    """Leases one shard takes from one run-wide semaphore when it opens.

    Attributes:
        key: What the leases stand for: ``databases.<name>`` or ``shards``.
        name: The semaphore's name on the scheduler (run id, key and size).
        max_leases: The run-wide cap.
        want: How many this shard takes if they are free (at least one, waited for).
    """

    key: str
    name: str
    max_leases: int
    want: int


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs to run one shard: picklable, sent with the task."""

    config: str | PipelineDefinition
    shard: Shard
    run_id: str
    parallel: int
    leases: tuple[Lease, ...]
    lease_timeout: Any
    limit: int | None = None
    retry_failed: bool = False


@dataclass(frozen=True)
class ShardOutcome:
    """How one shard ended.

    Attributes:
        shard: ``"K/N"``.
        status: ``ok``, ``failed`` or ``lost`` (no report came back: the task itself failed,
            or its workers died more often than ``allowed-failures``).
        exit_code: 0, 1, or 2 for a config error found on the worker.
        worker: The address of the worker that ran the shard's last attempt, when known.
        leases: The leases that attempt held, by key (``databases.catalog``, ``shards``).
        report: The shard's own report, when it made one.
        error: Why it failed, when it did.
    """

    shard: str
    status: str
    exit_code: int
    worker: str | None = None
    leases: dict[str, int] = field(default_factory=dict)
    report: RunReport | None = None
    error: str | None = None


@dataclass(frozen=True)
class ShardedReport:
    """The outcome of a run of N shards on Dask, written to ``<report_dir>/<run id>/sharded-report.json``.

    Attributes:
        pipeline: The pipeline's name.
        run_id: The run id all shards shared.
        status: ``ok`` when every shard ended ok, else ``failed``.
        exit_code: The highest of the shards' (0 ok, 1 failed, 2 a config error on a worker).
        wall_s: Seconds from submitting the shards to the last one's end.
        address: The scheduler's address.
        parallel: How many shards were allowed to run at once (``P``).
        items: The shards' last attempts' item counts, summed.
        already_done: Items that the shards' last attempts found done in the ledger, summed.
        shards: Each shard's outcome, by index.
        run_totals: How every item of the run stands in the ledger (``done``, ``failed``,
            ``skipped``): the shards' own totals summed, when every shard reported them.
    """

    pipeline: str
    run_id: str
    status: str
    exit_code: int
    wall_s: float
    address: str
    parallel: int
    items: ItemCounts
    already_done: int
    shards: list[ShardOutcome]
    run_totals: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        """Write the report as JSON, atomically."""
        import json
        import os

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        os.replace(tmp, path)


def combine(
    pipeline: str,
    run_id: str,
    outcomes: Sequence[ShardOutcome],
    *,
    wall_s: float,
    address: str,
    parallel: int,
) -> ShardedReport:
    """The run's report from its shards' outcomes."""
    reports = [o.report for o in outcomes if o.report is not None]
    items = ItemCounts(
        *(sum(getattr(r.items, f.name) for r in reports) for f in dataclasses.fields(ItemCounts))
    )
    code = max((o.exit_code for o in outcomes), default=0)
    totals: dict[str, int] | None = None
    if outcomes and all(o.report is not None and o.report.run_totals is not None for o in outcomes):
        totals = {}
        for r in reports:
            for state, n in (r.run_totals or {}).items():
                totals[state] = totals.get(state, 0) + n
    return ShardedReport(
        pipeline=pipeline,
        run_id=run_id,
        status="ok" if all(o.status == "ok" for o in outcomes) else "failed",
        exit_code=code,
        wall_s=round(wall_s, 4),
        address=address,
        parallel=parallel,
        items=items,
        already_done=sum(r.already_done for r in reports),
        shards=sorted(outcomes, key=lambda o: int(o.shard.partition("/")[0])),
        run_totals=totals,
    )


# -- the client's side ------------------------------------------------------------------------


def check_dask_run(pipeline: PipelineDefinition, shards: int, parallel: int | None) -> None:
    """Refuse, before anything is submitted, a run that cannot be sharded on Dask.

    Raises:
        ConfigError: Fewer than one shard, ``parallel`` out of range, a cap below ``parallel``,
            or a ledger in a SQLite file.
    """
    if type(shards) is not int or shards < 1:
        raise ConfigError(f"--shards must be an integer >= 1, got {shards!r}", location="--shards")
    if parallel is not None and not 1 <= parallel <= shards:
        raise ConfigError(
            f"--parallel must be between 1 and --shards {shards}, got {parallel!r}", location="--parallel"
        )
    if pipeline.ledger_path is not None:
        raise ConfigError(
            f"--dask runs the shards in worker processes, on other machines too, and they cannot share "
            f"the SQLite ledger file {pipeline.ledger_path}; keep the ledger in a table of a database every "
            'worker reaches: ledger = { use = "stages.db:mysql_ledger", database = "<name>" }',
            location="pipeline.ledger",
        )
    if parallel is not None:
        _plan(pipeline, "check", shards, parallel)


def _plan(pipeline: PipelineDefinition, run_id: str, shards: int, parallel: int) -> list[tuple[Lease, ...]]:
    """Each shard's leases: its share of every database's cap, and one of ``parallel`` slots."""
    prefix = f"pipeline/{pipeline.name}/{run_id}"
    plans = []
    for index in range(shards):
        shard = Shard(index, shards)
        leases = [Lease(SLOTS, f"{prefix}/{SLOTS}/{parallel}", parallel, 1)]
        for name, db in pipeline.databases.items():
            key = f"databases.{name}"
            want = cap_share(db.concurrency, parallel, shard, what=f"{key}.concurrency")
            leases.append(Lease(key, f"{prefix}/{key}/{db.concurrency}", db.concurrency, want))
        plans.append(tuple(leases))
    return plans


def run_on_dask(
    config: str | Path | PipelineDefinition,
    *,
    shards: int,
    address: str | Client,
    run_id: str | None = None,
    parallel: int | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
) -> ShardedReport:
    """Run ``shards`` shards of a pipeline as tasks on a Dask cluster, wait, and combine them.

    Args:
        config: A ``config.toml`` path, which every worker loads itself (so stages next to it
            are found), or a pipeline definition, pickled to the workers.
        shards: N, the number of shards (and tasks).
        address: The scheduler (``tcp://host:8786``), or a connected ``distributed.Client``.
        run_id: The run id every shard shares; by default the pipeline's name and today's date.
        parallel: How many shards may run at once (``P``, each taking its share of the caps);
            by default the cluster's worker threads when the shards are submitted, at most N
            and at most the smallest database ``concurrency``.
        limit: Read at most this many items in each shard.
        retry_failed: On a rerun of ``run_id``, take the failed items again too.

    Raises:
        ConfigError: The run cannot be sharded (see :func:`check_dask_run`); nothing ran.
        ResourceError: The scheduler cannot be reached.
    """
    try:
        import dask
        from distributed import Client
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"--dask needs Dask's distributed scheduler ({exc}); install the dask extra: "
            "pip install 'pipeline[dask]'"
        ) from exc

    if isinstance(config, PipelineDefinition):
        pipeline: PipelineDefinition = config
        payload: str | PipelineDefinition = config
    else:
        from ._config import load_config

        payload = str(Path(config).resolve())
        pipeline = load_config(payload)
    check_dask_run(pipeline, shards, parallel)
    run_id = run_id or default_run_id(pipeline.name)
    with contextlib.ExitStack() as stack:
        if isinstance(address, str):
            try:
                client = stack.enter_context(Client(address, timeout="10s"))
            except OSError as exc:
                raise ResourceError(
                    f"the Dask scheduler at {address} could not be reached ({type(exc).__name__}: {exc}); "
                    "check --dask (for example tcp://scheduler:8786) and that the scheduler runs"
                ) from exc
        else:
            client = address
        where = str(client.scheduler.address)
        threads = sum(int(w.get("nthreads", 1)) for w in client.scheduler_info()["workers"].values())
        # By default as many at once as the cluster runs, and never so many that a cap has no
        # lease for one of them; an explicit --parallel above a cap is refused instead.
        caps = [db.concurrency for db in pipeline.databases.values()]
        p = parallel or max(1, min([shards, threads or shards, *caps]))
        plans = _plan(pipeline, run_id, shards, p)
        timeout = dask.config.get(LEASE_TIMEOUT_KEY)
        _log_lease_settings(client, timeout)
        log.info("submitting %d shards of run %s to %s, %d at once", shards, run_id, where, p)
        tag = uuid.uuid4().hex[:8]  # a key of an earlier submission must not answer for this one
        started = time.perf_counter()
        futures = {
            client.submit(
                run_shard,
                ShardTask(payload, Shard(k, shards), run_id, p, plans[k], timeout, limit, retry_failed),
                key=f"pipeline-shard-{k}-of-{shards}-{run_id}-{tag}",
                pure=False,
            ): k
            for k in range(shards)
        }
        outcomes = _wait(futures, shards)
        report = combine(
            pipeline.name, run_id, outcomes, wall_s=time.perf_counter() - started, address=where, parallel=p
        )
        _close_semaphores(client, plans[0])
    if pipeline.report_dir is not None:
        report.write(pipeline.report_dir / run_id / "sharded-report.json")
    return report


def _wait(futures: Mapping[Future[ShardOutcome], int], shards: int) -> list[ShardOutcome]:
    """Each shard's outcome as it ends; a task that failed for good is a ``lost`` shard."""
    from distributed import as_completed

    outcomes = []
    for future in as_completed(list(futures)):
        label = str(Shard(futures[future], shards))
        try:
            outcome: ShardOutcome = future.result()
        except Exception as exc:
            # KilledWorker: its workers died more often than allowed-failures.
            outcome = ShardOutcome(label, "lost", 1, error=f"{type(exc).__name__}: {exc}")
        log.log(
            logging.INFO if outcome.status == "ok" else logging.ERROR,
            "shard %s ended %s%s%s",
            label,
            outcome.status,
            f" on {outcome.worker}" if outcome.worker else "",
            f": {outcome.error}" if outcome.error else "",
        )
        outcomes.append(outcome)
    return outcomes


def _log_lease_settings(client: Client, timeout: Any) -> None:
    """Say when a dead holder's leases come back, or that they never do."""
    import dask

    if timeout == "inf":
        log.warning(
            "%s is inf: the leases of a shard whose worker dies never return, and its rerun may wait forever",
            LEASE_TIMEOUT_KEY,
        )
        return
    try:
        interval = client.run_on_scheduler(lambda: dask.config.get(VALIDATION_KEY))
    except Exception:  # an old or locked-down scheduler: the figure is only informative
        interval = "?"
    log.info(
        "a dead shard's leases return after %s = %s plus the scheduler's %s = %s",
        LEASE_TIMEOUT_KEY,
        timeout,
        VALIDATION_KEY,
        interval,
    )


def _close_semaphores(client: Client, leases: Sequence[Lease]) -> None:
    """Forget the run's semaphores on the scheduler once every shard has ended."""
    scheduler: Any = client.scheduler
    for lease in leases:
        try:
            client.sync(scheduler.semaphore_close, name=lease.name)
        except Exception as exc:  # leases of a dead holder not yet expired: the scheduler warns
            log.debug("semaphore %s not closed: %s", lease.name, exc)


# -- the worker's side ------------------------------------------------------------------------


def run_shard(task: ShardTask) -> ShardOutcome:
    """Run one shard in a Dask worker, under leases of the run-wide caps (the task itself)."""
    import dask
    from distributed import get_worker

    label = str(task.shard)
    worker = get_worker()
    where = str(worker.address)
    _stop_task_profiler(worker, label)
    with dask.config.set({LEASE_TIMEOUT_KEY: task.lease_timeout}), _held(task.leases, label) as held:
        try:
            runner = Run(
                _sized(_load(task.config), held, task.parallel),
                shard=task.shard,
                parallel=1,  # the caps are divided already: by the leases held
                run_id=task.run_id,
                limit=task.limit,
                retry_failed=task.retry_failed,
                progress=False,
            )
            with run_id_context(runner.run_id):
                report = asyncio.run(_run_until_closing(runner, worker, label))
        except ConfigError as exc:
            return ShardOutcome(label, "failed", 2, where, held, error=f"config error: {exc}")
        except PipelineError as exc:
            failed: RunReport | None = getattr(exc, "report", None)
            return ShardOutcome(label, "failed", 1, where, held, failed, f"{type(exc).__name__}: {exc}")
    return ShardOutcome(label, report.status, report.exit_code, where, held, report, report.error)


def _stop_task_profiler(worker: Any, label: str) -> None:
    """On Python 3.11, stop the worker's task profiler before the shard starts, and wait until it
    has stopped.

    The profiler calls ``sys._current_frames()`` every 10 ms while a task runs, and on CPython 3.11
    a garbage collection that starts inside that call can deadlock the whole process: the call
    holds the interpreter's thread-list lock, and freeing a ``threading.local`` takes it again
    (python/cpython#106883, not fixed in 3.11; 3.12 collects at safe points only). A shard, with its
    dozens of threads, makes it likely: before this, a worker froze in 4 of 80 runs of this suite's
    Dask fault tests. Dask turns its event-loop profiler off on 3.11 for the same reason, but not
    this one. The worker's profile page on the dashboard stays empty from then on; other Python
    versions are left alone.
    """
    if sys.version_info[:2] != (3, 11):
        return
    callback = worker.periodic_callbacks.get("profile")
    if callback is None or not callback.is_running():
        return
    stopped = threading.Event()

    def stop() -> None:  # on the worker's own loop: a PeriodicCallback is not thread-safe
        callback.stop()
        stopped.set()

    worker.loop.add_callback(stop)
    if not stopped.wait(timeout=PROFILER_STOP_TIMEOUT):  # a worker closing: its loop may be gone
        log.warning("shard %s: could not stop the task profiler of worker %s", label, worker.address)
        return
    log.warning(
        "shard %s: stopped the task profiler of worker %s (CPython 3.11 can deadlock in it, "
        "python/cpython#106883; run the workers on Python 3.12+ to keep it)",
        label,
        worker.address,
    )


async def _run_until_closing(runner: Run, worker: Any, label: str) -> RunReport:
    """Run the shard; when its worker starts closing (SIGTERM, a preemption), stop it as a
    signal would: read no more, give what is in flight the grace period. No handler is installed
    (a worker thread cannot have one): the worker's own status is watched instead."""
    from distributed.core import Status

    async def watch() -> None:
        # Polled: the worker's status changes on its own loop, which offers another thread no event.
        while worker.status in (Status.init, Status.running, Status.paused):  # noqa: ASYNC110
            await asyncio.sleep(WATCH_INTERVAL)
        log.warning("shard %s: its worker is closing (%s); stopping the shard", label, worker.status.name)
        runner.request_stop(signal.SIGTERM)

    watcher = asyncio.create_task(watch(), name="pipeline-dask-worker-watch")
    try:
        # Signals are the worker's; a page would hold it 1-3 s (`pipeline report` draws it).
        return await runner.run(handle_signals=False, page=False)
    finally:
        watcher.cancel()


def _load(config: str | PipelineDefinition) -> PipelineDefinition:
    if isinstance(config, PipelineDefinition):
        return config
    from ._config import load_config

    return load_config(config)


def _sized(pipeline: PipelineDefinition, held: Mapping[str, int], parallel: int) -> PipelineDefinition:
    """``pipeline`` with each database's cap set to the leases held, and each rate divided by
    ``parallel`` (this shard holds one of that many slots)."""
    databases = {}
    for name, db in pipeline.databases.items():
        count = held.get(f"databases.{name}")
        if count is None:
            raise ConfigError(
                f"the worker's config has a database {name!r} that the submitted one had not; "
                "give every worker the same config file",
                location=f"databases.{name}",
            )
        databases[name] = _with(db, concurrency=count)
    stages = []
    for stage in pipeline.stages:
        if stage.rate is not None and parallel > 1:
            count_, period = parse_rate(stage.rate)
            stage = _with(stage, rate=f"{count_ / parallel:g}/{period:g}s")
        stages.append(stage)
    return _with(pipeline, databases=databases, stages=tuple(stages))


@contextlib.contextmanager
def _held(leases: Sequence[Lease], label: str) -> Iterator[dict[str, int]]:
    """Take each semaphore's leases (by name, so that waits cannot deadlock); give them back after."""
    from distributed import Semaphore

    held: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        for lease in sorted(leases, key=lambda lease: lease.name):
            semaphore = Semaphore(max_leases=lease.max_leases, name=lease.name)
            count = _take(semaphore, lease, label)
            stack.callback(_give_back, semaphore, count)
            held[lease.key] = count
        log.info("shard %s holds leases %s", label, held)
        yield held


def _take(semaphore: Semaphore, lease: Lease, label: str) -> int:
    """One lease, waited for; then as many more as are free, up to ``lease.want``."""
    if not semaphore.acquire(timeout=0):
        log.info("shard %s waits for a lease of %s (all %d are held)", label, lease.key, lease.max_leases)
        semaphore.acquire()
    count = 1
    while count < lease.want and semaphore.acquire(timeout=0):
        count += 1
    return count


def _give_back(semaphore: Semaphore, count: int) -> None:
    """Release ``count`` leases; from a closing worker, whose way to the scheduler may be gone,
    leave them to lapse after the lease timeout rather than hang its exit on retries."""
    from distributed import get_worker
    from distributed.core import Status

    if get_worker().status is not Status.running:
        log.warning(
            "the worker is closing: %d leases of %s lapse after the lease timeout", count, semaphore.name
        )
        return
    for _ in range(count):
        semaphore.release()
