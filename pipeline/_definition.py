"""The pipeline as data: ``Source``, ``Stage``, ``Retry``, ``Database``, ``LedgerStore`` and the
fields of a ``Pipeline``.

These are what ``from pipeline import ...`` builds in code and what the TOML loader builds from
``config.toml``: one definition, one set of checks. Every check runs when the object is made,
so a bad definition fails before any item runs. Running one is :mod:`._run`'s business;
:class:`pipeline.Pipeline` (in :mod:`._pipeline`) joins the two.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._adaptive import Auto, check_cap
from ._budget import parse_size
from ._contract import Batch, DatabaseHandle, Kind, UsesDatabase, batch_of, describe, is_factory, stage_kind
from ._exceptions import ConfigError, TransientError
from ._limiter import CapacityLimiter
from ._shard import Shard, cap_share

__all__ = [
    "Database",
    "LedgerStore",
    "PipelineDefinition",
    "Retry",
    "Source",
    "Stage",
    "for_shard",
    "parse_rate",
    "validate_options",
]

DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (TransientError, TimeoutError, ConnectionError)


@dataclass(frozen=True)
class Retry:
    """Per-item retry policy of a stage, run by tenacity.

    Attempt *k* (from 1) that fails with a retryable exception is followed by a wait of
    ``backoff * 2**(k-1)`` seconds, capped at ``max_backoff``, plus up to ``jitter`` seconds
    of random jitter.

    Attributes:
        attempts: Attempts in all, including the first; ``1`` disables retries.
        backoff: The first wait, in seconds.
        max_backoff: The longest wait, in seconds.
        jitter: Up to this many seconds of random jitter added to each wait.
        on: Exception types that are retried, in addition to the defaults
            (:class:`~pipeline.TransientError`, ``TimeoutError``, ``ConnectionError``).
    """

    attempts: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    jitter: float = 0.5
    on: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry.attempts must be >= 1, got {self.attempts!r}")
        for name in ("backoff", "max_backoff", "jitter"):
            if getattr(self, name) < 0:
                raise ConfigError(f"retry.{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def retryable(self) -> tuple[type[BaseException], ...]:
        """Every exception type this policy retries."""
        return DEFAULT_RETRY_ON + tuple(self.on)


def parse_rate(rate: str) -> tuple[float, float]:
    """Parse ``"50/s"``, ``"3000/min"``, ``"10/5s"`` into ``(count, period_seconds)``.

    Raises:
        ConfigError: The rate is not of that form.
    """
    units = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    count_text, sep, period_text = rate.replace(" ", "").partition("/")
    unit = period_text.lstrip("0123456789.")
    number = period_text[: len(period_text) - len(unit)]
    try:
        count = float(count_text)
        period = (float(number) if number else 1.0) * units[unit]
    except (ValueError, KeyError):
        raise ConfigError(
            f'rate {rate!r} is not of the form "COUNT/UNIT"; write for example "50/s" or "3000/min"'
        ) from None
    if not sep or count <= 0 or period <= 0:
        raise ConfigError(f'rate {rate!r} must be a positive count per period, for example "50/s"')
    return count, period


@dataclass(frozen=True)
class Database:
    """A ``[databases.<name>]`` entry: a DSN and the one cap shared by every stage using it.

    Attributes:
        dsn: For example ``sqlite:///var/catalog.db`` or ``mysql://user@host:3306/db``.
        concurrency: At most this many operations on the database at once, across all stages.
        options: Further keys, passed through to the stages that open the database.
    """

    dsn: str = field(repr=False)  # may carry a password
    concurrency: int = 4
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_cap("concurrency", self.concurrency)

    def handle(self, name: str) -> DatabaseHandle:
        """This entry as a run's stages see it, named ``name``, with a new shared limiter."""
        return DatabaseHandle(
            name=name,
            dsn=self.dsn,
            limiter=CapacityLimiter(self.concurrency, name=f"database {name!r}"),
            options=self.options,
        )


