"""Where the image batch's CPU goes, per item: the parts alone, then the whole batch.

``PYTHONPATH=. python -m bench.image_account [--items 160] [--reps 2]``

First each part of the per-item work alone, on one thread, timed with ``time.thread_time``:
the Pillow steps of :func:`stages.image.thumbnail` (decode, the two LANCZOS resizes, the
encodes), the whole ``thumbnail``, ``write_item``, sha256 of a body, and one download through
``stages.http:download`` from the loopback origin (``bench.origin``, answering at once).

Then, in this one process and interleaved, the image batch of :mod:`bench.image_batch`
(``pipeline``: the engine and the built-in stages; ``hand-written asyncio``; ``transform
alone`` on every core), each with the process's CPU per item from ``getrusage`` (user and
system), page faults per item, and the origin's CPU per item (it runs on the same cores). CPU
per item is what to compare on a shared machine: items per second move with whatever else runs.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import io
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import image_batch
from bench._common import cores


def _per_item(fn: Callable[[int], object], n: int) -> float:
    """CPU milliseconds per call of ``fn(i)`` on this thread, after one warm-up call."""
    fn(0)
    start = time.thread_time()
    for i in range(n):
        fn(i)
    return 1000 * (time.thread_time() - start) / n


def parts(bodies: list[bytes], origin_url: str, n: int) -> dict[str, float]:
    """CPU ms per item of each part of the work, alone on one thread."""
    from PIL import Image

    from pipeline.testing import open_context
    from stages.files import write_item
    from stages.http import download
    from stages.image import thumbnail

    lanczos = Image.Resampling.LANCZOS
    k = len(bodies)
    decoded = [Image.open(io.BytesIO(b)) for b in bodies]
    for im in decoded:
        im.load()
    mids = [im.resize((1024, 768), lanczos, reducing_gap=3.0) for im in decoded]
    smalls = [m.resize((256, 192), lanczos, reducing_gap=3.0) for m in mids]

    def decode(i: int) -> None:
        with Image.open(io.BytesIO(bodies[i % k])) as im:
            im.draft(None, (1024, 768))
            im.load()

    def encode(img: Image.Image) -> None:
        img.save(io.BytesIO(), format="JPEG", quality=85, optimize=True)

    out: dict[str, float] = {
        "decode (open, draft, load)": _per_item(decode, n),
        "resize 1600x1200 -> 1024 (LANCZOS)": _per_item(
            lambda i: decoded[i % k].resize((1024, 768), lanczos, reducing_gap=3.0), n
        ),
        "resize 1024 -> 256 (LANCZOS)": _per_item(
            lambda i: mids[i % k].resize((256, 192), lanczos, reducing_gap=3.0), n
        ),
        "encode 1024 + 256 (JPEG, optimized)": _per_item(
            lambda i: (encode(mids[i % k]), encode(smalls[i % k])), n
        ),
    }
    items = [{"id": f"{i:05d}", "body": bodies[i % k]} for i in range(n + 1)]
    thumbs: list[dict[str, Any]] = []
    out["thumbnail() in all"] = _per_item(
        lambda i: thumbs.append(thumbnail(items[i], sizes=image_batch.SIZES, format="JPEG")), n
    )
    with tempfile.TemporaryDirectory(prefix="bench-account-") as root:
        out["write_item()"] = _per_item(lambda i: write_item({**thumbs[i], "id": f"w{i}"}, root=root), n)
    out["sha256 of a body (in download)"] = _per_item(lambda i: hashlib.sha256(bodies[i % k]).hexdigest(), n)

    async def fetch_all() -> float:
        async with (
            open_context(stage="download", concurrency=1) as ctx,
            download(ctx, trust_env=False) as fetch,
        ):
            return await asyncio.to_thread(
                _per_item, lambda i: fetch({"id": i, "url": f"{origin_url}/photos/{i:05d}.jpg"}), 4 * n
            )

    out["download() of one body, 1 thread"] = asyncio.run(fetch_all())
    return out


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def batch(bodies: list[bytes], srcdir: Path, tmp: Path, count: int, reps: int) -> list[dict[str, Any]]:
    """The image batch's variants, interleaved: CPU ms per item (user, system), faults per item."""
    rows: list[dict[str, Any]] = []
    n = cores()
    with (
        image_batch.origin(srcdir, count) as server,
        concurrent.futures.ThreadPoolExecutor(n) as threads,
    ):
        items = [{"id": f"{i:05d}", "url": f"{server.url}/photos/{i:05d}.jpg"} for i in range(count)]
        outs = iter(range(1_000_000))

        def out() -> str:
            path = tmp / f"out{next(outs)}"
            return str(path)

        variants: dict[str, Callable[[], Callable[[], int]]] = {
            "pipeline": lambda: image_batch.pipeline_run(items, out(), "JPEG"),
            "hand-written asyncio": lambda: lambda: image_batch.run_hand(items, out(), "JPEG"),
            "transform alone, threads": lambda: (
                lambda: image_batch.run_transform_alone(threads, items, bodies, out(), "JPEG")
            ),
        }
        image_batch.run_pipeline(items[: 2 * n], out(), "JPEG")  # warm up
        for _ in range(reps):
            for name, make in variants.items():
                run = make()
                origin0, (u0, s0, f0), w0 = server.cpu_s(), _usage(), time.perf_counter()
                done = run()
                wall = time.perf_counter() - w0
                u1, s1, f1 = _usage()
                rows.append(
                    {
                        "variant": name,
                        "items_per_s": done / wall,
                        "cpu_ms": 1000 * (u1 - u0 + s1 - s0) / done,
                        "user_ms": 1000 * (u1 - u0) / done,
                        "sys_ms": 1000 * (s1 - s0) / done,
                        "faults": (f1 - f0) / done,
                        "origin_ms": 1000 * (server.cpu_s() - origin0) / done,
                    }
                )
                for old in tmp.glob("out*"):
                    shutil.rmtree(old, ignore_errors=True)
    return rows


