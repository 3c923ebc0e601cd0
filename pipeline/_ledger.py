"""The run ledger: each item's state per run id, so a rerun finishes the job without redoing it.

The engine talks to a ledger only through :class:`RunLedger`. The default is :class:`SqliteLedger`,
an embedded SQLite file; ``[pipeline] ledger = { use = "module:factory", ... }`` plugs in another
(``stages.db:mysql_ledger`` keeps it in a MySQL table, for runs shared by several workers).

The stored layout, the same in every SQL store (:data:`LEDGER_ITEMS` and :data:`LEDGER_RUNS` describe it once,
and :class:`LedgerSQL` renders its tables and statements; the SQLite file, by default
``<report_dir>/ledger.sqlite``, uses the names ``items`` and ``runs``)::

    items(run_id, key, state, attempts, stage, error, updated_at)   one row per item and run
    runs(run_id, pipeline, status, started_at, finished_at, watermark, shard, shards)
                                                                   one row per run and shard

* States are ``done``, ``skipped`` and ``failed``. A rerun of the same run id does not read
  ``done`` or ``skipped`` items again; ``--retry-failed`` takes the ``failed`` ones again.
* Writes are batched: a flusher commits what completed every ``flush_interval`` seconds, in one
  transaction, off the event loop. A ``kill -9`` loses at most that window of records, and those
  items are simply done again on the rerun: outputs are atomic and database writes are upserts,
  so doing an item twice leaves one correct result.
* Lookups (only on a rerun) are indexed point reads on a second, read-only connection in WAL mode.
* Shards (``--shard K/N``) share the run id and the items table; each has its runs row (an
  unsharded run is shard 0 of 1), and owns the items whose key's ``crc32`` modulo N is K, which
  is how its counts are read (:mod:`._runstate`). The watermark counts once every shard is ok.
  A runs table of the layout before shards is migrated in place when the ledger opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from ._report import utc_now
from ._runstate import RunStatus, build_status, check_shard_count, earliest_watermark
from ._shard import Shard

__all__ = [
    "LEDGER_ITEMS",
    "LEDGER_RUNS",
    "BufferedLedger",
    "LedgerColumn",
    "LedgerSQL",
    "LedgerTable",
    "RunLedger",
    "ShardedLedger",
    "SqliteLedger",
    "encode_key",
    "open_sqlite_ledger",
]


@runtime_checkable
class RunLedger(Protocol):
    """What the engine needs of a ledger: one run id's item states, and its runs' watermarks.

    A ledger is opened for one ``(pipeline, run_id)`` by a :func:`~pipeline.factory` (``ledger =
    { use = ... }``; the context's ``pipeline`` and ``run_id`` say which), which yields it ready
    (``resuming`` known) and closes it on exit. The engine opens it before the source and closes
    it after the run's last :meth:`flush` and :meth:`finish_run`, even when the run fails.

    Keys are stored as :func:`encode_key` text, so 42 and "42" stay distinct. States are
    ``"done"``, ``"skipped"`` and ``"failed"``. Several workers may share a store: writes are
    upserts on ``(run_id, key)``, so recording an item twice leaves one row.

    Attributes:
        resuming: Whether this run id had recorded items when the ledger was opened. Only then
            does the engine look items up (:meth:`states`); a fresh run pays nothing per item
            but :meth:`record`.
        flush_interval: Seconds between the engine's calls to :meth:`flush` during the run.
    """

    resuming: bool
    flush_interval: float

    async def states(self, keys: Sequence[object]) -> list[str | None]:
        """This run's recorded state of each key (``None`` if none), in order; one batch of reads."""
        ...

    def record(self, key: object, state: str, attempts: int, stage: str | None, error: str | None) -> None:
        """Buffer one item's final state; must not block (it runs on the hot path)."""
        ...

    async def flush(self) -> None:
        """Write what :meth:`record` buffered, in one batch. On failure keep it for the next flush."""
        ...

    async def start_run(self, started_at: str) -> None:
        """Note that this run id started (again); ``started_at`` is ISO 8601 UTC."""
        ...

    async def finish_run(self, status: str, watermark: str | None) -> None:
        """Note how this run ended, and its watermark (kept only when ``status`` is ``"ok"``)."""
        ...

    async def last_watermark(self) -> str | None:
        """The watermark of this pipeline's last successful run, if any."""
        ...

    async def counts(self) -> dict[str, int]:
        """How many of this run's items are in each state."""
        ...


@runtime_checkable
class ShardedLedger(RunLedger, Protocol):
    """A :class:`RunLedger` that the N shards of a run id can share (``--shard K/N``).

    Opened with ``ctx.shard`` set, it keeps one runs row per ``(run_id, shard)``:
    :meth:`~RunLedger.start_run` and :meth:`~RunLedger.finish_run` write the shard's row, and
    refuse (:class:`~pipeline.ConfigError`) a run id started with another shard count;
    :meth:`~RunLedger.counts` counts the shard's own items; :meth:`~RunLedger.last_watermark`
    is that of the last run whose every shard ended ok. The engine runs a sharded run only on
    such a ledger.
    """

    async def run_status(self) -> RunStatus | None:
        """The run id's state across its shards (``pipeline status``); ``None`` if it never ran."""
        ...


log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class LedgerColumn:
    """One column of the ledger's stored layout, in terms any SQL store maps to its own types.

    Attributes:
        name: The column's name.
        type: ``"text"``, ``"integer"`` or ``"timestamp"`` (the store picks the representation:
            ISO 8601 text in SQLite).
        nullable: Whether the column may be NULL.
        max_length: The longest text the column must hold, for stores that size text columns
            (``None``: unbounded).
    """

    name: str
    type: Literal["text", "integer", "timestamp"]
    nullable: bool = False
    max_length: int | None = None


@dataclass(frozen=True)
class LedgerTable:
    """One table of the ledger's stored layout.

    Attributes:
        name: Its name in the default SQLite file; other stores may name it otherwise.
        columns: Its columns, in order.
        key: The primary key's columns; every write is an upsert on them.
    """

    name: str
    columns: tuple[LedgerColumn, ...]
    key: tuple[str, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        """The columns' names, in order."""
        return tuple(c.name for c in self.columns)


# Run ids fit in 255 characters; keys are any length. A store that cannot index unbounded text
# indexes a fixed-width digest of the key instead (see LedgerSQL.lookup).
LEDGER_ITEMS = LedgerTable(
    "items",
    (
        LedgerColumn("run_id", "text", max_length=255),
        LedgerColumn("key", "text"),
        LedgerColumn("state", "text", max_length=16),
        LedgerColumn("attempts", "integer"),
        LedgerColumn("stage", "text", nullable=True, max_length=255),
        LedgerColumn("error", "text", nullable=True),
        LedgerColumn("updated_at", "timestamp"),
    ),
    key=("run_id", "key"),
)
"""One row per item and run: the row :meth:`BufferedLedger.record` queues, column for column."""

LEDGER_RUNS = LedgerTable(
    "runs",
    (
        LedgerColumn("run_id", "text", max_length=255),
        LedgerColumn("pipeline", "text", max_length=255),
        LedgerColumn("status", "text", max_length=32),
        LedgerColumn("started_at", "timestamp"),
        LedgerColumn("finished_at", "timestamp", nullable=True),
        LedgerColumn("watermark", "text", nullable=True),
        LedgerColumn("shard", "integer"),
        LedgerColumn("shards", "integer"),
    ),
    key=("run_id", "shard"),
)
"""One row per run id and shard (an unsharded run is shard 0 of 1): how it ended, its watermark."""


class LedgerSQL:
    """The ledger's tables and statements for one SQL store, with ``?`` placeholders.

    Both built-in ledgers use it, so the layout and the upserts are written once: the default
    renders SQLite's dialect (the :class:`SqliteLedger` file). A store with another dialect
    subclasses it and overrides the hooks, :meth:`quote`, :meth:`column_type`,
    :meth:`new_value`, :meth:`on_conflict`, :meth:`create_table` and :meth:`lookup`; the
    statements are built from them when the object is made.

    Args:
        items: The name of the :data:`LEDGER_ITEMS` table in this store.
        runs: The name of the :data:`LEDGER_RUNS` table in this store.

    Attributes:
        runs_name: The runs table's name, unquoted (for statements that derive names from it).
        create: The ``CREATE TABLE IF NOT EXISTS`` statements, items first.
        record: Upsert one item row; parameters in :data:`LEDGER_ITEMS` column order.
        start_run: Note a run id's shard (re)started; parameters ``(run_id, shard, shards,
            pipeline, started_at)`` (an unsharded run is shard 0 of 1).
        finish_run: Note how it ended; parameters ``(status, finished_at, watermark, run_id, shard)``.
        has_items: One row if the run id has items; parameters ``(run_id,)``.
        state: ``state`` of one key; parameters ``(run_id, key)``.
        counts: ``(state, n)`` rows; parameters ``(run_id,)``.
        shard_counts: ``(state, n)`` rows of one shard's items; parameters ``(run_id, shards, shard)``.
        all_shard_counts: ``(shard, state, n, last)`` rows (``last`` the latest ``updated_at``);
            parameters ``(shards, run_id)``.
        shards: ``(shard, shards, status, started_at, finished_at)`` rows; parameters ``(run_id,)``.
        failed: ``(k, attempts, stage, error)`` rows of failed items by key; parameters ``(run_id,)``.
        last_watermark: ``watermark`` rows of the shards of the pipeline's last run whose every
            shard ended ok; parameters ``(pipeline, pipeline)``. The run's watermark is the
            earliest (:meth:`run_watermark`).

    The item counts of a shard compare ``CRC32(key) % shards`` with it: MySQL's function, which
    a SQLite connection must register (``zlib.crc32`` of the UTF-8 text). It is :meth:`pipeline.Shard.owns`,
    since the stored key is the :func:`encode_key` text.
    """

    def __init__(self, items: str = LEDGER_ITEMS.name, runs: str = LEDGER_RUNS.name) -> None:
        q = self.quote
        self.items = q(items)
        self.runs = q(runs)
        self.runs_name = runs
        key = q("key")
        self.create = (self.create_table(LEDGER_ITEMS, self.items), self.create_table(LEDGER_RUNS, self.runs))
        updates = {c: self.new_value(c) for c in LEDGER_ITEMS.column_names if c not in LEDGER_ITEMS.key}
        columns = ", ".join(q(c) for c in LEDGER_ITEMS.column_names)
        values = ", ".join("?" for _ in LEDGER_ITEMS.columns)
        self.record = (
            f"INSERT INTO {self.items} ({columns}) VALUES ({values}) "
            f"{self.on_conflict(LEDGER_ITEMS.key, updates)}"
        )
        restart = {"status": "'running'", "finished_at": "NULL"}
        self.start_run = (
            f"INSERT INTO {self.runs} (run_id, shard, shards, pipeline, status, started_at) "
            f"VALUES (?, ?, ?, ?, 'running', ?) {self.on_conflict(LEDGER_RUNS.key, restart)}"
        )
        self.finish_run = (
            f"UPDATE {self.runs} SET status = ?, finished_at = ?, watermark = COALESCE(?, watermark) "
            "WHERE run_id = ? AND shard = ?"
        )
        self.has_items = f"SELECT 1 AS x FROM {self.items} WHERE run_id = ? LIMIT 1"
        found, value = self.lookup("key")
        self.state = f"SELECT state FROM {self.items} WHERE run_id = ? AND {found} = {value}"
        self.counts = f"SELECT state, COUNT(*) AS n FROM {self.items} WHERE run_id = ? GROUP BY state"
        self.shard_counts = (
            f"SELECT state, COUNT(*) AS n FROM {self.items} WHERE run_id = ? AND CRC32({key}) % ? = ? "
            "GROUP BY state"
        )
        self.all_shard_counts = (
            f"SELECT CRC32({key}) % ? AS shard, state, COUNT(*) AS n, MAX(updated_at) AS last "
            f"FROM {self.items} WHERE run_id = ? GROUP BY 1, 2"
        )
        self.shards = (
            f"SELECT shard, shards, status, started_at, finished_at FROM {self.runs} WHERE run_id = ? "
            "ORDER BY shard"
        )
        self.failed = (
            f"SELECT {key} AS k, attempts, stage, error FROM {self.items} "
            f"WHERE run_id = ? AND state = 'failed' ORDER BY {key}"
        )
        # The last run all of whose shards are there and ended ok, and kept a watermark.
        self.last_watermark = (
            f"SELECT watermark FROM {self.runs} WHERE pipeline = ? AND watermark IS NOT NULL AND run_id = ("
            f"SELECT run_id FROM {self.runs} WHERE pipeline = ? GROUP BY run_id "
            "HAVING COUNT(*) = MAX(shards) AND MIN(shards) = MAX(shards) "
            "AND SUM(CASE WHEN status = 'ok' THEN 1 ELSE 0 END) = COUNT(*) AND COUNT(watermark) > 0 "
            "ORDER BY MAX(finished_at) DESC LIMIT 1)"
        )

    def states(self, count: int) -> str:
        """``(k, state)`` rows for ``count`` keys; parameters ``(run_id, key, ...)``."""
        key = self.quote("key")
        found, value = self.lookup("key")
        marks = ", ".join(value for _ in range(count))
        return f"SELECT {key} AS k, state FROM {self.items} WHERE run_id = ? AND {found} IN ({marks})"

    @staticmethod
    def run_watermark(rows: Iterable[str | None]) -> str | None:
        """The run's watermark from :attr:`last_watermark`'s values: the earliest shard's."""
        return earliest_watermark(rows)

    @staticmethod
    def run_status(
        run_id: str, runs: Iterable[Sequence[Any]], counts: Iterable[Sequence[Any]]
    ) -> RunStatus | None:
        """The run's status from :attr:`shards` rows and :attr:`all_shard_counts` rows
        (``(shard, state, n, last)``); ``None`` when it has no runs row."""
        return build_status(run_id, runs, counts)

    @staticmethod
    def check_shard_count(run_id: str, runs: Iterable[Sequence[Any]], shard: Shard | None) -> None:
        """Refuse to start ``shard`` (``None``: unsharded) of a run id whose :attr:`shards` rows
        say it was started with another shard count.

        Raises:
            ConfigError: Naming the count the run was started with and the fix.
        """
        check_shard_count(run_id, runs, shard)

    def migrate_runs(self) -> list[str]:
        """The statements that take a runs table of the layout before shards (keyed by ``run_id``
        alone) to this one, rows kept as shard 0 of 1, in one transaction where the store has them.

        By default SQLite's: a new table, the rows copied, the old one dropped and the new one renamed.
        """
        old = [c for c in LEDGER_RUNS.column_names if c not in ("shard", "shards")]
        new = self.quote(f"{self.runs_name}_migrating")
        columns = ", ".join(self.quote(c) for c in old)
        return [
            f"DROP TABLE IF EXISTS {new}",
            self.create_table(LEDGER_RUNS, new).replace(" IF NOT EXISTS", ""),
            f"INSERT INTO {new} ({columns}, shard, shards) SELECT {columns}, 0, 1 FROM {self.runs}",
            f"DROP TABLE {self.runs}",
            f"ALTER TABLE {new} RENAME TO {self.runs}",
        ]

    # -- hooks -----------------------------------------------------------------------------

    def quote(self, name: str) -> str:
        """Quote a table or column name (only ever a plain identifier)."""
        return f'"{name}"'

    def column_type(self, table: LedgerTable, column: LedgerColumn) -> str:
        """The column's type and nullability in a ``CREATE TABLE``."""
        kind = "INTEGER" if column.type == "integer" else "TEXT"
        return kind if column.nullable else f"{kind} NOT NULL"

    def new_value(self, column: str) -> str:
        """In an upsert's update, the value the conflicting insert brought for ``column``."""
        return f"excluded.{self.quote(column)}"

    def on_conflict(self, key: Sequence[str], assignments: Mapping[str, str]) -> str:
        """The clause that turns an ``INSERT`` into an upsert on ``key``, setting ``assignments``."""
        sets = ", ".join(f"{self.quote(c)} = {value}" for c, value in assignments.items())
        return f"ON CONFLICT ({', '.join(self.quote(c) for c in key)}) DO UPDATE SET {sets}"

    def lookup(self, column: str) -> tuple[str, str]:
        """How a point lookup finds rows by ``column``: ``(what is compared, what it is compared
        with)``, the second holding one ``?``. By default the column itself and ``?``; a store that
        indexes a digest of an unbounded column compares digests."""
        return self.quote(column), "?"

    def create_table(self, table: LedgerTable, name: str) -> str:
        """The ``CREATE TABLE IF NOT EXISTS`` statement for ``table``, named ``name`` (quoted)."""
        columns = [f"{self.quote(c.name)} {self.column_type(table, c)}" for c in table.columns]
        key = ", ".join(self.quote(c) for c in table.key)
        return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(columns)}, PRIMARY KEY ({key}))"


