"""Peak RSS of the no-op async pipeline with few rows against many, each in a fresh process.

``python -m bench.memory ROWS`` is the child: it runs three no-op async stages (four workers
each) over a generator source of ``ROWS`` small dicts and prints one JSON line with its peak
RSS (``VmHWM`` in ``/proc/self/status``) and its RSS before the run, after the imports. With
bounded queues, the peak should not grow with the number of rows.

Why not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the parent's high-water mark across
fork and exec into it, so a child of a big benchmark process reports the parent's size.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

from bench._common import run_child


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: the best there is


def child(rows: int) -> dict[str, Any]:
    """Run the pipeline over ``rows`` rows in this process; return the RSS figures."""
    import time

    from bench.overhead import run_engine
    from pipeline import Pipeline  # noqa: F401 - import everything before the first reading

    before = _status_kib("VmRSS")
    start = time.perf_counter()
    run_engine("async", rows)
    wall = time.perf_counter() - start
    return {
        "rows": rows,
        "peak_rss_kib": _status_kib("VmHWM"),
        "rss_after_imports_kib": before,
        "wall_s": round(wall, 3),
    }


def measure(rows: list[int]) -> list[dict[str, Any]]:
    """Run the child once per row count, each in a fresh interpreter."""
    out = []
    for n in rows:
        out.append(run_child("bench.memory", str(n), timeout=240))
    return out


if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]))))
