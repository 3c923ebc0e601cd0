"""report.html: the sampled timeline, the page a run leaves in its run directory, and
``pipeline report RUN_DIR``; one test loads a real page in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline import Auto, Pipeline, Retry, RunReport, Source, Stage, run_async
from pipeline._html import render_html
from pipeline._progress import RunSnapshot, StageSnapshot
from pipeline._timeline import Timeline, open_sampler
from tests.engine.cli import run_cli

HOSTILE_KEY = "<script>alert('key')</script>"
HOSTILE_MESSAGE = "<img src=x onerror=alert(1)> from http://evil.example/a?b=1"


def snap(elapsed: float, ok: int, queued: int = 0, *, cap: int = 4) -> RunSnapshot:
    stage = StageSnapshot(
        name="s", kind="async", in_flight=1, cap=cap, queued=queued, ok=ok, failed=1, retries=0, skipped=2
    )
    return RunSnapshot("p", "r", elapsed, read=ok + 3, done=ok + 1, failed=1, in_flight=1, stages=(stage,))


def test_a_sample_appends_the_run_counters_and_each_stage_s_figures() -> None:
    """One sample adds one value to every series; a stage's `ended` counts ok, failed and skipped."""
    timeline = Timeline(["s"], [8])
    timeline.sample(snap(0.5, ok=10, queued=3))
    data = timeline.to_dict({"pipeline": {"name": "p"}})
    assert data["t"] == [0.5]
    assert (data["read"], data["done"], data["failed"], data["in_flight"]) == ([13], [11], [1], [1])
    assert data["stages"] == [
        {"name": "s", "queue_size": 8, "ended": [13], "in_flight": [1], "cap": [4], "queued": [3]}
    ]
    assert data["settings"] == {"pipeline": {"name": "p"}}


def test_a_full_timeline_drops_every_other_sample_and_doubles_its_interval() -> None:
    """Past max_samples the timeline halves itself: memory stays bounded however long the run."""
    timeline = Timeline(["s"], [8], interval=0.5, max_samples=4)
    for i in range(5):
        timeline.sample(snap(float(i), ok=i))
    assert timeline.t == [0.0, 2.0, 4.0]
    assert timeline.to_dict()["stages"][0]["ended"] == [3, 5, 7]
    assert timeline.interval == 1.0


async def test_the_sampler_samples_when_the_block_starts_and_when_it_ends() -> None:
    """A run shorter than one interval still has its first and its final figures."""
    timeline = Timeline(["s"], [8], interval=3600)
    figures = iter([snap(0.0, ok=0), snap(0.1, ok=5)])
    async with open_sampler(lambda: next(figures), timeline):
        await asyncio.sleep(0)
    assert timeline.t == [0.0, 0.1]
    assert timeline.to_dict()["stages"][0]["ended"] == [3, 8]


# -- a real run ---------------------------------------------------------------------------------


def rows(count: int = 24) -> Any:
    for i in range(count):
        yield {"id": HOSTILE_KEY if i == 7 else i}


async def fetch(item: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0.002)
    if item["id"] in (3, HOSTILE_KEY):
        raise ValueError(f"{HOSTILE_MESSAGE} for {item['id']!r}")
    return item


def resize(item: dict[str, Any]) -> dict[str, Any]:
    return item


def small_pipeline(report_dir: Path) -> Pipeline:
    """Two stages, one of them `auto`; two items fail (one with a hostile key and message)."""
    return Pipeline(
        name="html",
        source=Source(rows),
        stages=[
            Stage(fetch, name="fetch", concurrency=Auto(min=1, max=4), retry=Retry(attempts=1)),
            Stage(resize, name="resize", concurrency=2),
        ],
        report_dir=report_dir,
        ledger=False,
        max_failures=5,
        queue_size=4,
    )


async def finished_run(tmp_path: Path) -> tuple[RunReport, Path]:
    report = await run_async(small_pipeline(tmp_path / "runs"), run_id="r1", progress=False)
    assert report.status == "ok", report.error
    return report, tmp_path / "runs" / "r1"


