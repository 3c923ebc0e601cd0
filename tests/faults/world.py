"""The world a fault test runs in: a catalog, images on the loopback server, a config, a run.

A fault test seeds a small catalog (SQLite or the private MariaDB), serves one tiny image per row
from the loopback server, writes a config for the nightly shape (read_rows -> download ->
thumbnail -> write -> record), and runs it as an operator does: ``python -m pipeline run`` in a
subprocess, which it may kill. Then it checks exactly-once where an operator would look: the
files under the output root, the ``results`` table, the ledger and the report.

Waiting on an external process has no event to wait on, so :func:`wait_until` polls the file
system (or the process's stderr, read by a thread into a queue) with short waits and a bounded
deadline. Nothing inside the pipeline sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from tests import images
from tests.fixtures.catalog import Catalog
from tests.fixtures.httpserver import LoopbackServer

REPO = Path(__file__).resolve().parents[2]
SIZES = (32, 16)
"""Thumbnail sizes: each ok row ends with one PNG per size."""
DEADLINE = 30.0
"""The longest any wait in this suite may take before the test fails."""


# --------------------------------------------------------------------------------------------
# Waiting on other processes


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``predicate`` every few milliseconds until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting until {what}")
        time.sleep(0.005)  # an external process: there is nothing to wait on but its files


# --------------------------------------------------------------------------------------------
# The images


@functools.cache
def tiny_jpeg() -> bytes:
    """The image every row serves: small, so a run of 60 rows takes well under a second."""
    return images.photo_jpeg(40, 30, seed=5)


def serve_images(server: LoopbackServer, count: int) -> list[tuple[int, str]]:
    """One tiny JPEG per row, each on its own path ``/img/<id>.jpg``; returns the ``(id, url)`` rows."""
    body = tiny_jpeg()
    return [(i, server.add(f"/img/{i}.jpg", body, content_type="image/jpeg")) for i in range(1, count + 1)]


# --------------------------------------------------------------------------------------------
# The config


@dataclass
class Config:
    """The nightly shape, pointed at a test's own world. Change fields, then :meth:`write`."""

    tmp_path: Path
    dsn: str
    pipeline: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    download: dict[str, Any] = field(default_factory=dict)
    thumbnail: dict[str, Any] = field(default_factory=dict)
    write_: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    extra_stages: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] | None = None
    """When set, these stages replace the nightly four."""
    databases: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.tmp_path / "thumbnails"

    @property
    def report_dir(self) -> Path:
        return self.tmp_path / "runs"

    @property
    def ledger(self) -> Path:
        return self.report_dir / "ledger.sqlite"

    @property
    def path(self) -> Path:
        return self.tmp_path / "config.toml"

    def write(self) -> Path:
        """Write the config as TOML to :attr:`path`; returns it."""
        nightly = [
            {
                "name": "download",
                "use": "stages.http:download",
                "concurrency": 4,
                "connect_timeout": 5.0,
                "read_timeout": 20.0,
                "retry": {"attempts": 2, "backoff": 0.01, "max_backoff": 0.02, "jitter": 0.0},
                **self.download,
            },
            *self.extra_stages,
            {
                "name": "thumbnail",
                "use": "stages.image:thumbnail",
                "concurrency": 2,
                "sizes": list(SIZES),
                "format": "PNG",
                "retry": {"attempts": 1},
                **self.thumbnail,
            },
            {
                "name": "write",
                "use": "stages.files:write",
                "root": str(self.root),
                "layout": "nested",
                "concurrency": 2,
                "retry": {"attempts": 1},
                **self.write_,
            },
            {
                "name": "record",
                "use": "stages.db:write_results",
                "database": "catalog",
                "table": "results",
                "concurrency": 2,
                "retry": {"attempts": 40, "backoff": 0.05, "max_backoff": 0.5, "jitter": 0.0},
                **self.record,
            },
        ]
        config = {
            "pipeline": {
                "name": "faults",
                "queue_size": 4,
                "grace_period": 10.0,
                "max_failures": 1000,
                "report_dir": str(self.report_dir),
                "progress_interval": 60.0,
                **self.pipeline,
            },
            "databases": {"catalog": {"dsn": self.dsn, "concurrency": 2, **self.databases}},
            "source": {
                "use": "stages.db:read_rows",
                "database": "catalog",
                "query": "SELECT id, url FROM catalog",
                "key_column": "id",
                "chunk_size": 10,
                "key": "id",
                **self.source,
            },
            "stages": nightly if self.stages is None else self.stages,
        }
        self.path.write_text(tomlkit.dumps(config), encoding="utf-8")
        return self.path


