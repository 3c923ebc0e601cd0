"""The run's figures over time, for ``report.html``: the run's snapshot, sampled twice a second.

A sampler task asks the run for the same :class:`~._progress.RunSnapshot` that progress shows
and appends a few ints per stage to growing lists; nothing happens per item. A long run does
not grow without bound: past ``max_samples`` (4000: half an hour at the start rate) every other
sample is dropped and the interval doubles, so a night of any length keeps at most that many
samples (under 1 MB of JSON for ten stages) at a resolution of about a thousandth of the run.
The counters are cumulative, so throughput between any two kept samples stays exact.

Stored as ``timeline.json`` beside ``report.json``, column by column (see :meth:`Timeline.to_dict`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._progress import RunSnapshot, running
from ._report import write_json

__all__ = ["TIMELINE_FORMAT", "Timeline", "open_sampler"]

TIMELINE_FORMAT = 1
_STAGE_SERIES = ("ended", "in_flight", "cap", "queued")


class Timeline:
    """Sampled series of one run: run-wide counters, and per stage ended / in flight / cap / queued.

    Args:
        stages: The stages' names, in order.
        queue_sizes: Each stage's input queue bound, in order.
        interval: Seconds between samples, to begin with.
        max_samples: Past this many samples, every other one is dropped and the interval doubles.
    """

    __slots__ = ("_stage_series", "interval", "max_samples", "queue_sizes", "series", "stages", "t")

    def __init__(
        self,
        stages: Sequence[str],
        queue_sizes: Sequence[int],
        *,
        interval: float = 0.5,
        max_samples: int = 4000,
    ):
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples!r}")
        self.stages = list(stages)
        self.queue_sizes = list(queue_sizes)
        self.interval = interval
        self.max_samples = max_samples
        self.t: list[float] = []
        self.series: dict[str, list[int]] = {
            "read": [],
            "done": [],
            "failed": [],
            "in_flight": [],
        }
        self._stage_series: list[dict[str, list[int]]] = [
            {name: [] for name in _STAGE_SERIES} for _ in self.stages
        ]

    def __len__(self) -> int:
        return len(self.t)

    def sample(self, snap: RunSnapshot) -> None:
        """Append the figures of ``snap``: one float and a few ints per stage."""
        if len(self) >= self.max_samples:
            self._halve()
        s = self.series
        self.t.append(round(snap.elapsed_s, 3))
        s["read"].append(snap.read)
        s["done"].append(snap.done)
        s["failed"].append(snap.failed)
        s["in_flight"].append(snap.in_flight)
        # A run whose stages did not all open has fewer stage snapshots: the rest stay at 0.
        for i, series in enumerate(self._stage_series):
            if i < len(snap.stages):
                st = snap.stages[i]
                ended = st.ok + st.failed + st.skipped
                in_flight, cap, queued = st.in_flight, st.cap, st.queued
            else:
                ended = in_flight = cap = queued = 0
            series["ended"].append(ended)
            series["in_flight"].append(in_flight)
            series["cap"].append(cap)
            series["queued"].append(queued)

    def _halve(self) -> None:
        del self.t[1::2]
        for values in (*self.series.values(), *(v for st in self._stage_series for v in st.values())):
            del values[1::2]
        self.interval *= 2

    def to_dict(self, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The timeline as JSON-ready data, with the run's ``settings`` (for report.html) if given.

        ``t`` (seconds since the start), ``read``, ``done``, ``failed``, ``in_flight``: one value
        per sample. ``stages``: per stage its ``name``, ``queue_size`` and the series ``ended``
        (items that left the stage: ok + failed + skipped, cumulative), ``in_flight``, ``cap``
        and ``queued`` (items waiting in its input queue).
        """
        return {
            "format": TIMELINE_FORMAT,
            "interval_s": self.interval,
            "t": self.t,
            **self.series,
            "stages": [
                {"name": name, "queue_size": size, **series}
                for name, size, series in zip(self.stages, self.queue_sizes, self._stage_series, strict=True)
            ],
            "settings": dict(settings) if settings is not None else None,
        }

    def write(self, path: Path, settings: Mapping[str, Any] | None = None) -> None:
        """Write :meth:`to_dict` as JSON, atomically."""
        write_json(path, self.to_dict(settings))


@contextlib.asynccontextmanager
async def open_sampler(snapshot: Callable[[], RunSnapshot], timeline: Timeline) -> AsyncIterator[None]:
    """Sample ``snapshot()`` into ``timeline`` when the block starts, every ``timeline.interval``
    seconds while it runs, and once more when it ends."""
    timeline.sample(snapshot())
    try:
        async with running(_sample_periodically(snapshot, timeline)):
            yield
    finally:
        timeline.sample(snapshot())


async def _sample_periodically(snapshot: Callable[[], RunSnapshot], timeline: Timeline) -> None:
    while True:
        await asyncio.sleep(timeline.interval)
        timeline.sample(snapshot())
