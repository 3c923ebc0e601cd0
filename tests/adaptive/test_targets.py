"""The targets of ``concurrency = "auto"``, asserted in virtual time on the benchmark's backends.

Each backend of ``make bench`` (``bench/adaptive.py``) is simulated here (``sim.py``): knees at
4, 8 and 32 in flight x base latencies of 5, 20 and 100 ms, a backend whose capacity halves for
the middle third of the run and recovers, and a 429 wall. The ratios are computed in the
simulation: ``auto`` against the best of several fixed caps on the same service.
"""

from __future__ import annotations

import pytest

from pipeline import Auto
from pipeline._adaptive import GradientController, make_controller

from .sim import (
    BASES,
    KNEES,
    FixedLimit,
    SimResult,
    SimService,
    VirtualClock,
    best_fixed,
    fixed_caps,
    halving_service,
    items_for,
    knee_service,
    spread,
    wall_service,
    within,
)


def run_auto(service: SimService, items: int) -> SimResult:
    """Run ``service`` under the controller ``concurrency = "auto"`` gives an IO stage."""
    clock = VirtualClock()
    controller = make_controller(Auto(min=1, max=64, initial=4, algorithm="gradient"), 4, clock=clock)
    assert isinstance(controller, GradientController)
    return service.run(controller, clock, limit=4, items=items)


KNEE_BACKENDS = [
    pytest.param(knee, base, id=f"knee{knee}-{base * 1000:g}ms") for knee in KNEES for base in BASES
]


@pytest.mark.parametrize(("knee", "base"), KNEE_BACKENDS)
def test_auto_gets_90_percent_of_the_best_fixed_cap(knee: int, base: float) -> None:
    """On a backend that saturates past its knee, auto's throughput is at least 90% of the best
    fixed cap's over the same run (10 s at capacity, and at least 3,000 calls)."""
    items = items_for(knee, base)
    service = knee_service(knee, base)
    _, best = best_fixed(service, fixed_caps(knee), items=items)
    result = run_auto(service, items)
    assert result.throughput >= 0.9 * best


@pytest.mark.parametrize(("knee", "base"), KNEE_BACKENDS)
def test_auto_settles_within_30_percent_of_the_knee(knee: int, base: float) -> None:
    """After convergence (the last 70% of the run) the limit spends at least 90% of the time
    within +-30% of the knee (the rest: the periodic re-measurement of the baseline), and its
    median is between the knee and 30% above it."""
    result = run_auto(knee_service(knee, base), items_for(knee, base))
    start = 0.3 * result.elapsed
    assert within(result.trace, start, result.elapsed, 0.7 * knee, 1.3 * knee) >= 0.9
    assert knee <= spread(result.trace, start, result.elapsed)["p50"] <= 1.3 * knee


@pytest.mark.parametrize(
    ("knee", "base"), [(16, 0.04), (16, 0.02), (8, 0.02)], ids=["16-40ms", "16-20ms", "8-20ms"]
)
def test_auto_beats_every_fixed_cap_when_capacity_halves(knee: int, base: float) -> None:
    """When the knee halves for the middle third of 3,000 calls and comes back, auto finishes
    sooner than every fixed cap: a cap right for one phase is wrong for the other."""
    service = halving_service(3000, knee=knee, base=base)
    fixed = {
        cap: service.run(FixedLimit(cap), VirtualClock(), limit=cap, items=3000).elapsed
        for cap in fixed_caps(knee)
    }
    result = run_auto(service, 3000)
    assert result.elapsed < min(fixed.values())


@pytest.mark.parametrize(
    ("wall", "base"), [(300, 0.03), (400, 0.05), (100, 0.1)], ids=["300/s-30ms", "400/s-50ms", "100/s-100ms"]
)
def test_auto_alone_keeps_429s_under_2_percent(wall: float, base: float) -> None:
    """Against a 429 wall (no latency signal at all), auto without ``rate=`` gets at most 2% of
    3,000 calls answered 429 and at least 80% of the wall's rate through (start-up included)."""
    result = run_auto(wall_service(wall, base), 3000)
    assert result.overloaded_share <= 0.02
    assert result.throughput >= 0.8 * wall


def test_the_window_ignores_calls_that_started_before_a_change() -> None:
    """A call that started before the limit last changed measured the old limit: it is not a
    latency sample of the new one, so one queue is not cut for twice."""
    clock = VirtualClock()
    controller = GradientController(1, 64, 16, clock=clock)
    clock.now = 0.1
    for _ in range(10):
        controller.observe(0.02, None, 16)
    controller.update(0.1, 16, 16)  # slow start: 16 -> 32, a change at 0.1
    clock.now = 0.15
    for _ in range(10):
        controller.observe(0.2, None, 32)  # slow calls sent at -0.05, under the old limit
    assert controller.update(0.15, 32, 32) == 32
    assert controller.short == pytest.approx(0.02)


def test_a_latency_cut_is_proportionate() -> None:
    """Latency 50% over the baseline cuts the limit by about a third (less the queue allowance),
    not to a fraction of it."""
    clock = VirtualClock()
    controller = GradientController(1, 64, 16, clock=clock, smoothing=1.0)
    clock.now = 0.1
    for _ in range(10):
        controller.observe(0.02, None, 16)
    controller.update(0.1, 16, 16)
    clock.now = 0.2
    for _ in range(10):
        controller.observe(0.03, None, 32)
    new = controller.update(0.2, 32, 32)
    assert 32 / 1.5 <= new < 32
