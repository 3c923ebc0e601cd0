"""The nightly image batch: download from a slow origin, make thumbnails, write them.

The workload: ``count`` photo-like 1600x1200 JPEGs (``tests.images.photo_jpeg``, a few distinct
ones cycled) served by a loopback origin (``bench.origin``, another process) that answers
each request after 50 ms; thumbnails at 1024 and 256 px; files written under a temporary
directory. Every variant does the same per-item work with the same functions
(``stages.image.thumbnail`` then ``stages.files.write``), so what differs is how the work is
scheduled:

* ``pipeline``: ``stages.http:download`` (cap 16) -> ``stages.image:thumbnail`` (cap = cores)
  -> ``stages.files:write`` (cap = cores), from a memory source;
* ``hand-written asyncio``: bounded queues, 16 download tasks and ``cores`` transform tasks,
  each calling ``asyncio.to_thread``; the default executor sized to hold them all (the stdlib's
  ``min(32, cpus + 4)`` would starve the downloads, which is not a fair baseline);
* ``pypeln``: ``pl.thread.map`` with 16 download workers, then ``cores`` transform workers;
* ``sequential``: one ``requests`` session and a plain loop, on fewer items;
* ``transform alone``: the machine's limit: no download (bodies already in memory),
  thumbnail + write on every core, with threads and with processes; the faster one counts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench._common import Series, child_env, cores, log, rotate, timed_cpu

SIZES = (1024, 256)
DOWNLOADS = 16
LATENCY = 0.05
DISTINCT = 6
QUEUE = 64

Item = dict[str, Any]


def transform(item: Item, root: str, fmt: str) -> Item:
    """The per-item CPU work, identical in every variant: thumbnails, then the files."""
    from stages.files import write_item
    from stages.image import thumbnail

    return write_item(thumbnail(item, sizes=SIZES, format=fmt), root=root)  # type: ignore[arg-type]


def _fetch_with(session_of: Callable[[], Any]) -> Callable[[Item], Item]:
    def fetch(item: Item) -> Item:
        response = session_of().get(item["url"], timeout=30)
        response.raise_for_status()
        return {**item, "body": response.content, "content_type": response.headers.get("Content-Type", "")}

    return fetch


class _Sessions:
    """One ``requests.Session`` per thread, all closed at the end (what a careful script does)."""

    def __init__(self) -> None:
        import requests

        self._requests = requests
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self._requests.Session()
            session.trust_env = False
            with self._lock:
                self._all.append(session)
        return session

    def close(self) -> None:
        for session in self._all:
            session.close()


# -- variants -----------------------------------------------------------------------------------


def run_pipeline(items: list[Item], root: str, fmt: str) -> int:
    """The engine with the built-in stages."""
    return pipeline_run(items, root, fmt)()


def pipeline_run(items: list[Item], root: str, fmt: str, thumbnail_cap: int = 0) -> Callable[[], int]:
    """Define the pipeline (not timed: pydantic checks the options once); return what runs it.

    ``thumbnail_cap`` defaults to the number of cores.
    """
    from pipeline import Pipeline, Source, Stage
    from stages.files import write
    from stages.http import download
    from stages.image import thumbnail

    def source() -> list[Item]:
        return items

    n = cores()
    pipe = Pipeline(
        Source(source),
        [
            Stage(download, concurrency=DOWNLOADS, options={"trust_env": False}),
            Stage(thumbnail, concurrency=thumbnail_cap or n, options={"sizes": list(SIZES), "format": fmt}),
            Stage(write, concurrency=n, options={"root": root}),
        ],
        name="nightly",
        queue_size=QUEUE,
        report_dir=None,
    )

    def run() -> int:
        report = pipe.run(progress=False, handle_signals=False)
        if report.items.ok != len(items):
            raise RuntimeError(f"the pipeline finished {report.items.ok} of {len(items)}: {report.error}")
        global last_report
        last_report = report
        return len(items)

    return run


last_report: Any = None
"""The report of the last pipeline run, for a look at its stages' busy ratios."""


