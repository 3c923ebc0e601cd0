"""Adaptive limits against fixed caps, on loopback servers whose optimum is known.

Three scenarios, each run with ``concurrency = "auto"`` and with fixed caps side by side:

* **knee**: latency flat up to 16 requests in flight, then growing (and a little thrashing);
  pass figure: ``auto`` reaches at least 90% of the best fixed cap's throughput;
* **wall**: a 429 rate wall at 300 requests/s (a bucket 30 deep); pass figure: at most 2% of
  requests get a 429, with ``rate=`` and/or ``auto``. ``rate = "28/0.1s"`` rather than
  ``"280/s"``: aiolimiter's bucket is one period deep, so ``"280/s"`` lets 280 go at once;
* **shift**: the knee drops from 32 to 4 at 40% of the answers and comes back to 24 at 60%;
  pass figure: ``auto`` finishes sooner than every fixed cap.

Run: ``PYTHONPATH=. python bench/adaptive.py [--items N]``. It prints a table and :func:`main`
returns the figures as a dict (merged into ``make bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline import Auto, Pipeline, Retry, Source, Stage
from tests.adaptive.servers import KneeServer, fetch

RETRY = Retry(attempts=50, backoff=0.05, max_backoff=0.5, jitter=0.05)


def _items(url: str, n: int) -> Any:
    def source() -> list[dict[str, Any]]:
        return [{"id": i, "url": url} for i in range(n)]

    return source


def run_once(
    server: KneeServer, n: int, concurrency: int | Auto, *, rate: str | None = None
) -> dict[str, Any]:
    """Run ``n`` GETs through a one-stage pipeline; return time, throughput and 429 share."""
    stage = Stage(fetch, name="fetch", concurrency=concurrency, rate=rate, retry=RETRY, timeout=10.0)
    pipeline = Pipeline(Source(_items(server.url(), n)), [stage], name="bench", report_dir=None)
    rejected_before, ok_before = server.rejected, server.ok
    start = time.perf_counter()
    report = asyncio.run(pipeline.run_async(progress=False))
    wall = time.perf_counter() - start
    rejected = server.rejected - rejected_before
    served = server.ok - ok_before
    trace = report.stages[0].limit_trace
    return {
        "wall_s": round(wall, 3),
        "throughput": round(report.items.ok / wall, 1),
        "ok": report.items.ok,
        "failed": report.items.failed,
        "429_share": round(rejected / max(1, rejected + served), 4),
        "final_limit": report.stages[0].concurrency,
        "trace_len": len(trace),
        "max_limit": max((limit for _, limit in trace), default=report.stages[0].concurrency),
    }


def knee(n: int) -> dict[str, Any]:
    """Auto against fixed caps 4..64 on a knee at 16."""
    results: dict[str, Any] = {}
    for cap in (4, 8, 16, 32, 64):
        with KneeServer(base=0.04, knee=16, degrade=0.3) as server:
            results[f"fixed {cap}"] = run_once(server, n, cap)
    with KneeServer(base=0.04, knee=16, degrade=0.3) as server:
        results["auto"] = run_once(server, n, Auto())
    best = max(v["throughput"] for k, v in results.items() if k.startswith("fixed"))
    results["auto_vs_best"] = round(results["auto"]["throughput"] / best, 3)
    return results


def wall(n: int) -> dict[str, Any]:
    """Auto and rate= against a 429 wall at 300/s (30 ms answers: 9 in flight)."""
    results: dict[str, Any] = {}
    runs: list[tuple[str, int | Auto, str | None]] = [
        ("fixed 16", 16, None),
        ("fixed 16, rate 28/0.1s", 16, "28/0.1s"),
        ("auto", Auto(), None),
        ("auto, rate 28/0.1s", Auto(), "28/0.1s"),
    ]
    for label, concurrency, rate in runs:
        with KneeServer(base=0.03, knee=1000, wall=300) as server:
            results[label] = run_once(server, n, concurrency, rate=rate)
    return results


def shift(n: int) -> dict[str, Any]:
    """Auto against fixed caps when the knee goes 32 -> 4 -> 24 during the run."""
    results: dict[str, Any] = {}

    def server() -> KneeServer:
        return _ShiftingServer(base=0.08, knee=32, degrade=0.3, n=n)

    for cap in (4, 8, 16, 32):
        with server() as s:
            results[f"fixed {cap}"] = run_once(s, n, cap)
    with server() as s:
        results["auto"] = run_once(s, n, Auto())
    fixed = [v["wall_s"] for k, v in results.items() if k.startswith("fixed")]
    results["auto_beats_every_fixed"] = results["auto"]["wall_s"] < min(fixed)
    return results


class _ShiftingServer(KneeServer):
    """Knee 32 for the first 40% of the answers, 4 for the next 20%, 24 for the rest."""

    def __init__(self, *, n: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._marks = {n * 2 // 5: 4, n * 3 // 5: 24}

    def _enter(self) -> tuple[int, float]:
        new = self._marks.get(self.ok)
        if new is not None:
            self.shift(new)
        return super()._enter()


def _table(title: str, results: dict[str, Any]) -> Table:
    table = Table(title=title)
    for column in ("run", "wall s", "items/s", "429 share", "final limit", "max limit"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for label, r in results.items():
        if isinstance(r, dict):
            table.add_row(
                label,
                f"{r['wall_s']:.2f}",
                f"{r['throughput']:.0f}",
                f"{r['429_share']:.1%}",
                str(r["final_limit"]),
                str(r["max_limit"]),
            )
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three scenarios, print their tables, return the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1200, help="requests per run")
    args = parser.parse_args(argv)
    console = Console()
    out: dict[str, Any] = {}
    for name, scenario in (("knee", knee), ("wall", wall), ("shift", shift)):
        results = scenario(args.items)
        out[name] = results
        console.print(_table(f"adaptive: {name}", results))
    k, w, s = out["knee"], out["wall"], out["shift"]
    best_429 = min(w["auto"]["429_share"], w["auto, rate 28/0.1s"]["429_share"])
    out["pass"] = {
        "knee: auto >= 90% of best fixed": k["auto_vs_best"] >= 0.9,
        "wall: <= 2% 429 (auto and/or rate=)": best_429 <= 0.02,
        "shift: auto sooner than every fixed": bool(s["auto_beats_every_fixed"]),
    }
    console.print(
        f"knee: auto = {k['auto_vs_best']:.0%} of the best fixed cap; "
        f"wall: 429 share auto {w['auto']['429_share']:.1%}, auto+rate "
        f"{w['auto, rate 28/0.1s']['429_share']:.1%}; shift: auto {s['auto']['wall_s']:.2f}s vs best fixed "
        f"{min(v['wall_s'] for key, v in s.items() if key.startswith('fixed')):.2f}s"
    )
    console.print(out["pass"])
    return out


if __name__ == "__main__":
    main()
