"""End-to-end tests of ``python -m pipeline`` in a subprocess: exit codes, report JSON, --limit."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.engine.cli import run_cli

CONFIG = """
[pipeline]
name = "cli"
report_dir = "runs"
max_failures = {max_failures}

[source]
use = "{{mod}}:rows"
count = 6

[[stages]]
use = "{{mod}}:fail_odd"
name = "check"
concurrency = 2
retry = {{ attempts = 1 }}

[[stages]]
use = "{{mod}}:touch"
concurrency = 3
width = 7
"""

STAGE_KEYS = {
    "name",
    "kind",
    "concurrency",
    "ok",
    "failed",
    "skipped",
    "retries",
    "max_in_flight",
    "latency_s",
    "busy_ratio",
    "blocked_s",
}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_run_writes_report_and_exits_0(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """`run` within max_failures exits 0 and writes the full report JSON where --report says."""
    cfg = write_config(CONFIG.format(max_failures=10))
    proc = run_cli("run", str(cfg), "--report", "r.json", "--run-id", "r1", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = read_json(tmp_path / "r.json")
    assert report["pipeline"] == "cli"
    assert report["run_id"] == "r1"
    assert report["status"] == "ok"
    assert isinstance(report["wall_s"], float)
    assert report["items"] == {"read": 6, "ok": 3, "failed": 3, "skipped": 0, "unfinished": 0}
    assert [s["name"] for s in report["stages"]] == ["check", "touch"]
    for stage in report["stages"]:
        assert STAGE_KEYS <= set(stage)
        assert set(stage["latency_s"]) == {"p50", "p95", "p99"}
        assert 0.0 <= stage["busy_ratio"] <= 1.0
        assert stage["blocked_s"] >= 0
        assert stage["kind"] == "thread"
    check, touch = report["stages"]
    assert (check["concurrency"], check["ok"], check["failed"], check["retries"]) == (2, 3, 3, 0)
    assert (touch["concurrency"], touch["ok"]) == (3, 3)
    assert 1 <= touch["max_in_flight"] <= 3
    # The run directory holds the same report and the dead letters.
    assert read_json(tmp_path / "runs" / "r1" / "report.json")["items"] == report["items"]
    dead = (tmp_path / "runs" / "r1" / "dead_letters.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["key"] for line in dead) == [1, 3, 5]
    assert (tmp_path / "ran").exists()


def test_run_over_max_failures_exits_1(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """More failed items than max_failures: exit 1, status failed, the error names the threshold."""
    cfg = write_config(CONFIG.format(max_failures=2))
    proc = run_cli("run", str(cfg), "--report", "r.json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    report = read_json(tmp_path / "r.json")
    assert report["status"] == "failed"
    assert report["items"]["failed"] == 3
    assert "max_failures" in report["error"]


def test_run_limit(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """--limit N reads at most N source items."""
    cfg = write_config(CONFIG.format(max_failures=10))
    proc = run_cli("run", str(cfg), "--report", "r.json", "--limit", "2", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_json(tmp_path / "r.json")["items"] == {
        "read": 2,
        "ok": 1,
        "failed": 1,
        "skipped": 0,
        "unfinished": 0,
    }


def test_source_error_exits_1_loudly(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """A source that raises fails the run: exit 1, the error on stderr, the report says failed."""
    cfg = write_config(CONFIG.format(max_failures=10).replace(":rows", ":broken_rows"))
    proc = run_cli("run", str(cfg), "--report", "r.json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1
    assert "disk gone" in proc.stderr
    report = read_json(tmp_path / "r.json")
    assert report["status"] == "failed"
    assert "SourceError" in report["error"]


def test_validate_ok(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """`validate` on a good config exits 0, lists the stages, and runs nothing."""
    cfg = write_config(CONFIG.format(max_failures=0))
    proc = run_cli("validate", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "check" in proc.stdout
    assert "touch" in proc.stdout
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["validate", "run"])
def test_config_error_exits_2_and_runs_nothing(
    write_config: Callable[[str], Path], tmp_path: Path, command: str
) -> None:
    """A config error exits 2 with the file, key and fix on stderr; no stage runs, no run dir."""
    bad_stage = '\n[[stages]]\nuse = "{mod}:touch"\nconcurrency = 0\n'
    cfg = write_config(CONFIG.format(max_failures=0) + bad_stage)
    proc = run_cli(command, str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{cfg}: stages[2].concurrency" in proc.stderr
    assert "got 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "runs").exists()


def test_negative_limit_is_a_usage_error(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """--limit -1 exits 2 before running anything."""
    cfg = write_config(CONFIG.format(max_failures=0))
    proc = run_cli("run", str(cfg), "--limit", "-1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--limit" in proc.stderr
    assert not (tmp_path / "ran").exists()


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    """A config path that does not exist exits 2 with a message, not a traceback."""
    proc = run_cli("validate", "nope.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope.toml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_rerun_that_leaves_failures_alone_still_fails(
    write_config: Callable[[str], Path], tmp_path: Path
) -> None:
    """Rerunning a night whose failures exceed max_failures, without --retry-failed, reads
    nothing and still exits 1: the run id's failures count, and the report keeps this
    attempt's figures apart from the run's totals."""
    cfg = write_config(CONFIG.format(max_failures=2))
    first = run_cli("run", str(cfg), "--run-id", "night", "--no-progress", cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    again = run_cli("run", str(cfg), "--run-id", "night", "--report", "r.json", "--no-progress", cwd=tmp_path)
    assert again.returncode == 1, again.stderr
    report = read_json(tmp_path / "r.json")
    assert report["status"] == "failed"
    assert report["items"]["read"] == 0
    assert (report["already_done"], report["not_retried"]) == (3, 3)
    assert report["run_totals"] == {"done": 3, "failed": 3, "skipped": 0}
    assert "3 failed items in all" in report["error"]
    assert "pipeline retry" in report["error"]


@pytest.mark.parametrize(
    ("body", "raised"),
    [("raise RuntimeError('no config for you')", "RuntimeError"), ("def broken(:\n", "SyntaxError")],
)
def test_a_module_that_fails_to_import_is_a_config_error(
    write_config: Callable[[str], Path], tmp_path: Path, body: str, raised: str
) -> None:
    """A stage module that raises on import (or does not parse) exits 2, naming the key, the
    module and its error, without a traceback; nothing is created."""
    (tmp_path / "broken_stage.py").write_text(body)
    cfg = write_config(CONFIG.format(max_failures=0) + '\n[[stages]]\nuse = "broken_stage:run"\n')
    for command in ("validate", "run"):
        proc = run_cli(command, str(cfg), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"{cfg}: stages[2].use" in proc.stderr
        assert f"raised {raised}" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ('report_dir = "blocker/runs"', "pipeline.report_dir"),
        ('ledger = "blocker/l.sqlite"', "pipeline.ledger"),
    ],
)
def test_an_unwritable_report_dir_or_ledger_is_a_config_error(
    write_config: Callable[[str], Path], tmp_path: Path, setting: str, key: str
) -> None:
    """A report_dir or ledger path that cannot be created (a file stands in the way) exits 2 with
    the file, the key and the fix before anything runs or is created."""
    (tmp_path / "blocker").write_text("a file, not a directory")
    body = CONFIG.format(max_failures=0).replace('report_dir = "runs"', f'report_dir = "runs"\n{setting}')
    if "report_dir" in setting:
        body = body.replace('report_dir = "runs"\n', "", 1)
    cfg = write_config(body)
    proc = run_cli("run", str(cfg), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"{cfg}: {key}: " in proc.stderr
    assert "is a file, not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "runs").exists()


JSON_STAGES = '''
"""A stage that holds its item until the run has logged a progress line."""
import logging
import threading

PROGRESS = threading.Event()


class _Progress(logging.Handler):
    def emit(self, record):
        if getattr(record, "progress", None):
            PROGRESS.set()


logging.getLogger("pipeline").addHandler(_Progress())


def rows(count: int = 3):
    yield from ({"id": i} for i in range(count))


def hold(item):
    if not PROGRESS.wait(30):
        raise RuntimeError("no progress line was logged")
    return item
'''

JSON_CONFIG = """
[pipeline]
name = "json"
report_dir = "runs"
progress_interval = 0.01

