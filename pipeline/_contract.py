"""The stage contract: what a source or stage callable is, and what it may ask of the engine.

Built-in stages (``stages/``) use exactly this contract; there is no private door.

A **stage** is one of:

* an ``async def stage(item, **options) -> item``: runs on the event loop;
* a plain ``def stage(item, **options) -> item``: runs in the engine's thread pool;
* an async or sync generator function yielding items: fan-out, one item in, any number out;
* a :func:`factory`: ``factory(ctx, **options)`` returns an async context manager whose value is
  one of the above. The engine enters it before the stage's first item and exits it after the
  last, even when the run fails. That is the place for sessions, pools and files;
* a **batched** stage (:func:`batched`, or ``batch = { size, max_wait }`` on a callable marked
  so): ``stage(items, **options) -> results`` takes a list of up to ``size`` items and returns
  one result per item, in order. A result is the item for the next stage, or an exception
  instance that ends that item alone as if it had raised it (:class:`~pipeline.Skip` skips it;
  a retryable error retries it alone). If the call raises, its items run again one by one, each
  as a list of one: that isolates the item at fault, it is not a retry.

A **source** is a callable taking its options as keyword arguments and returning an iterable or
async iterable of dicts (a generator function is the usual shape), or a :func:`factory` whose
value is such an iterable.

A stage returns the item for the next stage (usually the same dict with fields added), or raises
:class:`~pipeline.Skip` to end it as skipped. Any other exception fails the item in that stage;
:class:`~pipeline.TransientError` (and the stage's configured ``retry.on`` types) are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import (
    Callable,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias, TypeVar

from ._exceptions import ConfigError
from ._limiter import CapacityLimiter
from ._shard import Shard

__all__ = [
    "Batch",
    "Context",
    "DatabaseHandle",
    "UsesDatabase",
    "Item",
    "SharedResources",
    "batch_of",
    "batched",
    "cpu_bound",
    "describe",
    "estimate_of",
    "factory",
    "is_factory",
    "shards_itself",
    "shards_source",
    "stage_kind",
    "weighs",
    "workload",
]

Item: TypeAlias = dict[str, Any]
"""An item: the source row's columns plus whatever stages add."""

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class DatabaseHandle:
    """A ``[databases.<name>]`` entry as a stage sees it.

    The engine knows nothing of SQL: it keeps the DSN and the one limiter that every stage
    touching this database shares. Stages open connections themselves (see ``stages.db``)
    and hold ``limiter`` around every use of a connection.

    Attributes:
        name: The table name under ``[databases]``.
        dsn: The configured DSN, as written (it may carry a password: never log it).
        limiter: The database's shared cap.
        options: Any further keys of the table.
    """

    name: str
    dsn: str = field(repr=False)  # may carry a password
    limiter: CapacityLimiter
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UsesDatabase:
    """In an option's annotation: the option names a ``[databases.<name>]`` entry.

    ``database: Annotated[str, pipeline.UsesDatabase(check)]``. When the pipeline is defined
    (so at ``load_config`` and ``pipeline validate``, before anything runs), the engine refuses
    a name that is not configured, and calls ``check(name, dsn, options)`` with the named
    entry's DSN and further keys. ``check`` raises :class:`~pipeline.ConfigError` (its
    ``location`` the entry's key, such as ``"dsn"``) for what the stage cannot use: the engine
    knows nothing of what a DSN or an option means.

    Attributes:
        check: Validates the entry; ``None`` checks only that it is configured.
    """

    check: Callable[[str, str, Mapping[str, Any]], None] | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """How a batched stage is handed its items (TOML ``batch = { size = 200, max_wait = 0.5 }``).

    The engine gathers up to ``size`` items from the stage's queue into one call; it calls with
    fewer when ``max_wait`` seconds have passed since the first item of the batch arrived, or
    when the input ends (a stop included: a partial batch is flushed, never dropped).

    Attributes:
        size: The most items in one call (>= 1).
        max_wait: Seconds a partial batch waits for more items (>= 0; 0 takes what is queued).
    """

    size: int = 100
    max_wait: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(
                f"must be an integer >= 1 (the most items one call takes), got {self.size!r}",
                location="batch.size",
            )
        wait = self.max_wait
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait < float("inf"):
            raise ConfigError(
                f"must be a number of seconds >= 0 (how long a partial batch waits), got {wait!r}",
                location="batch.max_wait",
            )


class SharedResources:
    """Run-scoped resources, opened on first use and closed together at the end of the run."""

    def __init__(self) -> None:
        self.stack = contextlib.AsyncExitStack()
        self._values: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def get(self, key: str, opener: Callable[[], contextlib.AbstractAsyncContextManager[T]]) -> T:
        async with self._lock:
            if key not in self._values:
                self._values[key] = await self.stack.enter_async_context(opener())
            value: T = self._values[key]
            return value


