"""Measure ``--shards 4 --dask`` on 2 workers against one local run of the same night.

Not part of ``make bench``: it needs the private MariaDB of the test suite, so it runs under
pytest with the suite's fixtures::

    python -m pytest -p no:cacheprovider -p tests.fixtures.mariadb -p tests.fixtures.httpserver \\
        -s bench/dask_shards.py

The night: the nightly shape (read_rows -> download -> thumbnail -> write -> record) over
``ROWS`` rows on MariaDB, the ledger in a MariaDB table, images from the loopback origin with
``LATENCY`` seconds each (the origin's pace, as a remote one would have). Each figure is the
wall time of the ``pipeline run`` command, start-up included; the cluster is started once.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from tests.faults.world import Config, Run, tiny_jpeg
from tests.fixtures.catalog import mysql_catalog
from tests.fixtures.dask import DaskCluster
from tests.fixtures.httpserver import LoopbackServer
from tests.fixtures.mariadb import MariaDB

ROWS = 400
LATENCY = 0.05
REPEATS = 3


def _wall(config: Config, run_id: str, extra: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    run = Run(
        "run", str(config.path), "--run-id", run_id, "--no-progress", *extra, cwd=config.tmp_path, env=env
    )
    code = run.wait(timeout=600)
    wall = time.perf_counter() - start
    assert code == 0, run.stderr
    return wall


def test_measure_dask_shards(mysql_db: MariaDB, http_server: LoopbackServer, tmp_path: Path) -> None:
    """Print the walls of 1 local shard and of 4 shards on 2 Dask workers, each REPEATS times."""
    env = {"PIPELINE_DB_CATALOG_PASSWORD": mysql_db.password}
    catalog = mysql_catalog(mysql_db, autocommit=True)
    body = tiny_jpeg()
    catalog.seed(
        [
            (i, http_server.add(f"/img/{i}.jpg", body, content_type="image/jpeg", latency=LATENCY))
            for i in range(ROWS)
        ]
    )
    config = Config(
        tmp_path,
        catalog.dsn,
        pipeline={"ledger": {"use": "stages.db:mysql_ledger", "database": "catalog", "table": "ledger"}},
        databases={"concurrency": 4},
    )
    config.write()
    started = time.perf_counter()
    with DaskCluster(2, cwd=tmp_path, env=env) as cluster:
        cluster_start = time.perf_counter() - started
        local, dask = [], []
        for i in range(REPEATS):
            local.append(_wall(config, f"local-{i}", [], env))
            dask.append(_wall(config, f"dask-{i}", ["--shards", "4", "--dask", cluster.address], env))
    for name, walls in (("1 shard, local", local), ("4 shards, 2 Dask workers", dask)):
        print(
            f"{name}: median {statistics.median(walls):.2f}s, min {min(walls):.2f}s, max {max(walls):.2f}s "
            f"({ROWS} rows, origin {LATENCY * 1000:.0f} ms/image)"
        )
    print(f"cluster start (scheduler + 2 workers): {cluster_start:.2f}s")
