"""A simulated downstream in virtual time, for driving the adaptive controllers deterministically.

:class:`SimService` is an event-driven model of a stage calling a service: ``limit`` slots, each
starting a call as soon as it is free (unless an ``arrival_rate`` makes the stage app-limited).
A call's latency is decided when it starts from the number in flight then, so a test knows the
optimum in advance:

* a *knee*: latency is ``base`` while at most ``knee`` calls are in flight and grows linearly
  beyond (``base * n / knee``), so throughput tops out at ``knee / base``; with ``degrade`` it
  grows faster than a plain queue, as :class:`~tests.adaptive.servers.KneeServer` does
  (``* (1 + degrade * (n - knee) / knee)``), so the best fixed cap is the knee itself;
* a *rate wall*: a token bucket of ``wall`` calls per second (``burst`` deep, a tenth of a
  second's worth by default); a call over it fails fast with
  :class:`~pipeline.Overloaded` (a 429);
* a *shift*: ``knee`` changes to ``shift_to`` at virtual time ``shift_at``; or, with
  ``schedule = ((answers, knee), ...)``, to ``knee`` once that many calls have succeeded (as the
  benchmark's shifting server does, so fixed caps and ``auto`` meet the same phases).

A run lasts ``duration`` virtual seconds, or until ``items`` calls have succeeded;
:func:`best_fixed` runs the same service under fixed caps, for the ratio the targets are
stated in.

As in the engine, a stage has as many workers as the highest limit so far; a worker whose call
failed with ``Overloaded`` sleeps ``retry_backoff`` (holding no slot) before it takes part again.

Noise comes from a seeded ``random.Random``, so every run of a test is the same run.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pipeline import Overloaded
from pipeline._adaptive import Controller


class VirtualClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimResult:
    """What a simulated run did: completions, 429s and the limit after each update."""

    ok: int = 0
    overloaded: int = 0
    elapsed: float = 0.0
    trace: list[tuple[float, int]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Successful calls per virtual second."""
        return self.ok / self.elapsed if self.elapsed else 0.0

    @property
    def overloaded_share(self) -> float:
        """The share of calls answered 429."""
        return self.overloaded / max(1, self.ok + self.overloaded)

    def limits_between(self, start: float, end: float) -> list[int]:
        """The limits set by updates in ``[start, end)``."""
        return [limit for t, limit in self.trace if start <= t < end]


