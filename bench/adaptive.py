"""Adaptive limits against fixed caps, on loopback servers whose optimum is known.

Every backend is run with ``concurrency = "auto"`` and with fixed caps side by side, on at least
3,000 requests each (``--items``):

* **knee**: latency flat up to ``knee`` requests in flight, then growing a little worse than a
  queue (the server thrashes), so the best fixed cap is the knee: knee 4 at 5 ms, 8 at 20 ms and
  32 at 100 ms (each knee and each base latency once; capacities a 2-core loopback can serve).
  Pass figures: ``auto`` >= 90% of the best fixed cap's throughput, and the limit after
  convergence (the last 70% of the run) within +-30% of the knee;
* **shift**: knee 16 at 40 ms, halving to 8 for the middle third of the answers, then back;
  pass figure: ``auto`` finishes sooner than every fixed cap;
* **wall**: a 429 rate wall at 300 requests/s (a bucket 30 deep) with 30 ms answers (9 in
  flight); pass figure: at most 2% of requests get a 429 with ``auto`` alone. ``rate =
  "28/0.1s"`` rather than ``"280/s"``: aiolimiter's bucket is one period deep.

The same backends in virtual time (``tests/adaptive/sim.py``, every knee x base latency) come
first: they are deterministic, so they show the controller's own figures on a busy machine.
``--plot`` writes the limit traces as a PNG.

Run: ``PYTHONPATH=. python bench/adaptive.py [--items N] [--plot PATH]``. It prints tables and
:func:`main` returns the figures as a dict (merged into ``make bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline import Auto, Pipeline, Retry, Source, Stage
from pipeline._adaptive import make_controller
from tests.adaptive import sim
from tests.adaptive.servers import KneeServer, fetch

RETRY = Retry(attempts=50, backoff=0.05, max_backoff=0.5, jitter=0.05)

KNEE_BACKENDS = ((4, 0.005), (8, 0.02), (32, 0.1))
"""(knee, base latency) of the real knee servers."""

SHIFT_KNEE, SHIFT_BASE = 16, 0.04
"""The halving server: its knee (before and after the middle third) and base latency."""

WALL_RATE, WALL_BASE = 300.0, 0.03
"""The 429 wall: requests per second, and the answers' latency."""
SETTLED_FROM = 0.3
"""The limit is judged after this fraction of the run: convergence."""


def _items(url: str, n: int) -> Any:
    def source() -> list[dict[str, Any]]:
        return [{"id": i, "url": url} for i in range(n)]

    return source


def run_once(
    server: KneeServer, n: int, concurrency: int | Auto, *, rate: str | None = None, knee: int | None = None
) -> dict[str, Any]:
    """Run ``n`` GETs through a one-stage pipeline; return time, throughput, 429 share and the
    limit trace (with its spread after convergence, against ``knee`` when given)."""
    stage = Stage(fetch, name="fetch", concurrency=concurrency, rate=rate, retry=RETRY, timeout=10.0)
    pipeline = Pipeline(Source(_items(server.url(), n)), [stage], name="bench", report_dir=None)
    rejected_before, ok_before = server.rejected, server.ok
    start = time.perf_counter()
    report = asyncio.run(pipeline.run_async(progress=False))
    wall = time.perf_counter() - start
    rejected = server.rejected - rejected_before
    served = server.ok - ok_before
    trace = [(float(t), int(limit)) for t, limit in report.stages[0].limit_trace]
    out: dict[str, Any] = {
        "wall_s": round(wall, 3),
        "throughput": round(report.items.ok / wall, 1),
        "ok": report.items.ok,
        "failed": report.items.failed,
        "429_share": round(rejected / max(1, rejected + served), 4),
        "final_limit": report.stages[0].concurrency,
        "max_limit": max((limit for _, limit in trace), default=report.stages[0].concurrency),
    }
    if trace:
        out.update(_settled(trace, wall, knee))
        out["trace"] = trace
    return out


def _settled(trace: list[tuple[float, int]], end: float, knee: int | None) -> dict[str, Any]:
    start = SETTLED_FROM * end
    spread = {k: round(v, 2) for k, v in sim.spread(trace, start, end).items()}
    out: dict[str, Any] = {"settled": spread}
    if knee is not None:
        out["within_30pct"] = round(sim.within(trace, start, end, 0.7 * knee, 1.3 * knee), 3)
    return out


