"""Start-up: wall time of ``pipeline --help`` and of ``import pipeline``, and what the import costs.

Each figure is the median of several fresh interpreters. ``python -c pass`` is measured in the
same run as the floor no command can go below.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import child_env, median


def _wall(argv: list[str], runs: int) -> float:
    env = child_env()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return median(times)


_IMPORTTIME = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)")


def heaviest_imports(argv: list[str], top: int = 8) -> list[dict[str, Any]]:
    """The top-level modules whose import cost the most, from ``-X importtime``."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    rows: list[dict[str, Any]] = []
    for line in proc.stderr.splitlines():
        m = _IMPORTTIME.match(line)
        if m and len(m.group(3)) == 1:  # one space of indent: imported by the command itself
            rows.append({"module": m.group(4), "cumulative_ms": round(int(m.group(2)) / 1000, 1)})
    rows.sort(key=lambda r: -r["cumulative_ms"])
    return rows[:top]


def measure(runs: int) -> dict[str, Any]:
    """Median wall times, in seconds, and the heaviest imports of ``import pipeline``."""
    py = sys.executable
    out: dict[str, Any] = {
        "python -c pass": _wall([py, "-c", "pass"], runs),
        "python -c 'import pipeline'": _wall([py, "-c", "import pipeline"], runs),
        "python -m pipeline --help": _wall([py, "-m", "pipeline", "--help"], runs),
    }
    script = shutil.which("pipeline", path=str(Path(py).parent))
    if script:
        out["pipeline --help (console script)"] = _wall([script, "--help"], runs)
    return {
        "wall_s": {k: round(v, 4) for k, v in out.items()},
        "heaviest_imports_of_import_pipeline": heaviest_imports(["-c", "import pipeline"]),
        "heaviest_imports_of_help": heaviest_imports(["-m", "pipeline", "--help"]),
    }
