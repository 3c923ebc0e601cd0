"""What a run measures and leaves behind: per-stage statistics, the run report, dead letters.

The per-item cost matters here (it is on the hot path), so statistics are plain counters and a
fixed-size log-bucket latency histogram: no allocation per item beyond the float the clock returns.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DeadLetterWriter",
    "FailureGroup",
    "ItemCounts",
    "LatencyHistogram",
    "RunReport",
    "StageReport",
    "find_bottleneck",
    "group_records",
    "reason",
    "utc_now",
    "write_json",
]

# Buckets grow by 2**(1/8) (about 9%), so a percentile is within about 4.5% of the truth;
# they span 1 µs .. ~10^5 s in 400 counters.
_BUCKETS_PER_OCTAVE = 8
_MIN_S = 1e-6
_NBUCKETS = 400


class LatencyHistogram:
    """A fixed-size histogram of durations, for percentiles without storing samples."""

    __slots__ = ("count", "counts")

    def __init__(self) -> None:
        self.counts = [0] * _NBUCKETS
        self.count = 0

    def add(self, seconds: float) -> None:
        """Record one duration."""
        if seconds <= _MIN_S:
            index = 0
        else:
            index = min(_NBUCKETS - 1, int(math.log2(seconds / _MIN_S) * _BUCKETS_PER_OCTAVE) + 1)
        self.counts[index] += 1
        self.count += 1

    def percentile(self, q: float) -> float | None:
        """Return the ``q`` quantile (0..1), or ``None`` with no samples."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                if index == 0:
                    return _MIN_S
                # The geometric middle of the bucket.
                return float(_MIN_S * 2 ** ((index - 0.5) / _BUCKETS_PER_OCTAVE))
        return None  # pragma: no cover - counts always sum to count


@dataclass(frozen=True)
class ItemCounts:
    """How the source's items ended. ``read == ok + failed + skipped + unfinished``."""

    read: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    unfinished: int = 0


@dataclass(frozen=True)
class StageReport:
    """One stage's figures for the run.

    Attributes:
        name: The stage's name.
        kind: ``async``, ``thread``, ``async-gen`` or ``thread-gen``.
        concurrency: The cap at the end of the run.
        ok: Calls that returned an item.
        failed: Items that failed here, after their retries.
        skipped: Items the stage skipped.
        retries: Attempts beyond the first, over all items.
        max_in_flight: The most items inside the callable at once.
        latency_s: p50, p95 and p99 of one attempt, in seconds.
        busy_ratio: Share of the stage's capacity (cap x wall time) in use.
        blocked_s: Worker time spent waiting on a full downstream queue.
        limit_trace: For ``concurrency = "auto"``: ``[seconds since start, cap]`` at each change.
        abandoned_calls: The most thread calls at once that outlived their attempt (a timeout,
            a stop) and kept their slot until their thread returned.
        batch: For a batched stage: its ``size`` and ``max_wait``, the ``calls`` made with a
            gathered batch, their ``mean_size``, and the items ``isolated`` (run again alone
            because their batch raised). Its latency, busy ratio and in-flight figures are per
            call; ok, failed, skipped and retries are per item.
    """

    name: str
    kind: str
    concurrency: int
    ok: int
    failed: int
    skipped: int
    retries: int
    max_in_flight: int
    latency_s: dict[str, float | None]
    busy_ratio: float
    blocked_s: float
    limit_trace: list[tuple[float, int]] = field(default_factory=list)
    abandoned_calls: int = 0
    batch: dict[str, float] | None = None


