"""The ``lookup`` stage: one parameterised query per item, its first row merged into the item."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Literal

from pipeline import ConfigError, Context, Item, Skip, factory

from ._database import DatabaseName, shared_database
from ._errors import RowNotFoundError
from ._sql import _translate_sql

__all__ = ["MissingPolicy", "lookup"]

MissingPolicy = Literal["fail", "skip", "keep"]
"""What :func:`lookup` does when no row matches an item."""


@factory
@contextlib.asynccontextmanager
async def lookup(
    ctx: Context,
    *,
    database: DatabaseName,
    query: str,
    params: list[str],
    missing: MissingPolicy = "fail",
) -> AsyncIterator[Callable[[Item], Coroutine[Any, Any, Item]]]:
    """Stage: run a parameterised query per item and add its first row's columns to the item.

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

    async def run(item: Item) -> Item:
        try:
            values = [item[name] for name in fields]
        except KeyError as exc:
            raise ValueError(
                f"lookup needs item field {exc.args[0]!r} for its query, but the item has only "
                f"{sorted(item)}; add the field in an earlier stage or fix params"
            ) from None
        row = await db.fetch_one(query, values, action="looking up a row")
        if row is None:
            shown = ", ".join(f"{name}={value!r}" for name, value in zip(fields, values, strict=True))
            if missing == "skip":
                raise Skip(f"no row in database {db.name!r} for {shown}")
            if missing == "fail":
                raise RowNotFoundError(
                    f"lookup found no row in database {db.name!r} for {shown}; fix the data, or set "
                    "missing='skip' or 'keep'"
                )
            return item
        item.update(row)
        return item

    yield run
