"""read_rows on incremental nights: the engine passes ``since``, the source reads only what changed."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pipeline import ConfigError, Database, Pipeline, Source, Stage
from stages.db import read_rows


def _seed(path: Path, rows: list[tuple[int, str]]) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE catalog (id INTEGER PRIMARY KEY, url TEXT, updated_at TEXT NOT NULL)")
        conn.executemany("INSERT INTO catalog VALUES (?, 'http://x/' || ?, ?)", [(i, i, t) for i, t in rows])


def _night(path: Path, tmp_path: Path, run_id: str, *, watermark: bool = True, **options: Any) -> list[int]:
    seen: list[int] = []

    async def collect(item: dict[str, Any]) -> dict[str, Any]:
        seen.append(item["id"])
        return item

    pipeline = Pipeline(
        source=Source(
            read_rows,
            key="id",
            watermark="updated_at" if watermark else None,
            options={
                "database": "catalog",
                "query": "SELECT id, url, updated_at FROM catalog",
                "chunk_size": 3,
                **options,
            },
        ),
        stages=[Stage(collect)],
        databases={"catalog": Database(f"sqlite:///{path}")},
        report_dir=tmp_path / "runs",
        name="incremental",
    )
    report = pipeline.run(run_id=run_id, progress=False, handle_signals=False)
    assert report.status == "ok", report.error
    return sorted(seen)


def test_since_limits_the_rows_to_those_changed_after_it(tmp_path: Path) -> None:
    """read_rows with since and watermark_column reads only rows whose column is past since, in key
    order across chunks, with since a bound parameter (here a value that would break as SQL text)."""
    path = tmp_path / "catalog.db"
    _seed(path, [(i, f"2025-01-01T00:00:{i:02d}") for i in range(1, 11)])
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "UPDATE catalog SET updated_at = ? WHERE id = ?",
            [("2025-01-02T00:00:00 ' OR 1=1 --", i) for i in (2, 5, 6, 7, 9)],
        )
    changed = _night(
        path, tmp_path, "night-2", watermark=False, since="2025-01-01T00:00:10", watermark_column="updated_at"
    )
    assert changed == [2, 5, 6, 7, 9]


def test_second_night_reads_only_rows_changed_since_the_last_successful_run(tmp_path: Path) -> None:
    """With [source] watermark and read_rows' watermark_column, the first night reads every row and
    the next only those whose updated_at moved past the first night's largest, across chunks."""
    path = tmp_path / "catalog.db"
    _seed(path, [(i, f"2025-01-01T00:00:{i:02d}") for i in range(1, 11)])
    assert _night(path, tmp_path, "night-1", watermark_column="updated_at") == list(range(1, 11))
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "UPDATE catalog SET updated_at = ? WHERE id = ?",
            [("2025-01-02T00:00:00", i) for i in (2, 5, 6, 7, 9)],
        )
    assert _night(path, tmp_path, "night-2", watermark_column="updated_at") == [2, 5, 6, 7, 9]
    assert _night(path, tmp_path, "night-3", watermark_column="updated_at") == []


def test_since_without_watermark_column_is_a_config_error(tmp_path: Path) -> None:
    """The engine passing since to a read_rows that was not told which column to compare it with
    fails the run at start, naming the option to set."""
    path = tmp_path / "catalog.db"
    _seed(path, [(1, "2025-01-01T00:00:00")])
    _night(path, tmp_path, "night-1")  # no since yet: reads everything
    with pytest.raises(ConfigError, match="set watermark_column to the same column as watermark"):
        _night(path, tmp_path, "night-2")


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "watermark_column",
            "updated_at; DROP TABLE catalog",
            "option 'watermark_column' = 'updated_at; DROP TABLE catalog' is invalid",
        ),
        ("reconnect_attempts", 0, "option 'reconnect_attempts' = 0 is invalid"),
        ("reconnect_backoff", -1, "option 'reconnect_backoff' = -1 is invalid"),
    ],
)
def test_read_rows_refuses_bad_incremental_and_reconnect_options(
    tmp_path: Path, option: str, value: object, message: str
) -> None:
    """A watermark column that is not an identifier, or reconnect options out of range, fail at start."""
    path = tmp_path / "catalog.db"
    _seed(path, [(1, "2025-01-01T00:00:00")])
    with pytest.raises(ConfigError, match=message):
        _night(path, tmp_path, "night-1", watermark=False, **{option: value})
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM catalog").fetchone() == (1,)
