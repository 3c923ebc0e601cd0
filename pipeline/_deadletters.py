"""``pipeline deadletters``: a run's failures, grouped by stage and reason, so they can be acted on."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import ConfigError
from ._ledger import SqliteLedger, encode_key
from ._pipeline import Pipeline

__all__ = ["FailureGroup", "group_dead_letters", "latest_run_id"]

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


def reason(message: str) -> str:
    """The message without what differs item by item (URLs, quoted values)."""
    return _QUOTED.sub("'…'", _URL.sub("<url>", message))


@dataclass
class FailureGroup:
    """Failures of one stage for one reason."""

    stage: str
    error_type: str
    reason: str
    count: int = 0
    keys: list[Any] = field(default_factory=list)
    example: str = ""


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
    latest: dict[str, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            latest[encode_key(record["key"])] = record  # the last failure of each item
    groups: dict[tuple[str, str, str], FailureGroup] = defaultdict(lambda: FailureGroup("", "", ""))
    for key, record in latest.items():
        if still_failed is not None and key not in still_failed:
            continue  # retried since, and no longer failed
        why = reason(record["message"])
        group = groups[(record["stage"], record["error_type"], why)]
        group.stage, group.error_type, group.reason = record["stage"], record["error_type"], why
        group.count += 1
        group.example = group.example or record["message"]
        if len(group.keys) < 5:
            group.keys.append(record["key"])
    return sorted(groups.values(), key=lambda g: (-g.count, g.stage))