class Context:
    """What the engine hands a :func:`factory`: the run, the stage, and shared resources.

    Attributes:
        pipeline: The pipeline's name.
        run_id: This run's id.
        stage: The stage's name (``"source"`` for the source).
        limiter: The stage's own cap; ``None`` for the source.
        max_concurrency: The most ``limiter.total`` can become during the run (it moves
            with ``concurrency = "auto"``): size connection pools by this.
        timeout: The stage's ``timeout`` (seconds one attempt may take), or ``None``. A thread
            stage cannot be cancelled: give its calls a deadline of their own within this, or
            a timed-out call keeps its slot until it returns.
        batch: The stage's :class:`Batch` when it runs batched, else ``None``. A
            :func:`batched` factory yields a callable taking a list of items when this is set,
            and one taking an item when it is not (``batch = false``).
        shard: The :class:`~pipeline.Shard` this process runs (``--shard K/N``), or ``None`` for
            a whole run. A source marked :func:`shards_itself` yields only the items it owns.
    """

    def __init__(
        self,
        *,
        pipeline: str,
        run_id: str,
        stage: str,
        limiter: CapacityLimiter | None,
        databases: Mapping[str, DatabaseHandle],
        shared: SharedResources,
        pause: Callable[[float], None] | None = None,
        max_concurrency: int | None = None,
        timeout: float | None = None,
        batch: Batch | None = None,
        shard: Shard | None = None,
    ):
        self.pipeline = pipeline
        self.shard = shard
        self.timeout = timeout
        self.batch = batch
        self.max_concurrency = max_concurrency or (limiter.total if limiter is not None else 1)
        self.ceiling: int | None = None
        """The lowest hard ceiling declared with :meth:`cap_at` (or by :meth:`database`)."""
        self.estimate: Callable[[Item], int] | None = None
        """What an attempt allocates per item, as declared with :meth:`weighs`."""
        self.run_id = run_id
        self.stage = stage
        self.limiter = limiter
        self._databases = databases
        self._shared = shared
        self._pause = pause

    def database(self, name: str) -> DatabaseHandle:
        """Return the ``[databases.<name>]`` entry, with its shared limiter.

        Raises:
            ConfigError: No database of that name is configured.
        """
        try:
            handle = self._databases[name]
        except KeyError:
            known = ", ".join(sorted(self._databases)) or "none"
            raise ConfigError(
                f"stage {self.stage!r} uses database {name!r}, which is not configured "
                f"(configured: {known}); add a [databases.{name}] table or fix the name"
            ) from None
        # More slots than the database's pool only queue in front of it.
        self.cap_at(handle.limiter.total)
        return handle

    def weighs(self, estimate: Callable[[Item], int]) -> None:
        """Declare what each attempt of this stage allocates for an item, for ``memory_budget``
        (see :func:`pipeline.weighs`, the decorator for a plain stage function): a factory
        knows its options, so it can say, for example, ``ctx.weighs(lambda item: max_bytes)``."""
        self.estimate = estimate

    def cap_at(self, ceiling: int) -> None:
        """Declare a hard ceiling for this stage's cap, such as a pool size.

        ``concurrency = "auto"`` never goes above it. :meth:`database` declares the
        database's concurrency (its pool size) this way.
        """
        self.ceiling = ceiling if self.ceiling is None else min(self.ceiling, ceiling)

    async def shared(self, key: str, opener: Callable[[], contextlib.AbstractAsyncContextManager[T]]) -> T:
        """Open a resource once per run, shared by every stage that asks with the same key.

        The first caller enters ``opener()``; later callers get the same value. The engine
        exits it after every stage has closed, even when the run fails.

        Args:
            key: Identifies the resource, for example ``"mysql-pool:catalog"``.
            opener: Returns the async context manager to enter on first use.
        """
        return await self._shared.get(key, opener)

    def pause(self, seconds: float) -> None:
        """Pause the whole stage: no worker starts another attempt for ``seconds``.

        Raising :class:`~pipeline.RetryAfter` from the stage does this and retries the item.
        """
        if self._pause is not None:
            self._pause(seconds)


def factory(fn: F) -> F:
    """Mark ``fn`` as a stage or source factory.

    ``fn(ctx, **options)`` must return an async context manager whose value is the stage
    callable (or, for a source, the iterable of items). The engine enters it before the first
    item and exits it after the last, even on failure::

        @pipeline.factory
        @contextlib.asynccontextmanager
        async def download(ctx: pipeline.Context, *, timeout: float = 10.0):
            session = requests.Session()
            try:
                yield lambda item: {**item, "body": session.get(item["url"], timeout=timeout).content}
            finally:
                session.close()
    """
    fn.__pipeline_factory__ = True  # type: ignore[attr-defined]
    return fn


def is_factory(fn: object) -> bool:
    """Whether ``fn`` was marked with :func:`factory`."""
    return bool(getattr(fn, "__pipeline_factory__", False))


Kind = Literal["async", "thread", "async-gen", "thread-gen"]


