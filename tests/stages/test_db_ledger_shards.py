"""The ledger of a sharded run: a runs row per (run id, shard), per-shard counts, the watermark
only once every shard is clean, the status across shards, and the refusals."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline import ConfigError, Database, LedgerStore, Pipeline, Retry, Shard, Source, Stage
from pipeline._ledger import SqliteLedger
from stages.db import mysql_ledger
from tests.fixtures.catalog import Catalog, mysql_catalog, sqlite_catalog
from tests.fixtures.mariadb import MariaDB

RUN = "night-1"


@pytest.fixture
def mysql_store(mysql_db: MariaDB, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    """An empty MariaDB database to keep the ledger in."""
    monkeypatch.setenv("PIPELINE_DB_CATALOG_PASSWORD", mysql_db.password)
    return mysql_catalog(mysql_db, autocommit=True)


class Night:
    """Rows 0..count-1 with an ``updated_at`` of ``100 + id``; the ids in ``failing`` fail."""

    def __init__(self, count: int = 40, failing: frozenset[int] = frozenset()) -> None:
        self.count = count
        self.failing = failing
        self.since: list[Any] = []

    def rows(self, since: Any = None) -> Iterator[dict[str, Any]]:
        self.since.append(since)
        for i in range(self.count):
            if since is None or 100 + i > int(since):
                yield {"id": i, "updated_at": 100 + i}

    def work(self, item: dict[str, Any]) -> dict[str, Any]:
        if item["id"] in self.failing:
            raise ValueError(f"bad {item['id']}")
        return item


def night_pipeline(store: Catalog, tmp_path: Path, night: Night) -> Pipeline:
    return Pipeline(
        name="nightly",
        source=Source(night.rows, watermark="updated_at"),
        stages=[Stage(night.work, retry=Retry(attempts=1))],
        databases={"catalog": Database(store.dsn, concurrency=4)},
        report_dir=tmp_path / "runs",
        ledger=LedgerStore(mysql_ledger, options={"database": "catalog", "table": "ledger"}),
    )


async def run_shard(p: Pipeline, index: int, count: int = 4, run_id: str = RUN) -> pipeline.RunReport:
    """Run one shard of ``p`` (2 at a time) and return its report, also when it failed."""
    try:
        return await pipeline.run_async(p, run_id=run_id, shard=Shard(index, count), parallel=2)
    except pipeline.PipelineError as exc:
        report: pipeline.RunReport = exc.report  # type: ignore[attr-defined]
        return report


async def status(p: Pipeline, run_id: str = RUN) -> pipeline.RunStatus:
    from pipeline._status import read_status

    found = await read_status(p, run_id)
    assert found is not None
    return found


@pytest.mark.mysql
async def test_each_shard_has_its_row_and_counts_its_own_items(mysql_store: Catalog, tmp_path: Path) -> None:
    """Four shards of one run id: four runs rows, each shard's report counts its own items, and
    the status shows pending, then done, with the run's totals."""
    night = Night(failing=frozenset({5}))
    p = night_pipeline(mysql_store, tmp_path, night)
    first = await pipeline.run_async(p, run_id=RUN, shard=Shard(0, 4), parallel=2)
    mid = await status(p)
    assert [s.state for s in mid.shards] == ["done", "pending", "pending", "pending"]
    assert mid.state == "pending"
    reports = [first, *[await run_shard(p, k) for k in (1, 2, 3)]]
    owners = [[i for i in range(40) if Shard(k, 4).owns(str(i))] for k in range(4)]
    for k, report in enumerate(reports):
        assert report.shard == f"{k}/4"
        assert report.items.read == len(owners[k])
        expected_failed = 1 if 5 in owners[k] else 0
        assert report.run_totals == {
            "done": len(owners[k]) - expected_failed,
            "failed": expected_failed,
            "skipped": 0,
        }
        assert report.status == ("failed" if expected_failed else "ok")
    rows = mysql_store.run(
        "SELECT shard, shards, status FROM ledger_runs WHERE run_id = ? ORDER BY shard", (RUN,)
    )
    assert [(int(a), int(b)) for a, b, _ in rows] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    end = await status(p)
    assert end.items == {"done": 39, "failed": 1, "skipped": 0}
    assert end.state == "failed"
    assert [s.done + s.failed for s in end.shards] == [len(o) for o in owners]
    assert all(s.updated_at for s in end.shards)


@pytest.mark.mysql
async def test_the_watermark_counts_only_once_every_shard_is_clean(
    mysql_store: Catalog, tmp_path: Path
) -> None:
    """Three clean shards of four keep no watermark for the next night; the fourth's clean
    end does, and it is the earliest shard's (each saw only its own rows)."""
    p = night_pipeline(mysql_store, tmp_path, Night())
    for k in range(3):
        assert (await run_shard(p, k)).status == "ok"
    ledger_rows = mysql_store.run("SELECT shard, watermark FROM ledger_runs WHERE run_id = ?", (RUN,))
    assert len(ledger_rows) == 3
    later = Night()
    await run_shard(night_pipeline(mysql_store, tmp_path, later), 0, run_id="night-2")
    assert later.since == [None]  # night 1 is not done: night 2 reads everything
    assert (await run_shard(p, 3)).status == "ok"
    marks = {
        int(s): int(w)
        for s, w in mysql_store.run("SELECT shard, watermark FROM ledger_runs WHERE run_id = ?", (RUN,))
    }
    after = Night()
    await run_shard(night_pipeline(mysql_store, tmp_path, after), 1, run_id="night-3")
    assert after.since == [str(min(marks.values()))]
    assert min(marks.values()) < max(marks.values())


