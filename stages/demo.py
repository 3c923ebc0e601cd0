"""Run the nightly batch on demo data, with no database server and no internet: ``make run``.

Usage::

    python -m stages.demo [CONFIG] [any `pipeline run` option ...]         (make run)
    python -m stages.demo tune [CONFIG] [any `pipeline tune` option ...]   (make tune)

What it does, in order:

1. Seeds the SQLite catalog that ``CONFIG``'s ``[databases.catalog]`` names with
   40 rows: 37 photo-like images of assorted sizes and modes, and three deliberately bad rows
   (a URL that answers 404, a truncated JPEG, an HTML page), so the run's dead letters show
   what a failure looks like. Running it again replaces the same 40 rows.
2. Serves the images from a loopback HTTP server on 127.0.0.1 (a new port each run, which is
   why the rows' URLs are rewritten every time).
3. Runs ``pipeline run CONFIG`` in this process, exactly as the nightly job would, then stops
   the server and exits with the pipeline's exit code (0: the three failures are within the
   config's ``max_failures``). With ``tune``, runs ``pipeline tune CONFIG`` instead, while the
   images are served: ``pipeline tune`` alone, after the demo, finds no server to measure.

Point the config at MySQL and real URLs for production; the demo only seeds SQLite files, so
it can never overwrite a real catalog.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import json
import random
import sqlite3
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

__all__ = ["demo_images", "main", "seed_catalog", "serve", "sqlite_path"]

GOOD_ROWS = 37
# The rows meant to fail, last in the catalog: missing.jpg is not served at all (a 404).
BAD_ROWS = ("missing.jpg", "truncated.jpg", "not-an-image.jpg")


def _photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour field plus fine noise: compresses and decodes like a photograph."""
    rng = random.Random(seed)
    coarse_size = (max(2, width // 64), max(2, height // 64))
    coarse = Image.frombytes("RGB", coarse_size, rng.randbytes(coarse_size[0] * coarse_size[1] * 3))
    noise = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    return Image.blend(coarse.resize((width, height), Image.Resampling.BICUBIC), noise, 0.12)


def _encode(img: Image.Image, format: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=format, **params)
    return buf.getvalue()


def demo_images() -> dict[str, tuple[bytes, str]]:
    """The files the demo server serves, by path: ``{name: (body, content type)}``.

    Deterministic: the same bytes every run. Mostly RGB JPEGs from 480 px to 1760 px, both
    orientations, plus a grayscale and a CMYK JPEG, a camera JPEG turned by its EXIF
    orientation tag, and a PNG with transparency.
    """
    files: dict[str, tuple[bytes, str]] = {}
    for n in range(1, GOOD_ROWS + 1):
        long_side = 480 + (n * 353) % 1280
        size = (long_side, long_side * 3 // 4) if n % 3 else (long_side * 3 // 4, long_side)
        img = _photo(*size, seed=n)
        if n % 10 == 4:
            files[f"{n}.jpg"] = (_encode(img.convert("L"), "JPEG", quality=88), "image/jpeg")
        elif n % 10 == 7:
            files[f"{n}.jpg"] = (_encode(img.convert("CMYK"), "JPEG", quality=88), "image/jpeg")
        elif n % 10 == 9:
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: the camera was held on its side
            files[f"{n}.jpg"] = (_encode(img, "JPEG", quality=88, exif=exif.tobytes()), "image/jpeg")
        elif n % 10 == 0:
            rgba = img.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(size))
            files[f"{n}.png"] = (_encode(rgba, "PNG"), "image/png")
        else:
            files[f"{n}.jpg"] = (_encode(img, "JPEG", quality=88), "image/jpeg")
    whole = files["1.jpg"][0]
    files["truncated.jpg"] = (whole[: len(whole) // 3], "image/jpeg")
    files["not-an-image.jpg"] = (
        b"<!doctype html><title>Moved</title><p>This page has moved.</p>",
        "text/html",
    )
    return files


@contextlib.contextmanager
def serve(files: dict[str, tuple[bytes, str]]) -> Iterator[str]:
    """Serve ``files`` on a loopback port for the block; yields the base URL (ending in ``/``)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, content_type = files.get(self.path.lstrip("/"), (b"not found", "text/plain"))
            self.send_response(200 if self.path.lstrip("/") in files else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the pipeline reports what matters

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def sqlite_path(dsn: str) -> Path | None:
    """The file an ``sqlite:///path`` DSN names, or ``None`` for any other DSN."""
    if not dsn.startswith("sqlite:///") or dsn.endswith((":memory:", "///")):
        return None
    return Path(dsn.removeprefix("sqlite:///"))


def seed_catalog(path: Path, urls: list[str]) -> None:
    """Create (if needed) the SQLite file's ``catalog`` table and upsert row ``i`` = ``urls[i-1]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE IF NOT EXISTS catalog (id INTEGER PRIMARY KEY, url TEXT NOT NULL)")
        conn.executemany(
            "INSERT INTO catalog (id, url) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET url = excluded.url",
            list(enumerate(urls, start=1)),
        )


def main(argv: list[str] | None = None) -> int:
    """Seed, serve, run (or, after ``tune``, tune) the pipeline; return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    tune = argv[:1] == ["tune"]
    if tune:
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m stages.demo tune" if tune else "python -m stages.demo",
        description=(
            "Tune the nightly batch's caps on demo images served over loopback HTTP. "
            "Options not listed here go to `pipeline tune`."
            if tune
            else "Run the nightly batch on demo images served over loopback HTTP (`tune` first: tune "
            "its caps on them). Options not listed here go to `pipeline run`."
        ),
    )
    parser.add_argument("config", nargs="?", default="config.toml", type=Path, help="default: config.toml")
    if not tune:
        parser.add_argument("--run-id", help="the run's id (default: <name>-demo-<time>)")
    args, passthrough = parser.parse_known_args(argv)
    try:
        config = tomllib.loads(args.config.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"demo: cannot read {args.config}: {exc}", file=sys.stderr)
        return 2
    path = sqlite_path(config.get("databases", {}).get("catalog", {}).get("dsn", ""))
    if path is None:
        print(
            f"demo: {args.config} must point [databases.catalog] dsn at an sqlite:///path file; the "
            "demo only seeds SQLite files, so that it can never overwrite a real catalog",
            file=sys.stderr,
        )
        return 2
    settings = config.get("pipeline", {})
    run_id = (
        ""
        if tune
        else args.run_id or f"{settings.get('name', 'pipeline')}-demo-{time.strftime('%Y%m%dT%H%M%S')}"
    )
    command = ["tune", str(args.config)] if tune else ["run", str(args.config), "--run-id", run_id]
    if tune and not any(a == "--limit" or a.startswith("--limit=") for a in passthrough):
        # The good rows only: the three bad ones show dead letters in a run, but in a tuning step
        # they are 7% failed attempts whatever the cap, over tune's 1% error limit.
        command += ["--limit", str(GOOD_ROWS)]

    from pipeline.cli import main as pipeline_main  # the `pipeline` command itself

    files = demo_images()
    with serve(files) as base:
        urls = [base + name for name in (*(f for f in files if f[0].isdigit()), *BAD_ROWS)]
        seed_catalog(path, urls)
        print(f"demo: {len(urls)} catalog rows in {path}, images served from {base}", file=sys.stderr)
        code = pipeline_main([*command, *passthrough])
    if tune:
        return code

    report = Path(settings.get("report_dir", "runs"), run_id, "report.json")
    roots = [s["root"] for s in config.get("stages", []) if s.get("use") == "stages.files:write"]
    if report.exists():
        items = json.loads(report.read_text())["items"]
        page = report.with_name("report.html")
        shown = page if page.exists() else report
        print(f"demo: {items['ok']} ok, {items['failed']} failed; report in {shown}", file=sys.stderr)
    for root in roots:
        print(f"demo: thumbnails in {root}/", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
