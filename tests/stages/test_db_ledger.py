"""Tests for ``stages.db.mysql_ledger``: the run ledger in a database table instead of SQLite.

Each behaviour runs on the private MariaDB server (marked ``mysql``) and on an SQLite database
through the same stage, since the ledger works on either.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import (
    LEDGER_ITEMS,
    LEDGER_RUNS,
    ConfigError,
    Database,
    LedgerStore,
    Pipeline,
    Retry,
    RunLedger,
    Source,
    Stage,
    load_config,
)
from pipeline._ledger import SqliteLedger
from pipeline.testing import open_context
from stages.db import mysql_ledger
from tests.fixtures.catalog import Catalog, mysql_catalog, sqlite_catalog
from tests.fixtures.mariadb import MariaDB

RUN = "ledger-run"


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    """An empty database of each kind to keep the ledger in (MariaDB's password from the env)."""
    if request.param == "sqlite":
        return sqlite_catalog(tmp_path, "ledger.db")
    server: MariaDB = request.getfixturevalue("mysql_db")
    monkeypatch.setenv("PIPELINE_DB_CATALOG_PASSWORD", server.password)
    return mysql_catalog(server, autocommit=True)


class Calls:
    """A stage that records the ids it saw and fails the ids in ``failing``."""

    def __init__(self, failing: frozenset[int] = frozenset()) -> None:
        self.seen: list[int] = []
        self.failing = failing

    async def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        self.seen.append(item["id"])
        if item["id"] in self.failing:
            raise ValueError(f"bad item {item['id']}")
        return item


def passthrough(item: dict[str, Any]) -> dict[str, Any]:
    """A stage for the config tests."""
    return item


def rows(count: int = 5, since: str | None = None) -> Iterator[dict[str, Any]]:
    """Items 0..count-1, with ``updated_at`` = ``t<id>``; only those after ``since`` if given."""
    for i in range(count):
        stamp = f"t{i}"
        if since is None or stamp > since:
            yield {"id": i, "updated_at": stamp}


def make_pipeline(
    store: Catalog, tmp_path: Path, stage: Calls, *, watermark: str | None = None, count: int = 5
) -> Pipeline:
    return Pipeline(
        name="ledgered",
        source=Source(rows, options={"count": count}, watermark=watermark),
        stages=[Stage(stage, name="work", retry=Retry(attempts=1))],
        databases={"catalog": Database(store.dsn)},
        report_dir=tmp_path / "runs",
        ledger=LedgerStore(mysql_ledger, options={"database": "catalog", "table": "ledger"}),
        max_failures=100,
    )


def ledger_rows(store: Catalog) -> dict[str, tuple[Any, ...]]:
    found = store.run("SELECT `key`, state, attempts, stage FROM ledger WHERE run_id = ?", (RUN,))
    return {str(r[0]): tuple(r[1:]) for r in found}


async def test_a_run_records_every_item_in_the_table(store: Catalog, tmp_path: Path) -> None:
    """Every item ends with one row: done ones as done, the failed one with its stage."""
    report = await make_pipeline(store, tmp_path, Calls(frozenset({3}))).run_async(run_id=RUN)
    assert (report.items.ok, report.items.failed) == (4, 1)
    assert ledger_rows(store) == {
        "0": ("done", 1, None),
        "1": ("done", 1, None),
        "2": ("done", 1, None),
        "3": ("failed", 1, "work"),
        "4": ("done", 1, None),
    }
    assert not (tmp_path / "runs" / "ledger.sqlite").exists()  # the table replaced the default file


async def test_a_rerun_of_the_run_id_skips_what_ended(store: Catalog, tmp_path: Path) -> None:
    """A rerun takes neither the done items nor, without --retry-failed, the failed one."""
    await make_pipeline(store, tmp_path, Calls(frozenset({3}))).run_async(run_id=RUN)
    again = Calls()
    report = await make_pipeline(store, tmp_path, again).run_async(run_id=RUN)
    assert again.seen == []
    assert (report.already_done, report.not_retried) == (4, 1)


async def test_retry_failed_takes_the_failed_items_again(store: Catalog, tmp_path: Path) -> None:
    """With retry_failed the failed item runs again, and its row turns to done."""
    await make_pipeline(store, tmp_path, Calls(frozenset({3}))).run_async(run_id=RUN)
    again = Calls()
    report = await make_pipeline(store, tmp_path, again).run_async(run_id=RUN, retry_failed=True)
    assert again.seen == [3]
    assert report.already_done == 4
    assert ledger_rows(store)["3"] == ("done", 1, None)


async def test_the_watermark_of_a_good_run_bounds_the_next_one(store: Catalog, tmp_path: Path) -> None:
    """A successful run stores its highest watermark; the next run id reads only newer rows."""
    await make_pipeline(store, tmp_path, Calls(), watermark="updated_at", count=3).run_async(run_id="night-1")
    later = Calls()
    await make_pipeline(store, tmp_path, later, watermark="updated_at", count=5).run_async(run_id="night-2")
    assert later.seen == [3, 4]
    assert store.run("SELECT watermark FROM ledger_runs WHERE run_id = ?", ("night-2",)) == [("t4",)]


async def test_workers_sharing_a_run_id_leave_one_row_per_item(store: Catalog, tmp_path: Path) -> None:
    """Two runs of the same id at once upsert: each item has exactly one ledger row."""
    # The tables first: two workers creating them at once get MySQL's "already exists" warning.
    await make_pipeline(store, tmp_path, Calls()).run_async(run_id="setup", limit=0)
    first, second = Calls(), Calls()
    await asyncio.gather(
        make_pipeline(store, tmp_path / "a", first).run_async(run_id=RUN),
        make_pipeline(store, tmp_path / "b", second).run_async(run_id=RUN),
    )
    assert store.run("SELECT COUNT(*) FROM ledger WHERE run_id = ?", (RUN,)) == [(5,)]
    assert store.run("SELECT COUNT(*) FROM ledger_runs WHERE run_id = ?", (RUN,)) == [(1,)]


async def test_the_table_ledger_obeys_the_ledger_contract(store: Catalog, tmp_path: Path) -> None:
    """What mysql_ledger yields is a RunLedger, and reports the states it recorded."""
    pipe = make_pipeline(store, tmp_path, Calls(frozenset({1})), count=2)
    await pipe.run_async(run_id=RUN)
    databases = {"catalog": Database(store.dsn, concurrency=2)}
    async with (
        open_context(stage="ledger", pipeline="ledgered", run_id=RUN, databases=databases) as ctx,
        mysql_ledger(ctx, database="catalog", table="ledger") as ledger,
    ):
        assert isinstance(ledger, RunLedger)
        assert ledger.resuming
        assert await ledger.states([0, 1, 2, "0"]) == ["done", "failed", None, None]
        assert await ledger.counts() == {"done": 1, "failed": 1}
        assert await ledger.failed() == [("1", 1, "work", "ValueError: bad item 1")]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Config


def write_config(tmp_path: Path, ledger: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [pipeline]
            ledger = {ledger}
            [databases.catalog]
            dsn = "sqlite:///{tmp_path}/ledger.db"
            [source]
            use = "tests.stages.test_db_ledger:rows"
            [[stages]]
            use = "tests.stages.test_db_ledger:passthrough"
            """
        ),
        encoding="utf-8",
    )
    return path


def test_a_ledger_table_builds_a_ledger_store(tmp_path: Path) -> None:
    """``ledger = { use = ..., database = ... }`` names the factory and its checked options."""
    config = write_config(tmp_path, '{ use = "stages.db:mysql_ledger", database = "catalog", table = "t1" }')
    ledger = load_config(config).ledger
    assert isinstance(ledger, LedgerStore)
    assert (ledger.fn, dict(ledger.options)) == (mysql_ledger, {"database": "catalog", "table": "t1"})


@pytest.mark.parametrize(
    ("ledger", "location", "words"),
    [
        (
            '{ use = "stages.db:mysql_ledger", database = "catalog", tabel = "x" }',
            "pipeline.ledger.tabel",
            "tabel",
        ),
        (
            '{ use = "stages.db:mysql_ledger", database = "catalog", table = "a-b" }',
            "pipeline.ledger.table",
            "a-b",
        ),
        ('{ use = "stages.db:mysql_ledger" }', "pipeline.ledger.database", "database"),
        ('{ use = "stages.db:no_such_thing", database = "catalog" }', "pipeline.ledger.use", "no_such_thing"),
        ('{ use = "tests.stages.test_db_ledger:rows" }', "pipeline.ledger.use", "factory"),
        ('{ database = "catalog" }', "pipeline.ledger", "'use' is required"),
        ("42", "pipeline.ledger", "42"),
    ],
)
def test_a_bad_ledger_table_is_one_config_error(
    tmp_path: Path, ledger: str, location: str, words: str
) -> None:
    """Each mistake in the ledger table is refused at load time, naming its key and value."""
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, ledger))
    assert info.value.location == location
    assert words in str(info.value)


async def test_the_table_ledger_and_the_default_file_share_one_layout(tmp_path: Path) -> None:
    """The table ledger on SQLite has the default ledger file's columns, types and keys, and
    reads a ledger file made with the layout written before the two shared one."""
    old = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(old)) as conn, conn:
        conn.executescript(
            "CREATE TABLE items (run_id TEXT NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL, "
            "attempts INTEGER NOT NULL, stage TEXT, error TEXT, updated_at TEXT NOT NULL, "
            "PRIMARY KEY (run_id, key));"
            "CREATE TABLE runs (run_id TEXT PRIMARY KEY, pipeline TEXT NOT NULL, status TEXT NOT NULL, "
            "started_at TEXT NOT NULL, finished_at TEXT, watermark TEXT);"
            "INSERT INTO items VALUES ('r', '1', 'failed', 2, 'work', 'E: x', '2025-01-01T00:00:00');"
            "INSERT INTO runs VALUES ('r', 'p', 'ok', '2025-01-01T00:00:00', '2025-01-01T00:01:00', 't9');"
        )
    ledger = SqliteLedger(old, pipeline="p", run_id="r")
    try:
        assert ledger.resuming
        assert ledger.failed() == [("1", 2, "work", "E: x")]
        assert await ledger.last_watermark() == "t9"
        ledger.record(2, "done", 1, None, None)
        await ledger.flush()
        assert await ledger.counts() == {"done": 1, "failed": 1}
    finally:
        ledger.close()

    store = sqlite_catalog(tmp_path, "table.db")
    databases = {"catalog": Database(store.dsn, concurrency=1)}
    async with (
        open_context(stage="ledger", pipeline="p", run_id="r", databases=databases) as ctx,
        mysql_ledger(ctx, database="catalog", table="items"),
    ):
        pass

    def layout(path: Path, table: str) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            # name, type, notnull (a key column may differ: SQLite's keys refuse NULL anyway), pk
            return [(r[1], r[2], r[3] or r[5], r[5]) for r in conn.execute(f"PRAGMA table_info({table})")]

    fresh = tmp_path / "fresh.sqlite"
    SqliteLedger(fresh, pipeline="p", run_id="r").close()
    for file_table, table_table in ((LEDGER_ITEMS.name, "items"), (LEDGER_RUNS.name, "items_runs")):
        assert layout(fresh, file_table) == layout(tmp_path / "table.db", table_table)
        assert layout(fresh, file_table) == layout(old, file_table)