def encode_key(key: object) -> str:
    """Keys are stored as JSON, so 42 and "42" stay distinct."""
    if type(key) is int:  # the usual key, and json.dumps(42) == str(42): 5x faster
        return str(key)
    return json.dumps(key, sort_keys=True, default=str)


class BufferedLedger:
    """Base for a :class:`RunLedger` that buffers records and writes them in batches.

    :meth:`record` queues a row of :data:`LEDGER_ITEMS` (``run_id``, key as JSON, ``state``,
    ``attempts``, ``stage``, ``error``, ``updated_at``); :meth:`flush` hands what is queued to
    :meth:`write_batch`, and keeps the rows for the next flush if that fails.

    A subclass sets ``run_id`` and fills in the extension points:

    * :meth:`write_batch` (required): write the rows in one transaction, for example with
      :attr:`LedgerSQL.record`.
    * :meth:`timestamp` (optional): the ``updated_at`` value of a row recorded now, in the
      store's representation; ISO 8601 UTC text by default.
    * :meth:`rejects_row` (optional): whether a failed :meth:`write_batch` was about one row's
      data. Then :meth:`flush` writes the rows one by one, and sets aside (in :attr:`rejected`)
      each row the store refuses alone, so one item's record never sinks the others'.

    Attributes:
        rejected: ``(key as JSON, reason)`` of each record the store refused, in order; those
            items still count in the report, and a rerun of the run id does them again.
    """

    run_id: str

    def __init__(self) -> None:
        self._pending: list[tuple[Any, ...]] = []
        self._lock = asyncio.Lock()
        self.rejected: list[tuple[str, str]] = []

    def timestamp(self) -> Any:
        """The value of the ``updated_at`` column for a row recorded now (ISO 8601 UTC text)."""
        return utc_now()

    async def write_batch(self, batch: list[tuple[Any, ...]]) -> None:
        """Write ``batch`` (rows of :data:`LEDGER_ITEMS`) in one transaction; a subclass must implement it."""
        raise NotImplementedError

    def record(self, key: object, state: str, attempts: int, stage: str | None, error: str | None) -> None:
        """Queue one item's final state for the next :meth:`flush`."""
        self._pending.append((self.run_id, encode_key(key), state, attempts, stage, error, self.timestamp()))

    def rejects_row(self, exc: BaseException) -> bool:
        """Whether ``exc``, raised by :meth:`write_batch`, is about a row's data (a value the store
        refuses) rather than the store itself; by default no error is."""
        return False

    def rejected_message(self) -> str | None:
        """A sentence naming the records the store refused (:attr:`rejected`), or ``None``."""
        if not self.rejected:
            return None
        shown = "; ".join(f"key {key} ({reason})" for key, reason in self.rejected[:5])
        more = f"; and {len(self.rejected) - 5} more" if len(self.rejected) > 5 else ""
        count = len(self.rejected)
        return (
            f"the ledger refused the records of {count} item{'s' if count != 1 else ''}, which still "
            f"count in this report but are done again by a rerun of this run id: {shown}{more}"
        )

    async def flush(self) -> None:
        """Write everything recorded so far; on failure keep it for the next flush.

        A failure that :meth:`rejects_row` blames on a row's data writes the rows one by one
        instead, and sets aside the ones refused alone.
        """
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            try:
                await self.write_batch(batch)
            except Exception as exc:
                if len(batch) > 1 and self.rejects_row(exc):
                    await self._write_one_by_one(batch)
                    return
                self._pending[:0] = batch
                raise
            except BaseException:
                self._pending[:0] = batch
                raise

    async def _write_one_by_one(self, batch: list[tuple[Any, ...]]) -> None:
        for i, row in enumerate(batch):
            try:
                await self.write_batch([row])
            except Exception as exc:
                if not self.rejects_row(exc):
                    self._pending[:0] = batch[i:]
                    raise
                self.rejected.append((str(row[1]), f"{type(exc).__name__}: {exc}"))
            except BaseException:
                self._pending[:0] = batch[i:]
                raise


