"""The ``lookup`` stage: a parameterised query per item, its first row merged into the item.

Batched by default (``@pipeline.batched``): a batch's queries go to the database as one
statement, each item's own query, with its own parameters, wrapped and tagged::

    SELECT 0 AS <tag>, q.* FROM (<query>) AS q
    UNION ALL
    SELECT 1 AS <tag>, q.* FROM (<query>) AS q ...

so the database compares each item's values exactly as it would alone (its collation, its
type conversions): rows are never matched back to items in Python. Each item takes the first
row tagged with its member, as ``fetch_one`` takes the first row of the query alone. (Wrapping
each member in ``LIMIT 1`` would send fewer rows, but stops MariaDB merging the derived table:
on a primary-key lookup it made the statement 2.2x slower.) A batch of one runs the query as
written. SQLite takes at most 500 members in a compound statement, so a batch is sent in
statements of at most :data:`_MEMBERS` queries.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Literal

from pipeline import ConfigError, Context, Item, Skip, batched, factory

from ._database import DatabaseName, shared_database
from ._errors import RowNotFoundError
from ._sql import _translate_sql

__all__ = ["MissingPolicy", "lookup"]

MissingPolicy = Literal["fail", "skip", "keep"]
"""What :func:`lookup` does when no row matches an item."""

_TAG = "pipeline_lookup_item__"
"""The column that says which item of a batch a row belongs to (removed from the row)."""

_MEMBERS = 250
"""At most this many items' queries in one statement: below SQLite's 500 compound members."""

_PARAMETERS = 30_000
"""At most this many ``?`` in one statement: below SQLite's 32,766 (MySQL has no such limit)."""


@functools.lru_cache(maxsize=64)
def _batch_sql(query: str, members: int) -> str:
    """One statement running ``query`` ``members`` times, each row tagged with its member."""
    body = query.strip().rstrip(";").rstrip()
    # The newlines keep a trailing `-- comment` in the query from eating the wrapper.
    return "\nUNION ALL\n".join(
        f"SELECT {i} AS {_TAG}, q{i}.* FROM (\n{body}\n) AS q{i}" for i in range(members)
    )


@batched(size=200, max_wait=0.5)
@factory
@contextlib.asynccontextmanager
async def lookup(
    ctx: Context,
    *,
    database: DatabaseName,
    query: str,
    params: list[str],
    missing: MissingPolicy = "fail",
) -> AsyncIterator[Callable[[Any], Coroutine[Any, Any, Any]]]:
    """Stage: run a parameterised query per item and add its first row's columns to the item.

    Batched by default (``batch = { size = 200, max_wait = 0.5 }``): the queries of a batch go
    to the database as one statement (each item's query with its own values, so the rows each
    item gets are the ones it would get alone). If the statement fails, the engine runs the
    batch's items one by one, so only the item at fault fails. ``batch = false`` sends one query
    per item. When several rows can match, say which one the item gets with ``ORDER BY ...
    LIMIT 1``: in a batch the query is a subquery, and databases may ignore an ``ORDER BY``
    there that has no ``LIMIT``.

    Args:
        ctx: The engine's context.
        database: The ``[databases.<name>]`` to query.
        query: SQL with one ``?`` per entry of ``params``, for example
            ``SELECT owner, licence FROM assets WHERE id = ?``.
        params: Item field names whose values fill the placeholders, in order.
        missing: When no row matches: ``"fail"`` fails the item
            (:class:`~stages.db.RowNotFoundError`), ``"skip"`` skips it, ``"keep"`` passes it on
            unchanged. The engine refuses any other value when the stage is made.

    Raises:
        ConfigError: The placeholder count differs from ``len(params)``.
    """
    db = await shared_database(ctx, database)
    placeholders = _translate_sql(query, db.dialect)[1]
    if placeholders != len(params):
        raise ConfigError(
            f"the lookup query has {placeholders} ? placeholders but params names {len(params)} "
            f"fields ({params!r}); give one field per placeholder"
        )
    fields = tuple(params)
    members = max(1, min(_MEMBERS, _PARAMETERS // max(1, len(fields))))

    def values_of(item: Item) -> list[Any]:
        try:
            return [item[name] for name in fields]
        except KeyError as exc:
            raise ValueError(
                f"lookup needs item field {exc.args[0]!r} for its query, but the item has only "
                f"{sorted(item)}; add the field in an earlier stage or fix params"
            ) from None

    def outcome(item: Item, values: Sequence[Any], row: Item | None) -> Item | Exception:
        """The item with its row merged in, or the error that ends it (``missing``)."""
        if row is None:
            shown = ", ".join(f"{name}={value!r}" for name, value in zip(fields, values, strict=True))
            if missing == "skip":
                return Skip(f"no row in database {db.name!r} for {shown}")
            if missing == "fail":
                return RowNotFoundError(
                    f"lookup found no row in database {db.name!r} for {shown}; fix the data, or set "
                    "missing='skip' or 'keep'"
                )
            return item
        item.update(row)
        return item

    async def run(item: Item) -> Item:
        values = values_of(item)
        row = await db.fetch_one(query, values, action="looking up a row")
        result = outcome(item, values, row)
        if isinstance(result, Exception):
            raise result
        return result

    async def run_batch(items: list[Item]) -> list[Item | Exception]:
        if len(items) == 1:  # an item alone: exactly what the unbatched stage does
            return [await run(items[0])]
        results: list[Item | Exception] = list(items)
        asked: list[tuple[int, list[Any]]] = []
        for i, item in enumerate(items):
            try:
                asked.append((i, values_of(item)))
            except ValueError as exc:  # this item's own fault: it fails alone
                results[i] = exc
        for start in range(0, len(asked), members):
            chunk = asked[start : start + members]
            rows = await db.fetch_all(
                _batch_sql(query, len(chunk)),
                [value for _, values in chunk for value in values],
                action=f"looking up {len(chunk)} rows",
            )
            first: dict[int, Item] = {}
            for row in rows:
                first.setdefault(int(row.pop(_TAG)), row)
            for member, (i, values) in enumerate(chunk):
                results[i] = outcome(items[i], values, first.get(member))
        return results

    yield run if ctx.batch is None else run_batch