def stage_kind(fn: Callable[..., Any]) -> Kind:
    """Tell how the engine runs a stage callable, from the callable itself."""
    call = fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn) or hasattr(fn, "func")):
        # A callable object: look at its __call__ (functools.partial is handled by inspect).
        call = getattr(fn, "__call__", fn)  # noqa: B004
    if inspect.isasyncgenfunction(call):
        return "async-gen"
    if inspect.iscoroutinefunction(call):
        return "async"
    if inspect.isgeneratorfunction(call):
        return "thread-gen"
    return "thread"


def cpu_bound(fn: F) -> F:
    """Mark a stage callable (or factory) as CPU-bound.

    With ``concurrency = "auto"``, a CPU-bound stage is tuned by throughput (hill climbing)
    and capped at the number of cores; any other stage follows the latency of its calls.
    """
    fn.__pipeline_workload__ = "cpu"  # type: ignore[attr-defined]
    return fn


def batched(*, size: int = 100, max_wait: float = 0.5) -> Callable[[F], F]:
    """Mark a stage callable (or factory) as batched, with its default :class:`Batch`.

    A plain callable then takes a list of up to ``size`` items and returns one result per item,
    in order (the item, or an exception instance for that item alone); a stage's ``batch`` table
    in the config overrides ``size`` and ``max_wait``::

        @pipeline.batched(size=200, max_wait=0.5)
        async def score(items):
            scores = await model.predict([item["text"] for item in items])
            return [{**item, "score": s} for item, s in zip(items, scores)]

    A factory marked so reads ``ctx.batch``: a :class:`Batch` (yield the batch callable) or
    ``None`` when the config says ``batch = false`` (yield a per-item callable).

    Raises:
        ConfigError: ``size`` or ``max_wait`` is out of range.
    """
    default = Batch(size=size, max_wait=max_wait)

    def mark(fn: F) -> F:
        fn.__pipeline_batch__ = default  # type: ignore[attr-defined]
        return fn

    return mark


def batch_of(fn: object) -> Batch | None:
    """The default :class:`Batch` ``fn`` declared with :func:`batched`, or ``None``."""
    batch: Batch | None = getattr(fn, "__pipeline_batch__", None)
    return batch


def shards_itself(fn: F) -> F:
    """Mark a source :func:`factory` as filtering by shard itself (pushed down into its query).

    When a run is sharded, the engine hands the source its shard as ``ctx.shard`` either way;
    a marked source must then yield only the items whose encoded key the shard owns
    (:meth:`pipeline.Shard.owns`, or a query computing the same ``crc32``), and the engine does
    not look again. An unmarked source yields every item, and the engine drops the ones
    another shard owns, after reading them. ``stages.db:read_rows`` is marked::

        @pipeline.shards_itself
        @pipeline.factory
        @contextlib.asynccontextmanager
        async def rows(ctx: pipeline.Context):
            ...  # WHERE CRC32(CAST(id AS CHAR)) % {ctx.shard.count} = {ctx.shard.index}

    Raises:
        ConfigError: ``fn`` is not a factory (a plain source has no context to get its shard from).
    """
    if not is_factory(fn):
        raise ConfigError(
            f"{describe(fn)} is marked @pipeline.shards_itself but is not a @pipeline.factory; "
            "only a factory gets ctx.shard. Make it a factory, or drop the mark to let the engine filter"
        )
    fn.__pipeline_shards_itself__ = True  # type: ignore[attr-defined]
    return fn


def shards_source(fn: object) -> bool:
    """Whether ``fn`` was marked with :func:`shards_itself`."""
    return bool(getattr(fn, "__pipeline_shards_itself__", False))


def weighs(estimate: Callable[[Item], int]) -> Callable[[F], F]:
    """Declare what an attempt of a stage allocates for an item, for ``memory_budget``.

    ``estimate(item)`` returns the bytes the attempt holds beyond the item itself (decoded
    pixels, read from an image's header, for a thumbnail stage). With ``[pipeline]
    memory_budget`` set, the run counts them while the attempt runs; without, it never calls
    ``estimate``. It must be cheap and must not raise (an error counts as 0)::

        @pipeline.weighs(lambda item: 4 * declared_pixels(item["body"]))
        def thumbnail(item): ...
    """

    def mark(fn: F) -> F:
        fn.__pipeline_weighs__ = estimate  # type: ignore[attr-defined]
        return fn

    return mark


def estimate_of(fn: object) -> Callable[[Item], int] | None:
    """The estimate ``fn`` declared with :func:`weighs`, or ``None``."""
    estimate: Callable[[Item], int] | None = getattr(fn, "__pipeline_weighs__", None)
    return estimate


def workload(fn: object) -> Literal["cpu", "io"]:
    """``"cpu"`` for a :func:`cpu_bound` callable, else ``"io"``."""
    return "cpu" if getattr(fn, "__pipeline_workload__", None) == "cpu" else "io"


def describe(fn: object) -> str:
    """``module:qualname`` of a callable, for messages."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or repr(fn)
    return f"{module}:{qualname}" if module else qualname
