"""Adaptive limits: the controllers behind ``concurrency = "auto"``.

The runner owns the clock and the limiter; a controller only does arithmetic. After every
attempt the runner calls ``observe(latency_s, error, in_flight)``, and every ``interval`` seconds
``update(now, in_flight, limit) -> new_limit``. Nothing here awaits, sleeps or reads the time
except through the injected ``clock``, so the unit tests drive them in virtual time.

Two algorithms:

* :class:`GradientController` (IO stages) follows the latency of the call itself, in the manner
  of Netflix's Gradient2 and Envoy's adaptive concurrency filter: the ratio of a no-load
  latency (the *baseline*) to the latency now (the *short* window) says whether the extra slots
  buy throughput or only queueing downstream. Loss signals (``Overloaded``/``RetryAfter``,
  timeouts) cut the limit multiplicatively.
* :class:`ThroughputController` (CPU stages) climbs the hill of completions per second, one
  slot at a time, because a CPU stage's latency says little: it grows with every extra thread
  even while throughput still rises.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from ._contract import workload
from ._exceptions import ConfigError, Overloaded

__all__ = [
    "Auto",
    "Controller",
    "GradientController",
    "ThroughputController",
    "check_cap",
    "is_loss",
    "make_controller",
]

Clock = Callable[[], float]

_DEFAULT_AUTO_MAX_IO = 64


def check_cap(name: str, value: object) -> None:
    """Refuse a cap that is not an integer >= 1, naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Auto:
    """``concurrency = "auto"``: the engine measures the stage and sets its cap as it runs.

    Attributes:
        min: The cap never goes below this.
        max: The cap never goes above this; defaults to the number of cores for a
            :func:`cpu_bound` stage, else 64.
        initial: The cap to start from; defaults to ``min`` for CPU stages, else ``min(4, max)``.
        algorithm: ``"gradient"`` (follows call latency; for IO) or ``"throughput"`` (hill
            climbing; for CPU); defaults from the callable's workload.
    """

    min: int = 1
    max: int | None = None
    initial: int | None = None
    algorithm: Literal["gradient", "throughput"] | None = None

    def resolve(self, fn: object) -> Auto:
        """Fill the defaults for ``fn``'s workload, and check the bounds."""
        cpu = workload(fn) == "cpu"
        algorithm = self.algorithm or ("throughput" if cpu else "gradient")
        top = self.max if self.max is not None else ((os.cpu_count() or 1) if cpu else _DEFAULT_AUTO_MAX_IO)
        top = max(top, self.min)
        initial = self.initial if self.initial is not None else (self.min if cpu else min(4, top))
        check_cap("concurrency.min", self.min)
        check_cap("concurrency.max", top)
        if not self.min <= initial <= top:
            raise ConfigError(
                f"concurrency.initial must be between min ({self.min}) and max ({top}), got {initial}"
            )
        return Auto(min=self.min, max=top, initial=initial, algorithm=algorithm)


class Controller(Protocol):
    """What the runner needs of an adaptive controller."""

    interval: float
    """Seconds between calls of :meth:`update`."""

    def observe(self, latency: float, error: BaseException | None, in_flight: int) -> None:
        """Account one attempt: its duration, its error (``None`` if it succeeded), and the
        slots held when it ended, itself included."""

    def update(self, now: float, in_flight: int, limit: int) -> int:
        """Return the limit to use from ``now`` on, given the slots held and the current limit."""


def is_loss(error: BaseException | None) -> bool:
    """Whether ``error`` says the downstream is saturated: ``Overloaded`` (429, 503, too many
    connections, ``RetryAfter``) or a timeout (``TimeoutError``, ``StageTimeout``)."""
    return isinstance(error, Overloaded | TimeoutError)


def make_controller(auto: Auto, initial: int, clock: Clock = time.monotonic) -> Controller:
    """Build the controller ``auto`` asks for, starting from ``initial`` slots.

    ``auto`` should be resolved (:meth:`Auto.resolve`); a missing ``max`` is taken as
    ``initial``'s order of magnitude above the minimum, never below ``initial``.
    """
    low = auto.min
    high = max(auto.max if auto.max is not None else max(initial, low) * 16, low)
    start = min(max(initial, low), high)
    if auto.algorithm == "throughput":
        return ThroughputController(low, high, start, clock=clock)
    return GradientController(low, high, start, clock=clock)


