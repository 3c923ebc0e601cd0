"""End to end: the shipped ``config.toml`` run on a real catalog, real HTTP and real images.

Each run takes the shipped config and changes only what must point at the test's own world
(the DSN, the output and report directories) and what makes faults quick (a short read timeout
and short retry waits); every other option is the nightly job's own. The catalog lives in a
real SQLite file or on the private MariaDB server, the images come from the loopback server,
and the outcome of every row is checked where an operator would look: thumbnails on disk, the
``results`` table, ``dead_letters.jsonl`` and ``report.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tomllib
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from PIL import Image, ImageOps

from pipeline import Database, Pipeline, RunReport, Source, Stage, load_config
from stages.db import read_rows
from tests import images
from tests.fixtures.catalog import Catalog, mysql_catalog, sqlite_catalog
from tests.fixtures.httpserver import LoopbackServer
from tests.fixtures.mariadb import MariaDB, global_status

REPO = Path(__file__).resolve().parents[2]
SHIPPED = tomllib.loads((REPO / "config.toml").read_text(encoding="utf-8"))
RUN_ID = "e2e"
# Small enough that a test body can exceed it cheaply; the shipped 50 MB would be slow to serve.
MAX_BYTES = 2_000_000
ATTEMPTS = 3


def _stage(config: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in config["stages"] if s["name"] == name)
    return found


# --------------------------------------------------------------------------------------------
# The config: the shipped one, re-pointed at the test's world and written back as TOML


def write_config(
    tmp_path: Path,
    dsn: str,
    *,
    db_concurrency: int | None = None,
    record_concurrency: int | None = None,
    held_origin: bool = False,
) -> Path:
    """Write the shipped config to ``tmp_path``, pointed at ``dsn`` and at ``tmp_path``'s dirs.

    Args:
        held_origin: Keep the shipped read timeout, for an origin the test holds on purpose:
            a client that gave up and retried would put more requests at the server than the
            stage has in flight (the server still holds the abandoned one).
    """
    config = json.loads(json.dumps(SHIPPED))  # a deep copy
    config["pipeline"]["report_dir"] = str(tmp_path / "runs")
    config["databases"]["catalog"]["dsn"] = dsn
    if db_concurrency is not None:
        config["databases"]["catalog"]["concurrency"] = db_concurrency
    download = _stage(config, "download")
    download.update(connect_timeout=2.0, max_bytes=MAX_BYTES)
    if not held_origin:
        download.update(read_timeout=1.0, timeout=10.0)
    download["retry"] = {"attempts": ATTEMPTS, "backoff": 0.01, "max_backoff": 0.05, "jitter": 0.0}
    _stage(config, "write")["root"] = str(tmp_path / "thumbnails")
    if record_concurrency is not None:
        _stage(config, "record")["concurrency"] = record_concurrency
    path = tmp_path / "config.toml"
    path.write_text(tomlkit.dumps(config), encoding="utf-8")
    return path


@pytest.fixture
def isolated_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config puts the config's directory on sys.path; undo that after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def run(config: Path, **kwargs: Any) -> RunReport:
    return load_config(str(config)).run(run_id=RUN_ID, progress=False, handle_signals=False, **kwargs)


# --------------------------------------------------------------------------------------------
# The catalog: SQLite or MariaDB


def mysql_backend(server: MariaDB, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    """The catalog on the private MariaDB server, its password passed as the config says."""
    monkeypatch.setenv("PIPELINE_DB_CATALOG_PASSWORD", server.password)  # in the environment, not the DSN
    return mysql_catalog(server)


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def backend(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Catalog:
    """The catalog on a fresh SQLite file, then on the private MariaDB server."""
    if request.param == "sqlite":
        return sqlite_catalog(tmp_path)
    return mysql_backend(request.getfixturevalue("mysql_db"), monkeypatch)


# --------------------------------------------------------------------------------------------
# What each catalog row is, and how it must end


@dataclass(frozen=True)
class Row:
    """One catalog row and its documented fate.

    ``stage`` is None for a row that must end ok; otherwise the stage that dead-letters it,
    with the exception's class name and a phrase of its message.
    """

    id: int
    url: str
    body: bytes = b""
    stage: str | None = None
    error: str = ""
    message: str = ""
    attempts: int = 1


def serve_catalog(server: LoopbackServer) -> list[Row]:
    """Put one image or fault per row on ``server``; return the rows with their expected fate."""
    photo = images.photo_jpeg(640, 480, seed=9)
    half = len(photo) // 2
    huge = b"\xff" * (MAX_BYTES + 1)

    def ok(id: int, path: str, body: bytes, attempts: int = 1) -> Row:
        return Row(id, server.url(path), body, attempts=attempts)

    def dead(id: int, path: str, stage: str, error: str, message: str, attempts: int = 1) -> Row:
        return Row(id, server.url(path), stage=stage, error=error, message=message, attempts=attempts)

    bodies = {
        "/photo.jpg": images.photo_jpeg(1600, 1200, seed=1),
        "/rotated.jpg": images.photo_jpeg(800, 600, seed=2, orientation=6),
        "/gray.jpg": images.grayscale_jpeg(),
        "/cmyk.jpg": images.cmyk_jpeg(),
        "/alpha.png": images.rgba_png(),
        "/palette.png": images.palette_png_with_transparency(),
        "/animated.gif": images.animated_gif(),
        "/deep.png": images.i16_png(),
    }
    for path, body in bodies.items():
        server.add(path, body)
    server.add_flaky("/flaky.jpg", photo, failures=1, status=503)
    server.add_flaky("/busy.jpg", photo, failures=1, status=429, retry_after="1")
    server.add_redirects("/moved.jpg", 2, photo)
    server.add("/chunked.jpg", photo, chunked=True)
    server.add("/private.jpg", b"no", status=403)
    server.add("/corrupt.jpg", images.truncated_jpeg())
    server.add("/garbage.jpg", images.garbage_bytes())
    server.add("/page.jpg", images.html_page(), content_type="text/html")
    server.add("/bomb.png", images.png_bomb(8000, 8000))
    server.add("/huge.jpg", huge)
    server.add("/huge-chunked.jpg", huge, chunked=True)
    server.add_slow("/slow.jpg", photo)  # released when the server closes, long after the client gave up
    server.add_truncated("/cut.jpg", photo, send_bytes=half)
    server.add("/broken.jpg", status=500)
    # /gone.jpg is not configured: the server answers 404.
    return [
        *(ok(i, path, body) for i, (path, body) in enumerate(bodies.items(), start=1)),
        ok(9, "/flaky.jpg", photo, attempts=2),
        ok(10, "/busy.jpg", photo, attempts=2),
        ok(11, "/moved.jpg", photo),
        ok(12, "/chunked.jpg", photo),
        dead(20, "/gone.jpg", "download", "DownloadError", "404 Not Found"),
        dead(21, "/private.jpg", "download", "DownloadError", "403 Forbidden"),
        dead(22, "/corrupt.jpg", "thumbnail", "ImageDecodeError", "not a decodable image"),
        dead(23, "/garbage.jpg", "thumbnail", "ImageDecodeError", "cannot identify image file"),
        dead(24, "/page.jpg", "thumbnail", "ImageDecodeError", "content type text/html"),
        dead(25, "/bomb.png", "thumbnail", "ImageTooLargeError", "over max_pixels"),
        dead(26, "/huge.jpg", "download", "DownloadError", f"announces {MAX_BYTES + 1} bytes"),
        dead(27, "/huge-chunked.jpg", "download", "DownloadError", f"sent more than {MAX_BYTES} bytes"),
        dead(28, "/slow.jpg", "download", "TransientError", "(read_timeout)", ATTEMPTS),
        dead(29, "/cut.jpg", "download", "TransientError", "lost the connection", ATTEMPTS),
        dead(30, "/broken.jpg", "download", "TransientError", "500 Internal Server Error", ATTEMPTS),
    ]


def displayed_size(body: bytes) -> tuple[int, int]:
    """The source image's size as shown, after its EXIF orientation."""
    with Image.open(io.BytesIO(body)) as img:
        shown = ImageOps.exif_transpose(img)
        return shown.size