def validate_options(
    fn: Callable[..., Any],
    options: Mapping[str, Any],
    *,
    skip_first: bool,
    engine_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Check ``options`` against ``fn``'s keyword parameters, with pydantic.

    Unknown names are refused unless ``fn`` takes ``**kwargs``; values are checked and coerced
    against the parameters' annotations. Returns only the options that were given.

    Raises:
        ConfigError: Naming the option, the value and what the callable accepts.
    """
    import pydantic  # deferred: keeps `pipeline --help` fast

    try:
        sig = inspect.signature(fn, eval_str=True)
    except (TypeError, ValueError, NameError):
        return dict(options)
    params = list(sig.parameters.values())
    if skip_first:
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise ConfigError(
                f"{describe(fn)} must take the item (or, for a factory, the context) as its "
                "first positional parameter"
            )
        params = params[1:]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    fields: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            continue
        annotation = Any if p.annotation is p.empty else p.annotation
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (annotation, default)
    accepted = ", ".join(sorted(fields)) or "no options"
    for name in options:
        if name not in fields and not var_kw:
            engine = f"; the engine's own keys are {', '.join(sorted(engine_keys))}" if engine_keys else ""
            close = difflib.get_close_matches(name, [*fields, *engine_keys], n=1)
            hint = f": did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown key {name!r}: {describe(fn)} accepts {accepted}{engine}. Check the spelling{hint}",
                location=name,
            )
    required = [n for n, (_, d) in fields.items() if d is ... and n not in options]
    if required:
        raise ConfigError(
            f"missing option {required[0]!r}, which {describe(fn)} requires; set it",
            location=required[0],
        )
    known = {n: v for n, v in options.items() if n in fields}
    try:
        model = pydantic.create_model(
            "Options",
            __config__=pydantic.ConfigDict(arbitrary_types_allowed=True),
            **{n: fields[n] for n in known},
        )
        checked = model(**known)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc, ctx, kind = err["loc"], err.get("ctx", {}), err["type"]
        name = str(loc[0]) if loc else "?"
        where = name + "".join(f"[{part!r}]" for part in loc[1:])
        # pydantic's own wording ("Input should be ...") becomes "<option> must be ..., got ...".
        ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        if kind.startswith(("greater_than", "less_than")):
            # pydantic names only the bound that failed; an option's other bound belongs in the sentence.
            meta = model.model_fields[name].metadata if len(loc) == 1 else []
            written = {k: getattr(m, k) for m in meta for k in ops if getattr(m, k, None) is not None}
            bounds = {**ctx, **written}  # as written: the context shows a float option's 0 as 0.0
            need = " and ".join(f"{ops[k]} {bounds[k]}" for k in ops if k in bounds)
            if bounds.keys() == {"ge", "le"}:
                need = f"between {bounds['ge']} and {bounds['le']}"
        elif kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
            need = "non-empty"
        else:
            need = {
                "bool_type": "true or false",
                "bool_parsing": "true or false",
                "int_type": "an integer",
                "int_parsing": "an integer",
                "int_from_float": "an integer",
                "float_type": "a number",
                "float_parsing": "a number",
                "finite_number": "a finite number",
                "string_type": "a string",
                "list_type": "a list",
                "dict_type": "a table",
                "literal_error": f"one of {ctx.get('expected')}",
                "too_short": f"at least {ctx.get('min_length')} long",
                "string_too_short": f"at least {ctx.get('min_length')} characters long",
                "string_too_long": f"at most {ctx.get('max_length')} characters long",
                "string_pattern_mismatch": f"matching the pattern {ctx.get('pattern')!r}",
            }.get(kind, "")
        if kind in ("value_error", "assertion_error"):
            detail = str(ctx["error"])  # a validator's own sentence, naming the value and the fix
        elif need:
            detail = f"{where} must be {need}, got {err['input']!r}"
        else:
            detail = f"{where}: {err['msg']}"
        raise ConfigError(
            f"option {name!r} = {known.get(name)!r} is invalid: {detail} "
            f"(see the signature of {describe(fn)})",
            location=name,
        ) from None
    except (TypeError, pydantic.PydanticSchemaGenerationError):
        return dict(options)  # an annotation pydantic cannot check: pass the value as given
    out = {n: getattr(checked, n) for n in known}
    out.update({n: v for n, v in options.items() if n not in fields})
    return out


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # cannot tell: let the call decide
    return any(
        p.kind is p.VAR_KEYWORD or (p.name == name and p.kind is not p.POSITIONAL_ONLY) for p in params
    )


@dataclass(frozen=True)
class Source:
    """Where items come from.

    Attributes:
        fn: A callable taking ``options`` as keyword arguments and returning an iterable or
            async iterable of dicts, or a :func:`~pipeline.factory` whose value is one.
        key: The field that identifies an item; it names the item in reports and dead letters.
        options: Keyword arguments for ``fn``.
        watermark: A field that grows when a row changes (for example ``updated_at``). When set,
            the engine passes ``since=<the largest value of the last successful run>`` to
            ``fn``, for incremental runs; ``fn`` must then accept ``since``.
    """

    fn: Callable[..., Any]
    key: str = "id"
    options: Mapping[str, Any] = field(default_factory=dict)
    watermark: str | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(f"source must be callable, got {self.fn!r}")
        object.__setattr__(
            self, "options", validate_options(self.fn, self.options, skip_first=is_factory(self.fn))
        )
        if self.watermark is not None and not _accepts(self.fn, "since"):
            raise ConfigError(
                f"source.watermark is set, but {describe(self.fn)} takes no 'since' option; "
                "use a source that reads incrementally, or remove watermark",
                location="watermark",
            )


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, with its own cap.

    Attributes:
        fn: The stage callable or :func:`~pipeline.factory` (see :mod:`pipeline` for the contract).
        name: Shown in reports; defaults to the callable's name.
        concurrency: At most this many items inside ``fn`` at once, or :class:`Auto` to have
            the engine measure and set it while the run goes on.
        queue_size: Bound of the queue in front of this stage; ``None`` takes the pipeline's.
        timeout: Seconds one attempt may take; ``None`` for no limit.
        retry: The per-item retry policy.
        options: Keyword arguments for ``fn``.
        kind: ``"async"`` or ``"thread"`` to assert how ``fn`` must run; a mismatch is refused.
        rate: At most this many attempts per period, for example ``"50/s"`` (aiolimiter).
        always: This stage also receives the items that failed or were skipped upstream, with
            ``status`` (``"failed"`` or ``"skipped"``), ``error`` and ``failed_stage`` set, so it
            can record them (a results table). They still count as failed or skipped.
        batch: A :class:`~pipeline.Batch` to hand ``fn`` lists of items, ``False`` to run a
            :func:`~pipeline.batched` factory one item at a time, or ``None`` (the default) for
            what ``fn`` declares with :func:`~pipeline.batched`. Only a callable marked
            batched takes lists. When batched, ``concurrency`` counts calls (batches) in flight
            and ``timeout`` and ``rate`` apply per call.
    """

    fn: Callable[..., Any]
    name: str = ""
    concurrency: int | Auto = 1
    queue_size: int | None = None
    timeout: float | None = None
    retry: Retry = field(default_factory=Retry)
    options: Mapping[str, Any] = field(default_factory=dict)
    kind: Literal["async", "thread"] | None = None
    rate: str | None = None
    always: bool = False
    batch: Batch | Literal[False] | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ConfigError(f"stage {self.name!r}: fn must be callable, got {self.fn!r}")
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", None) or "stage")
        if isinstance(self.concurrency, Auto):
            try:
                object.__setattr__(self, "concurrency", self.concurrency.resolve(self.fn))
            except ConfigError as exc:
                raise ConfigError(f"stage {self.name!r}: {exc.message}", location="concurrency") from None
        else:
            check_cap(f"stage {self.name!r}: concurrency", self.concurrency)
        if self.rate is not None:
            try:
                parse_rate(self.rate)
            except ConfigError as exc:
                raise ConfigError(f"stage {self.name!r}: {exc.message}", location="rate") from None
        if self.queue_size is not None:
            check_cap(f"stage {self.name!r}: queue_size", self.queue_size)
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"stage {self.name!r}: timeout must be > 0 seconds, got {self.timeout!r}")
        if not is_factory(self.fn):
            self.check_kind(stage_kind(self.fn))
        self._resolve_batch()
        object.__setattr__(
            self,
            "options",
            validate_options(self.fn, self.options, skip_first=True, engine_keys=_STAGE_KEYS),
        )

    def _resolve_batch(self) -> None:
        """Settle ``batch`` to a :class:`Batch` or ``False`` (so ``dataclasses.replace`` keeps it)."""
        declared = batch_of(self.fn)
        batch = declared if self.batch is None else self.batch
        if batch is None:
            batch = False
        elif batch is not False and not isinstance(batch, Batch):
            raise ConfigError(
                f"stage {self.name!r}: batch must be a pipeline.Batch, false or absent, got {batch!r}",
                location="batch",
            )
        if batch is not False and declared is None:
            raise ConfigError(
                f"stage {self.name!r}: batch is set, but {describe(self.fn)} takes one item; mark it "
                "@pipeline.batched (it then takes a list of items and returns one result per item), "
                "or remove batch",
                location="batch",
            )
        if batch is False and declared is not None and not is_factory(self.fn):
            raise ConfigError(
                f"stage {self.name!r}: batch = false, but {describe(self.fn)} takes a list of items "
                "(@pipeline.batched), so it cannot be handed one item; remove batch = false, or set "
                "batch = { size = 1 } for one item per call",
                location="batch",
            )
        if (
            batch is not False
            and not is_factory(self.fn)
            and stage_kind(self.fn) in ("async-gen", "thread-gen")
        ):
            raise ConfigError(
                f"stage {self.name!r}: {describe(self.fn)} is a generator, which cannot be batched "
                "(a batched stage returns one result per item); make it return a list",
                location="batch",
            )
        object.__setattr__(self, "batch", batch)

    @property
    def batching(self) -> Batch | None:
        """The stage's :class:`Batch`, or ``None`` when it takes one item per call."""
        return self.batch or None

    @property
    def auto(self) -> Auto | None:
        """The resolved adaptive settings, or ``None`` for a fixed cap."""
        return self.concurrency if isinstance(self.concurrency, Auto) else None

    @property
    def initial_concurrency(self) -> int:
        """The cap the stage starts with."""
        c = self.concurrency
        return (c.initial or 1) if isinstance(c, Auto) else c

    @property
    def max_concurrency(self) -> int:
        """The most the cap can ever be during the run."""
        c = self.concurrency
        return (c.max or 1) if isinstance(c, Auto) else c

    def check_kind(self, kind: Kind) -> None:
        """Refuse a callable whose kind contradicts the declared ``kind``."""
        runs_async = kind in ("async", "async-gen")
        if self.kind == "thread" and runs_async:
            raise ConfigError(
                f'stage {self.name!r} is declared kind = "thread" but {describe(self.fn)} is '
                "a coroutine function; a coroutine is never handed to a thread. Remove kind, "
                "or make the callable a plain def"
            )
        if self.kind == "async" and not runs_async:
            raise ConfigError(
                f'stage {self.name!r} is declared kind = "async" but {describe(self.fn)} is '
                "a plain function, which would block the event loop. Remove kind to run it in "
                "the thread pool, or make it async def"
            )