def main() -> None:
    """Print the parts, then the batch's rows."""
    from tests.images import photo_jpeg

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=160, help="items per batch run (default 160)")
    parser.add_argument("--reps", type=int, default=2, help="runs of each variant (default 2)")
    parser.add_argument("--parts", type=int, default=24, help="calls per part timed alone (default 24)")
    args = parser.parse_args()
    bodies = [photo_jpeg(1600, 1200, seed=i) for i in range(image_batch.DISTINCT)]
    with tempfile.TemporaryDirectory(prefix="bench-account-") as tmp_:
        tmp = Path(tmp_)
        srcdir = tmp / "src"
        srcdir.mkdir()
        for i, body in enumerate(bodies):
            (srcdir / f"{i}.jpg").write_bytes(body)
        saved, image_batch.LATENCY = image_batch.LATENCY, 0.0
        try:
            with image_batch.origin(srcdir, 4 * args.parts + 1) as server:
                figures = parts(bodies, server.url, args.parts)
        finally:
            image_batch.LATENCY = saved
        print("part of the per-item work, alone on one thread        CPU ms/item")
        for name, ms in figures.items():
            print(f"  {name:50} {ms:8.2f}")
        rows = batch(bodies, srcdir, tmp, args.items, args.reps)
    print(
        f"\nimage batch, {args.items} items, {image_batch.LATENCY * 1000:.0f} ms origin, {cores()} cores "
        "(CPU of this process; the origin's apart)"
    )
    print(f"  {'variant':26} {'items/s':>8} {'CPU ms':>7} {'user':>6} {'sys':>5} {'faults':>7} {'origin':>7}")
    for r in rows:
        print(
            f"  {r['variant']:26} {r['items_per_s']:8.1f} {r['cpu_ms']:7.1f} {r['user_ms']:6.1f} "
            f"{r['sys_ms']:5.1f} {r['faults']:7.0f} {r['origin_ms']:7.1f}"
        )


if __name__ == "__main__":
    main()
