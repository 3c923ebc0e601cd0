"""``pipeline run --shard K/N [--parallel P]`` and ``pipeline status``, in a subprocess."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.engine.cli import run_cli

CONFIG = """
[pipeline]
name = "cli"
report_dir = "runs"
ledger = {ledger}
max_failures = 10

[databases.catalog]
dsn = "sqlite:///catalog.db"
concurrency = 3

[source]
use = "{{mod}}:rows"
count = 8

[[stages]]
use = "{{mod}}:fail_odd"
retry = {{ attempts = 1 }}
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard", "4/4"], "shard index 4 is not between 0 and 3"),
        (["--shard", "auto/4"], "neither is set"),
        (["--parallel", "2"], "give --shard K/N too"),
        (["--shard", "0/8", "--parallel", "9"], "--parallel must be between 1 and the shard count 8"),
        (["--shard", "0/8", "--parallel", "4"], "databases.catalog.concurrency = 3"),
    ],
)
def test_a_bad_shard_is_a_config_error_before_anything_runs(
    write_config: Callable[[str], Path], tmp_path: Path, args: list[str], message: str
) -> None:
    """Exit 2 with one message naming the fix, and no run directory, no ledger."""
    config = write_config(CONFIG.format(ledger="false"))
    result = run_cli("run", str(config), *args, "--no-progress", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "runs").exists()


def test_the_sqlite_ledger_and_a_shard_exit_2(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """The default ledger file and --shard 0/2: exit 2, naming mysql_ledger."""
    config = write_config(CONFIG.format(ledger="true"))
    result = run_cli("run", str(config), "--shard", "0/2", cwd=tmp_path)
    assert result.returncode == 2
    assert "stages.db:mysql_ledger" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_shards_without_a_ledger_take_every_item_once(
    write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    """Two shards, one at a time (--parallel 1 keeps the whole cap): reports in their own
    directories, each with its own items, which add up to the source."""
    config = write_config(CONFIG.format(ledger="false"))
    reads = []
    for k in (0, 1):
        result = run_cli(
            "run", str(config), "--shard", f"{k}/2", "--parallel", "1", "--run-id", "r", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        report = json.loads((tmp_path / "runs" / "r" / f"shard-{k}-of-2" / "report.json").read_text())
        assert report["shard"] == f"{k}/2"
        reads.append(report["items"]["read"])
    assert sum(reads) == 8
    assert all(reads)


def test_status_json_of_an_unsharded_run(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """``pipeline status --json`` prints the run's totals and its one shard, as the issue spells it."""
    config = write_config(CONFIG.format(ledger="true"))
    assert run_cli("run", str(config), "--run-id", "r", "--no-progress", cwd=tmp_path).returncode == 0
    result = run_cli("status", str(config), "--run-id", "r", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["run_id"] == "r"
    assert status["items"] == {"done": 4, "failed": 4, "skipped": 0}
    (shard,) = status["shards"]
    assert (shard["shard"], shard["state"], shard["done"], shard["failed"]) == ("0/1", "done", 4, 4)
    assert shard["updated_at"]
    table = run_cli("status", str(config), "--run-id", "r", cwd=tmp_path)
    assert "0/1" in table.stdout
    assert "4 done, 4 failed, 0 skipped" in table.stdout


def test_status_of_an_unknown_run_exits_2(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """A run id the ledger never saw: exit 2, saying so."""
    config = write_config(CONFIG.format(ledger="true"))
    run_cli("run", str(config), "--run-id", "r", "--no-progress", cwd=tmp_path)
    result = run_cli("status", str(config), "--run-id", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert "run 'nope' is not in the ledger" in result.stderr


def test_deadletters_of_a_sharded_run_gathers_every_shard(
    write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    """``pipeline deadletters`` on a run of two shards lists both shards' failures (the odd
    items, 4 of 8) and says how to retry each shard."""
    config = write_config(CONFIG.format(ledger="false"))
    for k in (0, 1):
        result = run_cli(
            "run", str(config), "--shard", f"{k}/2", "--parallel", "1", "--run-id", "r", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
    per_shard = [
        len((tmp_path / "runs" / "r" / f"shard-{k}-of-2" / "dead_letters.jsonl").read_text().splitlines())
        for k in (0, 1)
    ]
    assert sum(per_shard) == 4
    for args in (["--run-id", "r"], []):  # named, and found as the latest run
        listing = run_cli("deadletters", str(config), *args, cwd=tmp_path)
        assert listing.returncode == 0, listing.stderr
        assert "run r: 4 items still failed" in listing.stdout
        hints = [line for line in listing.stdout.splitlines() if "pipeline retry" in line]
        shards = [hint.rsplit(" --shard ", 1)[-1] for hint in hints]
        assert shards == [f"{k}/2" for k in (0, 1) if per_shard[k]]