# --------------------------------------------------------------------------------------------
# A run in a subprocess


def abort(process: subprocess.Popen[str]) -> None:
    """Stop a process that hangs: SIGABRT first (with ``PYTHONFAULTHANDLER`` set, Python prints
    every thread's stack to stderr before it dies), SIGKILL if that does not end it."""
    if process.poll() is None:
        process.send_signal(signal.SIGABRT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


class Run:
    """``python -m pipeline ARGS`` in a subprocess. Threads read its stdout and stderr (so that
    :meth:`wait` can time out, and a full pipe never stalls the run); stderr line by line, for
    :meth:`wait_for_line`."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None):
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        full_env.pop("PYTHONASYNCIODEBUG", None)  # an operator's run, not a test loop
        full_env["PYTHONFAULTHANDLER"] = "1"  # a run that hangs shows where, see wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_lines: list[str] = []
        self._stdout: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read_stderr, name="run-stderr", daemon=True),
            threading.Thread(target=self._read_stdout, name="run-stdout", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        self._stdout.append(self.process.stdout.read())

    def wait_for_line(self, fragment: str, timeout: float = DEADLINE) -> str:
        """Block until a stderr line holds ``fragment``; fail if the run ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no stderr line with {fragment!r} within {timeout:g}s; so far:\n{self.stderr}"
                ) from None
            if line is None:
                raise AssertionError(f"the run ended without a stderr line with {fragment!r}:\n{self.stderr}")
            if fragment in line:
                return line

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = DEADLINE) -> int:
        """Wait for the exit and for both pipes' ends; returns the exit status. A run still going
        after ``timeout`` seconds (or a test interrupted while waiting) is stopped with SIGABRT,
        which makes it print every thread's stack to its stderr, then killed, then the error
        raised: no process outlives its test."""
        try:
            code = self.process.wait(timeout=timeout)
        except BaseException:
            abort(self.process)
            raise
        finally:
            for reader in self._readers:
                reader.join(timeout)
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()
        return code

    @property
    def stdout(self) -> str:
        """What the run printed, once it has ended (see :meth:`wait`)."""
        return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        """What the run logged so far."""
        return "".join(self.stderr_lines)


def run_to_end(config: Config, run_id: str, *extra: str, env: dict[str, str] | None = None) -> Run:
    """Run the pipeline once to its end."""
    run = Run(
        "run", str(config.path), "--run-id", run_id, "--no-progress", *extra, cwd=config.tmp_path, env=env
    )
    run.wait()
    return run


# --------------------------------------------------------------------------------------------
# What a run left behind


def output_files(root: Path) -> list[Path]:
    """Every final output file under ``root`` (temporary files excluded)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and ".tmp-" not in p.name)


def temp_files(root: Path) -> list[Path]:
    """Every temporary file of an atomic write under ``root``."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if ".tmp-" in p.name)


def ledger_items(config: Config, run_id: str) -> list[tuple[Any, str]]:
    """The ledger's ``(key, state)`` rows of ``run_id``; empty if there is no ledger yet."""
    if not config.ledger.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{config.ledger}?mode=ro", uri=True, timeout=5)) as conn:
        try:
            rows = conn.execute("SELECT key, state FROM items WHERE run_id = ?", (run_id,)).fetchall()
        except sqlite3.OperationalError:
            return []  # the schema is not there yet
    return [(json.loads(k), str(s)) for k, s in rows]


def report(config: Config, run_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((config.report_dir / run_id / "report.json").read_text())
    return data


def dead_letters(config: Config, run_id: str) -> list[dict[str, Any]]:
    path = config.report_dir / run_id / "dead_letters.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_exactly_once(config: Config, catalog: Catalog, run_id: str, ids: list[int]) -> None:
    """Every catalog row has one set of outputs, one ledger entry (done) and one results row;
    nothing else is there, and no temporary file is left."""
    expected_files = sorted(config.root / str(i) / f"{size}.png" for i in ids for size in SIZES)
    assert output_files(config.root) == expected_files
    assert temp_files(config.root) == []
    ledger = ledger_items(config, run_id)
    assert sorted(k for k, _ in ledger) == sorted(ids), "one ledger entry per row"
    assert {s for _, s in ledger} == {"done"}, ledger
    results = catalog.results()
    assert sorted(k for k, _, _ in results) == sorted(str(i) for i in ids), "one results row per row"
    for key, status, outputs in results:
        assert status == "ok"
        assert json.loads(outputs) == [f"{key}/{size}.png" for size in SIZES]