def dead_letters(report: RunReport) -> dict[Any, dict[str, Any]]:
    assert report.dead_letters is not None
    records = [json.loads(line) for line in Path(report.dead_letters).read_text().splitlines()]
    by_key = {r["key"]: r for r in records}
    assert len(by_key) == len(records), "an item was dead-lettered twice"
    return by_key


# --------------------------------------------------------------------------------------------
# The batch


@pytest.mark.usefixtures("isolated_sys_path")
def test_every_catalog_row_ends_as_documented(
    backend: Catalog, http_server: LoopbackServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Good rows get thumbnails and an ok results row; each fault is retried or dead-lettered and recorded."""
    rows = serve_catalog(http_server)
    backend.seed([(r.id, r.url) for r in rows])
    with (
        caplog.at_level(logging.INFO, logger="pipeline"),
        caplog.at_level(logging.INFO, logger="stages.http"),
    ):
        report = run(write_config(tmp_path, backend.dsn))

    good = [r for r in rows if r.stage is None]
    bad = [r for r in rows if r.stage is not None]
    assert (report.status, report.exit_code) == ("ok", 0)  # within the shipped max_failures
    items = report.items
    assert (items.read, items.ok, items.failed, items.skipped, items.unfinished) == (
        len(rows),
        len(good),
        len(bad),
        0,
        0,
    )

    thumbnail = _stage(SHIPPED, "thumbnail")
    results = {row["key"]: row for row in backend.result_rows()}
    assert sorted(results) == sorted(str(r.id) for r in rows), "a results row for every catalog row"
    root = tmp_path / "thumbnails"
    for row in good:
        result = results[str(row.id)]
        width, height = displayed_size(row.body)
        assert (result["status"], result["width"], result["height"]) == ("ok", width, height), row
        assert (result["bytes"], result["sha256"]) == (len(row.body), hashlib.sha256(row.body).hexdigest())
        outputs = json.loads(result["outputs"])
        assert len(outputs) == len(thumbnail["sizes"]), row
        for size, rel in zip(thumbnail["sizes"], outputs, strict=True):
            with Image.open(root / rel) as thumb:
                thumb.load()  # decodes, or raises
                assert thumb.format == thumbnail["format"], rel
                assert max(thumb.size) == min(size, max(width, height)), (rel, thumb.size)
                assert (thumb.width > thumb.height) == (width > height), (rel, thumb.size)

    letters = dead_letters(report)
    assert sorted(letters) == sorted(r.id for r in bad)
    for row in bad:
        letter = letters[row.id]
        assert letter["stage"] == row.stage, letter
        assert letter["error_type"].rpartition(".")[2] == row.error, letter
        assert row.message in letter["message"], letter
        assert letter["attempts"] == row.attempts, letter
        result = results[str(row.id)]
        assert (result["status"], result["outputs"], result["width"], result["height"]) == (
            "failed",
            None,
            None,
            None,
        ), result
        assert result["error"].startswith(f"{row.stage}: {row.error}: "), result
        assert row.message in result["error"], result
        assert result["run_id"] == RUN_ID, result

    download = next(s for s in report.stages if s.name == "download")
    assert download.retries == sum(r.attempts - 1 for r in rows)
    assert http_server.hits("/flaky.jpg") == 2
    assert http_server.hits("/busy.jpg") == 2
    # The 429's Retry-After pauses its host, not the stage.
    assert f"host http://127.0.0.1:{http_server.port} paused for 1.0s" in caplog.text
    assert "stage 'download' paused" not in caplog.text
    on_disk = json.loads((tmp_path / "runs" / RUN_ID / "report.json").read_text())
    assert on_disk["items"] == {
        "read": len(rows),
        "ok": len(good),
        "failed": len(bad),
        "skipped": 0,
        "unfinished": 0,
    }


def _same_photo_rows(server: LoopbackServer, count: int) -> list[tuple[int, str]]:
    body = images.photo_jpeg(320, 240)
    return [(i, server.add(f"/{i}.jpg", body)) for i in range(1, count + 1)]


@pytest.mark.mysql
@pytest.mark.usefixtures("isolated_sys_path")
def test_server_never_sees_more_connections_than_the_database_cap(
    mysql_db: MariaDB, http_server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Source and record share [databases.catalog] concurrency = 2: the server sees at most 2 connections."""
    backend = mysql_backend(mysql_db, monkeypatch)
    backend.seed(_same_photo_rows(http_server, 60))
    config = write_config(tmp_path, backend.dsn, db_concurrency=2, record_concurrency=8)
    with contextlib.closing(mysql_db.admin()) as admin:
        with admin.cursor() as cur:
            cur.execute("FLUSH STATUS")  # Max_used_connections restarts from those open now
        # Connections of earlier tests may still be closing: they can only go, never come.
        baseline = global_status(admin, "Threads_connected")
        report = run(config)
        used = global_status(admin, "Max_used_connections")
    assert report.items.ok == 60
    assert 1 <= used - baseline <= 2, (used, baseline)


async def test_download_cap_is_what_the_server_sees(
    http_server: LoopbackServer, tmp_path: Path, isolated_sys_path: None
) -> None:
    """With the origin holding every request, exactly the download stage's concurrency is in flight."""
    cap = _stage(SHIPPED, "download")["concurrency"]
    catalog = sqlite_catalog(tmp_path)
    rows = _same_photo_rows(http_server, cap + 24)
    catalog.seed(rows)
    pipeline = load_config(str(write_config(tmp_path, catalog.dsn, held_origin=True)))
    http_server.hold_all()
    task = asyncio.create_task(pipeline.run_async(run_id=RUN_ID, progress=False))
    try:
        await asyncio.to_thread(http_server.wait_for_in_flight, cap)
        assert http_server.in_flight == cap
    finally:
        http_server.release_all()
        report = await task
    assert report.items.ok == len(rows)
    assert http_server.max_in_flight == cap
    assert next(s for s in report.stages if s.name == "download").max_in_flight == cap


# --------------------------------------------------------------------------------------------
# make run, and the shipped config


def test_shipped_config_is_the_nightly_job(isolated_sys_path: None) -> None:
    """config.toml validates and describes catalog -> download -> thumbnail -> write -> record."""
    pipeline = load_config(str(REPO / "config.toml"))
    assert [s.name for s in pipeline.stages] == ["download", "thumbnail", "write", "record"]
    assert pipeline.databases["catalog"].dsn.startswith("sqlite:///")
    assert pipeline.source.fn is read_rows
    assert pipeline.max_failures >= 3, "the demo's three bad rows must not fail `make run`"


def test_demo_runs_the_batch_on_a_fresh_checkout_and_again(tmp_path: Path) -> None:
    """`python -m stages.demo` leaves thumbnails and a report, exits 0, and works a second time."""
    shutil.copy(REPO / "config.toml", tmp_path / "config.toml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTHONASYNCIODEBUG", None)  # a user's run, not a test loop

    def demo(run_id: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "stages.demo", "config.toml", "--no-progress", "--run-id", run_id],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "thumbnails in var/thumbnails/" in done.stderr
        report: dict[str, Any] = json.loads((tmp_path / "var/runs" / run_id / "report.json").read_text())
        return report

    for run_id in ("first", "second"):
        report = demo(run_id)
        assert report["items"] == {"read": 40, "ok": 37, "failed": 3, "skipped": 0, "unfinished": 0}
        letters = (tmp_path / "var/runs" / run_id / "dead_letters.jsonl").read_text().splitlines()
        assert len(letters) == 3
    thumbs = sorted((tmp_path / "var/thumbnails").rglob("*.webp"))
    assert len(thumbs) == 37 * 2
    with contextlib.closing(sqlite3.connect(tmp_path / "var/catalog.db")) as conn:
        assert conn.execute("SELECT count(*) FROM catalog").fetchone() == (40,)
        by_status = conn.execute("SELECT status, count(*) FROM results GROUP BY status ORDER BY status")
        assert by_status.fetchall() == [("failed", 3), ("ok", 37)]


# --------------------------------------------------------------------------------------------
# Memory


def test_100k_row_catalog_runs_in_flat_memory(tmp_path: Path) -> None:
    """100k catalog rows stream through the whole engine with memory of a few chunks, not of the table."""
    path = tmp_path / "big.db"
    count = 100_000
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("CREATE TABLE catalog (id INTEGER PRIMARY KEY, url TEXT NOT NULL)")
        conn.executemany(
            "INSERT INTO catalog VALUES (?, ?)",
            ((i, f"https://images.example.com/catalog/{i:08d}/original.jpg") for i in range(1, count + 1)),
        )
    seen = 0

    async def noop(item: dict[str, Any]) -> dict[str, Any]:
        nonlocal seen
        seen += 1
        return item

    pipeline = Pipeline(
        source=Source(
            read_rows, key="id", options={"database": "catalog", "query": SHIPPED["source"]["query"]}
        ),
        stages=[Stage(noop)],
        databases={"catalog": Database(f"sqlite:///{path}")},
        report_dir=None,
    )
    tracemalloc.start()
    try:
        # What holding the whole table would cost: every row as a dict, as the source yields it.
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.row_factory = lambda cur, row: dict(zip([d[0] for d in cur.description], row, strict=True))
            everything = conn.execute("SELECT id, url FROM catalog").fetchall()
        table_bytes = tracemalloc.get_traced_memory()[0]
        del everything
        start = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        # Debug mode keeps a creation traceback per task and callback: off here, so what is
        # measured is the engine's memory, not the debugger's.
        report = asyncio.run(pipeline.run_async(run_id="big", progress=False), debug=False)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    assert report.items.ok == seen == count
    assert peak < table_bytes / 5, (peak, table_bytes)
    assert peak < 8_000_000, peak
