"""The run ledger: each item's state per run id, so a rerun finishes the job without redoing it.

An embedded SQLite file (``[pipeline] ledger``, by default ``<report_dir>/ledger.sqlite``)::

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
import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._report import utc_now

__all__ = ["Ledger"]

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


class Ledger:
    """Item states for one pipeline's runs, in an SQLite file.

    Args:
        path: The SQLite file; created with its directory if missing.
        pipeline: The pipeline's name (for watermarks).
        run_id: This run's id.
        flush_interval: Seconds between batched commits.
    """

    def __init__(self, path: Path, *, pipeline: str, run_id: str, flush_interval: float = 0.25):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.pipeline = pipeline
        self.run_id = run_id
        self.flush_interval = flush_interval
        self._pending: list[tuple[str, str, str, int, str | None, str | None, str]] = []
        # Two connections: the writer is used from one executor thread at a time (isolation_level
        # None: we open transactions ourselves, so a batch is one commit); the reader serves
        # point lookups on the event loop, which WAL keeps from waiting on the writer.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._lock = asyncio.Lock()
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

    def failed(self) -> list[tuple[str, int, str | None, str | None]]:
        """This run's failed items: ``(key as JSON, attempts, stage, error)``."""
        rows = self._reader.execute(
            "SELECT key, attempts, stage, error FROM items "
            "WHERE run_id = ? AND state = 'failed' ORDER BY key",
            (self.run_id,),
        ).fetchall()
        return [(str(k), int(a), s, e) for k, a, s, e in rows]

    def counts(self) -> dict[str, int]:
        """How many of this run's items are in each state."""
        rows = self._reader.execute(
            "SELECT state, COUNT(*) FROM items WHERE run_id = ? GROUP BY state", (self.run_id,)
        ).fetchall()
        return {str(s): int(n) for s, n in rows}

    def last_watermark(self) -> str | None:
        """The watermark of this pipeline's last successful run, if any."""
        row = self._reader.execute(
            "SELECT watermark FROM runs WHERE pipeline = ? AND status = 'ok' AND watermark IS NOT NULL "
            "ORDER BY finished_at DESC LIMIT 1",
            (self.pipeline,),
        ).fetchone()
        return None if row is None else str(row[0])

    # -- writing -------------------------------------------------------------------------

    def record(self, key: object, state: str, attempts: int, stage: str | None, error: str | None) -> None:
        """Queue one item's final state for the next batched commit."""
        self._pending.append((self.run_id, encode_key(key), state, attempts, stage, error, utc_now()))

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

    async def flush(self) -> None:
        """Commit everything recorded so far, off the event loop."""
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            await asyncio.get_running_loop().run_in_executor(None, self._write, batch)

    async def flush_periodically(self) -> None:
        """Flush every ``flush_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    def start_run(self, started_at: str) -> None:
        """Note that this run id started (again)."""
        self._db.execute(
            "INSERT INTO runs (run_id, pipeline, status, started_at) VALUES (?, ?, 'running', ?) "
            "ON CONFLICT (run_id) DO UPDATE SET status = 'running', finished_at = NULL",
            (self.run_id, self.pipeline, started_at),
        )

    def finish_run(self, status: str, watermark: str | None) -> None:
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
