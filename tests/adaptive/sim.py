"""A simulated downstream in virtual time, for driving the adaptive controllers deterministically.

:class:`SimService` is an event-driven model of a stage calling a service: ``limit`` slots, each
starting a call as soon as it is free (unless an ``arrival_rate`` makes the stage app-limited).
A call's latency is decided when it starts from the number in flight then, so a test knows the
optimum in advance:

* a *knee*: latency is ``base`` while at most ``knee`` calls are in flight and grows linearly
  beyond (``base * n / knee``), so throughput tops out at ``knee / base``; with ``degrade``, it
  grows ``1 + degrade * (n - knee) / knee`` times faster than that, as :class:`KneeServer`'s
  does (a server thrashing past its capacity), so the best fixed cap is ``knee``;
* a *rate wall*: a token bucket of ``wall`` calls per second (``burst`` deep, a tenth of a
  second's worth by default); a call over it fails fast with
  :class:`~pipeline.Overloaded` (a 429);
* a *shift*: ``knee`` changes to ``shift_to`` at virtual time ``shift_at``.

As in the engine, a stage has as many workers as the highest limit so far; a worker whose call
failed with ``Overloaded`` sleeps ``retry_backoff`` (holding no slot), then retries its item as
soon as a slot is free. With ``max_backoff`` set the sleep doubles with each failure of the same
item up to ``max_backoff``, plus up to ``retry_jitter``, as a :class:`~pipeline.Retry` does.

By default the stage has items for ever and runs for a set duration; with ``items`` it has that
many, and the run ends when the last has been answered (``SimResult.elapsed``).

Noise comes from a seeded ``random.Random``, so every run of a test is the same run.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline import Overloaded
from pipeline._adaptive import Controller


class FixedCap:
    """A controller that never moves the limit: a fixed ``concurrency``, to compare with."""

    interval = 0.05

    def observe(self, latency: float, error: BaseException | None, in_flight: int) -> None:
        """Ignore the attempt."""

    def update(self, now: float, in_flight: int, limit: int) -> int:
        """Keep ``limit``."""
        return limit


class VirtualClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimResult:
    """What a simulated run did: completions, 429s, the limit after each update, and (with
    ``items``) when the last item was answered."""

    ok: int = 0
    overloaded: int = 0
    trace: list[tuple[float, int]] = field(default_factory=list)
    elapsed: float | None = None

    @property
    def overloaded_share(self) -> float:
        """The share of calls that got a 429."""
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
    shift_at: float | None = None
    shift_to: int | None = None
    wall: float | None = None
    burst: float | None = None
    jitter: float = 0.0
    arrival_rate: float | None = None
    fail_fast_every: int = 0
    retry_backoff: float = 0.1
    max_backoff: float | None = None
    retry_jitter: float = 0.0
    items: int | None = None
    seed: int = 1

    def knee_at(self, t: float) -> int:
        if self.shift_at is not None and self.shift_to is not None and t >= self.shift_at:
            return self.shift_to
        return self.knee

    def run(
        self, controller: Controller, clock: VirtualClock, *, limit: int, duration: float = float("inf")
    ) -> SimResult:
        """Drive ``controller`` for ``duration`` virtual seconds (or until ``items`` are answered),
        starting at ``limit``."""
        if self.items is None and duration == float("inf"):
            raise ValueError("a run needs a duration or a number of items")
        rng = random.Random(self.seed)
        result = SimResult()
        # (when, seq, latency, error, failures of the item so far)
        events: list[tuple[float, int, float, BaseException | None, int]] = []
        wakes: list[tuple[float, int]] = []  # workers sleeping before a retry: (until, failures)
        ready: list[int] = []  # workers awake with an item to retry, waiting for a slot
        fresh = self.items if self.items is not None else -1  # items never started; -1: endless
        answered = 0
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

        def start(now: float, failures: int) -> None:
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
                if self.degrade:
                    latency *= 1 + self.degrade * max(0.0, (in_flight - knee) / knee)
                if self.jitter:
                    latency *= 1 + rng.uniform(-self.jitter, self.jitter)
            seq += 1
            heapq.heappush(events, (now + latency, seq, latency, error, failures))

        def backoff(failures: int) -> float:
            if self.max_backoff is None:
                return self.retry_backoff
            pause = min(self.max_backoff, self.retry_backoff * 2 ** (failures - 1))
            return pause + (rng.uniform(0, self.retry_jitter) if self.retry_jitter else 0.0)

        def fill(now: float) -> None:
            nonlocal backlog, last_arrival, fresh
            if self.arrival_rate is not None:
                backlog += (now - last_arrival) * self.arrival_rate
                last_arrival = now
            while ready and in_flight < limit:
                start(now, ready.pop(0))
            while (
                in_flight < limit
                and in_flight + len(wakes) + len(ready) < workers
                and fresh != 0
                and (self.arrival_rate is None or backlog >= 1)
            ):
                if self.arrival_rate is not None:
                    backlog -= 1
                if fresh > 0:
                    fresh -= 1
                start(now, 0)

        fill(0.0)
        while True:
            t_event = events[0][0] if events else float("inf")
            if wakes and wakes[0][0] <= min(t_event, next_update):
                clock.now, failures = heapq.heappop(wakes)
                ready.append(failures)
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
            now, _, latency, error, failures = heapq.heappop(events)
            clock.now = now
            controller.observe(latency, error, in_flight)
            in_flight -= 1
            if isinstance(error, Overloaded):
                result.overloaded += 1
                heapq.heappush(wakes, (now + backoff(failures + 1), failures + 1))
            else:
                result.ok += error is None
                answered += 1
                if answered == self.items:
                    result.elapsed = now
                    break
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
