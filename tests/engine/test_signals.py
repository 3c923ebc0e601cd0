"""SIGTERM and SIGINT on a real ``python -m pipeline run``: drain, report, exit 143 / 130.

The stage and the test talk through FIFOs, never through timing: the stage writes ``ready``
into one when its first two items are both in flight, and (in the thread variant) blocks
reading ``go`` until the test writes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import pytest

from tests.engine.cli import cli_env

IN_FLIGHT = 2

STAGES = '''
import asyncio
import os
import pathlib
import threading

HERE = pathlib.Path(__file__).parent
IN_FLIGHT = {n}
_lock = threading.Lock()
_entered = 0


def rows(count: int = 1000):
    for i in range(count):
        yield {"id": i}


def _enter() -> None:
    global _entered
    with _lock:
        _entered += 1
        ready = _entered == IN_FLIGHT
    if ready:
        (HERE / "ready").write_text("ready")  # a FIFO: blocks until the test reads it


def wait_for_go(item):
    """Thread stage: the first items block until the test writes the `go` FIFO."""
    if item["id"] >= IN_FLIGHT:
        return item
    _enter()
    fd = os.open(HERE / "go", os.O_RDONLY)  # blocks until the test opens the writing end
    try:
        os.read(fd, 3)  # one "go\\n" per item; the test keeps its end open, so no reader misses it
    finally:
        os.close(fd)
    return item


async def wait_forever(item):
    """Async stage: the first items never finish on their own."""
    if item["id"] >= IN_FLIGHT:
        return item
    _enter()
    await asyncio.Event().wait()
    return item
'''

CONFIG = """
[pipeline]
name = "sig"
report_dir = "runs"
grace_period = {grace}
queue_size = 1

[source]
use = "sigstages:rows"

[[stages]]
use = "sigstages:{stage}"
concurrency = {n}
"""


def start(tmp_path: Path, stage: str, grace: float) -> subprocess.Popen[str]:
    (tmp_path / "sigstages.py").write_text(STAGES.replace("{n}", str(IN_FLIGHT)))
    os.mkfifo(tmp_path / "ready")
    os.mkfifo(tmp_path / "go")
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG.format(grace=grace, stage=stage, n=IN_FLIGHT))
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(cfg), "--report", "r.json", "--no-progress"],
        cwd=tmp_path,
        env=cli_env(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def fail_with(proc: subprocess.Popen[str], why: str) -> None:
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"{why}; stderr:\n{err}")


def wait_ready(proc: subprocess.Popen[str], fifo: Path) -> None:
    """Block until the stage reports its items in flight (or the process dies)."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    reader.join(timeout=30)
    if not got:
        # Unblock our reader with an empty writer, then report what the process said.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
        fail_with(proc, "the stage never had its items in flight")
    assert got == ["ready"]


def wait_log(stream: IO[str], needle: str) -> list[str]:
    """Read stderr lines until one contains ``needle``; return the lines read."""
    lines = []
    for line in stream:
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never logged; stderr:\n{''.join(lines)}")


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        fail_with(proc, "the process did not exit after the signal")
    return proc.returncode, err


def read_report(tmp_path: Path) -> Any:
    return json.loads((tmp_path / "r.json").read_text())


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_past_grace_cancels_and_reports_unfinished(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    """Items still running when the grace period ends are cancelled, listed unfinished; exit 128+signal."""
    proc = start(tmp_path, "wait_forever", grace=0.5)
    wait_ready(proc, tmp_path / "ready")
    proc.send_signal(signum)
    returncode, err = finish(proc)
    assert returncode == code, err
    report = read_report(tmp_path)
    assert report["status"] == "interrupted"
    assert report["exit_code"] == code
    items = report["items"]
    assert set(range(IN_FLIGHT)) <= set(report["unfinished_keys"])
    assert items["unfinished"] == len(report["unfinished_keys"])
    assert items["read"] == items["ok"] + items["failed"] + items["skipped"] + items["unfinished"]
    assert items["read"] < 1000
    assert signum.name in err
    assert (tmp_path / "runs" / report["run_id"] / "report.json").exists()


def test_in_flight_items_finishing_within_grace_count_as_ok(tmp_path: Path) -> None:
    """After SIGTERM, in-flight items that finish within the grace period end ok; nothing unfinished."""
    proc = start(tmp_path, "wait_for_go", grace=60)
    assert proc.stderr is not None
    wait_ready(proc, tmp_path / "ready")
    proc.send_signal(signal.SIGTERM)
    wait_log(proc.stderr, "received SIGTERM")
    go = os.open(tmp_path / "go", os.O_WRONLY)
    try:
        os.write(go, b"go\n" * IN_FLIGHT)
        returncode, err = finish(proc)
    finally:
        os.close(go)
    assert returncode == 143, err
    report = read_report(tmp_path)
    assert report["status"] == "interrupted"
    items = report["items"]
    assert items["unfinished"] == 0
    assert report["unfinished_keys"] == []
    assert items["ok"] == items["read"] >= IN_FLIGHT
    assert items["read"] < 1000


def test_thread_stuck_past_grace_still_exits_143(tmp_path: Path) -> None:
    """A thread stage stuck past the grace period does not keep the process alive: report, exit 143."""
    proc = start(tmp_path, "wait_for_go", grace=0.2)  # `go` is never written
    wait_ready(proc, tmp_path / "ready")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the process was still running 5 s after SIGTERM with grace_period = 0.2")
    assert proc.returncode == 143
    report = read_report(tmp_path)
    assert report["status"] == "interrupted"
    assert set(range(IN_FLIGHT)) <= set(report["unfinished_keys"])
    assert report["abandoned_threads"] == IN_FLIGHT
