"""Tests for stages.db on a real SQLite file and a real private MariaDB server.

Tests taking the ``backend`` fixture run once per kind of database; the MariaDB run carries the
``mysql`` mark. Factories are entered by hand with a hand-built Context, so these tests do not
depend on the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import sqlite3
import traceback
import tracemalloc
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pymysql
import pytest

from pipeline import (
    CapacityLimiter,
    ConfigError,
    Context,
    Database,
    Pipeline,
    Skip,
    Source,
    Stage,
    TransientError,
    load_config,
)
from pipeline.testing import Harness, run_stages_async
from stages.db import (
    DatabaseError,
    RowNotFoundError,
    execute_script,
    lookup,
    read_rows,
    redact,
    shared_database,
    write_results,
)
from stages.db._database import _SQLiteDatabase
from stages.db._dsn import _Target
from stages.db._sql import _keyset_queries, _translate_sql
from tests.fixtures.catalog import Catalog, mysql_catalog, sqlite_catalog
from tests.fixtures.mariadb import MariaDB, global_status

WRONG_PASSWORD = "wrong-pw-SECRET-123"

CATALOG_DDL = "CREATE TABLE catalog (id INTEGER PRIMARY KEY, url VARCHAR(255) NOT NULL, name VARCHAR(255))"


# --------------------------------------------------------------------------------------------
# Fixtures


def seed_catalog(backend: Catalog, ids: Sequence[int]) -> None:
    """Create ``catalog`` with one row per id, inserted in the given order."""
    backend.run(CATALOG_DDL)
    backend.run_many(
        "INSERT INTO catalog (id, url, name) VALUES (?, ?, ?)",
        [(i, f"https://img.example/{i}.jpg", f"image {i}") for i in ids],
    )


def _sqlite_backend(path: Path) -> Catalog:
    return sqlite_catalog(path.parent, path.name)


def _mysql_backend(server: MariaDB) -> Catalog:
    return mysql_catalog(server, autocommit=True)


@pytest.fixture
def mysql_backend(mysql_db: MariaDB, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    """The MariaDB backend alone, for server-side checks."""
    monkeypatch.setenv("PIPELINE_DB_CATALOG_PASSWORD", mysql_db.password)
    return _mysql_backend(mysql_db)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """What the engine would provide: configured databases and the run's shared resources,
    closed after the test."""
    async with Harness(concurrency=8, pipeline="test", run_id="run-1") as h:
        yield h


async def _collect(ctx: Context, **options: Any) -> list[dict[str, Any]]:
    async with read_rows(ctx, database="catalog", **options) as rows:
        return [row async for row in rows]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _admin(backend: Catalog) -> Any:
    assert backend.server is not None
    return backend.server.admin()


# --------------------------------------------------------------------------------------------
# DSNs and SQL text


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("mysql://u:pw@db.local:3306/cat", "mysql://u:***@db.local:3306/cat"),
        ("mysql://u@db.local/cat", "mysql://u@db.local/cat"),
        ("mysql://u:p@ss/w0rd@db.local/cat", "mysql://u:***@db.local/cat"),
        ("mysql://u@h/cat?password=pw&unix_socket=/s", "mysql://u@h/cat?password=***&unix_socket=/s"),
        ("sqlite:////var/lib/catalog.db", "sqlite:////var/lib/catalog.db"),
    ],
)
def test_redact_hides_the_password_and_nothing_else(dsn: str, expected: str) -> None:
    """redact() replaces any password, even one with unescaped / and @, by *** and keeps the rest."""
    assert redact(dsn) == expected


def test_translate_sql_turns_placeholders_into_pymysql_form_outside_literals() -> None:
    """For MySQL, ? becomes %s and % becomes %%, but a ? inside a string literal is left alone."""
    sql = 'SELECT * FROM t WHERE a = ? AND b LIKE \'x%?\' AND c = "it\\"s?" -- why?\n AND d = ?'
    text, count = _translate_sql(sql, "mysql")
    assert count == 2
    assert text == 'SELECT * FROM t WHERE a = %s AND b LIKE \'x%%?\' AND c = "it\\"s?" -- why?\n AND d = %s'
    assert _translate_sql(sql, "sqlite") == (sql, 2)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (pymysql.err.OperationalError(2003, "Can't connect to MySQL server"), True),
        (pymysql.err.OperationalError(2013, "Lost connection to server during query"), True),
        (pymysql.err.OperationalError(1040, "Too many connections"), True),
        (pymysql.err.OperationalError(1205, "Lock wait timeout exceeded"), True),
        (pymysql.err.OperationalError(1213, "Deadlock found"), True),
        (pymysql.err.InterfaceError(0, ""), True),
        (sqlite3.OperationalError("database is locked"), True),
        (ConnectionResetError("reset by peer"), True),
        (pymysql.err.OperationalError(1045, "Access denied for user 'u'"), False),
        (pymysql.err.ProgrammingError(1146, "Table 'x' doesn't exist"), False),
        (pymysql.err.IntegrityError(1062, "Duplicate entry"), False),
        (sqlite3.OperationalError("no such table: x"), False),
    ],
)
async def test_driver_errors_are_classified_as_transient_or_permanent(
    error: Exception, transient: bool
) -> None:
    """Connection, lock and deadlock errors become TransientError; the rest a DatabaseError."""
    target = _Target(dialect="sqlite", redacted="sqlite:///x.db", path="x.db")
    db = _SQLiteDatabase("catalog", target, CapacityLimiter(1), size=1, busy_timeout=0)
    translated = db._translate(error, "testing")
    assert isinstance(translated, TransientError if transient else DatabaseError)
    assert "'catalog'" in str(translated)


# --------------------------------------------------------------------------------------------
# read_rows


async def test_read_rows_yields_every_row_once_in_key_order_across_chunks(
    backend: Catalog, harness: Harness
) -> None:
    """2503 rows inserted in random order come out once each, in key order, 100 per chunk."""
    ids = list(range(1, 2504))
    random.Random(7).shuffle(ids)
    seed_catalog(backend, ids)
    harness.add_database(backend.dsn)
    rows = await _collect(harness.context("source"), query="SELECT id, url FROM catalog", chunk_size=100)
    assert [row["id"] for row in rows] == list(range(1, 2504))
    assert rows[0] == {"id": 1, "url": "https://img.example/1.jpg"}


async def test_read_rows_stops_cleanly_when_the_last_chunk_is_exactly_full(
    backend: Catalog, harness: Harness
) -> None:
    """A row count that is a multiple of chunk_size ends after one empty chunk, with no row twice."""
    seed_catalog(backend, range(1, 201))
    harness.add_database(backend.dsn)
    rows = await _collect(harness.context("source"), query="SELECT * FROM catalog", chunk_size=100)
    assert [row["id"] for row in rows] == list(range(1, 201))


async def test_read_rows_keeps_percent_signs_and_literal_question_marks(
    backend: Catalog, harness: Harness
) -> None:
    """A query with % in a LIKE and a '?' literal runs unchanged (no placeholder confusion)."""
    seed_catalog(backend, range(1, 40))
    harness.add_database(backend.dsn)
    query = "SELECT id, name FROM catalog WHERE url LIKE '%/1%' AND name <> '?' -- any?"
    rows = await _collect(harness.context("source"), query=query, chunk_size=4)
    assert [row["id"] for row in rows] == [1, *range(10, 20)]


async def test_read_rows_holds_the_limiter_only_while_fetching_a_chunk(
    backend: Catalog, harness: Harness
) -> None:
    """Between chunks the database's limiter is free, so a slow consumer blocks no other stage."""
    seed_catalog(backend, range(1, 26))
    handle = harness.add_database(backend.dsn, concurrency=1)
    async with read_rows(
        harness.context("source"), database="catalog", query="SELECT * FROM catalog", chunk_size=10
    ) as rows:
        borrowed = [handle.limiter.borrowed async for _ in rows]
    assert borrowed == [0] * 25
    assert handle.limiter.statistics().max_borrowed == 1


