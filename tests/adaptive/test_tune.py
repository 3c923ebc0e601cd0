"""``pipeline tune``: the sweep on a loopback server with a known knee, the plot, and ``--write``."""

from __future__ import annotations

import shutil
import socket
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline import TransientError, _tune, load_config
from pipeline._tune import FAIL_FAST_ATTEMPTS, TuneFailed, diagnose, main, tune, write_recommendation
from stages import demo

from . import tune_helpers
from .servers import KneeServer

REPO = Path(__file__).resolve().parents[2]

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


# --------------------------------------------------------------------------------------------
# Failing fast: a tuning step where most attempts fail stops and says why.

REFUSED = """\
[pipeline]
name = "tune-refused"
report_dir = "{runs}"

[source]
use = "tests.adaptive.tune_helpers:requests_to"
url = "http://127.0.0.1:{port}/a.jpg"
n = 200

[[stages]]
name = "download"
use = "{use}"
concurrency = 1
retry = {{ attempts = 4, backoff = 0.0, jitter = 0.0 }}
"""


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: every connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def refused_config(tmp_path: Path, closed_port: int) -> Callable[[str], Path]:
    def write(use: str) -> Path:
        path = tmp_path / "refused.toml"
        path.write_text(REFUSED.format(runs=tmp_path / "runs", port=closed_port, use=use))
        return path

    return write


async def test_tune_stops_when_every_attempt_is_refused(
    refused_config: Callable[[str], Path], closed_port: int
) -> None:
    """Against an origin that refuses connections, the first step stops after a handful of
    attempts (not 200 items x 4 attempts) and names the cause and the first errors."""
    pipeline = load_config(refused_config("stages.http:download"))
    with pytest.raises(TuneFailed) as caught:
        await tune(pipeline, stage="download", limit=200, max_concurrency=8)
    failed = caught.value
    assert (failed.stage, failed.concurrency) == ("download", 1)
    assert FAIL_FAST_ATTEMPTS <= failed.attempts < 100
    assert failed.failed == failed.attempts
    assert f"connection refused to 127.0.0.1:{closed_port}: is the origin up?" in str(failed)
    assert failed.errors
    assert all(e.startswith("TransientError: GET http://127.0.0.1:") for e in failed.errors)
    assert failed.errors[0] in str(failed)


async def test_tune_stops_in_the_run_that_finds_the_bottleneck(
    refused_config: Callable[[str], Path], closed_port: int
) -> None:
    """Without --stage, the run at the configured caps that picks the stage stops early too."""
    pipeline = load_config(refused_config("tests.adaptive.servers:fetch"))
    with pytest.raises(TuneFailed) as caught:
        await tune(pipeline, limit=200)
    assert caught.value.concurrency is None
    assert caught.value.attempts < 100
    assert f"connection refused to 127.0.0.1:{closed_port}: is the origin up?" in str(caught.value)


def test_main_exits_1_naming_the_refused_origin(
    refused_config: Callable[[str], Path], closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pipeline tune`` on a refusing origin exits 1 with the cause and prints no recommendation."""
    assert main([str(refused_config("stages.http:download")), "--stage", "download"]) == 1
    out, err = capsys.readouterr()
    assert "recommended" not in out
    assert "tune stopped: " in err
    assert f"Likely cause: connection refused to 127.0.0.1:{closed_port}: is the origin up?" in err
    assert "First errors:" in err


def test_diagnose_reads_the_os_error_under_the_stage_error() -> None:
    """The cause comes from the OS error at the bottom of the chain, the address from the URL."""
    error = TransientError("GET http://origin.test:8080/1.jpg lost the connection")
    error.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert diagnose(error) == "connection refused to origin.test:8080: is the origin up?"
    assert diagnose(ValueError("odd item 3")) is None


def test_main_without_matplotlib_names_the_extra(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tune --plot`` without matplotlib is a usage error (exit 2) naming the extra to install."""
    monkeypatch.setattr(_tune, "can_plot", lambda: False)
    assert main([str(config), "--stage", "fetch", "--plot", str(tmp_path / "t.png")]) == 2
    assert "tune --plot needs matplotlib: pip install 'pipeline[plot]'" in capsys.readouterr().err


def test_demo_tune_serves_the_demo_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m stages.demo tune`` seeds the catalog, serves the images while it tunes, and
    recommends a cap (exit 0) on the shipped config."""
    shutil.copy(REPO / "config.toml", tmp_path / "config.toml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    code = demo.main(["tune", "config.toml", "--stage", "download", "--max", "2", "--limit", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "images served from http://127.0.0.1:" in err
    assert "recommended concurrency for 'download':" in out
    assert not (tmp_path / "var" / "thumbnails").exists()  # cut after download: nothing written
