"""``pipeline run CONFIG --shards N --dask ADDRESS`` on a real Dask cluster (a scheduler and two
worker processes on 127.0.0.1), the private MariaDB and the loopback HTTP server.

The kill test holds one row's image at the origin, so the shard that owns it cannot finish; once
that shard has recorded some rows in the ledger, it SIGKILLs the worker running it, and checks
what an operator would: exit 0, every row exactly once (outputs, ledger, results), the rows done
before the kill not fetched again, and the database cap held at the server.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import Shard, encode_key
from tests.faults.world import (
    SIZES,
    Config,
    Run,
    abort,
    output_files,
    serve_images,
    temp_files,
    tiny_jpeg,
    wait_until,
)
from tests.fixtures.catalog import Catalog, mysql_catalog
from tests.fixtures.dask import DaskCluster, lease_settings
from tests.fixtures.httpserver import LoopbackServer
from tests.fixtures.mariadb import MariaDB, global_status

pytestmark = [pytest.mark.mysql]

RUN_ID = "dask-night"
ROWS = 48
SHARDS = 4
CAP = 4
HELD = 7
LEASES = lease_settings("2s", "0.2s")


def _ledger(conn: Any) -> dict[int, str]:
    """The ledger's states, read on ``conn`` (an autocommit connection): while the run goes on,
    on the test's one monitoring connection, so that no other counts against the cap."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT `key`, state FROM ledger WHERE run_id = %s", (RUN_ID,))
            rows = cur.fetchall()
    except Exception:  # the table is not there yet
        return {}
    return {int(json.loads(k)): str(s) for k, s in rows}


def _config(tmp_path: Path, catalog: Catalog) -> Config:
    config = Config(
        tmp_path,
        catalog.dsn,
        pipeline={"ledger": {"use": "stages.db:mysql_ledger", "database": "catalog", "table": "ledger"}},
        databases={"concurrency": CAP},
    )
    config.write()
    return config


