"""The run ledger: each item's state per run id, so a rerun finishes the job without redoing it.

The engine talks to a ledger only through :class:`RunLedger`. The default is :class:`SqliteLedger`,
an embedded SQLite file; ``[pipeline] ledger = { use = "module:factory", ... }`` plugs in another
(``stages.db:mysql_ledger`` keeps it in a MySQL table, for runs shared by several workers).

The SQLite file (``[pipeline] ledger``, by default ``<report_dir>/ledger.sqlite``)::

    items(run_id, key, state, attempts, stage, error, updated_at)   one row per item and run
    runs(run_id, pipeline, status, started_at, finished_at, watermark)

* States are ``done``, ``skipped`` and ``failed``. A rerun of the same run id does not read
  ``done`` or ``skipped`` items again; ``--retry-failed`` takes the ``failed`` ones again.
* Writes are batched: a flusher commits what completed every ``flush_interval`` seconds, in one
  transaction, off the event loop. A ``kill -9`` loses at most that window of records, and those
  items are simply done again on the rerun: outputs are atomic and database writes are upserts,
  so doing an item twice leaves one correct result.
* Lookups (only on a rerun) are indexed point reads on a second, read-only connection in WAL mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ._report import utc_now

__all__ = ["Ledger", "RunLedger", "SqliteLedger", "encode_key", "open_sqlite_ledger"]


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


_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    stage TEXT,
    error TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    watermark TEXT
);
"""


def encode_key(key: object) -> str:
    """Keys are stored as JSON, so 42 and "42" stay distinct."""
    return json.dumps(key, sort_keys=True, default=str)


class BufferedLedger:
    """Base for a :class:`RunLedger` that buffers records and writes them in batches.

    :meth:`record` queues a row ``(run_id, key as JSON, state, attempts, stage, error, time)``;
    :meth:`flush` hands what is queued to :meth:`_write_batch` (one transaction), and keeps the
    rows for the next flush if that fails. A subclass sets ``run_id``, implements
    :meth:`_write_batch`, and may override :meth:`_timestamp`.
    """

    run_id: str

    def __init__(self) -> None:
        self._pending: list[tuple[Any, ...]] = []
        self._lock = asyncio.Lock()

    def _timestamp(self) -> Any:
        """The value of the ``updated_at`` column for a row recorded now."""
        return utc_now()

    async def _write_batch(self, batch: list[tuple[Any, ...]]) -> None:
        """Write ``batch`` in one transaction."""
        raise NotImplementedError

    def record(self, key: object, state: str, attempts: int, stage: str | None, error: str | None) -> None:
        """Queue one item's final state for the next :meth:`flush`."""
        self._pending.append((self.run_id, encode_key(key), state, attempts, stage, error, self._timestamp()))

    async def flush(self) -> None:
        """Write everything recorded so far; on failure keep it for the next flush."""
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            try:
                await self._write_batch(batch)
            except BaseException:
                self._pending[:0] = batch
                raise


class SqliteLedger(BufferedLedger):
    """The default :class:`RunLedger`: item states for one pipeline's runs, in an SQLite file.

    Its reads are local and indexed, so they run on the event loop. :meth:`failed` and
    :meth:`close` are plain calls, for ``pipeline deadletters``, which reads the file outside a run
    (a pluggable ledger is not read there: it lists every dead letter, retried or not).

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
        self._db.executescript(_SCHEMA)
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        row = self._reader.execute("SELECT 1 FROM items WHERE run_id = ? LIMIT 1", (run_id,)).fetchone()
        self.resuming = row is not None
        """Whether this run id has recorded items already (a rerun)."""

    # -- reading -------------------------------------------------------------------------

    def state(self, key: object) -> str | None:
        """This run's recorded state of ``key``, or ``None``."""
        row = self._reader.execute(
            "SELECT state FROM items WHERE run_id = ? AND key = ?", (self.run_id, encode_key(key))
        ).fetchone()
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
        rows = self._reader.execute(
            "SELECT key, attempts, stage, error FROM items "
            "WHERE run_id = ? AND state = 'failed' ORDER BY key",
            (self.run_id,),
        ).fetchall()
        return [(str(k), int(a), s, e) for k, a, s, e in rows]

    async def counts(self) -> dict[str, int]:
        """How many of this run's items are in each state."""
        rows = self._reader.execute(
            "SELECT state, COUNT(*) FROM items WHERE run_id = ? GROUP BY state", (self.run_id,)
        ).fetchall()
        return {str(s): int(n) for s, n in rows}

    async def last_watermark(self) -> str | None:
        """The watermark of this pipeline's last successful run, if any."""
        row = self._reader.execute(
            "SELECT watermark FROM runs WHERE pipeline = ? AND status = 'ok' AND watermark IS NOT NULL "
            "ORDER BY finished_at DESC LIMIT 1",
            (self.pipeline,),
        ).fetchone()
        return None if row is None else str(row[0])

    # -- writing -------------------------------------------------------------------------

    def _write(self, batch: Iterable[tuple[Any, ...]]) -> None:
        self._db.execute("BEGIN")
        try:
            self._db.executemany(
                "INSERT INTO items (run_id, key, state, attempts, stage, error, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, key) DO UPDATE SET "
                "state = excluded.state, attempts = excluded.attempts, stage = excluded.stage, "
                "error = excluded.error, updated_at = excluded.updated_at",
                batch,
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    async def _write_batch(self, batch: list[tuple[Any, ...]]) -> None:
        """Commit ``batch`` off the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self._write, batch)

    async def start_run(self, started_at: str) -> None:
        """Note that this run id started (again)."""
        self._db.execute(
            "INSERT INTO runs (run_id, pipeline, status, started_at) VALUES (?, ?, 'running', ?) "
            "ON CONFLICT (run_id) DO UPDATE SET status = 'running', finished_at = NULL",
            (self.run_id, self.pipeline, started_at),
        )

    async def finish_run(self, status: str, watermark: str | None) -> None:
        """Note how this run ended, and its watermark when it succeeded."""
        self._db.execute(
            "UPDATE runs SET status = ?, finished_at = ?, watermark = COALESCE(?, watermark) "
            "WHERE run_id = ?",
            (status, utc_now(), watermark if status == "ok" else None, self.run_id),
        )

    def close(self) -> None:
        """Close the connections (after a final :meth:`flush`)."""
        self._reader.close()
        self._db.close()


Ledger = SqliteLedger
"""The SQLite ledger's former name."""


@contextlib.asynccontextmanager
async def open_sqlite_ledger(path: Path, *, pipeline: str, run_id: str) -> AsyncIterator[SqliteLedger]:
    """Open the default ledger file for one run, and close it on exit."""
    ledger = SqliteLedger(path, pipeline=pipeline, run_id=run_id)
    try:
        yield ledger
    finally:
        ledger.close()
