"""The run ledger in two tables of a configured database: :func:`mysql_ledger`.

For runs shared by several workers, and by the shards of a sharded run (``--shard K/N``): it
is a :class:`pipeline.ShardedLedger`. The layout and the statements are the engine's
(:class:`pipeline.LedgerSQL`, the same as the default SQLite file's); this module renders them
for MySQL/MariaDB and runs them through the database's pool and limiter, like any stage.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import Field

from pipeline import (
    LEDGER_ITEMS,
    LEDGER_RUNS,
    BufferedLedger,
    ConfigError,
    Context,
    LedgerColumn,
    LedgerSQL,
    LedgerTable,
    RunLedger,
    RunStatus,
    Shard,
    encode_key,
    factory,
)

from .._options import Flag, Identifier, PositiveSeconds
from ._database import Database, DatabaseName, shared_database
from ._errors import DatabaseError
from ._sql import _quote

__all__ = ["TableLedger", "mysql_ledger"]

log = logging.getLogger("stages.db")


_IDENTIFYING = frozenset({"run_id", "pipeline"})
"""Sized text columns that rows are found by: binary, so no collation folds case, accents or
trailing spaces ("n" and "n " are two run ids)."""

_KEY_TEXT = "LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
"""An unbounded key column. Rows are found by its digest column, never by comparing this text."""


def _digest_column(quoted: str, column: str) -> str:
    """The generated ``<column>_sha256`` column: a fixed-width digest InnoDB can index.

    MariaDB refuses a PRIMARY KEY on a generated column, so the tables key on a UNIQUE index
    over it; ``ON DUPLICATE KEY UPDATE`` upserts on either.
    """
    return f"{_quote('mysql', f'{column}_sha256')} BINARY(32) AS (UNHEX(SHA2({quoted}, 256))) STORED"


class _MySQLLedgerSQL(LedgerSQL):
    """The ledger's layout and statements in MySQL/MariaDB's dialect.

    Unbounded key columns (the item key) are LONGTEXT with a generated SHA-256 digest beside
    them, and the table's unique key is on the digest; run ids and pipeline names are
    VARBINARY, compared byte for byte.
    """

    def quote(self, name: str) -> str:
        return _quote("mysql", name)

    def column_type(self, table: LedgerTable, column: LedgerColumn) -> str:
        if column.type == "integer":
            kind = "INT"
        elif column.type == "timestamp":
            kind = "DATETIME(6)"
        elif column.max_length is None:
            kind = _KEY_TEXT if column.name in table.key else "TEXT"
        elif column.name in _IDENTIFYING:
            kind = f"VARBINARY({column.max_length})"
        else:
            kind = f"VARCHAR({column.max_length})"
        return f"{kind} NULL" if column.nullable else f"{kind} NOT NULL"

    def new_value(self, column: str) -> str:
        # VALUES(col) rather than a row alias: MariaDB has no `AS new` form.
        return f"VALUES({self.quote(column)})"

    def on_conflict(self, key: Sequence[str], assignments: Mapping[str, str]) -> str:
        sets = ", ".join(f"{self.quote(c)} = {value}" for c, value in assignments.items())
        return f"ON DUPLICATE KEY UPDATE {sets}"

    def lookup(self, column: str) -> tuple[str, str]:
        return self.quote(f"{column}_sha256"), "UNHEX(SHA2(?, 256))"

    def _digested(self, table: LedgerTable) -> list[str]:
        return [
            c.name for c in table.columns if c.name in table.key and c.type == "text" and c.max_length is None
        ]

    def _key_clause(self, table: LedgerTable) -> str:
        digested = self._digested(table)
        names = [f"{c}_sha256" if c in digested else c for c in table.key]
        kind = "UNIQUE KEY `ledger_key`" if digested else "PRIMARY KEY"
        return f"{kind} ({', '.join(self.quote(c) for c in names)})"

    def create_table(self, table: LedgerTable, name: str) -> str:
        columns = [f"{self.quote(c.name)} {self.column_type(table, c)}" for c in table.columns]
        columns += [_digest_column(self.quote(c), c) for c in self._digested(table)]
        columns.append(self._key_clause(table))
        if table == LEDGER_RUNS:
            # last_watermark's lookup: this table is shared by every pipeline and grows forever.
            columns.append("KEY (`pipeline`, `status`, `finished_at`)")
        return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(columns)}) CHARACTER SET utf8mb4"

    def upgrade(self, table: LedgerTable, name: str) -> str:
        """The ``ALTER TABLE`` that takes ``table`` from the layout before keys had digests (keys
        and run ids VARCHAR(255) utf8mb4_bin, primary key on them) to this one, rows kept."""
        changes = [f"MODIFY {self.quote(c.name)} {self.column_type(table, c)}" for c in table.columns]
        digested = self._digested(table)
        changes += [f"ADD COLUMN {_digest_column(self.quote(c), c)}" for c in digested]
        if digested:
            changes += ["DROP PRIMARY KEY", f"ADD {self._key_clause(table)}"]
        return f"ALTER TABLE {name} {', '.join(changes)}"

    def migrate_runs(self) -> list[str]:
        # One ALTER: InnoDB rebuilds the table once, and MariaDB applies it atomically.
        return [
            f"ALTER TABLE {self.runs} ADD COLUMN `shard` INT NOT NULL DEFAULT 0, "
            "ADD COLUMN `shards` INT NOT NULL DEFAULT 1, DROP PRIMARY KEY, "
            f"ADD {self._key_clause(LEDGER_RUNS)}"
        ]


_LEDGER_LOOKUP_CHUNK = 500
"""Keys per ``IN (...)`` lookup on a rerun."""


class TableLedger(BufferedLedger):
    """A :class:`~pipeline.RunLedger` in two tables of a :class:`~stages.db.Database`: ``<table>``
    (one row per item and run) and ``<table>_runs``. Made by :func:`mysql_ledger`.

    Every write is an upsert on ``(run_id, key)``, so workers sharing a run id never leave two
    rows for an item. Records are buffered and written in one transaction per flush. With a
    ``shard``, the runs row is ``(run_id, shard)`` and :meth:`counts` are the shard's items.
    """

    def __init__(
        self,
        db: Database,
        *,
        table: str,
        pipeline: str,
        run_id: str,
        flush_interval: float,
        shard: Shard | None = None,
    ) -> None:
        super().__init__()
        self.db = db
        self.shard = shard if shard is not None and shard.count > 1 else None
        self._refused = False
        self.pipeline = pipeline
        self.run_id = run_id
        self.flush_interval = flush_interval
        self.resuming = False
        self._table = table
        render = _MySQLLedgerSQL if db.dialect == "mysql" else LedgerSQL
        self._sql = render(items=table, runs=f"{table}_runs")

    def _time(self, iso: str | None = None) -> Any:
        """A timestamp column's value: naive UTC for MySQL's DATETIME, ISO 8601 text for SQLite."""
        when = datetime.fromisoformat(iso) if iso else datetime.now(UTC)
        return when.astimezone(UTC).replace(tzinfo=None) if self.db.dialect == "mysql" else when.isoformat()

    async def _exists(self) -> bool:
        # Asked first, because MySQL warns on CREATE TABLE IF NOT EXISTS of an existing table.
        names = (self._table, f"{self._table}_runs")
        if self.db.dialect == "mysql":
            sql = (
                "SELECT COUNT(*) AS n FROM information_schema.tables "
                "WHERE table_schema = DATABASE() AND table_name IN (?, ?)"
            )
        else:
            sql = "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)"
        row = await self.db.fetch_one(sql, names, action="looking for the ledger table")
        return row is not None and int(row["n"]) == len(names)

    async def open(self, *, create_table: bool) -> None:
        """Create the tables if asked (or migrate them from the older MySQL layout), and find out
        whether this run id is resuming.

        Raises:
            ConfigError: The tables have the older MySQL layout and ``create_table`` is false.
        """
        if create_table and not await self._exists():
            for ddl in self._sql.create:
                await self.db.execute(ddl, action="creating the ledger table")
        await self._migrate_runs(create_table=create_table)
        if isinstance(self._sql, _MySQLLedgerSQL):
            await self._upgrade(self._sql, create_table=create_table)
        if self.shard is None:
            row = await self.db.fetch_one(self._sql.has_items, (self.run_id,), action="reading the ledger")
            self.resuming = row is not None
        else:
            # Other shards' items say nothing of this one's: it resumes if it started before (its
            # runs row is written before any of its items), else it pays no lookup per item.
            self.resuming = any(int(r[0]) == self.shard.index for r in await self._shard_rows())

    async def states(self, keys: Sequence[object]) -> list[str | None]:
        """See :meth:`pipeline.RunLedger.states`: one ``IN (...)`` query per 500 keys."""
        encoded: list[str | None] = []
        for key in keys:
            try:
                encoded.append(encode_key(key))
            except TypeError:
                encoded.append(None)
        wanted = sorted({k for k in encoded if k is not None})
        found: dict[str, str] = {}
        for i in range(0, len(wanted), _LEDGER_LOOKUP_CHUNK):
            chunk = wanted[i : i + _LEDGER_LOOKUP_CHUNK]
            rows = await self.db.fetch_all(
                self._sql.states(len(chunk)), (self.run_id, *chunk), action="reading the ledger"
            )
            found.update((str(r["k"]), str(r["state"])) for r in rows)
        return [None if k is None else found.get(k) for k in encoded]

    async def _migrate_runs(self, *, create_table: bool) -> None:
        """Give a runs table of the layout before shards a row per shard, in place, rows kept."""
        table = f"{self._table}_runs"
        columns = await self.db.columns(table)
        if columns is None or "shard" in columns:
            return
        statements = self._sql.migrate_runs()
        if not create_table:
            raise ConfigError(
                f"ledger table {table!r} on database {self.db.name!r} has the layout before sharded "
                "runs (one row per run id); set create_table = true to let mysql_ledger migrate it "
                "when it opens, or run: " + "; ".join(statements)
            )
        log.warning("migrating ledger table %r on database %r to a row per shard", table, self.db.name)
        try:
            for statement in statements:
                await self.db.execute(statement, action="migrating the ledger's runs table")
        except DatabaseError:
            # The shards of a run open together: another may have migrated it first.
            if "shard" not in (await self.db.columns(table) or set()):
                raise

    async def _upgrade(self, sql: _MySQLLedgerSQL, *, create_table: bool) -> None:
        """Migrate tables of the layout before keys had digests, in place, rows kept."""
        columns = await self.db.columns(self._table)
        if columns is None or "key_sha256" in columns:
            return
        statements = [sql.upgrade(LEDGER_ITEMS, sql.items), sql.upgrade(LEDGER_RUNS, sql.runs)]
        if not create_table:
            raise ConfigError(
                f"ledger table {self._table!r} on database {self.db.name!r} has the layout of an older "
                "version (keys of at most 255 characters, compared ignoring trailing spaces); set "
                "create_table = true to let mysql_ledger migrate it when it opens, or run: "
                + "; ".join(statements)
            )
        log.warning(
            "migrating ledger table %r and %r on database %r to keys of any length (its rows are kept)",
            self._table,
            f"{self._table}_runs",
            self.db.name,
        )
        for statement in statements:
            await self.db.execute(statement, action="migrating the ledger table")

    def timestamp(self) -> Any:
        """``updated_at`` for a row recorded now, in the database's representation."""
        return self._time()

    def rejects_row(self, exc: BaseException) -> bool:
        """A value the database refuses (too long, not encodable): one row's data."""
        return isinstance(exc, DatabaseError) and exc.row_data

    async def write_batch(self, batch: list[tuple[Any, ...]]) -> None:
        """Upsert ``batch`` in one transaction."""
        await self.db.execute_many(self._sql.record, batch, action="writing the ledger")

    async def _shard_rows(self) -> list[tuple[Any, ...]]:
        rows = await self.db.fetch_all(self._sql.shards, (self.run_id,), action="reading the ledger's runs")
        return [(r["shard"], r["shards"], r["status"], r["started_at"], r["finished_at"]) for r in rows]

    async def start_run(self, started_at: str) -> None:
        """Note that this run id (this shard of it) started (again).

        Raises:
            ConfigError: The run id was started with another shard count.
        """
        try:
            self._sql.check_shard_count(self.run_id, await self._shard_rows(), self.shard)
        except ConfigError:
            self._refused = True
            raise
        index, count = (0, 1) if self.shard is None else (self.shard.index, self.shard.count)
        await self.db.execute(
            self._sql.start_run,
            (self.run_id, index, count, self.pipeline, self._time(started_at)),
            action="starting the run",
        )

    async def finish_run(self, status: str, watermark: str | None) -> None:
        """Note how this run (this shard of it) ended, and its watermark when it succeeded."""
        if self._refused:  # the rows are those of the run started otherwise
            return
        await self.db.execute(
            self._sql.finish_run,
            (
                status,
                self._time(),
                watermark if status == "ok" else None,
                self.run_id,
                0 if self.shard is None else self.shard.index,
            ),
            action="finishing the run",
        )

    async def last_watermark(self) -> str | None:
        """The watermark of this pipeline's last run whose every shard succeeded, if any."""
        rows = await self.db.fetch_all(
            self._sql.last_watermark, (self.pipeline, self.pipeline), action="reading the last watermark"
        )
        return self._sql.run_watermark(str(r["watermark"]) for r in rows)

    async def counts(self) -> dict[str, int]:
        """How many of this run's items (this shard's, when sharded) are in each state."""
        if self.shard is None:
            rows = await self.db.fetch_all(self._sql.counts, (self.run_id,), action="reading the ledger")
        else:
            rows = await self.db.fetch_all(
                self._sql.shard_counts,
                (self.run_id, self.shard.count, self.shard.index),
                action="reading the ledger",
            )
        return {str(r["state"]): int(r["n"]) for r in rows}

    async def run_status(self) -> RunStatus | None:
        """The run id's state across its shards, for ``pipeline status``."""
        runs = await self._shard_rows()
        count = max((int(r[1]) for r in runs), default=1)
        rows = await self.db.fetch_all(
            self._sql.all_shard_counts, (count, self.run_id), action="reading the ledger"
        )
        return self._sql.run_status(
            self.run_id, runs, [(r["shard"], r["state"], r["n"], r["last"]) for r in rows]
        )

    async def failed(self) -> list[tuple[str, int, str | None, str | None]]:
        """This run's failed items: ``(key as JSON, attempts, stage, error)``, by key."""
        rows = await self.db.fetch_all(self._sql.failed, (self.run_id,), action="reading the ledger")
        return [(str(r["k"]), int(r["attempts"]), r["stage"], r["error"]) for r in rows]


