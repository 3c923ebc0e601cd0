"""``read_rows`` in a sharded run: the shard's rows are chosen in SQL for an integer key, by the
engine's own partition, and by the engine's test for any other key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from pipeline import Context, Shard, encode_key
from pipeline.testing import Harness
from stages.db import read_rows
from tests.fixtures.catalog import Catalog, mysql_catalog
from tests.fixtures.mariadb import MariaDB, global_status
from tests.stages.test_db import seed_catalog


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    """Configured databases and the run's shared resources, closed after the test."""
    async with Harness(concurrency=8, pipeline="test", run_id="run-1") as h:
        yield h


async def _collect(ctx: Context, **options: Any) -> list[dict[str, Any]]:
    async with read_rows(ctx, database="catalog", **options) as rows:
        return [row async for row in rows]


async def _shards(harness: Harness, count: int, **options: Any) -> list[list[Any]]:
    out = []
    for i in range(count):
        rows = await _collect(harness.context("source", shard=Shard(i, count)), **options)
        out.append([row[options.get("key_column", "id")] for row in rows])
    return out


async def test_integer_keys_are_sharded_in_sql_as_the_engine_would(
    backend: Catalog, harness: Harness
) -> None:
    """4 shards of 1 000 integer keys (chunks of 64): disjoint, complete, in key order, each
    exactly the keys the engine's crc32 test gives it."""
    seed_catalog(backend, range(1, 1001))
    harness.add_database(backend.dsn)
    parts = await _shards(harness, 4, query="SELECT id, url FROM catalog", chunk_size=64)
    assert sorted(k for part in parts for k in part) == list(range(1, 1001))
    for i, part in enumerate(parts):
        assert part == [k for k in range(1, 1001) if Shard(i, 4).owns(encode_key(k))]


async def test_text_keys_are_filtered_by_the_engines_test(backend: Catalog, harness: Harness) -> None:
    """A text key is not pushed down (its encoding is JSON): each shard still gets exactly the
    keys the engine's test gives it."""
    seed_catalog(backend, range(1, 301))
    harness.add_database(backend.dsn)
    query = "SELECT name, id FROM catalog"
    parts = await _shards(harness, 3, query=query, key_column="name", chunk_size=50)
    names = sorted(f"image {i}" for i in range(1, 301))
    assert sorted(k for part in parts for k in part) == names
    for i, part in enumerate(parts):
        assert part == [k for k in names if Shard(i, 3).owns(encode_key(k))]


@pytest.mark.mysql
async def test_the_database_sends_only_the_shards_rows(
    mysql_db: MariaDB, monkeypatch: pytest.MonkeyPatch, harness: Harness
) -> None:
    """Pushed down: MariaDB sends a shard of 4 about a quarter of 2 000 rows, not all of them."""
    monkeypatch.setenv("PIPELINE_DB_CATALOG_PASSWORD", mysql_db.password)
    mysql_backend = mysql_catalog(mysql_db, autocommit=True)
    seed_catalog(mysql_backend, range(1, 2001))
    harness.add_database(mysql_backend.dsn)
    assert mysql_backend.server is not None
    with mysql_backend.server.admin() as admin:
        before = global_status(admin, "Rows_sent")
        rows = await _collect(
            harness.context("source", shard=Shard(1, 4)), query="SELECT id FROM catalog", chunk_size=100
        )
        sent = global_status(admin, "Rows_sent") - before
    assert 400 < len(rows) < 600
    assert sent < len(rows) + 50  # the rows, a probe row, a few chunks' extra row, SHOW STATUS