@dataclass
class SimService:
    """The service's behaviour (see the module docstring)."""

    base: float = 0.02
    knee: int = 16
    degrade: float = 0.0
    schedule: tuple[tuple[int, int], ...] = ()
    shift_at: float | None = None
    shift_to: int | None = None
    wall: float | None = None
    burst: float | None = None
    jitter: float = 0.0
    arrival_rate: float | None = None
    fail_fast_every: int = 0
    retry_backoff: float = 0.1
    seed: int = 1

    def knee_at(self, t: float, answers: int = 0) -> int:
        """The knee at virtual time ``t``, after ``answers`` successful calls."""
        if self.shift_at is not None and self.shift_to is not None and t >= self.shift_at:
            return self.shift_to
        knee = self.knee
        for after, new in self.schedule:
            if answers >= after:
                knee = new
        return knee

    def latency(self, in_flight: int, knee: int) -> float:
        """The noiseless latency of a call started with ``in_flight`` calls in flight."""
        over = max(0.0, (in_flight - knee) / knee)
        return self.base * max(1.0, in_flight / knee) * (1 + self.degrade * over)

    def run(
        self,
        controller: Controller,
        clock: VirtualClock,
        *,
        limit: int,
        duration: float = float("inf"),
        items: int | None = None,
    ) -> SimResult:
        """Drive ``controller`` from ``limit`` for ``duration`` virtual seconds, or until ``items``
        calls have succeeded."""
        if items is None and duration == float("inf"):
            raise ValueError("give a duration or a number of items")
        rng = random.Random(self.seed)
        result = SimResult()
        events: list[tuple[float, int, float, BaseException | None]] = []
        wakes: list[float] = []
        workers = limit
        seq = 0
        in_flight = 0
        burst = self.burst if self.burst is not None else (self.wall or 0.0) * 0.1
        tokens = burst
        last_refill = 0.0
        backlog = 0.0  # items available to start when app-limited
        last_arrival = 0.0
        next_update = controller.interval
        calls = 0

        def start(now: float) -> None:
            nonlocal seq, in_flight, tokens, last_refill, calls
            in_flight += 1
            calls += 1
            error: BaseException | None = None
            if self.wall is not None:
                tokens = min(max(1.0, burst), tokens + (now - last_refill) * self.wall)
                last_refill = now
                if tokens >= 1:
                    tokens -= 1
                else:
                    error = Overloaded("429 Too Many Requests")
            if error is not None:
                latency = 0.001
            elif self.fail_fast_every and calls % self.fail_fast_every == 0:
                latency, error = 0.0005, ValueError("bad item")
            else:
                latency = self.latency(in_flight, self.knee_at(now, result.ok))
                if self.jitter:
                    latency *= 1 + rng.uniform(-self.jitter, self.jitter)
            seq += 1
            heapq.heappush(events, (now + latency, seq, latency, error))

        def fill(now: float) -> None:
            nonlocal backlog, last_arrival
            if self.arrival_rate is not None:
                backlog += (now - last_arrival) * self.arrival_rate
                last_arrival = now
            while (
                in_flight < limit
                and in_flight + len(wakes) < workers
                and (self.arrival_rate is None or backlog >= 1)
            ):
                if self.arrival_rate is not None:
                    backlog -= 1
                start(now)

        fill(0.0)
        while True:
            t_event = events[0][0] if events else float("inf")
            if wakes and wakes[0] <= min(t_event, next_update):
                clock.now = heapq.heappop(wakes)
                fill(clock.now)
                continue
            if next_update <= t_event:
                if next_update > duration:
                    break
                clock.now = next_update
                limit = controller.update(next_update, in_flight, limit)
                workers = max(workers, limit)
                result.trace.append((next_update, limit))
                next_update += controller.interval
                fill(clock.now)
                continue
            now, _, latency, error = heapq.heappop(events)
            clock.now = now
            controller.observe(latency, error, in_flight)
            in_flight -= 1
            if error is None:
                result.ok += 1
                if items is not None and result.ok >= items:
                    break
            elif isinstance(error, Overloaded):
                result.overloaded += 1
                heapq.heappush(wakes, now + self.retry_backoff)
            fill(now)
        result.elapsed = clock.now if items is not None else duration
        return result


class FixedLimit:
    """A controller that keeps one cap: the baseline ``auto`` is measured against."""

    interval = 0.05

    def __init__(self, cap: int) -> None:
        self.cap = cap

    def observe(self, latency: float, error: BaseException | None, in_flight: int) -> None:
        """Ignore the attempt."""

    def update(self, now: float, in_flight: int, limit: int) -> int:
        """Keep the cap."""
        return self.cap


def best_fixed(service: SimService, caps: Iterable[int], *, items: int) -> tuple[int, float]:
    """The fixed cap with the highest throughput on ``service`` over ``items`` calls, and that
    throughput."""
    runs = {
        cap: service.run(FixedLimit(cap), VirtualClock(), limit=cap, items=items).throughput for cap in caps
    }
    cap = max(runs, key=lambda c: runs[c])
    return cap, runs[cap]


