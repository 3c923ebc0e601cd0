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


# --------------------------------------------------------------------------------------------
# Hostile keys


class Keyed:
    """A source of the given keys, and a stage that fails the keys in ``failing`` with ``message``."""

    def __init__(self, keys: list[Any], failing: dict[Any, str] | None = None) -> None:
        self.keys = keys
        self.failing = failing or {}
        self.seen: list[Any] = []

    def source(self) -> Iterator[dict[str, Any]]:
        for key in self.keys:
            yield {"id": key}

    async def stage(self, item: dict[str, Any]) -> dict[str, Any]:
        self.seen.append(item["id"])
        if item["id"] in self.failing:
            raise ValueError(self.failing[item["id"]])
        return item


def keyed_pipeline(store: Catalog, tmp_path: Path, keyed: Keyed) -> Pipeline:
    return Pipeline(
        name="ledgered",
        source=Source(keyed.source),
        stages=[Stage(keyed.stage, name="work", retry=Retry(attempts=1))],
        databases={"catalog": Database(store.dsn)},
        report_dir=tmp_path / "runs",
        ledger=LedgerStore(mysql_ledger, options={"database": "catalog", "table": "ledger"}),
        max_failures=100,
    )


async def test_a_key_longer_than_255_characters_is_recorded_and_not_redone(
    store: Catalog, tmp_path: Path
) -> None:
    """A 300-character key is recorded like any other: no ledger error, and a rerun redoes nothing."""
    keys: list[Any] = [1, "x" * 300, 3]
    first = await keyed_pipeline(store, tmp_path, Keyed(keys)).run_async(run_id=RUN)
    assert first.ledger_error is None
    again = Keyed(keys)
    report = await keyed_pipeline(store, tmp_path, again).run_async(run_id=RUN)
    assert again.seen == []
    assert report.already_done == 3


async def test_keys_and_run_ids_differing_in_case_accents_or_trailing_spaces_stay_apart(
    store: Catalog, tmp_path: Path
) -> None:
    """Keys "ABC"/"abc", "resume"/"résumé", "a"/"a " are distinct items, and run ids "n" and "n "
    are distinct runs: a rerun of one does not resume the other."""
    keys: list[Any] = ["ABC", "abc", "resume", "résumé", "a", "a "]
    await keyed_pipeline(store, tmp_path, Keyed(keys, {"abc": "bad"})).run_async(run_id="n")
    assert store.run("SELECT COUNT(*) FROM ledger WHERE run_id = ?", ("n",)) == [(6,)]
    other = Keyed(keys)
    report = await keyed_pipeline(store, tmp_path, other).run_async(run_id="n ")
    assert other.seen == keys, "run id 'n ' is not run 'n'"
    assert report.already_done == 0
    databases = {"catalog": Database(store.dsn, concurrency=1)}
    async with (
        open_context(stage="ledger", pipeline="ledgered", run_id="n", databases=databases) as ctx,
        mysql_ledger(ctx, database="catalog", table="ledger") as ledger,
    ):
        states = await ledger.states(keys)
    assert states == ["done", "failed", "done", "done", "done", "done"]


@pytest.fixture
def mysql_store(mysql_db: MariaDB, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    """The MariaDB store alone, for what only a sized column or an old MySQL layout shows."""
    monkeypatch.setenv("PIPELINE_DB_CATALOG_PASSWORD", mysql_db.password)
    return mysql_catalog(mysql_db, autocommit=True)


@pytest.mark.mysql
async def test_a_record_the_store_refuses_is_reported_and_the_others_written(
    mysql_store: Catalog, tmp_path: Path
) -> None:
    """An item whose record cannot be stored (an error text too big for the column) does not sink
    the batch: the others are recorded, the report's ledger_error names the lost key, and a rerun
    redoes only that item."""
    huge = "E" * 70_000  # more than a TEXT column's 65,535 bytes
    keys: list[Any] = [1, 2, 3, 4]
    report = await keyed_pipeline(mysql_store, tmp_path, Keyed(keys, {2: huge, 3: "small"})).run_async(
        run_id=RUN
    )
    assert (report.items.ok, report.items.failed) == (2, 2), "the item still counts"
    assert report.ledger_error is not None
    assert "the ledger refused the records of 1 item" in report.ledger_error
    assert "key 2 (DatabaseError" in report.ledger_error
    again = Keyed(keys)
    await keyed_pipeline(mysql_store, tmp_path, again).run_async(run_id=RUN)
    assert again.seen == [2]


@pytest.mark.mysql
async def test_a_ledger_table_of_the_old_layout_is_migrated_when_opened(
    mysql_store: Catalog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tables made with the old VARCHAR(255) key layout are migrated in place when the ledger
    opens (a warning says so); their rows still count, and long keys fit afterwards."""
    mysql_store.run(
        "CREATE TABLE ledger (run_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, "
        "`key` VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, state VARCHAR(16) NOT NULL, "
        "attempts INT NOT NULL, stage VARCHAR(255) NULL, error TEXT NULL, updated_at DATETIME(6) NOT NULL, "
        "PRIMARY KEY (run_id, `key`)) CHARACTER SET utf8mb4"
    )
    mysql_store.run(
        "CREATE TABLE ledger_runs (run_id VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, "
        "pipeline VARCHAR(255) NOT NULL, status VARCHAR(32) NOT NULL, started_at DATETIME(6) NOT NULL, "
        "finished_at DATETIME(6) NULL, watermark TEXT NULL, PRIMARY KEY (run_id)) CHARACTER SET utf8mb4"
    )
    mysql_store.run("INSERT INTO ledger VALUES (?, '1', 'done', 1, NULL, NULL, NOW())", (RUN,))
    mysql_store.run("INSERT INTO ledger_runs VALUES (?, 'ledgered', 'ok', NOW(), NOW(), NULL)", (RUN,))
    caplog.set_level("WARNING", logger="stages.db")
    keys: list[Any] = [1, "y" * 300]
    keyed = Keyed(keys)
    report = await keyed_pipeline(mysql_store, tmp_path, keyed).run_async(run_id=RUN)
    assert keyed.seen == ["y" * 300]
    assert (report.already_done, report.ledger_error) == (1, None)
    assert "migrating ledger table 'ledger'" in caplog.text
