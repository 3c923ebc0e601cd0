"""A run's state across its shards: :class:`RunStatus` and :class:`ShardStatus`, from a ledger's rows.

A run id has one row per shard in the ledger's runs table (an unsharded run is shard 0 of 1),
and its items are each owned by one shard (:meth:`pipeline.Shard.owns`). What every SQL ledger
reads comes here as plain rows; this module decides what they mean, once:

* a shard is ``pending`` (no row yet), ``running``, ``done`` (it ended ``ok``) or ``failed``
  (``failed`` or ``interrupted``: its scheduler runs it again);
* the run is done when all N shards are, and only then does its watermark count;
* the run's watermark is the earliest of its shards': each shard saw only its own rows, and
  the earliest one re-reads a few changes rather than skip any.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ._exceptions import ConfigError
from ._shard import Shard

__all__ = ["RunStatus", "ShardStatus", "build_status", "check_shard_count", "earliest_watermark"]

_STATE = {"running": "running", "ok": "done", "failed": "failed", "interrupted": "failed"}


@dataclass(frozen=True)
class ShardStatus:
    """One shard of a run, as the ledger has it.

    Attributes:
        shard: ``"K/N"``.
        state: ``pending``, ``running``, ``done`` or ``failed``.
        done: Its items recorded done.
        failed: Its items recorded failed (and not done since).
        skipped: Its items recorded skipped.
        updated_at: The last time the ledger heard of it (a start, an item, the end), ISO 8601
            UTC; ``None`` while pending. A ``running`` shard whose time stands still was killed.
        status: How its last attempt ended (``ok``, ``failed``, ``interrupted``), or
            ``running``; ``None`` while pending.
    """

    shard: str
    state: str
    done: int = 0
    failed: int = 0
    skipped: int = 0
    updated_at: str | None = None
    status: str | None = None


@dataclass(frozen=True)
class RunStatus:
    """A run id across its shards.

    Attributes:
        run_id: The run.
        state: ``done`` when every shard is; else ``running`` while one is, ``failed`` if one
            failed, ``pending`` if none started.
        items: ``{"done": n, "failed": n, "skipped": n}`` over every shard.
        shards: Each shard, in order.
    """

    run_id: str
    state: str
    items: dict[str, int]
    shards: tuple[ShardStatus, ...]

    def to_dict(self) -> dict[str, Any]:
        """``{"run_id", "state", "items", "shards": [{"shard": "0/4", "state", ...}]}``, for JSON."""
        return asdict(self)


def _when(value: Any) -> dt.datetime | None:
    """A stored time as an aware datetime (MySQL returns naive UTC datetimes, SQLite ISO text)."""
    if value is None:
        return None
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def build_status(
    run_id: str, runs: Iterable[Sequence[Any]], counts: Iterable[Sequence[Any]]
) -> RunStatus | None:
    """The run's status from its runs rows and its item counts; ``None`` if it has no runs row.

    Args:
        run_id: The run.
        runs: ``(shard, shards, status, started_at, finished_at)`` rows of the run id.
        counts: ``(shard, state, n, last updated_at)`` rows of its items, the shard being the
            crc32 of the key modulo the run's shard count.
    """
    rows = {int(r[0]): r for r in runs}
    if not rows:
        return None
    count = max(int(r[1]) for r in rows.values())
    tally: dict[int, dict[str, int]] = {i: {"done": 0, "failed": 0, "skipped": 0} for i in range(count)}
    last: dict[int, dt.datetime] = {}
    for shard, state, n, at in counts:
        tally.setdefault(int(shard), {})[str(state)] = int(n)
        when = _when(at)
        if when is not None:
            last[int(shard)] = max(when, last.get(int(shard), when))
    shards = []
    for i in range(count):
        row, n = rows.get(i), tally[i]
        done, failed, skipped = n.get("done", 0), n.get("failed", 0), n.get("skipped", 0)
        if row is None:
            shards.append(ShardStatus(f"{i}/{count}", "pending", done, failed, skipped))
            continue
        times = [t for t in (_when(row[3]), _when(row[4]), last.get(i)) if t is not None]
        status = str(row[2])
        state = _STATE.get(status, "failed")
        updated = max(times).isoformat()
        shards.append(ShardStatus(f"{i}/{count}", state, done, failed, skipped, updated, status))
    states = {s.state for s in shards}
    state = (
        "done"
        if states == {"done"}
        else next(s for s in ("running", "failed", "pending", "done") if s in states)
    )
    items = {k: sum(t.get(k, 0) for t in tally.values()) for k in ("done", "failed", "skipped")}
    return RunStatus(run_id, state, items, tuple(shards))


def check_shard_count(run_id: str, runs: Iterable[Sequence[Any]], shard: Shard | None) -> None:
    """Refuse to start ``shard`` (``None``: the whole run) of a run id started with another count.

    Args:
        run_id: The run.
        runs: ``(shard, shards, ...)`` rows of the run id.
        shard: What is starting.

    Raises:
        ConfigError: Naming the count the run was started with and the fix.
    """
    count = 1 if shard is None else shard.count
    started = {int(r[1]) for r in runs} - {count}
    if started:
        was = max(started)
        how = "as one unsharded run" if was == 1 else f"as {was} shards"
        now = "unsharded" if count == 1 else f"as {count} shards"
        raise ConfigError(
            f"run {run_id!r} was started {how}, and cannot go on {now}: its items are divided "
            f"by the shard count. Run it with {'no --shard' if was == 1 else f'--shard K/{was}'}, "
            "or give a new --run-id",
            location="--shard",
        )


def earliest_watermark(values: Iterable[str | None]) -> str | None:
    """The earliest of the shards' watermarks (stored as text): as numbers if they all are, else
    as text, which orders ISO 8601 times; ``None`` if no shard kept one."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    try:
        return min(kept, key=decimal.Decimal)
    except decimal.InvalidOperation:
        return min(kept)