LedgerTableName = Annotated[Identifier, Field(max_length=58)]
"""A ledger's items table: a plain identifier that leaves room for the ``_runs`` suffix in 64."""


@factory
@contextlib.asynccontextmanager
async def mysql_ledger(
    ctx: Context,
    *,
    database: DatabaseName,
    table: LedgerTableName = "pipeline_ledger",
    create_table: Flag = True,
    flush_interval: PositiveSeconds = 0.25,
) -> AsyncIterator[RunLedger]:
    """Ledger: keep the run ledger in ``table`` (and ``<table>_runs``) of a configured database.

    For runs shared by several workers (``[pipeline] ledger = { use = "stages.db:mysql_ledger",
    database = "catalog" }``). It uses the database's pool and limiter, like every stage on it.
    Works on a ``sqlite:///`` database too. Keys of any length fit: on MySQL the tables key on a
    SHA-256 digest of the key, and run ids compare byte for byte. Tables made by an older
    version (keys of at most 255 characters) are migrated in place when the ledger opens, with
    a warning; with ``create_table = false`` it refuses them instead, naming the statements.

    Args:
        ctx: The engine's context (its ``pipeline`` and ``run_id`` pick the rows).
        database: The ``[databases.<name>]`` to keep the ledger in.
        table: The items table, a plain identifier of at most 58 characters; the runs table is
            ``<table>_runs``.
        create_table: Create the tables when they do not exist.
        flush_interval: Seconds between batched writes, > 0.

    The engine checks the options against these annotations when the ledger store is made.

    Raises:
        ConfigError: The database is not configured, or its tables have the older layout and
            ``create_table`` is false.
    """
    db = await shared_database(ctx, database)
    if db.dialect == "sqlite" and ctx.shard is not None and ctx.shard.count > 1:
        raise ConfigError(
            f"the ledger on database {database!r} is an SQLite file, on one machine: the {ctx.shard.count} "
            "shards of a run, on several machines, would each keep their own. Keep the ledger on a "
            "MySQL/MariaDB database that every shard reaches, or run without --shard",
            location="pipeline.ledger.database",
        )
    ledger = TableLedger(
        db,
        table=table,
        pipeline=ctx.pipeline,
        run_id=ctx.run_id,
        flush_interval=flush_interval,
        shard=ctx.shard,
    )
    await ledger.open(create_table=create_table)
    yield ledger
