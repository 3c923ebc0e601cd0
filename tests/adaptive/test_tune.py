"""``pipeline tune``: the sweep on a loopback server with a known knee, the plot, and ``--write``."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import load_config
from pipeline._tune import main, tune, write_recommendation

from . import tune_helpers
from .servers import KneeServer

CONFIG = """\
# Tune test pipeline.
[pipeline]
name = "tune-test"  # the name
report_dir = "{runs}"

[source]
use = "tests.adaptive.tune_helpers:requests_to"
url = "{url}"
n = 1000

[[stages]]
# Fetch, with a knee at 4 in flight.
name = "fetch"
use = "tests.adaptive.servers:fetch"
concurrency = 2  # a guess
retry = {{ attempts = 1 }}

[[stages]]
# A side effect that tune must not repeat.
name = "record"
use = "tests.adaptive.tune_helpers:record"
concurrency = 1
"""


@pytest.fixture
def knee_server() -> Iterator[KneeServer]:
    with KneeServer(base=0.02, knee=4, degrade=1.0) as server:
        yield server


@pytest.fixture
def config(tmp_path: Path, knee_server: KneeServer) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(url=knee_server.url(), runs=tmp_path / "runs"))
    return path


async def test_tune_recommends_the_knee(config: Path) -> None:
    """On a server whose throughput peaks at 4 in flight, the recommendation is 4 +- 1 after a
    coarse sweep (1, 2, 4, ...) and a fine one around the best."""
    result = await tune(load_config(config), stage="fetch", limit=60, max_concurrency=16)
    caps = [s.concurrency for s in result.steps]
    assert {1, 2, 4, 8} <= set(caps)
    assert any(c not in (1, 2, 4, 8, 16) for c in caps)  # a fine step
    assert 3 <= result.recommended <= 5
    assert result.peak_throughput > 0


async def test_tune_records_each_step(config: Path) -> None:
    """Each step has throughput, latency percentiles, error rates, loop lag, RSS and a Little's-law
    estimate that agrees with the in-flight count measured from the limiter."""
    result = await tune(load_config(config), stage="fetch", limit=60, max_concurrency=4)
    step = result.steps[-1]
    assert step.concurrency == 4
    assert step.items == 60
    assert step.throughput > 0
    assert step.p50_s is not None
    assert step.p99_s is not None
    assert step.p50_s <= step.p99_s
    assert step.error_rate == step.overloaded_rate == 0.0
    assert step.rss_mb > 0
    assert step.loop_lag_ms >= 0
    assert step.in_flight > 0
    assert step.littles > 0


async def test_tune_does_not_run_downstream_stages(config: Path) -> None:
    """The pipeline is cut after the tuned stage: the stage after it never sees an item."""
    tune_helpers.CALLED.clear()
    await tune(load_config(config), stage="fetch", limit=20, max_concurrency=2)
    assert tune_helpers.CALLED == []


def test_write_recommendation_keeps_comments(config: Path) -> None:
    """Writing a cap changes that one value; every comment, including the one after the old
    value, and the rest of the layout stay as they were."""
    before = config.read_text()
    write_recommendation(config, {0: 12})
    after = config.read_text()
    assert "concurrency = 12  # a guess" in after
    assert after == before.replace("concurrency = 2  # a guess", "concurrency = 12  # a guess")
    assert tomllib.loads(after)["stages"][0]["concurrency"] == 12


def test_write_recommendation_replaces_auto(tmp_path: Path) -> None:
    """An ``concurrency = "auto"`` (or an auto table) is replaced by the fixed cap."""
    path = tmp_path / "c.toml"
    path.write_text('[[stages]]\nuse = "m:f"\n# keep me\nconcurrency = "auto"\n')
    write_recommendation(path, {0: 5})
    assert path.read_text() == '[[stages]]\nuse = "m:f"\n# keep me\nconcurrency = 5\n'


def test_main_writes_the_plot_and_the_config(config: Path, tmp_path: Path) -> None:
    """``tune CONFIG --stage fetch --write --plot PATH`` exits 0, writes a PNG and the chosen cap."""
    plot = tmp_path / "tune.png"
    code = main(
        [str(config), "--stage", "fetch", "--limit", "30", "--max", "2", "--write", "--plot", str(plot)]
    )
    assert code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = tomllib.loads(config.read_text())["stages"][0]["concurrency"]
    assert written in (1, 2)
    assert "# A side effect that tune must not repeat." in config.read_text()


def test_main_refuses_an_unknown_stage(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown --stage is a config error (exit 2) naming the stages."""
    assert main([str(config), "--stage", "nope"]) == 2
    assert "['fetch', 'record']" in capsys.readouterr().err