def test_read_rows_refuses_a_key_column_that_is_not_an_identifier() -> None:
    """key_column is spliced into SQL, so anything but a plain identifier is a ConfigError."""
    options = {"database": "catalog", "query": "SELECT 1 AS id", "key_column": "id; DROP TABLE catalog"}
    with pytest.raises(ConfigError, match="option 'key_column' = 'id; DROP TABLE catalog' is invalid"):
        Source(read_rows, options=options)


async def test_read_rows_called_directly_still_refuses_a_key_column_that_is_not_an_identifier(
    harness: Harness, tmp_path: Path
) -> None:
    """Called from Python, past the engine's option check, the SQL quoting still refuses the name."""
    harness.add_database(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigError, match="must be a plain SQL identifier"):
        await _collect(harness.context("source"), query="SELECT 1 AS id", key_column="id; DROP TABLE catalog")


async def test_read_rows_opens_a_relative_sqlite_path_from_the_working_directory(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:///rel.db names rel.db in the current directory."""
    seed_catalog(_sqlite_backend(tmp_path / "rel.db"), [3, 1, 2])
    monkeypatch.chdir(tmp_path)
    harness.add_database("sqlite:///rel.db")
    rows = await _collect(harness.context("source"), query="SELECT id FROM catalog")
    assert rows == [{"id": 1}, {"id": 2}, {"id": 3}]


def test_sqlite_chunk_query_seeks_by_primary_key(tmp_path: Path) -> None:
    """SQLite plans the next-chunk query as an index seek, so chunk N costs the same as chunk 1."""
    backend = _sqlite_backend(tmp_path / "plan.db")
    seed_catalog(backend, range(1, 100))
    _, following = _keyset_queries("sqlite", "SELECT id, url FROM catalog", "id")
    plan = " ".join(str(row[-1]) for row in backend.run("EXPLAIN QUERY PLAN " + following, (5, 10)))
    assert "PRIMARY KEY" in plan, plan
    assert "SCAN" not in plan.replace("SCAN q", ""), plan


@pytest.mark.mysql
def test_mysql_chunk_query_seeks_by_primary_key(mysql_backend: Catalog) -> None:
    """MariaDB merges the wrapped query and reads a PRIMARY range, not the whole table."""
    seed_catalog(mysql_backend, range(1, 2000))
    _, following = _keyset_queries("mysql", "SELECT id, url FROM catalog", "id")
    text, _ = _translate_sql(following, "mysql")
    with contextlib.closing(mysql_backend.connect()) as conn, conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute("EXPLAIN " + text, (1500, 100))
        plan = cur.fetchall()
    assert [(row["type"], row["key"]) for row in plan] == [("range", "PRIMARY")], plan


async def test_read_rows_streams_100k_rows_in_bounded_memory(harness: Harness, tmp_path: Path) -> None:
    """Streaming 100k SQLite rows at 1000 per chunk peaks far below holding all the rows."""
    path = tmp_path / "big.db"
    backend = _sqlite_backend(path)
    seed_catalog(backend, range(1, 100_001))
    harness.add_database(f"sqlite:///{path}")

    tracemalloc.start()
    try:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.row_factory = sqlite3.Row
            everything = [dict(row) for row in conn.execute("SELECT * FROM catalog")]
        all_rows_bytes = tracemalloc.get_traced_memory()[0]
        del everything
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        count = 0
        async with read_rows(
            harness.context("source"), database="catalog", query="SELECT * FROM catalog"
        ) as rows:
            async for _ in rows:
                count += 1
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert count == 100_000
    print(f"all rows: {all_rows_bytes / 1e6:.1f} MB, streaming peak: {peak / 1e6:.2f} MB")
    assert peak < all_rows_bytes / 10


# --------------------------------------------------------------------------------------------
# lookup


async def test_lookup_adds_the_first_rows_columns_to_the_item(backend: Catalog, harness: Harness) -> None:
    """The matching row's columns are added to the item, other fields kept."""
    seed_catalog(backend, [1, 2, 3])
    harness.add_database(backend.dsn)
    async with lookup(
        harness.context(),
        database="catalog",
        query="SELECT url, name FROM catalog WHERE id = ?",
        params=["ref"],
    ) as fn:
        item = await fn({"id": "a", "ref": 2})
    assert item == {"id": "a", "ref": 2, "url": "https://img.example/2.jpg", "name": "image 2"}


@pytest.mark.parametrize("missing", ["fail", "skip", "keep"])
async def test_lookup_without_a_row_follows_the_missing_policy(
    backend: Catalog, harness: Harness, missing: Literal["fail", "skip", "keep"]
) -> None:
    """No row: 'fail' raises RowNotFoundError, 'skip' raises Skip, 'keep' returns the item as is."""
    seed_catalog(backend, [1])
    harness.add_database(backend.dsn)
    query = "SELECT url FROM catalog WHERE id = ?"
    async with lookup(
        harness.context(), database="catalog", query=query, params=["id"], missing=missing
    ) as fn:
        if missing == "fail":
            with pytest.raises(RowNotFoundError, match="id=404"):
                await fn({"id": 404})
        elif missing == "skip":
            with pytest.raises(Skip):
                await fn({"id": 404})
        else:
            assert await fn({"id": 404}) == {"id": 404}


async def test_lookup_refuses_params_that_do_not_match_the_placeholders(
    harness: Harness, tmp_path: Path
) -> None:
    """Two placeholders and one param name is a ConfigError before any item runs."""
    harness.add_database(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ConfigError, match="2 \\? placeholders"):
        async with lookup(harness.context(), database="catalog", query="SELECT ? + ?", params=["id"]):
            pass


async def test_lookup_with_bad_sql_fails_permanently_and_the_pool_recovers(
    backend: Catalog, harness: Harness
) -> None:
    """A query on a missing table raises DatabaseError naming the database; later calls still work."""
    seed_catalog(backend, [1])
    harness.add_database(backend.dsn, concurrency=1)
    ctx = harness.context()
    async with lookup(
        ctx, database="catalog", query="SELECT * FROM nowhere WHERE id = ?", params=["id"]
    ) as bad:
        with pytest.raises(DatabaseError, match="database 'catalog'") as info:
            await bad({"id": 1})
    assert not isinstance(info.value, TransientError)
    async with lookup(
        ctx, database="catalog", query="SELECT url FROM catalog WHERE id = ?", params=["id"]
    ) as good:
        assert (await good({"id": 1}))["url"] == "https://img.example/1.jpg"


# --------------------------------------------------------------------------------------------
# write_results


async def test_write_results_upserts_one_row_per_key(backend: Catalog, harness: Harness) -> None:
    """Writing the same key twice leaves one row holding the second write's values."""
    harness.add_database(backend.dsn)
    item = {"id": 7, "outputs": ["a/7.webp"], "width": 10, "height": 20, "bytes": 300, "sha256": "ab" * 32}
    async with write_results(harness.context("record"), database="catalog") as write:
        assert await write(dict(item)) == item
        await write({**item, "outputs": ["b/7.webp"], "width": 11})
    rows = backend.run(
        "SELECT `key`, status, outputs, width, height, bytes, sha256, error, run_id FROM results"
        if backend.kind == "mysql"
        else 'SELECT "key", status, outputs, width, height, bytes, sha256, error, run_id FROM results'
    )
    assert len(rows) == 1
    key, status, outputs, width, height, size, sha256, error, run_id = rows[0]
    assert (key, status, json.loads(outputs), width, height, size, sha256, error, run_id) == (
        "7",
        "ok",
        ["b/7.webp"],
        11,
        20,
        300,
        "ab" * 32,
        None,
        "run-1",
    )


def _result_rows(backend: Catalog) -> dict[str, tuple[Any, ...]]:
    """``results`` by key: (status, outputs, width, height, error)."""
    key = "`key`" if backend.kind == "mysql" else '"key"'
    rows = backend.run(f"SELECT {key}, status, outputs, width, height, error FROM results")
    return {row[0]: tuple(row[1:]) for row in rows}


async def test_write_results_writes_the_columns_it_is_given(backend: Catalog, harness: Harness) -> None:
    """With columns set, the table has those job columns (from the named fields, JSON where asked)
    between the outcome columns, and none of the image job's."""
    harness.add_database(backend.dsn)
    columns = {"label": {"field": "name"}, "tags": {"type": "json"}, "score": {"type": "real"}}
    async with write_results(
        harness.context("record"), database="catalog", table="tagged", columns=columns
    ) as w:
        await w({"id": 1, "name": "cat", "tags": ["a", "b"], "score": 0.5, "width": 64})
        await w({"id": 2})
    key = "`key`" if backend.kind == "mysql" else '"key"'
    rows = backend.run(f"SELECT {key}, status, label, tags, score FROM tagged ORDER BY {key}")
    assert [tuple(row) for row in rows] == [
        ("1", "ok", "cat", '["a", "b"]', 0.5),
        ("2", "ok", None, None, None),
    ]
    with pytest.raises(Exception, match="width"):
        backend.run("SELECT width FROM tagged")


def test_write_results_refuses_job_columns_that_clash_with_its_own() -> None:
    """A job column named like an outcome column is a ConfigError naming it, when the stage is made."""
    with pytest.raises(ConfigError, match="column 'status' is one write_results always writes"):
        Stage(write_results, name="record", options={"database": "catalog", "columns": {"status": {}}})


async def test_write_results_records_an_item_that_failed_upstream(backend: Catalog, harness: Harness) -> None:
    """A diverted failed item gets status 'failed', the error prefixed with its stage, NULL outputs."""
    harness.add_database(backend.dsn)
    diverted = {
        "id": 20,
        "url": "http://127.0.0.1/gone.jpg",
        "status": "failed",
        "error": "DownloadError: GET http://127.0.0.1/gone.jpg answered 404 Not Found",
        "failed_stage": "download",
    }
    async with write_results(harness.context("record"), database="catalog") as write:
        assert await write(dict(diverted)) == diverted
    assert _result_rows(backend) == {
        "20": (
            "failed",
            None,
            None,
            None,
            "download: DownloadError: GET http://127.0.0.1/gone.jpg answered 404 Not Found",
        )
    }


async def test_write_results_records_a_skipped_item_with_its_reason(
    backend: Catalog, harness: Harness
) -> None:
    """A diverted skipped item gets status 'skipped' and the skip's reason; without a reason, NULL."""
    harness.add_database(backend.dsn)
    async with write_results(harness.context("record"), database="catalog") as write:
        await write({"id": 1, "status": "skipped", "error": "unchanged", "failed_stage": "lookup"})
        await write({"id": 2, "status": "skipped", "error": None, "failed_stage": "lookup"})
    assert _result_rows(backend) == {
        "1": ("skipped", None, None, None, "lookup: unchanged"),
        "2": ("skipped", None, None, None, None),
    }


async def test_write_results_failed_night_replaces_a_previous_ok_row(
    backend: Catalog, harness: Harness
) -> None:
    """The row is tonight's outcome: a failure after an ok night reads 'failed' with no outputs."""
    harness.add_database(backend.dsn)
    async with write_results(harness.context("record"), database="catalog") as write:
        await write({"id": 7, "outputs": ["07/7/256.webp"], "width": 640, "height": 480})
        await write({"id": 7, "status": "failed", "error": "OSError: disk full", "failed_stage": "write"})
    assert _result_rows(backend) == {"7": ("failed", None, None, None, "write: OSError: disk full")}


async def test_write_results_keeps_what_a_partly_processed_item_carries(
    harness: Harness, tmp_path: Path
) -> None:
    """An item that failed late keeps the size measured before the failure."""
    backend = _sqlite_backend(tmp_path / "r.db")
    harness.add_database(backend.dsn)
    async with write_results(harness.context("record"), database="catalog") as write:
        await write(
            {"id": 3, "width": 64, "height": 32, "status": "failed", "error": "E: x", "failed_stage": "write"}
        )
    assert _result_rows(backend) == {"3": ("failed", None, 64, 32, "write: E: x")}


async def test_write_results_ignores_status_and_error_fields_of_an_ok_item(
    harness: Harness, tmp_path: Path
) -> None:
    """A catalog column named status or error on an item that went through every stage is not its outcome."""
    backend = _sqlite_backend(tmp_path / "r.db")
    harness.add_database(backend.dsn)
    async with write_results(harness.context("record"), database="catalog") as write:
        await write({"id": 1, "status": "archived", "error": "legacy note"})
    assert _result_rows(backend) == {"1": ("ok", "[]", None, None, None)}


async def test_write_results_never_stores_a_url_password(harness: Harness, tmp_path: Path) -> None:
    """A password in a URL of a custom stage's error is replaced by *** before it is stored."""
    backend = _sqlite_backend(tmp_path / "r.db")
    harness.add_database(backend.dsn)
    error = "ValueError: cannot reach mysql://loader:hunter2@db.internal/catalog"
    async with write_results(harness.context("record"), database="catalog") as write:
        await write({"id": 1, "status": "failed", "error": error, "failed_stage": "enrich"})
    stored = _result_rows(backend)["1"][4]
    assert stored == "enrich: ValueError: cannot reach mysql://loader:***@db.internal/catalog"


async def test_write_results_as_always_stage_records_every_item(tmp_path: Path) -> None:
    """Through the engine, Stage(write_results, always=True) gets one row per item, failed ones included."""
    path = tmp_path / "r.db"

    def check(item: dict[str, Any]) -> dict[str, Any]:
        if item["id"] == 2:
            raise ValueError("id 2 is bad")
        if item["id"] == 3:
            raise Skip("id 3 is not wanted")
        return item

    result = await run_stages_async(
        [{"id": 1}, {"id": 2}, {"id": 3}],
        Stage(check, name="check"),
        Stage(write_results, name="record", always=True, options={"database": "catalog"}),
        databases={"catalog": Database(f"sqlite:///{path}")},
    )
    assert (result.report.items.ok, result.report.items.failed, result.report.items.skipped) == (1, 1, 1)
    assert _result_rows(_sqlite_backend(path)) == {
        "1": ("ok", "[]", None, None, None),
        "2": ("failed", None, None, None, "check: ValueError: id 2 is bad"),
        "3": ("skipped", None, None, None, "check: id 3 is not wanted"),
    }


def test_write_results_refuses_a_table_name_that_is_not_an_identifier() -> None:
    """table is spliced into SQL, so anything but a plain identifier is a ConfigError."""
    with pytest.raises(ConfigError, match="option 'table' = 'results; --' is invalid"):
        Stage(write_results, name="record", options={"database": "catalog", "table": "results; --"})


async def test_sqlite_write_while_locked_is_transient(harness: Harness, tmp_path: Path) -> None:
    """SQLite's 'database is locked' becomes TransientError, and the write succeeds once unlocked."""
    path = tmp_path / "locked.db"
    harness.add_database(f"sqlite:///{path}", busy_timeout=0)
    async with write_results(harness.context(), database="catalog") as write:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(TransientError, match="locked"):
                await write({"id": 1})
        finally:
            blocker.close()
        await write({"id": 1})
    assert _sqlite_backend(path).run("SELECT COUNT(*) FROM results") == [(1,)]


async def test_sqlite_database_is_switched_to_wal(harness: Harness, tmp_path: Path) -> None:
    """Opening a SQLite database puts it in WAL mode, so readers do not block the writer."""
    path = tmp_path / "wal.db"
    harness.add_database(f"sqlite:///{path}")
    await shared_database(harness.context(), "catalog")
    assert _sqlite_backend(path).run("PRAGMA journal_mode") == [("wal",)]


async def test_execute_script_runs_every_statement(backend: Catalog) -> None:
    """execute_script runs a multi-statement script, for seeding demo data."""
    await execute_script(
        backend.dsn,
        f"{CATALOG_DDL}; INSERT INTO catalog VALUES (1, 'u1', 'n%1');"
        "INSERT INTO catalog VALUES (2, 'u2', NULL);",
        name="catalog",
    )
    assert backend.run("SELECT id, name FROM catalog ORDER BY id") == [(1, "n%1"), (2, None)]


# --------------------------------------------------------------------------------------------
# Sharing and limits


async def test_stages_share_one_database_and_limiter(harness: Harness, tmp_path: Path) -> None:
    """Two stages asking for the same database get the same pool and the same limiter."""
    handle = harness.add_database(f"sqlite:///{tmp_path / 'x.db'}")
    first = await shared_database(harness.context("lookup"), "catalog")
    second = await shared_database(harness.context("record"), "catalog")
    assert first is second
    assert first.limiter is handle.limiter


@pytest.mark.mysql
async def test_mysql_connections_never_exceed_the_limiter(mysql_backend: Catalog, harness: Harness) -> None:
    """50 concurrent lookups and writes at concurrency 3 use at most 3 server connections."""
    seed_catalog(mysql_backend, range(1, 51))
    handle = harness.add_database(mysql_backend.dsn, concurrency=3)
    with _admin(mysql_backend) as admin:
        with admin.cursor() as cur:
            cur.execute("FLUSH STATUS")
        # Connections closed just before may linger briefly; they can only go away, never come.
        baseline = global_status(admin, "Threads_connected")
        query = "SELECT url FROM catalog WHERE id = ?"
        async with (
            lookup(harness.context("lookup"), database="catalog", query=query, params=["id"]) as find,
            write_results(harness.context("record"), database="catalog") as write,
        ):

            async def one(i: int) -> dict[str, Any]:
                return await write(await find({"id": i}))

            items = await asyncio.gather(*(one(i) for i in range(1, 51)))
        used = global_status(admin, "Max_used_connections")
    assert [item["url"] for item in items] == [f"https://img.example/{i}.jpg" for i in range(1, 51)]
    assert handle.limiter.statistics().max_borrowed == 3
    assert used - baseline <= 3, (used, baseline)


@pytest.mark.mysql
async def test_mysql_pool_caps_connections_when_the_limiter_grows(
    mysql_backend: Catalog, harness: Harness
) -> None:
    """Raising the limiter after the pool opened does not raise the server connection count, nor hang."""
    seed_catalog(mysql_backend, range(1, 51))
    handle = harness.add_database(mysql_backend.dsn, concurrency=2)
    with _admin(mysql_backend) as admin:
        with admin.cursor() as cur:
            cur.execute("FLUSH STATUS")
        baseline = global_status(admin, "Threads_connected")
        query = "SELECT url FROM catalog WHERE id = ?"
        async with lookup(harness.context(), database="catalog", query=query, params=["id"]) as find:
            handle.limiter.total = 10
            items = await asyncio.gather(*(find({"id": i}) for i in range(1, 51)))
        used = global_status(admin, "Max_used_connections")
    assert len(items) == 50
    assert handle.limiter.statistics().max_borrowed > 2
    assert used - baseline <= 2, (used, baseline)


# --------------------------------------------------------------------------------------------
# Passwords and failures


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


@pytest.mark.mysql
async def test_wrong_password_from_env_fails_without_showing_it(
    mysql_db: MariaDB, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused login is a DatabaseError naming the fix; the password is nowhere in it or its chain."""
    monkeypatch.setenv("PIPELINE_DB_CATALOG_PASSWORD", WRONG_PASSWORD)
    harness.add_database(mysql_db.dsn())
    with pytest.raises(DatabaseError, match="PIPELINE_DB_CATALOG_PASSWORD") as info:
        await shared_database(harness.context(), "catalog")
    assert info.value.code == 1045
    assert WRONG_PASSWORD not in _all_text(info.value)


@pytest.mark.mysql
async def test_wrong_password_in_dsn_fails_without_showing_it(mysql_db: MariaDB, harness: Harness) -> None:
    """A password written in the DSN is redacted to *** in the error, its chain and its repr."""
    harness.add_database(f"mysql://pipeline:{WRONG_PASSWORD}@127.0.0.1:{mysql_db.port}/pipeline_test")
    with pytest.raises(DatabaseError, match=r"pipeline:\*\*\*@") as info:
        await shared_database(harness.context(), "catalog")
    assert WRONG_PASSWORD not in _all_text(info.value)


@pytest.mark.mysql
async def test_password_is_not_logged_nor_in_the_repr(
    mysql_db: MariaDB, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening and closing a database logs the DSN redacted; the Database repr is redacted too."""
    caplog.set_level(logging.DEBUG, logger="stages.db")
    harness.add_database(mysql_db.dsn(password_in_dsn=True))
    db = await shared_database(harness.context(), "catalog")
    await harness.aclose()
    assert "opened database 'catalog'" in caplog.text
    assert mysql_db.password not in caplog.text + repr(db)


@pytest.mark.mysql
async def test_mysql_cancelled_query_does_not_poison_the_next_one(
    mysql_backend: Catalog, harness: Harness
) -> None:
    """A lookup cancelled mid-query drops its connection, so the next lookup reads its own answer."""
    harness.add_database(mysql_backend.dsn, concurrency=1)
    with _admin(mysql_backend) as admin, admin.cursor() as cur:
        cur.execute("SELECT GET_LOCK('held-by-admin', 0)")
        query = "SELECT GET_LOCK(?, 60) AS got"
        async with lookup(harness.context(), database="catalog", query=query, params=["lock"]) as fn:
            blocked = asyncio.create_task(fn({"lock": "held-by-admin"}))
            # Wait until the server shows the lookup waiting on the lock: a server-side fact,
            # so it is polled, with a bound.
            for _ in range(2000):
                cur.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE STATE = 'User lock'")
                if cur.fetchone()[0] == 1:
                    break
                await asyncio.sleep(0)
            else:
                pytest.fail("the lookup never reached the server's lock wait")
            blocked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await blocked
            cur.execute("SELECT RELEASE_LOCK('held-by-admin')")
            assert await fn({"lock": "free-lock"}) == {"lock": "free-lock", "got": 1}


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        (f"mysql://u:{WRONG_PASSWORD}@db.local:notaport/cat", "malformed DSN"),
        (f"postgres://u:{WRONG_PASSWORD}@db.local/cat", "scheme 'postgres'"),
        (f"mysql://u:{WRONG_PASSWORD}@db.local/cat?ssl=1", "unknown parameters"),
        (f"mysql://u:{WRONG_PASSWORD}@db.local/", "without a database name"),
        ("sqlite://host/cat.db", "has no host"),
    ],
)
async def test_bad_dsn_is_a_config_error_without_the_password(
    harness: Harness, dsn: str, message: str
) -> None:
    """An unusable DSN is a ConfigError naming the problem, with the password redacted."""
    harness.add_database(dsn)
    with pytest.raises(ConfigError, match=message) as info:
        await shared_database(harness.context(), "catalog")
    assert WRONG_PASSWORD not in _all_text(info.value)


