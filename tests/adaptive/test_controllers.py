"""The adaptive controllers, driven in virtual time against simulated services with known optima."""

from __future__ import annotations

import statistics

import pytest

from pipeline import Auto, Overloaded, RetryAfter, StageTimeout, TransientError
from pipeline._adaptive import Controller, GradientController, ThroughputController, is_loss, make_controller

from .servers import fetch
from .sim import FixedLimit, SimService, VirtualClock, drive_throughput


def gradient(initial: int = 4, *, low: int = 1, high: int = 256) -> tuple[GradientController, VirtualClock]:
    clock = VirtualClock()
    return GradientController(low, high, initial, clock=clock), clock


def feed(controller: GradientController, clock: VirtualClock, latencies: list[float], in_flight: int) -> None:
    for latency in latencies:
        controller.observe(latency, None, in_flight)


# -- the gradient controller, against a simulated IO service -------------------------------------


def test_gradient_converges_near_the_knee() -> None:
    """With latency flat up to K in flight and growing beyond, the limit settles between K and 2K
    and throughput is within 5% of the service's capacity."""
    controller, clock = gradient()
    service = SimService(base=0.02, knee=16, jitter=0.3)
    result = service.run(controller, clock, limit=4, duration=20.0)
    settled = result.limits_between(5.0, 20.0)
    assert 16 <= statistics.median(settled) <= 32
    assert min(settled) >= 12
    assert result.ok / 20.0 >= 0.95 * 16 / 0.02


def test_gradient_follows_capacity_up() -> None:
    """When the knee moves from 16 to 48, the limit reaches the new knee within 3 s and stays
    within 10% of it or above."""
    controller, clock = gradient()
    service = SimService(base=0.02, knee=16, shift_at=10.0, shift_to=48, jitter=0.2)
    result = service.run(controller, clock, limit=4, duration=20.0)
    assert max(result.limits_between(5.0, 10.0)) <= 32
    assert statistics.median(result.limits_between(13.0, 20.0)) >= 48
    assert min(result.limits_between(13.0, 20.0)) >= 0.9 * 48


def test_gradient_follows_capacity_down() -> None:
    """When the knee moves from 48 to 12, the limit comes down below 2x the new knee within 2 s."""
    controller, clock = gradient()
    service = SimService(base=0.02, knee=48, shift_at=10.0, shift_to=12, jitter=0.2)
    result = service.run(controller, clock, limit=4, duration=20.0)
    assert min(result.limits_between(5.0, 10.0)) >= 48
    assert max(result.limits_between(12.0, 20.0)) <= 24


def test_gradient_stays_under_a_rate_wall() -> None:
    """Against a 429 wall at 400/s (50 ms calls: 20 in flight), at most 5% of calls get a 429 and
    at least 85% of the wall's rate gets through."""
    controller, clock = gradient()
    service = SimService(base=0.05, knee=10_000, wall=400, jitter=0.3)
    result = service.run(controller, clock, limit=4, duration=20.0)
    assert result.overloaded / (result.ok + result.overloaded) <= 0.05
    assert result.ok / 20.0 >= 0.85 * 400


def test_gradient_does_not_grow_when_app_limited() -> None:
    """Items arriving at 200/s need 4 slots at 20 ms: the limit never grows past 4x that, however
    long the run, though the service could take 64."""
    controller, clock = gradient()
    service = SimService(base=0.02, knee=64, arrival_rate=200)
    result = service.run(controller, clock, limit=4, duration=20.0)
    assert max(limit for _, limit in result.trace) <= 16
    assert result.limits_between(5.0, 20.0) == [result.trace[-1][1]] * len(result.limits_between(5.0, 20.0))


def test_gradient_does_not_grow_when_in_flight_is_below_the_limit() -> None:
    """Good latencies while only a quarter of the slots are used leave the limit where it is."""
    controller, clock = gradient(initial=16)
    for step in range(1, 20):
        clock.now = step * 0.1
        feed(controller, clock, [0.02] * 10, in_flight=4)
        assert controller.update(clock.now, 4, 16) == 16