def knees(n: int) -> dict[str, Any]:
    """Auto against fixed caps on each knee server."""
    out: dict[str, Any] = {}
    for knee, base in KNEE_BACKENDS:
        results: dict[str, Any] = {}
        for cap in sorted({knee // 2, knee, knee * 3 // 2, knee * 2}):
            with KneeServer(base=base, knee=knee, degrade=sim.DEGRADE) as server:
                results[f"fixed {cap}"] = run_once(server, n, cap)
        with KneeServer(base=base, knee=knee, degrade=sim.DEGRADE) as server:
            results["auto"] = run_once(server, n, Auto(), knee=knee)
        best = max(v["throughput"] for k, v in results.items() if k.startswith("fixed"))
        results["auto_vs_best"] = round(results["auto"]["throughput"] / best, 3)
        out[f"knee {knee} @ {base * 1000:g} ms"] = results
    return out


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
        with KneeServer(base=WALL_BASE, knee=1000, wall=WALL_RATE) as server:
            results[label] = run_once(server, n, concurrency, rate=rate)
    return results


def shift(n: int) -> dict[str, Any]:
    """Auto against fixed caps when the knee halves (16 -> 8) for the middle third and recovers."""
    results: dict[str, Any] = {}
    knee, base = SHIFT_KNEE, SHIFT_BASE

    def server() -> KneeServer:
        return _ShiftingServer(base=base, knee=knee, degrade=sim.DEGRADE, n=n)

    for cap in (knee // 2, knee * 3 // 4, knee, knee * 3 // 2, knee * 2):
        with server() as s:
            results[f"fixed {cap}"] = run_once(s, n, cap)
    with server() as s:
        results["auto"] = run_once(s, n, Auto())
    fixed = [v["wall_s"] for k, v in results.items() if k.startswith("fixed")]
    results["auto_vs_best_time"] = round(results["auto"]["wall_s"] / min(fixed), 3)
    results["auto_beats_every_fixed"] = results["auto"]["wall_s"] < min(fixed)
    return results


class _ShiftingServer(KneeServer):
    """The knee halves for the middle third of the answers, then comes back."""

    def __init__(self, *, n: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._marks = {n // 3: self.knee // 2, n * 2 // 3: self.knee}

    def _enter(self) -> tuple[int, float]:
        new = self._marks.get(self.ok)
        if new is not None:
            self.shift(new)
        return super()._enter()


def simulated(n: int) -> dict[str, Any]:
    """The same backends in virtual time: every knee x base latency, the halving one, the wall."""
    out: dict[str, Any] = {}

    def auto(service: sim.SimService, items: int) -> sim.SimResult:
        clock = sim.VirtualClock()
        controller = make_controller(Auto().resolve(fetch), 4, clock=clock)
        return service.run(controller, clock, limit=4, items=items)

    for knee in sim.KNEES:
        for base in sim.BASES:
            items = sim.items_for(knee, base, at_least=n)
            service = sim.knee_service(knee, base)
            cap, best = sim.best_fixed(service, sim.fixed_caps(knee), items=items)
            result = auto(service, items)
            start = SETTLED_FROM * result.elapsed
            out[f"knee {knee} @ {base * 1000:g} ms"] = {
                "items": items,
                "best_fixed_cap": cap,
                "auto_vs_best": round(result.throughput / best, 3),
                "settled": {
                    k: round(v, 2) for k, v in sim.spread(result.trace, start, result.elapsed).items()
                },
                "within_30pct": round(
                    sim.within(result.trace, start, result.elapsed, 0.7 * knee, 1.3 * knee), 3
                ),
                "trace": result.trace,
            }
    halving = sim.halving_service(n, knee=SHIFT_KNEE, base=SHIFT_BASE)
    fixed = {
        cap: halving.run(sim.FixedLimit(cap), sim.VirtualClock(), limit=cap, items=n).elapsed
        for cap in sim.fixed_caps(SHIFT_KNEE)
    }
    result = auto(halving, n)
    out["shift"] = {
        "items": n,
        "auto_s": round(result.elapsed, 2),
        "best_fixed_s": round(min(fixed.values()), 2),
        "best_fixed_cap": min(fixed, key=lambda c: fixed[c]),
        "auto_vs_best_time": round(result.elapsed / min(fixed.values()), 3),
        "trace": result.trace,
    }
    result = auto(sim.wall_service(WALL_RATE, WALL_BASE), n)
    out["wall"] = {
        "items": n,
        "429_share": round(result.overloaded_share, 4),
        "throughput_vs_wall": round(result.throughput / WALL_RATE, 3),
        "trace": result.trace,
    }
    return out


def plot(out: dict[str, Any], path: Path) -> None:
    """Draw ``auto``'s limit traces (real and simulated) against the knees, into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = [(name, r["auto"], int(name.split()[1])) for name, r in out["knee"].items()]
    real.append(("shift 16 -> 8 -> 16 @ 40 ms", out["shift"]["auto"], None))
    real.append(("429 wall 300/s @ 30 ms (9 in flight)", out["wall"]["auto"], 9))
    simulated = [
        (f"sim {name}", r, int(name.split()[1])) for name, r in out["sim"].items() if name.startswith("knee")
    ]
    panels = real + simulated
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 2.6 * rows), squeeze=False)
    for ax, (title, r, knee) in zip(axes.flat, panels, strict=False):
        trace = r.get("trace") or [(0.0, 0)]
        times = [t for t, _ in trace]
        limits = [limit for _, limit in trace]
        end = r.get("wall_s") or (times[-1] if times else 1.0)
        ax.step([*times, end], [*limits, limits[-1]], where="post", lw=1, label="auto limit")
        if knee is not None:
            ax.axhspan(0.7 * knee, 1.3 * knee, color="green", alpha=0.12, label="knee +-30%")
            ax.axhline(knee, color="green", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("s", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(title: str, results: dict[str, Any]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("run", "wall s", "items/s", "429 share", "final limit", "settled p5/p50/p95", "in +-30%"):
        table.add_column(column, justify="right" if column != "run" else "left")
    for label, r in results.items():
        if isinstance(r, dict):
            settled = r.get("settled")
            table.add_row(
                label,
                f"{r['wall_s']:.2f}",
                f"{r['throughput']:.0f}",
                f"{r['429_share']:.1%}",
                str(r["final_limit"]),
                f"{settled['p5']:g}/{settled['p50']:g}/{settled['p95']:g}" if settled else "-",
                f"{r['within_30pct']:.0%}" if "within_30pct" in r else "-",
            )
    return table


def _sim_table(results: dict[str, Any]) -> Table:
    table = Table(title="adaptive, simulated (virtual time, deterministic)", title_justify="left")
    for column in ("backend", "items", "best fixed", "auto / best", "settled p5/p50/p95", "in +-30%"):
        table.add_column(column, justify="right" if column != "backend" else "left")
    for name, r in results.items():
        if name.startswith("knee"):
            s = r["settled"]
            table.add_row(
                name,
                str(r["items"]),
                str(r["best_fixed_cap"]),
                f"{r['auto_vs_best']:.3f}",
                f"{s['p5']:g}/{s['p50']:g}/{s['p95']:g}",
                f"{r['within_30pct']:.0%}",
            )
    s, w = results["shift"], results["wall"]
    table.add_row(
        "shift 16 -> 8 -> 16 @ 40 ms",
        str(s["items"]),
        str(s["best_fixed_cap"]),
        f"time {s['auto_vs_best_time']:.3f}",
        "-",
        "-",
    )
    table.add_row("429 wall 300/s @ 30 ms", str(w["items"]), "-", f"429 {w['429_share']:.2%}", "-", "-")
    return table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the backends, simulated and real; print their tables; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=3000, help="requests per run (default 3000)")
    parser.add_argument("--plot", type=Path, help="write the limit traces to this PNG")
    args = parser.parse_args(argv)
    console = Console()
    out: dict[str, Any] = {"items": args.items, "sim": simulated(args.items)}
    console.print(_sim_table(out["sim"]))
    out["knee"] = knees(args.items)
    for name, results in out["knee"].items():
        console.print(_table(f"adaptive: {name}", results))
    out["shift"] = shift(args.items)
    console.print(_table("adaptive: shift, knee 16 -> 8 -> 16 @ 40 ms", out["shift"]))
    out["wall"] = wall(args.items)
    console.print(_table("adaptive: 429 wall at 300/s, 30 ms", out["wall"]))
    k, w, s = out["knee"], out["wall"], out["shift"]
    out["pass"] = {
        **{f"{name}: auto >= 90% of best fixed": r["auto_vs_best"] >= 0.9 for name, r in k.items()},
        **{
            f"{name}: settled within +-30% of the knee": r["auto"]["within_30pct"] >= 0.9
            for name, r in k.items()
        },
        "shift: auto sooner than every fixed": bool(s["auto_beats_every_fixed"]),
        "wall: <= 2% 429 with auto alone": w["auto"]["429_share"] <= 0.02,
    }
    console.print(out["pass"])
    if args.plot is not None:
        plot(out, args.plot)
        console.print(f"limit traces: {args.plot}")
    return out


if __name__ == "__main__":
    main()
