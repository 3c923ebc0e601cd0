"""The output tree failing under a real run: the circuit breaker, then the fix and the rerun."""

from __future__ import annotations

from pathlib import Path

from tests.faults.world import (
    SIZES,
    Config,
    Run,
    assert_exactly_once,
    dead_letters,
    output_files,
    report,
    run_to_end,
    serve_images,
    tiny_jpeg,
    wait_until,
)
from tests.fixtures.catalog import sqlite_catalog
from tests.fixtures.httpserver import LoopbackServer

RUN_ID = "night-1"


def test_unwritable_output_root_trips_the_circuit_breaker_then_retry_failed_finishes(
    tmp_path: Path, http_server: LoopbackServer
) -> None:
    """The output root turns into a regular file mid-run (ENOTDIR, even for root): after
    circuit_breaker failures in a row the run stops with exit 1 and the breaker's message instead
    of dead-lettering the catalog; once the root is back, --retry-failed finishes every row once."""
    rows, breaker = 60, 3
    catalog = sqlite_catalog(tmp_path)
    served = serve_images(http_server, rows)
    hold = http_server.add_slow("/img/11.jpg", tiny_jpeg())
    catalog.seed(served)
    config = Config(
        tmp_path,
        catalog.dsn,
        pipeline={"circuit_breaker": breaker, "queue_size": 2},
        download={"concurrency": 1},
        write_={"concurrency": 1},
    )
    config.write()
    run = Run("run", str(config.path), "--run-id", RUN_ID, "--no-progress", cwd=tmp_path)
    moved = tmp_path / "thumbnails.moved"
    try:
        # Rows 1-10 written; row 11 held in download, so nothing is being written right now.
        wait_until(lambda: len(output_files(config.root)) == 10 * len(SIZES), "rows 1-10 are written")
        config.root.rename(moved)
        config.root.write_bytes(b"not a directory")
    finally:
        hold.set()
    code = run.wait()

    assert code == 1, run.stderr
    assert f"circuit breaker: stage 'write' failed {breaker} items in a row" in run.stderr
    summary = report(config, RUN_ID)
    assert summary["status"] == "failed"
    assert summary["error"].startswith(f"circuit breaker: stage 'write' failed {breaker} items in a row")
    assert "ENOTDIR" in summary["error"]
    items = summary["items"]
    assert items["read"] < rows, "the source should stop reading once the breaker trips"
    assert items["ok"] >= 10
    assert items["failed"] >= breaker
    assert items["read"] == items["ok"] + items["failed"] + items["unfinished"]
    letters = dead_letters(config, RUN_ID)
    assert len(letters) == items["failed"]
    assert {(d["stage"], d["error_type"]) for d in letters} == {("write", "stages.files.OutputWriteError")}
    assert all("ENOTDIR" in d["message"] for d in letters)

    config.root.unlink()  # the operator fixes the cause
    moved.rename(config.root)
    rerun = run_to_end(config, RUN_ID, "--retry-failed")

    assert rerun.process.returncode == 0, rerun.stderr
    assert_exactly_once(config, catalog, RUN_ID, list(range(1, rows + 1)))


def test_output_root_that_is_a_file_at_start_fails_the_run_before_any_item(
    tmp_path: Path, http_server: LoopbackServer
) -> None:
    """A root that cannot be a directory fails the run at once with exit 1 and a message naming
    the path: nothing is downloaded, nothing dead-lettered."""
    catalog = sqlite_catalog(tmp_path)
    catalog.seed(serve_images(http_server, 5))
    config = Config(tmp_path, catalog.dsn)
    config.write()
    config.root.write_bytes(b"not a directory")

    run = run_to_end(config, RUN_ID)

    assert run.process.returncode == 1, run.stderr
    assert "run failed: stage 'write': could not prepare the output root" in run.stderr
    assert "a file stands where a directory is needed" in run.stderr
    assert http_server.requests == []
    assert dead_letters(config, RUN_ID) == []