def test_gradient_slow_start_doubles_while_latency_is_flat() -> None:
    """While latency is flat and every slot is used, each update doubles the limit."""
    controller, clock = gradient(initial=4)
    limit = 4
    for step in range(1, 4):
        clock.now = step * 0.1
        feed(controller, clock, [0.02] * 10, in_flight=limit)
        limit = controller.update(clock.now, limit, limit)
    assert limit == 32


def test_gradient_respects_min_and_max() -> None:
    """The limit stays within [min, max] under endless growth and endless loss."""
    controller, clock = gradient(initial=4, low=3, high=10)
    limit = 4
    for step in range(1, 30):
        clock.now = step * 0.1
        feed(controller, clock, [0.02] * 10, in_flight=limit)
        limit = controller.update(clock.now, limit, limit)
    assert limit == 10
    for step in range(30, 60):
        clock.now = step * 0.1
        controller.observe(0.001, Overloaded("429"), limit)
        limit = controller.update(clock.now, limit, limit)
    assert limit == 3


@pytest.mark.parametrize(
    "error",
    [
        Overloaded("503 Service Unavailable"),
        RetryAfter(1.0),
        StageTimeout("timed out", stage="s"),
        TimeoutError(),
    ],
    ids=["overloaded", "retry-after", "stage-timeout", "timeout"],
)
def test_gradient_cuts_multiplicatively_on_loss(error: BaseException) -> None:
    """One loss signal cuts a limit of 40 by at least 10% at the next update, without waiting
    for latency to say anything."""
    controller, clock = gradient(initial=40)
    clock.now = 1.0
    controller.observe(0.001, error, 40)
    assert controller.update(1.0, 40, 40) <= 36


def test_gradient_cuts_once_per_burst() -> None:
    """Losses from calls that started before the last cut do not cut again: a burst is one cut."""
    controller, clock = gradient(initial=40)
    clock.now = 1.0
    controller.observe(0.001, Overloaded("429"), 40)
    first = controller.update(1.0, 40, 40)
    clock.now = 1.1
    controller.observe(0.5, Overloaded("429"), first)  # sent at 0.6, before the cut at 1.0
    assert controller.update(1.1, first, first) == first


def test_gradient_cut_uses_the_sustained_concurrency() -> None:
    """When most calls failed, the cut goes straight to what succeeded: 50 successes of 20 ms in
    0.1 s sustained 10 in flight, so a limit of 80 drops to about 10, not to 60."""
    controller, clock = gradient(initial=80)
    clock.now = 0.1
    controller.update(0.1, 80, 80)
    feed(controller, clock, [0.02] * 50, in_flight=80)
    for _ in range(200):
        controller.observe(0.001, Overloaded("429"), 80)
    clock.now = 0.2
    assert controller.update(0.2, 80, 80) <= 11


def test_gradient_ignores_fast_failures_as_samples() -> None:
    """Errors that are not losses (a 404 in 0.1 ms) neither lower the baseline nor cut the limit."""
    controller, clock = gradient(initial=8)
    limit = 8
    for step in range(1, 6):
        clock.now = step * 0.1
        feed(controller, clock, [0.02] * 10, in_flight=limit)
        for _ in range(100):
            controller.observe(0.0001, TransientError("404"), limit)
        limit = controller.update(clock.now, limit, limit)
    assert controller.baseline == pytest.approx(0.02)
    assert limit > 8


def test_gradient_ignores_fast_failures_in_the_simulation() -> None:
    """A service where one call in three fails fast still converges near its knee."""
    controller, clock = gradient()
    service = SimService(base=0.02, knee=16, jitter=0.2, fail_fast_every=3)
    result = service.run(controller, clock, limit=4, duration=10.0)
    assert 12 <= statistics.median(result.limits_between(3.0, 10.0)) <= 32