@pytest.mark.mysql
async def test_a_failed_shard_holds_the_watermark(mysql_store: Catalog, tmp_path: Path) -> None:
    """One shard with a failed item: the other three are clean, and still no watermark is kept."""
    bad = next(i for i in range(40) if Shard(2, 4).owns(str(i)))
    p = night_pipeline(mysql_store, tmp_path, Night(failing=frozenset({bad})))
    assert [(await run_shard(p, k)).status for k in range(4)] == ["ok", "ok", "failed", "ok"]
    after = Night()
    await run_shard(night_pipeline(mysql_store, tmp_path, after), 0, run_id="night-2")
    assert after.since == [None]


@pytest.mark.mysql
async def test_a_run_id_keeps_its_shard_count(mysql_store: Catalog, tmp_path: Path) -> None:
    """A run id started as 4 shards is refused as 2 shards, or unsharded, with the fix; its rows stay."""
    p = night_pipeline(mysql_store, tmp_path, Night())
    await run_shard(p, 0)
    with pytest.raises(ConfigError, match=r"started as 4 shards.*--shard K/4"):
        await pipeline.run_async(p, run_id=RUN, shard=Shard(0, 2))
    with pytest.raises(ConfigError, match="cannot go on unsharded"):
        await pipeline.run_async(p, run_id=RUN)
    rows = mysql_store.run("SELECT shard, shards, status FROM ledger_runs WHERE run_id = ?", (RUN,))
    assert [(int(a), int(b), str(c)) for a, b, c in rows] == [(0, 4, "ok")]


@pytest.mark.mysql
async def test_an_old_runs_table_is_migrated_in_place(mysql_store: Catalog, tmp_path: Path) -> None:
    """A runs table keyed by run id alone gets the shard columns; its rows are shard 0 of 1 and
    an unsharded rerun's watermark still reads from them."""
    p = night_pipeline(mysql_store, tmp_path, Night(count=3))
    await pipeline.run_async(p, run_id="old")  # makes the tables
    mysql_store.run("DELETE FROM ledger_runs")
    mysql_store.run(
        "ALTER TABLE ledger_runs DROP PRIMARY KEY, DROP COLUMN shard, DROP COLUMN shards, "
        "ADD PRIMARY KEY (run_id)"
    )
    mysql_store.run(
        "INSERT INTO ledger_runs (run_id, pipeline, status, started_at, finished_at, watermark) "
        "VALUES ('old', 'nightly', 'ok', '2026-01-01', '2026-01-01 00:01', '101')"
    )
    night = Night(count=3)
    await pipeline.run_async(night_pipeline(mysql_store, tmp_path, night), run_id="new")
    assert night.since == ["101"]
    rows = mysql_store.run("SELECT run_id, shard, shards FROM ledger_runs ORDER BY run_id")
    assert [(bytes(r).decode(), int(s), int(n)) for r, s, n in rows] == [("new", 0, 1), ("old", 0, 1)]
    keys = mysql_store.run(
        "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = DATABASE() "
        "AND TABLE_NAME = 'ledger_runs' AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION"
    )
    assert [k for (k,) in keys] == ["run_id", "shard"]


def test_an_old_runs_table_in_the_sqlite_file_is_migrated_in_place(tmp_path: Path) -> None:
    """The default ledger file's runs table before shards becomes one with a row per shard, rows kept."""
    path = tmp_path / "ledger.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(
            "CREATE TABLE runs (run_id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, status TEXT NOT NULL, "
            "started_at TEXT NOT NULL, finished_at TEXT, watermark TEXT);"
            "INSERT INTO runs VALUES ('r', 'p', 'ok', '2025-01-01T00:00:00', '2025-01-01T00:01:00', 't9');"
        )
    SqliteLedger(path, pipeline="p", run_id="r2").close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT run_id, shard, shards, watermark FROM runs").fetchall()
        key = [r[1] for r in sorted(conn.execute("PRAGMA table_info(runs)"), key=lambda r: r[5]) if r[5]]
    assert rows == [("r", 0, 1, "t9")]
    assert key == ["run_id", "shard"]


def test_the_sqlite_ledger_refuses_shards(tmp_path: Path) -> None:
    """The default SQLite ledger and --shard K/N (N > 1): a config error naming the fix, before
    anything runs."""
    night = Night()
    p = Pipeline(source=Source(night.rows), stages=[Stage(night.work)], report_dir=tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"SQLite file.*stages\.db:mysql_ledger") as info:
        pipeline.run(p, shard=Shard(0, 2), handle_signals=False)
    assert info.value.location == "pipeline.ledger"
    assert night.since == []
    assert not (tmp_path / "runs").exists()


def test_the_table_ledger_on_sqlite_refuses_shards(tmp_path: Path) -> None:
    """mysql_ledger on an SQLite database and --shard: refused, naming the database."""
    night = Night()
    p = night_pipeline(sqlite_catalog(tmp_path, "ledger.db"), tmp_path, night)
    with pytest.raises(ConfigError, match="is an SQLite file"):
        pipeline.run(p, shard=Shard(1, 2), handle_signals=False)
    assert night.since == []


def test_an_unsharded_run_has_one_shard_in_its_status(tmp_path: Path) -> None:
    """The default ledger's run is shard 0/1 in its status, with its counts."""
    import asyncio

    night = Night(count=5, failing=frozenset({1}))
    p = Pipeline(
        source=Source(night.rows),
        stages=[Stage(night.work, retry=Retry(attempts=1))],
        report_dir=tmp_path / "runs",
        max_failures=5,
    )
    pipeline.run(p, run_id=RUN, handle_signals=False)
    found = asyncio.run(status(p))
    assert found.to_dict()["shards"][0]["shard"] == "0/1"
    assert found.items == {"done": 4, "failed": 1, "skipped": 0}
    assert found.state == "done"