@dataclass(frozen=True)
class RunReport:
    """The outcome of one run, as written to ``report.json``.

    Attributes:
        pipeline: The pipeline's name.
        run_id: The run's id.
        status: ``ok``, ``failed`` (over ``max_failures`` or the run itself failed) or
            ``interrupted``.
        exit_code: What the CLI exits with: 0, 1, 130 or 143.
        wall_s: Wall-clock seconds.
        items: How the source's items ended.
        stages: Per-stage figures, in order.
        bottleneck: The stage that limited throughput, and why.
        unfinished_keys: Keys of items cancelled at the end of a graceful stop.
        error: Why the run failed, when it did.
        dead_letters: Path of the dead-letter file, when anything failed.
        started_at: ISO 8601 start time (UTC).
        already_done: On a rerun of the run id: items the source yielded that had ended in an
            earlier attempt (done or skipped), and were not read again.
        not_retried: On a rerun: items that had failed earlier and were left alone (pass
            ``--retry-failed`` to take them again).
        abandoned_threads: Worker threads still stuck in a stage call when the run ended (a
            thread cannot be cancelled); the CLI exits without waiting for them.
        ledger_error: Why the ledger's last write failed, if it did (the items it lost are
            done again by a rerun).
        run_totals: With a ledger: how every item of the run id stands after this invocation
            (``done``, ``failed``, ``skipped``), earlier attempts of the run id included. The
            status and exit code count these failures against ``max_failures``, so a rerun
            that leaves earlier failures alone does not report a good night.
        memory: ``peak_rss_bytes``, the process's peak resident memory; with a memory budget
            also ``budget_bytes`` and ``peak_charged_bytes``, the most the items in flight were
            charged at once.
        shard: ``"K/N"`` when the run was one shard of N (``--shard``), else ``None``; its
            items, ``run_totals`` and status are that shard's.
    """

    pipeline: str
    run_id: str
    status: str
    exit_code: int
    wall_s: float
    items: ItemCounts
    stages: list[StageReport]
    bottleneck: dict[str, Any] | None = None
    unfinished_keys: list[Any] = field(default_factory=list)
    error: str | None = None
    dead_letters: str | None = None
    started_at: str = ""
    already_done: int = 0
    not_retried: int = 0
    abandoned_threads: int = 0
    ledger_error: str | None = None
    run_totals: dict[str, int] | None = None
    memory: dict[str, int] = field(default_factory=dict)
    shard: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-ready data."""
        return asdict(self)

    def write(self, path: Path) -> None:
        """Write the report as JSON, atomically."""
        write_json(path, self.to_dict(), indent=2)


def write_json(path: Path, document: Any, *, indent: int | None = None) -> None:
    """Write ``document`` as JSON to ``path`` atomically: a reader sees the old file or the new
    one, never half of one. Compact unless ``indent`` is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    separators = (",", ":") if indent is None else None
    tmp.write_text(json.dumps(document, indent=indent, separators=separators, default=str) + "\n")
    os.replace(tmp, path)


def find_bottleneck(stages: list[StageReport], cpu_bound: set[str]) -> dict[str, Any] | None:
    """The stage that limited the run (the busiest, with blocked time as tie-breaker), why, and
    what to do about it; ``cpu_bound`` names the stages marked CPU-bound."""
    if not stages:
        return None
    index, top = max(enumerate(stages), key=lambda p: (p[1].busy_ratio, -p[1].blocked_s))
    upstream_blocked = stages[index - 1].blocked_s if index > 0 else 0.0
    why = f"{top.busy_ratio:.0%} of its {top.concurrency} slots busy over the run"
    if upstream_blocked > 0:
        why += f"; the stage before it waited {upstream_blocked:.1f}s on its full queue"
    if top.busy_ratio < 0.5:
        advice = "no stage was saturated: the source, or the number of items, set the pace"
    elif top.name in cpu_bound and top.concurrency >= (os.cpu_count() or 1):
        advice = "it is CPU-bound and already at the core count: more cores help, a higher cap does not"
    else:
        advice = "raise its concurrency if what it calls can take more"
    return {"stage": top.name, "reason": f"{why}; {advice}", "busy_ratio": top.busy_ratio}


def utc_now() -> str:
    """The current time as ISO 8601, UTC, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class DeadLetterWriter:
    """Appends one JSON line per failed item; the file is created on the first failure.

    Each record has ``run_id``, ``key``, ``stage``, ``error_type``, ``message``, ``attempts``
    and ``time``.
    """

    def __init__(self, path: Path | None, run_id: str):
        self.path = path
        self.run_id = run_id
        self.count = 0
        self._file: IO[str] | None = None

    def write(self, *, key: object, stage: str, error: BaseException, attempts: int) -> None:
        """Record one failed item."""
        self.count += 1
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        record = {
            "run_id": self.run_id,
            "key": key,
            "stage": stage,
            "error_type": f"{type(error).__module__}.{type(error).__qualname__}".removeprefix("builtins."),
            "message": str(error) or repr(error),
            "attempts": attempts,
            "time": utc_now(),
        }
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file, if one was opened."""
        if self._file is not None:
            self._file.close()
            self._file = None


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


def group_records(
    records: Iterable[Mapping[str, Any]],
    keep: Callable[[Mapping[str, Any]], bool] | None = None,
    *,
    examples: int = 5,
) -> list[FailureGroup]:
    """Group dead-letter records (as :class:`DeadLetterWriter` writes them) by stage and reason.

    Only the last record of each key counts (an item retried and failed again is one failure);
    ``keep`` can leave out more (items that have succeeded since). Each group keeps up to
    ``examples`` keys, and the first full message as its example; the largest groups come first.
    """
    latest: dict[str, Mapping[str, Any]] = {}
    for record in records:
        latest[json.dumps(record["key"], sort_keys=True, default=str)] = record
    groups: dict[tuple[str, str, str], FailureGroup] = {}
    for record in latest.values():
        if keep is not None and not keep(record):
            continue
        why = reason(str(record["message"]))
        stage, error_type = str(record["stage"]), str(record["error_type"])
        group = groups.setdefault((stage, error_type, why), FailureGroup(stage, error_type, why))
        group.count += 1
        group.example = group.example or str(record["message"])
        if len(group.keys) < examples:
            group.keys.append(record["key"])
    return sorted(groups.values(), key=lambda g: (-g.count, g.stage))
