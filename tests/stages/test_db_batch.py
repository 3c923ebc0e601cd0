"""stages.db's batched stages on a real SQLite file and the private MariaDB server.

``write_results`` and ``lookup`` batch by default. These tests run each through the engine
twice, batched and with ``batch = false``, on the same data, and require the same outcome per
item: the rows written or the fields added, and the dead letters with their messages. On
MariaDB they also count the statements the server ran (``Com_insert``, ``Com_select``): one per
call of the stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest

from pipeline import Batch, Database, Retry, Stage
from pipeline.testing import Harness, StageRun, run_stages_async
from stages.db import lookup, write_results
from tests.fixtures.catalog import Catalog, sqlite_catalog
from tests.fixtures.mariadb import global_status

Item = dict[str, Any]
HOUR = 3600.0


def _status(backend: Catalog, name: str) -> int:
    assert backend.server is not None
    with backend.server.admin() as conn:
        return global_status(conn, name)


def image_item(i: int) -> Item:
    return {
        "id": i,
        "outputs": [f"{i}.webp"],
        "width": 10 + i,
        "height": 20,
        "bytes": 300 + i,
        "sha256": "ab" * 32,
    }


async def _record(
    backend: Catalog, items: list[Item], batch: Batch | Literal[False] | None, **stage: Any
) -> StageRun:
    stage.setdefault("options", {"database": "catalog"})
    return await run_stages_async(
        items,
        Stage(write_results, name="record", batch=batch, retry=Retry(attempts=1), **stage),
        databases={"catalog": Database(backend.dsn)},
        queue_size=len(items) + 1,
    )


def _rows(backend: Catalog) -> dict[str, tuple[Any, ...]]:
    """``results`` by key, without ``updated_at``."""
    out = {}
    for row in backend.result_rows():
        row.pop("updated_at")
        row.pop("key_sha256", None)
        key = str(row.pop("key"))
        out[key] = tuple(row.values())
    return out


def _letters(result: StageRun) -> list[tuple[Any, str, str, int]]:
    return sorted((d["key"], d["error_type"], d["message"], d["attempts"]) for d in result.dead_letters)


async def test_write_results_writes_a_batch_in_one_statement(backend: Catalog) -> None:
    """150 items, batched by default: every row written once, one INSERT per call on MariaDB."""
    before = _status(backend, "Com_insert") if backend.kind == "mysql" else 0
    result = await _record(backend, [image_item(i) for i in range(150)], None)
    assert result.report.items.ok == 150
    stage = result.report.stages[0]
    assert stage.batch is not None
    assert stage.batch["calls"] < 150
    rows = _rows(backend)
    assert len(rows) == 150
    assert rows["7"][:6] == ("ok", json.dumps(["7.webp"]), 17, 20, 307, "ab" * 32)
    if backend.kind == "mysql":
        assert _status(backend, "Com_insert") - before == stage.batch["calls"]


async def test_write_results_batched_or_not_ends_every_item_the_same_way(backend: Catalog) -> None:
    """A row the driver cannot send (a lone surrogate) and an item without its key fail alone,
    with the same messages batched as per item; every other row is written the same."""
    items = [{**image_item(i), "asset": f"a{i}"} for i in range(12)]
    items[4]["sha256"] = "\ud800"  # fails the whole multi-row statement: its batch is isolated
    del items[9]["asset"]  # fails in its place

    def run(batch: Batch | Literal[False]) -> Any:
        return _record(
            backend,
            [dict(item) for item in items],
            batch,
            options={"database": "catalog", "key_field": "asset"},
        )

    batched = await run(Batch(size=20, max_wait=HOUR))
    batched_rows = _rows(backend)
    backend.run("DELETE FROM results")
    single = await run(False)
    assert [(key, kind) for key, kind, _, _ in _letters(batched)] == [
        (4, "stages.db.DatabaseError"),
        (9, "ValueError"),
    ]
    assert _letters(batched) == _letters(single)
    assert batched_rows == _rows(backend)
    assert len(batched_rows) == 10
    stage = batched.report.stages[0]
    assert stage.batch is not None
    assert stage.batch["isolated"] == 12


async def test_write_results_fails_only_the_item_without_its_key_and_writes_the_rest(
    backend: Catalog,
) -> None:
    """An item missing key_field gets its ValueError in its place; the others are written by the
    same call."""
    batch = [{"asset": "a", "outputs": []}, {"id": 1}, {"asset": "c", "outputs": []}]
    async with Harness(run_id="run-1") as h:
        h.add_database(backend.dsn)
        async with write_results(
            h.context("record", batch=Batch()), database="catalog", key_field="asset", columns={}
        ) as write:
            results = await write(batch)
    assert results[0] is batch[0]
    assert results[2] is batch[2]
    assert isinstance(results[1], ValueError)
    assert "needs the item's key in field 'asset'" in str(results[1])
    assert sorted(_rows(backend)) == ["a", "c"]


CATALOG = "CREATE TABLE catalog (id INTEGER PRIMARY KEY, name VARCHAR(64) NOT NULL, url VARCHAR(255))"


def _seed(backend: Catalog) -> None:
    backend.run(CATALOG)
    backend.run_many(
        "INSERT INTO catalog (id, name, url) VALUES (?, ?, ?)",
        [(i, f"image {i}", None if i == 3 else f"https://img.example/{i}.jpg") for i in range(1, 8)],
    )


LOOKUP_ITEMS: list[Item] = [
    {"id": "a", "ref": 1, "name": "image 1"},
    {"id": "b", "ref": "2", "name": "image 2"},  # a string for an integer column
    {"id": "c", "ref": 3, "name": "IMAGE 3"},  # a case the collation may or may not fold
    {"id": "d", "ref": 404, "name": "nothing"},  # no row
    {"id": "e", "name": "image 5"},  # no ref field: the item's own error
    {"id": "f", "ref": 7, "name": "image 7"},
]


async def _look(
    backend: Catalog, batch: Batch | Literal[False], missing: str, query: str, params: list[str]
) -> StageRun:
    return await run_stages_async(
        [dict(item) for item in LOOKUP_ITEMS],
        Stage(
            lookup,
            options={"database": "catalog", "query": query, "params": params, "missing": missing},
            batch=batch,
            retry=Retry(attempts=1),
        ),
        databases={"catalog": Database(backend.dsn)},
        queue_size=16,
    )


@pytest.mark.parametrize("missing", ["fail", "skip", "keep"])
@pytest.mark.parametrize(
    ("query", "params"),
    [
        ("SELECT url, name AS found FROM catalog WHERE id = ?", ["ref"]),
        ("SELECT id AS row_id, url FROM catalog WHERE name = ? ORDER BY id LIMIT 1", ["name"]),
    ],
    ids=["by-id", "by-name"],
)
async def test_lookup_batched_or_not_gives_each_item_the_same_outcome(
    backend: Catalog, missing: str, query: str, params: list[str]
) -> None:
    """Each item gets the row it would get alone (the database compares, not Python), and the
    same error or skip; a batch of six is one statement on MariaDB."""
    _seed(backend)
    before = _status(backend, "Com_select") if backend.kind == "mysql" else 0
    batched = await _look(backend, Batch(size=10, max_wait=HOUR), missing, query, params)
    if backend.kind == "mysql":
        # One statement for the batch, plus the pool's check of its first connection.
        assert _status(backend, "Com_select") - before == 2
    single = await _look(backend, False, missing, query, params)
    assert sorted(batched.outputs, key=lambda i: i["id"]) == sorted(single.outputs, key=lambda i: i["id"])
    assert _letters(batched) == _letters(single)
    assert batched.report.items == single.report.items
    assert batched.report.stages[0].batch is not None
    assert batched.report.stages[0].batch["calls"] == 1
    assert batched.report.stages[0].batch["isolated"] == 0
    assert {o["id"] for o in batched.outputs} >= {"a", "f"}


async def test_lookup_a_batch_larger_than_a_statement_goes_in_several(tmp_path: Path) -> None:
    """600 items in one call: SQLite takes at most 500 members in a statement, so the batch goes
    in statements of 250; every item still gets its own row."""
    backend = sqlite_catalog(tmp_path)
    _seed(backend)
    items = [{"id": i, "ref": 1 + i % 7} for i in range(600)]
    result = await run_stages_async(
        items,
        Stage(
            lookup,
            options={
                "database": "catalog",
                "query": "SELECT name FROM catalog WHERE id = ?",
                "params": ["ref"],
            },
            batch=Batch(size=600, max_wait=HOUR),
        ),
        databases={"catalog": Database(backend.dsn)},
        queue_size=601,
    )
    assert result.report.items.ok == 600
    assert all(item["name"] == f"image {item['ref']}" for item in result.outputs)
    assert result.report.stages[0].batch is not None
    assert result.report.stages[0].batch["calls"] == 1


async def test_write_results_the_last_of_two_rows_with_one_key_wins_in_a_batch(backend: Catalog) -> None:
    """Two items with one key in a batch leave the second's row, as two writes one after the other do."""
    async with Harness(run_id="run-1") as h:
        h.add_database(backend.dsn)
        async with write_results(h.context("record", batch=Batch()), database="catalog") as write:
            await write([{**image_item(1), "width": 1}, {**image_item(1), "width": 2}, image_item(2)])
    rows = _rows(backend)
    assert sorted(rows) == ["1", "2"]
    assert rows["1"][2] == 2  # status, outputs, width, ...
