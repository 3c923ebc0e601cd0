"""``pipeline deadletters``: a run's failures, grouped by stage and reason, so they can be acted on."""

from __future__ import annotations

import json
from pathlib import Path

from ._exceptions import ConfigError
from ._ledger import SqliteLedger, encode_key
from ._pipeline import Pipeline
from ._report import FailureGroup, group_records, reason

__all__ = ["FailureGroup", "group_dead_letters", "latest_run_id", "reason"]


def latest_run_id(pipeline: Pipeline) -> str:
    """The most recent run of this pipeline that left dead letters."""
    if pipeline.report_dir is None or not pipeline.report_dir.is_dir():
        raise ConfigError("no runs found: the pipeline has no report_dir, or it does not exist yet")
    runs = sorted(
        (p for p in pipeline.report_dir.glob("*/dead_letters.jsonl")), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise ConfigError(f"no run under {pipeline.report_dir} has dead letters")
    return runs[-1].parent.name


def group_dead_letters(pipeline: Pipeline, run_id: str) -> list[FailureGroup]:
    """Group a run's dead letters by stage and reason, leaving out items that later succeeded.

    Raises:
        ConfigError: The run has no dead-letter file.
    """
    if pipeline.report_dir is None:
        raise ConfigError("the pipeline has no report_dir, so it keeps no dead letters")
    path = pipeline.report_dir / run_id / "dead_letters.jsonl"
    if not path.exists():
        raise ConfigError(f"run {run_id!r} has no dead letters ({path} does not exist)")
    still_failed: set[str] | None = None
    ledger_path = pipeline.ledger_path
    if ledger_path is not None and ledger_path.exists():
        ledger = SqliteLedger(ledger_path, pipeline=pipeline.name, run_id=run_id)
        try:
            still_failed = {key for key, *_ in ledger.failed()}
        finally:
            ledger.close()
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if still_failed is None:
        return group_records(records)
    failed = still_failed
    # Retried since, and no longer failed: left out.
    return group_records(records, lambda record: encode_key(record["key"]) in failed)
