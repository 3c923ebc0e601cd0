"""The catalog database misbehaving under a real run: a restart mid-run, secrets on every path.

Every test here runs against the private MariaDB server (``mysql`` mark) and the real
``python -m pipeline run`` in a subprocess.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.faults.world import (
    Config,
    Run,
    assert_exactly_once,
    dead_letters,
    report,
    run_to_end,
    serve_images,
    tiny_jpeg,
)
from tests.fixtures.catalog import mysql_catalog
from tests.fixtures.httpserver import LoopbackServer
from tests.fixtures.mariadb import MariaDB

pytestmark = pytest.mark.mysql

RUN_ID = "night-1"
SECRET = "s3cret-pw-XYZ"


def test_database_restart_mid_run_loses_and_duplicates_nothing(
    mysql_db: MariaDB, tmp_path: Path, http_server: LoopbackServer
) -> None:
    """The server stops between two chunks of the source and comes back while the run goes on: the
    source retries the chunk after the last key it yielded, the record stage retries its writes on
    fresh connections, and every row ends exactly once."""
    rows = 40
    catalog = mysql_catalog(mysql_db)
    served = serve_images(http_server, rows)
    # Row 10 is held in download (concurrency 1), so the source stops at its bounded queue with
    # rows 11-15 read: the chunk of rows 16-20 can only be fetched after the server is down.
    hold = http_server.add_slow("/img/10.jpg", tiny_jpeg())
    catalog.seed(served)
    config = Config(
        tmp_path,
        catalog.dsn,
        pipeline={"queue_size": 2},
        source={"chunk_size": 5, "reconnect_backoff": 0.05, "reconnect_attempts": 40},
        download={"concurrency": 1},
    )
    config.write()
    run = Run(
        "run", str(config.path), "--run-id", RUN_ID, "--no-progress",
        cwd=tmp_path, env={"PIPELINE_DB_CATALOG_PASSWORD": mysql_db.password},
    )  # fmt: skip
    try:
        http_server.wait_until(lambda: http_server.hits("/img/10.jpg") == 1)
        mysql_db.stop()
        hold.set()
        run.wait_for_line("read_rows will retry reading rows after id=15")
    finally:
        hold.set()
        mysql_db.start()
    code = run.wait()

    assert code == 0, run.stderr
    summary = report(config, RUN_ID)
    assert summary["items"] == {"read": rows, "ok": rows, "failed": 0, "skipped": 0, "unfinished": 0}
    assert dead_letters(config, RUN_ID) == []
    assert_exactly_once(config, catalog, RUN_ID, list(range(1, rows + 1)))


# --------------------------------------------------------------------------------------------
# Secrets


def _everything_written(config: Config, run: Run) -> str:
    """All an operator could read after the run: output streams, report, dead letters, ledger."""
    parts = [run.stdout, run.stderr]
    for path in sorted(config.report_dir.rglob("*")):
        if path.is_file():
            parts.append(path.read_bytes().decode("utf-8", "replace"))  # ledger.sqlite and its WAL too
    return "\n".join(parts)


def _secrets_config(tmp_path: Path, dsn: str, *, query: str = "SELECT id, url FROM catalog") -> Config:
    """The catalog read, then a lookup whose SQL fails on every item (so dead letters carry the
    database error, DSN included), then the results written."""
    config = Config(
        tmp_path,
        dsn,
        source={"query": query},
        stages=[
            {
                "name": "lookup",
                "use": "stages.db:lookup",
                "database": "catalog",
                "query": "SELECT no_such_column FROM catalog WHERE id = ?",
                "params": ["id"],
                "retry": {"attempts": 1},
            },
            {"name": "record", "use": "stages.db:write_results", "database": "catalog"},
        ],
    )
    config.write()
    return config


@pytest.mark.parametrize("where", ["env", "dsn"])
def test_password_appears_nowhere_after_a_run_with_database_errors(
    where: str, mysql_db: MariaDB, tmp_path: Path
) -> None:
    """With the password in PIPELINE_DB_CATALOG_PASSWORD or in the DSN, a run whose items fail on a
    database error shows it in no output, report, dead letter or ledger."""
    catalog = mysql_catalog(mysql_db)
    catalog.seed([(i, f"http://127.0.0.1:9/{i}.jpg") for i in range(1, 6)])
    env: dict[str, str] = {}
    if where == "env":
        env["PIPELINE_DB_CATALOG_PASSWORD"] = SECRET
        dsn = mysql_db.dsn()
    else:
        dsn = mysql_db.dsn(password_in_dsn=True)
    assert mysql_db.password == SECRET
    config = _secrets_config(tmp_path, dsn)

    run = run_to_end(config, RUN_ID, env=env)

    assert run.process.returncode == 0, run.stderr
    letters = dead_letters(config, RUN_ID)
    assert len(letters) == 5
    assert all("no_such_column" in letter["message"] for letter in letters), letters
    assert all("mysql://pipeline" in letter["message"] for letter in letters), "the DSN is named"
    assert SECRET not in _everything_written(config, run)


@pytest.mark.parametrize("where", ["env", "dsn"])
def test_password_appears_nowhere_when_the_connection_is_refused(
    where: str, mysql_db: MariaDB, tmp_path: Path
) -> None:
    """A password the server refuses (for a user it does not know) fails the run with exit 1 and a
    message naming the database, and the password is in no output, report or ledger."""
    env: dict[str, str] = {}
    server: Any = mysql_db
    if where == "env":
        env["PIPELINE_DB_CATALOG_PASSWORD"] = SECRET
        dsn = f"mysql://nobody@{server.host}:{server.port}/{server.database}"
    else:
        dsn = f"mysql://nobody:{SECRET}@{server.host}:{server.port}/{server.database}"
    config = _secrets_config(tmp_path, dsn)

    run = run_to_end(config, RUN_ID, env=env)

    assert run.process.returncode == 1, run.stderr
    assert "run failed: connecting on database 'catalog'" in run.stderr
    assert "Access denied for user 'nobody'" in run.stderr
    assert "unexpected error" not in run.stderr, "a refused login is the operator's to fix, not a bug"
    assert SECRET not in _everything_written(config, run)


def test_password_appears_nowhere_when_the_source_query_fails(mysql_db: MariaDB, tmp_path: Path) -> None:
    """A source query the server rejects fails the run with exit 1, naming the error; the password
    given in the DSN is in no output, report or ledger."""
    catalog = mysql_catalog(mysql_db)
    catalog.seed([(1, "http://127.0.0.1:9/1.jpg")])
    config = _secrets_config(
        tmp_path, mysql_db.dsn(password_in_dsn=True), query="SELECT id, url, missing FROM catalog"
    )

    run = run_to_end(config, RUN_ID)

    assert run.process.returncode == 1, run.stderr
    assert "Unknown column 'missing'" in run.stderr
    assert report(config, RUN_ID)["status"] == "failed"
    assert SECRET not in _everything_written(config, run)
