"""The ``write_results`` stage: one upserted row per item, its outcome and the job's columns.

Batched by default (``@pipeline.batched``): a batch's rows go in one multi-row upsert, in one
transaction (``executemany``, which the MySQL driver sends as one ``INSERT ... VALUES (...),
(...) ON DUPLICATE KEY UPDATE``). An item alone (``batch = false``, or the engine running the
items of a failed batch one by one) is written exactly as before, with the same messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, with_config
from typing_extensions import TypedDict  # pydantic reads a TypedDict only from here on 3.11

from pipeline import Context, Item, batched, factory

from .._options import Flag, Identifier, PositiveInt
from ._database import DatabaseName, shared_database
from ._sql import Dialect, _quote

__all__ = ["ResultColumn", "write_results"]

log = logging.getLogger("stages.db")

ColumnType = Literal["integer", "bigint", "real", "text", "json"]
"""The type of a :class:`ResultColumn`, mapped to each database's own."""


@with_config(ConfigDict(extra="forbid"))
class ResultColumn(TypedDict, total=False):
    """One job column of :func:`write_results`' table: an entry of its ``columns`` option.

    Every key is optional: ``{}`` is a text column filled from the item field of the same name.

    Attributes:
        field: The item field the value comes from; the column's name when absent.
        type: ``"integer"``, ``"bigint"``, ``"real"``, ``"text"`` (the default), or ``"json"``
            (text holding the value as JSON).
        length: For ``"text"``: the longest value, so MySQL stores ``CHAR(length)`` instead of
            ``TEXT`` (SQLite ignores it).
    """

    field: str
    type: ColumnType
    length: PositiveInt


_OUTCOME_COLUMNS = ("key", "status", "outputs", "error", "run_id", "updated_at")
"""The columns every row has, whatever ``columns`` says; the job's columns sit between them."""

_IMAGE_COLUMNS: Mapping[str, ResultColumn] = MappingProxyType(
    {
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "bytes": {"type": "bigint"},
        "sha256": {"type": "text", "length": 64},
    }
)
"""The default ``columns``: what the nightly image job records about each image."""


def _check_columns(columns: Mapping[str, ResultColumn]) -> Mapping[str, ResultColumn]:
    """Refuse job columns that clash with the outcome columns or with each other."""
    seen: set[str] = set()
    for name, spec in columns.items():
        folded = name.lower()  # SQL column names ignore case
        if folded == "key_sha256":
            raise ValueError(
                "column 'key_sha256' is the digest write_results keys MySQL rows on; give the job "
                "column another name"
            )
        if folded in _OUTCOME_COLUMNS:
            raise ValueError(
                f"column {name!r} is one write_results always writes ({', '.join(_OUTCOME_COLUMNS)}); "
                "give the job column another name"
            )
        if folded in seen:
            raise ValueError(f"column {name!r} is listed twice (names ignore case); keep one")
        seen.add(folded)
        if "length" in spec and spec.get("type", "text") != "text":
            raise ValueError(f"column {name!r} has a length but type {spec['type']!r}; length is for text")
    return columns


ResultColumns = Annotated[Mapping[Identifier, ResultColumn], AfterValidator(_check_columns)]
"""The ``columns`` option of :func:`write_results`: column name to :class:`ResultColumn`."""


def _column_type(dialect: Dialect, spec: ResultColumn) -> str:
    kind = spec.get("type", "text")
    if dialect == "sqlite":
        return {"integer": "INTEGER", "bigint": "INTEGER", "real": "REAL"}.get(kind, "TEXT")
    if kind == "text" and "length" in spec:
        return f"CHAR({spec['length']}) NULL"
    return {"integer": "INT", "bigint": "BIGINT", "real": "DOUBLE", "json": "LONGTEXT"}.get(
        kind, "TEXT"
    ) + " NULL"


# MySQL: the key is any length, compared byte for byte. InnoDB cannot index LONGTEXT whole and
# MariaDB refuses a PRIMARY KEY on a generated column, so the row is keyed by a UNIQUE index on
# a SHA-256 digest of the key (the mysql_ledger tables do the same).
_MYSQL_KEY = "`key` LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
_MYSQL_DIGEST = "`key_sha256` BINARY(32) AS (UNHEX(SHA2(`key`, 256))) STORED"
_MYSQL_UNIQUE = "UNIQUE KEY `results_key` (`key_sha256`)"