def run_hand(items: list[Item], root: str, fmt: str) -> int:
    """Hand-written asyncio: bounded queues, ``to_thread`` for the download and the transform."""
    n = cores()
    sessions = _Sessions()
    fetch = _fetch_with(sessions.get)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(DOWNLOADS + n))
        downloaded: asyncio.Queue[Item | None] = asyncio.Queue(QUEUE)
        todo: asyncio.Queue[Item | None] = asyncio.Queue(QUEUE)
        done = 0

        async def feed() -> None:
            for item in items:
                await todo.put(item)
            for _ in range(DOWNLOADS):
                await todo.put(None)

        async def downloader() -> None:
            while (item := await todo.get()) is not None:
                await downloaded.put(await asyncio.to_thread(fetch, item))

        async def transformer() -> None:
            nonlocal done
            while (item := await downloaded.get()) is not None:
                await asyncio.to_thread(transform, item, root, fmt)
                done += 1

        async def downloads() -> None:
            async with asyncio.TaskGroup() as tg:
                for _ in range(DOWNLOADS):
                    tg.create_task(downloader())
            for _ in range(n):
                await downloaded.put(None)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(feed())
            tg.create_task(downloads())
            for _ in range(n):
                tg.create_task(transformer())
        return done

    try:
        return asyncio.run(main())
    finally:
        sessions.close()


def run_pypeln(items: list[Item], root: str, fmt: str) -> int:
    """pypeln thread stages: 16 download workers, then ``cores`` transform workers."""
    import pypeln as pl  # type: ignore[import-untyped]

    sessions = _Sessions()
    fetch = _fetch_with(sessions.get)
    try:
        stage: Any = pl.thread.map(fetch, items, workers=DOWNLOADS, maxsize=QUEUE)
        stage = pl.thread.map(lambda item: transform(item, root, fmt), stage, workers=cores(), maxsize=QUEUE)
        return sum(1 for _ in stage)
    finally:
        sessions.close()


def run_sequential(items: list[Item], root: str, fmt: str) -> int:
    """One session, one item after the other."""
    sessions = _Sessions()
    fetch = _fetch_with(sessions.get)
    try:
        for item in items:
            transform(fetch(item), root, fmt)
        return len(items)
    finally:
        sessions.close()


def _transform_job(job: tuple[Item, str, str]) -> int:
    transform(*job)
    return 1


def run_transform_alone(
    pool: concurrent.futures.Executor, items: list[Item], bodies: list[bytes], root: str, fmt: str
) -> int:
    """The machine's limit: thumbnail + write of bodies already in memory, on every core."""
    jobs = [({**item, "body": bodies[i % len(bodies)]}, root, fmt) for i, item in enumerate(items)]
    return sum(pool.map(_transform_job, jobs))


# -- the measurement -----------------------------------------------------------------------------


class Origin:
    """The running origin: its base URL, and its CPU time so far."""

    def __init__(self, url: str, pid: int) -> None:
        self.url = url
        self.pid = pid
        self._tick = os.sysconf("SC_CLK_TCK")

    def cpu_s(self) -> float:
        """User + system CPU seconds the origin process has used (``/proc/<pid>/stat``)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / self._tick


@contextlib.contextmanager
def origin(directory: Path, count: int) -> Iterator[Origin]:
    """Start ``bench.origin`` in a subprocess; yield it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.origin", str(directory), str(count), str(LATENCY)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_env(),
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = proc.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the origin did not start (it printed {port!r})")
        yield Origin(f"http://127.0.0.1:{port}", proc.pid)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _peer(module: str) -> str:
    try:
        __import__(module)
    except ModuleNotFoundError:
        return f"{module} is not installed: `make bench` installs it (pip install 'pipeline[bench]')"
    except Exception as exc:
        return f"{module} does not import: {type(exc).__name__}: {exc}"
    return ""


def run_once(count: int, fmt: str = "JPEG", variant: str = "pipeline") -> float:
    """Set up the origin and run one variant once over ``count`` items (for a profiler)."""
    from tests.images import photo_jpeg

    runs = {"pipeline": run_pipeline, "hand-written": run_hand, "pypeln": run_pypeln}
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        srcdir = Path(tmp) / "src"
        srcdir.mkdir()
        for i in range(DISTINCT):
            (srcdir / f"{i}.jpg").write_bytes(photo_jpeg(1600, 1200, seed=i))
        with origin(srcdir, count) as server:
            items = [{"id": f"{i:05d}", "url": f"{server.url}/photos/{i:05d}.jpg"} for i in range(count)]
            return timed_cpu(lambda: runs[variant](items, str(Path(tmp) / "out"), fmt))[0]