@dataclass(frozen=True)
class LedgerStore:
    """A pluggable ledger (TOML ``[pipeline] ledger = { use = "module:factory", ... }``).

    ``fn(ctx, **options)`` is a :func:`~pipeline.factory` whose context manager yields a
    :class:`~pipeline.RunLedger` for ``ctx.pipeline`` and ``ctx.run_id`` (``ctx.stage`` is
    ``"ledger"``). Like a stage's factory it may use ``ctx.database(name)`` and
    ``ctx.shared(...)``; the engine closes it, and the shared resources, after the run's last
    ledger write.

    Attributes:
        fn: The factory, for example ``stages.db.mysql_ledger``.
        options: Its keyword options, checked against its signature.
    """

    fn: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not is_factory(self.fn):
            raise ConfigError(
                f"{describe(self.fn)} is not a @pipeline.factory; a ledger's use must name a factory "
                "yielding a RunLedger, such as stages.db:mysql_ledger",
                location="use",
            )
        object.__setattr__(self, "options", validate_options(self.fn, self.options, skip_first=True))


_STAGE_KEYS = ("use", *(f.name for f in dataclasses.fields(Stage) if f.name not in ("fn", "options")))


def _database_options(fn: Callable[..., Any]) -> dict[str, tuple[UsesDatabase, Any]]:
    """``fn``'s options annotated with :class:`UsesDatabase`: name to (marker, default)."""
    try:
        params = inspect.signature(fn, eval_str=True).parameters.values()
    except (TypeError, ValueError, NameError):
        return {}
    found: dict[str, tuple[UsesDatabase, Any]] = {}
    for p in params:
        if typing.get_origin(p.annotation) is typing.Annotated:
            for meta in p.annotation.__metadata__:
                if isinstance(meta, UsesDatabase):
                    found[p.name] = (meta, None if p.default is p.empty else p.default)
    return found


