"""Where the engine's time goes: sample a no-op chain (or the image batch) with py-spy.

``PYTHONPATH=. python -m bench.profile_engine async|thread|images[:hand-written|:pypeln] [ITEMS]``
runs the no-op chain of :mod:`bench.overhead` through the engine (or one run of the image batch
of :mod:`bench.image_batch`) under ``py-spy record`` (no instrumentation, so the
percentages are not skewed by the profiler; ``--gil``: only the thread holding the GIL is
sampled, so idle pool threads do not drown the figures) and prints, per thread group, the functions with
the most samples on top of the stack ("self") and the engine functions by inclusive share.
Needs ``py-spy`` (``pip install py-spy``) and ptrace rights.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import child_env

_FRAME = re.compile(r"^(?P<fn>.+?) \((?P<file>[^:]+):\d+\)$")


def _frames(stack: str) -> list[str]:
    out = []
    for frame in stack.split(";"):
        m = _FRAME.match(frame.strip())
        if m:
            name = m.group("file")
            ours = "pipeline/" in name or "stages/" in name
            short = "/".join(Path(name).parts[-2:]) if ours else Path(name).name
            out.append(f"{m.group('fn')} ({short})")
        else:
            out.append(frame.strip())
    return out


_RUN_FRAMES = ("Pipeline.run ", "run_hand ", "run_pypeln ", "run_engine ")


def summarise(raw: Path, top: int = 18) -> str:
    """Self and inclusive shares from py-spy's raw (collapsed stack) output.

    Only samples taken during the run count: pool threads, and the main thread while inside
    the run (setting up the images and removing the output tree are not the engine's time).
    """
    self_: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = _frames(stack)
        if not frames:
            continue
        group = "worker threads" if frames[0].startswith("Thread._bootstrap") else "event loop thread"
        if group != "worker threads" and not any(f.startswith(_RUN_FRAMES) for f in frames):
            continue
        groups[group] += n
        total += n
        self_[f"[{group}] {frames[-1]}"] += n
        for f in set(frames):
            if "(pipeline/" in f:
                incl[f"[{group}] {f}"] += n
    lines = [
        f"samples: {total} (" + ", ".join(f"{g} {c / total:.0%}" for g, c in groups.items()) + ")",
        "",
        f"top {top} by self time:",
    ]
    lines += [f"  {c / total:6.1%}  {name}" for name, c in self_.most_common(top)]
    lines += ["", "engine functions, inclusive:"]
    lines += [f"  {c / total:6.1%}  {name}" for name, c in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    """Profile the chain named on the command line and print the summary."""
    kind = sys.argv[1] if len(sys.argv) > 1 else "thread"
    default = {"async": 300_000, "thread": 60_000}.get(kind, 200)
    items = int(sys.argv[2]) if len(sys.argv) > 2 else default
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    if kind in ("async", "thread"):
        code = f"from bench.overhead import run_engine; run_engine({kind!r}, {items})"
        what = f"{kind} no-op chain, {items} items, through the engine"
    else:  # images, images:hand-written, images:pypeln
        variant = kind.partition(":")[2] or "pipeline"
        code = f"from bench.image_batch import run_once; print(run_once({items}, variant={variant!r}))"
        what = f"image batch, {variant}, {items} items"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.txt"
        subprocess.run(
            [
                spy,
                "record",
                "--gil",
                "-r",
                "1000",
                "-f",
                "raw",
                "-o",
                str(raw),
                "--",
                sys.executable,
                "-c",
                code,
            ],
            env=child_env(),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        print(f"{what} (py-spy --gil, 1 kHz)")
        print(summarise(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
