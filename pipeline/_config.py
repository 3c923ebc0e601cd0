"""``config.toml`` to :class:`~pipeline.Pipeline`: parse with tomllib, validate with pydantic.

Every problem becomes one :class:`~pipeline.ConfigError` naming the file, the table and key,
the bad value and the fix, before anything runs. The shape::

    [pipeline]                 name, queue_size, grace_period, max_failures, report_dir, ledger, ...
    [databases.<name>]         dsn, concurrency (the one cap shared by every stage using it)
    [source]                   use = "module:callable", key, then the source's own options
    [[stages]]                 use, name, concurrency, queue_size, timeout, retry, kind, rate,
                               always, batch, then the stage's own options (checked against
                               its signature)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from ._adaptive import Auto
from ._contract import Batch, batch_of
from ._definition import Database, LedgerStore, Retry, Source, Stage
from ._exceptions import ConfigError
from ._pipeline import Pipeline

__all__ = ["load_config", "public_callables"]

_STRICT = ConfigDict(extra="forbid", strict=True)
_TABLES = ("pipeline", "databases", "source", "stages")
"""The file's top-level tables: a location starting with one is already absolute."""


class _LedgerTable(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    use: str


class _PipelineTable(BaseModel):
    model_config = _STRICT
    name: str = "pipeline"
    queue_size: int = Field(64, ge=1)
    grace_period: float = Field(30.0, ge=0)
    max_failures: int = Field(0, ge=0)
    report_dir: str = "runs"
    progress_interval: float = Field(10.0, gt=0)
    ledger: str | bool | _LedgerTable = True
    circuit_breaker: int = Field(0, ge=0)
    memory_budget: int | str | None = None

    @field_validator("ledger", mode="wrap")
    @classmethod
    def _one_ledger_message(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, dict):
            return _table(_LedgerTable, value, "ledger")
        if isinstance(value, str | bool):
            return handler(value)
        raise ValueError(
            'must be true, false, a path such as "runs/ledger.sqlite", or a table such as '
            f'{{ use = "stages.db:mysql_ledger", database = "catalog" }}; got {value!r}'
        )


class _DatabaseTable(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    dsn: str
    concurrency: int = Field(4, ge=1)


class _RetryTable(BaseModel):
    model_config = _STRICT
    attempts: int = Field(3, ge=1)
    backoff: float = Field(0.5, ge=0)
    max_backoff: float = Field(30.0, ge=0)
    jitter: float = Field(0.5, ge=0)
    on: list[str] = []


class _AutoTable(BaseModel):
    model_config = _STRICT
    auto: Literal[True] = True
    min: int = Field(1, ge=1)
    max: int | None = Field(None, ge=1)
    initial: int | None = Field(None, ge=1)
    algorithm: Literal["gradient", "throughput"] | None = None


class _BatchTable(BaseModel):
    model_config = _STRICT
    size: int | None = Field(None, ge=1)
    max_wait: float | None = Field(None, ge=0)


class _SourceTable(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    use: str
    key: str = "id"
    watermark: str | None = None


class _StageTable(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    use: str
    name: str | None = None
    concurrency: int | Literal["auto"] | _AutoTable = 1
    queue_size: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)
    retry: _RetryTable | None = None
    kind: Literal["async", "thread"] | None = None
    rate: str | None = None
    always: bool = False
    batch: _BatchTable | Literal[False] | None = None

    @field_validator("batch", mode="wrap")
    @classmethod
    def _one_batch_message(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, dict):
            return _table(_BatchTable, value, "batch")
        if value is False:
            return handler(value)
        raise ValueError(f"must be a table such as {{ size = 200, max_wait = 0.5 }}, or false; got {value!r}")

    @field_validator("concurrency", mode="wrap")
    @classmethod
    def _one_concurrency_message(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # A union reports one error per member; the operator wants one sentence.
        if isinstance(value, dict):
            return _table(_AutoTable, value, "concurrency")
        if value == "auto" or (type(value) is int and value >= 1):
            return handler(value)
        raise ValueError(
            f'must be an integer >= 1, "auto", or a table such as {{ min = 1, max = 32 }}; got {value!r}'
        )


class _ConfigFile(BaseModel):
    model_config = _STRICT
    pipeline: _PipelineTable = _PipelineTable()
    databases: dict[str, _DatabaseTable] = {}
    source: _SourceTable
    stages: list[_StageTable] = Field(min_length=1)


def _table(model: type[BaseModel], value: dict[str, Any], key: str) -> BaseModel:
    """Validate an inline table of a union-typed key, its first problem as one sentence.

    Inside a wrap validator, so the operator sees ``key.sub-key ...`` rather than one error per
    member of the union.
    """
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{key}.{_location(err['loc'])} {_explain(err)}") from None


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(err: Mapping[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    key = str(err["loc"][-1]) if err["loc"] else ""
    if kind == "missing":
        return f"{key!r} is required; add it"
    if kind == "extra_forbidden":
        return f"unknown key {key!r}; remove it or check its spelling"
    if kind in ("greater_than_equal", "greater_than"):
        op = ">=" if kind == "greater_than_equal" else ">"
        bound = ctx.get("ge", ctx.get("gt"))
        return f"must be {op} {bound}, got {value!r}; set it to a number {op} {bound}"
    if kind == "too_short":
        return f"needs at least one entry; add a [[{key}]] table"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        expected = err["msg"].removeprefix("Input should be ").removesuffix(".")
        return f"must be {expected}, got {value!r} ({type(value).__name__}); fix its type"
    return f"{err['msg']} (got {value!r})"


def _import(use: str, *, file: str, location: str) -> Any:
    """Import ``module:name`` (or ``module.name``), or explain what to fix."""
    module_name, sep, attr = use.partition(":")
    if not sep:
        module_name, _, attr = use.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f'{use!r} is not of the form "package.module:callable"; write it that way',
            file=file,
            location=location,
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import module {module_name!r} named by {use!r} ({exc}); check the spelling, "
            "and that the module is installed or next to the config file",
            file=file,
            location=location,
        ) from None
    except Exception as exc:  # the module itself is broken (a SyntaxError, an error at import)
        raise ConfigError(
            f"importing module {module_name!r} named by {use!r} raised {type(exc).__name__}: {exc}; "
            f"fix the module (`python -c 'import {module_name}'` shows the traceback)",
            file=file,
            location=location,
        ) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [name for name, _ in public_callables(module)] if obj is module else []
            close = difflib.get_close_matches(attr, names, n=1)
            hint = f". Did you mean {close[0]!r}?" if close else ""
            has = f" It has: {', '.join(names)}" if names else ""
            raise ConfigError(
                f"module {module_name!r} has no attribute {attr!r} (named by {use!r}); "
                f"check the spelling after the colon{hint}{has}",
                file=file,
                location=location,
            ) from None
    return obj


def public_callables(module: ModuleType) -> list[tuple[str, Any]]:
    """A module's public functions (its ``__all__``, else what it defines without a leading
    underscore), sorted by name: what a config's ``use`` can name. Classes and type aliases
    are left out."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__
        ]
    out = []
    for name in sorted(names):
        obj = getattr(module, name, None)
        if obj is None or isinstance(obj, type) or not callable(obj):
            continue
        if inspect.isroutine(obj) or type(obj).__module__ not in ("typing", "typing_extensions"):
            out.append((name, obj))
    return out


def _callable(use: str, *, file: str, location: str) -> Callable[..., Any]:
    obj = _import(use, file=file, location=location)
    if not callable(obj):
        raise ConfigError(
            f"{use!r} is a {type(obj).__name__}, not a callable; name a function",
            file=file,
            location=location,
        )
    return obj  # type: ignore[no-any-return]


def _exception_type(name: str, *, file: str, location: str) -> type[BaseException]:
    if ":" not in name and "." not in name:
        import builtins

        obj = getattr(builtins, name, None)
    else:
        obj = _import(name, file=file, location=location)
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise ConfigError(
            f'{name!r} is not an exception type; name one, for example "requests.ConnectionError"',
            file=file,
            location=location,
        )
    return obj


def _with_location(exc: ConfigError, file: str, prefix: str) -> ConfigError:
    location = f"{prefix}.{exc.location}" if exc.location else prefix
    return ConfigError(exc.message, file=file, location=location)


def load_config(path: str | os.PathLike[str]) -> Pipeline:
    """Read, validate and build the pipeline a TOML file describes.

    The config file's directory is put on ``sys.path``, so custom stages can live next to it.

    Raises:
        ConfigError: With the file, the table and key, and the fix.
    """
    path = Path(path)
    file = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("no such file; pass the path of your config.toml", file=file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", file=file) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"is not valid TOML: {exc}; fix the syntax there", file=file) from None
    try:
        cfg = _ConfigFile.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        more = f" ({len(errors) - 1} more problems after this one)" if len(errors) > 1 else ""
        raise ConfigError(_explain(first) + more, file=file, location=_location(first["loc"])) from None

    here = str(path.resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)

    databases = {}
    for name, db in cfg.databases.items():
        extra = dict(db.model_extra or {})
        databases[name] = Database(dsn=db.dsn, concurrency=db.concurrency, options=extra)

    source_fn = _callable(cfg.source.use, file=file, location="source.use")
    try:
        source = Source(
            source_fn,
            key=cfg.source.key,
            options=dict(cfg.source.model_extra or {}),
            watermark=cfg.source.watermark,
        )
    except ConfigError as exc:
        raise _with_location(exc, file, "source") from None

    stages = []
    for i, table in enumerate(cfg.stages):
        where = f"stages[{i}]"
        fn = _callable(table.use, file=file, location=f"{where}.use")
        retry = Retry()
        if table.retry is not None:
            on = tuple(_exception_type(n, file=file, location=f"{where}.retry.on") for n in table.retry.on)
            retry = Retry(
                attempts=table.retry.attempts,
                backoff=table.retry.backoff,
                max_backoff=table.retry.max_backoff,
                jitter=table.retry.jitter,
                on=on,
            )
        concurrency: int | Auto
        if table.concurrency == "auto":
            concurrency = Auto()
        elif isinstance(table.concurrency, _AutoTable):
            c = table.concurrency
            concurrency = Auto(min=c.min, max=c.max, initial=c.initial, algorithm=c.algorithm)
        else:
            concurrency = table.concurrency
        batch: Batch | Literal[False] | None = None
        if isinstance(table.batch, _BatchTable):
            # Keys left out keep the callable's own defaults (@pipeline.batched).
            base = batch_of(fn) or Batch()
            size = base.size if table.batch.size is None else table.batch.size
            max_wait = base.max_wait if table.batch.max_wait is None else table.batch.max_wait
            batch = Batch(size=size, max_wait=max_wait)
        elif table.batch is False:
            batch = False
        try:
            stages.append(
                Stage(
                    fn,
                    name=table.name or table.use.rpartition(":")[2] or table.use,
                    concurrency=concurrency,
                    rate=table.rate,
                    always=table.always,
                    queue_size=table.queue_size,
                    timeout=table.timeout,
                    retry=retry,
                    options=dict(table.model_extra or {}),
                    kind=table.kind,
                    batch=batch,
                )
            )
        except ConfigError as exc:
            raise _with_location(exc, file, where) from None

    p = cfg.pipeline
    ledger: Path | bool | LedgerStore
    if isinstance(p.ledger, _LedgerTable):
        ledger_fn = _callable(p.ledger.use, file=file, location="pipeline.ledger.use")
        try:
            ledger = LedgerStore(ledger_fn, options=dict(p.ledger.model_extra or {}))
        except ConfigError as exc:
            raise _with_location(exc, file, "pipeline.ledger") from None
    else:
        ledger = Path(p.ledger) if isinstance(p.ledger, str) else p.ledger
    try:
        return Pipeline(
            source=source,
            stages=stages,
            name=p.name,
            databases=databases,
            queue_size=p.queue_size,
            grace_period=p.grace_period,
            max_failures=p.max_failures,
            report_dir=Path(p.report_dir),
            progress_interval=p.progress_interval,
            ledger=ledger,
            circuit_breaker=p.circuit_breaker,
            memory_budget=p.memory_budget,
        )
    except ConfigError as exc:
        if exc.location and exc.location.split(".")[0].split("[")[0] in _TABLES:
            # Already the whole path (stages[1].database, databases.catalog.dsn).
            raise ConfigError(exc.message, file=file, location=exc.location) from None
        raise _with_location(exc, file, "pipeline") from None
