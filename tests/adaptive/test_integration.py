"""``concurrency = Auto()`` in a real pipeline against loopback servers with a known optimum.

Assertions stay well inside the benchmark's pass figures (``bench/adaptive.py``), since a test
machine may be busy: these check direction and order of magnitude, the bench the numbers.
"""

from __future__ import annotations

from pipeline import Auto, Pipeline, Retry, RunReport, Source, Stage

from .servers import KneeServer, fetch

RETRY = Retry(attempts=50, backoff=0.02, max_backoff=0.2, jitter=0.02)


async def run(server: KneeServer, n: int, concurrency: int | Auto, rate: str | None = None) -> RunReport:
    url = server.url()

    def source() -> list[dict[str, object]]:
        return [{"id": i, "url": url} for i in range(n)]

    stage = Stage(fetch, name="fetch", concurrency=concurrency, retry=RETRY, timeout=10.0, rate=rate)
    pipeline = Pipeline(Source(source), [stage], name="adaptive-test", report_dir=None)
    return await pipeline.run_async(progress=False)


async def test_auto_approaches_the_best_fixed_cap_on_a_knee() -> None:
    """On a server whose knee is 8 in flight, auto gets at least 60% of the throughput of a fixed
    cap of 8 (the optimum), and its limit rises above the initial 4. (make bench shows the real
    figure, >= 90%; this run is short, so its ramp-up weighs more, and CI machines are noisy.)"""
    with KneeServer(base=0.02, knee=8, degrade=0.3) as server:
        fixed = await run(server, 300, 8)
    with KneeServer(base=0.02, knee=8, degrade=0.3) as server:
        auto = await run(server, 300, Auto(max=64))
    assert auto.items.ok == fixed.items.ok == 300
    assert 300 / auto.wall_s >= 0.6 * 300 / fixed.wall_s
    assert max(limit for _, limit in auto.stages[0].limit_trace) > 4


async def test_auto_backs_off_a_rate_wall() -> None:
    """Against a 429 wall at 200/s (20 ms answers: 4 in flight), auto starting at 16 cuts its
    limit after the 429s, and gets under half the 429s a fixed cap of 16 gets; every item ends ok."""
    with KneeServer(base=0.02, knee=1000, wall=200) as server:
        await run(server, 400, 16)
        fixed_share = server.rejected / (server.rejected + server.ok)
    with KneeServer(base=0.02, knee=1000, wall=200) as server:
        report = await run(server, 400, Auto(initial=16, max=64))
        share = server.rejected / (server.rejected + server.ok)
    trace = report.stages[0].limit_trace
    assert report.items.ok == 400
    assert share < fixed_share / 2
    assert trace[-1][1] < 16


async def test_rate_keeps_a_fixed_cap_off_the_wall() -> None:
    """With ``rate`` under the wall (and a burst under its bucket), no request gets a 429."""
    with KneeServer(base=0.01, knee=1000, wall=200, burst=20) as server:
        report = await run(server, 200, 16, rate="15/0.1s")
    assert report.items.ok == 200
    assert server.rejected == 0


async def test_auto_follows_capacity_down() -> None:
    """When the knee drops from 32 to 4 mid-run, the limit ends at most 16 after having been
    above that."""
    with KneeServer(base=0.02, knee=32, degrade=0.3, shift_after=300, shift_to=4) as server:
        report = await run(server, 500, Auto(max=64))
    trace = report.stages[0].limit_trace
    assert report.items.ok == 500
    assert max(limit for _, limit in trace) > 16
    assert trace[-1][1] <= 16