class GradientController:
    """Latency-gradient limit for IO stages, after Netflix's Gradient2 and Envoy's adaptive
    concurrency filter.

    The controller works in *windows*: a window holds the successful calls that started under
    the current limit (a call that started before the last change measures the old limit, and
    acting on it again is what makes a controller cut twice for one queue), and closes at the
    first update with ``min_samples`` of them and at least ``1.5 x`` the last latency since the
    change. At the close:

    * ``short`` = the window's median latency;
    * ``baseline`` = the no-load latency: the lowest of a per-concurrency table of window
      medians, each smoothed over the windows seen at that concurrency (``level_smoothing``), so
      one lucky window does not set it, and forgotten after ``baseline_window`` seconds. Every
      ``probe_every`` seconds the limit is halved for one window and what that window measures
      replaces the table (Envoy's periodic minRTT window), so the baseline follows a
      downstream that got slower or faster; at ``min`` a congested latency is adopted as is;
    * the target is ``limit * min(1, baseline / short) + queue * sqrt(limit)``: the limit that
      would hold the latency at the baseline, plus a queue allowance that grows with the limit
      (Gradient2), so above a knee the limit settles about ``queue * sqrt(knee)`` past it
      instead of sawing below it. The limit moves ``smoothing`` of the way there, all the way
      when the latency is over twice the baseline, and never below half of itself in one
      window: a latency cut is proportionate to the excess. Until the first sign of
      congestion it doubles instead (slow start);
    * when nothing comes back for 4x the baseline, the time since the last completion is a
      lower bound of the latency now, and the limit is cut by that gradient without waiting.

    Loss (``Overloaded``, ``RetryAfter``, timeouts) cuts the limit to ``limit * backoff`` at
    once, to ``0.95 x successes/s x median latency`` (Little's law: the concurrency the
    downstream really sustained, successes counted over the last few updates) when that is
    lower, within 10%..50% of the limit (deeper when most calls failed). Losses from calls
    that started before the previous cut are ignored, so one burst is one cut, as TCP does once
    per round trip. After a loss the limit grows by at
    most one slot per ``after_loss_hold`` windows, and for ``loss_memory`` seconds never past
    what the downstream sustained when it shed load.

    A fast failure (an error that is not a loss) is never a latency sample. The limit never
    grows while the stage is *app-limited*: the mean in-flight count seen at completions is
    below ``utilisation * limit``.
    """

    def __init__(
        self,
        min_limit: int,
        max_limit: int,
        initial: int,
        *,
        clock: Clock = time.monotonic,
        interval: float = 0.05,
        queue: float = 0.4,
        smoothing: float = 0.5,
        congestion: float = 1.25,
        backoff: float = 0.75,
        mild_backoff: float = 0.9,
        loss_memory: float = 30.0,
        min_samples: int = 8,
        utilisation: float = 0.8,
        level_smoothing: float = 0.3,
        baseline_window: float = 60.0,
        probe_every: float = 20.0,
        after_loss_hold: int = 4,
        slow_start_growth: float = 2.0,
        flat: float = 1.05,
    ):
        if not 1 <= min_limit <= initial <= max_limit:
            raise ValueError(f"need 1 <= min <= initial <= max, got {min_limit}, {initial}, {max_limit}")
        self.interval = interval
        self.min = min_limit
        self.max = max_limit
        self.queue = queue
        self.smoothing = smoothing
        self.congestion = congestion
        self.backoff = backoff
        self.mild_backoff = mild_backoff
        self.loss_memory = loss_memory
        self.min_samples = min_samples
        self.utilisation = utilisation
        self.level_smoothing = level_smoothing
        self.baseline_window = baseline_window
        self.probe_every = probe_every
        self.after_loss_hold = after_loss_hold
        self.slow_start_growth = slow_start_growth
        self.flat = flat
        self._clock = clock
        self._limit = float(initial)
        self._slow_start = True
        self._changed_at = -math.inf  # when the rounded limit last changed
        self._good: list[float] = []  # this window's successful latencies
        self._in_flight_sum = 0  # and the in-flight counts they saw
        self._done: list[float] = []  # every success since the last update, for Little's law
        self._recent: deque[tuple[float, int]] = deque(maxlen=4)  # (elapsed, successes) per update
        self._losses = 0
        self._last_cut = -math.inf
        self._sustained = math.inf  # what the downstream sustained when it last shed load
        self._since_growth = 0
        self._levels: dict[int, tuple[float, float]] = {}  # in flight -> (median latency, when)
        self._next_probe: float | None = None
        self._last_update: float | None = None
        self._last_seen = clock()
        self._stall_cut = False
        self._probing: float | None = None  # the limit to go back to after a probe
        self.baseline: float | None = None
        self.short: float | None = None

    @property
    def limit(self) -> float:
        """The current estimate, before rounding."""
        return self._limit

    def observe(self, latency: float, error: BaseException | None, in_flight: int) -> None:
        """Account one attempt (see :class:`Controller`)."""
        now = self._clock()
        self._last_seen = now
        self._stall_cut = False
        if error is None:
            self._done.append(latency)
            if now - latency >= self._changed_at:
                self._good.append(latency)
                self._in_flight_sum += in_flight
        elif is_loss(error) and now - latency >= self._last_cut:
            self._losses += 1

    def update(self, now: float, in_flight: int, limit: int) -> int:
        """Return the new limit (see :class:`Controller`)."""
        if self._next_probe is None:
            self._next_probe = now + self.probe_every
        elapsed = now - self._last_update if self._last_update is not None else self.interval
        self._last_update = now
        done, self._done = self._done, []
        if self._losses:
            outcome = self._on_loss(now, elapsed, done)
            self._recent.clear()
            return outcome
        self._recent.append((elapsed, len(done)))
        good = self._good
        # A probe's window is longer: it replaces the baseline, so it must not be one lucky
        # handful of the calls that came back first.
        samples, settle = (3 * self.min_samples, 2.0) if self._probing else (self.min_samples, 1.5)
        if len(good) < samples or (self.short is not None and now - self._changed_at < settle * self.short):
            self._check_stall(now, in_flight)
            return self._rounded()  # keep accumulating until the window says something
        short = statistics.median(good)
        mean_in_flight = self._in_flight_sum / len(good)
        self._good = []
        self._in_flight_sum = 0
        self.short = short
        level = max(1, round(mean_in_flight))
        if self._probing is not None:
            # The probe's latency, at half the limit, is the new no-load latency.
            self._levels = {level: (short, now)}
            self.baseline = short
            self._set(now, self._probing)
            self._probing = None
            self._next_probe = now + self.probe_every
            return self._rounded()
        baseline = self._remember(now, level, short)
        if now >= self._next_probe and not self._slow_start and self._limit >= 2 * self.min:
            self._probing = self._limit
            self._set(now, max(self.min, self._limit / 2))
            return self._rounded()
        ratio = short / baseline
        congested = ratio > self.congestion
        if congested and self._limit <= self.min:
            # Already as low as allowed: this latency is the downstream's, not our queueing.
            self._levels = {level: (short, now)}
            self.baseline = short
            return self._rounded()
        app_limited = mean_in_flight < self.utilisation * self._limit
        if self._slow_start:
            if not congested:
                if not app_limited:
                    self._set(now, min(self.max, self._limit * self.slow_start_growth))
                return self._rounded()
            self._slow_start = False
        # Gradient2: the limit that keeps latency at the baseline, plus a queue allowance.
        target = self._limit * min(1.0, 1 / ratio) + self.queue * math.sqrt(self._limit)
        if app_limited:
            target = min(target, self._limit)
        # Smooth the moves near the setpoint, where the noise is; far from it, act at once:
        # latency over twice the baseline, or no queueing to speak of.
        smoothing = 1.0 if ratio > 2 or ratio < self.flat else self.smoothing
        new = max(self._limit / 2, self._limit + smoothing * (target - self._limit))
        if new > self._limit and self._sustained < math.inf:
            # Once the downstream has shed load, grow one slot per few windows only; and for
            # loss_memory seconds not past what it sustained then.
            self._since_growth += 1
            grown = self._limit + 1 if self._since_growth >= self.after_loss_hold else self._limit
            new = min(new, grown)
            if now - self._last_cut < self.loss_memory:
                new = min(new, max(self._limit, self._sustained))
            if new > self._limit:
                self._since_growth = 0
        self._set(now, new)
        return self._rounded()

    def _check_stall(self, now: float, in_flight: int) -> None:
        stalled = now - self._last_seen
        if (
            self.baseline is not None
            and in_flight
            and not self._stall_cut
            and stalled > max(4 * self.baseline, self.interval)
        ):
            # Nothing came back for 4x the no-load latency: the calls in flight take at least
            # that long. Act on that bound now instead of waiting for them.
            self._stall_cut = True  # once, until something comes back
            self._slow_start = False
            self._set(now, self._limit * max(0.5, self.baseline / stalled))

    def _on_loss(self, now: float, elapsed: float, good: list[float]) -> int:
        self._slow_start = False
        if self._probing is not None:
            self._limit = self._probing
            self._probing = None
        cut = self._limit * self.backoff
        sustained = self._limit
        recent = self._recent
        done = sum(n for _, n in recent) + len(good)
        span = elapsed + sum(e for e, _ in recent)
        if len(good) >= self.min_samples and span > 0:
            # Little's law: what the downstream really took, successes per second times the
            # time each took, is the concurrency it can sustain. Aim just below it. Counted
            # over the last few updates, not one: right after a burst of 429s the workers sit
            # in retry back-off, and one interval would read the downstream's share too low.
            # Trust it fully when most calls failed; otherwise cut between 10% and 50%.
            sustained = 0.95 * done / span * statistics.median(good)
            floor = self._limit * 0.5 if self._losses <= len(good) else self.min
            cut = max(floor, min(sustained, self._limit * self.mild_backoff))
        self._sustained = max(self.min, min(sustained, self._limit))
        self._set(now, cut)
        self._last_cut = now
        self._since_growth = 0
        self._losses = 0
        self._good = []
        self._in_flight_sum = 0
        return self._rounded()

    def _remember(self, now: float, level: int, short: float) -> float:
        levels = self._levels
        old = levels.get(level)
        if old is not None and now - old[1] < self.baseline_window:
            short = old[0] + self.level_smoothing * (short - old[0])
        levels[level] = (short, now)
        for stale in [n for n, (_, seen) in levels.items() if seen < now - self.baseline_window]:
            del levels[stale]
        self.baseline = min(latency for latency, _ in levels.values())
        return self.baseline

    def _set(self, now: float, limit: float) -> None:
        before = self._rounded()
        self._limit = min(float(self.max), max(float(self.min), limit))
        if self._rounded() != before:
            self._changed_at = now
            self._good = []
            self._in_flight_sum = 0

    def _rounded(self) -> int:
        return min(self.max, max(self.min, round(self._limit)))