def _check_database_options(
    users: Sequence[tuple[str, Callable[..., Any], Mapping[str, Any]]], databases: Mapping[str, Database]
) -> None:
    """Check every option that names a database (see :class:`UsesDatabase`) against ``databases``.

    Args:
        users: ``(location, callable, options)`` of the source, the stages and the ledger.
        databases: The configured entries.

    Raises:
        ConfigError: With the location of the option (``stages[1].database``) or of the entry's
            key (``databases.catalog.dsn``).
    """
    checked: set[tuple[str, int]] = set()
    for where, fn, options in users:
        for option, (marker, default) in _database_options(fn).items():
            name = options.get(option, default)
            if name is None:
                continue
            if name not in databases:
                known = ", ".join(sorted(databases)) or "none"
                raise ConfigError(
                    f"{option} = {name!r} names a database that is not configured (configured: "
                    f"{known}); add a [databases.{name}] table or fix the name",
                    location=f"{where}.{option}",
                )
            if marker.check is None or (name, id(marker.check)) in checked:
                continue
            checked.add((name, id(marker.check)))
            entry = databases[name]
            try:
                marker.check(name, entry.dsn, entry.options)
            except ConfigError as exc:
                key = f".{exc.location}" if exc.location else ""
                raise ConfigError(exc.message, location=f"databases.{name}{key}") from None


