"""Helpers shared by the benchmark sections: repeats, medians, the repository root."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: what ``PYTHONPATH`` must hold for subprocesses."""


def child_env() -> dict[str, str]:
    """The environment for a benchmark subprocess: this one, with the repository on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_child(module: str, *args: str, timeout: float) -> dict[str, Any]:
    """Run ``python -m module *args`` in a fresh interpreter; return the JSON its last line printed."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=child_env(),
        check=False,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the child {module} {' '.join(args)} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def timed(fn: Callable[[], int]) -> float:
    """Run ``fn`` (which returns how many items it handled) and return items per second."""
    gc.collect()
    start = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - start)


def timed_cpu(fn: Callable[[], int]) -> tuple[float, float, int]:
    """Like :func:`timed`; returns items per second, CPU seconds of this process, and items."""
    gc.collect()
    cpu = time.process_time()
    start = time.perf_counter()
    count = fn()
    return count / (time.perf_counter() - start), time.process_time() - cpu, count


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


@dataclass
class Series:
    """Rates of one variant, one per repeat, in the order they were measured.

    Attributes:
        name: The variant, as shown in the table.
        rates: Items per second, per repeat.
        note: Why it is missing, when it could not run (a peer that does not install).
        cpu_ms: CPU milliseconds per item spent by this process (all its threads), per repeat.
        origin_cpu_ms: CPU milliseconds per item spent by the origin server process, per repeat.
    """

    name: str
    rates: list[float] = field(default_factory=list)
    note: str = ""
    cpu_ms: list[float] = field(default_factory=list)
    origin_cpu_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """The median rate."""
        return median(self.rates)

    def ratio_to(self, other: Series) -> float:
        """The median of the per-repeat ratios ``self / other``: each pair ran side by side."""
        pairs = [a / b for a, b in zip(self.rates, other.rates, strict=False) if b > 0]
        return median(pairs)

    def as_json(self) -> dict[str, Any]:
        """The series for ``results.json``."""
        out: dict[str, Any] = {
            "median_items_per_s": _round(self.rate),
            "items_per_s": [_round(r) for r in self.rates],
        }
        if self.cpu_ms:
            out["cpu_ms_per_item"] = _round(median(self.cpu_ms))
        if self.origin_cpu_ms:
            out["origin_cpu_ms_per_item"] = _round(median(self.origin_cpu_ms))
        if self.note:
            out["note"] = self.note
        return out


def _round(x: float) -> float | None:
    return None if x != x else round(x, 2)  # NaN is not JSON


def rotate(variants: Sequence[Any], rep: int) -> list[Any]:
    """``variants`` rotated by ``rep``: each repeat starts with a different one (drift spreads out)."""
    k = rep % len(variants)
    return [*variants[k:], *variants[:k]]


def log(message: str) -> None:
    """Progress on stderr, so stdout carries only the table."""
    print(message, file=sys.stderr, flush=True)