def test_gradient_waits_for_enough_samples() -> None:
    """An update with fewer than min_samples calls changes nothing and keeps them for later."""
    controller, clock = gradient(initial=4)
    feed(controller, clock, [0.02] * 5, in_flight=4)
    clock.now = 0.1
    assert controller.update(0.1, 4, 4) == 4
    feed(controller, clock, [0.02] * 3, in_flight=4)
    clock.now = 0.2
    assert controller.update(0.2, 4, 4) == 8


def test_gradient_adopts_a_slower_downstream_at_the_minimum() -> None:
    """When the downstream itself gets 5x slower, the limit falls to min and the baseline moves to
    the new latency instead of pinning the limit at min for ever."""
    controller, clock = gradient(initial=8, low=2)
    limit = 8
    step = 0
    for latency in [0.02] * 10 + [0.1] * 20:
        step += 1
        clock.now = step * 0.1
        feed(controller, clock, [latency] * 10, in_flight=limit)
        limit = controller.update(clock.now, limit, limit)
    assert controller.baseline == pytest.approx(0.1)
    assert limit > 2


def test_gradient_probe_refreshes_the_baseline() -> None:
    """Every probe_every seconds the limit is halved for one window and the latency then becomes
    the baseline, so a baseline that drifted low is corrected."""
    clock = VirtualClock()
    controller = GradientController(1, 64, 32, clock=clock, probe_every=1.0)
    controller.update(0.0, 32, 32)
    limit = 32
    clock.now = 0.1
    feed(controller, clock, [0.01] * 10, in_flight=limit)  # an unrepresentative fast moment
    limit = controller.update(0.1, limit, limit)
    seen = []
    for step in range(2, 25):
        clock.now = step * 0.1
        feed(controller, clock, [0.02] * 20, in_flight=limit)
        limit = controller.update(clock.now, limit, limit)
        seen.append(limit)
    assert min(seen) <= 20  # the probe
    assert controller.baseline == pytest.approx(0.02)


def test_is_loss() -> None:
    """Overloaded, RetryAfter and timeouts are losses; other errors and success are not."""
    assert is_loss(Overloaded("x"))
    assert is_loss(RetryAfter(1))
    assert is_loss(StageTimeout("x", stage="s"))
    assert not is_loss(TransientError("x"))
    assert not is_loss(ValueError("x"))
    assert not is_loss(None)


# -- auto against a fixed cap, as test_integration.py runs them, in virtual time -------------------


def auto(concurrency: Auto) -> tuple[Controller, VirtualClock, int]:
    """The controller a run builds for ``concurrency`` on the :func:`fetch` stage, its clock, and
    the limit it starts from."""
    clock = VirtualClock()
    resolved = concurrency.resolve(fetch)
    assert resolved.initial is not None
    return make_controller(resolved, resolved.initial, clock=clock), clock, resolved.initial


# The integration tests' Retry(backoff=0.02, ...): the simulator's workers back off a fixed time.
RETRY_BACKOFF = 0.02


def test_auto_approaches_the_best_fixed_cap_on_a_knee() -> None:
    """On a service whose knee is 8 in flight (KneeServer's shape: 20 ms, degrade 0.3), 300 items
    with auto take at most 1/0.6 of the time a fixed cap of 8 (the optimum) takes: at least 60%
    of its throughput, ramp-up included, and the limit rises above the initial 4."""
    service = SimService(base=0.02, knee=8, degrade=0.3, retry_backoff=RETRY_BACKOFF)
    fixed = service.run(FixedLimit(8), VirtualClock(), limit=8, items=300)
    controller, clock, initial = auto(Auto(max=64))
    adaptive = service.run(controller, clock, limit=initial, items=300)
    assert fixed.ok == adaptive.ok == 300
    assert 300 / adaptive.elapsed >= 0.6 * 300 / fixed.elapsed
    assert max(limit for _, limit in adaptive.trace) > 4


