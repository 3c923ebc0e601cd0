"""A simulated downstream in virtual time, for driving the adaptive controllers deterministically.

:class:`SimService` is an event-driven model of a stage calling a service: ``limit`` slots, each
starting a call as soon as it is free (unless an ``arrival_rate`` makes the stage app-limited).
A call's latency is decided when it starts from the number in flight then, so a test knows the
optimum in advance:

* a *knee*: latency is ``base`` while at most ``knee`` calls are in flight and grows linearly
  beyond (``base * n / knee``), so throughput tops out at ``knee / base``;
* a *rate wall*: a token bucket of ``wall`` calls per second (``burst`` deep, a tenth of a
  second's worth by default); a call over it fails fast with
  :class:`~pipeline.Overloaded` (a 429);
* a *shift*: ``knee`` changes to ``shift_to`` at virtual time ``shift_at``.

As in the engine, a stage has as many workers as the highest limit so far; a worker whose call
failed with ``Overloaded`` sleeps ``retry_backoff`` (holding no slot) before it takes part again.

Noise comes from a seeded ``random.Random``, so every run of a test is the same run.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
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
    trace: list[tuple[float, int]] = field(default_factory=list)

    def limits_between(self, start: float, end: float) -> list[int]:
        """The limits set by updates in ``[start, end)``."""
        return [limit for t, limit in self.trace if start <= t < end]


@dataclass
class SimService:
    """The service's behaviour (see the module docstring)."""

    base: float = 0.02
    knee: int = 16
    shift_at: float | None = None
    shift_to: int | None = None
    wall: float | None = None
    burst: float | None = None
    jitter: float = 0.0
    arrival_rate: float | None = None
    fail_fast_every: int = 0
    retry_backoff: float = 0.1
    seed: int = 1

    def knee_at(self, t: float) -> int:
        if self.shift_at is not None and self.shift_to is not None and t >= self.shift_at:
            return self.shift_to
        return self.knee

    def run(self, controller: Controller, clock: VirtualClock, *, limit: int, duration: float) -> SimResult:
        """Drive ``controller`` for ``duration`` virtual seconds, starting at ``limit``."""
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
                knee = self.knee_at(now)
                latency = self.base * max(1.0, in_flight / knee)
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
            elif isinstance(error, Overloaded):
                result.overloaded += 1
                heapq.heappush(wakes, now + self.retry_backoff)
            fill(now)
        return result


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
