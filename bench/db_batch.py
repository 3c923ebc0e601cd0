"""Batched database stages on MariaDB: ``write_results`` and ``lookup``, batched against per item.

Both variants of a stage run the same pipeline in this process, side by side, interleaved: a
generator source of ``rows`` image-like items, then the stage, on a private MariaDB server (its
own data directory, loopback TCP, started here and removed after), database concurrency 4 and
stage concurrency 4. One variant keeps the stage's default batching (``size = 200``: one
multi-row upsert, or one tagged ``UNION ALL`` select, per batch); the other sets ``batch =
false`` (one statement per item). ``write_results`` writes the image job's columns into a table
dropped before every run; ``lookup`` reads one row by primary key from a seeded table. Reported:
items per second (the whole run, pool opening included) and the CPU this process spends per
item: aiomysql is pure Python, so the per-statement cost is client CPU, which the nightly batch
needs for its thumbnails.

``python -m bench.db_batch [--rows N] [--reps N]``; ``make bench`` runs it as section 6.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import Series, log, median, rotate, timed_cpu

DATABASE = "bench"
USER = "bench"
PASSWORD = "bench-pw"
VARIANTS = ("batched (size 200)", "per item (batch = false)")
STAGES = ("write_results", "lookup")


@dataclass(frozen=True)
class Server:
    """A running private MariaDB server."""

    port: int
    unix_socket: str

    @property
    def dsn(self) -> str:
        """The bench user's DSN over loopback TCP, password included."""
        return f"mysql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"


def _find(program: str) -> str | None:
    return shutil.which(program, path="/usr/sbin:/usr/local/sbin:/usr/bin:/bin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def private_mariadb() -> Iterator[Server | None]:
    """A throw-away MariaDB server for the bench, or ``None`` when mariadbd is not installed."""
    mariadbd, install_db = _find("mariadbd"), _find("mariadb-install-db")
    if mariadbd is None or install_db is None:
        yield None
        return
    import pymysql

    root = Path(tempfile.mkdtemp(prefix="bench-mariadb-"))
    sock = str(root / "mysqld.sock")
    process: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [install_db, "--no-defaults", f"--datadir={root / 'data'}", "--user=root", "--skip-test-db"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        port = _free_port()
        process = subprocess.Popen(
            [
                mariadbd,
                "--no-defaults",
                f"--datadir={root / 'data'}",
                f"--socket={sock}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                "--user=root",
                f"--pid-file={root / 'mysqld.pid'}",
                f"--log-error={root / 'error.log'}",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--performance-schema=OFF",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=64M",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:  # a starting server has no event to wait on but its socket
            if process.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {process.returncode}; see {root / 'error.log'}")
            with socket.socket(socket.AF_UNIX) as probe:
                if probe.connect_ex(sock) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("mariadbd did not start within 60 s")
            time.sleep(0.05)
        with pymysql.connect(unix_socket=sock, user="root", autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4")
            cur.execute(f"CREATE USER '{USER}'@'127.0.0.1' IDENTIFIED BY %s", (PASSWORD,))
            cur.execute(f"GRANT ALL PRIVILEGES ON `{DATABASE}`.* TO '{USER}'@'127.0.0.1'")
        yield Server(port=port, unix_socket=sock)
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def rows(n: int) -> Iterator[dict[str, Any]]:
    """The source: ``n`` items as the image job hands them to ``record``."""
    for i in range(n):
        yield {
            "id": f"asset-{i:07d}",
            "outputs": [f"ab/cd/asset-{i:07d}-1024.jpg", f"ab/cd/asset-{i:07d}-256.jpg"],
            "width": 1600,
            "height": 1200,
            "bytes": 180_000 + i,
            "sha256": f"{i:064x}",
        }


def _admin(server: Server, *statements: str, rows: list[tuple[Any, ...]] | None = None) -> None:
    import pymysql

    with pymysql.connect(unix_socket=server.unix_socket, user="root", autocommit=True) as conn:
        with conn.cursor() as cur:
            for sql in statements:
                if rows is not None and "%s" in sql:
                    cur.executemany(sql, rows)
                else:
                    cur.execute(sql)


def _seed_assets(server: Server, n: int) -> None:
    _admin(
        server,
        f"CREATE TABLE `{DATABASE}`.`assets` (id VARCHAR(32) PRIMARY KEY, owner VARCHAR(64), licence INT)",
        f"INSERT INTO `{DATABASE}`.`assets` VALUES (%s, %s, %s)",
        rows=[(f"asset-{i:07d}", f"owner {i % 97}", i % 5) for i in range(n)],
    )


def _engine(server: Server, stage: str, n: int, batched: bool) -> Any:
    from pipeline import Database, Pipeline, Source, Stage
    from stages.db import lookup, write_results

    options: dict[str, Any] = {"database": "catalog"}
    if stage == "lookup":
        options.update(query="SELECT owner, licence FROM assets WHERE id = ?", params=["id"])
    return Pipeline(
        Source(rows, options={"n": n}),
        [
            Stage(
                lookup if stage == "lookup" else write_results,
                name=stage,
                concurrency=4,
                options=options,
                batch=None if batched else False,
            )
        ],
        databases={"catalog": Database(server.dsn, concurrency=4)},
        report_dir=None,
        ledger=False,
    )


def measure(server: Server, stage: str, *, rows_: int, reps: int) -> dict[str, Series]:
    """Run both variants of ``stage`` ``reps`` times, interleaved; return their series."""
    series = {name: Series(name) for name in VARIANTS}
    for rep in range(reps):
        for name in rotate(VARIANTS, rep):
            pipe = _engine(server, stage, rows_, batched=name == VARIANTS[0])
            if stage == "write_results":
                _admin(server, f"DROP TABLE IF EXISTS `{DATABASE}`.`results`")

            def run(pipe: Any = pipe) -> int:
                report = pipe.run(progress=False, handle_signals=False)
                if report.items.ok != rows_:
                    raise RuntimeError(f"{stage}: {report.items.ok} of {rows_} items ok: {report.error}")
                return rows_

            rate, cpu_s, count = timed_cpu(run)
            series[name].rates.append(rate)
            series[name].cpu_ms.append(cpu_s * 1000 / count)
            log(f"  {stage}, {name}: {rate:,.0f} items/s, {cpu_s * 1000 / count:.3f} CPU ms/item")
    return series


def run(*, rows_: int, reps: int) -> dict[str, Any]:
    """Start the server, measure both stages, stop it; return the figures for results.json."""
    with private_mariadb() as server:
        if server is None:
            log("db batch: mariadbd is not installed: skipped")
            return {"note": "mariadbd is not installed: skipped"}
        log(f"db batch: write_results and lookup on MariaDB, {rows_} items, {reps} runs per variant")
        _seed_assets(server, rows_)
        out: dict[str, Any] = {"rows": rows_, "reps": reps}
        for stage in STAGES:
            series = measure(server, stage, rows_=rows_, reps=reps)
            batched, single = (series[name] for name in VARIANTS)
            out[stage] = {
                "variants": {name: s.as_json() for name, s in series.items()},
                "ratio": round(batched.ratio_to(single), 2),
                "cpu_ratio": round(median(single.cpu_ms) / median(batched.cpu_ms), 2),
            }
        return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure and print the figures as JSON."""
    parser = argparse.ArgumentParser(prog="bench.db_batch", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="items per run (default 5000)")
    parser.add_argument("--reps", type=int, default=3, help="runs per variant (default 3)")
    args = parser.parse_args(argv)
    out = run(rows_=args.rows, reps=args.reps)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