def test_auto_backs_off_a_rate_wall() -> None:
    """Against a 429 wall at 200/s (20 ms answers: 4 in flight), auto starting at 16 gets under
    half the share of 429s a fixed cap of 16 gets over 400 items, and ends below 16."""
    service = SimService(base=0.02, knee=10_000, wall=200, retry_backoff=RETRY_BACKOFF)
    fixed = service.run(FixedLimit(16), VirtualClock(), limit=16, items=400)
    controller, clock, initial = auto(Auto(initial=16, max=64))
    adaptive = service.run(controller, clock, limit=initial, items=400)
    assert fixed.ok == adaptive.ok == 400
    assert adaptive.overloaded_share < fixed.overloaded_share / 2
    assert adaptive.trace[-1][1] < 16


# -- the throughput controller, against a simulated CPU stage -------------------------------------


def throughput(initial: int, high: int) -> tuple[ThroughputController, VirtualClock]:
    clock = VirtualClock()
    return ThroughputController(1, high, initial, clock=clock), clock


def test_throughput_climbs_to_the_core_count() -> None:
    """With 3 cores' worth of throughput and room for 8, the limit spends most of its time at 3."""
    controller, clock = throughput(1, 8)
    trace = drive_throughput(
        controller, clock, lambda t, n: 100 * min(n, 3), limit=1, duration=30.0, noise=0.03
    )
    settled = [limit for t, limit in trace if t >= 5.0]
    assert statistics.mode(settled) == 3
    assert sum(1 for limit in settled if limit in (3, 4)) >= 0.8 * len(settled)


def test_throughput_reverses_when_more_threads_hurt() -> None:
    """When each thread past 2 costs 20% (contention), the limit comes back to 2 and stays there."""
    controller, clock = throughput(1, 8)

    def rate(t: float, n: int) -> float:
        return 100 * min(n, 2) * (1 - 0.2 * max(0, n - 2))

    trace = drive_throughput(controller, clock, rate, limit=1, duration=30.0, noise=0.03)
    settled = [limit for t, limit in trace if t >= 5.0]
    assert statistics.mode(settled) == 2
    assert max(settled) <= 3


def test_throughput_never_exceeds_max() -> None:
    """With throughput rising for ever, the limit stops at max (the cores, by default)."""
    controller, clock = throughput(1, 4)
    trace = drive_throughput(controller, clock, lambda t, n: 100 * n, limit=1, duration=20.0)
    assert max(limit for _, limit in trace) == 4
    assert trace[-1][1] >= 3


def test_throughput_finds_a_shifted_optimum() -> None:
    """When the cores available go from 2 to 5 mid-run, the limit climbs to 5."""
    controller, clock = throughput(1, 8)
    trace = drive_throughput(
        controller, clock, lambda t, n: 100 * min(n, 2 if t < 10 else 5), limit=1, duration=40.0, noise=0.03
    )
    assert statistics.mode(limit for t, limit in trace if 5 <= t < 10) == 2
    assert statistics.mode(limit for t, limit in trace if t >= 30) == 5


def test_throughput_failures_are_not_work() -> None:
    """Failed calls are not counted as completions."""
    controller, _ = throughput(2, 4)
    controller.update(0.0, 2, 2)
    for _ in range(50):
        controller.observe(0.001, ValueError("corrupt"), 2)
    assert controller.update(0.5, 2, 2) == 2
    assert controller.throughput is None


# -- make_controller -----------------------------------------------------------------------------


def test_make_controller_picks_the_algorithm() -> None:
    """Auto(algorithm=...) decides the controller, with its bounds and initial limit."""
    io = make_controller(Auto(min=2, max=50, initial=5, algorithm="gradient"), 5)
    cpu = make_controller(Auto(min=1, max=4, initial=1, algorithm="throughput"), 1)
    assert isinstance(io, GradientController)
    assert (io.min, io.max, round(io.limit)) == (2, 50, 5)
    assert isinstance(cpu, ThroughputController)
    assert (cpu.min, cpu.max, cpu.limit) == (1, 4, 1)
