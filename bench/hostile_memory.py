"""Peak RSS of download + thumbnail over 36 MP JPEGs and gzip bombs, with and without a budget.

The acceptance figure of the memory budget: a night of huge photos and decompression bombs
must stay within ``1.2 x memory_budget`` plus the interpreter's own baseline, and every item
must end (ok or failed).

``python -m bench.hostile_memory`` is the parent: it makes the bodies (photo-like 36 MP JPEGs,
7360x4912, with Pillow; gzip bombs that inflate to :data:`BOMB_BYTES` of zeros), serves them
from a loopback server in its own process, and runs the child once per budget, each in a fresh
interpreter. ``python -m bench.hostile_memory child URLS_FILE [BUDGET]`` is the child: the
``stages.http:download`` (``max_bytes`` 50 MB, 16 at once) and ``stages.image:thumbnail``
(2 at once) stages, queues of 64, as ``config.toml`` ships; it prints one JSON line with its
peak RSS (``VmHWM``) and its RSS after the imports (see ``bench/memory.py`` for why not
``getrusage``). The catalog order interleaves bombs among the photos.

``--decode-only`` instead measures, in a fresh child each, what one thumbnail of a 36 MP JPEG
and PNG really allocates (peak RSS over the RSS before it, after a warm-up) against
``decode_estimate``, and the estimate's cost per call.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

from bench._common import run_child
from bench.memory import _status_kib

WIDTH, HEIGHT = 7360, 4912  # 36 MP, a full-frame camera's
MAX_BYTES = 50_000_000
BOMB_BYTES = 1_000_000_000  # what each bomb inflates to; download stops it at MAX_BYTES
MiB = 2**20


def _bomb(size: int) -> bytes:
    """gzip of ``size`` zero bytes, compressed in pieces so making it needs little memory."""
    gz = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    block = bytes(MiB)
    parts = [gz.compress(block) for _ in range(size // MiB)]
    parts.append(gz.flush())
    return b"".join(parts)


def _jpegs(count: int) -> list[bytes]:
    from tests import images

    return [images.photo_jpeg(WIDTH, HEIGHT, seed=seed) for seed in range(count)]


def child(urls_file: str, budget: str | None) -> dict[str, Any]:
    """Run the batch in this process; return the RSS figures and the items' fates."""
    import time

    from pipeline import Pipeline, Retry, Stage
    from pipeline.testing import memory_source
    from stages.http import download
    from stages.image import thumbnail

    rows = json.loads(Path(urls_file).read_text())
    before = _status_kib("VmRSS")
    pipeline = Pipeline(
        source=memory_source(rows),
        stages=[
            Stage(download, concurrency=16, retry=Retry(attempts=1), options={"max_bytes": MAX_BYTES}),
            Stage(thumbnail, concurrency=2, retry=Retry(attempts=1)),
        ],
        queue_size=64,
        report_dir=None,
        ledger=False,
        max_failures=10**9,
        memory_budget=budget,
    )
    start = time.perf_counter()
    report = pipeline.run(progress=False)
    wall = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    out: dict[str, Any] = {
        "budget": budget,
        "items": {"read": report.items.read, "ok": report.items.ok, "failed": report.items.failed},
        "peak_rss_mib": round(peak / 1024, 1),
        "rss_after_imports_mib": round(before / 1024, 1),
        "peak_charged_mib": round(report.memory.get("peak_charged_bytes", 0) / MiB, 1),
        "wall_s": round(wall, 1),
    }
    if budget is not None:
        from pipeline._budget import parse_size

        limit = 1.2 * parse_size(budget) / 1024 + before
        out["bound_mib"] = round(limit / 1024, 1)
        out["within_bound"] = peak <= limit
    return out


