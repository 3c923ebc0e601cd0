"""A batch pipeline that mixes async and blocking work.

The layers, bottom up (each imports only those below it)::

    _exceptions   the error hierarchy, plus Skip / TransientError / RetryAfter that stages raise
    _limiter      CapacityLimiter: a resizable cap, the one primitive every limit is built on
    _contract     the stage contract: Item, StageFunction, Context, @factory
    _definition   Pipeline, Source, Stage, Retry, Database: the pipeline as data, checked on creation
    _report       statistics, RunReport, dead letters
    _ledger       RunLedger, the ledger contract; its one stored layout (LedgerSQL); the SQLite ledger
    _runner       the run: bounded queues, worker pools under caps, retries, graceful stop
    _config       config.toml -> Pipeline (tomllib + pydantic)
    _progress     live progress and the summary table (rich)
    _cli          the `pipeline` command
    testing       in-memory helpers for testing a custom stage

The engine knows nothing of MySQL, HTTP or images: those are stages, in the ``stages`` package,
written against the same contract as yours.
"""

from ._contract import Context, DatabaseHandle, Item, StageFunction, factory
from ._definition import Auto, Database, LedgerStore, Pipeline, Retry, Source, Stage, cpu_bound, parse_rate
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
    encode_key,
)
from ._limiter import CapacityLimiter, LimiterStatistics
from ._report import ItemCounts, RunReport, StageReport

__all__ = [
    "Auto",
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
    "Skip",
    "Source",
    "SourceError",
    "Stage",
    "StageError",
    "StageFunction",
    "StageMisuse",
    "StageReport",
    "StageTimeout",
    "TransientError",
    "cpu_bound",
    "encode_key",
    "factory",
    "load_config",
    "parse_rate",
]


def load_config(path: str, **kwargs: object) -> Pipeline:
    """Read a ``config.toml`` into a :class:`Pipeline` (see :mod:`pipeline._config`)."""
    from ._config import load_config as _load

    return _load(path, **kwargs)  # type: ignore[arg-type]
