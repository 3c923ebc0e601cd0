"""A run killed (``kill -9``) or stopped (SIGTERM) part-way, then rerun under the same run id.

Each test runs ``python -m pipeline run`` as cron would, stops it at a point chosen from its
progress (files under the output root, entries in the ledger), reruns the same run id, and checks
exactly-once where an operator looks: one set of thumbnails per catalog row and no temporary file,
one ledger entry and one ``results`` row per row, nothing done before fetched again.
"""

from __future__ import annotations

import random
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from tests.faults.world import (
    SIZES,
    Config,
    Run,
    assert_exactly_once,
    ledger_items,
    output_files,
    report,
    run_to_end,
    serve_images,
    temp_files,
    tiny_jpeg,
    wait_until,
)
from tests.fixtures.catalog import Catalog, mysql_catalog, sqlite_catalog
from tests.fixtures.httpserver import LoopbackServer
from tests.fixtures.mariadb import MariaDB

RUN_ID = "night-1"
ROWS = 40
SEED = 20240917


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: once ``at_least`` items show in ``watch``, with row ``held`` kept in flight."""

    backend: Literal["sqlite", "mysql"]
    watch: Literal["outputs", "ledger"]
    at_least: int
    held: int

    def __str__(self) -> str:
        return f"{self.backend}-{self.watch}>={self.at_least}-held{self.held}"


def _kill_points() -> list[KillPoint]:
    rng = random.Random(SEED)
    points = [
        KillPoint("sqlite", rng.choice(("outputs", "ledger")), rng.randint(2, ROWS - 6), rng.randint(1, ROWS))
        for _ in range(3)
    ]
    points.append(KillPoint("mysql", "outputs", rng.randint(2, ROWS - 6), rng.randint(1, ROWS)))
    return points


def _progress(config: Config, point: KillPoint) -> int:
    """Items that show as done where ``point`` watches."""
    if point.watch == "outputs":
        return len(output_files(config.root)) // len(SIZES)
    return len(ledger_items(config, RUN_ID))


def _catalog(backend: str, tmp_path: Path, request: pytest.FixtureRequest, env: dict[str, str]) -> Catalog:
    if backend == "sqlite":
        return sqlite_catalog(tmp_path)
    server: MariaDB = request.getfixturevalue("mysql_db")
    env["PIPELINE_DB_CATALOG_PASSWORD"] = server.password
    return mysql_catalog(server)


@pytest.mark.parametrize(
    "point",
    [pytest.param(p, marks=[pytest.mark.mysql] if p.backend == "mysql" else []) for p in _kill_points()],
    ids=str,
)
def test_kill_9_then_rerun_ends_every_row_exactly_once(
    point: KillPoint, tmp_path: Path, http_server: LoopbackServer, request: pytest.FixtureRequest
) -> None:
    """kill -9 mid-run (one row held in flight so the run cannot have finished), rerun the same run
    id: every row ends with one set of outputs, one ledger entry, one results row; rows done before
    the kill are not downloaded again; stale temporary files are cleaned up."""
    env: dict[str, str] = {}
    catalog = _catalog(point.backend, tmp_path, request, env)
    rows = serve_images(http_server, ROWS)
    hold = http_server.add_slow(f"/img/{point.held}.jpg", tiny_jpeg())
    catalog.seed(rows)
    config = Config(tmp_path, catalog.dsn)
    config.write()

    first = Run("run", str(config.path), "--run-id", RUN_ID, "--no-progress", cwd=tmp_path, env=env)
    try:
        wait_until(lambda: _progress(config, point) >= point.at_least, f"{point.at_least} items show")
    finally:
        first.kill()
        first.wait()
        hold.set()
    assert first.process.returncode == -signal.SIGKILL
    done_before = {key for key, state in ledger_items(config, RUN_ID) if state == "done"}
    # What a kill in the middle of atomic_write leaves: a temporary file beside the outputs.
    stale = config.root / "1" / ".32.png.tmp-0123456789abcdef0123456789abcdef"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a png")

    second = run_to_end(config, RUN_ID, env=env)

    assert second.process.returncode == 0, second.stderr
    removed = re.search(r"removed (\d+) stale temporary files? under", second.stderr)
    assert removed is not None, second.stderr
    assert int(removed.group(1)) >= 1, second.stderr
    assert_exactly_once(config, catalog, RUN_ID, [i for i, _ in rows])
    summary = report(config, RUN_ID)
    assert summary["already_done"] == len(done_before)
    assert summary["items"] == {
        "read": ROWS - len(done_before),
        "ok": ROWS - len(done_before),
        "failed": 0,
        "skipped": 0,
        "unfinished": 0,
    }
    for key in done_before:
        assert http_server.hits(f"/img/{key}.jpg") == 1, f"row {key} was done, yet fetched again"


def _stop_when_busy(http_server: LoopbackServer, config: Config, first: Run, at_least: int) -> None:
    """Once ``at_least`` items have outputs, hold every download, so the source stops (its queues
    fill) with most of the catalog unread; then SIGTERM the run."""
    wait_until(lambda: len(output_files(config.root)) >= at_least * len(SIZES), f"{at_least} items written")
    http_server.hold_all()
    first.signal(signal.SIGTERM)
    first.wait_for_line("received SIGTERM")


def test_sigterm_drains_in_flight_items_exits_143_and_the_rerun_finishes(
    tmp_path: Path, http_server: LoopbackServer
) -> None:
    """SIGTERM: the run reads no more rows, finishes what it holds within the grace period, exits 143
    with status interrupted; the rerun does the rest, each row exactly once."""
    rows = 60
    catalog = sqlite_catalog(tmp_path)
    catalog.seed(serve_images(http_server, rows))
    config = Config(tmp_path, catalog.dsn, pipeline={"grace_period": 20.0, "queue_size": 2})
    config.write()
    first = Run("run", str(config.path), "--run-id", RUN_ID, "--no-progress", cwd=tmp_path)
    try:
        _stop_when_busy(http_server, config, first, 5)
        signalled = time.monotonic()
        http_server.release_all()  # the in-flight downloads can now finish
        code = first.wait()
    finally:
        http_server.release_all()
        if first.process.poll() is None:
            first.kill()
            first.wait()
    assert code == 143, first.stderr
    assert time.monotonic() - signalled < 20.0, "did not stop within its grace period"
    summary = report(config, RUN_ID)
    assert (summary["status"], summary["exit_code"]) == ("interrupted", 143)
    read = summary["items"]["read"]
    assert read < rows, "the source should have stopped before the end of the catalog"
    assert summary["items"] == {"read": read, "ok": read, "failed": 0, "skipped": 0, "unfinished": 0}
    assert len(ledger_items(config, RUN_ID)) == read
    assert temp_files(config.root) == []

    second = run_to_end(config, RUN_ID)

    assert second.process.returncode == 0, second.stderr
    assert report(config, RUN_ID)["already_done"] == read
    assert_exactly_once(config, catalog, RUN_ID, list(range(1, rows + 1)))


def test_sigterm_past_the_grace_period_cancels_what_is_left_and_the_rerun_finishes(
    tmp_path: Path, http_server: LoopbackServer
) -> None:
    """SIGTERM with downloads that never finish: after the grace period the run cancels them,
    exits 143 and names them unfinished; the rerun takes them again."""
    rows = 60
    catalog = sqlite_catalog(tmp_path)
    catalog.seed(serve_images(http_server, rows))
    config = Config(
        tmp_path,
        catalog.dsn,
        pipeline={"grace_period": 1.0, "queue_size": 2},
        # The held downloads would give up only after this: far beyond what the engine may take.
        download={"read_timeout": 10.0},
    )
    config.write()
    first = Run("run", str(config.path), "--run-id", RUN_ID, "--no-progress", cwd=tmp_path)
    try:
        _stop_when_busy(http_server, config, first, 5)
        signalled = time.monotonic()
        first.wait_for_line("grace period over")
        code = first.wait()
        stopped = time.monotonic() - signalled
    finally:
        http_server.release_all()
        if first.process.poll() is None:
            first.kill()
            first.wait()
    assert code == 143, first.stderr
    # The 1s grace period, then at most as long again joining the threads it leaves behind, then
    # the clean-up; waiting for the held downloads would take their 10s read_timeout.
    assert stopped < 4.0, f"took {stopped:.1f}s to exit after a 1s grace period"
    summary = report(config, RUN_ID)
    assert summary["status"] == "interrupted"
    items = summary["items"]
    assert items["unfinished"] >= 1
    assert items["read"] == items["ok"] + items["unfinished"]
    assert len(summary["unfinished_keys"]) == items["unfinished"]
    assert not set(summary["unfinished_keys"]) & {k for k, _ in ledger_items(config, RUN_ID)}

    second = run_to_end(config, RUN_ID)

    assert second.process.returncode == 0, second.stderr
    assert_exactly_once(config, catalog, RUN_ID, list(range(1, rows + 1)))