class SqliteLedger(BufferedLedger):
    """The default :class:`RunLedger`: item states for one pipeline's runs, in an SQLite file.

    Its reads are local and indexed, so they run on the event loop. :meth:`failed` and
    :meth:`close` are plain calls, for ``pipeline deadletters``, which reads the file outside a run
    (a pluggable ledger is not read there: it lists every dead letter, retried or not).

    It is a file on one machine, so it keeps unsharded runs only (shard 0 of 1): the engine
    refuses ``--shard`` with it, since shards on other machines would each keep their own.

    Args:
        path: The SQLite file; created with its directory if missing.
        pipeline: The pipeline's name (for watermarks).
        run_id: This run's id.
        flush_interval: Seconds between batched commits.
    """

    def __init__(self, path: Path, *, pipeline: str, run_id: str, flush_interval: float = 0.25):
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.pipeline = pipeline
        self.run_id = run_id
        self.flush_interval = flush_interval
        # Two connections: the writer is used from one executor thread at a time (isolation_level
        # None: we open transactions ourselves, so a batch is one commit); the reader serves
        # point lookups on the event loop, which WAL keeps from waiting on the writer.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._sql = LedgerSQL()
        for ddl in self._sql.create:
            self._db.execute(ddl)
        self._migrate()
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        _register_crc32(self._reader)
        self._refused = False
        row = self._reader.execute(self._sql.has_items, (run_id,)).fetchone()
        self.resuming = row is not None
        """Whether this run id has recorded items already (a rerun)."""

    # -- reading -------------------------------------------------------------------------

    def state(self, key: object) -> str | None:
        """This run's recorded state of ``key``, or ``None``."""
        row = self._reader.execute(self._sql.state, (self.run_id, encode_key(key))).fetchone()
        return None if row is None else str(row[0])

    async def states(self, keys: Sequence[object]) -> list[str | None]:
        """See :meth:`RunLedger.states`; a key that cannot be encoded has no state."""
        out: list[str | None] = []
        for key in keys:
            try:
                out.append(self.state(key))
            except TypeError:
                out.append(None)
        return out

    def failed(self) -> list[tuple[str, int, str | None, str | None]]:
        """This run's failed items: ``(key as JSON, attempts, stage, error)``."""
        rows = self._reader.execute(self._sql.failed, (self.run_id,)).fetchall()
        return [(str(k), int(a), s, e) for k, a, s, e in rows]

    async def counts(self) -> dict[str, int]:
        """How many of this run's items are in each state."""
        rows = self._reader.execute(self._sql.counts, (self.run_id,)).fetchall()
        return {str(s): int(n) for s, n in rows}

    async def last_watermark(self) -> str | None:
        """The watermark of this pipeline's last successful run, if any."""
        rows = self._reader.execute(self._sql.last_watermark, (self.pipeline, self.pipeline)).fetchall()
        return self._sql.run_watermark(str(r[0]) for r in rows)

    async def run_status(self) -> RunStatus | None:
        """This run id's state (one shard, 0/1), for ``pipeline status``."""
        runs = self._reader.execute(self._sql.shards, (self.run_id,)).fetchall()
        count = max((int(r[1]) for r in runs), default=1)
        counts = self._reader.execute(self._sql.all_shard_counts, (count, self.run_id)).fetchall()
        return self._sql.run_status(self.run_id, runs, counts)

    def _migrate(self) -> None:
        """Migrate a runs table of the layout before shards, in one transaction (rows kept)."""
        if "shard" in {r[1] for r in self._db.execute(f"PRAGMA table_info({self._sql.runs})")}:
            return
        self._db.execute("BEGIN IMMEDIATE")  # another process may be migrating it too
        try:
            if "shard" not in {r[1] for r in self._db.execute(f"PRAGMA table_info({self._sql.runs})")}:
                log.warning("migrating the runs table of ledger %s to a row per shard (rows kept)", self.path)
                for statement in self._sql.migrate_runs():
                    self._db.execute(statement)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # -- writing -------------------------------------------------------------------------

    def _write(self, batch: Iterable[tuple[Any, ...]]) -> None:
        self._db.execute("BEGIN")
        try:
            self._db.executemany(self._sql.record, batch)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def rejects_row(self, exc: BaseException) -> bool:
        """A value SQLite refuses (too big, not encodable): one row's data, not the file."""
        return isinstance(exc, sqlite3.DataError | sqlite3.IntegrityError | UnicodeEncodeError)

    async def write_batch(self, batch: list[tuple[Any, ...]]) -> None:
        """Commit ``batch`` off the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self._write, batch)

    async def start_run(self, started_at: str) -> None:
        """Note that this run id started (again); refuse one started as shards."""
        try:
            self._sql.check_shard_count(
                self.run_id, self._reader.execute(self._sql.shards, (self.run_id,)), None
            )
        except Exception:
            self._refused = True
            raise
        self._db.execute(self._sql.start_run, (self.run_id, 0, 1, self.pipeline, started_at))

    async def finish_run(self, status: str, watermark: str | None) -> None:
        """Note how this run ended, and its watermark when it succeeded."""
        if self._refused:  # the rows are another run's
            return
        self._db.execute(
            self._sql.finish_run, (status, utc_now(), watermark if status == "ok" else None, self.run_id, 0)
        )

    def close(self) -> None:
        """Close the connections (after a final :meth:`flush`)."""
        self._reader.close()
        self._db.close()


def _register_crc32(conn: sqlite3.Connection) -> None:
    """Give ``conn`` MySQL's ``CRC32()``, which the per-shard counts use."""
    conn.create_function(
        "crc32", 1, lambda v: None if v is None else zlib.crc32(str(v).encode("utf-8")), deterministic=True
    )


@contextlib.asynccontextmanager
async def open_sqlite_ledger(path: Path, *, pipeline: str, run_id: str) -> AsyncIterator[SqliteLedger]:
    """Open the default ledger file for one run, and close it on exit."""
    ledger = SqliteLedger(path, pipeline=pipeline, run_id=run_id)
    try:
        yield ledger
    finally:
        ledger.close()