def decode_child(path: str) -> dict[str, Any]:
    """What one default thumbnail of the image at ``path`` allocates, and its estimate's cost."""
    import timeit

    from stages.image import decode_estimate, thumbnail

    body = Path(path).read_bytes()
    item = {"id": 0, "body": body}
    thumbnail(item)  # warm-up: codecs loaded, Pillow's arenas made
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    thumbnail(item)
    peak = _status_kib("VmHWM")
    calls = 2000
    cost = min(timeit.repeat(lambda: decode_estimate(item), number=calls, repeat=5)) / calls
    return {
        "file": Path(path).name,
        "bytes": len(body),
        "allocated_mib": round((peak - before) / 1024, 1),
        "estimate_mib": round(decode_estimate(item) / MiB, 1),
        "estimate_us_per_call": round(cost * 1e6, 1),
    }


def measure(jpegs: int, bombs: int, budgets: list[str | None]) -> list[dict[str, Any]]:
    """Serve the batch and run one child per budget (``None``: no budget)."""
    from tests.fixtures.httpserver import LoopbackServer

    distinct = _jpegs(min(jpegs, 4))  # a few distinct photos, each served under several URLs
    bomb = _bomb(BOMB_BYTES)
    with LoopbackServer() as server, tempfile.TemporaryDirectory() as tmp:
        rows = []
        for i in range(jpegs + bombs):
            # One bomb after every few photos, so bombs and photos are in flight together.
            if bombs and i % max(1, (jpegs + bombs) // bombs) == 0 and sum(r["bomb"] for r in rows) < bombs:
                url = server.add(f"/bomb/{i}", bomb, headers={"Content-Encoding": "gzip"})
                rows.append({"id": i, "url": url, "bomb": True})
            else:
                body = distinct[i % len(distinct)]
                url = server.add(f"/img/{i}.jpg", body, content_type="image/jpeg")
                rows.append({"id": i, "url": url, "bomb": False})
        urls = Path(tmp, "rows.json")
        urls.write_text(json.dumps(rows))
        print(
            f"batch: {sum(not r['bomb'] for r in rows)} JPEGs of {WIDTH}x{HEIGHT} "
            f"({len(distinct[0]) / 1e6:.1f} MB each), {sum(r['bomb'] for r in rows)} gzip bombs "
            f"({len(bomb) / 1e6:.1f} MB, inflating to {BOMB_BYTES / 1e9:.0f} GB)",
            file=sys.stderr,
        )
        return [
            run_child("bench.hostile_memory", "child", str(urls), *([b] if b else []), timeout=1800)
            for b in budgets
        ]


def measure_decode() -> list[dict[str, Any]]:
    """One child per source: a 36 MP JPEG and the same pixels as PNG."""
    from tests import images

    with tempfile.TemporaryDirectory() as tmp:
        photo = images.photo_image(WIDTH, HEIGHT, seed=0)
        jpeg, png = Path(tmp, "36mp.jpg"), Path(tmp, "36mp.png")
        jpeg.write_bytes(images.photo_jpeg(WIDTH, HEIGHT, seed=0))
        photo.save(png, compress_level=1)
        del photo
        return [
            run_child("bench.hostile_memory", "decode", str(jpeg), timeout=600),
            run_child("bench.hostile_memory", "decode", str(png), timeout=600),
        ]


def main() -> None:
    """The parent: print one JSON document with the figures."""
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        print(json.dumps(child(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "decode":
        print(json.dumps(decode_child(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jpegs", type=int, default=40)
    parser.add_argument("--bombs", type=int, default=10)
    parser.add_argument("--budget", action="append", help='e.g. "512MiB"; repeat; "none" for no budget')
    parser.add_argument("--decode-only", action="store_true")
    args = parser.parse_args()
    if args.decode_only:
        print(json.dumps(measure_decode(), indent=2))
        return
    budgets = [None if b == "none" else b for b in (args.budget or ["512MiB", "none"])]
    print(json.dumps(measure(args.jpegs, args.bombs, budgets), indent=2))


if __name__ == "__main__":
    main()