def drive_throughput(
    controller: Controller,
    clock: VirtualClock,
    rate: Callable[[float, int], float],
    *,
    limit: int,
    duration: float,
    noise: float = 0.0,
    seed: int = 1,
) -> list[tuple[float, int]]:
    """Drive a CPU-stage controller: between updates, ``rate(t, limit)`` completions per second
    (times ``1 +- noise``) are reported. Returns the limit after each update."""
    rng = random.Random(seed)
    trace = []
    t = 0.0
    owed = 0.0
    while t < duration:
        owed += rate(t, limit) * controller.interval * (1 + rng.uniform(-noise, noise))
        for _ in range(int(owed)):
            controller.observe(0.01, None, limit)
        owed -= int(owed)
        t += controller.interval
        clock.now = t
        limit = controller.update(t, limit, limit)
        trace.append((t, limit))
    return trace


# -- the benchmark's backends, in virtual time --------------------------------------------------

KNEES = (4, 8, 32)
"""Knees (calls in flight before a backend slows down) the targets are stated on."""

BASES = (0.005, 0.02, 0.1)
"""Base latencies, in seconds, the targets are stated on."""

DEGRADE = 0.3
"""How much worse than a plain queue a backend gets past its knee (as the benchmark's servers)."""


def knee_service(knee: int, base: float, *, seed: int = 1) -> SimService:
    """A backend that saturates past ``knee`` in flight, with 20% latency noise."""
    return SimService(base=base, knee=knee, degrade=DEGRADE, jitter=0.2, seed=seed)


def halving_service(items: int, *, knee: int = 16, base: float = 0.04) -> SimService:
    """A backend whose knee halves for the middle third of ``items`` answers, then recovers."""
    schedule = ((items // 3, knee // 2), (items * 2 // 3, knee))
    return SimService(base=base, knee=knee, degrade=DEGRADE, jitter=0.2, schedule=schedule)


def wall_service(wall: float = 300.0, base: float = 0.03) -> SimService:
    """A backend that answers 429 over ``wall`` calls per second, however few are in flight."""
    return SimService(base=base, knee=10_000, wall=wall, jitter=0.2)


def fixed_caps(knee: int) -> list[int]:
    """The fixed caps ``auto`` is compared with on a backend whose knee is ``knee``."""
    return sorted({max(1, knee // 2), knee * 3 // 4, knee, knee * 3 // 2, knee * 2, knee * 4})


def items_for(knee: int, base: float, *, seconds: float = 10.0, at_least: int = 3000) -> int:
    """Enough calls for ``seconds`` at the backend's capacity, and at least ``at_least``."""
    return max(at_least, round(seconds * knee / base))


def spread(trace: list[tuple[float, int]], start: float, end: float) -> dict[str, float]:
    """Time-weighted statistics of a limit trace ``[(time, limit), ...]`` (each limit holding until
    the next entry) over ``[start, end)``: the 5th, 50th and 95th percentiles and the mean."""
    spans: list[tuple[int, float]] = []
    for (t, limit), (t_next, _) in zip(trace, [*trace[1:], (end, 0)], strict=True):
        lo, hi = max(t, start), min(t_next, end)
        if hi > lo:
            spans.append((limit, hi - lo))
    total = sum(d for _, d in spans)
    if not total:
        last = [limit for t, limit in trace if t < end]
        value = float(last[-1]) if last else 0.0
        return {"p5": value, "p50": value, "p95": value, "mean": value}
    ordered = sorted(spans)

    def quantile(q: float) -> float:
        seen = 0.0
        for limit, d in ordered:
            seen += d
            if seen >= q * total:
                return float(limit)
        return float(ordered[-1][0])

    return {
        "p5": quantile(0.05),
        "p50": quantile(0.5),
        "p95": quantile(0.95),
        "mean": sum(limit * d for limit, d in spans) / total,
    }


def within(trace: list[tuple[float, int]], start: float, end: float, low: float, high: float) -> float:
    """The share of ``[start, end)`` during which the trace's limit was within ``[low, high]``."""
    inside = total = 0.0
    for (t, limit), (t_next, _) in zip(trace, [*trace[1:], (end, 0)], strict=True):
        lo, hi = max(t, start), min(t_next, end)
        if hi > lo:
            total += hi - lo
            inside += (hi - lo) if low <= limit <= high else 0.0
    return inside / total if total else 0.0