[source]
use = "json_stages:rows"

[[stages]]
use = "json_stages:hold"
concurrency = 2
"""


def test_log_format_json_writes_one_object_a_line(tmp_path: Path) -> None:
    """``run --log-format json --no-progress``: every stderr line is a JSON object with the time
    (ISO 8601 UTC), level, run id and message; progress lines carry the snapshot's figures."""
    (tmp_path / "json_stages.py").write_text(JSON_STAGES)
    (tmp_path / "config.toml").write_text(JSON_CONFIG)
    proc = run_cli(
        "run", "config.toml", "--run-id", "j1", "--log-format", "json", "--no-progress", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert records
    for record in records:
        assert {"time", "level", "run_id", "message"} <= set(record)
        assert record["time"].endswith("Z")
        assert datetime.fromisoformat(record["time"]).utcoffset() == timedelta(0)
    assert all(r["run_id"] == "j1" for r in records)
    progress = [r for r in records if r["message"].startswith("progress: ")]
    assert progress
    first = progress[0]
    assert {"read", "done", "failed", "in_flight", "rate"} <= set(first)
    [stage] = first["stages"]
    assert (stage["name"], stage["cap"]) == ("hold", 2)
    assert {"in_flight", "queued"} <= set(stage)
    assert first["message"] == (
        f"progress: read={first['read']} done={first['done']} failed={first['failed']} "
        f"in_flight={first['in_flight']} rate={first['rate']:.1f}/s "
        + " ".join(f"{s['name']}={s['in_flight']}/{s['cap']}+q{s['queued']}" for s in first["stages"])
    )
    assert records[-1]["message"] == "report: runs/j1/report.html"


def test_log_format_text_is_the_default(write_config: Callable[[str], Path], tmp_path: Path) -> None:
    """Without --log-format the stderr lines stay plain text."""
    cfg = write_config(CONFIG.format(max_failures=10))
    proc = run_cli("run", str(cfg), "--run-id", "t1", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "report: runs/t1/report.html" in proc.stderr.splitlines()
