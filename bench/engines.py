"""This engine against an earlier one: ``bench.overhead``'s no-op chain through each, in turns.

    python -m bench.engines REV [--kind async|thread] [--items N] [--reps R]

``REV`` is a git revision of this repository. It is checked out into a temporary worktree
(removed afterwards), and each run is a fresh interpreter whose path holds one tree only, so
each side runs its own engine through its own ``bench.overhead.engine``. Runs alternate (the
earlier engine, this one, the earlier, ...) so that a busy machine slows both alike; each run
reports the process's CPU time and the wall time of the chain alone (imports and the
definition excluded), and the medians are compared.

One run each of ``make bench``'s ratios drifts by 5 to 15% on a shared 2-core machine (the async
chain more); this is the way to tell whether a change to the engine costs anything per item.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import ROOT, median

CHILD = """
import json, resource, sys, time
import pipeline
from bench.overhead import engine
run = engine(sys.argv[1], int(sys.argv[2]))
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
run()
wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
print(json.dumps({"cpu_s": cpu, "wall_s": wall, "engine": pipeline.__file__}))
"""
"""One run of the chain in the tree on ``PYTHONPATH``: its CPU and wall seconds as JSON."""


def run_once(tree: Path, kind: str, items: int) -> dict[str, float]:
    """Run the chain once through the engine of ``tree``, in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(items)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the chain failed in {tree}:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(result.pop("engine")).is_relative_to(tree):  # an installed copy shadowing the tree
        raise SystemExit(f"the run in {tree} imported another engine")
    return {key: float(value) for key, value in result.items()}


def compare(rev: str, kind: str, items: int, reps: int) -> dict[str, dict[str, float]]:
    """Alternate runs of the earlier engine and this one; return each side's medians."""
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        earlier = Path(tmp) / "tree"
        _git("worktree", "add", "--detach", "-q", str(earlier), rev)
        try:
            runs: dict[str, list[dict[str, float]]] = {rev: [], "this tree": []}
            for rep in range(reps):
                for name, tree in ((rev, earlier), ("this tree", ROOT)):
                    runs[name].append(run_once(tree, kind, items))
                print(f"  {rep + 1}/{reps}", file=sys.stderr)
        finally:
            _git("worktree", "remove", "--force", str(earlier))
    return {
        name: {key: median([r[key] for r in results]) for key in ("cpu_s", "wall_s")}
        for name, results in runs.items()
    }


def _git(*args: str) -> None:
    subprocess.run(["git", "-C", str(ROOT), *args], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the earlier engine: a git revision of this repository")
    parser.add_argument("--kind", choices=["async", "thread"], default="async", help="which no-op chain")
    parser.add_argument("--items", type=int, default=None, help="items a run (200,000 async, 50,000 thread)")
    parser.add_argument("--reps", type=int, default=10, help="runs of each engine (default 10)")
    args = parser.parse_args(argv)
    items = args.items or (200_000 if args.kind == "async" else 50_000)
    medians = compare(args.rev, args.kind, items, args.reps)
    print(f"{args.kind} no-op chain, {items:,} items, median of {args.reps} runs each, in turns:")
    for name, m in medians.items():
        per_item = m["wall_s"] / items * 1e6
        print(f"  {name:>12}: CPU {m['cpu_s']:.2f} s, wall {m['wall_s']:.2f} s ({per_item:.1f} us an item)")
    before, after = medians[args.rev], medians["this tree"]
    cpu, wall = (after[key] / before[key] for key in ("cpu_s", "wall_s"))
    print(f"  this tree / {args.rev}: CPU {cpu:.2f}x, wall {wall:.2f}x")


if __name__ == "__main__":
    main()
