"""``pipeline deadletters``: a run's failures, grouped by stage and reason, so they can be acted on."""

from __future__ import annotations

import json
from pathlib import Path

from ._exceptions import ConfigError
from ._ledger import SqliteLedger, encode_key
from ._pipeline import Pipeline
from ._report import FailureGroup, group_records, reason

__all__ = ["FailureGroup", "group_dead_letters", "latest_run_id", "reason", "shards_with_dead_letters"]


SHARD_FILES = "shard-*-of-*/dead_letters.jsonl"
"""A sharded run's dead letters: one file per shard, under the run's directory."""


def latest_run_id(pipeline: Pipeline) -> str:
    """The most recent run of this pipeline that left dead letters (in any of its shards)."""
    if pipeline.report_dir is None or not pipeline.report_dir.is_dir():
        raise ConfigError("no runs found: the pipeline has no report_dir, or it does not exist yet")
    files = [*pipeline.report_dir.glob("*/dead_letters.jsonl"), *pipeline.report_dir.glob(f"*/{SHARD_FILES}")]
    if not files:
        raise ConfigError(f"no run under {pipeline.report_dir} has dead letters")
    latest = max(files, key=lambda p: p.stat().st_mtime)
    run_dir = latest.parent if latest.parent.parent == pipeline.report_dir else latest.parent.parent
    return run_dir.name


def group_dead_letters(pipeline: Pipeline, run_id: str) -> list[FailureGroup]:
    """Group a run's dead letters (every shard's, for a sharded run) by stage and reason,
    leaving out items that later succeeded, when the ledger is a SQLite file to ask.

    Raises:
        ConfigError: The run has no dead-letter file.
    """
    if pipeline.report_dir is None:
        raise ConfigError("the pipeline has no report_dir, so it keeps no dead letters")
    run_dir = pipeline.report_dir / run_id
    paths = [p for p in [run_dir / "dead_letters.jsonl", *sorted(run_dir.glob(SHARD_FILES))] if p.exists()]
    if not paths:
        raise ConfigError(
            f"run {run_id!r} has no dead letters ({run_dir / 'dead_letters.jsonl'} does not exist, "
            "nor any shard's)"
        )
    still_failed: set[str] | None = None
    ledger_path = pipeline.ledger_path
    if ledger_path is not None and ledger_path.exists():
        ledger = SqliteLedger(ledger_path, pipeline=pipeline.name, run_id=run_id)
        try:
            still_failed = {key for key, *_ in ledger.failed()}
        finally:
            ledger.close()
    lines = [line for path in paths for line in Path(path).read_text(encoding="utf-8").splitlines()]
    records = [json.loads(line) for line in lines if line.strip()]
    if still_failed is None:
        return group_records(records)
    failed = still_failed
    # Retried since, and no longer failed: left out.
    return group_records(records, lambda record: encode_key(record["key"]) in failed)


def shards_with_dead_letters(pipeline: Pipeline, run_id: str) -> list[str]:
    """``K/N`` of each shard of a sharded run that left dead letters, by index; ``[]`` for a run
    of one process. Each is retried as its own shard: ``pipeline retry ... --shard K/N``."""
    if pipeline.report_dir is None:
        return []
    found = []
    for path in (pipeline.report_dir / run_id).glob(SHARD_FILES):
        if path.stat().st_size:
            _, index, _, count = path.parent.name.split("-")
            found.append((int(index), int(count)))
    return [f"{k}/{n}" for k, n in sorted(found)]
