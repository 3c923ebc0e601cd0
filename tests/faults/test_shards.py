"""One run as 4 shard processes, 2 at a time, on MariaDB; one shard killed with SIGKILL mid-run and
run again: every row exactly once, and the database's cap held across the processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import pymysql
import pytest

from pipeline import Shard
from tests.faults.world import (
    SIZES,
    Config,
    Run,
    output_files,
    serve_images,
    temp_files,
    tiny_jpeg,
    wait_until,
)
from tests.fixtures.catalog import mysql_catalog
from tests.fixtures.httpserver import LoopbackServer
from tests.fixtures.mariadb import MariaDB, global_status

RUN_ID = "night-sharded"
ROWS = 80
SHARDS, PARALLEL, CONCURRENCY = 4, 2, 4
KILLED = 1


def _recorded(admin: Any, database: str, shard: int) -> int:
    """Ledger rows of ``shard``'s items so far (0 while the table does not exist yet)."""
    try:
        with admin.cursor() as cur:
            cur.execute(
                f"SELECT COUNT(*) FROM `{database}`.ledger WHERE run_id = %s AND CRC32(`key`) %% %s = %s",
                (RUN_ID, SHARDS, shard),
            )
            return int(cur.fetchone()[0])
    except pymysql.err.ProgrammingError:
        return 0


def _status_json(config: Config) -> dict[str, Any]:
    """What ``pipeline status --json`` prints (the command is tested elsewhere: one process fewer)."""
    from pipeline import load_config
    from pipeline._status import read_status

    found = asyncio.run(read_status(load_config(config.path), RUN_ID))
    assert found is not None
    return found.to_dict()


@pytest.mark.mysql
def test_four_shards_two_at_a_time_one_killed_then_rerun(
    mysql_db: MariaDB, http_server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards 0 and 1 start; shard 1 is killed (SIGKILL) once it has recorded items, with one of
    its rows held in flight; 2 and 3 take the free slots; then shard 1 runs again. Every row is
    done once in the ledger with one set of thumbnails and one results row, the rerun redoes only
    what the kill left, the run's status is done, and MariaDB never saw more connections than
    [databases.catalog] concurrency, though two processes ran at once."""
    env = {"PIPELINE_DB_CATALOG_PASSWORD": mysql_db.password}
    catalog = mysql_catalog(mysql_db)
    rows = serve_images(http_server, ROWS)
    owners = {i: next(k for k in range(SHARDS) if Shard(k, SHARDS).owns(str(i))) for i, _ in rows}
    held = max(i for i, k in owners.items() if k == KILLED)
    hold = http_server.add_slow(f"/img/{held}.jpg", tiny_jpeg())
    catalog.seed(rows)
    config = Config(
        tmp_path,
        catalog.dsn,
        pipeline={"ledger": {"use": "stages.db:mysql_ledger", "database": "catalog", "table": "ledger"}},
        databases={"concurrency": CONCURRENCY},
        # Stages wanting as many connections as the database has: only the split holds them.
        extra_stages=[
            {
                "name": "find",
                "use": "stages.db:lookup",
                "database": "catalog",
                "query": "SELECT url AS found FROM catalog WHERE id = ?",
                "params": ["id"],
                "concurrency": CONCURRENCY,
            }
        ],
        record={"concurrency": CONCURRENCY},
    )
    config.write()

    def shard(k: int) -> Run:
        args = ("run", str(config.path), "--run-id", RUN_ID, "--shard", f"{k}/{SHARDS}")
        return Run(*args, "--parallel", str(PARALLEL), "--no-progress", cwd=tmp_path, env=env)

    with contextlib.closing(mysql_db.admin()) as admin:
        with admin.cursor() as cur:
            cur.execute("FLUSH STATUS")  # Max_used_connections restarts from those open now
        baseline = global_status(admin, "Threads_connected")
        first, killed = shard(0), shard(KILLED)
        try:
            wait_until(lambda: _recorded(admin, mysql_db.database, KILLED) >= 3, "shard 1 recorded items")
        finally:
            killed.kill()
            killed.wait()
            hold.set()
        assert killed.process.returncode == -signal.SIGKILL
        done_before = _recorded(admin, mysql_db.database, KILLED)
        # Its connections go with it; only then may another shard take its slot.
        wait_until(
            lambda: global_status(admin, "Threads_connected") <= baseline + 2,
            "the killed shard's connections closed",
        )
        third = shard(2)
        assert first.wait() == 0, first.stderr
        fourth = shard(3)
        assert third.wait() == 0, third.stderr
        assert fourth.wait() == 0, fourth.stderr
        again = shard(KILLED)
        assert again.wait() == 0, again.stderr
        used = global_status(admin, "Max_used_connections") - baseline

    assert 1 <= used <= CONCURRENCY, used
    ledger = catalog.run("SELECT `key`, state FROM ledger WHERE run_id = ?", (RUN_ID,))
    assert sorted(int(k) for k, _ in ledger) == sorted(owners)
    assert {str(s) for _, s in ledger} == {"done"}
    expected = sorted(config.root / str(i) / f"{size}.png" for i in owners for size in SIZES)
    assert output_files(config.root) == expected
    assert temp_files(config.root) == []
    results = catalog.results()
    assert sorted(int(k) for k, _, _ in results) == sorted(owners)
    assert {status for _, status, _ in results} == {"ok"}
    rerun = json.loads(
        (config.report_dir / RUN_ID / f"shard-{KILLED}-of-{SHARDS}" / "report.json").read_text()
    )
    mine = sum(1 for k in owners.values() if k == KILLED)
    assert rerun["already_done"] == done_before
    assert rerun["items"]["read"] == mine - done_before
    assert rerun["run_totals"] == {"done": mine, "failed": 0, "skipped": 0}

    monkeypatch.setenv("PIPELINE_DB_CATALOG_PASSWORD", mysql_db.password)
    summary = _status_json(config)
    assert summary["state"] == "done"
    assert summary["items"] == {"done": ROWS, "failed": 0, "skipped": 0}
    assert [s["shard"] for s in summary["shards"]] == [f"{k}/{SHARDS}" for k in range(SHARDS)]
    assert [s["done"] for s in summary["shards"]] == [
        sum(1 for o in owners.values() if o == k) for k in range(SHARDS)
    ]
