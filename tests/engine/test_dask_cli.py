"""``pipeline run CONFIG --shards N --dask ADDRESS``: what is refused before anything is submitted,
and a run of a config whose stages live next to it, on a real scheduler and two workers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline import ItemCounts, RunReport, Shard, encode_key
from pipeline._dask import ShardOutcome, combine
from tests.engine.cli import run_cli
from tests.fixtures.dask import DaskCluster

CONFIG = """
[pipeline]
name = "dask"
report_dir = "runs"
ledger = {ledger}

[databases.catalog]
dsn = "sqlite:///catalog.db"
concurrency = {cap}

[source]
use = "{{mod}}:rows"
count = 20

[[stages]]
use = "{{mod}}:touch"
concurrency = 2
"""

# Nothing listens there: a refusal must come before any attempt to connect.
NOWHERE = "tcp://127.0.0.1:9"


@pytest.mark.parametrize(
    ("args", "ledger", "cap", "names"),
    [
        (["--shards", "4"], "false", 4, ["--dask", "--shard K/N"]),
        (["--dask", NOWHERE], "false", 4, ["--shards"]),
        (["--shards", "0", "--dask", NOWHERE], "false", 4, ["--shards", ">= 1"]),
        (["--shards", "2", "--shard", "0/2", "--dask", NOWHERE], "false", 4, ["--shard K/N"]),
        (["--shards", "4", "--parallel", "5", "--dask", NOWHERE], "false", 4, ["--parallel"]),
        (
            ["--shards", "4", "--parallel", "4", "--dask", NOWHERE],
            "false",
            2,
            ["databases.catalog.concurrency"],
        ),
        (["--shards", "4", "--dask", NOWHERE], "true", 4, ["pipeline.ledger", "stages.db:mysql_ledger"]),
        (["--shards", "4", "--dask", NOWHERE, "--metrics-textfile", "m.prom"], "false", 4, ["--metrics"]),
    ],
    ids=["no-dask", "no-shards", "zero", "shard-too", "parallel", "cap-below-parallel", "sqlite", "metrics"],
)
def test_refused_before_anything_runs(
    write_config: Callable[[str], Path],
    tmp_path: Path,
    args: list[str],
    ledger: str,
    cap: int,
    names: list[str],
) -> None:
    """A sharded run that cannot work exits 2 with one message naming the config file and the
    flag or key, and runs nothing (no stage call, no run directory)."""
    config = write_config(CONFIG.format(ledger=ledger, cap=cap))
    result = run_cli("run", str(config), *args, "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "config error:" in result.stderr
    assert str(config) in result.stderr
    for name in names:
        assert name in result.stderr, result.stderr
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "runs").exists()


def test_shards_on_a_real_cluster_read_each_item_once(
    write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    """3 shards on 2 workers: each worker loads the config (its stage module is found beside it),
    each shard reads only the items it owns, and the combined report sums them to the source."""
    config = write_config(CONFIG.format(ledger="false", cap=4))
    with DaskCluster(2, cwd=tmp_path) as cluster:
        result = run_cli(
            "run", str(config), "--shards", "3", "--dask", cluster.address, "--run-id", "r1", "--no-progress",
            "--report", "sharded.json", cwd=tmp_path,
        )  # fmt: skip
        profiling = cluster.client().run(_profiling)
        logs = cluster.logs()
    assert result.returncode == 0, result.stderr
    combined = json.loads((tmp_path / "sharded.json").read_text())
    # CPython 3.11 can deadlock in Dask's task profiler (python/cpython#106883): a shard stops it.
    on_311 = sys.version_info[:2] == (3, 11)
    for worker in {shard["worker"] for shard in combined["shards"]}:
        assert profiling[worker] is not on_311, profiling
    assert ("stopped the task profiler" in logs) is on_311, logs
    assert combined == json.loads((tmp_path / "runs" / "r1" / "sharded-report.json").read_text())
    assert (combined["status"], combined["exit_code"], combined["parallel"]) == ("ok", 0, 2)
    assert combined["items"] == {"read": 20, "ok": 20, "failed": 0, "skipped": 0, "unfinished": 0}
    for k, shard in enumerate(combined["shards"]):
        owned = sum(Shard(k, 3).owns(encode_key(i)) for i in range(20))
        assert shard["shard"] == f"{k}/3"
        assert shard["report"]["items"]["read"] == owned
        assert shard["report"]["shard"] == f"{k}/3"
        # 2 of the 4 database leases, or 1 when the other shards' holders had the rest.
        assert 1 <= shard["leases"]["databases.catalog"] <= 2
        assert shard["leases"]["shards"] == 1
        assert (tmp_path / "runs" / "r1" / f"shard-{k}-of-3" / "report.json").is_file()
    assert "3 shards on tcp://127.0.0.1" in result.stdout


def _profiling(dask_worker: Any) -> bool:
    """Whether the worker's task profiler runs (through ``Client.run``, on each worker)."""
    return bool(dask_worker.periodic_callbacks["profile"].is_running())


def _report(shard: str, status: str, code: int, read: int, totals: dict[str, int]) -> RunReport:
    return RunReport(
        pipeline="p", run_id="r", status=status, exit_code=code, wall_s=1.0, stages=[], shard=shard,
        items=ItemCounts(read, read - 1, 1, 0, 0), already_done=2, run_totals=totals,
    )  # fmt: skip


def test_combined_status_is_the_worst_shard_and_counts_add_up() -> None:
    """The combined report sums the shards' items and ledger totals, sorts the shards by index,
    and exits with the highest shard code; a shard without a report leaves the totals unknown."""
    ok = ShardOutcome("1/3", "ok", 0, report=_report("1/3", "ok", 0, 5, {"done": 4, "failed": 1}))
    failed = ShardOutcome("0/3", "failed", 1, report=_report("0/3", "failed", 1, 7, {"done": 6, "failed": 1}))
    both = combine("p", "r", [ok, failed], wall_s=2.5, address="tcp://x", parallel=2)
    assert [s.shard for s in both.shards] == ["0/3", "1/3"]
    assert (both.status, both.exit_code) == ("failed", 1)
    assert both.items == ItemCounts(12, 10, 2, 0, 0)
    assert (both.already_done, both.run_totals) == (4, {"done": 10, "failed": 2})
    lost = ShardOutcome("2/3", "lost", 1, error="KilledWorker: ...")
    config = ShardOutcome("2/3", "failed", 2, error="config error: ...")
    assert combine("p", "r", [ok, lost], wall_s=1, address="a", parallel=1).run_totals is None
    assert combine("p", "r", [ok, lost], wall_s=1, address="a", parallel=1).status == "failed"
    assert combine("p", "r", [ok, config, failed], wall_s=1, address="a", parallel=1).exit_code == 2
    assert combine("p", "r", [ok], wall_s=1, address="a", parallel=1).status == "ok"