def _results_ddl(dialect: Dialect, table: str, columns: Mapping[str, ResultColumn]) -> str:
    job = [f"{_quote(dialect, name)} {_column_type(dialect, spec)}" for name, spec in columns.items()]
    if dialect == "mysql":
        return ", ".join(
            [
                f"CREATE TABLE IF NOT EXISTS {table} ({_MYSQL_KEY}",
                "`status` VARCHAR(32) NOT NULL",
                "`outputs` LONGTEXT NULL",
                *job,
                "`error` TEXT NULL",
                "`run_id` VARCHAR(255) NOT NULL",
                "`updated_at` DATETIME(6) NOT NULL",
                _MYSQL_DIGEST,
                f"{_MYSQL_UNIQUE}) CHARACTER SET utf8mb4",
            ]
        )
    return ", ".join(
        [
            f'CREATE TABLE IF NOT EXISTS {table} ("key" TEXT NOT NULL PRIMARY KEY',
            '"status" TEXT NOT NULL',
            '"outputs" TEXT',
            *job,
            '"error" TEXT',
            '"run_id" TEXT NOT NULL',
            '"updated_at" TEXT NOT NULL)',
        ]
    )


def _upsert_sql(dialect: Dialect, table: str, job_columns: Sequence[str]) -> str:
    names = ["key", "status", "outputs", *job_columns, "error", "run_id", "updated_at"]
    q = [_quote(dialect, c) for c in names]
    values = ", ".join("?" for _ in names)
    updates = q[1:]  # all but the key
    insert = f"INSERT INTO {table} ({', '.join(q)}) VALUES ({values})"
    if dialect == "mysql":
        # VALUES(col) rather than a row alias: MariaDB has no `AS new` form.
        assignments = ", ".join(f"{c} = VALUES({c})" for c in updates)
        return f"{insert} ON DUPLICATE KEY UPDATE {assignments}"
    assignments = ", ".join(f"{c} = excluded.{c}" for c in updates)
    return f'{insert} ON CONFLICT("key") DO UPDATE SET {assignments}'


_ERROR_LIMIT = 2000
"""Characters of an upstream error kept in the ``error`` column (a traceback-sized message is cut)."""

# ``scheme://user:password@host``: the password goes, the user stays. The stages already keep
# passwords out of their messages; this is a second line for a custom stage that does not. As
# in stages.db's DSN parser, the password runs to the last @ of the word, so one holding
# ? # / @ or : is hidden whole.
_USERINFO_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:/?#@\s]*:)\S*@")


def _error_text(item: Item) -> str | None:
    """The ``error`` column for an item diverted to the stage: ``"<stage>: <Type>: <message>"``."""
    error = item.get("error")
    if error is None:
        return None
    stage = item.get("failed_stage")
    text = f"{stage}: {error}" if stage else str(error)
    text = _USERINFO_PASSWORD.sub(r"\1***@", text)
    return text if len(text) <= _ERROR_LIMIT else text[: _ERROR_LIMIT - 3] + "..."


