"""Run the benchmark suite: print the tables, write ``bench/results.json``.

``PYTHONPATH=. python -m bench`` or ``python bench/run.py`` (``make bench``). Sections:

1. engine overhead: three no-op stages, async and thread, against hand-written asyncio and peers;
2. the nightly image batch against a sequential loop, hand-written asyncio, pypeln and the
   transform alone on every core;
3. peak RSS with 10^4 rows against 10^6;
4. start-up: ``pipeline --help`` and ``import pipeline``;
5. adaptive limits (``concurrency = "auto"``) against fixed caps, simulated and on loopback
   servers, with the limit traces drawn in ``bench/adaptive.png``;
6. batched database stages: ``write_results`` and ``lookup`` on a private MariaDB server,
   batched against one statement per item.

Each figure that matters is a ratio of two measurements taken side by side in this run (the
variants interleaved, the median of the per-repeat ratios), so a busy machine moves both sides.
``--quick`` shrinks every section for a smoke run; its figures are noisier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    parser.add_argument("--reps", type=int, help="repeats per variant (default 5 overhead, 3 images)")
    parser.add_argument(
        "--only",
        action="append",
        choices=["overhead", "images", "memory", "startup", "adaptive", "limiter", "db"],
        help="run only this section (repeatable)",
    )
    parser.add_argument("--images", type=int, default=200, help="items in the image batch (default 200)")
    parser.add_argument(
        "--format", default="JPEG", choices=["JPEG", "WEBP"], help="thumbnail format (default JPEG)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parent / "results.json",
        help="where to write the results (default bench/results.json)",
    )
    return parser


def _target(what: str, measured: float, op: str, bound: float, unit: str = "x") -> dict[str, Any]:
    ok = measured == measured and (
        measured >= bound if op == ">=" else measured < bound if op == "<" else measured <= bound
    )
    return {
        "what": what,
        "measured": round(measured, 3) if measured == measured else None,
        "target": f"{op} {bound:g}{unit}",
        "met": bool(ok),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the sections asked for; print their tables and the targets; write the JSON."""
    from rich.console import Console
    from rich.table import Table

    from bench import image_batch, memory, overhead, startup
    from bench._common import Series, cores, log, median

    args = _parser().parse_args(argv)
    sections = set(args.only or ["overhead", "images", "memory", "startup", "adaptive", "limiter", "db"])
    quick = args.quick
    console = Console(width=None if sys.stdout.isatty() else 120)
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cores": cores(),
            "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "quick": quick,
    }
    targets: list[dict[str, Any]] = []
    began = time.perf_counter()

    def rate_table(title: str, series: dict[str, Series], ref: str, unit: str = "items/s") -> Table:
        table = Table(title=title, title_justify="left")
        table.add_column("variant")
        table.add_column(f"{unit} (median)", justify="right")
        table.add_column("pipeline / it", justify="right")
        cpu = any(s.cpu_ms or s.origin_cpu_ms for s in series.values())
        if cpu:
            table.add_column("CPU ms/item", justify="right")
            table.add_column("origin CPU ms/item", justify="right")
        table.add_column("note")
        pipe = series["pipeline"]
        for s in series.values():
            extra = (
                [
                    f"{median(s.cpu_ms):.1f}" if s.cpu_ms else "-",
                    f"{median(s.origin_cpu_ms):.1f}" if s.origin_cpu_ms else "-",
                ]
                if cpu
                else []
            )
            if s.note:
                table.add_row(s.name, "-", "-", *extra, s.note)
                continue
            ratio = "" if s is pipe else f"{pipe.ratio_to(s):.2f}x"
            table.add_row(s.name, f"{s.rate:,.1f}", ratio, *extra, "reference" if s.name == ref else "")
        return table

    if "overhead" in sections:
        reps = args.reps or (1 if quick else 5)
        n_async, n_thread = (5_000, 2_000) if quick else (20_000, 10_000)
        log(f"engine overhead: {reps} reps, {n_async} items async, {n_thread} items thread")
        chains = overhead.measure(reps=reps, n_async=n_async, n_thread=n_thread)
        results["overhead"] = {
            "items": {"async": n_async, "thread": n_thread},
            "reps": reps,
            "stages": overhead.STAGES,
            "workers": overhead.WORKERS,
            "queue_size": overhead.QUEUE,
            **{chain: {name: s.as_json() for name, s in series.items()} for chain, series in chains.items()},
            "ratios": {
                chain: {
                    f"pipeline / {s.name}": round(series["pipeline"].ratio_to(s), 3)
                    for s in series.values()
                    if s.name != "pipeline" and not s.note
                }
                for chain, series in chains.items()
            },
        }
        for chain, series in chains.items():
            console.print(
                rate_table(
                    f"1. engine overhead: {chain} no-op chain, {overhead.STAGES} stages x "
                    f"{overhead.WORKERS} workers",
                    series,
                    "hand-written asyncio",
                )
            )
        achain, tchain = chains["async"], chains["thread"]
        targets.append(
            _target(
                "async no-op chain / hand-written asyncio",
                achain["pipeline"].ratio_to(achain["hand-written asyncio"]),
                ">=",
                0.5,
            )
        )
        peer = tchain["pypeln threads"]
        versus_peer = tchain["pipeline"].ratio_to(peer) if not peer.note else float("nan")
        targets.append(_target("thread no-op chain / pypeln threads", versus_peer, ">=", 1.0))

    if "limiter" in sections:
        from bench import limiter

        n = 20_000 if quick else 200_000
        log(f"limiter: {n} acquire/release pairs per case, ours against anyio's")
        figures = limiter.measure(n=n, reps=1 if quick else 3)
        results["limiter"] = figures
        table = Table(title="1b. CapacityLimiter: microseconds per acquire/release", title_justify="left")
        for column in ("limiter", "uncontended us", "8 tasks on 4 slots us"):
            table.add_column(column, justify="left" if column == "limiter" else "right")
        for name, row in figures.items():
            table.add_row(name, f"{row['uncontended_us']:.2f}", f"{row['contended_us']:.2f}")
        console.print(table)

    if "images" in sections:
        reps = args.reps or (1 if quick else 3)
        count = 40 if quick else args.images
        seq = max(8, count // 5)
        log(f"image batch: {reps} reps, {count} items ({seq} sequential), {args.format}")
        batch = image_batch.measure(reps=reps, count=count, sequential=seq, fmt=args.format)
        series = batch["series"]
        pipe = series["pipeline"]
        limit = series["transform alone (best of threads, processes)"]
        results["images"] = {
            "settings": batch["settings"],
            "reps": reps,
            "variants": {name: s.as_json() for name, s in series.items()},
            "ratios": {
                f"pipeline / {s.name}": round(pipe.ratio_to(s), 3)
                for s in series.values()
                if s.name != "pipeline" and not s.note
            },
        }
        cfg = batch["settings"]
        console.print(
            rate_table(
                f"2. nightly image batch: {cfg['items']} x 1600x1200 JPEG, {_latency_ms(cfg)} ms origin, "
                f"{args.format} {cfg['sizes']}, caps download {cfg['download_cap']} / thumbnail "
                f"{cfg['thumbnail_cap']} / write {cfg['write_cap']}",
                series,
                "hand-written asyncio",
            )
        )
        targets.append(
            _target(
                "image batch / hand-written asyncio", pipe.ratio_to(series["hand-written asyncio"]), ">=", 1.1
            )
        )
        targets.append(
            _target("image batch / transform alone on every core", pipe.ratio_to(limit), ">=", 0.9)
        )
        # The same comparisons by CPU per item, which another load on the machine moves less than
        # items per second (the origin's CPU, in its own process, is not counted on either side).
        for other, bound in (("hand-written asyncio", 1.1), ("transform alone, threads", 0.9)):
            theirs = series[other].cpu_ms
            pairs = [b / a for a, b in zip(pipe.cpu_ms, theirs, strict=False) if a > 0]
            targets.append(
                _target(f"image batch by CPU per item: {other} / pipeline", median(pairs), ">=", bound)
            )
        tuned = series.get("pipeline, thumbnail cap cores+1")
        if tuned is not None and not tuned.note:
            targets.append(
                _target(
                    "image batch, thumbnail cap cores+1 / transform alone", tuned.ratio_to(limit), ">=", 0.9
                )
            )

    if "memory" in sections:
        rows = [10_000, 100_000] if quick else [10_000, 1_000_000]
        log(f"memory: peak RSS for {rows} rows, one fresh process each")
        runs_ = memory.measure(rows)
        ratio = runs_[-1]["peak_rss_kib"] / runs_[0]["peak_rss_kib"]
        results["memory"] = {"runs": runs_, "ratio": round(ratio, 3)}
        table = Table(title="3. peak RSS, async no-op chain, generator source", title_justify="left")
        for col in ("rows", "peak RSS MiB", "RSS after imports MiB", "wall s"):
            table.add_column(col, justify="right")
        for f in runs_:
            table.add_row(
                f"{f['rows']:,}",
                f"{f['peak_rss_kib'] / 1024:.1f}",
                f"{f['rss_after_imports_kib'] / 1024:.1f}",
                f"{f['wall_s']:.2f}",
            )
        console.print(table)
        targets.append(_target(f"peak RSS {rows[-1]:,} rows / {rows[0]:,} rows", ratio, "<=", 1.1))

    if "startup" in sections:
        runs = 3 if quick else 7
        log(f"start-up: median of {runs} runs")
        figures = startup.measure(runs)
        results["startup"] = figures
        table = Table(title=f"4. start-up, median of {runs} fresh interpreters", title_justify="left")
        table.add_column("command")
        table.add_column("wall s", justify="right")
        for cmd, secs in figures["wall_s"].items():
            table.add_row(cmd, f"{secs:.3f}")
        console.print(table)
        heavy = ", ".join(
            f"{r['module']} {r['cumulative_ms']:.0f} ms" for r in figures["heaviest_imports_of_help"][:5]
        )
        console.print(f"heaviest imports of `pipeline --help`: {heavy}")
        help_s = figures["wall_s"].get(
            "pipeline --help (console script)", figures["wall_s"]["python -m pipeline --help"]
        )
        targets.append(_target("pipeline --help wall time", help_s, "<", 0.3, " s"))

    if "adaptive" in sections:
        from bench import adaptive

        items = 600 if quick else 3000
        log(f"adaptive limits: knee, shifting and 429 wall servers, {items} requests per run")
        plot = args.json.with_name("adaptive.png")
        out = adaptive.main(["--items", str(items), "--plot", str(plot)])
        results["adaptive"] = out
        for name, r in out["knee"].items():
            targets.append(_target(f"auto / best fixed cap ({name})", r["auto_vs_best"], ">=", 0.9))
            targets.append(
                _target(
                    f"settled limit within +-30% of the knee ({name})",
                    r["auto"]["within_30pct"],
                    ">=",
                    0.9,
                    "",
                )
            )
        targets.append(
            _target(
                "share of requests answered 429, auto alone (rate wall)",
                out["wall"]["auto"]["429_share"],
                "<=",
                0.02,
                "",
            )
        )
        targets.append(
            _target(
                "auto wall time / best fixed (halving server)", out["shift"]["auto_vs_best_time"], "<", 1.0
            )
        )
        for name, r in out["sim"].items():
            if name.startswith("knee"):
                targets.append(
                    _target(f"simulated: auto / best fixed cap ({name})", r["auto_vs_best"], ">=", 0.9)
                )

    if "db" in sections:
        from bench import db_batch

        n = 1000 if quick else 5000
        out = db_batch.run(rows_=n, reps=1 if quick else 3)
        results["db_batch"] = out
        if "note" in out:
            console.print(f"6. batched database stages: {out['note']}")
        else:
            table = Table(
                title=f"6. batched database stages on MariaDB: {n:,} items, concurrency 4, batch size 200",
                title_justify="left",
            )
            for col in (
                "stage",
                *db_batch.VARIANTS,
                "batched / per item",
                "CPU ms/item, batched / per item",
                "CPU per item / batched",
            ):
                table.add_column(col, justify="left" if col == "stage" else "right")
            for stage in db_batch.STAGES:
                row = out[stage]
                batched, single = (row["variants"][name] for name in db_batch.VARIANTS)
                table.add_row(
                    stage,
                    f"{batched['median_items_per_s']:,.0f} items/s",
                    f"{single['median_items_per_s']:,.0f} items/s",
                    f"{row['ratio']:.2f}x",
                    f"{batched['cpu_ms_per_item']:.2f} / {single['cpu_ms_per_item']:.2f}",
                    f"{row['cpu_ratio']:.1f}x",
                )
            console.print(table)

    if targets:
        table = Table(title="targets", title_justify="left")
        for col in ("what", "measured", "target", "status"):
            table.add_column(col, justify="right" if col == "measured" else "left")
        for tgt in targets:
            measured = "-" if tgt["measured"] is None else f"{tgt['measured']:.3f}"
            status = "[green]met[/]" if tgt["met"] else "[red]missed[/]"
            table.add_row(tgt["what"], measured, tgt["target"], status)
        console.print(table)
    results["targets"] = targets
    results["wall_s"] = round(time.perf_counter() - began, 1)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.json} ({results['wall_s']:.0f} s)")
    return 0


def _latency_ms(settings: dict[str, Any]) -> int:
    return round(float(settings["latency_s"]) * 1000)


def _on_path() -> None:
    """``python bench/run.py`` puts ``bench/`` on the path, not the repository: fix that."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)


if __name__ == "__main__":
    _on_path()
    sys.exit(main())