@pytest.mark.slow
@pytest.mark.timeout(180)  # beyond the run's own deadline below, which reports the cluster's logs
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_worker_killed_mid_shard_the_run_still_ends_every_row_exactly_once(
    mysql_db: MariaDB, http_server: LoopbackServer, tmp_path: Path, sig: signal.Signals
) -> None:
    """4 shards on 2 workers, the worker running one shard SIGKILLed (or SIGTERMed: preempted)
    mid-shard: Dask reruns the shard on the other worker, the ledger resumes it; exit 0, each row
    once, the cap held. A SIGTERMed worker's shard stops itself and drains what it holds."""
    # SIGTERM: the closing worker may not reach the scheduler to give its leases back; a lease
    # timeout well above the drain keeps them counted until the drained shard has closed its pool.
    leases = LEASES if sig == signal.SIGKILL else lease_settings("20s", "0.2s")
    env = {"PIPELINE_DB_CATALOG_PASSWORD": mysql_db.password, **leases}
    catalog = mysql_catalog(mysql_db, autocommit=True)
    rows = serve_images(http_server, ROWS)
    hold = http_server.add_slow(f"/img/{HELD}.jpg", tiny_jpeg())
    catalog.seed(rows)
    config = _config(tmp_path, catalog)
    victim = next(k for k in range(SHARDS) if Shard(k, SHARDS).owns(encode_key(HELD)))
    mine = [i for i, _ in rows if Shard(victim, SHARDS).owns(encode_key(i))]

    with (
        contextlib.closing(mysql_db.admin()) as admin,
        contextlib.closing(catalog.connect()) as monitor,
        DaskCluster(2, cwd=tmp_path, env=env) as cluster,
    ):
        # The test's own connections (admin, monitor) are open before the count restarts.
        with monitor.cursor() as cur:
            cur.execute("SELECT 1")
        with admin.cursor() as cur:
            cur.execute("FLUSH STATUS")
        baseline = global_status(admin, "Threads_connected")
        observer = cluster.client()
        run = Run(
            "run", str(config.path), "--shards", str(SHARDS), "--dask", cluster.address,
            "--run-id", RUN_ID, "--no-progress", cwd=tmp_path, env=env,
        )  # fmt: skip
        try:
            wait_until(
                lambda: http_server.hits(f"/img/{HELD}.jpg") >= 1 or run.process.poll() is not None,
                f"row {HELD} is fetched",
            )
            if run.process.poll() is not None:
                raise AssertionError(f"the run ended early, exit {run.wait()}:\n{run.stdout}")
            wait_until(
                lambda: sum(1 for k, s in _ledger(monitor).items() if k in mine and s == "done") >= 3,
                f"shard {victim} recorded 3 rows",
            )
            prefix = f"pipeline-shard-{victim}-of-{SHARDS}-"
            running = {w: keys for w, keys in observer.processing().items() if any(prefix in k for k in keys)}
            assert len(running) == 1, observer.processing()
            [address] = running
            killed = cluster.worker_name(address)
            done_before = {k for k, s in _ledger(monitor).items() if s == "done"}
            if sig == signal.SIGKILL:
                cluster.kill(killed)
            else:
                cluster.workers[killed].process.send_signal(sig)
                cluster.wait_for_log(killed, f"shard {victim}/{SHARDS}: its worker is closing")
                hold.set()  # the shard drains what it holds, then the worker can exit
                cluster.workers[killed].process.wait(timeout=60)
        except (AssertionError, subprocess.TimeoutExpired) as stalled:
            # Stop the run here, so that no process outlives the test, and show where it stood.
            abort(run.process)
            run.wait()
            raise AssertionError(f"{stalled}\n--- the run\n{run.stderr}\n{cluster.dump()}") from None
        finally:
            hold.set()
        try:
            code = run.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not end:\n{run.stderr}\n{cluster.dump()}") from None
        used = global_status(admin, "Max_used_connections")

    assert code == 0, run.stderr
    assert 1 <= used - baseline <= CAP, (used, baseline)
    expected = sorted(config.root / str(i) / f"{size}.png" for i, _ in rows for size in SIZES)
    assert output_files(config.root) == expected
    assert temp_files(config.root) == []
    with contextlib.closing(catalog.connect()) as conn:
        assert _ledger(conn) == {i: "done" for i, _ in rows}
    results = catalog.results()
    assert sorted(int(k) for k, _, _ in results) == [i for i, _ in rows], "one results row per row"
    assert {status for _, status, _ in results} == {"ok"}
    if sig == signal.SIGKILL:
        assert http_server.hits(f"/img/{HELD}.jpg") == 2, "the killed shard's held row is fetched again"
    for key in done_before:
        assert http_server.hits(f"/img/{key}.jpg") == 1, f"row {key} was done, yet fetched again"
    combined = json.loads((config.report_dir / RUN_ID / "sharded-report.json").read_text())
    assert combined["status"] == "ok"
    assert [s["status"] for s in combined["shards"]] == ["ok"] * SHARDS
    rerun = combined["shards"][victim]
    assert rerun["worker"] != address
    assert rerun["report"]["already_done"] >= len(done_before & set(mine))
    assert combined["items"]["failed"] == 0
    assert sum(s["leases"]["databases.catalog"] for s in combined["shards"]) >= SHARDS
    assert all(s["leases"]["databases.catalog"] <= CAP // 2 for s in combined["shards"])


def test_leases_of_a_killed_holder_return_after_the_lease_timeout(tmp_path: Path) -> None:
    """A shard's worker takes every lease of a cap and is SIGKILLed while holding them: the leases
    are not free while it lives, and return to the next taker once the lease timeout has passed."""
    from distributed import Event, Semaphore

    from pipeline._dask import Lease, _held

    timeout = 1.5
    cap = 3
    lease = Lease("databases.catalog", "pipeline/test/expiry/databases.catalog/3", cap, cap)
    with DaskCluster(2, cwd=tmp_path, env=lease_settings(f"{timeout}s", "0.1s")) as cluster:
        client = cluster.client()
        taken = Event("taken", client=client)
        forever = Event("forever", client=client)

        def hold(lease: Lease) -> None:
            import dask

            with dask.config.set({"distributed.scheduler.locks.lease-timeout": f"{timeout}s"}):
                with _held([lease], "0/1") as held:
                    assert held == {"databases.catalog": cap}
                    Event("taken").set()
                    Event("forever").wait()

        holder = client.submit(hold, lease, pure=False, workers=["w0"])
        assert taken.wait(timeout=60)
        semaphore = Semaphore(max_leases=cap, name=lease.name)
        assert semaphore.get_value() == cap
        assert not semaphore.acquire(timeout=0), "the cap is held"
        cluster.kill("w0")
        killed = time.monotonic()
        assert semaphore.acquire(timeout=30), "the dead holder's leases never came back"
        waited = time.monotonic() - killed
        semaphore.release()
        holder.cancel()
        forever.set()
    # The holder refreshed at most a fifth of the timeout before it died.
    assert waited >= timeout * 0.8 - 0.05, waited
