"""1 process vs 4 shards, 2 at a time: the nightly shape on a private MariaDB, as the CLI runs it.

``PYTHONPATH=. python -m bench.shards [--rows N] [--repeats R]`` starts a throw-away mariadbd (the
test suite's), serves one JPEG per row over loopback HTTP, and times, per repeat and in turns:

* ``whole``: ``pipeline run`` of the whole catalog in one process (database concurrency 4);
* ``4 shards, P=2``: ``pipeline run --shard K/4 --parallel 2`` for K = 0..3, two processes at
  a time (each with 2 of the 4 database connections), from the first start to the last exit;
* ``4 shards, P=1``: the same four one after another: the sum is what the sharded path costs
  in all, against ``whole`` (process start-up, imports, pool and ledger set-up, report.html, the
  CRC32 filter in SQL, the per-shard ledger counts).

Each run has its own run id and the MySQL table ledger; every run must end ok with every row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tomlkit

from bench._common import ROOT, child_env, log
from tests import images
from tests.fixtures import mariadb as mariadb_fixture
from tests.fixtures.catalog import mysql_catalog
from tests.fixtures.httpserver import LoopbackServer


@contextlib.contextmanager
def _server() -> Iterator[Any]:
    # The suite's session fixture, as a plain context manager: a private server on a temp datadir.
    with contextlib.contextmanager(mariadb_fixture.mariadb.__wrapped__)() as server:
        yield server


def _config(tmp: Path, dsn: str) -> Path:
    config = {
        "pipeline": {
            "name": "bench-shards",
            "queue_size": 16,
            "max_failures": 0,
            "report_dir": str(tmp / "runs"),
            "progress_interval": 60.0,
            "ledger": {"use": "stages.db:mysql_ledger", "database": "catalog", "table": "ledger"},
        },
        "databases": {"catalog": {"dsn": dsn, "concurrency": 4}},
        "source": {
            "use": "stages.db:read_rows",
            "database": "catalog",
            "query": "SELECT id, url FROM catalog",
            "key_column": "id",
            "chunk_size": 200,
            "key": "id",
        },
        "stages": [
            {"use": "stages.http:download", "name": "download", "concurrency": 8},
            {"use": "stages.image:thumbnail", "name": "thumbnail", "concurrency": 2, "sizes": [64, 32]},
            {"use": "stages.files:write", "name": "write", "root": str(tmp / "out"), "concurrency": 2},
            {"use": "stages.db:write_results", "name": "record", "database": "catalog", "concurrency": 2},
        ],
    }
    path = tmp / "config.toml"
    path.write_text(tomlkit.dumps(config))
    return path


def _start(config: Path, run_id: str, env: dict[str, str], *shard: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(config), "--run-id", run_id, "--no-progress", *shard],
        env=env,
        cwd=config.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _finish(process: subprocess.Popen[bytes]) -> None:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"a run exited {process.returncode}:\n{err.decode(errors='replace')[-3000:]}")


def _shards(config: Path, run_id: str, env: dict[str, str], parallel: int) -> float:
    """Run shards 0..3 with at most ``parallel`` at a time; seconds from first start to last exit."""
    start = time.perf_counter()
    waiting = list(range(4))
    running: list[subprocess.Popen[bytes]] = []
    while waiting or running:
        while waiting and len(running) < parallel:
            k = waiting.pop(0)
            running.append(_start(config, run_id, env, "--shard", f"{k}/4", "--parallel", str(parallel)))
        done = running.pop(0)  # the oldest: at most `parallel` run, whichever ends first
        _finish(done)
    return time.perf_counter() - start


def _wall_s(config: Path, run_id: str) -> float:
    runs = config.parent / "runs" / run_id
    paths = (
        [runs / "report.json"]
        if (runs / "report.json").exists()
        else sorted(runs.glob("shard-*/report.json"))
    )
    reports = [json.loads(p.read_text()) for p in paths]
    assert sum(r["items"]["ok"] for r in reports) == sum(r["items"]["read"] for r in reports)
    return float(sum(r["wall_s"] for r in reports))


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m bench.shards")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {"whole": [], "4 shards, P=2": [], "4 shards, P=1 (sum)": []}
    engine: dict[str, list[float]] = {k: [] for k in results}
    with _server() as server, LoopbackServer() as http, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        catalog = mysql_catalog(server, autocommit=True)
        body = images.photo_jpeg(320, 240, seed=3)
        catalog.seed([(i, http.add(f"/img/{i}.jpg", body)) for i in range(1, args.rows + 1)])
        config = _config(tmp, catalog.dsn)
        env = {**child_env(), "PIPELINE_DB_CATALOG_PASSWORD": server.password}
        env.pop("PYTHONASYNCIODEBUG", None)
        for rep in range(args.repeats):
            variants = ["whole", "4 shards, P=2", "4 shards, P=1 (sum)"]
            for name in variants[rep % 3 :] + variants[: rep % 3]:
                run_id = f"{name.split()[0]}-{name[-9:].replace(' ', '')}-{rep}"
                if name == "whole":
                    start = time.perf_counter()
                    _finish(_start(config, run_id, env))
                    wall = time.perf_counter() - start
                else:
                    wall = _shards(config, run_id, env, 2 if "P=2" in name else 1)
                results[name].append(wall)
                engine[name].append(_wall_s(config, run_id))
                log(f"repeat {rep + 1}: {name}: {wall:.2f} s ({engine[name][-1]:.2f} s inside the runs)")
    rows = args.rows
    print(f"{rows} rows, nightly shape, MariaDB ledger, {os.cpu_count()} cores, {args.repeats} repeats")
    print(f"{'variant':24} {'wall s (min / median / max)':30} {'items/s':>8} {'in-run s (sum)':>15}")
    for name, walls in results.items():
        med = statistics.median(walls)
        spread = f"{min(walls):.2f} / {med:.2f} / {max(walls):.2f}"
        print(f"{name:24} {spread:30} {rows / med:8.0f} {statistics.median(engine[name]):15.2f}")
    if args.json:
        print(json.dumps({"rows": rows, "wall_s": results, "in_run_s": engine}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