def measure(*, reps: int, count: int, sequential: int, fmt: str) -> dict[str, Any]:
    """Measure every variant ``reps`` times, interleaved; return the series and the settings."""
    from tests.images import photo_jpeg

    n = cores()
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        tmpdir = Path(tmp)
        srcdir = tmpdir / "src"
        srcdir.mkdir()
        bodies = [photo_jpeg(1600, 1200, seed=i) for i in range(DISTINCT)]
        for i, body in enumerate(bodies):
            (srcdir / f"{i}.jpg").write_bytes(body)
        with (
            origin(srcdir, count) as server,
            concurrent.futures.ThreadPoolExecutor(n) as threads,
            concurrent.futures.ProcessPoolExecutor(n) as processes,
        ):
            items = [{"id": f"{i:05d}", "url": f"{server.url}/photos/{i:05d}.jpg"} for i in range(count)]
            runs = 0

            def out() -> str:
                nonlocal runs
                runs += 1
                path = tmpdir / f"out{runs}"
                shutil.rmtree(tmpdir / f"out{runs - 1}", ignore_errors=True)  # keep the disk small
                return str(path)

            # The limit is a steady rate of a saturated pool: fewer items measure it as well.
            alone = items[: max(4 * n, count // 2)]
            # Each variant is a factory of its run: what it builds up front is not timed.
            variants: dict[str, tuple[Callable[[], Callable[[], int]], str]] = {
                "pipeline": (lambda: pipeline_run(items, out(), fmt), ""),
                # Pillow holds the GIL for part of each call (JPEG into BytesIO): one thread more
                # than cores overlaps that part. The kind of cap `pipeline tune` measures.
                "pipeline, thumbnail cap cores+1": (
                    lambda: pipeline_run(items, out(), fmt, thumbnail_cap=n + 1),
                    "",
                ),
                "hand-written asyncio": (lambda: lambda: run_hand(items, out(), fmt), ""),
                "pypeln threads": (lambda: lambda: run_pypeln(items, out(), fmt), _peer("pypeln")),
                "transform alone, threads": (
                    lambda: lambda: run_transform_alone(threads, alone, bodies, out(), fmt),
                    "",
                ),
                "transform alone, processes": (
                    lambda: lambda: run_transform_alone(processes, alone, bodies, out(), fmt),
                    "",
                ),
            }
            series = {name: Series(name, note=note) for name, (_, note) in variants.items()}
            runnable = [name for name in variants if not series[name].note]
            # Warm up: codecs, thread and process pools, connections' first use.
            warm = items[: 2 * n]
            run_pipeline(warm, out(), fmt)
            run_transform_alone(threads, warm, bodies, out(), fmt)
            run_transform_alone(processes, warm, bodies, out(), fmt)
            seq = Series("sequential requests + Pillow")

            def record(s: Series, run: Callable[[], int]) -> None:
                origin_cpu = server.cpu_s()
                rate, cpu, done = timed_cpu(run)
                s.rates.append(rate)
                s.origin_cpu_ms.append(1000 * (server.cpu_s() - origin_cpu) / done)
                if "processes" not in s.name:  # the pool's CPU is in its children, not counted here
                    s.cpu_ms.append(1000 * cpu / done)

            for rep in range(reps):
                for name in rotate(runnable, rep):
                    record(series[name], variants[name][0]())
                if rep == 0:  # slow, and its ratio is far from 1: once is enough
                    record(seq, lambda: run_sequential(items[:sequential], out(), fmt))
                log(
                    f"  images rep {rep + 1}/{reps}: "
                    + ", ".join(f"{s.name} {s.rates[-1]:.1f}/s" for s in series.values() if s.rates)
                )
                if last_report is not None:
                    log(
                        "    pipeline stages: "
                        + ", ".join(
                            f"{st.name} busy {st.busy_ratio:.0%} blocked {st.blocked_s:.1f}s"
                            for st in last_report.stages
                        )
                    )
            series[seq.name] = seq
    # The limit is the faster of the two pools, per repeat (both ran side by side in it).
    limit = Series("transform alone (best of threads, processes)")
    a, b = series["transform alone, threads"].rates, series["transform alone, processes"].rates
    limit.rates = [max(x, y) for x, y in zip(a, b, strict=True)]
    series[limit.name] = limit
    return {
        "series": series,
        "pipeline_stages": [
            {
                "name": st.name,
                "concurrency": st.concurrency,
                "busy_ratio": st.busy_ratio,
                "blocked_s": st.blocked_s,
                "latency_s": st.latency_s,
            }
            for st in (last_report.stages if last_report is not None else [])
        ],
        "settings": {
            "items": count,
            "transform_alone_items": max(4 * n, count // 2),
            "sequential_items": sequential,
            "format": fmt,
            "sizes": list(SIZES),
            "latency_s": LATENCY,
            "download_cap": DOWNLOADS,
            "thumbnail_cap": n,
            "write_cap": n,
            "distinct_sources": DISTINCT,
            "source_bytes": [len(b) for b in bodies],
        },
    }