class ThroughputController:
    """Hill climbing on completions per second, for CPU stages.

    Each *epoch* (at least ``interval`` seconds and ``min_completions`` successful calls, after
    one interval of warm-up following a change) measures the throughput at the current limit.
    Then:

    * if the last move raised throughput by more than ``noise``, move again the same way;
    * if it lowered it by more than ``noise``, go back and stay ``hold`` epochs;
    * if it changed nothing, keep the smaller of the two limits (fewer threads, same work)
      and stay ``hold`` epochs.

    After a hold it probes again, alternately up and down, one slot at a time, so a shifted
    optimum is found. The limit stays within ``[min, max]``; ``max`` defaults to the core
    count for a :func:`~pipeline.cpu_bound` stage.
    """

    def __init__(
        self,
        min_limit: int,
        max_limit: int,
        initial: int,
        *,
        clock: Clock = time.monotonic,
        interval: float = 0.2,
        min_completions: int = 8,
        noise: float = 0.08,
        hold: int = 6,
    ):
        if not 1 <= min_limit <= initial <= max_limit:
            raise ValueError(f"need 1 <= min <= initial <= max, got {min_limit}, {initial}, {max_limit}")
        self.interval = interval
        self.min = min_limit
        self.max = max_limit
        self.min_completions = min_completions
        self.noise = noise
        self.hold = hold
        self._clock = clock
        self._limit = initial
        self._done = 0
        self._epoch_start: float | None = None
        self._warming = False
        self._prev: tuple[int, float] | None = None  # (limit, throughput) before the last move
        self._direction = 1
        self._holding = 0
        self._next_probe = 1
        self.throughput: float | None = None

    @property
    def limit(self) -> int:
        """The current limit."""
        return self._limit

    def observe(self, latency: float, error: BaseException | None, in_flight: int) -> None:
        """Count one completion (see :class:`Controller`); failures are not work done."""
        if error is None:
            self._done += 1

    def update(self, now: float, in_flight: int, limit: int) -> int:
        """Return the new limit (see :class:`Controller`)."""
        if self._epoch_start is None or self._warming:
            self._start_epoch(now)
            self._warming = False
            return self._limit
        elapsed = now - self._epoch_start
        if elapsed < self.interval or self._done < self.min_completions:
            return self._limit
        tput = self._done / elapsed
        self.throughput = tput
        self._start_epoch(now)
        here = self._limit
        if self._holding > 0:
            self._holding -= 1
            self._prev = (here, tput)
            if self._holding == 0:
                self._direction = self._next_probe
                self._next_probe = -self._next_probe
                return self._move(here, tput)
            return here
        if self._prev is None:
            return self._move(here, tput)
        before, before_tput = self._prev
        if tput > before_tput * (1 + self.noise):
            return self._move(here, tput)  # the move helped: again
        if tput < before_tput * (1 - self.noise):
            self._direction = -self._direction  # the move hurt: go back and settle
            self._holding = self.hold
            self._set(before)
            self._prev = (before, before_tput)
            return self._limit
        # No difference: fewer slots doing the same work is better.
        self._holding = self.hold
        self._set(min(here, before))
        self._prev = (self._limit, max(tput, before_tput))
        return self._limit

    def _move(self, here: int, tput: float) -> int:
        target = here + self._direction
        self._prev = (here, tput)
        if not self.min <= target <= self.max:
            # At an edge (for a CPU stage, usually max = cores): settle, and probe the other
            # way next time.
            self._holding = self.hold
            self._next_probe = -self._direction
            return here
        self._set(target)
        return self._limit

    def _set(self, limit: int) -> None:
        if limit != self._limit:
            self._limit = limit
            self._warming = True

    def _start_epoch(self, now: float) -> None:
        self._epoch_start = now
        self._done = 0