@batched(size=200, max_wait=0.5)
@factory
@contextlib.asynccontextmanager
async def write_results(
    ctx: Context,
    *,
    database: DatabaseName,
    table: Identifier = "results",
    create_table: Flag = True,
    key_field: str = "id",
    columns: ResultColumns = _IMAGE_COLUMNS,
) -> AsyncIterator[Callable[[Any], Coroutine[Any, Any, Any]]]:
    """Stage: upsert one row per item into ``table`` and pass the item on.

    Batched by default (``batch = { size = 200, max_wait = 0.5 }``): the rows of a batch are
    one multi-row upsert in one transaction. If it fails (a value that does not fit a column,
    say), the engine writes the batch's items one by one, so only the bad one fails, with the
    message it would have had alone. ``batch = false`` writes one statement per item.

    The row is ``key`` (``str(item[key_field])``, any length, compared byte for byte: "abc" and
    "ABC", "a" and "a " are two rows), ``status``, ``outputs``
    (JSON of ``item["outputs"]``), one column per entry of ``columns`` (from the item, NULL when
    absent), ``error``, ``run_id`` and ``updated_at`` (UTC). By default ``columns`` are the
    image job's ``width``, ``height`` (integers), ``bytes`` (a big integer) and ``sha256`` (64
    characters of text)::

        columns = { width = { type = "integer" }, height = { type = "integer" },
                    bytes = { type = "bigint" }, sha256 = { type = "text", length = 64 } }

    Run it as an ``always`` stage (``Stage(always=True)``, TOML ``always = true``) and it also
    records the items that failed or were skipped upstream: the engine hands those over with
    ``failed_stage`` set, and their row gets ``status`` ``"failed"`` or ``"skipped"``,
    ``error`` ``"<stage>: <ExceptionType>: <message>"`` (the skip's reason for a skip, NULL when
    it gave none), and ``outputs`` NULL unless the item carries some. An item that came through
    every stage gets ``status`` ``"ok"``, ``outputs`` ``[]`` when absent, and ``error`` NULL; a
    ``status`` or ``error`` field of its own (a catalog column of that name) is not taken for
    the engine's.

    The row is tonight's outcome: writing the same key again replaces the whole row, so an item
    that failed tonight after an ok night reads ``failed`` with the reason and ``outputs`` NULL,
    even though last night's files are still on disk (nothing here deletes them). Query the
    row, not the directory, to know what is current.

    Args:
        ctx: The engine's context.
        database: The ``[databases.<name>]`` to write to.
        table: The table, a plain identifier.
        create_table: Create the table when it does not exist (with ``columns`` as the job's
            columns); an existing table must already have them. A MySQL table made by an older
            version (a VARCHAR(255) key) is migrated in place, rows kept, with a warning.
        key_field: The item field holding the item's key.
        columns: The job's columns, column name (a plain identifier) to :class:`ResultColumn`
            (``field``, ``type``, ``length``; each optional); ``{}`` writes none. The names
            ``key``, ``status``, ``outputs``, ``error``, ``run_id`` and ``updated_at`` are taken.

    The engine checks the options against these annotations when the stage is made, so a
    ``table`` that is not a plain identifier is a :class:`~pipeline.ConfigError` naming it.
    """
    db = await shared_database(ctx, database)
    quoted = db.quote(table)
    if create_table:
        # Asked first: MySQL warns on CREATE TABLE IF NOT EXISTS of an existing table.
        existing = await db.columns(table)
        if existing is None:
            await db.execute(_results_ddl(db.dialect, quoted, columns), action=f"creating table {table!r}")
        elif db.dialect == "mysql" and "key_sha256" not in existing:
            log.warning(
                "migrating table %r on database %r to keys of any length, compared byte for byte "
                "(its rows are kept)",
                table,
                db.name,
            )
            await db.execute(
                f"ALTER TABLE {quoted} MODIFY {_MYSQL_KEY}, ADD COLUMN {_MYSQL_DIGEST}, "
                f"DROP PRIMARY KEY, ADD {_MYSQL_UNIQUE}",
                action=f"migrating table {table!r}",
            )
    sql = _upsert_sql(db.dialect, quoted, list(columns))
    # (item field, stored as JSON) per job column, in column order.
    fields = tuple((spec.get("field", name), spec.get("type") == "json") for name, spec in columns.items())
    run_id = ctx.run_id

    def row_of(item: Item) -> tuple[Any, ...]:
        try:
            key = item[key_field]
        except KeyError:
            raise ValueError(
                f"write_results needs the item's key in field {key_field!r}, but the item has only "
                f"{sorted(item)}; set key_field"
            ) from None
        now = datetime.now(UTC)
        # MySQL DATETIME has no zone: store naive UTC. SQLite gets ISO 8601 text.
        updated_at: Any = now.replace(tzinfo=None) if db.dialect == "mysql" else now.isoformat()
        if "failed_stage" in item:  # diverted by the engine: failed or skipped upstream
            status = str(item.get("status") or "failed")
            outputs = item.get("outputs")
            outputs_json = None if outputs is None else json.dumps(outputs)
            error = _error_text(item)
        else:
            status, outputs_json, error = "ok", json.dumps(item.get("outputs", [])), None
        job = []
        for name, as_json in fields:
            value = item.get(name)
            job.append(json.dumps(value) if as_json and value is not None else value)
        return (str(key), status, outputs_json, *job, error, run_id, updated_at)

    async def run(item: Item) -> Item:
        await db.execute(sql, row_of(item), action=f"writing the result row to {table!r}")
        return item

    async def run_batch(items: list[Item]) -> list[Item | Exception]:
        if len(items) == 1:  # an item alone: exactly what the unbatched stage does
            return [await run(items[0])]
        rows: list[tuple[Any, ...]] = []
        results: list[Item | Exception] = []
        for item in items:
            try:
                rows.append(row_of(item))
            except Exception as exc:  # this item's own fault: it fails alone, the rest are written
                results.append(exc)
            else:
                results.append(item)
        await db.execute_many(sql, rows, action=f"writing {len(rows)} result rows to {table!r}")
        return results

    yield run if ctx.batch is None else run_batch
