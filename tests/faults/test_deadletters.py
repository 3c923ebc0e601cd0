"""Dead letters an operator can act on: ``pipeline deadletters`` groups them, ``pipeline retry``
replays them once the cause is fixed."""

from __future__ import annotations

from pathlib import Path

from tests.faults.world import (
    Config,
    Run,
    assert_exactly_once,
    dead_letters,
    report,
    run_to_end,
    serve_images,
    tiny_jpeg,
)
from tests.fixtures.catalog import sqlite_catalog
from tests.fixtures.httpserver import LoopbackServer

RUN_ID = "night-1"
MISSING = (5, 12, 20)


def _command(config: Config, *args: str) -> Run:
    run = Run(*args, str(config.path), cwd=config.tmp_path)
    run.wait()
    return run


def test_deadletters_lists_groups_and_retry_replays_them_after_the_fix(
    tmp_path: Path, http_server: LoopbackServer
) -> None:
    """Three rows 404: `deadletters` shows one group (download, DownloadError, 404) with their keys;
    after the images are put in place, `retry` takes only those three, and they end ok."""
    rows = 30
    catalog = sqlite_catalog(tmp_path)
    served = serve_images(http_server, rows)
    for key in MISSING:
        http_server.add(f"/img/{key}.jpg", b"gone", status=404, content_type="text/plain")
    catalog.seed(served)
    config = Config(tmp_path, catalog.dsn)
    config.write()

    first = run_to_end(config, RUN_ID)
    assert first.process.returncode == 0, first.stderr  # 3 failures, within max_failures
    assert sorted(d["key"] for d in dead_letters(config, RUN_ID)) == list(MISSING)

    listing = _command(config, "deadletters", "--run-id", RUN_ID)
    assert listing.process.returncode == 0, listing.stderr
    assert f"run {RUN_ID}: 3 items still failed" in listing.stdout
    [group] = [line for line in listing.stdout.splitlines() if "DownloadError" in line]
    cells = [cell.strip() for cell in group.strip("│ ").split("│")]
    assert cells[:3] == ["3", "download", "stages.http.DownloadError"], cells
    assert "answered 404 Not Found" in cells[3]
    assert cells[4] == ", ".join(map(str, MISSING))
    assert f"pipeline retry CONFIG --run-id {RUN_ID}" in listing.stdout

    for key in MISSING:  # the operator fixes the cause
        http_server.add(f"/img/{key}.jpg", tiny_jpeg(), content_type="image/jpeg")
    hits_before = {i: http_server.hits(f"/img/{i}.jpg") for i in range(1, rows + 1)}
    retry = _command(config, "retry", "--run-id", RUN_ID, "--no-progress")

    assert retry.process.returncode == 0, retry.stderr
    summary = report(config, RUN_ID)
    assert summary["items"] == {"read": 3, "ok": 3, "failed": 0, "skipped": 0, "unfinished": 0}
    refetched = [i for i in range(1, rows + 1) if http_server.hits(f"/img/{i}.jpg") != hits_before[i]]
    assert refetched == list(MISSING), "retry takes the failed rows only"
    assert_exactly_once(config, catalog, RUN_ID, list(range(1, rows + 1)))
    after = _command(config, "deadletters", "--run-id", RUN_ID)
    assert f"run {RUN_ID}: no items are still failed" in after.stdout
