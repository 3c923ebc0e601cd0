"""A batch pipeline that mixes async and blocking work.

The engine's modules, bottom up; each imports only modules above it in this list (``make lint``
checks it with import-linter)::

    _exceptions   the error hierarchy, plus Skip / TransientError / RetryAfter that stages raise
    _logs         the run's log context (its id) and the JSON log format
    _shard        Shard (K of N, by crc32 of the encoded key) and each shard's part of a run-wide cap
    _limiter      CapacityLimiter: a resizable cap, the one primitive every limit is built on
    _budget       the memory budget: items weighed by the bytes they hold, admission held
    _contract     the stage contract: Item, Context, DatabaseHandle, Batch, @factory, @batched,
                  @cpu_bound, @shards_itself
    _adaptive     Auto and the controllers behind concurrency = "auto"
    _definition   Source, Stage, Retry, Database, LedgerStore: the pipeline as data, checked when made
    _report       statistics, RunReport, dead letters (written and grouped), bottleneck advice
    _runstate     RunStatus, ShardStatus: a run's state across its shards, from a ledger's rows
    _ledger       RunLedger (the ledger contract), BufferedLedger, its one stored layout (LedgerSQL),
                  the default SQLite ledger
    _progress     live progress and the summary table (rich), rendered from a snapshot
    _timeline     the snapshot sampled about once a second while the run goes on (timeline.json)
    _tickets      every item's ticket and the tally that ends each exactly once
    _stage        one stage at run time: its workers, the one attempt path, retries, pauses
    _batch        a batched stage at run time: items gathered into calls, each ended on its own
    _threads      the run's threads: a lane (thread pool) per thread stage, and a shared pool
    _feed         the source read in batches: key checks, resume lookups, watermark
    _html         report.html from a run directory's files: matplotlib charts, inline SVG
    _run          the run: open, flow under one TaskGroup, stop and grace, close, report
    _pipeline     Pipeline: the definition that runs itself
    _config       config.toml -> Pipeline (tomllib + pydantic)
    _dask         `run --shards N --dask ADDRESS`: the shards as Dask tasks, caps held by leases
    _deadletters  a run's dead letters, grouped
    _status       `pipeline status`: each shard's state from the ledger, as a table or JSON
    _metrics      the report as Prometheus metrics
    _tune         `pipeline tune`: measure each cap
    _listing      `pipeline stages`: a module's stages, their kinds and options
    testing       helpers for testing a custom stage (public)
    cli           the `pipeline` command (public: ``pipeline.cli.main(argv)``)

The engine knows nothing of MySQL, HTTP or images: those are stages, in the ``stages`` package,
written against the same contract as yours.
"""

import dataclasses
import os

from ._adaptive import Auto
from ._contract import (
    Batch,
    Context,
    DatabaseHandle,
    Item,
    UsesDatabase,
    batched,
    cpu_bound,
    factory,
    shards_itself,
    weighs,
)
from ._definition import Database, LedgerStore, Retry, Source, Stage, parse_rate
from ._exceptions import (
    ConfigError,
    Overloaded,
    PipelineError,
    ResourceError,
    RetryAfter,
    Skip,
    SourceError,
    StageError,
    StageMisuse,
    StageTimeout,
    TransientError,
)
from ._ledger import (
    LEDGER_ITEMS,
    LEDGER_RUNS,
    BufferedLedger,
    LedgerColumn,
    LedgerSQL,
    LedgerTable,
    RunLedger,
    ShardedLedger,
    encode_key,
)
from ._limiter import CapacityLimiter, LimiterStatistics
from ._pipeline import Pipeline
from ._report import ItemCounts, RunReport, StageReport
from ._run import run, run_async
from ._runstate import RunStatus, ShardStatus
from ._shard import Shard

__all__ = [
    "Auto",
    "Batch",
    "BufferedLedger",
    "CapacityLimiter",
    "ConfigError",
    "Context",
    "Database",
    "DatabaseHandle",
    "LEDGER_ITEMS",
    "Item",
    "ItemCounts",
    "LedgerColumn",
    "LedgerSQL",
    "LedgerStore",
    "LedgerTable",
    "LimiterStatistics",
    "Pipeline",
    "Overloaded",
    "PipelineError",
    "ResourceError",
    "Retry",
    "RetryAfter",
    "LEDGER_RUNS",
    "RunLedger",
    "RunReport",
    "RunStatus",
    "Shard",
    "ShardStatus",
    "ShardedLedger",
    "Skip",
    "Source",
    "SourceError",
    "Stage",
    "StageError",
    "StageMisuse",
    "StageReport",
    "StageTimeout",
    "TransientError",
    "UsesDatabase",
    "batched",
    "cpu_bound",
    "encode_key",
    "factory",
    "load_config",
    "parse_rate",
    "run",
    "run_async",
    "shards_itself",
    "weighs",
]


def load_config(path: str | os.PathLike[str]) -> Pipeline:
    """Read a ``config.toml`` into a :class:`Pipeline` (see :mod:`pipeline._config`)."""
    from ._config import load_config as _load  # deferred: pydantic's import is not free

    return _load(path)


def _publish(names: list[str]) -> None:
    """Give the public names ``__module__ = "pipeline"``, as trio and httpx do, so that what is
    stored (a dead letter's ``error_type``) names ``pipeline.Overloaded`` and survives a rename
    of the private module that defines it.

    Dataclasses keep their defining module: ``typing.get_type_hints`` resolves their (string)
    field annotations in that module's namespace, and no stored data names them.
    """
    for name in names:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith(f"{__name__}._") and not dataclasses.is_dataclass(obj):
            obj.__module__ = __name__


_publish(__all__)