@dataclass(frozen=True)
class PipelineDefinition:
    """The fields of a :class:`pipeline.Pipeline` (documented there) and their checks; it adds
    ``run()``. The run (:mod:`._run`) takes this, so that the definition need not import it."""

    source: Source
    stages: Sequence[Stage]
    name: str = "pipeline"
    databases: Mapping[str, Database] = field(default_factory=dict)
    queue_size: int = 64
    grace_period: float = 30.0
    max_failures: int = 0
    report_dir: Path | None = Path("runs")
    progress_interval: float = 10.0
    ledger: Path | bool | LedgerStore = True
    circuit_breaker: int = 0
    memory_budget: int | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ConfigError("a pipeline needs at least one stage")
        check_cap("queue_size", self.queue_size)
        if self.grace_period < 0:
            raise ConfigError(f"grace_period must be >= 0 seconds, got {self.grace_period!r}")
        if self.circuit_breaker < 0:
            raise ConfigError(f"circuit_breaker must be >= 0, got {self.circuit_breaker!r}")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures!r}")
        if self.memory_budget is not None:
            object.__setattr__(self, "memory_budget", parse_size(self.memory_budget))
        users: list[tuple[str, Callable[..., Any], Mapping[str, Any]]] = [
            ("source", self.source.fn, self.source.options),
            *((f"stages[{i}]", s.fn, s.options) for i, s in enumerate(self.stages)),
        ]
        if isinstance(self.ledger, LedgerStore):
            users.append(("pipeline.ledger", self.ledger.fn, self.ledger.options))
        _check_database_options(users, self.databases)
        # Names key the report; the same callable used twice gets "name-2", "name-3", ...
        seen: dict[str, int] = {}
        stages = []
        for stage in self.stages:
            n = seen[stage.name] = seen.get(stage.name, 0) + 1
            stages.append(dataclasses.replace(stage, name=f"{stage.name}-{n}") if n > 1 else stage)
        object.__setattr__(self, "stages", tuple(stages))

    @property
    def ledger_path(self) -> Path | None:
        """The SQLite ledger file this pipeline's runs use, or ``None`` (none, or a pluggable one)."""
        if self.ledger is True:
            return self.report_dir / "ledger.sqlite" if self.report_dir is not None else None
        if self.ledger is False or isinstance(self.ledger, LedgerStore):
            return None
        return self.ledger


def for_shard(pipeline: PipelineDefinition, shard: Shard, parallel: int) -> PipelineDefinition:
    """``pipeline`` with its run-wide caps divided for one of ``parallel`` shards running at once.

    Each ``[databases.<name>] concurrency`` becomes this shard's :func:`~pipeline._shard.cap_share`
    (floor split, the lowest ``cap % parallel`` shard indexes one more); each stage's ``rate``
    becomes ``count / parallel`` per the same period, which needs no rounding. A stage's own
    ``concurrency`` is a cap on this process and stays as it is.

    Raises:
        ConfigError: A database's concurrency is below ``parallel``.
    """
    if parallel == 1:
        return pipeline
    databases = {}
    for name, db in pipeline.databases.items():
        databases[name] = _with(
            db, concurrency=cap_share(db.concurrency, parallel, shard, what=f"databases.{name}.concurrency")
        )
    stages = []
    for stage in pipeline.stages:
        if stage.rate is not None:
            count, period = parse_rate(stage.rate)
            stage = _with(stage, rate=f"{count / parallel:g}/{period:g}s")
        stages.append(stage)
    return _with(pipeline, databases=databases, stages=tuple(stages))


_T = typing.TypeVar("_T")


def _with(obj: _T, **changes: Any) -> _T:
    """A copy of a checked frozen definition with ``changes``, not checked again (no options are
    re-validated, no stage renamed twice): only for values the caller derived from checked ones."""
    new = copy.copy(obj)
    for name, value in changes.items():
        object.__setattr__(new, name, value)
    return new
