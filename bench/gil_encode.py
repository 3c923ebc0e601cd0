"""Does Pillow release the GIL while encoding, and does the destination (BytesIO or file) matter?

Pillow's ``ImageFile._save`` takes one of two paths: into an object with a real ``fileno()`` it
calls the encoder's ``encode_to_file``; into anything else (``io.BytesIO``) it calls ``encode``
chunk by chunk and writes each chunk from Python. The WebP plugin has its own path. This script
measures, with 1 and 2 threads, how many source images per second get their 1024 px and 256 px
thumbnails encoded:

* ``encode``: the resized images are made once up front; each task only encodes both sizes;
* ``full``: each task decodes the source JPEG (with ``draft``), resizes and encodes both sizes,
  which is what the thumbnail stage does per item.

Run: ``PYTHONPATH=. python bench/gil_encode.py [--images 8] [--rounds 3]``. It prints a table;
"speed-up" is the 2-thread rate over the 1-thread rate (2.0 would be perfect on two cores).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO

import PIL
from PIL import Image

from tests.images import photo_image, photo_jpeg

SIZES = (1024, 256)
FORMATS: dict[str, dict[str, object]] = {
    "WEBP": {"quality": 85, "method": 4},
    "JPEG": {"quality": 85, "optimize": False},
}


def _thumbs(img: Image.Image) -> list[Image.Image]:
    out = []
    for size in SIZES:
        t = img.copy()
        t.thumbnail((size, size), Image.Resampling.LANCZOS)
        out.append(t)
    return out


def _encode(thumbs: list[Image.Image], fmt: str, dest: str, tmpdir: str) -> int:
    total = 0
    for t in thumbs:
        if dest == "bytesio":
            buf = io.BytesIO()
            t.save(buf, format=fmt, **FORMATS[fmt])
            total += len(buf.getvalue())
        else:
            fd, path = tempfile.mkstemp(dir=tmpdir, suffix=".tmp")
            try:
                f: IO[bytes]
                with os.fdopen(fd, "wb") as f:
                    t.save(f, format=fmt, **FORMATS[fmt])
                total += os.path.getsize(path)
            finally:
                os.unlink(path)
    return total


def _full(data: bytes, fmt: str, dest: str, tmpdir: str) -> int:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (max(SIZES), max(SIZES)))
        img.load()
        return _encode(_thumbs(img), fmt, dest, tmpdir)


def _rate(task: Callable[[int], int], count: int, threads: int) -> float:
    """Items per second for ``count`` calls of ``task`` on ``threads`` threads."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(task, range(threads)))  # warm up the threads and the codecs
        start = time.perf_counter()
        list(pool.map(task, range(count)))
        return count / (time.perf_counter() - start)


def main() -> None:
    """Run the measurement and print one row per (workload, format, destination)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="distinct source images (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="repeats; the median is shown (default 3)")
    parser.add_argument("--count", type=int, default=24, help="tasks per measurement (default 24)")
    args = parser.parse_args()

    sources = [photo_jpeg(1600, 1200, seed=i) for i in range(args.images)]
    thumbs = [_thumbs(photo_image(1600, 1200, seed=i)) for i in range(args.images)]
    print(
        f"cpus={os.cpu_count()} pillow={PIL.__version__} images={args.images} "
        f"source=1600x1200 JPEG q90 sizes={SIZES} count={args.count} rounds={args.rounds}"
    )
    print(f"{'workload':8} {'format':5} {'dest':8} {'1 thread/s':>11} {'2 threads/s':>12} {'speed-up':>9}")
    with tempfile.TemporaryDirectory() as tmpdir:
        for workload in ("encode", "full"):
            for fmt in FORMATS:
                for dest in ("bytesio", "file"):

                    def task(i: int, fmt: str = fmt, dest: str = dest, workload: str = workload) -> int:
                        if workload == "encode":
                            return _encode(thumbs[i % len(thumbs)], fmt, dest, tmpdir)
                        return _full(sources[i % len(sources)], fmt, dest, tmpdir)

                    one = statistics.median(_rate(task, args.count, 1) for _ in range(args.rounds))
                    two = statistics.median(_rate(task, args.count, 2) for _ in range(args.rounds))
                    print(f"{workload:8} {fmt:5} {dest:8} {one:11.1f} {two:12.1f} {two / one:9.2f}")


if __name__ == "__main__":
    main()