@pytest.mark.mysql
async def test_password_from_env_overrides_the_dsn(
    mysql_db: MariaDB, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIPELINE_DB_<NAME>_PASSWORD wins over a password in the DSN (NAME upper-cased, - as _)."""
    monkeypatch.setenv("PIPELINE_DB_CATALOG_RO_PASSWORD", mysql_db.password)
    harness.add_database(
        f"mysql://pipeline:{WRONG_PASSWORD}@127.0.0.1:{mysql_db.port}/pipeline_test", name="catalog-ro"
    )
    db = await shared_database(harness.context(), "catalog-ro")
    assert await db.fetch_one("SELECT 41 + ? AS answer", [1]) == {"answer": 42}


@pytest.mark.mysql
async def test_mysql_unix_socket_dsn_connects(mysql_db: MariaDB, harness: Harness) -> None:
    """?unix_socket=/path connects over the server's socket rather than TCP."""
    harness.add_database(f"{mysql_db.dsn(password_in_dsn=True)}?unix_socket={mysql_db.unix_socket}")
    db = await shared_database(harness.context(), "catalog")
    row = await db.fetch_one("SELECT @@socket AS sock, USER() AS who")
    assert row is not None
    assert row["sock"] == mysql_db.unix_socket
    assert row["who"] == "pipeline@localhost"


# --------------------------------------------------------------------------------------------
# The package's public surface


def test_public_names_resolve_and_are_shown_as_stages_db() -> None:
    """Every name in stages.db.__all__ exists, and errors and stages carry stages.db as their module,
    so dead letters record stages.db.DatabaseError rather than a private path."""
    import stages.db

    assert len(stages.db.__all__) == len(set(stages.db.__all__))
    for name in stages.db.__all__:
        assert getattr(stages.db, name) is not None
    for obj in (DatabaseError, RowNotFoundError, read_rows, lookup, write_results, redact):
        assert obj.__module__ == "stages.db"


# --------------------------------------------------------------------------------------------
# Hostile input: keys, passwords, duplicates, config mistakes


DISTINCT_KEYS = ["ABC", "abc", "resume", "résumé", "a", "a ", " a"]


async def test_write_results_keeps_keys_that_differ_in_case_accents_or_trailing_spaces(
    backend: Catalog, harness: Harness
) -> None:
    """Keys equal under a case-, accent- or pad-insensitive collation stay separate rows, each
    with its own item's data."""
    harness.add_database(backend.dsn)
    async with write_results(harness.context("record"), database="catalog", columns={}) as write:
        for i, key in enumerate(DISTINCT_KEYS):
            await write({"id": key, "outputs": [f"out-{i}"]})
    key = "`key`" if backend.kind == "mysql" else '"key"'
    stored = {row[0]: json.loads(row[1]) for row in backend.run(f"SELECT {key}, outputs FROM results")}
    assert stored == {k: [f"out-{i}"] for i, k in enumerate(DISTINCT_KEYS)}


async def test_write_results_stores_a_key_longer_than_255_characters(
    backend: Catalog, harness: Harness
) -> None:
    """A 1000-character key is stored whole, and upserted on as any other key."""
    harness.add_database(backend.dsn)
    long_key = "k" * 999 + "é"
    async with write_results(harness.context("record"), database="catalog", columns={}) as write:
        await write({"id": long_key, "outputs": ["first"]})
        await write({"id": long_key, "outputs": ["second"]})
        await write({"id": long_key[:-1], "outputs": ["other"]})
    key = "`key`" if backend.kind == "mysql" else '"key"'
    stored = {row[0]: json.loads(row[1]) for row in backend.run(f"SELECT {key}, outputs FROM results")}
    assert stored == {long_key: ["second"], long_key[:-1]: ["other"]}


@pytest.mark.mysql
async def test_write_results_upgrades_a_results_table_of_the_old_layout(
    mysql_backend: Catalog, harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A results table made with the old VARCHAR(255) key keeps its rows and takes any key after
    write_results migrates it, saying so in the log."""
    mysql_backend.run(
        "CREATE TABLE results (`key` VARCHAR(255) NOT NULL PRIMARY KEY, `status` VARCHAR(32) NOT NULL, "
        "`outputs` LONGTEXT NULL, `error` TEXT NULL, `run_id` VARCHAR(255) NOT NULL, "
        "`updated_at` DATETIME(6) NOT NULL) CHARACTER SET utf8mb4"
    )
    mysql_backend.run("INSERT INTO results VALUES ('old', 'ok', '[]', NULL, 'r0', NOW())")
    harness.add_database(mysql_backend.dsn)
    caplog.set_level(logging.WARNING, logger="stages.db")
    async with write_results(harness.context("record"), database="catalog", columns={}) as write:
        await write({"id": "OLD", "outputs": ["x"]})
        await write({"id": "x" * 300, "outputs": ["y"]})
    keys = sorted(row[0] for row in mysql_backend.run("SELECT `key` FROM results"))
    assert keys == ["OLD", "old", "x" * 300]
    assert "migrating table 'results'" in caplog.text


@pytest.mark.parametrize(
    ("password", "dsn_tail"),
    [
        ("Dsn?Pw-333", "@127.0.0.1:1/catalog"),
        ("Dsn#Pw-333", "@127.0.0.1:1/catalog"),
        ("Dsn/Pw-333", "@127.0.0.1:1/catalog"),
        ("Dsn@Pw-333", "@127.0.0.1:1/catalog"),
        ("Dsn:Pw-333", "@127.0.0.1:1/catalog"),
        ("D?s#n/P@w:333", "@127.0.0.1:1/catalog?unix_socket=/tmp/s.sock"),
    ],
)
def test_redact_and_the_parser_agree_on_a_password_with_reserved_characters(
    password: str, dsn_tail: str
) -> None:
    """A password holding ? # / @ or : is hidden whole by redact(), and the DSN parses with that
    password, that host and that database: userinfo ends at the last @ before the host."""
    from stages.db._dsn import _parse_dsn

    dsn = f"mysql://pipeline:{password}{dsn_tail}"
    shown = redact(dsn)
    assert shown == f"mysql://pipeline:***{dsn_tail}"
    assert "Pw" not in shown
    assert "333" not in shown.partition("@")[0]
    target = _parse_dsn("catalog", dsn)
    assert (target.user, target.password, target.host, target.port, target.database) == (
        "pipeline",
        password,
        "127.0.0.1",
        1,
        "catalog",
    )
    assert password not in repr(target)


@pytest.mark.parametrize("password", ["hunt?er2", "hunt#er2", "hunt/er2", "hunt@er2", "hunt:er2"])
async def test_write_results_never_stores_a_url_password_with_reserved_characters(
    harness: Harness, tmp_path: Path, password: str
) -> None:
    """The error column's scrubbing hides a URL password holding ? # / @ or : too."""
    backend = _sqlite_backend(tmp_path / "r.db")
    harness.add_database(backend.dsn)
    error = f"ValueError: cannot reach mysql://loader:{password}@db.internal/catalog (refused)"
    async with write_results(harness.context("record"), database="catalog") as write:
        await write({"id": 1, "status": "failed", "error": error, "failed_stage": "enrich"})
    stored = _result_rows(backend)["1"][4]
    assert stored == "enrich: ValueError: cannot reach mysql://loader:***@db.internal/catalog (refused)"


async def test_unreachable_database_says_it_is_not_retried(harness: Harness) -> None:
    """A server that refuses the run's first connection fails the open with a message that says
    the run does not retry it, and what to check; no "will be retried"."""
    harness.add_database(f"mysql://pipeline@127.0.0.1:{_free_port()}/pipeline_test", connect_timeout=5)
    with pytest.raises(DatabaseError, match="error 2003") as info:
        await shared_database(harness.context(), "catalog")
    message = str(info.value)
    assert "will be retried" not in message
    assert "not retried" in message
    assert "127.0.0.1" in message


async def test_read_rows_hands_on_every_duplicate_at_a_chunk_boundary(
    backend: Catalog, harness: Harness
) -> None:
    """Rows 1,2,2,3,3,4,5 read 2 per chunk come out all seven, each duplicate right after its
    first copy, so the engine can fail the second as a duplicate key in flight."""
    backend.run("CREATE TABLE catalog (id INTEGER NOT NULL, url VARCHAR(255) NOT NULL)")
    backend.run_many(
        "INSERT INTO catalog (id, url) VALUES (?, ?)", [(i, f"u{i}") for i in (1, 2, 2, 3, 3, 4, 5)]
    )
    harness.add_database(backend.dsn)
    rows = await _collect(harness.context("source"), query="SELECT id, url FROM catalog", chunk_size=2)
    assert [row["id"] for row in rows] == [1, 2, 2, 3, 3, 4, 5]


async def test_duplicate_keys_at_a_chunk_boundary_fail_as_duplicates_in_a_run(
    backend: Catalog, tmp_path: Path
) -> None:
    """Through the engine, the second copy of each duplicated key fails with the reason in the dead
    letters: read 7, ok 5, failed 2, nothing lost silently."""
    backend.run("CREATE TABLE catalog (id INTEGER NOT NULL, url VARCHAR(255) NOT NULL)")
    backend.run_many(
        "INSERT INTO catalog (id, url) VALUES (?, ?)", [(i, f"u{i}") for i in (1, 2, 2, 3, 3, 4, 5)]
    )
    pipe = Pipeline(
        source=Source(
            read_rows,
            options={"database": "catalog", "query": "SELECT id, url FROM catalog", "chunk_size": 2},
        ),
        stages=[Stage(_passthrough, name="work")],
        databases={"catalog": Database(backend.dsn)},
        report_dir=tmp_path / "runs",
        ledger=False,
        max_failures=10,
    )
    report = await pipe.run_async(run_id="dups")
    assert (report.items.read, report.items.ok, report.items.failed) == (7, 5, 2)
    letters = [
        json.loads(line)
        for line in (tmp_path / "runs" / "dups" / "dead_letters.jsonl").read_text().splitlines()
    ]
    assert sorted((d["key"], d["stage"]) for d in letters) == [(2, "source"), (3, "source")]
    assert all("duplicate key" in d["message"] for d in letters)


async def _passthrough(item: dict[str, Any]) -> dict[str, Any]:
    return item


def _db_config(tmp_path: Path, *, database: str = "", source: str = "", stage: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[pipeline]
report_dir = "{tmp_path / "runs"}"

[databases.catalog]
dsn = "sqlite:///{tmp_path / "catalog.db"}"
{database}

[source]
use = "stages.db:read_rows"
database = "catalog"
query = "SELECT id, url FROM catalog"
{source}

[[stages]]
use = "stages.db:write_results"
database = "catalog"
{stage}
""",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize(
    ("edit", "location", "words"),
    [
        ({"database": "busy_timout = 5.0"}, "databases.catalog.busy_timout", "busy_timeout"),
        ({"database": "conect_timeout = 5.0"}, "databases.catalog.conect_timeout", "connect_timeout"),
        ({"database": "connect_timeout = -1"}, "databases.catalog.connect_timeout", ">= 0"),
        ({"database": 'dsn = "postgres://u@h/db"'}, "databases.catalog.dsn", "scheme 'postgres'"),
        ({"database": 'dsn = "mysql://u:pw?x@h:notaport/db"'}, "databases.catalog.dsn", "malformed"),
        ({"stage": 'database = "catlog"'}, "stages[0].database", "'catlog'"),
        ({"source": 'database = "catlog"'}, "source.database", "'catlog'"),
        ({"source": 'query = "SELECT id FROM catalog WHERE id > ?"'}, "source.query", "placeholders"),
    ],
)
def test_database_mistakes_fail_load_config_with_one_config_error(
    tmp_path: Path, edit: dict[str, str], location: str, words: str
) -> None:
    """Each database mistake is refused when the config is loaded, as one ConfigError naming the
    file, the table and key, and the fix; the password of a bad DSN is not shown."""
    lines = dict(edit)
    if "dsn" in lines.get("database", ""):
        path = _db_config(tmp_path)
        text = path.read_text().replace(f'dsn = "sqlite:///{tmp_path / "catalog.db"}"', lines["database"])
        path.write_text(text)
    else:
        path = _db_config(tmp_path, **lines)
    if "database =" in lines.get("source", "") or "database =" in lines.get("stage", ""):
        text = path.read_text()
        which = "source" if "source" in lines else "stage"
        # The edit replaces the table's own database line, not adds a second one.
        head, sep, tail = text.partition("[source]" if which == "source" else "[[stages]]")
        tail = tail.replace('database = "catalog"\n', "", 1)
        path.write_text(head + sep + tail)
    if "query =" in lines.get("source", ""):
        path.write_text(path.read_text().replace('query = "SELECT id, url FROM catalog"\n', "", 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.location) == (str(path), location)
    assert words in str(info.value)
    assert "pw?x" not in str(info.value)
    assert not (tmp_path / "runs").exists()