async def test_a_run_leaves_its_timeline_and_its_page_beside_report_json(tmp_path: Path) -> None:
    """The run directory gets timeline.json (series and settings) and a report.html of its own."""
    report, run_dir = await finished_run(tmp_path)
    timeline = json.loads((run_dir / "timeline.json").read_text())
    assert [s["name"] for s in timeline["stages"]] == ["fetch", "resize"]
    assert len(timeline["t"]) >= 2  # the first sample and the final one at least
    assert timeline["stages"][0]["ended"][-1] == 24
    assert timeline["settings"]["stages"][0]["concurrency"].startswith("auto (min 1, max 4")
    page = (run_dir / "report.html").read_text()
    assert page.count("<svg") == 5
    assert "http://" not in re.sub(r"<svg.*?</svg>", "", page, flags=re.DOTALL).replace(
        "http://evil.example", ""
    ), "the page must load nothing"
    assert f"<td>{report.stages[0].name}</td>" in page


async def test_the_page_escapes_keys_and_messages_from_the_run(tmp_path: Path) -> None:
    """A dead letter's key and message are shown as text, never as markup."""
    _, run_dir = await finished_run(tmp_path)
    page = (run_dir / "report.html").read_text()
    assert "<script" not in page
    assert "<img" not in page
    assert "&lt;script&gt;alert(&#x27;key&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


async def test_a_page_that_cannot_be_drawn_leaves_the_run_and_report_json_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Rendering fails: the run still ends ok, report.json stands, the failure is logged."""

    def broken(run_dir: Path) -> Path:
        raise RuntimeError("no fonts")

    monkeypatch.setattr("pipeline._html.write_report_html", broken)
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        report, run_dir = await finished_run(tmp_path)
    assert report.status == "ok"
    assert json.loads((run_dir / "report.json").read_text())["status"] == "ok"
    assert not (run_dir / "report.html").exists()
    assert "report.html could not be made (RuntimeError: no fonts)" in caplog.text


def test_a_page_without_a_timeline_says_so_and_still_renders() -> None:
    """An old or cut-short run directory (no timeline.json) still gets a page, minus the series."""
    report = {"pipeline": "p", "run_id": "r", "status": "failed", "items": {"read": 0}, "stages": []}
    page = render_html(report, None, [])
    assert "No timeline was sampled" in page
    assert page.count("<svg") == 1  # items by outcome


def test_pipeline_report_rebuilds_the_page_from_the_run_directory(tmp_path: Path) -> None:
    """`pipeline report RUN_DIR` writes report.html again from the files alone, and says where."""
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    report = {"pipeline": "p", "run_id": "r1", "status": "ok", "items": {"read": 2, "ok": 2}, "stages": []}
    (run_dir / "report.json").write_text(json.dumps(report))
    proc = run_cli("report", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {run_dir / 'report.html'}" in proc.stderr
    assert "<svg" in (run_dir / "report.html").read_text()


def test_pipeline_report_refuses_a_directory_without_report_json(tmp_path: Path) -> None:
    """A directory that is not a run's is a usage error (exit 2) that names the fix."""
    proc = run_cli("report", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "has no report.json; give a run's directory" in proc.stderr


# -- in a real browser --------------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,2000",
)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "chromium is not installed; with CI=true the browser test must run (.ci/run installs it)"
            )
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def browse(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


@pytest.mark.slow
async def test_the_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    """A real run's page, loaded by Chromium: every chart is there, the headings and a dead letter
    show, nothing logs a console error, and the screenshot is not blank."""
    browser = chromium()
    _, run_dir = await finished_run(tmp_path)
    url = (run_dir / "report.html").resolve().as_uri()
    # Console messages go to stderr as "[...:INFO:CONSOLE:1] "Uncaught ReferenceError: ..."".
    logging_flags = ("--enable-logging=stderr", "--v=0")
    dom = await asyncio.to_thread(browse, browser, tmp_path, *logging_flags, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr
    assert ":CONSOLE" not in dom.stderr, dom.stderr
    assert "Uncaught" not in dom.stderr, dom.stderr
    assert dom.stdout.count("<svg") == 5
    for heading in (
        "Items by outcome",
        "Throughput per stage",
        "In flight against the cap",
        "Queue depth",
        "Latency per stage",
        "Dead letters",
        "Settings",
    ):
        assert f"<h2>{heading}</h2>" in dom.stdout
    assert "&lt;script&gt;alert('key')&lt;/script&gt;" in dom.stdout
    assert "ValueError" in dom.stdout
    png = tmp_path / "report.png"
    shot = await asyncio.to_thread(browse, browser, tmp_path, f"--screenshot={png}", url)
    assert shot.returncode == 0, shot.stderr
    with Image.open(png) as image:
        assert image.size == (1280, 2000)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None
    assert len(colors) > 50, "the screenshot looks blank"
