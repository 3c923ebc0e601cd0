"""Tests for the run's threads: each thread stage runs on a lane of its own."""

from __future__ import annotations

import threading
from typing import Any

from pipeline import Stage
from pipeline.testing import run_stages


def test_each_thread_stage_runs_on_its_own_threads() -> None:
    """A thread stage's calls run only on its own lane (``pipeline-<run>-<stage>_<n>``), never
    on a thread that ran another stage, and on no more threads than its cap."""
    seen: dict[str, set[str]] = {"fetch": set(), "resize": set()}
    lock = threading.Lock()

    def recorder(stage: str) -> Any:
        def call(item: dict[str, Any]) -> dict[str, Any]:
            with lock:
                seen[stage].add(threading.current_thread().name)
            return item

        call.__name__ = stage
        return call

    result = run_stages(
        [{"id": i} for i in range(200)],
        Stage(recorder("fetch"), concurrency=5),
        Stage(recorder("resize"), concurrency=2),
    )

    assert result.report.items.ok == 200
    assert seen["fetch"].isdisjoint(seen["resize"])
    assert all(name.startswith("pipeline-test-fetch_") for name in seen["fetch"]), seen
    assert all(name.startswith("pipeline-test-resize_") for name in seen["resize"]), seen
    assert 1 <= len(seen["fetch"]) <= 5
    assert 1 <= len(seen["resize"]) <= 2
