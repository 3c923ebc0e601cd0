"""The engine's CapacityLimiter against anyio's, per acquire/release pair.

anyio's ``CapacityLimiter`` is resizable and fair too; this measures what it would cost on the
engine's hot path, where every attempt takes one slot of its stage (and a database stage one
more). Uncontended: a free slot, taken and given back. Contended: 8 tasks on 4 slots, each
yielding once while it holds its slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pipeline import CapacityLimiter


async def _uncontended(limiter: Any, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await limiter.acquire()
        limiter.release()
    return (time.perf_counter() - start) / n


async def _contended(limiter: Any, n: int, tasks: int = 8) -> float:
    async def worker() -> None:
        for _ in range(n // tasks):
            await limiter.acquire()
            await asyncio.sleep(0)
            limiter.release()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return (time.perf_counter() - start) / n


def measure(n: int = 200_000, reps: int = 3) -> dict[str, dict[str, float]]:
    """Microseconds per acquire/release pair, the best of ``reps``, for each limiter and case."""
    try:
        import anyio
    except ModuleNotFoundError:
        raise SystemExit(
            "bench: the limiter section compares with anyio, which is not installed: "
            "`make bench` installs it (pip install 'pipeline[bench]')"
        ) from None

    makers: dict[str, Callable[[], Any]] = {
        "pipeline.CapacityLimiter": lambda: CapacityLimiter(4),
        "anyio.CapacityLimiter": lambda: anyio.CapacityLimiter(4),
    }
    out: dict[str, dict[str, float]] = {name: {"uncontended_us": 1e9, "contended_us": 1e9} for name in makers}

    async def run() -> None:
        for _ in range(reps):
            for name, make in makers.items():
                row = out[name]
                row["uncontended_us"] = min(row["uncontended_us"], await _uncontended(make(), n) * 1e6)
                row["contended_us"] = min(row["contended_us"], await _contended(make(), n) * 1e6)

    asyncio.run(run())
    return {name: {k: round(v, 3) for k, v in row.items()} for name, row in out.items()}
